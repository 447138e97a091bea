"""SPP: level geometry derived by hand from Caffe's rule, forward against torch's pooling
(where torch accepts the padding) and against the literal transcription of Caffe's
pooling loops in test_pooling, top shapes for pyramid_height 1 and more, gradient checks
and errors for pyramids a bottom cannot hold."""
import math

import numpy as np
import pytest

from caffelite.layer import LayerError
from caffelite.layers.spp import level_geometry
from layer_testing import TEST, TRAIN, check_gradient, make_layer, run_forward, setup_layer
from test_pooling import distinct, reference


def spp(height, pool="MAX", phase=TEST, dtype=np.float64):
    return make_layer(f'type: "SPP" spp_param {{ pyramid_height: {height} pool: {pool} }}',
                      phase, dtype)


def forward(height, x, pool="MAX", dtype=np.float64):
    layer = spp(height, pool, dtype=dtype)
    bottom, top = setup_layer(layer, [x], dtype=dtype)
    return run_forward(layer, bottom, top)[0]


def test_level_geometry_by_hand():
    # H = 5: level 0 one 5-row window; level 1 kernel 3, 6 - 5 = 1 row short, pad
    # (1 + 1) / 2 = 1; level 2 kernel 2, 8 - 5 = 3 short, pad (3 + 1) / 2 = 2.
    assert level_geometry(0, 5, 7) == (5, 7, 0, 0)
    assert level_geometry(1, 5, 7) == (3, 4, 1, 1)
    assert level_geometry(2, 5, 7) == (2, 2, 2, 1)
    assert level_geometry(2, 8, 8) == (2, 2, 0, 0)


def test_top_shapes():
    x = distinct((2, 3, 6, 7))
    assert forward(1, x).shape == (2, 3, 1, 1)       # Caffe pools straight into the top
    assert forward(2, x).shape == (2, 3 * (1 + 4))
    assert forward(3, x).shape == (2, 3 * (1 + 4 + 16))


def caffe_geometry(level, height, width):
    """(kernel_h, kernel_w, pad_h, pad_w) as spp_layer.cpp's GetPoolingParam sets them."""
    num_bins = 2 ** level
    kernel_h, kernel_w = math.ceil(height / num_bins), math.ceil(width / num_bins)
    remainder_h, remainder_w = kernel_h * num_bins - height, kernel_w * num_bins - width
    return kernel_h, kernel_w, (remainder_h + 1) // 2, (remainder_w + 1) // 2


def torch_levels(x, height, pool):
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(x)
    out = []
    for level in range(height):
        kh, kw, ph, pw = caffe_geometry(level, *x.shape[2:])
        args = dict(kernel_size=(kh, kw), stride=(kh, kw), padding=(ph, pw), ceil_mode=True)
        if pool == "MAX":
            y = torch.nn.functional.max_pool2d(t, **args)
        else:
            y = torch.nn.functional.avg_pool2d(t, count_include_pad=True, **args)
        out.append(y.reshape(x.shape[0], -1).numpy())
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("hw", [(8, 8), (7, 6), (6, 7)])
def test_forward_matches_torch(pool, hw):
    # Shapes whose level pads stay within half a kernel, which torch requires.
    x = np.random.default_rng(3).standard_normal((2, 3) + hw)
    np.testing.assert_allclose(forward(3, x, pool), torch_levels(x, 3, pool), rtol=1e-12)


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("hw", [(6, 7), (3, 11), (5, 5), (13, 9)])
def test_forward_matches_caffe_loops(pool, hw):
    x = distinct((2, 2) + hw, seed=4)
    height = 3 if min(hw) >= 6 else 2
    expected = []
    for level in range(height):
        kh, kw, ph, pw = caffe_geometry(level, *hw)
        top, _ = reference(x, kh, kw, kh, kw, ph, pw, pool)
        expected.append(top.reshape(2, -1))
    np.testing.assert_allclose(forward(height, x, pool), np.concatenate(expected, axis=1),
                               rtol=1e-12)


