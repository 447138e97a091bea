"""GPU training and test speed: caffelite (CuPy, own kernels, cuBLAS) vs the same net in
PyTorch/cuDNN.

Measured, for each net, each engine and each precision:

* ``train``: one full training iteration, forward + backward + SGD update (iter_size
  forward/backward passes, as the net's solver says, then one update), of
  ASPP-VGG (``deeplabv2_vgg16_aspp_l``, batch 10 at 321×321) and ResNet-101 MSC
  (``deeplabv2_resnet101_msc``, batch 1, iter_size 10);
* ``test``: one forward of the TEST net at 513×513, batch 1.

caffelite runs in GPU mode (``set_mode_gpu``); its TF32 flag, where the build has one
(``caffelite.backend.set_tf32``), follows the precision (without it, caffelite's TF32
rows say so).  The PyTorch side is ``benchmarks/torch_net.py``: the same layers as
``torch.nn.functional`` calls, built from the caffelite net with its weights, in-place
ReLUs where Caffe has them, eval-mode ``batch_norm``, ``torch.optim.SGD`` with the
solver's lr/decay multipliers; ``cudnn.benchmark`` on; FP32 rows turn TF32 off for
cuBLAS and cuDNN, TF32 rows turn both on.  The data layers become ``Input`` layers
holding one random batch (pure compute: no image decoding); SegAccuracy, MatWrite and
Silence are dropped.  Weights are random (He-normal, random BatchNorm statistics, the
classifier scaled so that the softmax is not saturated).

Each measurement: one (or ``--warmup``) untimed iteration, then up to ``--iters`` timed
ones (device synchronised before each clock read; fewer if the time budget runs short),
median and min.  Peak memory: ``torch.cuda.max_memory_allocated`` (and reserved) for
torch; for caffelite the high-water mark of the CuPy pool's used bytes during the warm-up
iteration (an allocator hook) and the pool's total after timing.  Achieved FLOP/s count
the convolution and InnerProduct GEMMs from the layer shapes (2·M·N·K each; in training
also the weight- and data-gradient GEMMs of the layers that need them, ≈3×) against a
measured cuBLAS SGEMM rate (8192² float32 ``cupy.matmul``; numpy 1024² on the CPU).  A
check column compares the engines on the same numbers: the first forward's loss (train;
caffelite's dropout masks are given to torch) or the final score map (test), as
max |a-b| / max |b|.

After each net's training rows, one more FP32 pass is profiled (``--no-profile`` skips
it): caffelite's time per layer type with the device synchronised after every layer,
and PyTorch's CUDA kernels by name (``torch.profiler``), to show where a gap comes from.
``--kernels tf32,fp32`` profiles one training iteration of each engine at those
precisions kernel by kernel instead (CUPTI, through ``torch.profiler``, records CuPy's
and cuBLAS's kernels as well as torch's): CUDA time per kind (cuDNN convolutions,
cuBLAS GEMMs, im2col/col2im, element-wise and copies, other), side by side, and each
engine's longest kernels, without synchronising between layers.

Prints a Markdown table for BENCHMARKS.md (progress on stderr); ``--json OUT`` writes
every number.  The whole run is one call: builds, SGEMM, the 16 measurements sharing
``--budget`` seconds (330: with imports, kernel compiles and net builds about 6-7
minutes).  A failure (no CuPy, no torch, a caffelite GPU error, the budget spent) becomes
that row's text instead of stopping the run::

    python benchmarks/gpu_train.py --json gpu_train.json                 # on the GPU
    python benchmarks/gpu_train.py --device cpu --net vgg --size 33 --test-size 33 \\
        --batch 2 --iters 1 --precision fp32                            # CPU smoke test
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import caffelite as caffe  # noqa: E402
from caffelite import backend  # noqa: E402
from caffelite.io import prototxt  # noqa: E402
from caffelite.net import filter_net  # noqa: E402
from caffelite.proto import caffe_pb2  # noqa: E402
from cpu_forward import machine, randomize  # noqa: E402

NETS = {
    "vgg": {"label": "ASPP-VGG", "dir": "deeplabv2_vgg16_aspp_l", "output": "fc8_interp",
            "classifier": "fc8_"},
    "resnet": {"label": "ResNet-101 MSC", "dir": "deeplabv2_resnet101_msc",
               "output": "fc1_interp", "classifier": "fc1_"},
}
DROP = ("MatWrite", "Silence", "SegAccuracy")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", default="vgg,resnet", help="comma list of: vgg, resnet")
    p.add_argument("--phase", default="train,test", help="comma list of: train, test")
    p.add_argument("--precision", default="fp32,tf32", help="comma list of: fp32, tf32")
    p.add_argument("--engines", default="caffelite,torch",
                   help="comma list of: caffelite (layer by layer, CUDA graphs off), "
                        "caffelite-per-image (one GEMM per image "
                        "and unpadded columns, as before image groups), caffelite-unfused "
                        "(BatchNorm -> Scale -> ReLU layer by layer), caffelite-im2col "
                        "(no tap GEMMs for large dilations), caffelite-graphs (passes "
                        "recorded into CUDA graphs: caffelite's default), "
                        "caffelite-implicit (caffelite-graphs with the implicit-GEMM "
                        "convolution; TF32 rows only), caffelite-autotune "
                        "(caffelite-graphs with each convolution's path timed and "
                        "chosen: conv_autotune), caffelite-blob-1x1 (1x1 "
                        "convolutions' GEMMs on the blobs, not padded image groups; TF32 "
                        "rows only), torch")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu", "emulated"),
                   help="emulated: caffelite's GPU mode on the CPU emulator and torch on "
                        "the CPU (checks this script's GPU code paths where no GPU is)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (at most)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations (at least 1)")
    p.add_argument("--size", type=int, default=321, help="training crop (height = width)")
    p.add_argument("--test-size", type=int, default=513, help="test input (height = width)")
    p.add_argument("--batch", type=int, default=None,
                   help="training batch (default: the net's, 10 for ASPP-VGG, 1 for ResNet)")
    p.add_argument("--iter-size", type=int, default=None,
                   help="forward/backward passes per update (default: the solver's)")
    p.add_argument("--budget", type=float, default=330,
                   help="seconds for all measurements; each gets a share of what is left")
    p.add_argument("--base-lr", type=float, default=1e-9,
                   help="both engines' base_lr: from random weights the corpus's rate "
                        "diverges within a few iterations (caffelite then stops on the NaN "
                        "loss); the rate does not change the work")
    p.add_argument("--max-seconds", type=float, default=40,
                   help="cap on the timed part of one measurement")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the per-layer-type breakdown of one training pass")
    p.add_argument("--kernels", default="",
                   help="comma list of precisions (fp32, tf32) at which one training "
                        "iteration of each engine is profiled kernel by kernel "
                        "(torch.profiler, which records CuPy's kernels too); default none")
    p.add_argument("--json", default=None, help="write all results to this file")
    p.add_argument("--corpus", default=default_corpus(),
                   help="the corpus folder (default: $CAFFELITE_SHARED/corpus, else "
                        "shared/corpus next to or inside the checkout)")
    args = p.parse_args(argv)
    args.warmup = max(1, args.warmup)
    args.iters = max(1, args.iters)
    args.kernels = [v for v in args.kernels.split(",") if v]
    if any(v not in ("fp32", "tf32") for v in args.kernels):
        p.error(f"--kernels: unknown {args.kernels} (choose from fp32, tf32)")
    known = {"net": NETS, "phase": ("train", "test"), "precision": ("fp32", "tf32"),
             "engines": ("caffelite", "caffelite-per-image", "caffelite-unfused",
                         "caffelite-im2col", "caffelite-graphs", "caffelite-implicit",
                         "caffelite-autotune", "caffelite-blob-1x1", "torch")}
    for field, choices in known.items():
        values = [v for v in getattr(args, field).split(",") if v]
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            p.error(f"--{field}: unknown {unknown} (choose from {', '.join(choices)})")
        setattr(args, field, values)
    if args.device != "cuda":
        args.precision = [v for v in args.precision if v == "fp32"] or ["fp32"]
    return args


def default_corpus():
    candidates = [os.path.join(os.path.dirname(ROOT), "shared"), os.path.join(ROOT, "shared")]
    if os.environ.get("CAFFELITE_SHARED"):
        candidates.insert(0, os.environ["CAFFELITE_SHARED"])
    for shared in candidates:
        if os.path.isdir(os.path.join(shared, "corpus")):
            return os.path.join(shared, "corpus")
    return os.path.join(candidates[0], "corpus")


# ---------------------------------------------------------------------- the nets
def corpus_defines(path):
    names = set(re.findall(r"\$\{(\w+)\}", open(path).read()))
    defines = {n: f"/tmp/{n.lower()}" for n in names}
    defines.update(NUM_LABELS="21", EXP="voc12", NET_ID="deeplab")
    return defines


def bench_net(corpus, key, phase, size, batch=None):
    """The corpus net of ``phase`` as one NetParameter with Input layers: ImageSegData →
    Input with the tops that other layers read (data N×3×S×S, label N×1×S×S, data_dim
    N×1×1×2), no DROP layers, no phase rules.  Returns (param, {input: shape})."""
    name = "train" if phase == caffe.TRAIN else "test"
    path = os.path.join(corpus, "prototxt", NETS[key]["dir"], f"{name}.prototxt")
    param, _ = prototxt.read_net(path, corpus_defines(path))
    param = filter_net(param, caffe_pb2.NetState(phase=phase))
    kept = [l for l in param.layer if l.type not in DROP]
    read = {b for l in kept for b in l.bottom}
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    out.ClearField("layer")
    shapes = {}
    for layer in kept:
        new = out.layer.add()
        new.CopyFrom(layer)
        new.ClearField("include")
        new.ClearField("exclude")
        if layer.type == "ImageSegData":
            n = batch or layer.image_data_param.batch_size
            new.type = "Input"
            for field in ("transform_param", "image_data_param"):
                new.ClearField(field)
            del new.top[:]
            for top, shape in zip(layer.top, ([n, 3, size, size], [n, 1, size, size],
                                              [n, 1, 1, 2])):
                if top in read:
                    new.top.append(top)
                    new.input_param.shape.add().dim.extend(shape)
                    shapes[top] = tuple(shape)
    return out, shapes


def bench_solver(corpus, key, net_param, iter_size=None):
    """The net's corpus solver (SGD, momentum, weight decay, iter_size) training
    ``net_param``, without snapshots, display or tests."""
    path = os.path.join(corpus, "prototxt", NETS[key]["dir"], "solver.prototxt")
    sp = prototxt.read_solver(path, corpus_defines(path))
    for field in ("train_net", "net", "snapshot", "snapshot_prefix", "test_interval",
                  "test_iter", "test_net", "display"):
        sp.ClearField(field)
    sp.train_net_param.CopyFrom(net_param)
    if iter_size:
        sp.iter_size = iter_size
    return sp


def random_weights(net, key, seed=0):
    """cpu_forward's random weights, with the classifier convolutions scaled by 0.01:
    He-normal nets give scores of std ~200 here, a saturated softmax whose loss and
    gradients hang on the last bits of the scores; scaled, std ~2-4."""
    randomize(net, seed)
    prefix = NETS[key]["classifier"]
    done = set()                # MSC scales share their classifiers: scale each once
    for name, blobs in net.params.items():
        if name.startswith(prefix) and net.layer_dict[name].type == "Convolution":
            for b in blobs:
                address = b.data.__array_interface__["data"][0]
                if address not in done:
                    done.add(address)
                    b.data[...] *= np.float32(0.01)


def fill_inputs(net, shapes, seed=1):
    """Mean-subtracted-pixel-like data and image-like labels (background + two classes,
    10 % ignored), the same numbers for both engines."""
    rng = np.random.default_rng(seed)
    values = {}
    for name, shape in shapes.items():
        if name == "data":
            v = rng.normal(0, 50, shape)
        elif name == "data_dim":
            v = np.broadcast_to(np.array(shapes["data"][2:], float), shape)
        else:
            v = np.empty(shape)
            for n in range(shape[0]):
                classes = np.array([0, *rng.choice(np.arange(1, 21), 2, replace=False)])
                v[n] = classes[rng.integers(0, 3, shape[1:])]
                v[n][rng.random(shape[1:]) < 0.1] = 255
        values[name] = np.ascontiguousarray(v, dtype=np.float32)
        net.blobs[name].data[...] = values[name]
    return values


def gemm_flops(net, training):
    """FLOPs of the convolution / InnerProduct GEMMs of one forward (+ backward)."""
    total = 0
    for i, (layer, bottoms, tops) in enumerate(zip(net.layers, net.bottom_blobs,
                                                   net.top_blobs)):
        if layer.type not in ("Convolution", "Deconvolution", "InnerProduct"):
            continue
        w = layer.blobs[0].shape
        if layer.type == "Convolution":        # per output pixel: C_out × (C_in/g·k·k)
            fwd = 2 * tops[0].count * int(np.prod(w[1:]))
        elif layer.type == "Deconvolution":    # per input pixel: C_in × (C_out/g·k·k)
            fwd = 2 * bottoms[0].count * int(np.prod(w[1:]))
        else:                                  # per output value: K inputs
            fwd = 2 * tops[0].count * _ip_k(layer)
        passes = 1
        if training and net.layer_need_backward[i]:
            passes += bool(layer.param_propagate_down and layer.param_propagate_down[0])
            passes += bool(net.bottom_need_backward[i][0])
        total += fwd * passes
    return total


def _ip_k(layer):
    w = layer.blobs[0].shape
    return w[0] if layer.layer_param.inner_product_param.transpose else w[1]


# ---------------------------------------------------------------------- devices
class Device:
    """Synchronisation, precision flags, memory counters for cpu or cuda."""

    def __init__(self, kind):
        self.kind = kind
        self.cupy = None
        self.torch = None
        self.caffelite_gpu_error = self.torch_error = None
        self.profiles = []
        self.kernel_profiles = []

    def start(self, need_torch):
        if need_torch:
            try:
                import torch
                self.torch = torch
                torch.manual_seed(0)
                if self.kind == "cuda" and not torch.cuda.is_available():
                    self.torch_error = f"torch {torch.__version__} sees no CUDA device"
            except ImportError as e:
                self.torch_error = f"torch is not installed ({e})"
        # The "caffelite" engine is layer by layer; caffelite-graphs measures the
        # default (CUDA graphs on) against it.
        caffe.set_cuda_graphs(False)
        if self.kind == "cpu":
            caffe.set_mode_cpu()
            return
        if self.kind == "emulated":
            caffe.set_mode_gpu(emulate=True)
            return
        if self.torch is not None and not self.torch_error:
            self.torch.backends.cudnn.benchmark = True
        try:
            import cupy
            self.cupy = cupy
        except ImportError as e:
            self.caffelite_gpu_error = f"CuPy is not installed ({e})"
        try:
            caffe.set_mode_gpu()
        except Exception as e:             # noqa: BLE001 (reported in the table)
            self.caffelite_gpu_error = f"set_mode_gpu failed: {first_line(e)}"

    def sync_caffelite(self):
        if self.cupy is not None and self.kind == "cuda":
            self.cupy.cuda.Device().synchronize()

    def has_torch(self):
        return self.torch is not None and not self.torch_error

    def sync_torch(self):
        if self.kind == "cuda":
            self.torch.cuda.synchronize()

    def set_precision(self, precision):
        """TF32 on or off in torch and caffelite; returns what caffelite could set."""
        tf32 = precision == "tf32"
        if self.has_torch() and self.kind == "cuda":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.torch.backends.cuda.matmul.allow_tf32 = tf32
                self.torch.backends.cudnn.allow_tf32 = tf32
        set_tf32 = getattr(backend, "set_tf32", None)
        if set_tf32 is None:
            return not tf32             # FP32 is caffelite's only mode without the flag
        set_tf32(tf32)
        return True

    def free(self):
        import gc
        gc.collect()
        if self.cupy is not None:
            self.cupy.get_default_memory_pool().free_all_blocks()
        if self.has_torch() and self.kind == "cuda":
            self.torch.cuda.empty_cache()

    @contextlib.contextmanager
    def track_cupy_peak(self, result):
        """High-water mark of the CuPy pool's used bytes while the block runs."""
        if self.cupy is None or self.kind != "cuda":
            yield
            return
        cupy = self.cupy
        pool = cupy.get_default_memory_pool()
        peak = [pool.used_bytes()]

        def tracked(size):
            mem = pool.malloc(size)
            used = pool.used_bytes()
            if used > peak[0]:
                peak[0] = used
            return mem
        get_allocator = getattr(cupy.cuda, "get_allocator", None)
        previous = get_allocator() if get_allocator else pool.malloc
        cupy.cuda.set_allocator(tracked)
        try:
            yield
        finally:
            cupy.cuda.set_allocator(previous)
            result["peak_bytes"] = peak[0]
            result["pool_bytes"] = pool.total_bytes()

    def sgemm_rates(self):
        """Measured GEMM FLOP/s: {"fp32": ..., "tf32": ...} (8192² on the GPU, numpy
        1024² on the CPU)."""
        if self.kind != "cuda":
            a = np.random.default_rng(0).standard_normal((1024, 1024), np.float32)
            return {"fp32": _rate(lambda: a @ a, 1024, lambda: None), "how": "numpy 1024²"}
        rates, how = {}, []
        for precision in ("fp32", "tf32"):
            caffelite_flag = self.set_precision(precision)
            if self.cupy is not None and caffelite_flag:
                cp = self.cupy
                a = cp.random.standard_normal((8192, 8192), dtype=cp.float32)
                rates[precision] = _rate(lambda: cp.matmul(a, a), 8192, self.sync_caffelite)
                how.append(f"{precision}: cupy.matmul 8192²")
                del a
            elif self.has_torch():
                t = self.torch
                a = t.randn(8192, 8192, device="cuda")
                rates[precision] = _rate(lambda: a @ a, 8192, self.sync_torch)
                how.append(f"{precision}: torch.matmul 8192²")
                del a
        self.set_precision("fp32")
        self.free()
        rates["how"] = ", ".join(how)
        return rates


