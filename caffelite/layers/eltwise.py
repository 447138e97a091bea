"""Eltwise: element-wise SUM (with coefficients), PROD or MAX of same-shape bottoms.

MAX on the device runs the ``eltwise.cu`` kernels with the host's tie rule
(``ties_to_later = 0``, Caffe's CPU rule), so both sides route gradients to the same
bottoms.  Caffe's own GPU code gives a tie among bottoms 2, 3, ... to the later bottom
instead; the two rules differ only on exactly equal (or NaN) values in a third or later
bottom, never in the forward value of non-NaN data.

In place (the top is one of the bottoms), the forward is Caffe's sequence of operations
on its buffers: SUM and MAX clear the top first (to 0, or to -FLT_MAX), so that bottom
enters as 0 (or -FLT_MAX) -- or, from the third bottom on, as the sum or maximum so
far; PROD writes bottom 0 times bottom 1 into the top first, so a later bottom that is
the top enters as that partial product.
"""
import numpy as np

from .. import host_threads
from ..backend import get_array_module
from ..layer import Layer, register
from ..proto import caffe_pb2
from ._device import contiguous, launch, on_device, reused

PROD = caffe_pb2.EltwiseParameter.PROD
SUM = caffe_pb2.EltwiseParameter.SUM
MAX = caffe_pb2.EltwiseParameter.MAX


def _sum_into(out, *terms):
    np.add(terms[0], terms[1], out=out)
    out += 0            # Caffe sums into a zeroed top: -0 terms give +0
    for term in terms[2:]:
        out += term


