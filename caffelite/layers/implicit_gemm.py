"""Convolutions as implicit GEMMs on tensor cores (TF32), without im2col columns.

The im2col path writes each layer's columns (kernel_h * kernel_w times its input) and
has cuBLAS read them back; for ASPP-VGG's training step that traffic is about as much
as the products themselves. ``conv_igemm.cu`` gathers the column entries straight into
shared memory tile by tile and multiplies them with ``mma.sync`` (TF32 operands, FP32
sums), writing the top (bias included) in its NCHW layout. Its K is tap-major (16
channels of one tap per slice, so a thread tests its pixel's tap once per slice, and a
slice whose tap misses the image for the whole tile is skipped); a first small kernel
lays the weights out that way, channels padded to a multiple of 16, rounded to TF32.

At stride 1 the data gradient is a convolution too: dX = conv(dY, W flipped in space with
its two channel axes swapped, pad (kernel - 1) * dilation - pad), so the same kernel
replaces the data-gradient GEMM and col2im (and a stride-1 Deconvolution's forward). The
weight gradient is a third tiled product (``conv_igemm_wgrad``), reduced over the pixels
in runs whose partial sums a last kernel adds in order (no atomics: the same bits on
every run of one GPU model; the number of runs follows its multiprocessor count).

It runs on the device when the TF32 flag is on (``backend.set_tf32``: the precision of
cuBLAS's TF32 GEMMs, which it replaces), the data is float32, the convolution is 2-D with
one group and a window larger than 1x1, and ``ENABLED`` (environment
``CAFFELITE_IMPLICIT_GEMM=1``). It is off by default until a device measurement shows it
faster than im2col + cuBLAS (``benchmarks/conv_igemm.py``, ``gpu_train.py --engines
caffelite-implicit``).
"""
import collections
import dataclasses

import numpy as np

from .. import backend, kernels

ENABLED = backend.env_flag("CAFFELITE_IMPLICIT_GEMM", False)

# A forward kernel with its output-channel tile, pixel tile and threads per block.
Tile = collections.namedtuple("Tile", "kernel m n threads")
# Eight warps of 64 x 32; the narrow tile for at most 64 channels.
WIDE = Tile("conv_igemm_forward", 128, 128, 256)
NARROW = Tile("conv_igemm_forward_narrow", 64, 256, 256)
# Four warps of 64 x 64: half the shared-memory reads per product. Only when forced
# (TILE) until a device measures it against WIDE (benchmarks/conv_igemm.py).
QUAD = Tile("conv_igemm_forward_quad", 128, 128, 128)
TILES = {"wide": WIDE, "narrow": NARROW, "quad": QUAD}
# The weight gradient's 128 x 128 tiles: eight warps of 64 x 32, or (with TILE "quad")
# four of 64 x 64.
WGRAD = Tile("conv_igemm_wgrad", 128, 128, 256)
WGRAD_QUAD = Tile("conv_igemm_wgrad_quad", 128, 128, 128)
# The kernel's K is tap-major with the channels padded to a multiple of this (its slices
# are 16 channels of one tap).
CHANNEL_ALIGN = 16

# None: the tile by the output channels; a key of TILES forces one (benchmarks; "quad"
# also for the weight gradient).
TILE = None


def applies(xp, geom, image, weight, out, group):
    """Whether this forward takes the implicit GEMM (see the module docstring)."""
    return ENABLED and supported(xp, geom, image, weight, out, group)


def supported(xp, geom, image, weight, out, group):
    """Whether the kernels can compute this product (``applies`` without ``ENABLED``):
    what ``conv_autotune`` may time."""
    return (xp is not np and len(geom.kernel) == 2 and not geom.is_1x1
            and group == 1 and backend.tf32_enabled() and image.dtype == np.float32
            and weight.dtype == np.float32 and image.flags.c_contiguous
            and out.flags.c_contiguous and weight.flags.c_contiguous
            and max(image.size, out.size, prepared_size(weight.shape)) < kernels.MAX_ELEMENTS)


def applies_forward(xp, geom, image, weight, out, group):
    """Whether a forward (``out = conv(image)``) takes the implicit GEMM: ``applies``,
    and enough output tiles to fill the GPU (``fills_gpu``)."""
    return applies(xp, geom, image, weight, out, group) and fills_gpu(xp, out.shape)


