"""Solvers: update rules against float64 re-derivations of Caffe's formulas, lr
policies, iter_size, clipping, sharing, test passes, log lines, snapshots and resume."""
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess

import numpy as np
import pytest
from google.protobuf import text_format

from caffelite import backend
from caffelite.io import prototxt
from caffelite.layer import Layer, register
from caffelite.log import GlogFormatter, logger
from caffelite.proto import caffe_pb2
from caffelite.solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver,
                              RMSPropSolver, SGDSolver, Solver, SolverError, get_solver,
                              install_signal_handlers, learning_rate)
from conftest import compile_oracle, corpus_path

N, K, M = 4, 3, 2     # batch, input features, outputs of the InnerProduct

IP_NET = '''
name: "ipnet"
layer { name: "data" type: "Input" top: "x" top: "y"
  input_param { shape { dim: %(n)d dim: %(k)d } shape { dim: %(n)d dim: %(m)d } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
  param { lr_mult: %(w_lr)s decay_mult: %(w_decay)s }
  param { lr_mult: %(b_lr)s decay_mult: %(b_decay)s }
  inner_product_param { num_output: %(m)d
    weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.2 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "loss" }
'''


def ip_net(w_lr=1, w_decay=1, b_lr=2, b_decay=0, n=N, k=K, m=M):
    return IP_NET % dict(w_lr=w_lr, w_decay=w_decay, b_lr=b_lr, b_decay=b_decay, n=n, k=k, m=m)


def make_solver(tmp_path, solver_text, net_text, cls=Solver, name="solver.prototxt",
                defines=None):
    net_path = tmp_path / "net.prototxt"
    net_path.write_text(net_text)
    path = tmp_path / name
    path.write_text(f'net: "{net_path}"\n' + solver_text)
    return cls(str(path), defines=defines) if defines else cls(str(path))


def set_inputs(solver, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=solver.net.blobs["x"].shape).astype(np.float32)
    y = rng.normal(size=solver.net.blobs["y"].shape).astype(np.float32)
    solver.net.blobs["x"].data[...] = x
    solver.net.blobs["y"].data[...] = y
    return x.astype(np.float64), y.astype(np.float64)


def euclidean_ip_grads(w, b, x, y, paths=1):
    """d/dW, d/db of sum((paths * (x W^T + b) - y)^2) / (2 N), in float64."""
    d = paths * (x @ w.T + b) - y
    return paths * d.T @ x / len(x), paths * d.sum(0) / len(x)


@pytest.fixture
def log_lines():
    """Collect caffelite's log lines (glog-formatted) during a test."""
    lines = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(GlogFormatter())
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(old_level)
    logger.propagate = old_propagate


