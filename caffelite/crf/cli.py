"""``caffelite crf``: the DeepLab kit's ``prog_refine_pascal_v4`` (run by
``run_densecrf.sh``) without the C++ build, the PPM conversion or MATLAB.

    caffelite crf --features DIR --images DIR --list val.txt --out DIR
                  [--bi_w 4 --bi_xy_std 49 --bi_rgb_std 5 --pos_w 3 --pos_xy_std 3
                   --max_iter 10 | --preset deeplab-largefov] [--pos_y_std --bi_y_std
                   --bi_g_std --bi_b_std] [--unary score|prob]
                  [--num-labels 21] [--jobs K] [--bin] [--gpu N]

For every id of the list: reads the MatWrite features ``<features>/<id>_blob_0.mat``
(scores of the padded canvas), crops them to the image ``<images>/<id>.jpg`` (top-left,
where the data layer put the image), runs the dense CRF with unary = -score and the
image's RGB colours, and writes ``<out>/<id>.png`` (class indices, VOC palette) and,
with ``--bin``, the refine program's ``<out>/<id>.bin``.

``--gpu N`` runs each image's CRF on GPU N (features, lattices, mean field with
caffelite's CUDA kernels; the host reads the files and writes the labels, so
``--jobs K`` processes can keep one GPU busy); ``CAFFELITE_GPU_EMULATOR=1`` runs that
path on the CPU instead (slow, for tests).
"""
import contextlib
import os
import time

import numpy as np

from .densecrf import PUBLISHED_PARAMS, CRFParams, crf_labels

FEATURE_SUFFIX = "_blob_0.mat"
PARAM_NAMES = ("bi_w", "bi_xy_std", "bi_rgb_std", "pos_w", "pos_xy_std", "max_iter")
# The refine program's separate y / G / B stds (-py, -by, -bg, -bb); unset = x / R.
AXIS_NAMES = {"pos_y_std": "pos_xy_std", "bi_y_std": "bi_xy_std", "bi_g_std": "bi_rgb_std",
              "bi_b_std": "bi_rgb_std"}


class CrfError(ValueError):
    """A problem with the CRF's inputs; the message names the file."""


# ------------------------------------------------------------------- file formats
def write_refine_bin(path, labels):
    """The refine program's output: int32 rows, int32 cols, int32 1, then the labels
    as int16 in column-major (MATLAB) order, little-endian."""
    from ..io.caffemodel import write_atomically
    labels = np.asarray(labels)
    header = np.array([labels.shape[0], labels.shape[1], 1], "<i4")
    write_atomically(path, header.tobytes() + labels.astype("<i2").ravel(order="F").tobytes())


def read_refine_bin(path):
    """Labels (H x W int16) of a refine-program ``.bin``."""
    raw = open(path, "rb").read()
    if len(raw) < 12:
        raise CrfError(f"'{path}' is too short for a refine-program .bin")
    rows, cols, channels = np.frombuffer(raw[:12], "<i4")
    count = int(rows) * int(cols) * int(channels)
    if channels != 1 or len(raw) != 12 + 2 * count:
        raise CrfError(f"'{path}': header {rows}x{cols}x{channels} does not match its "
                       f"{len(raw) - 12} bytes of int16 labels")
    return np.frombuffer(raw[12:], "<i2").reshape((int(rows), int(cols)), order="F")


# -------------------------------------------------------------------- one image
def refine_image(feature_path, image_path, params, unary="score", num_labels=None,
                 device=None, labels_origin="--num-labels", palette=True):
    """CRF labels (H x W) of one image from its MatWrite features (``device``: None for
    the CPU, or a GPU id; ``labels_origin`` says where ``num_labels`` came from;
    ``palette``: the labels go to a palette PNG, so at most 256 classes)."""
    scores, image = load_crf_inputs(feature_path, image_path, num_labels, labels_origin,
                                    palette)
    return crf_labels(scores, image, params, unary=unary, device=device)


def load_crf_inputs(feature_path, image_path, num_labels=None,
                    labels_origin="--num-labels", palette=True):
    """The scores (labels x H x W, cropped to the image) of one MatWrite features file
    and its image (H x W x 3 RGB, as the refine program's PPMs), checked."""
    from ..io.image import read_image
    scores = _read_features(feature_path)
    image = read_image(image_path)[:, :, ::-1]                 # BGR -> RGB, as the PPMs
    height, width = image.shape[:2]
    if scores.shape[0] != 1:
        raise CrfError(f"{feature_path}: holds {scores.shape[0]} images; DeepLab test nets "
                       f"write one image per file (batch_size: 1)")
    labels = scores.shape[1]
    if num_labels is not None and labels != num_labels:
        raise CrfError(f"{feature_path}: features have {labels} channels but "
                       f"{num_labels} labels were expected ({labels_origin})")
    if palette and labels > 256:
        raise CrfError(f"{feature_path}: {labels} classes do not fit a palette PNG")
    if scores.shape[2] < height or scores.shape[3] < width:
        raise CrfError(f"{feature_path}: features of size {scores.shape[2]}x{scores.shape[3]}"
                       f" are smaller than the image '{image_path}' ({height}x{width})")
    scores = scores[0, :, :height, :width]
    if not np.isfinite(scores).all():
        raise CrfError(f"{feature_path}: the features contain NaN or infinity within the "
                       f"image's {height}x{width} area")
    return scores, image


