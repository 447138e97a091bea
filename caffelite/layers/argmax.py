"""ArgMax: the indices (and/or values) of the top_k largest entries; ArgMaxV1 is
DeepLab v1's per-pixel variant (what a V1 ``type: ARGMAX`` layer upgrades to in a net
that uses DeepLab v1's additions; other V1 nets get ``ArgMax``, as in the v2 fork)."""
import math

from ..backend import get_array_module
from ..layer import Layer, register


def argmax_ties_highest(xp, scores, axis=-1):
    """Caffe's top 1 (std::partial_sort of (value, index) pairs with greater<>): a
    later entry replaces the best unless it is smaller, so the highest index wins a
    tie, and the entry after a NaN (or the NaN itself, when last) restarts the search:
    the result is the top of what follows the last NaN."""
    dim = scores.shape[axis]
    nan = xp.isnan(scores)
    if bool(nan.any()):
        shape = [1] * scores.ndim
        shape[axis] = dim
        index = xp.arange(dim).reshape(shape)
        last_nan = xp.where(nan, index, -1).max(axis=axis, keepdims=True)
        scores = xp.where(index <= last_nan, -xp.inf, scores)
    # Search the reversed axis so the first hit among equals is the highest index.
    return dim - 1 - xp.argmax(xp.flip(scores, axis=axis), axis=axis)


def top_k_indices(xp, rows, k):
    """Indices of the k largest entries along the last axis, Caffe's ranking: (value,
    index) pairs sorted descending, so among equal values the highest index wins."""
    if k == 1:
        return argmax_ties_highest(xp, rows)[..., None]
    # Sort the reversed rows stably so that among equals the highest index comes first.
    # CuPy's argsort is always stable (and older versions take no ``kind``).
    stable = {} if xp.__name__ == "cupy" else {"kind": "stable"}
    pos = xp.argsort(-rows[..., ::-1], axis=-1, **stable)[..., :k]
    return rows.shape[-1] - 1 - pos


@register("ArgMax")
class ArgMaxLayer(Layer):
    """Top-k along ``axis``, or over each item's flattened C*H*W when no axis is given.

    Ranking is Caffe's: (value, index) pairs sorted descending, so among equal values
    the HIGHEST index comes first. Indices are written as floats.
    Without ``axis`` the top is (N, 1, top_k) — (N, 2, top_k) holding indices then
    values with ``out_max_val`` — padded with 1s to the bottom's number of axes (>= 3).
    With ``axis`` the top is the bottom's shape with top_k on that axis, holding the
    values if ``out_max_val`` else the indices. No backward (Caffe has none).
    """
    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.argmax_param
        if p.top_k < 1:
            raise self.error(f"argmax_param.top_k must be at least 1, got {p.top_k}")
        self.top_k = p.top_k
        self.out_max_val = p.out_max_val
        self.has_axis = p.HasField("axis")

    def reshape(self, bottom, top):
        blob = bottom[0]
        if self.has_axis:
            axis = self.layer_param.argmax_param.axis
            n = blob.num_axes
            if not -n <= axis < n:
                raise self.error(f"argmax_param.axis {axis} is out of range for a bottom of "
                                 f"shape {blob.shape}")
            self.axis = axis + n if axis < 0 else axis
            dim = blob.shape[self.axis]
            if self.top_k > dim:
                raise self.error(f"argmax_param.top_k {self.top_k} is larger than axis "
                                 f"{self.axis} of the bottom (size {dim}, shape {blob.shape})")
            shape = list(blob.shape)
            shape[self.axis] = self.top_k
        else:
            dim = blob.count_range(1)
            if self.top_k > dim:
                raise self.error(f"argmax_param.top_k {self.top_k} is larger than the "
                                 f"{dim} entries per item of the bottom (shape {blob.shape})")
            shape = [1] * max(blob.num_axes, 3)
            shape[0] = blob.shape[0]
            shape[1] = 2 if self.out_max_val else 1
            shape[2] = self.top_k
        top[0].reshape(shape)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        x = bottom[0].data
        rows = (xp.moveaxis(x, self.axis, -1) if self.has_axis
                else x.reshape(x.shape[0], math.prod(x.shape[1:])))
        index = top_k_indices(xp, rows, self.top_k)
        if self.has_axis:
            out = xp.take_along_axis(rows, index, -1) if self.out_max_val else index
            top[0].data[...] = xp.moveaxis(out, -1, self.axis)
            return
        flat = top[0].data.reshape(x.shape[0], math.prod(top[0].shape[1:]))
        flat[:, :self.top_k] = index
        if self.out_max_val:
            flat[:, self.top_k:] = xp.take_along_axis(rows, index, -1)

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            raise self.error("ArgMax has no backward pass (its output is not differentiable)")


@register("ArgMaxV1")
class ArgMaxV1Layer(Layer):
    """DeepLab v1's ARGMAX (spec deeplab_extra_layers.md 4.1): always per pixel over the
    channels.  Top N x top_k x H x W of indices, or N x 2 top_k x H x W with the values
    after the indices when ``out_max_val``; ties go to the highest index (as ArgMax).
    Backward is a silent no-op, so the v1 weak-supervision nets (label_estep =
    ARGMAX of the biased scores, fed to the loss as labels) back-propagate without
    ``propagate_down`` settings.  V1 ``layers { type: ARGMAX }`` in DeepLab v1 nets
    upgrade to this type.
    """
    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.argmax_param
        if p.HasField("axis"):
            raise self.error("DeepLab v1's ArgMax (ARGMAX) always works over the channels; "
                             "argmax_param.axis belongs to the V2 'ArgMax' type")
        if p.top_k < 1:
            raise self.error(f"argmax_param.top_k must be at least 1, got {p.top_k}")
        self.top_k = p.top_k
        self.out_max_val = p.out_max_val

    def reshape(self, bottom, top):
        blob = bottom[0]
        if blob.num_axes < 2:
            raise self.error(f"needs a bottom with channels (N x C x ...), got {blob.shape}")
        if self.top_k > blob.shape[1]:
            raise self.error(f"argmax_param.top_k {self.top_k} is larger than the "
                             f"{blob.shape[1]} channels of the bottom {blob.shape}")
        shape = list(blob.shape)
        shape[1] = 2 * self.top_k if self.out_max_val else self.top_k
        top[0].reshape(shape)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        rows = xp.moveaxis(bottom[0].data, 1, -1)
        index = top_k_indices(xp, rows, self.top_k)
        out = index.astype(top[0].data.dtype)
        if self.out_max_val:
            out = xp.concatenate([out, xp.take_along_axis(rows, index, -1)], axis=-1)
        top[0].data[...] = xp.moveaxis(out, -1, 1)

    def backward(self, top, propagate_down, bottom):
        """v1 has a no-op backward: nothing is written, nothing fails."""