# ------------------------------------------------------------------ reference updates
def reference_lr(p, it):
    """Caffe's lr policies (sgd_solver.cpp) in float64; multistep from its definition."""
    if p["policy"] == "fixed":
        return p["base_lr"]
    if p["policy"] == "step":
        return p["base_lr"] * p["gamma"] ** (it // p["stepsize"])
    raise AssertionError(p["policy"])


def reference_run(kind, hp, w, b, x, y, iters, lr_mults, decay_mults):
    """Run ``iters`` updates of solver ``kind`` in float64 from Caffe's formulas."""
    params = [w.copy(), b.copy()]
    hist = [np.zeros_like(q) for q in params]
    hist2 = [np.zeros_like(q) for q in params]
    for it in range(iters):
        grads = list(euclidean_ip_grads(params[0], params[1], x, y))
        rate = reference_lr(hp, it)
        for i, (q, g) in enumerate(zip(params, grads)):
            decay = hp.get("weight_decay", 0.0) * decay_mults[i]
            reg = np.sign(q) if hp.get("regularization") == "L1" else q
            g = g + decay * reg
            lr = rate * lr_mults[i]
            m, delta = hp.get("momentum", 0.0), hp.get("delta", 1e-8)
            if kind == "SGD":
                hist[i] = m * hist[i] + lr * g
                step = hist[i]
            elif kind == "Nesterov":
                old = hist[i]
                hist[i] = m * old + lr * g
                step = (1 + m) * hist[i] - m * old
            elif kind == "AdaGrad":
                hist[i] = hist[i] + g ** 2
                step = lr * g / (np.sqrt(hist[i]) + delta)
            elif kind == "RMSProp":
                d = hp["rms_decay"]
                hist[i] = d * hist[i] + (1 - d) * g ** 2
                step = lr * g / (np.sqrt(hist[i]) + delta)
            elif kind == "AdaDelta":
                hist[i] = m * hist[i] + (1 - m) * g ** 2
                u = g * np.sqrt((hist2[i] + delta) / (hist[i] + delta))
                hist2[i] = m * hist2[i] + (1 - m) * u ** 2
                step = lr * u
            elif kind == "Adam":
                b1, b2, t = m, hp["momentum2"], it + 1
                hist[i] = b1 * hist[i] + (1 - b1) * g
                hist2[i] = b2 * hist2[i] + (1 - b2) * g ** 2
                step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * hist[i] / (
                    np.sqrt(hist2[i]) + delta)
            params[i] = q - step
    return params, hist, hist2


CASES = {
    "SGD": ("SGD", dict(policy="step", base_lr=0.1, gamma=0.5, stepsize=2, momentum=0.9,
                        weight_decay=0.05)),
    "SGD-L1": ("SGD", dict(policy="fixed", base_lr=0.05, momentum=0.8, weight_decay=0.1,
                           regularization="L1")),
    "Nesterov": ("Nesterov", dict(policy="fixed", base_lr=0.05, momentum=0.9,
                                  weight_decay=0.01)),
    "AdaGrad": ("AdaGrad", dict(policy="fixed", base_lr=0.1, weight_decay=0.01, delta=1e-6)),
    "RMSProp": ("RMSProp", dict(policy="fixed", base_lr=0.01, rms_decay=0.9, delta=1e-6,
                                weight_decay=0.01)),
    "AdaDelta": ("AdaDelta", dict(policy="fixed", base_lr=1.0, momentum=0.95, delta=1e-6,
                                  weight_decay=0.01)),
    "Adam": ("Adam", dict(policy="fixed", base_lr=0.01, momentum=0.9, momentum2=0.999,
                          delta=1e-8, weight_decay=0.01)),
}


def solver_text(kind, hp, extra=""):
    lines = [f'type: "{kind}"', f'lr_policy: "{hp["policy"]}"', f'base_lr: {hp["base_lr"]}']
    for key in ("gamma", "stepsize", "momentum", "weight_decay", "delta", "rms_decay",
                "momentum2"):
        if key in hp:
            lines.append(f"{key}: {hp[key]}")
    if "regularization" in hp:
        lines.append(f'regularization_type: "{hp["regularization"]}"')
    return "\n".join(lines) + "\nrandom_seed: 11\n" + extra


@pytest.mark.parametrize("case", list(CASES))
def test_update_rule_matches_float64_reference(tmp_path, case):
    kind, hp = CASES[case]
    s = make_solver(tmp_path, solver_text(kind, hp), ip_net(w_lr=1, w_decay=1, b_lr=2,
                                                                b_decay=0.5))
    assert type(s).type == kind
    x, y = set_inputs(s)
    w0, b0 = (blob.data.astype(np.float64) for blob in s.net.params["ip"])
    s.step(3)
    assert s.iter == 3
    (w, b), hist, hist2 = reference_run(kind, hp, w0, b0, x, y, 3, [1, 2], [1, 0.5])
    np.testing.assert_allclose(s.net.params["ip"][0].data, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.net.params["ip"][1].data, b, rtol=1e-5, atol=1e-6)
    # History layout: one blob per learnable param, AdaDelta/Adam append a second set.
    expected = hist + (hist2 if kind in ("AdaDelta", "Adam") else [])
    assert len(s.history) == len(expected)
    # rtol: Adam's 1 - momentum2 is 1.3e-5 off in float32 (0.999 rounded). atol, for an
    # element near zero (a momentum's terms cancelling): float32 leaves errors of a few
    # ulps of the blob's scale; 1e-6 of it is 16 ulps (AdaDelta's second history is ~3e-6)
    for got, want in zip(s.history, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_sgd_follows_caffes_float32_operation_order(tmp_path):
    """axpby = scale then axpy; local_rate = rate * lr_mult rounded to float32; the
    iter_size normalisation multiplies by the float32 reciprocal."""
    hp = dict(policy="fixed", base_lr=0.1, momentum=0.9, weight_decay=0.0005)
    s = make_solver(tmp_path, solver_text("SGD", hp, "iter_size: 3\n"),
                    ip_net(w_lr=10, w_decay=1, b_lr=20, b_decay=0))
    f = np.float32
    rng = np.random.default_rng(5)
    for step in range(2):
        before = [(p.blob.data.copy(), s.history[i].copy())
                  for i, p in enumerate(s.net.learnable_params)]
        grads = []
        for p in s.net.learnable_params:
            p.blob.diff[...] = rng.normal(size=p.blob.shape).astype(np.float32)
            grads.append(p.blob.diff.copy())
        s.apply_update()
        for (w, h), g, p, lr_mult, decay_mult in zip(before, grads, s.net.learnable_params,
                                                     (10, 20), (1, 0)):
            g = g * (f(1) / f(3))
            if decay_mult:
                g = g + f(f(0.0005) * f(decay_mult)) * w
            local_rate = f(f(0.1) * f(lr_mult))
            h = h * f(0.9)
            h = h + local_rate * g
            assert h.dtype == np.float32
            assert np.array_equal(p.blob.data, w - h)


# ------------------------------------------------------------------ learning rates
def lr_param(**fields):
    p = caffe_pb2.SolverParameter(base_lr=0.01)
    for k, v in fields.items():
        if k == "stepvalue":
            p.stepvalue.extend(v)
        else:
            setattr(p, k, v)
    return p


@pytest.mark.parametrize("policy, fields, formula", [
    ("fixed", {}, lambda it: 0.01),
    ("step", dict(gamma=0.1, stepsize=3), lambda it: 0.01 * 0.1 ** (it // 3)),
    ("exp", dict(gamma=0.95), lambda it: 0.01 * 0.95 ** it),
    ("inv", dict(gamma=1e-4, power=0.75), lambda it: 0.01 * (1 + 1e-4 * it) ** -0.75),
    ("poly", dict(power=0.9, max_iter=20), lambda it: 0.01 * (1 - it / 20) ** 0.9),
    ("sigmoid", dict(gamma=-0.5, stepsize=10),
     lambda it: 0.01 / (1 + math.exp(0.5 * (it - 10)))),
])
def test_lr_policies(policy, fields, formula):
    p = lr_param(lr_policy=policy, **fields)
    for it in (0, 1, 2, 3, 7, 10, 19, 20):
        rate, _ = learning_rate(p, it)
        assert rate.dtype == np.float32
        assert rate == pytest.approx(formula(it), rel=1e-6, abs=1e-12), (policy, it)


@pytest.fixture(scope="module")
def lr_oracle(tmp_path_factory):
    """tests/oracles/lr_oracle.cpp: the fork's GetLearningRate and Adam correction
    expressions, compiled; g++ and the C library then decide every conversion."""
    exe = compile_oracle(tmp_path_factory, "lr_oracle", why="the learning-rate oracle")

    def run(policy, base_lr, gamma, power, stepsize, max_iter, it, beta1, beta2):
        out = subprocess.run([exe, policy] + [repr(float(v)) for v in (
            base_lr, gamma, power)] + [str(stepsize), str(max_iter), str(it),
                                       repr(float(beta1)), repr(float(beta2))],
            check=True, capture_output=True, text=True).stdout.split()
        return [float.fromhex(v) for v in out]
    return run


@pytest.mark.parametrize("policy", ["fixed", "step", "exp", "inv", "poly", "sigmoid"])
def test_lr_policies_match_the_compiled_expressions(lr_oracle, policy):
    """Bit for bit, for float and double nets, at iterations where last-bit rounding of
    the float fields, the casts and pow/exp all matter."""
    fields = dict(base_lr=np.float32(2.5e-4), gamma=np.float32(0.3 if policy == "sigmoid"
                                                               else 0.93),
                  power=np.float32(0.9), stepsize=7, max_iter=20000)
    p = lr_param(lr_policy=policy, **fields)
    for it in (0, 1, 3, 7, 13, 999, 6001, 19999):
        expected = lr_oracle(policy, *fields.values(), it, 0.9, 0.999)
        for dtype, want in ((np.float32, expected[0]), (np.float64, expected[1])):
            rate, _ = learning_rate(p, it, dtype=dtype)
            assert float(rate) == want, (policy, it, dtype, float(rate).hex(), want.hex())


def test_adam_bias_correction_matches_the_compiled_expression(lr_oracle, tmp_path):
    for it in (0, 1, 9, 99, 4321):
        expected = lr_oracle("fixed", 0.01, 0.1, 0.9, 1, 1, it, 0.9, 0.999)
        for dtype, want in ((np.float32, expected[2]), (np.float64, expected[3])):
            solver = AdamSolver.__new__(AdamSolver)
            solver.param = caffe_pb2.SolverParameter(momentum=0.9, momentum2=0.999)
            solver.iter = it
            assert float(solver._correction(dtype)) == want, (it, dtype)


def test_lr_poly_first_update_uses_base_lr_and_reaches_zero():
    p = lr_param(lr_policy="poly", power=0.9, max_iter=20000, base_lr=2.5e-4)
    assert learning_rate(p, 0)[0] == np.float32(2.5e-4)
    assert learning_rate(p, 20000)[0] == 0


def test_lr_multistep_advances_one_step_per_call():
    p = lr_param(lr_policy="multistep", gamma=0.5, stepvalue=[3, 5, 6])
    step, rates = 0, []
    for it in range(9):
        rate, step = learning_rate(p, it, step)
        rates.append(float(rate))
    expected = [0.01 * 0.5 ** k for k in (0, 0, 0, 1, 1, 2, 3, 3, 3)]
    assert rates == pytest.approx(expected, rel=1e-6)
    # Resuming at iter 100 with step 0: k advances by at most one per call (Caffe).
    assert learning_rate(p, 100, 0) == (pytest.approx(0.005, rel=1e-6), 1)


@pytest.mark.parametrize("extra, message", [
    ('lr_policy: "fixed" weight_decay: 0.1 regularization_type: "L3"',
     "unknown regularization_type 'L3'"),
    ('lr_policy: "fixed" type: "AdaGrad" momentum: 0.9', "momentum cannot be used with AdaGrad"),
    ('lr_policy: "fixed" type: "RMSProp" rms_decay: 1.5', "rms_decay should lie in"),
    ('lr_policy: "fixed" type: "Adamax"', "unknown solver type 'Adamax'"),
    ('lr_policy: "fixed" average_loss: 0', "average_loss should be at least 1"),
    ('lr_policy: "fixed" test_iter: 2', "test_interval is 0"),
])
def test_bad_solver_parameters_are_clear_errors(tmp_path, extra, message):
    with pytest.raises(SolverError, match=re.escape(message)) as e:
        make_solver(tmp_path, "base_lr: 0.1\n" + extra, ip_net())
    assert "solver.prototxt" in str(e.value)


@pytest.mark.parametrize("extra, message", [
    ('lr_policy: "cosine"', "unknown lr_policy 'cosine'"),
    ('', "lr_policy is not set"),
    ('lr_policy: "step" gamma: 0.1', "needs stepsize > 0"),
])
def test_bad_learning_rate_policies_stop_the_first_update(tmp_path, extra, message):
    """Caffe's GetLearningRate checks the policy when the first update asks for a
    rate: the solver builds (a net can be tested with it), the first step stops."""
    solver = make_solver(tmp_path, "base_lr: 0.1\n" + extra, ip_net())
    with pytest.raises(SolverError, match=re.escape(message)) as e:
        solver.step(1)
    assert "solver.prototxt" in str(e.value) and solver.iter == 0


def test_learning_rate_settings_the_fork_accepts(tmp_path):
    """No CHECKs on gamma or on sigmoid's stepsize in the fork's GetLearningRate: a
    negative gamma makes a decaying sigmoid; poly with max_iter 0 is NaN, and a NaN
    rate stops a run (README: known differences)."""
    p = lr_param(lr_policy="sigmoid", gamma=-0.01, stepsize=100, base_lr=0.01)
    for it in (0, 100, 500):
        want = np.float32(0.01) * (1 / (1 + np.exp(np.float64(
            -np.float32(-0.01) * (np.float32(it) - np.float32(100))))))
        assert learning_rate(p, it)[0] == np.float32(want)
    assert learning_rate(p, 100)[0] == np.float32(0.005)
    p = lr_param(lr_policy="step", gamma=-2, stepsize=3, base_lr=0.5)
    assert learning_rate(p, 7)[0] == np.float32(2.0)
    assert np.isnan(learning_rate(lr_param(lr_policy="poly", power=0.9, max_iter=0), 0)[0])
    for extra in ('lr_policy: "sigmoid" gamma: -0.01 stepsize: 0',
                  'lr_policy: "exp" gamma: -0.5'):       # build and train
        solver = make_solver(tmp_path, "base_lr: 0.1\n" + extra, ip_net())
        solver.step(1)
        assert solver.iter == 1
    solver = make_solver(tmp_path, 'base_lr: 0.1\nlr_policy: "poly" power: 0.9', ip_net())
    with pytest.raises(SolverError, match="undefined at iteration 0"):
        solver.step(1)


# ------------------------------------------------------------------ accumulation
MEMORY_NET = '''
name: "memnet"
layer { name: "data" type: "MemoryData" top: "data" top: "label"
  memory_data_param { batch_size: %d channels: 1 height: 1 width: 3 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 1
    weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "constant" value: 0.3 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "label" top: "loss" }
'''


def test_iter_size_k_equals_one_batch_of_k_times_b(tmp_path):
    """EuclideanLoss divides by its batch, so K sub-batches of B with iter_size K give
    the gradient of one batch of K*B (weight decay added once per update)."""
    rng = np.random.default_rng(3)
    data = rng.normal(size=(6, 1, 1, 3)).astype(np.float32)
    labels = rng.normal(size=6).astype(np.float32)
    common = ('lr_policy: "fixed" base_lr: 0.05 momentum: 0.9 weight_decay: 0.02 '
              'random_seed: 2\n')
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    small = make_solver(tmp_path / "a", common + "iter_size: 3", MEMORY_NET % 2)
    big = make_solver(tmp_path / "b", common, MEMORY_NET % 6)
    for blob_small, blob_big in zip(small.net.params["ip"], big.net.params["ip"]):
        blob_big.data[...] = blob_small.data
    small.net.layer_dict["data"].set_input_arrays(data, labels)
    big.net.layer_dict["data"].set_input_arrays(data, labels)
    w0 = small.net.params["ip"][0].data.copy()
    small.step(4)
    big.step(4)
    assert not np.allclose(small.net.params["ip"][0].data, w0)
    for a, b in zip(small.net.params["ip"], big.net.params["ip"]):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-7)


def test_clip_gradients_acts_on_the_accumulated_sum(tmp_path):
    hp = "lr_policy: \"fixed\" base_lr: 1.0 iter_size: 2 random_seed: 4\n"
    probe = make_solver(tmp_path, hp, ip_net(b_lr=1))
    x, y = set_inputs(probe)
    w0, b0 = (blob.data.astype(np.float64) for blob in probe.net.params["ip"])
    gw, gb = euclidean_ip_grads(w0, b0, x, y)
    norm = math.sqrt((gw ** 2).sum() + (gb ** 2).sum())
    clip = 1.5 * norm      # above the mean gradient's norm, below the summed one's (2x)
    s = make_solver(tmp_path, hp + f"clip_gradients: {clip}", ip_net(b_lr=1))
    set_inputs(s)
    s.step(1)
    scale = clip / (2 * norm)
    np.testing.assert_allclose(s.net.params["ip"][0].data, w0 - scale * gw, rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(s.net.params["ip"][1].data, b0 - scale * gb, rtol=1e-5,
                               atol=1e-7)
    # A clip above the summed norm leaves plain SGD.
    s = make_solver(tmp_path, hp + f"clip_gradients: {3 * norm}", ip_net(b_lr=1))
    set_inputs(s)
    s.step(1)
    np.testing.assert_allclose(s.net.params["ip"][0].data, w0 - gw, rtol=1e-5, atol=1e-7)
    # Only a negative clip_gradients is off (Caffe: if (clip_gradients < 0) return);
    # 0 scales every gradient to 0, and the weights do not move (no weight decay here).
    s = make_solver(tmp_path, hp + "clip_gradients: 0", ip_net(b_lr=1))
    set_inputs(s)
    s.step(1)
    np.testing.assert_array_equal(s.net.params["ip"][0].data, w0.astype(np.float32))
    np.testing.assert_array_equal(s.net.params["ip"][1].data, b0.astype(np.float32))


SHARED_NET = '''
name: "shared"
layer { name: "data" type: "Input" top: "x" top: "y"
  input_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 } } }
layer { name: "ip_a" type: "InnerProduct" bottom: "x" top: "a"
  param { name: "w" } param { name: "b" }
  inner_product_param { num_output: 2
    weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.2 } } }
layer { name: "ip_b" type: "InnerProduct" bottom: "x" top: "b"
  param { name: "w" } param { name: "b" }
  inner_product_param { num_output: 2 } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "ip" }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "loss" }
'''


def test_shared_parameters_get_one_update_from_summed_gradients(tmp_path, log_lines):
    s = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0.1 momentum: 0.9 '
                    'weight_decay: 0.01 random_seed: 1', SHARED_NET)
    assert len(s.net.learnable_params) == 2
    # Net::AppendParam's line for each shared copy
    assert logged(log_lines, r"\] Sharing parameters 'w' owned by layer 'ip_a', param "
                             r"index 0$")
    assert logged(log_lines, r"\] Sharing parameters 'b' owned by layer 'ip_a', param "
                             r"index 1$")
    x, y = set_inputs(s)
    w, b = (blob.data.astype(np.float64) for blob in s.net.params["ip_a"])
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for _ in range(3):
        gw, gb = euclidean_ip_grads(w, b, x, y, paths=2)
        vw = 0.9 * vw + 0.1 * (gw + 0.01 * w)
        vb = 0.9 * vb + 0.1 * (gb + 0.01 * b)
        w, b = w - vw, b - vb
    s.step(3)
    for layer in ("ip_a", "ip_b"):
        np.testing.assert_allclose(s.net.params[layer][0].data, w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s.net.params[layer][1].data, b, rtol=1e-5, atol=1e-6)


def test_frozen_blobs_are_unchanged(tmp_path):
    s = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0.5 momentum: 0.9 '
                    'weight_decay: 0.1 random_seed: 1', ip_net(w_lr=0, w_decay=1, b_lr=1))
    set_inputs(s)
    w0, b0 = (blob.data.copy() for blob in s.net.params["ip"])
    s.step(3)
    assert np.array_equal(s.net.params["ip"][0].data, w0)
    assert not np.array_equal(s.net.params["ip"][1].data, b0)


def test_l1_regularization_uses_caffes_sign(tmp_path):
    """caffe_cpu_sign is (0 < x) - (x < 0): the L1 term is -decay, 0 or +decay, and 0 for
    a NaN weight (numpy's sign would make it NaN); -0 counts as 0."""
    s = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0.5 weight_decay: 0.25 '
                    'regularization_type: "L1"', ip_net(w_decay=2))
    w = s.net.params["ip"][0]
    values = np.array([1.5, -2.0, 0.0, -0.0, np.nan, -np.inf], np.float32)
    assert w.count >= values.size
    w.data.flat[:values.size] = values
    w.diff[...] = 1
    s.regularize(0)
    expected = np.ones(w.count, np.float32) + np.float32(0.5) * np.sign(w.data.ravel())
    expected[:values.size] = [1.5, 0.5, 1, 1, 1, 0.5]
    np.testing.assert_array_equal(w.diff.ravel(), expected)


V0_NET_WITH_STATE = '''
name: "v0"
state { phase: TEST level: 5 }
input: "data"
input_dim: 2 input_dim: 3 input_dim: 4 input_dim: 4
layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.5 } bottom: "data" top: "out" }
'''


def test_a_v0_train_nets_state_is_dropped_as_the_upgrade_drops_it(tmp_path):
    """ReadNetParamsFromTextFileOrDie upgrades the file before the solver merges its
    state, and UpgradeV0Net keeps no state: the train net runs in TRAIN (its Dropout
    drops), not in the file's TEST."""
    s = make_solver(tmp_path, 'base_lr: 0.01 lr_policy: "fixed"', V0_NET_WITH_STATE)
    assert s.net.phase == caffe_pb2.TRAIN
    s.net.blobs["data"].data[...] = 1
    s.net.forward()
    assert set(np.unique(s.net.blobs["out"].data)) <= {0.0, 2.0}


# ------------------------------------------------------------------ log lines
def logged(lines, pattern):
    return [m.groups() for m in (re.search(pattern, line) for line in lines) if m]


def test_average_loss_smooths_the_displayed_loss(tmp_path, log_lines):
    s = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0.05 display: 1 '
                    'average_loss: 3 random_seed: 1', ip_net())
    set_inputs(s)
    losses = []
    s.add_callback(on_gradients=lambda: losses.append(float(s.net.blobs["loss"].data)))
    s.step(6)
    shown = [(int(i), float(v)) for i, v in logged(log_lines, r"Iteration (\d+), loss = (\S+)")]
    assert [i for i, _ in shown] == list(range(6))
    for i, value in shown:
        window = losses[max(0, i - 2):i + 1]
        assert value == pytest.approx(sum(window) / len(window), rel=2e-5)
    assert losses[0] != pytest.approx(losses[-1])


