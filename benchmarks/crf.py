"""Dense CRF speed: caffelite.crf (NumPy + SciPy sparse) against pydensecrf2
(Krähenbühl's C++ code with SSE), one image of 500×375, 21 labels, 10 mean-field
iterations, the run_densecrf.sh parameters (bi_w 4, bi_xy_std 49, bi_rgb_std 5, pos_w 3,
pos_xy_std 3).

Each repeat times the whole per-image job of both engines, interleaved: building the
two lattices (and, for caffelite, the per-pixel normalisation) plus the inference.
The image is scikit-image's "astronaut" resized to 500×375 if scikit-image is
installed, else a synthetic photo; the unaries are synthetic noisy logits.  The
table gives the median (and min) seconds, caffelite / pydensecrf2, and the label
agreement and max |ΔQ| between the two, so that the same computation is timed.

    python benchmarks/crf.py --repeats 11

``--gpu N`` also times the GPU path (caffelite.crf.device on GPU N) over the whole
per-image cost, as ``crf_labels(scores, rgb, device=N)`` pays it: uploading the scores
and the image, the features, both lattices and the fused tables built on the device,
the normalisation and the mean-field iterations, and the labels back.  It reports the
median of that whole job (atomic and gather splat, and with the lattices built on the
host as before, for comparison), each part synchronised separately, the time per
iteration, the verdict against the target of 20 ms per image on an H100, the label
agreement with the CPU path, and whether the device-built tables equal the host-built
ones.  ``--gpu-only`` skips the CPU timing.  With ``CAFFELITE_GPU_EMULATOR=1`` the GPU
path runs on the CPU emulator (a dry run: its times mean nothing).

    python benchmarks/crf.py --gpu 0 --repeats 21
"""
import argparse
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--labels", type=int, default=21)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS threads (set before numpy loads; the CRF itself does not "
                        "use BLAS, and pydensecrf2 is single-threaded)")
    p.add_argument("--gpu", type=int, default=None,
                   help="also time the GPU path on this device")
    p.add_argument("--gpu-only", action="store_true", help="skip the CPU timing")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from caffelite import kernels  # noqa: E402


def test_image(width, height):
    try:
        from skimage import data
        from PIL import Image
        img = Image.fromarray(data.astronaut()).resize((width, height), Image.BILINEAR)
        return np.array(img), "scikit-image astronaut"
    except ImportError:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from test_crf import synthetic_scene
        return synthetic_scene(height, width, 1)[0], "synthetic scene"


def noisy_logits(rgb, labels, seed=0):
    rng = np.random.default_rng(seed)
    gray = rgb.astype(np.float32).mean(axis=2)
    gt = (gray // 52).astype(np.int64) * 3 % labels
    scores = rng.normal(0, 1.5, (labels,) + gt.shape)
    scores[gt, np.arange(gt.shape[0])[:, None], np.arange(gt.shape[1])] += 2.0
    return scores.astype(np.float32)


def run_caffelite(scores, rgb, params):
    from caffelite.crf import dense_crf
    return dense_crf(-scores, rgb, params)


def run_caffelite_setup(rgb, params):
    """What the CPU path does before its iterations (lattices are built when first
    used, so a max_iter=0 run would skip them)."""
    from caffelite.crf import PairwiseMessages
    from caffelite.crf.densecrf import crf_kernels
    return PairwiseMessages(crf_kernels(rgb, params))


def run_pydensecrf(scores, rgb, params):
    import pydensecrf.densecrf as dcrf
    labels, height, width = scores.shape
    crf = dcrf.DenseCRF2D(width, height, labels)
    crf.setUnaryEnergy(np.ascontiguousarray(-scores.reshape(labels, -1)))
    crf.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w,
                            kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_AFTER)
    crf.addPairwiseBilateral(sxy=params.bi_xy_std, srgb=params.bi_rgb_std, rgbim=rgb,
                             compat=params.bi_w, kernel=dcrf.DIAG_KERNEL,
                             normalization=dcrf.NORMALIZE_AFTER)
    return np.array(crf.inference(params.max_iter)).reshape(scores.shape)


