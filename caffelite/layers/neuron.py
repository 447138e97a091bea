"""Element-wise neuron layers: one bottom, one top of the same shape.

Each follows BVLC Caffe's formulas and its order of float operations, including the
special cases Caffe takes (Power with scale or power 0, Exp/Log with base -1 = e).
In place, PReLU keeps a copy of its bottom data (Caffe's bottom_memory_), so its
gradients are those of an out-of-place run. Power, Log and BNLL keep none, as in Caffe:
their backwards are Caffe's sequences of operations on the bottom's diff, which in place
is also the top's diff, reading the bottom data, which in place is the top's. Their
in-place gradients are therefore Caffe's (not the derivative at the input).
"""
import logging
import zlib

import numpy as np

from .. import backend, host_threads
from ..backend import TRAIN, get_array_module, rng
from ..caffe_rng import rng_bernoulli
from ..filler import fill
from ..layer import NeuronLayer, register
from ..proto import caffe_pb2
from ._cpu_math import c_double, caffe_exp, caffe_log, caffe_powx, caffe_sign, double
from ._device import launch, on_device, reused

logger = logging.getLogger("caffelite")


class _SavesBottomInPlace(NeuronLayer):
    """Keeps the pre-activation bottom data when top is bottom (Caffe's bottom_memory_)."""
    _saved_bottom = None

    def save_bottom(self, bottom, top):
        self._saved_bottom = bottom[0].data.copy() if top[0] is bottom[0] else None

    def bottom_data(self, top, bottom):
        return self._saved_bottom if top[0] is bottom[0] else bottom[0].data


@register("ReLU")
class ReLULayer(NeuronLayer):
    """y = max(x, 0) + negative_slope * min(x, 0), the fork's CPU formula on the host
    (so slope 0 takes -inf to 0 * -inf = NaN) and its GPU one, x > 0 ? x : x * slope,
    on the device; dx = dy * ((x > 0) + slope * (x <= 0)) on both (0 * dy where x is
    NaN, NaN where dy is infinite and the factor 0)."""
    graph_safe = True

    def setup(self, bottom, top):
        self.negative_slope = self.layer_param.relu_param.negative_slope

    def forward(self, bottom, top):
        x, y = bottom[0].data, top[0].data
        xp = get_array_module(x)
        if on_device(xp):
            launch("relu", "relu_forward", x.dtype, x.size, x, self.negative_slope, y)
        else:
            host_threads.flat_map(self._host_forward, x, y)

    def _host_forward(self, x, y):
        if self.negative_slope == 0 and not _has_negative_infinity(x):
            # The formula's value without -inf (or NaN), decided part by part: where
            # both apply they give the same bits.
            np.maximum(x.dtype.type(0), x, out=y)
        else:
            _cpu_relu(x, x.dtype.type(self.negative_slope), y)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = get_array_module(top[0].diff)
        # In place, Caffe reads the top data here; its sign equals the bottom's for
        # any non-negative slope, so the gradient is the same.
        x = bottom[0].data
        dy = top[0].diff
        if on_device(xp):
            launch("relu", "relu_backward", dy.dtype, dy.size, x, dy, self.negative_slope,
                   bottom[0].diff)
            return
        with np.errstate(invalid="ignore"):
            host_threads.flat_map(
                lambda g, v, out: np.multiply(g, _relu_factor(v, self.negative_slope),
                                              out=out), dy, x, bottom[0].diff)


def _has_negative_infinity(x):
    """True also when x holds a NaN (min is then NaN): the caller takes the full path."""
    return x.size > 0 and not x.min() > -np.inf


def _cpu_relu(x, slope, out):
    """std::max(x, 0) + slope * std::min(x, 0) (``slope`` a scalar or, for PReLU, an
    array broadcast over x; ``out`` may be x). numpy's maximum(0, x) and minimum(0, x)
    return x on ties, as std::max(x, 0) and std::min(x, 0) do (-0 stays -0)."""
    zero = x.dtype.type(0)
    low = np.minimum(zero, x)
    with np.errstate(invalid="ignore"):
        low *= slope
    np.maximum(zero, x, out=out)
    out += low


def _relu_factor(x, slope):
    """(x > 0) + slope * (x <= 0) in x's dtype: 0 where x is NaN."""
    if slope == 0:
        return x > 0                  # multiplying by a bool array casts it to 1 or 0
    factor = np.multiply(x <= 0, x.dtype.type(slope), dtype=x.dtype)
    factor += x > 0
    return factor


