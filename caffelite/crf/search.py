"""``caffelite crf_search``: the dense CRF's parameters cross-validated on part of val,
as the DeepLab papers chose them (the kit's ``run_densecrf_grid_search.sh``, which runs
the refine program once per parameter set, then its MATLAB evaluation per output
folder), in one command.

    caffelite crf_search --features DIR --images DIR --gt DIR --list val.txt
                         [--first 100] [--every K]
                         [--bi_w 3:6 --bi_xy_std 30:10:100 --bi_rgb_std 3:6
                          --pos_w 3 --pos_xy_std 3 --max_iter 10 | --preset NAME]
                         [--unary score|prob] [--num-labels 21] [--ignore 255]
                         [--jobs K] [--gpu N] [--json FILE] [--top 10]

Each parameter takes one value, a list (``3,4,5``) or a MATLAB range (``3:6``,
``30:10:100``: the ranges of DeepLab v2's first search round); the grid is every
combination. Every image is read once: its features are cropped to the image as by
``caffelite crf``, and for each combination the CRF's labels are scored against the
ground truth as by ``caffelite eval`` (MyVOCevalseg's mean IoU). The two lattices of a
combination depend only on the stds, so they are built once per image for all the
weights. The log gives each combination's mean IoU and its gain over the features
without the CRF, then the best ones and the ``caffelite crf`` flags of the best.

``--first N`` keeps the first N listed images (the papers used 100 val images);
``--every K`` keeps every K-th, starting with the first (the kit's
``DownSampleFeature.m`` with ``down_sample_method = 1``). The kit's other choice, a
random pick by MATLAB's ``rng(10)``, is not reproduced: pass its list instead.
"""
import contextlib
import itertools
import json
import math
import os
import sys
import time

import numpy as np

from .cli import (AXIS_NAMES, FEATURE_SUFFIX, PARAM_NAMES, CrfError, _channels_of,
                  check_directories, gpu_id, load_crf_inputs, map_tasks)
from .densecrf import (PUBLISHED_PARAMS, CRFParams, PairwiseMessages, crf_kernels,
                       mean_field, unary_from_probabilities, unary_from_scores)

GRID_NAMES = PARAM_NAMES + tuple(AXIS_NAMES)
_INTEGER_NAMES = ("max_iter",)
# The combinations vary the weights and max_iter fastest: those sharing their stds (and
# so their lattices) come one after the other.
_PRODUCT_ORDER = ("pos_xy_std", "pos_y_std", "bi_xy_std", "bi_y_std", "bi_rgb_std",
                  "bi_g_std", "bi_b_std", "max_iter", "pos_w", "bi_w")


# ------------------------------------------------------------------------ the grid
def parse_values(text, name):
    """The values of one parameter: ``4``, ``3,4,5`` (or space-separated), or a MATLAB
    range ``a:b`` / ``a:step:b`` (a, a + step, ... up to b)."""
    flag = f"--{name}"
    words = text.replace(",", " ").split()
    if not words:
        raise CrfError(f"{flag}: no value given")
    values = []
    for word in words:
        values += _range_values(word, flag) if ":" in word else [_number(word, flag)]
    if name in _INTEGER_NAMES:
        for value in values:
            if value != int(value):
                raise CrfError(f"{flag}: {value:g} is not an integer")
        values = [int(v) for v in values]
    if len(set(values)) != len(values):
        raise CrfError(f"{flag}: '{text}' gives a value twice")
    return values


def _number(word, flag):
    try:
        value = float(word)
    except ValueError:
        raise CrfError(f"{flag}: '{word}' is not a number") from None
    if not math.isfinite(value):
        raise CrfError(f"{flag}: '{word}' is not a finite number")
    return value