def _rate(fn, n, sync, repeats=10):
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return 2.0 * n ** 3 / statistics.median(times)


def first_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:160]


def host(array):
    to_host = getattr(backend, "to_host", None)
    if to_host is not None:
        return to_host(array)
    return array.get() if hasattr(array, "get") else np.asarray(array)


def rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ---------------------------------------------------------------------- measuring
class Clock:
    """The measuring budget: each measurement gets its share of what is left."""

    def __init__(self, budget, cap, count):
        self.deadline = time.perf_counter() + budget
        self.cap, self.left = cap, count

    def spent(self):
        return time.perf_counter() >= self.deadline

    def share(self):
        remaining = self.deadline - time.perf_counter()
        share = remaining / max(self.left, 1)
        self.left -= 1
        return min(self.cap, share) if remaining > 0 else 0.0


def skipped_rows(key, phase, args, clock, rows, why):
    """Rows for the measurements of a net not run (budget spent, or building failed)."""
    for precision in args.precision:
        for engine in args.engines:
            clock.share()
            train = phase == "train"
            rows.append({"net": NETS[key]["label"], "phase": phase, "engine": engine,
                         "precision": precision, "size": args.size if train else args.test_size,
                         "batch": (args.batch or "?") if train else 1, "iter_size": 1,
                         "gflop": 0.0, "error": why})


