"""Host convolutions with few outputs by tap planes (caffelite/layers/tap_planes.py):
which convolutions take the path; forward, data gradient and weight gradient against the
im2col path (exact on integer data, where every order sums exactly; within the
summation-order bound on floats), against a float64 direct sum and OpenCV; Caffe's
gradient checker; poisoned outputs; Deconvolution; ResNet-101 DeepLab's classifier."""
import numpy as np
import pytest

import caffelite
from caffelite.blob import Blob
from caffelite.kernels import emulator
from caffelite.layers import im2col, tap_planes
from caffelite.layers.im2col import ConvGeometry
from layer_testing import (blobs_from, check_gradient, make_layer, opencv_layer,
                           run_forward, setup_layer, spy_calls)
from test_conv import ref_conv, ref_deconv


def geometry(kernel=(3, 3), pad=(1, 1), dilation=(1, 1), stride=(1, 1)):
    return ConvGeometry(kernel, stride, pad, dilation)


def taken(geom, image_shape, weight_shape, group=1, xp=np, dtype=np.float32):
    grid = geom.conv_output_shape(image_shape[2:])
    return tap_planes.windows_for(xp, geom, image_shape, grid, weight_shape, group,
                                  dtype) is not None


def test_which_convolutions_take_the_path():
    aspp = geometry(pad=(24, 24), dilation=(24, 24))
    resnet_head = ((1, 2048, 65, 65), (21, 2048, 3, 3))
    assert taken(aspp, *resnet_head)                                 # DeepLab's classifier
    assert taken(aspp, (1, 8, 9, 9), (4, 8, 3, 3))                    # half the channels
    assert not taken(aspp, (1, 8, 9, 9), (5, 8, 3, 3))                # more than half
    assert not taken(aspp, (1, 512, 41, 41), (1024, 512, 3, 3))       # ASPP-VGG's fc6
    assert not taken(aspp, *resnet_head, xp=emulator)                 # device arrays
    assert not taken(aspp, (1, 8, 9, 9), (2, 4, 3, 3), group=2)
    assert not taken(geometry(stride=(2, 2)), (1, 8, 9, 9), (2, 8, 3, 3))
    assert not taken(geometry((1, 1), (0, 0)), (1, 8, 9, 9), (2, 8, 1, 1))   # no im2col
    assert taken(geometry((1, 1), (1, 1)), (1, 8, 9, 9), (2, 8, 1, 1))       # padded 1x1
    three_d = ConvGeometry((3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1))
    assert not taken(three_d, (1, 8, 5, 5, 5), (2, 8, 3, 3, 3))
    # the tap planes of one image must fit PLANE_BYTES (64 MiB): 9 * 21 * 300^2 floats
    # (68 MB) do not, 9 * 21 * 250^2 (47 MB) do
    assert not taken(aspp, (1, 2048, 300, 300), (21, 2048, 3, 3))
    assert taken(aspp, (1, 2048, 250, 250), (21, 2048, 3, 3))
    # taps that read under MIN_PLANE_USE of the planes: an unpadded dilation-24 3x3 on
    # 65x65 reads 9 * 17^2 of 9 * 65^2 positions (7 %); a 7x7 on 7x7 reads 2 %
    assert not taken(geometry(pad=(0, 0), dilation=(24, 24)), *resnet_head)
    assert not taken(geometry((7, 7), (0, 0)), (8, 2048, 7, 7), (21, 2048, 7, 7))
    # ... where DeepLab's classifier on a small scale's 21x21 grid reads its centre tap
    # only, 1/9 of the planes
    assert taken(aspp, (1, 2048, 21, 21), (21, 2048, 3, 3))


# (convolution_param, bottom shape): each takes the path (outputs <= channels / 2)
CASES = {
    "aspp-24": ("num_output: 3 kernel_size: 3 dilation: 24 pad: 24", (2, 6, 29, 31)),
    "centre-tap-only": ("num_output: 2 kernel_size: 3 dilation: 50 pad: 50", (1, 5, 9, 8)),
    "rect": ("num_output: 2 kernel_h: 3 kernel_w: 5 pad_h: 2 pad_w: 1 dilation: 2",
             (3, 4, 7, 9)),
    "no-pad": ("num_output: 1 kernel_size: 2", (2, 3, 6, 5)),
    "pad-beyond-window": ("num_output: 2 kernel_size: 3 pad: 4", (1, 4, 3, 2)),
    "padded-1x1": ("num_output: 2 kernel_size: 1 pad: 1", (2, 5, 4, 3)),
}


def conv_text(param, bias=True):
    filler = ' bias_filler { type: "gaussian" }' if bias else " bias_term: false"
    return f'type: "Convolution" convolution_param {{ {param}{filler} }}'


ENTRY_POINTS = ("forward", "backward", "weight_grad", "weight_and_backward")