def _range_values(word, flag):
    parts = word.split(":")
    if len(parts) not in (2, 3):
        raise CrfError(f"{flag}: '{word}' is not a range a:b or a:step:b")
    numbers = [_number(p, flag) for p in parts]
    start, stop = numbers[0], numbers[-1]
    step = numbers[1] if len(numbers) == 3 else 1.0
    if step <= 0:
        raise CrfError(f"{flag}: the range '{word}' needs a positive step")
    if stop < start:
        raise CrfError(f"{flag}: the range '{word}' is empty (its end is below its start)")
    # MATLAB's colon: n = floor((b - a) / d) with a tolerance of a few eps for steps
    # like 0.1 that binary fractions cannot hold; the first half counted up from a, the
    # second down from b when the range ends on b (so 0:0.1:0.3 ends on 0.3 exactly).
    span = (stop - start) / step
    tolerance = 3 * sys.float_info.epsilon * max(abs(start), abs(stop)) / step
    if not span + tolerance < 10000:
        raise CrfError(f"{flag}: the range '{word}' has more than 10000 values")
    count = math.floor(span + tolerance)
    end = stop if abs(start + count * step - stop) <= tolerance * step else \
        start + count * step
    return [start + k * step if 2 * k <= count else end - (count - k) * step
            for k in range(count + 1)]


def parameter_grid(base, values):
    """Every combination of ``values`` ({name: list}) over ``base`` (``CRFParams``), as
    ``CRFParams``, the stds varying slowest; a combination the CRF refuses fails with
    its message."""
    names = [n for n in _PRODUCT_ORDER if n in values]
    grid = []
    for combo in itertools.product(*(values[n] for n in names)):
        try:
            grid.append(base.with_(**dict(zip(names, combo))))
        except ValueError as e:
            raise CrfError(str(e)) from None
    return grid


def describe(params, names=PARAM_NAMES):
    return " ".join(f"{n}={getattr(params, n):g}" for n in names
                    if getattr(params, n) is not None)


def _lattice_key(params):
    return params.pos_stds, params.bi_xy_stds, params.bi_rgb_stds


def _weighted(kernels, params):
    """``crf_kernels``' positional and bilateral kernels with ``params``' weights."""
    return [k.reweighted(w) for k, w in zip(kernels, (params.pos_w, params.bi_w))]


# ------------------------------------------------------------------ one image
def score_image(task):
    """Worker: (id, error message or None, confusions, seconds). ``confusions`` is
    (1 + combinations) x L x L: the features' own argmax first, then the CRF with each
    parameter set of the grid, in its order."""
    (ident, feature_path, image_path, gt_path, grid, unary, num_labels, ignore,
     device_id) = task
    from ..evaluate import EvalError, accumulate_confusion, matlab_argmax, read_label_map
    start = time.perf_counter()
    try:
        scores, image = load_crf_inputs(feature_path, image_path, num_labels,
                                        palette=False)
        gt = read_label_map(gt_path, "ground truth")
        if gt.shape != image.shape[:2]:
            raise CrfError(f"the ground truth '{gt_path}' is {gt.shape[0]}x{gt.shape[1]} "
                           f"but the image '{image_path}' is {image.shape[0]}x"
                           f"{image.shape[1]}")
        confusions = np.zeros((1 + len(grid), num_labels, num_labels), np.int64)
        accumulate_confusion(confusions[0], gt, matlab_argmax(scores), ignore,
                             feature_path, gt_path)
        for i, labels in enumerate(_grid_labels(scores, image, grid, unary, device_id), 1):
            accumulate_confusion(confusions[i], gt, labels, ignore, feature_path, gt_path)
    except (ValueError, OSError, RuntimeError, EvalError) as e:
        message = str(e)
        if feature_path not in message and image_path not in message and \
                gt_path not in message:
            message = f"'{ident}' ({feature_path}): {message}"
        return ident, message, None, 0.0
    return ident, None, confusions, time.perf_counter() - start


