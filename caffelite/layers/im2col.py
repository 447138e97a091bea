"""im2col / col2im and the three convolution GEMMs shared by Convolution and Deconvolution.

Caffe's column layout: row ``(c*kh + u)*kw + v`` (channel-major, then kernel taps), column
``i*W_out + j`` (the output grid).  ``im2col`` copies, per kernel tap, one strided slice
of the image into its rows (no padded copy of the image: out-of-range positions are
written as zeros), so the work is a handful of vectorised copies per tap.  ``col2im`` is
its adjoint and accumulates the taps in Caffe's order.

The column buffer is built for a band of output rows at a time (``rows_per_chunk``) so
that it stays under ``COL_BUFFER_BYTES`` however large the image; each band is one 2-D
GEMM per convolution group. On the host, small images share one buffer, still one GEMM
per image (``_host_image_runs``).  Convolutions with a 1x1 kernel, stride 1 and no
padding skip im2col (the image already is its column matrix; on the device under TF32,
large ones on odd grids run as padded image groups instead, see ``_direct_1x1``). On
the host, 2-D stride-1 convolutions with one group and at most half as many outputs as
input channels (classifier heads) skip it too: one product per image gives every tap's
output plane, and the planes are shifted and summed (``tap_planes``, which says when
else it applies).

Everything is written against ``xp`` (numpy or cupy, taken from the arrays).  On the
device, 2-D convolutions run the ``im2col``/``col2im`` CUDA kernels
(``caffelite/kernels/im2col.cu``) instead of the per-tap slices, on runs of whole images
side by side where they fit ``DEVICE_COL_BUFFER_BYTES`` (one GEMM for several images;
see "whole images, several per GEMM" below), else per image and band.  ``col2im`` there
gathers each pixel's taps last to first (Caffe's GPU order), so it may differ from the
numpy ``col2im`` in the last bits.  N-D convolutions use the slices on both sides.
Device convolutions whose taps mostly reach the zero padding (large dilations on small
grids) skip im2col: one GEMM per tap over the outputs it reaches (``tap_gemm``). With
TF32 on and ``implicit_gemm.ENABLED``, device forwards, stride-1 data gradients and
weight gradients gather their columns inside tensor-core kernels instead
(``implicit_gemm``).
"""
import functools
import itertools
import math
import os
import threading
from dataclasses import dataclass

import numpy as np

from .. import backend, host_threads
from ..backend import get_array_module, tf32_enabled
from ..kernels import MAX_ELEMENTS as MAX_KERNEL_ELEMENTS
from ..kernels.cublas import gemm
from . import conv_autotune, implicit_gemm, tap_gemm, tap_planes
from ._device import contiguous, launch

# Upper bound on the column buffer: on the host it stays cache- and RAM-friendly; on a
# GPU larger buffers mean fewer, larger cuBLAS GEMMs (whole images, several per GEMM, for
# every DeepLab layer at 321x321; Caffe itself keeps a whole-image buffer per layer).
# CAFFELITE_DEVICE_WORKSPACE_MB sets the device's (512 MiB by default).
def _device_workspace_bytes():
    text = os.environ.get("CAFFELITE_DEVICE_WORKSPACE_MB", "512")
    try:
        megabytes = int(text)
    except ValueError:
        megabytes = 0
    if megabytes < 1:
        raise ValueError(f"CAFFELITE_DEVICE_WORKSPACE_MB must be a whole number of MiB, at "
                         f"least 1; got {text!r}")
    return megabytes << 20


COL_BUFFER_BYTES = 16 << 20
DEVICE_COL_BUFFER_BYTES = None      # None: CAFFELITE_DEVICE_WORKSPACE_MB, read when used


def device_col_buffer_bytes():
    return DEVICE_COL_BUFFER_BYTES or _device_workspace_bytes()

# One column buffer per array module and thread (Caffe's shared col_buffer): the GEMMs
# below use it one at a time, so forward, weight and data gradients of every layer of a
# thread share it; nets running in other threads have their own.
class _Workspaces(threading.local):
    def __init__(self):
        self.buffers = {}


_workspaces = _Workspaces()


def _scratch(count, dtype, xp):
    """A reusable flat buffer of ``count`` elements of ``dtype`` (not zeroed)."""
    dtype = np.dtype(dtype)
    nbytes = max(count, 1) * dtype.itemsize
    workspace = _workspaces.buffers
    buf = workspace.get(xp.__name__)
    if buf is None or buf.size < nbytes:
        workspace.pop(xp.__name__, None)        # let the old buffer go first
        buf = xp.empty(nbytes, np.uint8)
        workspace[xp.__name__] = buf
    if xp is not np:
        backend.graph_buffer(buf)
    return buf[:count * dtype.itemsize].view(dtype)


def release_workspace():
    """Drop this thread's cached column buffers (they are re-created on demand)."""
    _workspaces.buffers.clear()


def workspace_buffers():
    """{array module name: the byte buffer} of this thread's column workspace."""
    return dict(_workspaces.buffers)


