"""Neuron layers: OpenCV parity (float32), Caffe gradient checks (float64), in-place runs,
Dropout statistics and parameter errors."""
import numpy as np
import pytest

from caffelite import backend
from caffelite.blob import Blob
from caffelite.layer import LayerError
from layer_testing import (TEST, TRAIN, assert_same_bits, check_gradient, make_layer,
                           opencv_layer, run_forward, setup_layer)

SHAPE = (2, 3, 4, 5)


def ours(layer_text, arrays, num_top=1, dtype=np.float32, phase=TEST, params=None):
    layer = make_layer(layer_text, phase, dtype)
    bottom, top = setup_layer(layer, arrays, num_top, dtype)
    for blob, value in zip(layer.blobs, params or []):
        blob.data[...] = value
    out = run_forward(layer, bottom, top)
    for o in out:
        assert o.dtype == np.dtype(dtype)
    return out


def assert_close(actual, expected, rtol=1e-5, atol=1e-6):
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale)


def randn(shape=SHAPE, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def away_from(x, point, margin):
    """Push values within ``margin`` of ``point`` out of that band (finite differences
    must not straddle a kink)."""
    x = x.copy()
    near = np.abs(x - point) < margin
    x[near] = point + np.where(x[near] >= point, margin, -margin)
    return x


# ------------------------------------------------------------------ OpenCV parity
OPENCV_CASES = [
    ('type: "ReLU"', None),
    ('type: "ReLU" relu_param { negative_slope: 0.1 }', None),
    ('type: "ELU"', None),
    ('type: "ELU" elu_param { alpha: 0.5 }', None),
    ('type: "Sigmoid"', None),
    ('type: "TanH"', None),
    ('type: "AbsVal"', None),
    ('type: "BNLL"', None),
    ('type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }', None),
    ('type: "Power" power_param { power: 3 scale: -1.5 }', None),
    ('type: "Power" power_param { power: 0.5 scale: 2 shift: 0.25 }', "positive"),
    ('type: "Power" power_param { power: 1 scale: 3 shift: -2 }', None),
    ('type: "Exp"', None),
    ('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 0.1 }', None),
    # OpenCV has BVLC's fixed outer scale (e^shift for the default base); the fork's
    # pow(-1, shift) is tested below. An explicit e is the same in both.
    ('type: "Exp" exp_param { base: 2.718281828 scale: -1.5 shift: 0.3 }', None),
    ('type: "Log"', "positive"),
    ('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', None),
    ('type: "Swish"', None),
]


@pytest.mark.parametrize("text,domain", OPENCV_CASES)
def test_forward_matches_opencv(text, domain):
    x = randn(seed=1)
    if domain == "positive":
        x = np.abs(x) + np.float32(0.05)
    expected = opencv_layer(text, {"x": x})[0]
    (y,) = ours(text, [x])
    assert_close(y, expected)


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_matches_opencv(shared):
    x = randn(seed=2)
    slopes = np.random.default_rng(3).uniform(-0.5, 0.9, 1 if shared else SHAPE[1])
    slopes = slopes.astype(np.float32)
    text = f'type: "PReLU" prelu_param {{ channel_shared: {str(shared).lower()} }}'
    expected = opencv_layer(text, {"x": x}, weights=[slopes])[0]
    (y,) = ours(text, [x], params=[slopes])
    assert_close(y, expected)


def test_log_with_base_scale_shift_matches_double_precision():
    # OpenCV's Caffe importer ignores log_param (its Log is the natural log of x), so
    # base/scale/shift are checked against the definition evaluated in float64.
    x = np.abs(randn(seed=4)) + np.float32(0.1)
    (y,) = ours('type: "Log" log_param { base: 2 scale: 0.5 shift: 0.1 }', [x])
    expected = np.log(0.1 + 0.5 * x.astype(np.float64)) / np.log(2.0)
    assert_close(y, expected, rtol=2e-6)


def test_power_special_cases_by_hand():
    x = randn(seed=5)
    (y,) = ours('type: "Power" power_param { power: 3 scale: 0 shift: 2 }', [x])
    assert np.all(y == 8)                                   # input ignored: shift^power
    (y,) = ours('type: "Power" power_param { power: 0 scale: 4 shift: 2 }', [x])
    assert np.all(y == 1)                                   # anything^0
    (y,) = ours('type: "Power"', [x])
    np.testing.assert_array_equal(y, x)                     # defaults are the identity


def test_threshold_by_hand():
    x = np.array([[-1.0, 0.0, 0.25, 0.5, 0.75, 2.0]], np.float32)
    (y,) = ours('type: "Threshold" threshold_param { threshold: 0.5 }', [x])
    np.testing.assert_array_equal(y, [[0, 0, 0, 0, 1, 1]])  # strictly greater
    (y,) = ours('type: "Threshold"', [x])
    np.testing.assert_array_equal(y, [[0, 0, 1, 1, 1, 1]])


def test_bnll_extremes_stay_finite():
    x = np.array([[-100.0, -30.0, 0.0, 30.0, 100.0]], np.float32)
    (y,) = ours('type: "BNLL"', [x])
    expected = np.logaddexp(0.0, x.astype(np.float64))
    assert_close(y, expected)


# ------------------------------------------------------------------ gradients (float64)
GRADIENT_CASES = [
    ('type: "ReLU"', "kink0"),
    ('type: "ReLU" relu_param { negative_slope: 0.1 }', "kink0"),
    ('type: "ELU" elu_param { alpha: 0.7 }', "kink0"),
    ('type: "Sigmoid"', None),
    ('type: "TanH"', None),
    ('type: "AbsVal"', "kink0"),
    ('type: "BNLL"', None),
    ('type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }', None),
    ('type: "Power" power_param { power: 2 scale: -1.5 }', None),
    ('type: "Power" power_param { power: 3 scale: 1.5 }', "kink0"),
    ('type: "Power" power_param { power: 0.5 scale: 2 shift: 0.25 }', "positive"),
    ('type: "Power" power_param { power: -1.5 scale: 1.2 shift: 3 }', "positive"),
    ('type: "Power" power_param { power: 1 scale: 3 shift: -2 }', None),
    ('type: "Power" power_param { power: 2 scale: 0 shift: 2 }', None),
    ('type: "Exp"', None),
    ('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 0.1 }', None),
    ('type: "Log"', "positive"),
    ('type: "Log" log_param { base: 10 scale: 2 shift: 0.5 }', "positive"),
    ('type: "Dropout" dropout_param { dropout_ratio: 0.4 }', None),
    ('type: "Swish"', None),
    ('type: "Swish" swish_param { beta: 1.7 }', None),
    ('type: "Clip" clip_param { min: -0.6 max: 0.8 }', "clip"),
]


@pytest.mark.parametrize("text,domain,phase", [c + (TEST,) for c in GRADIENT_CASES] + [
    ('type: "Dropout" dropout_param { dropout_ratio: 0.4 }', None, TRAIN)])
def test_gradient(text, domain, phase):
    # Dropout in TRAIN: check_gradient reseeds caffelite's RNG before every forward,
    # so each evaluation draws the same mask.
    x = randn((2, 3, 3, 2), seed=6, dtype=np.float64)
    kwargs = {}
    if domain == "kink0":
        x = away_from(x, 0.0, 0.02)
        kwargs = dict(kink=0.0, kink_range=0.01)
    elif domain == "positive":
        x = np.abs(x) + 0.2
    elif domain == "clip":                  # kinks at min and max
        x = away_from(away_from(x, -0.6, 0.02), 0.8, 0.02)
    layer = make_layer(text, phase, np.float64)
    bottom, top = setup_layer(layer, [x])
    check_gradient(layer, bottom, top, step=1e-4, **kwargs)


def test_relu_gradient_at_the_kink_follows_caffe():
    # Caffe: dx = dy * ((x > 0) + slope * (x <= 0)), so x == 0 takes the slope.
    x = np.array([[-1.0, 0.0, 2.0]])
    for slope, expected in ((0.0, [0.0, 0.0, 1.0]), (0.25, [0.25, 0.25, 1.0])):
        layer = make_layer(f'type: "ReLU" relu_param {{ negative_slope: {slope} }}')
        bottom, top = setup_layer(layer, [x])
        run_forward(layer, bottom, top)
        top[0].diff[...] = 1.0
        layer.backward(top, [True], bottom)
        np.testing.assert_array_equal(bottom[0].diff, [expected])


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_gradient_includes_slopes(shared):
    x = away_from(randn((2, 3, 3, 2), seed=7, dtype=np.float64), 0.0, 0.02)
    layer = make_layer(f'type: "PReLU" prelu_param {{ channel_shared: {str(shared).lower()} '
                       'filler { type: "uniform" min: -0.5 max: 0.5 } }')
    bottom, top = setup_layer(layer, [x])
    assert layer.blobs[0].shape == (() if shared else (3,))
    check_gradient(layer, bottom, top, kink=0.0, kink_range=0.01)


def test_prelu_default_filler_and_param_accumulation():
    x = randn((2, 3, 2, 2), seed=8, dtype=np.float64)
    layer = make_layer('type: "PReLU"')
    bottom, top = setup_layer(layer, [x])
    np.testing.assert_array_equal(layer.blobs[0].data, [0.25] * 3)
    run_forward(layer, bottom, top)
    top[0].diff[...] = 1.0
    layer.blobs[0].diff[...] = 10.0
    layer.backward(top, [True], bottom)
    expected = 10.0 + np.sum(np.minimum(x, 0), axis=(0, 2, 3))
    np.testing.assert_allclose(layer.blobs[0].diff, expected)


# ------------------------------------------------------------------ in place
IN_PLACE_CASES = [
    'type: "ReLU"',
    'type: "ReLU" relu_param { negative_slope: 0.2 }',
    'type: "PReLU"',
    'type: "ELU"',
    'type: "Sigmoid"',
    'type: "TanH"',
    'type: "Exp" exp_param { scale: 0.5 }',
    'type: "Dropout"',
]


@pytest.mark.parametrize("text", IN_PLACE_CASES)
@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_in_place_matches_out_of_place(text, phase):
    x = randn(seed=9, dtype=np.float64)
    dy = randn(seed=10, dtype=np.float64)

    def run(in_place):
        backend.set_random_seed(123)
        layer = make_layer(text, phase, np.float64)
        bottom = [Blob(x.shape, np.float64)]
        bottom[0].data[...] = x
        top = bottom if in_place else [Blob((), np.float64)]
        layer.setup(bottom, top)
        layer.reshape(bottom, top)
        layer.forward(bottom, top)
        y = top[0].data.copy()
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
        params = [b.diff.copy() for b in layer.blobs]
        return y, bottom[0].diff.copy(), params

    y0, dx0, p0 = run(False)
    y1, dx1, p1 = run(True)
    np.testing.assert_array_equal(y1, y0)
    np.testing.assert_array_equal(dx1, dx0)
    for a, b in zip(p1, p0):
        np.testing.assert_array_equal(a, b)


# Caffe's in-place backwards of the layers without bottom_memory_, from its sequences
# of buffer operations (power_layer.cpp, log_layer.cpp, bnll_layer.cpp) with the bottom
# diff aliasing the top diff and the bottom data the top data: f(y, dy) for the top y.
def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


CAFFE_IN_PLACE = [
    # power 1: set(diff_scale), then times the (overwritten) top diff
    ('type: "Power" power_param { scale: 2 }', lambda y, dy: np.full_like(y, 4.0)),
    # power 2: axpby(diff_scale * scale, y) + diff_scale * shift, squared
    ('type: "Power" power_param { power: 2 shift: 1 }', lambda y, dy: (2 * y + 2) ** 2),
    # shift 0: y / y * power, squared
    ('type: "Power" power_param { power: 3 }', lambda y, dy: np.full_like(y, 9.0)),
    # general: y / (scale * y + shift) * diff_scale, squared
    ('type: "Power" power_param { power: 3 scale: 0.5 shift: 1 }',
     lambda y, dy: (1.5 * y / (0.5 * y + 1)) ** 2),
    # 1 / (y + shift), squared
    ('type: "Log" log_param { shift: 4 }', lambda y, dy: (1 / (y + 4)) ** 2),
    # elementwise: dy * e / (e + 1) with e = exp(y)
    ('type: "BNLL"', lambda y, dy: dy * _sigmoid(y)),
]


@pytest.mark.parametrize("text, expected", CAFFE_IN_PLACE,
                         ids=[t for t, _ in CAFFE_IN_PLACE])
def test_in_place_backward_is_caffes_for_layers_without_bottom_memory(text, expected):
    x = np.abs(randn(seed=9, dtype=np.float64)) + 0.5     # away from 0 and poles
    dy = randn(seed=10, dtype=np.float64)
    layer = make_layer(text, TRAIN, np.float64)
    blob = Blob(x.shape, np.float64)
    blob.data[...] = x
    layer.setup([blob], [blob])
    layer.reshape([blob], [blob])
    layer.forward([blob], [blob])
    y = blob.data.copy()
    out_of_place = make_layer(text, TRAIN, np.float64)
    bottom, top = Blob(x.shape, np.float64), Blob((), np.float64)
    bottom.data[...] = x
    out_of_place.setup([bottom], [top])
    out_of_place.reshape([bottom], [top])
    out_of_place.forward([bottom], [top])
    np.testing.assert_array_equal(y, top.data)            # the forward is unchanged
    blob.diff[...] = dy
    layer.backward([blob], [True], [blob])
    np.testing.assert_allclose(blob.diff, expected(y, dy), rtol=1e-12, atol=0)


def test_absval_refuses_in_place():
    layer = make_layer('type: "AbsVal"')
    blob = Blob((2, 3), np.float64)
    with pytest.raises(LayerError, match="in-place"):
        layer.setup([blob], [blob])
        layer.reshape([blob], [blob])


# ------------------------------------------------------------------ Dropout
def test_dropout_train_statistics_and_repeatability():
    ratio = 0.3
    x = np.ones((4, 8, 50, 50), np.float32)
    backend.set_random_seed(5)
    (y,) = ours(f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}', [x], phase=TRAIN)
    kept = y != 0
    scale = np.float32(1.0 / (1.0 - np.float32(ratio)))
    assert np.all(y[kept] == scale)                        # inverted scaling
    n = kept.size
    sigma = np.sqrt(ratio * (1 - ratio) / n)
    assert abs((1 - kept.mean()) - ratio) < 5 * sigma       # drop rate ~ ratio
    assert abs(y.mean() - 1.0) < 5 * sigma * scale          # expectation preserved
    backend.set_random_seed(5)
    (y2,) = ours(f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}', [x], phase=TRAIN)
    np.testing.assert_array_equal(y2, y)                    # same seed, same mask
    (y3,) = ours(f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}', [x], phase=TRAIN)
    assert np.any(y3 != y)                                  # new draw, new mask


def test_dropout_backward_uses_the_forward_mask():
    x = randn(seed=11)
    layer = make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.5 }', TRAIN, np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    (y,) = run_forward(layer, bottom, top)
    dy = randn(seed=12)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    kept = y != 0
    np.testing.assert_array_equal(bottom[0].diff[~kept], 0)
    np.testing.assert_array_equal(bottom[0].diff[kept], dy[kept] * np.float32(2))
    np.testing.assert_array_equal(y[kept], x[kept] * np.float32(2))