def test_each_step_call_smooths_over_its_own_losses(tmp_path, log_lines):
    """Caffe's Step clears the loss window, and UpdateSmoothedLoss replaces the entry at
    (iter - start_iter) % average_loss: after step(2), step(5) (starting at iteration 2)
    shows at each iteration the mean of the last (up to 3) losses of that call alone."""
    s = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0.05 display: 1 '
                    'average_loss: 3 random_seed: 1', ip_net())
    set_inputs(s)
    losses = []
    s.add_callback(on_gradients=lambda: losses.append(float(s.net.blobs["loss"].data)))
    s.step(2)
    del log_lines[:], losses[:]
    s.step(5)
    shown = [(int(i), float(v)) for i, v in logged(log_lines, r"Iteration (\d+), loss = (\S+)")]
    assert [i for i, _ in shown] == list(range(2, 7)) and len(losses) == 5
    for k, (_, value) in enumerate(shown):
        window = losses[max(0, k - 2):k + 1]
        assert value == pytest.approx(sum(window) / len(window), rel=2e-5)
    # the losses differ enough that another window would show
    assert min(abs(a - b) for a in losses for b in losses[:losses.index(a)]) > 1e-3 * losses[0]


def test_displayed_loss_is_the_mean_over_iter_size(tmp_path, log_lines):
    """Step's loss is the sum of the iter_size forwards divided by iter_size (DeepLab's
    ResNet trains with iter_size 10): with base_lr 0 and fixed inputs every forward
    gives one loss, and each line shows it, not iter_size times it."""
    s = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0 display: 1 iter_size: 3 '
                    'random_seed: 1', ip_net())
    set_inputs(s)
    one = float(s.net.forward()["loss"])
    s.step(2)
    shown = [float(v) for (v,) in logged(log_lines, r"Iteration \d+, loss = (\S+)")]
    assert len(shown) == 2 and one > 0
    assert shown == [pytest.approx(one, rel=1e-5)] * 2


