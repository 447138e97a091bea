"""Host convolutions with few output channels (DeepLab's classifier heads) without im2col.

ResNet-101 DeepLab's ASPP classifier (``fc1_voc12_c0`` .. ``c3``) maps 2048 channels to
21 with 3x3 kernels at dilations 6 to 24. Its im2col columns are 2048 * 9 rows by the
grid (311 MB per image at 513x513) for a product with 21 rows, so the copy and the
memory-bound GEMM cost about ten times the arithmetic. When a convolution's outputs are
at most half its input channels, one product per image instead multiplies every tap's
weights with the image as it is,

    P = W' X,   W' = the weights tap-major, (taps * O, C);  X = the image, (C, H * W),

and the output is the sum, tap by tap in Caffe's tap order, of P's tap planes shifted by
each tap's displacement (an output whose input falls in the padding takes nothing from
that tap). The backward gathers the top gradient once per image into the same layout,

    G[(tap, o), i] = dY[o, i - displacement(tap)]   (0 where no output reads input i),

and each gradient is one product: dX = W'^T G, and dW' += G X^T.

The sums have im2col's non-zero terms, grouped by tap, so for finite values results
differ from that path by rounding only (the fork's own sums follow its BLAS). Inf and
NaN travel differently: the forward does not multiply the padding's zeros, so an Inf or
NaN weight does not reach the outputs through 0 * Inf as in the fork's GEMM (as with the
device's tap GEMMs); the backward's products do multiply G's zeros, so such a weight
(or an Inf input) makes NaN gradients where the fork's col2im skips the padding. Either
way the forward's loss is no longer finite first (a training run stops there).

Used on the host for 2-D convolutions with stride 1 and one group whose tap planes fit
PLANE_BYTES per image and whose taps read at least MIN_PLANE_USE of them;
``CAFFELITE_TAP_PLANES=0`` (or ``ENABLED = False``) keeps im2col.
"""
import math

import numpy as np

from ..backend import env_flag
from . import im2col     # (im2col imports this module; its names are read at call time)
from .tap_gemm import _tap_weights, tap_windows

ENABLED = env_flag("CAFFELITE_TAP_PLANES", True)
MAX_OUTPUT_SHARE = 0.5       # outputs per input channel, at most
PLANE_BYTES = 64 << 20       # P (or G) of one image, at most
# P covers every tap at every input position; a convolution whose taps read less than
# this share of those (an unpadded one with a grid much smaller than its image: a
# dilation-24 3x3 on 65x65 reads 7 %) keeps im2col, which was 2 to 4 times faster there.
MIN_PLANE_USE = 0.1


def windows_for(xp, geom, image_shape, grid_shape, weight_shape, group, dtype):
    """The tap windows (``tap_gemm.tap_windows``) if this path applies to a convolution
    of an (N, C, H, W) image with weights (O, C/group, kh, kw) into ``grid_shape``, else
    None (see the module docstring)."""
    if not ENABLED or xp is not np or group != 1 or len(geom.kernel) != 2 or \
            geom.is_1x1 or any(s != 1 for s in geom.stride):
        return None
    n_out, channels = weight_shape[:2]
    if n_out > MAX_OUTPUT_SHARE * channels:
        return None
    plane = math.prod(image_shape[2:])
    if geom.taps * n_out * plane * np.dtype(dtype).itemsize > PLANE_BYTES:
        return None
    windows = tap_windows(geom, image_shape[2:], grid_shape)
    used = sum((r1 - r0) * (c1 - c0) for _, (r0, r1, _), (c0, c1, _) in windows)
    return windows if used >= MIN_PLANE_USE * geom.taps * plane else None


# image (N, C, H, W), grid (N, O, OH, OW), weight (O, C, kh, kw), as in im2col.py.

def forward(image, weight, out, windows):
    """out = the convolution of ``image`` with ``weight`` (overwrites ``out``)."""
    num, channels = image.shape[:2]
    w_taps = _tap_major(weight)
    planes = _planes(weight, image)
    for n in range(num):
        np.matmul(w_taps, im2col.view(image[n], (channels, -1)),
                  out=im2col.view(planes, (w_taps.shape[0], -1)))
        target = out[n]
        target[...] = 0
        for tap, (r0, r1, dr), (c0, c1, dc) in windows:
            target[:, r0:r1, c0:c1] += planes[tap, :, r0 + dr:r1 + dr, c0 + dc:c1 + dc]


def backward(grid, weight, image, windows):
    """image = the data gradient of the convolution for the top gradient ``grid``
    (overwrites ``image``)."""
    _backward(None, grid, weight, None, image, windows)


def weight_grad(image, grid, weight_diff, windows):
    """weight_diff += the weight gradient for the top gradient ``grid`` (accumulates,
    image by image)."""
    _backward(image, grid, weight_diff, weight_diff, None, windows)


def weight_and_backward(image, grid, weight, weight_diff, image_diff, windows):
    """Both: each image's top gradient gathered once for the two products."""
    _backward(image, grid, weight, weight_diff, image_diff, windows)


def _backward(image, grid, weight, weight_diff, image_diff, windows):
    num = grid.shape[0]
    channels = weight.shape[1]
    w_taps = _tap_major(weight) if image_diff is not None else None
    gathered = _planes(weight, image if image is not None else image_diff)
    rows = gathered.shape[0] * gathered.shape[1]
    g_matrix = im2col.view(gathered, (rows, -1))
    diff_taps = (im2col.view(weight_diff, weight_diff.shape[:2] + (-1,))
                 if weight_diff is not None else None)
    for n in range(num):
        _gather_grid(grid[n], gathered, windows)
        if weight_diff is not None:
            product = g_matrix @ im2col.view(image[n], (channels, -1)).T
            diff_taps += product.reshape(gathered.shape[:2] + (channels,)).transpose(1, 2, 0)
        if image_diff is not None:
            np.matmul(w_taps.T, g_matrix, out=im2col.view(image_diff[n], (channels, -1)))


def _tap_major(weight):
    """W' = (taps * O, C): row tap * O + o holds weight[o, :, tap] (the device tap
    GEMMs' per-tap matrices, stacked)."""
    return _tap_weights(np, weight).reshape(-1, weight.shape[1])


def _planes(weight, image):
    """(taps, O, H, W) in the shared column workspace, for an image like ``image``'s."""
    n_out = weight.shape[0]
    taps = math.prod(weight.shape[2:])
    shape = (taps, n_out) + tuple(image.shape[2:])
    return im2col.view(im2col._scratch(math.prod(shape), image.dtype, np), shape)


def _gather_grid(grid_n, gathered, windows):
    """G: each tap's plane holds the top gradient at the inputs its outputs read."""
    gathered[...] = 0
    for tap, (r0, r1, dr), (c0, c1, dc) in windows:
        gathered[tap, :, r0 + dr:r1 + dr, c0 + dc:c1 + dc] = grid_n[:, r0:r1, c0:c1]