def test_dropout_test_phase_is_identity_both_ways():
    x = randn(seed=13)
    layer = make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.9 }', TEST, np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    (y,) = run_forward(layer, bottom, top)
    np.testing.assert_array_equal(y, x)
    dy = randn(seed=14)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, dy)


# ------------------------------------------------------------------ errors
def test_threshold_has_no_backward():
    layer = make_layer('type: "Threshold"')
    bottom, top = setup_layer(layer, [np.zeros((2, 2))])
    run_forward(layer, bottom, top)
    with pytest.raises(LayerError, match="no backward"):
        layer.backward(top, [True], bottom)


@pytest.mark.parametrize("text,shape,message", [
    ('type: "Exp" exp_param { base: -2 }', (2, 2), "base must be strictly positive"),
    ('type: "Log" log_param { base: 1 }', (2, 2), "base must be positive and not 1"),
    ('type: "Log" log_param { base: 0 }', (2, 2), "base must be positive and not 1"),
    ('type: "PReLU"', (5,), "at least 2 axes"),
    ('type: "PReLU"', (1, 2, 1, 1, 2), "5 axes.*at most 4 axes"),
])
def test_bad_params_are_reported(text, shape, message):
    layer = make_layer(text)
    with pytest.raises(LayerError, match=message) as info:
        setup_layer(layer, [np.ones(shape)])
    assert "under_test" in str(info.value)


