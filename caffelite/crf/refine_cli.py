"""``caffelite refine_pascal_v4``: the DeepLab kit's ``prog_refine_pascal_v4`` with its
own command line, so ``run_densecrf.sh`` runs with ``CRF_BIN`` pointing at it:

    caffelite refine_pascal_v4 -id IMG_DIR -fd FEATURE_DIR -sd SAVE_DIR -i 10
        -px 3 -py 3 -pw 3 -bx 49 -by 49 -br 5 -bg 5 -bb 5 -bw 4

As the program (spec section 20): every ``*.mat`` of ``-fd`` is one image, named by the
file name up to ``_blob_0``; its colours come from ``<id>/<name>.ppm`` (another image
format of that name is taken when there is no PPM); the scores are cropped to the
image, unary = -score; ``<sd>/<name>.bin`` gets the labels (int32 rows, cols, 1, then
int16 labels column-major). Flags it does not know, and a flag without a value at the
end, are ignored, as the program ignores them. Defaults: 10 iterations, positional
std 3 and weight 3, bilateral xy std 70, RGB std 5 and weight 5.
"""
import glob
import os
import re
import time

from .cli import AXIS_NAMES, FEATURE_SUFFIX, CrfError, check_directories, run_crf_set
from .densecrf import CRFParams

VERB = "refine_pascal_v4"
# the program's flag -> (CRFParams field, type)
FLAGS = {"-i": ("max_iter", int), "-px": ("pos_xy_std", float), "-py": ("pos_y_std", float),
         "-pw": ("pos_w", float), "-bx": ("bi_xy_std", float), "-by": ("bi_y_std", float),
         "-br": ("bi_rgb_std", float), "-bg": ("bi_g_std", float),
         "-bb": ("bi_b_std", float), "-bw": ("bi_w", float)}
DIRS = {"-id": "images", "-fd": "features", "-sd": "out"}
# The program's defaults (CRFParams'); its y, G and B stds are variables of their own
# with the x and R defaults, not copies of -px, -bx and -br.
DEFAULTS = CRFParams().with_(**{axis: getattr(CRFParams(), base)
                                for axis, base in AXIS_NAMES.items()})
_C_NUMBER = {int: re.compile(r"\s*[+-]?\d+"),
             float: re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")}


USAGE = (f"usage: caffelite {VERB} -id IMG_DIR -fd FEATURE_DIR -sd SAVE_DIR ["
         + " ".join(f"{flag} {getattr(DEFAULTS, name):g}" for flag, (name, _) in FLAGS.items())
         + "]")
HELP = f"""{USAGE}

prog_refine_pascal_v4's own command line, as run_densecrf.sh calls it: dense-CRF labels
for every MatWrite features file <name>_blob_0.mat of FEATURE_DIR and its image
IMG_DIR/<name>.ppm (or .jpg, .png ...), written to SAVE_DIR/<name>.bin.  The bracketed
values are the program's defaults: -i mean-field iterations, -px/-py/-pw the positional kernel's x/y
standard deviations and weight, -bx/-by/-br/-bg/-bb/-bw the bilateral kernel's x/y,
R/G/B standard deviations and weight.  Numbers are read as atoi/atof do.
"""


def add_parser(subparsers):
    # '+' as the prefix: every word after the verb (-id, -px ...) reaches parse_words
    sp = subparsers.add_parser(
        VERB, prefix_chars="+", add_help=False,
        help="prog_refine_pascal_v4's own command line (-id -fd -sd -i -px ... -bw), "
             "for run_densecrf.sh")
    sp.add_argument("words", nargs="*")
    sp.set_defaults(func=run, log=None)
    return sp


def parse_words(words):
    """(directories {images, features, out}, CRFParams) from the program's argv."""
    dirs, values, i = {}, {}, 0
    while i < len(words):
        flag = words[i]
        if (flag in FLAGS or flag in DIRS) and i + 1 < len(words):
            value = words[i + 1]
            if flag in DIRS:
                dirs[DIRS[flag]] = value
            else:
                name, kind = FLAGS[flag]
                values[name] = _c_number(flag, value, kind)
            i += 2
        else:
            i += 1
    missing = [flag for flag, name in DIRS.items() if name not in dirs]
    if missing:
        raise CrfError(f"missing {', '.join(missing)} ({USAGE})")
    return dirs, DEFAULTS.with_(**values)


def _c_number(flag, text, kind):
    """``atoi``/``atof``: the number the text starts with ("10.0" gives 10 for -i, "4x"
    gives 4); text that starts with none is refused (the program would take 0)."""
    found = _C_NUMBER[kind].match(text)
    if found is None:
        raise CrfError(f"{flag} expects a number, got '{text}'")
    return kind(found.group(0))


def refine_tasks(feature_dir, image_dir, out_dir, params):
    """One task per ``*.mat`` of the feature folder, in name order."""
    from ..evaluate import find_image
    check_directories(("-fd", feature_dir), ("-id", image_dir))
    tasks = []
    for feature_path in sorted(glob.glob(os.path.join(glob.escape(feature_dir), "*.mat"))):
        file_name = os.path.basename(feature_path)
        name = file_name[:file_name.find("_blob_0")] if "_blob_0" in file_name \
            else file_name[:-len(".mat")]
        image_path = os.path.join(image_dir, name + ".ppm")
        if not os.path.isfile(image_path):
            image_path = find_image(image_dir, name)
        if image_path is None:
            raise CrfError(f"no image '{os.path.join(image_dir, name)}.ppm' for the features "
                           f"'{feature_path}'")
        tasks.append((name, feature_path, image_path, None,
                      os.path.join(out_dir, name + ".bin"), params, "score", None,
                      f"-fd '{feature_dir}'", None))
    if not tasks:
        raise CrfError(f"-fd: no *.mat files in '{feature_dir}' (expected MatWrite's "
                       f"<name>{FEATURE_SUFFIX})")
    return tasks


def run(args):
    from ..log import logger
    if any(word in ("-h", "--help") for word in args.words):
        print(HELP, end="")
        return 0
    dirs, params = parse_words(args.words)
    tasks = refine_tasks(dirs["features"], dirs["images"], dirs["out"], params)
    from ..eval_cli import make_writable_dir
    make_writable_dir("-sd", dirs["out"], CrfError)
    logger.info("%s: %d images, %s", VERB, len(tasks), params)
    start = time.perf_counter()
    run_crf_set(tasks)
    logger.info("Wrote %d .bin label maps to %s in %.1f s", len(tasks), dirs["out"],
                time.perf_counter() - start)
    return 0
