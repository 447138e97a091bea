"""Blob: Caffe's N-d array pair (``data`` for values, ``diff`` for gradients)."""
import numpy as np


class Blob:
    """A named-by-the-net array pair with Caffe's reshape semantics.

    ``data`` and ``diff`` are arrays of ``shape``; reshaping to the same count keeps
    the memory (as Caffe does), a larger count reallocates. Arrays may be shared
    with another blob (Split, Flatten, Reshape, in-place layers, shared params).
    """

    def __init__(self, shape=(), dtype=np.float32):
        self.dtype = np.dtype(dtype)
        self._shape = tuple(int(s) for s in shape)
        self._data = np.zeros(self._shape, self.dtype)
        self._diff = np.zeros(self._shape, self.dtype)

    # --- shape -----------------------------------------------------------------
    @property
    def shape(self):
        return self._shape

    @property
    def count(self):
        return int(np.prod(self._shape, dtype=np.int64))

    @property
    def num_axes(self):
        return len(self._shape)

    def shape_at(self, axis):
        return self._shape[self.canonical_axis(axis)]

    def canonical_axis(self, axis):
        n = len(self._shape)
        if not -n <= axis < max(n, 1):
            raise ValueError(f"axis {axis} out of range for a blob of shape {self._shape}")
        return axis + n if axis < 0 else axis

    def count_range(self, start, end=None):
        end = len(self._shape) if end is None else end
        return int(np.prod(self._shape[start:end], dtype=np.int64))

    def _legacy(self, i):
        if len(self._shape) > 4:
            raise ValueError(f"legacy accessor on a {len(self._shape)}-axis blob")
        return self._shape[i] if i < len(self._shape) else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"negative dimension in blob shape {shape}")
        if shape == self._shape:
            return
        count = int(np.prod(shape, dtype=np.int64))
        if count == self._data.size:
            self._data = self._data.reshape(shape)
            self._diff = self._diff.reshape(shape)
        else:
            self._data = np.zeros(shape, self.dtype)
            self._diff = np.zeros(shape, self.dtype)
        self._shape = shape

    def reshape_like(self, other):
        self.reshape(other.shape)

    # --- data / diff -------------------------------------------------------------
    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        self._data[...] = value

    @property
    def diff(self):
        return self._diff

    @diff.setter
    def diff(self, value):
        self._diff[...] = value

    def set_data_array(self, array):
        """Replace the data array itself (caller guarantees shape and dtype)."""
        self._data = array
        self._shape = tuple(array.shape)

    def set_diff_array(self, array):
        self._diff = array

    def share_data(self, other):
        """Make this blob view ``other``'s data (shapes must hold the same count)."""
        if other.count != self.count:
            raise ValueError(f"cannot share data: counts {other.count} vs {self.count}")
        self._data = other._data.reshape(self._shape)

    def share_diff(self, other):
        if other.count != self.count:
            raise ValueError(f"cannot share diff: counts {other.count} vs {self.count}")
        self._diff = other._diff.reshape(self._shape)

    def __repr__(self):
        return f"Blob(shape={self._shape}, dtype={self.dtype.name})"