def test_prelu_loaded_slopes_must_match_channels():
    layer = make_layer('type: "PReLU"')
    layer.new_param_blob((4,))
    with pytest.raises(LayerError, match="4 values but the bottom has 3 channels"):
        setup_layer(layer, [np.ones((2, 3, 2, 2))])


# ------------------------------------------------------------------ the fork's C++ expressions
SPECIALS = [-np.inf, np.inf, np.nan, -0.0, 0.0, -1.0, 1.0, 1e-30, -1e-30, -3e38, 3e38]


def with_specials(size, dtype, seed, specials=SPECIALS):
    x = np.random.default_rng(seed).standard_normal(size).astype(dtype)
    x[:len(specials)] = specials
    return x


def loop(fn, *arrays):
    """fn applied element by element to numpy scalars (the C++ loop body)."""
    with np.errstate(invalid="ignore", over="ignore"):
        out = [fn(*values) for values in zip(*(a.reshape(-1) for a in arrays))]
    return np.array(out, arrays[0].dtype).reshape(arrays[0].shape)


def cpu_relu(slope):
    """relu_layer.cpp: std::max(x, Dtype(0)) + negative_slope * std::min(x, Dtype(0)),
    std::max(a, b) = (a < b) ? b : a, std::min(a, b) = (b < a) ? b : a."""
    def body(v):
        zero = type(v)(0)
        return (zero if v < zero else v) + type(v)(slope) * (zero if zero < v else v)
    return body