def run_layer(text, x, dtype, enabled, monkeypatch, integers=False, absolute=False):
    """Forward, then backward with propagate_down; the top and the bottom diff poisoned
    with NaN first, parameter diffs starting at 1 (they accumulate). ``absolute``: the
    weights and the top diff as their magnitudes (with |x|, the sums of |terms|)."""
    monkeypatch.setattr(tap_planes, "ENABLED", enabled)
    calls = spy_calls(monkeypatch, tap_planes, ENTRY_POINTS)
    magnitude = np.abs if absolute else np.asarray
    layer = make_layer(text, caffelite.TRAIN, dtype)
    bottom, top = blobs_from([x], dtype), [Blob((), dtype)]
    layer.setup(bottom, top)
    rng = np.random.default_rng(4)
    for b in layer.blobs:
        b.data[...] = magnitude(rng.integers(-3, 4, b.shape) if integers else
                                rng.standard_normal(b.shape))
        b.diff[...] = 1
    y = run_forward(layer, bottom, top)[0]
    top[0].diff[...] = magnitude(np.random.default_rng(5).integers(-3, 4, y.shape))
    bottom[0].diff[...] = np.nan
    layer.backward(top, [True], bottom)
    values = [y, bottom[0].diff.copy()] + [b.diff.copy() for b in layer.blobs]
    layer.backward(top, [False], bottom)        # the weight gradient alone accumulates
    values.append(layer.blobs[0].diff.copy())
    return values, calls


