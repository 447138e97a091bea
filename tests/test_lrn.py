"""LRN: OpenCV's Caffe importer as forward oracle (k = 1), float64 formulas from Caffe's
definition, gradient checks for both regions, bad params.

OpenCV deviation (checked against OpenCV 4.14): its Caffe importer does not read
``lrn_param.k`` (it always uses a bias of 1), so for ACROSS_CHANNELS with k != 1 the
oracle is the formula instead. For WITHIN_CHANNEL Caffe itself ignores k (its internal
Power layer has shift 1), so OpenCV agrees there for any k.
"""
import subprocess

import numpy as np
import pytest

from caffelite.blob import Blob
from caffelite.layer import LayerError
from conftest import compile_oracle
from layer_testing import make_layer, setup_layer, run_forward, check_gradient, opencv_forward


def lrn_text(body):
    return f'type: "LRN" lrn_param {{ {body} }}'


def ours(body, x, dtype=np.float32):
    layer = make_layer(lrn_text(body), dtype=dtype)
    bottom, top = setup_layer(layer, [x], dtype=dtype)
    return run_forward(layer, bottom, top)[0]


def opencv(body, x):
    net = ('input: "data"\n' + "".join(f"input_dim: {d}\n" for d in x.shape) +
           f'layer {{ name: "out" bottom: "data" top: "out" {lrn_text(body)} }}\n')
    return opencv_forward(net, [], {"data": x}, ["out"])[0]


def across_formula(x, size, alpha, beta, k):
    c = x.shape[1]
    half = (size - 1) // 2
    sq = np.pad(x ** 2, ((0, 0), (half, half), (0, 0), (0, 0)))
    window = sum(sq[:, j:j + c] for j in range(size))
    return x * (k + alpha / size * window) ** -beta


def within_formula(x, size, alpha, beta):
    h, w = x.shape[2:]
    half = (size - 1) // 2
    sq = np.pad(x ** 2, ((0, 0), (0, 0), (half, half), (half, half)))
    window = sum(sq[:, :, i:i + h, j:j + w] for i in range(size) for j in range(size))
    return x * (1 + alpha * window / (size * size)) ** -beta


OPENCV_CASES = [
    "local_size: 3 alpha: 5e-5 beta: 0.75 norm_region: WITHIN_CHANNEL",   # cifar10_full
    "local_size: 5 alpha: 0.1 beta: 0.75 norm_region: WITHIN_CHANNEL",
    "local_size: 3 alpha: 0.3 beta: 0.6 k: 2 norm_region: WITHIN_CHANNEL",
    "local_size: 5 alpha: 1e-4 beta: 0.75",                                # AlexNet norm1
    "local_size: 5 alpha: 0.1 beta: 0.75",
    "local_size: 3 alpha: 0.5 beta: 0.9",
    "local_size: 9 alpha: 0.5 beta: 0.5",                                  # window > C
]


@pytest.mark.parametrize("body", OPENCV_CASES)
def test_forward_matches_opencv(body):
    x = (np.random.default_rng(0).standard_normal((2, 7, 9, 10)) * 3).astype(np.float32)
    got = ours(body, x)
    want = opencv(body, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(x).max())


@pytest.mark.parametrize("size,alpha,beta,k", [(5, 1.0, 0.75, 1.0), (3, 0.3, 0.6, 2.0),
                                               (7, 2.0, 1.3, 0.5)])
def test_across_channels_formula(size, alpha, beta, k):
    x = np.random.default_rng(1).standard_normal((2, 6, 4, 5)) * 2
    body = f"local_size: {size} alpha: {alpha} beta: {beta} k: {k}"
    np.testing.assert_allclose(ours(body, x, np.float64), across_formula(x, size, alpha, beta, k),
                               rtol=1e-6)     # alpha/beta/k are float32 in the proto
    got32 = ours(body, x.astype(np.float32))
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, across_formula(x, size, alpha, beta, k), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("size,alpha,beta", [(3, 5e-5, 0.75), (5, 0.7, 0.9), (1, 0.5, 0.5)])
def test_within_channel_formula_ignores_k(size, alpha, beta):
    x = np.random.default_rng(2).standard_normal((2, 3, 6, 7)) * 2
    want = within_formula(x, size, alpha, beta)
    for k in (1.0, 3.0):
        body = f"local_size: {size} alpha: {alpha} beta: {beta} k: {k} norm_region: WITHIN_CHANNEL"
        np.testing.assert_allclose(ours(body, x, np.float64), want, rtol=1e-6)


