"""Per layer: the implicit-GEMM tensor-core convolution (``caffelite/kernels/conv_igemm.cu``)
against im2col + cuBLAS (caffelite's TF32 path) and cuDNN (PyTorch), in TF32.

For each 3x3 convolution of ASPP-VGG's training step (DeepLab v2
``deeplabv2_vgg16_aspp_l``, batch 10 at 321x321: conv1_1 to conv5_3 and the four fc6
branches at dilations 6, 12, 18 and 24; layers of the same shape once, with their count)
it times the forward, the data gradient and the weight gradient: caffelite with
``implicit_gemm.ENABLED`` off and on, and torch's ``conv2d`` / ``conv2d_input`` /
``conv2d_weight`` (cuDNN, ``cudnn.benchmark``, TF32 allowed); the forward also with each
tile shape of ``implicit_gemm.TILES`` forced (``implicit-wide``, ``implicit-narrow``,
``implicit-quad``; the quad tile's weight gradient too), each with its own difference
from im2col (``tile_rel_diff``: ``quad``, ``quad/weight_grad`` ...). Medians of
``--repeats`` timings of ``--calls`` calls each (CUDA events), after one warm-up call.
Each row also gives the implicit result's largest difference from the im2col one,
relative to the largest im2col value (both are TF32: about 1e-3 is expected; far more
means a broken kernel).

    python benchmarks/conv_igemm.py --json conv_igemm.json             # on the GPU
    python benchmarks/conv_igemm.py --device emulated --size 9 --batch 1 \\
        --layers conv1_2,fc6_2 --repeats 1 --calls 1                    # CPU smoke test

The totals weight each shape by its count: what one training step's 3x3 forwards and
data gradients cost on each path (conv1_1's data gradient is not needed in training;
it is left out of the totals).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from caffelite import backend  # noqa: E402
from caffelite.layers import implicit_gemm, im2col  # noqa: E402


def pooled(size):
    """Caffe's ceil-mode 3x3 stride-2 pad-1 pooling."""
    return int(math.ceil((size + 2 - 3) / 2)) + 1


def vgg_layers(size):
    """(name, count, channels, outputs, grid, pad = dilation) of ASPP-VGG's 3x3 layers."""
    s1 = size
    s2 = pooled(s1)
    s3 = pooled(s2)
    s4 = pooled(s3)
    return [("conv1_1", 1, 3, 64, s1, 1), ("conv1_2", 1, 64, 64, s1, 1),
            ("conv2_1", 1, 64, 128, s2, 1), ("conv2_2", 1, 128, 128, s2, 1),
            ("conv3_1", 1, 128, 256, s3, 1), ("conv3_2", 2, 256, 256, s3, 1),
            ("conv4_1", 1, 256, 512, s4, 1), ("conv4_2", 2, 512, 512, s4, 1),
            ("conv5_1", 3, 512, 512, s4, 2), ("fc6_1", 1, 512, 1024, s4, 6),
            ("fc6_2", 1, 512, 1024, s4, 12), ("fc6_3", 1, 512, 1024, s4, 18),
            ("fc6_4", 1, 512, 1024, s4, 24)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "emulated"))
    p.add_argument("--size", type=int, default=321, help="training crop (height = width)")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--layers", default="", help="comma list of layer names (default all)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=5, help="calls per timing")
    p.add_argument("--no-torch", dest="torch", action="store_false")
    p.add_argument("--json", default=None, help="write the rows to this file")
    return p.parse_args(argv)


class Clock:
    """Milliseconds per call of ``fn``: CUDA events on a GPU, the wall clock else."""

    def __init__(self, xp, calls, repeats):
        self.xp, self.calls, self.repeats = xp, calls, repeats
        self.cuda = hasattr(xp, "cuda") and hasattr(xp.cuda, "Event")

    def ms(self, fn, sync=None):
        fn()
        times = []
        for _ in range(self.repeats):
            if self.cuda:
                start, stop = self.xp.cuda.Event(), self.xp.cuda.Event()
                start.record()
                for _ in range(self.calls):
                    fn()
                stop.record()
                stop.synchronize()
                times.append(self.xp.cuda.get_elapsed_time(start, stop) / self.calls)
            else:
                if sync:
                    sync()
                t = time.perf_counter()
                for _ in range(self.calls):
                    fn()
                if sync:
                    sync()
                times.append((time.perf_counter() - t) * 1e3 / self.calls)
        return statistics.median(times)


