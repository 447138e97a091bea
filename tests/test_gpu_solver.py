"""Solvers in GPU mode: the fused updates of sgd_update.cu against the CPU solvers.

The oracle is the CPU path (solver.py's numpy update, itself checked against float64
re-derivations of Caffe's formulas in test_solver.py). docs/gpu.md states that every
fused kernel, Adam included, does solver.py's float operations in solver.py's order
(Adam's documented difference is against Caffe's *GPU* Adam, which computes
(step*m)/(...)), so with the same gradients the trajectories are equal bit for bit, on
the emulator and on a GPU. Gradients are injected as small dyadic numbers so that the
clipping norm (cuBLAS's dot on a GPU, numpy's on the host) is exact in any summation
order; runs on the net's own gradients are bit-exact on the emulator (same numpy
GEMMs) and within float32 rounding on a GPU (cuBLAS sums in another order).
"""
import numpy as np
import pytest

import caffelite as caffe
from caffelite import backend, kernels
from caffelite.solver import SGDSolver, get_solver
from gpu_modes import gpu_mode  # noqa: F401  (fixture)

N, K, H, M = 4, 5, 3, 2

NET = f'''
name: "gpusolver"
layer {{ name: "data" type: "Input" top: "x" top: "y"
  input_param {{ shape {{ dim: {N} dim: {K} }} shape {{ dim: {N} dim: {M} }} }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "x" top: "h"
  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  inner_product_param {{ num_output: {H} weight_filler {{ type: "gaussian" std: 0.5 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "h" top: "h" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "h" top: "out"
  param {{ lr_mult: 0.5 decay_mult: 2 }} param {{ lr_mult: 1.5 decay_mult: 0.5 }}
  inner_product_param {{ num_output: {M} weight_filler {{ type: "gaussian" std: 0.5 }}
    bias_filler {{ type: "gaussian" std: 0.2 }} }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "y" top: "loss" }}
'''
# ip1's bias starts at 0: L1's sign(0) = 0 is exercised too.

HYPER = {
    "SGD": "momentum: 0.9",
    "Nesterov": "momentum: 0.9",
    "AdaGrad": "delta: 1e-6",
    "RMSProp": "rms_decay: 0.9 delta: 1e-6",
    "AdaDelta": "momentum: 0.95 delta: 1e-6",
    "Adam": "momentum: 0.9 momentum2: 0.999 delta: 1e-8",
}
BASE_LR = {"AdaDelta": 1.0}
CLIP = 1.2


def solver_path(tmp_path, kind, regularization="L2", clip=CLIP):
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    path = tmp_path / f"{kind}_{regularization}.prototxt"
    path.write_text(
        f'net: "{net}"\ntype: "{kind}"\n{HYPER[kind]}\nbase_lr: {BASE_LR.get(kind, 0.05)}\n'
        f'lr_policy: "step" gamma: 0.5 stepsize: 2\niter_size: 2\n'
        f'weight_decay: 0.01 regularization_type: "{regularization}"\n'
        f'clip_gradients: {clip}\nrandom_seed: 7\nsnapshot_prefix: "{tmp_path}/snap"\n')
    return path


def set_inputs(solver, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, K)).astype(np.float32)
    y = rng.normal(size=(N, M)).astype(np.float32)
    solver.net.blobs["x"].data[...] = x         # Python writes: host mirror
    solver.net.blobs["y"].data[...] = y
    return x, y


def injected_gradient(iteration, shape):
    """Multiples of 1/64 in [-1/2, 1/2]: squares and their sums are exact in float32."""
    return np.random.default_rng([100, *iteration]).integers(-32, 33, shape) / 64


def inject_gradients(solver, norms=None):
    """Replace every learnable diff (after the iter_size passes) by this iteration's
    injected gradient, written from Python as a pycaffe callback would."""
    def replace():
        total = 0.0
        for i, prm in enumerate(solver.net.learnable_params):
            g = injected_gradient((solver.iter, i), prm.blob.shape)
            prm.blob.diff[...] = g
            total += float(np.sum(g * g))
        if norms is not None:
            norms.append(np.sqrt(total))
    solver.add_callback(on_gradients=replace)


