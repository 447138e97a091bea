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
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402


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


def main(args):
    from caffelite.crf import PUBLISHED_PARAMS
    params = PUBLISHED_PARAMS["deeplab-largefov"].with_(max_iter=args.iterations)
    rgb, source = test_image(args.width, args.height)
    scores = noisy_logits(rgb, args.labels)
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
    zero = params.with_(max_iter=0)
    build = [_timed(run_caffelite, scores, rgb, zero) for _ in range(args.repeats)]
    print(f"caffelite without iterations (features, lattices, softmax): "
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
