"""SPP, spatial pyramid pooling (Caffe ``spp_layer.cpp``).

Level i of ``pyramid_height`` pools the bottom into about 2^i x 2^i bins: kernel
``ceil(H / 2^i)``, stride = kernel, pad ``(kernel * 2^i - H + 1) / 2`` (integer
division; the same along W). Each level is a caffelite Pooling layer with those
parameters (so output sizes, clipping and AVE divisors are Pooling's), flattened to
N x (C * bins) and concatenated in level order: the top is N x C * sum(bins), 2-D. With
``pyramid_height: 1`` Caffe runs the single pooling straight into the top, which stays
N x C x 1 x 1. Backward adds the levels' bottom gradients in level order (Caffe's Split).

A pyramid too tall for the bottom (pad >= kernel: 4 bins over 5 rows need kernel 2,
pad 2) and STOCHASTIC levels that need padding are errors, as Caffe's Pooling checks
make them.
"""
from ..blob import Blob
from ..layer import Layer, LayerError, register
from ..proto import caffe_pb2
from .pooling import PoolingLayer

_SPP = caffe_pb2.SPPParameter
_POOL = {_SPP.MAX: caffe_pb2.PoolingParameter.MAX, _SPP.AVE: caffe_pb2.PoolingParameter.AVE,
         _SPP.STOCHASTIC: caffe_pb2.PoolingParameter.STOCHASTIC}


def level_geometry(level, height, width):
    """(kernel_h, kernel_w, pad_h, pad_w) of pyramid level ``level`` (Caffe's rule)."""
    bins = 2 ** level
    kernel_h, kernel_w = -(-height // bins), -(-width // bins)
    pad_h = (kernel_h * bins - height + 1) // 2
    pad_w = (kernel_w * bins - width + 1) // 2
    return kernel_h, kernel_w, pad_h, pad_w


@register("SPP")
class SPPLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.spp_param
        if p.pool not in _POOL:
            raise self.error(f"unknown pool method {p.pool}")
        self.pool = _POOL[p.pool]
        self.pyramid_height = p.pyramid_height
        if self.pyramid_height <= 0:
            raise self.error("spp_param.pyramid_height must be given and positive")
        self.levels = []            # one PoolingLayer per level
        self.level_tops = []
        self.scratch = Blob((), self.dtype)     # a level's bottom gradient before the sum
        self.built_for = None

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.error(f"bottom must have 4 axes (num, channels, height, width), "
                             f"got shape {shape}")
        if shape[2] <= 0 or shape[3] <= 0:
            raise self.error(f"bottom height and width must be positive, got shape {shape}")
        if shape != self.built_for:
            self._build_levels(bottom, top)
            self.built_for = shape
        if self.pyramid_height == 1:
            self.levels[0].reshape(bottom, top)
            return
        width = 0
        for layer, level_top in zip(self.levels, self.level_tops):
            layer.reshape(bottom, [level_top])
            width += level_top.count_range(1)
        top[0].reshape((shape[0], width))

    def _build_levels(self, bottom, top):
        """New Pooling layers for this bottom size (their kernels depend on it)."""
        _, _, height, width = bottom[0].shape
        self.levels, self.level_tops = [], []
        for level in range(self.pyramid_height):
            layer = PoolingLayer(self._pooling_param(level, height, width), self.phase,
                                 self.dtype)
            level_top = top[0] if self.pyramid_height == 1 else Blob((), self.dtype)
            try:
                layer.setup(bottom, [level_top])
            except LayerError as e:
                raise self.error(f"pyramid level {level} ({2 ** level} bins) cannot pool a "
                                 f"{height}x{width} bottom: {e}") from None
            self.levels.append(layer)
            self.level_tops.append(level_top)

    def _pooling_param(self, level, height, width):
        kernel_h, kernel_w, pad_h, pad_w = level_geometry(level, height, width)
        param = caffe_pb2.LayerParameter(name=f"{self.name}/level{level}", type="Pooling")
        q = param.pooling_param
        q.pool = self.pool
        q.kernel_h, q.kernel_w = kernel_h, kernel_w
        q.pad_h, q.pad_w = pad_h, pad_w
        q.stride_h, q.stride_w = kernel_h, kernel_w
        return param

    def _columns(self):
        """(level layer, its top, first and last top column) in level order."""
        start = 0
        for layer, level_top in zip(self.levels, self.level_tops):
            width = level_top.count_range(1)
            yield layer, level_top, start, start + width
            start += width

    def forward(self, bottom, top):
        if self.pyramid_height == 1:
            self.levels[0].forward(bottom, top)
            return
        num = bottom[0].shape[0]
        for layer, level_top, start, stop in self._columns():
            layer.forward(bottom, [level_top])
            top[0].data[:, start:stop] = level_top.data.reshape(num, stop - start)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if self.pyramid_height == 1:
            self.levels[0].backward(top, propagate_down, bottom)
            return
        self.scratch.reshape(bottom[0].shape)
        for level, (layer, level_top, start, stop) in enumerate(self._columns()):
            level_top.diff[...] = top[0].diff[:, start:stop].reshape(level_top.shape)
            if level == 0:
                layer.backward([level_top], [True], bottom)
            else:
                layer.backward([level_top], [True], [self.scratch])
                bottom[0].diff[...] += self.scratch.diff