def _timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def machine():
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import scipy
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"numpy {np.__version__}, scipy {scipy.__version__}, "
            f"load average {load[0]:.2f}" if load[0] != "?" else "")


GPU_TARGET_MS = 20.0


def _median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), 1e3 * min(times)


def gpu_image(scores, rgb, params, device, splat="atomic", build="device",
              iterations=None, marks=None):
    """The labels of one image on ``device`` as ``crf_labels(device=...)`` computes them
    (scores and image up, features, lattices and tables, mean field, labels down).
    ``build="host"``: lattices on the host from host features (the previous design).
    ``marks``: a list that gets (part, seconds) with the device synchronised after
    each part."""
    from caffelite.crf import device as crf_device
    from caffelite.crf.densecrf import crf_kernels
    iterations = params.max_iter if iterations is None else iterations
    last = [time.perf_counter()]

    def mark(part):
        if marks is not None:
            device.synchronize()
            now = time.perf_counter()
            marks.append((part, now - last[0]))
            last[0] = now

    with device.activate():
        mark("start")
        flat = device.upload(scores, np.float32)
        image = device.upload(rgb, rgb.dtype) if build == "device" else rgb
        mark("upload the scores and the image")
        xp = device.xp if build == "device" else np
        potts = crf_kernels(image, params, xp)
        tables = crf_device.LatticeTables(crf_device.build_lattices(potts, device, build),
                                          device.xp)
        mark(f"features, lattices, tables ({build})")
        q = crf_device.mean_field_device_q(flat, potts, iterations, device, splat=splat,
                                           tables=tables, negated=True)
        mark(f"normalisation, {iterations} iterations ({splat} splat)")
        labels = device.download(q.argmax(axis=1))
        mark("argmax, labels back")
    return labels.reshape(scores.shape[1:])


def _median_parts(fn, repeats):
    runs = []
    for _ in range(repeats):
        marks = []
        fn(marks)
        runs.append(marks[1:])
    return [(part, 1e3 * float(np.median([run[i][1] for run in runs])))
            for i, (part, _) in enumerate(runs[0])]


def _same_tables(device, rgb, params):
    """Do the device-built fused tables equal the host-built ones (and the transposed
    splat the gather reads)?"""
    from caffelite.crf import device as crf_device
    from caffelite.crf.densecrf import crf_kernels
    with device.activate():
        host = crf_device.LatticeTables(crf_device.build_lattices(
            crf_kernels(rgb, params), device, "host"), device.xp)
        built = crf_device.LatticeTables(crf_device.build_lattices(
            crf_kernels(device.upload(rgb, rgb.dtype), params, device.xp), device, "device"),
            device.xp)
        pairs = [(host.offsets, built.offsets), (host.weights, built.weights),
                 (host.neighbours, built.neighbours)]
        pairs += list(zip(host.splat_transposed(), built.splat_transposed()))
        return all(a.shape == b.shape and np.array_equal(device.download(a), device.download(b))
                   for a, b in pairs)


