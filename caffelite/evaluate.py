"""Segmentation evaluation as the DeepLab kit's MATLAB scripts do it.

``EvalSegResults.m`` loads each MatWrite ``<id>_blob_0.mat``, crops it to the image
(the image sits at the top-left of the padded canvas), takes ``max(., [], 3)`` -- the
*first* maximum on ties, i.e. the lowest class, NaN scores skipped -- and writes a
palette PNG;
``MyVOCevalseg.m`` then accumulates one confusion matrix over the whole list (GT 255
ignored; rows = ground truth, columns = prediction) and prints:

* pixel accuracy = 100 * trace / total;
* per-class accuracy = 100 * TP / (GT pixels of the class), a class without GT pixels
  scoring 0 (its denominator is set to 1), averaged over **all** classes;
* per-class IoU = 100 * TP / (TP + FP + FN), a class absent from both the ground truth
  and the prediction scoring **0** (denominator set to 1, not NaN), and the "Average
  accuracy" = mean IoU = their sum over **all** classes divided by the class count.

So a class that never occurs in the evaluated set pulls the mean down (0 over N
classes).  ``scores_from_confusion`` reproduces these numbers exactly (same float64
operations in the same order); ``miou_present`` is also given -- the mean over the
classes that occur in the ground truth or the prediction -- but the MATLAB number is
``miou``.  (Caffe's SegAccuracy layer counts such a class as IoU 1 instead: spec 5.)

Differences from MyVOCevalseg, all about inputs MATLAB would mis-handle: a missing
prediction is an error (MATLAB warns and skips it; ``skip_missing=True`` does that), a
GT label outside ``[0, N)`` other than the ignore label is an error (MATLAB silently
counts labels N to 254 in a wrong cell, and skips those of 256 and more, which only
16-bit PNGs hold, with its ``gt < 255`` mask), and colour (RGB) prediction and ground-truth PNGs are
rejected.  Label PNGs are read as MATLAB's ``imread`` gives them: the indices of a
palette PNG, the values of a gray one (16-bit ones in full).
"""
import json
import math
import os
from typing import NamedTuple, Optional

import numpy as np

from .io.caffemodel import write_atomically
from .io.image import pixel_limit_lifted, pixel_limit_reason, read_image, read_label
from .io.matfile import MatFileError, read_mat
from .io.png_gamma import png_depth_and_colour_type
from .log import logger


class EvalError(ValueError):
    pass


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp")


# GetCocoCategories.m: COCO's category ids 1..90 with their names; the ids that name
# no category are 'void', which MyVOCevalseg leaves out of its rows and means.
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51,
    52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77,
    78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90)
COCO_CATEGORIES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush")
VOID = "void"
DATASETS = ("voc", "coco")


def class_names(num_labels, dataset=None):
    """The kit's class names, background first: VOC's 21 (``dataset`` "voc", or by
    default for 21 labels), COCO's 91 with 'void' for the ids without a category
    ("coco", or by default for 91 labels), numbered names otherwise."""
    if dataset is None:
        dataset = {21: "voc", 91: "coco"}.get(num_labels)
    if dataset == "voc" and num_labels == 21:
        from .demo.dataset import VOC_CLASSES
        return list(VOC_CLASSES)
    if dataset == "coco" and num_labels == 91:
        names = dict(zip(COCO_CATEGORY_IDS, COCO_CATEGORIES))
        return ["background"] + [names.get(i, VOID) for i in range(1, 91)]
    if dataset is not None:
        raise EvalError(f"the {dataset} classes are {21 if dataset == 'voc' else 91} "
                        f"labels, not {num_labels} (--num-labels)")
    return [f"class_{i}" for i in range(num_labels)]


def voc_palette(n=256):
    """The VOC colour map (``labelcolormap.m``): flat [r, g, b, ...] of ``n`` entries;
    label 255 is (224, 224, 192)."""
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


# ------------------------------------------------------------------------ list files
class EvalItem(NamedTuple):
    """One listed sample: its id, ground-truth PNG and (optional) image."""
    id: str
    gt: str
    image: Optional[str] = None


class ListLine(NamedTuple):
    id: str
    image: Optional[str]
    label: Optional[str]


