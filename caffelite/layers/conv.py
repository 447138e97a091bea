"""Convolution and Deconvolution (Caffe's BaseConvolutionLayer family), with dilation.

Both read ``convolution_param`` the same way (kernel/stride/pad given once, once per
spatial axis, or as the 2-D ``*_h``/``*_w`` pair; ``dilation`` repeated; ``group``;
``bias_term``; ``axis``) and share one set of GEMMs (``im2col.py``):

* Convolution: top = W * im2col(bottom) + b; weights (num_output, C/group, *kernel).
* Deconvolution: the transpose: top = col2im(W^T * bottom) + b; weights
  (C, num_output/group, *kernel); its backward is the convolution forward.

Several bottoms are allowed; each gets its own top and all share the parameters.
"""
import math

from ..filler import FillerError, fill
from ..layer import Layer, register
from .im2col import (ConvGeometry, add_bias, backward_gemm, forward_gemm, view,
                     weight_and_backward_gemm,
                     weight_and_forward_gemm, weight_gemm)


class BaseConvolutionLayer(Layer):
    graph_safe = True
    min_bottom = 1
    min_top = 1
    equal_num_bottom_top = True
    reverse_dimensions = False   # True for Deconvolution

    # --- setup -----------------------------------------------------------------------
    def setup(self, bottom, top):
        p = self.layer_param.convolution_param
        self.geom = self._read_geometry(p, bottom[0].shape)
        self.channels = bottom[0].shape[self.channel_axis]
        self.num_output = p.num_output
        self.group = p.group
        self.bias_term = p.bias_term
        if self.num_output <= 0:
            raise self.error("convolution_param.num_output must be given and positive")
        if self.group <= 0:
            raise self.error(f"convolution_param.group must be positive, got {self.group}")
        if self.channels % self.group:
            raise self.error(f"the {self.channels} input channels of bottom "
                             f"'{self._bottom_name(0)}' are not divisible by group {self.group}")
        if self.num_output % self.group:
            raise self.error(f"num_output {self.num_output} is not a multiple of "
                             f"group {self.group}")
        weight_shape = self._weight_shape()
        if self.blobs_loaded():
            self._check_loaded_blobs(weight_shape)
        else:
            self._fill(self.new_param_blob(weight_shape), p.weight_filler, "weight_filler")
            if self.bias_term:
                self._fill(self.new_param_blob((self.num_output,)), p.bias_filler, "bias_filler")

    def _read_geometry(self, p, shape):
        if not -len(shape) <= p.axis < max(len(shape), 1):
            raise self.error(f"convolution_param.axis {p.axis} is out of range for "
                             f"bottom '{self._bottom_name(0)}' of shape {shape}")
        self.channel_axis = p.axis % len(shape)
        n_spatial = len(shape) - self.channel_axis - 1
        geom = ConvGeometry(
            kernel=self._kernel_shape(p, n_spatial),
            stride=self._per_axis(p, "stride", n_spatial, 1),
            pad=self._per_axis(p, "pad", n_spatial, 0),
            dilation=self._per_axis(p, "dilation", n_spatial, 1, has_hw=False))
        if any(d == 0 for d in geom.dilation):
            raise self.error(f"dilation must be positive, got {list(geom.dilation)}")
        # The fork's layer factory checks this for Convolution only (Deconvolution has
        # no cuDNN engine and ignores the field).
        if (not self.reverse_dimensions and p.engine == p.CUDNN and
                any(d > 1 for d in geom.dilation)):
            raise self.error("engine CUDNN does not support dilated convolution "
                             "(as in Caffe); use engine CAFFE or DEFAULT")
        return geom

    def _fill(self, blob, filler_param, what):
        try:
            fill(blob, filler_param)
        except FillerError as e:
            raise self.error(f"{what}: {e}") from None

    def _weight_shape(self):
        if self.reverse_dimensions:
            out_c, in_c = self.channels, self.num_output
        else:
            out_c, in_c = self.num_output, self.channels
        return (out_c, in_c // self.group) + self.geom.kernel

    def _check_loaded_blobs(self, weight_shape):
        expected = 1 + int(self.bias_term)
        if len(self.blobs) != expected:
            raise self.error(f"expected {expected} parameter blob(s) (weights"
                             f"{' and bias' if self.bias_term else ''}), got {len(self.blobs)}")
        if tuple(self.blobs[0].shape) != weight_shape:
            raise self.error(f"incorrect weight shape: expected {weight_shape}, "
                             f"got {tuple(self.blobs[0].shape)}")
        if self.bias_term and tuple(self.blobs[1].shape) != (self.num_output,):
            raise self.error(f"incorrect bias shape: expected ({self.num_output},), "
                             f"got {tuple(self.blobs[1].shape)}")

    def _kernel_shape(self, p, n_spatial):
        if p.HasField("kernel_h") or p.HasField("kernel_w"):
            if n_spatial != 2:
                raise self.error("kernel_h & kernel_w can only be used for 2-D convolution "
                                 f"(the bottom has {n_spatial} spatial axes)")
            if len(p.kernel_size):
                raise self.error("give either kernel_size or kernel_h/kernel_w, not both")
            kernel = (p.kernel_h, p.kernel_w)
        else:
            n = len(p.kernel_size)
            if n not in (1, n_spatial):
                raise self.error(f"kernel_size must be specified once, or once per spatial "
                                 f"dimension (kernel_size specified {n} times; "
                                 f"{n_spatial} spatial dims)")
            kernel = tuple(p.kernel_size[0 if n == 1 else i] for i in range(n_spatial))
        if any(k == 0 for k in kernel):
            raise self.error(f"filter dimensions must be nonzero, got kernel {list(kernel)} "
                             "(set kernel_size, or both kernel_h and kernel_w)")
        return kernel

    def _per_axis(self, p, name, n_spatial, default, has_hw=True):
        values = getattr(p, name)
        use_hw = has_hw and (p.HasField(f"{name}_h") or p.HasField(f"{name}_w"))
        if use_hw:
            if n_spatial != 2:
                raise self.error(f"{name}_h & {name}_w can only be used for 2-D convolution")
            if len(values):
                raise self.error(f"give either {name} or {name}_h/{name}_w, not both")
            out = (getattr(p, f"{name}_h"), getattr(p, f"{name}_w"))
        else:
            n = len(values)
            if n not in (0, 1, n_spatial):
                raise self.error(f"{name} must be specified once, or once per spatial "
                                 f"dimension ({name} specified {n} times; "
                                 f"{n_spatial} spatial dims)")
            out = tuple(default if n == 0 else values[0 if n == 1 else i]
                        for i in range(n_spatial))
        if name == "stride" and any(s == 0 for s in out):
            hint = " (stride_h and stride_w must both be given)" if use_hw else ""
            raise self.error(f"stride dimensions must be nonzero, got {list(out)}{hint}")
        return out

    def _bottom_name(self, i):
        names = self.layer_param.bottom
        return names[i] if i < len(names) else str(i)

    # --- reshape ---------------------------------------------------------------------
    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != self.channel_axis + 1 + len(self.geom.kernel):
            raise self.error(f"bottom num_axes may not change (now {shape})")
        if shape[self.channel_axis] != self.channels:
            raise self.error(f"bottom '{self._bottom_name(0)}' has {shape[self.channel_axis]} "
                             f"channels but the layer was set up for {self.channels}")
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != shape:
                raise self.error(f"all bottoms must have the same shape: "
                                 f"'{self._bottom_name(i)}' {b.shape} vs {shape}")
        spatial = shape[self.channel_axis + 1:]
        out = self._output_shape(spatial)
        if any(o <= 0 for o in out):
            raise self.error(f"output spatial shape {list(out)} is empty for input "
                             f"{list(spatial)} with kernel {list(self.geom.kernel)}, "
                             f"dilation {list(self.geom.dilation)}, pad {list(self.geom.pad)}, "
                             f"stride {list(self.geom.stride)}")
        top_shape = shape[:self.channel_axis] + (self.num_output,) + tuple(out)
        for t in top:
            t.reshape(top_shape)

    def _output_shape(self, spatial):
        if self.reverse_dimensions:
            return self.geom.deconv_output_shape(spatial)
        return self.geom.conv_output_shape(spatial)

    # --- helpers ---------------------------------------------------------------------
    def _as_nc(self, array):
        """View (outer..., C, *spatial) as (num, C, *spatial)."""
        shape = array.shape
        num = math.prod(shape[:self.channel_axis])
        return view(array, (num,) + shape[self.channel_axis:])

    def _add_bias(self, out):
        if self.bias_term:
            add_bias(out, self.blobs[1].data)

    def _bias_grad(self, top_diff):
        if self.bias_term and self.param_propagate_down[1] and top_diff.size:
            num, n_out = top_diff.shape[:2]
            # Over each image's grid, then over the images, as Caffe's per-image GEMVs
            # group the sum. On a GPU the first is one reduction per (image, channel)
            # row, where one per channel would leave most of the device idle for the
            # first layers (few channels, large grids).
            per_image = view(top_diff, (num, n_out, -1)).sum(axis=2)
            self.blobs[1].diff[...] += per_image.sum(axis=0)


@register("Convolution")
class ConvolutionLayer(BaseConvolutionLayer):
    reverse_dimensions = False

    def forward(self, bottom, top):
        weight = self.blobs[0].data
        bias = self.blobs[1].data if self.bias_term else None
        for b, t in zip(bottom, top):
            out = self._as_nc(t.data)
            if not forward_gemm(self._as_nc(b.data), weight, out, self.geom, self.group,
                                bias=bias):
                self._add_bias(out)

    def backward(self, top, propagate_down, bottom):
        weight = self.blobs[0].data
        for i, (t, b) in enumerate(zip(top, bottom)):
            top_diff = self._as_nc(t.diff)
            self._bias_grad(top_diff)
            if self.param_propagate_down[0] and propagate_down[i]:
                weight_and_backward_gemm(self._as_nc(b.data), top_diff, weight,
                                         self.blobs[0].diff, self._as_nc(b.diff),
                                         self.geom, self.group)
                continue
            if self.param_propagate_down[0]:
                weight_gemm(self._as_nc(b.data), top_diff, self.blobs[0].diff,
                            self.geom, self.group)
            if propagate_down[i]:
                backward_gemm(top_diff, weight, self._as_nc(b.diff), self.geom, self.group)


@register("Deconvolution")
class DeconvolutionLayer(BaseConvolutionLayer):
    reverse_dimensions = True

    def forward(self, bottom, top):
        weight = self.blobs[0].data
        for b, t in zip(bottom, top):
            out = self._as_nc(t.data)
            backward_gemm(self._as_nc(b.data), weight, out, self.geom, self.group)
            self._add_bias(out)

    def backward(self, top, propagate_down, bottom):
        weight = self.blobs[0].data
        for i, (t, b) in enumerate(zip(top, bottom)):
            top_diff = self._as_nc(t.diff)
            self._bias_grad(top_diff)
            if self.param_propagate_down[0] and propagate_down[i]:
                weight_and_forward_gemm(top_diff, self._as_nc(b.data), weight,
                                        self.blobs[0].diff, self._as_nc(b.diff),
                                        self.geom, self.group)
                continue
            if self.param_propagate_down[0]:
                weight_gemm(top_diff, self._as_nc(b.data), self.blobs[0].diff,
                            self.geom, self.group)
            if propagate_down[i]:
                forward_gemm(top_diff, weight, self._as_nc(b.diff), self.geom, self.group)

