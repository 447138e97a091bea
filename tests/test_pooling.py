"""Pooling: OpenCV's Caffe importer as forward oracle, a literal transcription of Caffe's
pooling loops for masks/ties/padding, hand-derived sizes, gradient checks, bad params."""
import numpy as np
import pytest

from caffelite.layer import LayerError
from layer_testing import (TEST, TRAIN, check_gradient, make_layer, opencv_forward,
                           run_forward, setup_layer)


def pool_text(body):
    return f'type: "Pooling" pooling_param {{ {body} }}'


def ours(body, x, num_top=1, dtype=np.float32):
    layer = make_layer(pool_text(body), dtype=dtype)
    bottom, top = setup_layer(layer, [x], num_top, dtype=dtype)
    return run_forward(layer, bottom, top)


def opencv(body, x):
    net = ('input: "data"\n' + "".join(f"input_dim: {d}\n" for d in x.shape) +
           f'layer {{ name: "out" bottom: "data" top: "out" {pool_text(body)} }}\n')
    return opencv_forward(net, [], {"data": x}, ["out"])[0]


def reference(x, kh, kw, sh, sw, ph, pw, method):
    """Caffe's CPU loops, written out per output cell (tiny inputs only)."""
    n, c, h, w = x.shape

    def size(n_in, k, s, p):
        out = int(np.ceil((n_in + 2 * p - k) / s)) + 1
        if (ph or pw) and (out - 1) * s >= n_in + p:
            out -= 1
        return out
    oh, ow = size(h, kh, sh, ph), size(w, kw, sw, pw)
    top = np.zeros((n, c, oh, ow))
    mask = np.full((n, c, oh, ow), -1.0)
    for a in range(n):
        for b in range(c):
            for i in range(oh):
                for j in range(ow):
                    hs, ws = i * sh - ph, j * sw - pw
                    if method == "MAX":
                        best = -np.finfo(np.float32).max
                        for r in range(max(hs, 0), min(hs + kh, h)):
                            for q in range(max(ws, 0), min(ws + kw, w)):
                                if x[a, b, r, q] > best:
                                    best, mask[a, b, i, j] = x[a, b, r, q], r * w + q
                        top[a, b, i, j] = best
                    else:
                        he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
                        area = (he - hs) * (we - ws)
                        total = sum(x[a, b, r, q] for r in range(max(hs, 0), min(he, h))
                                    for q in range(max(ws, 0), min(we, w)))
                        top[a, b, i, j] = total / area
    return top, mask


def distinct(shape, seed=0):
    """Values 0.1 apart in random order: no ties, and a 1e-3 nudge never moves a max."""
    rng = np.random.default_rng(seed)
    return (rng.permutation(int(np.prod(shape))) * 0.1 - 3.0).reshape(shape)


OPENCV_CASES = [
    ("MAX", "kernel_size: 3 stride: 2", (32, 32)),            # ceil: 32 -> 16
    ("AVE", "kernel_size: 3 stride: 2", (32, 32)),
    ("MAX", "kernel_size: 3 stride: 2 pad: 1", (33, 33)),     # VGG pool1-3 shape rule
    ("AVE", "kernel_size: 3 stride: 2 pad: 1", (33, 33)),
    ("MAX", "kernel_size: 3 stride: 1 pad: 1", (12, 11)),     # VGG pool4/5 keep size
    ("AVE", "kernel_size: 3 stride: 1 pad: 1", (12, 11)),
    ("MAX", "kernel_size: 2 stride: 2 pad: 1", (30, 30)),     # V1 DeepLab pools
    ("AVE", "kernel_size: 3 stride: 3 pad: 2", (10, 10)),     # last window clipped
    ("AVE", "kernel_size: 5 stride: 3 pad: 2", (11, 12)),
    ("MAX", "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0", (9, 10)),
    ("AVE", "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0", (9, 10)),
    ("MAX", "global_pooling: true", (9, 10)),
    ("AVE", "global_pooling: true", (9, 10)),
    ("MAX", "global_pooling: true", (20, 19)),               # whole-plane path (>256 taps)
    ("AVE", "global_pooling: true", (20, 19)),
]