def make(path, inject=True, norms=None, cls=None):
    solver = cls(str(path)) if cls else get_solver(str(path))
    set_inputs(solver)
    if inject:
        inject_gradients(solver, norms)
    return solver


def state(solver):
    """Host copies of the weights, the diffs (Caffe leaves the update there) and the
    history."""
    params = solver.net.learnable_params
    return ([p.blob.data.copy() for p in params], [p.blob.diff.copy() for p in params],
            [backend.to_host(h).copy() for h in solver.history])


def trajectory(solver, iters):
    out = []
    for _ in range(iters):
        solver.step(1)
        out.append(state(solver))
    return out


def assert_states_equal(got, want, what):
    for kind, g_arrays, w_arrays in zip(("weights", "update", "history"), got, want):
        assert len(g_arrays) == len(w_arrays)
        for j, (g, w) in enumerate(zip(g_arrays, w_arrays)):
            np.testing.assert_array_equal(g, w, err_msg=f"{what}: {kind} #{j}")


def assert_states_close(got, want, what, rtol, atol):
    for kind, g_arrays, w_arrays in zip(("weights", "update", "history"), got, want):
        for j, (g, w) in enumerate(zip(g_arrays, w_arrays)):
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol,
                                       err_msg=f"{what}: {kind} #{j}")


@pytest.mark.parametrize("regularization", ["L2", "L1"])
@pytest.mark.parametrize("kind", list(HYPER))
def test_gpu_updates_equal_the_cpu_trajectory_bit_for_bit(tmp_path, gpu_mode, kind,
                                                          regularization):
    """iter_size 2, lr_mult/decay_mult per blob (incl. decay 0), a step lr policy and
    active gradient clipping: four iterations agree in every bit each iteration."""
    path = solver_path(tmp_path, kind, regularization)
    norms = []
    cpu = trajectory(make(path, norms=norms), 4)
    assert max(norms) > CLIP > 0          # clipping does act
    xp = gpu_mode.on()
    solver = make(path)
    gpu = trajectory(solver, 4)
    assert all(isinstance(h, xp.ndarray) for h in solver.history)
    for it, (g, c) in enumerate(zip(gpu, cpu)):
        assert_states_equal(g, c, f"{kind} {regularization} iteration {it}")


@pytest.mark.parametrize("kind", list(HYPER))
def test_training_on_the_nets_gradients_follows_the_cpu_run(tmp_path, gpu_mode, kind):
    """No injection: forward/backward in GPU mode, then the fused update. The emulator
    runs the same numpy GEMMs (bit-exact); a GPU's cuBLAS rounds differently."""
    path = solver_path(tmp_path, kind)
    cpu = trajectory(make(path, inject=False), 4)
    gpu_mode.on()
    gpu = trajectory(make(path, inject=False), 4)
    for it, (g, c) in enumerate(zip(gpu, cpu)):
        if gpu_mode.emulated:
            assert_states_equal(g, c, f"{kind} iteration {it}")
        else:     # test_solver.py's float32-vs-float64 tolerance
            assert_states_close(g, c, f"{kind} iteration {it}", rtol=1e-5, atol=1e-6)


def test_one_fused_launch_per_learnable_blob(tmp_path, gpu_mode, monkeypatch):
    path = solver_path(tmp_path, "Adam")
    gpu_mode.on()
    solver = make(path)
    launched = []
    real_launch = kernels.launch

    def counting_launch(module, kernel, dtype, *args, **kwargs):
        if module == "sgd_update":
            launched.append((kernel, args[0]))
        return real_launch(module, kernel, dtype, *args, **kwargs)

    monkeypatch.setattr(kernels, "launch", counting_launch)
    solver.step(2)
    sizes = [p.blob.count for p in solver.net.learnable_params]
    assert launched == [("adam_update", n) for n in sizes] * 2


class HalvedSGD(SGDSolver):
    """A Python rule of its own: GPU mode must run it, not the fused SGD kernel."""

    def compute_update_value(self, param_id, rate):
        super().compute_update_value(param_id, rate)
        self.net.learnable_params[param_id].blob.diff[...] *= np.float32(0.5)


