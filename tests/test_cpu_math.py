"""Layers whose fork CPU code calls C's exp/log/tanh/pow, bit for bit against those
expressions compiled with g++ (tests/oracles/cpu_math_oracle.cpp): a float promoted
to double, the rest of the expression in double, one rounding to float at the store;
loss loops adding each double term into a float accumulator."""
import subprocess

import numpy as np
import pytest

from caffelite.layers._cpu_math import sequential_sum
from conftest import compile_oracle
from layer_testing import TRAIN, make_layer, run_forward, setup_layer

F32 = np.float32


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    exe = compile_oracle(tmp_path_factory, "cpu_math_oracle", "-std=gnu++98",
                         why="the CPU math oracle")

    def run(op, a, b=None, param=None):
        a = np.ascontiguousarray(a, F32).ravel()
        data = a.tobytes()
        if b is not None:
            data += np.ascontiguousarray(b, F32).ravel().tobytes()
        args = [exe, op, str(a.size)] + ([repr(float(param))] if param is not None else [])
        out = subprocess.run(args, input=data, check=True, capture_output=True).stdout
        return np.frombuffer(out, F32)
    return run


def inputs(seed, shape=(4, 5, 6, 7), spread=4.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * spread).astype(F32)


def forward(text, x, phase=TRAIN):
    layer = make_layer(text, phase, F32)
    bottom, top = setup_layer(layer, [x], 1, F32)
    (y,) = run_forward(layer, bottom, top)
    return layer, bottom, top, y


def backward(layer, bottom, top, dy):
    top[0].diff[...] = dy
    bottom[0].diff[...] = np.nan
    layer.backward(top, [True], bottom)
    return bottom[0].diff.copy()


def same(a, b):
    a, b = np.asarray(a, F32).ravel(), np.asarray(b, F32).ravel()
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("seed", [0, 1])
def test_sigmoid_forward_and_backward(oracle, seed):
    x = inputs(seed, spread=6.0)
    layer, bottom, top, y = forward('name: "s" type: "Sigmoid"', x)
    assert same(y, oracle("sigmoid", x))
    dy = inputs(seed + 10)
    assert same(backward(layer, bottom, top, dy), oracle("sigmoid_backward", dy, y))


def test_tanh_forward(oracle):
    x = inputs(2, spread=2.0)
    assert same(forward('name: "t" type: "TanH"', x)[3], oracle("tanh", x))


def test_elu_forward(oracle):
    x = inputs(3)
    y = forward('name: "e" type: "ELU" elu_param { alpha: 0.7 }', x)[3]
    assert same(y, oracle("elu", x, param=F32(0.7)))


def test_bnll_forward_and_backward(oracle):
    x = inputs(4, spread=20.0)
    layer, bottom, top, y = forward('name: "b" type: "BNLL"', x)
    assert same(y, oracle("bnll", x))
    dy = inputs(5)
    assert same(backward(layer, bottom, top, dy), oracle("bnll_backward", dy, x))


def test_exp_log_and_power_layers_use_cs_functions(oracle):
    x = inputs(6, spread=3.0)
    assert same(forward('name: "e" type: "Exp"', x)[3], oracle("exp", x))
    positive = np.abs(x) + F32(1e-3)
    assert same(forward('name: "l" type: "Log"', positive)[3], oracle("log", positive))
    y = forward('name: "p" type: "Power" power_param { power: 1.7 }', positive)[3]
    assert same(y, oracle("powx", positive, param=F32(1.7)))


def test_softmax_takes_cs_exp(oracle):
    x = inputs(7, shape=(3, 2, 5, 4))
    y = forward('name: "s" type: "Softmax"', x, phase=1)[3]
    assert same(y[:, 0], oracle("softmax2", x[:, 0], x[:, 1]).reshape(3, 5, 4))


def test_softmax_loss_adds_double_logs_into_a_float(oracle):
    """Caffe's `loss -= log(max(p, FLT_MIN))` over the counted positions in order, then
    loss / count; a pairwise float sum is off in the 6th digit at this size."""
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((6, 21, 41, 41)) * 3).astype(F32)
    labels = rng.integers(0, 21, (6, 1, 41, 41)).astype(F32)
    labels[:, :, :5] = 255
    layer = make_layer('name: "l" type: "SoftmaxWithLoss" loss_param { ignore_label: 255 }',
                       TRAIN, F32)
    bottom, top = setup_layer(layer, [x, labels], 1, F32)
    (loss,) = run_forward(layer, bottom, top)
    lab = labels.reshape(6, -1).astype(np.int64)
    valid = lab != 255
    prob = layer.prob.reshape(6, 21, -1)
    p_true = np.take_along_axis(prob, np.where(valid, lab, 0)[:, None, :], axis=1)[:, 0]
    total = oracle("softmax_loss_sum", p_true[valid])[0]
    assert same(loss, total / F32(valid.sum()))


def test_sigmoid_cross_entropy_loss_loop(oracle):
    x = inputs(9, shape=(5, 300), spread=5.0)
    t = np.random.default_rng(10).random((5, 300)).astype(F32)
    layer = make_layer('name: "l" type: "SigmoidCrossEntropyLoss"', TRAIN, F32)
    bottom, top = setup_layer(layer, [x, t], 1, F32)
    (loss,) = run_forward(layer, bottom, top)
    assert same(loss, oracle("sigmoid_cross_entropy_sum", x, t)[0] / F32(5))


def test_sequential_sum_is_the_loop_at_scale(oracle):
    """The blockwise float accumulate (with its redone blocks) against the compiled loop
    over half a million positions, including probabilities below FLT_MIN."""
    rng = np.random.default_rng(11)
    p = rng.uniform(0, 1, 500_000).astype(F32) ** 3
    p[::1000] = F32(1e-39)
    nll = -np.log(np.maximum(p, np.finfo(F32).tiny).astype(np.float64))
    assert same(sequential_sum(nll, F32), oracle("softmax_loss_sum", p)[0])


def test_sequential_sum_with_a_nan_or_inf_is_one_pass(monkeypatch):
    """A NaN stays NaN through the loop: the blockwise check takes NaN == NaN as agreeing
    instead of redoing the block step by step (a diverged net's loss took seconds)."""
    from caffelite.layers import _cpu_math
    calls = []
    real = _cpu_math._accumulate
    monkeypatch.setattr(_cpu_math, "_accumulate",
                        lambda *a: (calls.append(1), real(*a))[1])
    values = np.random.default_rng(12).uniform(0, 3, 3 * _cpu_math._BLOCK)
    values[10] = np.nan
    assert np.isnan(sequential_sum(values, F32))
    assert len(calls) < 10
    values[10], values[20], values[30] = np.inf, -np.inf, 1.0
    calls.clear()
    assert np.isnan(sequential_sum(values, F32)) and len(calls) < 10
    values[20] = 1.0
    assert sequential_sum(values, F32) == np.inf
