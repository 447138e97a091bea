"""``caffelite demo``: the DeepLab kit's train -> test -> evaluate on synthetic data.

Lays out an experiment folder as run_pascal.sh expects (``config/<NET_ID>/`` with
``${VAR}`` templates, ``list/``, ``model/``, ``features/``, ``log/``), expands the
templates the way the kit's sed does, trains the slim DeepLab-ASPP net with the poly
solver, runs the test net writing MatWrite features, and evaluates them like the
kit's MATLAB scripts (crop to the image, argmax, confusion matrix, IoU).
"""
import os
import shutil
import time

from ..evaluate import evaluate_features, format_table, scores_from_confusion
from ..io.prototxt import read_text
from ..log import logger
from .dataset import VOC_CLASSES, make_dataset

NET_ID = "aspp_slim"
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "config")


def _expand(template, target, defines):
    with open(target, "w") as f:
        f.write(read_text(template, defines))
    return target


def expand_train_configs(config, defines):
    """Write ``train_<TRAIN_SET>.prototxt`` and ``solver_<TRAIN_SET>.prototxt`` as the kit
    does; returns the solver's path."""
    train_set = defines["TRAIN_SET"]
    _expand(os.path.join(config, "train.prototxt"),
            os.path.join(config, f"train_{train_set}.prototxt"), defines)
    return _expand(os.path.join(config, "solver.prototxt"),
                   os.path.join(config, f"solver_{train_set}.prototxt"), defines)


def prepare_experiment(n_train, n_val, max_iter, batch_size):
    """Lay out the experiment in the working directory: like the kit, the configs use
    paths relative to it."""
    exp = "voc_synth"
    data_root = "data"
    config = os.path.join(exp, "config", NET_ID)
    for d in (config, os.path.join(exp, "model", NET_ID), os.path.join(exp, "log", NET_ID),
              os.path.join(exp, "features", NET_ID, "val", "fc8")):
        os.makedirs(d, exist_ok=True)
    for name in ("train", "test", "solver", "solver2"):
        shutil.copy(os.path.join(CONFIG_DIR, f"{name}.prototxt"), config)
    make_dataset(data_root, os.path.join(exp, "list"), n_train=n_train, n_val=n_val)
    defines = {"EXP": exp, "DATA_ROOT": data_root, "NET_ID": NET_ID, "NUM_LABELS": 21,
               "TRAIN_SET": "train", "TEST_SET": "val", "BATCH_SIZE": batch_size,
               "MAX_ITER": max_iter,
               "FEATURE_DIR": os.path.join(exp, "features", NET_ID)}
    return exp, data_root, config, defines


def run_demo(out_dir, max_iter=600, n_train=120, n_val=30, batch_size=10):
    """Returns a dict with the training losses and the evaluation scores."""
    from .experiment import in_directory
    return in_directory(out_dir, _run_in_experiment_root, max_iter, n_train, n_val,
                        batch_size)


def _run_in_experiment_root(max_iter, n_train, n_val, batch_size):
    from .. import TEST, Net
    from ..solver import get_solver
    t0 = time.perf_counter()
    exp, data_root, config, defines = prepare_experiment(n_train, n_val, max_iter, batch_size)
    logger.info("Experiment folder %s, data %s", exp, data_root)
    solver_file = expand_train_configs(config, defines)
    solver = get_solver(solver_file)
    losses = []
    solver.add_callback(on_gradients=lambda: losses.append(_train_loss(solver)))
    solver.solve()
    model = os.path.join(exp, "model", NET_ID, f"train_iter_{max_iter}.caffemodel")
    test = _expand(os.path.join(config, "test.prototxt"),
                   os.path.join(config, "test_val.prototxt"), defines)
    ids = open(os.path.join(exp, "list", "val_id.txt")).read().split()
    net = Net(test, TEST, weights=model)
    for _ in ids:
        net.forward_from_to()
    confusion = evaluate_features(os.path.join(defines["FEATURE_DIR"], "val", "fc8"),
                                  os.path.join(data_root, "SegmentationClassAug"), ids, 21)
    scores = scores_from_confusion(confusion)
    print(format_table(scores, VOC_CLASSES))
    print(f"{len(ids)} validation images, {max_iter} training iterations, "
          f"{time.perf_counter() - t0:.0f} s")
    return {"losses": losses, "scores": scores}


def _train_loss(solver):
    return float(solver.net.blobs["loss"].data)