def _looks_like_path(token):
    return "/" in token or token.lower().endswith(IMAGE_EXTENSIONS)


def read_list(path):
    """The kit's list files: ids (``val_id.txt``) or "image [label]" lines
    (``/JPEGImages/x.jpg /SegmentationClassAug/x.png``); the id of a path is its file
    name without extension.  Blank lines are skipped."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise EvalError(f"cannot read the list '{path}': {e.strerror}") from None
    try:
        lines = raw.decode("utf-8-sig").splitlines()     # a BOM is not part of an id
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise EvalError(f"{path}:{line}: the list is not UTF-8 text (byte "
                        f"0x{raw[e.start]:02x})") from None
    out = []
    for line in lines:
        tokens = line.split()
        if not tokens:
            continue
        first = tokens[0]
        if len(tokens) > 1 or _looks_like_path(first):
            name = os.path.splitext(os.path.basename(first))[0]
            out.append(ListLine(name, first, tokens[1] if len(tokens) > 1 else None))
        else:
            out.append(ListLine(first, None, None))
    if not out:
        raise EvalError(f"the list '{path}' names no images")
    return out


def find_image(directory, name):
    """``<directory>/<name>.<ext>`` for the first image extension that exists."""
    for ext in IMAGE_EXTENSIONS:
        path = os.path.join(directory, name + ext)
        if os.path.isfile(path):
            return path
    return None


# ------------------------------------------------------------------------ predictions
def prediction_from_features(path, height, width, num_labels=None, argmax_done=False):
    """Argmax over classes (first maximum) of ``<id>_blob_0.mat`` cropped to the
    top-left ``height`` x ``width``; with ``argmax_done`` (EvalSegResults' is_argmax,
    for nets that write labels) the one channel as MATLAB's uint8() makes it."""
    try:
        scores, _ = read_mat(path, dtype=None)      # EvalSegResults loads any class
    except MatFileError as e:
        raise EvalError(str(e)) from None
    if scores.shape[0] != 1:
        raise EvalError(f"{path}: holds {scores.shape[0]} images; DeepLab test nets write "
                        f"one image per file (batch_size: 1)")
    scores = scores[0]
    if argmax_done:
        if scores.shape[0] != 1:
            raise EvalError(f"{path}: features that are labels already have one channel, "
                            f"not {scores.shape[0]}")
        num_labels = 1
    if num_labels is not None and scores.shape[0] != num_labels:
        raise EvalError(f"{path}: features have {scores.shape[0]} channels but "
                        f"{num_labels} labels are evaluated (--num-labels)")
    if scores.shape[1] < height or scores.shape[2] < width:
        raise EvalError(f"{path}: features of size {scores.shape[1]}x{scores.shape[2]} are "
                        f"smaller than the image ({height}x{width})")
    if argmax_done:
        return matlab_uint8(scores[0, :height, :width])
    return matlab_argmax(scores[:, :height, :width]).astype(np.uint8)


def matlab_uint8(values):
    """MATLAB's uint8(): round half away from zero, saturate to [0, 255], NaN to 0."""
    values = np.nan_to_num(np.asarray(values, np.float64), nan=0.0)
    rounded = np.sign(values) * np.floor(np.abs(values) + 0.5)
    return np.clip(rounded, 0, 255).astype(np.uint8)


def matlab_argmax(scores):
    """The 0-based index MATLAB's ``[~, i] = max(scores, [], 1)`` gives along axis 0:
    the first maximum of the non-NaN values, the first entry when all are NaN."""
    valid = ~np.isnan(scores)
    if valid.all():
        return scores.argmax(axis=0)
    best = np.where(valid, scores, -np.inf).max(axis=0)
    return (valid & (scores == best)).argmax(axis=0)


