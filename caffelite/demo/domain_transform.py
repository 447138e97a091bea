"""``python -m caffelite.demo.domain_transform --out DIR``: domain-transform refinement
(DT-EdgeNet, Chen et al. CVPR'16) of the synthetic example's slim DeepLab-ASPP.

The training net (``config/dt_train.prototxt``) upsamples the scores x8, filters them
with a DomainTransform whose edge map an EdgeNet predicts from the trunk's conv1 and
conv2 features, and trains everything end to end with a full-resolution loss on the
filtered scores (plus DeepLab's own loss on the raw scores).  The test net writes the
raw upsampled scores (fc8) and the refined ones (fc8_dt); both are evaluated like the
kit does, and their mean IoU and pixel accuracy are printed side by side.
"""
import sys
import time

from . import experiment
from .dataset import VOC_CLASSES
from ..evaluate import format_table

NET_ID = "aspp_slim_dt"
SPATIAL_SIGMA = 16
RANGE_SIGMA = 0.5


def run_domain_transform(out_dir, max_iter=600, n_train=120, n_val=30, batch_size=10):
    """Returns {"losses", "raw", "refined"} (scores as evaluate's)."""
    return experiment.in_directory(out_dir, _run, max_iter, n_train, n_val, batch_size)


def _run(max_iter, n_train, n_val, batch_size):
    t0 = time.perf_counter()
    config, defines = experiment.lay_out(
        NET_ID, {"train": "dt_train.prototxt", "test": "dt_test.prototxt"},
        n_train, n_val, batch_size, max_iter,
        extra={"SPATIAL_SIGMA": SPATIAL_SIGMA, "RANGE_SIGMA": RANGE_SIGMA},
        feature_blobs=("fc8", "fc8_dt", "edge"))
    model, history = experiment.train(config, defines, record=("loss", "loss_raw"))
    ids = experiment.test(config, model)
    _, raw = experiment.evaluate(defines, "fc8", ids)
    _, refined = experiment.evaluate(defines, "fc8_dt", ids)
    for scores, blob in ((raw, "fc8"), (refined, "fc8_dt")):
        scores["trimap_accuracy"] = experiment.trimap_accuracy(defines, blob, ids)
    print(format_table(refined, VOC_CLASSES))
    print(f"Domain transform refinement (refined vs raw upsampled scores): mean IoU "
          f"{100 * refined['miou']:.1f}% vs {100 * raw['miou']:.1f}%, pixel accuracy "
          f"{100 * refined['pixel_accuracy']:.1f}% vs {100 * raw['pixel_accuracy']:.1f}%, "
          f"accuracy within 4 px of boundaries {100 * refined['trimap_accuracy']:.1f}% vs "
          f"{100 * raw['trimap_accuracy']:.1f}%; {len(ids)} validation images, {max_iter} "
          f"iterations, {time.perf_counter() - t0:.0f} s")
    return {"losses": history["loss"], "losses_raw": history["loss_raw"], "raw": raw,
            "refined": refined}


DESCRIPTION = "Domain-transform (DT-EdgeNet) training and evaluation on the synthetic set"
DEFAULTS = dict(iterations=600, n_train=120, n_val=30, batch_size=10, out="caffelite_demo_dt")


def run(args):
    experiment.apply_quiet(args.quiet)
    run_domain_transform(args.out, args.iterations, args.train_images, args.val_images,
                         args.batch_size)
    return 0


def add_parser(subparsers, name="demo-dt"):
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
