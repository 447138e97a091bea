"""``python -m caffelite.demo.weak --out DIR``: weakly supervised training (EM-Adapt,
Papandreou et al. ICCV'15) of the synthetic example's slim DeepLab-ASPP.

The training net (``config/weak_train.prototxt``) sees image-level labels only: the
set of classes in each crop, from UniqueLabel; AdaptiveBiasChannel + ArgMax make the
E-step pixel labels and a softmax loss against them is the M-step.  The test net and
the evaluation are the synthetic example's (MatWrite features, the kit's confusion
matrix and IoU).  Prints the IoU table, the mean IoU and that of predicting
background everywhere.
"""
import sys
import time

from . import experiment
from .dataset import VOC_CLASSES
from ..evaluate import format_table

NET_ID = "aspp_slim_weak"


def run_weak(out_dir, max_iter=600, n_train=120, n_val=30, batch_size=10):
    """Returns {"losses", "scores", "background_only"} (scores as evaluate's)."""
    return experiment.in_directory(out_dir, _run, max_iter, n_train, n_val, batch_size)


def _run(max_iter, n_train, n_val, batch_size):
    t0 = time.perf_counter()
    config, defines = experiment.lay_out(
        NET_ID, {"train": "weak_train.prototxt", "test": "test.prototxt"},
        n_train, n_val, batch_size, max_iter)
    model, history = experiment.train(config, defines, record=("loss",))
    ids = experiment.test(config, model)
    confusion, scores = experiment.evaluate(defines, "fc8", ids)
    baseline = experiment.background_only(confusion)
    print(format_table(scores, VOC_CLASSES))
    print(f"EM-Adapt (image-level labels only): mean IoU {100 * scores['miou']:.1f}% "
          f"(background everywhere: {100 * baseline['miou']:.1f}%), pixel accuracy "
          f"{100 * scores['pixel_accuracy']:.1f}%; {len(ids)} validation images, "
          f"{max_iter} iterations, {time.perf_counter() - t0:.0f} s")
    return {"losses": history["loss"], "scores": scores, "background_only": baseline}


DESCRIPTION = "Weakly supervised (EM-Adapt) training and evaluation on the synthetic set"
DEFAULTS = dict(iterations=600, n_train=120, n_val=30, batch_size=10, out="caffelite_demo_weak")


def run(args):
    experiment.apply_quiet(args.quiet)
    run_weak(args.out, args.iterations, args.train_images, args.val_images, args.batch_size)
    return 0


def add_parser(subparsers, name="demo-weak"):
    """Register this demo as a ``caffelite`` verb."""
    sp = subparsers.add_parser(name, help=DESCRIPTION, description=DESCRIPTION)
    experiment.add_arguments(sp, **DEFAULTS)
    sp.set_defaults(func=run)
    return sp


def main(argv=None):
    args = experiment.argument_parser(DESCRIPTION, **DEFAULTS).parse_args(argv)
    experiment.start_logging(args.quiet, args.log)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
