"""Neuron layers: OpenCV parity (float32), Caffe gradient checks (float64), in-place runs,
Dropout statistics and parameter errors."""
import numpy as np
import pytest

from caffelite import backend
from caffelite.blob import Blob
from caffelite.layer import LayerError
from layer_testing import (TEST, TRAIN, check_gradient, make_layer, opencv_layer,
                           run_forward, setup_layer)

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
    ('type: "Exp" exp_param { scale: -1.5 shift: 0.3 }', None),
    ('type: "Log"', "positive"),
    ('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', None),
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
    layer = make_layer(text, phase, np.float64)
    bottom, top = setup_layer(layer, [x])
    check_gradient(layer, bottom, top, step=1e-3, threshold=1e-3, **kwargs)


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
    ('type: "Dropout" dropout_param { dropout_ratio: 1 }', (2, 2), "dropout_ratio"),
    ('type: "PReLU"', (5,), "at least 2 axes"),
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