@pytest.mark.parametrize("pool,body,hw", OPENCV_CASES)
def test_forward_matches_opencv(pool, body, hw):
    x = np.random.default_rng(1).standard_normal((2, 3) + hw).astype(np.float32) * 4
    got = ours(f"pool: {pool} {body}", x)[0]
    want = opencv(f"pool: {pool} {body}", x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(x).max())


def test_output_sizes_from_spec():
    # DeepLab VGG pools {k3 s2 p1}: 321 -> 161 -> 81 -> 41 ; V1 {k2 s2 p1}: 306 -> 154 -> 78 -> 40
    for sizes, body in [((321, 161, 81, 41), "kernel_size: 3 stride: 2 pad: 1"),
                        ((513, 257, 129, 65), "kernel_size: 3 stride: 2 pad: 1"),
                        ((306, 154, 78, 40), "kernel_size: 2 stride: 2 pad: 1")]:
        for s_in, s_out in zip(sizes, sizes[1:]):
            layer = make_layer(pool_text(body))
            _, top = setup_layer(layer, [np.zeros((1, 1, s_in, s_in))])
            assert top[0].shape == (1, 1, s_out, s_out)
    # the "last window must start inside image + pad" clip: 4 = ceil((5+2-2)/2)+1 = 4,
    # (4-1)*2 = 6 >= 5+1 -> 3
    layer = make_layer(pool_text("kernel_size: 2 stride: 2 pad: 1"))
    _, top = setup_layer(layer, [np.zeros((1, 1, 5, 5))])
    assert top[0].shape == (1, 1, 3, 3)
    # the clip applies to both axes when either pad is set (Caffe: if (pad_h_ || pad_w_)):
    # h: ceil((7-2)/4)+1 = 3, (3-1)*4 = 8 >= 7+0 -> 2; w: ceil((7+2-3)/2)+1 = 4, 6 < 8
    layer = make_layer(pool_text("kernel_h: 2 kernel_w: 3 stride_h: 4 stride_w: 2 "
                                 "pad_h: 0 pad_w: 1"))
    _, top = setup_layer(layer, [np.zeros((1, 1, 7, 7))])
    assert top[0].shape == (1, 1, 2, 4)
    # round_mode FLOOR (BVLC master): floor((32-3)/2)+1 = 15
    layer = make_layer(pool_text("kernel_size: 3 stride: 2 round_mode: FLOOR"))
    _, top = setup_layer(layer, [np.zeros((1, 1, 32, 32))])
    assert top[0].shape == (1, 1, 15, 15)


def test_ave_divisor_counts_padding_but_not_overhang():
    # 6 wide, k3 s2 p1 -> 4 windows: [-1,2) [1,4) [3,6) [5,8); clipped to [-1,7) the
    # areas are 3, 3, 3, 2 while the in-image cells are 2, 3, 3, 1.
    got = ours("pool: AVE kernel_size: 3 stride: 2 pad: 1", np.ones((1, 1, 6, 6), np.float32))[0]
    per_axis = np.array([2 / 3, 1, 1, 1 / 2])
    np.testing.assert_allclose(got[0, 0], np.outer(per_axis, per_axis), rtol=1e-6)


def test_max_mask_ties_padding_and_nan_follow_caffe():
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 3, size=(2, 2, 7, 8)).astype(np.float32)   # many ties
    x[0, 0] = -5.0                                                   # padding never wins
    x[0, 1, 2, 3] = np.nan                                           # NaN never wins
    x[1, 0, :3, :3] = -np.inf                                        # -inf never wins
    for body in ["kernel_size: 3 stride: 2 pad: 1", "kernel_size: 2 stride: 1 pad: 1",
                 "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 2 pad_w: 1",
                 "global_pooling: true"]:
        p = dict(kernel_h=3, kernel_w=3, stride_h=2, stride_w=2, pad_h=1, pad_w=1)
        if "kernel_size: 2" in body:
            p = dict(kernel_h=2, kernel_w=2, stride_h=1, stride_w=1, pad_h=1, pad_w=1)
        elif "kernel_h" in body:
            p = dict(kernel_h=3, kernel_w=2, stride_h=2, stride_w=3, pad_h=2, pad_w=1)
        elif "global" in body:
            p = dict(kernel_h=7, kernel_w=8, stride_h=1, stride_w=1, pad_h=0, pad_w=0)
        top, mask = ours(f"pool: MAX {body}", x, num_top=2)
        want_top, want_mask = reference(x.astype(np.float64), p["kernel_h"], p["kernel_w"],
                                        p["stride_h"], p["stride_w"], p["pad_h"], p["pad_w"],
                                        "MAX")
        np.testing.assert_array_equal(top, want_top.astype(np.float32))
        np.testing.assert_array_equal(mask, want_mask)


