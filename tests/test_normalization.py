"""BatchNorm, Scale, Bias, MVN: OpenCV parity where OpenCV has the layer, float64
formula oracles otherwise, running-average updates, gradient checks, clear errors."""
import numpy as np
import pytest

from layer_testing import (TEST, TRAIN, check_gradient, make_layer, opencv_forward,
                           run_forward, setup_layer)

SHAPE = (2, 3, 4, 5)
HEADER = 'input: "data"\ninput_shape { dim: 2 dim: 3 dim: 4 dim: 5 }\n'


def rand(shape, seed, scale=1.0, loc=0.0):
    return np.random.default_rng(seed).normal(loc, scale, size=shape)


def in_place_run(text, x, dy, phase=TRAIN, params=None):
    """Forward/backward with top == bottom; returns (y, dx, param diffs)."""
    layer = make_layer(text, phase)
    bottom, _ = setup_layer(layer, [x])
    if params is not None:
        for b, p in zip(layer.blobs, params):
            b.data[...] = p
    layer.reshape(bottom, bottom)
    layer.forward(bottom, bottom)
    y = bottom[0].data.copy()
    bottom[0].diff[...] = dy
    for b in layer.blobs:
        b.diff[...] = 0
    layer.backward(bottom, [True], bottom)
    return y, bottom[0].diff.copy(), [b.diff.copy() for b in layer.blobs]


def out_of_place_run(text, x, dy, phase=TRAIN, params=None):
    layer = make_layer(text, phase)
    bottom, top = setup_layer(layer, [x])
    if params is not None:
        for b, p in zip(layer.blobs, params):
            b.data[...] = p
    y = run_forward(layer, bottom, top)[0]
    top[0].diff[...] = dy
    for b in layer.blobs:
        b.diff[...] = 0
    layer.backward(top, [True], bottom)
    return y, bottom[0].diff.copy(), [b.diff.copy() for b in layer.blobs]


# -------------------------------------------------------------------- BatchNorm
def bn_stats(seed=0, channels=3):
    mean_sum = rand(channels, seed)
    var_sum = np.random.default_rng(seed + 1).uniform(0.5, 2.0, size=channels)
    return mean_sum, var_sum


@pytest.mark.parametrize("factor", [1.0, 2.5, 0.0])
def test_batchnorm_global_stats_matches_opencv(factor):
    x = rand(SHAPE, 1, scale=2.0, loc=0.5).astype(np.float32)
    mean_sum, var_sum = (a.astype(np.float32) for a in bn_stats())
    blobs = [mean_sum, var_sum, np.array([factor], np.float32)]
    layer = make_layer('type: "BatchNorm"', TEST, np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    for b, v in zip(layer.blobs, blobs):
        b.data[...] = v
    ours = run_forward(layer, bottom, top)[0]
    assert ours.dtype == np.float32
    net = HEADER + ('layer { name: "bn" type: "BatchNorm" bottom: "data" top: "out" '
                    'batch_norm_param { use_global_stats: true } }\n')
    cv = opencv_forward(net, [("bn", "BatchNorm", blobs)], {"data": x}, ["bn"])[0]
    # factor 0 divides x by sqrt(eps) ~ 0.003: values ~ 1e3, hence the absolute slack
    np.testing.assert_allclose(ours, cv, rtol=1e-5, atol=1e-5 * max(1, np.abs(cv).max()))
    s = 0.0 if factor == 0 else 1.0 / factor
    ref = (x.astype(np.float64) - s * mean_sum[:, None, None]) / np.sqrt(
        s * var_sum[:, None, None] + 1e-5)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * max(1, np.abs(ref).max()))


def test_batchnorm_eps_parameter():
    x = rand((2, 3, 2), 2)
    layer = make_layer('type: "BatchNorm" batch_norm_param { use_global_stats: true eps: 0.5 }')
    bottom, top = setup_layer(layer, [x])
    layer.blobs[1].data[...] = [1.0, 2.0, 3.0]
    layer.blobs[2].data[...] = 1.0
    y = run_forward(layer, bottom, top)[0]
    np.testing.assert_allclose(y, x / np.sqrt(np.array([1.5, 2.5, 3.5]))[:, None], rtol=1e-12)