def _refine_task(task):
    """Worker: (id, error message or None, seconds); errors travel as text because
    exception classes with custom constructors do not survive pickling."""
    (ident, feature_path, image_path, png_path, bin_path, params, unary, num_labels,
     labels_origin, device) = task
    from ..evaluate import write_label_png
    start = time.perf_counter()
    try:
        labels = refine_image(feature_path, image_path, params, unary, num_labels, device,
                              labels_origin, palette=bool(png_path))
        if png_path:
            write_label_png(png_path, labels.astype(np.uint8))
        if bin_path:
            write_refine_bin(bin_path, labels)
    except (ValueError, OSError, RuntimeError) as e:
        message = str(e)
        if feature_path not in message and image_path not in message:
            message = f"'{ident}' ({feature_path}): {message}"
        return ident, message, 0.0
    return ident, None, time.perf_counter() - start


# ------------------------------------------------------------------------ a set
def crf_tasks(feature_dir, image_dir, list_path, out_dir, params, unary="score",
              num_labels=None, write_bin=False, device=None):
    """One task per listed id; fails early, naming the file, when a feature file or
    an image is missing.  ``device``: None (CPU) or a GPU id."""
    from ..evaluate import IMAGE_EXTENSIONS, find_image, read_list
    check_directories(("--features", feature_dir), ("--images", image_dir))
    tasks = []
    labels_origin = "--num-labels"
    for number, line in enumerate(read_list(list_path), 1):
        feature_path = os.path.join(feature_dir, line.id + FEATURE_SUFFIX)
        if not os.path.isfile(feature_path):
            raise CrfError(f"features file '{feature_path}' not found for '{line.id}' "
                           f"(entry {number} of {list_path})")
        image_path = find_image(image_dir, line.id)
        if image_path is None:
            raise CrfError(f"no image '{os.path.join(image_dir, line.id)}"
                           f"{{{','.join(IMAGE_EXTENSIONS)}}}' for '{line.id}' "
                           f"(entry {number} of {list_path})")
        if num_labels is None:
            # one class set for the whole list: a stray file from another model would
            # otherwise give labels that mean other classes
            num_labels = _channels_of(feature_path)
            labels_origin = f"as in the list's first features file '{feature_path}'"
        tasks.append((line.id, feature_path, image_path,
                      os.path.join(out_dir, line.id + ".png"),
                      os.path.join(out_dir, line.id + ".bin") if write_bin else None,
                      params, unary, num_labels, labels_origin, device))
    return tasks


def check_directories(*flags_and_paths):
    for flag, path in flags_and_paths:
        if not os.path.isdir(path):
            raise CrfError(f"{flag}: '{path}' is not a directory")


def _channels_of(feature_path):
    return int(_read_features(feature_path).shape[1])


def _read_features(feature_path):
    from ..io.matfile import MatFileError, read_mat
    try:
        scores, _ = read_mat(feature_path)
    except MatFileError as e:
        raise CrfError(str(e)) from None
    except Exception as e:       # noqa: BLE001  scipy's MatReadError is no ValueError
        raise CrfError(f"cannot read MAT file '{feature_path}': {e}") from None
    return scores


def run_crf_set(tasks, jobs=1, log=None):
    """Run the tasks (``jobs`` > 1: in that many processes); raises CrfError with the
    first failure.  Returns the per-image seconds."""
    from ..log import logger
    log = log or logger
    seconds, done = [], 0

    def collect(result):
        nonlocal done
        ident, error, elapsed = result
        if error is not None:
            raise CrfError(error)
        seconds.append(elapsed)
        done += 1
        if done % 100 == 0 or done == len(tasks):
            log.info("CRF: %d/%d images", done, len(tasks))

    on_gpu = any(task[-1] is not None for task in tasks)
    with contextlib.closing(map_tasks(_refine_task, tasks, jobs, on_gpu)) as results:
        for result in results:
            collect(result)
    return seconds