def view(array, shape):
    """Reshape that must not copy (a copy would silently lose writes through it)."""
    if get_array_module(array) is np:
        return array.reshape(shape, copy=False)
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
        return math.prod(self.kernel)

    @property
    def is_1x1(self):
        # Caffe's test: dilation does not matter for a 1-wide kernel.
        return all(k == 1 and s == 1 and p == 0
                   for k, s, p in zip(self.kernel, self.stride, self.pad))

    def conv_output_shape(self, in_shape):
        """Convolution output per axis: (in + 2p - extent) / s + 1, with C's integer
        division (truncation toward zero): a numerator in (-s, 0) still gives 1."""
        return tuple(_c_div(i + 2 * p - e, s) + 1
                     for i, p, e, s in zip(in_shape, self.pad, self.extent, self.stride))

    def deconv_output_shape(self, in_shape):
        """Transposed convolution output per axis: s(in - 1) + extent - 2p."""
        return tuple(s * (i - 1) + e - 2 * p
                     for i, p, e, s in zip(in_shape, self.pad, self.extent, self.stride))


def _c_div(a, b):
    """a / b for ints as C computes it (b > 0): truncated toward zero."""
    return -(-a // b) if a < 0 else a // b


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
    for the band of grid rows [r0, r1) along the first spatial axis (the channels
    shared out over the host threads)."""
    _by_channels(_im2col, image, col, geom, grid_shape, r0, r1)


def _by_channels(function, image, col, *args):
    """``function(image, col, *args)`` over matching channel ranges of both, shared out
    over the host threads (one call for device arrays)."""
    if not host_threads.on_host(image, col):
        function(image, col, *args)
        return
    host_threads.for_ranges(lambda lo, hi: function(image[lo:hi], col[lo:hi], *args),
                            image.shape[0], col[0].size)


def _im2col(image, col, geom, grid_shape, r0, r1):
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
    """Adjoint of ``im2col``: ``image`` += the taps of ``col`` (accumulates, Caffe's
    order; the channels shared out over the host threads)."""
    _by_channels(_col2im, image, col, geom, grid_shape, r0, r1)


def _col2im(image, col, geom, grid_shape, r0, r1):
    img_shape = image.shape[1:]
    for tap in itertools.product(*(range(k) for k in geom.kernel)):
        sl = _tap_slices(geom, tap, img_shape, grid_shape, r0, r1)
        if sl is None:
            continue
        img_sl, col_sl, _ = sl
        image[(slice(None),) + img_sl] += col[(slice(None),) + tap + col_sl]


def rows_per_chunk(channels, geom, grid_shape, itemsize, budget=None, xp=np):
    """How many grid rows (first spatial axis) one column buffer may hold."""
    if budget is None:
        budget = COL_BUFFER_BYTES if xp is np else device_col_buffer_bytes()
    row_bytes = channels * geom.taps * int(np.prod(grid_shape[1:], dtype=np.int64)) * itemsize
    return int(max(1, min(grid_shape[0], budget // max(row_bytes, 1))))


def _bands(n_rows, chunk):
    for r0 in range(0, n_rows, chunk):
        yield r0, min(n_rows, r0 + chunk)


def _band_col(channels, geom, grid_shape, r0, r1, dtype, xp):
    rows = r1 - r0
    rest = tuple(grid_shape[1:])
    count = channels * geom.taps * rows * int(np.prod(rest, dtype=np.int64))
    return view(_scratch(count, dtype, xp), (channels,) + tuple(geom.kernel) + (rows,) + rest)


# ------------------------------------------------------ whole images, on the host
# Small images (LeNet's 28x28, CIFAR's 32x32) cost more in Python than in copying: one
# set of tap slices per image and layer. Where several images' columns fit the host
# buffer, one set of slices fills them all, laid out (images, C, *kernel, *grid) so that
# each image's column matrix is the one the per-image path builds. The GEMMs stay one
# per image, in image order (Caffe's calls), so the results are the same bits.
HOST_IMAGE_RUNS = True      # False: one image (or band of rows) per column buffer


def _host_image_runs(xp, geom, image, grid, budget):
    """[(n0, n1), ...]: runs of at least two whole images whose host columns fit the
    column buffer together, or None (an image or band at a time)."""
    if not HOST_IMAGE_RUNS or xp is not np or image.shape[0] < 2 \
            or not (image.flags.c_contiguous and grid.flags.c_contiguous):
        return None
    num, channels = image.shape[:2]
    image_bytes = channels * geom.taps * math.prod(grid.shape[2:]) * image.dtype.itemsize
    per_run = min(num, (COL_BUFFER_BYTES if budget is None else budget)
                  // max(image_bytes, 1))
    if per_run < 2:
        return None
    return [(n0, min(num, n0 + per_run)) for n0 in range(0, num, per_run)]


def _run_col(count, channels, geom, grid_shape, dtype):
    """The host column buffer of ``count`` whole images: (count, C, *kernel, *grid)."""
    shape = (count, channels) + tuple(geom.kernel) + tuple(grid_shape)
    return view(_scratch(int(np.prod(shape, dtype=np.int64)), dtype, np), shape)


def _as_channels(array):
    """(N, C, ...) as (N*C, ...): im2col and col2im treat their first axis as channels."""
    return view(array, (-1,) + array.shape[2:])


def _filled_host_runs(image, geom, grid_shape, runs):
    """Per run of images: (n0, n1, its columns filled by im2col); the next run reuses
    the buffer."""
    for n0, n1 in runs:
        col = _run_col(n1 - n0, image.shape[1], geom, grid_shape, image.dtype)
        im2col(_as_channels(image[n0:n1]), _as_channels(col), geom, grid_shape, 0,
               grid_shape[0])
        yield n0, n1, col


def _uses_kernels(xp, geom):
    return xp is not np and len(geom.kernel) == 2


def _kernel_geometry(geom, image_shape, grid_shape, r0, r1, num=1, col_ld=None):
    """The im2col.cu arguments after the data pointer, up to ``col_ld``, for ``num``
    images of ``image_shape`` (C, H, W)."""
    (kh, kw), (sh, sw) = geom.kernel, geom.stride
    (ph, pw), (dh, dw) = geom.pad, geom.dilation
    if col_ld is None:
        col_ld = num * (r1 - r0) * grid_shape[1]
    return (image_shape[0], image_shape[1], image_shape[2], kh, kw, ph, pw, sh, sw, dh, dw,
            grid_shape[1], r0, r1 - r0, num, col_ld)


def im2col_band(xp, image, col, geom, grid_shape, r0, r1):
    """``im2col`` on either side: the CUDA kernel for 2-D device arrays."""
    if not _uses_kernels(xp, geom):
        im2col(image, col, geom, grid_shape, r0, r1)
        return
    channels = image.shape[0]
    launch("im2col", "im2col", image.dtype, channels * (r1 - r0) * grid_shape[1],
           contiguous(xp, image),
           *_kernel_geometry(geom, image.shape, grid_shape, r0, r1), col)


def col2im_band(xp, col, image, geom, grid_shape, r0, r1, first):
    """``col2im`` of one band into ``image``: overwrites it for the ``first`` band,
    adds to it for the later ones."""
    if not _uses_kernels(xp, geom):
        if first:
            image[...] = 0
        col2im(col, image, geom, grid_shape, r0, r1)
        return
    launch("im2col", "col2im", image.dtype, image.size, col,
           *_kernel_geometry(geom, image.shape, grid_shape, r0, r1), int(not first), image)


# ------------------------------------------------------- whole images, several per GEMM
# On the device, when whole images fit the column budget, the columns of consecutive
# images sit side by side, (C*taps) x (images * grid), so that each product is one wide
# cuBLAS GEMM (Caffe makes one per image: small GEMMs for the deep layers of a batch).
# With TF32 the leading dimension is rounded up to COLUMN_ALIGN: a 41x41 or 321x321 grid
# is an odd row length, which keeps cuBLAS off its tensor-core kernels. The product's
# (O, images, grid) result is transposed into the (images, O, grid) blob.
COLUMN_ALIGN = 4
GROUP_IMAGES = True      # False: one GEMM per image on unpadded columns, as Caffe does


def column_align(dtype):
    """The multiple a group's column count is padded to: COLUMN_ALIGN where GEMMs run in
    TF32 (float32 with the TF32 flag), else 1. Unpadded, a one-image group needs no
    copies: its GEMMs read and write the blobs themselves, as Caffe's do."""
    return COLUMN_ALIGN if tf32_enabled() and np.dtype(dtype) == np.float32 else 1


def _aligned(count, align):
    return -(-count // align) * align


def image_groups(num, channels, geom, grid_shape, dtype, budget=None):
    """[(n0, n1), ...]: runs of whole images whose (padded) columns fit the device column
    budget, or None (bands of rows, one image per GEMM) when one image's columns do not
    or GROUP_IMAGES is off."""
    if not GROUP_IMAGES:
        return None
    if budget is None:
        budget = device_col_buffer_bytes()
    plane = int(np.prod(grid_shape, dtype=np.int64))
    rows, itemsize, align = channels * geom.taps, np.dtype(dtype).itemsize, column_align(dtype)
    budget = min(budget, MAX_KERNEL_ELEMENTS * itemsize)   # the kernels index with int
    if rows * _aligned(plane, align) * itemsize > budget:
        return None
    per_group = max(num, 1)            # no images: no groups
    while per_group > 1 and rows * _aligned(per_group * plane, align) * itemsize > budget:
        per_group -= 1
    return [(n0, min(num, n0 + per_group)) for n0 in range(0, num, per_group)]


def _group_col(channels, geom, count, dtype, xp):
    """The (C*taps, padded count) column matrix of a group in the shared workspace."""
    rows, ld = channels * geom.taps, _aligned(count, column_align(dtype))
    return view(_scratch(rows * ld, dtype, xp), (rows, ld))


def _group_im2col(xp, images, col, geom, grid_shape):
    num, channels = images.shape[:2]
    plane = int(np.prod(grid_shape))
    launch("im2col", "im2col", images.dtype, channels * num * plane,
           contiguous(xp, images),
           *_kernel_geometry(geom, images.shape[1:], grid_shape, 0, grid_shape[0], num,
                             col.shape[1]), col)


def _group_col2im(xp, col, images, geom, grid_shape):
    launch("im2col", "col2im", images.dtype, images.size, col,
           *_kernel_geometry(geom, images.shape[1:], grid_shape, 0, grid_shape[0],
                             images.shape[0], col.shape[1]), 0, images)


def _grid_rows(grid, n_out, ld, xp):
    """grid (m, O, *g) as an (O, ld) matrix: (O, m * plane) then zero padding columns;
    the blob itself for one image without padding."""
    m = grid.shape[0]
    count = grid[0, 0].size * m
    if m == 1 and ld == count:
        return view(grid, (n_out, count))
    out = xp.empty((n_out, ld), grid.dtype)
    view(out[:, :count], (n_out, m, -1))[...] = view(grid, (m, n_out, -1)).transpose(1, 0, 2)
    if ld > count:
        out[:, count:] = 0
    return out


def _filled_group_columns(images, geom, grid_shape, groups, xp):
    """Per group of images: (n0, n1, column count, the workspace's column matrix filled
    by im2col); the next group reuses the matrix."""
    plane = int(np.prod(grid_shape))
    for n0, n1 in groups:
        count = (n1 - n0) * plane
        col = _group_col(images.shape[1], geom, count, images.dtype, xp)
        _group_im2col(xp, images[n0:n1], col, geom, grid_shape)
        yield n0, n1, count, col


def _forward_groups(image, w_g, out, geom, group, groups, xp, bias=None):
    for n0, n1, count, col in _filled_group_columns(image, geom, out.shape[2:], groups, xp):
        _group_product(w_g, col, out, n0, n1, count, group, xp, bias)


def _group_product(w_g, col, out, n0, n1, count, group, xp, bias=None):
    """out[n0:n1] = W * col (+ bias per output channel) per group: in place for one
    image on unpadded columns, else through a (O, columns) matrix copied out image by
    image, the bias added in the same pass (the same sums as adding it afterwards)."""
    n_out = out.shape[1]
    direct = n1 - n0 == 1 and col.shape[1] == count
    rows = (view(out[n0], (n_out, count)) if direct else
            xp.empty((n_out, col.shape[1]), col.dtype))
    for w, c, o in _group_blocks(w_g, col, rows, group):
        gemm(xp, w, c, o)
    if direct:
        if bias is not None:
            rows += bias.reshape(n_out, 1)
        return
    target = view(out[n0:n1], (n1 - n0, n_out, -1))
    product = view(rows[:, :count], (n_out, n1 - n0, -1)).transpose(1, 0, 2)
    if bias is None:
        target[...] = product
    else:
        xp.add(product, bias.reshape(1, n_out, 1), out=target)


def _backward_groups(grid, w_g, image, geom, group, groups, xp):
    channels, n_out = image.shape[1], grid.shape[1]
    grid_shape = grid.shape[2:]
    plane = int(np.prod(grid_shape))
    for n0, n1 in groups:
        col = _group_col(channels, geom, (n1 - n0) * plane, grid.dtype, xp)
        rows = _grid_rows(grid[n0:n1], n_out, col.shape[1], xp)
        for w, b, c in _group_blocks(w_g, rows, col, group):
            gemm(xp, w.T, b, c)
        _group_col2im(xp, col, image[n0:n1], geom, grid_shape)


def _weight_groups(image, grid, dw_g, geom, group, groups, xp):
    for _ in _weight_group_steps(image, grid, dw_g, geom, group, groups, xp):
        pass


def _weight_group_steps(image, grid, dw_g, geom, group, groups, xp):
    """Per group of images: dW += grid rows * columns^T; then yields (n0, n1, count,
    the columns of ``image``, the group's rows of ``grid``) for the caller's other
    product from the same matrices, before the next group reuses the workspace."""
    n_out = grid.shape[1]
    for n0, n1, count, col in _filled_group_columns(image, geom, grid.shape[2:], groups, xp):
        if col.shape[1] > count:
            col[:, count:] = 0      # the padding columns meet zeros of the grid rows
        rows = _grid_rows(grid[n0:n1], n_out, col.shape[1], xp)
        for dw, b, c in _group_blocks(dw_g, rows, col, group):
            gemm(xp, b, c.T, dw, accumulate=True)
        yield n0, n1, count, col, rows


def _weight_and_backward_groups(image, grid, w_g, dw_g, image_diff, geom, group, groups,
                                xp):
    """Per group of images: the weight gradient, then the data gradient, from one
    gathering of the group's output gradient (Caffe interleaves the two per image too).
    Each product is the one _weight_groups and _backward_groups make, in their order,
    so the bits are theirs."""
    for n0, n1, _, col, rows in _weight_group_steps(image, grid, dw_g, geom, group,
                                                     groups, xp):
        for w, b, c in _group_blocks(w_g, rows, col, group):
            gemm(xp, w.T, b, c)
        _group_col2im(xp, col, image_diff[n0:n1], geom, grid.shape[2:])


def _weight_and_forward_groups(image, grid, w_g, dw_g, out, geom, group, groups, xp):
    """Per group of images: the weight gradient, then the product into ``out``, from
    one im2col of the group (a Deconvolution's backward: both read its top's gradient
    as columns). Each product is the one _weight_groups and _forward_groups make, so
    the bits are theirs."""
    for n0, n1, count, col, _ in _weight_group_steps(image, grid, dw_g, geom, group,
                                                      groups, xp):
        _group_product(w_g, col, out, n0, n1, count, group, xp)


def device_settings():
    """The module settings that choose a device convolution's paths: a CUDA graph
    recorded under others is not launched (``cuda_graphs``)."""
    return (_path_settings(None), PADDED_1X1_FLOP, implicit_gemm.ENABLED,
            implicit_gemm.MIN_TILES_PER_SM, tap_gemm.ENABLED, tap_gemm.MAX_REACH,
            tap_gemm.MIN_SAVED_FLOPS, conv_autotune.settings())


def _path_settings(budget):
    """The settings that change what a named path does (its column buffer and image
    groups, the implicit GEMM's tile and pixel runs): part of an autotuned choice's
    key."""
    return (GROUP_IMAGES, DEVICE_COL_BUFFER_BYTES, budget, implicit_gemm.TILE,
            implicit_gemm.SPLITS)


def _device_groups(xp, geom, num, channels, grid_shape, dtype, budget):
    if not _uses_kernels(xp, geom):
        return None
    return image_groups(num, channels, geom, grid_shape, dtype, budget)


# A 1x1 convolution's GEMMs read and write the blobs themselves, one per image. With
# TF32, an odd grid (DeepLab's 41x41, 65x65) gives them an odd leading dimension, which
# keeps cuBLAS off its fast tensor-core kernels: the reason image groups pad their
# columns (an H200 ran a 512 x 4608 by 4608 x 6561 product at 102 TFLOP/s, a quarter of
# its aligned rate). So large ones run as image groups too: "im2col" copies the images
# side by side into padded columns, and the product is copied back with the bias, as
# for 3x3 kernels. ASPP-VGG's fc7 (1024 x 1024 on 41x41, 10 images: 35 GFLOP a
# product) takes it; products under PADDED_1X1_FLOP (ResNet-101's bottlenecks at batch
# 1, the 21-class fc8) keep the blobs, where the two copies would cost about what they
# save. Not yet measured on a device (gpu_train.py's caffelite-blob-1x1 engine).
PADDED_1X1_FLOP = 4e9


def _direct_1x1(xp, geom, image_shape, n_out, grid_shape, dtype, budget):
    """Whether a convolution of (N, C, ...) images into ``n_out`` channels is a 1x1
    whose GEMMs take the blobs as they are (not padded image groups)."""
    if not geom.is_1x1:
        return False
    num, channels = image_shape[:2]
    plane = int(np.prod(grid_shape, dtype=np.int64))
    return not (_uses_kernels(xp, geom) and plane % column_align(dtype) != 0
                and 2.0 * n_out * channels * num * plane >= PADDED_1X1_FLOP
                and image_groups(num, channels, geom, grid_shape, dtype, budget))


# ------------------------------------------------------------------ the three GEMMs
# Shapes: image (N, C, *img_shape), grid (N, O, *grid_shape), weight (O, C/group, *kernel).
# Convolution: forward = forward_gemm(bottom -> top); backward = weight_gemm + backward_gemm.
# Deconvolution swaps the roles (image = top, grid = bottom).
#
# Every product is one 2-D GEMM per group (Caffe's gemm calls): on the GPU one
# cublasGemmEx (kernels.cublas) that takes transposed operands as they are, honours the
# TF32 flag, accumulates weight gradients with beta = 1 as Caffe does, and can be
# recorded into a CUDA graph.

def _per_group(matrix, group):
    """The (rows/group, cols) blocks of a (rows, cols) matrix view, one per group."""
    if group == 1:
        return (matrix,)        # no view to make (a CuPy view costs microseconds)
    rows = matrix.shape[0] // group
    return [matrix[g * rows:(g + 1) * rows] for g in range(group)]


def _matrix(array, rows):
    return view(array, (rows, -1))


def forward_gemm(image, weight, out, geom, group, budget=None, bias=None):
    """out[n] = W * im2col(image[n]) per group (overwrites ``out``). With ``bias`` (O,),
    the paths that copy their products out add it in that copy; True when they did
    (the caller adds it otherwise)."""
    xp = get_array_module(image)
    if conv_autotune.active(xp):
        paths = _forward_paths(xp, image, weight, out, geom, group, budget, bias)
        path = _tuned_path(xp, "forward", paths, image, weight, out, geom, group, budget,
                           bias=bias is not None)
        if path is not None:
            return paths[path]()
    n_out = weight.shape[0]
    grid_shape = out.shape[2:]
    if _direct_1x1(xp, geom, image.shape, n_out, grid_shape, image.dtype, budget):
        return _forward_blobs(xp, image, weight, out, group)
    planes = tap_planes.windows_for(xp, geom, image.shape, grid_shape, weight.shape, group,
                                    image.dtype)
    if planes is not None:
        tap_planes.forward(image, weight, out, planes)
        return False
    if implicit_gemm.applies_forward(xp, geom, image, weight, out, group):
        implicit_gemm.forward(xp, image, weight, out, geom, bias)
        return bias is not None
    windows = tap_gemm.windows_for(xp, geom, image.shape, grid_shape, weight.shape)
    if windows:
        tap_gemm.forward(xp, image, weight, out, windows, group)
        return False
    return _forward_columns(xp, image, weight, out, geom, group, budget, bias)


def _group_blocks(w_g, a, b, group):
    """(weight block, a block, b block) per group of one product of the matrices ``a``
    and ``b``, ``w_g`` the weight's per-group blocks."""
    return zip(w_g, _per_group(a, group), _per_group(b, group))


def _blob_blocks(weight, a, b, group):
    """(weight block, a block, b block) per image and group of a 1x1 product on the
    blobs: ``weight`` (rows, ...) and the images of ``a`` and ``b`` (N, channels, ...)
    as matrices."""
    w_g = _per_group(_matrix(weight, weight.shape[0]), group)
    for n in range(a.shape[0]):
        yield from _group_blocks(w_g, _matrix(a[n], a.shape[1]), _matrix(b[n], b.shape[1]),
                                 group)


def _host_image_columns(xp, image, grid, geom, budget):
    """(n, r0, r1, columns) for image ``n``'s im2col columns (a matrix) of grid rows
    r0:r1 on the host: whole images in runs where the column buffer holds two or more,
    else bands of rows (each buffer reused for the next)."""
    num, channels = image.shape[:2]
    grid_shape = grid.shape[2:]
    rows = channels * geom.taps
    runs = _host_image_runs(xp, geom, image, grid, budget)
    if runs:
        for n0, n1, col in _filled_host_runs(image, geom, grid_shape, runs):
            for n in range(n0, n1):
                yield n, 0, grid_shape[0], _matrix(col[n - n0], rows)
        return
    chunk = rows_per_chunk(channels, geom, grid_shape, image.dtype.itemsize, budget, xp)
    for n in range(num):
        for r0, r1 in _bands(grid_shape[0], chunk):
            col = _band_col(channels, geom, grid_shape, r0, r1, image.dtype, xp)
            im2col_band(xp, image[n], col, geom, grid_shape, r0, r1)
            yield n, r0, r1, _matrix(col, rows)


def add_bias(out, bias):
    """out (N, O, ...) += bias (O,) per channel, the channels shared out over the host
    threads (the products that do not add it as they copy out)."""
    bias = bias.reshape((1, -1) + (1,) * (out.ndim - 2))

    def add(lo, hi):
        part = out[:, lo:hi]          # a name: += stays in place (no setitem)
        part += bias[:, lo:hi]
    host_threads.for_axis(add, out)


def _forward_blobs(xp, image, weight, out, group):
    """A 1x1 forward on the blobs themselves, one product per image (no bias added)."""
    for w, c, o in _blob_blocks(weight, image, out, group):
        gemm(xp, w, c, o)
    return False


def _forward_columns(xp, image, weight, out, geom, group, budget, bias):
    """The forward through im2col columns: image groups on the device, runs of images
    or bands of rows on the host. True when the bias was added."""
    num, channels = image.shape[:2]
    n_out = weight.shape[0]
    w_g = _per_group(_matrix(weight, n_out), group)
    groups = _device_groups(xp, geom, num, channels, out.shape[2:], image.dtype, budget)
    if groups:
        _forward_groups(image, w_g, out, geom, group, groups, xp, bias)
        return bias is not None
    for n, r0, r1, col in _host_image_columns(xp, image, out, geom, budget):
        for w, c, o in _group_blocks(w_g, col, _matrix(out[n, :, r0:r1], n_out), group):
            gemm(xp, w, c, o)
    return False


def backward_gemm(grid, weight, image, geom, group, budget=None):
    """image[n] = col2im(W^T * grid[n]) per group (overwrites ``image``)."""
    xp = get_array_module(grid)
    if conv_autotune.active(xp):
        paths = _backward_paths(xp, grid, weight, image, geom, group, budget)
        path = _tuned_path(xp, "data", paths, image, weight, grid, geom, group, budget)
        if path is not None:
            paths[path]()
            return
    n_out = grid.shape[1]
    grid_shape = grid.shape[2:]
    if _direct_1x1(xp, geom, image.shape, n_out, grid_shape, grid.dtype, budget):
        _backward_blobs(xp, grid, weight, image, group)
        return
    planes = tap_planes.windows_for(xp, geom, image.shape, grid_shape, weight.shape, group,
                                    grid.dtype)
    if planes is not None:
        tap_planes.backward(grid, weight, image, planes)
        return
    if implicit_gemm.applies_transposed(xp, geom, grid, weight, image, group):
        implicit_gemm.transposed(xp, grid, weight, image, geom)
        return
    windows = tap_gemm.windows_for(xp, geom, image.shape, grid_shape, weight.shape)
    if windows:
        tap_gemm.backward(xp, grid, weight, image, windows, group)
        return
    _backward_columns(xp, grid, weight, image, geom, group, budget)


def _backward_blobs(xp, grid, weight, image, group):
    """A 1x1 data gradient on the blobs themselves, one product per image."""
    for w, g, c in _blob_blocks(weight, grid, image, group):
        gemm(xp, w.T, g, c)


def _backward_columns(xp, grid, weight, image, geom, group, budget):
    """The data gradient through columns and col2im: image groups on the device, runs
    of images or bands of rows on the host."""
    num, n_out = grid.shape[:2]
    channels = image.shape[1]
    grid_shape = grid.shape[2:]
    w_g = _per_group(_matrix(weight, n_out), group)

    def product(band, col):
        for w, b, c in _group_blocks(w_g, band, col, group):
            gemm(xp, w.T, b, c)

    groups = _device_groups(xp, geom, num, channels, grid_shape, grid.dtype, budget)
    if groups:
        _backward_groups(grid, w_g, image, geom, group, groups, xp)
        return
    runs = _host_image_runs(xp, geom, image, grid, budget)
    if runs:
        for n0, n1 in runs:
            col = _run_col(n1 - n0, channels, geom, grid_shape, grid.dtype)
            for n in range(n0, n1):
                product(_matrix(grid[n], n_out), _matrix(col[n - n0], channels * geom.taps))
            images = image[n0:n1]
            images[...] = 0
            col2im(_as_channels(col), _as_channels(images), geom, grid_shape, 0,
                   grid_shape[0])
        return
    chunk = rows_per_chunk(channels, geom, grid_shape, grid.dtype.itemsize, budget, xp)
    for n in range(num):
        for r0, r1 in _bands(grid_shape[0], chunk):
            col = _band_col(channels, geom, grid_shape, r0, r1, grid.dtype, xp)
            product(_matrix(grid[n, :, r0:r1], n_out), _matrix(col, channels * geom.taps))
            col2im_band(xp, col, image[n], geom, grid_shape, r0, r1, first=r0 == 0)


def weight_gemm(image, grid, weight_diff, geom, group, budget=None):
    """weight_diff += sum_n grid[n] * im2col(image[n])^T per group (accumulates)."""
    xp = get_array_module(image)
    if conv_autotune.active(xp):
        paths = _weight_paths(xp, image, grid, weight_diff, geom, group, budget)
        path = _tuned_path(xp, "weight", paths, image, weight_diff, grid, geom, group,
                           budget, accumulated=weight_diff)
        if path is not None:
            paths[path]()
            return
    n_out = grid.shape[1]
    grid_shape = grid.shape[2:]
    if _direct_1x1(xp, geom, image.shape, n_out, grid_shape, image.dtype, budget):
        _weight_blobs(xp, image, grid, weight_diff, group)
        return
    planes = tap_planes.windows_for(xp, geom, image.shape, grid_shape, weight_diff.shape,
                                    group, image.dtype)
    if planes is not None:
        tap_planes.weight_grad(image, grid, weight_diff, planes)
        return
    if implicit_gemm.applies(xp, geom, image, weight_diff, grid, group):
        implicit_gemm.weight_grad(xp, image, grid, weight_diff, geom)
        return
    windows = tap_gemm.windows_for(xp, geom, image.shape, grid_shape, weight_diff.shape)
    if windows:
        tap_gemm.weight_grad(xp, image, grid, weight_diff, windows, group)
        return
    _weight_columns(xp, image, grid, weight_diff, geom, group, budget)


def _weight_blobs(xp, image, grid, weight_diff, group):
    """A 1x1 weight gradient on the blobs themselves, one product per image (added)."""
    for dw, g, c in _blob_blocks(weight_diff, grid, image, group):
        gemm(xp, g, c.T, dw, accumulate=True)


def _weight_columns(xp, image, grid, weight_diff, geom, group, budget):
    """The weight gradient through im2col columns: image groups on the device, runs of
    images or bands of rows on the host (added)."""
    num, channels = image.shape[:2]
    n_out = grid.shape[1]
    dw_g = _per_group(_matrix(weight_diff, n_out), group)
    groups = _device_groups(xp, geom, num, channels, grid.shape[2:], image.dtype, budget)
    if groups:
        _weight_groups(image, grid, dw_g, geom, group, groups, xp)
        return
    for n, r0, r1, col in _host_image_columns(xp, image, grid, geom, budget):
        for dw, b, c in _group_blocks(dw_g, _matrix(grid[n, :, r0:r1], n_out), col, group):
            gemm(xp, b, c.T, dw, accumulate=True)


def weight_and_backward_gemm(image, grid, weight, weight_diff, image_diff, geom, group,
                             budget=None):
    """A convolution's two backward GEMMs: ``weight_gemm`` (accumulates into
    ``weight_diff``) and ``backward_gemm`` (overwrites ``image_diff``). On the device
    with image groups, each group's output gradient is gathered once for both (not
    when the implicit GEMM takes the weight gradient, which reads it as it is)."""
    xp = get_array_module(image)
    if conv_autotune.active(xp):
        data = _backward_paths(xp, grid, weight, image_diff, geom, group, budget)
        data_path = _tuned_path(xp, "data", data, image_diff, weight, grid, geom, group,
                                budget)
        if _tuned_with_weight_gemm(xp, image, grid, weight, weight_diff, geom, group,
                                   budget, data, data_path, _weight_and_backward_groups,
                                   image_diff):
            return
    planes = tap_planes.windows_for(xp, geom, image.shape, grid.shape[2:], weight.shape,
                                    group, image.dtype)
    if planes is not None:
        tap_planes.weight_and_backward(image, grid, weight, weight_diff, image_diff, planes)
        return
    implicit = implicit_gemm.applies(xp, geom, image, weight, grid, group)
    groups = None if implicit else _shared_device_groups(image, grid, weight, geom, budget)
    if groups:
        n_out = grid.shape[1]
        _weight_and_backward_groups(
            image, grid, _per_group(_matrix(weight, n_out), group),
            _per_group(_matrix(weight_diff, n_out), group), image_diff, geom, group,
            groups, xp)
        return
    weight_gemm(image, grid, weight_diff, geom, group, budget)
    backward_gemm(grid, weight, image_diff, geom, group, budget)


def weight_and_forward_gemm(image, grid, weight, weight_diff, out, geom, group,
                            budget=None):
    """A Deconvolution's two backward GEMMs: ``weight_gemm(image, grid, weight_diff)``
    (accumulates) and ``forward_gemm(image, weight, out)`` (overwrites ``out``, shaped
    like ``grid``). On the device with image groups, each group's columns of ``image``
    are made once for both (not when the forward is an implicit GEMM)."""
    xp = get_array_module(image)
    if conv_autotune.active(xp):
        forwards = _forward_paths(xp, image, weight, out, geom, group, budget, None)
        forward_path = _tuned_path(xp, "forward", forwards, image, weight, out, geom,
                                   group, budget)
        if _tuned_with_weight_gemm(xp, image, grid, weight, weight_diff, geom, group,
                                   budget, forwards, forward_path,
                                   _weight_and_forward_groups, out):
            return
    implicit = implicit_gemm.applies(xp, geom, image, weight, out, group)
    groups = None if implicit else _shared_device_groups(image, grid, weight, geom, budget)
    if groups:
        n_out = weight.shape[0]
        _weight_and_forward_groups(
            image, grid, _per_group(_matrix(weight, n_out), group),
            _per_group(_matrix(weight_diff, n_out), group), out, geom, group, groups, xp)
        return
    weight_gemm(image, grid, weight_diff, geom, group, budget)
    forward_gemm(image, weight, out, geom, group, budget)


def _shared_device_groups(image, grid, weight, geom, budget):
    """The image groups both of a layer's backward GEMMs would use on the device (the
    same for both: same image, grid and weight shapes), or None."""
    xp = get_array_module(image)
    grid_shape = grid.shape[2:]
    if _direct_1x1(xp, geom, image.shape, grid.shape[1], grid_shape, image.dtype, budget) \
            or tap_gemm.windows_for(xp, geom, image.shape, grid_shape, weight.shape):
        return None
    return _device_groups(xp, geom, image.shape[0], image.shape[1], grid_shape, image.dtype,
                          budget)


# ------------------------------------------------------------------ autotuned paths
# With conv_autotune on, each device product times the paths below once per shape and
# keeps the fastest. Each dict lists its paths in the default's order of preference,
# "columns" (always possible) first; a forward's path returns whether it added the bias.

def _tuned_path(xp, kind, paths, image, weight, grid, geom, group, budget,
                accumulated=None, bias=False):
    """The chosen name among ``paths`` for this product (None: the fixed rules choose,
    see ``conv_autotune.choose``); ``accumulated``: the array the product adds into,
    put back after each timed run; ``bias``: whether a forward adds one."""
    key = conv_autotune.product_key(kind, xp, image, weight, grid, geom, group,
                                    _path_settings(budget) + (bias,))
    return conv_autotune.choose(xp, key, paths, accumulated)


def _tuned_with_weight_gemm(xp, image, grid, weight, weight_diff, geom, group, budget,
                            other_paths, other_path, shared_groups, target):
    """A layer's weight gradient with another product of its backward (``other_paths``,
    whose choice is ``other_path``, into ``target``), each on its tuned path; when both
    chose columns, the image groups they share (``shared_groups``: the fixed rules'
    ``_weight_and_backward_groups`` or ``_weight_and_forward_groups``). False where
    either was not timed (a recording: the fixed rules then do both)."""
    weights = _weight_paths(xp, image, grid, weight_diff, geom, group, budget)
    weight_path = _tuned_path(xp, "weight", weights, image, weight_diff, grid, geom, group,
                              budget, accumulated=weight_diff)
    groups = weight_path == other_path == "columns" and _device_groups(
        xp, geom, image.shape[0], image.shape[1], grid.shape[2:], image.dtype, budget)
    if groups:
        rows = weight.shape[0]
        shared_groups(image, grid, _per_group(_matrix(weight, rows), group),
                      _per_group(_matrix(weight_diff, rows), group), target, geom, group,
                      groups, xp)
        return True
    if weight_path is None or other_path is None:
        return False
    weights[weight_path]()
    other_paths[other_path]()
    return True


def _implicit_tiles(xp, geom, image, weight, grid, group):
    """[(path name, tile)] of the implicit GEMM for this product, if it can compute it."""
    if not implicit_gemm.supported(xp, geom, image, weight, grid, group):
        return []
    tiles = [("implicit", None)]
    if implicit_gemm.TILE is None:
        tiles.append(("implicit-quad", "quad"))
    return tiles


def _named_paths(geom, columns, blobs, tiles, implicit, windows, taps):
    """{name: run} of a product: ``columns`` always, ``blobs`` for a 1x1 kernel,
    ``implicit(tile)`` per (name, tile) of ``tiles``, ``taps(windows)`` if windows."""
    paths = {"columns": columns}
    if geom.is_1x1:
        paths["blobs"] = blobs
    for name, tile in tiles:
        paths[name] = functools.partial(implicit, tile)
    if windows:
        paths["taps"] = functools.partial(taps, windows)
    return paths


def _forward_paths(xp, image, weight, out, geom, group, budget, bias):
    def implicit(tile):
        implicit_gemm.forward(xp, image, weight, out, geom, bias, tile=tile)
        return bias is not None

    def with_bias(product, *args):
        # the caller's own addition, where the product left it out, inside the timed run
        if not product(*args) and bias is not None:
            add_bias(out, bias)
        return bias is not None

    return _named_paths(
        geom, lambda: with_bias(_forward_columns, xp, image, weight, out, geom, group,
                                budget, bias),
        lambda: with_bias(_forward_blobs, xp, image, weight, out, group),
        _implicit_tiles(xp, geom, image, weight, out, group), implicit,
        tap_gemm.tunable_windows(xp, geom, image.shape, out.shape[2:], weight.shape),
        lambda windows: with_bias(tap_gemm.forward, xp, image, weight, out, windows, group))


def _backward_paths(xp, grid, weight, image, geom, group, budget):
    stride_1 = all(s == 1 for s in geom.stride)
    return _named_paths(
        geom, lambda: _backward_columns(xp, grid, weight, image, geom, group, budget),
        lambda: _backward_blobs(xp, grid, weight, image, group),
        _implicit_tiles(xp, geom, grid, weight, image, group) if stride_1 else (),
        lambda tile: implicit_gemm.transposed(xp, grid, weight, image, geom, tile=tile),
        tap_gemm.tunable_windows(xp, geom, image.shape, grid.shape[2:], weight.shape),
        lambda windows: tap_gemm.backward(xp, grid, weight, image, windows, group))


def _weight_paths(xp, image, grid, weight_diff, geom, group, budget):
    return _named_paths(
        geom, lambda: _weight_columns(xp, image, grid, weight_diff, geom, group, budget),
        lambda: _weight_blobs(xp, image, grid, weight_diff, group),
        _implicit_tiles(xp, geom, image, weight_diff, grid, group),
        lambda tile: implicit_gemm.weight_grad(xp, image, grid, weight_diff, geom,
                                               tile=tile),
        tap_gemm.tunable_windows(xp, geom, image.shape, grid.shape[2:], weight_diff.shape),
        lambda windows: tap_gemm.weight_grad(xp, image, grid, weight_diff, windows, group))
