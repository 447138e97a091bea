"""``caffelite demo``: the built-in synthetic VOC-like example.

Until the training work lands this runs the slim DeepLab-ASPP net forward (random
initialisation) over the synthetic validation images, the way the kit's test step
does (mean subtraction, BGR, bottom/right padding to the crop, crop of the scores to
the image), and prints the per-class IoU table of the evaluation step.
"""
import os
import time

import numpy as np
from PIL import Image

from ..log import logger
from .dataset import VOC_CLASSES, make_dataset

MEAN_BGR = (104.008, 116.669, 122.675)
CROP = 97   # 8k+1, covers every synthetic image


def _load_input(root, name):
    rgb = np.asarray(Image.open(os.path.join(root, "JPEGImages", name + ".jpg")), np.float32)
    label = np.asarray(Image.open(os.path.join(root, "SegmentationClassAug", name + ".png")))
    h, w = label.shape
    canvas = np.zeros((3, CROP, CROP), np.float32)   # mean-padded -> 0 after subtraction
    canvas[:, :h, :w] = (rgb[..., ::-1] - np.array(MEAN_BGR, np.float32)).transpose(2, 0, 1)
    return canvas, label


def run_demo(out_dir):
    from .. import TEST, Net, set_random_seed
    from ..layers.deeplab_eval import confusion_scores
    root = os.path.join(out_dir, "data")
    t0 = time.perf_counter()
    make_dataset(root)
    logger.info("Synthetic VOC-like dataset written to %s", root)
    set_random_seed(1)
    net = Net(os.path.join(os.path.dirname(__file__), "deploy.prototxt"), TEST,
              defines={"NET_ID": "synthetic_aspp", "CROP": CROP, "NUM_LABELS": 21})
    ids = open(os.path.join(root, "list", "val_id.txt")).read().split()
    n = len(VOC_CLASSES)
    confusion = np.zeros((n, n), np.int64)
    for name in ids:
        data, label = _load_input(root, name)
        scores = net.forward(data=data[None])["fc8_interp"][0]
        h, w = label.shape
        pred = scores[:, :h, :w].argmax(axis=0)
        keep = label != 255
        confusion += np.bincount(label[keep].astype(np.int64) * n + pred[keep],
                                 minlength=n * n).reshape(n, n)
    accuracy, _, _ = confusion_scores(confusion)
    rows, cols, diag = confusion.sum(1), confusion.sum(0), np.diag(confusion)
    union = rows + cols - diag
    print(f"{'class':>14}  IoU")
    ious = []
    for c, cname in enumerate(VOC_CLASSES):
        if union[c]:
            ious.append(diag[c] / union[c])
            print(f"{cname:>14}  {100 * ious[-1]:5.1f}")
    print(f"pixel accuracy {100 * accuracy:.1f} %, mIoU {100 * np.mean(ious):.1f} % over "
          f"{len(ious)} classes present ({len(ids)} images, untrained net: training arrives "
          f"with the solver work), {time.perf_counter() - t0:.1f} s")
    return 0