def _grid_labels(scores, image, grid, unary, device_id):
    """The CRF's labels for each parameter set of ``grid``, in order; the lattices and
    the per-pixel norms are built once per set of stds."""
    if device_id is not None:
        yield from _device_grid_labels(scores, image, grid, unary, device_id)
        return
    energies = unary_from_scores(scores) if unary == "score" \
        else unary_from_probabilities(scores)
    kernels, messages, key = None, None, None
    for params in grid:
        if _lattice_key(params) != key:
            key, kernels, messages = _lattice_key(params), crf_kernels(image, params), None
        if messages is None and params.max_iter > 0:
            messages = PairwiseMessages(kernels)            # builds the two lattices
        q = mean_field(energies, _weighted(kernels, params), params.max_iter,
                       messages=messages)
        yield q.argmax(axis=0)


def _device_grid_labels(scores, image, grid, unary, device_id):
    from .device import (LatticeTables, build_lattices, image_kernels, labels_on_device,
                         resolve)
    device = resolve(device_id)
    if unary == "score":                    # -U = the scores: negated on the device
        given, negated = np.asarray(scores, np.float32), True
    else:
        given, negated = unary_from_probabilities(scores), False
    kernels, tables, key = None, None, None
    for params in grid:
        if _lattice_key(params) != key:
            key = _lattice_key(params)
            kernels = image_kernels(image, params, device)
            with device.activate():
                tables = LatticeTables(build_lattices(kernels, device), device.xp)
        yield labels_on_device(given, _weighted(kernels, params), params.max_iter, device,
                               tables=tables, negated=negated)


# ------------------------------------------------------------------------ the set
def search_tasks(feature_dir, image_dir, gt_dir, lines, grid, unary="score",
                 num_labels=None, ignore=255, device=None):
    """One task per listed id; fails early, naming the file, when a feature file, an
    image or a ground truth is missing. ``num_labels`` None: the channels of the first
    features file."""
    from ..evaluate import IMAGE_EXTENSIONS, find_image
    check_directories(("--features", feature_dir), ("--images", image_dir), ("--gt", gt_dir))
    tasks = []
    for line in lines:
        feature_path = os.path.join(feature_dir, line.id + FEATURE_SUFFIX)
        if not os.path.isfile(feature_path):
            raise CrfError(f"features file '{feature_path}' not found for '{line.id}'")
        if num_labels is None:          # one class set for all, as ``caffelite crf``
            num_labels = _channels_of(feature_path)
        image_path = find_image(image_dir, line.id)
        if image_path is None:
            raise CrfError(f"no image '{os.path.join(image_dir, line.id)}"
                           f"{{{','.join(IMAGE_EXTENSIONS)}}}' for '{line.id}'")
        gt_path = os.path.join(gt_dir, line.id + ".png")
        if not os.path.isfile(gt_path):
            raise CrfError(f"ground truth '{gt_path}' not found for '{line.id}'")
        tasks.append(search_task(line.id, feature_path, image_path, gt_path, grid, unary,
                                 num_labels, ignore, device))
    return tasks


def search_task(ident, feature_path, image_path, gt_path, grid, unary="score",
                num_labels=21, ignore=255, device=None):
    """One image's task for ``run_search`` (``score_image``'s argument)."""
    return (ident, feature_path, image_path, gt_path, grid, unary, num_labels, ignore,
            device)


def run_search(tasks, jobs=1, log=None):
    """The summed confusions ((1 + combinations) x L x L) of every task, running them
    as ``caffelite crf`` does (``jobs`` processes); stops at the first failure."""
    from ..log import logger
    log = log or logger
    total, done, start = None, 0, time.perf_counter()
    last = start
    on_gpu = any(task[-1] is not None for task in tasks)
    with contextlib.closing(map_tasks(score_image, tasks, jobs, on_gpu)) as results:
        for ident, error, confusions, _ in results:
            if error is not None:
                raise CrfError(error)
            total = confusions if total is None else total + confusions
            done += 1
            now = time.perf_counter()
            if done % 10 == 0 or done == len(tasks) or now - last >= 30:
                last, spent = now, now - start
                left = spent / done * (len(tasks) - done)
                log.info("CRF search: %d/%d images, %.1f s%s", done, len(tasks), spent,
                         f", about {left:.0f} s left" if done < len(tasks) else "")
    return total


