"""Pins for caffelite/kernels/*.cu behaviours that the kernel tests did not constrain
(found by mutation testing of the .cu sources). Every expected value is a hand formula
written here from the fork's C++/CUDA semantics (/work/shared/spec/), evaluated in
numpy with the fork's float types and operation order -- not caffelite's own layers.
The kernels are compiled for the host (caffelite/kernels/host.py) as in
test_kernels_host.py."""
import numpy as np
import pytest

from caffelite import kernels
from gpu_modes import host_kernels_for

f32 = np.float32


@pytest.fixture(scope="module")
def kern(tmp_path_factory):
    return host_kernels_for(tmp_path_factory, kernels.module_names(), "pinned_kernels")


def interp_axis_f32(size_in, size_out):
    """The fork's float32 coordinates: r = (in-1)/(out-1), pos = r*i, i0 = trunc(pos),
    step 0 at the last input row, l1 = pos - i0, l0 = 1 - l1 (all float32)."""
    r = f32(size_in - 1) / f32(size_out - 1) if size_out > 1 else f32(0)
    out = []
    for i in range(size_out):
        pos = f32(r * f32(i))
        i0 = int(pos)
        step = 1 if i0 < size_in - 1 else 0
        l1 = f32(pos - f32(i0))
        out.append((i0, i0 + step, f32(f32(1) - l1), l1))
    return out


def interp_forward_fork(x, h2, w2):
    h1, w1 = x.shape
    ys, xs = interp_axis_f32(h1, h2), interp_axis_f32(w1, w2)
    out = np.empty((h2, w2), x.dtype)
    for i, (y0, y1, ly0, ly1) in enumerate(ys):
        for j, (x0, x1, lx0, lx1) in enumerate(xs):
            t = x.dtype.type
            out[i, j] = t(ly0) * (t(lx0) * x[y0, x0] + t(lx1) * x[y0, x1]) + \
                t(ly1) * (t(lx0) * x[y1, x0] + t(lx1) * x[y1, x1])
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_interp_kernels_take_separate_row_and_column_offsets(kern, dtype):
    """interp.cu's y_offset and x_offset (the crop's first row and first column) are
    separate parameters: with different offsets the forward resamples rows
    [y_off, y_off+h1) x columns [x_off, x_off+w1) and the backward writes the adjoint
    into that window and 0 elsewhere. (Interp passes -pad_beg for both, which hides a
    swap of the two.)"""
    H, W, y_off, x_off, h1, w1, h2, w2 = 9, 11, 1, 3, 6, 5, 11, 9
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, H, W)).astype(dtype)
    out = np.full((2, h2, w2), np.nan, dtype)
    kern.run("interp", "interp_forward", dtype, out.size, x, y_off, x_off, h1, w1, H, W,
             out, h2, w2)
    for p in range(2):
        np.testing.assert_array_equal(
            out[p], interp_forward_fork(x[p, y_off:y_off + h1, x_off:x_off + w1], h2, w2))
    g = rng.integers(-20, 20, (2, h2, w2)).astype(dtype)    # sum order free: a tolerance
    diff = np.full((2, H, W), np.nan, dtype)
    kern.run("interp", "interp_backward", dtype, diff.size, diff, y_off, x_off, h1, w1, H, W,
             g, h2, w2)
    for p in range(2):
        expected = np.zeros((H, W), np.float64)
        ys, xs = interp_axis_f32(h1, h2), interp_axis_f32(w1, w2)
        for i, (y0, y1, ly0, ly1) in enumerate(ys):
            for j, (x0, x1, lx0, lx1) in enumerate(xs):
                for r, lr in ((y0, ly0), (y1, ly1)):
                    for c, lc in ((x0, lx0), (x1, lx1)):
                        expected[y_off + r, x_off + c] += float(lr) * float(lc) * g[p, i, j]
        np.testing.assert_allclose(diff[p], expected, rtol=1e-5, atol=1e-4)
        outside = np.ones((H, W), bool)
        outside[y_off:y_off + h1, x_off:x_off + w1] = False
        assert (diff[p][outside] == 0).all()