@register("PReLU")
class PReLULayer(_SavesBottomInPlace):
    """y = max(x, 0) + a[c] * min(x, 0), learnable slopes a per channel (or one shared)."""
    graph_safe = True

    def setup(self, bottom, top):
        param = self.layer_param.prelu_param
        self._check_axes(bottom[0])
        channels = bottom[0].shape[1]
        self.channel_shared = param.channel_shared
        if not self.blobs_loaded():
            # Caffe makes a 0-axis blob for the shared slope; caffemodels store it so.
            blob = self.new_param_blob(() if self.channel_shared else (channels,))
            if param.HasField("filler"):
                fill(blob, param.filler)
            else:
                fill(blob, caffe_pb2.FillerParameter(type="constant", value=0.25))
        want = "channel_shared needs 1" if self.channel_shared else \
            f"the bottom has {channels} channels"
        if self.blobs[0].count != (1 if self.channel_shared else channels):
            raise self.error(f"negative slope blob has {self.blobs[0].count} values but {want}")

    def _check_axes(self, blob):
        if blob.num_axes < 2:
            raise self.error(
                f"the bottom blob needs at least 2 axes (N, C, ...), got shape {blob.shape}")
        if blob.num_axes > 4:
            raise self.error(
                f"the bottom blob has {blob.num_axes} axes, shape {blob.shape}; PReLU reads "
                f"its channels with Caffe's legacy accessors, which allow at most 4 axes")

    def reshape(self, bottom, top):
        self._check_axes(bottom[0])
        top[0].reshape(bottom[0].shape)

    def _slope(self, x):
        """Slopes broadcast against x (N, C, ...)."""
        slope = self.blobs[0].data.reshape(-1)
        if self.channel_shared:
            return slope.reshape((1,) * x.ndim)
        return slope.reshape((1, -1) + (1,) * (x.ndim - 2))

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        self.save_bottom(bottom, top)
        x = bottom[0].data
        if on_device(xp):           # the fork's kernel: x > 0 ? x : x * slope
            top[0].data[...] = xp.where(x > 0, x, x * self._slope(x))
            return
        _cpu_relu(x, self._slope(x), top[0].data)     # the fork's CPU formula

    def backward(self, top, propagate_down, bottom):
        x = self.bottom_data(top, bottom)
        dy = top[0].diff
        nonpositive = (x <= 0).astype(x.dtype)
        # Parameter gradient first: in place, writing the bottom diff changes dy.
        if self.param_propagate_down[0]:
            self._add_slope_diff(dy * x * nonpositive)
        if propagate_down[0]:
            positive = (x > 0).astype(x.dtype)
            bottom[0].diff[...] = dy * (positive + self._slope(x) * nonpositive)

    def _add_slope_diff(self, contrib):
        """Adds each channel's (or, shared, every) dy * x * (x <= 0) into the slope diff.
        The fork's CPU loop adds them one at a time in blob order, rounding every step
        to the dtype; the device sums them (the fork's GPU code takes a dot product)."""
        diff = self.blobs[0].diff
        if on_device(get_array_module(contrib)):
            axes = None if self.channel_shared else (0,) + tuple(range(2, contrib.ndim))
            diff[...] += contrib.sum(axis=axes).reshape(diff.shape)
            return
        if self.channel_shared:
            rows = contrib.reshape(1, -1)
        else:
            rows = np.moveaxis(contrib, 1, 0).reshape(contrib.shape[1], -1)
        # The existing diffs as the first column: accumulate adds along a row in order.
        terms = np.concatenate([diff.reshape(-1, 1), rows], axis=1)
        diff[...] = np.add.accumulate(terms, axis=1, dtype=diff.dtype)[:, -1].reshape(
            diff.shape)


