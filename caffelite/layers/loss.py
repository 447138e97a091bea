"""SigmoidCrossEntropyLoss, EuclideanLoss and Accuracy (BVLC Caffe semantics as in the
DeepLab v2 fork, i.e. of early 2016)."""
import logging

import numpy as np

from ..backend import get_array_module
from ..layer import Layer, LossLayer, register
from ._cpu_math import double, sequential_sum
from ._device import scalar
from .softmax import (canonical_axis, check_label_range, first_axis, integer_labels,
                      split_axis)

logger = logging.getLogger("caffelite")


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLossLayer(LossLayer):
    """Cross-entropy of sigmoid(bottom[0]) against targets in [0, 1], as in the fork
    (BVLC of early 2016).

    Per element, in the overflow-free form Caffe uses:
    -[x (t - [x >= 0]) - log(1 + exp(x - 2 x [x >= 0]))], summed over EVERY element and
    divided by num (bottom[0].shape[0]); the gradient is (sigmoid(x) - t) *
    loss_weight / num.  The fork's layer reads no loss_param: ignore_label,
    normalization and normalize (which later BVLC versions honour) have no effect.
    """
    exact_num_bottom = 2
    min_bottom = None

    def setup(self, bottom, top):
        p = self.layer_param.loss_param
        unused = [f for f in ("ignore_label", "normalization", "normalize") if p.HasField(f)]
        if unused:
            logger.warning("layer '%s': SigmoidCrossEntropyLoss ignores loss_param.%s, as "
                           "the DeepLab v2 fork does (the loss is always divided by num)",
                           self.name, " and loss_param.".join(unused))

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[0].count != bottom[1].count:
            raise self.error(
                f"scores {bottom[0].shape} and targets {bottom[1].shape} must have the same "
                f"count ({bottom[0].count} vs {bottom[1].count})")

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        dtype = bottom[0].data.dtype.type
        x = bottom[0].data
        t = bottom[1].data.reshape(x.shape)
        pos = (x >= 0).astype(x.dtype)
        if xp is np:
            # The fork's loop: loss -= x * (t - pos) - log(1 + exp(x - 2 * x * pos)), the
            # float products first, then C's double log/exp, into a float accumulator.
            linear = double(xp, x * (t - pos))
            per_element = linear - np.log(1 + np.exp(double(xp, x - dtype(2) * x * pos)))
            loss = sequential_sum(-per_element.reshape(-1), x.dtype)
        else:
            per_element = x * (t - pos) - xp.log(dtype(1) + xp.exp(x - dtype(2) * x * pos))
            loss = -per_element.sum(dtype=x.dtype)
        top[0].data[...] = loss / dtype(bottom[0].shape[0])

    def backward(self, top, propagate_down, bottom):
        if len(propagate_down) > 1 and propagate_down[1]:
            raise self.error("cannot backpropagate to the target input (bottom 1)")
        if not propagate_down[0]:
            return
        xp = get_array_module(bottom[0].data)
        dtype = bottom[0].data.dtype.type
        x = bottom[0].data
        with np.errstate(over="ignore"):    # the fork's SigmoidLayer: 1. / (1. + exp(-x))
            sigmoid = (1 / (1 + xp.exp(-double(xp, x)))).astype(x.dtype, copy=False)
        d = sigmoid - bottom[1].data.reshape(x.shape)
        scale = dtype(scalar(top[0].diff)) / dtype(bottom[0].shape[0])
        bottom[0].diff[...] = d * scale


