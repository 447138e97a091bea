"""Softmax and SoftmaxWithLoss (BVLC Caffe of 2016, as in the DeepLab v2 fork).

Both work on the bottom viewed as (outer, channels, inner) around the softmax axis;
the loss reads one integer label per (outer, inner) position.
"""
import numpy as np

from ..backend import get_array_module
from ..layer import Layer, LossLayer, register

# Caffe clamps probabilities at FLT_MIN before the log, in float and in double.
FLT_MIN = float(np.finfo(np.float32).tiny)

# LossParameter.NormalizationMode
FULL, VALID, BATCH_SIZE, NONE = 0, 1, 2, 3
_MODE_NAMES = {FULL: "FULL", VALID: "VALID", BATCH_SIZE: "BATCH_SIZE", NONE: "NONE"}


def split_axis(shape, axis):
    """(outer, channels, inner) counts of ``shape`` around ``axis``."""
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
    return outer, int(shape[axis]), inner


def softmax(xp, x3):
    """Max-subtracted softmax over axis 1 of an (outer, C, inner) array, in its dtype."""
    e = xp.exp(x3 - x3.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def canonical_axis(layer, blob, axis, what="axis"):
    try:
        return blob.canonical_axis(axis)
    except ValueError:
        raise layer.error(f"{what} {axis} is out of range for a bottom of shape {blob.shape}")


def loss_normalization(layer, default):
    """Caffe's choice of normalization: ``normalization`` if given, else legacy
    ``normalize`` (true -> VALID, false -> BATCH_SIZE), else ``default``."""
    p = layer.layer_param.loss_param
    if p.HasField("normalization"):
        return int(p.normalization)
    if p.HasField("normalize"):
        return VALID if p.normalize else BATCH_SIZE
    return default


def normalizer(mode, outer, inner, valid_count):
    """Caffe's get_normalizer, floored at 1 so an all-ignored batch gives loss 0."""
    if mode == FULL:
        n = outer * inner
    elif mode == VALID:
        n = valid_count
    elif mode == BATCH_SIZE:
        n = outer
    else:
        n = 1
    return max(1.0, float(n))


def integer_labels(xp, labels, ignore_label):
    """Labels truncated toward zero as C's static_cast<int>, and the non-ignored mask."""
    lab = labels.astype(np.int64)
    valid = (lab != ignore_label) if ignore_label is not None else xp.ones(lab.shape, bool)
    return lab, valid


def check_label_range(layer, xp, lab, valid, num_classes, where):
    """Refuse labels outside [0, num_classes) that are not ignore_label (Caffe only
    DCHECKs this and reads garbage memory in release builds)."""
    bad = valid & ((lab < 0) | (lab >= num_classes))
    if bool(bad.any()):
        first = int(lab[bad][0])
        n_bad = int(bad.sum())
        ignore = layer.ignore_label
        hint = ("no ignore_label is set" if ignore is None
                else f"ignore_label is {ignore}")
        raise layer.error(
            f"label value {first} is out of range: labels must be integers in "
            f"[0, {num_classes}) (the size of the {where}); {n_bad} label(s) are out of "
            f"range and {hint}")


@register("Softmax")
class SoftmaxLayer(Layer):
    """y = exp(x - max) / sum(exp(x - max)) along ``softmax_param.axis`` (default 1)."""
    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        self.axis_param = int(self.layer_param.softmax_param.axis)

    def reshape(self, bottom, top):
        self.axis = canonical_axis(self, bottom[0], self.axis_param, "softmax_param.axis")
        self.dims = split_axis(bottom[0].shape, self.axis)
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        top[0].data[...] = softmax(xp, bottom[0].data.reshape(self.dims)).reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        y = top[0].data.reshape(self.dims)
        dy = top[0].diff.reshape(self.dims)
        # dx = (dy - sum_c(dy * y)) * y; the temporaries make in-place safe.
        dx = (dy - (dy * y).sum(axis=1, keepdims=True)) * y
        bottom[0].diff[...] = dx.reshape(bottom[0].shape)


@register("SoftmaxWithLoss")
class SoftmaxWithLossLayer(LossLayer):
    """Multinomial logistic loss of the softmax of bottom[0] against integer labels.

    loss = sum over non-ignored positions of -log(max(p[label], FLT_MIN)) / normalizer.
    An optional second top receives the probabilities.
    """
    exact_num_bottom = 2
    min_bottom = None
    exact_num_top = None
    min_top = 1
    max_top = 2

    def setup(self, bottom, top):
        p = self.layer_param.loss_param
        self.ignore_label = int(p.ignore_label) if p.HasField("ignore_label") else None
        self.normalization = loss_normalization(self, VALID)
        if self.normalization not in _MODE_NAMES:
            raise self.error(f"unknown loss_param.normalization {self.normalization}")
        self.axis_param = int(self.layer_param.softmax_param.axis)

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        self.axis = canonical_axis(self, bottom[0], self.axis_param, "softmax_param.axis")
        self.dims = split_axis(bottom[0].shape, self.axis)
        outer, channels, inner = self.dims
        if outer * inner != bottom[1].count:
            raise self.error(
                f"number of labels must match number of predictions: scores {bottom[0].shape} "
                f"with softmax axis {self.axis} need {outer * inner} labels "
                f"(e.g. N*H*W for N x C x H x W scores), but the label blob {bottom[1].shape} "
                f"has {bottom[1].count}")
        if len(top) > 1:
            top[1].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        dtype = bottom[0].data.dtype.type
        outer, channels, inner = self.dims
        self.prob = softmax(xp, bottom[0].data.reshape(self.dims))
        lab, valid = integer_labels(xp, bottom[1].data.reshape(outer, inner), self.ignore_label)
        check_label_range(self, xp, lab, valid, channels,
                          f"softmax axis {self.axis} of the scores, {bottom[0].shape}")
        self.label = xp.where(valid, lab, 0)
        self.valid = valid
        p_true = xp.take_along_axis(self.prob, self.label[:, None, :], axis=1)[:, 0, :]
        nll = -xp.log(xp.maximum(p_true, dtype(FLT_MIN)))
        loss = xp.where(valid, nll, dtype(0)).sum(dtype=nll.dtype)
        self.norm = normalizer(self.normalization, outer, inner, int(valid.sum()))
        top[0].data[...] = loss / dtype(self.norm)
        if len(top) > 1:
            top[1].data[...] = self.prob.reshape(top[1].shape)

    def backward(self, top, propagate_down, bottom):
        if len(propagate_down) > 1 and propagate_down[1]:
            raise self.error("cannot backpropagate to the label input (bottom 1)")
        if not propagate_down[0]:
            return
        xp = get_array_module(self.prob)
        dtype = self.prob.dtype.type
        channels = self.dims[1]
        onehot = xp.arange(channels)[None, :, None] == self.label[:, None, :]
        d = (self.prob - onehot.astype(self.prob.dtype)) * self.valid[:, None, :]
        scale = dtype(top[0].diff.flat[0]) / dtype(self.norm)
        bottom[0].diff[...] = (d * scale).reshape(bottom[0].shape)
