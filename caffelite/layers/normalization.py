"""BatchNorm (upstream BVLC, as in the DeepLab v2 fork), Scale, Bias and MVN."""
import math

import numpy as np

from .. import host_threads
from ..backend import TEST, get_array_module
from ..blob import legacy_shape
from ..filler import fill
from ..layer import Layer, NeuronLayer, register
from ..log import logger
from ._device import launch, on_device, reused
from .im2col import view


def _prod(dims):
    return math.prod(int(d) for d in dims)


@register("BatchNorm")
class BatchNormLayer(NeuronLayer):
    """Per-channel normalisation, no affine part (that is the following Scale layer).

    blobs: [0] running-mean sum (C,), [1] running-variance sum (C,), [2] scale factor
    (1,); the stored statistics are ``blob / blobs[2]`` (0 when blobs[2] is 0).  With
    ``use_global_stats`` (default: phase == TEST) the stored statistics are used;
    otherwise the batch mean and biased variance over N and the spatial axes, and the
    running sums are updated (variance with the m/(m-1) correction, m = N*H*W).
    The blobs are statistics, never learned: their diffs are not computed.
    """
    graph_safe = True

    def setup(self, bottom, top):
        p = self.layer_param.batch_norm_param
        self.use_global_stats = (bool(p.use_global_stats) if p.HasField("use_global_stats")
                                 else self.phase == TEST)
        self.moving_average_fraction = float(p.moving_average_fraction)
        self.eps = float(p.eps)
        self._stats_buffer = None       # device mean and std vectors (stored statistics)
        if p.HasField("update_global_stats") and p.update_global_stats:
            raise self.error(
                "batch_norm_param.update_global_stats is a field of the official DeepLab-v2 "
                "BatchNorm only; the fork (upstream BVLC BatchNorm) does not have it. Remove "
                "it, or set use_global_stats: false to normalise with and update batch "
                "statistics")
        self._check_axes(bottom)
        self.channels = bottom[0].shape[1]
        for i, spec in enumerate(self.layer_param.param[:3]):
            if spec.lr_mult != 0:
                raise self.error(
                    f"param {i} has lr_mult {spec.lr_mult}: cannot configure batch "
                    f"normalization statistics as layer parameters (use lr_mult: 0)")
        if not self.blobs_loaded():
            for shape in ((self.channels,), (self.channels,), (1,)):
                self.new_param_blob(shape).data[...] = 0
        elif len(self.blobs) != 3:
            raise self.error(f"needs 3 parameter blobs (mean, variance, scale factor), "
                             f"got {len(self.blobs)}")
        self.param_propagate_down = [False] * 3

    def complete_param_specs(self, layer_param):
        """LayerSetUp's masking of the statistics: missing specs are appended as
        ``param { lr_mult: 0 }`` (decay_mult stays 1); setup refused non-zero ones."""
        while len(layer_param.param) < len(self.blobs):
            layer_param.param.add(lr_mult=0)

    def _check_axes(self, bottom):
        if bottom[0].num_axes < 2:      # the fork's SetUp reads shape(1) and shape(0)
            raise self.error(f"needs a bottom with num and channel axes, got shape "
                             f"{bottom[0].shape}")

    def reshape(self, bottom, top):
        self._check_axes(bottom)
        if bottom[0].shape[1] != self.channels:
            raise self.error(f"bottom {bottom[0].shape} has {bottom[0].shape[1]} channels, "
                             f"but the layer was set up for {self.channels}")
        num = bottom[0].shape[0]
        self.dims = (num, self.channels, bottom[0].count // max(num * self.channels, 1))
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        x = bottom[0].data.reshape(self.dims)
        dtype = x.dtype.type
        if self.use_global_stats:
            self._forward_stored_stats(xp, bottom, top, dtype)
            return
        if not x.size:
            raise self.error(f"cannot compute batch statistics of a bottom without "
                             f"values (shape {bottom[0].shape}); use_global_stats: true "
                             f"uses the stored ones")
        # Caffe's two GEMVs: per (image, channel) sums times 1/m (rounded to Dtype),
        # then those added over the images
        inv_m = dtype(1.0 / (self.dims[0] * self.dims[2]))
        mean = channel_sums(x, inv_m)
        centered = x - mean[None, :, None]
        var = channel_sums(centered * centered, inv_m)
        self._update_running_stats(mean, var, dtype)
        self.std = xp.sqrt(var + dtype(self.eps))[None, :, None]
        self.x_norm = centered / self.std    # kept apart: an in-place layer may clobber top
        top[0].data[...] = self.x_norm.reshape(top[0].shape)

    def _forward_stored_stats(self, xp, bottom, top, dtype):
        if on_device(xp):
            mean = self.device_stored_stats(xp, dtype)
            launch("channel", "channel_normalize", dtype, bottom[0].count, bottom[0].data,
                   mean, self.std_vector, self.channels, self.dims[2], top[0].data)
            return
        stored = dtype(self.blobs[2].read_host_data().reshape(-1)[0])
        factor = dtype(0) if stored == 0 else dtype(1) / stored
        mean = factor * self.blobs[0].data
        var = factor * self.blobs[1].data
        self.std_vector = xp.sqrt(var + dtype(self.eps))
        self.std = self.std_vector[None, :, None]
        x = bottom[0].data.reshape(self.dims)
        out = view(top[0].data, self.dims)      # in place or not: element by element
        mean = mean[None, :, None]

        def normalize(lo, hi):
            part = out[:, lo:hi]
            xp.subtract(x[:, lo:hi], mean[:, lo:hi], out=part)
            xp.divide(part, self.std[:, lo:hi], out=part)
        host_threads.for_axis(normalize, out)

    def device_stored_stats(self, xp, dtype):
        """The stored statistics on the device: the mean vector (returned) and
        ``std_vector``, from one kernel and without a device->host read of the scale
        factor (a solver update marks the blobs device-newer every iteration). The two
        vectors are allocated once per array module."""
        cached = self._stats_buffer = reused(self._stats_buffer, xp, (2, self.channels),
                                             dtype)
        mean, self.std_vector = cached[0], cached[1]
        launch("channel", "channel_stored_stats", dtype, self.channels, self.blobs[0].data,
               self.blobs[1].data, self.blobs[2].data, dtype(self.eps), mean,
               self.std_vector)
        return mean

    def _update_running_stats(self, mean, var, dtype):
        maf = dtype(self.moving_average_fraction)
        m = self.dims[0] * self.dims[2]
        correction = dtype(m) / dtype(m - 1) if m > 1 else dtype(1)
        b = self.blobs
        b[2].data[...] = b[2].data * maf + dtype(1)
        b[0].data[...] = maf * b[0].data + mean
        b[1].data[...] = maf * b[1].data + correction * var

    def backward(self, top, propagate_down, bottom):
        # Caffe's Backward_cpu/gpu write the bottom diff whatever propagate_down says
        dy = top[0].diff.reshape(self.dims)
        if self.use_global_stats:
            if on_device(get_array_module(dy)):
                launch("channel", "channel_divide", dy.dtype, dy.size, top[0].diff,
                       self.std_vector, self.channels, self.dims[2], bottom[0].diff)
                return
            dx = dy / self.std_vector[None, :, None]
        else:
            # dx = (dy - mean(dy) - mean(dy * y) * y) / sqrt(var + eps)
            dtype = dy.dtype.type
            y = self.x_norm
            sum_dy_y = channel_sums(dy * y)[None, :, None]
            sum_dy = channel_sums(dy)[None, :, None]
            m = self.dims[0] * self.dims[2]
            dx = (dy + dtype(-1.0 / m) * (y * sum_dy_y + sum_dy)) / self.std
        bottom[0].diff[...] = dx.reshape(bottom[0].shape)


def channel_sums(x, scale=None):
    """Sums of x (outer, C, inner) per channel as Caffe's two GEMVs group them: over
    each (outer, channel) row first, optionally times ``scale``, then over the rows."""
    rows = x.sum(axis=2, dtype=x.dtype)
    if scale is not None:
        rows = rows * scale
    return rows.sum(axis=0, dtype=x.dtype)


def add_image_sums(start, dy):
    """BiasLayer's backward: one GEMV per outer index, each adding its row sums of dy
    (outer, C, inner) to the diff in turn; ``start`` None overwrites (a bias bottom)."""
    rows = dy.sum(axis=2, dtype=dy.dtype)
    total = start
    for row in rows:
        total = row if total is None else total + row
    return total


def _param_shape(layer, bottom, axis_param, num_axes, what):
    """Shape of a learned scale/bias blob: bottom.shape[axis : axis+num_axes]."""
    try:
        axis = bottom.canonical_axis(axis_param)
    except ValueError:
        raise layer.error(f"axis {axis_param} is out of range for bottom {bottom.shape}")
    if num_axes < -1:
        raise layer.error(f"num_axes must be non-negative, or -1 to extend to the end of "
                          f"bottom[0]; got {num_axes}")
    if num_axes >= 0 and bottom.num_axes < axis + num_axes:
        raise layer.error(f"{what} blob's shape extends past bottom[0]'s shape {bottom.shape} "
                          f"when applied starting with bottom[0] axis {axis} "
                          f"(num_axes {num_axes})")
    end = bottom.num_axes if num_axes == -1 else axis + num_axes
    return bottom.shape[axis:end]


def _broadcast_dims(layer, bottom, param_shape, axis_param, what):
    """(outer, param count, inner) of bottom around a scale/bias blob of param_shape.

    A scalar (0-axis) blob always applies at axis 0, as in Caffe."""
    n = len(param_shape)
    if n == 0:
        axis = 0
    else:
        try:
            axis = bottom.canonical_axis(axis_param)
        except ValueError:
            raise layer.error(f"axis {axis_param} is out of range for bottom {bottom.shape}")
    if bottom.num_axes < axis + n:
        raise layer.error(f"{what} blob {tuple(param_shape)} extends past bottom[0]'s shape "
                          f"{bottom.shape} when applied starting with bottom[0] axis {axis}")
    for i in range(n):
        if bottom.shape[axis + i] != param_shape[i]:
            raise layer.error(
                f"dimension mismatch between bottom[0] {bottom.shape} axis {axis + i} "
                f"({bottom.shape[axis + i]}) and {what} blob {tuple(param_shape)} axis {i} "
                f"({param_shape[i]})")
    return (_prod(bottom.shape[:axis]), _prod(param_shape), _prod(bottom.shape[axis + n:]))


@register("Scale")
class ScaleLayer(Layer):
    """y = x * scale (+ bias), the scale broadcast over bottom[0] from ``axis``.

    One bottom: the scale is learned (blobs[0], shape bottom.shape[axis:axis+num_axes],
    default filler constant 1).  Two bottoms: bottom[1] is the scale and gets a
    gradient.  ``bias_term`` adds a learned bias (last blob, default filler constant 0).
    A learned scale's diff is accumulated, except where Caffe's Backward overwrites it
    (scale as large as the input; outer dim 1 with inner dim > 1 and several scale
    values): visible with ``iter_size`` > 1 or shared scales.
    """
    graph_safe = True
    min_bottom = 1
    max_bottom = 2
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.scale_param
        self.axis_param = int(p.axis)
        self.bias_term = bool(p.bias_term)
        learned_scale = len(bottom) == 1
        wanted = int(learned_scale) + int(self.bias_term)
        if len(self.blobs) > wanted:
            raise self.error(f"has {len(self.blobs)} parameter blobs, expected {wanted}")
        if learned_scale and not self.blobs:
            shape = _param_shape(self, bottom[0], p.axis, int(p.num_axes), "scale")
            blob = self.new_param_blob(shape)
            if p.HasField("filler"):
                fill(blob, p.filler)
            else:
                blob.data[...] = 1     # identity by default
        if self.bias_term:
            # Caffe's ScaleLayer::LayerSetUp makes its bias an internal Bias layer with
            # LayerRegistry::CreateLayer, which logs "Creating layer <name>" a second time.
            logger.info("Creating layer %s", self.layer_param.name)
        if self.bias_term and len(self.blobs) < wanted:
            bias_axes = bottom[1].num_axes if len(bottom) > 1 else int(p.num_axes)
            shape = _param_shape(self, bottom[0], p.axis, bias_axes, "bias")
            fill(self.new_param_blob(shape), p.bias_filler)   # unset -> constant 0
        if len(self.param_propagate_down) != len(self.blobs):
            self.param_propagate_down = [True] * len(self.blobs)

    def _scale(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom, top):
        scale = self._scale(bottom)
        self.dims = _broadcast_dims(self, bottom[0], scale.shape, self.axis_param, "scale")
        if self.bias_term:
            bias = self.blobs[-1]
            bias_dims = _broadcast_dims(self, bottom[0], bias.shape, self.axis_param, "bias")
            if bias_dims != self.dims:
                raise self.error(f"bias blob {bias.shape} and scale {scale.shape} must "
                                 f"have the same shape")
        top[0].reshape(bottom[0].shape)

    def _caffe_overwrites_scale_diff(self):
        """Where Caffe's Backward writes a learned scale's diff instead of adding to it
        (scale_layer.cpp): the product goes straight into the diff when the scale is as
        large as the input, and the per-channel gemv runs with beta 0 when outer_dim is
        1, inner_dim > 1 and there is more than one scale value."""
        outer, scale_dim, inner = self.dims
        return (outer == 1 and inner == 1) or (outer == 1 and inner > 1 and scale_dim > 1)

    def _scale_grad_needed(self, bottom):
        """Whether backward may compute d(scale), which needs the input data."""
        return len(bottom) > 1 or self.param_propagate_down[0]

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.dims)
        self.in_place = top[0] is bottom[0]
        # In place, the input is gone after forward but backward needs it for d(scale).
        self.x_saved = (x.copy() if self.in_place and self._scale_grad_needed(bottom)
                        else None)
        scale = self._scale(bottom).data
        if on_device(get_array_module(x)):
            args = (scale, self.blobs[-1].data) if self.bias_term else (scale,)
            launch("channel", "channel_scale_bias" if self.bias_term else "channel_scale",
                   x.dtype, x.size, bottom[0].data, *args, self.dims[1], self.dims[2],
                   top[0].data)
            return
        out = view(top[0].data, self.dims)
        if np.may_share_memory(scale, out):     # a scale bottom that is also the top
            scale = scale.copy()
        scale = scale.reshape(1, -1, 1)
        bias = self.blobs[-1].data.reshape(1, -1, 1) if self.bias_term else None

        def scale_channels(lo, hi):
            part = out[:, lo:hi]
            np.multiply(x[:, lo:hi], scale[:, lo:hi], out=part)
            if bias is not None:
                np.add(part, bias[:, lo:hi], out=part)
        host_threads.for_axis(scale_channels, out)

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff.reshape(self.dims)
        if self.bias_term and self.param_propagate_down[-1]:
            bias = self.blobs[-1]
            bias.diff[...] = add_image_sums(bias.diff.reshape(-1), dy).reshape(bias.shape)
        scale = self._scale(bottom)
        learned_scale = len(bottom) == 1
        if (learned_scale and self.param_propagate_down[0]) or \
                (not learned_scale and propagate_down[1]):
            x = self.x_saved if self.in_place else bottom[0].data.reshape(self.dims)
            product = dy * x
            if not (propagate_down[0] or self.in_place or scale.count == bottom[0].count):
                # Caffe keeps this product in the bottom diff ("Hack: store big eltwise
                # product in bottom[0] diff"), where a Split can add it to a gradient;
                # with propagate_down[0] the bottom gradient overwrites it below.
                bottom[0].diff[...] = product.reshape(bottom[0].shape)
            grad = channel_sums(product).reshape(scale.shape)
            if learned_scale and not self._caffe_overwrites_scale_diff():
                scale.diff[...] += grad
            else:
                scale.diff[...] = grad
        if propagate_down[0]:
            if on_device(get_array_module(dy)):
                launch("channel", "channel_scale", dy.dtype, dy.size, top[0].diff,
                       scale.data, self.dims[1], self.dims[2], bottom[0].diff)
                return
            dx = dy * scale.data.reshape(1, -1, 1)
            bottom[0].diff[...] = dx.reshape(bottom[0].shape)


