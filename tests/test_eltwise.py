"""Eltwise SUM/PROD/MAX: OpenCV parity (float32), gradients (float64), Caffe's CPU tie
rule for MAX, and parameter errors."""
import numpy as np
import pytest

from caffelite.layer import LayerError
from layer_testing import (TEST, check_gradient, make_layer, opencv_layer, run_forward,
                           setup_layer)

SHAPE = (2, 3, 4, 5)


def randn(shape=SHAPE, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def separated(n, shape, seed, gap=0.05):
    """n arrays whose values differ from each other by at least ``gap`` at every
    position (so +-step finite differences never change the MAX winner)."""
    rng = np.random.default_rng(seed)
    count = int(np.prod(shape))
    levels = np.arange(n) * gap * 4 + rng.uniform(-1, 1, (count, 1))
    order = np.argsort(rng.random((count, n)), axis=1)
    values = np.take_along_axis(levels, order, axis=1)
    return [values[:, i].reshape(shape) for i in range(n)]


def forward(text, arrays, dtype=np.float32):
    layer = make_layer(text, TEST, dtype)
    bottom, top = setup_layer(layer, arrays, 1, dtype)
    (y,) = run_forward(layer, bottom, top)
    assert y.dtype == np.dtype(dtype)
    return layer, bottom, top, y


def assert_close(actual, expected, rtol=1e-5, atol=1e-6):
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale)


# ------------------------------------------------------------------ OpenCV parity
@pytest.mark.parametrize("text,n", [
    ('type: "Eltwise"', 2),
    ('type: "Eltwise" eltwise_param { operation: SUM }', 3),
    ('type: "Eltwise" eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 }', 3),
    ('type: "Eltwise" eltwise_param { operation: PROD }', 2),
    ('type: "Eltwise" eltwise_param { operation: PROD }', 3),
    ('type: "Eltwise" eltwise_param { operation: MAX }', 2),
    ('type: "Eltwise" eltwise_param { operation: MAX }', 4),
])
def test_forward_matches_opencv(text, n):
    arrays = [randn(seed=i) for i in range(n)]
    expected = opencv_layer(text, {f"x{i}": a for i, a in enumerate(arrays)})[0]
    _, _, _, y = forward(text, arrays)
    assert_close(y, expected)


def test_sum_is_exact_in_float32_for_unit_coefficients():
    arrays = [randn(seed=i) for i in range(3)]
    _, _, _, y = forward('type: "Eltwise"', arrays)
    np.testing.assert_array_equal(y, (arrays[0] + arrays[1]) + arrays[2])


@pytest.mark.parametrize("text,n", [
    ('type: "Eltwise"', 2),
    ('type: "Eltwise"', 3),
    ('type: "Eltwise" eltwise_param { coeff: 1 coeff: 2 coeff: 0.5 }', 3),
])
def test_sum_of_negative_zeros_is_positive_zero_as_caffe(text, n):
    """Caffe clears the top and axpy-adds every bottom into it, 0 + x0 + x1 + ...: where
    all terms are -0 the sum is +0 (x0 + x1 would keep -0); every other value is the
    plain sum."""
    arrays = [randn(seed=i) for i in range(n)]
    for a in arrays:
        a[0, 0, 0] = -0.0
    arrays[0][0, 0, 1] = -0.0
    _, _, _, y = forward(text, arrays)
    assert y[0, 0, 0].tolist() == [0.0] * SHAPE[3]
    assert not np.signbit(y[0, 0, 0]).any()
    assert_close(y, sum(float(c) * a for c, a in zip([1, 2, 0.5] if "coeff" in text
                                                      else [1] * n, arrays)))


def test_max_backward_passes_a_negative_zero_diff_as_positive_zero():
    """Caffe's MAX backward computes gradient = 0; gradient += top_diff for the winner,
    so a -0 top diff reaches the winning bottom as +0."""
    arrays = separated(2, SHAPE, seed=3)
    layer, bottom, top, _ = forward('type: "Eltwise" eltwise_param { operation: MAX }',
                                    [a.astype(np.float32) for a in arrays])
    top[0].diff[...] = -0.0
    layer.backward(top, [True, True], bottom)
    for b in bottom:
        assert np.all(b.diff == 0) and not np.signbit(b.diff).any()



def forward_in_place(text, arrays, which):
    """The float32 layer run with bottom ``which`` as its top: (layer, top data)."""
    layer = make_layer(text, TEST, np.float32)
    bottom, _ = setup_layer(layer, arrays, 1, np.float32)
    top = [bottom[which]]
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return layer, top[0].data


