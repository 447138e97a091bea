"""DomainTransform / DomainTransformForwardOnly (spec deeplab_extra_layers.md section 1).

Oracles: the spec's numbers for the sigma schedule and weights; closed-form cases of the recursion
order; a scalar loop transcription of spec 1.3 (written here, independent of the
layer's vectorised code) for random inputs with per-sample valid sizes; central
finite differences for backward (float64, the fork test's shapes and sizes).
"""
import math

import numpy as np
import pytest

import caffelite as caffe
from caffelite.layer import LayerError
from caffelite.layers.domain_transform import sigma_schedule
from layer_testing import TRAIN, check_gradient, make_layer, run_forward, setup_layer



def dt_text(kind="DomainTransform", **params):
    body = " ".join(f"{k}: {v}" for k, v in params.items())
    return f'type: "{kind}" domain_transform_param {{ {body} }}'


def forward(x, g, dims, kind="DomainTransform", dtype=np.float64, **params):
    layer = make_layer(dt_text(kind, **params), TRAIN, dtype)
    bottom, top = setup_layer(layer, [x, g, dims], 1, dtype)
    (y,) = run_forward(layer, bottom, top)
    assert y.dtype == np.dtype(dtype)
    return layer, bottom, top, y


def full_dims(n, h, w):
    return np.tile([h, w], (n, 1)).reshape(n, 1, 1, 2).astype(float)


def reference(x, g, dims, ss, sr, k, min_weight=0.0, clamp=True):
    """Spec 1.3 with scalar loops, in float64 (an independent transcription)."""
    y = np.array(x, np.float64)
    n_, c_, _, _ = y.shape
    for n in range(n_):
        hv, wv = int(dims[n].ravel()[0]), int(dims[n].ravel()[1])
        for i in range(k):
            sigma = ss * math.sqrt(3) * 2 ** (k - i - 1) / math.sqrt(4 ** k - 1)
            a = np.exp(-math.sqrt(2) / sigma * (1 + ss / sr * g[n, 0]))
            if clamp:
                a = np.clip(a, min_weight, 1)
            for c in range(c_):
                t = y[n, c]
                for h in range(hv):
                    for w in range(1, wv):
                        t[h, w] += a[h, w] * (t[h, w - 1] - t[h, w])
                    for w in range(wv - 2, -1, -1):
                        t[h, w] += a[h, w + 1] * (t[h, w + 1] - t[h, w])
                for w in range(wv):
                    for h in range(1, hv):
                        t[h, w] += a[h, w] * (t[h - 1, w] - t[h, w])
                    for h in range(hv - 2, -1, -1):
                        t[h, w] += a[h + 1, w] * (t[h + 1, w] - t[h, w])
    return y


# ------------------------------------------------------------------ schedule, weights
def test_sigma_schedule_of_the_spec():
    sigmas = sigma_schedule(50.0, 3, np.dtype(np.float64))
    np.testing.assert_allclose(sigmas, [43.644, 21.822, 10.911], atol=5e-4)
    assert math.isclose(sum(s * s for s in sigmas), 2500.0)
    # decreasing by exactly 2 per iteration, for any K
    s5 = sigma_schedule(8.0, 5, np.dtype(np.float64))
    np.testing.assert_allclose(np.array(s5[:-1]) / np.array(s5[1:]), 2.0)


def test_flat_reference_weights_match_the_spec():
    """g = 0, defaults (sigma_s 50, sigma_r 5, K 3): a = 0.96812, 0.93725, 0.87843."""
    layer = make_layer(dt_text(), TRAIN, np.float64)
    setup_layer(layer, [np.zeros((1, 1, 1, 1))] * 2 + [full_dims(1, 1, 1)])
    sigmas = sigma_schedule(50.0, 3, np.dtype(np.float64))
    for sigma, expect in zip(sigmas, [0.96812, 0.93725, 0.87843]):
        a = layer._weight_map(np, np.zeros((1, 1, 1, 1)), sigma)
        assert abs(float(a.ravel()[0]) - expect) < 5e-6


def test_two_pixels_one_iteration():
    """K = 1 (sigma_1 = sigma_s), g = 0: pass L->R sets y1 = a; pass R->L then gives
    y0 = 1 + a (a - 1); the vertical passes do nothing on one row."""
    x = np.array([1.0, 0.0]).reshape(1, 1, 1, 2)
    _, _, _, y = forward(x, np.zeros_like(x), full_dims(1, 1, 2), num_iter=1)
    a = math.exp(-math.sqrt(2) / 50)
    np.testing.assert_allclose(y.ravel(), [1 + a * (a - 1), a], rtol=1e-12)