PASSES = ("forward", "data_grad", "weight_grad")


def caffelite_paths(xp, clock, x, w, b, out, g, dx, dw, geom):
    """{(pass, engine): ms}, the implicit results' relative differences and those of each
    forced tile's forward."""
    times, diffs, tile_diffs = {}, {}, {}
    results = {}
    for implicit in (False, True):
        implicit_gemm.ENABLED = implicit
        engine = "implicit" if implicit else "im2col"

        def forward():
            if not im2col.forward_gemm(x, w, out, geom, 1, bias=b):
                out[...] += b.reshape(1, -1, 1, 1)

        def data_grad():
            im2col.backward_gemm(g, w, dx, geom, 1)

        def weight_grad():
            dw.fill(0)
            im2col.weight_gemm(x, g, dw, geom, 1)

        times["forward", engine] = clock.ms(forward, backend.synchronize)
        results["forward", engine] = backend.to_host(out).copy()
        times["data_grad", engine] = clock.ms(data_grad, backend.synchronize)
        results["data_grad", engine] = backend.to_host(dx).copy()
        times["weight_grad", engine] = clock.ms(weight_grad, backend.synchronize)
        results["weight_grad", engine] = backend.to_host(dw).copy()
    for tile in implicit_gemm.TILES:        # each tile shape forced, forward only
        implicit_gemm.TILE = tile
        try:
            out.fill(np.nan)
            times["forward", f"implicit-{tile}"] = clock.ms(forward, backend.synchronize)
            results["forward", tile] = backend.to_host(out).copy()
            if implicit_gemm.wgrad_tile() is not implicit_gemm.WGRAD:   # its own too
                times["weight_grad", f"implicit-{tile}"] = clock.ms(weight_grad,
                                                                   backend.synchronize)
                results["weight_grad", tile] = backend.to_host(dw).copy()
        finally:
            implicit_gemm.TILE = None
    implicit_gemm.ENABLED = False
    for what in PASSES:
        diffs[what] = relative_difference(results[what, "implicit"], results[what, "im2col"])
    for (what, tile), result in results.items():
        if tile in implicit_gemm.TILES:
            key = tile if what == "forward" else f"{tile}/{what}"
            tile_diffs[key] = relative_difference(result, results[what, "im2col"])
    return times, diffs, tile_diffs


def relative_difference(result, reference):
    """The largest |result - reference| relative to the largest |reference| (NaN, an
    unwritten element, gives NaN)."""
    return float(np.max(np.abs(result - reference)) /
                 max(float(np.max(np.abs(reference))), 1e-30))


def torch_paths(torch, clock, x, w, b, g, pad):
    """{(pass, "cudnn"): ms} for the same arrays (copied to torch tensors)."""
    tx, tw, tb, tg = (torch.as_tensor(a, device="cuda") for a in
                      (backend.to_host(x), backend.to_host(w), backend.to_host(b),
                       backend.to_host(g)))
    conv = torch.nn.functional.conv2d
    times = {("forward", "cudnn"): clock.ms(
        lambda: conv(tx, tw, tb, 1, pad, pad), torch.cuda.synchronize)}
    times["data_grad", "cudnn"] = clock.ms(
        lambda: torch.nn.grad.conv2d_input(tx.shape, tw, tg, 1, pad, pad),
        torch.cuda.synchronize)
    times["weight_grad", "cudnn"] = clock.ms(
        lambda: torch.nn.grad.conv2d_weight(tx, tw.shape, tg, 1, pad, pad),
        torch.cuda.synchronize)
    return times


