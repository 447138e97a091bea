"""Concat, Slice, Split, Flatten, Reshape, Crop, Tile, Silence: OpenCV parity (float32),
gradients (float64), data/diff sharing and parameter errors."""
import numpy as np
import pytest

from caffelite.blob import Blob
from caffelite.layer import LayerError
from layer_testing import (TEST, check_gradient, make_layer, opencv_layer, run_forward,
                           setup_layer)


def randn(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def forward(text, arrays, num_top=1, dtype=np.float32):
    layer = make_layer(text, TEST, dtype)
    bottom, top = setup_layer(layer, arrays, num_top, dtype)
    out = run_forward(layer, bottom, top)
    for o in out:
        assert o.dtype == np.dtype(dtype)
    return layer, bottom, top, out


def forward_view(text, arrays, dtype=np.float32):
    """Forward for layers whose top shares the bottom's data (run_forward would poison
    the shared memory with NaN before the forward)."""
    layer = make_layer(text, TEST, dtype)
    bottom, top = setup_layer(layer, arrays, 1, dtype)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return layer, bottom, top, top[0].data.copy()


# ------------------------------------------------------------------ Concat
@pytest.mark.parametrize("text,shapes", [
    ('type: "Concat"', [(2, 3, 4, 5), (2, 1, 4, 5), (2, 4, 4, 5)]),
    ('type: "Concat" concat_param { axis: 1 }', [(2, 3, 4, 5), (2, 2, 4, 5)]),
    ('type: "Concat" concat_param { axis: 2 }', [(2, 3, 4, 5), (2, 3, 1, 5), (2, 3, 2, 5)]),
    ('type: "Concat" concat_param { axis: -1 }', [(2, 3, 4, 5), (2, 3, 4, 2)]),
])
def test_concat_matches_opencv(text, shapes):
    arrays = [randn(s, seed=i) for i, s in enumerate(shapes)]
    expected = opencv_layer(text, {f"x{i}": a for i, a in enumerate(arrays)})[0]
    _, _, _, (y,) = forward(text, arrays)
    assert y.shape == expected.shape
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("axis", [0, 1, 2, 3, -2])
def test_concat_gradient(axis):
    shapes = [[2, 3, 2, 3] for _ in range(3)]
    for k, extra in enumerate((0, 1, 2)):
        shapes[k][axis] += extra
    arrays = [randn(s, seed=10 + k, dtype=np.float64) for k, s in enumerate(shapes)]
    layer = make_layer(f'type: "Concat" concat_param {{ axis: {axis} }}')
    bottom, top = setup_layer(layer, arrays)
    check_gradient(layer, bottom, top)


def test_concat_single_bottom_shares_data_and_diff():
    x = randn((2, 3), dtype=np.float64)
    layer, bottom, top, y = forward_view('type: "Concat"', [x], np.float64)
    np.testing.assert_array_equal(y, x)
    bottom[0].data[0, 0] = 42.0
    assert top[0].data[0, 0] == 42.0
    top[0].diff[...] = 3.0
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 3.0)


# ------------------------------------------------------------------ Slice
@pytest.mark.parametrize("text,shape,n", [
    ('type: "Slice" slice_param { axis: 1 slice_point: 1 slice_point: 4 }', (2, 6, 3, 4), 3),
    ('type: "Slice" slice_param { axis: 1 }', (2, 6, 3, 4), 3),
    ('type: "Slice" slice_param { axis: 2 slice_point: 2 }', (2, 3, 5, 4), 2),
])
def test_slice_matches_opencv(text, shape, n):
    x = randn(shape, seed=1)
    tops = [f"t{k}" for k in range(n)]
    expected = opencv_layer(text, {"x": x}, tops)
    _, _, _, out = forward(text, [x], n)
    assert len(out) == n
    for y, e in zip(out, expected):
        assert y.shape == e.shape
        np.testing.assert_array_equal(y, e)