def test_batchnorm_blobs_and_defaults():
    layer = make_layer('type: "BatchNorm"', TEST)
    setup_layer(layer, [rand(SHAPE, 3)])
    assert [b.shape for b in layer.blobs] == [(3,), (3,), (1,)]
    assert all(np.all(b.data == 0) for b in layer.blobs)
    assert layer.param_propagate_down == [False, False, False]
    assert layer.use_global_stats                           # TEST default
    train = make_layer('type: "BatchNorm"', TRAIN)
    setup_layer(train, [rand(SHAPE, 3)])
    assert not train.use_global_stats                       # TRAIN default
    forced = make_layer('type: "BatchNorm" batch_norm_param { use_global_stats: true }', TRAIN)
    setup_layer(forced, [rand(SHAPE, 3)])
    assert forced.use_global_stats


def test_batchnorm_batch_stats_forward_and_running_average():
    maf = float(np.float32(0.9))     # a float field in the proto: Caffe sees 0.9f
    text = f'type: "BatchNorm" batch_norm_param {{ moving_average_fraction: {maf} }}'
    layer = make_layer(text, TRAIN)
    x1, x2 = rand(SHAPE, 4, 2.0, 1.0), rand(SHAPE, 5, 0.5, -1.0)
    bottom, top = setup_layer(layer, [x1])
    m = 2 * 4 * 5
    y1 = run_forward(layer, bottom, top)[0]
    mean1, var1 = x1.mean(axis=(0, 2, 3)), x1.var(axis=(0, 2, 3))     # biased
    np.testing.assert_allclose(y1, (x1 - mean1[:, None, None]) /
                               np.sqrt(var1[:, None, None] + 1e-5), rtol=1e-10)
    np.testing.assert_allclose(layer.blobs[2].data, [1.0])
    np.testing.assert_allclose(layer.blobs[0].data, mean1, rtol=1e-12)
    np.testing.assert_allclose(layer.blobs[1].data, var1 * m / (m - 1), rtol=1e-12)
    bottom[0].data[...] = x2
    run_forward(layer, bottom, top)
    mean2, var2 = x2.mean(axis=(0, 2, 3)), x2.var(axis=(0, 2, 3))
    np.testing.assert_allclose(layer.blobs[2].data, [maf * 1 + 1], rtol=1e-15)
    np.testing.assert_allclose(layer.blobs[0].data, maf * mean1 + mean2, rtol=1e-12)
    np.testing.assert_allclose(layer.blobs[1].data, maf * var1 * m / (m - 1) +
                               var2 * m / (m - 1), rtol=1e-12)
    # A TEST-phase layer sharing these blobs normalises with blob / blobs[2].
    test = make_layer('type: "BatchNorm"', TEST)
    tb, tt = setup_layer(test, [x2])
    for mine, theirs in zip(test.blobs, layer.blobs):
        mine.data[...] = theirs.data
    s = 1 / (maf + 1)
    ref = (x2 - s * layer.blobs[0].data[:, None, None]) / np.sqrt(
        s * layer.blobs[1].data[:, None, None] + 1e-5)
    np.testing.assert_allclose(run_forward(test, tb, tt)[0], ref, rtol=1e-12)
    before = [b.data.copy() for b in test.blobs]
    run_forward(test, tb, tt)
    assert all(np.array_equal(a, b.data) for a, b in zip(before, test.blobs))


def test_batchnorm_single_sample_has_no_bias_correction():
    layer = make_layer('type: "BatchNorm"', TRAIN)
    x = rand((1, 2), 6)                                    # m = 1 per channel
    bottom, top = setup_layer(layer, [x])
    run_forward(layer, bottom, top)
    np.testing.assert_allclose(layer.blobs[1].data, [0.0, 0.0])


def test_batchnorm_float32_running_update_keeps_dtype():
    layer = make_layer('type: "BatchNorm"', TRAIN, np.float32)
    bottom, top = setup_layer(layer, [rand(SHAPE, 7)], dtype=np.float32)
    y = run_forward(layer, bottom, top)[0]
    assert y.dtype == np.float32 and all(b.data.dtype == np.float32 for b in layer.blobs)


@pytest.mark.parametrize("shape", [(2, 3, 2, 3), (4, 3)])
def test_batchnorm_gradient_batch_stats(shape):
    layer = make_layer('type: "BatchNorm"', TRAIN)
    bottom, top = setup_layer(layer, [rand(shape, 8, 1.5, 0.3)])
    check_gradient(layer, bottom, top)
    assert all(np.all(b.diff == 0) for b in layer.blobs)   # statistics get no diff


def test_batchnorm_gradient_global_stats():
    layer = make_layer('type: "BatchNorm"', TEST)
    bottom, top = setup_layer(layer, [rand((2, 3, 2, 3), 9)])
    mean_sum, var_sum = bn_stats(10)
    layer.blobs[0].data[...] = mean_sum
    layer.blobs[1].data[...] = var_sum
    layer.blobs[2].data[...] = 2.0
    check_gradient(layer, bottom, top)
    top[0].diff[...] = 1.0
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].diff[0, :, 0, 0], 1 / np.sqrt(var_sum / 2 + 1e-5))


