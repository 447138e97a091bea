"""Softmax and SoftmaxWithLoss (BVLC Caffe of 2016, as in the DeepLab v2 fork).

Both work on the bottom viewed as (outer, channels, inner) around the softmax axis;
the loss reads one integer label per (outer, inner) position.  A SoftmaxWithLoss
layer with ``softmaxloss_param`` (what DeepLab v1's V1 ``SOFTMAX_LOSS`` layers carry
after the upgrade) follows DeepLab v1's loss instead: see ``_V1Loss``.

On the device, Softmax and SoftmaxWithLoss run the ``softmax_loss.cu`` kernels (one
thread per (outer, inner) position, channels in order, like the host's reductions): the
only differences from the host are the C library's expf/logf (a few ulp).  The v1 loss
stays array code on both sides.
"""
import math

import numpy as np

from .. import backend
from ..backend import get_array_module, to_host
from ..layer import Layer, LossLayer, register
from ..log import logger
from ._cpu_math import caffe_exp, double, sequential_sum
from ._device import contiguous, launch, on_device, reused, scalar

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
    """Max-subtracted softmax over axis 1 of an (outer, C, inner) array, in its dtype;
    on the host the exp is C's (caffe_exp: double exp, stored as Dtype)."""
    e = caffe_exp(xp, x3 - x3.max(axis=1, keepdims=True))
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


def truncated_labels(xp, labels):
    """(labels truncated toward zero as C's static_cast<int>, int64; the mask of those
    that have an int value). NaN, inf and values beyond int (undefined for static_cast)
    become -1 and are masked out: callers treat them as bad labels, never as ignored
    ones, as the kernels do."""
    integer = (labels >= -2.0 ** 31) & (labels < 2.0 ** 31)
    return xp.where(integer, labels, -1).astype(np.int64), integer


def label_text(value):
    """A stored label value for a message: 3, nan, -inf, 2.5."""
    value = float(value)
    return str(int(value)) if np.isfinite(value) and value == int(value) else str(value)


def integer_labels(xp, labels, ignore_label):
    """Labels truncated (truncated_labels) and the non-ignored mask; labels without an
    int value are never ignored, so check_label_range refuses them."""
    lab, integer = truncated_labels(xp, labels)
    if ignore_label is None:
        return lab, xp.ones(lab.shape, bool)
    return lab, (lab != ignore_label) | ~integer


def check_label_range(layer, xp, lab, valid, num_classes, where, labels=None, num=None):
    """Refuse labels outside [0, num_classes) that are not ignore_label (Caffe only
    DCHECKs this and reads garbage memory in release builds). ``labels``: the stored
    values ``lab`` came from, for the message (NaN shows as nan); ``num``: the label
    blob's first axis, whose item holding the first bad label the error carries as
    ``batch_item`` (the Net names the list line it came from)."""
    bad = valid & ((lab < 0) | (lab >= num_classes))
    if bool(bad.any()):
        shown = label_text((labels if labels is not None else lab)[bad][0])
        n_bad = int(bad.sum())
        ignore = layer.ignore_label
        hint = ("no ignore_label is set" if ignore is None
                else f"ignore_label is {ignore}")
        error = layer.error(
            f"label value {shown} is out of range: labels must be integers in "
            f"[0, {num_classes}) (the size of the {where}); {n_bad} label(s) are out of "
            f"range and {hint}")
        if num and bad.size % num == 0:
            # labels are the label blob reshaped in C order: item n holds a block
            error.batch_item = int(xp.argmax(bad.ravel())) // (bad.size // num)
        raise error


def first_axis(blob):
    """The length of ``blob``'s first axis (its batch), None for a scalar blob."""
    return blob.shape[0] if blob.shape else None


