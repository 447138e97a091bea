"""Steps shared by the companion-paper demos (``caffelite.demo.weak``,
``caffelite.demo.domain_transform``): lay out an experiment folder as the DeepLab kit's
run_pascal.sh does, train with the kit's solver, run a test net that writes MatWrite
features, and evaluate them like the kit's MATLAB scripts."""
import argparse
import os
import shutil

import numpy as np

from ..evaluate import evaluate_features, prediction_from_features, scores_from_confusion
from ..io.prototxt import read_text
from ..log import logger
from .dataset import make_dataset

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "config")
EXP = "voc_synth"
DATA_ROOT = "data"


def expand(template, target, defines):
    """Write ``template`` with its ${VAR}s filled (the kit's sed step)."""
    with open(target, "w") as f:
        f.write(read_text(template, defines))
    return target


def lay_out(net_id, templates, n_train, n_val, batch_size, max_iter, extra=None,
            feature_blobs=("fc8",)):
    """Dataset, lists and ``voc_synth/config/<net_id>/`` with the expanded configs, in the
    working directory.  ``templates``: {"train": file, "test": file} in CONFIG_DIR (the
    solver is the synthetic example's); ``feature_blobs``: the folders the test net's
    MatWrite layers write to.  Returns (config dir, defines)."""
    config = os.path.join(EXP, "config", net_id)
    features = os.path.join(EXP, "features", net_id)
    for d in (config, os.path.join(EXP, "model", net_id), os.path.join(EXP, "log", net_id),
              *[os.path.join(features, "val", blob) for blob in feature_blobs]):
        os.makedirs(d, exist_ok=True)
    make_dataset(DATA_ROOT, os.path.join(EXP, "list"), n_train=n_train, n_val=n_val)
    defines = {"EXP": EXP, "DATA_ROOT": DATA_ROOT, "NET_ID": net_id, "NUM_LABELS": 21,
               "TRAIN_SET": "train", "TEST_SET": "val", "BATCH_SIZE": batch_size,
               "MAX_ITER": max_iter, "FEATURE_DIR": features}
    defines.update(extra or {})
    shutil.copy(os.path.join(CONFIG_DIR, "solver.prototxt"), config)
    for role, name in templates.items():
        shutil.copy(os.path.join(CONFIG_DIR, name), os.path.join(config, f"{role}.prototxt"))
    expand(os.path.join(config, "train.prototxt"),
           os.path.join(config, "train_train.prototxt"), defines)
    expand(os.path.join(config, "solver.prototxt"),
           os.path.join(config, "solver_train.prototxt"), defines)
    expand(os.path.join(config, "test.prototxt"),
           os.path.join(config, "test_val.prototxt"), defines)
    return config, defines


def train(config, defines, record=("loss",)):
    """Solve; returns the final caffemodel path and, per iteration, the blobs in
    ``record`` (their first value)."""
    from ..solver import get_solver
    solver = get_solver(os.path.join(config, "solver_train.prototxt"))
    history = {name: [] for name in record}

    def note():
        for name in record:
            history[name].append(float(np.ravel(solver.net.blobs[name].data)[0]))
    solver.add_callback(on_gradients=note)
    solver.solve()
    model = os.path.join(EXP, "model", defines["NET_ID"],
                         f"train_iter_{defines['MAX_ITER']}.caffemodel")
    return model, history


def test(config, model):
    """Run the test net once per validation image (its MatWrite layers write the
    features); returns the image ids."""
    from .. import TEST, Net
    ids = open(os.path.join(EXP, "list", "val_id.txt")).read().split()
    net = Net(os.path.join(config, "test_val.prototxt"), TEST, weights=model)
    for _ in ids:
        net.forward_from_to()
    return ids


def evaluate(defines, blob, ids):
    """Confusion matrix and scores of the features MatWrite wrote for ``blob``."""
    folder = os.path.join(defines["FEATURE_DIR"], "val", blob)
    confusion = evaluate_features(folder, os.path.join(DATA_ROOT, "SegmentationClassAug"),
                                  ids, 21)
    return confusion, scores_from_confusion(confusion)