def cpu_relu_backward(slope):
    """top_diff * ((bottom_data > 0) + negative_slope * (bottom_data <= 0))."""
    def body(x, dy):
        t = type(x)
        return dy * (t(x > 0) + t(slope) * t(x <= 0))
    return body


def run_relu(slope, x, dtype, in_place=False):
    layer = make_layer(f'type: "ReLU" relu_param {{ negative_slope: {slope} }}', TRAIN, dtype)
    bottom = [Blob(x.shape, dtype)]
    bottom[0].data[...] = x
    top = bottom if in_place else [Blob((), dtype)]
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return layer, bottom, top


@pytest.mark.parametrize("slope", [0.0, 0.1, -0.5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [len(SPECIALS), 5000])
@pytest.mark.parametrize("drop", [(), (-np.inf,), (-np.inf, np.nan)],
                         ids=["all", "no_minus_inf", "no_minus_inf_no_nan"])
def test_relu_forward_is_the_forks_cpu_formula(slope, dtype, size, drop):
    # Slope 0 takes -inf to 0 * -inf = NaN and keeps -0 (std::max returns x on ties);
    # without -inf or NaN the layer takes its one-pass path, with the same bits.
    specials = [v for v in SPECIALS if not any(v == d or v != v and d != d for d in drop)]
    x = with_specials(size, dtype, seed=21, specials=specials)
    expected = loop(cpu_relu(np.float32(slope)), x)
    for in_place in (False, True):
        _, _, top = run_relu(slope, x, dtype, in_place)
        assert_same_bits(top[0].data, expected)
    if slope == 0:
        minus_zero = [i for i, v in enumerate(specials) if v == 0 and np.signbit(v)][0]
        assert np.signbit(expected[minus_zero])
        assert np.isnan(expected[0]) == (-np.inf not in drop)


@pytest.mark.parametrize("slope", [0.0, 0.1, -0.5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_backward_is_the_forks_cpu_expression(slope, dtype):
    # dy = inf where x <= 0 with slope 0: inf * 0 = NaN; x = NaN: dy * 0.
    x = with_specials(300, dtype, seed=22)
    dy = with_specials(300, dtype, seed=23, specials=[np.inf, -np.inf, 5.0, np.inf, np.nan,
                                                      -2.0, -0.0])
    layer, bottom, top = run_relu(slope, x, dtype)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    expected = loop(cpu_relu_backward(np.float32(slope)), x, dy)
    assert_same_bits(bottom[0].diff, expected)
    assert np.isnan(expected[0]) == (slope == 0) and expected[2] == 0  # x -inf / x NaN


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_absval_backward_uses_caffes_sign(dtype):
    # caffe_cpu_sign: (Dtype(0) < x) - (x < Dtype(0)), 0 at NaN; then times the top diff.
    x = with_specials(200, dtype, seed=24)
    dy = with_specials(200, dtype, seed=25, specials=[2.0, 3.0, 7.0, -4.0, np.inf])
    layer = make_layer('type: "AbsVal"', TRAIN, dtype)
    bottom, top = setup_layer(layer, [x], dtype=dtype)
    run_forward(layer, bottom, top)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    expected = loop(lambda v, g: (type(v)(type(v)(0) < v) - type(v)(v < 0)) * g, x, dy)
    assert_same_bits(bottom[0].diff, expected)
    assert expected[2] == 0


def test_exp_default_base_with_shift_is_the_forks_pow_of_minus_one(caplog):
    # exp_layer.cpp (before BVLC #3937): outer_scale_ = pow(base, input_shift) with base
    # still -1: NaN for shift 0.3, -1 for shift 1, 1 for shift 2; inner_scale_ = scale.
    x = randn(seed=26)
    inner = np.exp((np.float32(-1.5) * x).astype(np.float64)).astype(np.float32)
    with caplog.at_level("WARNING", logger="caffelite"):
        (y,) = ours('type: "Exp" exp_param { scale: -1.5 shift: 0.3 }', [x])
    assert np.isnan(y).all()
    assert "'under_test'" in caplog.text and "pow(-1, shift)" in caplog.text
    assert "base: 2.718281828" in caplog.text
    (y,) = ours('type: "Exp" exp_param { scale: -1.5 shift: 1 }', [x])
    assert_same_bits(y, inner * np.float32(-1))
    (y,) = ours('type: "Exp" exp_param { scale: -1.5 shift: 2 }', [x])
    assert_same_bits(y, inner)
    caplog.clear()
    with caplog.at_level("WARNING", logger="caffelite"):
        (y,) = ours('type: "Exp" exp_param { base: 2.718281828 scale: -1.5 shift: 0.3 }', [x])
    assert caplog.text == "" and np.isfinite(y).all()


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prelu_slope_diff_adds_in_blob_order(shared, dtype):
    # prelu_layer.cpp Backward_cpu: for i in blob order, c = channel_shared ? 0 :
    # (i / dim) % channels; slope_diff[c] += top_diff[i] * bottom_data[i] *
    # (bottom_data[i] <= 0), each add rounded to Dtype, from the existing diff.
    shape = (3, 4, 5, 6)
    rng = np.random.default_rng(27)
    x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-4, 5, shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    layer = make_layer(f'type: "PReLU" prelu_param {{ channel_shared: {str(shared).lower()} }}',
                       TRAIN, dtype)
    bottom, top = setup_layer(layer, [x], dtype=dtype)
    run_forward(layer, bottom, top)
    prior = rng.standard_normal(layer.blobs[0].shape).astype(dtype) * dtype(3)
    layer.blobs[0].diff[...] = prior
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    expected = prior.reshape(-1).copy()
    dim = shape[2] * shape[3]
    flat_x, flat_dy = x.reshape(-1), dy.reshape(-1)
    for i in range(x.size):
        c = 0 if shared else (i // dim) % shape[1]
        expected[c] += flat_dy[i] * flat_x[i] * dtype(flat_x[i] <= 0)
    assert_same_bits(layer.blobs[0].diff.reshape(-1), expected)
    if dtype == np.float32:     # the data makes the order matter: numpy's sum differs
        axes = None if shared else (0, 2, 3)
        pairwise = prior.reshape(-1) + (dy * x * (x <= 0)).sum(axis=axes).reshape(-1)
        assert not np.array_equal(pairwise, expected)


def test_dropout_accepts_any_ratio_at_setup_and_test_phase_is_a_copy():
    # dropout_layer.cpp only DCHECKs the ratio; the TEST forward copies.
    x = randn(seed=28)
    for ratio in (1, 1.5, -0.5):
        text = f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}'
        (y,) = ours(text, [x], phase=TEST)
        np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("ratio", [1.5, -0.5])
def test_dropout_train_refuses_a_keep_probability_outside_0_1(ratio):
    # caffe_rng_bernoulli(count, 1. - threshold_): CHECK_GE(p, 0), CHECK_LE(p, 1).
    layer = make_layer(f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}', TRAIN,
                       np.float32)
    bottom, top = setup_layer(layer, [randn(seed=29)], dtype=np.float32)
    with pytest.raises(LayerError, match="under_test.*outside \\[0, 1\\]"):
        layer.forward(bottom, top)


def test_dropout_ratio_one_gives_nan():
    # scale_ = 1. / (1. - 1) = inf, and bernoulli(0) keeps nothing: y = x * 0 * inf = NaN,
    # the gradient too.
    x = with_specials(120, np.float32, seed=30)
    layer = make_layer('type: "Dropout" dropout_param { dropout_ratio: 1 }', TRAIN, np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    assert layer.scale == np.inf
    (y,) = run_forward(layer, bottom, top)
    assert np.isnan(y).all()
    top[0].diff[...] = randn((120,), seed=31)
    layer.backward(top, [True], bottom)
    assert np.isnan(bottom[0].diff).all()


def test_prelu_forward_is_the_forks_cpu_formula_on_signed_zeros_and_specials():
    # prelu_layer.cpp Forward_cpu: std::max(x, 0) + slope * std::min(x, 0), where
    # std::max(a, b) is (a < b) ? b : a and std::min(a, b) is (b < a) ? b : a.
    def cmax(a, b):
        return b if a < b else a

    def cmin(a, b):
        return b if b < a else a
    f = np.float32
    x = np.array([-0.0, 0.0, -2.0, 3.0, -np.inf, np.inf, np.nan], f).reshape(1, 1, 7)
    layer = make_layer('type: "PReLU" prelu_param { filler { type: "constant" value: 0.25 } }',
                       TRAIN, np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    y = run_forward(layer, bottom, top)[0].reshape(-1)
    with np.errstate(invalid="ignore"):
        want = np.array([f(cmax(v, f(0))) + f(0.25) * f(cmin(v, f(0)))
                         for v in x.reshape(-1)], f)
    assert_same_bits(y, want)
    assert np.signbit(y[0]) and not np.signbit(y[1])


# ------------------------------------------------------------------ later BVLC layers
def test_clip_by_hand_with_caffes_nan_and_edges():
    x = np.array([[-2.0, -0.5, 0.0, 0.5, 1.0, np.inf, -np.inf, np.nan]], np.float32)
    layer = make_layer('type: "Clip" clip_param { min: -0.5 max: 0.5 }', TEST, np.float32)
    bottom, top = setup_layer(layer, [x], 1, np.float32)
    run_forward(layer, bottom, top)
    # std::max(min, std::min(x, max)): a NaN compares false both times and gives min
    np.testing.assert_array_equal(top[0].data, [[-0.5, -0.5, 0, 0.5, 0.5, 0.5, -0.5, -0.5]])
    top[0].diff[...] = 2.0
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, [[0, 2, 2, 2, 0, 0, 0, 0]])
    with pytest.raises(Exception, match="needs both min and max"):
        make_layer('type: "Clip" clip_param { min: 0 }').setup([], [])


def test_swish_against_its_definition_in_double():
    x = randn(seed=9)
    for beta in (1.0, 0.5):
        (y,) = ours(f'type: "Swish" swish_param {{ beta: {beta} }}', [x])
        x64 = x.astype(np.float64)
        assert_close(y, x64 / (1 + np.exp(-beta * x64)), rtol=2e-7)


def test_parameter_layer_is_a_learnt_blob_the_top_shares():
    import caffelite as caffe
    from caffelite.io import prototxt
    param = prototxt.parse_net(
        'layer { name: "p" type: "Parameter" top: "w" parameter_param { shape { dim: 2 '
        'dim: 3 } } } layer { name: "x" type: "DummyData" top: "x" dummy_data_param { '
        'shape { dim: 2 dim: 3 } data_filler { type: "constant" value: 2 } } } '
        'layer { name: "e" type: "Eltwise" bottom: "w" bottom: "x" top: "y" eltwise_param '
        '{ operation: PROD } } layer { name: "l" type: "EuclideanLoss" bottom: "y" '
        'bottom: "x" top: "loss" }')[0]
    net = caffe.Net(param=param, phase=caffe.TRAIN)
    assert net.params["p"][0].shape == (2, 3)
    np.testing.assert_array_equal(net.params["p"][0].data, 0)      # zeros, no filler
    net.params["p"][0].data[...] = np.arange(6).reshape(2, 3)
    net.forward()
    np.testing.assert_array_equal(net.blobs["w"].data, np.arange(6).reshape(2, 3))
    net.backward()
    # loss = sum((2 w - 2)^2) / (2 * 2): d/dw = 2 (2 w - 2) * 2 / 4 = 2 w - 2
    np.testing.assert_allclose(net.params["p"][0].diff, 2 * np.arange(6).reshape(2, 3) - 2)
