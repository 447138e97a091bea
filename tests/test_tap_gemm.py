"""Device convolutions by tap GEMMs (caffelite/layers/tap_gemm.py) for large dilations:
which layers take the path, and their forward, data gradient and weight gradient against
the CPU layer (im2col, Caffe's order): exact on integer data (every order sums those
exactly), within the summation-order bound on float data.
"""
import numpy as np
import pytest

import caffelite
from caffelite import backend
from caffelite.blob import Blob
from caffelite.kernels import emulator
from caffelite.layers import tap_gemm
from caffelite.layers.im2col import ConvGeometry
from gpu_modes import gpu_mode  # noqa: F401  (fixture)
from layer_testing import blobs_from, make_layer, spy_calls


def aspp(dilation, size=41):
    geom = ConvGeometry((3, 3), (1, 1), (dilation, dilation), (dilation, dilation))
    return geom, (size, size), geom.conv_output_shape((size, size))


VGG_FC6 = ((10, 512, 41, 41), (1024, 512, 3, 3))     # ASPP-VGG training: image, weight


def test_the_windows_cache_keeps_the_newest_shapes_only(monkeypatch):
    """A deploy script feeds images of many sizes: the cache of tap windows per shape
    keeps at most _MAX_WINDOWS entries, the oldest dropped first."""
    monkeypatch.setattr(tap_gemm, "_windows", {})
    monkeypatch.setattr(tap_gemm, "_MAX_WINDOWS", 3)
    for size in range(41, 49):
        geom, _, grid = aspp(24, size)
        taken = tap_gemm.windows_for(emulator, geom, (10, 512, size, size), grid,
                                     VGG_FC6[1])
        assert taken is not None
    sizes = [key[1][2] for key in tap_gemm._windows]
    assert sizes == [46, 47, 48]


@pytest.mark.parametrize("dilation, fraction", [(6, (111 / 123) ** 2), (12, (99 / 123) ** 2),
                                                (18, (87 / 123) ** 2), (24, (75 / 123) ** 2)])
def test_aspp_reach_and_which_branches_take_the_path(dilation, fraction):
    """ASPP-VGG's fc6 on the 41x41 grid: per axis the three taps reach 41, 41 - d and
    41 - d rows of 41; branches reaching at most 75 % take the tap path (dilation 12 and
    up), all of them saving far more than MIN_SAVED_FLOPS at batch 10."""
    geom, img, grid = aspp(dilation)
    windows = tap_gemm.tap_windows(geom, img, grid)
    assert len(windows) == 9
    assert tap_gemm.reach(windows, geom, grid) == pytest.approx(fraction)
    taken = tap_gemm.windows_for(emulator, geom, VGG_FC6[0], grid, VGG_FC6[1])
    assert (taken is not None) == (fraction <= tap_gemm.MAX_REACH)


def test_only_device_2d_stride_1_convolutions_with_little_reach_and_much_work():
    geom, img, grid = aspp(24)
    image, weight = VGG_FC6
    assert tap_gemm.windows_for(emulator, geom, image, grid, weight)
    assert tap_gemm.windows_for(np, geom, image, grid, weight) is None      # the CPU
    strided = ConvGeometry((3, 3), (2, 2), (24, 24), (24, 24))
    assert tap_gemm.windows_for(emulator, strided, image, strided.conv_output_shape(img),
                                weight) is None
    one = ConvGeometry((1, 1), (1, 1), (0, 0), (1, 1))
    assert tap_gemm.windows_for(emulator, one, image, img, weight[:2] + (1, 1)) is None
    dense = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1))
    assert tap_gemm.windows_for(emulator, dense, image, img, weight) is None   # 98 %
    # ResNet-101 MSC's classifier at batch 1 (21 outputs): about 0.8 GFLOP saved, less
    # than the extra calls cost in a pass bound by its calls
    assert tap_gemm.windows_for(emulator, geom, (1, 2048, 41, 41), grid,
                                (21, 2048, 3, 3)) is None
    # a tap that reaches nothing is left out: dilation 50 on 41 reaches the centre only
    far = ConvGeometry((3, 3), (1, 1), (50, 50), (50, 50))
    assert [t for t, _, _ in tap_gemm.tap_windows(far, img, far.conv_output_shape(img))] == [4]


def run_layer(mode, text, x, dtype, gpu_mode=None, integers=False):
    """Forward and backward of one layer (weights, top diff from fixed integer seeds;
    weight diffs start at 1 and accumulate); top and bottom diff poisoned first."""
    if mode == "gpu":
        gpu_mode.on()
    try:
        layer = make_layer(text, caffelite.TRAIN, dtype)
        bottom, top = blobs_from([x], dtype), [Blob((), dtype)]
        layer.setup(bottom, top)
        rng = np.random.default_rng(4)
        for b in layer.blobs:
            b.host_data[...] = rng.integers(-3, 4, b.shape) if integers else \
                rng.standard_normal(b.shape)
            b.host_diff[...] = 1
        with backend.device_access(mode == "gpu"):
            layer.reshape(bottom, top)
        top[0].host_data[...] = np.nan
        with backend.device_access(mode == "gpu"):
            layer.forward(bottom, top)
        y = top[0].host_data.copy()
        top[0].host_diff[...] = np.random.default_rng(5).integers(-3, 4, y.shape)
        bottom[0].host_diff[...] = np.nan
        with backend.device_access(mode == "gpu"):
            layer.backward(top, [True], bottom)
        return [y, bottom[0].host_diff.copy()] + [b.host_diff.copy() for b in layer.blobs]
    finally:
        backend.set_mode_cpu()


