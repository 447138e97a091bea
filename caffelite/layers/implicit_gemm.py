"""Convolution forward as an implicit GEMM on tensor cores (TF32), without im2col.

The im2col path writes each layer's columns (kernel_h * kernel_w times its input) and
has cuBLAS read them back; for ASPP-VGG's training step that traffic is about as much
as the products themselves. ``conv_igemm.cu`` gathers the column entries straight into
shared memory tile by tile and multiplies them with ``mma.sync`` (TF32 operands, FP32
sums), writing the top (bias included) in its NCHW layout.

At stride 1 the data gradient is a convolution too: dX = conv(dY, W flipped in space with
its two channel axes swapped, pad (kernel - 1) * dilation - pad), so the same kernel
replaces the data-gradient GEMM and col2im (and a stride-1 Deconvolution's forward). The
weight gradient keeps im2col and cuBLAS.

It runs on the device when the TF32 flag is on (``backend.set_tf32``: the precision of
cuBLAS's TF32 GEMMs, which it replaces), the data is float32, the convolution is 2-D with
one group and a window larger than 1x1, and ``ENABLED`` (environment
``CAFFELITE_IMPLICIT_GEMM=1``). It is off by default until a device measurement shows it
faster than im2col + cuBLAS (``benchmarks/conv_igemm.py``, ``gpu_train.py --engines
caffelite-implicit``).
"""
import dataclasses

import numpy as np

from .. import backend, kernels

ENABLED = backend.env_flag("CAFFELITE_IMPLICIT_GEMM", False)

THREADS = 256
# (kernel, output-channel tile, pixel tile): the narrow tile for at most 64 channels.
WIDE = ("conv_igemm_forward", 128, 128)
NARROW = ("conv_igemm_forward_narrow", 64, 256)

# Tap tables per (device module, channels, height, width, kernel, dilation). Never
# evicted: a recorded CUDA graph keeps reading the table it was recorded with, and the
# tables are small (3 ints per GEMM row).
_tap_tables = {}


def applies(xp, geom, image, weight, out, group):
    """Whether this forward takes the implicit GEMM (see the module docstring)."""
    return (ENABLED and xp is not np and len(geom.kernel) == 2 and not geom.is_1x1
            and group == 1 and backend.tf32_enabled() and image.dtype == np.float32
            and max(image.size, out.size, weight.size) < kernels.MAX_ELEMENTS
            and image.flags.c_contiguous and out.flags.c_contiguous)


def applies_transposed(xp, geom, grid, weight, image, group):
    """Whether ``image = W^T * grid`` summed over the taps (a convolution's data
    gradient, a Deconvolution's forward) takes the implicit GEMM: stride 1 only."""
    return (all(s == 1 for s in geom.stride)
            and applies(xp, geom, grid, weight, image, group))


def tap_table(channels, height, width, geom):
    """int32 (K, 3): per GEMM row k = (c * kernel_h + u) * kernel_w + v, the image offset
    c*H*W + u*dh*W + v*dw of the tap, then u*dh and v*dw (the kernel's bounds tests)."""
    (kh, kw), (dh, dw) = geom.kernel, geom.dilation
    c, u, v = np.meshgrid(np.arange(channels), np.arange(kh), np.arange(kw), indexing="ij")
    dy, dx = (u * dh).ravel(), (v * dw).ravel()
    offset = c.ravel() * height * width + dy * width + dx
    return np.stack([offset, dy, dx], axis=1).astype(np.int32)


def _device_tap_table(xp, channels, height, width, geom):
    key = (xp.__name__, xp.cuda.Device().id, channels, height, width, geom.kernel,
           geom.dilation)
    table = _tap_tables.get(key)
    if table is None:
        table = _tap_tables[key] = xp.asarray(
            np.ascontiguousarray(tap_table(channels, height, width, geom)))
    return table


# None: the tile by the output channels; "wide" or "narrow" forces one (benchmarks).
TILE = None


def tile_kernel(out_channels):
    """(kernel name, output-channel tile, pixel tile) for ``out_channels``."""
    if TILE is not None:
        return {"wide": WIDE, "narrow": NARROW}[TILE]
    return NARROW if out_channels <= NARROW[1] else WIDE


def forward(xp, image, weight, out, geom, bias=None):
    """out = conv(image, weight) (+ bias), overwriting ``out`` (N, O, out_h, out_w)."""
    num, channels, height, width = image.shape
    n_out = weight.shape[0]
    plane = out.shape[2] * out.shape[3]
    n = num * plane
    name, tile_m, tile_n = tile_kernel(n_out)
    grid = -(-n_out // tile_m) * -(-n // tile_n)
    taps = _device_tap_table(xp, channels, height, width, geom)
    (sh, sw), (ph, pw) = geom.stride, geom.pad
    kernels.launch("conv_igemm", name, image.dtype, n, image, weight,
                   weight if bias is None else bias, taps, channels, height, width,
                   geom.taps, n_out, out.shape[3], plane, sh, sw, ph, pw,
                   int(bias is not None), out, grid=grid, block=THREADS)


def transposed(xp, grid, weight, image, geom):
    """image = sum over taps of W^T * grid (overwrites ``image``, N x C x H x W) at stride
    1: the convolution of ``grid`` with the flipped, channel-swapped weights."""
    flipped = xp.ascontiguousarray(weight.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
    pad = tuple((k - 1) * d - p for k, d, p in zip(geom.kernel, geom.dilation, geom.pad))
    forward(xp, grid, flipped, image, dataclasses.replace(geom, pad=pad))
