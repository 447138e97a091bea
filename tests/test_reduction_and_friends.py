"""Im2col, Reduction, BatchReindex, Filter and Embed: forwards against torch's unfold/fold
and hand-computed values or loops written from Caffe's definitions, gradient checks for
every backward, the edge cases Caffe defines (empty selections, repeated indices) and
errors that name the layer."""
import itertools

import numpy as np
import pytest

from caffelite.layer import LayerError
from layer_testing import check_gradient, make_layer, run_forward, setup_layer


def build(text, arrays, num_top=1, dtype=np.float64):
    layer = make_layer(text, dtype=dtype)
    bottom, top = setup_layer(layer, arrays, num_top, dtype=dtype)
    return layer, bottom, top


def normal(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# ------------------------------------------------------------------------ Im2col
def im2col_text(body):
    return f'type: "Im2col" convolution_param {{ {body} }}'


IM2COL_CASES = [
    # body, torch unfold arguments
    ("kernel_size: 3", dict(kernel_size=3)),
    ("kernel_size: 3 pad: 1 stride: 2", dict(kernel_size=3, padding=1, stride=2)),
    ("kernel_h: 2 kernel_w: 3 pad_h: 1 pad_w: 0 stride_h: 1 stride_w: 2",
     dict(kernel_size=(2, 3), padding=(1, 0), stride=(1, 2))),
    ("kernel_size: 3 dilation: 2 pad: 2", dict(kernel_size=3, dilation=2, padding=2)),
    ("kernel_size: 2 kernel_size: 3 stride: 3 pad: 2 pad: 1",
     dict(kernel_size=(2, 3), stride=3, padding=(2, 1))),
]


@pytest.mark.parametrize("body,args", IM2COL_CASES, ids=[c[0] for c in IM2COL_CASES])
@pytest.mark.parametrize("force_nd", [False, True])
def test_im2col_forward_and_col2im_match_torch(body, args, force_nd):
    torch = pytest.importorskip("torch")
    x = normal(2, 3, 7, 8)
    text = im2col_text(body + (" force_nd_im2col: true" if force_nd else ""))
    layer, bottom, top = build(text, [x])
    out = run_forward(layer, bottom, top)[0]
    cols = torch.nn.functional.unfold(torch.from_numpy(x), **args)
    assert out.shape[:2] == cols.shape[:2]
    np.testing.assert_array_equal(out.reshape(cols.shape), cols.numpy())
    g = normal(*out.shape, seed=1)
    top[0].diff[...] = g
    bottom[0].diff[...] = np.nan
    layer.backward(top, [True], bottom)
    folded = torch.nn.functional.fold(torch.from_numpy(g.reshape(cols.shape)),
                                      output_size=x.shape[2:], **args)
    np.testing.assert_allclose(bottom[0].diff, folded.numpy(), rtol=1e-12, atol=1e-12)


def im2col_loops(x, kernel, pad, stride, dilation):
    """Caffe's im2col_nd, one column entry at a time: x (C, *spatial)."""
    spatial = x.shape[1:]
    out = [(i + 2 * p - (d * (k - 1) + 1)) // s + 1
           for i, k, p, s, d in zip(spatial, kernel, pad, stride, dilation)]
    col = np.zeros((x.shape[0],) + tuple(kernel) + tuple(out))
    for c in range(x.shape[0]):
        for tap in itertools.product(*map(range, kernel)):
            for pos in itertools.product(*map(range, out)):
                src = [o * s - p + t * d for o, s, p, t, d in
                       zip(pos, stride, pad, tap, dilation)]
                if all(0 <= v < n for v, n in zip(src, spatial)):
                    col[(c,) + tap + pos] = x[(c,) + tuple(src)]
    return col


def test_im2col_3d_and_channel_axis_2():
    # (2, 3) outer axes before the channel axis 2; three spatial axes.
    x = normal(2, 3, 2, 4, 5, 3)
    body = ("axis: 2 kernel_size: 2 kernel_size: 3 kernel_size: 2 pad: 1 pad: 0 pad: 1 "
            "stride: 2 stride: 1 stride: 1 dilation: 1 dilation: 1 dilation: 2")
    layer, bottom, top = build(im2col_text(body), [x])
    out = run_forward(layer, bottom, top)[0]
    assert out.shape == (2, 3, 2 * 12, 3, 3, 3)
    for a, b in itertools.product(range(2), range(3)):
        ref = im2col_loops(x[a, b], (2, 3, 2), (1, 0, 1), (2, 1, 1), (1, 1, 2))
        np.testing.assert_array_equal(out[a, b], ref.reshape(24, 3, 3, 3))
    check_gradient(layer, bottom, top)


@pytest.mark.parametrize("body", [c[0] for c in IM2COL_CASES])
def test_im2col_gradient(body):
    layer, bottom, top = build(im2col_text(body), [normal(2, 2, 5, 6)])
    check_gradient(layer, bottom, top)


def test_im2col_float32_and_c_division_output_size():
    # (2 + 0 - 3) / 2 + 1 = 1 in C (truncation): one row of windows reading zeros below.
    x = normal(1, 1, 2, 4).astype(np.float32)
    layer, bottom, top = build(im2col_text("kernel_size: 3 stride: 2"), [x], dtype=np.float32)
    out = run_forward(layer, bottom, top)[0]
    assert out.shape == (1, 9, 1, 1) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0, :, 0, 0], np.r_[x[0, 0, :, :3].ravel(), 0, 0, 0])


