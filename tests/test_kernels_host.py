"""caffelite's CUDA kernels (caffelite/kernels/*.cu), compiled for the host with g++
(caffelite/kernels/host.py, caffelite/kernels/host_shim.h), against the numpy layers.

Every comparison runs twice: with the launch a GPU would get (ceil(n/256) blocks of 256)
and with a deliberately small grid (2 blocks of 3 threads), so every grid-stride loop
walks many elements. Outputs start POISONED (NaN, or -12345 for int masks) so an element
a kernel forgets to write shows up; kernels that accumulate (scatter, confusion matrix)
start from a known non-zero base instead and must add to it.

Exactness: bit-for-bit equality where the kernel does the numpy layer's float operations
in the same order (copies, max/argmax, pooling sums, interp forward, the loss gradient,
Eltwise MAX, the solver updates, softmax's backward); where the sum order differs
(col2im gathers the taps last to first, Interp's backward is an atomic scatter against
numpy's matrix product, softmax uses the C library's expf), a worst-case bound
(terms + a few) * eps * sum|terms| per element, and exact equality on integer (or
dyadic) data, where any order is exact. test_kernels_gpu.py imports these tests and
runs them through CuPy on a device.
"""
import importlib.util
import math
import types

import numpy as np
import pytest

from caffelite import kernels
from caffelite.blob import Blob
from caffelite.layers import im2col as np_im2col
from caffelite.proto import caffe_pb2
from caffelite.solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver,
                              RMSPropSolver, SGDSolver, _cpow)
from caffelite.kernels.host import nvrtc_library, nvrtc_compile
from gpu_modes import host_kernels_for
from layer_testing import (TEST, TRAIN, assert_same_bits, make_layer, run_forward,
                           setup_layer)

FLOATS = [np.float32, np.float64]
POISON_INT = -12345


@pytest.fixture(scope="session")
def host_kernels(tmp_path_factory):
    return host_kernels_for(tmp_path_factory, kernels.module_names(), "kernels")


@pytest.fixture
def kern(host_kernels):
    """Runs a kernel: kern.run(module, kernel, dtype, *args, grid=None, block=256)."""
    return host_kernels


def poisoned(shape, dtype):
    return np.full(shape, np.nan, dtype)


def eps(dtype):
    return float(np.finfo(dtype).eps)