def measure(step, sync, warmup, iters, seconds, track=None):
    """Warm-up iterations (the first under ``track``), then timed ones until ``iters``
    or ``seconds``; returns the list of times."""
    with track or contextlib.nullcontext():
        step()
        sync()
    for _ in range(warmup - 1):
        step()
        sync()
    times, start = [], time.perf_counter()
    while len(times) < iters:
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > seconds:
            break
    return times


def timing_row(times):
    return {"median_s": statistics.median(times), "min_s": min(times), "iters": len(times)}


def caffelite_warmup(args):
    """With CUDA graphs, one more untimed iteration: a segment runs eagerly the first
    time and is recorded the second."""
    from caffelite import cuda_graphs
    return args.warmup + (1 if cuda_graphs.enabled() else 0)


def run_caffelite_train(dev, solver, args, seconds):
    row = {}
    times = measure(lambda: solver.step(1), dev.sync_caffelite, caffelite_warmup(args),
                    args.iters, seconds, dev.track_cupy_peak(row))
    row.update(timing_row(times))
    return row


def torch_train_step(tnet, inputs, sgd, iter_size):
    """Caffe's Solver::Step for the torch net: iter_size forward/backward passes with
    the gradients averaged, then one SGD update."""
    sgd.zero_grad(set_to_none=True)
    for _ in range(iter_size):
        loss, _ = tnet(inputs)
        (loss / iter_size).backward()
    sgd.step()