def gpu_benchmark(scores, rgb, params, args):
    """Per-image milliseconds of the GPU path, whole and by parts."""
    from caffelite.crf import crf_labels
    from caffelite.crf import device as crf_device
    device = crf_device.resolve(args.gpu)
    cpu_labels = crf_labels(scores, rgb, params)
    same = _same_tables(device, rgb, params)
    print(f"GPU path on {device.name}: {scores.shape[1] * scores.shape[2]} pixels, "
          f"{scores.shape[0]} labels; device-built tables equal the host-built ones: "
          f"{'yes' if same else 'NO'}")
    print("| per image | median ms (min) |")
    print("|---|---|")
    results = {}
    for splat, build in (("atomic", "device"), ("gather", "device"), ("atomic", "host")):
        def whole(splat=splat, build=build):
            return gpu_image(scores, rgb, params, device, splat, build)

        agree = np.mean(whole() == cpu_labels)                                  # warm-up
        results[splat, build] = (_median_ms(whole, args.repeats), agree)
        ms = results[splat, build][0]
        print(f"| whole image, {splat} splat, lattices built on the {build} | {ms[0]:.1f} "
              f"({ms[1]:.1f}) |")
    api = _median_ms(lambda: crf_labels(scores, rgb, params, device=device), args.repeats)
    print(f"| crf_labels(device={args.gpu}) (atomic splat, device lattices) | {api[0]:.1f} "
          f"({api[1]:.1f}) |")
    full = _median_parts(lambda marks: gpu_image(scores, rgb, params, device, marks=marks),
                         args.repeats)
    for part, ms in full:
        print(f"| part (synchronised): {part} | {ms:.1f} |")
    one = _median_parts(lambda marks: gpu_image(scores, rgb, params, device, iterations=1,
                                                marks=marks), args.repeats)
    per_iteration = (full[2][1] - one[2][1]) / max(params.max_iter - 1, 1)
    print(f"mean field: {per_iteration:.2f} ms per iteration (atomic splat)")
    for (splat, build), ((ms, _), agree) in results.items():
        verdict = "meets" if ms <= GPU_TARGET_MS else "misses"
        print(f"{splat} splat, lattices on the {build}: {ms:.1f} ms per image {verdict} the "
              f"{GPU_TARGET_MS:g} ms target; labels agree with the CPU path on "
              f"{100 * agree:.3f} % of pixels")


def main(args):
    from caffelite.crf import PUBLISHED_PARAMS
    params = PUBLISHED_PARAMS["deeplab-largefov"].with_(max_iter=args.iterations)
    rgb, source = test_image(args.width, args.height)
    scores = noisy_logits(rgb, args.labels)
    if args.gpu is not None:
        print(f"{args.width}x{args.height} {source}, {args.labels} labels, "
              f"{args.iterations} iterations, {args.repeats} repeats; {machine()}")
        try:
            gpu_benchmark(scores, rgb, params, args)
        except kernels.GPUUnavailableError as e:
            print(f"GPU timing skipped: {e}")
        if args.gpu_only:
            return
    engines = {"caffelite": run_caffelite}
    try:
        import pydensecrf.densecrf  # noqa: F401
        engines["pydensecrf2"] = run_pydensecrf
    except ImportError:
        print("pydensecrf2 is not installed: timing caffelite only")
    results = {name: fn(scores, rgb, params) for name, fn in engines.items()}   # warm-up
    times = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, fn in engines.items():
            start = time.perf_counter()
            fn(scores, rgb, params)
            times[name].append(time.perf_counter() - start)
    print(f"{args.width}x{args.height} {source}, {args.labels} labels, "
          f"{args.iterations} iterations, {args.repeats} repeats; {machine()}")
    print("| engine | median s (min) |")
    print("|---|---|")
    for name in engines:
        print(f"| {name} | {np.median(times[name]):.3f} ({min(times[name]):.3f}) |")
    build = [_timed(run_caffelite_setup, rgb, params) for _ in range(args.repeats)]
    print(f"caffelite without iterations (features, lattices, normalisation): "
          f"{np.median(build):.3f} s; per iteration: "
          f"{(np.median(times['caffelite']) - np.median(build)) / args.iterations * 1e3:.1f} ms")
    if "pydensecrf2" in engines:
        ratio = np.median(times["caffelite"]) / np.median(times["pydensecrf2"])
        agree = np.mean(results["caffelite"].argmax(0) == results["pydensecrf2"].argmax(0))
        diff = np.abs(results["caffelite"] - results["pydensecrf2"]).max()
        print(f"caffelite / pydensecrf2 = {ratio:.2f}; labels agree on {100 * agree:.3f} % "
              f"of pixels; max |dQ| = {diff:.1e}")


if __name__ == "__main__":
    main(ARGS)