@pytest.mark.parametrize("text", [
    'type: "Eltwise"',
    'type: "Eltwise" eltwise_param { coeff: 2 coeff: -1 coeff: 0.5 }'])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_sum_in_place_on_any_bottom(text, which):
    """Top may be any of the bottoms (Caffe allows it). Caffe's Forward_cpu (and _gpu)
    clears the top first (caffe_set 0), then adds c_i * bottom_i in order (axpy), so
    the bottom that is the top enters as the partial sum accumulated so far."""
    arrays = [randn(seed=10 + i) for i in range(3)]
    coeffs = [np.float32(c) for c in ((2, -1, 0.5) if "coeff" in text else (1, 1, 1))]
    expected = np.zeros_like(arrays[0])
    for i, (x, c) in enumerate(zip(arrays, coeffs)):
        expected = expected + c * (expected if i == which else x)
    np.testing.assert_array_equal(forward_in_place(text, arrays, which)[1], expected)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_prod_in_place_reads_the_partial_product(which):
    """Caffe's caffe_mul(b0, b1, top), then top *= b_i: a third bottom that is the top
    holds b0 * b1 when it is read (bottoms 0 and 1 are read before the first write)."""
    arrays = [randn(seed=30 + i) for i in range(3)]
    first_two = arrays[0] * arrays[1]
    expected = first_two * (first_two if which == 2 else arrays[2])
    _, top = forward_in_place('type: "Eltwise" eltwise_param { operation: PROD }', arrays,
                              which)
    np.testing.assert_array_equal(top, expected)


def test_max_in_place_on_a_third_bottom_never_lets_it_win():
    """From the third bottom on, Caffe compares the bottom (the top itself, holding the
    maximum so far) with the top: never greater, so it neither wins nor changes the
    index, even where the maximum so far is -inf (below the cleared -FLT_MAX)."""
    a = np.array([[-np.inf, 1.0, 2.0]], np.float32)
    b = np.array([[-np.inf, 3.0, 2.0]], np.float32)
    c = np.array([[5.0, 5.0, 5.0]], np.float32)
    layer, top = forward_in_place('type: "Eltwise" eltwise_param { operation: MAX }',
                                  [a, b, c], 2)
    np.testing.assert_array_equal(top, [[-np.inf, 3.0, 2.0]])
    np.testing.assert_array_equal(layer.max_idx, [[1, 1, 1]])


@pytest.mark.parametrize("which", [0, 1, 2])
def test_max_in_place_clears_the_top_to_minus_flt_max_first(which):
    """Caffe's Forward_cpu sets the top to -FLT_MAX before comparing bottoms 0 and 1,
    so the bottom that is the top takes part as -FLT_MAX (its CPU tie rules: bottom 1
    wins ties with bottom 0, later bottoms only when strictly greater; a third bottom
    that is the top never wins, as the test above shows where that matters)."""
    arrays = [randn(seed=20 + i) for i in range(3)]
    values = [np.full_like(a, -np.finfo(np.float32).max) if i == which else a
              for i, a in enumerate(arrays)]
    expected = np.where(values[0] > values[1], values[0], values[1])
    index = np.where(values[0] > values[1], 0, 1)
    wins = values[2] > expected
    expected, index = np.where(wins, values[2], expected), np.where(wins, 2, index)
    layer, top = forward_in_place('type: "Eltwise" eltwise_param { operation: MAX }',
                                  arrays, which)
    np.testing.assert_array_equal(top, expected)
    np.testing.assert_array_equal(layer.max_idx, index)


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("text,n", [
    ('type: "Eltwise"', 2),
    ('type: "Eltwise" eltwise_param { operation: SUM coeff: 0.5 coeff: -2 coeff: 3 }', 3),
    ('type: "Eltwise" eltwise_param { operation: PROD }', 2),
    ('type: "Eltwise" eltwise_param { operation: PROD }', 3),
    ('type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false }', 2),
    ('type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false }', 3),
])
def test_gradient(text, n):
    rng = np.random.default_rng(20)
    # PROD without stable_prod_grad divides by x_i: keep inputs away from 0.
    arrays = [rng.uniform(0.3, 1.5, (2, 3, 2, 2)) * rng.choice([-1, 1], (2, 3, 2, 2))
              for _ in range(n)]
    layer = make_layer(text)
    bottom, top = setup_layer(layer, arrays)
    check_gradient(layer, bottom, top)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_max_gradient_without_ties(n):
    arrays = separated(n, (2, 3, 2, 2), seed=21)
    layer = make_layer('type: "Eltwise" eltwise_param { operation: MAX }')
    bottom, top = setup_layer(layer, arrays)
    check_gradient(layer, bottom, top)