GRAD_CASES = [
    "local_size: 5 alpha: 1.0 beta: 0.75",
    "local_size: 3 alpha: 0.8 beta: 0.6 k: 2",
    "local_size: 7 alpha: 1.5 beta: 1.2",           # window wider than the channels
    "local_size: 3 alpha: 1.0 beta: 0.75 norm_region: WITHIN_CHANNEL",
    "local_size: 5 alpha: 2.0 beta: 0.9 norm_region: WITHIN_CHANNEL",
    "local_size: 3 alpha: 5e-5 beta: 0.75 norm_region: WITHIN_CHANNEL",
]


@pytest.mark.parametrize("body", GRAD_CASES)
def test_gradient(body):
    x = np.random.default_rng(3).standard_normal((2, 5, 4, 4))
    layer = make_layer(lrn_text(body))
    bottom, top = setup_layer(layer, [x])
    check_gradient(layer, bottom, top, step=1e-3)


@pytest.fixture(scope="module")
def fork_lrn(tmp_path_factory):
    """tests/oracles/lrn_oracle.cpp: the fork's CPU loops for ACROSS_CHANNELS, compiled."""
    exe = compile_oracle(tmp_path_factory, "lrn_oracle", "-std=gnu++98",
                         why="the LRN oracle")

    def run(x, dy, size, alpha, beta, k):
        args = [exe, *map(str, x.shape), str(size), repr(alpha), repr(beta), repr(k)]
        data = np.float32(x).tobytes() + np.float32(dy).tobytes()
        out = np.frombuffer(subprocess.run(args, input=data, check=True,
                                           capture_output=True).stdout, np.float32)
        return out[:x.size].reshape(x.shape), out[x.size:].reshape(x.shape)
    return run


