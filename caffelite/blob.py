"""Blob: Caffe's N-d array pair (``data`` for values, ``diff`` for gradients).

Each of the two is a ``SyncedMemory`` (Caffe's): a host (numpy) mirror and, in GPU
mode, a device mirror, with a *head* saying which one holds the newest values. Memory
is allocated (zero-filled) on first use, on the side that asks, and copied across only
when the other side asks after a write. ``blob.data`` gives the host array to Python
code and host-only layers, and the device array to code running under
``backend.device_access()`` (the Net's device layers, the solver's update in GPU mode).
Like pycaffe's, every access is a potential write: the side that is asked becomes the
head. As in Caffe, a blob reshaped to fewer elements keeps its memory (and values) and
uses the first ones; only a larger count allocates new memory.
"""
import math
import operator

import numpy as np

from . import backend

UNINITIALIZED, HEAD_AT_HOST, HEAD_AT_DEVICE, SYNCED = range(4)

# Host<->device copies made by blobs since the process started (or the last reset): a
# test reads them to prove an iteration makes no hidden copies.
transfers = {"to_device": 0, "to_host": 0}


def reset_transfer_counts():
    transfers["to_device"] = transfers["to_host"] = 0


# Counts the changes of any blob's shape: a holder of many blobs' shapes (a CUDA graph's
# key) checks this one number instead of every blob until it moves.
_shape_changes = [0]


def shape_changes():
    """How many times a blob's shape has changed so far (any blob)."""
    return _shape_changes[0]


# While a CUDA graph is recorded: the memories whose device side the pass asked for
# (a list), so that only they are uploaded before, and marked newest after, a launch.
_device_uses = None


def record_device_uses(uses):
    """Append every SyncedMemory whose device array is asked for to ``uses`` (None: stop)."""
    global _device_uses
    _device_uses = uses


def _first(flat, shape, count):
    """The first ``count`` (= prod(shape)) elements of a flat array, as ``shape``."""
    return (flat if flat.shape[0] == count else flat[:count]).reshape(shape)


class SyncedMemory:
    """``count`` elements of ``dtype`` mirrored between host and device (flat arrays); a
    blob may use only the first ones (Caffe's capacity)."""
    __slots__ = ("count", "dtype", "host", "device", "head", "_view")

    def __init__(self, count, dtype, host=None, device=None):
        self.count = int(count)
        self.dtype = np.dtype(dtype)
        self.host = host
        self.device = device
        self._view = (None, None, None)     # (device array, shape, its reshaped view)
        if host is not None:
            self.head = HEAD_AT_HOST
        elif device is not None:
            self.head = HEAD_AT_DEVICE
        else:
            self.head = UNINITIALIZED

    @classmethod
    def wrap(cls, array):
        """Memory holding ``array`` itself (flattened view), host or device."""
        xp = backend.get_array_module(array)
        if xp is np:
            flat = np.ascontiguousarray(array).reshape(-1)
            return cls(flat.size, flat.dtype, host=flat)
        flat = xp.ascontiguousarray(array).reshape(-1)
        return cls(flat.size, flat.dtype, device=flat)

    def host_array(self):
        """The host mirror, up to date; the host becomes the head (a mutable access)."""
        if backend._state["capturing"]:
            raise RuntimeError("a blob's host memory was asked for while a CUDA graph was "
                               "being recorded (a graph replays device work only)")
        if self.head == HEAD_AT_DEVICE:
            if self.host is None:
                self.host = np.empty(self.count, self.dtype)
            backend.to_host(self.device, out=self.host)
            transfers["to_host"] += 1
        elif self.host is None:
            self.host = np.zeros(self.count, self.dtype)
        self.head = HEAD_AT_HOST
        return self.host

    def device_array(self):
        """The device mirror, up to date; the device becomes the head."""
        if self.device is None:
            xp = backend.device_module()
            if self.head == HEAD_AT_HOST:
                self.device = xp.asarray(self.host)
                transfers["to_device"] += 1
            else:
                self.device = xp.zeros(self.count, self.dtype)
        elif self.head == HEAD_AT_HOST:
            self.device.set(self.host)          # host -> device, no device temporary
            transfers["to_device"] += 1
        self.head = HEAD_AT_DEVICE
        if _device_uses is not None:
            _device_uses.append(self)
        return self.device

    def device_view(self, shape, count):
        """The device mirror as ``shape``: one view object per shape, kept (a device layer
        asks for its blobs several times per pass, and a CuPy view costs microseconds;
        ResNet-101 MSC makes about 12000 such requests per pass)."""
        device = self.device_array()
        base, cached_shape, view = self._view
        if base is device and cached_shape == shape:
            return view
        view = _first(device, shape, count)
        self._view = (device, shape, view)
        return view

    def mark_synced(self):
        """Both mirrors hold the newest values (after a read-only host access)."""
        if self.host is not None and self.device is not None:
            self.head = SYNCED

    def sync_to_host(self):
        """Bring the host mirror up to date without making it the head."""
        if self.head == HEAD_AT_DEVICE:
            self.host_array()
            self.head = SYNCED

    def array(self, shape, count):
        if backend._access.device:
            return self.device_view(shape, count)
        if self.head != HEAD_AT_HOST or self.host is None:
            return _first(self.host_array(), shape, count)
        return _first(self.host, shape, count)