def test_the_final_loss_line_of_solve_is_smoothed_too(tmp_path, log_lines):
    """Solve's extra forward after the last update goes through UpdateSmoothedLoss: its
    line averages that forward's loss with the last two of training (window 3)."""
    s = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0.05 display: 2 max_iter: 4 '
                    'average_loss: 3 random_seed: 1 snapshot_after_train: false', ip_net())
    set_inputs(s)
    losses = []
    s.add_callback(on_gradients=lambda: losses.append(float(s.net.blobs["loss"].data)))
    s.solve()
    final_forward = float(s.net.forward()["loss"])
    shown = [(int(i), float(v)) for i, v in logged(log_lines, r"Iteration (\d+), loss = (\S+)")]
    assert [i for i, _ in shown] == [0, 2, 4]
    window = [losses[2], losses[3], final_forward]
    assert shown[-1][1] == pytest.approx(sum(window) / 3, rel=2e-5)
    assert shown[-1][1] != pytest.approx(final_forward, rel=1e-3)


TEST_NET = '''
name: "testnet"
layer { name: "target" type: "DummyData" top: "target"
  dummy_data_param { shape { dim: 2 dim: 2 } data_filler { type: "constant" value: 0.25 } } }
layer { name: "data" type: "MemoryData" top: "x" top: "label"
  memory_data_param { batch_size: 2 channels: 3 height: 1 width: 1 } }
layer { name: "silence" type: "Silence" bottom: "label" }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
  inner_product_param { num_output: 2 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "target" top: "loss"
  loss_weight: 0.5 }
layer { name: "probe" type: "InnerProduct" bottom: "x" top: "probe"
  inner_product_param { num_output: 1 bias_term: false
    weight_filler { type: "constant" value: 1 } } }
'''


def test_test_nets_share_weights_and_average_outputs_over_test_iter(tmp_path, log_lines):
    test_net = caffe_pb2.NetParameter()
    text_format.Parse(TEST_NET, test_net)
    extra = ('lr_policy: "fixed" base_lr: 0.1 random_seed: 1 test_iter: 3 test_interval: 2 '
             'test_initialization: false test_compute_loss: true display: 100\n'
             'test_net_param { ' + text_format.MessageToString(test_net, as_one_line=True)
             + ' }')
    net_path = tmp_path / "net.prototxt"
    net_path.write_text(ip_net())
    path = tmp_path / "solver.prototxt"
    path.write_text(f'train_net: "{net_path}"\n' + extra)
    s = Solver(str(path))
    assert len(s.test_nets) == 1
    set_inputs(s)
    rng = np.random.default_rng(9)
    data = rng.normal(size=(6, 3, 1, 1)).astype(np.float32)
    s.test_nets[0].layer_dict["data"].set_input_arrays(data, np.zeros(6, np.float32))
    s.step(2)     # no test at iter 0 (test_initialization false)
    w, b = (blob.data.astype(np.float64) for blob in s.net.params["ip"])
    s.step(1)     # the test at iter 2 runs before that iteration's update
    assert logged(log_lines, r"Iteration (\d+), Testing net \(#(\d+)\)") == [("2", "0")]
    assert np.shares_memory(s.test_nets[0].params["ip"][0].data, s.net.params["ip"][0].data)
    x = data.reshape(6, 3).astype(np.float64)
    batch_losses = [((x[i:i + 2] @ w.T + b - 0.25) ** 2).sum() / 2 / 2 for i in (0, 2, 4)]
    probes = [x[i:i + 2].sum(1) for i in (0, 2, 4)]
    outputs = logged(log_lines, r"Test net output #(\d+): (\S+) = (\S+)(.*)")
    assert [(i, n) for i, n, _, _ in outputs] == [("0", "loss"), ("1", "probe"),
                                                  ("2", "probe")]
    assert float(outputs[0][2]) == pytest.approx(np.mean(batch_losses), rel=1e-5)
    weighted = re.fullmatch(r" \(\* 0\.5 = (\S+) loss\)", outputs[0][3])
    assert weighted and float(weighted[1]) == pytest.approx(0.5 * np.mean(batch_losses),
                                                            rel=1e-5)
    np.testing.assert_allclose([float(o[2]) for o in outputs[1:]], np.mean(probes, axis=0),
                               rtol=1e-5)
    test_loss = logged(log_lines, r"Test loss: (\S+)")
    assert float(test_loss[0][0]) == pytest.approx(0.5 * np.mean(batch_losses), rel=1e-5)
    np.testing.assert_allclose(s.mean_scores[0],
                               [np.mean(batch_losses)] + list(np.mean(probes, axis=0)),
                               rtol=1e-5)


# Reimplemented from the regular expressions of BVLC tools/extra/parse_log.py (current
# and the older loss/lr-only version) and extract_seconds.py.
PARSE_LOG = {
    "iteration": re.compile(r"Iteration (\d+)"),
    "train_output": re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)"),
    "test_output": re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)"),
    "learning_rate": re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)"),
    "old_train_loss": re.compile(r"Iteration \d+, loss = ([\.\d]+)"),
    "old_lr": re.compile(r"lr = ([\.\d]+)"),
}
GLOG = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6}) +\d+ [\w.]+:\d+\] ")


