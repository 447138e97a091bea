"""InnerProduct: OpenCV forward parity (axis 1 and 2), a numpy matmul oracle for
``transpose`` (which OpenCV's importer ignores), gradients, shapes and errors."""
import numpy as np
import pytest

from caffelite.layer import LayerError
from layer_testing import (blobs_from, check_gradient, make_layer, opencv_forward,
                           run_forward, setup_layer)

F32 = np.float32


def ip_layer(param, dtype=np.float64):
    return make_layer(f'type: "InnerProduct" inner_product_param {{ {param} }}', dtype=dtype)


def randomize(layer, rng):
    for blob in layer.blobs:
        blob.data[...] = rng.standard_normal(blob.shape)


def opencv_ip(param, x, weights):
    dims = " ".join(f"dim: {d}" for d in x.shape)
    net = (f'input: "data" input_shape {{ {dims} }}\n'
           f'layer {{ name: "out" type: "InnerProduct" bottom: "data" top: "out" '
           f'inner_product_param {{ {param} }} }}\n')
    return opencv_forward(net, [("out", "InnerProduct", weights)], {"data": x}, ["out"])[0]


@pytest.mark.parametrize("param,shape,top_shape", [
    ("num_output: 7", (3, 4, 5, 6), (3, 7)),
    ("num_output: 5 axis: 2", (2, 4, 3, 6), (2, 4, 5)),
    ("num_output: 4 bias_term: false", (2, 10), (2, 4)),
])
def test_forward_matches_opencv(param, shape, top_shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(F32)
    layer = ip_layer(param, F32)
    bottom, top = setup_layer(layer, [x], dtype=F32)
    randomize(layer, rng)
    y = run_forward(layer, bottom, top)[0]
    assert y.shape == top_shape and y.dtype == F32
    weights = [b.data for b in layer.blobs]
    ref = opencv_ip(param, x, weights)
    np.testing.assert_allclose(y, ref.reshape(top_shape), rtol=1e-5,
                               atol=1e-5 * max(1.0, np.abs(ref).max()))


def test_transpose_matches_numpy_matmul():
    # OpenCV's Caffe importer does not honour transpose (it reads the weights as (N, K)),
    # so the oracle is the definition: weights stored (K, N), top = bottom(M, K) @ W + b.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 4, 5))
    layer = ip_layer("num_output: 6 transpose: true axis: 1")
    bottom, top = setup_layer(layer, [x])
    assert layer.blobs[0].shape == (40, 6)
    randomize(layer, rng)
    y = run_forward(layer, bottom, top)[0]
    w, b = layer.blobs[0].data, layer.blobs[1].data
    np.testing.assert_allclose(y, x.reshape(3, 40) @ w + b, rtol=1e-12)
    # transpose: true with W equals transpose: false with W^T
    plain = ip_layer("num_output: 6")
    pb, pt = setup_layer(plain, [x])
    plain.blobs[0].data[...] = w.T
    plain.blobs[1].data[...] = b
    np.testing.assert_allclose(run_forward(plain, pb, pt)[0], y, rtol=1e-12)


def test_weight_shapes_and_default_fillers():
    layer = ip_layer("num_output: 3 axis: -2", F32)
    setup_layer(layer, [np.zeros((2, 5, 4, 3), F32)], dtype=F32)
    assert [b.shape for b in layer.blobs] == [(3, 12), (3,)]
    assert all(not b.data.any() and b.dtype == F32 for b in layer.blobs)
    layer = ip_layer('num_output: 3 weight_filler { type: "constant" value: 0.5 } '
                     'bias_filler { type: "constant" value: 2 }')
    _, top = setup_layer(layer, [np.ones((2, 4))])
    assert top[0].shape == (2, 3)
    np.testing.assert_array_equal(layer.blobs[0].data, 0.5)
    np.testing.assert_array_equal(layer.blobs[1].data, 2.0)


@pytest.mark.parametrize("param,shape", [
    ("num_output: 3", (2, 3, 2, 2)),
    ("num_output: 4 axis: 2", (2, 3, 5)),
    ("num_output: 3 transpose: true", (3, 2, 3)),
    ("num_output: 2 axis: 2 transpose: true bias_term: false", (2, 2, 3, 2)),
    ("num_output: 3 axis: 0", (2, 3)),
])
def test_gradient(param, shape):
    rng = np.random.default_rng(2)
    layer = ip_layer(param)
    bottom, top = setup_layer(layer, [rng.standard_normal(shape)])
    randomize(layer, rng)
    check_gradient(layer, bottom, top)


def test_param_diffs_accumulate():
    rng = np.random.default_rng(3)
    layer = ip_layer("num_output: 2")
    bottom, top = setup_layer(layer, [rng.standard_normal((3, 4))])
    randomize(layer, rng)
    run_forward(layer, bottom, top)
    top[0].diff[...] = rng.standard_normal(top[0].shape)
    for blob in layer.blobs:
        blob.diff[...] = 1.0
    layer.backward(top, [False], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, 1.0 + top[0].diff.T @ bottom[0].data)
    np.testing.assert_allclose(layer.blobs[1].diff, 1.0 + top[0].diff.sum(axis=0))


@pytest.mark.parametrize("param,shape,needle", [
    ("bias_term: true", (2, 3), "num_output"),
    ("num_output: 2 axis: 3", (2, 3), "axis"),
    ('num_output: 2 weight_filler { type: "bilinear" }', (2, 3), "bilinear"),
])
def test_bad_params_raise_clear_errors(param, shape, needle):
    with pytest.raises(LayerError, match=needle):
        setup_layer(ip_layer(param), [np.zeros(shape)])


def test_reshape_rejects_a_different_input_size():
    layer = ip_layer("num_output: 2")
    _, top = setup_layer(layer, [np.zeros((2, 3, 4))])
    layer.reshape(blobs_from([np.zeros((5, 12))]), top)     # same K: fine
    assert top[0].shape == (5, 2)
    with pytest.raises(LayerError, match="incompatible"):
        layer.reshape(blobs_from([np.zeros((2, 3, 5))]), top)
