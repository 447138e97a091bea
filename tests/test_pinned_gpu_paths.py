"""Pins for the Python side of the device convolution paths that mutation testing found
unchecked (tests/test_gpu_layers.py compares the device with the CPU layer, which shares
some of these helpers, so a fault in a shared helper cancels out there).

Oracles: hand formulas for the image-group and tap-path sizing rules (module docstrings
of caffelite/layers/im2col.py and tap_gemm.py), and numpy's direct sum over the kernel
taps for the weight gradient (integer data: every summation order is exact, TF32's
10-bit mantissa included).
"""
import math

import numpy as np
import pytest

from caffelite import backend
from caffelite.kernels import MAX_ELEMENTS, emulator
from caffelite.layers import im2col as im2col_module
from caffelite.layers import tap_gemm
from caffelite.layers.im2col import ConvGeometry
from gpu_modes import gpu_mode  # noqa: F401  (a fixture)
from test_conv_autotune import tf32  # noqa: F401  (a fixture: TF32 on, then off)
from test_cuda_graphs import emulated  # noqa: F401  (a fixture: emulated GPU, then CPU)

F32 = np.float32


# ----------------------------------------------------------- image groups (im2col.py)
def test_image_groups_put_every_image_in_one_group_when_the_budget_holds_them_all():
    """A budget for all images: one group of all of them (not one image fewer)."""
    geom = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1))
    rows, plane = 4 * 9, 7 * 9
    for num in (1, 2, 3, 5):
        budget = rows * num * plane * 4          # exactly num images' columns (align 1)
        assert im2col_module.image_groups(num, 4, geom, (7, 9), F32, budget) == \
            [(0, num)]
        # one byte less: one image fewer per group
        if num > 1:
            per = num - 1
            expected = [(n0, min(num, n0 + per)) for n0 in range(0, num, per)]
            assert im2col_module.image_groups(num, 4, geom, (7, 9), F32, budget - 1) == \
                expected


def test_image_groups_check_one_image_against_its_padded_column_count(monkeypatch):
    """Under TF32 a group's column count is padded to a multiple of 4: a 7x9 grid (63
    columns) takes 64. A budget holding 63 columns but not 64 holds no image: bands of
    rows (None), not a one-image group whose padded columns overrun the workspace."""
    monkeypatch.setattr(im2col_module, "column_align", lambda dtype: 4)
    geom = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1))
    rows = 4 * 9
    unpadded, padded = rows * 63 * 4, rows * 64 * 4
    assert im2col_module.image_groups(3, 4, geom, (7, 9), F32, unpadded) is None
    assert im2col_module.image_groups(3, 4, geom, (7, 9), F32, padded - 1) is None
    assert im2col_module.image_groups(3, 4, geom, (7, 9), F32, padded) == \
        [(0, 1), (1, 2), (2, 3)]


def test_image_groups_stay_within_the_kernels_int_index_range():
    """The im2col/col2im kernels index with int: however large the workspace, a group's
    column matrix holds at most MAX_ELEMENTS (2**31 - 1) elements. One channel, a 1x1
    kernel on a 2**15 x 2**15 grid: 2**30 elements an image, so one image per group
    (two would be 2**31 elements)."""
    geom = ConvGeometry((1, 1), (1, 1), (0, 0), (1, 1))
    grid = (1 << 15, 1 << 15)
    huge = 1 << 45
    groups = im2col_module.image_groups(4, 1, geom, grid, F32, huge)
    assert groups == [(0, 1), (1, 2), (2, 3), (3, 4)]
    for n0, n1 in groups:
        assert (n1 - n0) * math.prod(grid) <= MAX_ELEMENTS
    # three channels: one image alone is 3 * 2**30 elements, past the int range: bands
    assert im2col_module.image_groups(4, 3, geom, grid, F32, huge) is None


