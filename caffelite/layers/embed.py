"""Embed (Caffe ``embed_layer.cpp``): a lookup table, top = W[index] (+ bias).

The bottom holds indices as floats (any shape); the top is bottom.shape + (num_output,).
Weights are (input_dim, num_output), the transpose of InnerProduct's, and the bias
(num_output,). An index is C's static_cast<int> of the value (truncation toward zero:
1.5 reads row 1, -0.5 row 0); one outside [0, input_dim) after that, or NaN, is an
error here (Caffe checks only in debug builds and reads stray memory). Backward adds
each top row's diff into the weight row it read, in bottom order, and the column sums
of the top diff into the bias diff; the indices get no gradient.
"""
import numpy as np

from ..backend import get_array_module
from ..filler import FillerError, fill
from ..layer import Layer, register
from .im2col import view
from .reindex import add_rows_in_order
from .softmax import label_text


@register("Embed")
class EmbedLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.embed_param
        self.num_output, self.input_dim = p.num_output, p.input_dim
        if self.num_output <= 0:
            raise self.error("embed_param.num_output must be given and positive")
        if self.input_dim <= 0:
            raise self.error("embed_param.input_dim must be given and positive")
        self.bias_term = p.bias_term
        weight_shape = (self.input_dim, self.num_output)
        if self.blobs_loaded():
            self._check_loaded_blobs(weight_shape)
            return
        self._fill(self.new_param_blob(weight_shape), p.weight_filler, "weight_filler")
        if self.bias_term:
            self._fill(self.new_param_blob((self.num_output,)), p.bias_filler, "bias_filler")

    def _check_loaded_blobs(self, weight_shape):
        expected = 1 + int(self.bias_term)
        if len(self.blobs) != expected:
            raise self.error(f"expected {expected} parameter blob(s), got {len(self.blobs)}")
        if tuple(self.blobs[0].shape) != weight_shape:
            raise self.error(f"incorrect weight shape: expected {weight_shape} (input_dim, "
                             f"num_output), got {tuple(self.blobs[0].shape)}")
        if self.bias_term and tuple(self.blobs[1].shape) != (self.num_output,):
            raise self.error(f"incorrect bias shape: expected ({self.num_output},), "
                             f"got {tuple(self.blobs[1].shape)}")

    def _fill(self, blob, filler_param, what):
        try:
            fill(blob, filler_param)
        except FillerError as e:
            raise self.error(f"embed_param.{what}: {e}") from None

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape + (self.num_output,))

    def _indices(self, bottom):
        values = bottom[0].read_host_data().reshape(-1)
        index = np.trunc(values)
        bad = ~((index >= 0) & (index < self.input_dim))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise self.error(f"index {label_text(values[i])} at position {i} of the bottom, "
                             f"truncated toward zero, is not in [0, input_dim "
                             f"{self.input_dim})")
        return index.astype(np.int64)

    def forward(self, bottom, top):
        index = self._indices(bottom)
        weight = self.blobs[0].data
        xp = get_array_module(weight)
        rows = view(top[0].data, (index.size, self.num_output))
        rows[...] = weight[xp.asarray(index)]
        if self.bias_term:
            rows += self.blobs[1].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            raise self.error("cannot backpropagate to the bottom (the indices)")
        g = top[0].diff.reshape(-1, self.num_output)
        if self.param_propagate_down[0]:
            weight_diff = self.blobs[0].diff
            add_rows_in_order(get_array_module(weight_diff), weight_diff,
                              self._indices(bottom), g)
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].diff[...] += g.sum(axis=0)