LAYERS = {
    "conv": 'type: "Convolution" convolution_param { num_output: 6 kernel_size: 3 '
            'dilation: 4 pad: 4 }',
    "conv-groups-bias": 'type: "Convolution" convolution_param { num_output: 6 '
                        'kernel_size: 3 dilation: 5 pad: 5 group: 2 '
                        'bias_filler { type: "constant" value: 1 } }',
    "conv-rect": 'type: "Convolution" convolution_param { num_output: 3 kernel_h: 3 '
                 'kernel_w: 2 dilation: 4 pad_h: 4 pad_w: 3 }',
    "deconv": 'type: "Deconvolution" convolution_param { num_output: 2 kernel_size: 3 '
              'dilation: 4 pad: 4 }',
}


@pytest.fixture
def spied(monkeypatch):
    """Small layers take the tap path (no minimum saving); the calls are counted."""
    monkeypatch.setattr(tap_gemm, "MIN_SAVED_FLOPS", 0)
    return spy_calls(monkeypatch, tap_gemm, ("forward", "backward", "weight_grad"))


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_integer_data_gives_the_cpu_values_exactly(gpu_mode, spied, kind):
    """On integers every sum is exact, so the tap path must give the CPU layer's values
    bit for bit: forward (every output written), data gradient, accumulated weight and
    bias gradients (odd counts here: 3 images, 7x5 and smaller rectangles)."""
    x = np.random.default_rng(1).integers(-4, 5, (3, 4, 7, 5)).astype(np.float32)
    cpu = run_layer("cpu", LAYERS[kind], x, np.float32, integers=True)
    assert not spied
    gpu = run_layer("gpu", LAYERS[kind], x, np.float32, gpu_mode, integers=True)
    assert sorted(set(spied)) == ["backward", "forward", "weight_grad"]
    for got, want in zip(gpu, cpu):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_tf32_keeps_im2col(gpu_mode, spied, kind):
    """With TF32 the tap path is left out (measured slower there); the im2col path,
    its columns padded to a multiple of 4, gives the CPU's values on integers (they
    have few bits, so TF32 rounds none of them)."""
    x = np.random.default_rng(1).integers(-4, 5, (3, 4, 7, 5)).astype(np.float32)
    cpu = run_layer("cpu", LAYERS[kind], x, np.float32, integers=True)
    backend.set_tf32(True)
    try:
        gpu = run_layer("gpu", LAYERS[kind], x, np.float32, gpu_mode, integers=True)
    finally:
        backend.set_tf32(False)
    assert not spied
    for got, want in zip(gpu, cpu):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_data_within_the_summation_order_bound(gpu_mode, spied, dtype):
    """On floats the tap path adds the same terms in another order: each output within
    (terms + 2) eps of the sum of |terms| of the CPU value (that sum comes from the CPU
    layer run on |x| and |w|)."""
    text = LAYERS["conv-groups-bias"]
    x = np.random.default_rng(2).standard_normal((2, 4, 9, 8)).astype(dtype)
    cpu = run_layer("cpu", text, x, dtype)
    gpu = run_layer("gpu", text, x, dtype, gpu_mode)
    assert "forward" in spied
    terms = 2 * 9 + 2
    eps = np.finfo(dtype).eps
    magnitude = run_layer_abs(text, x, dtype)
    for got, want, scale in zip(gpu, cpu, magnitude):
        np.testing.assert_array_less(np.abs(got - want), terms * eps * scale + 1e-300)


def run_layer_abs(text, x, dtype):
    """The CPU layer's sums of |terms|: the layer run with |x|, |weights| and |top diff|."""
    layer = make_layer(text, caffelite.TRAIN, dtype)
    bottom, top = blobs_from([np.abs(x)], dtype), [Blob((), dtype)]
    layer.setup(bottom, top)
    rng = np.random.default_rng(4)
    for b in layer.blobs:
        b.data[...] = np.abs(rng.standard_normal(b.shape))
        b.diff[...] = 1
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    y = top[0].data.copy()
    top[0].diff[...] = np.abs(np.random.default_rng(5).integers(-3, 4, y.shape))
    layer.backward(top, [True], bottom)
    return [y, bottom[0].diff.copy()] + [b.diff.copy() for b in layer.blobs]


def test_aspp_vgg_with_tap_gemms_matches_cpu(tmp_path, gpu_mode, spied):
    """The corpus's ASPP-VGG with its dilated layers on tap GEMMs (no minimum saving; at
    65x65 the fc6 branches reach 31 to 11 % of their window positions): the test net's
    forward and a training iteration's updates and weights agree with the CPU within
    test_gpu_nets' whole-net tolerance."""
    import math

    from test_gpu_nets import (RTOL, assert_close, build_without_matwrite,
                               corpus_train_solver, host_blobs, one_training_iteration)
    net = build_without_matwrite("deeplabv2_vgg16_aspp_l/test.prototxt", 65, tmp_path)
    net.forward()
    cpu = host_blobs(net)
    gpu_mode.on()
    net.forward()
    gpu_mode.off()
    # the four fc6 branches, and conv5_1-3 (dilation 2 on 9x9 reaches 72 %)
    assert spied.count("forward") == 7
    for name, want in cpu.items():
        assert_close(net.blobs[name].data, want, name)
    config = "deeplabv2_vgg16_aspp_l/train.prototxt"
    cpu_loss, cpu_weights, cpu_updates = one_training_iteration(
        corpus_train_solver(tmp_path, config))
    gpu_mode.on()
    try:
        loss, weights, updates = one_training_iteration(corpus_train_solver(tmp_path, config))
    finally:
        gpu_mode.off()
    assert {"backward", "weight_grad"} <= set(spied)
    assert math.isclose(loss, cpu_loss, rel_tol=RTOL)
    for got, want in zip(updates + weights, cpu_updates + cpu_weights):
        assert_close(got, want, "update or weight")