def test_a_subclass_with_its_own_rule_keeps_it_in_gpu_mode(tmp_path, gpu_mode, monkeypatch):
    path = solver_path(tmp_path, "SGD")
    cpu = trajectory(make(path, cls=HalvedSGD), 3)
    gpu_mode.on()
    launched = []
    real_launch = kernels.launch
    monkeypatch.setattr(kernels, "launch", lambda module, *a, **k: (
        launched.append(module), real_launch(module, *a, **k)))
    gpu = trajectory(make(path, cls=HalvedSGD), 3)
    assert "sgd_update" not in launched
    for it, (g, c) in enumerate(zip(gpu, cpu)):
        assert_states_equal(g, c, f"iteration {it}")


@pytest.mark.parametrize("kind", ["SGD", "AdaDelta", "Adam"])
@pytest.mark.parametrize("first_mode", ["gpu", "cpu"])
def test_snapshot_in_one_mode_resumes_in_the_other(tmp_path, gpu_mode, kind, first_mode):
    """3 iterations, snapshot, restore in a new solver in the other mode, 3 more: the
    same weights, updates and history as 6 uninterrupted CPU iterations."""
    path = solver_path(tmp_path, kind)
    straight = trajectory(make(path), 6)[-1]
    if first_mode == "gpu":
        gpu_mode.on()
    first = make(path)
    first.step(3)
    _, state_file = first.snapshot()
    if first_mode == "gpu":
        gpu_mode.off()
    else:
        xp = gpu_mode.on()
    resumed = make(path)
    resumed.restore(state_file)
    assert resumed.iter == 3
    if first_mode == "cpu":        # restore puts the history on the device
        assert all(isinstance(h, xp.ndarray) for h in resumed.history)
    resumed.step(3)
    assert resumed.iter == 6
    assert_states_equal(state(resumed), straight, f"{kind} resumed from {first_mode}")


def test_switching_modes_between_steps_continues_the_trajectory(tmp_path, gpu_mode):
    path = solver_path(tmp_path, "Adam")
    straight = trajectory(make(path), 6)[-1]
    solver = make(path)
    solver.step(2)
    gpu_mode.on()
    solver.step(2)
    gpu_mode.off()
    solver.step(2)
    assert all(type(h) is np.ndarray for h in solver.history)
    assert_states_equal(state(solver), straight, "CPU, GPU, CPU")


def expected_loss(solver, x, y):
    """EuclideanLoss of NET at the current weights, in float64 from the definition."""
    w1, b1 = (a.astype(np.float64) for a in (b.data for b in solver.net.params["ip1"]))
    w2, b2 = (a.astype(np.float64) for a in (b.data for b in solver.net.params["ip2"]))
    h = np.maximum(x.astype(np.float64) @ w1.T + b1, 0)
    out = h @ w2.T + b2
    return np.sum((out - y) ** 2) / (2 * N)


def pycaffe_session(path):
    """pycaffe style: new inputs and a weight edit written from Python between steps."""
    solver = caffe.SGDSolver(str(path))
    losses, expected = [], []
    for it in range(3):
        x, y = set_inputs(solver, seed=10 + it)
        if it == 1:
            solver.net.params["ip1"][0].data[0, :] = 0.25
            solver.net.params["ip2"][1].data[...] = -0.5
        expected.append(expected_loss(solver, x, y))
        solver.step(1)
        losses.append(float(solver.net.blobs["loss"].data))
    return losses, expected, state(solver)


def test_python_writes_in_gpu_mode_reach_the_device(tmp_path, gpu_mode):
    path = solver_path(tmp_path, "SGD")
    cpu_losses, _, cpu_state = pycaffe_session(path)
    gpu_mode.on()
    losses, expected, gpu_state = pycaffe_session(path)
    # The loss of each step is the forward at the weights and inputs Python just wrote.
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    if gpu_mode.emulated:
        assert losses == cpu_losses
        assert_states_equal(gpu_state, cpu_state, "pycaffe session")
    else:
        assert_states_close(gpu_state, cpu_state, "pycaffe session", rtol=1e-5, atol=1e-6)
