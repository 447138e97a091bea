"""Im2col (Caffe ``im2col_layer.cpp``): the convolution's column matrix as a blob.

``convolution_param`` is read as Convolution reads it (kernel, stride, pad and dilation
once, per spatial axis or as ``*_h``/``*_w``; ``axis`` the channel axis). The top is the
bottom's shape with the channel axis multiplied by the kernel taps and each spatial axis
replaced by the convolution output size ``(in + 2p - extent) / s + 1``: for a 2-D bottom
N x (C*kh*kw) x out_h x out_w, row ``(c*kh + u)*kw + v`` holding tap (u, v) of channel c
(zero where the tap reads padding). Backward is col2im: each bottom pixel gets the sum
of the column entries that copied it. ``force_nd_im2col`` only picks Caffe's N-d
routine, which gives the same values; it is accepted and changes nothing.

num_output, group and the fillers are ignored; there are no parameters. Every image
(all axes before ``axis``) is one more set of C channels for the im2col helpers, so
one call fills the whole top.
"""
import math

from ..backend import get_array_module
from ..layer import Layer, register
from .conv import BaseConvolutionLayer
from .im2col import ConvGeometry, col2im_band, im2col_band, view


@register("Im2col")
class Im2colLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1
    # Convolution's readers of convolution_param (they need only ``self.error``).
    _kernel_shape = BaseConvolutionLayer._kernel_shape
    _per_axis = BaseConvolutionLayer._per_axis

    def setup(self, bottom, top):
        p = self.layer_param.convolution_param
        shape = bottom[0].shape
        if not -len(shape) <= p.axis < len(shape):
            raise self.error(f"convolution_param.axis {p.axis} is out of range for a bottom "
                             f"of shape {shape}")
        self.channel_axis = p.axis % len(shape)
        n_spatial = len(shape) - self.channel_axis - 1
        if n_spatial < 1:
            raise self.error(f"the bottom (shape {shape}) needs at least one spatial axis "
                             f"after the channel axis {self.channel_axis}")
        self.geom = ConvGeometry(
            kernel=self._kernel_shape(p, n_spatial),
            stride=self._per_axis(p, "stride", n_spatial, 1),
            pad=self._per_axis(p, "pad", n_spatial, 0),
            dilation=self._per_axis(p, "dilation", n_spatial, 1, has_hw=False))
        if any(d == 0 for d in self.geom.dilation):
            raise self.error(f"dilation must be positive, got {list(self.geom.dilation)}")

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        axis = self.channel_axis
        if len(shape) != axis + 1 + len(self.geom.kernel):
            raise self.error(f"bottom num_axes may not change (now {shape})")
        spatial = shape[axis + 1:]
        out = self.geom.conv_output_shape(spatial)
        if any(o <= 0 for o in out):
            raise self.error(f"output spatial shape {list(out)} is empty for input "
                             f"{list(spatial)} with kernel {list(self.geom.kernel)}, "
                             f"dilation {list(self.geom.dilation)}, pad {list(self.geom.pad)}, "
                             f"stride {list(self.geom.stride)}")
        self.grid = tuple(out)
        top[0].reshape(shape[:axis] + (shape[axis] * self.geom.taps,) + self.grid)

    def _planes(self, bottom):
        """The bottom as (images * C, *spatial) and the column shape of the top."""
        shape = bottom[0].shape
        planes = math.prod(shape[:self.channel_axis + 1])
        return (planes,) + shape[self.channel_axis + 1:], \
            (planes,) + self.geom.kernel + self.grid

    def forward(self, bottom, top):
        image_shape, col_shape = self._planes(bottom)
        image = view(bottom[0].data, image_shape)
        col = view(top[0].data, col_shape)
        xp = get_array_module(image)
        im2col_band(xp, image, col, self.geom, self.grid, 0, self.grid[0])

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        image_shape, col_shape = self._planes(bottom)
        col = view(top[0].diff, col_shape)
        image = view(bottom[0].diff, image_shape)
        xp = get_array_module(col)
        col2im_band(xp, col, image, self.geom, self.grid, 0, self.grid[0], first=True)