def run_torch_train(dev, tnet, inputs, sgd, iter_size, args, seconds):
    return _torch_measure(dev, lambda: torch_train_step(tnet, inputs, sgd, iter_size),
                          args, seconds, dev.torch)


def run_caffelite_test(dev, net, args, seconds):
    row = {}
    times = measure(net.forward_from_to, dev.sync_caffelite, caffelite_warmup(args),
                    args.iters, seconds, dev.track_cupy_peak(row))
    row.update(timing_row(times))
    return row


def run_torch_test(dev, tnet, inputs, output, args, seconds, result):
    torch = dev.torch

    def step():
        with torch.inference_mode():
            result["out"] = tnet(inputs, keep=[output])[1][output]
    return _torch_measure(dev, step, args, seconds, torch)


def _torch_measure(dev, step, args, seconds, torch):
    if dev.kind == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = measure(step, dev.sync_torch, args.warmup, args.iters, seconds)
    row = timing_row(times)
    if dev.kind == "cuda":
        row["peak_bytes"] = torch.cuda.max_memory_allocated()
        row["pool_bytes"] = torch.cuda.max_memory_reserved()
    return row


def torch_inputs(dev, shapes_values):
    device = "cuda" if dev.kind == "cuda" else "cpu"
    return {k: dev.torch.as_tensor(v, device=device) for k, v in shapes_values.items()}


def dropout_masks(net):
    return {name: host(layer.mask) for name, layer in net.layer_dict.items()
            if layer.type == "Dropout" and getattr(layer, "mask", None) is not None}


def bench_train(dev, key, args, clock, rates, rows):
    label = NETS[key]["label"]
    param, shapes = bench_net(args.corpus, key, caffe.TRAIN, args.size, args.batch)
    sp = bench_solver(args.corpus, key, param, args.iter_size)
    sp.base_lr = args.base_lr
    caffe.set_random_seed(5)
    solver = caffe.get_solver(sp)
    random_weights(solver.net, key)
    values = fill_inputs(solver.net, shapes)
    net = solver.net
    base = {"net": label, "phase": "train", "size": args.size,
            "batch": shapes["data"][0], "iter_size": sp.iter_size,
            "gflop": sp.iter_size * gemm_flops(net, True) / 1e9}
    tnet = tinputs = sgd = None
    check = {}
    if "torch" in args.engines and dev.has_torch():
        from torch_net import TorchNet
        tnet = TorchNet(net, device="cuda" if dev.kind == "cuda" else "cpu")
        tinputs = torch_inputs(dev, values)
        sgd = tnet.sgd(sp.base_lr, sp.momentum, sp.weight_decay)
        check = train_check(dev, net, tnet, tinputs)
    run = {"caffelite": lambda seconds: run_caffelite_train(dev, solver, args, seconds),
           "torch": lambda seconds: run_torch_train(dev, tnet, tinputs, sgd, sp.iter_size,
                                                    args, seconds)}
    run.update(variants(run["caffelite"], net))
    for precision in args.precision:
        for engine in args.engines:
            rows.append(engine_row(dev, dict(base, **check), engine, precision, clock, rates,
                                   run[engine]))
    if args.profile and not clock.spent():
        dev.profiles.append(profile_train(dev, label, solver, tnet, tinputs, sgd))
    for precision in args.kernels:
        if not clock.spent():
            steps = {"caffelite": lambda: solver.step(1)}
            from caffelite.layers import conv_autotune, implicit_gemm
            for engine, module in (("caffelite-implicit", implicit_gemm),
                                   ("caffelite-autotune", conv_autotune)):
                if engine in args.engines:
                    steps[engine] = step_with(solver, module, "ENABLED", True)
            steps["torch"] = None if tnet is None else (
                lambda: torch_train_step(tnet, tinputs, sgd, sp.iter_size))
            dev.kernel_profiles.append(kernel_profile(dev, label, precision, steps))
    del run, solver, net, tnet, sgd, tinputs
    dev.free()


@contextlib.contextmanager
def setting(module, attr, value):
    """``module.attr`` set to ``value`` for the ``with`` block."""
    saved = getattr(module, attr)
    setattr(module, attr, value)
    try:
        yield
    finally:
        setattr(module, attr, saved)