@register("ELU")
class ELULayer(NeuronLayer):
    """y = x for x > 0, alpha * (exp(x) - 1) otherwise."""
    graph_safe = True

    def setup(self, bottom, top):
        self.alpha = self.layer_param.elu_param.alpha

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        x = double(xp, bottom[0].data)
        if on_device(xp):           # the fork's ELUForward kernel
            with np.errstate(over="ignore", invalid="ignore"):
                top[0].data[...] = xp.where(x > 0, x, self.alpha * (xp.exp(x) - 1))
            return
        # the fork's CPU: std::max(x, 0) + alpha * (exp(std::min(x, 0)) - 1); numpy's
        # maximum(0, x) and minimum(0, x) return x on ties, as std::max/min do (-0 stays -0)
        top[0].data[...] = xp.maximum(0, x) + self.alpha * (xp.exp(xp.minimum(0, x)) - 1)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        # Caffe reads the bottom (x > 0) and the top (y + alpha = alpha * exp(x));
        # in place the top's sign equals x's for alpha > 0.
        xp = get_array_module(top[0].diff)
        x = bottom[0].data
        dy = top[0].diff
        if on_device(xp):           # the fork's ELUBackward kernel
            bottom[0].diff[...] = xp.where(x > 0, dy, dy * (top[0].data + self.alpha))
            return
        # the fork's CPU: dy * ((x > 0) + (alpha + y) * (x <= 0)): NaN at x = +inf
        t = x.dtype.type
        with np.errstate(invalid="ignore"):
            bottom[0].diff[...] = dy * ((x > 0).astype(x.dtype) +
                                        (t(self.alpha) + top[0].data) *
                                        (x <= 0).astype(x.dtype))


@register("Sigmoid")
class SigmoidLayer(NeuronLayer):
    """y = 1 / (1 + exp(-x)); dy/dx = y (1 - y) from the top data. On the host both
    in double as the fork's ``1. / (1. + exp(-x))`` and ``dy * y * (1. - y)``."""
    graph_safe = True

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        x = double(xp, bottom[0].data)
        with np.errstate(over="ignore"):
            top[0].data[...] = 1 / (1 + xp.exp(-x))

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            xp = get_array_module(top[0].data)
            y = top[0].data
            bottom[0].diff[...] = double(xp, top[0].diff * y) * (1 - double(xp, y))


@register("TanH")
class TanHLayer(NeuronLayer):
    """y = tanh(x); dy/dx = 1 - y^2 from the top data."""
    graph_safe = True

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        top[0].data[...] = xp.tanh(double(xp, bottom[0].data))

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            y = top[0].data
            bottom[0].diff[...] = top[0].diff * (1 - y * y)


@register("Clip")
class ClipLayer(NeuronLayer):
    """BVLC's Clip (later BVLC master, not the fork): y = max(min, min(x, max)); the
    gradient passes where min <= x <= max.  A NaN becomes min on the host, as the
    C++ std::min/std::max order gives it, and max on the device (fminf/fmaxf)."""
    graph_safe = True

    def setup(self, bottom, top):
        p = self.layer_param.clip_param
        if not (p.HasField("min") and p.HasField("max")):
            raise self.error("clip_param needs both min and max")
        self.low, self.high = p.min, p.max

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        x = bottom[0].data
        t = x.dtype.type
        low, high = t(self.low), t(self.high)
        if on_device(xp):
            top[0].data[...] = xp.fmax(low, xp.fmin(x, high))
            return
        inner = xp.where(high < x, high, x)             # std::min(x, max)
        top[0].data[...] = xp.where(low < inner, inner, low)   # std::max(min, ...)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            x = bottom[0].data
            t = x.dtype.type
            inside = (x >= t(self.low)) & (x <= t(self.high))
            bottom[0].diff[...] = top[0].diff * inside.astype(x.dtype)


@register("Swish")
class SwishLayer(NeuronLayer):
    """BVLC's Swish (later BVLC master, not the fork): y = x * sigmoid(beta x), with
    that Caffe's sigmoid 0.5 tanh(0.5 z) + 0.5 (in double, one rounding);
    dx = dy (beta y + s (1 - beta y)), beta y in the float type and the rest in
    double, as its C++ evaluates it.  The device keeps float maths."""
    graph_safe = True

    def setup(self, bottom, top):
        self.beta = self.layer_param.swish_param.beta

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        x = bottom[0].data
        t = x.dtype.type
        z = x * t(self.beta)
        # kept between passes (the backward reads it; a CUDA graph replays into it)
        self.sigmoid = reused(getattr(self, "sigmoid", None), xp, x.shape, x.dtype)
        self.sigmoid[...] = 0.5 * xp.tanh(0.5 * double(xp, z)) + 0.5
        top[0].data[...] = x * self.sigmoid

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            xp = get_array_module(top[0].data)
            y = top[0].data
            beta_y = y * y.dtype.type(self.beta)
            s = double(xp, self.sigmoid)
            bottom[0].diff[...] = double(xp, top[0].diff) * (beta_y + s * (1 - beta_y))