@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_batchnorm_in_place(phase):
    x, dy = rand(SHAPE, 11), rand(SHAPE, 12)
    params = [*bn_stats(13), np.array([3.0])]
    a = in_place_run('type: "BatchNorm"', x, dy, phase, params)
    b = out_of_place_run('type: "BatchNorm"', x, dy, phase, params)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-12)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-10, atol=1e-14)


def test_batchnorm_errors():
    layer = make_layer('type: "BatchNorm" param { lr_mult: 1 }', TRAIN)
    with pytest.raises(ValueError, match="lr_mult"):
        setup_layer(layer, [rand(SHAPE, 0)])
    make_ok = make_layer('type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 0 } '
                         'param { lr_mult: 0 }', TRAIN)
    setup_layer(make_ok, [rand(SHAPE, 0)])
    setup_layer(make_layer('type: "BatchNorm" batch_norm_param { update_global_stats: false }'),
                [rand(SHAPE, 0)])
    layer = make_layer('type: "BatchNorm" batch_norm_param { update_global_stats: true }')
    with pytest.raises(ValueError, match="update_global_stats"):
        setup_layer(layer, [rand(SHAPE, 0)])
    layer = make_layer('type: "BatchNorm"')
    bottom, top = setup_layer(layer, [rand(SHAPE, 0)])
    bottom[0].reshape((2, 4, 4, 5))
    with pytest.raises(ValueError, match="channels"):
        layer.reshape(bottom, top)


# ------------------------------------------------------------------------ Scale
def scale_layer(params, bottoms, phase=TRAIN, dtype=np.float64, blobs=None):
    layer = make_layer(f'type: "Scale" {params}', phase, dtype)
    bottom, top = setup_layer(layer, bottoms, dtype=dtype)
    if blobs is not None:
        for b, v in zip(layer.blobs, blobs):
            b.data[...] = v
    return layer, bottom, top


@pytest.mark.parametrize("params,blob_shapes,bcast", [
    ("", [(3,)], lambda a: a[:, None, None]),
    ("scale_param { bias_term: true }", [(3,), (3,)], lambda a: a[:, None, None]),
    ("scale_param { axis: 2 num_axes: 2 }", [(4, 5)], lambda a: a),
    ("scale_param { axis: 1 num_axes: 2 bias_term: true }", [(3, 4), (3, 4)],
     lambda a: a[:, :, None]),
    ("scale_param { axis: -1 }", [(5,)], lambda a: a),
    ("scale_param { num_axes: 0 }", [()], lambda a: a),
    ("scale_param { axis: 0 num_axes: -1 }", [SHAPE], lambda a: a)])
