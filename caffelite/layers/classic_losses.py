"""HingeLoss, InfogainLoss, MultinomialLogisticLoss and ContrastiveLoss, as the DeepLab v2
fork (BVLC Caffe of early 2016) has them.

All four read one item per ``num`` (bottom[0].shape[0]) and flatten the rest of bottom[0]
to ``dim`` values; labels are one per item (N x 1 x 1 x 1) and are truncated toward zero
as C's static_cast<int>.  Caffe reads out-of-range labels from stray memory; here they are
refused with the layer's name.  On the host, float data follow the fork's CPU arithmetic
(C's double log/sqrt inside an expression, the loss summed item by item into a float);
device arrays keep their dtype, as the fork's GPU code (or its CPU fallback) would.
"""
import numpy as np

from ..backend import get_array_module
from ..blob import legacy_shape
from ..layer import LossLayer, register
from ._cpu_math import caffe_sign, double, sequential_sum
from ._device import scalar
from .softmax import check_label_range, first_axis, truncated_labels

# Caffe's kLOG_THRESHOLD is a C float constant: a double layer clamps at float(1e-20).
LOG_THRESHOLD = float(np.float32(1e-20))

# HingeLossParameter.Norm
L1, L2 = 1, 2


def check_one_label_per_item(layer, blob, what="label"):
    """Caffe's CHECK that the labels are N x 1 x 1 x 1 (one per item)."""
    legacy = legacy_shape(blob.shape)
    if legacy is None or legacy[1:] != (1, 1, 1):
        raise layer.error(f"the {what} blob (bottom 1) must hold one value per item, "
                          f"N x 1 x 1 x 1; got shape {blob.shape}")


def item_labels(layer, xp, blob, num_classes, where):
    """bottom[1]'s labels as int64 (C's truncation), refused outside [0, num_classes)."""
    labels = blob.data.reshape(-1)
    lab, _ = truncated_labels(xp, labels)
    check_label_range(layer, xp, lab, xp.ones(lab.shape, bool), num_classes, where, labels,
                      num=first_axis(blob))
    return lab


def refuse_label_gradient(layer, propagate_down, what="label inputs (bottom 1)", index=1):
    if len(propagate_down) > index and propagate_down[index]:
        raise layer.error(f"{layer.type} cannot backpropagate to its {what}")


def loop_sum(xp, terms, dtype):
    """The fork's ``Dtype loss = 0; loss += term`` over ``terms`` in item order: on the
    host each (double) term is added into a float accumulator; on the device a plain sum
    in the dtype."""
    if xp is np:
        return sequential_sum(np.asarray(terms, np.float64).reshape(-1), dtype)
    return terms.sum(dtype=dtype)


class _ItemLoss(LossLayer):
    """Loss layers with one label per item: the labels' shape is checked, and no label
    is ever ignored (the fork's versions of these layers read no loss_param)."""
    ignore_label = None
    label_where = "dimension of bottom 0 per item"

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        check_one_label_per_item(self, bottom[1])
        self.num = int(bottom[0].shape[0])
        self.dim = bottom[0].count // self.num if self.num else 0

    def labels(self, xp, bottom):
        where = f"{self.label_where}, {self.dim} for a bottom of shape {bottom[0].shape}"
        return item_labels(self, xp, bottom[1], self.dim, where)