@pytest.mark.parametrize("text,shape,n", [
    ('type: "Slice" slice_param { axis: 0 slice_point: 1 }', (3, 2, 2, 3), 2),
    ('type: "Slice" slice_param { axis: 1 slice_point: 1 slice_point: 3 }', (2, 4, 2, 3), 3),
    ('type: "Slice" slice_param { axis: 2 }', (2, 2, 4, 3), 2),
    ('type: "Slice" slice_param { axis: -1 slice_point: 2 }', (2, 2, 2, 3), 2),
])
def test_slice_gradient(text, shape, n):
    layer = make_layer(text)
    bottom, top = setup_layer(layer, [randn(shape, seed=2, dtype=np.float64)], n)
    check_gradient(layer, bottom, top)


def test_slice_by_hand_with_equal_parts_and_points():
    x = np.arange(12, dtype=np.float32).reshape(1, 12)
    _, _, _, out = forward('type: "Slice" slice_param { axis: 1 slice_point: 2 slice_point: 7 }',
                           [x], 3)
    assert [o.tolist() for o in out] == [[[0, 1]], [[2, 3, 4, 5, 6]], [[7, 8, 9, 10, 11]]]
    _, _, _, out = forward('type: "Slice" slice_param { axis: -1 }', [x], 4)
    assert [o.tolist() for o in out] == [[[0, 1, 2]], [[3, 4, 5]], [[6, 7, 8]], [[9, 10, 11]]]


def test_deprecated_concat_dim_and_slice_dim():
    # OpenCV's importer ignores the deprecated fields (it uses axis 1), so these are
    # checked against numpy's concatenate / basic slicing instead.
    a, b = randn((2, 3, 4, 1), seed=30), randn((2, 3, 4, 2), seed=31)
    _, _, _, (y,) = forward('type: "Concat" concat_param { concat_dim: 3 }', [a, b])
    np.testing.assert_array_equal(y, np.concatenate([a, b], axis=3))
    x = randn((2, 3, 2, 4), seed=32)
    _, _, _, out = forward('type: "Slice" slice_param { slice_dim: 3 slice_point: 1 '
                           'slice_point: 2 }', [x], 3)
    for y, e in zip(out, (x[..., :1], x[..., 1:2], x[..., 2:])):
        np.testing.assert_array_equal(y, e)


# ------------------------------------------------------------------ Split
def test_split_tops_share_bottom_data():
    x = randn((2, 3, 4), seed=3)
    layer = make_layer('type: "Split"', TEST, np.float32)
    bottom, top = setup_layer(layer, [x], 3, np.float32)
    layer.forward(bottom, top)
    for t in top:
        np.testing.assert_array_equal(t.data, x)
        assert np.shares_memory(t.data, bottom[0].data)
    bottom[0].data[0, 0, 0] = 99.0
    assert all(t.data[0, 0, 0] == 99.0 for t in top)


def test_split_matches_opencv():
    x = randn((2, 3, 4, 5), seed=4)
    expected = opencv_layer('type: "Split"', {"x": x}, ("a", "b"))
    layer = make_layer('type: "Split"', TEST, np.float32)
    bottom, top = setup_layer(layer, [x], 2, np.float32)
    layer.forward(bottom, top)
    for t, e in zip(top, expected):
        np.testing.assert_array_equal(t.data, e)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_split_gradient_sums_top_diffs(n):
    layer = make_layer('type: "Split"')
    bottom, top = setup_layer(layer, [randn((2, 3, 2), seed=5, dtype=np.float64)], n)
    check_gradient(layer, bottom, top)
    diffs = [randn((2, 3, 2), seed=20 + k, dtype=np.float64) for k in range(n)]
    for t, d in zip(top, diffs):
        t.diff[...] = d
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, np.sum(diffs, axis=0), rtol=1e-15)