def test_scale_one_bottom_matches_opencv(params, blob_shapes, bcast):
    x = rand(SHAPE, 20).astype(np.float32)
    blobs = [rand(s, 21 + i).astype(np.float32) for i, s in enumerate(blob_shapes)]
    layer, bottom, top = scale_layer(params, [x], dtype=np.float32, blobs=blobs)
    assert [b.shape for b in layer.blobs] == blob_shapes
    ours = run_forward(layer, bottom, top)[0]
    expect = x.astype(np.float64) * bcast(blobs[0].astype(np.float64))
    if len(blobs) > 1:
        expect = expect + bcast(blobs[1].astype(np.float64))
    np.testing.assert_allclose(ours, expect, rtol=1e-6, atol=1e-6)
    if blob_shapes[0] == SHAPE or "axis: -1" in params:
        return   # OpenCV's importer takes neither a blob as large as the input nor axis < 0
    net = HEADER + f'layer {{ name: "sc" type: "Scale" bottom: "data" top: "out" {params} }}\n'
    cv = opencv_forward(net, [("sc", "Scale", [b.reshape(b.shape or (1,)) for b in blobs])],
                        {"data": x}, ["sc"])[0]
    np.testing.assert_allclose(ours, cv, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("params,scale_shape,bcast", [
    ("", (3,), lambda s: s[:, None, None]),
    ("scale_param { axis: 0 }", (2, 3), lambda s: s[:, :, None, None]),
    ("", (3, 4), lambda s: s[:, :, None])])
def test_scale_two_bottoms_matches_opencv(params, scale_shape, bcast):
    x = rand(SHAPE, 30).astype(np.float32)
    s = rand(scale_shape, 31).astype(np.float32)
    layer, bottom, top = scale_layer(params, [x, s], dtype=np.float32)
    assert layer.blobs == []
    ours = run_forward(layer, bottom, top)[0]
    np.testing.assert_allclose(ours, x * bcast(s), rtol=1e-6)
    dims = " ".join(f"dim: {d}" for d in scale_shape)
    net = HEADER + (f'input: "s"\ninput_shape {{ {dims} }}\n'
                    f'layer {{ name: "sc" type: "Scale" bottom: "data" bottom: "s" top: "out" '
                    f'{params} }}\n')
    cv = opencv_forward(net, [], {"data": x, "s": s}, ["sc"])[0]
    np.testing.assert_allclose(ours, cv, rtol=1e-5, atol=1e-6)


def test_scale_two_bottoms_with_bias():
    # OpenCV 4.14 mis-handles two bottoms + bias_term (its output matches neither
    # x*s + b nor any other arrangement), so compare with the spec's y = x*s[c] + b[c].
    x, s, b = rand(SHAPE, 32), rand((3,), 33), rand((3,), 34)
    layer, bottom, top = scale_layer("scale_param { bias_term: true }", [x, s], blobs=[b])
    assert [blob.shape for blob in layer.blobs] == [(3,)]
    np.testing.assert_allclose(run_forward(layer, bottom, top)[0],
                               x * s[:, None, None] + b[:, None, None], rtol=1e-12)


def test_scale_default_and_given_fillers():
    x = rand(SHAPE, 35)
    layer, bottom, top = scale_layer("scale_param { bias_term: true }", [x])
    np.testing.assert_array_equal(layer.blobs[0].data, np.ones(3))
    np.testing.assert_array_equal(layer.blobs[1].data, np.zeros(3))
    np.testing.assert_allclose(run_forward(layer, bottom, top)[0], x)     # identity
    layer, *_ = scale_layer("scale_param { bias_term: true filler { value: 2 } "
                            "bias_filler { type: 'constant' value: -1 } }", [x])
    np.testing.assert_array_equal(layer.blobs[0].data, np.full(3, 2.0))
    np.testing.assert_array_equal(layer.blobs[1].data, np.full(3, -1.0))
    assert layer.param_propagate_down == [True, True]


@pytest.mark.parametrize("params,bottom_shapes", [
    ("", [(2, 3, 2, 2)]),
    ("scale_param { bias_term: true }", [(2, 3, 2, 2)]),
    ("scale_param { axis: 0 num_axes: 2 bias_term: true }", [(2, 3, 2)]),
    ("scale_param { num_axes: 0 bias_term: true }", [(2, 3, 2)]),
    ("", [(2, 3, 2, 2), (3,)]),
    ("scale_param { axis: 0 bias_term: true }", [(2, 3, 2), (2, 3)]),
    ("scale_param { axis: 0 }", [(2, 3), (2, 3)])])       # scale as large as the input
def test_scale_gradient(params, bottom_shapes):
    bottoms = [rand(s, 40 + i) for i, s in enumerate(bottom_shapes)]
    layer, bottom, top = scale_layer(params, bottoms)
    for i, b in enumerate(layer.blobs):
        b.data[...] = rand(b.shape, 50 + i)
    check_gradient(layer, bottom, top)


def test_scale_param_diffs_accumulate():
    x, dy = rand((2, 3, 2), 60), rand((2, 3, 2), 61)
    layer, bottom, top = scale_layer("scale_param { bias_term: true }", [x])
    run_forward(layer, bottom, top)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    once = [b.diff.copy() for b in layer.blobs]
    layer.backward(top, [True], bottom)
    for b, d in zip(layer.blobs, once):
        np.testing.assert_allclose(b.diff, 2 * d)
    np.testing.assert_allclose(once[0], (dy * x).sum(axis=(0, 2)))
    np.testing.assert_allclose(once[1], dy.sum(axis=(0, 2)))


@pytest.mark.parametrize("params,shape,overwrites", [
    ("", (1, 3, 2, 2), True),                           # outer 1, inner 4: gemv, beta 0
    ("scale_param { axis: 0 num_axes: 2 }", (2, 3), True),   # scale as large as x
    ("", (1, 3), True),                                 # outer 1, inner 1: also eltwise
    ("", (1, 1, 4), False),                             # one scale value: dot, +=
    ("", (2, 3), False),                                # inner 1: gemv, beta 1
    ("", (2, 3, 2, 2), False)])                         # outer 2: gemv, beta 1
def test_learned_scale_diff_is_overwritten_where_caffe_overwrites_it(params, shape,
                                                                     overwrites):
    # scale_layer.cpp Backward_cpu writes d(scale) with beta 0 (no accumulation) when the
    # product is the scale diff itself (count(scale) == count(x)) or when outer_dim == 1
    # with inner_dim > 1 and more than one scale value; otherwise it adds to it.
    x, dy = rand(shape, 67), rand(shape, 68)
    layer, bottom, top = scale_layer(params, [x])
    run_forward(layer, bottom, top)
    top[0].diff[...] = dy
    scale = layer.blobs[0]
    expected = (dy * x).reshape(shape[0], shape[1], -1).sum(axis=(0, 2)) \
        if params == "" else dy * x
    layer.backward(top, [True], bottom)
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(scale.diff, expected if overwrites else 2 * expected,
                               rtol=1e-12)


def test_scale_param_propagate_down_false_leaves_diffs_alone():
    layer, bottom, top = scale_layer("scale_param { bias_term: true }", [rand((2, 3), 62)])
    layer.param_propagate_down = [False, False]
    run_forward(layer, bottom, top)
    top[0].diff[...] = 1
    layer.backward(top, [True], bottom)
    assert all(np.all(b.diff == 0) for b in layer.blobs)


@pytest.mark.parametrize("scale_shape, kept", [((3,), True), ((2, 3, 2), False)])
def test_scale_leaves_the_product_in_the_bottom_diff_without_propagate_down(scale_shape,
                                                                           kept):
    """scale_layer.cpp's backward computes dy * x into bottom[0]'s diff when it needs
    d(scale) and the scale is smaller than the bottom (not in place); without
    propagate_down[0] nothing overwrites it (a Split above would add it)."""
    x, dy = rand((2, 3, 2), 80), rand((2, 3, 2), 81)
    axis = "" if len(scale_shape) == 1 else "axis: 0 num_axes: -1"
    layer, bottom, top = scale_layer(f"scale_param {{ {axis} }}", [x])
    layer.blobs[0].data[...] = rand(scale_shape, 82)
    run_forward(layer, bottom, top)
    bottom[0].diff[...] = 5
    top[0].diff[...] = dy
    layer.backward(top, [False], bottom)
    np.testing.assert_array_equal(bottom[0].diff, x * dy if kept else np.full_like(x, 5))


def test_scale_in_place():
    x, dy = rand((2, 3, 2, 2), 63), rand((2, 3, 2, 2), 64)
    params = [rand((3,), 65), rand((3,), 66)]
    a = in_place_run('type: "Scale" scale_param { bias_term: true }', x, dy, params=params)
    b = out_of_place_run('type: "Scale" scale_param { bias_term: true }', x, dy, params=params)
    for u, v in zip(a[:2], b[:2]):
        np.testing.assert_allclose(u, v, rtol=1e-12)
    for u, v in zip(a[2], b[2]):
        np.testing.assert_allclose(u, v, rtol=1e-12)


def test_frozen_scale_in_place_keeps_no_copy_and_backpropagates():
    """DeepLab's ResNet Scale layers are in place with lr_mult 0: backward needs no
    d(scale), so forward keeps no copy of the input, and dx = dy * scale still holds."""
    x, dy = rand((2, 3, 2, 2), 70), rand((2, 3, 2, 2), 71)
    scale, bias = rand((3,), 72), rand((3,), 73)
    layer = make_layer('type: "Scale" scale_param { bias_term: true }', TRAIN)
    bottom, _ = setup_layer(layer, [x])
    layer.blobs[0].data[...], layer.blobs[1].data[...] = scale, bias
    layer.param_propagate_down = [False, False]
    layer.reshape(bottom, bottom)
    layer.forward(bottom, bottom)
    assert layer.x_saved is None
    np.testing.assert_array_equal(bottom[0].data, x * scale[:, None, None] + bias[:, None, None])
    bottom[0].diff[...] = dy
    layer.backward(bottom, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, dy * scale[:, None, None])
    assert all(np.all(b.diff == 0) for b in layer.blobs)


def test_scale_in_place_two_bottoms_gradient_to_scale():
    x, s, dy = rand((2, 3, 2), 67), rand((3,), 68), rand((2, 3, 2), 69)
    layer = make_layer('type: "Scale"', TRAIN)
    bottom, _ = setup_layer(layer, [x, s])
    top = [bottom[0]]
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    np.testing.assert_allclose(bottom[0].data, x * s[:, None])
    bottom[0].diff[...] = dy
    layer.backward(top, [True, True], bottom)
    np.testing.assert_allclose(bottom[1].diff, (dy * x).sum(axis=(0, 2)))
    np.testing.assert_allclose(bottom[0].diff, dy * s[:, None])


def test_scale_errors():
    with pytest.raises(ValueError, match="num_axes"):
        scale_layer("scale_param { num_axes: -2 }", [rand(SHAPE, 0)])
    with pytest.raises(ValueError, match="extends past"):
        scale_layer("scale_param { axis: 2 num_axes: 3 }", [rand(SHAPE, 0)])
    with pytest.raises(ValueError, match="dimension mismatch"):
        scale_layer("", [rand(SHAPE, 0), rand((4,), 1)])
    with pytest.raises(ValueError, match="axis 5"):
        scale_layer("scale_param { axis: 5 }", [rand(SHAPE, 0)])


# ------------------------------------------------------------------------- Bias
@pytest.mark.parametrize("params,bottom_shapes,bcast", [
    ("", [(2, 3, 2, 2)], lambda b: b[:, None, None]),
    ("bias_param { axis: 0 num_axes: 2 }", [(2, 3, 2)], lambda b: b[:, :, None]),
    ("bias_param { num_axes: 0 }", [(2, 3, 2)], lambda b: b),
    ("", [(2, 3, 2, 2), (3, 2)], lambda b: b[:, :, None]),
    ("bias_param { axis: 0 }", [(2, 3, 2), (2,)], lambda b: b[:, None, None])])
def test_bias_forward_and_gradient(params, bottom_shapes, bcast):
    bottoms = [rand(s, 70 + i) for i, s in enumerate(bottom_shapes)]
    layer = make_layer(f'type: "Bias" {params}', TRAIN)
    bottom, top = setup_layer(layer, bottoms)
    if layer.blobs:
        np.testing.assert_array_equal(layer.blobs[0].data, 0)       # default filler 0
        layer.blobs[0].data[...] = rand(layer.blobs[0].shape, 80)
    b = layer.blobs[0].data if layer.blobs else bottoms[1]
    np.testing.assert_allclose(run_forward(layer, bottom, top)[0], bottoms[0] + bcast(b),
                               rtol=1e-12)
    check_gradient(layer, bottom, top)


def test_bias_in_place_and_filler():
    x, dy = rand((2, 3, 2), 81), rand((2, 3, 2), 82)
    text = 'type: "Bias" bias_param { filler { value: 0.5 } }'
    a = in_place_run(text, x, dy)
    b = out_of_place_run(text, x, dy)
    np.testing.assert_allclose(a[0], x + 0.5)
    for u, v in zip([*a[:2], *a[2]], [*b[:2], *b[2]]):
        np.testing.assert_allclose(u, v, rtol=1e-12)
    np.testing.assert_allclose(a[2][0], dy.sum(axis=(0, 2)))


def test_bias_errors():
    layer = make_layer('type: "Bias"', TRAIN)
    with pytest.raises(ValueError, match="dimension mismatch"):
        setup_layer(layer, [rand(SHAPE, 0), rand((4,), 1)])


# -------------------------------------------------------------------------- MVN
def mvn_oracle(x, normalize_variance=True, across_channels=False, eps=1e-9):
    x = np.asarray(x, np.float64)
    axes = (1, 2, 3) if across_channels else (2, 3)
    y = x - x.mean(axis=axes, keepdims=True)
    if normalize_variance:
        y = y / (np.sqrt((y ** 2).mean(axis=axes, keepdims=True)) + eps)   # eps on the std
    return y


MVN_CASES = [("", {}),
             ("mvn_param { across_channels: true }", {"across_channels": True}),
             ("mvn_param { normalize_variance: false }", {"normalize_variance": False}),
             ("mvn_param { eps: 0.5 }", {"eps": 0.5})]


@pytest.mark.parametrize("params,kw", MVN_CASES)
def test_mvn_matches_opencv(params, kw):
    x = rand(SHAPE, 90, 0.7, 2.0).astype(np.float32)
    layer = make_layer(f'type: "MVN" {params}', TEST, np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    ours = run_forward(layer, bottom, top)[0]
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, mvn_oracle(x, **kw), rtol=1e-5, atol=1e-5)
    if "eps" in kw:
        return   # OpenCV 4.14 adds eps to the variance (sqrt(var + eps)); Caffe to the std
    net = HEADER + f'layer {{ name: "m" type: "MVN" bottom: "data" top: "out" {params} }}\n'
    cv = opencv_forward(net, [], {"data": x}, ["m"])[0]
    np.testing.assert_allclose(ours, cv, rtol=1e-5, atol=1e-5)


def test_mvn_eps_is_added_to_the_std():
    x = np.array([[[[1.0, 3.0]]]])            # mean 2, std 1
    layer = make_layer('type: "MVN" mvn_param { eps: 1 }')
    bottom, top = setup_layer(layer, [x])
    np.testing.assert_allclose(run_forward(layer, bottom, top)[0], [[[[-0.5, 0.5]]]])


@pytest.mark.parametrize("params", [p for p, _ in MVN_CASES[:3]])
def test_mvn_gradient(params):
    layer = make_layer(f'type: "MVN" {params}', TRAIN)
    bottom, top = setup_layer(layer, [rand((2, 3, 2, 3), 91)])
    check_gradient(layer, bottom, top)


def test_mvn_backward_is_caffes_formula_for_large_eps():
    # Caffe's backward divides by (std + eps) and drops the factor std / (std + eps)
    # on the y*mean(dy*y) term; with eps = 0.5 that is visibly not the exact gradient.
    x, dy = rand((1, 2, 3, 3), 92), rand((1, 2, 3, 3), 93)
    layer = make_layer('type: "MVN" mvn_param { eps: 0.5 }', TRAIN)
    bottom, top = setup_layer(layer, [x])
    y = run_forward(layer, bottom, top)[0]
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    axes = (2, 3)
    std = np.sqrt(((x - x.mean(axis=axes, keepdims=True)) ** 2).mean(axis=axes, keepdims=True))
    expect = (dy - dy.mean(axis=axes, keepdims=True) -
              y * (dy * y).mean(axis=axes, keepdims=True)) / (std + 0.5)
    np.testing.assert_allclose(bottom[0].diff, expect, rtol=1e-12, atol=1e-14)


def caffe_mvn_backward_in_place(y, diff, std):
    """MVNLayer::Backward_cpu (normalize_variance) step by step on rows (num, dim) where
    bottom_diff and top_diff are one buffer, written out element by element; its
    caffe_cpu_axpby is the non-MKL builds' sscal then saxpy (mkl_alternate.hpp)."""
    buf = diff.copy()
    num, dim = buf.shape
    for r in range(num):
        for i in range(dim):
            buf[r, i] = y[r, i] * buf[r, i]            # caffe_mul(top_data, top_diff)
        total = sum(buf[r])                            # gemv over bottom_diff
        for i in range(dim):
            buf[r, i] = total                          # gemm, beta 0
            buf[r, i] = y[r, i] * buf[r, i]            # caffe_mul(top_data, bottom_diff)
        total = sum(buf[r])                            # gemv over top_diff (the same)
        for i in range(dim):
            buf[r, i] = total + buf[r, i]              # gemm, beta 1
            buf[r, i] = buf[r, i] * (-1.0 / dim)       # sscal(-1/dim, bottom_diff)
            buf[r, i] = buf[r, i] + buf[r, i]          # saxpy(1, top_diff, bottom_diff)
            buf[r, i] = buf[r, i] / std[r]             # caffe_div by the std + eps
    return buf


@pytest.mark.parametrize("fields, num_rows", [("", 6), ("across_channels: true", 2)])
def test_mvn_in_place_backward_reads_what_caffes_overwrote(fields, num_rows):
    """In place, Caffe's backward overwrites the top diff it reads again: its gradient
    is not the out-of-place one. Without normalize_variance the two agree."""
    x, dy = rand((2, 3, 2, 2), 94), rand((2, 3, 2, 2), 95)
    text = f'type: "MVN" mvn_param {{ {fields} }}'
    y, dx, _ = in_place_run(text, x, dy)
    out_y, out_dx, _ = out_of_place_run(text, x, dy)
    np.testing.assert_array_equal(y, out_y)
    rows = y.reshape(num_rows, -1)
    centred = x.reshape(num_rows, -1) - x.reshape(num_rows, -1).mean(axis=1, keepdims=True)
    std = np.sqrt((centred ** 2).mean(axis=1)) + 1e-9
    expect = caffe_mvn_backward_in_place(rows, dy.reshape(num_rows, -1), std)
    np.testing.assert_allclose(dx.reshape(num_rows, -1), expect, rtol=1e-10, atol=1e-12)
    assert not np.allclose(dx, out_dx)
    text = f'type: "MVN" mvn_param {{ {fields} normalize_variance: false }}'
    np.testing.assert_array_equal(in_place_run(text, x, dy)[1],
                                  out_of_place_run(text, x, dy)[1])


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 5), (6,)])
def test_mvn_top_is_four_dimensional_as_caffes_reshape(shape):
    """MVNLayer::Reshape gives the top num, channels, height and width (1 where the
    bottom has no such axis)."""
    layer = make_layer('type: "MVN" mvn_param { across_channels: true }')
    bottom, top = setup_layer(layer, [rand(shape, 96)])
    assert top[0].shape == tuple(shape) + (1,) * (4 - len(shape))