def applies_transposed(xp, geom, grid, weight, image, group):
    """Whether ``image = W^T * grid`` summed over the taps (a convolution's data
    gradient, a Deconvolution's forward) takes the implicit GEMM: stride 1 only, and
    enough tiles of ``image`` to fill the GPU."""
    return (all(s == 1 for s in geom.stride)
            and applies(xp, geom, grid, weight, image, group) and fills_gpu(xp, image.shape))


# A forward or data gradient with fewer output tiles than this many per multiprocessor
# keeps im2col + cuBLAS (whose kernels split small products further): ResNet-101's
# layers at batch 1 on 41 x 41 grids have 28 to 56 tiles for an H200's 132 SMs. The
# weight gradient needs no such rule: it splits its pixels into runs.
MIN_TILES_PER_SM = 1.0


def fills_gpu(xp, out_shape):
    """Whether an implicit product into an (N, O, H, W) output has at least
    MIN_TILES_PER_SM tiles per multiprocessor."""
    num, out_channels, height, width = out_shape
    tile = tile_kernel(out_channels)
    tiles = -(-out_channels // tile.m) * -(-num * height * width // tile.n)
    return tiles >= MIN_TILES_PER_SM * _multiprocessors(xp)


def _round_up(value, multiple):
    return -(-value // multiple) * multiple


def padded_channels(channels):
    return _round_up(channels, CHANNEL_ALIGN)


def pixel_runs(pixels, splits):
    """(run length, run count) for ``pixels`` split into about ``splits`` runs whose
    length is a multiple of 16 (the kernel's slices; the last run may be shorter)."""
    chunk = _round_up(-(-pixels // splits), CHANNEL_ALIGN)
    return chunk, -(-pixels // chunk)


def prepared_size(weight_shape):
    """Elements of the kernel's weight layout (out x taps x padded in-channels), the
    larger of the forward's and the data gradient's."""
    n_out, channels = weight_shape[:2]
    taps = int(np.prod(weight_shape[2:], dtype=np.int64))
    return taps * max(n_out * padded_channels(channels), channels * padded_channels(n_out))


def tile_kernel(out_channels, tile=None):
    """The forward kernel's Tile for ``out_channels``: ``tile`` (a key of TILES), else
    TILE, else the narrow one for at most 64 channels and the wide one above."""
    tile = tile or TILE
    if tile is not None:
        return TILES[tile]
    return NARROW if out_channels <= NARROW.m else WIDE


def wgrad_tile(tile=None):
    """The weight gradient's Tile (``tile`` or TILE "quad": four warps of 64 x 64)."""
    return WGRAD_QUAD if (tile or TILE) == "quad" else WGRAD


def prepare_weights(xp, weight, transposed=False):
    """The weights in the kernel's layout, [out][taps][padded in-channels], rounded to
    TF32 (float32); ``transposed``: those of the data gradient (kernel rotated by 180
    degrees, channel axes swapped)."""
    n_out, channels = weight.shape[:2]
    if transposed:
        n_out, channels = channels, n_out
    taps = int(np.prod(weight.shape[2:], dtype=np.int64))
    c_pad = padded_channels(channels)
    prepared = xp.empty((n_out, taps, c_pad), weight.dtype)
    kernels.launch("conv_igemm", "conv_igemm_weights", weight.dtype, prepared.size, weight,
                   n_out, channels, taps, c_pad, int(transposed), prepared)
    return prepared


def forward(xp, image, weight, out, geom, bias=None, transposed=False, tile=None):
    """out = conv(image, weight) (+ bias), overwriting ``out`` (N, O, out_h, out_w); with
    ``transposed``, the convolution with the data gradient's weights (see
    ``transposed``; ``geom`` is then already that convolution's). ``tile``: a key of
    TILES to force (``tile_kernel``)."""
    num, channels, height, width = image.shape
    plane = out.shape[2] * out.shape[3]
    n = num * plane
    if out.size == 0:                   # an empty batch: no launch (a grid of 0 fails)
        return
    prepared = prepare_weights(xp, weight, transposed)
    n_out = prepared.shape[0]
    tile = tile_kernel(n_out, tile)
    grid = -(-n_out // tile.m) * -(-n // tile.n)
    (kh, kw), (sh, sw) = geom.kernel, geom.stride
    (ph, pw), (dh, dw) = geom.pad, geom.dilation
    kernels.launch("conv_igemm", tile.kernel, image.dtype, n, image, prepared,
                   prepared if bias is None else bias, channels, height, width, kh, kw, dh,
                   dw, prepared.shape[2], n_out, out.shape[3], plane, sh, sw, ph, pw,
                   int(bias is not None), out, grid=grid, block=tile.threads)


# Weight gradients: the pixels are split into runs so that about this many blocks per
# multiprocessor work at once (a layer has few output tiles: conv1_2's 64 x 576 is one
# row of five; __launch_bounds__(256, 2) fits two blocks per multiprocessor), each run at
# least MIN_SPLIT_PIXELS long. The count follows the GPU's multiprocessors, so the bits
# of a weight gradient are the same on every run of one GPU model, not across models.
# SPLITS forces a count (tests).
BLOCKS_PER_SM = 2
MIN_SPLIT_PIXELS = 256
SPLITS = None
_MULTIPROCESSOR_COUNT = 16       # cudaDevAttrMultiProcessorCount
_multiprocessors_per_device = {}


def _multiprocessors(xp):
    """The device's multiprocessor count (1 for the emulator), asked once per device."""
    runtime = getattr(getattr(xp, "cuda", None), "runtime", None)
    if runtime is None or not hasattr(runtime, "deviceGetAttribute"):
        return 1
    device = xp.cuda.Device().id
    count = _multiprocessors_per_device.get(device)
    if count is None:
        count = _multiprocessors_per_device[device] = int(
            runtime.deviceGetAttribute(_MULTIPROCESSOR_COUNT, device))
    return count


def weight_splits(xp, tiles, pixels, row_elements):
    """How many runs of pixels a weight gradient of ``tiles`` output tiles uses (its
    partial products, ``row_elements`` each, must stay within the kernels' int range)."""
    if SPLITS is not None:
        wanted = SPLITS
    else:
        wanted = min(-(-BLOCKS_PER_SM * _multiprocessors(xp) // tiles),
                     pixels // MIN_SPLIT_PIXELS)
    return max(1, min(wanted, pixels, (kernels.MAX_ELEMENTS - 1) // row_elements))


def weight_grad(xp, image, grid, weight_diff, geom, tile=None):
    """weight_diff += the gradient of conv(image, W) for the top gradient ``grid``, summed
    over the images (Caffe's weight GEMM with beta = 1), without im2col columns: a
    partial product per run of pixels, then the runs added in order. ``tile``: "quad"
    forces the four-warp tile (``wgrad_tile``)."""
    num, channels, height, width = image.shape
    n_out = grid.shape[1]
    plane = grid.shape[2] * grid.shape[3]
    pixels = num * plane
    if pixels == 0 or n_out == 0:       # an empty batch: nothing to add
        return
    c_pad = padded_channels(channels)
    k = geom.taps * c_pad
    tile = wgrad_tile(tile)
    tiles = -(-n_out // tile.m) * -(-k // tile.n)
    chunk, splits = pixel_runs(pixels, weight_splits(xp, tiles, pixels, n_out * k))
    direct = splits == 1      # one run adds its product into the diff itself
    partial = weight_diff if direct else xp.empty((splits, n_out, k), image.dtype)
    (kh, kw), (sh, sw) = geom.kernel, geom.stride
    (ph, pw), (dh, dw) = geom.pad, geom.dilation
    kernels.launch("conv_igemm", tile.kernel, image.dtype, partial.size, image, grid,
                   num, channels, height, width, kh, kw, dh, dw, c_pad, n_out,
                   grid.shape[3], plane, sh, sw, ph, pw, chunk, int(direct), partial,
                   grid=tiles * splits, block=tile.threads)
    if not direct:
        kernels.launch("conv_igemm", "conv_igemm_wgrad_sum", image.dtype, weight_diff.size,
                       partial, splits, channels, geom.taps, c_pad, weight_diff)


def transposed(xp, grid, weight, image, geom, tile=None):
    """image = sum over taps of W^T * grid (overwrites ``image``, N x C x H x W) at stride
    1: the convolution of ``grid`` with the kernel rotated by 180 degrees and its channel
    axes swapped, padded by (kernel - 1) * dilation - pad."""
    pad = tuple((k - 1) * d - p for k, d, p in zip(geom.kernel, geom.dilation, geom.pad))
    forward(xp, grid, weight, image, dataclasses.replace(geom, pad=pad), transposed=True,
            tile=tile)