def test_im2col_errors():
    with pytest.raises(LayerError, match="'under_test' \\(Im2col\\).*filter dimensions"):
        build(im2col_text("kernel_size: 0"), [normal(1, 1, 4, 4)])
    with pytest.raises(LayerError, match="Im2col.*kernel_h & kernel_w.*2-D"):
        build(im2col_text("kernel_h: 2 kernel_w: 2"), [normal(1, 1, 4, 4, 4)])
    with pytest.raises(LayerError, match="Im2col.*empty"):
        build(im2col_text("kernel_size: 5 stride: 3"), [normal(1, 1, 2, 8)])
    with pytest.raises(LayerError, match="Im2col.*spatial axis"):
        build(im2col_text("kernel_size: 1 axis: 1"), [normal(2, 3)])


# ------------------------------------------------------------------------ Reduction
def reduction(op, axis=0, coeff=None, dtype=np.float64):
    extra = f" coeff: {coeff}" if coeff is not None else ""
    return make_layer(f'type: "Reduction" reduction_param {{ operation: {op} axis: {axis}'
                      f'{extra} }}', dtype=dtype)


def test_reduction_values_by_hand():
    x = np.array([[1.0, -2.0, 3.0], [-4.0, 0.0, 0.5]])
    expected = {"SUM": [2.0, -3.5], "ASUM": [6.0, 4.5], "SUMSQ": [14.0, 16.25],
                "MEAN": [2 / 3, -3.5 / 3]}
    for op, values in expected.items():
        layer = reduction(op, axis=1)
        bottom, top = setup_layer(layer, [x])
        np.testing.assert_allclose(run_forward(layer, bottom, top)[0], values, rtol=1e-15)
        layer = reduction(op, axis=0, coeff=-0.5)
        bottom, top = setup_layer(layer, [x])
        out = run_forward(layer, bottom, top)[0]
        assert out.shape == ()          # axis 0: a scalar top
        total = {"SUM": -1.5, "ASUM": 10.5, "SUMSQ": 30.25, "MEAN": -1.5 / 6}[op]
        np.testing.assert_allclose(out, -0.5 * total, rtol=1e-15)


def test_reduction_keeps_the_axes_before_axis():
    x = normal(2, 3, 4, 5)
    layer = reduction("SUM", axis=-2)
    bottom, top = setup_layer(layer, [x])
    out = run_forward(layer, bottom, top)[0]
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out, x.sum(axis=(2, 3)), rtol=1e-12)