def test_log_lines_parse_with_caffes_parse_log(tmp_path, log_lines):
    extra = ('lr_policy: "step" gamma: 0.5 stepsize: 2 base_lr: 0.001 display: 2 '
             'max_iter: 4 random_seed: 1 test_iter: 1 test_interval: 2 '
             'snapshot_after_train: false')
    s = make_solver(tmp_path, extra, ip_net())
    set_inputs(s)
    set_inputs_test = s.test_nets[0]
    set_inputs_test.blobs["x"].data[...] = s.net.blobs["x"].data
    s.solve()
    assert all(GLOG.match(line) for line in log_lines)
    solving = [i for i, line in enumerate(log_lines) if "Solving" in line]
    first_iter = [i for i, line in enumerate(log_lines) if PARSE_LOG["iteration"].search(line)]
    assert solving and solving[0] < first_iter[0]     # extract_seconds' start time
    train = [line for line in log_lines if PARSE_LOG["train_output"].search(line)]
    test = [line for line in log_lines if PARSE_LOG["test_output"].search(line)]
    lrs = [PARSE_LOG["learning_rate"].search(line) for line in log_lines]
    lrs = [float(m.group(1)) for m in lrs if m]
    assert lrs == pytest.approx([0.001, 0.0005])        # iterations 0 and 2
    old_lrs = [float(m.group(1)) for m in map(PARSE_LOG["old_lr"].search, log_lines) if m]
    assert old_lrs == pytest.approx(lrs)
    losses = [m for m in map(PARSE_LOG["old_train_loss"].search, log_lines) if m]
    assert len(losses) == 3                              # iterations 0, 2 and the final 4
    assert len(train) == 2 and len(test) == 3            # tests at 0, 2, 4
    for line in train + test:
        m = (PARSE_LOG["train_output"].search(line) or PARSE_LOG["test_output"].search(line))
        assert m.group(2) == "loss"
        assert float(m.group(3)) > 0
        assert line.endswith(" loss)") and " (* 1 = " in line
    assert any(line.endswith("] Iteration 0, loss = " + losses[0].group(1))
               for line in log_lines)


# ------------------------------------------------------------------ snapshots
def read_proto(path, message):
    with open(path, "rb") as f:
        message.ParseFromString(f.read())
    return message


