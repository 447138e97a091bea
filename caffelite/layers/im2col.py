"""im2col / col2im and the three convolution GEMMs shared by Convolution and Deconvolution.

Caffe's column layout: row ``(c*kh + u)*kw + v`` (channel-major, then kernel taps), column
``i*W_out + j`` (the output grid).  ``im2col`` copies, per kernel tap, one strided slice
of the image into its rows (no padded copy of the image: out-of-range positions are
written as zeros), so the work is a handful of vectorised copies per tap.  ``col2im`` is
its adjoint and accumulates the taps in Caffe's order.

The column buffer is built for a band of output rows at a time (``rows_per_chunk``) so
that it stays under ``COL_BUFFER_BYTES`` however large the image; each band is one GEMM
per group (a single batched ``matmul`` call).  Convolutions with a 1x1 kernel, stride 1
and no padding skip im2col (the image already is its column matrix).

Everything is written against ``xp`` (numpy or cupy, taken from the arrays).
"""
import itertools
from dataclasses import dataclass

import numpy as np

from ..backend import get_array_module

# Upper bound on one column buffer (per buffer; backward uses two).
COL_BUFFER_BYTES = 16 << 20

_workspace = {}


def _scratch(slot, count, dtype, xp):
    """A reusable flat buffer of at least ``count`` elements (not zeroed)."""
    key = (slot, np.dtype(dtype).str, xp.__name__)
    buf = _workspace.get(key)
    if buf is None or buf.size < count:
        buf = xp.empty(max(count, 1), dtype)
        _workspace[key] = buf
    return buf[:count]


def release_workspace():
    """Drop the cached column buffers (they are re-created on demand)."""
    _workspace.clear()


def view(array, shape):
    """Reshape that must not copy (a copy would silently lose writes through it)."""
    if get_array_module(array) is np:
        return np.reshape(array, shape, copy=False)
    out = array.reshape(shape)
    if out.size and not _shares(out, array):
        raise ValueError(f"reshape of {array.shape} to {shape} would copy")
    return out