@register("AbsVal")
class AbsValLayer(NeuronLayer):
    """y = |x|; dx = sign(x) * dy with Caffe's sign, (0 < x) - (x < 0): 0 at 0 and at
    NaN. Caffe refuses in-place computation."""
    graph_safe = True

    def reshape(self, bottom, top):
        if top[0] is bottom[0]:
            raise self.error("AbsVal does not allow in-place computation (top == bottom)")
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        top[0].data[...] = xp.abs(bottom[0].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            x = bottom[0].data
            with np.errstate(invalid="ignore"):
                get_array_module(x).multiply(caffe_sign(x), top[0].diff, out=bottom[0].diff)


@register("Power")
class PowerLayer(NeuronLayer):
    """y = (shift + scale * x) ^ power, with Caffe's special cases and gradient formulas."""
    graph_safe = True

    def setup(self, bottom, top):
        p = self.layer_param.power_param
        t = self.dtype.type
        self.power, self.scale, self.shift = t(p.power), t(p.scale), t(p.shift)
        self.diff_scale = t(self.power * self.scale)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        if self.diff_scale == 0:
            # The input is ignored: y = shift^power (1 when power is 0).
            value = 1 if self.power == 0 else \
                self.dtype.type(np.power(c_double(self.shift), c_double(self.power)))
            top[0].data[...] = value
            return
        y = self._shifted(bottom[0].data)
        if self.power != 1:
            with np.errstate(invalid="ignore", divide="ignore"):
                y = caffe_powx(xp, y, self.power)
        top[0].data[...] = y

    def _shifted(self, x):
        y = x
        if self.scale != 1:
            y = self.scale * y
        if self.shift != 0:
            y = y + self.shift
        return y if y is not x else x.copy()

    def backward(self, top, propagate_down, bottom):
        # dy/dx into the bottom diff, then times the top diff: in place the bottom diff
        # is the top diff and the bottom data the top data (see the module docstring).
        if not propagate_down[0]:
            return
        grad, x, t = bottom[0].diff, bottom[0].data, self.dtype.type
        with np.errstate(invalid="ignore", divide="ignore"):
            if self.diff_scale == 0 or self.power == 1:
                grad[...] = self.diff_scale
            elif self.power == 2:
                # dy/dx = diff_scale * scale * x + diff_scale * shift
                grad[...] = t(self.diff_scale * self.scale) * x
                if self.shift != 0:
                    grad += t(self.diff_scale * self.shift)
            elif self.shift == 0:
                # dy/dx = power * y / x   (Caffe's formula; 0/0 at x = 0 gives NaN as in Caffe)
                grad[...] = top[0].data / x
                grad *= self.power
            else:
                grad[...] = self._shifted(x)
                grad[...] = top[0].data / grad
                if self.diff_scale != 1:
                    grad *= self.diff_scale
        if self.diff_scale != 0:
            grad[...] = top[0].diff * grad


@register("Exp")
class ExpLayer(NeuronLayer):
    """y = base ^ (shift + scale * x), base -1 meaning e, with the fork's outer scale:
    pow(base, shift) with the base still -1 (BVLC fixed it in April 2016), so the
    default base with a shift gives pow(-1, shift) * e^(scale * x)."""
    graph_safe = True

    def setup(self, bottom, top):
        p = self.layer_param.exp_param
        t = self.dtype.type
        base = t(p.base)
        if base != -1 and not base > 0:
            raise self.error(
                f"exp_param.base must be strictly positive (or -1 for e), got {p.base}")
        log_base = t(1) if base == -1 else t(np.log(c_double(base)))
        self.inner_scale = t(log_base * t(p.scale))
        shift = t(p.shift)
        if shift == 0:
            self.outer_scale = t(1)
            return
        with np.errstate(invalid="ignore"):
            self.outer_scale = t(np.power(c_double(base), c_double(shift)))
        if base == -1:
            logger.warning(
                "layer '%s': Exp with the default base (-1, meaning e) and shift %g scales "
                "by pow(-1, shift) = %s, as the fork's ExpLayer does (a bug BVLC fixed "
                "later); set exp_param { base: 2.718281828 } for e^shift",
                self.name, shift, self.outer_scale)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        x = bottom[0].data
        with np.errstate(over="ignore"):
            scaled = x if self.inner_scale == 1 else self.inner_scale * x
            y = caffe_exp(xp, scaled)
            if self.outer_scale != 1:
                y = y * self.outer_scale
        top[0].data[...] = y

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        grad = top[0].data * top[0].diff
        if self.inner_scale != 1:
            grad = grad * self.inner_scale
        bottom[0].diff[...] = grad


@register("Log")
class LogLayer(NeuronLayer):
    """y = log_base(shift + scale * x), base -1 meaning e."""
    graph_safe = True

    def setup(self, bottom, top):
        p = self.layer_param.log_param
        t = self.dtype.type
        base = t(p.base)
        if base != -1 and (not base > 0 or base == 1):
            raise self.error(
                f"log_param.base must be positive and not 1 (or -1 for e), got {p.base}")
        log_base = t(1) if base == -1 else t(np.log(c_double(base)))
        self.base_scale = t(t(1) / log_base)
        self.input_scale, self.input_shift = t(p.scale), t(p.shift)
        self.backward_num_scale = t(self.input_scale / log_base)

    def _shifted(self, x):
        y = x
        if self.input_scale != 1:
            y = self.input_scale * y
        if self.input_shift != 0:
            y = y + self.input_shift
        return y

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        with np.errstate(invalid="ignore", divide="ignore"):
            y = caffe_log(xp, self._shifted(bottom[0].data))
        if self.base_scale != 1:
            y = y * self.base_scale
        top[0].data[...] = y

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        # As Caffe's: the bottom diff holds dy/dx before the product (in place, it is
        # also the top diff).
        grad = bottom[0].diff
        grad[...] = self._shifted(bottom[0].data)
        with np.errstate(invalid="ignore", divide="ignore"):
            grad[...] = 1 / grad
        if self.backward_num_scale != 1:
            grad *= self.backward_num_scale
        grad[...] = top[0].diff * grad


BNLL_THRESHOLD = 50.0


@register("BNLL")
class BNLLLayer(NeuronLayer):
    """y = log(1 + exp(x)) as Caffe writes it: x + log(1. + exp(-x)) for x > 0, else
    log(1. + exp(x)) (in double on the host); dy/dx = e / (e + 1), e = exp(min(x, 50))
    stored as Dtype (x is the bottom data: in place, Caffe reads the top's)."""
    graph_safe = True

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        x = double(xp, bottom[0].data)
        positive = x > 0
        with np.errstate(over="ignore"):
            top[0].data[...] = xp.where(positive, x, 0) + xp.log(
                1 + xp.exp(xp.where(positive, -x, x)))

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp = get_array_module(top[0].diff)
        x = bottom[0].data
        # std::min on the host propagates a NaN; the fork's GPU min is CUDA's fmin, which
        # gives the threshold for it (a gradient of about dy)
        clip = xp.fmin if on_device(xp) else xp.minimum
        e = xp.exp(double(xp, clip(x, x.dtype.type(BNLL_THRESHOLD)))).astype(x.dtype)
        bottom[0].diff[...] = double(xp, top[0].diff * e) / (double(xp, e) + 1)


@register("Threshold")
class ThresholdLayer(NeuronLayer):
    """y = 1 if x > threshold else 0. Not differentiable: Caffe has no backward."""
    graph_safe = True

    def setup(self, bottom, top):
        self.threshold = self.layer_param.threshold_param.threshold

    def forward(self, bottom, top):
        x = bottom[0].data
        top[0].data[...] = (x > self.threshold).astype(x.dtype)

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            raise self.error("Threshold has no backward pass (its gradient is not defined)")


def _masked_scale(xp, x, mask, scale, out):
    """out = (x * mask) * scale in two passes into ``out`` (which may be ``x``): no
    temporaries, the same float operations as the expression (0 * inf is NaN)."""
    with np.errstate(invalid="ignore"):
        xp.multiply(x, mask, out=out)
        xp.multiply(out, scale, out=out)


@register("Dropout")
class DropoutLayer(NeuronLayer):
    """Inverted dropout: TRAIN y = x * m / (1 - r), m ~ Bernoulli(1 - r); TEST identity.

    The mask: on the host Caffe's own draw, caffe_rng_bernoulli(count, 1. - threshold_)
    from the global mt19937, so a seeded CPU run drops the fork's units. On the device,
    as the fork's GPU mode draws from cuRAND, the two sides draw different masks: there
    ``dropout.cu`` draws from Philox4x64-10 (numpy's Philox) keyed by the seed of
    ``set_random_seed`` and the layer name, keeps a unit when the high 32 bits of its
    word exceed UINT_MAX * ratio (Caffe's GPU rule), and writes mask and output in one
    pass. The generator's counter lives in device memory and advances on the device, so
    a CUDA graph draws new masks at every launch (the layer is graph-safe).
    """
    graph_safe = True

    def setup(self, bottom, top):
        # The fork only DCHECKs the ratio: any is accepted here, and a TRAIN forward
        # refuses those that caffe_rng_bernoulli would (1 - ratio outside [0, 1]).
        # Ratio 1 keeps no unit and scales by 1 / 0 = inf: 0 * inf makes every output NaN.
        t = self.dtype.type
        self.ratio = float(t(self.layer_param.dropout_param.dropout_ratio))
        with np.errstate(divide="ignore"):
            self.scale = t(np.float64(1.0) / (np.float64(1.0) - self.ratio))
        # Caffe: uint_thres_ = static_cast<unsigned int>(UINT_MAX * threshold_), in Dtype
        uint_max = int(np.iinfo(np.uint32).max)
        threshold = t(uint_max) * t(self.ratio) if 0 <= self.ratio <= 1 else 0
        self.threshold = min(int(threshold), uint_max)
        self.mask = None
        self._generator = None          # (device state [key0, key1, ctr0, ctr1], stamp)

    def forward(self, bottom, top):
        x = bottom[0].data
        if self.phase != TRAIN:
            if top[0] is not bottom[0]:
                top[0].data[...] = x
            return
        if not 0 <= 1.0 - self.ratio <= 1:
            raise self.error(f"dropout_ratio {self.ratio} leaves a keep probability "
                             f"1 - ratio = {1.0 - self.ratio} outside [0, 1]: the fork's "
                             f"caffe_rng_bernoulli refuses it in a TRAIN forward")
        xp = get_array_module(x)
        if on_device(xp):
            self._forward_device(xp, x, top[0].data)
            return
        count = int(np.prod(x.shape, dtype=np.int64))
        # kept as booleans (a quarter of a float mask); x * mask multiplies by 1.0 or 0.0
        self.mask = rng_bernoulli(rng(), count, 1.0 - self.ratio).reshape(x.shape)
        _masked_scale(xp, x, self.mask, self.scale, top[0].data)

    def _forward_device(self, xp, x, y):
        mask = self.mask = reused(self.mask, xp, x.shape, x.dtype)
        state = self._device_generator(xp)
        blocks = -(-x.size // 4)            # one Philox call gives four units' words
        launch("dropout", "dropout_forward", x.dtype, blocks, x.size, x, state,
               self.threshold, self._device_scale(), mask, y)
        launch("dropout", "philox_advance", x.dtype, 1, state, blocks)

    def _device_generator(self, xp):
        """The Philox key and counter in device memory, (re)made when first used and
        after set_random_seed."""
        key, reseeds = backend.device_seed()
        stamp = (reseeds, key, xp.__name__)
        if self._generator is None or self._generator[1] != stamp:
            name_key = zlib.crc32(self.name.encode())
            state = np.array([key, name_key, 0, 0], np.uint64)
            self._generator = (xp.asarray(state), stamp)
        return self._generator[0]

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if self.phase != TRAIN:
            if top[0] is not bottom[0]:
                bottom[0].diff[...] = top[0].diff
            return
        dy = top[0].diff
        xp = get_array_module(dy)
        if not on_device(xp):
            _masked_scale(xp, dy, self.mask, self.scale, bottom[0].diff)
            return
        # the fork's DropoutBackward kernel: (dy * scale) * mask
        with np.errstate(invalid="ignore"):
            xp.multiply(dy, self._device_scale(), out=bottom[0].diff)
            xp.multiply(bottom[0].diff, self.mask, out=bottom[0].diff)

    def _device_scale(self):
        """The scale as the fork's CUDA kernels take it: a float parameter, whatever
        the net's dtype."""
        return self.dtype.type(np.float32(self.scale))