# ------------------------------------------------------------------ recursion order
def test_pass_order_on_one_row_and_one_column():
    """Closed form of one iteration (K = 1, uniform weight a): a row goes L->R then
    R->L, a column T->B then B->T, with the already-updated neighbour."""
    ss, sr = 20.0, 5.0
    a = math.exp(-math.sqrt(2) / ss)              # g = 0, sigma_1 = sigma_s
    x0, x1, x2 = 3.0, -1.0, 2.0

    def expect(v0, v1, v2):
        y1 = v1 + a * (v0 - v1)                    # pass L->R (or T->B)
        y2 = v2 + a * (y1 - v2)
        y1 = y1 + a * (y2 - y1)                    # pass R->L (or B->T)
        y0 = v0 + a * (y1 - v0)
        return [y0, y1, y2]

    row = np.array([x0, x1, x2]).reshape(1, 1, 1, 3)
    _, _, _, y = forward(row, np.zeros_like(row), full_dims(1, 1, 3), num_iter=1,
                         spatial_sigma=ss, range_sigma=sr)
    np.testing.assert_allclose(y.ravel(), expect(x0, x1, x2), rtol=1e-12)
    col = row.reshape(1, 1, 3, 1)
    _, _, _, y = forward(col, np.zeros_like(col), full_dims(1, 3, 1), num_iter=1,
                         spatial_sigma=ss, range_sigma=sr)
    np.testing.assert_allclose(y.ravel(), expect(x0, x1, x2), rtol=1e-12)


def test_weight_at_p_couples_p_with_its_left_and_upper_neighbour():
    """A strong edge value at (0, 1) zeroes a[0, 1]: it cuts the horizontal link
    (0,0)-(0,1) in both scan directions; the vertical link (0,1)-(1,1) uses a[1, 1]
    and stays."""
    x = np.array([[10.0, 0.0], [0.0, 4.0]]).reshape(1, 1, 2, 2)
    g = np.zeros_like(x)
    g[0, 0, 0, 1] = 1e6                           # a[0, 1] = 0
    _, _, _, y = forward(x, g, full_dims(1, 2, 2), num_iter=1, spatial_sigma=10,
                         range_sigma=1)
    a = math.exp(-math.sqrt(2) / 10)
    y00, y01 = 10.0, 0.0                          # row 0: nothing crosses the cut
    y11 = 4 + a * (0 - 4)                         # row 1, L->R
    y10 = 0 + a * (y11 - 0)                       # row 1, R->L
    y10 = y10 + a * (y00 - y10)                   # column 0, T->B (a[1, 0])
    y00 = y00 + a * (y10 - y00)                   # column 0, B->T
    y11 = y11 + a * (y01 - y11)                   # column 1, T->B (a[1, 1])
    y01 = y01 + a * (y11 - y01)                   # column 1, B->T
    np.testing.assert_allclose(y.reshape(2, 2), [[y00, y01], [y10, y11]], rtol=1e-12)
    assert y01 != 0


def test_random_inputs_match_the_scalar_transcription():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2, 5, 7))
    g = rng.uniform(0, 2, size=(3, 1, 5, 7))
    dims = np.array([[5, 7], [3, 4], [4, 7]], float).reshape(3, 2, 1, 1)   # N x 2 x 1 x 1
    _, _, _, y = forward(x, g, dims, spatial_sigma=6, range_sigma=2, num_iter=3)
    np.testing.assert_allclose(y, reference(x, g, dims, 6, 2, 3), rtol=1e-12, atol=1e-12)
    # outside each valid region the top is the input
    np.testing.assert_array_equal(y[1, :, 3:], x[1, :, 3:])
    np.testing.assert_array_equal(y[1, :, :, 4:], x[1, :, :, 4:])
    np.testing.assert_array_equal(y[2, :, 4:], x[2, :, 4:])