def test_unstable_prod_gradient_is_y_over_x():
    # stable_prod_grad false: dx_i = dy * y / x_i, which is NaN where x_i == 0 (as in Caffe).
    arrays = [np.array([[2.0, 0.0, 3.0]]), np.array([[5.0, 4.0, -1.0]])]
    layer, bottom, top, y = forward(
        'type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false }',
        arrays, np.float64)
    top[0].diff[...] = 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        layer.backward(top, [True, True], bottom)
    np.testing.assert_array_equal(bottom[0].diff[0, [0, 2]], [5.0, -1.0])
    assert np.isnan(bottom[0].diff[0, 1])
    np.testing.assert_array_equal(bottom[1].diff, [[2.0, 0.0, 3.0]])

    layer, bottom, top, y = forward('type: "Eltwise" eltwise_param { operation: PROD }',
                                    arrays, np.float64)
    top[0].diff[...] = 1.0
    layer.backward(top, [True, True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, [[5.0, 4.0, -1.0]])


def test_propagate_down_is_respected():
    arrays = [randn((2, 3), seed=i, dtype=np.float64) for i in range(3)]
    layer, bottom, top, y = forward(
        'type: "Eltwise" eltwise_param { coeff: 1 coeff: 2 coeff: 3 }', arrays, np.float64)
    for b in bottom:
        b.diff[...] = 7.0
    top[0].diff[...] = 1.0
    layer.backward(top, [True, False, True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 1.0)
    np.testing.assert_array_equal(bottom[1].diff, 7.0)
    np.testing.assert_array_equal(bottom[2].diff, 3.0)


# ------------------------------------------------------------------ MAX ties (CPU rule)
def test_max_tie_rule_by_hand():
    # Columns (x0, x1, x2, x3) -> winning bottom under Caffe's CPU rule:
    # bottoms 0 vs 1: tie -> 1; later bottoms win only when strictly greater.
    cases = [
        ((5, 5, 1, 1), 1),   # first pair tie -> bottom 1
        ((5, 5, 5, 5), 1),   # all equal -> bottom 1 (later ties stay with the earlier)
        ((3, 5, 5, 0), 1),   # x2 ties the running max -> stays with bottom 1
        ((5, 3, 5, 5), 0),   # x0 strictly wins the pair; later ties keep bottom 0
        ((1, 2, 3, 3), 2),   # x3 ties x2 -> earlier (2)
        ((1, 2, 3, 4), 3),
        ((4, 3, 2, 1), 0),
        ((0, 2, 7, 7), 2),
    ]
    columns = np.array([c for c, _ in cases], np.float32).T      # (4 bottoms, len(cases))
    arrays = [columns[i].reshape(1, -1) for i in range(4)]
    layer, bottom, top, y = forward('type: "Eltwise" eltwise_param { operation: MAX }', arrays)
    np.testing.assert_array_equal(y[0], columns.max(axis=0))
    dy = np.arange(1, len(cases) + 1, dtype=np.float32).reshape(1, -1)
    top[0].diff[...] = dy
    layer.backward(top, [True] * 4, bottom)
    for i in range(4):
        expected = [dy[0, k] if winner == i else 0.0 for k, (_, winner) in enumerate(cases)]
        np.testing.assert_array_equal(bottom[i].diff[0], expected, err_msg=f"bottom {i}")


def test_max_two_bottom_tie_goes_to_bottom_1():
    a = np.array([[1.0, 2.0, -3.0]], np.float32)
    layer, bottom, top, y = forward('type: "Eltwise" eltwise_param { operation: MAX }',
                                    [a, a.copy()])
    top[0].diff[...] = 1.0
    layer.backward(top, [True, True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 0.0)
    np.testing.assert_array_equal(bottom[1].diff, 1.0)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("text,n,message", [
    ('type: "Eltwise" eltwise_param { coeff: 1 coeff: 2 }', 3,
     "2 coeff values for 3 bottoms"),
    ('type: "Eltwise" eltwise_param { coeff: 1 coeff: 2 coeff: 3 coeff: 4 }', 3,
     "4 coeff values for 3 bottoms"),
    ('type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }', 2,
     "coeff is only allowed with operation SUM"),
])
def test_bad_params(text, n, message):
    layer = make_layer(text)
    with pytest.raises(LayerError, match=message) as info:
        setup_layer(layer, [np.ones((2, 3))] * n)
    assert "under_test" in str(info.value)


def test_shape_mismatch_names_both_shapes():
    layer = make_layer('type: "Eltwise" bottom: "a" bottom: "b"')
    with pytest.raises(LayerError) as info:
        setup_layer(layer, [np.ones((2, 3, 4)), np.ones((2, 3, 5))])
    message = str(info.value)
    assert "(2, 3, 4)" in message and "(2, 3, 5)" in message
    assert "'a'" in message and "'b'" in message


def test_needs_two_bottoms():
    layer = make_layer('type: "Eltwise"')
    with pytest.raises(LayerError, match="at least 2 bottom"):
        setup_layer(layer, [np.ones((2, 3))])