@register("Bias")
class BiasLayer(Layer):
    """y = x + bias, the bias broadcast over bottom[0] from ``axis``.

    One bottom: the bias is learned (blobs[0], shape bottom.shape[axis:axis+num_axes],
    default filler constant 0).  Two bottoms: bottom[1] is the bias and gets a gradient.
    """
    graph_safe = True
    min_bottom = 1
    max_bottom = 2
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.bias_param
        self.axis_param = int(p.axis)
        if len(bottom) == 1 and not self.blobs_loaded():
            shape = _param_shape(self, bottom[0], p.axis, int(p.num_axes), "bias")
            fill(self.new_param_blob(shape), p.filler)   # unset -> constant 0
        if len(self.param_propagate_down) != len(self.blobs):
            self.param_propagate_down = [True] * len(self.blobs)

    def _bias(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom, top):
        self.dims = _broadcast_dims(self, bottom[0], self._bias(bottom).shape,
                                    self.axis_param, "bias")
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        x = bottom[0].data
        if on_device(get_array_module(x)):
            launch("channel", "channel_bias", x.dtype, x.size, x, self._bias(bottom).data,
                   self.dims[1], self.dims[2], top[0].data)
            return
        y = x.reshape(self.dims) + self._bias(bottom).data.reshape(1, -1, 1)
        top[0].data[...] = y.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0] and top[0] is not bottom[0]:
            bottom[0].diff[...] = top[0].diff
        bias = self._bias(bottom)
        learned = len(bottom) == 1
        if (learned and self.param_propagate_down[0]) or (not learned and propagate_down[1]):
            dy = top[0].diff.reshape(self.dims)
            start = bias.diff.reshape(-1) if learned else None
            bias.diff[...] = add_image_sums(start, dy).reshape(bias.shape)