def test_data_dim_layout_and_truncation():
    """ImageSegData's N x 1 x 1 x 2 data_dim works; values are truncated like C's
    static_cast<int> (3.9 -> 3)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 2, 4, 5))
    g = rng.uniform(0, 1, size=(1, 1, 4, 5))
    _, _, _, y = forward(x, g, np.array([3.9, 4.2]).reshape(1, 1, 1, 2), spatial_sigma=5,
                         range_sigma=1)
    np.testing.assert_allclose(y, reference(x, g, np.array([[3, 4]]), 5, 1, 3), rtol=1e-12)
    assert np.array_equal(y[0, :, 3], x[0, :, 3]) and np.array_equal(y[0, :, :, 4], x[0, :, :, 4])


def test_clamp_and_forward_only_differences():
    """Negative g gives a > 1: DomainTransform clamps to 1, ForwardOnly does not;
    min_weight is a lower clamp for DomainTransform only."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 1, 4, 4))
    g = rng.uniform(-1, 1, size=(1, 1, 4, 4))
    dims = full_dims(1, 4, 4)
    params = dict(spatial_sigma=4, range_sigma=0.5, num_iter=2, min_weight=0.3)
    _, _, _, clamped = forward(x, g, dims, **params)
    _, _, _, free = forward(x, g, dims, "DomainTransformForwardOnly", **params)
    min_weight = float(np.float32(0.3))           # the proto field is a float
    np.testing.assert_allclose(clamped, reference(x, g, dims, 4, 0.5, 2, min_weight),
                               rtol=1e-12)
    np.testing.assert_allclose(free, reference(x, g, dims, 4, 0.5, 2, clamp=False),
                               rtol=1e-12)
    assert np.abs(clamped - free).max() > 1e-3
    # For g >= 0 and min_weight 0 both agree.
    g = np.abs(g)
    params["min_weight"] = 0
    _, _, _, a = forward(x, g, dims, **params)
    _, _, _, b = forward(x, g, dims, "DomainTransformForwardOnly", **params)
    np.testing.assert_array_equal(a, b)