def measure(args):
    # Every layer on the implicit path when it is on (the per-layer comparison is what
    # sets implicit_gemm.MIN_TILES_PER_SM).
    implicit_gemm.MIN_TILES_PER_SM = 0
    emulated = args.device == "emulated"
    backend.set_mode_gpu(emulate=emulated)
    backend.set_tf32(True)
    xp = backend.device_module()
    torch = None
    if args.torch and not emulated:
        try:
            import torch
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        except ImportError:
            torch = None
    clock = Clock(xp, args.calls, args.repeats)
    wanted = {n for n in args.layers.split(",") if n}
    rows = []
    rng = np.random.default_rng(0)
    for name, count, channels, outputs, size, dilation in vgg_layers(args.size):
        if wanted and name not in wanted:
            continue
        geom = im2col.ConvGeometry((3, 3), (1, 1), (dilation, dilation), (dilation, dilation))
        shape = (args.batch, channels, size, size)
        x = xp.asarray(rng.standard_normal(shape, dtype=np.float32))
        w = xp.asarray(rng.standard_normal((outputs, channels, 3, 3), dtype=np.float32)
                       / np.float32(3 * math.sqrt(channels)))
        b = xp.asarray(rng.standard_normal(outputs, dtype=np.float32))
        out = xp.empty((args.batch, outputs, size, size), np.float32)
        g = xp.asarray(rng.standard_normal(out.shape, dtype=np.float32))
        dx = xp.empty(shape, np.float32)
        dw = xp.empty(w.shape, np.float32)
        row = {"layer": name, "count": count, "shape": list(shape), "outputs": outputs,
               "dilation": dilation,
               "gflop": 2 * args.batch * outputs * channels * 9 * size * size / 1e9}
        try:
            times, diffs, tile_diffs = caffelite_paths(xp, clock, x, w, b, out, g, dx, dw,
                                                       geom)
            if torch is not None:
                times.update(torch_paths(torch, clock, x, w, b, g, dilation))
            row["ms"] = {f"{p}/{e}": t for (p, e), t in times.items()}
            row["rel_diff"] = diffs
            row["tile_rel_diff"] = tile_diffs
        except Exception as e:                 # noqa: BLE001 (reported in the row)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        rows.append(row)
        print(row_line(row), file=sys.stderr, flush=True)
        del x, w, b, out, g, dx, dw
    backend.set_tf32(False)
    backend.set_mode_cpu()
    return rows


def row_line(row):
    if "error" in row:
        return f"{row['layer']}: {row['error']}"
    ms = row["ms"]
    parts = [f"{row['layer']} x{row['count']} {row['gflop']:.1f} GFLOP"]
    for what in PASSES:
        cells = [f"{e} {ms[f'{what}/{e}']:.3f}" for e in ("im2col", "implicit", "cudnn")
                 if f"{what}/{e}" in ms]
        parts.append(f"{what}: " + ", ".join(cells) +
                     f" ms (diff {row['rel_diff'][what]:.1e})")
    return "; ".join(parts)


def totals(rows):
    """{pass/engine: ms summed over the measured shapes, weighted by their counts}
    (conv1_1's data gradient left out: training never needs it), the forced tile shapes
    included."""
    out = {}
    for row in rows:
        for key, ms in row.get("ms", {}).items():
            if key.startswith("data_grad/") and row["layer"] == "conv1_1":
                continue
            out[key] = out.get(key, 0.0) + ms * row["count"]
    return out


def markdown(rows):
    lines = ["| layer | count | GFLOP | fwd im2col ms | fwd implicit ms | fwd cuDNN ms | "
             "dgrad im2col ms | dgrad implicit ms | dgrad cuDNN ms | wgrad im2col ms | "
             "wgrad implicit ms | wgrad cuDNN ms | implicit TFLOP/s fwd | "
             "rel. diff fwd / dgrad / wgrad |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['layer']} | {row['count']} | {row['gflop']:.1f} | "
                         f"{row['error']} ||||||||||| ")
            continue
        ms = row["ms"]
        cell = lambda k: f"{ms[k]:.3f}" if k in ms else "–"   # noqa: E731
        rate = row["gflop"] / ms["forward/implicit"] if ms.get("forward/implicit") else 0
        lines.append(
            f"| {row['layer']} | {row['count']} | {row['gflop']:.1f} | "
            f"{cell('forward/im2col')} | {cell('forward/implicit')} | {cell('forward/cudnn')}"
            f" | {cell('data_grad/im2col')} | {cell('data_grad/implicit')} | "
            f"{cell('data_grad/cudnn')} | {cell('weight_grad/im2col')} | "
            f"{cell('weight_grad/implicit')} | {cell('weight_grad/cudnn')} | {rate:.0f} | "
            f"{row['rel_diff']['forward']:.1e} / {row['rel_diff']['data_grad']:.1e} / "
            f"{row['rel_diff']['weight_grad']:.1e} |")
    t = totals(rows)
    lines.append("")
    lines.append("Totals (weighted by count): " + ", ".join(
        f"{k} {v:.2f} ms" for k, v in sorted(t.items())))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    rows = measure(args)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "totals": totals(rows), "args": vars(args)}, f,
                      indent=1)
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