# ----------------------------------------------------------- tap GEMM path (tap_gemm.py)
def test_tap_path_choice_depends_on_the_output_channels(monkeypatch):
    """The multiply-adds saved scale with the weight's (O, C/group): two convolutions
    with the same geometry and image but different num_output are judged each on its
    own saving, 2 * N * O * C * taps * plane * (1 - reach) (tap_gemm module docstring),
    not on a cached value from the other."""
    monkeypatch.setattr(tap_gemm, "_windows", {})
    geom = ConvGeometry((3, 3), (1, 1), (24, 24), (24, 24))
    img = (2, 8, 41, 41)
    grid = geom.conv_output_shape(img[2:])
    windows = tap_gemm.tap_windows(geom, img[2:], grid)
    reached = tap_gemm.reach(windows, geom, grid)
    assert reached <= tap_gemm.MAX_REACH

    def saved(n_out):
        return 2 * img[0] * n_out * img[1] * geom.taps * math.prod(grid) * (1 - reached)

    threshold = (saved(4) + saved(64)) / 2
    monkeypatch.setattr(tap_gemm, "MIN_SAVED_FLOPS", threshold)
    assert tap_gemm.windows_for(emulator, geom, img, grid, (4, 8, 3, 3)) is None
    assert tap_gemm.windows_for(emulator, geom, img, grid, (64, 8, 3, 3)) == windows
    assert tap_gemm.windows_for(emulator, geom, img, grid, (4, 8, 3, 3)) is None


def _weight_grad_by_formula(image, grid, geom, kh, kw):
    """dW[o, c, u, v] = sum_n,i,j grid[n, o, i, j] * image[n, c, i + u*d - p, j + v*d - p]
    (zero outside the image), stride 1: Caffe's convolution weight gradient."""
    num, channels, height, width = image.shape
    n_out = grid.shape[1]
    (ph, pw), (dh, dw) = geom.pad, geom.dilation
    padded = np.zeros((num, channels, height + 2 * ph, width + 2 * pw), np.float64)
    padded[:, :, ph:ph + height, pw:pw + width] = image
    out_h, out_w = grid.shape[2:]
    result = np.zeros((n_out, channels, kh, kw), np.float64)
    for u in range(kh):
        for v in range(kw):
            patch = padded[:, :, u * dh:u * dh + out_h, v * dw:v * dw + out_w]
            result[:, :, u, v] = np.einsum("noij,ncij->oc", grid, patch)
    return result


def test_tap_weight_gradient_under_tf32_ignores_the_padding_columns(monkeypatch, emulated,
                                                                    tf32):
    """Under TF32 the tap path's gathered columns are padded to a multiple of 4
    (``_gather``); the weight gradient multiplies the gathered top gradient by the
    gathered image over every column, so the padding columns of both must be zeros
    (the device's fresh memory is not; the emulator fills it with NaN). Conv-autotune
    may time this path under TF32 (``tunable_windows``). Integer data: exact."""
    monkeypatch.setattr(tap_gemm, "_windows", {})
    geom = ConvGeometry((3, 3), (1, 1), (4, 4), (4, 4))
    rng = np.random.default_rng(3)
    image = rng.integers(-3, 4, (2, 3, 7, 9)).astype(F32)
    grid_shape = geom.conv_output_shape(image.shape[2:])
    grid = rng.integers(-3, 4, (2, 5) + grid_shape).astype(F32)
    start = rng.integers(-3, 4, (5, 3, 3, 3)).astype(F32)
    windows = tap_gemm.tap_windows(geom, image.shape[2:], grid_shape)
    # some window's column count (N * rows * cols) is not a multiple of 4: padding made
    assert any((2 * (r[1] - r[0]) * (c[1] - c[0])) % 4 for _, r, c in windows)
    expected = start + _weight_grad_by_formula(image, grid, geom, 3, 3)
    xp = backend.device_module()
    assert im2col_module.column_align(F32) == 4
    dw = xp.asarray(start)
    tap_gemm.weight_grad(xp, xp.asarray(image), xp.asarray(grid), dw, windows, 1)
    got = backend.to_host(dw)
    np.testing.assert_array_equal(got, expected.astype(F32))