def test_float32_stays_float32_and_region_copy_is_exact():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    g = rng.uniform(0, 1, size=(2, 1, 6, 6)).astype(np.float32)
    dims = np.array([[6, 6], [0, 0]], np.float32).reshape(2, 1, 1, 2)
    _, _, _, y = forward(x, g, dims, dtype=np.float32)
    np.testing.assert_array_equal(y[1], x[1])     # an empty region: identity
    np.testing.assert_allclose(y[0], reference(x[:1], g[:1], dims[:1], 50, 5, 3)[0],
                               rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------ backward
def test_gradient_of_the_fork_test():
    """The fork's TestGradient: N 3, C 2, 3 x 4 maps, valid sizes (2,3), (3,2), (3,4),
    Gaussian X, uniform G in [0.01, 1], sigma_s 8, sigma_r 120 (no clamp active)."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 2, 3, 4))
    g = rng.uniform(0.01, 1, size=(3, 1, 3, 4))
    dims = np.array([[2, 3], [3, 2], [3, 4]], float).reshape(3, 2, 1, 1)
    layer = make_layer(dt_text(spatial_sigma=8, range_sigma=120, num_iter=3), TRAIN)
    bottom, top = setup_layer(layer, [x, g, dims])
    check_gradient(layer, bottom, top, check_bottom=[0, 1], step=1e-3)


def test_gradient_with_strong_edges_and_many_iterations():
    """sigma_s / sigma_r = 10 makes the weights span (0, 1); the edge-map gradient
    is large and must still match central differences."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 3, 5, 6))
    g = rng.uniform(0, 0.5, size=(2, 1, 5, 6))
    dims = np.array([[5, 6], [4, 3]], float).reshape(2, 1, 1, 2)
    layer = make_layer(dt_text(spatial_sigma=5, range_sigma=0.5, num_iter=4), TRAIN)
    bottom, top = setup_layer(layer, [x, g, dims])
    check_gradient(layer, bottom, top, check_bottom=[0, 1], step=1e-4)


def _links(p, h_, w_):
    """Pass ``p``'s links in the fork's forward loop order: (pixel, its neighbour, the
    weight's pixel), for one full h_ x w_ region."""
    if p == 0:
        return [((h, w), (h, w - 1), (h, w)) for h in range(h_) for w in range(1, w_)]
    if p == 1:
        return [((h, w), (h, w + 1), (h, w + 1)) for h in range(h_)
                for w in range(w_ - 2, -1, -1)]
    if p == 2:
        return [((h, w), (h - 1, w), (h, w)) for w in range(w_) for h in range(1, h_)]
    return [((h, w), (h + 1, w), (h + 1, w)) for w in range(w_)
            for h in range(h_ - 2, -1, -1)]


def fork_backward(x, g, dy, ss, sr, k):
    """The fork's Backward_cpu with scalar loops in float32, one sample, the whole map:
    per iteration (last first) a weight_diff zeroed, then channel by channel the passes
    3..0 adding into it, then dG += mult1 * mult2 * weight_diff * a."""
    f32 = np.float32
    _, c_, h_, w_ = x.shape
    sigmas = sigma_schedule(ss, k, np.dtype(f32))
    mult2 = f32(ss) / f32(sr)

    def weights(sigma):
        mult1 = f32(-math.sqrt(2.0) / float(sigma))
        return (np.exp((mult1 * (f32(1) + g[0, 0] * mult2)).astype(np.float64))
                .astype(f32)), mult1
    deltas, y = {}, x[0].astype(f32).copy()
    for i, sigma in enumerate(sigmas):                      # forward, keeping deltas
        a, _ = weights(sigma)
        for c in range(c_):
            for p in range(4):
                r = deltas.setdefault((i, p, c), np.zeros((h_, w_), f32))
                for px, nb, wt in _links(p, h_, w_):
                    r[px] = y[c][nb] - y[c][px]
                    y[c][px] = y[c][px] + a[wt] * r[px]
    dx, dg = dy[0].astype(f32).copy(), np.zeros((h_, w_), f32)
    for i in range(k - 1, -1, -1):
        a, mult1 = weights(sigmas[i])
        weight_diff = np.zeros((h_, w_), f32)
        for c in range(c_):
            for p in range(3, -1, -1):
                for px, nb, wt in reversed(_links(p, h_, w_)):
                    weight_diff[wt] = weight_diff[wt] + dx[c][px] * deltas[i, p, c][px]
                    dx[c][nb] = dx[c][nb] + a[wt] * dx[c][px]
                    dx[c][px] = (f32(1) - a[wt]) * dx[c][px]
        dg = dg + mult1 * mult2 * weight_diff * a
    return dx, dg


def test_inf_and_nan_beyond_a_samples_region_stay_there():
    """The fork's loops never read past a sample's valid region, so an Inf in X (or a
    NaN in the top diff) there, inside a larger sample's region, changes nothing of
    the smaller sample's region, forward or backward."""
    rng = np.random.default_rng(12)
    x = rng.normal(size=(3, 2, 5, 6))
    g = rng.uniform(0, 2, size=(3, 1, 5, 6))
    dims = np.array([[3, 4], [5, 2], [5, 6]], float).reshape(3, 2, 1, 1)
    x[0, 0, 0, 5] = x[0, 1, 4, 0] = np.inf
    x[1, 0, 2, 3] = np.nan
    _, _, _, y = forward(x, g, dims, spatial_sigma=8, range_sigma=120, num_iter=3)
    want = reference(x, g, dims, 8, 120, 3)
    np.testing.assert_allclose(y[0, :, :3, :4], want[0, :, :3, :4], rtol=1e-12)
    np.testing.assert_allclose(y[1, :, :, :2], want[1, :, :, :2], rtol=1e-12)
    assert np.all(np.isfinite(y[0, :, :3, :4])) and np.all(np.isfinite(y[1, :, :, :2]))

    finite = x.copy()
    finite[~np.isfinite(finite)] = 0
    dy = rng.normal(size=x.shape)
    dy_poisoned = dy.copy()
    dy_poisoned[0, 1, 0, 4] = dy_poisoned[1, 0, 3, 5] = np.nan
    grads = []
    for top_diff in (dy, dy_poisoned):
        layer, bottom, top, _ = forward(finite, g, dims, spatial_sigma=8, range_sigma=120,
                                        num_iter=3)
        top[0].diff[...] = top_diff
        layer.backward(top, [True, True, False], bottom)
        grads.append((bottom[0].diff.copy(), bottom[1].diff.copy()))
    (dx, dg), (dx_p, dg_p) = grads
    for n, (h, w) in enumerate([(3, 4), (5, 2)]):
        np.testing.assert_array_equal(dx_p[n, :, :h, :w], dx[n, :, :h, :w])
        np.testing.assert_array_equal(dg_p[n, :, :h, :w], dg[n, :, :h, :w])


def test_backward_is_the_forks_arithmetic_for_several_channels():
    """dX and dG bit for bit against the fork's loops in float32 (written here): the
    guide's gradient sums every channel's passes into one running weight_diff."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 3, 4, 5)).astype(np.float32)
    g = (rng.random((1, 1, 4, 5)) * 3).astype(np.float32)
    layer, bottom, top, _ = forward(x, g, full_dims(1, 4, 5), dtype=np.float32,
                                    num_iter=2, spatial_sigma=8, range_sigma=5)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    top[0].diff[...] = dy
    layer.backward(top, [True, True, False], bottom)
    want_dx, want_dg = fork_backward(x, g, dy, 8.0, 5.0, 2)
    assert np.array_equal(bottom[0].diff[0], want_dx)
    assert np.array_equal(bottom[1].diff[0, 0], want_dg)


def test_backward_outside_the_region_and_both_diffs_written():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(1, 2, 4, 5))
    g = rng.uniform(0, 1, size=(1, 1, 4, 5))
    dims = np.array([2, 3], float).reshape(1, 1, 1, 2)
    layer, bottom, top, _ = forward(x, g, dims, spatial_sigma=5, range_sigma=1)
    top[0].diff[...] = rng.normal(size=top[0].shape)
    bottom[0].diff[...] = np.nan
    bottom[1].diff[...] = np.nan
    layer.backward(top, [False, True, False], bottom)     # either request writes both
    dx, dg = bottom[0].diff, bottom[1].diff
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dg))
    np.testing.assert_array_equal(dx[:, :, 2:], top[0].diff[:, :, 2:])
    np.testing.assert_array_equal(dx[:, :, :, 3:], top[0].diff[:, :, :, 3:])
    assert not dg[:, :, 2:].any() and not dg[:, :, :, 3:].any()
    assert np.abs(dg[:, :, :2, :3]).max() > 0


def test_backward_ignores_the_clamp_like_the_fork():
    """With every weight clamped at min_weight the output no longer depends on G, yet
    the fork's backward applies da/dG = mult1 mult2 a with the clamped a.  K = 1: the
    same forward arises without clamp from G' with exp(mult1 (1 + mult2 G')) =
    min_weight, so the clamped layer's dG must equal the unclamped layer's at G'."""
    rng = np.random.default_rng(7)
    ss, sr, c = 4.0, 1.0, float(np.float32(0.6))     # min_weight is a proto float
    x = rng.normal(size=(1, 2, 3, 4))
    g = rng.uniform(1, 2, size=(1, 1, 3, 4))                     # a << 0.6
    mult1, mult2 = -math.sqrt(2) / ss, ss / sr
    g_equiv = np.full_like(g, (math.log(c) / mult1 - 1) / mult2)
    dims = full_dims(1, 3, 4)
    dy = rng.normal(size=x.shape)
    grads = []
    for gg, mw in ((g, c), (g_equiv, 0.0)):
        layer, bottom, top, y = forward(x, gg, dims, spatial_sigma=ss, range_sigma=sr,
                                        num_iter=1, min_weight=mw)
        top[0].diff[...] = dy
        layer.backward(top, [True, True, False], bottom)
        grads.append((y, bottom[0].diff.copy(), bottom[1].diff.copy()))
    np.testing.assert_allclose(grads[0][0], grads[1][0], rtol=1e-12)
    np.testing.assert_allclose(grads[0][1], grads[1][1], rtol=1e-12)
    np.testing.assert_allclose(grads[0][2], grads[1][2], rtol=1e-10)
    assert np.abs(grads[0][2]).max() > 1e-3      # non-zero although the true one is 0