def read_label_map(path, what="prediction"):
    """A label map as MATLAB's ``imread`` gives it to MyVOCevalseg: the class indices
    of a palette PNG, the values of a gray one (16-bit ones in full: cv::imread's high
    byte would turn labels 0..255 into 0; 1-, 2- and 4-bit ones unscaled: 0/1 for a
    1-bit PNG, where decoders that widen to 8 bits give 0/255). A colour image is
    refused: it is no label map."""
    from PIL import Image
    try:
        with pixel_limit_lifted(), Image.open(path) as img:     # as read_label's
            img.load()
            if img.mode == "P":
                return np.asarray(img, dtype=np.uint8)
            if img.mode.startswith("I"):
                return np.asarray(img).astype(np.int64)
            if img.mode == "1":              # MATLAB: a logical image, 0 and 1
                return np.asarray(img, dtype=np.uint8)
            bits = _png_gray_bit_depth(path) if img.mode == "L" else None
            if bits:
                return (np.asarray(img, np.int64) * ((1 << bits) - 1) // 255).astype(np.uint8)
            mode = img.mode
    except OSError as e:
        raise EvalError(f"cannot read {what} '{path}': {e}") from None
    except Image.DecompressionBombError as e:
        raise EvalError(f"cannot read {what} '{path}': {pixel_limit_reason(e)}") from None
    if mode not in ("L", "LA", "1"):
        raise EvalError(f"{path}: a {mode} image is not a label map (write class indices "
                        f"as a gray or palette PNG)")
    return read_label(path)


def _png_gray_bit_depth(path):
    """The bit depth of a gray PNG stored with fewer than 8 bits per pixel, else None
    (read from its IHDR chunk: Pillow widens such samples to 0..255)."""
    with open(path, "rb") as f:
        header = png_depth_and_colour_type(f.read(26))
    if header is None:
        return None
    bits, colour_type = header
    return bits if colour_type == 0 and bits < 8 else None


def read_prediction(path):
    """A predicted label map (see ``read_label_map``), or the labels of the refine
    program's ``.bin`` (what DeepLab's GetDenseCRFResult.m turns into PNGs)."""
    if path.endswith(".bin"):
        from .crf.cli import CrfError, read_refine_bin
        try:
            return read_refine_bin(path)
        except CrfError as e:
            raise EvalError(str(e)) from None
    return read_label_map(path, "prediction")


def prediction_path(pred_dir, item_id):
    """``<pred>/<id>.png``, or ``<id>.bin`` where only the refine program's output is."""
    png = os.path.join(pred_dir, f"{item_id}.png")
    binary = os.path.join(pred_dir, f"{item_id}.bin")
    return binary if not os.path.isfile(png) and os.path.isfile(binary) else png


def write_label_png(path, label):
    """A palette PNG with the VOC colour map (what EvalSegResults' imwrite writes)."""
    from PIL import Image
    img = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8))
    img.putpalette(voc_palette())
    _save_atomically(img, path, "PNG")


def _save_atomically(img, path, image_format, **options):
    """A Pillow image written to a temporary name and renamed into place: an
    interrupted run never leaves a truncated file that looks finished."""
    import io
    buffer = io.BytesIO()
    img.save(buffer, format=image_format, **options)
    write_atomically(path, buffer.getvalue())


def write_overlay(path, image_path, label, alpha=0.5):
    """The image with non-background labels blended in their VOC colours."""
    from PIL import Image
    rgb = read_image(image_path)[:, :, ::-1].astype(np.float32)
    if rgb.shape[:2] != label.shape:
        raise EvalError(f"{image_path}: image of size {rgb.shape[0]}x{rgb.shape[1]} does "
                        f"not match the prediction ({label.shape[0]}x{label.shape[1]})")
    colours = np.asarray(voc_palette(), np.float32).reshape(256, 3)[label]
    mask = (label > 0)[:, :, None]
    out = np.where(mask, (1 - alpha) * rgb + alpha * colours, rgb)
    _save_atomically(Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8)), path,
                     "JPEG", quality=90)


# ------------------------------------------------------------------------ confusion
def accumulate_confusion(confusion, gt, pred, ignore_label=255, source=None,
                         gt_source=None):
    """Add one image to ``confusion`` (rows: ground truth, columns: prediction);
    ``source`` / ``gt_source`` name the prediction / ground-truth file in errors."""
    n = confusion.shape[0]
    where = f"{source}: " if source else ""
    gt_where = f"{gt_source}: " if gt_source else where
    # MyVOCevalseg checks the prediction's maximum over the whole image, before it
    # drops the pixels whose ground truth is the ignore label.
    pred = np.asarray(pred).astype(np.int64)
    if pred.size and (pred.max() >= n or pred.min() < 0):
        bad = int(pred.max() if pred.max() >= n else pred.min())
        raise EvalError(f"{where}predicted label {bad} is outside [0, {n})")
    keep = gt != ignore_label
    gt, pred = gt[keep].astype(np.int64), pred[keep]
    if gt.size and (gt.max() >= n or gt.min() < 0):
        bad = int(gt.max() if gt.max() >= n else gt.min())
        raise EvalError(f"{gt_where}ground-truth label {bad} is outside [0, {n}) and is not "
                        f"the ignore label {ignore_label}")
    confusion += np.bincount(gt * n + pred, minlength=n * n).reshape(n, n)
    return confusion


