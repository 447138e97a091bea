"""Device convolutions whose kernel taps mostly reach the zero padding: one GEMM per tap,
over the outputs that tap reaches.

DeepLab's atrous layers pad by their dilation. At large dilations on small grids most of
a tap's window positions then fall in the padding: ASPP's fc6 branches at dilation 6,
12, 18 and 24 on the 41x41 grid of a 321x321 crop reach 81, 65, 50 and 37 % of their
window positions. im2col writes the zeros and the GEMM multiplies them. Here, for each
tap (i, j), the outputs whose input lies inside the image form a rectangle; the tap's
input rectangle is gathered (channels x images*rows*cols), multiplied by the tap's
weights, and the product is added into that rectangle of the output. The backward does
the same per tap for the data gradient (into the input rectangle) and the weight
gradient (into the tap's weights).

The sums have the same non-zero terms as the im2col path, added tap by tap instead of
in one long dot product, so for finite values GPU results differ from it by rounding
only (cuBLAS's order differs from the CPU's anyway); on integer data both are exact.
The padding's zeros are not multiplied, so an Inf or NaN weight (or top gradient) does
not reach the outputs (or the other taps' weight gradients) through 0 * Inf = NaN as
it does through the fork's im2col GEMM: a diverged net's layer is then partly finite
where the fork's is NaN throughout. The CPU keeps im2col, Caffe's float order (but
for convolutions with few outputs, ``tap_planes``). Used for 2-D convolutions with
stride 1 on the device when the taps reach at most MAX_REACH of the window positions
and that saves at least MIN_SAVED_FLOPS per GEMM: the path makes three calls per tap
where im2col makes two per layer, which costs more than it saves on small layers at
batch 1 (ResNet's 21-channel classifier); ``CAFFELITE_TAP_GEMM=0`` (or ``ENABLED =
False``) turns it off. Not with TF32: its GEMMs are about eight times faster, the
gathers and additions are not, and on an H200 ASPP-VGG's TF32 training step took
0.0760 s with this path and 0.0673 s without it (test forward 0.0085 s and 0.0060 s;
BENCHMARKS.md).
"""
import math

import numpy as np

from ..backend import env_flag, tf32_enabled
from ..kernels.cublas import gemm
from . import im2col     # (im2col imports this module; its names are read at call time)

ENABLED = env_flag("CAFFELITE_TAP_GEMM", True)
MAX_REACH = 0.75
MIN_SAVED_FLOPS = 4e9       # about 80 us of SGEMM on an H200, several times the calls' cost

_windows = {}                # (geometry, shapes) -> windows, the oldest dropped first
_MAX_WINDOWS = 256


def tap_windows(geom, img_shape, grid_shape):
    """[(tap index, (o0, o1, offset) rows, (o0, o1, offset) columns)] of the taps that
    reach an input: outputs o0 <= o < o1 read input o + offset."""
    (kh, kw), (dh, dw), (ph, pw) = geom.kernel, geom.dilation, geom.pad
    windows = []
    for i in range(kh):
        rows = _reach(i * dh - ph, img_shape[0], grid_shape[0])
        for j in range(kw):
            cols = _reach(j * dw - pw, img_shape[1], grid_shape[1])
            if rows is not None and cols is not None:
                windows.append((i * kw + j, rows, cols))
    return windows


def _reach(offset, size_in, size_out):
    o0, o1 = max(0, -offset), min(size_out, size_in - offset)
    return (o0, o1, offset) if o1 > o0 else None


def reach(windows, geom, grid_shape):
    """The fraction of the (taps x outputs) window positions that read the image."""
    reached = sum((r[1] - r[0]) * (c[1] - c[0]) for _, r, c in windows)
    return reached / (geom.taps * math.prod(grid_shape))


def windows_for(xp, geom, image_shape, grid_shape, weight_shape):
    """The tap windows if this path applies to a GEMM of a convolution with this image
    (N, C, H, W), output grid and weight (O, C/group, kh, kw): device arrays, FP32
    GEMMs, 2-D, stride 1, a kernel larger than 1x1, at most MAX_REACH reached, at least
    MIN_SAVED_FLOPS saved. Else None."""
    if not ENABLED or tf32_enabled():
        return None
    found = _measured(xp, geom, image_shape, grid_shape, weight_shape)
    if found is None:
        return None
    windows, reached, saved = found
    return windows if reached <= MAX_REACH and saved >= MIN_SAVED_FLOPS else None


def tunable_windows(xp, geom, image_shape, grid_shape, weight_shape):
    """The tap windows if the path is on (ENABLED), can compute this convolution's GEMMs
    and skips some of the padding (what ``conv_autotune`` may time, TF32 included), else
    None."""
    if not ENABLED:
        return None
    found = _measured(xp, geom, image_shape, grid_shape, weight_shape)
    return found[0] if found is not None and found[1] < 1 else None


