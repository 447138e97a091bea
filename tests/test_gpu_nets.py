"""Whole nets in GPU mode against the CPU: the corpus's ASPP-VGG and ResNet-101 MSC test
nets forward, one ASPP-VGG training iteration, `caffelite train --gpu 0` on the demo,
the error without CuPy, and (on a GPU) a memory pool that stops growing.

The CPU path is the oracle (test_corpus_nets.py checks it against OpenCV's Caffe
importer). GPU mode may sum in other orders (col2im's taps, cuBLAS GEMMs, atomics), so
values are compared with the tolerance test_corpus_nets.py uses between two float32
implementations of a whole net: rtol 1e-4 and 1e-4 of the blob's largest magnitude.
The corpus nets take their data from Input layers and run at small sizes (see
test_corpus_nets.py for the sizes the nets' label shrinking allows).
"""
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import caffelite as caffe
from caffelite import backend, kernels
from caffelite.cli import main as cli_main
from caffelite.demo import expand_train_configs, prepare_experiment
from caffelite.io import prototxt
from caffelite.solver import Solver
from gpu_modes import cuda_available, gpu_mode  # noqa: F401  (fixture)
from test_corpus_nets import (EXP, TEST, TRAIN, corpus_defines, corpus_path,
                              fill_inputs, randomize, read_config, with_inputs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-4


def assert_close(got, want, what):
    scale = float(np.abs(want).max()) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale, err_msg=what)


def host_blobs(net, names=None):
    return {n: net.blobs[n].data.copy() for n in (names or net.blobs)}


# ---------------------------------------------------------------------- forward
def build_without_matwrite(config, crop, tmp_path):
    """test_corpus_nets.build without the MatWrite layers (host-only file writers that
    accept one forward per name of their source list)."""
    param, shapes = with_inputs(read_config(config, tmp_path), crop, TEST, tmp_path)
    layers = [l for l in param.layer if l.type != "MatWrite"]
    del param.layer[:]
    param.layer.extend(layers)
    caffe.set_random_seed(5)
    net = caffe.Net(param=param, phase=TEST)
    randomize(net)
    fill_inputs(net, shapes)
    return net


@pytest.mark.parametrize("config, crop, key_blobs", [
    ("deeplabv2_vgg16_aspp_l/test.prototxt", 65, ["pool5", f"fc8_{EXP}", "fc8_interp"]),
    ("deeplabv2_resnet101_msc/test.prototxt", 33,
     [f"fc1_{EXP}", f"fc1_{EXP}_res075_interp", f"fc1_{EXP}_res05_interp", "fc_fusion",
      "fc1_interp"]),
], ids=["aspp-vgg", "resnet101-msc"])
def test_corpus_test_net_forward_matches_cpu(tmp_path, gpu_mode, config, crop, key_blobs):
    """One net, forward on the CPU, then forward again in GPU mode: every blob agrees."""
    net = build_without_matwrite(config, crop, tmp_path)
    net.forward()
    cpu = host_blobs(net)
    for name in key_blobs:
        assert np.abs(cpu[name]).max() > 0, name     # a real signal to compare
    inputs = [net.blobs[t] for lp in net.layer_params if lp.type == "Input" for t in lp.top]
    for blob in net.blobs.values():                  # poison: every blob is recomputed
        if not any(blob.shares_data_with(i) for i in inputs):
            blob.data[...] = np.nan
    gpu_mode.on()
    net.forward()
    gpu_mode.off()
    for name, want in cpu.items():
        assert_close(net.blobs[name].data, want, name)


# ---------------------------------------------------------------------- training
def corpus_train_solver(tmp_path, config, base_lr=None):
    """The corpus's own solver settings (or another ``base_lr``) on its train net (Input
    data, batch 1, 65×65, random weights). Dropout layers are left out: CuPy's generator
    draws other masks than the CPU's, which would make the two runs train different
    nets."""
    net_param, shapes = with_inputs(read_config(config, tmp_path), 65, TRAIN, tmp_path,
                                    batch=1)
    layers = [l for l in net_param.layer if l.type != "Dropout"]
    assert len(layers) < len(net_param.layer)
    del net_param.layer[:]
    net_param.layer.extend(layers)
    path = corpus_path("prototxt", *os.path.dirname(config).split("/"), "solver.prototxt")
    param = prototxt.read_solver(path, dict(corpus_defines(path, tmp_path), TRAIN_SET="t"))
    param.ClearField("train_net")
    param.train_net_param.CopyFrom(net_param)
    param.ClearField("snapshot")
    param.snapshot_prefix = str(tmp_path / "snap")
    if base_lr is not None:
        param.base_lr = base_lr
    caffe.set_random_seed(5)
    solver = Solver(param)
    randomize(solver.net)
    fill_inputs(solver.net, shapes)
    return solver


def one_training_iteration(solver):
    solver.step(1)
    net = solver.net
    loss = net.top_blobs[net._layer_names.index("loss")][0]     # a top without a name
    return (float(loss.data),
            [p.blob.data.copy() for p in net.learnable_params],
            [p.blob.diff.copy() for p in net.learnable_params])