def _ratio_percent(num, den):
    """MATLAB's ``100 * num / den`` with a zero denominator set to 1 (MyVOCevalseg)."""
    return 100.0 * float(num) / float(den if den else 1)


def _mean_of_real(values, void):
    """MyVOCevalseg's means: the sum over every class divided by the number of classes
    that are not 'void'."""
    total = 0.0
    for v in values:
        total += v
    count = len(values) - int(np.count_nonzero(void))
    return total / count if count else math.nan


def scores_from_confusion(confusion, void=None):
    """The numbers MyVOCevalseg prints, from the raw confusion counts.

    Percent values (``*_percent``) are computed exactly like the MATLAB script; the
    plain keys are the same as fractions in [0, 1].  ``present`` marks the classes
    that occur in the ground truth or the prediction.  ``void`` marks classes named
    'void' (COCO's ids without a category): the means divide by the other classes.
    """
    m = np.asarray(confusion, dtype=np.int64)
    n = m.shape[0]
    void = np.zeros(n, bool) if void is None else np.asarray(void, bool)
    tp, gt_total, pred_total = np.diag(m), m.sum(axis=1), m.sum(axis=0)
    union = gt_total + pred_total - tp
    total = int(m.sum())
    iou_pct = [_ratio_percent(tp[j], union[j]) for j in range(n)]
    acc_pct = [_ratio_percent(tp[j], gt_total[j]) for j in range(n)]
    overall_pct = 100.0 * float(tp.sum()) / total if total else math.nan
    present = (gt_total + pred_total) > 0
    iou = np.array([float(tp[j]) / union[j] if union[j] else 0.0 for j in range(n)])
    scores = {
        "iou": iou,
        "class_accuracy": np.array([float(tp[j]) / gt_total[j] if gt_total[j] else 0.0
                                    for j in range(n)]),
        "present": present,
        "iou_percent": iou_pct,
        "class_accuracy_percent": acc_pct,
        "miou_percent": _mean_of_real(iou_pct, void),
        "mean_class_accuracy_percent": _mean_of_real(acc_pct, void),
        "void": void, "union": union,
        "pixel_accuracy_percent": overall_pct,
        "miou_present": float(iou[present & ~void].mean()) if (present & ~void).any()
        else 0.0,
        "gt_pixels": gt_total, "pred_pixels": pred_total, "tp": tp,
    }
    scores["miou"] = scores["miou_percent"] / 100.0
    scores["mean_class_accuracy"] = scores["mean_class_accuracy_percent"] / 100.0
    scores["pixel_accuracy"] = overall_pct / 100.0 if total else 0.0
    return scores


def _fmt(value):
    """MATLAB's ``%6.3f`` (NaN prints as ``   NaN``)."""
    return f"{value:6.3f}" if math.isfinite(value) else f"{'NaN':>6}"


def matlab_report(scores, names):
    """MyVOCevalseg's printout, line for line ('void' classes have no row; one whose
    union is not 0 or 1 pixel gets the script's warning instead)."""
    lines = [f"Percentage of pixels correctly labelled overall: "
             f"{_fmt(scores['pixel_accuracy_percent'])}%",
             "Accuracy for each class (pixel accuracy)"]
    lines += [f"  {name:>14}: {_fmt(v)}%"
              for name, v in zip(names, scores["class_accuracy_percent"]) if name != VOID]
    lines += ["-------------------------",
              f"Mean Class Accuracy: {_fmt(scores['mean_class_accuracy_percent'])}%",
              "Accuracy for each class (intersection/union measure)"]
    for name, v, union in zip(names, scores["iou_percent"], scores["union"]):
        if name != VOID:
            lines.append(f"  {name:>14}: {_fmt(v)}%")
        elif union > 1:
            lines.append(f"WARNING: this void class has denom = {union}")
    lines += ["-------------------------",
              f"Average accuracy: {_fmt(scores['miou_percent'])}%"]
    return "\n".join(lines)