def test_softmax_loss_label_equal_to_channels_is_out_of_range(kern):
    """softmax_loss.cu softmax_loss_forward: the valid labels are [0, C); a label of
    exactly C (or -1 when it is not the ignore label) is out of range -- NaN loss
    (Caffe would read another position's probability) and count 1 (counted, so the
    caller's NaN total names the bad label); ignored positions give 0 and 0."""
    C, inner = 3, 5
    prob = np.full((1, C, inner), 1 / 3, f32)
    labels = np.array([0, C, -1, 255, C - 1], f32)
    loss, counts = np.full(inner, np.nan, f32), np.full(inner, np.nan, f32)
    kern.run("softmax_loss", "softmax_loss_forward", f32, inner, prob, labels, C, inner,
             1, 255, loss, counts)
    want = f32(-np.log(np.float64(f32(1 / 3))))
    assert loss[0] == pytest.approx(want, rel=1e-6) and loss[4] == loss[0]
    assert np.isnan(loss[1]) and np.isnan(loss[2])
    assert loss[3] == 0
    assert counts.tolist() == [1, 1, 1, 0, 1]


def _libm_expf():
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("m")
    if name is None:
        pytest.skip("no C math library to call expf from")
    lib = ctypes.CDLL(name)
    lib.expf.restype, lib.expf.argtypes = ctypes.c_float, [ctypes.c_float]
    return lambda v: f32(lib.expf(f32(v)))