def test_snapshot_files_contents_and_atomicity(tmp_path, monkeypatch):
    (tmp_path / "snaps").mkdir()
    prefix = tmp_path / "snaps" / "train"
    extra = (f'lr_policy: "step" gamma: 0.5 stepsize: 3 base_lr: 0.1 momentum: 0.9 '
             f'max_iter: 4 snapshot: 2 snapshot_prefix: "{prefix}" random_seed: 1')
    s = make_solver(tmp_path, extra, ip_net())
    set_inputs(s)
    s.solve()
    assert sorted(os.listdir(tmp_path / "snaps")) == [
        "train_iter_2.caffemodel", "train_iter_2.solverstate",
        "train_iter_4.caffemodel", "train_iter_4.solverstate"]
    model = read_proto(f"{prefix}_iter_4.caffemodel", caffe_pb2.NetParameter())
    assert model.name == "ipnet"
    assert [layer.name for layer in model.layer] == ["data", "ip", "loss"]
    ip = model.layer[1]
    assert ip.type == "InnerProduct" and len(ip.blobs) == 2
    for blob, param in zip(ip.blobs, s.net.params["ip"]):
        assert tuple(blob.shape.dim) == param.shape
        assert np.array_equal(np.array(blob.data, np.float32).reshape(param.shape), param.data)
        assert len(blob.diff) == 0
    state = read_proto(f"{prefix}_iter_4.solverstate", caffe_pb2.SolverState())
    assert state.iter == 4 and state.current_step == 1
    assert state.learned_net == f"{prefix}_iter_4.caffemodel"
    assert len(state.history) == 2
    for blob, h in zip(state.history, s.history):
        assert tuple(blob.shape.dim) == h.shape
        assert np.array_equal(np.array(blob.data, np.float32).reshape(h.shape), h)
    assert np.abs(s.history[0]).max() > 0
    # snapshot_diff writes each blob's diff (after the update: the applied step).
    s.param.snapshot_diff = True
    s.snapshot()
    model = read_proto(f"{prefix}_iter_4.caffemodel", caffe_pb2.NetParameter())
    for blob, param, h in zip(model.layer[1].blobs, s.net.params["ip"], s.history):
        assert np.array_equal(np.array(blob.diff, np.float32).reshape(param.shape), param.diff)
        assert np.array_equal(param.diff, h)
    # Atomic: a failed rename leaves the previous files intact and no temporary behind.
    before = [open(f"{prefix}_iter_4{ext}", "rb").read() for ext in (".caffemodel",
                                                                      ".solverstate")]
    s.history[0][...] += 1

    real_replace = os.replace

    def boom(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(SolverError, match=f"cannot write the snapshot "
                                          f"'{re.escape(str(prefix))}_iter_4.caffemodel': "):
        s.snapshot()

    def state_fails(src, dst):
        if dst.endswith(".solverstate"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", state_fails)
    with pytest.raises(SolverError, match=f"'{re.escape(str(prefix))}_iter_4.solverstate': .* "
                                          f"\\(the weights are in '.*_iter_4.caffemodel', but "
                                          f"a resume needs the state too\\)"):
        s.snapshot()
    monkeypatch.undo()
    before[0] = open(f"{prefix}_iter_4.caffemodel", "rb").read()      # the new weights
    assert [open(f"{prefix}_iter_4{ext}", "rb").read()
            for ext in (".caffemodel", ".solverstate")] == before
    assert sorted(os.listdir(tmp_path / "snaps")) == [
        "train_iter_2.caffemodel", "train_iter_2.solverstate",
        "train_iter_4.caffemodel", "train_iter_4.solverstate"]


def test_missing_snapshot_directory_fails_at_construction(tmp_path):
    extra = (f'lr_policy: "fixed" base_lr: 0.1 snapshot: 10 '
             f'snapshot_prefix: "{tmp_path}/nowhere/train"')
    with pytest.raises(SolverError, match="nowhere' does not exist"):
        make_solver(tmp_path, extra, ip_net())
    with pytest.raises(SolverError, match="snapshot_prefix is not"):
        make_solver(tmp_path, 'lr_policy: "fixed" snapshot: 10', ip_net())
    assert not any(n.endswith(".tempfile") for n in os.listdir(tmp_path))


def test_snapshot_directory_is_probed_only_where_snapshots_are_written(tmp_path):
    """Caffe probes the directory at construction only when ``snapshot`` is set: a loop
    over step() with snapshot_after_train (its default) and no snapshot writes nothing.
    solve() writes the final snapshot, so it refuses the missing directory before
    training, not after it."""
    extra = f'lr_policy: "fixed" base_lr: 0.1 snapshot_prefix: "{tmp_path}/nowhere/train"'
    solver = make_solver(tmp_path, extra + " max_iter: 2", ip_net())
    set_inputs(solver)
    solver.step(3)
    assert solver.iter == 3
    solver = make_solver(tmp_path, extra + " max_iter: 2", ip_net())
    with pytest.raises(SolverError, match="nowhere' does not exist"):
        solver.solve()
    assert solver.iter == 0
    make_solver(tmp_path, extra + " snapshot_after_train: false", ip_net()).solve()


def test_regularization_type_is_read_only_for_decayed_parameters(tmp_path):
    """SGDSolver::Regularize consults regularization_type only where weight_decay times
    the parameter's decay_mult is not 0: with every decay_mult 0 an unknown type (here
    lower-case) trains, and otherwise it is refused before training."""
    extra = 'lr_policy: "fixed" base_lr: 0.1 weight_decay: 0.0005 regularization_type: "l2"'
    solver = make_solver(tmp_path, extra, ip_net(w_decay=0, b_decay=0))
    set_inputs(solver)
    solver.step(2)
    with pytest.raises(SolverError, match="unknown regularization_type 'l2'"):
        make_solver(tmp_path, extra, ip_net(w_decay=0, b_decay=1))


# ------------------------------------------------------------------ resume
@register("SolverTestCursorData")
class CursorDataLayer(Layer):
    """A data layer with state outside its blobs: the next sample index."""
    exact_num_bottom = 0
    exact_num_top = 1

    def setup(self, bottom, top):
        self.cursor = 0
        self.samples = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
        top[0].reshape((2, 3))

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        idx = [(self.cursor + i) % len(self.samples) for i in range(2)]
        top[0].data[...] = self.samples[idx]
        self.cursor = (self.cursor + 2) % len(self.samples)

    def state_dict(self):
        return {"cursor": self.cursor}

    def load_state_dict(self, state):
        self.cursor = int(state["cursor"])


RESUME_NET = '''
name: "resume"
layer { name: "x" type: "SolverTestCursorData" top: "x" }
layer { name: "y" type: "DummyData" top: "y"
  dummy_data_param { shape { dim: 2 dim: 2 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "ip1"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "drop" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.3 } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip2" bottom: "y" top: "loss" }
'''


@pytest.mark.parametrize("kind, snapshot_format", [
    ("SGD", "BINARYPROTO"), ("Adam", "BINARYPROTO"), ("SGD", "HDF5"), ("Adam", "HDF5")])
def test_resume_is_bit_identical(tmp_path, kind, snapshot_format):
    if snapshot_format == "HDF5":
        pytest.importorskip("h5py")
    prefix = tmp_path / "r"
    extra = (f'type: "{kind}" lr_policy: "multistep" gamma: 0.5 stepvalue: 2 stepvalue: 4 '
             f'base_lr: 0.05 momentum: 0.9 weight_decay: 0.01 random_seed: 21 '
             f'snapshot_prefix: "{prefix}" max_iter: 7 snapshot_format: {snapshot_format}')
    straight = make_solver(tmp_path, extra, RESUME_NET)
    straight.step(7)
    first = make_solver(tmp_path, extra, RESUME_NET)
    first.step(3)
    model_file, state_file = first.snapshot()
    suffix = ".h5" if snapshot_format == "HDF5" else ""
    assert (model_file, state_file) == (f"{prefix}_iter_3.caffemodel{suffix}",
                                        f"{prefix}_iter_3.solverstate{suffix}")
    resumed = make_solver(tmp_path, extra, RESUME_NET)
    resumed.restore(state_file, continue_streams=True)
    assert resumed.iter == 3 and resumed.current_step == 1
    assert resumed.net.layer_dict["x"].cursor == first.net.layer_dict["x"].cursor
    resumed.step(4)
    assert resumed.current_step == straight.current_step == 2
    for a, b in zip(straight.net.learnable_params, resumed.net.learnable_params):
        assert np.array_equal(a.blob.data, b.blob.data)
    for a, b in zip(straight.history, resumed.history):
        assert np.array_equal(a, b)
    # The saved generator state matters: drawing differently changes the result.
    other = make_solver(tmp_path, extra, RESUME_NET)
    other.restore(state_file, continue_streams=True)
    backend.rng().words(5)
    other.step(4)
    assert not np.array_equal(other.net.params["ip1"][0].data,
                              straight.net.params["ip1"][0].data)


@pytest.mark.parametrize("snapshot_format", ["BINARYPROTO", "HDF5"])
def test_default_resume_restarts_the_streams_as_caffe(tmp_path, snapshot_format):
    """Caffe's Restore brings back iter, current_step, history and weights only: the
    random streams are where Solver::Init's seeding and the net set-up left them, and a
    data layer starts at the top of its list. Weights and history are the snapshot's."""
    if snapshot_format == "HDF5":
        pytest.importorskip("h5py")
    extra = (f'lr_policy: "fixed" base_lr: 0.05 momentum: 0.9 random_seed: 21 '
             f'snapshot_prefix: "{tmp_path}/r" snapshot_format: {snapshot_format}')
    first = make_solver(tmp_path, extra, RESUME_NET)
    first.step(3)
    _, state_file = first.snapshot()
    resumed = make_solver(tmp_path, extra, RESUME_NET)
    after_setup = backend.rng().get_state()
    resumed.restore(state_file)
    assert json.dumps(backend.rng().get_state(), default=np.ndarray.tolist) == \
        json.dumps(after_setup, default=np.ndarray.tolist)
    assert resumed.net.layer_dict["x"].cursor == 0 != first.net.layer_dict["x"].cursor
    assert resumed.iter == 3
    for a, b in zip(first.net.learnable_params, resumed.net.learnable_params):
        assert np.array_equal(a.blob.data, b.blob.data)
    for a, b in zip(first.history, resumed.history):
        assert np.array_equal(a, b)
    # The first dropout mask after the resume is a fresh run's first one.
    resumed.net.forward()
    mask = resumed.net.layer_dict["drop"].mask.copy()
    fresh = make_solver(tmp_path, extra, RESUME_NET)      # seeds the stream again
    fresh.net.forward()
    assert np.array_equal(mask, fresh.net.layer_dict["drop"].mask)


def hdf5_snapshot_after(tmp_path, steps):
    """(solver, model file, state file) of an HDF5 snapshot after ``steps`` steps."""
    s = make_solver(tmp_path, f'lr_policy: "fixed" base_lr: 0.1 momentum: 0.9 '
                              f'snapshot_prefix: "{tmp_path}/h" snapshot_format: HDF5',
                    ip_net())
    set_inputs(s)
    s.step(steps)
    return (s,) + tuple(s.snapshot())


def test_hdf5_snapshot_has_caffes_layout(tmp_path):
    """SnapshotToHDF5 / SnapshotSolverStateToHDF5 as Caffe writes them with HDF5's lite
    API: the net's data/<layer>/<i> datasets; the state's iter and current_step as
    hdf5_save_int makes them (rank 1, one int32), a fixed-length null-terminated
    learned_net, history/0.. as floats."""
    h5py = pytest.importorskip("h5py")
    s, model, state = hdf5_snapshot_after(tmp_path, 2)
    with h5py.File(model, "r") as f:
        assert list(f) == ["data"]
        np.testing.assert_array_equal(f["data/ip/0"][()], s.net.params["ip"][0].data)
        np.testing.assert_array_equal(f["data/ip/1"][()], s.net.params["ip"][1].data)
    with h5py.File(state, "r") as f:
        for name in ("iter", "current_step"):
            assert f[name].shape == (1,) and f[name].dtype == np.int32
        assert f["iter"][()].tolist() == [2] and f["current_step"][()].tolist() == [0]
        kind = f["learned_net"].id.get_type()
        assert isinstance(kind, h5py.h5t.TypeStringID) and not kind.is_variable_str()
        assert kind.get_strpad() == h5py.h5t.STR_NULLTERM
        assert kind.get_size() == len(model) + 1
        assert f["learned_net"][()].rstrip(b"\0").decode() == model
        assert sorted(f["history"]) == ["0", "1"]
        np.testing.assert_array_equal(f["history/0"][()], s.history[0])
    resumed = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0.1 momentum: 0.9',
                          ip_net())
    resumed.restore(state)
    assert resumed.iter == 2
    np.testing.assert_array_equal(resumed.net.params["ip"][0].data, s.net.params["ip"][0].data)


def test_hdf5_state_ints_are_read_as_caffe_or_an_earlier_caffelite_wrote_them(tmp_path):
    """Caffe's rank-1 iter/current_step, and the scalars caffelite wrote before; any
    other content is named."""
    h5py = pytest.importorskip("h5py")
    _, _, state = hdf5_snapshot_after(tmp_path, 3)
    for iter_value, current_step in (([3], [0]), (3, 0)):
        with h5py.File(state, "r+") as f:
            for name, value in (("iter", iter_value), ("current_step", current_step)):
                del f[name]
                f.create_dataset(name, data=np.asarray(value, np.int32))
        resumed = make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0.1 momentum: 0.9',
                              ip_net())
        resumed.restore(state)
        assert resumed.iter == 3
    with h5py.File(state, "r+") as f:
        del f["iter"]
        f.create_group("iter")
    with pytest.raises(SolverError, match=r"'iter' must be a dataset holding one integer "
                                          r"\(it is a group\)"):
        make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0.1', ip_net()).restore(state)
    with h5py.File(state, "r+") as f:
        del f["iter"]
        f.create_dataset("iter", data=np.array([1.5, 2.0]))
    with pytest.raises(SolverError, match=r"h_iter_3\.solverstate\.h5: .iter. must hold "
                                              r"one integer \(it holds 2 value\(s\) of type "
                                              r"float64\)"):
        make_solver(tmp_path, 'lr_policy: "fixed" base_lr: 0.1', ip_net()).restore(state)