@register("EuclideanLoss")
class EuclideanLossLayer(LossLayer):
    """loss = sum((bottom[0] - bottom[1])^2) / (2 N); both bottoms get gradients."""
    exact_num_bottom = 2
    min_bottom = None

    def allow_force_backward(self, bottom_index):
        return True

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[0].count_range(1) != bottom[1].count_range(1):
            raise self.error(
                f"inputs must have the same dimension: {bottom[0].shape} vs {bottom[1].shape}")

    def forward(self, bottom, top):
        dtype = bottom[0].data.dtype.type
        self.diff = bottom[0].data - bottom[1].data.reshape(bottom[0].shape)
        dot = (self.diff * self.diff).sum(dtype=self.diff.dtype)
        top[0].data[...] = dot / dtype(bottom[0].shape[0]) / dtype(2)

    def backward(self, top, propagate_down, bottom):
        dtype = self.diff.dtype.type
        for i, sign in ((0, 1), (1, -1)):
            if propagate_down[i]:
                alpha = dtype(sign) * dtype(scalar(top[0].diff)) / dtype(bottom[i].shape[0])
                bottom[i].diff[...] = (alpha * self.diff).reshape(bottom[i].shape)


@register("Accuracy")
class AccuracyLayer(Layer):
    """Top-k classification accuracy over the ``accuracy_param.axis`` class axis.

    A label counts as correct when it is among the ``top_k`` highest scores under
    Caffe's ordering of (score, class index) pairs: ties rank the higher class index
    first (the fork's std::partial_sort with std::greater<pair>).  The optional second
    top holds per-class accuracy (0 for classes absent from the labels).  With every
    label ignored the accuracy is 0/0 = NaN, as in the fork. top_k 0 (the fork sets no
    lower bound) counts nothing as correct: accuracy 0.
    """
    runs_on_device = False
    exact_num_bottom = 2
    min_top = 1
    max_top = 2

    def setup(self, bottom, top):
        p = self.layer_param.accuracy_param
        self.top_k = int(p.top_k)
        self.ignore_label = int(p.ignore_label) if p.HasField("ignore_label") else None
        self.axis_param = int(p.axis)

    def reshape(self, bottom, top):
        if self.top_k > bottom[0].count // max(bottom[1].count, 1):
            raise self.error(
                f"top_k ({self.top_k}) must be less than or equal to the number of classes "
                f"(scores {bottom[0].shape}, labels {bottom[1].shape})")
        self.axis = canonical_axis(self, bottom[0], self.axis_param, "accuracy_param.axis")
        self.dims = split_axis(bottom[0].shape, self.axis)
        outer, channels, inner = self.dims
        if outer * inner != bottom[1].count:
            raise self.error(
                f"number of labels must match number of predictions: scores {bottom[0].shape} "
                f"with label axis {self.axis} need {outer * inner} labels, but the label blob "
                f"{bottom[1].shape} has {bottom[1].count}")
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape((channels,))

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        dtype = bottom[0].data.dtype.type
        outer, channels, inner = self.dims
        scores = bottom[0].data.reshape(self.dims)
        labels = bottom[1].data.reshape(outer, inner)
        lab, valid = integer_labels(xp, labels, self.ignore_label)
        check_label_range(self, xp, lab, valid, channels,
                          f"class axis {self.axis} of the scores, {bottom[0].shape}", labels,
                          num=first_axis(bottom[1]))
        lab = xp.where(valid, lab, 0)
        s_true = xp.take_along_axis(scores, lab[:, None, :], axis=1)
        k = xp.arange(channels)[None, :, None]
        ahead = (scores > s_true) | ((scores == s_true) & (k > lab[:, None, :]))
        hit = (ahead.sum(axis=1) < self.top_k) & valid
        count = dtype(int(valid.sum()))
        with np.errstate(invalid="ignore", divide="ignore"):
            top[0].data[...] = dtype(int(hit.sum())) / count
        if len(top) > 1:
            valid_labels = lab[valid]
            totals = xp.bincount(valid_labels, minlength=channels)
            hits = xp.bincount(lab[hit], minlength=channels)
            safe = xp.maximum(totals, 1).astype(scores.dtype)
            per_class = xp.where(totals == 0, dtype(0), hits.astype(scores.dtype) / safe)
            top[1].data[...] = per_class

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            raise self.error("Accuracy has no backward (it is not a loss)")