def with_setting(module, attr, value, run, needs=None,
                 unneeded="same as caffelite for this net"):
    """``run`` with ``module.attr`` set to ``value`` (a before/after measurement);
    ``needs()`` false makes the row say ``unneeded`` instead (the setting changes
    nothing here)."""
    def wrapped(seconds):
        if needs is not None and not needs():
            raise RuntimeError(unneeded)
        with setting(module, attr, value):
            return run(seconds)
    return wrapped


def variants(run, net):
    """The caffelite engines that undo one of the GPU optimisations:
    caffelite-per-image: one GEMM per image on unpadded columns (Caffe's way);
    caffelite-unfused: BatchNorm -> Scale -> ReLU chains layer by layer;
    caffelite-im2col: im2col also where tap GEMMs skip the padding (large dilations);
    caffelite-graphs: CUDA graphs on (caffelite.cuda_graphs), caffelite's default; the
    other engines run layer by layer, so each measures one setting, except
    caffelite-implicit: caffelite-graphs with the implicit-GEMM convolution (TF32 only),
    to compare with caffelite-graphs;
    caffelite-autotune: caffelite-graphs with convolution autotuning (conv_autotune:
    each product's paths timed in the warm-up, the fastest used), to compare with
    caffelite-graphs; the row counts the paths chosen;
    caffelite-blob-1x1: large 1x1 convolutions on odd grids take their GEMMs on the
    blobs, one per image, instead of padded image groups (TF32 only)."""
    from caffelite import backend, fusion
    from caffelite.layers import im2col, implicit_gemm, tap_gemm
    return {"caffelite-per-image": with_setting(im2col, "GROUP_IMAGES", False, run),
            "caffelite-unfused": with_setting(fusion, "ENABLED", False, run,
                                              lambda: bool(fusion.channel_chains(net))),
            "caffelite-im2col": with_setting(tap_gemm, "ENABLED", False, run,
                                             lambda: uses_tap_gemm(net)),
            "caffelite-graphs": with_graphs(run, net),
            "caffelite-implicit": with_setting(implicit_gemm, "ENABLED", True,
                                               with_graphs(run, net), backend.tf32_enabled,
                                               "TF32 only (FP32 keeps im2col)"),
            "caffelite-autotune": with_autotune(with_graphs(run, net)),
            "caffelite-blob-1x1": with_setting(im2col, "PADDED_1X1_FLOP", math.inf, run,
                                               lambda: pads_1x1(net),
                                               "no 1x1 runs as padded image groups here")}


def step_with(solver, module, attr, value):
    """One solver step with ``module.attr`` set to ``value`` (for the kernel profile)."""
    def step():
        with setting(module, attr, value):
            solver.step(1)
    return step


def with_autotune(run):
    """``run`` with convolution autotuning on, from no choices (its warm-up times every
    product of the net); the row counts the paths chosen ({kind: {path: products}})."""
    from caffelite.layers import conv_autotune

    def wrapped(seconds):
        conv_autotune.forget()
        with setting(conv_autotune, "ENABLED", True):
            row = run(seconds)
        chosen = {}
        for key, (best, times) in conv_autotune.choices().items():
            if times:                       # one-path products are not choices
                kinds = chosen.setdefault(key.kind, {})
                kinds[best] = kinds.get(best, 0) + 1
        row["autotune"] = chosen
        return row
    return wrapped


def pads_1x1(net):
    """Does a 1x1 convolution of ``net`` run as padded image groups at its current
    shapes (TF32, odd grids, large products)?"""
    from caffelite import backend
    from caffelite.layers import im2col
    xp = backend.device_module()
    for layer, bottom, top in zip(net.layers, net.bottom_blobs, net.top_blobs):
        geom = getattr(layer, "geom", None)
        if geom is not None and layer.type == "Convolution" and geom.is_1x1 and \
                not im2col._direct_1x1(xp, geom, bottom[0].shape, top[0].shape[1],
                                       top[0].shape[2:], bottom[0].dtype, None):
            return True
    return False


def uses_tap_gemm(net):
    """Does a convolution of ``net`` take the tap-GEMM path at its current shapes?"""
    from caffelite import backend
    from caffelite.layers import tap_gemm
    xp = backend.device_module()
    for layer, bottom, top in zip(net.layers, net.bottom_blobs, net.top_blobs):
        geom = getattr(layer, "geom", None)
        if geom is not None and layer.type == "Convolution" and tap_gemm.windows_for(
                xp, geom, bottom[0].shape, top[0].shape[2:], layer.blobs[0].shape):
            return True
    return False


def with_graphs(run, net):
    """``run`` with CUDA graphs on; the row says what was recorded and launched."""
    from caffelite import cuda_graphs

    def wrapped(seconds):
        cuda_graphs.set_enabled(True)
        try:
            row = run(seconds)
        finally:
            cuda_graphs.set_enabled(False)
        graphs = net._graphs
        if graphs is not None:
            recs = graphs.recordings()
            failures = sorted({r.failure for r in recs if r.failed})
            row["graphs"] = (f"{len(graphs.segments)} segments, "
                             f"{graphs.launches()} launches, "
                             f"{sum(r.failed for r in recs)} failed"
                             + "".join(f" ({f})" for f in failures))
            # The recordings allocate from pools of their own, which the peak tracker
            # of the default pool does not see: their size is added to both figures.
            own = sum(r.pool.total_bytes() for r in recs if r.pool is not None)
            row["graph_pool_bytes"] = own
            for field in ("peak_bytes", "pool_bytes"):
                if field in row:
                    row[field] += own
        return row
    return wrapped


def train_check(dev, net, tnet, tinputs):
    """Both engines' first forward loss (same weights and inputs; torch replays
    caffelite's dropout masks)."""
    try:
        dev.set_precision("fp32")
        ours = net.forward_from_to()
        with dev.torch.no_grad():
            theirs, _ = tnet(tinputs, dropout_masks=dropout_masks(net))
        theirs = float(theirs)
        return {"loss_caffelite": ours, "loss_torch": theirs,
                "check": abs(ours - theirs) / max(abs(theirs), 1e-30)}
    except Exception as e:                 # noqa: BLE001
        return {"check_error": first_line(e)}


