"""Reduction (Caffe ``reduction_layer.cpp``): SUM, ASUM, SUMSQ or MEAN over every axis
from ``axis`` on, times ``coeff``.

The top keeps the bottom's axes before ``axis`` (a scalar for ``axis: 0``, the
default). MEAN is SUM with ``coeff / dim`` (dim = count(axis), the division done in the
blob's dtype); the top is scaled only when that factor is not 1, as Caffe does.
Backward, per top element g and factor c = g * coeff: SUM and MEAN give c everywhere,
ASUM sign(x) * c (sign(0) = 0), SUMSQ (2c) * x.
"""
from ..backend import get_array_module
from ..layer import Layer, register
from ..proto import caffe_pb2
from ._cpu_math import caffe_sign
from .im2col import view

_R = caffe_pb2.ReductionParameter
_OPS = (_R.SUM, _R.ASUM, _R.SUMSQ, _R.MEAN)


@register("Reduction")
class ReductionLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.reduction_param
        if p.operation not in _OPS:
            raise self.error(f"unknown reduction operation {p.operation}")
        self.op = p.operation

    def reshape(self, bottom, top):
        p = self.layer_param.reduction_param
        n = bottom[0].num_axes
        if n == 0:
            raise self.error("the bottom is a scalar: there is no axis to reduce from")
        if not -n <= p.axis < n:
            raise self.error(f"reduction_param.axis {p.axis} is out of range for a bottom "
                             f"of shape {bottom[0].shape} ({n} axes)")
        self.axis = p.axis % n
        self.num = bottom[0].count_range(0, self.axis)
        self.dim = bottom[0].count_range(self.axis)
        top[0].reshape(bottom[0].shape[:self.axis])
        real = self.dtype.type
        self.coeff = real(p.coeff)
        if self.op == _R.MEAN:
            self.coeff = real(self.coeff / real(self.dim))

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.num, self.dim)
        xp = get_array_module(x)
        if self.op in (_R.SUM, _R.MEAN):
            total = x.sum(axis=1)
        elif self.op == _R.ASUM:
            total = xp.abs(x).sum(axis=1)
        else:
            total = (x * x).sum(axis=1)
        if self.coeff != 1:
            total = total * self.coeff
        top[0].data[...] = total.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        factor = (top[0].diff * self.coeff).reshape(self.num, 1)
        diff = view(bottom[0].diff, (self.num, self.dim))
        if self.op in (_R.SUM, _R.MEAN):
            diff[...] = factor
            return
        x = bottom[0].data.reshape(self.num, self.dim)
        if self.op == _R.ASUM:
            diff[...] = caffe_sign(x) * factor
        else:
            diff[...] = (factor * 2) * x