@register("HingeLoss")
class HingeLossLayer(_ItemLoss):
    """One-vs-all hinge loss: t_nk = +1 for the label's class, -1 otherwise;
    loss = sum_nk max(0, 1 - t_nk x_nk) / num (L1), or of its squares (L2).

    The gradient is sign(margin) * (-t) * loss_weight / num (L1), or
    2 * margin * (-t) * loss_weight / num (L2); a margin of exactly 0 gives 0.  As
    the fork's std::max(0, 1 - t x), a NaN score gives a margin, loss and gradient of 0.
    (The fork keeps the margins in bottom[0].diff between forward and backward; they
    are kept in the layer here.)  Labels must be one per item, which the fork does not
    check (it reads the first num label values).
    """
    exact_num_bottom = 2
    min_bottom = None

    def setup(self, bottom, top):
        self.norm = int(self.layer_param.hinge_loss_param.norm)
        if self.norm not in (L1, L2):
            raise self.error(f"unknown hinge_loss_param.norm {self.norm} (L1 or L2)")

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        dtype = bottom[0].data.dtype.type
        lab = self.labels(xp, bottom)
        self.rows, self.lab = xp.arange(self.num), lab
        signed = bottom[0].data.reshape(self.num, self.dim).copy()
        signed[self.rows, lab] = -signed[self.rows, lab]
        shifted = dtype(1) + signed
        # std::max(Dtype(0), v) is (0 < v) ? v : 0, so a NaN score gives a margin of 0.
        self.margin = xp.where(dtype(0) < shifted, shifted, dtype(0))
        m = self.margin
        loss = m.sum(dtype=m.dtype) if self.norm == L1 else (m * m).sum(dtype=m.dtype)
        top[0].data[...] = loss / dtype(self.num)

    def backward(self, top, propagate_down, bottom):
        refuse_label_gradient(self, propagate_down)
        if not propagate_down[0]:
            return
        dtype = bottom[0].data.dtype.type
        g = self.margin.copy()
        g[self.rows, self.lab] = -g[self.rows, self.lab]
        loss_weight = dtype(scalar(top[0].diff))
        if self.norm == L1:
            g = caffe_sign(g) * (loss_weight / dtype(self.num))
        else:
            g = g * (loss_weight * dtype(2) / dtype(self.num))
        bottom[0].diff[...] = g.reshape(bottom[0].shape)


@register("MultinomialLogisticLoss")
class MultinomialLogisticLossLayer(_ItemLoss):
    """loss = -sum_n log(max(p[n, label_n], 1e-20)) / num over probabilities p (no
    softmax); the gradient -loss_weight / num / max(p, 1e-20) at each label entry and 0
    elsewhere."""
    exact_num_bottom = 2
    min_bottom = None

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        dtype = bottom[0].data.dtype.type
        lab = self.labels(xp, bottom)
        prob = bottom[0].data.reshape(self.num, self.dim)[xp.arange(self.num), lab]
        prob = xp.maximum(prob, dtype(LOG_THRESHOLD))
        loss = loop_sum(xp, -xp.log(double(xp, prob)), prob.dtype)
        top[0].data[...] = loss / dtype(self.num)

    def backward(self, top, propagate_down, bottom):
        refuse_label_gradient(self, propagate_down)
        if not propagate_down[0]:
            return
        xp = get_array_module(bottom[0].data)
        dtype = bottom[0].data.dtype.type
        lab, rows = self.labels(xp, bottom), xp.arange(self.num)
        prob = bottom[0].data.reshape(self.num, self.dim)[rows, lab]
        scale = -dtype(scalar(top[0].diff)) / dtype(self.num)
        diff = xp.zeros((self.num, self.dim), dtype)
        diff[rows, lab] = scale / xp.maximum(prob, dtype(LOG_THRESHOLD))
        bottom[0].diff[...] = diff.reshape(bottom[0].shape)