# ------------------------------------------------------------------ Flatten / Reshape
@pytest.mark.parametrize("text,shape", [
    ('type: "Flatten"', (2, 3, 4, 5)),
    ('type: "Flatten" flatten_param { axis: 2 }', (2, 3, 4, 5)),
    ('type: "Flatten" flatten_param { axis: 1 end_axis: 2 }', (2, 3, 4, 5)),
    ('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }', (2, 3, 4, 5)),
    ('type: "Reshape" reshape_param { shape { dim: 0 dim: 4 dim: 3 dim: 5 } }', (2, 3, 4, 5)),
    ('type: "Reshape" reshape_param { shape { dim: 6 dim: -1 dim: 5 } }', (2, 3, 4, 5)),
])
def test_view_layers_match_opencv(text, shape):
    x = randn(shape, seed=6)
    expected = opencv_layer(text, {"x": x})[0]
    _, _, _, y = forward_view(text, [x])
    assert y.shape == expected.shape
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("text,shape,expected", [
    ('type: "Flatten"', (2, 3, 4, 5), (2, 60)),
    ('type: "Flatten" flatten_param { axis: 0 }', (2, 3, 4, 5), (120,)),
    ('type: "Flatten" flatten_param { axis: -3 end_axis: -2 }', (2, 3, 4, 5), (2, 12, 5)),
    ('type: "Flatten" flatten_param { axis: 2 end_axis: 2 }', (2, 3, 4, 5), (2, 3, 4, 5)),
    # end_axis = axis - 1 merges no axes: Caffe's count(axis, axis) = 1 is inserted.
    ('type: "Flatten" flatten_param { axis: 3 end_axis: 2 }', (2, 3, 4, 5), (2, 3, 4, 1, 5)),
    ('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }', (2, 3, 4, 5), (2, 60)),
    ('type: "Reshape" reshape_param { shape { dim: -1 } }', (2, 3, 4, 5), (120,)),
    ('type: "Reshape" reshape_param { shape { dim: 2 dim: 2 } axis: 2 num_axes: 1 }',
     (2, 3, 4, 5), (2, 3, 2, 2, 5)),
    ('type: "Reshape" reshape_param { shape { dim: 1 } axis: 0 num_axes: 0 }',
     (2, 3), (1, 2, 3)),
    ('type: "Reshape" reshape_param { shape { dim: 1 dim: 1 } axis: -1 num_axes: 0 }',
     (2, 3), (2, 3, 1, 1)),
    ('type: "Reshape" reshape_param { shape { dim: 0 dim: 0 dim: -1 } axis: 1 }',
     (2, 3, 4, 5), (2, 3, 4, 5)),
    ('type: "Reshape" reshape_param { shape { dim: -1 dim: 10 } axis: 1 }',
     (2, 3, 4, 5), (2, 6, 10)),
])
def test_view_layer_shapes_by_hand(text, shape, expected):
    x = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    _, _, _, y = forward_view(text, [x], np.float64)
    assert y.shape == expected
    np.testing.assert_array_equal(y.ravel(), x.ravel())


@pytest.mark.parametrize("text", [
    'type: "Flatten"',
    'type: "Reshape" reshape_param { shape { dim: -1 dim: 2 } }',
])
def test_view_layers_share_data_and_diff(text):
    # Caffe's Flatten/Reshape tops share the bottom's data and diff: no copies. The
    # shared diff is why check_gradient (which zeroes bottom diffs after writing top
    # diffs) cannot be used here; the gradient check below does the same by hand.
    x = randn((2, 3, 2), seed=7, dtype=np.float64)
    layer, bottom, top, y = forward_view(text, [x], np.float64)
    assert np.shares_memory(top[0].data, bottom[0].data)
    assert np.shares_memory(top[0].diff, bottom[0].diff)
    # Objective 0.5 * sum(top^2): analytic gradient via backward, numeric by +-step.
    top[0].diff[...] = top[0].data
    layer.backward(top, [True], bottom)
    analytic = bottom[0].diff.copy()
    numeric = np.empty_like(x)
    flat = bottom[0].data.reshape(-1)
    for i in range(flat.size):
        v = flat[i]
        losses = []
        for s in (1e-3, -1e-3):
            flat[i] = v + s
            layer.reshape(bottom, top)
            layer.forward(bottom, top)
            losses.append(0.5 * np.sum(top[0].data ** 2))
        flat[i] = v
        numeric.reshape(-1)[i] = (losses[0] - losses[1]) / 2e-3
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


def test_view_layer_backward_copies_when_diff_is_not_shared():
    x = randn((2, 3, 2), seed=8, dtype=np.float64)
    layer, bottom, top, _ = forward_view('type: "Flatten"', [x], np.float64)
    top[0].set_diff_array(np.ones(top[0].shape) * 5.0)    # someone replaced the top's diff
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 5.0)