def test_solve_resumes_from_file(tmp_path):
    prefix = tmp_path / "r"
    extra = (f'lr_policy: "fixed" base_lr: 0.05 momentum: 0.9 random_seed: 3 '
             f'snapshot_prefix: "{prefix}" snapshot: 2 max_iter: 4')
    straight = make_solver(tmp_path, extra, RESUME_NET)
    straight.solve()
    resumed = make_solver(tmp_path, extra, RESUME_NET)
    resumed.solve(f"{prefix}_iter_2.solverstate", continue_streams=True)
    assert resumed.iter == 4
    for a, b in zip(straight.net.learnable_params, resumed.net.learnable_params):
        assert np.array_equal(a.blob.data, b.blob.data)
    with pytest.raises(SolverError, match="incorrect number of history blobs"):
        make_solver(tmp_path, extra + ' type: "Adam"', RESUME_NET).restore(
            f"{prefix}_iter_2.solverstate")


def test_real_caffe_solverstate_restores_and_training_continues(tmp_path):
    state_src = corpus_path("models", "cifar10_quick_v1", "extras",
                            "cifar10_quick_iter_5000.solverstate")
    net_src = corpus_path("models", "cifar10_quick_v1", "extras",
                          "cifar10_quick_train_test.prototxt")
    model_src = corpus_path("models", "cifar10_quick_v1", "cifar10_quick_iter_5000.caffemodel")
    # The state names examples/cifar10/cifar10_quick_lr1_iter_5000.caffemodel; put the
    # released weights next to a copy of it under that name.
    state_file = tmp_path / "cifar10_quick_iter_5000.solverstate"
    shutil.copy(state_src, state_file)
    shutil.copy(model_src, tmp_path / "cifar10_quick_lr1_iter_5000.caffemodel")
    net, _ = prototxt.read_net(net_src)
    layers = [layer for layer in net.layer if layer.type != "Data"]
    del net.layer[:]
    data = net.layer.add(name="cifar", type="DummyData", top=["data", "label"])
    p = data.dummy_data_param
    p.shape.add().dim.extend([2, 3, 32, 32])
    p.shape.add().dim.extend([2])
    p.data_filler.add(type="constant", value=10.0)
    p.data_filler.add(type="constant", value=3.0)
    net.layer.extend(layers)
    # weight_decay 1 (the state's was 0.004): the decay term is then 1e-4 * lr_mult * |w|,
    # above the bounds below, so decay and each param's decay_mult are checked
    param = caffe_pb2.SolverParameter(base_lr=0.0001, momentum=0.9, weight_decay=1.0,
                                      lr_policy="fixed", random_seed=1)
    param.net_param.CopyFrom(net)
    s = SGDSolver(param)
    s.restore(str(state_file))
    assert s.iter == 5000 and s.current_step == 0
    assert len(s.history) == len(s.net.learnable_params) == 10
    raw = caffe_pb2.SolverState()
    raw.ParseFromString(open(state_src, "rb").read())
    for h, prm, blob in zip(s.history, s.net.learnable_params, raw.history):
        assert h.shape == prm.blob.shape
        assert np.array_equal(h.reshape(-1), np.array(blob.data, np.float32))
    conv1 = s.net.params["conv1"][0].data.copy()
    w_before = [prm.blob.data.astype(np.float64) for prm in s.net.learnable_params]
    h_before = [h.astype(np.float64) for h in s.history]
    s.net.clear_param_diffs()
    s.net.forward_backward()          # constant data: the gradient step() will see
    grads = [prm.blob.diff.astype(np.float64) for prm in s.net.learnable_params]
    lr_mults = [prm.lr_mult for prm in s.net.learnable_params]
    assert lr_mults == [1, 2] * 5
    s.step(1)
    assert s.iter == 5001
    u = 2.0 ** -24                    # float32 unit roundoff
    for prm, hist, w, h, g, lr_mult in zip(s.net.learnable_params, s.history, w_before,
                                           h_before, grads, lr_mults):
        v = 0.9 * h + 1e-4 * lr_mult * (g + 1.0 * w)
        # float32: 0.9 and 1e-4 rounded, the decay axpy (2), the momentum scale and the
        # rate axpy (2) -- at most 5 roundings of terms no larger than these
        bound = 6 * u * (0.9 * np.abs(h) + 1e-4 * lr_mult * (np.abs(g) + np.abs(w)))
        assert np.all(np.abs(hist - v) <= bound), prm.blob.shape
        assert np.all(np.abs(prm.blob.data - (w - v)) <= bound + u * np.abs(w - v))
    assert not np.array_equal(conv1, s.net.params["conv1"][0].data)


# ------------------------------------------------------------------ stopping
def snapshotting_solver(tmp_path, name, extra):
    """A fixed-rate solver of ip_net, seeded, with its inputs set, snapshotting to
    ``tmp_path / name``; returns (solver, prefix)."""
    prefix = tmp_path / name
    s = make_solver(tmp_path, f'lr_policy: "fixed" base_lr: 0.1 {extra} '
                    f'snapshot_prefix: "{prefix}" random_seed: 1', ip_net())
    set_inputs(s)
    return s, prefix


def test_nan_loss_stops_after_snapshotting_the_last_good_state(tmp_path):
    s, prefix = snapshotting_solver(tmp_path, "nan", "momentum: 0.9")

    def poison():
        if s.iter == 2:
            s.net.blobs["x"].data[0, 0] = np.nan
    s.add_callback(on_start=poison)
    s.step(2)
    good = [p.blob.data.copy() for p in s.net.learnable_params]
    with pytest.raises(SolverError, match=r"the loss is nan at iteration 2,") as e:
        s.step(3)
    assert f"{prefix}_iter_2.solverstate" in str(e.value)
    assert s.iter == 2
    for p, g in zip(s.net.learnable_params, good):
        assert np.array_equal(p.blob.data, g)
    model = read_proto(f"{prefix}_iter_2.caffemodel", caffe_pb2.NetParameter())
    saved = np.array(model.layer[1].blobs[0].data, np.float32).reshape(good[0].shape)
    assert np.array_equal(saved, good[0])


def test_stop_and_snapshot_requests(tmp_path):
    s, _ = snapshotting_solver(tmp_path, "sig", "max_iter: 10")
    s.add_callback(on_start=lambda: s.request_snapshot() if s.iter == 1 else None)
    s.add_callback(on_gradients=lambda: s.request_stop() if s.iter == 3 else None)
    s.solve()
    assert s.iter == 4 and s.requested_early_exit
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["net.prototxt", "solver.prototxt", "sig_iter_2.caffemodel", "sig_iter_2.solverstate",
         "sig_iter_4.caffemodel", "sig_iter_4.solverstate"])


def test_a_snapshot_and_a_stop_in_one_iteration_take_two_iterations(tmp_path):
    """Caffe's CheckForSignals hands out one signal per check, SIGHUP first: the
    snapshot after iteration 1, one more iteration, then the stop (and Solve's
    snapshot of iteration 3)."""
    s, _ = snapshotting_solver(tmp_path, "both", "max_iter: 10")

    def both():
        if s.iter == 1:
            s.request_stop()
            s.request_snapshot()
    s.add_callback(on_start=both)
    s.solve()
    assert s.iter == 3 and s.requested_early_exit
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("both")) == [
        "both_iter_2.caffemodel", "both_iter_2.solverstate",
        "both_iter_3.caffemodel", "both_iter_3.solverstate"]


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_signal_handlers_set_the_requests(tmp_path):
    s, prefix = snapshotting_solver(tmp_path, "hup", "")
    with pytest.raises(SolverError, match="invalid sigint_effect"):
        install_signal_handlers(s, "pause", "snapshot")
    sigint_before = signal.getsignal(signal.SIGINT)
    restore = install_signal_handlers(s, sigint_effect="none", sighup_effect="snapshot")
    try:
        s.add_callback(on_start=lambda: os.kill(os.getpid(), signal.SIGHUP)
                       if s.iter == 1 else None)
        s.add_callback(on_start=lambda: os.kill(os.getpid(), signal.SIGINT)
                       if s.iter == 2 else None)
        s.step(3)
    finally:
        restore()
    assert s.iter == 3 and not s.requested_early_exit       # SIGINT: none
    assert os.path.exists(f"{prefix}_iter_2.solverstate")
    assert signal.getsignal(signal.SIGINT) is sigint_before


