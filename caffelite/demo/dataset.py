"""A small synthetic VOC-like dataset: textured backgrounds with objects of up to
20 classes, JPEG images, raw-index PNG labels with a 255 band on object borders,
and the DeepLab kit's list files (``list/train.txt`` = "/JPEGImages/x.jpg
/SegmentationClassAug/x.png", ``list/val_id.txt`` = ids)."""
import os

import numpy as np
from PIL import Image

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def _class_colors(rng):
    return rng.integers(30, 226, size=(len(VOC_CLASSES), 3))


def _object_mask(rng, h, w):
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    ry, rx = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.3) * w
    if rng.random() < 0.5:
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)


def _border(mask):
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def make_sample(rng, colors, h, w, max_objects=3):
    image = np.clip(colors[0] * 0.5 + rng.normal(0, 25, size=(h, w, 3)), 0, 255)
    label = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(1, max_objects + 1)):
        cls = int(rng.integers(1, len(VOC_CLASSES)))
        mask = _object_mask(rng, h, w)
        stripes = 20 * np.sin(np.arange(w) * (0.3 + 0.05 * cls))[None, :, None]
        image[mask] = np.clip(colors[cls] + stripes + rng.normal(0, 12, size=(h, w, 3)),
                              0, 255)[mask]
        label[mask] = cls
        label[_border(mask)] = 255
    return image.astype(np.uint8), label


def make_dataset(root, list_dir=None, n_train=40, n_val=10, size=(81, 97), seed=0):
    """Write images and labels under ``root`` (DATA_ROOT) and the kit's list files
    under ``list_dir`` (default ``root/list``)."""
    rng = np.random.default_rng(seed)
    colors = _class_colors(rng)
    list_dir = list_dir or os.path.join(root, "list")
    for sub in ("JPEGImages", "SegmentationClassAug"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    os.makedirs(list_dir, exist_ok=True)
    splits = {"train": n_train, "val": n_val}
    for split, n in splits.items():
        lines, ids = [], []
        for i in range(n):
            name = f"{split}_{i:04d}"
            h = int(rng.integers(size[0] - 16, size[0] + 1))
            w = int(rng.integers(size[1] - 16, size[1] + 1))
            image, label = make_sample(rng, colors, h, w)
            Image.fromarray(image).save(os.path.join(root, "JPEGImages", name + ".jpg"), quality=95)
            Image.fromarray(label, mode="L").save(
                os.path.join(root, "SegmentationClassAug", name + ".png"))
            lines.append(f"/JPEGImages/{name}.jpg /SegmentationClassAug/{name}.png")
            ids.append(name)
        with open(os.path.join(list_dir, f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(list_dir, f"{split}_id.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    return root