@pytest.mark.parametrize("shape,size,alpha,beta,k", [
    ((2, 16, 6, 5), 5, 1e-4, 0.75, 1.0),          # AlexNet's norm1 parameters
    ((1, 7, 3, 4), 3, 0.5, 0.9, 2.0),
    ((2, 4, 5, 5), 9, 0.5, 0.5, 1.0),             # window wider than the channels
    ((1, 5, 2, 3), 1, 0.3, 0.6, 0.5),
])
def test_across_channels_is_the_forks_cpu_arithmetic(fork_lrn, shape, size, alpha, beta, k):
    """Bit for bit against the fork's loops: running window sums, rounded at each axpy."""
    rng = np.random.default_rng(size)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    layer = make_layer(lrn_text(f"local_size: {size} alpha: {alpha} beta: {beta} k: {k}"),
                       dtype=np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    y = run_forward(layer, bottom, top)[0]
    top[0].diff[...] = dy
    bottom[0].diff[...] = np.nan
    layer.backward(top, [True], bottom)
    want_y, want_dx = fork_lrn(x, dy, size, alpha, beta, k)
    assert np.array_equal(y.view(np.uint32), want_y.view(np.uint32))
    assert np.array_equal(bottom[0].diff.view(np.uint32), want_dx.view(np.uint32))


def _pow_as_the_fork(a, b):
    """caffe_powx's ``pow(a[i], b)``: C's double pow of floats, rounded to float."""
    return np.float32(np.power(np.float64(a), np.float64(b)))


def within_channel_caffe_chain(x, dy, size, alpha, beta):
    """WITHIN_CHANNEL as the fork composes it, transcribed loop by loop in float32 (Split,
    Power(2), Pooling AVE with pad (size-1)/2 and stride 1, Power(-beta, alpha, 1),
    Eltwise PROD; then their CPU backwards in reverse), independent of lrn.py."""
    f = np.float32
    n, c, h, w = x.shape
    pad = (size - 1) // 2
    square = np.empty_like(x)
    for i in np.ndindex(x.shape):
        square[i] = _pow_as_the_fork(x[i], 2.0)
    pooled = np.empty_like(x)
    windows = {}
    for a, b, ph, pw in np.ndindex(x.shape):
        hs, ws = ph - pad, pw - pad
        he, we = min(hs + size, h + pad), min(ws + size, w + pad)
        pool_size = (he - hs) * (we - ws)
        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
        total = f(0)
        for yy in range(hs, he):
            for xx in range(ws, we):
                total = f(total + square[a, b, yy, xx])
        pooled[a, b, ph, pw] = f(total / f(pool_size))
        windows[a, b, ph, pw] = (hs, he, ws, we, pool_size)
    power = np.empty_like(x)
    for i in np.ndindex(x.shape):
        power[i] = _pow_as_the_fork(f(f(pooled[i] * f(alpha)) + f(1)), -float(f(beta)))
    top = (x * power).astype(f)
    # Backward: Eltwise PROD, Power(-beta, alpha, 1), Pooling AVE, Power(2), Split.
    d_prod_x = (power * dy).astype(f)
    d_power = (x * dy).astype(f)
    diff_scale = f(f(-f(beta)) * f(alpha))
    d_pooled = np.empty_like(x)
    for i in np.ndindex(x.shape):
        slope = f(f(power[i] / f(f(pooled[i] * f(alpha)) + f(1))) * diff_scale)
        d_pooled[i] = f(d_power[i] * slope)
    d_square = np.zeros_like(x)
    for (a, b, ph, pw), (hs, he, ws, we, pool_size) in windows.items():
        for yy in range(hs, he):
            for xx in range(ws, we):
                d_square[a, b, yy, xx] = f(d_square[a, b, yy, xx]
                                           + f(d_pooled[a, b, ph, pw] / f(pool_size)))
    d_square_x = (d_square * (f(2) * x).astype(f)).astype(f)
    return top, (d_prod_x + d_square_x).astype(f)


@pytest.mark.parametrize("shape,size,alpha,beta", [
    ((2, 3, 5, 6), 3, 5e-5, 0.75),               # cifar10_full's norm1
    ((1, 2, 7, 4), 5, 0.7, 0.6),
    ((1, 2, 3, 3), 7, 2.0, 0.9),                 # window wider than the plane
])
def test_within_channel_is_the_forks_layer_chain_bit_for_bit(shape, size, alpha, beta):
    rng = np.random.default_rng(size)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    x.flat[0] = -0.0
    dy = rng.standard_normal(shape).astype(np.float32)
    layer = make_layer(lrn_text(f"local_size: {size} alpha: {alpha} beta: {beta} "
                                f"norm_region: WITHIN_CHANNEL"), dtype=np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    y = run_forward(layer, bottom, top)[0]
    top[0].diff[...] = dy
    bottom[0].diff[...] = np.nan
    layer.backward(top, [True], bottom)
    want_y, want_dx = within_channel_caffe_chain(x, dy, size, alpha, beta)
    assert np.array_equal(y.view(np.uint32), want_y.view(np.uint32))
    assert np.array_equal(bottom[0].diff.view(np.uint32), want_dx.view(np.uint32))


@pytest.mark.parametrize("body,words", [
    ("local_size: 4", "odd"),
    ("local_size: 0", "odd"),
])
def test_bad_params(body, words):
    with pytest.raises(LayerError, match=words):
        setup_layer(make_layer(lrn_text(body)), [np.zeros((1, 3, 4, 4))])


def test_needs_4d_bottom_and_refuses_in_place():
    with pytest.raises(LayerError, match="4 axes"):
        setup_layer(make_layer(lrn_text("local_size: 3")), [np.zeros((3, 4, 4))])
    layer = make_layer(lrn_text("local_size: 3"))
    blob = Blob((1, 3, 4, 4), np.float64)
    layer.setup([blob], [blob])
    with pytest.raises(LayerError, match="in place"):
        layer.reshape([blob], [blob])
