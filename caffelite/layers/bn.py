"""PSPNet's ``BN`` layer (hszhao/PSPNet, the DeepLab-v2 fork plus this layer): batch
normalisation with its own slope and bias, as the released PSPNet models use it.

blobs: [0] slope, [1] bias, [2] mean, [3] variance, each 1 x C x 1 x 1. The output is

    y = ((x - mean) * (var + eps)^(-1/2)) * slope + bias

with the stored mean and variance when ``frozen`` or in the TEST phase. Otherwise the
batch's own (biased) statistics are used and the stored ones become moving averages,
``stored = (1 - momentum) * batch + momentum * stored``. ``frozen`` also sets the
slope's and bias's learning rates and decays to 0 (the statistics' always are), as the
layer's LayerSetUp does to its own param specs. The arithmetic follows bn_layer.cpp:
means over the spatial axes first, times 1 / (H * W), then over the images, times 1 / N.
"""
from .. import host_threads
from ..backend import TEST, get_array_module
from ..blob import legacy_shape
from ..filler import fill
from ..layer import NeuronLayer, register
from ._cpu_math import caffe_powx
from .im2col import view
from .normalization import channel_sums


@register("BN")
class BNLayer(NeuronLayer):
    graph_safe = True

    def setup(self, bottom, top):
        p = self.layer_param.bn_param
        self.frozen = bool(p.frozen)
        self.momentum = float(p.momentum)
        self.eps = float(p.eps)
        self.use_stored = self.frozen or self.phase == TEST
        dims = self._legacy_dims(bottom[0])
        self.channels = dims[1]
        shape = (1, self.channels, 1, 1)
        if not self.blobs_loaded():
            fill(self.new_param_blob(shape), p.slope_filler)     # unset: constant 0
            fill(self.new_param_blob(shape), p.bias_filler)
            self.new_param_blob(shape).data[...] = 0
            self.new_param_blob(shape).data[...] = 1 if self.frozen else 0
        elif len(self.blobs) != 4:
            raise self.error(f"needs 4 parameter blobs (slope, bias, mean, variance), "
                             f"got {len(self.blobs)}")
        for name, blob in zip(("slope", "bias", "mean", "variance"), self.blobs):
            if blob.count != self.channels:
                raise self.error(f"the {name} blob {blob.shape} does not have one value "
                                 f"per channel of the bottom ({self.channels})")

    def complete_param_specs(self, layer_param):
        """What LayerSetUp does to the layer's own param specs, which give the learning
        rates and decays (the net's specs still decide which diffs are computed)."""
        while len(layer_param.param) < 4:
            layer_param.param.add()
        for i in (0, 1, 2, 3) if self.frozen else (2, 3):
            layer_param.param[i].lr_mult = 0
            layer_param.param[i].decay_mult = 0

    def _legacy_dims(self, bottom):
        dims = legacy_shape(bottom.shape)
        if dims is None:
            raise self.error(f"needs a bottom of at most 4 axes (num, channels, height, "
                             f"width), got shape {bottom.shape}")
        return dims

    def reshape(self, bottom, top):
        num, channels, height, width = self._legacy_dims(bottom[0])
        if channels != self.channels:
            raise self.error(f"bottom {bottom[0].shape} has {channels} channels, but the "
                             f"layer was set up for {self.channels}")
        self.dims = (num, channels, height * width)
        top[0].reshape(bottom[0].shape)

    def _vector(self, i):
        return self.blobs[i].data.reshape(1, -1, 1)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        x = bottom[0].data.reshape(self.dims)
        dtype = x.dtype.type
        if self.use_stored:
            mean, var = self._vector(2), self._vector(3)
        else:
            mean = self._batch_mean(x)
            centered = x - mean
            var = self._batch_mean(centered * centered)
            self._update_stored(2, mean)
            self._update_stored(3, var)
        inv_std = caffe_powx(xp, var + dtype(self.eps), -0.5)
        if not self.frozen:
            self.inv_std = inv_std
            self.x_norm = xp.empty(self.dims, x.dtype)
        out = view(top[0].data, self.dims)      # in place or not: element by element
        slope, bias = self._vector(0), self._vector(1)

        def normalize(lo, hi):
            part = out[:, lo:hi]
            xp.subtract(x[:, lo:hi], mean[:, lo:hi], out=part)
            xp.multiply(part, inv_std[:, lo:hi], out=part)
            if not self.frozen:
                self.x_norm[:, lo:hi] = part
            xp.multiply(part, slope[:, lo:hi], out=part)
            xp.add(part, bias[:, lo:hi], out=part)
        host_threads.for_axis(normalize, out, work=4)

    def _batch_mean(self, x):
        """The two GEMVs of bn_layer.cpp: (N, C, HW) -> (1, C, 1)."""
        dtype = x.dtype.type
        num, _, spatial = self.dims
        spatial_means = channel_sums(x, dtype(1) / dtype(spatial))
        return (spatial_means * (dtype(1) / dtype(num)))[None, :, None]

    def _update_stored(self, i, batch):
        dtype = batch.dtype.type
        blob = self.blobs[i]
        stored = blob.data.reshape(batch.shape)
        momentum = dtype(self.momentum)
        blob.data[...] = ((dtype(1) - momentum) * batch + momentum * stored).reshape(blob.shape)

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff.reshape(self.dims)
        if self.frozen:
            if propagate_down[0]:
                dtype = dy.dtype.type
                inv_std = caffe_powx(get_array_module(dy), self._vector(3) + dtype(self.eps),
                                     -0.5)
                dx = dy * (self._vector(0) * inv_std)
                bottom[0].diff[...] = dx.reshape(bottom[0].shape)
            return
        x_norm = self.x_norm
        if self.param_propagate_down[0]:
            self._add_channel_sums(0, x_norm * dy)
        if self.param_propagate_down[1]:
            self._add_channel_sums(1, dy)
        if not propagate_down[0]:
            return
        dtype = dy.dtype.type
        num, _, spatial = self.dims
        dx_norm = dy * self._vector(0)
        projected = x_norm * _sums(x_norm * dx_norm) + _sums(dx_norm)
        dx = (dx_norm + (dtype(-1) / dtype(num * spatial)) * projected) * self.inv_std
        bottom[0].diff[...] = dx.reshape(bottom[0].shape)

    def _add_channel_sums(self, i, values):
        blob = self.blobs[i]
        blob.diff[...] = (blob.diff.reshape(1, -1, 1) + _sums(values)).reshape(blob.shape)


def _sums(x):
    """Per-channel sums of (N, C, HW) as the two GEMVs group them: (1, C, 1)."""
    return channel_sums(x)[None, :, None]