def test_forward_only_backward_leaves_diffs_alone():
    x = np.ones((1, 1, 2, 2))
    layer, bottom, top, _ = forward(x, np.zeros_like(x), full_dims(1, 2, 2),
                                    "DomainTransformForwardOnly")
    for b in bottom:
        b.diff[...] = 7
    layer.backward(top, [True, True, True], bottom)      # no error, even for bottom 2
    assert all(np.all(b.diff == 7) for b in bottom)


def test_edge_branch_trains_end_to_end_in_a_net():
    """A tiny net: the edge map comes from a learnable 1x1 convolution of the image;
    a loss on the filtered scores gives that convolution a gradient through G."""
    net_text = """
    layer { name: "in" type: "Input" top: "scores" top: "image" top: "dims"
      input_param { shape { dim: 1 dim: 3 dim: 6 dim: 6 } shape { dim: 1 dim: 2 dim: 6 dim: 6 }
                    shape { dim: 1 dim: 1 dim: 1 dim: 2 } } }
    layer { name: "edge" type: "Convolution" bottom: "image" top: "edge"
      convolution_param { num_output: 1 kernel_size: 1
        weight_filler { type: "constant" value: 0.5 }
        bias_filler { type: "constant" value: 0.1 } } }
    layer { name: "dt" type: "DomainTransform" bottom: "scores" bottom: "edge" bottom: "dims"
      top: "filtered" domain_transform_param { spatial_sigma: 4 range_sigma: 1 } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "filtered" bottom: "scores" top: "loss" }
    """
    from caffelite.io import prototxt
    param, _ = prototxt.parse_net(net_text)
    net = caffe.Net(param=param, phase=caffe.TRAIN)
    rng = np.random.default_rng(8)
    net.blobs["scores"].data[...] = rng.normal(size=(1, 3, 6, 6))
    net.blobs["image"].data[...] = rng.uniform(0, 1, size=(1, 2, 6, 6))
    net.blobs["dims"].data[...] = [[[[6, 6]]]]
    loss = net.forward_from_to()
    assert np.isfinite(loss) and loss > 0
    net.clear_param_diffs()
    net.backward_from_to()
    w = net.params["edge"][0]
    assert np.all(np.isfinite(w.diff)) and np.abs(w.diff).max() > 0


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("params, message", [
    (dict(spatial_sigma=0), "spatial_sigma must be positive"),
    (dict(range_sigma=-1), "range_sigma must be positive"),
    (dict(min_weight=-0.1), "min_weight must be non-negative"),
    (dict(num_iter=0), "num_iter must be positive"),
])
def test_bad_parameters(params, message):
    layer = make_layer(dt_text(**params), TRAIN)
    with pytest.raises(LayerError, match=message):
        setup_layer(layer, [np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)), full_dims(1, 2, 2)])