@register("Softmax")
class SoftmaxLayer(Layer):
    """y = exp(x - max) / sum(exp(x - max)) along ``softmax_param.axis`` (default 1)."""
    graph_safe = True
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
        if on_device(xp):
            x = contiguous(xp, bottom[0].data)
            outer, channels, inner = self.dims
            launch("softmax_loss", "softmax_forward", x.dtype, outer * inner, x, channels,
                   inner, top[0].data)
            return
        top[0].data[...] = softmax(xp, bottom[0].data.reshape(self.dims)).reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = get_array_module(top[0].diff)
        if on_device(xp):
            outer, channels, inner = self.dims
            diff = bottom[0].diff
            launch("softmax_loss", "softmax_backward", diff.dtype, outer * inner,
                   contiguous(xp, top[0].data), contiguous(xp, top[0].diff), channels, inner,
                   diff)
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

    @property
    def graph_safe(self):
        return self.v1 is None      # v1's loss reads its weight sum on the host

    def setup(self, bottom, top):
        # The fork's LayerSetUp makes its internal Softmax through the layer factory,
        # which logs it under this layer's name.
        logger.info("Creating layer %s", self.layer_param.name)
        p = self.layer_param.loss_param
        self.v1 = _V1Loss(self, bottom) if self.layer_param.HasField("softmaxloss_param") \
            else None
        if len(top) == 2 and self.v1 is None:
            # Caffe (the fork and BVLC alike, BVLC issue #2968): LossLayer::LayerSetUp adds
            # one loss_weight, so SetLossWeights fails "loss_weight must be unspecified or
            # specified once per top blob" (2 vs. 1); with two loss_weight values the
            # internal Softmax (one top) inherits both and fails (1 vs. 2).
            raise self.error("SoftmaxWithLoss with a second (probability) top cannot be "
                             "built in Caffe (loss_weight must be specified once per top "
                             "blob); add a separate Softmax layer for the probabilities")
        self.ignore_label = int(p.ignore_label) if p.HasField("ignore_label") else None
        self.normalization = loss_normalization(self, VALID)
        if self.normalization not in _MODE_NAMES:
            raise self.error(f"unknown loss_param.normalization {self.normalization}")
        self.axis_param = int(self.layer_param.softmax_param.axis)
        self.prob = None

    def reshape(self, bottom, top):
        if self.v1 is not None:
            return self.v1.reshape(bottom, top)
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
        if self.v1 is not None:
            return self.v1.forward(bottom, top)
        xp = get_array_module(bottom[0].data)
        if on_device(xp):
            return self._forward_device(xp, bottom, top)
        dtype = bottom[0].data.dtype.type
        outer, _, inner = self.dims
        self.prob = softmax(xp, bottom[0].data.reshape(self.dims))
        lab, valid = self._checked_labels(xp, bottom)
        label = xp.where(valid, lab, 0)
        p_true = xp.take_along_axis(self.prob, label[:, None, :], axis=1)[:, 0, :]
        # Caffe: for each position in order, loss -= log(max(p, FLT_MIN)) -- a double
        # log subtracted in double from the float accumulator.
        nll = -np.log(double(xp, xp.maximum(p_true[valid], dtype(FLT_MIN))))
        loss = sequential_sum(nll, dtype)
        norm = normalizer(self.normalization, outer, inner, int(valid.sum()))
        top[0].data[...] = loss / dtype(norm)
        if len(top) > 1:
            top[1].data[...] = self.prob.reshape(top[1].shape)

    def _forward_device(self, xp, bottom, top):
        """softmax_forward into ``self.prob``, per-position losses and counts, then
        their sums (one device-to-host copy, like Caffe's asum)."""
        x = contiguous(xp, bottom[0].data)
        dtype = x.dtype.type
        outer, channels, inner = self.dims
        self.prob = reused(self.prob, xp, self.dims, x.dtype)
        launch("softmax_loss", "softmax_forward", x.dtype, outer * inner, x, channels, inner,
               self.prob)
        labels = contiguous(xp, bottom[1].data)
        loss = xp.empty((outer, inner), x.dtype)
        counts = xp.empty((outer, inner), x.dtype)
        launch("softmax_loss", "softmax_loss_forward", x.dtype, outer * inner, self.prob,
               labels, channels, inner, *self._ignore_args(), loss, counts)
        total = loss.sum(dtype=x.dtype)
        valid_count = counts.sum(dtype=xp.float64)                          # counts: 0/1
        if not backend.capturing():
            # An out-of-range label makes its position NaN: name it like the host does.
            # (A CUDA graph leaves this read out; check_recorded_inputs does it then.)
            if np.isnan(float(to_host(total))):
                self.check_recorded_inputs(bottom)
        # The normaliser stays on the device (the backward kernel reads it there).
        if self.normalization == VALID:
            self.norm = xp.maximum(valid_count, 1.0).astype(dtype)
        else:
            self.norm = xp.full((), normalizer(self.normalization, outer, inner, 0), dtype)
        top[0].data[...] = total / self.norm
        if len(top) > 1:
            top[1].data[...] = self.prob.reshape(top[1].shape)

    def check_recorded_inputs(self, bottom):
        if self.v1 is None:
            self._checked_labels(get_array_module(bottom[1].data), bottom)

    def _checked_labels(self, xp, bottom):
        """(truncated labels, not ignored), or the error naming an out-of-range one."""
        outer, channels, inner = self.dims
        labels = bottom[1].data.reshape(outer, inner)
        lab, valid = integer_labels(xp, labels, self.ignore_label)
        check_label_range(self, xp, lab, valid, channels,
                          f"softmax axis {self.axis} of the scores, {bottom[0].shape}", labels,
                          num=first_axis(bottom[1]))
        return lab, valid

    def _ignore_args(self):
        """softmax_loss.cu's (has_ignore_label, ignore_label)."""
        if self.ignore_label is None:
            return 0, 0
        return 1, self.ignore_label

    def backward(self, top, propagate_down, bottom):
        if self.v1 is not None:
            return self.v1.backward(top, propagate_down, bottom)
        if len(propagate_down) > 1 and propagate_down[1]:
            raise self.error("cannot backpropagate to the label input (bottom 1)")
        if not propagate_down[0]:
            return
        # As Caffe's Backward, the labels (and with them the VALID normaliser) are read
        # again here, not kept from the forward.
        xp = get_array_module(self.prob)
        dtype = self.prob.dtype.type
        outer, channels, inner = self.dims
        labels = contiguous(xp, bottom[1].data)
        if on_device(xp):
            norm = self.norm
            if self.normalization == VALID and self.ignore_label is not None:
                _, valid = integer_labels(xp, labels.reshape(outer, inner), self.ignore_label)
                norm = xp.maximum(valid.sum(dtype=xp.float64), 1.0).astype(dtype)
            launch("softmax_loss", "softmax_loss_backward", self.prob.dtype, outer * inner,
                   self.prob, labels, channels, inner, *self._ignore_args(),
                   contiguous(xp, top[0].diff), norm, bottom[0].diff)
            return
        lab, valid = integer_labels(xp, labels.reshape(outer, inner), self.ignore_label)
        norm = normalizer(self.normalization, outer, inner, int(valid.sum()))
        scale = dtype(scalar(top[0].diff)) / dtype(norm)
        onehot = xp.arange(channels)[None, :, None] == lab[:, None, :]
        # ignored positions are set to 0, then everything is scaled (caffe_scal)
        d = xp.where(valid[:, None, :], self.prob - onehot.astype(self.prob.dtype), dtype(0))
        with np.errstate(invalid="ignore"):
            bottom[0].diff[...] = (d * scale).reshape(bottom[0].shape)