def bench_test(dev, key, args, clock, rates, rows):
    label, output = NETS[key]["label"], NETS[key]["output"]
    param, shapes = bench_net(args.corpus, key, caffe.TEST, args.test_size, 1)
    caffe.set_random_seed(5)
    net = caffe.Net(param=param, phase=caffe.TEST)
    random_weights(net, key)
    values = fill_inputs(net, shapes)
    base = {"net": label, "phase": "test", "size": args.test_size, "batch": 1,
            "iter_size": 1, "gflop": gemm_flops(net, False) / 1e9}
    tnet = tinputs = None
    if "torch" in args.engines and dev.has_torch():
        from torch_net import TorchNet
        tnet = TorchNet(net, device="cuda" if dev.kind == "cuda" else "cpu")
        tinputs = torch_inputs(dev, values)
    outs = {}

    def caffelite_run(seconds):
        numbers = run_caffelite_test(dev, net, args, seconds)
        outs["caffelite"] = np.array(net.blobs[output].data)
        return numbers

    def torch_run(seconds):
        result = {}
        numbers = run_torch_test(dev, tnet, tinputs, output, args, seconds, result)
        outs["torch"] = result["out"].float().cpu().numpy()
        return numbers
    run = {"caffelite": caffelite_run, "torch": torch_run}
    run.update(variants(lambda seconds: run_caffelite_test(dev, net, args, seconds), net))
    graphs_run = run["caffelite-graphs"]

    def graphs_kept(seconds):
        numbers = graphs_run(seconds)
        outs["caffelite-graphs"] = np.array(net.blobs[output].data)
        return numbers
    run["caffelite-graphs"] = graphs_kept
    for precision in args.precision:
        outs.clear()
        for engine in args.engines:
            rows.append(engine_row(dev, base, engine, precision, clock, rates, run[engine]))
        if "caffelite" in outs and "torch" in outs:
            diff = rel_diff(outs["caffelite"], outs["torch"])
            for row in rows[-len(args.engines):]:
                row["check"] = diff
        if "caffelite" in outs and "caffelite-graphs" in outs:
            same = bool(np.array_equal(outs["caffelite"], outs["caffelite-graphs"]))
            for row in rows[-len(args.engines):]:
                if row["engine"] == "caffelite-graphs":
                    row["same_bits_as_caffelite"] = same
    del run, caffelite_run, torch_run, net, tnet, tinputs
    dev.free()


def engine_row(dev, base, engine, precision, clock, rates, run):
    """One measurement as a table row: ``run(seconds)`` gives its numbers; anything that
    stops it becomes the row's error."""
    row = dict(base, engine=engine, precision=precision)
    seconds = clock.share()
    try:
        if seconds <= 0:
            raise RuntimeError("skipped: time budget spent")
        flag_ok = dev.set_precision(precision)
        if engine == "torch" and not dev.has_torch():
            raise RuntimeError(dev.torch_error)
        if engine.startswith("caffelite") and dev.caffelite_gpu_error:
            raise RuntimeError(dev.caffelite_gpu_error)
        if engine.startswith("caffelite") and not flag_ok:
            raise RuntimeError("caffelite has no TF32 flag (backend.set_tf32)")
        row.update(run(seconds))
    except Exception as e:                 # noqa: BLE001 (reported in the table)
        row["error"] = first_line(e)
    add_rates(row, rates)
    print_progress(row)
    return row


def add_rates(row, rates):
    if "median_s" not in row:
        return
    row["tflops"] = row["gflop"] / 1e3 / row["median_s"]
    ref = rates.get(row["precision"])
    if ref:
        row["pct_sgemm"] = 100.0 * row["tflops"] * 1e12 / ref


def print_progress(row):
    what = (f"{row['median_s']:.4f} s median of {row['iters']}" if "median_s" in row
            else row.get("error"))
    if "graphs" in row:
        what += f" ({row['graphs']})"
    print(f"  {row['net']} {row['phase']} {row['engine']} {row['precision']}: {what}",
          file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- profile
def profile_train(dev, label, solver, tnet, tinputs, sgd):
    """Where one FP32 training pass (forward + backward, no iter_size) spends its time:
    caffelite per layer type (device synchronised after every layer, as ``caffelite
    time`` does) and its solver update; torch's CUDA kernels by name (torch.profiler).
    It guides optimisation; the timings in the main table are the unsynchronised ones."""
    out = {"net": label}
    try:
        dev.set_precision("fp32")
        out["caffelite_conv_layers"] = {}
        out["caffelite"] = caffelite_layer_times(solver, dev.sync_caffelite,
                                                 out["caffelite_conv_layers"])
    except Exception as e:                 # noqa: BLE001 (reported)
        out["caffelite_error"] = first_line(e)
    if tnet is not None and dev.kind == "cuda":
        try:
            out["torch"] = torch_kernel_times(dev.torch, lambda: torch_train_step(
                tnet, tinputs, sgd, 1), dev.sync_torch)
        except Exception as e:             # noqa: BLE001 (reported)
            out["torch_error"] = first_line(e)
    return out


def caffelite_layer_times(solver, sync, conv_layers=None):
    """ms per layer type, forward and backward, the device synchronised after each layer;
    ``conv_layers`` (a dict), if given, gets {name: [forward ms, backward ms]} of every
    Convolution layer (the JSON's per-layer view of where the GEMM time goes)."""
    net = solver.net
    by_type = {}
    if conv_layers is None:
        conv_layers = {}

    def note(i, which, ms):
        layer = net.layers[i]
        if layer.type == "Convolution":
            conv_layers.setdefault(net._layer_names[i], [0.0, 0.0])[which] += ms

    def entry(kind):
        return by_type.setdefault(kind, {"forward_ms": 0.0, "backward_ms": 0.0, "layers": 0})

    for layer in net.layers:
        entry(layer.type)["layers"] += 1
    net.clear_param_diffs()
    sync()
    for i, layer in enumerate(net.layers):
        t = time.perf_counter()
        net.forward_from_to(i, i)
        sync()
        ms = (time.perf_counter() - t) * 1e3
        entry(layer.type)["forward_ms"] += ms
        note(i, 0, ms)
    for i in reversed(range(len(net.layers))):
        t = time.perf_counter()
        net.backward_from_to(i, i)
        sync()
        ms = (time.perf_counter() - t) * 1e3
        entry(net.layers[i].type)["backward_ms"] += ms
        note(i, 1, ms)
    t = time.perf_counter()
    solver.apply_update()
    sync()
    by_type["(solver update)"] = {"forward_ms": 0.0, "backward_ms":
                                  (time.perf_counter() - t) * 1e3, "layers": 0}
    return by_type


def torch_kernel_times(torch, step, sync, top=12):
    """CUDA time per kernel name of one ``step`` (after one untimed step)."""
    times = kernel_times(torch, step, sync)
    times["top"] = times["top"][:top]
    return times


# Kernel names to kinds, first match wins: cuDNN's convolution kernels (their names
# also say gemm), cuBLAS's GEMMs and split-K reductions, caffelite's column kernels,
# element-wise work and copies, the rest.
KERNEL_KINDS = (
    ("implicit GEMM (caffelite)", re.compile(r"conv_igemm")),
    ("convolution (cuDNN)", re.compile(r"conv|fprop|dgrad|wgrad|implicit|winograd|fft",
                                       re.I)),
    ("GEMM (cuBLAS)", re.compile(r"gemm|xmma|cutlass|splitk|gemv", re.I)),
    ("im2col / col2im", re.compile(r"im2col|col2im", re.I)),
    ("element-wise, copies", re.compile(r"elementwise|cupy_|copy|memcpy|memset|fill|relu|"
                                        r"dropout|channel_", re.I)),
)


def kernel_kind(name):
    for kind, pattern in KERNEL_KINDS:
        if pattern.search(name):
            return kind
    return "other"


def kernel_times(torch, step, sync):
    """One untimed ``step``, then one under torch.profiler: the CUDA time per kernel name
    and per kind. CUPTI records every kernel of the process, CuPy's and cuBLAS's for
    caffelite included."""
    from torch.profiler import ProfilerActivity, profile
    step()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync()
    return summarize_kernels(_device_events(prof) or _averaged_events(prof))


def _device_events(prof):
    """(name, µs) of every kernel the profile holds."""
    events = []
    for ev in prof.events():
        if str(getattr(ev, "device_type", "")).split(".")[-1] == "CUDA":
            events.append((ev.name, ev.time_range.elapsed_us()))
    return events


def _averaged_events(prof):
    """(name, µs) per kernel name from the profile's averages (what torch's own rows used
    before; a fallback should a torch version list no device events)."""
    events = []
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None)
        if us is None:
            us = getattr(ev, "self_cuda_time_total", 0)
        if us:
            events += [(ev.key, us / ev.count)] * ev.count
    return events