# ----------------------------------------------------------- conv autotune keys (im2col.py)
def test_autotuned_choices_are_kept_per_path_setting(monkeypatch, emulated):
    """A tuned choice is kept per product and per the settings that change what a named
    path does (``_path_settings``: GROUP_IMAGES, the column budget, ...): one forward
    with image groups and one without are two products, each timed."""
    from caffelite.layers import conv_autotune
    monkeypatch.setattr(conv_autotune, "ENABLED", True)
    monkeypatch.setattr(conv_autotune, "TIMER", lambda kind, name: 1.0)
    conv_autotune.forget()
    geom = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1))
    rng = np.random.default_rng(5)
    image = rng.integers(-2, 3, (2, 3, 6, 7)).astype(F32)
    weight = rng.integers(-2, 3, (4, 3, 3, 3)).astype(F32)
    xp = backend.device_module()
    outs = []
    for grouped in (True, False):
        monkeypatch.setattr(im2col_module, "GROUP_IMAGES", grouped)
        out = xp.full((2, 4, 6, 7), np.nan, F32)
        im2col_module.forward_gemm(xp.asarray(image), xp.asarray(weight), out, geom, 1)
        outs.append(backend.to_host(out))
    keys = [k for k in conv_autotune.choices() if k.kind == "forward"]
    assert len(keys) == 2
    assert {k.settings[0] for k in keys} == {True, False}
    expected = np.zeros((2, 4, 6, 7), np.float64)        # direct sum, zero padding
    padded = np.zeros((2, 3, 8, 9))
    padded[:, :, 1:7, 1:8] = image
    for u in range(3):
        for v in range(3):
            expected += np.einsum("oc,ncij->noij", weight[:, :, u, v],
                                  padded[:, :, u:u + 6, v:v + 7])
    for out in outs:
        np.testing.assert_array_equal(out, expected.astype(F32))


# ----------------------------------------------------------- kernel loader (kernels/__init__)
def test_kernel_arguments_of_the_wrong_float_type_are_refused():
    """A float64 array for a float kernel's pointer (or the reverse) would be read as
    other bits by the kernel: the loader refuses it by name."""
    from caffelite import kernels
    params = kernels.module_signatures("im2col")["im2col"]
    geometry = (1, 4, 4, 3, 3, 1, 1, 1, 1, 1, 1, 4, 0, 4, 1, 16)
    image = np.zeros(16, np.float64)
    col = np.zeros(9 * 16, np.float32)
    with pytest.raises(TypeError, match="'image' must be a C-contiguous float32 array"):
        kernels.convert_args(params, np.float32, (16, image) + geometry + (col,), np)
    with pytest.raises(TypeError, match="'col' must be a C-contiguous float64 array"):
        kernels.convert_args(params, np.float64, (16, image) + geometry + (col,), np)
    values = kernels.convert_args(params, np.float32, (16, image.astype(F32)) + geometry
                                  + (col,), np)
    assert values[1].dtype == np.float32 and values[2].dtype == np.int32


def test_tuned_backward_runs_each_products_own_choice(monkeypatch, emulated, tf32):
    """weight_and_backward_gemm under autotune: the weight gradient's choice "columns"
    and the data gradient's "implicit" are each obeyed; the shared image groups (one
    gathering for both products) are only for both choosing columns."""
    from caffelite.layers import conv_autotune, implicit_gemm
    monkeypatch.setattr(conv_autotune, "ENABLED", True)
    favoured = {"weight": "columns", "data": "implicit"}
    monkeypatch.setattr(conv_autotune, "TIMER",
                        lambda kind, name: 1.0 if favoured.get(kind) == name else 2.0)
    conv_autotune.forget()
    calls = []
    transposed = implicit_gemm.transposed
    monkeypatch.setattr(implicit_gemm, "transposed",
                        lambda *a, **k: (calls.append(k.get("tile")), transposed(*a, **k)))
    geom = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1))
    rng = np.random.default_rng(9)
    image = rng.integers(-2, 3, (2, 3, 6, 7)).astype(F32)
    grid = rng.integers(-2, 3, (2, 4, 6, 7)).astype(F32)
    weight = rng.integers(-2, 3, (4, 3, 3, 3)).astype(F32)
    xp = backend.device_module()
    dw = xp.zeros(weight.shape, F32)
    dx = xp.full(image.shape, np.nan, F32)
    im2col_module.weight_and_backward_gemm(xp.asarray(image), xp.asarray(grid),
                                           xp.asarray(weight), dw, dx, geom, 1)
    chosen = {k.kind: best for k, (best, _) in conv_autotune.choices().items()}
    calls.clear()
    dw = xp.zeros(weight.shape, F32)
    dx = xp.full(image.shape, np.nan, F32)
    im2col_module.weight_and_backward_gemm(xp.asarray(image), xp.asarray(grid),
                                           xp.asarray(weight), dw, dx, geom, 1)
    got_dw, got_dx = backend.to_host(dw), backend.to_host(dx)
    assert chosen == favoured
    assert len(calls) == 1              # the data gradient ran on its chosen path
    np.testing.assert_array_equal(got_dw, _weight_grad_by_formula(image, grid, geom, 3, 3)
                                  .astype(F32))
    # dX[n, c, y, x] = sum_o,u,v W[o, c, u, v] dY[n, o, y - u + 1, x - v + 1]
    padded = np.zeros((2, 4, 8, 9))
    padded[:, :, 1:7, 1:8] = grid
    expected = np.zeros(image.shape)
    for u in range(3):
        for v in range(3):
            expected += np.einsum("oc,noij->ncij", weight[:, :, u, v],
                                  padded[:, :, 2 - u:8 - u, 2 - v:9 - v])
    np.testing.assert_array_equal(got_dx, expected.astype(F32))