def trimap_accuracy(defines, blob, ids, width=4):
    """Pixel accuracy within ``width`` pixels of the object boundaries (the "trimap"
    measure of the DeepLab papers): the synthetic labels mark every boundary with a
    band of 255, which is dilated by ``width`` (the 255 pixels themselves excluded)."""
    from PIL import Image
    from scipy import ndimage
    correct = total = 0
    for name in ids:
        gt = np.asarray(Image.open(os.path.join(DATA_ROOT, "SegmentationClassAug",
                                              name + ".png")))
        band = ndimage.binary_dilation(gt == 255, iterations=width) & (gt != 255)
        pred = prediction_from_features(
            os.path.join(defines["FEATURE_DIR"], "val", blob, f"{name}_blob_0.mat"),
            *gt.shape)
        correct += int(((pred == gt) & band).sum())
        total += int(band.sum())
    return correct / max(total, 1)


def background_only(confusion):
    """Scores of predicting background everywhere on the same pixels (a chance-level
    reference)."""
    m = np.zeros_like(np.asarray(confusion))
    m[:, 0] = np.asarray(confusion).sum(axis=1)
    return scores_from_confusion(m)


# Left in a demo's folder: the folder is the demo's own, and a new run may write there.
MARKER = ".caffelite_demo"


def claim_folder(out_dir):
    """Make ``out_dir`` the demo's (it writes data/ and voc_synth/ there); a folder that
    already holds other files is refused, as they could be overwritten."""
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not _demo_folder(out_dir):
        raise ValueError(f"'{out_dir}' already holds files that caffelite demo did not "
                         f"make, which its data/ and voc_synth/ folders could overwrite; "
                         f"give a new or empty --out folder")
    os.makedirs(out_dir, exist_ok=True)
    open(os.path.join(out_dir, MARKER), "a").close()


def _demo_folder(out_dir):
    """Marked, or laid out by a demo from before the marker: data/ and voc_synth/ only."""
    names = set(os.listdir(out_dir))
    return MARKER in names or (names <= {"data", "voc_synth"} and
                               os.path.isdir(os.path.join(out_dir, "voc_synth", "config")))


def in_directory(out_dir, fn, *args):
    """Run ``fn`` with ``out_dir`` as the working directory (the kit's configs use
    paths relative to the experiment root)."""
    claim_folder(out_dir)
    cwd = os.getcwd()
    os.chdir(out_dir)
    try:
        return fn(*args)
    finally:
        os.chdir(cwd)


def add_arguments(parser, iterations, n_train, n_val, batch_size, out):
    """The demos' options (also for a ``caffelite`` verb: see each module's
    ``add_parser``)."""
    parser.add_argument("--out", default=out,
                        help=f"experiment folder (default ./{out}; created, or an earlier "
                             f"run's folder, rewritten; a folder of other files is refused)")
    parser.add_argument("--iterations", type=int, default=iterations,
                        help=f"training iterations (default {iterations})")
    parser.add_argument("--train-images", type=int, default=n_train,
                        help=f"synthetic training images (default {n_train})")
    parser.add_argument("--val-images", type=int, default=n_val,
                        help=f"synthetic validation images (default {n_val})")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"training batch (default {batch_size})")
    parser.add_argument("--quiet", action="store_true", help="print warnings and results only")
    parser.add_argument("--log", help="also write the log to this file")
    return parser


def argument_parser(description, **defaults):
    return add_arguments(argparse.ArgumentParser(description=description), **defaults)


def start_logging(quiet, log_file=None):
    """glog-format lines on stderr (solver progress), or warnings only."""
    import logging
    from ..log import setup_logging
    setup_logging(logging.WARNING if quiet else logging.INFO, log_file=log_file)


def apply_quiet(quiet):
    """For a ``caffelite`` verb, whose logging the CLI has set up already."""
    import logging
    if quiet:
        logger.setLevel(logging.WARNING)
