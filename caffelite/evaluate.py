"""Segmentation evaluation as the DeepLab kit's MATLAB scripts do it
(EvalSegResults / MyVOCevalseg): MatWrite features cropped to the image, argmax over
classes (first maximum), a confusion matrix over the whole set with ignore label
255, per-class IoU = TP / (TP + FP + FN), mean IoU, pixel and mean class accuracy."""
import os

import numpy as np

from .io.image import read_label
from .io.matfile import read_mat


class EvalError(ValueError):
    pass


def accumulate_confusion(confusion, gt, pred, ignore_label=255):
    n = confusion.shape[0]
    keep = gt != ignore_label
    gt, pred = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
    if gt.size and (gt.max() >= n or gt.min() < 0):
        raise EvalError(f"ground-truth label {int(gt.max())} is outside [0, {n})")
    confusion += np.bincount(gt * n + pred, minlength=n * n).reshape(n, n)
    return confusion


def prediction_from_features(path, height, width):
    """Argmax over classes of ``<id>_blob_0.mat`` cropped to the top-left image area."""
    scores, _ = read_mat(path)
    scores = scores[0]
    if scores.shape[1] < height or scores.shape[2] < width:
        raise EvalError(f"{path}: features of size {scores.shape[1]}x{scores.shape[2]} are "
                        f"smaller than the image ({height}x{width})")
    return scores[:, :height, :width].argmax(axis=0)


def evaluate_features(feature_dir, gt_dir, ids, num_labels, ignore_label=255,
                      gt_suffix=".png"):
    """Confusion matrix of MatWrite features in ``feature_dir`` against the GT PNGs."""
    confusion = np.zeros((num_labels, num_labels), np.int64)
    for name in ids:
        gt_path = os.path.join(gt_dir, name + gt_suffix)
        if not os.path.exists(gt_path):
            raise EvalError(f"ground truth not found for '{name}': {gt_path}")
        feature = os.path.join(feature_dir, f"{name}_blob_0.mat")
        if not os.path.exists(feature):
            raise EvalError(f"features not found for '{name}': {feature}")
        gt = read_label(gt_path)
        pred = prediction_from_features(feature, *gt.shape)
        accumulate_confusion(confusion, gt, pred, ignore_label)
    return confusion


def scores_from_confusion(confusion):
    """Per-class IoU (NaN for classes absent from GT and prediction), mIoU over the
    classes present, pixel accuracy and mean class accuracy."""
    m = confusion.astype(np.float64)
    tp = np.diag(m)
    gt_total, pred_total = m.sum(axis=1), m.sum(axis=0)
    union = gt_total + pred_total - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        class_acc = np.where(gt_total > 0, tp / gt_total, np.nan)
    return {
        "iou": iou,
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
        "pixel_accuracy": float(tp.sum() / m.sum()) if m.sum() else 0.0,
        "mean_class_accuracy": float(np.nanmean(class_acc)) if np.isfinite(class_acc).any()
        else 0.0,
    }


def format_table(scores, class_names):
    lines = [f"{'class':>14}  IoU (%)"]
    for name, value in zip(class_names, scores["iou"]):
        lines.append(f"{name:>14}  " + ("    -" if np.isnan(value) else f"{100 * value:5.1f}"))
    lines.append(f"{'mean IoU':>14}  {100 * scores['miou']:5.1f}")
    lines.append(f"{'pixel acc.':>14}  {100 * scores['pixel_accuracy']:5.1f}")
    lines.append(f"{'mean acc.':>14}  {100 * scores['mean_class_accuracy']:5.1f}")
    return "\n".join(lines)