def format_table(scores, class_names):
    """A compact per-class IoU table ('-' marks classes absent from GT and prediction,
    which count 0 in the mean as in MyVOCevalseg)."""
    present = scores.get("present", np.ones(len(scores["iou"]), bool))
    lines = [f"{'class':>14}  IoU (%)"]
    for name, value, here in zip(class_names, scores["iou"], present):
        lines.append(f"{name:>14}  " + (f"{100 * value:5.1f}" if here else "    -"))
    lines.append(f"{'mean IoU':>14}  {100 * scores['miou']:5.1f}")
    lines.append(f"{'pixel acc.':>14}  {100 * scores['pixel_accuracy']:5.1f}")
    lines.append(f"{'mean acc.':>14}  {100 * scores['mean_class_accuracy']:5.1f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ a whole set
class EvalResult:
    """Confusion counts of a set plus everything needed to report them."""

    def __init__(self, confusion, names, ignore_label=255, num_images=0, missing=()):
        self.confusion = np.asarray(confusion, np.int64)
        self.names = list(names)
        self.ignore_label = ignore_label
        self.num_images = num_images
        self.missing = list(missing)
        self.chart = None
        self.scores = scores_from_confusion(self.confusion,
                                            [name == VOID for name in self.names])

    @property
    def miou(self):
        return self.scores["miou"]

    def report(self):
        text = matlab_report(self.scores, self.names)
        if self.missing:
            text = f"WARNING: There are {len(self.missing)} missing results!\n" + text
        return text

    def to_json(self):
        s = self.scores
        rowsum = self.confusion.sum(axis=1, keepdims=True)

        def num(v):
            return float(v) if math.isfinite(v) else None
        return {
            "convention": "MyVOCevalseg: IoU = TP/(TP+FP+FN), 0 for a class absent from "
                          "both ground truth and prediction, summed over all classes and "
                          "divided by the number of classes not named 'void'",
            "num_labels": len(self.names), "ignore_label": self.ignore_label,
            "num_images": self.num_images, "missing": self.missing,
            "miou_percent": num(s["miou_percent"]),
            "pixel_accuracy_percent": num(s["pixel_accuracy_percent"]),
            "mean_class_accuracy_percent": num(s["mean_class_accuracy_percent"]),
            "miou_present_percent": 100.0 * s["miou_present"],
            "classes": [{"index": i, "name": name, "iou_percent": s["iou_percent"][i],
                         "accuracy_percent": s["class_accuracy_percent"][i],
                         "gt_pixels": int(s["gt_pixels"][i]),
                         "pred_pixels": int(s["pred_pixels"][i]), "tp": int(s["tp"][i]),
                         "present": bool(s["present"][i]), "void": bool(s["void"][i])}
                        for i, name in enumerate(self.names)],
            "confusion": self.confusion.tolist(),
            "confusion_percent": (100.0 * self.confusion / (1e-20 + rowsum)).tolist(),
        }

    @classmethod
    def from_json(cls, data):
        names = [c["name"] for c in data["classes"]]
        return cls(np.array(data["confusion"], np.int64), names, data["ignore_label"],
                   data["num_images"], data.get("missing", ()))

    def write_json(self, path):
        write_atomically(path, json.dumps(self.to_json(), indent=1).encode("utf-8"))


def evaluate(items, num_labels=21, feature_dir=None, pred_dir=None, ignore_label=255,
             names=None, pred_out_dir=None, vis_dir=None, skip_missing=False,
             argmax_done=False):
    """Evaluate ``items`` (``EvalItem``s) from MatWrite features (``feature_dir``,
    ``<id>_blob_0.mat``) or label PNGs (``pred_dir``, ``<id>.png``).

    ``pred_out_dir`` receives each prediction as a VOC-palette PNG; ``vis_dir`` the
    same plus ``<id>_overlay.jpg`` for items with an image and a bar chart
    ``iou.png`` (when matplotlib is installed).
    """
    if (feature_dir is None) == (pred_dir is None):
        raise EvalError("evaluate from either features or predictions (one of them)")
    names = names or class_names(num_labels)
    if len(names) != num_labels:
        raise EvalError(f"{len(names)} class names for {num_labels} labels")
    if num_labels > 256 and (feature_dir or pred_out_dir or vis_dir):
        raise EvalError(f"{num_labels} labels do not fit the 8-bit label PNGs that "
                        f"predictions are written as (at most 256)")
    for d in (pred_out_dir, vis_dir):
        if d:
            os.makedirs(d, exist_ok=True)
    confusion = np.zeros((num_labels, num_labels), np.int64)
    missing = []
    for item in items:
        if feature_dir is not None:
            source = os.path.join(feature_dir, f"{item.id}_blob_0.mat")
            kind = "features"
        else:
            source = prediction_path(pred_dir, item.id)
            kind = "prediction"
        if not os.path.isfile(source):
            if skip_missing:
                logger.warning("Fail to read %s", source)
                missing.append(item.id)
                continue
            raise EvalError(f"{kind} not found for '{item.id}': {source}")
        if not os.path.isfile(item.gt):
            raise EvalError(f"ground truth not found for '{item.id}': {item.gt}")
        gt = read_label_map(item.gt, "ground truth")
        if feature_dir is not None:
            pred = prediction_from_features(source, *gt.shape, num_labels=num_labels,
                                            argmax_done=argmax_done)
        else:
            pred = read_prediction(source)
            if pred.shape != gt.shape:
                raise EvalError(f"{source}: prediction is {pred.shape[0]}x{pred.shape[1]} "
                                f"but the ground truth {item.gt} is {gt.shape[0]}x"
                                f"{gt.shape[1]}")
        accumulate_confusion(confusion, gt, pred, ignore_label, source, gt_source=item.gt)
        if pred_out_dir:
            write_label_png(os.path.join(pred_out_dir, f"{item.id}.png"), pred)
        if vis_dir:
            write_label_png(os.path.join(vis_dir, f"{item.id}.png"), pred)
            if item.image:
                write_overlay(os.path.join(vis_dir, f"{item.id}_overlay.jpg"), item.image,
                              pred)
    if missing:
        logger.warning("WARNING: There are %d missing results!", len(missing))
    result = EvalResult(confusion, names, ignore_label, len(items) - len(missing), missing)
    if vis_dir:
        chart = os.path.join(vis_dir, "iou.png")
        result.chart = chart if plot_iou(result, chart) else None
    return result


def plot_iou(result, path):
    """A bar chart of per-class IoU at ``path``; without matplotlib (an optional
    extra) a one-line warning says so and it returns False."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no IoU bar chart (pip install "
                       "matplotlib to get %s)", path)
        return False
    s = result.scores
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(result.names)), 4))
    colours = np.asarray(voc_palette(), float).reshape(256, 3)[:len(result.names)] / 255
    ax.bar(range(len(result.names)), s["iou_percent"], color=colours, edgecolor="black")
    ax.axhline(s["miou_percent"], color="red", linestyle="--",
               label=f"mean IoU {s['miou_percent']:.2f}%")
    ax.set_xticks(range(len(result.names)))
    ax.set_xticklabels(result.names, rotation=60, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def items_from_dirs(ids, gt_dir, image_dir=None, gt_suffix=".png"):
    """``EvalItem``s with ``<gt_dir>/<id><gt_suffix>`` and, when ``image_dir`` is
    given, ``<image_dir>/<id>.jpg`` (or another image extension)."""
    return [EvalItem(i, os.path.join(gt_dir, i + gt_suffix),
                     find_image(image_dir, i) if image_dir else None) for i in ids]


def evaluate_features(feature_dir, gt_dir, ids, num_labels, ignore_label=255,
                      gt_suffix=".png"):
    """Confusion matrix of MatWrite features in ``feature_dir`` against the GT PNGs."""
    items = items_from_dirs(ids, gt_dir, gt_suffix=gt_suffix)
    return evaluate(items, num_labels, feature_dir=feature_dir,
                    ignore_label=ignore_label).confusion