# ------------------------------------------------------------------------- CLI
def add_parser(subparsers):
    from ..cli import common_arguments
    sp = subparsers.add_parser(
        "crf_search", help="cross-validate the dense CRF's parameters on part of val "
                           "(run_densecrf_grid_search.sh + evaluation)",
        description=__doc__.split("\n\n")[0])
    sp.add_argument("--features", required=True,
                    help="MatWrite features <features>/<id>_blob_0.mat")
    sp.add_argument("--images", required=True,
                    help="images <images>/<id>.jpg (or .png, .ppm, ...)")
    sp.add_argument("--gt", required=True, help="ground-truth PNGs <gt>/<id>.png")
    sp.add_argument("--list", required=True,
                    help="ids, or the kit's '/JPEGImages/x.jpg /Seg.../x.png' lines")
    sp.add_argument("--first", type=int, default=None,
                    help="use the first N listed images (the papers used 100)")
    sp.add_argument("--every", type=int, default=1,
                    help="use every K-th listed image, from the first (DownSampleFeature.m)")
    sp.add_argument("--preset", choices=sorted(PUBLISHED_PARAMS),
                    help="values for the parameters not searched (default: the refine "
                         "program's)")
    defaults = CRFParams()
    for name in GRID_NAMES:
        default = getattr(defaults, name)
        sp.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, default=None,
                        help="one value, a list (3,4,5) or a MATLAB range (3:6, 30:10:100); "
                             + (f"default {default:g}" if default is not None
                                else f"default: --{AXIS_NAMES[name]}'s value"))
    sp.add_argument("--unary", choices=("score", "prob"), default="score",
                    help="features are logits (unary = -score, the refine program) or "
                         "probabilities (unary = -log p)")
    sp.add_argument("--num-labels", type=int, default=None,
                    help="classes (default: the channels of the first features file)")
    sp.add_argument("--ignore", type=int, default=255, help="GT label to ignore")
    sp.add_argument("--jobs", type=int, default=1, help="images processed in parallel")
    sp.add_argument("--json", help="write every combination's scores and confusion here")
    sp.add_argument("--top", type=int, default=10,
                    help="how many of the best combinations the summary lists")
    common_arguments(sp, gpu_help="GPU id for the CRF's kernels (the CPU if omitted)",
                     nets=False, define_help=None)
    sp.set_defaults(func=run)
    return sp


def selected_lines(list_path, first=None, every=1):
    from ..evaluate import read_list
    if every < 1:
        raise CrfError(f"--every must be at least 1 (got {every})")
    if first is not None and first < 1:
        raise CrfError(f"--first must be at least 1 (got {first})")
    lines = read_list(list_path)[::every]
    return lines[:first] if first is not None else lines


def run(args):
    from ..eval_cli import check_not_an_input, check_output_file
    from ..log import logger
    for flag, value in (("--jobs", args.jobs), ("--top", args.top)):
        if value < 1:
            raise CrfError(f"{flag} must be at least 1 (got {value})")
    device_id = gpu_id(args.gpu)
    where = "the CPU"
    if device_id is not None:
        from .device import resolve
        where = resolve(device_id).name                 # fails early, clearly
    values = {n: parse_values(getattr(args, n), n) for n in GRID_NAMES
              if getattr(args, n) is not None}
    base = PUBLISHED_PARAMS[args.preset] if args.preset else CRFParams()
    grid = parameter_grid(base, values)
    if args.json:
        check_output_file("--json", args.json)
        check_not_an_input("--json", args.json,
                           {"--features": args.features, "--images": args.images,
                            "--gt": args.gt, "--list": args.list}, CrfError)
    lines = selected_lines(args.list, args.first, args.every)
    if args.num_labels is not None and args.num_labels < 1:
        raise CrfError(f"--num-labels must be positive (got {args.num_labels})")
    tasks = search_tasks(args.features, args.images, args.gt, lines, grid, args.unary,
                         args.num_labels, args.ignore, device_id)
    searched = ", ".join(f"{n} {getattr(args, n)} ({len(v)})" for n, v in values.items()
                         if len(v) > 1) or "nothing (one parameter set)"
    logger.info("CRF search on %d images of %s, %d parameter sets on %s, unary = %s; "
                "searching %s; fixed: %s", len(tasks), args.list, len(grid), where,
                "-score" if args.unary == "score" else "-log(prob)", searched,
                describe(grid[0], [n for n in PARAM_NAMES
                                   if n not in values or len(values[n]) == 1]) or "-")
    confusions = run_search(tasks, args.jobs)
    report(tasks, grid, confusions, args.ignore, args.json, args.top)
    return 0