@register("InfogainLoss")
class InfogainLossLayer(_ItemLoss):
    """The fork's InfogainLoss (BVLC before 2017): bottom[0] holds PROBABILITIES (no
    softmax inside), one item per num;
    loss = -sum_n sum_k H[label_n, k] log(max(p_nk, 1e-20)) / num, gradient
    -loss_weight / num * H[label_n, k] / max(p_nk, 1e-20) at every entry.

    H (dim x dim, dim = count / num) comes from ``infogain_loss_param.source`` (a
    binaryproto BlobProto of shape 1 x 1 x dim x dim, read once at setup) or from a
    third bottom of that shape; neither labels nor H get a gradient.  BVLC 1.0's
    ``infogain_loss_param.axis`` (and the softmax, ignore_label and normalization of its
    rewritten layer, which takes scores) are not the fork's and are refused.
    """
    max_bottom = 3

    def allow_force_backward(self, bottom_index):
        # Caffe's LossLayer rule (InfogainLossLayer does not override it): only the
        # labels are exempt, so force_backward with an H bottom reaches the FATAL
        # "cannot backpropagate to infogain inputs" in Backward_cpu.
        return bottom_index != 1

    def setup(self, bottom, top):
        p = self.layer_param.infogain_loss_param
        if p.HasField("axis"):
            raise self.error(
                "infogain_loss_param.axis belongs to BVLC 1.0's InfogainLoss, which "
                "applies a softmax to scores; the DeepLab v2 fork's InfogainLoss (used "
                "here) takes probabilities, one item per num, and has no axis field")
        self.infogain = None
        if len(bottom) < 3:
            if not p.HasField("source"):
                raise self.error("the infogain matrix source must be specified "
                                 "(infogain_loss_param.source) or given as bottom 2")
            self.infogain = self._read_matrix(p.source)

    def _read_matrix(self, path):
        from ..io import blobproto_to_array
        from ..proto import caffe_pb2
        try:
            with open(path, "rb") as f:
                blob = caffe_pb2.BlobProto.FromString(f.read())
        except OSError as e:
            raise self.error(f"cannot read the infogain matrix '{path}': "
                             f"{e.strerror}") from None
        except Exception as e:      # protobuf DecodeError
            raise self.error(f"infogain matrix '{path}' is not a BlobProto: {e}") from None
        try:
            return blobproto_to_array(blob).astype(self.dtype)
        except ValueError as e:     # its values do not fill its shape
            raise self.error(f"infogain matrix '{path}': {e}") from None

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        shape = bottom[2].shape if len(bottom) > 2 else self.infogain.shape
        where = "bottom 2" if len(bottom) > 2 else \
            f"'{self.layer_param.infogain_loss_param.source}'"
        if legacy_shape(shape) != (1, 1, self.dim, self.dim):
            raise self.error(
                f"the infogain matrix ({where}) must be 1 x 1 x {self.dim} x {self.dim} "
                f"(dim = count / num of bottom 0, shape {bottom[0].shape}); got shape "
                f"{tuple(shape)}")

    def _matrix(self, xp, bottom):
        if len(bottom) > 2:
            return bottom[2].data.reshape(self.dim, self.dim)
        h = self.infogain.reshape(self.dim, self.dim)
        if xp is np:
            return h
        if getattr(self, "_device_infogain", None) is None:
            self._device_infogain = xp.asarray(h)    # copied to the device once
        return self._device_infogain

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        dtype = bottom[0].data.dtype.type
        h_rows = self._matrix(xp, bottom)[self.labels(xp, bottom)]
        prob = xp.maximum(bottom[0].data.reshape(self.num, self.dim), dtype(LOG_THRESHOLD))
        terms = -(double(xp, h_rows) * xp.log(double(xp, prob)))
        loss = loop_sum(xp, terms, prob.dtype)
        top[0].data[...] = loss / dtype(self.num)

    def backward(self, top, propagate_down, bottom):
        refuse_label_gradient(self, propagate_down)
        refuse_label_gradient(self, propagate_down, "infogain matrix input (bottom 2)", 2)
        if not propagate_down[0]:
            return
        xp = get_array_module(bottom[0].data)
        dtype = bottom[0].data.dtype.type
        h_rows = self._matrix(xp, bottom)[self.labels(xp, bottom)]
        prob = xp.maximum(bottom[0].data.reshape(self.num, self.dim), dtype(LOG_THRESHOLD))
        scale = -dtype(scalar(top[0].diff)) / dtype(self.num)
        bottom[0].diff[...] = (scale * h_rows / prob).reshape(bottom[0].shape)