class _V1Loss:
    """DeepLab v1's softmax loss (spec deeplab_extra_layers.md 4.2), selected by
    ``softmaxloss_param`` on a SoftmaxWithLoss layer.

    * softmax over the channels (axis 1); label of (n, j) read at n * H*W + j of the
      label blob (only its num is checked against the scores');
    * ignore set = every ``softmaxloss_param.ignore_label`` (and
      ``loss_param.ignore_label`` if set); other labels outside [0, C) are an error;
    * optional per-class weights w from ``weight_source`` (whitespace-separated,
      non-negative, one per channel; all 1 without it);
    * loss = sum_valid w_l (-log max(p_l, FLT_MIN)) / W with W = sum_valid w_l, so a
      batch with every pixel ignored gives NaN (0/0), as in v1; on the host both sums
      are v1's loop (C's double log, a Dtype accumulator, pixel by pixel);
    * backward writes w_l (p_c - [c = l]) at valid positions only, then scales the
      WHOLE bottom diff by loss_weight / W: ignored positions keep (a rescaled copy
      of) whatever the previous backward left there;
    * a backward request for the labels is silently ignored (v1 nets feed ArgMax
      outputs as labels, e.g. the EM-Adapt net).
    """

    def __init__(self, layer, bottom):
        self.layer = layer
        lp = layer.layer_param
        p = lp.softmaxloss_param
        if lp.loss_param.HasField("normalization") or lp.loss_param.HasField("normalize"):
            raise layer.error("softmaxloss_param (DeepLab v1's loss) normalises by the summed "
                              "class weights of the valid pixels; loss_param.normalization / "
                              "normalize cannot be combined with it")
        if int(lp.softmax_param.axis) != 1:
            raise layer.error("softmaxloss_param (DeepLab v1's loss) works over the channels; "
                              "softmax_param.axis must be 1")
        self.ignore = {int(v) for v in p.ignore_label}
        if lp.loss_param.HasField("ignore_label"):
            self.ignore.add(int(lp.loss_param.ignore_label))
        channels = bottom[0].shape[1] if bottom[0].num_axes > 1 else 1
        self.class_weights = self._read_weights(p.weight_source, channels) \
            if p.HasField("weight_source") else None

    def _read_weights(self, path, channels):
        try:
            with open(path, "rb") as f:
                tokens = f.read().split()
        except OSError as e:
            raise self.layer.error(f"cannot open softmaxloss_param.weight_source '{path}': "
                                   f"{e.strerror}") from None
        try:
            weights = [float(t) for t in tokens]
        except ValueError:
            raise self.layer.error(f"softmaxloss_param.weight_source '{path}' must hold "
                                   f"whitespace-separated numbers (a text file; not "
                                   f"UTF-16)") from None
        if not all(0 <= w < math.inf for w in weights):
            raise self.layer.error(f"class weights must be finite and not negative "
                                   f"(weight_source '{path}')")
        if len(weights) != channels:
            raise self.layer.error(f"weight_source '{path}' has {len(weights)} class weights "
                                   f"but the scores have {channels} channels")
        return weights

    def reshape(self, bottom, top):
        scores, labels = bottom[0], bottom[1]
        if scores.num_axes < 2:
            raise self.layer.error(f"the scores must be N x C x ..., got {scores.shape}")
        if scores.shape[0] != labels.shape[0]:
            raise self.layer.error(f"bottoms must have the same num: {scores.shape} vs "
                                   f"{labels.shape}")
        n, c = scores.shape[:2]
        inner = scores.count // max(n * c, 1)
        if labels.count < n * inner:
            raise self.layer.error(f"the label blob {labels.shape} holds {labels.count} "
                                   f"values, fewer than the {n * inner} positions of the "
                                   f"scores {scores.shape}")
        self.dims = (n, c, inner)
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape(scores.shape)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        dtype = bottom[0].data.dtype
        n, c, inner = self.dims
        self.prob = softmax(xp, bottom[0].data.reshape(self.dims))
        lab, valid, bad = self._labels(xp, bottom[1])
        if bool(bad.any()):
            raise self.layer.error(
                f"unexpected label {int(lab[bad][0])}: labels must be in [0, {c}) or one of "
                f"the ignore labels {sorted(self.ignore)}")
        label, w = self._weights(xp, lab, valid, dtype)
        p_true = xp.take_along_axis(self.prob, label[:, None, :], axis=1)[:, 0, :]
        clamped = xp.maximum(p_true, dtype.type(FLT_MIN))
        if xp is np:
            # v1's loop: loss -= w * log(max(p, FLT_MIN)) with C's double log, pixel by
            # pixel into a Dtype accumulator.
            terms = w[valid].astype(np.float64) * np.log(clamped[valid].astype(np.float64))
            loss = sequential_sum(-terms, dtype)
        else:
            loss = xp.where(valid, -w * xp.log(clamped), dtype.type(0)).sum(dtype=dtype)
        with np.errstate(invalid="ignore", divide="ignore"):
            top[0].data[...] = loss / self._total_weight(xp, w, valid, dtype)
        if len(top) > 1:
            top[1].data[...] = self.prob.reshape(top[1].shape)

    def backward(self, top, propagate_down, bottom):
        """v1's Backward_cpu reads the labels again (an out-of-range one is logged and
        its position left unwritten) and sums the batch weight again."""
        if not propagate_down[0]:
            return
        xp = get_array_module(self.prob)
        dtype = self.prob.dtype
        n, c, inner = self.dims
        lab, valid, bad = self._labels(xp, bottom[1])
        if bool(bad.any()):
            logger.error("Unexpected label.")
            valid = valid & ~bad
        label, w = self._weights(xp, lab, valid, dtype)
        diff = bottom[0].diff.reshape(self.dims)
        d = w[:, None, :] * self.prob
        onehot = xp.arange(c)[None, :, None] == label[:, None, :]
        d = d - xp.where(onehot, w[:, None, :], dtype.type(0))
        diff[...] = xp.where(valid[:, None, :], d, diff)
        with np.errstate(invalid="ignore", divide="ignore"):
            diff *= dtype.type(scalar(top[0].diff)) / self._total_weight(xp, w, valid, dtype)

    def _labels(self, xp, labels):
        """(int labels, not ignored, not ignored but outside [0, C)) of the n*H*W first
        values of the label blob."""
        n, c, inner = self.dims
        lab = labels.data.reshape(-1)[:n * inner].reshape(n, inner).astype(np.int64)
        valid = xp.ones(lab.shape, bool)
        for v in self.ignore:
            valid &= lab != v
        return lab, valid, valid & ((lab < 0) | (lab >= c))

    def _weights(self, xp, lab, valid, dtype):
        """(labels with 0 at invalid positions, each position's class weight or 0)."""
        label = xp.where(valid, lab, 0)
        if self.class_weights is None:
            return label, valid.astype(dtype)
        table = xp.asarray(self.class_weights, dtype)
        return label, xp.where(valid, table[label], dtype.type(0))

    @staticmethod
    def _total_weight(xp, w, valid, dtype):
        """v1's batch_weight: the valid positions' weights summed into a Dtype, in order
        on the host."""
        if xp is np:
            return sequential_sum(w[valid].astype(np.float64), dtype)
        return w.sum(dtype=dtype)