def test_reduction_mean_coeff_is_divided_in_float32():
    # coeff / dim in float32, then one float32 product per top element.
    x = np.arange(1, 8, dtype=np.float32).reshape(1, 7)
    layer = reduction("MEAN", axis=1, coeff=0.3, dtype=np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    out = run_forward(layer, bottom, top)[0]
    factor = np.float32(0.3) / np.float32(7)
    assert out[0] == np.float32(28) * factor


def test_reduction_backward_by_hand():
    x = np.array([[1.0, -2.0, 0.0], [-4.0, 0.0, 0.5]])
    g = np.array([2.0, -1.0])
    expected = {"SUM": [[2] * 3, [-1] * 3], "MEAN": [[2 / 3] * 3, [-1 / 3] * 3],
                "ASUM": [[2, -2, 0], [1, 0, -1]], "SUMSQ": [[4, -8, 0], [8, 0, -1]]}
    for op, values in expected.items():
        layer = reduction(op, axis=1, coeff=1.5)
        bottom, top = setup_layer(layer, [x])
        run_forward(layer, bottom, top)
        top[0].diff[...] = g
        bottom[0].diff[...] = np.nan
        layer.backward(top, [True], bottom)
        np.testing.assert_allclose(bottom[0].diff, 1.5 * np.array(values), rtol=1e-15)


@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis", [0, 1, 3])
def test_reduction_gradient(op, axis):
    x = normal(2, 3, 2, 3, seed=axis)
    x = np.where(np.abs(x) < 0.05, 0.1, x)      # away from the kink of |x|
    layer = reduction(op, axis=axis, coeff=0.7)
    bottom, top = setup_layer(layer, [x])
    check_gradient(layer, bottom, top)


def test_reduction_errors():
    with pytest.raises(LayerError, match="'under_test' \\(Reduction\\).*axis 2 is out"):
        setup_layer(reduction("SUM", axis=2), [normal(2, 3)])
    with pytest.raises(LayerError, match="Reduction.*scalar"):
        setup_layer(reduction("SUM"), [np.array(1.0)])


# ------------------------------------------------------------------------ BatchReindex
def reindex(x, index):
    return build('type: "BatchReindex"', [x, index])


def test_batch_reindex_forward_and_repeated_indices_backward():
    x = normal(4, 2, 3)
    index = np.array([3.0, 0.0, 3.0, 1.0, 3.0])
    layer, bottom, top = reindex(x, index)
    out = run_forward(layer, bottom, top)[0]
    np.testing.assert_array_equal(out, x[[3, 0, 3, 1, 3]])
    g = normal(5, 2, 3, seed=1)
    top[0].diff[...] = g
    bottom[0].diff[...] = np.nan
    layer.backward(top, [True, False], bottom)
    expected = np.zeros_like(x)
    for i, k in enumerate([3, 0, 3, 1, 3]):       # Caffe's loop: in top order
        expected[k] += g[i]
    np.testing.assert_array_equal(bottom[0].diff, expected)


def test_batch_reindex_truncates_fractional_indices_and_allows_none():
    x = normal(3, 2)
    layer, bottom, top = reindex(x, np.array([2.9, 0.5]))
    np.testing.assert_array_equal(run_forward(layer, bottom, top)[0], x[[2, 0]])
    layer, bottom, top = reindex(x, np.zeros(0))
    assert run_forward(layer, bottom, top)[0].shape == (0, 2)
    bottom[0].diff[...] = np.nan
    layer.backward(top, [True, False], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 0)     # Caffe's caffe_set(0) still runs
    assert not np.signbit(bottom[0].diff).any()


def test_batch_reindex_gradient():
    layer, bottom, top = reindex(normal(3, 2, 2), np.array([2.0, 2.0, 0.0, 1.0]))
    check_gradient(layer, bottom, top, check_bottom=[0])


def test_batch_reindex_errors():
    for bad in (3.0, -0.5, np.nan):
        layer, bottom, top = reindex(normal(3, 2), np.array([0.0, bad]))
        with pytest.raises(LayerError, match="'under_test' \\(BatchReindex\\).*index .* "
                                             "position 1.*\\[0, 3\\)"):
            layer.forward(bottom, top)
    layer, bottom, top = reindex(normal(3, 2), np.array([0.0]))
    with pytest.raises(LayerError, match="BatchReindex.*backpropagate to bottom 1"):
        layer.backward(top, [True, True], bottom)
    with pytest.raises(LayerError, match="BatchReindex.*exactly 1 axis"):
        reindex(normal(3, 2), np.zeros((2, 1)))


# ------------------------------------------------------------------------ Filter
def test_filter_keeps_selected_items_of_every_bottom():
    a, b = normal(5, 2, 3), normal(5, 4, seed=1)
    selector = np.array([0.0, 1.0, 0.0, -2.0, np.nan]).reshape(5, 1, 1)
    layer, bottom, top = build('type: "Filter"', [a, b, selector], num_top=2)
    # Caffe's first reshape (at setup) keeps the whole batch.
    assert top[0].shape == (5, 2, 3) and top[1].shape == (5, 4)
    out_a, out_b = run_forward(layer, bottom, top)
    np.testing.assert_array_equal(out_a, a[[1, 3, 4]])      # NaN is non-zero
    np.testing.assert_array_equal(out_b, b[[1, 3, 4]])
    ga, gb = normal(3, 2, 3, seed=2), normal(3, 4, seed=3)
    top[0].diff[...], top[1].diff[...] = ga, gb
    for blob in bottom:
        blob.diff[...] = np.nan
    layer.backward(top, [True, True, False], bottom)
    expected = np.zeros_like(a)
    expected[[1, 3, 4]] = ga
    np.testing.assert_array_equal(bottom[0].diff, expected)
    expected = np.zeros_like(b)
    expected[[1, 3, 4]] = gb
    np.testing.assert_array_equal(bottom[1].diff, expected)


def test_filter_with_nothing_selected_gives_empty_tops_and_zero_gradients():
    a = normal(3, 2)
    layer, bottom, top = build('type: "Filter"', [a, np.zeros(3)])
    assert run_forward(layer, bottom, top)[0].shape == (0, 2)
    bottom[0].diff[...] = np.nan
    layer.backward(top, [True, False], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 0)


def test_filter_gradient():
    layer, bottom, top = build('type: "Filter"', [normal(4, 3), np.array([1.0, 0, 1, 1])])
    check_gradient(layer, bottom, top, check_bottom=[0])


def test_filter_errors():
    with pytest.raises(LayerError, match="'under_test' \\(Filter\\).*one top per"):
        build('type: "Filter"', [normal(3, 2), np.ones(3)], num_top=2)
    with pytest.raises(LayerError, match="Filter.*selector.*N x 1"):
        build('type: "Filter"', [normal(3, 2), np.ones((3, 2))])
    with pytest.raises(LayerError, match="Filter.*bottom 0.*first dimension 3"):
        build('type: "Filter"', [normal(4, 2), np.ones(3)])
    layer, bottom, top = build('type: "Filter"', [normal(3, 2), np.ones(3)])
    with pytest.raises(LayerError, match="Filter.*selector"):
        layer.backward(top, [True, True], bottom)


# ------------------------------------------------------------------------ Embed
def embed(index, body="num_output: 3 input_dim: 4", dtype=np.float64):
    text = (f'type: "Embed" embed_param {{ {body} weight_filler {{ type: "gaussian" }} '
            f'bias_filler {{ type: "gaussian" }} }}')
    return build(text, [index], dtype=dtype)


def test_embed_forward_looks_up_rows_and_adds_the_bias():
    index = np.array([[3.0, 0.0], [3.0, 1.0]])
    layer, bottom, top = embed(index)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    assert w.shape == (4, 3) and b.shape == (3,)
    out = run_forward(layer, bottom, top)[0]
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out, w[[[3, 0], [3, 1]]] + b)
    layer, bottom, top = embed(index, "num_output: 3 input_dim: 4 bias_term: false")
    assert len(layer.blobs) == 1
    np.testing.assert_array_equal(run_forward(layer, bottom, top)[0],
                                  layer.blobs[0].data[[[3, 0], [3, 1]]])