MAX_GEOMETRIES = [
    ("kernel_size: 3 stride: 2 pad: 1", (3, 3, 2, 2, 1, 1)),
    ("kernel_size: 3 stride: 1 pad: 1", (3, 3, 1, 1, 1, 1)),
    ("kernel_size: 2 stride: 2", (2, 2, 2, 2, 0, 0)),
    ("kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 2 pad_w: 1", (3, 2, 2, 3, 2, 1)),
]


def scattered_reference(mask, g, shape):
    """The bottom diff Caffe's MAX backward gives: each top diff added at its mask."""
    diff = np.zeros(shape)
    n, c, h, w = shape
    for (a, b, i, j), m in np.ndenumerate(mask):
        if m >= 0:
            diff[a, b, int(m) // w, int(m) % w] += g[a, b, i, j]
    return diff


def max_inputs(dtype):
    """Inputs for the MAX forward's fast path and its fall-backs: ties, -FLT_MAX itself,
    -inf, +0/-0 maxima, a NaN."""
    rng = np.random.default_rng(11)
    ties = rng.integers(-2, 3, size=(2, 3, 8, 10)).astype(dtype)
    ties[1, 2] = -np.finfo(np.float32).max
    ties[1, 2, 4:, :5] = -np.inf
    zeros = np.where(rng.random((2, 3, 8, 10)) < 0.5, -1.0, 0.0).astype(dtype)
    zeros[rng.random(zeros.shape) < 0.3] = -0.0            # +0 and -0 in zero windows
    negative_zero_free = np.abs(zeros) * -1 + 0.0           # -1 and +0 only
    nan = ties.copy()
    nan[0, 1, 3, 4] = np.nan
    return {"ties": ties, "zeros": zeros, "no -0": negative_zero_free, "nan": nan}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("body,geometry", MAX_GEOMETRIES)
@pytest.mark.parametrize("phase", [TEST, TRAIN])
def test_max_forward_and_backward_bit_exact_with_caffe_loops(phase, body, geometry, dtype):
    """Values (sign of zero included), masks and the gradient routing of every host path:
    one maximum per tap with the argmax found after (or only at backward in TEST), and
    Caffe's scan where a NaN or a -0 could make them differ."""
    for name, x in max_inputs(dtype).items():
        want_top, want_mask = reference(x.astype(np.float64), *geometry, "MAX")
        for num_top in (1, 2):
            layer = make_layer(pool_text(f"pool: MAX {body}"), phase=phase, dtype=dtype)
            bottom, top = setup_layer(layer, [x], num_top, dtype=dtype)
            got = run_forward(layer, bottom, top)
            np.testing.assert_array_equal(got[0], want_top.astype(dtype), err_msg=name)
            np.testing.assert_array_equal(np.signbit(got[0]), np.signbit(want_top),
                                          err_msg=name)
            if num_top == 2:
                np.testing.assert_array_equal(got[1], want_mask, err_msg=name)
            bottom[0].data[...] = 7     # the backward routes by what the forward saw
            g = np.random.default_rng(2).integers(1, 9, size=want_top.shape)
            top[0].diff[...] = g
            bottom[0].diff[...] = np.nan
            layer.backward(top, [True], bottom)
            np.testing.assert_array_equal(bottom[0].diff,
                                          scattered_reference(want_mask, g, x.shape),
                                          err_msg=name)


def test_all_minus_inf_window_gives_minus_flt_max_and_mask_minus_one():
    x = np.full((1, 1, 4, 4), -np.inf, np.float32)
    top, mask = ours("pool: MAX kernel_size: 2 stride: 2", x, num_top=2)
    assert np.all(top == -np.finfo(np.float32).max) and np.all(mask == -1)
    layer = make_layer(pool_text("pool: MAX kernel_size: 2 stride: 2"), dtype=np.float32)
    bottom, t = setup_layer(layer, [x], dtype=np.float32)
    run_forward(layer, bottom, t)
    t[0].diff[...] = 1
    bottom[0].diff[...] = np.nan
    layer.backward(t, [True], bottom)
    assert np.all(bottom[0].diff == 0)


def test_global_max_over_a_whole_plane_skips_nan_and_leaves_minus_flt_max_unwon():
    """Global MAX over 20 x 19 = 380 taps (more than the tap loop takes: one argmax per
    plane): as Caffe's loop, a NaN never wins (``>`` is false for it, even first in the
    plane) and a plane whose maximum is -FLT_MAX itself has no winner (mask -1, no
    gradient), as nothing is strictly above the -FLT_MAX the loop starts from."""
    flt_max = np.finfo(np.float32).max
    x = np.random.default_rng(12).standard_normal((2, 2, 20, 19)).astype(np.float32)
    x[0, 0, 0, 0] = np.nan
    x[0, 1] = -flt_max
    x[1, 0, :2] = -np.inf
    x[1, 0, 5, 7] = np.nan
    x[1, 1] = -np.inf
    x[1, 1, 3, 3] = -flt_max
    x[1, 1, 4, 4] = np.nan
    want_top, want_mask = reference(x.astype(np.float64), 20, 19, 1, 1, 0, 0, "MAX")
    assert want_mask[0, 0] >= 0 and want_mask[1, 0] >= 0 and want_mask[0, 1] == -1
    assert want_mask[1, 1] == -1 and np.all(want_top[:, 1] == -flt_max)
    for num_top in (1, 2):
        layer = make_layer(pool_text("pool: MAX global_pooling: true"), dtype=np.float32)
        bottom, top = setup_layer(layer, [x], num_top, dtype=np.float32)
        with np.errstate(invalid="ignore"):
            got = run_forward(layer, bottom, top)
        np.testing.assert_array_equal(got[0], want_top.astype(np.float32))
        if num_top == 2:
            np.testing.assert_array_equal(got[1], want_mask)
        g = np.random.default_rng(2).integers(1, 9, size=want_top.shape)
        top[0].diff[...] = g
        bottom[0].diff[...] = np.nan
        layer.backward(top, [True], bottom)
        np.testing.assert_array_equal(bottom[0].diff, scattered_reference(want_mask, g, x.shape))


def test_ave_matches_reference_loops():
    x = np.random.default_rng(4).standard_normal((1, 2, 9, 7))
    for kh, kw, sh, sw, ph, pw in [(3, 3, 2, 2, 1, 1), (2, 3, 3, 2, 1, 2), (4, 4, 3, 3, 0, 0)]:
        body = (f"pool: AVE kernel_h: {kh} kernel_w: {kw} stride_h: {sh} stride_w: {sw} "
                f"pad_h: {ph} pad_w: {pw}")
        got = ours(body, x, dtype=np.float64)[0]
        want, _ = reference(x, kh, kw, sh, sw, ph, pw, "AVE")
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_float32_in_float32_out_and_float64_kept():
    x = np.random.default_rng(5).standard_normal((1, 1, 5, 5))
    assert ours("pool: AVE kernel_size: 2", x.astype(np.float32))[0].dtype == np.float32
    layer = make_layer(pool_text("pool: MAX kernel_size: 2"), dtype=np.float64)
    _, top = setup_layer(layer, [x], 2)
    assert top[0].data.dtype == np.float64 and top[1].data.dtype == np.float64


GRAD_CASES = [
    "pool: MAX kernel_size: 3 stride: 2",                 # ceil overhang, no pad
    "pool: MAX kernel_size: 3 stride: 2 pad: 1",
    "pool: MAX kernel_size: 2 stride: 1 pad: 1",          # overlapping windows
    "pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0",
    "pool: MAX global_pooling: true",
    "pool: AVE kernel_size: 3 stride: 2",
    "pool: AVE kernel_size: 3 stride: 2 pad: 1",
    "pool: AVE kernel_size: 3 stride: 3 pad: 2",          # clipped last window
    "pool: AVE kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 2",
    "pool: AVE global_pooling: true",
]


@pytest.mark.parametrize("body", GRAD_CASES)
def test_gradient(body):
    x = distinct((2, 2, 7, 6))
    layer = make_layer(pool_text(body))
    bottom, top = setup_layer(layer, [x])
    check_gradient(layer, bottom, top, step=1e-3)


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_gradient_global_whole_plane_path(pool):
    x = distinct((1, 2, 17, 17), seed=7)                   # 289 taps
    layer = make_layer(pool_text(f"pool: {pool} global_pooling: true"))
    bottom, top = setup_layer(layer, [x])
    check_gradient(layer, bottom, top)


def test_gradient_with_mask_top():
    x = distinct((1, 2, 6, 7), seed=2)
    layer = make_layer(pool_text("pool: MAX kernel_size: 3 stride: 2 pad: 1"))
    bottom, top = setup_layer(layer, [x], 2)
    check_gradient(layer, bottom, top, top_id=0)


def test_reshape_follows_new_bottom_size():
    layer = make_layer(pool_text("pool: AVE global_pooling: true"))
    bottom, top = setup_layer(layer, [np.ones((1, 2, 4, 4))])
    bottom[0].reshape((1, 2, 6, 3))
    bottom[0].data[...] = 2.0
    out = run_forward(layer, bottom, top)[0]
    assert out.shape == (1, 2, 1, 1) and np.all(out == 2.0)


@pytest.mark.parametrize("body,words", [
    ("pool: STOCHASTIC kernel_size: 3 pad: 1", "padding"),
    ("kernel_size: 2 kernel_h: 2 kernel_w: 2", "not both"),
    ("kernel_h: 2", "kernel_h and kernel_w"),
    ("stride: 2", "kernel size missing"),
    ("kernel_size: 3 pad: 3", "smaller than the kernel"),
    ("kernel_h: 3 kernel_w: 2 pad_h: 0 pad_w: 2", "smaller than the kernel"),
    ("kernel_size: 3 pad: 1 pad_h: 1 pad_w: 1", "pad OR"),
    ("kernel_size: 3 pad_h: 1", "pad OR"),
    ("kernel_size: 3 stride_w: 2", "stride OR"),
    ("kernel_size: 3 stride: 0", "stride must be positive"),
    ("kernel_size: 0", "positive"),
    ("global_pooling: true kernel_size: 3", "global_pooling"),
    ("global_pooling: true pad: 1", "only pad 0 and stride 1"),
    ("global_pooling: true stride: 2", "only pad 0 and stride 1"),
])
def test_bad_params(body, words):
    layer = make_layer(pool_text(body))
    with pytest.raises(LayerError, match=words):
        setup_layer(layer, [np.zeros((1, 1, 6, 6))])


def test_kernel_size_with_one_of_kernel_h_w_is_kernel_size():
    # Caffe's CHECK(!has_kernel_size != !(has_kernel_h && has_kernel_w)) passes, and
    # LayerSetUp then takes kernel_size for both axes.
    x = np.arange(36, dtype=np.float32).reshape(1, 1, 6, 6)
    y = ours("pool: MAX kernel_size: 2 kernel_h: 3 stride: 2", x)[0]
    np.testing.assert_array_equal(y, x[:, :, 1::2, 1::2])


def test_mask_top_only_for_max_and_4d_bottom():
    layer = make_layer(pool_text("pool: AVE kernel_size: 2"))
    with pytest.raises(LayerError, match="only produced by pool: MAX"):
        setup_layer(layer, [np.zeros((1, 1, 6, 6))], 2)
    layer = make_layer(pool_text("pool: MAX kernel_size: 2"))
    with pytest.raises(LayerError, match="4 axes"):
        setup_layer(layer, [np.zeros((1, 6, 6))])


# ------------------------------------------------------------------ STOCHASTIC
FLT_MIN = float(np.finfo(np.float32).tiny)


def test_stochastic_at_test_is_the_probability_weighted_mean():
    # pooling_layer.cu StoPoolForwardTest: window [ph*s, min(ph*s + k, H)) (no padding),
    # top = sum(x^2) / (FLT_MIN + sum(x)) accumulated in window order.
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 2, (2, 3, 5, 5)).astype(np.float32)
    x[0, 0, :2, :2] = 0                                   # an all-zero window gives 0
    layer = make_layer(pool_text("pool: STOCHASTIC kernel_size: 2 stride: 2"), TEST,
                       np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    y = run_forward(layer, bottom, top)[0]
    assert y.shape == (2, 3, 3, 3)                        # ceil((5 - 2) / 2) + 1
    x64 = x.astype(np.float64)
    for i in range(3):
        for j in range(3):
            win = x64[:, :, 2 * i:min(2 * i + 2, 5), 2 * j:min(2 * j + 2, 5)]
            expect = (win ** 2).sum(axis=(2, 3)) / (FLT_MIN + win.sum(axis=(2, 3)))
            np.testing.assert_allclose(y[:, :, i, j], expect, rtol=1e-6)
    assert y[0, 0, 0, 0] == 0


def test_stochastic_at_train_samples_in_proportion_to_the_values():
    # StoPoolForwardTrain: u ~ U(0, 1], the first element whose running sum reaches
    # u * sum(window) is taken; its value goes to the top and the gradient to it only.
    pairs = 4000
    x = np.tile(np.array([1.0, 3.0], np.float32), pairs).reshape(1, 1, 1, 2 * pairs)
    x[0, 0, 0, :2] = [0.0, 2.0]                           # a zero is never taken
    layer = make_layer(pool_text("pool: STOCHASTIC kernel_h: 1 kernel_w: 2 stride: 2"),
                       TRAIN, np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    y = run_forward(layer, bottom, top)[0].reshape(-1)
    assert y[0] == 2.0
    assert set(np.unique(y[1:])) <= {1.0, 3.0}
    assert abs(np.mean(y[1:] == 3.0) - 0.75) < 0.03       # 3 / (1 + 3), ~4.6 sigma
    top[0].diff[...] = np.arange(pairs, dtype=np.float32).reshape(top[0].shape) + 1
    bottom[0].diff[...] = np.nan
    layer.backward(top, [True], bottom)
    diff = bottom[0].diff.reshape(pairs, 2)
    chosen = np.where(y == x.reshape(pairs, 2)[:, 1], 1, 0)
    expect = np.zeros((pairs, 2), np.float32)
    expect[np.arange(pairs), chosen] = np.arange(pairs) + 1
    np.testing.assert_array_equal(diff, expect)


def test_stochastic_overlapping_windows_add_their_gradients():
    x = np.array([[[[0.0, 5.0, 0.0]]]], np.float32)       # both windows must take x[1]
    layer = make_layer(pool_text("pool: STOCHASTIC kernel_h: 1 kernel_w: 2 stride: 1"),
                       TRAIN, np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    np.testing.assert_array_equal(run_forward(layer, bottom, top)[0], [[[[5.0, 5.0]]]])
    top[0].diff[...] = [[[[1.0, 2.0]]]]
    bottom[0].diff[...] = np.nan
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, [[[[0.0, 3.0, 0.0]]]])


@pytest.mark.parametrize("phase", [TEST, TRAIN])
def test_max_backward_routes_by_the_latest_forward(phase):
    """The work arrays a TEST net keeps between forwards hold the latest input only."""
    geometry = (3, 3, 2, 2, 1, 1)
    layer = make_layer(pool_text("pool: MAX kernel_size: 3 stride: 2 pad: 1"), phase=phase,
                       dtype=np.float32)
    first, second = distinct((1, 2, 7, 6), seed=3), distinct((1, 2, 7, 6), seed=4)
    bottom, top = setup_layer(layer, [first], dtype=np.float32)
    run_forward(layer, bottom, top)
    bottom[0].data[...] = second
    got = run_forward(layer, bottom, top)[0]
    want_top, want_mask = reference(second, *geometry, "MAX")
    np.testing.assert_array_equal(got, want_top.astype(np.float32))
    g = np.arange(1, want_top.size + 1, dtype=np.float32).reshape(want_top.shape)
    top[0].diff[...] = g
    bottom[0].diff[...] = np.nan
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, scattered_reference(want_mask, g,
                                                                      second.shape))