def test_softmax_forward_float_sums_in_float(kern):
    """softmax_loss.cu softmax_forward for float: Caffe's softmax kernels (channel_max,
    channel_subtract, exp, channel_sum, channel_div) keep every value in Dtype: e_c =
    expf(x_c - max) and sum = ((e_0 + e_1) + ...) accumulated in float, p_c = e_c / sum.
    The host build calls the C library's expf, so the hand formula below (same expf,
    float32 arithmetic in channel order) is bit-exact; a double accumulator differs."""
    expf = _libm_expf()
    C, outer = 37, 40
    x = (np.random.default_rng(21).standard_normal((outer, C)) * 3).astype(f32)
    expected = np.empty_like(x)
    double_sum = np.empty_like(x)
    for o in range(outer):
        m = x[o].max()
        e = [expf(f32(v - m)) for v in x[o]]
        s, sd = f32(0), 0.0
        for v in e:
            s = f32(s + v)
            sd += float(v)
        expected[o] = [f32(v / s) for v in e]
        double_sum[o] = [f32(v / f32(sd)) for v in e]
    assert not np.array_equal(expected, double_sum)   # the accumulator's type shows
    prob = np.full((outer, C), np.nan, f32)
    kern.run("softmax_loss", "softmax_forward", f32, outer, x, C, 1, prob)
    np.testing.assert_array_equal(prob, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_label_two_to_the_31_is_not_int_min(kern, dtype):
    """softmax_loss.cu / seg_confusion.cu int_label: 2**31 (float32(2147483647) rounds to
    it) is beyond int, so it is an out-of-range label -- never static_cast to int, which
    is undefined behaviour and gives INT_MIN on x86. The numpy layers' astype(int64)
    rule: 2147483648 is bad even when the ignore label is INT_MIN."""
    C, ignore = 3, -2147483648
    labels = np.array([2.0 ** 31, 1, ignore], dtype)
    n = labels.size
    prob = np.full((1, C, n), 1 / 3, dtype)
    loss, counts = np.full(n, -7.0, dtype), np.full(n, np.nan, dtype)
    kern.run("softmax_loss", "softmax_loss_forward", dtype, n, prob, labels, C, n, 1, ignore,
             loss, counts)
    assert np.isnan(loss).tolist() == [True, False, False]
    assert counts.tolist() == [1, 1, 0]
    confusion = np.zeros((C, C), np.uint64)
    first_bad = np.array([n], np.int32)
    kern.run("seg_confusion", "seg_confusion", dtype, n, prob, labels, C, n,
             np.array([ignore], np.int32), 1, confusion, first_bad)
    assert first_bad[0] == 0
    assert int(confusion.sum()) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("slope", [0.1, -0.5])
def test_fused_bn_relu_backward_at_an_exact_zero_takes_the_slope(kern, dtype, slope):
    """channel.cu channel_bn_scale_relu_backward: the ReLU factor is the fork's
    ReLUBackward expression (in > 0) + (in <= 0) * negative_slope, so at an output of
    exactly 0 (or -0) the gradient is multiplied by the slope (not by 0); then
    dx = (g * scale[c]) / std[c]."""
    t = np.dtype(dtype).type
    C, inner = 2, 6
    y = np.array([[0.0, -0.0, 1.5, -2.0, 0.0, 3.0],
                  [-0.0, 0.25, 0.0, -1.0, 0.0, -0.0]], dtype).reshape(1, C, inner)
    dy = np.random.default_rng(7).standard_normal(y.shape).astype(dtype)
    std = np.array([1.5, 0.75], dtype)
    scale = np.array([2.0, -0.3], dtype)
    dx = np.full(y.shape, np.nan, dtype)
    kern.run("channel", "channel_bn_scale_relu_backward", dtype, y.size, y, dy, std, scale,
             1, slope, C, inner, dx)
    expected = np.empty_like(dx)
    for c in range(C):
        for s in range(inner):
            v, g = y[0, c, s], dy[0, c, s]
            g = t(g * t(t(v > 0) + t(v <= 0) * t(slope)))
            expected[0, c, s] = t(t(g * scale[c]) / std[c])
    np.testing.assert_array_equal(dx, expected)
    zero = y == 0
    np.testing.assert_array_equal(dx[zero], (dy * t(slope) * scale[None, :, None] /
                                             std[None, :, None])[zero])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size, channels", [(5, 7), (3, 4)])
def test_lrn_diff_running_sum_is_the_forks_expression_bit_for_bit(kern, dtype, size,
                                                                   channels):
    """lrn.cu lrn_diff: the running sum adds and removes (top_diff * top_data) / scale,
    in the fork's LRNComputeDiff order, and stores top_diff * pow(scale, -beta) -
    (cache_ratio * bottom) * accum. With beta = 0 (pow = 1 exactly in every math
    library) the whole diff is bit-exact against the fork's loops written here."""
    t = np.dtype(dtype).type
    rng = np.random.default_rng(11 + size)
    num, plane = 2, 6
    x = rng.standard_normal((num, channels, plane)).astype(dtype)
    y = rng.standard_normal((num, channels, plane)).astype(dtype)
    scale = rng.uniform(1.0, 3.0, (num, channels, plane)).astype(dtype)
    dy = rng.standard_normal((num, channels, plane)).astype(dtype)
    cache_ratio = t(0.37)
    pre_pad = (size - 1) // 2
    post_pad = size - pre_pad - 1
    expected = np.full(x.shape, np.nan, dtype)
    for n in range(num):
        for p in range(plane):
            def ratio(c):
                return t(t(dy[n, c, p] * y[n, c, p]) / scale[n, c, p])

            def store(c):
                expected[n, c, p] = t(dy[n, c, p] * t(1) -
                                      t(t(cache_ratio * x[n, c, p]) * accum))
            accum, head = t(0), 0
            while head < post_pad and head < channels:
                accum = t(accum + ratio(head))
                head += 1
            while head < channels:
                accum = t(accum + ratio(head))
                if head - size >= 0:
                    accum = t(accum - ratio(head - size))
                store(head - post_pad)
                head += 1
            while head < channels + post_pad:
                if head - size >= 0:
                    accum = t(accum - ratio(head - size))
                store(head - post_pad)
                head += 1
    dx = np.full(x.shape, np.nan, dtype)
    kern.run("lrn", "lrn_diff", dtype, num * plane, x, y, scale, dy, channels, plane, size,
             t(-0.0), cache_ratio, dx)
    np.testing.assert_array_equal(dx, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_unit_whose_word_equals_the_threshold_is_dropped(kern, dtype):
    """dropout.cu dropout_forward: Caffe keeps a unit iff its random uint > threshold
    (DropoutForward: mask[i] > threshold), so a unit whose word's high 32 bits EQUAL the
    threshold is dropped. The words are numpy's Philox4x64-10 for counter state + b + 1
    (the numpy Philox's own stream, an independent oracle)."""
    key = (0x1111222233334444, 0x5555666677778888)
    counter = 12345
    count, blocks = 8, 2
    words = np.random.Philox(counter=counter, key=key[0] | key[1] << 64).random_raw(4 * blocks)
    high = (words >> np.uint64(32)).astype(np.uint64)
    threshold = int(high[5])
    want = (high > np.uint64(threshold)).astype(dtype)
    assert want[5] == 0 and (high >= np.uint64(threshold)).astype(dtype)[5] == 1
    state = np.array([*key, counter, 0], np.uint64)
    x = np.arange(1, count + 1).astype(dtype)
    mask, y = np.full(count, np.nan, dtype), np.full(count, np.nan, dtype)
    kern.run("dropout", "dropout_forward", dtype, blocks, count, x, state, threshold,
             dtype(2.0), mask, y)
    np.testing.assert_array_equal(mask, want)
    np.testing.assert_array_equal(y, x * want * dtype(2.0))


def test_crf_softmax_cutoff_is_strict(kern):
    """permutohedral.cu crf_softmax with use_cutoff: only entries MORE than `cutoff`
    below the row maximum become exactly 0 (densecrf.softmax_rows: energy < -cutoff);
    an entry exactly `cutoff` below keeps exp(-cutoff)."""
    x = np.array([[20.0, 0.0, 5.0], [1.0, 2.0, -17.5]], f32)
    rows = x.copy()
    kern.run("permutohedral", "crf_softmax", f32, 2, rows, 3, 1, 1, f32(20.0))
    e0 = np.exp(np.array([0.0, -20.0, -15.0]))
    np.testing.assert_allclose(rows[0], e0 / e0.sum(), rtol=1e-6)
    assert rows[0, 1] > 0
    e1 = np.exp(np.array([-1.0, 0.0, -19.5]))
    np.testing.assert_allclose(rows[1], e1 / e1.sum(), rtol=1e-6)


def test_lattice_slice_weights_of_a_massless_point_are_zero_not_nan(kern):
    """permutohedral.cu lattice_slice_weights: norm = 1 / (mass * alpha + 1e-20) (the
    fork's normalisation), so a point whose splat weights are all 0 gets slice weights
    0 (not 0 * inf = NaN); another point: w * alpha * (norm * kernel_weight)."""
    ones_blurred = np.array([2.0, 3.0, 4.0], f32)
    offsets = np.array([0, 1, 1, 2], np.int32)
    weights = np.array([0.0, 0.0, 0.25, 0.75], f32)
    slot_start = np.array([0, 2], np.int32)
    alpha, kernel_weight = np.array([0.5], f32), np.array([3.0], f32)
    out = np.full(4, np.nan, f32)
    kern.run("permutohedral", "lattice_slice_weights", f32, 2, ones_blurred, offsets, weights,
             slot_start, alpha, kernel_weight, 1, 2, out)
    mass = f32(f32(f32(0) + f32(0.25) * f32(3)) + f32(0.75) * f32(4))
    norm = f32(f32(1) / f32(mass * f32(0.5) + f32(1e-20)))
    scale = f32(norm * f32(3))
    want = [0, 0, f32(f32(f32(0.25) * f32(0.5)) * scale), f32(f32(f32(0.75) * f32(0.5)) * scale)]
    np.testing.assert_array_equal(out, np.array(want, f32))