def test_embed_default_fillers_are_zero():
    layer, bottom, top = build('type: "Embed" embed_param { num_output: 2 input_dim: 3 }',
                               [np.zeros(2)])
    np.testing.assert_array_equal(layer.blobs[0].data, 0)
    np.testing.assert_array_equal(layer.blobs[1].data, 0)


def test_embed_backward_accumulates_repeated_rows_in_order():
    index = np.array([2.0, 0.0, 2.0, 2.0]).astype(np.float32)
    layer, bottom, top = embed(index, dtype=np.float32)
    run_forward(layer, bottom, top)
    g = (normal(4, 3, seed=5) * [1, 1e8, 1e-8]).astype(np.float32)
    top[0].diff[...] = g
    start = normal(4, 3, seed=6).astype(np.float32)
    layer.blobs[0].diff[...] = start
    layer.blobs[1].diff[...] = 1
    layer.backward(top, [False], bottom)
    expected = start.copy()
    for n, k in enumerate([2, 0, 2, 2]):        # Caffe's axpy loop, float32
        expected[k] += g[n]
    np.testing.assert_array_equal(layer.blobs[0].diff, expected)
    np.testing.assert_allclose(layer.blobs[1].diff, 1 + g.astype(np.float64).sum(axis=0),
                               rtol=1e-6)