def _measured(xp, geom, image_shape, grid_shape, weight_shape):
    """(windows, reach, multiply-adds saved) of a device 2-D stride-1 convolution with a
    kernel larger than 1x1, else None."""
    if xp is np or len(geom.kernel) != 2 or geom.is_1x1 or any(s != 1 for s in geom.stride):
        return None
    key = (geom, tuple(image_shape), tuple(grid_shape), tuple(weight_shape[:2]))
    found = _windows.get(key)
    if found is None:
        windows = tap_windows(geom, image_shape[2:], grid_shape)
        reached = reach(windows, geom, grid_shape)
        positions = geom.taps * math.prod(grid_shape)
        multiply_adds = image_shape[0] * weight_shape[0] * weight_shape[1]
        if len(_windows) >= _MAX_WINDOWS:       # a deploy script's many image sizes
            _windows.pop(next(iter(_windows), None), None)  # (another thread may too)
        found = _windows[key] = (windows, reached,
                                 2 * multiply_adds * positions * (1 - reached))
    return found


# ------------------------------------------------------------------ the three GEMMs
# image (N, C, H, W), grid (N, O, OH, OW), weight (O, C/group, kh, kw), as in im2col.py.

def forward(xp, image, weight, out, windows, group):
    """out = W * image per group, tap by tap (overwrites ``out``)."""
    _tap_products(xp, weight, image, out, windows, group, transpose=False)


def backward(xp, grid, weight, image, windows, group):
    """image = W^T * grid per group, tap by tap (overwrites ``image``)."""
    _tap_products(xp, weight, grid, image, windows, group, transpose=True)


def _tap_products(xp, weight, source, target, windows, group, transpose):
    """target = sum over taps of W_t (W_t^T with ``transpose``) times the tap's rectangle
    of ``source``: forward reads the image at the tap's inputs and writes the outputs;
    the data gradient reads the outputs' gradient and writes the inputs."""
    taps = _tap_weights(xp, weight)
    target[...] = 0
    for t, rows, cols in windows:
        columns = _gather(xp, source, rows, cols, shifted=not transpose)
        product = _group_products(xp, taps[t], columns, group, transpose)
        _add_into(target, product, rows, cols, shifted=transpose)


def weight_grad(xp, image, grid, weight_diff, windows, group):
    """weight_diff += grid * image^T per group and tap (accumulates)."""
    n_out, per_group = weight_diff.shape[:2]
    diff = im2col.view(weight_diff, (n_out, per_group, -1))   # a copy would lose the sums
    diff_g = im2col._per_group(diff, group)
    for t, rows, cols in windows:
        x = _gather(xp, image, rows, cols, True)
        dy = _gather(xp, grid, rows, cols, False)
        for d, b, c in zip(diff_g, im2col._per_group(dy, group),
                           im2col._per_group(x, group)):
            gemm(xp, b, c.T, d[:, :, t], accumulate=True)


def _tap_weights(xp, weight):
    """(taps, O, C/group): each tap's weight matrix, contiguous."""
    n_out, per_group = weight.shape[:2]
    return xp.ascontiguousarray(weight.reshape(n_out, per_group, -1).transpose(2, 0, 1))


def _gather(xp, array, rows, cols, shifted):
    """(channels, N*rows*cols) columns: the rectangle of ``array`` (N, channels, h, w)
    that the tap's outputs (``shifted`` false) or its inputs (true) occupy. Under TF32
    the columns are padded with zeros to a multiple of 4, as im2col's are
    (``column_align``: an unaligned leading dimension keeps cuBLAS off its tensor
    cores)."""
    part = _rectangle(array, rows, cols, shifted).transpose(1, 0, 2, 3)
    count = part.size // part.shape[0]
    padded = im2col._aligned(count, im2col.column_align(array.dtype))
    if padded == count:
        return xp.ascontiguousarray(part).reshape(part.shape[0], count)
    columns = xp.empty((part.shape[0], padded), array.dtype)
    columns[:, count:] = 0
    im2col.view(columns[:, :count], part.shape)[...] = part
    return columns


def _group_products(xp, tap_weight, columns, group, transpose):
    """W_t * columns (or W_t^T * columns) per group: (rows, M)."""
    n_out, per_group = tap_weight.shape
    out_rows = per_group * group if transpose else n_out
    result = xp.empty((out_rows, columns.shape[1]), columns.dtype)
    for w, c, r in zip(im2col._per_group(tap_weight, group),
                       im2col._per_group(columns, group), im2col._per_group(result, group)):
        gemm(xp, w.T if transpose else w, c, r)
    return result


def _add_into(array, product, rows, cols, shifted):
    """array[:, :, rectangle] += product, product being (channels, N*rows*cols) and
    padding columns, which are left out."""
    window = _rectangle(array, rows, cols, shifted)
    num, channels, height, width = window.shape
    shape = (channels, num, height, width)
    window += product[:, :num * height * width].reshape(shape).transpose(1, 0, 2, 3)


def _rectangle(array, rows, cols, shifted):
    """The view of ``array`` (N, channels, h, w) over the tap's outputs (``shifted``
    false) or over its inputs (true, each output's row and column plus the offset)."""
    (r0, r1, dr), (c0, c1, dc) = rows, cols
    if shifted:
        r0, r1, c0, c1 = r0 + dr, r1 + dr, c0 + dc, c1 + dc
    return array[:, :, r0:r1, c0:c1]