def test_pyramid_height_one_is_a_whole_plane_pooling():
    x = distinct((2, 3, 5, 4))
    np.testing.assert_array_equal(forward(1, x)[:, :, 0, 0], x.max(axis=(2, 3)))
    np.testing.assert_allclose(forward(1, x, "AVE")[:, :, 0, 0], x.mean(axis=(2, 3)))


def test_float32():
    x = distinct((1, 2, 6, 5)).astype(np.float32)
    out = forward(2, x, dtype=np.float32)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :2], x.max(axis=(2, 3)))


def test_stochastic_test_phase_on_unpadded_levels():
    # 8x8 with 2 levels: no padding, so STOCHASTIC is allowed; at TEST each window gives
    # sum(x^2) / (FLT_MIN + sum(x)).
    x = np.random.default_rng(5).random((1, 2, 8, 8)) + 0.1
    out = forward(2, x, "STOCHASTIC")
    tiny = np.finfo(np.float32).tiny
    whole = (x ** 2).sum(axis=(2, 3)) / (tiny + x.sum(axis=(2, 3)))
    quads = x.reshape(1, 2, 2, 4, 2, 4)
    quad = (quads ** 2).sum(axis=(3, 5)) / (tiny + quads.sum(axis=(3, 5)))
    np.testing.assert_allclose(out, np.concatenate([whole, quad.reshape(1, -1)], axis=1))


def test_reshape_to_another_size_rebuilds_the_levels():
    layer = spp(2)
    x = distinct((1, 1, 4, 4))
    bottom, top = setup_layer(layer, [x])
    run_forward(layer, bottom, top)
    bottom[0].reshape((1, 1, 5, 3))
    y = distinct((1, 1, 5, 3), seed=9)
    bottom[0].data[...] = y
    out = run_forward(layer, bottom, top)[0]
    # Level 1 on 5x3: kernel 3x2, pad 1x1 -> 2x2 bins.
    top1, _ = reference(y, 3, 2, 3, 2, 1, 1, "MAX")
    np.testing.assert_array_equal(out, np.concatenate([[[y.max()]], top1.reshape(1, -1)], 1))


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("height", [1, 3])
def test_gradient(pool, height):
    layer = spp(height, pool)
    bottom, top = setup_layer(layer, [distinct((2, 2, 6, 7), seed=2)])
    check_gradient(layer, bottom, top)


def test_stochastic_train_gradient_goes_to_the_sampled_elements():
    layer = spp(2, "STOCHASTIC", phase=TRAIN)
    x = np.random.default_rng(6).random((1, 1, 4, 4)) + 0.1
    bottom, top = setup_layer(layer, [x])
    out = run_forward(layer, bottom, top)[0]
    assert np.isin(out, x).all()        # every output is one of the inputs
    top[0].diff[...] = 1
    layer.backward(top, [True], bottom)
    # Five windows (1 + 4), each routes 1 to its sample; the 2x2 windows are disjoint.
    assert bottom[0].diff.sum() == 5
    assert np.isin(out[0], x[0, 0][bottom[0].diff[0, 0] > 0]).all()


def test_errors():
    with pytest.raises(LayerError, match="'under_test' \\(SPP\\).*pyramid_height"):
        setup_layer(make_layer('type: "SPP" spp_param { pool: MAX }'), [np.zeros((1, 1, 4, 4))])
    # 4 bins over 3 rows: kernel 1 with pad 1; over 5 rows kernel 2 with pad 2. Caffe's
    # Pooling refuses a pad that is not smaller than the kernel.
    for hw in ((3, 8), (5, 8)):
        with pytest.raises(LayerError, match=f"SPP.*level 2 \\(4 bins\\).*{hw[0]}x8"):
            setup_layer(spp(3), [np.zeros((1, 1) + hw)])
    with pytest.raises(LayerError, match="SPP.*level 1.*STOCHASTIC"):
        setup_layer(spp(2, "STOCHASTIC"), [np.zeros((1, 1, 5, 5))])
    with pytest.raises(LayerError, match="SPP.*4 axes"):
        setup_layer(spp(2), [np.zeros((1, 4, 4))])