# ------------------------------------------------------------------ Crop
@pytest.mark.parametrize("text,shapes", [
    ('type: "Crop"', [(2, 3, 6, 7), (2, 3, 4, 5)]),
    ('type: "Crop" crop_param { axis: 2 offset: 1 }', [(2, 3, 6, 7), (1, 1, 4, 5)]),
    ('type: "Crop" crop_param { axis: 2 offset: 2 offset: 1 }', [(2, 3, 6, 7), (1, 1, 4, 5)]),
    ('type: "Crop" crop_param { axis: 1 offset: 1 }', [(2, 4, 6, 7), (1, 2, 4, 5)]),
])
def test_crop_matches_opencv(text, shapes):
    src, ref = randn(shapes[0], seed=9), randn(shapes[1], seed=10)
    expected = opencv_layer(text, {"a": src, "b": ref})[0]
    _, _, _, (y,) = forward(text, [src, ref])
    assert y.shape == expected.shape
    np.testing.assert_array_equal(y, expected)


def test_crop_by_hand():
    src = np.arange(2 * 3 * 5 * 6, dtype=np.float32).reshape(2, 3, 5, 6)
    ref = np.zeros((2, 3, 2, 3), np.float32)
    _, _, _, (y,) = forward('type: "Crop" crop_param { axis: -2 offset: 3 offset: 2 }',
                            [src, ref])
    np.testing.assert_array_equal(y, src[:, :, 3:5, 2:5])
    _, _, _, (y,) = forward('type: "Crop" crop_param { axis: 0 offset: 0 offset: 1 '
                            'offset: 2 offset: 3 }', [src, np.zeros((1, 2, 3, 3))])
    np.testing.assert_array_equal(y, src[0:1, 1:3, 2:5, 3:6])


@pytest.mark.parametrize("text", [
    'type: "Crop" crop_param { offset: 1 }',
    'type: "Crop" crop_param { axis: 1 offset: 0 offset: 2 offset: 1 }',
])
def test_crop_gradient(text):
    src, ref = randn((2, 3, 5, 4), 11, np.float64), randn((2, 2, 3, 3), 12, np.float64)
    layer = make_layer(text)
    bottom, top = setup_layer(layer, [src, ref])
    check_gradient(layer, bottom, top, check_bottom=[0])


# ------------------------------------------------------------------ Tile
@pytest.mark.parametrize("axis,tiles", [(0, 2), (1, 3), (2, 2), (-1, 4)])
def test_tile_matches_numpy_tile(axis, tiles):
    # OpenCV's Caffe importer has no Tile; Caffe's Tile repeats the whole trailing block
    # bottom[..., axis:], which is numpy.tile with the repeat count on ``axis``.
    x = randn((2, 3, 2, 3), seed=13)
    _, _, _, (y,) = forward(f'type: "Tile" tile_param {{ axis: {axis} tiles: {tiles} }}', [x])
    reps = [1] * 4
    reps[axis] = tiles
    np.testing.assert_array_equal(y, np.tile(x, reps))


def test_tile_matches_torch_repeat():
    torch = pytest.importorskip("torch")
    x = randn((2, 3, 2, 3), seed=14)
    _, _, _, (y,) = forward('type: "Tile" tile_param { tiles: 3 }', [x])
    np.testing.assert_array_equal(y, torch.from_numpy(x).repeat(1, 3, 1, 1).numpy())


@pytest.mark.parametrize("axis,tiles", [(0, 2), (1, 3), (3, 2)])
def test_tile_gradient(axis, tiles):
    layer = make_layer(f'type: "Tile" tile_param {{ axis: {axis} tiles: {tiles} }}')
    bottom, top = setup_layer(layer, [randn((2, 2, 2, 3), seed=15, dtype=np.float64)])
    check_gradient(layer, bottom, top)


# ------------------------------------------------------------------ Silence
def test_silence_zeroes_bottom_diffs():
    layer = make_layer('type: "Silence"')
    bottom, top = setup_layer(layer, [np.ones((2, 3)), np.ones((4,))], num_top=0)
    layer.forward(bottom, top)
    for b in bottom:
        b.diff[...] = 7.0
    layer.backward(top, [True, False], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 0.0)
    np.testing.assert_array_equal(bottom[1].diff, 7.0)