@pytest.mark.parametrize("case", sorted(CASES))
def test_integer_data_gives_the_im2col_values_exactly(case, monkeypatch):
    """Integers sum exactly in every order, so both paths give the same bits: forward
    (every output written, bias included), data gradient (the bottom's poison
    overwritten), weight and bias gradients accumulated once and twice."""
    param, shape = CASES[case]
    x = np.random.default_rng(1).integers(-4, 5, shape).astype(np.float32)
    want, calls = run_layer(conv_text(param), x, np.float32, False, monkeypatch, True)
    assert calls == []
    got, calls = run_layer(conv_text(param), x, np.float32, True, monkeypatch, True)
    assert calls == ["forward", "weight_and_backward", "weight_grad"]
    for g, w in zip(got, want):
        assert not np.isnan(g).any()
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", ["aspp-24", "rect"])
def test_float_data_within_the_summation_order_bound(case, dtype, monkeypatch):
    """On floats the same terms are added in another grouping: each value within
    (terms + 2) eps of the sum of |terms| (the im2col layer run on |x|, |w|, |dy|), with
    each output's own count of terms."""
    param, shape = CASES[case]
    text = conv_text(param)
    x = np.random.default_rng(2).standard_normal(shape).astype(dtype)
    want, _ = run_layer(text, x, dtype, False, monkeypatch)
    got, calls = run_layer(text, x, dtype, True, monkeypatch)
    assert "forward" in calls
    magnitude, _ = run_layer(text, np.abs(x), dtype, False, monkeypatch, absolute=True)
    outputs, channels, *kernel = np.shape(want[2])             # the weight's shape
    taps = np.prod(kernel)
    pixels = x.shape[0] * np.prod(np.shape(want[0])[2:])       # images x top positions
    # top: channels x taps products and the bias; bottom diff: outputs x taps products;
    # weight and bias diffs: one product per pixel after the starting 1, twice at the end
    terms = [channels * taps + 1, outputs * taps, pixels + 1, pixels + 1, 2 * pixels + 1]
    eps = np.finfo(dtype).eps
    for g, w, scale, n in zip(got, want, magnitude, terms, strict=True):
        assert np.all(np.abs(g - w) <= (n + 2) * eps * scale)


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_the_direct_sum(case):
    param, shape = CASES[case]
    layer = make_layer(conv_text(param))
    x = np.random.default_rng(3).standard_normal(shape)
    bottom, top = setup_layer(layer, [x])
    for b in layer.blobs:
        b.data[...] = np.random.default_rng(6).standard_normal(b.shape)
    g = layer.geom
    want = ref_conv(x, layer.blobs[0].data, layer.blobs[1].data, g.stride, g.pad,
                    g.dilation, 1)
    np.testing.assert_allclose(run_forward(layer, bottom, top)[0], want, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("case", ["aspp-24", "rect", "pad-beyond-window", "padded-1x1"])
def test_gradient(case):
    param, shape = CASES[case]
    layer = make_layer(conv_text(param))
    rng = np.random.default_rng(7)
    bottom, top = setup_layer(layer, [rng.standard_normal(shape)])
    for b in layer.blobs:
        b.data[...] = rng.standard_normal(b.shape)
    check_gradient(layer, bottom, top, step=1e-3)


def test_float32_forward_matches_opencv(monkeypatch):
    """DeepLab's classifier shape, scaled down: 3x3 at dilation 6, outputs a quarter of
    the channels, against OpenCV's Caffe importer."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 16, 17, 15)).astype(np.float32)
    w = (rng.standard_normal((4, 16, 3, 3)) * 0.2).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    text = ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 '
            'dilation: 6 pad: 6 }')
    layer = make_layer(text, dtype=np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    layer.blobs[0].data[...] = w
    layer.blobs[1].data[...] = b
    monkeypatch.setattr(tap_planes, "ENABLED", True)     # whatever the environment says
    calls = spy_calls(monkeypatch, tap_planes, ENTRY_POINTS)
    ours = run_forward(layer, bottom, top)[0]
    assert calls == ["forward"]
    want = opencv_layer(text, {"x": x}, weights=[w, b])[0]
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_deconvolution_with_few_inputs(monkeypatch):
    """A stride-1 Deconvolution whose inputs are at most half its outputs: its forward
    is the data-gradient product and its backward the forward and weight products."""
    text = ('type: "Deconvolution" convolution_param { num_output: 6 kernel_size: 3 '
            'dilation: 2 pad: 1 bias_filler { type: "gaussian" } }')
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 2, 5, 4))
    layer = make_layer(text)
    bottom, top = setup_layer(layer, [x])
    for b in layer.blobs:
        b.data[...] = rng.standard_normal(b.shape)
    calls = spy_calls(monkeypatch, tap_planes, ENTRY_POINTS)
    want = ref_deconv(x, layer.blobs[0].data, layer.blobs[1].data, (1, 1), (1, 1), (2, 2), 1)
    np.testing.assert_allclose(run_forward(layer, bottom, top)[0], want, rtol=1e-12,
                               atol=1e-12)
    check_gradient(layer, bottom, top)
    assert {"forward", "backward", "weight_grad"} <= set(calls)


def test_resnet_classifier_branch_at_full_size(monkeypatch):
    """fc1_voc12_c3 of ResNet-101 DeepLab at the 513x513 test size (2048 x 65 x 65 in,
    21 out, dilation 24): the tap planes against im2col in float32, and both against a
    float64 product within float32 rounding."""
    rng = np.random.default_rng(10)
    x = np.maximum(rng.standard_normal((1, 2048, 65, 65), dtype=np.float32), 0)
    w = (rng.standard_normal((21, 2048, 3, 3)) * 0.01).astype(np.float32)
    geom = geometry(pad=(24, 24), dilation=(24, 24))
    out = np.full((1, 21, 65, 65), np.nan, np.float32)
    monkeypatch.setattr(tap_planes, "ENABLED", True)
    calls = spy_calls(monkeypatch, tap_planes, ENTRY_POINTS)
    im2col.forward_gemm(x, w, out, geom, 1)
    assert calls == ["forward"]
    monkeypatch.setattr(tap_planes, "ENABLED", False)
    want = np.full_like(out, np.nan)
    im2col.forward_gemm(x, w, want, geom, 1)
    assert calls == ["forward"]
    exact = np.empty(out.shape)
    im2col.forward_gemm(x.astype(np.float64), w.astype(np.float64), exact, geom, 1)
    bound = 1e-5 * np.abs(exact).max()
    assert np.abs(out - exact).max() < bound
    assert np.abs(want - exact).max() < bound


def test_non_finite_weight_on_a_padding_tap(monkeypatch):
    """What the module docstring says of Inf: an Inf weight on a tap that reads only
    padding does not reach the forward's outputs (the fork's im2col GEMM gives
    0 * Inf = NaN there), and makes the data gradient NaN (the fork's col2im skips the
    padding); finite weights give finite values on both paths."""
    geom = geometry(pad=(50, 50), dilation=(50, 50))        # the centre tap alone reads
    x = np.random.default_rng(11).standard_normal((1, 4, 5, 6))
    w = np.random.default_rng(12).standard_normal((2, 4, 3, 3))
    w[1, 2, 0, 0] = np.inf
    out = np.full((1, 2, 5, 6), np.nan)
    dx = np.full_like(x, np.nan)
    with np.errstate(invalid="ignore"):
        im2col.forward_gemm(x, w, out, geom, 1)
        assert np.isfinite(out).all()
        im2col.backward_gemm(np.ones_like(out), w, dx, geom, 1)
        assert np.isnan(dx[0, 2]).all() and np.isfinite(dx[0, [0, 1, 3]]).all()
        monkeypatch.setattr(tap_planes, "ENABLED", False)
        im2col.forward_gemm(x, w, out, geom, 1)
        assert np.isnan(out[0, 1]).all() and np.isfinite(out[0, 0]).all()
        im2col.backward_gemm(np.ones_like(out), w, dx, geom, 1)
        assert np.isfinite(dx).all()
