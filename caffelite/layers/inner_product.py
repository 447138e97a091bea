"""InnerProduct (fully connected): top = bottom * W^T + b over the axes from ``axis`` on.

The bottom is viewed as an (M, K) matrix, M = count(0, axis), K = count(axis); weights are
(N, K), or (K, N) with ``transpose: true``; the top is bottom.shape[:axis] + (N,).
"""
import numpy as np

from ..backend import get_array_module
from ..filler import FillerError, fill
from ..kernels.cublas import gemm
from ..layer import Layer, register
from .im2col import view


@register("InnerProduct")
class InnerProductLayer(Layer):
    graph_safe = True
    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.inner_product_param
        shape = bottom[0].shape
        if not -len(shape) <= p.axis < max(len(shape), 1):
            raise self.error(f"inner_product_param.axis {p.axis} is out of range for a "
                             f"bottom of shape {shape}")
        self.axis = p.axis % len(shape) if shape else 0
        self.num_output = p.num_output
        if self.num_output <= 0:
            raise self.error("inner_product_param.num_output must be given and positive")
        self.bias_term = p.bias_term
        self.transpose = p.transpose
        self.k = int(np.prod(shape[self.axis:], dtype=np.int64))
        weight_shape = ((self.k, self.num_output) if self.transpose
                        else (self.num_output, self.k))
        if self.blobs_loaded():
            expected = 1 + int(self.bias_term)
            if len(self.blobs) != expected:
                raise self.error(f"expected {expected} parameter blob(s), got {len(self.blobs)}")
            if tuple(self.blobs[0].shape) != weight_shape:
                raise self.error(f"incorrect weight shape: expected {weight_shape}, "
                                 f"got {tuple(self.blobs[0].shape)}")
            if self.bias_term and self.blobs[1].count != self.num_output:
                raise self.error(f"incorrect bias shape: expected ({self.num_output},), "
                                 f"got {tuple(self.blobs[1].shape)}")
        else:
            self._fill(self.new_param_blob(weight_shape), p.weight_filler, "weight_filler")
            if self.bias_term:
                self._fill(self.new_param_blob((self.num_output,)), p.bias_filler, "bias_filler")

    def _fill(self, blob, filler_param, what):
        try:
            fill(blob, filler_param)
        except FillerError as e:
            raise self.error(f"{what}: {e}") from None

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        k = int(np.prod(shape[self.axis:], dtype=np.int64))
        if k != self.k:
            raise self.error(f"input size incompatible with inner product parameters: the "
                             f"bottom {shape} has {k} values from axis {self.axis} on, the "
                             f"weights expect {self.k}")
        top[0].reshape(shape[:self.axis] + (self.num_output,))

    def _matrices(self, blob_array):
        return view(blob_array, (-1, self.k))

    def _weight_nk(self):
        """Weights as an (N, K) matrix view."""
        w = self.blobs[0].data
        return w.T if self.transpose else w

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        x = self._matrices(bottom[0].data)
        y = view(top[0].data, (-1, self.num_output))
        gemm(xp, x, self._weight_nk().T, y)
        if self.bias_term:
            y += self.blobs[1].data.reshape(1, -1)

    def backward(self, top, propagate_down, bottom):
        xp = get_array_module(top[0].diff)
        dy = view(top[0].diff, (-1, self.num_output))
        x = self._matrices(bottom[0].data)
        if self.param_propagate_down[0]:
            dw = self.blobs[0].diff
            if self.transpose:
                gemm(xp, x.T, dy, dw, accumulate=True)
            else:
                gemm(xp, dy.T, x, dw, accumulate=True)
        if self.bias_term and self.param_propagate_down[1]:
            view(self.blobs[1].diff, (-1,))[...] += dy.sum(axis=0)
        if propagate_down[0]:
            gemm(xp, dy, self._weight_nk(), self._matrices(bottom[0].diff))