# ------------------------------------------------------------------ errors
def test_concat_mismatch_names_both_shapes():
    layer = make_layer('type: "Concat" bottom: "conv1" bottom: "conv2"')
    with pytest.raises(LayerError) as info:
        setup_layer(layer, [np.ones((2, 3, 4, 5)), np.ones((2, 3, 5, 5))])
    message = str(info.value)
    assert "(2, 3, 4, 5)" in message and "(2, 3, 5, 5)" in message
    assert "'conv1'" in message and "'conv2'" in message and "under_test" in message


@pytest.mark.parametrize("text,arrays,num_top,message", [
    ('type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [(2, 3)] * 2, 1, "not both"),
    ('type: "Concat" concat_param { axis: 4 }', [(2, 3, 4, 5)] * 2, 1, "out of range"),
    ('type: "Concat"', [(2, 3, 4), (2, 3)], 1, "every axis except"),
    ('type: "Slice" slice_param { axis: 1 slice_point: 3 slice_point: 2 }', [(2, 6)], 3,
     "strictly increasing"),
    ('type: "Slice" slice_param { axis: 1 slice_point: 0 slice_point: 2 }', [(2, 6)], 3,
     "strictly increasing"),
    ('type: "Slice" slice_param { axis: 1 slice_point: 2 }', [(2, 6)], 3,
     "1 slice_point values for 3 tops"),
    ('type: "Slice" slice_param { axis: 1 slice_point: 7 }', [(2, 6)], 2, "beyond the size 6"),
    # Caffe builds it and aborts in the forward (the empty top's memory is never made).
    ('type: "Slice" slice_param { axis: 1 slice_point: 6 }', [(2, 6)], 2,
     "slice_point 6 is the size of axis 1 .* would be empty"),
    # Caffe: CHECK_LE(top.size(), bottom_slice_axis) when slice points are given.
    ('type: "Slice" slice_param { axis: 1 slice_point: 1 slice_point: 2 }', [(2, 2, 3)], 3,
     "3 tops are more than the size 2"),
    ('type: "Slice" slice_param { axis: 1 }', [(2, 7)], 3, "do not evenly divide"),
    ('type: "Slice" slice_param { axis: 1 slice_dim: 1 }', [(2, 6)], 2, "not both"),
    ('type: "Reshape" reshape_param { shape { dim: -1 dim: -1 } }', [(2, 6)], 1,
     "more than one -1"),
    ('type: "Reshape" reshape_param { shape { dim: 5 dim: -1 } }', [(2, 6)], 1,
     "cannot infer"),
    ('type: "Reshape" reshape_param { shape { dim: 5 dim: 2 } }', [(2, 6)], 1,
     "does not match the bottom count 12"),
    ('type: "Reshape" reshape_param { shape { dim: 0 dim: 0 dim: 0 } }', [(2, 6)], 1,
     "no axis 2 to copy"),
    ('type: "Reshape" reshape_param { shape { dim: -2 } }', [(2, 6)], 1, "invalid size -2"),
    ('type: "Flatten" flatten_param { axis: 2 end_axis: 0 }', [(2, 3, 4)], 1,
     "comes before axis"),
    ('type: "Crop" crop_param { offset: 2 }', [(2, 3, 5, 5), (2, 3, 4, 4)], 1,
     "out of bounds"),
    ('type: "Crop" crop_param { offset: 1 offset: 1 offset: 1 }', [(2, 3, 5, 5), (2, 3, 4, 4)],
     1, "3 offset values"),
    ('type: "Tile"', [(2, 3)], 1, "tiles"),
    ('type: "Tile" tile_param { tiles: 0 }', [(2, 3)], 1, "must be positive"),
])
def test_bad_params(text, arrays, num_top, message):
    layer = make_layer(text)
    with pytest.raises(LayerError, match=message) as info:
        setup_layer(layer, [np.ones(s) for s in arrays], num_top)
    assert "under_test" in str(info.value)


@pytest.mark.parametrize("layer_type", ["Split", "Flatten", "Reshape"])
def test_in_place_refused(layer_type):
    text = f'type: "{layer_type}"'
    if layer_type == "Reshape":
        text += " reshape_param { shape { dim: -1 } }"
    layer = make_layer(text)
    blob = Blob((2, 3), np.float64)
    with pytest.raises(LayerError, match="in-place"):
        layer.setup([blob], [blob])
        layer.reshape([blob], [blob])