def summarize_kernels(events):
    """{total_ms, kinds: {kind: ms}, top: [{kernel, ms, calls, kind}]} of (name, µs) pairs,
    kernels by time, longest first."""
    by_name = {}
    for name, us in events:
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += us / 1e3
        entry[1] += 1
    rows = [{"kernel": name, "ms": ms, "calls": calls, "kind": kernel_kind(name)}
            for name, (ms, calls) in by_name.items()]
    rows.sort(key=lambda r: -r["ms"])
    kinds = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0.0) + r["ms"]
    return {"total_ms": sum(r["ms"] for r in rows), "kinds": kinds, "top": rows}


def kernel_profile(dev, label, precision, steps):
    """Each engine's training iteration (``steps``: {engine: step or None}) at
    ``precision``, kernel by kernel; a failure becomes the engine's entry."""
    out = {"net": label, "precision": precision, "engines": {}}
    if dev.kind != "cuda" or not dev.has_torch():
        out["error"] = "needs a CUDA device and torch (its profiler records the kernels)"
        return out
    dev.set_precision(precision)

    def sync():
        dev.sync_caffelite()
        dev.sync_torch()
    for engine, step in steps.items():
        if step is None:
            continue
        try:
            out["engines"][engine] = kernel_times(dev.torch, step, sync)
        except Exception as e:             # noqa: BLE001 (reported)
            out["engines"][engine] = {"error": first_line(e)}
    return out


def kernel_profile_markdown(profiles, top=15):
    """Per net and precision: CUDA ms per kernel kind for each engine side by side, then
    each engine's longest kernels."""
    lines = []
    for p in profiles:
        lines.append(f"\nKernels of one {p['precision'].upper()} training iteration of "
                     f"{p['net']} (torch.profiler, CUDA time):")
        if "error" in p:
            lines.append(p["error"])
            continue
        engines = p["engines"]
        timed = {e: v for e, v in engines.items() if "error" not in v}
        for e, v in engines.items():
            if "error" in v:
                lines.append(f"{e}: {v['error']}")
        if not timed:
            continue
        kinds = sorted({k for v in timed.values() for k in v["kinds"]},
                       key=lambda k: -max(v["kinds"].get(k, 0) for v in timed.values()))
        lines += ["", "| kind | " + " | ".join(f"{e} ms" for e in timed) + " |",
                  "|---|" + "---|" * len(timed)]
        for kind in kinds + ["all"]:
            cells = [f"{v['total_ms'] if kind == 'all' else v['kinds'].get(kind, 0):.2f}"
                     for v in timed.values()]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        for e, v in timed.items():
            lines += ["", f"{e}, longest kernels:", "", "| kernel | kind | calls | ms |",
                      "|---|---|---|---|"]
            for r in v["top"][:top]:
                name = r["kernel"] if len(r["kernel"]) <= 90 else r["kernel"][:87] + "..."
                lines.append(f"| `{name}` | {r['kind']} | {r['calls']} | {r['ms']:.2f} |")
    return "\n".join(lines)