def test_embed_gradient():
    layer, bottom, top = embed(np.array([[1.0, 3.0, 1.0]]))
    check_gradient(layer, bottom, top, check_bottom=[])


def test_embed_truncates_indices_toward_zero():
    # embed_layer.cpp: index = static_cast<int>(bottom_data[n]) (DCHECKs only), so 1.5
    # reads row 1, -0.5 row 0 and 3.99 row 3, forward and backward.
    values = np.array([1.5, -0.5, 3.99, -0.99, 2.0], np.float32)
    rows = [1, 0, 3, 0, 2]
    layer, bottom, top = embed(values, dtype=np.float32)
    out = run_forward(layer, bottom, top)[0]
    np.testing.assert_array_equal(out, layer.blobs[0].data[rows] + layer.blobs[1].data)
    g = normal(5, 3, seed=7).astype(np.float32)
    top[0].diff[...] = g
    start = normal(4, 3, seed=8).astype(np.float32)
    layer.blobs[0].diff[...] = start
    layer.backward(top, [False], bottom)
    expected = start.copy()
    for n, k in enumerate(rows):
        expected[k] += g[n]
    np.testing.assert_array_equal(layer.blobs[0].diff, expected)


def test_embed_errors():
    for bad in (4.0, -1.0, 4.5, -1.5, np.nan, np.inf):
        layer, bottom, top = embed(np.array([0.0, bad]))
        with pytest.raises(LayerError, match="'under_test' \\(Embed\\).*position 1.*"
                                             "truncated toward zero, is not in "
                                             "\\[0, input_dim 4\\)"):
            layer.forward(bottom, top)
    layer, bottom, top = embed(np.array([0.0]))
    with pytest.raises(LayerError, match="Embed.*backpropagate to the bottom"):
        layer.backward(top, [True], bottom)
    with pytest.raises(LayerError, match="Embed.*num_output"):
        embed(np.zeros(1), "input_dim: 4")
    with pytest.raises(LayerError, match="Embed.*input_dim"):
        embed(np.zeros(1), "num_output: 4")