def _shares(a, b):
    return a.data.ptr == b.data.ptr if hasattr(a.data, "ptr") else True


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel, stride, pad and dilation per spatial axis (all tuples of equal length)."""
    kernel: tuple
    stride: tuple
    pad: tuple
    dilation: tuple

    @property
    def extent(self):
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation))

    @property
    def taps(self):
        return int(np.prod(self.kernel, dtype=np.int64))

    @property
    def is_1x1(self):
        # Caffe's test: dilation does not matter for a 1-wide kernel.
        return all(k == 1 and s == 1 and p == 0
                   for k, s, p in zip(self.kernel, self.stride, self.pad))

    def conv_output_shape(self, in_shape):
        """Convolution output per axis: (in + 2p - extent) / s + 1."""
        return tuple((i + 2 * p - e) // s + 1
                     for i, p, e, s in zip(in_shape, self.pad, self.extent, self.stride))

    def deconv_output_shape(self, in_shape):
        """Transposed convolution output per axis: s(in - 1) + extent - 2p."""
        return tuple(s * (i - 1) + e - 2 * p
                     for i, p, e, s in zip(in_shape, self.pad, self.extent, self.stride))


# ----------------------------------------------------------------------- im2col
def _valid_range(n_out, size_in, offset, stride, start, stop):
    """Grid indices o in [start, stop) whose image index o*stride + offset is inside."""
    lo = max(start, -(offset // stride))
    hi = min(stop, (size_in - 1 - offset) // stride + 1)
    return lo, max(lo, hi)


def _tap_slices(geom, tap, img_shape, grid_shape, r0, r1):
    """(image slices, column slices relative to the band, per-axis (lo, hi, n)) of a tap.

    Returns None when the tap reads no image pixel inside the band."""
    img_sl, col_sl, ranges = [], [], []
    for a, (u, size, n) in enumerate(zip(tap, img_shape, grid_shape)):
        s, offset = geom.stride[a], u * geom.dilation[a] - geom.pad[a]
        start, stop = (r0, r1) if a == 0 else (0, n)
        lo, hi = _valid_range(n, size, offset, s, start, stop)
        if lo >= hi:
            return None
        img_sl.append(slice(lo * s + offset, (hi - 1) * s + offset + 1, s))
        col_sl.append(slice(lo - start, hi - start))
        ranges.append((lo - start, hi - start, stop - start))
    return tuple(img_sl), tuple(col_sl), ranges


def im2col(image, col, geom, grid_shape, r0, r1):
    """Fill ``col`` (C, *kernel, r1-r0, *grid_shape[1:]) from ``image`` (C, *img_shape)
    for the band of grid rows [r0, r1) along the first spatial axis."""
    img_shape = image.shape[1:]
    for tap in itertools.product(*(range(k) for k in geom.kernel)):
        dst = col[(slice(None),) + tap]
        sl = _tap_slices(geom, tap, img_shape, grid_shape, r0, r1)
        if sl is None:
            dst[...] = 0
            continue
        img_sl, col_sl, ranges = sl
        dst[(slice(None),) + col_sl] = image[(slice(None),) + img_sl]
        # Zero the border slabs that fall into the padding.
        for a, (lo, hi, n) in enumerate(ranges):
            lead = (slice(None),) * (a + 1)
            if lo > 0:
                dst[lead + (slice(0, lo),)] = 0
            if hi < n:
                dst[lead + (slice(hi, n),)] = 0


def col2im(col, image, geom, grid_shape, r0, r1):
    """Adjoint of ``im2col``: ``image`` += the taps of ``col`` (accumulates, Caffe's order)."""
    img_shape = image.shape[1:]
    for tap in itertools.product(*(range(k) for k in geom.kernel)):
        sl = _tap_slices(geom, tap, img_shape, grid_shape, r0, r1)
        if sl is None:
            continue
        img_sl, col_sl, _ = sl
        image[(slice(None),) + img_sl] += col[(slice(None),) + tap + col_sl]


def rows_per_chunk(channels, geom, grid_shape, itemsize, budget=None):
    """How many grid rows (first spatial axis) one column buffer may hold."""
    budget = COL_BUFFER_BYTES if budget is None else budget
    row_bytes = channels * geom.taps * int(np.prod(grid_shape[1:], dtype=np.int64)) * itemsize
    return int(max(1, min(grid_shape[0], budget // max(row_bytes, 1))))


def _bands(n_rows, chunk):
    for r0 in range(0, n_rows, chunk):
        yield r0, min(n_rows, r0 + chunk)


def _band_col(slot, channels, geom, grid_shape, r0, r1, dtype, xp):
    rows = r1 - r0
    rest = tuple(grid_shape[1:])
    count = channels * geom.taps * rows * int(np.prod(rest, dtype=np.int64))
    return view(_scratch(slot, count, dtype, xp), (channels,) + tuple(geom.kernel) + (rows,) + rest)


# ------------------------------------------------------------------ the three GEMMs
# Shapes: image (N, C, *img_shape), grid (N, O, *grid_shape), weight (O, C/group, *kernel).
# Convolution: forward = forward_gemm(bottom -> top); backward = weight_gemm + backward_gemm.
# Deconvolution swaps the roles (image = top, grid = bottom).

def forward_gemm(image, weight, out, geom, group, budget=None):
    """out[n] = W * im2col(image[n]) per group (overwrites ``out``)."""
    xp = get_array_module(image)
    num, channels = image.shape[:2]
    n_out = weight.shape[0]
    grid_shape = out.shape[2:]
    w3 = view(weight, (group, n_out // group, -1))
    if geom.is_1x1:
        cols = int(np.prod(grid_shape, dtype=np.int64))
        xp.matmul(w3, view(image, (num, group, channels // group, cols)),
                  out=view(out, (num, group, n_out // group, cols)))
        return
    chunk = rows_per_chunk(channels, geom, grid_shape, image.dtype.itemsize, budget)
    for n in range(num):
        for r0, r1 in _bands(grid_shape[0], chunk):
            col = _band_col("col", channels, geom, grid_shape, r0, r1, image.dtype, xp)
            im2col(image[n], col, geom, grid_shape, r0, r1)
            band = out[n, :, r0:r1]
            xp.matmul(w3, view(col, (group, w3.shape[2], -1)),
                      out=view(band, (group, n_out // group, -1)))


def backward_gemm(grid, weight, image, geom, group, budget=None):
    """image[n] = col2im(W^T * grid[n]) per group (overwrites ``image``)."""
    xp = get_array_module(grid)
    num, n_out = grid.shape[:2]
    channels = image.shape[1]
    grid_shape = grid.shape[2:]
    w3t = view(weight, (group, n_out // group, -1)).transpose(0, 2, 1)
    if geom.is_1x1:
        cols = int(np.prod(grid_shape, dtype=np.int64))
        xp.matmul(w3t, view(grid, (num, group, n_out // group, cols)),
                  out=view(image, (num, group, channels // group, cols)))
        return
    image[...] = 0
    chunk = rows_per_chunk(channels, geom, grid_shape, grid.dtype.itemsize, budget)
    for n in range(num):
        for r0, r1 in _bands(grid_shape[0], chunk):
            col = _band_col("dcol", channels, geom, grid_shape, r0, r1, grid.dtype, xp)
            band = grid[n, :, r0:r1]
            xp.matmul(w3t, view(band, (group, n_out // group, -1)),
                      out=view(col, (group, w3t.shape[1], -1)))
            col2im(col, image[n], geom, grid_shape, r0, r1)


def weight_gemm(image, grid, weight_diff, geom, group, budget=None):
    """weight_diff += sum_n grid[n] * im2col(image[n])^T per group (accumulates)."""
    xp = get_array_module(image)
    num, channels = image.shape[:2]
    n_out = grid.shape[1]
    grid_shape = grid.shape[2:]
    dw3 = view(weight_diff, (group, n_out // group, -1))
    if geom.is_1x1:
        cols = int(np.prod(grid_shape, dtype=np.int64))
        g4 = view(grid, (num, group, n_out // group, cols))
        i4 = view(image, (num, group, channels // group, cols))
        for n in range(num):
            dw3 += xp.matmul(g4[n], i4[n].transpose(0, 2, 1))
        return
    chunk = rows_per_chunk(channels, geom, grid_shape, image.dtype.itemsize, budget)
    for n in range(num):
        for r0, r1 in _bands(grid_shape[0], chunk):
            col = _band_col("col", channels, geom, grid_shape, r0, r1, image.dtype, xp)
            im2col(image[n], col, geom, grid_shape, r0, r1)
            band = view(grid[n, :, r0:r1], (group, n_out // group, -1))
            dw3 += xp.matmul(band, view(col, (group, dw3.shape[2], -1)).transpose(0, 2, 1))