def map_tasks(function, tasks, jobs, on_gpu=False):
    """``function(task)`` for each task, in order: here when ``jobs`` <= 1, else in that
    many worker processes. Closing the generator early (``contextlib.closing``, when
    the caller stops at an error) cancels the tasks not yet started."""
    if jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield function(task)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    # Workers start from a fresh process, never fork() this one: CUDA does not survive a
    # fork, and a fork of a process with threads (BLAS pools) can deadlock in the child.
    fresh = "spawn" if on_gpu or "forkserver" not in multiprocessing.get_all_start_methods() \
        else "forkserver"
    context = multiprocessing.get_context(fresh)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        try:
            yield from pool.map(function, tasks, chunksize=1)
        except BaseException:            # GeneratorExit too: the caller stopped
            pool.shutdown(wait=True, cancel_futures=True)
            raise


# ------------------------------------------------------------------------- CLI
def add_parser(subparsers):
    from ..cli import common_arguments
    sp = subparsers.add_parser(
        "crf", help="dense-CRF post-processing of MatWrite features (prog_refine_pascal_v4)",
        description=__doc__.split("\n\n")[0])
    sp.add_argument("--features", required=True,
                    help="MatWrite features <features>/<id>_blob_0.mat")
    sp.add_argument("--images", required=True,
                    help="images <images>/<id>.jpg (or .png, .ppm, ...)")
    sp.add_argument("--list", required=True,
                    help="ids, or the kit's '/JPEGImages/x.jpg /Seg.../x.png' lines")
    sp.add_argument("--out", required=True,
                    help="where <id>.png (and <id>.bin) go; a folder already holding such "
                         "files that an earlier 'caffelite crf' did not write (ground "
                         "truth, say) is refused")
    defaults = CRFParams()
    sp.add_argument("--preset", choices=sorted(PUBLISHED_PARAMS),
                    help="start from a published parameter set (flags below override it)")
    for name in PARAM_NAMES:
        sp.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name,
                        type=int if name == "max_iter" else float, default=None,
                        help=f"default {getattr(defaults, name):g}")
    for name, base in AXIS_NAMES.items():
        sp.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, type=float,
                        default=None, help=f"the refine program's separate std (default: "
                                           f"--{base}'s value)")
    sp.add_argument("--unary", choices=("score", "prob"), default="score",
                    help="features are logits (unary = -score, the refine program) or "
                         "probabilities (unary = -log p)")
    sp.add_argument("--num-labels", type=int, default=None,
                    help="check that the features have this many channels")
    sp.add_argument("--jobs", type=int, default=1, help="images processed in parallel")
    sp.add_argument("--bin", action="store_true",
                    help="also write the refine program's <id>.bin")
    common_arguments(sp, gpu_help="GPU id for the CRF's kernels (the CPU if omitted)",
                     nets=False, define_help=None)
    sp.set_defaults(func=run)
    return sp


def params_from_args(args):
    base = PUBLISHED_PARAMS[args.preset] if args.preset else CRFParams()
    return base.with_(**{name: getattr(args, name, None)
                         for name in PARAM_NAMES + tuple(AXIS_NAMES)})


def gpu_id(flag):
    """The device id of ``--gpu`` (None: CPU); one id only."""
    if flag in (None, ""):
        return None
    text = str(flag).strip()
    if not text.isdigit():
        raise CrfError(f"--gpu expects one GPU id (a non-negative integer), got '{flag}'")
    return int(text)


def run(args):
    from ..log import logger
    if args.jobs < 1:
        raise CrfError(f"--jobs must be at least 1 (got {args.jobs})")
    device_id = gpu_id(args.gpu)
    where = "the CPU"
    if device_id is not None:
        from .device import resolve
        where = resolve(device_id).name                 # fails early, clearly
    params = params_from_args(args)
    from ..eval_cli import (check_not_an_input, check_output_dir, claim_output_folder,
                            make_writable_dir)
    check_output_dir("--out", args.out, CrfError)
    check_not_an_input("--out", args.out, {"--images": args.images, "--features": args.features,
                                           "--list": args.list}, CrfError)
    make_writable_dir("--out", args.out, CrfError)
    tasks = crf_tasks(args.features, args.images, args.list, args.out, params,
                      unary=args.unary, num_labels=args.num_labels, write_bin=args.bin,
                      device=device_id)
    claim_output_folder("--out", args.out, [path for task in tasks for path in task[3:5]
                                            if path], "crf", CrfError)
    logger.info("Dense CRF on %d images on %s: %s, unary = %s", len(tasks), where,
                ", ".join(f"{n}={getattr(params, n):g}" for n in PARAM_NAMES
                          + tuple(AXIS_NAMES) if getattr(params, n) is not None),
                "-score" if args.unary == "score" else "-log(prob)")
    start = time.perf_counter()
    seconds = run_crf_set(tasks, args.jobs)
    logger.info("Wrote %d label maps to %s in %.1f s (%.3f s per image per process)",
                len(seconds), args.out, time.perf_counter() - start,
                float(np.mean(seconds)) if seconds else 0.0)
    return 0