@register("MVN")
class MVNLayer(NeuronLayer):
    """Mean-variance normalisation per (n, c) or, ``across_channels``, per n.

    y = (x - mean) / (std + eps): Caffe adds eps to the standard deviation, not the
    variance; means are row sums times the Dtype 1/dim (its gemv's alpha). The top is
    4-D (num, channels, height, width), as Caffe's Reshape makes it. The backward is
    Caffe's sequence on the bottom diff, (dy - (y sum(dy y) + sum(dy)) / dim) / (std +
    eps), which drops a factor std / (std + eps) from the exact derivative; in place,
    where the bottom diff is the top diff, it reads what it has overwritten, as Caffe's
    does (its axpby as the non-MKL builds' scal then axpy).
    """

    def setup(self, bottom, top):
        p = self.layer_param.mvn_param
        self.normalize_variance = bool(p.normalize_variance)
        self.across_channels = bool(p.across_channels)
        self.eps = float(p.eps)

    def reshape(self, bottom, top):
        b = bottom[0]
        if b.num_axes > 4:
            raise self.error(f"MVN works on blobs of at most 4 axes (N x C x H x W), "
                             f"got {b.shape}")
        num = b.num if self.across_channels else b.num * b.channels
        self.dims = (num, b.count // max(num, 1))
        top[0].reshape(legacy_shape(b.shape))

    def _row_means(self, rows):
        """gemv(1/dim, rows, ones): each row's sum times the Dtype 1/dim."""
        return rows.sum(axis=1, keepdims=True, dtype=rows.dtype) * \
            rows.dtype.type(1.0 / self.dims[1])

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        x = bottom[0].data.reshape(self.dims)
        if not x.size:                  # no rows (Caffe's count / num divides by zero)
            return
        y = x - self._row_means(x)
        if self.normalize_variance:
            self.std = xp.sqrt(self._row_means(y * y)) + x.dtype.type(self.eps)
            y = y / self.std
        top[0].data[...] = y.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0] or not bottom[0].count:
            return
        grad = bottom[0].diff.reshape(self.dims)     # in place: the top diff itself
        dy = top[0].diff.reshape(self.dims)
        t = grad.dtype.type
        if self.normalize_variance:
            y = top[0].data.reshape(self.dims)
            grad[...] = y * dy
            grad[...] = grad.sum(axis=1, keepdims=True, dtype=grad.dtype)
            grad *= y
            grad += dy.sum(axis=1, keepdims=True, dtype=dy.dtype)
            grad *= t(-1.0 / self.dims[1])
            grad += dy
            grad /= self.std
        else:
            grad[...] = dy - self._row_means(dy)