def report(tasks, grid, confusions, ignore=255, json_path=None, top=10):
    """Log each combination's mean IoU and its gain over the features alone, print the
    best ``top`` ones, log the best with its ``caffelite crf`` flags, and write the JSON
    (``json_path``); returns the best ``CRFParams``."""
    from ..evaluate import VOID, class_names, scores_from_confusion
    from ..log import logger
    names = class_names(confusions.shape[1])
    void = [name == VOID for name in names]
    scores = [scores_from_confusion(c, void) for c in confusions]
    plain = scores[0]["miou_percent"]
    logger.info("Without the CRF: mean IoU %.2f %%", plain)
    for params, s in zip(grid, scores[1:]):
        logger.info("%s: mean IoU %.2f %% (%+.2f)", describe(params), s["miou_percent"],
                    s["miou_percent"] - plain)
    order = sorted(range(len(grid)), key=lambda i: -_sortable(scores[1 + i]["miou_percent"]))
    print(_summary(grid, scores, order[:top], plain))
    best = grid[order[0]]
    flags = " ".join(f"--{n} {getattr(best, n):.15g}" for n in GRID_NAMES
                     if getattr(best, n) is not None)
    logger.info("Best: %s, mean IoU %.2f %% (%+.2f over the features alone). Apply it: "
                "caffelite crf %s ...", describe(best), scores[1 + order[0]]["miou_percent"],
                scores[1 + order[0]]["miou_percent"] - plain, flags)
    if json_path:
        _write_json(json_path, tasks, names, ignore, grid, confusions, scores, order)
    return best


def _sortable(value):
    return value if math.isfinite(value) else -math.inf


def _summary(grid, scores, best, plain):
    header = f"{'rank':>4}  {'mean IoU':>8}  {'gain':>6}  parameters"
    rows = [header]
    for rank, i in enumerate(best, 1):
        miou = scores[1 + i]["miou_percent"]
        rows.append(f"{rank:>4}  {miou:>8.2f}  {miou - plain:>+6.2f}  {describe(grid[i])}")
    rows.append(f"{'-':>4}  {plain:>8.2f}  {0:>+6.2f}  without the CRF")
    return "\n".join(rows)


def _write_json(path, tasks, names, ignore, grid, confusions, scores, order):
    from ..io.caffemodel import write_atomically

    def entry(confusion, s):
        return {"miou_percent": s["miou_percent"],
                "pixel_accuracy_percent": s["pixel_accuracy_percent"],
                "mean_class_accuracy_percent": s["mean_class_accuracy_percent"],
                "iou_percent": [float(v) for v in s["iou_percent"]],
                "confusion": confusion.tolist()}
    data = {"images": [t[0] for t in tasks], "classes": names, "ignore_label": ignore,
            "without_crf": entry(confusions[0], scores[0]),
            "results": [dict(params={n: getattr(p, n) for n in GRID_NAMES},
                             **entry(c, s))
                        for p, c, s in zip(grid, confusions[1:], scores[1:])],
            "best": order[0],
            "best_params": {n: getattr(grid[order[0]], n) for n in GRID_NAMES}}
    write_atomically(path, json.dumps(data, indent=1).encode("utf-8"))