def test_mvn_rejects_more_than_four_axes():
    layer = make_layer('type: "MVN"')
    with pytest.raises(ValueError, match="4 axes"):
        setup_layer(layer, [np.zeros((1, 2, 2, 2, 2))])


# ------------------------------------------- the fork's GEMV grouping and rounding
def test_batch_statistics_multiply_by_the_rounded_reciprocal():
    # Caffe: gemv with alpha 1. / (num * spatial_dim), a Dtype, on each (n, c) row sum,
    # then the rows added: for x = 3, 1, 1 that is 3 * f + 1 * f + 1 * f, f = float(1/3)
    x = np.array([3, 1, 1], np.float32).reshape(3, 1)
    layer = make_layer('type: "BatchNorm" batch_norm_param { use_global_stats: false }',
                       TRAIN, np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    run_forward(layer, bottom, top)
    f = np.float32(1.0 / 3)
    expected = np.float32(np.float32(np.float32(3) * f + np.float32(1) * f) + np.float32(1) * f)
    assert expected != np.float32(5) / np.float32(3)
    assert layer.blobs[0].data[0] == expected


@pytest.mark.parametrize("text, bias_blob", [('type: "Bias"', 0),
                                              ('type: "Scale" scale_param { bias_term: true }',
                                               1)])
def test_bias_diff_adds_one_image_at_a_time(text, bias_blob):
    # BiasLayer::Backward (Scale's bias too): one GEMV per outer index into the diff:
    # (1e8 + 3) + 3 = 1e8 in float, where adding the batch's total (6) at once gives
    # 100000008
    layer = make_layer(text, TRAIN, np.float32)
    bottom, top = setup_layer(layer, [np.zeros((2, 1), np.float32)], dtype=np.float32)
    run_forward(layer, bottom, top)
    layer.blobs[bias_blob].diff[...] = np.float32(1e8)
    top[0].diff[...] = 3
    layer.backward(top, [True], bottom)
    assert layer.blobs[bias_blob].diff[0] == np.float32(1e8)


def test_batchnorm_backward_writes_the_bottom_diff_regardless():
    # Caffe's BatchNorm Backward does not read propagate_down
    layer = make_layer('type: "BatchNorm"', TEST)
    bottom, top = setup_layer(layer, [rand((2, 3, 2, 2), 8)])
    layer.blobs[2].data[...] = 1
    layer.blobs[1].data[...] = 4
    run_forward(layer, bottom, top)
    top[0].diff[...] = 1
    bottom[0].diff[...] = np.nan
    layer.backward(top, [False], bottom)
    np.testing.assert_allclose(bottom[0].diff, 1 / np.sqrt(4 + 1e-5), rtol=1e-6)


@pytest.mark.parametrize("shape", [(4,), ()])
def test_batchnorm_needs_num_and_channel_axes(shape):
    layer = make_layer('type: "BatchNorm"', TEST)
    with pytest.raises(Exception, match="num and channel axes"):
        setup_layer(layer, [np.zeros(shape)])


def test_scale_with_bias_logs_its_inner_bias_layer(tmp_path, caplog):
    """ScaleLayer::LayerSetUp makes its bias an internal Bias layer through the layer
    factory, which logs "Creating layer <name>" a second time (real BVLC Caffe's log,
    line for line); without a bias there is one such line."""
    import logging

    import caffelite as caffe
    path = tmp_path / "net.prototxt"
    lines = {}
    for bias in ("true", "false"):
        path.write_text('layer { name: "x" type: "Input" top: "x" input_param { shape { '
                        'dim: 1 dim: 2 } } }\nlayer { name: "s" type: "Scale" bottom: "x" '
                        f'top: "y" scale_param {{ bias_term: {bias} }} }}\n')
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="caffelite"):
            caffe.Net(str(path), caffe.TEST)
        lines[bias] = [r.getMessage() for r in caplog.records]
    start = lines["true"].index("Creating layer s")
    assert lines["true"][start:start + 6] == [
        "Creating layer s", "Creating Layer s", "s <- x", "s -> y", "Creating layer s",
        "Setting up s"]
    assert lines["false"].count("Creating layer s") == 1
