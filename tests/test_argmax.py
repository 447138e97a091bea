"""ArgMax: hand-derived tie cases (ties -> highest index, as Caffe's descending sort of
(value, index) pairs gives), top-k/out_max_val layouts, a torch.topk oracle on tie-free
data, and errors. OpenCV's Caffe importer has no ArgMax layer."""
import numpy as np
import pytest

from caffelite.layer import LayerError
from layer_testing import TEST, make_layer, run_forward, setup_layer


def forward(text, x, dtype=np.float32):
    layer = make_layer(text, TEST, dtype)
    bottom, top = setup_layer(layer, [np.asarray(x, dtype)], 1, dtype)
    (y,) = run_forward(layer, bottom, top)
    assert y.dtype == np.dtype(dtype)
    return layer, bottom, top, y


def test_ties_go_to_the_highest_index_flat():
    x = np.array([[1, 3, 3, 2],      # tie between 1 and 2 -> 2
                  [7, 0, 7, 7],      # three-way tie -> 3
                  [5, 4, 3, 2]])     # unique -> 0
    x = x.reshape(3, 4, 1, 1)
    _, _, _, y = forward('type: "ArgMax"', x)
    assert y.shape == (3, 1, 1, 1)
    np.testing.assert_array_equal(y.ravel(), [2, 3, 0])


def test_top_k_orders_ties_by_descending_index():
    x = np.array([[5, 5, 1, 5, 2]]).reshape(1, 5, 1, 1)
    _, _, _, y = forward('type: "ArgMax" argmax_param { top_k: 4 }', x)
    assert y.shape == (1, 1, 4, 1)
    np.testing.assert_array_equal(y.ravel(), [3, 1, 0, 4])


def test_out_max_val_without_axis_holds_indices_then_values():
    x = np.array([[0.5, 2.0, -1.0, 2.0, 1.5, 0.0],
                  [3.0, 1.0, 4.0, 1.0, 5.0, 9.0]]).reshape(2, 2, 3)
    _, _, _, y = forward('type: "ArgMax" argmax_param { top_k: 3 out_max_val: true }', x)
    assert y.shape == (2, 2, 3)
    np.testing.assert_array_equal(y[0], [[3, 1, 4], [2.0, 2.0, 1.5]])
    np.testing.assert_array_equal(y[1], [[5, 4, 2], [9.0, 5.0, 4.0]])


def test_two_axis_bottom_gets_a_three_axis_top():
    x = np.array([[0.0, 1.0, 1.0], [2.0, 0.0, 1.0]])
    _, _, _, y = forward('type: "ArgMax"', x)
    assert y.shape == (2, 1, 1)
    np.testing.assert_array_equal(y.ravel(), [2, 0])


def test_axis_ties_per_pixel():
    # Channel argmax per pixel (SegAccuracy-style): ties -> highest class.
    x = np.zeros((1, 3, 2, 2))
    x[0, :, 0, 0] = [1, 1, 0]        # -> 1
    x[0, :, 0, 1] = [2, 2, 2]        # -> 2
    x[0, :, 1, 0] = [3, 1, 2]        # -> 0
    x[0, :, 1, 1] = [0, 4, 4]        # -> 2
    _, _, _, y = forward('type: "ArgMax" argmax_param { axis: 1 }', x)
    assert y.shape == (1, 1, 2, 2)
    np.testing.assert_array_equal(y[0, 0], [[1, 2], [0, 2]])
    _, _, _, v = forward('type: "ArgMax" argmax_param { axis: 1 out_max_val: true }', x)
    np.testing.assert_array_equal(v[0, 0], [[1, 2], [3, 4]])


@pytest.mark.parametrize("axis,top_k", [(1, 1), (1, 3), (2, 2), (-1, 4), (0, 2)])
@pytest.mark.parametrize("out_max_val", [False, True])
def test_axis_matches_torch_topk(axis, top_k, out_max_val):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(axis + 7 * top_k).permutation(2 * 5 * 4 * 6)
    x = (x.reshape(2, 5, 4, 6) * 0.25).astype(np.float32)          # no ties
    text = (f'type: "ArgMax" argmax_param {{ axis: {axis} top_k: {top_k} '
            f'out_max_val: {str(out_max_val).lower()} }}')
    _, _, _, y = forward(text, x)
    values, indices = torch.topk(torch.from_numpy(x), top_k, dim=axis, largest=True, sorted=True)
    expected = values.numpy() if out_max_val else indices.numpy().astype(np.float32)
    assert y.shape == expected.shape
    np.testing.assert_array_equal(y, expected)


def test_flat_matches_numpy_sort_without_ties():
    x = np.random.default_rng(3).permutation(3 * 4 * 5).reshape(3, 4, 5).astype(np.float64)
    _, _, _, y = forward('type: "ArgMax" argmax_param { top_k: 5 out_max_val: true }', x,
                         np.float64)
    rows = x.reshape(3, -1)
    order = np.argsort(rows, axis=1)[:, ::-1][:, :5]
    np.testing.assert_array_equal(y[:, 0], order)
    np.testing.assert_array_equal(y[:, 1], np.take_along_axis(rows, order, 1))


@pytest.mark.parametrize("text,shape,message", [
    ('type: "ArgMax" argmax_param { top_k: 0 }', (2, 3, 1, 1), "at least 1"),
    ('type: "ArgMax" argmax_param { top_k: 7 }', (2, 3, 2, 1), "larger than the 6 entries"),
    ('type: "ArgMax" argmax_param { axis: 1 top_k: 4 }', (2, 3, 5, 5), "larger than axis 1"),
    ('type: "ArgMax" argmax_param { axis: 4 }', (2, 3, 5, 5), "out of range"),
])
def test_bad_params(text, shape, message):
    layer = make_layer(text)
    with pytest.raises(LayerError, match=message) as info:
        setup_layer(layer, [np.zeros(shape)])
    assert "under_test" in str(info.value)


def test_no_backward():
    layer, bottom, top, _ = forward('type: "ArgMax"', np.zeros((2, 3, 1, 1)))
    with pytest.raises(LayerError, match="no backward"):
        layer.backward(top, [True], bottom)
    layer.backward(top, [False], bottom)     # nothing asked, nothing done


def caffe_top1(values):
    """std::partial_sort(begin, begin + 1, end, greater<pair<value, index>>) read as a
    scan: a later pair replaces the best when greater(later, best), i.e. unless its
    value is smaller (ties and NaN comparisons go to the later index)."""
    best = 0
    for i in range(1, len(values)):
        if not values[i] < values[best]:
            best = i
    return best


def test_nan_scores_rank_as_caffes_partial_sort():
    nan = np.nan
    rows = np.array([[nan, 1, 0, 0.5],     # after the NaN: 1 at index 1
                     [1, nan, 0, -1],      # after the NaN: 0 at index 2
                     [0, 2, 1, nan],       # the last entry NaN: 3
                     [nan, nan, nan, nan],
                     [3, 1, 3, 2]], np.float32)
    want = [caffe_top1(r) for r in rows]
    assert want == [1, 2, 3, 3, 2]
    _, _, _, y = forward('type: "ArgMax"', rows.reshape(5, 4, 1, 1))
    np.testing.assert_array_equal(y.ravel(), want)
    _, _, _, y = forward('type: "ArgMax" argmax_param { axis: 1 }', rows.reshape(5, 4, 1, 1))
    np.testing.assert_array_equal(y.ravel(), want)