def test_aspp_vgg_training_iteration_matches_cpu(tmp_path, gpu_mode):
    """Forward, backward and the fused SGD update (momentum, weight decay, poly lr) of
    the ASPP-VGG train net: loss, updates (left in the diffs) and new weights."""
    config = "deeplabv2_vgg16_aspp_l/train.prototxt"
    cpu_loss, cpu_weights, cpu_updates = one_training_iteration(
        corpus_train_solver(tmp_path, config))
    assert cpu_loss > 0
    xp = gpu_mode.on()
    solver = corpus_train_solver(tmp_path, config)
    loss, weights, updates = one_training_iteration(solver)
    gpu_mode.off()
    assert isinstance(solver.history[0], xp.ndarray)
    assert math.isclose(loss, cpu_loss, rel_tol=RTOL)
    names = solver._param_names()
    for name, got, want in zip(names, updates, cpu_updates):
        assert np.abs(want).max() > 0, name
        assert_close(got, want, f"update of {name}")
    for name, got, want in zip(names, weights, cpu_weights):
        assert_close(got, want, f"weights {name}")


# ---------------------------------------------------------------------- the CLI
def demo_solver(tmp_path, max_iter=4):
    exp, _, config, defines = prepare_experiment(n_train=8, n_val=2, max_iter=max_iter,
                                                 batch_size=2)
    template = tmp_path / config / "solver.prototxt"
    template.write_text(template.read_text().replace("display: 20", "display: 1"))
    return expand_train_configs(config, defines)


def train_log(cwd, solver, *extra, env=None):
    # The switches a test sets itself, not inherited (the CUDA-graph default is tested)
    own = ("CAFFELITE_GPU_EMULATOR", "CAFFELITE_CUDA_GRAPHS")
    env = dict({k: v for k, v in os.environ.items() if k not in own},
               PYTHONPATH=ROOT, **(env or {}))
    out = subprocess.run([sys.executable, "-m", "caffelite.cli", "train", "--solver", solver,
                          *extra], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


LOSS_LINE = re.compile(r"\] (Iteration \d+, (?:loss|lr) = |    Train net output #\d+: "
                       r"\S+ = )(\S+)")


def loss_log(log):
    return [(m.group(1), float(m.group(2))) for m in map(LOSS_LINE.search, log.splitlines())
            if m]


def test_cli_train_gpu_on_the_emulator_logs_the_cpu_losses(tmp_path, monkeypatch):
    """`caffelite train --gpu 0` with CAFFELITE_GPU_EMULATOR=1 on the demo config: the
    same iterations, learning rates, losses and outputs as the CPU run. The log prints
    6 significant digits, so a value may differ by one unit of the last digit
    (1e-5 relative) when GPU mode rounds a sum differently."""
    monkeypatch.chdir(tmp_path)
    solver = demo_solver(tmp_path)
    cpu = loss_log(train_log(tmp_path, solver))
    log = train_log(tmp_path, solver, "--gpu", "0", env={"CAFFELITE_GPU_EMULATOR": "1"})
    assert "Using GPUs 0" in log
    gpu = loss_log(log)
    assert len(cpu) >= 4 * 3
    assert [k for k, _ in gpu] == [k for k, _ in cpu]
    for (key, g), (_, c) in zip(gpu, cpu):
        assert math.isclose(g, c, rel_tol=1e-5, abs_tol=1e-30), (key, g, c)


def test_cli_gpu_without_cupy_is_one_clear_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    solver = demo_solver(tmp_path)
    monkeypatch.delenv("CAFFELITE_GPU_EMULATOR", raising=False)
    monkeypatch.setitem(sys.modules, "cupy", None)          # `import cupy` fails
    monkeypatch.setattr(kernels, "_cupy_checked", [])       # forget a found CuPy
    try:
        code = cli_main(["train", "--solver", solver, "--gpu", "0"])
    finally:
        backend.set_mode_cpu()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert not backend.is_gpu()
    assert len(err) == 1 and err[0].startswith("caffelite train: error: GPU mode needs CuPy")
    assert "pip install" in err[0]


# ---------------------------------------------------------------------- memory
@pytest.mark.gpu
def test_memory_pool_stops_growing_after_the_second_iteration(tmp_path):
    if not cuda_available():
        pytest.skip("no CuPy with a CUDA device")
    import cupy
    backend.set_mode_gpu(emulate=False)
    try:
        # The corpus's base_lr diverges from random weights within two iterations (on
        # the CPU too); the pool's growth does not depend on the rate.
        solver = corpus_train_solver(tmp_path, "deeplabv2_vgg16_aspp_l/train.prototxt",
                                     base_lr=1e-7)
        pool = cupy.get_default_memory_pool()
        solver.step(2)
        cupy.cuda.get_current_stream().synchronize()
        after_two = pool.total_bytes()
        solver.step(8)
        cupy.cuda.get_current_stream().synchronize()
        assert pool.total_bytes() == after_two
        assert after_two > 0
    finally:
        backend.set_mode_cpu()