def test_bad_shapes_and_sizes():
    layer = make_layer(dt_text(), TRAIN)
    with pytest.raises(LayerError, match="reference edge map"):
        setup_layer(layer, [np.zeros((1, 2, 3, 3)), np.zeros((1, 2, 3, 3)), full_dims(1, 3, 3)])
    layer = make_layer(dt_text(), TRAIN)
    bottom, top = setup_layer(layer, [np.zeros((1, 1, 3, 3)), np.zeros((1, 1, 3, 3)),
                                      full_dims(1, 4, 3)])
    with pytest.raises(LayerError, match=r"valid size \(4, 3\).*exceeds the 3 x 3"):
        layer.forward(bottom, top)
    layer = make_layer(dt_text(), TRAIN)
    with pytest.raises(LayerError, match="exactly 3 bottom"):
        setup_layer(layer, [np.zeros((1, 1, 3, 3)), np.zeros((1, 1, 3, 3))])


def test_no_backward_to_the_image_dimensions():
    x = np.ones((1, 1, 2, 2))
    layer, bottom, top, _ = forward(x, np.zeros_like(x), full_dims(1, 2, 2))
    with pytest.raises(LayerError, match="image dimensions"):
        layer.backward(top, [True, True, True], bottom)


# ------------------------------------------------------------------ the example
def test_domain_transform_demo_runs_at_tiny_settings(tmp_path):
    """``python -m caffelite.demo.domain_transform`` with 4 iterations on 4 images."""
    from caffelite.demo.domain_transform import run_domain_transform
    result = run_domain_transform(str(tmp_path), max_iter=4, n_train=4, n_val=2,
                                  batch_size=2)
    assert len(result["losses"]) == 4 and np.all(np.isfinite(result["losses"]))
    for key in ("raw", "refined"):
        assert 0 <= result[key]["miou"] <= 1 and 0 <= result[key]["trimap_accuracy"] <= 1
    features = tmp_path / "voc_synth" / "features" / "aspp_slim_dt" / "val"
    for blob in ("fc8", "fc8_dt", "edge"):
        assert len(list((features / blob).glob("*_blob_0.mat"))) == 2