# ------------------------------------------------------------------ construction
def test_get_solver_chooses_the_class_by_type(tmp_path):
    classes = {"SGD": SGDSolver, "Nesterov": NesterovSolver, "AdaGrad": AdaGradSolver,
               "RMSProp": RMSPropSolver, "AdaDelta": AdaDeltaSolver, "Adam": AdamSolver}
    for i, (enum_name, cls) in enumerate(zip(
            ["SGD", "NESTEROV", "ADAGRAD", "RMSPROP", "ADADELTA", "ADAM"], classes.values())):
        s = make_solver(tmp_path, f'lr_policy: "fixed" base_lr: 0.1 solver_type: {enum_name}',
                        ip_net(), cls=get_solver)
        assert type(s) is cls and s.param.type == cls.type
        assert len(s.history) == (4 if cls in (AdaDeltaSolver, AdamSolver) else 2)
    s = make_solver(tmp_path, 'lr_policy: "fixed" type: "Nesterov"', ip_net(), cls=Solver)
    assert type(s) is NesterovSolver
    # pycaffe's caffe.SGDSolver(file) is SGD whatever the file says.
    assert type(make_solver(tmp_path, 'lr_policy: "fixed" type: "Adam"', ip_net(),
                            cls=SGDSolver)) is SGDSolver


def test_states_defines_and_net_sources(tmp_path):
    net = ip_net() + '''
layer { name: "extra" type: "ReLU" bottom: "ip" top: "r" include { stage: "deep" } }
layer { name: "tonly" type: "ReLU" bottom: "ip" top: "t" include { phase: TEST } }
'''
    net = net.replace("num_output: %d" % M, "num_output: ${OUT}")
    extra = ('lr_policy: "fixed" base_lr: ${LR} train_state { stage: "deep" } '
             'test_iter: 1 test_iter: 1 test_interval: 5 test_state { stage: "deep" } '
             'test_state { }')
    s = make_solver(tmp_path, extra, net, defines={"OUT": 2, "LR": 0.5})
    assert s.param.base_lr == 0.5
    assert "extra" in s.net.layer_dict and "tonly" not in s.net.layer_dict
    assert [("extra" in n.layer_dict, "tonly" in n.layer_dict) for n in s.test_nets] == [
        (True, True), (False, True)]
    # Caffe's InitTestNets builds them with their own (filler) weights; Test() shares
    # the train net's first (ShareTrainedLayersWith), for good.
    for n in s.test_nets:
        assert not np.shares_memory(n.params["ip"][0].data, s.net.params["ip"][0].data)
    for i, n in enumerate(s.test_nets):
        s.test(i)
        assert np.shares_memory(n.params["ip"][0].data, s.net.params["ip"][0].data)
    with pytest.raises(SolverError, match="must specify a train net"):
        Solver(caffe_pb2.SolverParameter(lr_policy="fixed"))
    both = caffe_pb2.SolverParameter(lr_policy="fixed", net="a", train_net="b")
    with pytest.raises(SolverError, match="more than one"):
        Solver(both)


def test_relative_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    """As in Caffe, net/snapshot_prefix paths in a solver file are not rebased onto the
    solver file's directory."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "snaps").mkdir()
    (tmp_path / "cfg" / "net.prototxt").write_text(ip_net())
    (tmp_path / "cfg" / "solver.prototxt").write_text(
        'net: "cfg/net.prototxt" lr_policy: "fixed" base_lr: 0.1 max_iter: 1 '
        'snapshot: 1 snapshot_prefix: "snaps/run"')
    monkeypatch.chdir(tmp_path)
    s = Solver("cfg/solver.prototxt")
    s.solve()
    assert sorted(os.listdir("snaps")) == ["run_iter_1.caffemodel", "run_iter_1.solverstate"]
    state = read_proto("snaps/run_iter_1.solverstate", caffe_pb2.SolverState())
    assert state.learned_net == "snaps/run_iter_1.caffemodel"
    monkeypatch.chdir(tmp_path / "cfg")
    with pytest.raises(SolverError, match="cfg/snaps' does not exist"):
        Solver("solver.prototxt")
    (tmp_path / "cfg" / "snaps").mkdir()
    with pytest.raises(SolverError, match=r"solver.prototxt: net 'cfg/net.prototxt': no such "
                                         r"file \(paths in a solver are relative to the "
                                         r"working directory '.*cfg', as in Caffe"):
        Solver("solver.prototxt")


def test_a_missing_expanded_net_names_its_template(tmp_path, monkeypatch):
    """DeepLab solvers name the file the kit's sub.sed writes (train_${TRAIN_SET}
    .prototxt); on an untouched folder the error says where it comes from."""
    config = tmp_path / "voc12" / "config" / "aspp"
    config.mkdir(parents=True)
    (config / "train.prototxt").write_text(ip_net())
    (config / "solver.prototxt").write_text(
        'train_net: "voc12/config/aspp/train_${TRAIN_SET}.prototxt" lr_policy: "fixed" '
        'base_lr: 0.1 max_iter: 1')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SolverError, match=r"train_net 'voc12/config/aspp/train_train_aug"
                                         r"\.prototxt': no such file .*writes it from the "
                                         r"template 'voc12/config/aspp/train\.prototxt' .*"
                                         r"point train_net at the template"):
        Solver("voc12/config/aspp/solver.prototxt", defines={"TRAIN_SET": "train_aug"})


def test_a_snapshot_prefix_under_a_file_says_so(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(SolverError, match=r"directory '.*taken/sub' cannot be made: "
                                         r"'.*taken' is a file"):
        make_solver(tmp_path, f'lr_policy: "fixed" base_lr: 0.1 max_iter: 1 snapshot: 1 '
                              f'snapshot_prefix: "{tmp_path}/taken/sub/run"', ip_net())


def test_solverstate_bytes_match_protobufs_serialisation():
    """Our wire writer emits what Caffe's (protobuf's) serialiser emits."""
    from caffelite.io import solverstate
    rng = np.random.default_rng(0)
    history = [rng.normal(size=(3, 2)).astype(np.float32), np.zeros(0, np.float32),
               rng.normal(size=(5,)).astype(np.float32)]
    expected = caffe_pb2.SolverState(iter=1234, learned_net="a/b_iter_1234.caffemodel",
                                     current_step=2)
    for h in history:
        blob = expected.history.add()
        blob.shape.dim.extend(h.shape)
        blob.data.extend(h.ravel().tolist())
    got = solverstate.solverstate_bytes(1234, "a/b_iter_1234.caffemodel", history, 2)
    assert got == expected.SerializeToString()


def test_an_empty_file_or_a_caffemodel_given_as_solverstate_says_so(tmp_path):
    """Instead of "incorrect number of history blobs: the state has 0"."""
    from caffelite.io.solverstate import SolverStateError, read_solverstate
    empty = tmp_path / "x.solverstate"
    empty.write_bytes(b"")
    with pytest.raises(SolverStateError, match=f"^{re.escape(str(empty))}: the file is "
                                               f"empty \\(0 bytes\\), not a solverstate$"):
        read_solverstate(str(empty))
    model = caffe_pb2.NetParameter(name="n")
    model.layer.add(name="ip", type="InnerProduct").blobs.add().data.extend([1, 2])
    weights = tmp_path / "x_iter_4.caffemodel"
    weights.write_bytes(model.SerializeToString())
    with pytest.raises(SolverStateError, match="this is a caffemodel \\(a net's weights\\), "
                                               "not a solverstate; give it with --weights"):
        read_solverstate(str(weights))


def test_net_dumps_show_the_state_the_solver_gave_each_net(tmp_path, caplog):
    """Net::Init logs FilterNet's copy of its parameter, with the state the solver merged
    (phase, then a level or stages only where the files give them)."""
    caplog.set_level(logging.INFO, logger="caffelite")
    make_solver(tmp_path, 'base_lr: 0.1 lr_policy: "fixed" test_iter: 1 test_interval: 5\n'
                          'train_state { level: 2 } test_state { stage: "aux" }', ip_net())
    dumps = [r.getMessage().split("\nlayer {")[0] for r in caplog.records
             if r.getMessage().startswith("Initializing net from parameters")]
    head = 'Initializing net from parameters: \nname: "ipnet"\n'
    assert dumps == [head + 'state {\n  phase: TRAIN\n  level: 2\n}',
                     head + 'state {\n  phase: TEST\n  stage: "aux"\n}']