@register("Eltwise")
class EltwiseLayer(Layer):
    """SUM: y = sum_i coeff_i x_i.  PROD: y = prod_i x_i.  MAX: y = max_i x_i.

    MAX keeps the index of the winning bottom with Caffe's CPU tie rule: between
    bottoms 0 and 1 a tie goes to bottom 1; each later bottom wins only when strictly
    greater (a tie stays with the earlier one). The gradient goes to that bottom only.
    """
    graph_safe = True
    min_bottom = 2
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.eltwise_param
        self.op = p.operation
        if self.op not in (PROD, SUM, MAX):
            raise self.error(f"unknown eltwise_param.operation {self.op}")
        if len(p.coeff) not in (0, len(bottom)):
            raise self.error(
                f"eltwise_param gives {len(p.coeff)} coeff values for {len(bottom)} bottoms; "
                "give exactly one coefficient per bottom (or none)")
        if self.op == PROD and len(p.coeff):
            raise self.error("eltwise_param.coeff is only allowed with operation SUM, not PROD")
        t = self.dtype.type
        self.coeffs = [t(c) for c in p.coeff] if len(p.coeff) else [t(1)] * len(bottom)
        self.stable_prod_grad = p.stable_prod_grad
        self.max_idx = None

    def reshape(self, bottom, top):
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != bottom[0].shape:
                raise self.error(
                    f"all bottoms must have the same shape: bottom 0 '{self._bottom_name(0)}' "
                    f"is {bottom[0].shape} but bottom {i} '{self._bottom_name(i)}' is {b.shape}")
        if len(self.coeffs) != len(bottom):
            raise self.error(
                f"set up for {len(self.coeffs)} bottoms, got {len(bottom)}")
        top[0].reshape(bottom[0].shape)

    def _bottom_name(self, i):
        names = self.layer_param.bottom
        return names[i] if i < len(names) else f"#{i}"

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        if any(top[0] is b for b in bottom):
            self._forward_in_place(xp, bottom, top)
            return
        if self.op == SUM and self._plain_sum(bottom, top):
            # ((0 + x0) + x1) + x2 + ... written straight into top: no temporaries
            out = top[0].data
            if on_device(xp):
                launch("eltwise", "eltwise_sum2", out.dtype, out.size,
                       contiguous(xp, bottom[0].data), contiguous(xp, bottom[1].data), out)
                for b in bottom[2:]:
                    out += b.data
            else:
                host_threads.flat_map(_sum_into, out, *(b.data for b in bottom))
            return
        if self.op == SUM:
            y = self._scaled(bottom[0].data, self.coeffs[0])
            for b, c in zip(bottom[1:], self.coeffs[1:]):
                y = y + self._scaled(b.data, c)
            y += 0
        elif self.op == PROD:
            y = bottom[0].data * bottom[1].data
            for b in bottom[2:]:
                y = y * b.data
        elif on_device(xp):
            self._max_device(xp, bottom, top)
            return
        else:
            y, self.max_idx = self._max_and_index(xp, bottom)
        top[0].data[...] = y

    # Caffe's CPU tie rule (the host layer's): see the module docstring.
    TIES_TO_LATER = 0

    def _max_device(self, xp, bottom, top):
        shape = bottom[0].shape
        count = int(np.prod(shape))
        in_place = any(top[0] is b for b in bottom)
        out = xp.empty(shape, self.dtype) if in_place else top[0].data
        self.max_idx = reused(self.max_idx, xp, shape, np.int32)
        x = [contiguous(xp, b.data) for b in bottom]
        launch("eltwise", "eltwise_max_forward", out.dtype, count, x[0], x[1], 1,
               self.TIES_TO_LATER, out, self.max_idx)
        for i in range(2, len(bottom)):
            launch("eltwise", "eltwise_max_forward", out.dtype, count, out, x[i], i,
                   self.TIES_TO_LATER, out, self.max_idx)
        if in_place:
            top[0].data[...] = out

    def _plain_sum(self, bottom, top):
        """All coefficients 1 and top is none of the bottoms read after it is written."""
        return (all(c == 1 for c in self.coeffs)
                and not any(top[0] is b for b in bottom[2:]))

    def _forward_in_place(self, xp, bottom, top):
        """Caffe's sequence on its buffers when the top is a bottom (see the module
        docstring): each step reads the bottoms as they are at that point."""
        out = top[0].data
        if self.op == SUM:
            out[...] = 0
            for b, c in zip(bottom, self.coeffs):
                out += b.data if c == 1 else c * b.data
        elif self.op == PROD:
            out[...] = bottom[0].data * bottom[1].data
            for b in bottom[2:]:
                out *= b.data
        else:
            out[...] = -np.finfo(np.float32).max           # Dtype(-FLT_MAX)
            # From the third bottom on, the top compared with itself never wins.
            y, self.max_idx = self._max_and_index(xp, bottom, skip=top[0])
            out[...] = y

    @staticmethod
    def _max_and_index(xp, bottom, skip=None):
        """The maximum and the winning bottom's index with the CPU tie rule (bottoms
        from the third on that are ``skip`` take no part)."""
        x0, x1 = bottom[0].data, bottom[1].data
        first = x0 > x1
        y = xp.where(first, x0, x1)
        idx = xp.where(first, 0, 1).astype(xp.int32)
        for i, b in enumerate(bottom[2:], 2):
            if b is skip:
                continue
            wins = b.data > y
            y = xp.where(wins, b.data, y)
            idx = xp.where(wins, xp.int32(i), idx)
        return y, idx

    @staticmethod
    def _scaled(x, c):
        return x.copy() if c == 1 else c * x

    def backward(self, top, propagate_down, bottom):
        xp = get_array_module(top[0].diff)
        dy = top[0].diff
        for i, b in enumerate(bottom):
            if not propagate_down[i]:
                continue
            if self.op == SUM:
                b.diff[...] = dy if self.coeffs[i] == 1 else self.coeffs[i] * dy
            elif self.op == PROD:
                if self.stable_prod_grad:
                    others = [o.data for j, o in enumerate(bottom) if j != i]
                    grad = others[0]
                    for o in others[1:]:
                        grad = grad * o
                else:
                    grad = top[0].data / b.data
                b.diff[...] = grad * dy
            elif on_device(xp):
                launch("eltwise", "eltwise_max_backward", dy.dtype, dy.size, contiguous(xp, dy),
                       self.max_idx, i, b.diff)
            else:
                # Caffe's gradient = 0; gradient += dy: a -0 diff passes as +0
                b.diff[...] = xp.where(self.max_idx == i, dy + 0, dy.dtype.type(0))