def assert_within(actual, expected, bound, what):
    """|actual - expected| <= bound element-wise (NaN positions must agree)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), what
    err = np.abs(np.nan_to_num(actual) - np.nan_to_num(expected))
    worst = np.argmax(err - bound)
    assert np.all(err <= bound), (f"{what}: error {err.flat[worst]:.3g} above bound "
                                  f"{np.broadcast_to(bound, err.shape).flat[worst]:.3g}")


def test_every_kernel_module_is_covered_here():
    """One test group per module: im2col.cu, pooling.cu, interp.cu, softmax_loss.cu,
    eltwise.cu, sgd_update.cu, seg_confusion.cu, channel.cu, relu.cu, dropout.cu,
    domain_transform.cu, lrn.cu, timing.cu; permutohedral.cu (the dense CRF) is tested in
    test_crf_gpu_kernels.py, conv_igemm.cu (the tensor-core convolution) in
    test_conv_igemm.py."""
    assert kernels.module_names() == ["channel", "conv_igemm", "domain_transform",
                                      "dropout", "eltwise",
                                      "im2col", "interp", "lrn", "permutohedral", "pooling",
                                      "relu", "seg_confusion", "sgd_update",
                                      "softmax_loss", "timing"]


def test_every_module_compiles_without_warnings(host_kernels):
    for name in kernels.module_names():
        mod = host_kernels.module(name)
        assert set(mod.signatures) == set(kernels.kernel_signatures(kernels.source(name)))


# Kernels that call expf/logf/powf, whose CUDA implementations use fma and approximations.
LIBM_KERNELS = {"softmax_forward", "softmax_loss_forward", "crf_softmax", "lrn_output",
                "lrn_diff"}


def ptx_entries(ptx):
    """{entry symbol: its PTX body}."""
    return {part.split("(")[0]: part for part in ptx.split(".entry ")[1:]}


@pytest.mark.parametrize("name", kernels.module_names())
def test_nvrtc_compiles_every_instantiation(name):
    """Where an NVRTC library is installed (no GPU needed), each .cu compiles with the
    loader's options and name expressions, and every kernel that must round like numpy
    has no contracted multiply-add (--fmad=false) and no approximate division or sqrt."""
    lib = nvrtc_library()
    if lib is None:
        pytest.skip("no NVRTC library found (pip install nvidia-cuda-nvrtc, or set "
                    "CAFFELITE_NVRTC to libnvrtc.so)")
    ptx, lowered = nvrtc_compile(lib, name, kernels.NVRTC_OPTIONS)
    entries = ptx_entries(ptx)
    for expression, symbol in lowered.items():
        assert symbol in entries, expression
        if expression.split("<")[0] not in LIBM_KERNELS:
            assert "fma." not in entries[symbol], expression
            assert ".approx" not in entries[symbol], expression
    if name == "interp":       # NVRTC's default (--fmad=true) would contract here
        assert "fma.rn" in nvrtc_compile(lib, name, ("-std=c++14",))[0]


def test_loader_errors_and_argument_checks():
    with pytest.raises(ValueError, match="no kernel module 'nope'"):
        kernels.source("nope")
    params = kernels.kernel_signatures(kernels.source("eltwise"))["eltwise_max_backward"]
    x = np.zeros(4, np.float32)
    mask = np.zeros(4, np.int32)
    with pytest.raises(TypeError, match="argument 'mask' must be a C-contiguous int32"):
        kernels.convert_args(params, np.float32, (4, x, x, 0, x), np)
    with pytest.raises(TypeError, match="float32 and float64 only"):
        kernels.ctype_name(np.float16)
    values = kernels.convert_args(params, np.float64, (4, x.astype(np.float64), mask, 2,
                                                       x.astype(np.float64)), np)
    assert values[0].dtype == np.int32 and values[3].dtype == np.int32
    if importlib.util.find_spec("cupy") is None:
        with pytest.raises(kernels.GPUUnavailableError, match="needs CuPy"):
            kernels.load_module("eltwise")



def test_loader_builds_real_cupy_modules_without_a_device(monkeypatch):
    """Where CuPy is installed (CI installs it; no GPU needed), load_module builds every
    module as a real cupy.RawModule with the loader's options and name expressions and
    caches it: catches what the emulator never runs (e.g. setting attributes on the
    Cython RawModule). Compiling needs a device, so get_function is not called."""
    cupy = pytest.importorskip("cupy")
    monkeypatch.setattr(kernels, "_cupy_checked", [cupy])
    monkeypatch.setattr(kernels, "_modules", {})
    monkeypatch.setattr(cupy.cuda, "Device", lambda *a: types.SimpleNamespace(id=0))
    for name in kernels.module_names():
        module = kernels.load_module(name)
        assert isinstance(module, cupy.RawModule)
        assert kernels.load_module(name) is module

# =============================================================== im2col.cu
IM2COL_CASES = [
    # channels, (H, W), kernel, stride, pad, dilation
    (3, (7, 5), (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, (9, 8), (3, 2), (2, 1), (2, 0), (2, 3)),
    (1, (5, 6), (1, 1), (1, 1), (0, 0), (1, 1)),
    (2, (11, 7), (2, 3), (3, 2), (3, 1), (1, 1)),
    (1, (10, 10), (3, 3), (1, 1), (4, 4), (4, 4)),
    (2, (4, 3), (5, 5), (2, 2), (3, 3), (1, 1)),      # kernel larger than the image
    (2, (13, 11), (3, 3), (2, 3), (3, 2), (3, 2)),    # strides and dilations coprime
]


def im2col_geometry(case):
    channels, img, kernel, stride, pad, dilation = case
    geom = np_im2col.ConvGeometry(kernel, stride, pad, dilation)
    return channels, img, geom, geom.conv_output_shape(img)


def im2col_args(geom, channels, img, grid, row_begin, band_rows, num=1, col_ld=None):
    if col_ld is None:
        col_ld = num * band_rows * grid[1]
    return (channels, img[0], img[1], geom.kernel[0], geom.kernel[1], geom.pad[0],
            geom.pad[1], geom.stride[0], geom.stride[1], geom.dilation[0], geom.dilation[1],
            grid[1], row_begin, band_rows, num, col_ld)


def col2im_in_order(col, channels, img, geom, grid, reverse):
    """Independent col2im: taps added one at a time (each tap adds at most one column
    entry per pixel), first to last or last to first (the GPU gather's order)."""
    taps = [(u, v) for u in range(geom.kernel[0]) for v in range(geom.kernel[1])]
    image = np.zeros((channels,) + img, col.dtype)
    col = col.reshape((channels,) + tuple(geom.kernel) + tuple(grid))
    for u, v in (reversed(taps) if reverse else taps):
        rows = np.arange(grid[0]) * geom.stride[0] - geom.pad[0] + u * geom.dilation[0]
        cols = np.arange(grid[1]) * geom.stride[1] - geom.pad[1] + v * geom.dilation[1]
        ri, ci = np.flatnonzero((rows >= 0) & (rows < img[0])), \
            np.flatnonzero((cols >= 0) & (cols < img[1]))
        image[np.ix_(range(channels), rows[ri], cols[ci])] += \
            col[:, u, v][np.ix_(range(channels), ri, ci)]
    return image


@pytest.mark.parametrize("case", IM2COL_CASES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_im2col_matches_numpy_exactly(kern, launch, case, dtype):
    """im2col.cu im2col: a copy, so bit-for-bit caffelite.layers.im2col.im2col, for the
    whole grid and for a band of output rows."""
    channels, img, geom, grid = im2col_geometry(case)
    rng = np.random.default_rng(1)
    image = rng.standard_normal((channels,) + img).astype(dtype)
    expected = np.empty((channels,) + tuple(geom.kernel) + tuple(grid), dtype)
    np_im2col.im2col(image, expected, geom, grid, 0, grid[0])
    col = poisoned(expected.shape, dtype)
    n = channels * grid[0] * grid[1]
    kern.run("im2col", "im2col", dtype, n, image,
             *im2col_args(geom, channels, img, grid, 0, grid[0]), col, **launch)
    np.testing.assert_array_equal(col, expected)
    # A band of rows [r0, r1): the column buffer holds only those rows.
    r0, r1 = grid[0] // 3, max(grid[0] // 3 + 1, grid[0] - 1)
    band = np.empty((channels,) + tuple(geom.kernel) + (r1 - r0, grid[1]), dtype)
    np_im2col.im2col(image, band, geom, grid, r0, r1)
    col = poisoned(band.shape, dtype)
    kern.run("im2col", "im2col", dtype, channels * (r1 - r0) * grid[1], image,
             *im2col_args(geom, channels, img, grid, r0, r1 - r0), col, **launch)
    np.testing.assert_array_equal(col, band)


@pytest.mark.parametrize("case", IM2COL_CASES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_col2im_matches_numpy(kern, launch, case, dtype):
    """im2col.cu col2im (gather, no atomics): bit-for-bit the taps summed last to first
    (Caffe's GPU order); within taps*eps*sum|terms| of caffelite's numpy col2im (first
    to last); exact on integer columns, where the order does not matter."""
    channels, img, geom, grid = im2col_geometry(case)
    rng = np.random.default_rng(2)
    shape = (channels,) + tuple(geom.kernel) + tuple(grid)
    n = channels * img[0] * img[1]
    args = im2col_args(geom, channels, img, grid, 0, grid[0])

    col = rng.standard_normal(shape).astype(dtype)
    image = poisoned((channels,) + img, dtype)
    kern.run("im2col", "col2im", dtype, n, col, *args, 0, image, **launch)
    np.testing.assert_array_equal(image, col2im_in_order(col, channels, img, geom, grid, True))
    expected = np.zeros((channels,) + img, dtype)
    np_im2col.col2im(col, expected, geom, grid, 0, grid[0])
    magnitude = col2im_in_order(np.abs(col), channels, img, geom, grid, False)
    assert_within(image, expected, (geom.taps + 2) * eps(dtype) * magnitude, "col2im")

    col = rng.integers(-50, 50, shape).astype(dtype)
    kern.run("im2col", "col2im", dtype, n, col, *args, 0, image, **launch)
    expected[...] = 0
    np_im2col.col2im(col, expected, geom, grid, 0, grid[0])
    np.testing.assert_array_equal(image, expected)


@pytest.mark.parametrize("case", IM2COL_CASES[:2])
def test_col2im_in_bands_accumulates(kern, launch, case):
    """im2col.cu col2im with bands: the first band writes (accumulate 0), later bands add
    (accumulate 1); on integer columns the result equals the one-shot col2im exactly."""
    channels, img, geom, grid = im2col_geometry(case)
    dtype = np.float32
    rng = np.random.default_rng(3)
    image_src = rng.integers(-9, 9, (channels,) + img).astype(dtype)
    full = np.empty((channels,) + tuple(geom.kernel) + tuple(grid), dtype)
    np_im2col.im2col(image_src, full, geom, grid, 0, grid[0])
    expected = np.zeros((channels,) + img, dtype)
    np_im2col.col2im(full, expected, geom, grid, 0, grid[0])
    image = poisoned((channels,) + img, dtype)
    n = channels * img[0] * img[1]
    for k, r0 in enumerate(range(0, grid[0], 2)):
        r1 = min(grid[0], r0 + 2)
        band = np.ascontiguousarray(full[:, :, :, r0:r1])
        kern.run("im2col", "col2im", dtype, n, band,
                 *im2col_args(geom, channels, img, grid, r0, r1 - r0), int(k > 0), image,
                 **launch)
    np.testing.assert_array_equal(image, expected)


@pytest.mark.parametrize("case", IM2COL_CASES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_several_images_side_by_side_with_padding_columns(kern, launch, case, dtype):
    """num images in one column matrix: image i's columns follow image i-1's, rows are
    col_ld apart, and the padding columns beyond num * grid are never touched (they stay
    poisoned). col2im reads the same layout back into the num images."""
    channels, img, geom, grid = im2col_geometry(case)
    num, plane = 3, grid[0] * grid[1]
    col_ld = num * plane + 3
    rows = channels * geom.taps
    rng = np.random.default_rng(4)
    images = rng.standard_normal((num, channels) + img).astype(dtype)
    expected = np.empty((rows, num, plane), dtype)
    for i in range(num):
        one = np.empty((channels,) + tuple(geom.kernel) + tuple(grid), dtype)
        np_im2col.im2col(images[i], one, geom, grid, 0, grid[0])
        expected[:, i] = one.reshape(rows, plane)
    col = poisoned((rows, col_ld), dtype)
    args = im2col_args(geom, channels, img, grid, 0, grid[0], num, col_ld)
    kern.run("im2col", "im2col", dtype, channels * num * plane, images, *args, col, **launch)
    np.testing.assert_array_equal(col[:, :num * plane], expected.reshape(rows, -1))
    assert np.isnan(col[:, num * plane:]).all()

    col = poisoned((rows, col_ld), dtype)
    col[:, :num * plane] = rng.standard_normal((rows, num * plane))
    out = poisoned(images.shape, dtype)
    kern.run("im2col", "col2im", dtype, out.size, col, *args, 0, out, **launch)
    for i in range(num):
        one = np.ascontiguousarray(col[:, i * plane:(i + 1) * plane])
        single = poisoned((channels,) + img, dtype)
        kern.run("im2col", "col2im", dtype, single.size, one,
                 *im2col_args(geom, channels, img, grid, 0, grid[0]), 0, single, **launch)
        np.testing.assert_array_equal(out[i], single)


# ============================================================== pooling.cu
POOL_CASES = [
    ("kernel_size: 3 stride: 2 pad: 1", (2, 3, 7, 6)),
    ("kernel_size: 2 stride: 2", (1, 2, 8, 9)),                     # ceil overhang
    ("kernel_size: 3 stride: 1 pad: 1", (1, 2, 5, 5)),
    ("kernel_size: 1 stride: 3", (1, 1, 5, 7)),                     # windows past the edge
    ("kernel_size: 1 stride: 2", (1, 1, 4, 4)),                     # AVE divisor 0 -> NaN
    ("kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 1", (2, 2, 6, 5)),
    ("global_pooling: true", (2, 2, 4, 5)),
    ("global_pooling: true", (1, 3, 17, 18)),                       # numpy's whole-plane path
]


def pooling_layer(pool, body, x, dtype):
    text = f'type: "Pooling" pooling_param {{ pool: {pool} {body} }}'
    layer = make_layer(text, dtype=dtype)
    bottom, top = setup_layer(layer, [x], 2 if pool == "MAX" else 1, dtype=dtype)
    run_forward(layer, bottom, top)
    return layer, bottom, top


def pooling_geometry(layer, shape):
    return (shape[2], shape[3], layer.pooled_h, layer.pooled_w, layer.kernel_h,
            layer.kernel_w, layer.stride_h, layer.stride_w, layer.pad_h, layer.pad_w)


def max_pool_input(shape, dtype, seed):
    """Few distinct values (many ties), plus -inf and NaN, which must never win."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 3, shape).astype(dtype)
    flat = x.reshape(-1)
    flat[rng.choice(flat.size, max(1, flat.size // 10), replace=False)] = -np.inf
    flat[rng.choice(flat.size, max(1, flat.size // 10), replace=False)] = np.nan
    return x


@pytest.mark.parametrize("body,shape", POOL_CASES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_max_pooling_matches_numpy_exactly(kern, launch, body, shape, dtype):
    """pooling.cu max_pool_forward/backward: value, mask (first maximum in row-major
    order; -1 when nothing wins) and the gathered gradient, bit-for-bit."""
    x = max_pool_input(shape, dtype, seed=len(body) + shape[-1])
    layer, bottom, top = pooling_layer("MAX", body, x, dtype)
    geometry = pooling_geometry(layer, shape)
    out = poisoned(top[0].shape, dtype)
    mask = np.full(top[0].shape, POISON_INT, np.int32)
    kern.run("pooling", "max_pool_forward", dtype, out.size, x, *geometry, out, mask, **launch)
    np.testing.assert_array_equal(out, top[0].data)
    np.testing.assert_array_equal(mask, top[1].data.astype(np.int32))

    top[0].diff[...] = np.random.default_rng(5).standard_normal(top[0].shape)
    layer.backward(top, [True], bottom)
    diff = poisoned(shape, dtype)
    kern.run("pooling", "max_pool_backward", dtype, diff.size, top[0].diff, mask, *geometry,
             diff, **launch)
    np.testing.assert_array_equal(diff, bottom[0].diff)


@pytest.mark.parametrize("body,shape", POOL_CASES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_ave_pooling_matches_numpy_exactly(kern, launch, body, shape, dtype):
    """pooling.cu ave_pool_forward/backward: the window sum in row-major order divided by
    the window clipped to [-pad, size + pad) (negative or 0 past the edge, as in Caffe),
    and the gradient gathered in (ph, pw) order, bit-for-bit."""
    x = np.random.default_rng(6).standard_normal(shape).astype(dtype)
    layer, bottom, top = pooling_layer("AVE", body, x, dtype)
    geometry = pooling_geometry(layer, shape)
    out = poisoned(top[0].shape, dtype)
    kern.run("pooling", "ave_pool_forward", dtype, out.size, x, *geometry, out, **launch)
    np.testing.assert_array_equal(out, top[0].data)

    top[0].diff[...] = np.random.default_rng(7).standard_normal(top[0].shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        layer.backward(top, [True], bottom)
    diff = poisoned(shape, dtype)
    kern.run("pooling", "ave_pool_backward", dtype, diff.size, top[0].diff, *geometry, diff,
             **launch)
    np.testing.assert_array_equal(diff, bottom[0].diff)


# =============================================================== interp.cu
INTERP_CASES = [
    # interp_param, bottom shape, weights dyadic (integer gradients sum exactly)
    ("zoom_factor: 2", (2, 3, 5, 7), True),
    ("shrink_factor: 8", (1, 1, 33, 25), True),                     # pure subsampling
    ("shrink_factor: 3 pad_beg: -1 pad_end: -2", (1, 2, 14, 11), False),
    ("zoom_factor: 4 shrink_factor: 3", (1, 2, 13, 10), False),     # one step, r = 0.75
    ("height: 1 width: 6", (1, 2, 4, 5), False),                    # one output row
    ("height: 9 width: 4", (1, 1, 1, 5), False),                    # one input row
    ("height: 7 width: 11", (2, 1, 6, 6), False),                   # float32 ratios
    ("zoom_factor: 1 pad_beg: -2 pad_end: -1", (1, 2, 8, 9), True),  # crop only: a copy
]


def interp_layer(body, x, dtype):
    layer = make_layer(f'type: "Interp" interp_param {{ {body} }}', dtype=dtype)
    bottom, top = setup_layer(layer, [x], dtype=dtype)
    run_forward(layer, bottom, top)
    return layer, bottom, top


def interp_args(layer):
    n, c, h, w = layer.in_shape
    o = -layer.pad_beg
    return (o, o, layer.h_eff, layer.w_eff, h, w)


@pytest.mark.parametrize("body,shape,dyadic", INTERP_CASES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_interp_forward_matches_numpy_exactly(kern, launch, body, shape, dyadic, dtype):
    """interp.cu interp_forward: float32 coordinates and Caffe's evaluation order, so
    bit-for-bit caffelite's Interp (which equals the fork's caffe_cpu_interp2)."""
    x = np.random.default_rng(8).standard_normal(shape).astype(dtype)
    layer, bottom, top = interp_layer(body, x, dtype)
    out = poisoned(top[0].shape, dtype)
    kern.run("interp", "interp_forward", dtype, out.size, x, *interp_args(layer), out,
             layer.h_out, layer.w_out, **launch)
    np.testing.assert_array_equal(out, top[0].data)


@pytest.mark.parametrize("body,shape,dyadic", INTERP_CASES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_interp_backward_equals_numpy_exactly(kern, launch, body, shape, dyadic, dtype):
    """interp.cu interp_backward (a gather in the fork's CPU order): bit for bit
    caffelite's host adjoint (which equals caffe_cpu_interp2_backward) on float data,
    every element of the poisoned gradient written, cropped-away pixels 0."""
    x = np.random.default_rng(9).standard_normal(shape).astype(dtype)
    layer, bottom, top = interp_layer(body, x, dtype)
    rng = np.random.default_rng(10)
    for g in (rng.standard_normal(top[0].shape), rng.integers(-20, 20, top[0].shape)):
        g = g.astype(dtype)
        top[0].diff[...] = g
        layer.backward(top, [True], bottom)
        diff = poisoned(shape, dtype)
        kern.run("interp", "interp_backward", dtype, diff.size, diff, *interp_args(layer),
                 g, layer.h_out, layer.w_out, **launch)
        np.testing.assert_array_equal(diff, bottom[0].diff)


def test_interp_backward_sums_border_taps_in_the_fork_order(kern):
    """Where the last input row and column are reached twice by one output (its second
    tap has no row to step to) and many outputs share a pixel (a 3 -> 40 zoom), the
    gather's float sums are the host's, whose order is the fork's."""
    x = np.zeros((1, 1, 3, 3), np.float32)
    layer, bottom, top = interp_layer("height: 40 width: 37", x, np.float32)
    g = (np.random.default_rng(12).standard_normal(top[0].shape) * 1e3).astype(np.float32)
    top[0].diff[...] = g
    layer.backward(top, [True], bottom)
    diff = poisoned((1, 1, 3, 3), np.float32)
    kern.run("interp", "interp_backward", np.float32, diff.size, diff, *interp_args(layer),
             g, 40, 37)
    np.testing.assert_array_equal(diff, bottom[0].diff)
    # The order matters for these data: the same terms added last to first differ.
    from caffelite.layers.interp import interp_axis
    y0, y1, ly0, ly1 = interp_axis(3, 40, np.float32)
    x0, x1, lx0, lx1 = interp_axis(3, 37, np.float32)
    terms = {}
    for i in range(40):
        for j in range(37):
            for r, c, w in ((y0[i], x0[j], ly0[i] * lx0[j]), (y0[i], x1[j], ly0[i] * lx1[j]),
                            (y1[i], x0[j], ly1[i] * lx0[j]), (y1[i], x1[j], ly1[i] * lx1[j])):
                terms.setdefault((r, c), []).append(w * g[0, 0, i, j])
    backwards = np.zeros((3, 3), np.float32)
    for (r, c), values in terms.items():
        for v in reversed(values):
            backwards[r, c] += v
    assert not np.array_equal(backwards, diff[0, 0])


# ========================================================= softmax_loss.cu
def softmax_case(shape, dtype, seed=11):
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype) * 4
    x.reshape(x.shape[0], x.shape[1], -1)[0, 0, 0] = 200      # p of the others underflows
    return x


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 7), (1, 1, 2, 2)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_softmax_forward_and_backward(kern, launch, shape, dtype):
    """softmax_loss.cu softmax_forward: within (2C + 8)*eps relative of the numpy Softmax
    (exp from the C library vs numpy's); softmax_backward: bit-for-bit when the channel
    sum runs over a strided axis (numpy adds it in channel order then), within
    (C + 4)*eps*sum|terms| otherwise (numpy's pairwise sum of a contiguous axis)."""
    x = softmax_case(shape, dtype)
    layer = make_layer('type: "Softmax"', dtype=dtype)
    bottom, top = setup_layer(layer, [x], dtype=dtype)
    run_forward(layer, bottom, top)
    channels = shape[1]
    inner = int(np.prod(shape[2:], dtype=np.int64))
    n = shape[0] * inner
    prob = poisoned(shape, dtype)
    kern.run("softmax_loss", "softmax_forward", dtype, n, x, channels, inner, prob, **launch)
    assert_within(prob, top[0].data, (2 * channels + 8) * eps(dtype) * top[0].data,
                  "softmax")

    dy = np.random.default_rng(12).standard_normal(shape).astype(dtype)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    dx = poisoned(shape, dtype)
    kern.run("softmax_loss", "softmax_backward", dtype, n, top[0].data, dy, channels, inner,
             dx, **launch)
    if inner > 1:
        np.testing.assert_array_equal(dx, bottom[0].diff)
    else:
        y = top[0].data
        dot_terms = np.abs(dy * y).sum(axis=1, keepdims=True)
        assert_within(dx, bottom[0].diff, (channels + 4) * eps(dtype) * dot_terms * y,
                      "softmax backward")


@pytest.mark.parametrize("ignore", [255, None])
@pytest.mark.parametrize("dtype", FLOATS)
def test_softmax_loss_matches_numpy(kern, launch, ignore, dtype):
    """softmax_loss.cu softmax_loss_forward: per-position -log(max(p, FLT_MIN)) (within
    4 eps of numpy's log) and count, whose sums give SoftmaxWithLoss's loss and VALID
    normalizer; ignored positions give 0 and 0. softmax_loss_backward: (p - onehot) *
    (loss top diff / normalizer), 0 at ignored positions, bit-for-bit."""
    shape, channels = (2, 4, 3, 5), 4
    x = softmax_case(shape, dtype)
    rng = np.random.default_rng(13)
    labels = rng.integers(0, channels, (2, 1, 3, 5)).astype(dtype)
    labels[0, 0, 0, 0] = 1                    # the p = 0 position: loss -log(FLT_MIN)
    labels[1, 0, 1, :3] = 2.7                 # truncated to 2
    if ignore is not None:
        labels[0, 0, 2, :] = ignore
    loss_param = f"loss_param {{ ignore_label: {ignore} }}" if ignore is not None else ""
    layer = make_layer(f'type: "SoftmaxWithLoss" {loss_param}', dtype=dtype)
    bottom, top = setup_layer(layer, [x, labels], dtype=dtype)
    run_forward(layer, bottom, top)
    inner, n = 15, 2 * 15
    has_ignore, ignore_value = (1, ignore) if ignore is not None else (0, 0)
    loss, counts = poisoned(n, dtype), poisoned(n, dtype)
    kern.run("softmax_loss", "softmax_loss_forward", dtype, n, layer.prob, labels, channels,
             inner, has_ignore, ignore_value, loss, counts, **launch)

    lab = labels.reshape(2, inner).astype(np.int64)
    valid = (lab != ignore) if ignore is not None else np.ones_like(lab, bool)
    np.testing.assert_array_equal(counts, valid.reshape(-1).astype(dtype))
    p_true = np.take_along_axis(layer.prob, np.where(valid, lab, 0)[:, None, :], 1)[:, 0]
    nll = np.where(valid, -np.log(np.maximum(p_true, dtype(np.finfo(np.float32).tiny))), 0)
    assert_within(loss, nll.reshape(-1), 4 * eps(dtype) * (np.abs(nll.reshape(-1)) + 1),
                  "per-position loss")
    assert loss[0] == pytest.approx(-math.log(np.finfo(np.float32).tiny), rel=1e-6)
    normalizer = max(1.0, float(counts.sum()))
    assert float(loss.sum()) / normalizer == pytest.approx(float(top[0].data), rel=1e-5)

    top[0].diff[...] = 2.5                    # loss_weight
    layer.backward(top, [True, False], bottom)
    diff = poisoned(shape, dtype)
    kern.run("softmax_loss", "softmax_loss_backward", dtype, n, layer.prob, labels, channels,
             inner, has_ignore, ignore_value, np.array([2.5], dtype),
             np.array([normalizer], dtype), diff,
             **launch)
    np.testing.assert_array_equal(diff, bottom[0].diff)


def test_softmax_loss_out_of_range_label_gives_nan(kern):
    """softmax_loss.cu: a label outside [0, C) that is not ignored reads nothing and
    marks the position NaN (the caller then reports the label)."""
    prob = np.full((1, 3, 2), 1 / 3, np.float32)
    labels = np.array([1, 7], np.float32)
    loss, counts = poisoned(2, np.float32), poisoned(2, np.float32)
    kern.run("softmax_loss", "softmax_loss_forward", np.float32, 2, prob, labels, 3, 2, 1, 255,
             loss, counts)
    assert np.isfinite(loss[0]) and np.isnan(loss[1])


# ============================================================== eltwise.cu
def eltwise_layer(arrays, dtype):
    layer = make_layer('type: "Eltwise" eltwise_param { operation: MAX }', dtype=dtype)
    bottom, top = setup_layer(layer, arrays, dtype=dtype)
    run_forward(layer, bottom, top)
    return layer, bottom, top


def eltwise_kernel_forward(kern, launch, arrays, ties_to_later, dtype):
    out = poisoned(arrays[0].shape, dtype)
    mask = np.full(arrays[0].shape, POISON_INT, np.int32)
    n = out.size
    kern.run("eltwise", "eltwise_max_forward", dtype, n, arrays[0], arrays[1], 1, ties_to_later,
             out, mask, **launch)
    for i, x in enumerate(arrays[2:], 2):
        kern.run("eltwise", "eltwise_max_forward", dtype, n, out, x, i, ties_to_later, out,
                 mask, **launch)
    return out, mask


def gpu_tie_rule_mask(arrays):
    """Spec section 9, GPU: bottoms 0/1 as on the CPU; then the LAST bottom i >= 2 that
    equals the maximum takes the mask."""
    x = np.stack(arrays)
    best = x.max(axis=0)
    mask = np.where(x[0] > x[1], 0, 1)
    for i in range(2, len(arrays)):
        mask = np.where(x[i] == best, i, mask)
    return mask


@pytest.mark.parametrize("count", [2, 3, 4])
@pytest.mark.parametrize("dtype", FLOATS)
def test_eltwise_max_both_tie_rules(kern, launch, count, dtype):
    """eltwise.cu: with ties_to_later=0 (Caffe's CPU rule) top, mask and gradients equal
    the numpy Eltwise MAX bit-for-bit; with ties_to_later=1 (Caffe's GPU rule, what
    DeepLab trained with) the top is the same but ties among bottoms >= 2 go to the later
    bottom, which the data here contains, so the masks differ there."""
    rng = np.random.default_rng(14 + count)
    shape = (2, 3, 5, 7)
    arrays = [rng.integers(0, 3, shape).astype(dtype) for _ in range(count)]
    layer, bottom, top = eltwise_layer(arrays, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    top[0].diff[...] = dy
    layer.backward(top, [True] * count, bottom)

    out, cpu_mask = eltwise_kernel_forward(kern, launch, arrays, 0, dtype)
    np.testing.assert_array_equal(out, top[0].data)
    np.testing.assert_array_equal(cpu_mask, layer.max_idx)
    out, gpu_mask = eltwise_kernel_forward(kern, launch, arrays, 1, dtype)
    np.testing.assert_array_equal(out, top[0].data)
    np.testing.assert_array_equal(gpu_mask, gpu_tie_rule_mask(arrays))
    if count == 2:
        np.testing.assert_array_equal(gpu_mask, cpu_mask)
    else:
        assert np.any(gpu_mask != cpu_mask)

    for mask, reference in ((cpu_mask, [b.diff for b in bottom]),
                            (gpu_mask, [np.where(gpu_mask == i, dy, 0) for i in range(count)])):
        for i in range(count):
            diff = poisoned(shape, dtype)
            kern.run("eltwise", "eltwise_max_backward", dtype, diff.size, dy, mask, i, diff,
                     **launch)
            np.testing.assert_array_equal(diff, reference[i])


@pytest.mark.parametrize("dtype", FLOATS)
def test_eltwise_sum2_equals_the_numpy_sum_with_caffes_zero(kern, launch, dtype):
    """eltwise.cu eltwise_sum2: (0 + a) + b, bit for bit the numpy Eltwise SUM of two
    bottoms, -0 + -0 = +0 and NaN/Inf included, every poisoned element written."""
    rng = np.random.default_rng(31)
    a, b = (rng.standard_normal((3, 4, 5, 7)).astype(dtype) for _ in range(2))
    a.reshape(-1)[:6] = [-0.0, -0.0, 0.0, np.nan, np.inf, -np.inf]
    b.reshape(-1)[:6] = [-0.0, 0.0, -0.0, 1.0, -np.inf, 2.0]
    layer = make_layer('type: "Eltwise"', dtype=dtype)
    bottom, top = setup_layer(layer, [a, b], dtype=dtype)
    with np.errstate(invalid="ignore"):         # inf + -inf
        run_forward(layer, bottom, top)
    out = poisoned(a.shape, dtype)
    kern.run("eltwise", "eltwise_sum2", dtype, out.size, a, b, out, **launch)
    assert_same_bits(out, top[0].data)
    assert not np.signbit(out.reshape(-1)[0])


def test_signed_zero_gradients_arrive_as_positive_zero(kern):
    """eltwise_max_backward and the same-size interp_backward add the gradient to a
    zero, as the fork's kernels do: a -0 top diff gives +0, like the numpy layers."""
    dy = np.array([-0.0, -0.0, 2.0, -3.0], np.float32)
    mask = np.array([0, 1, 0, 0], np.int32)
    diff = poisoned(4, np.float32)
    kern.run("eltwise", "eltwise_max_backward", np.float32, 4, dy, mask, 0, diff)
    np.testing.assert_array_equal(diff, [0, 0, 2, -3])
    assert not np.signbit(diff[:2]).any()
    x = np.zeros((1, 1, 2, 2), np.float32)
    layer, bottom, top = interp_layer("height: 2 width: 2", x, np.float32)
    g = np.array([-0.0, 1.0, -0.0, -2.0], np.float32).reshape(1, 1, 2, 2)
    diff = poisoned(x.shape, np.float32)
    kern.run("interp", "interp_backward", np.float32, diff.size, diff, *interp_args(layer),
             g, 2, 2)
    np.testing.assert_array_equal(diff, g)
    assert not np.signbit(diff.reshape(-1)[[0, 2]]).any()


def test_eltwise_max_nan_differs_between_rules(kern):
    """eltwise.cu: a NaN in bottom 2 wins under the GPU rule, never under the CPU rule."""
    a, b, c = (np.array(v, np.float32) for v in ([1, 5], [2, 3], [np.nan, 4]))
    out, mask = eltwise_kernel_forward(kern, {}, [a, b, c], 0, np.float32)
    np.testing.assert_array_equal(mask, [1, 0])
    out, mask = eltwise_kernel_forward(kern, {}, [a, b, c], 1, np.float32)
    np.testing.assert_array_equal(mask, [2, 0])
    assert np.isnan(out[0])


# =========================================================== sgd_update.cu
SOLVERS = {
    "sgd_update": (SGDSolver, "momentum: 0.9", 1),
    "nesterov_update": (NesterovSolver, "momentum: 0.95", 1),
    "adagrad_update": (AdaGradSolver, "delta: 1e-6", 1),
    "rmsprop_update": (RMSPropSolver, "rms_decay: 0.98 delta: 1e-6", 1),
    "adadelta_update": (AdaDeltaSolver, "momentum: 0.95 delta: 1e-6", 2),
    "adam_update": (AdamSolver, "momentum: 0.9 momentum2: 0.999 delta: 1e-8", 2),
}


def numpy_solver(cls, text, w, dtype, lr_mult, decay_mult):
    """The real solver.py update code on one learnable blob (no net, no files):
    normalize, regularize, compute_update_value, then Net::Update."""
    from google.protobuf import text_format
    param = text_format.Parse(text, caffe_pb2.SolverParameter())
    solver = object.__new__(cls)
    solver.param = param
    blob = Blob(w.shape, dtype)
    blob.data[...] = w
    solver.net = types.SimpleNamespace(learnable_params=[types.SimpleNamespace(
        blob=blob, lr_mult=lr_mult, decay_mult=decay_mult)])
    solver.history = [np.zeros(w.shape, dtype) for _ in range(cls.history_per_param)]
    solver.iter = 0
    return solver, blob


def kernel_scalars(kernel, param, dtype, rate, lr_mult, decay_mult, iteration):
    """The per-blob scalars, computed in T as solver.py computes them."""
    dt = np.dtype(dtype).type
    iter_scale = dt(dt(1) / dt(param.iter_size))
    local_decay = dt(dt(param.weight_decay) * dt(decay_mult))
    regularization = 0 if not local_decay else {"L2": 1, "L1": 2}[param.regularization_type]
    local_rate = dt(dt(rate) * dt(lr_mult))
    head = (iter_scale, local_decay, regularization)
    if kernel in ("sgd_update", "nesterov_update"):
        return head + (dt(param.momentum), local_rate)
    if kernel == "adagrad_update":
        return head + (dt(param.delta), local_rate)
    if kernel == "rmsprop_update":
        return head + (dt(param.rms_decay), dt(param.delta), local_rate)
    if kernel == "adadelta_update":
        return head + (dt(param.momentum), dt(param.delta), local_rate)
    t = iteration + 1
    correction = dt(math.sqrt(1.0 - _cpow(param.momentum2, t)) /
                    (1.0 - _cpow(param.momentum, t)))
    return head + (dt(param.momentum), dt(param.momentum2), dt(param.delta),
                   dt(local_rate * correction))


@pytest.mark.parametrize("kernel", list(SOLVERS))
@pytest.mark.parametrize("regularization", ["L2", "L1", "none"])
@pytest.mark.parametrize("dtype", FLOATS)
def test_solver_updates_match_solver_py_exactly(kern, launch, kernel, regularization, dtype):
    """sgd_update.cu: three iterations (iter_size 2, lr_mult 2, decay_mult 1) of each fused
    update give the same weights, update (diff) and history as solver.py, bit-for-bit."""
    cls, hyper, n_hist = SOLVERS[kernel]
    decay = "" if regularization == "none" else \
        f'weight_decay: 0.0005 regularization_type: "{regularization}"'
    text = f"base_lr: 0.01 iter_size: 2 {hyper} {decay}"
    rng = np.random.default_rng(15)
    w = rng.standard_normal(37).astype(dtype)
    w[:3] = 0                                  # sign(0) = 0 for L1
    lr_mult, decay_mult = 2.0, 1.0
    solver, blob = numpy_solver(cls, text, w, dtype, lr_mult, decay_mult)
    weights, hist = w.copy(), [np.zeros_like(w) for _ in range(n_hist)]
    for iteration in range(3):
        grad = rng.standard_normal(w.shape).astype(dtype)
        rate = dtype(0.01 * (1 - iteration / 10))
        solver.iter = iteration
        blob.diff[...] = grad
        solver.normalize(0)
        solver.regularize(0)
        solver.compute_update_value(0, rate)
        blob.data[...] -= blob.diff
        g = grad.copy()
        kern.run("sgd_update", kernel, dtype, w.size, weights, g, *hist,
                 *kernel_scalars(kernel, solver.param, dtype, rate, lr_mult, decay_mult,
                                 iteration), **launch)
        np.testing.assert_array_equal(g, blob.diff)
        np.testing.assert_array_equal(weights, blob.data)
        for mine, theirs in zip(hist, solver.history):
            np.testing.assert_array_equal(mine, theirs)


# ========================================================= seg_confusion.cu
def seg_accuracy_layer(scores, labels, ignore):
    text = " ".join(f"ignore_label: {i}" for i in ignore)
    layer = make_layer(f'type: "SegAccuracy" seg_accuracy_param {{ {text} }}',
                       dtype=np.float32)
    bottom, top = setup_layer(layer, [scores, labels], dtype=np.float32)
    run_forward(layer, bottom, top)
    return layer


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("ignore", [[255], [255, 0], []])
def test_seg_confusion_matches_seg_accuracy(kern, launch, dtype, ignore):
    """seg_confusion.cu: argmax ties to the highest class, truncated labels, ignore labels
    skipped; the atomicAdd counts equal SegAccuracy's confusion matrix and add onto the
    matrix given (accumulation across forwards with reset: false)."""
    rng = np.random.default_rng(16)
    n, c, h, w = 2, 5, 7, 9
    scores = rng.integers(0, 3, (n, c, h, w)).astype(dtype)       # many ties
    labels = rng.integers(0, c, (n, 1, h, w)).astype(dtype)
    labels[0, 0, 0, :4] = 3.9                                      # truncated to 3
    if ignore:
        labels[1, 0, 2, :] = 255
    layer = seg_accuracy_layer(scores.astype(np.float32), labels.astype(np.float32), ignore)
    base = rng.integers(0, 100, (c, c)).astype(np.uint64)
    confusion = base.copy()
    first_bad = np.array([n * h * w], np.int32)
    ignore_arr = np.array(ignore, np.int32)
    kern.run("seg_confusion", "seg_confusion", dtype, n * h * w, scores, labels, c, h * w,
             ignore_arr, len(ignore), confusion, first_bad, **launch)
    np.testing.assert_array_equal(confusion - base, layer.confusion.astype(np.uint64))
    assert first_bad[0] == n * h * w


def test_seg_confusion_reports_first_bad_label(kern, launch):
    """seg_confusion.cu: labels outside [0, C) that are not ignored are not counted; the
    smallest such pixel index is reported."""
    scores = np.zeros((1, 3, 2, 4), np.float32)
    labels = np.array([[[[0, 1, 255, 2], [7, -1, 5, 1]]]], np.float32)
    confusion = np.zeros((3, 3), np.uint64)
    first_bad = np.array([8], np.int32)
    kern.run("seg_confusion", "seg_confusion", np.float32, 8, scores, labels, 3, 8,
             np.array([255], np.int32), 1, confusion, first_bad, **launch)
    assert first_bad[0] == 4
    assert confusion.sum() == 4 and confusion[:, 2].sum() == 4    # all-tie scores -> class 2


def test_seg_confusion_ranks_nan_scores_as_seg_accuracy(kern, launch):
    """seg_confusion.cu: a NaN compares false both ways, so the class after it restarts
    the search (std::partial_sort's scan), as SegAccuracy's host argmax."""
    rng = np.random.default_rng(17)
    scores = rng.integers(0, 3, (1, 4, 3, 5)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.3] = np.nan
    labels = rng.integers(0, 4, (1, 1, 3, 5)).astype(np.float32)
    layer = seg_accuracy_layer(scores, labels, [255])
    confusion = np.zeros((4, 4), np.uint64)
    first_bad = np.array([15], np.int32)
    kern.run("seg_confusion", "seg_confusion", np.float32, 15, scores, labels, 4, 15,
             np.array([255], np.int32), 1, confusion, first_bad, **launch)
    np.testing.assert_array_equal(confusion, layer.confusion.astype(np.uint64))


# ---------------------------------------------------------------- channel.cu, relu.cu
def channel_layer(text, x, params, dtype, phase=TRAIN):
    """A CPU layer with its parameter blobs set, run forward and backward out of place;
    returns (layer, bottom, top, dy)."""
    layer = make_layer(text, phase, dtype=dtype)
    bottom, top = setup_layer(layer, [x], dtype=dtype)
    for blob, value in zip(layer.blobs, params):
        blob.data[...] = value
    run_forward(layer, bottom, top)
    dy = np.random.default_rng(31).standard_normal(top[0].shape).astype(dtype)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    return layer, bottom, top, dy


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 7), (1, 5, 1, 1)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_channel_normalize_and_divide_match_batchnorm(kern, launch, shape, dtype):
    """channel.cu: BatchNorm with stored statistics, forward (x - mean) / std and
    backward dy / std, bit-for-bit the numpy layer."""
    rng = np.random.default_rng(21)
    channels = shape[1]
    x = rng.standard_normal(shape).astype(dtype)
    params = [rng.standard_normal(channels), rng.uniform(0.5, 2, channels), [0.75]]
    layer, bottom, top, dy = channel_layer('type: "BatchNorm"', x, params, dtype, TEST)
    inner = x.size // (shape[0] * channels)
    factor = dtype(1) / dtype(0.75)
    mean = (factor * layer.blobs[0].data).astype(dtype)
    std = np.sqrt(factor * layer.blobs[1].data + dtype(layer.eps)).astype(dtype)
    y = poisoned(shape, dtype)
    kern.run("channel", "channel_normalize", dtype, x.size, x, mean, std, channels, inner, y,
             **launch)
    np.testing.assert_array_equal(y, top[0].data)
    dx = poisoned(shape, dtype)
    kern.run("channel", "channel_divide", dtype, x.size, dy, std, channels, inner, dx,
             **launch)
    np.testing.assert_array_equal(dx, bottom[0].diff)


@pytest.mark.parametrize("scale", [0.75, 3.0, 0.0])
@pytest.mark.parametrize("dtype", FLOATS)
def test_channel_stored_stats_match_batchnorm(kern, launch, scale, dtype):
    """channel.cu channel_stored_stats: the mean and std vectors of the numpy BatchNorm
    with stored statistics (1 / scale factor, 0 for a zero factor), bit for bit."""
    rng = np.random.default_rng(22)
    channels = 7
    x = rng.standard_normal((2, channels, 3, 2)).astype(dtype)
    params = [rng.standard_normal(channels), rng.uniform(0.5, 2, channels), [scale]]
    layer, _, _, _ = channel_layer('type: "BatchNorm"', x, params, dtype, TEST)
    stats = poisoned((2, channels), dtype)
    kern.run("channel", "channel_stored_stats", dtype, channels, layer.blobs[0].data,
             layer.blobs[1].data, layer.blobs[2].data, dtype(layer.eps), stats[0], stats[1],
             **launch)
    factor = dtype(0) if scale == 0 else dtype(1) / dtype(scale)
    np.testing.assert_array_equal(stats[0], factor * layer.blobs[0].data)
    np.testing.assert_array_equal(stats[1], layer.std_vector)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("relu", [None, 0.0, 0.1])
@pytest.mark.parametrize("dtype", FLOATS)
def test_fused_bn_scale_relu_matches_the_three_layers(kern, launch, bias, relu, dtype):
    """channel.cu channel_bn_scale_relu(_backward): BatchNorm (stored statistics) and
    Scale run one after the other by the numpy layers, then the device ReLU (the fork's
    GPU formula, relu_forward_oracle), bit for bit, forward and backward (frozen Scale,
    the numpy ReLU backward), with -0, NaN and values that ReLU cuts or keeps."""
    rng = np.random.default_rng(23)
    shape, channels = (2, 5, 3, 4), 5
    x = rng.standard_normal(shape).astype(dtype)
    x.flat[:4] = [-0.0, np.nan, 0.0, 1e-30]
    bn, bn_bottom, bn_top, _ = channel_layer(
        'type: "BatchNorm"', x,
        [rng.standard_normal(channels), rng.uniform(0.5, 2, channels), [0.75]], dtype, TEST)
    text = f'type: "Scale" scale_param {{ bias_term: {str(bias).lower()} }}'
    params = [rng.standard_normal(channels)] + ([rng.standard_normal(channels)] if bias else [])
    scale, _, scale_top, _ = channel_layer(text, bn_top[0].data.copy(), params, dtype)
    expected = scale_top[0].data.copy()
    if relu is not None:
        relu_layer, _, _, _ = channel_layer(
            f'type: "ReLU" relu_param {{ negative_slope: {relu} }}', expected, [], dtype)
        expected = relu_forward_oracle(expected, relu_layer.negative_slope)
    inner = 12
    # The proto's float field: a slope of 0.1 is float32's 0.1 for a double net too.
    slope = dtype(relu_layer.negative_slope if relu is not None else 0)
    mean = (dtype(1) / dtype(0.75) * bn.blobs[0].data).astype(dtype)
    y = poisoned(shape, dtype)
    bias_arg = scale.blobs[-1].data if bias else scale.blobs[0].data
    kern.run("channel", "channel_bn_scale_relu", dtype, x.size, x, mean, bn.std_vector,
             scale.blobs[0].data, bias_arg, int(bias), int(relu is not None), slope,
             channels, inner, y, **launch)
    np.testing.assert_array_equal(y, expected)
    assert (np.signbit(y) == np.signbit(expected)).all()

    dy = rng.standard_normal(shape).astype(dtype)
    dy.flat[np.flatnonzero(expected <= 0)[:2]] = np.inf     # NaN where ReLU cuts (slope 0)
    g = dy
    if relu is not None:
        g = relu_backward_oracle(expected, dy, slope)
    expected_dx = (g * scale.blobs[0].data.reshape(1, -1, 1, 1)).astype(dtype)
    expected_dx = (expected_dx / bn.std_vector.reshape(1, -1, 1, 1)).astype(dtype)
    dx = poisoned(shape, dtype)
    kern.run("channel", "channel_bn_scale_relu_backward", dtype, x.size,
             np.ascontiguousarray(expected), dy, bn.std_vector, scale.blobs[0].data,
             int(relu is not None), slope, channels, inner, dx, **launch)
    np.testing.assert_array_equal(dx, expected_dx)


@pytest.mark.parametrize("text,shape,inner", [
    ('type: "Scale" scale_param { bias_term: true }', (2, 3, 4, 5), 20),
    ('type: "Scale" scale_param { axis: 2 num_axes: 1 }', (2, 3, 4, 5), 5),
    ('type: "Scale" scale_param { bias_term: true axis: 0 }', (2, 3), 3),
    ('type: "Bias"', (2, 3, 4, 5), 20),
    ('type: "Bias" bias_param { axis: 2 num_axes: 1 }', (2, 3, 4, 5), 5),
])
@pytest.mark.parametrize("dtype", FLOATS)
def test_channel_scale_and_bias_match_scale_and_bias_layers(kern, launch, text, shape,
                                                            inner, dtype):
    """channel.cu: Scale (with and without bias, over any axis) and Bias forward, and
    Scale's data gradient, bit-for-bit the numpy layers."""
    rng = np.random.default_rng(22)
    x = rng.standard_normal(shape).astype(dtype)
    probe = make_layer(text, TRAIN, dtype=dtype)
    setup_layer(probe, [x], dtype=dtype)
    params = [rng.standard_normal(b.shape) for b in probe.blobs]
    layer, bottom, top, dy = channel_layer(text, x, params, dtype)
    channels = layer.blobs[0].count
    blobs = [b.data for b in layer.blobs]
    y = poisoned(shape, dtype)
    kernel = ("channel_bias" if layer.type == "Bias" else
              "channel_scale_bias" if len(blobs) == 2 else "channel_scale")
    kern.run("channel", kernel, dtype, x.size, x, *blobs, channels, inner, y, **launch)
    np.testing.assert_array_equal(y, top[0].data)
    if layer.type == "Scale":
        dx = poisoned(shape, dtype)
        kern.run("channel", "channel_scale", dtype, x.size, dy, blobs[0], channels, inner,
                 dx, **launch)
        np.testing.assert_array_equal(dx, bottom[0].diff)


@pytest.mark.parametrize("dtype", FLOATS)
def test_dropout_forward_draws_numpy_philox(kern, launch, dtype):
    """dropout.cu: the four words of block b are numpy's Philox (4x64-10) for counter
    state + b + 1 under the state's key, across a carry into the counter's high word;
    a unit is kept when its word's high 32 bits exceed the layer's threshold (Caffe's
    UINT_MAX * ratio); y = (x * mask) * scale bit for bit (signed zeros, infinities and
    NaN included), in place too. philox_advance moves the 128-bit counter past the
    blocks used, carry included."""
    count = 4 * 300 + 3                       # an incomplete last block
    blocks = -(-count // 4)
    x = np.random.default_rng(31).standard_normal(count).astype(dtype)
    x[:5] = [0.0, -0.0, np.inf, -np.inf, np.nan]
    layer = make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', TRAIN, dtype)
    setup_layer(layer, [x], dtype=dtype)
    key = (0x0123456789ABCDEF, 0xFEDCBA9876543210)
    counter = 2**64 - 100 + (7 << 64)          # the low word wraps within the blocks
    state = np.array([*key, counter & (2**64 - 1), counter >> 64], np.uint64)
    words = np.random.Philox(counter=counter, key=key[0] | key[1] << 64).random_raw(
        4 * blocks)[:count]
    want_mask = ((words >> np.uint64(32)) > np.uint64(layer.threshold)).astype(dtype)
    want_y = (x * want_mask) * layer.scale
    assert 0.65 < want_mask.mean() < 0.75
    mask, y = poisoned(count, dtype), poisoned(count, dtype)
    kern.run("dropout", "dropout_forward", dtype, blocks, count, x, state, layer.threshold,
             layer.scale, mask, y, **launch)
    np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_array_equal(y, want_y)
    assert np.signbit(y[1]) == np.signbit(want_y[1])
    in_place = x.copy()
    kern.run("dropout", "dropout_forward", dtype, blocks, count, in_place, state,
             layer.threshold, layer.scale, poisoned(count, dtype), in_place, **launch)
    np.testing.assert_array_equal(in_place, want_y)
    kern.run("dropout", "philox_advance", dtype, 1, state, blocks, **launch)
    after = counter + blocks
    assert state.tolist() == [*key, after & (2**64 - 1), after >> 64]


def relu_forward_oracle(x, slope):
    """The fork's ReLUForward kernel: out = in > 0 ? in : in * negative_slope."""
    t = x.dtype.type
    with np.errstate(invalid="ignore"):
        out = [v if v > 0 else v * t(slope) for v in x.reshape(-1)]
    return np.array(out, x.dtype).reshape(x.shape)


def relu_backward_oracle(x, dy, slope):
    """The fork's ReLUBackward kernel:
    out_diff = in_diff * ((in_data > 0) + (in_data <= 0) * negative_slope)."""
    t = x.dtype.type
    with np.errstate(invalid="ignore"):
        out = [g * (t(v > 0) + t(v <= 0) * t(slope))
               for v, g in zip(x.reshape(-1), dy.reshape(-1))]
    return np.array(out, x.dtype).reshape(x.shape)


@pytest.mark.parametrize("slope", [0.0, 0.1, -0.5])
@pytest.mark.parametrize("dtype", FLOATS)
def test_relu_forward_is_the_forks_gpu_formula(kern, launch, slope, dtype):
    """relu.cu relu_forward: in > 0 ? in : in * slope bit for bit (slope 0: a negative
    x gives -0, -inf and NaN give NaN), out of place and in place."""
    x = np.random.default_rng(24).standard_normal((3, 4, 5, 6)).astype(dtype)
    x.flat[:8] = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-30, -1e-30, -2.0]
    slope = float(dtype(np.float32(slope)))
    expected = relu_forward_oracle(x, slope)
    if slope == 0:
        assert np.isnan(expected.flat[4]) and np.signbit(expected.flat[7])
    y = poisoned(x.shape, dtype)
    kern.run("relu", "relu_forward", dtype, x.size, x, slope, y, **launch)
    assert_same_bits(y, expected)
    in_place = x.copy()
    kern.run("relu", "relu_forward", dtype, x.size, in_place, slope, in_place, **launch)
    assert_same_bits(in_place, expected)


@pytest.mark.parametrize("slope", [0.0, 0.1, -0.5])
@pytest.mark.parametrize("dtype", FLOATS)
def test_relu_backward_is_the_forks_expression(kern, launch, slope, dtype):
    """relu.cu relu_backward: dy * ((x > 0) + (x <= 0) * slope) bit for bit: an
    infinite dy where the factor is 0 gives NaN, a NaN x gives dy * 0."""
    rng = np.random.default_rng(25)
    x = rng.standard_normal(200).astype(dtype)
    dy = rng.standard_normal(200).astype(dtype)
    x[:6] = [-1.0, np.nan, 0.0, -0.0, 2.0, -np.inf]
    dy[:6] = [np.inf, 3.0, -np.inf, -4.0, np.nan, 1.0]
    slope = float(dtype(np.float32(slope)))
    expected = relu_backward_oracle(x, dy, slope)
    assert np.isnan(expected[0]) == (slope == 0) and expected[1] == 0
    dx = poisoned(x.shape, dtype)
    kern.run("relu", "relu_backward", dtype, x.size, x, dy, slope, dx, **launch)
    assert_same_bits(dx, expected)
    kern.run("relu", "relu_backward", dtype, x.size, x, dy, slope, dy, **launch)
    assert_same_bits(dy, expected)


@pytest.mark.parametrize("slope", [0.0, 0.1])
@pytest.mark.parametrize("dtype", FLOATS)
def test_relu_backward_matches_relu_layer(kern, launch, slope, dtype):
    """relu.cu: dx = dy where x > 0, else slope * dy (+0 for slope 0), bit-for-bit the
    numpy ReLU, with zeros, NaN and infinities in x and dy."""
    rng = np.random.default_rng(23)
    x = rng.standard_normal((3, 4, 5, 6)).astype(dtype)
    x.flat[:6] = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-30]
    text = f'type: "ReLU" relu_param {{ negative_slope: {slope} }}'
    layer, bottom, top, dy = channel_layer(text, x, [], dtype)
    dy.flat[6:9] = [np.nan, np.inf, -0.0]
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    dx = poisoned(x.shape, dtype)
    # the layer's slope: the proto's float32 value, as the layer passes it to the kernel
    kern.run("relu", "relu_backward", dtype, x.size, x, dy, layer.negative_slope, dx,
             **launch)
    np.testing.assert_array_equal(dx, bottom[0].diff)
    assert np.array_equal(np.signbit(dx), np.signbit(bottom[0].diff))


# ------------------------------------------------------------------ domain_transform.cu
# (rows, cols) per sample: whole maps, a single column, an empty sample, a single row.
DT_SIZES = np.array([[5, 7], [3, 1], [0, 4], [1, 5]])
DT_PASSES = [(3, 1), (3, -1), (2, 1), (2, -1)]      # (scan axis, direction): passes 0..3


def dt_inputs(dtype, seed):
    rng = np.random.default_rng(seed)
    shape = (len(DT_SIZES), 2, 5, 7)
    y = rng.standard_normal(shape).astype(dtype)
    a = rng.random((shape[0], 1) + shape[2:]).astype(dtype)
    return rng, y, a


def dt_region_views(arrays, sample, axis):
    """Each array's valid region of ``sample``, scan axis first (views, so the numpy
    pass writes into them)."""
    rows, cols = DT_SIZES[sample]
    return [np.moveaxis(x[sample, :, :rows, :cols], axis - 1, 0) for x in arrays]


def dt_line_args(shape, axis):
    n, c, h, w = shape
    vertical = axis == 2
    return (n * c * (w if vertical else h), c, h, w,
            np.ascontiguousarray(DT_SIZES.reshape(-1), np.int32), int(vertical))


@pytest.mark.parametrize("axis,direction", DT_PASSES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_domain_transform_forward_pass_matches_numpy(kern, launch, axis, direction, dtype):
    """dt_forward_pass: bit-for-bit the DomainTransform layer's numpy pass inside every
    sample's valid region; nothing outside it is written (y keeps its input, the
    difference store keeps its poison), and neither are the boundary differences a pass
    does not produce."""
    from caffelite.layers.domain_transform import _forward_pass
    _, y, a = dt_inputs(dtype, 41)
    expected, expected_delta = y.copy(), poisoned(y.shape, dtype)
    for sample in range(len(DT_SIZES)):
        ys, as_, ds = dt_region_views([expected, a, expected_delta], sample, axis)
        _forward_pass(ys, as_, direction, ds)
    out, delta = y.copy(), poisoned(y.shape, dtype)
    kern.run("domain_transform", "dt_forward_pass", dtype, *dt_line_args(y.shape, axis),
             direction, a, out, 1, delta, **launch)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(delta, expected_delta)
    assert np.isnan(delta[2]).all() and np.isnan(delta[1, :, 3:]).all()
    assert np.isnan(delta[1, :, :, 1:]).all() and np.isnan(delta[3, :, 1:]).all()
    unstored = poisoned(y.shape, dtype)
    kern.run("domain_transform", "dt_forward_pass", dtype, *dt_line_args(y.shape, axis),
             direction, a, unstored, 0, unstored, **launch)
    assert np.isnan(unstored).all()          # store = 0: the (aliased) store is untouched


@pytest.mark.parametrize("axis,direction", DT_PASSES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_domain_transform_backward_pass_matches_numpy(kern, launch, axis, direction, dtype):
    """dt_backward_pass: bit-for-bit the numpy adjoint pass on the gradient and on the
    per-channel weight-gradient accumulator, which it adds to (it starts non-zero
    here); outside the valid regions both keep their values."""
    from caffelite.layers.domain_transform import _backward_pass
    rng, g, a = dt_inputs(dtype, 42)
    delta = rng.standard_normal(g.shape).astype(dtype)
    acc = rng.standard_normal(g.shape).astype(dtype)
    expected_g, expected_acc = g.copy(), acc.copy()
    for sample in range(len(DT_SIZES)):
        gs, as_, ds, accs = dt_region_views([expected_g, a, delta, expected_acc], sample,
                                            axis)
        _backward_pass(gs, as_, direction, ds, accs)
    out_g, out_acc = g.copy(), acc.copy()
    kern.run("domain_transform", "dt_backward_pass", dtype, *dt_line_args(g.shape, axis),
             direction, a, delta, out_g, out_acc, **launch)
    np.testing.assert_array_equal(out_g, expected_g)
    np.testing.assert_array_equal(out_acc, expected_acc)
    np.testing.assert_array_equal(out_g[2], g[2])
    assert not np.array_equal(out_acc[0], acc[0])      # the full-size sample did work


# ---------------------------------------------------------------------------- lrn.cu
def lrn_fill_scale_oracle(x, size, alpha_over_size, k):
    """The fork's LRNFillScale, its three loops over ``head`` as written, for every pixel
    at once, in x's dtype."""
    t = x.dtype.type
    channels = x.shape[1]
    post_pad = size - (size - 1) // 2 - 1
    scale = np.full(x.shape, np.nan, x.dtype)
    accum = np.zeros(x.shape[:1] + x.shape[2:], x.dtype)
    head = 0
    with np.errstate(over="ignore", invalid="ignore"):
        while head < post_pad and head < channels:
            accum = accum + x[:, head] * x[:, head]
            head += 1
        while head < channels:
            accum = accum + x[:, head] * x[:, head]
            if head - size >= 0:
                accum = accum - x[:, head - size] * x[:, head - size]
            scale[:, head - post_pad] = t(k) + accum * t(alpha_over_size)
            head += 1
        while head < channels + post_pad:
            if head - size >= 0:
                accum = accum - x[:, head - size] * x[:, head - size]
            scale[:, head - post_pad] = t(k) + accum * t(alpha_over_size)
            head += 1
    return scale


def lrn_diff_oracle(x, y, scale, dy, size, negative_beta, cache_ratio):
    """The fork's LRNComputeDiff, its three loops as written, in x's dtype."""
    t = x.dtype.type
    channels = x.shape[1]
    pre_pad = size - (size + 1) // 2
    post_pad = size - pre_pad - 1
    dx = np.full(x.shape, np.nan, x.dtype)
    accum = np.zeros(x.shape[:1] + x.shape[2:], x.dtype)

    def ratio(c):
        return dy[:, c] * y[:, c] / scale[:, c]

    def store(c):
        dx[:, c] = (dy[:, c] * np.power(scale[:, c], t(negative_beta))
                    - t(cache_ratio) * x[:, c] * accum)

    head = 0
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        while head < post_pad and head < channels:
            accum = accum + ratio(head)
            head += 1
        while head < channels:
            accum = accum + ratio(head)
            if head - size >= 0:
                accum = accum - ratio(head - size)
            store(head - post_pad)
            head += 1
        while head < channels + post_pad:
            if head - size >= 0:
                accum = accum - ratio(head - size)
            store(head - post_pad)
            head += 1
    return dx


def assert_within_ulps(actual, expected, ulps, what):
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), what
    finite = np.isfinite(expected)
    assert np.array_equal(actual[~finite & ~np.isnan(expected)],
                          expected[~finite & ~np.isnan(expected)]), what
    spacing = np.spacing(np.abs(expected[finite]).astype(expected.dtype))
    err = np.abs(actual[finite].astype(np.float64) - expected[finite])
    assert np.all(err <= ulps * spacing.astype(np.float64)), (what, err.max())


@pytest.mark.parametrize("size, channels", [(5, 7), (3, 3), (1, 4), (5, 2), (7, 16)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_lrn_kernels_are_the_forks_loops(kern, launch, size, channels, dtype):
    """lrn.cu: LRNFillScale bit for bit (one running sum per pixel, alpha/n after the
    sum); the output and the diff with pow within 2 ulp of numpy's."""
    rng = np.random.default_rng(40 + size + channels)
    t = np.dtype(dtype).type
    num, height, width = 2, 3, 5
    x = rng.standard_normal((num, channels, height, width)).astype(dtype)
    alpha, beta, k = t(np.float32(1e-2)), t(np.float32(0.75)), t(np.float32(2.0))
    alpha_over_size = alpha / t(size)
    plane = height * width
    scale = poisoned(x.shape, dtype)
    kern.run("lrn", "lrn_fill_scale", dtype, num * plane, x, channels, plane, size,
             alpha_over_size, k, scale, **launch)
    expected_scale = lrn_fill_scale_oracle(x, size, alpha_over_size, k)
    assert_same_bits(scale, expected_scale)
    y = poisoned(x.shape, dtype)
    kern.run("lrn", "lrn_output", dtype, x.size, x, scale, -beta, y, **launch)
    assert_within_ulps(y, x * np.power(expected_scale, -beta), 2, "lrn_output")
    dy = rng.standard_normal(x.shape).astype(dtype)
    cache_ratio = t(2.0 * float(alpha) * float(beta) / size)
    dx = poisoned(x.shape, dtype)
    kern.run("lrn", "lrn_diff", dtype, num * plane, x, y, scale, dy, channels, plane, size,
             -beta, cache_ratio, dx, **launch)
    expected = lrn_diff_oracle(x, y, expected_scale, dy, size, -beta, cache_ratio)
    assert_within_ulps(dx, expected, 4, "lrn_diff")


def test_lrn_kernel_keeps_the_running_sums_nan_after_an_overflow(kern, launch):
    # x^2 = inf at channel 1: the scale is inf while the window holds it, then inf - inf
    x = np.ones((1, 8, 1, 1), np.float32)
    x[0, 1] = 2e19
    scale = poisoned(x.shape, np.float32)
    kern.run("lrn", "lrn_fill_scale", np.float32, 1, x, 8, 1, 3, np.float32(1 / 3),
             np.float32(1), scale, **launch)
    s = scale.ravel()
    assert (s[:3] == np.inf).all() and np.isnan(s[3:]).all()


# =============================================================== timing.cu
@pytest.mark.parametrize("dtype", FLOATS)
def test_hold_device_waits_its_cycles_then_writes_every_flag(kern, launch, dtype):
    """timing.cu hold_device: each thread reads the clock until `cycles` have passed,
    then writes 1 (the host shim's clock ticks once per read; on a device, the
    autotuner's event test in test_conv_autotune.py uses it)."""
    done = poisoned((5,), dtype)
    kern.run("timing", "hold_device", dtype, done.size, 1000, done, **launch)
    assert_same_bits(done, np.ones(5, dtype))