INT_MAX = 2 ** 31 - 1
MAX_BLOB_AXES = 32          # Caffe's kMaxBlobAxes


class BlobShapeError(ValueError):
    """A shape Caffe's Blob refuses (a negative axis, more than INT_MAX elements) or a
    legacy accessor on a blob of more than 4 axes; the Net adds the layer's name."""


def checked_shape(shape):
    """(shape as ints, its count), or Blob::Reshape's refusal. Like Reshape, each axis
    is checked against the product of those before it, up to a 0: a zero-size shape
    whose leading axes multiply past INT_MAX is refused too."""
    try:
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        shape = tuple(_dimension(s, shape, axis) for axis, s in enumerate(shape))
    if len(shape) > MAX_BLOB_AXES:
        raise BlobShapeError(f"blob shape {shape} has {len(shape)} axes; at most "
                             f"{MAX_BLOB_AXES} are allowed")
    if any(s < 0 for s in shape):
        raise BlobShapeError(f"negative dimension in blob shape {shape}")
    count = 1
    for axis, s in enumerate(shape):
        if count and s > INT_MAX // count:
            raise BlobShapeError(f"blob size exceeds INT_MAX: shape {shape} has "
                                 f"{count * s} elements by axis {axis}")
        count *= s
    return shape, count


def _dimension(value, shape, axis):
    """One axis of ``shape`` that is no integer: an integral float (2.0) as its int,
    anything else (a string, None, 2.5, NaN) refused by name, where ``int()`` would
    have raised a bare ValueError or truncated 2.5 to 2.  pycaffe's Blob.reshape takes
    integers only (boost.python: "No registered converter … of type int")."""
    if not isinstance(value, (str, bytes, bytearray)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is not None and number.is_integer():
            return int(number)
    raise TypeError(f"blob shape {tuple(shape)!r}: axis {axis} is {value!r} "
                    f"({type(value).__name__}), not an integer dimension")


def legacy_shape(shape):
    """Caffe's legacy (num, channels, height, width) of a shape of at most 4 axes
    (missing trailing axes count as 1), or None for more axes."""
    shape = tuple(shape)
    return shape + (1,) * (4 - len(shape)) if len(shape) <= 4 else None

class Blob:
    """A named-by-the-net array pair with Caffe's reshape semantics.

    ``data`` and ``diff`` are arrays of ``shape``; reshaping to the same count keeps
    the memory (as Caffe does), another count reallocates. Memory may be shared with
    another blob (Split, Flatten, Reshape, in-place layers, shared params).
    """

    def __init__(self, shape=(), dtype=np.float32):
        self.dtype = np.dtype(dtype)
        self._shape, self._count = checked_shape(shape)
        count = self.count
        self._data_mem = SyncedMemory(count, self.dtype)
        self._diff_mem = SyncedMemory(count, self.dtype)

    # --- shape -----------------------------------------------------------------
    @property
    def shape(self):
        return self._shape

    @property
    def count(self):
        return self._count

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
        legacy = legacy_shape(self._shape)
        if legacy is None:
            raise BlobShapeError(f"Cannot use legacy accessors on Blobs with > 4 axes "
                                 f"(shape {self._shape})")
        return legacy[i]

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape, count = checked_shape(shape)
        if shape == self._shape:
            return
        # Blob::Reshape: new memory only when the count grows past what is allocated.
        if count > self._data_mem.count or count > self._diff_mem.count:
            self._data_mem = SyncedMemory(count, self.dtype)
            self._diff_mem = SyncedMemory(count, self.dtype)
        self._shape = shape
        self._count = count
        _shape_changes[0] += 1

    def reshape_like(self, other):
        self.reshape(other.shape)

    # --- data / diff -------------------------------------------------------------
    @property
    def data(self):
        return self._data_mem.array(self._shape, self._count)

    @data.setter
    def data(self, value):
        self.data[...] = value

    @property
    def diff(self):
        return self._diff_mem.array(self._shape, self._count)

    @diff.setter
    def diff(self, value):
        self.diff[...] = value

    # Explicit sides, whatever the calling context (Caffe's cpu_data/gpu_data).
    @property
    def host_data(self):
        return _first(self._data_mem.host_array(), self._shape, self._count)

    @property
    def host_diff(self):
        return _first(self._diff_mem.host_array(), self._shape, self._count)

    @property
    def device_data(self):
        return _first(self._data_mem.device_array(), self._shape, self._count)

    @property
    def device_diff(self):
        return _first(self._diff_mem.device_array(), self._shape, self._count)

    def read_host_data(self):
        """The host values, for reading only (Caffe's const ``cpu_data``): copied from
        the device if it holds newer values, after which both sides are valid, so a
        layer that reads a parameter on the host every forward (BatchNorm's scale
        factor) costs no copy after the first. The caller must not write to it."""
        mem = self._data_mem
        if mem.head == HEAD_AT_DEVICE:
            mem.sync_to_host()
        elif mem.host is None:
            mem.host_array()
        reads = backend._state["host_reads"]
        if reads is not None:       # a CUDA graph being recorded keeps these values
            reads.append(mem)
        return _first(mem.host, self._shape, self._count)

    def set_data_array(self, array):
        """Replace the data memory by ``array`` itself (host or device)."""
        self._data_mem = SyncedMemory.wrap(array)
        shape = tuple(int(s) for s in array.shape)
        if shape != self._shape:
            self._shape, self._count = shape, math.prod(shape)
            _shape_changes[0] += 1

    def set_diff_array(self, array):
        self._diff_mem = SyncedMemory.wrap(array)

    def share_data(self, other):
        """Make this blob use ``other``'s data memory (shapes must hold the same count)."""
        if other.count != self.count:
            raise ValueError(f"cannot share data: counts {other.count} vs {self.count}")
        self._data_mem = other._data_mem

    def share_diff(self, other):
        if other.count != self.count:
            raise ValueError(f"cannot share diff: counts {other.count} vs {self.count}")
        self._diff_mem = other._diff_mem

    def shares_data_with(self, other):
        return self._data_mem is other._data_mem

    def memories(self):
        return self._data_mem, self._diff_mem

    def __repr__(self):
        return f"Blob(shape={self._shape}, dtype={self.dtype.name})"