@register("ContrastiveLoss")
class ContrastiveLossLayer(LossLayer):
    """Siamese contrastive loss over features a, b (N x C x 1 x 1) and similarity y
    (N x 1 x 1 x 1): with d^2 = ||a_n - b_n||^2,
    loss = sum_n [similar: d^2; dissimilar: max(margin - d, 0)^2] / (2 N)
    (legacy_version: max(margin - d^2, 0) for dissimilar pairs).

    A pair is similar when static_cast<int>(y) != 0 (so 0.5 counts as dissimilar).
    The gradient of a dissimilar pair (non-legacy) is Caffe's
    -loss_weight / N * (margin - d) / (d + 1e-4) * (a - b) for a (the opposite for b),
    0 once d >= margin: the 1e-4 keeps d = 0 finite (its gradient is then 0) and makes
    the gradient a relative ~1e-4 / d off the loss's own.  Legacy dissimilar pairs get
    -loss_weight / N * (a - b) while margin > d^2, as the fork's CPU code computes (its
    CUDA kernel drops the (a - b) factor; the CPU gradient is used on every device).
    """
    exact_num_bottom = 3
    min_bottom = None

    def allow_force_backward(self, bottom_index):
        return bottom_index != 2

    def setup(self, bottom, top):
        p = self.layer_param.contrastive_loss_param
        self.margin = float(np.float32(p.margin))
        self.legacy = bool(p.legacy_version)

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        a, b = legacy_shape(bottom[0].shape), legacy_shape(bottom[1].shape)
        if a is None or b is None or a[2:] != (1, 1) or b[2:] != (1, 1) or a[1] != b[1]:
            raise self.error(f"the features (bottoms 0 and 1) must both be N x C x 1 x 1 "
                             f"with the same C; got {bottom[0].shape} and {bottom[1].shape}")
        y = legacy_shape(bottom[2].shape)
        if y is None or y[1:] != (1, 1, 1) or bottom[2].count != a[0]:
            raise self.error(f"the similarity blob (bottom 2) must be N x 1 x 1 x 1 with "
                             f"N = {a[0]}; got shape {bottom[2].shape}")
        self.num, self.channels = a[0], a[1]

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        dtype = bottom[0].data.dtype.type
        shape = (self.num, self.channels)
        self.diff = bottom[0].data.reshape(shape) - bottom[1].data.reshape(shape)
        self.dist_sq = (self.diff * self.diff).sum(axis=1, dtype=self.diff.dtype)
        sim, _ = truncated_labels(xp, bottom[2].data.reshape(-1))
        self.similar = sim != 0
        margin = dtype(self.margin)
        if self.legacy:
            dissimilar = xp.maximum(margin - self.dist_sq, dtype(0))
        else:
            # std::max<Dtype>(margin - sqrt(dist_sq), 0): C's double sqrt on the host
            gap = double(xp, margin) - xp.sqrt(double(xp, self.dist_sq))
            dist = xp.maximum(gap.astype(self.dist_sq.dtype, copy=False), dtype(0))
            dissimilar = dist * dist
        terms = xp.where(self.similar, self.dist_sq, dissimilar)
        loss = loop_sum(xp, terms, terms.dtype)
        top[0].data[...] = loss / dtype(self.num) / dtype(2)

    def backward(self, top, propagate_down, bottom):
        xp = get_array_module(self.diff)
        dtype = self.diff.dtype.type
        margin = dtype(self.margin)
        for i, sign in ((0, 1), (1, -1)):
            if not propagate_down[i]:
                continue
            alpha = dtype(sign) * dtype(scalar(top[0].diff)) / dtype(self.num)
            if self.legacy:
                mdist = margin - self.dist_sq
                beta = xp.full(mdist.shape, -alpha, dtype)
            else:
                dist = xp.sqrt(self.dist_sq)
                mdist = margin - dist
                beta = -alpha * mdist / (dist + dtype(1e-4))
            coeff = xp.where(self.similar, alpha, beta).astype(dtype, copy=False)
            grad = coeff[:, None] * self.diff
            zero = ~self.similar & ~(mdist > 0)       # caffe_set(0), whatever the diff
            grad = xp.where(zero[:, None], dtype(0), grad)
            bottom[i].diff[...] = grad.reshape(bottom[i].shape)