def profile_markdown(profiles):
    lines = []
    for p in profiles:
        lines.append(f"\nOne FP32 training pass of {p['net']}, per-layer synchronised:")
        if "caffelite" in p:
            times = p["caffelite"]
            total = sum(v["forward_ms"] + v["backward_ms"] for v in times.values())
            lines += ["", "| caffelite layer type | layers | forward ms | backward ms | share |",
                      "|---|---|---|---|---|"]
            for kind, v in sorted(times.items(),
                                  key=lambda kv: -(kv[1]["forward_ms"] + kv[1]["backward_ms"])):
                both = v["forward_ms"] + v["backward_ms"]
                lines.append(f"| {kind} | {v['layers']} | {v['forward_ms']:.2f} | "
                             f"{v['backward_ms']:.2f} | {100 * both / max(total, 1e-9):.0f} % |")
            fwd = sum(v["forward_ms"] for v in times.values())
            count = sum(v["layers"] for v in times.values())
            lines.append(f"| all ({total:.2f} ms) | {count} | {fwd:.2f} | {total - fwd:.2f} "
                         f"| 100 % |")
        else:
            lines.append(f"caffelite: {p.get('caffelite_error', 'not run')}")
        if "torch" in p:
            t = p["torch"]
            lines += ["", f"PyTorch CUDA kernels, {t['total_ms']:.2f} ms in all (top by time):",
                      "", "| kernel | calls | ms |", "|---|---|---|"]
            for r in t["top"]:
                name = r["kernel"] if len(r["kernel"]) <= 90 else r["kernel"][:87] + "..."
                lines.append(f"| `{name}` | {r['calls']} | {r['ms']:.2f} |")
        elif "torch_error" in p:
            lines.append(f"torch profile: {p['torch_error']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- report
def environment(dev, rates):
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "device": dev.kind, "python": platform.python_version(),
           "numpy": np.__version__, "caffelite": caffe.__version__,
           "sgemm": rates, "caffelite_gpu_error": dev.caffelite_gpu_error,
           "caffelite_tf32_flag": hasattr(backend, "set_tf32")}
    if dev.torch is not None:
        env["torch"] = dev.torch.__version__
    env["torch_error"] = dev.torch_error
    if dev.kind != "cuda":
        env["machine"] = machine()
        return env
    if dev.cupy is not None:
        rt = dev.cupy.cuda.runtime
        env["cupy"] = dev.cupy.__version__
        env["gpu"] = rt.getDeviceProperties(0)["name"].decode()
        env["cuda_runtime"] = _cuda_version(rt.runtimeGetVersion())
        env["cuda_driver_api"] = _cuda_version(rt.driverGetVersion())
    if dev.has_torch():
        env.setdefault("gpu", dev.torch.cuda.get_device_name(0))
        env["torch_cuda"] = dev.torch.version.cuda
        env["cudnn"] = dev.torch.backends.cudnn.version()
    try:
        env["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        env["driver"] = "?"
    return env


def _cuda_version(v):
    return f"{v // 1000}.{(v % 1000) // 10}"


def markdown(env, rows):
    lines = []
    if env["device"] == "cuda":
        lines.append(f"GPU: {env.get('gpu', '?')}, driver {env.get('driver', '?')}, CUDA "
                     f"runtime {env.get('cuda_runtime', '?')} (driver API "
                     f"{env.get('cuda_driver_api', '?')}), CuPy {env.get('cupy', '-')}, "
                     f"torch {env.get('torch', '-')} (CUDA {env.get('torch_cuda', '-')}, "
                     f"cuDNN {env.get('cudnn', '-')}), caffelite {env['caffelite']}, "
                     f"{env['date']}")
    else:
        lines.append(f"CPU smoke run: {env.get('machine')}, numpy {env['numpy']}, torch "
                     f"{env.get('torch', '-')}, caffelite {env['caffelite']}, {env['date']}")
    s = env["sgemm"]
    lines.append("SGEMM reference: " + ", ".join(
        f"{k} {s[k] / 1e12:.1f} TFLOP/s" for k in ("fp32", "tf32") if s.get(k))
        + f" ({s.get('how', '')})")
    if env.get("caffelite_gpu_error"):
        lines.append(f"caffelite GPU mode unavailable: {env['caffelite_gpu_error']}")
    if env.get("torch_error"):
        lines.append(f"PyTorch unavailable: {env['torch_error']}")
    lines.append("")
    head = ["net", "phase", "input", "engine", "precision", "median s", "min s", "iters",
            "peak GiB (pool)", "GEMM TFLOP/s", "% of SGEMM", "check"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        shape = f"{r['batch']}×{r['size']}²" + (f" ×{r['iter_size']}" if r["iter_size"] > 1
                                               else "")
        cells = [r["net"], r["phase"], shape, r["engine"], r["precision"]]
        if "median_s" in r:
            mem = (f"{r['peak_bytes'] / 2**30:.2f} ({r['pool_bytes'] / 2**30:.2f})"
                   if "peak_bytes" in r else "-")
            cells += [f"{r['median_s']:.4f}", f"{r['min_s']:.4f}", str(r["iters"]), mem,
                      f"{r['tflops']:.3g}", f"{r['pct_sgemm']:.0f}" if "pct_sgemm" in r
                      else "-"]
        else:
            cells += [r.get("error", "?"), "", "", "", "", ""]
        check = f"{r['check']:.1e}" if "check" in r else r.get("check_error", "-")
        if "same_bits_as_caffelite" in r:
            check += "; bits " + ("=" if r["same_bits_as_caffelite"] else "≠") + " caffelite"
        if "graphs" in r:
            check += f"; {r['graphs']}"
        cells.append(check)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("GEMM FLOPs per iteration: " + ", ".join(sorted(
        {f"{r['net']} {r['phase']} {r['gflop']:.0f} GFLOP" for r in rows if r["gflop"]})) +
        ". check: train, |loss caffelite − loss torch| / |loss torch| of the first forward "
        "(FP32, same dropout masks); test, max |Δ| / max |torch| of the final score map.")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    from caffelite.layers import conv_autotune
    # Only the caffelite-autotune engine tunes (CAFFELITE_CONV_AUTOTUNE=1 would tune the
    # engines it is measured against too).
    conv_autotune.set_enabled(False)
    dev = Device(args.device)
    dev.start(need_torch="torch" in args.engines)
    rates = dev.sgemm_rates()
    count = len(args.net) * len(args.phase) * len(args.precision) * len(args.engines)
    clock = Clock(args.budget, args.max_seconds, count)
    rows = []
    for key in args.net:
        for phase, bench in (("train", bench_train), ("test", bench_test)):
            if phase not in args.phase:
                continue
            if clock.spent():
                skipped_rows(key, phase, args, clock, rows, "skipped: time budget spent")
                continue
            done = len(rows)
            try:
                bench(dev, key, args, clock, rates, rows)
            except Exception as e:         # noqa: BLE001 (reported; the other nets run)
                del rows[done:]
                skipped_rows(key, phase, args, clock, rows, f"setup failed: {first_line(e)}")
                dev.free()
    env = environment(dev, rates)
    env["total_s"] = time.perf_counter() - started
    print(markdown(env, rows))
    if dev.profiles:
        print(profile_markdown(dev.profiles))
    if dev.kernel_profiles:
        print(kernel_profile_markdown(dev.kernel_profiles))
    print(f"\n(total {env['total_s']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows, "profiles": dev.profiles,
                       "kernel_profiles": dev.kernel_profiles, "args": vars(args)}, f,
                      indent=1,
                      default=str)
    return rows


if __name__ == "__main__":
    main()