def test_implicit_forward_takes_outputs_of_exactly_the_minimum_tiles(monkeypatch):
    """fills_gpu: at least MIN_TILES_PER_SM tiles per multiprocessor (an output of
    exactly that many tiles qualifies). Tiles = ceil(O / tile.m) * ceil(N*H*W / tile.n)."""
    from caffelite.layers import implicit_gemm
    monkeypatch.setattr(implicit_gemm, "_multiprocessors", lambda xp: 2)
    monkeypatch.setattr(implicit_gemm, "MIN_TILES_PER_SM", 1.0)
    tile = implicit_gemm.NARROW
    assert implicit_gemm.tile_kernel(16) is tile
    pixels = 2 * tile.n                   # two tiles of pixels, one of 16 channels
    assert implicit_gemm.fills_gpu(emulator, (2, 16, pixels // 2, 1))
    assert not implicit_gemm.fills_gpu(emulator, (1, 16, pixels // 2, 1))
    assert implicit_gemm.fills_gpu(emulator, (1, 16, pixels // 2 + 1, 1))


def test_the_fill_rule_keeps_small_forwards_off_the_implicit_gemm(monkeypatch, emulated,
                                                                  tf32):
    """applies_forward = applies and fills_gpu: a forward of too few tiles for the GPU
    keeps the other paths even with the implicit GEMM on and TF32."""
    from caffelite.layers import implicit_gemm
    monkeypatch.setattr(implicit_gemm, "ENABLED", True)
    monkeypatch.setattr(implicit_gemm, "_multiprocessors", lambda xp: 1000)
    geom = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1))
    xp = backend.device_module()
    image = xp.zeros((1, 3, 6, 7), F32)
    weight = xp.zeros((4, 3, 3, 3), F32)
    out = xp.zeros((1, 4, 6, 7), F32)
    assert implicit_gemm.applies(xp, geom, image, weight, out, 1)
    assert not implicit_gemm.applies_forward(xp, geom, image, weight, out, 1)


# ----------------------------------------------------------- CUDA graphs (cuda_graphs.py)
BN_NET = """
input: "data" input_shape { dim: 2 dim: 2 dim: 3 dim: 3 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 2 kernel_size: 1
    weight_filler { type: "constant" value: 1 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "bn"
  batch_norm_param { use_global_stats: true } }
layer { name: "relu" type: "ReLU" bottom: "bn" top: "relu" }
layer { name: "conv2" type: "Convolution" bottom: "relu" top: "conv2"
  convolution_param { num_output: 2 kernel_size: 1
    weight_filler { type: "constant" value: 0.5 } } }
layer { name: "loss" type: "Power" bottom: "conv2" top: "loss" loss_weight: 1
  power_param { power: 2 } }"""


def test_host_writes_of_parameters_reach_the_next_graph_launch(gpu_mode):
    """BatchNorm with global statistics, its statistics and scale factor written on the
    host before every graphed forward (the device computes mean/s and var/s from the
    device copies): each launch sees the values just written (uploaded before it),
    including a changed scale factor. Oracle: Caffe's BatchNorm formula by hand,
    y = (x - mean/s) / sqrt(var/s + eps), the 1x1 convolutions with constant weights
    (sum of the 2 channels, then 0.5 * sum into each of 2 outputs) and Power 2 summed
    as the loss."""
    import caffelite
    from caffelite import cuda_graphs
    from caffelite.io import prototxt
    data = (np.arange(36, dtype=np.float32).reshape(2, 2, 3, 3) - 17) / 9
    mean, var = np.array([0.5, -1.0], F32), np.array([2.0, 0.5], F32)
    factors = [1.0, 1.0, 1.0, 4.0, 4.0, 4.0]

    def expected(factor):
        x = data[:, 0] + data[:, 1]                               # (2, 3, 3) per output
        ys = [np.maximum((x - mean[c] / factor) / np.sqrt(var[c] / factor + 1e-5), 0)
              for c in range(2)]
        top = 0.5 * (ys[0] + ys[1])
        return 2 * float(np.sum(top.astype(np.float64) ** 2))

    cuda_graphs.set_enabled(True)
    try:
        gpu_mode.on()
        net = caffelite.Net(param=prototxt.parse_net(BN_NET)[0], phase=caffelite.TRAIN)
        bn = net.params["bn"]
        losses = []
        for factor in factors:
            bn[0].data[...] = mean
            bn[1].data[...] = var
            bn[2].data[...] = factor
            net.blobs["data"].data[...] = data
            losses.append(float(net.forward_from_to()))
        graph_launches = net._graphs.launches()
    finally:
        cuda_graphs.set_enabled(False)
        gpu_mode.off()
    assert graph_launches >= 2
    np.testing.assert_allclose(losses, [expected(f) for f in factors], rtol=1e-5)


def test_a_graph_recorded_without_tf32_is_not_launched_with_it(tmp_path, gpu_mode,
                                                               monkeypatch):
    """TF32 changes a convolution's path (the implicit GEMM needs it) and the GEMMs'
    math mode: a recording made with TF32 off is not launched once it is on; the pass
    runs its layers again (the implicit GEMM then runs) and records anew."""
    from caffelite.layers import implicit_gemm
    from test_conv_autotune import implicit_gemm_calls_per_step
    monkeypatch.setattr(implicit_gemm, "ENABLED", True)

    def switch(step):
        if step == 3:
            backend.set_tf32(True)

    try:
        seen = implicit_gemm_calls_per_step(gpu_mode, tmp_path, monkeypatch, switch, 7)
    finally:
        backend.set_tf32(False)
    assert seen[:4] == [0, 0, 0, 0]
    assert seen[4] > 0                               # run and recorded again
    assert seen[4] == seen[5] == seen[6]             # then launched


# ----------------------------------------------------------- synced memory (blob.py)
def test_reshape_grows_a_shared_smaller_diff_memory():
    """Blob::Reshape allocates anew when the count passes the capacity of the data OR
    the diff memory: a blob whose diff memory is another's smaller one (share_diff
    after a shrink) gets a diff of the new count when it grows again."""
    from caffelite.blob import Blob
    a = Blob((10, 10))                  # capacity 100
    a.reshape((2, 5))                   # count 10, capacity kept
    b = Blob((2, 5))                    # capacity 10
    a.share_diff(b)
    a.reshape((5, 10))                  # 50: within a's data capacity, past the diff's
    assert a.diff.shape == (5, 10)
    a.diff[...] = 1.0
    assert float(a.diff.sum()) == 50.0


def test_a_download_refreshes_the_host_mirror_in_place(gpu_mode):
    """The host mirror is one buffer for the memory's life (Caffe's cpu_ptr_): after a
    device write, asking for the host side copies into it, so a host view taken before
    sees the device's values."""
    from caffelite.blob import Blob
    blob = Blob((2, 3))
    gpu_mode.on()
    try:
        host = blob.host_data
        host[...] = 1.0
        device = blob.device_data                  # uploaded, device-headed
        device[...] = device * 0 + 7.0             # a device write
        again = blob.host_data
    finally:
        gpu_mode.off()
    assert np.shares_memory(host, again)
    np.testing.assert_array_equal(host, np.full((2, 3), 7.0, F32))


def test_implicit_weight_gradient_of_an_empty_batch_adds_nothing(emulated, tf32):
    """No images (an empty batch under TF32): the implicit GEMM's weight gradient adds
    nothing and launches nothing (its pixel runs would divide by a zero run length)."""
    from caffelite.layers import implicit_gemm
    geom = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1))
    start = np.arange(4 * 3 * 9, dtype=F32).reshape(4, 3, 3, 3)
    xp = backend.device_module()
    image = xp.zeros((0, 3, 6, 7), F32)
    grid = xp.zeros((0, 4, 6, 7), F32)
    dw = xp.asarray(start)
    assert implicit_gemm.supported(xp, geom, image, dw, grid, 1)
    implicit_gemm.weight_grad(xp, image, grid, dw, geom)
    got = backend.to_host(dw)
    np.testing.assert_array_equal(got, start)
