"""Layers that pick items (along axis 0) by values read from a bottom: BatchReindex and
Filter (Caffe ``batch_reindex_layer.cpp``, ``filter_layer.cpp``).

The picking values are read on the host, as Caffe reads them (``cpu_data``) in both
modes; the copies themselves are array code on either side.
"""
import numpy as np

from ..backend import get_array_module
from ..layer import Layer, register


def add_rows_in_order(xp, target, index, rows):
    """``target[index[i]] += rows[i]`` for i = 0, 1, ... in that order (Caffe's loop).

    ``index`` is a host integer array. Rows that go to the same target are added in
    rounds, the k-th occurrence of every target index in round k, so that repeated
    indices sum in the loop's order on either side (no atomics, no reordering)."""
    if index.size == 0:
        return
    order = np.argsort(index, kind="stable")
    ordered = index[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(index.size), 0))
    rank = np.empty(index.size, np.int64)
    rank[order] = np.arange(index.size) - start
    for k in range(int(rank.max()) + 1):
        picked = np.flatnonzero(rank == k)
        target[xp.asarray(index[picked])] += rows[xp.asarray(picked)]


@register("BatchReindex")
class BatchReindexLayer(Layer):
    """top[i] = bottom[0][index[i]] with the indices in bottom 1 (floats, one axis,
    truncated toward zero as C's cast does); backward adds each top item's diff into the
    bottom item it came from (zero for items nobody picked). The indices get no
    gradient."""
    exact_num_bottom = 2
    exact_num_top = 1

    def reshape(self, bottom, top):
        if bottom[1].num_axes != 1:
            raise self.error(f"bottom 1 (the indices) must have exactly 1 axis, got shape "
                             f"{bottom[1].shape}")
        if bottom[0].num_axes == 0:
            raise self.error("bottom 0 is a scalar: there is no batch axis to reindex")
        top[0].reshape((bottom[1].shape[0],) + bottom[0].shape[1:])

    def _indices(self, bottom):
        values = bottom[1].read_host_data()
        num = bottom[0].shape[0]
        bad = ~((values >= 0) & (values < num))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise self.error(f"index {float(values[i]):g} at position {i} of bottom 1 is outside "
                             f"the batch [0, {num}) of bottom 0 (shape {bottom[0].shape})")
        return values.astype(np.int64)

    def forward(self, bottom, top):
        index = self._indices(bottom)
        if top[0].count == 0:
            return
        xp = get_array_module(bottom[0].data)
        top[0].data[...] = bottom[0].data[xp.asarray(index)]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[1]:
            raise self.error("cannot backpropagate to bottom 1 (the indices)")
        if not propagate_down[0]:
            return
        index = self._indices(bottom)
        diff = bottom[0].diff
        xp = get_array_module(diff)
        diff[...] = 0
        add_rows_in_order(xp, diff, index, top[0].diff)


@register("Filter")
class FilterLayer(Layer):
    """Bottoms: the blobs to filter, then the selector (N x 1 x ... x 1). Each top keeps
    the items of its bottom whose selector value is non-zero (NaN counts as non-zero),
    in order. The number of items is the selector's count of non-zeros, except at the
    first reshape after setup, which gives every bottom's full batch as Caffe's does; a
    selector with no non-zero gives tops of zero items. Backward copies the diffs back
    to the kept items and zeroes the others (all of them when none was kept, where
    Caffe's backward divides by the zero item count); the selector gets no gradient."""
    min_bottom = 2
    min_top = 1

    def setup(self, bottom, top):
        if len(top) != len(bottom) - 1:
            raise self.error(f"needs one top per filtered bottom: {len(bottom) - 1} "
                             f"bottom(s) before the selector, {len(top)} top(s)")
        self.first_reshape = True

    def reshape(self, bottom, top):
        selector = bottom[-1]
        if selector.num_axes == 0 or any(d != 1 for d in selector.shape[1:]):
            raise self.error(f"the selector (last bottom) must be N x 1 x ... x 1, got shape "
                             f"{selector.shape}")
        for i, b in enumerate(bottom[:-1]):
            if b.num_axes == 0 or b.shape[0] != selector.shape[0]:
                raise self.error(f"bottom {i} (shape {b.shape}) must have the selector's "
                                 f"first dimension {selector.shape[0]}")
        values = selector.read_host_data().reshape(-1)
        self.kept = np.flatnonzero(values != 0)
        num = len(self.kept)
        if self.first_reshape:
            num = bottom[0].shape[0]
            self.first_reshape = False
        for t, b in zip(top, bottom):
            t.reshape((num,) + b.shape[1:])

    def forward(self, bottom, top):
        for t, b in zip(top, bottom):
            xp = get_array_module(b.data)
            t.data[:len(self.kept)] = b.data[xp.asarray(self.kept)]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[-1]:
            raise self.error("cannot backpropagate to the selector (the last bottom)")
        for i, (t, b) in enumerate(zip(top, bottom)):
            if not propagate_down[i]:
                continue
            xp = get_array_module(b.diff)
            b.diff[...] = 0
            b.diff[xp.asarray(self.kept)] = t.diff[:len(self.kept)]
