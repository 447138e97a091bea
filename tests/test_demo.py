"""The synthetic example end to end: the kit's train -> test -> evaluate learns, and
`caffelite train` resumes a DeepLab-style run bit-identically."""
import os
import shutil
import subprocess
import sys

import numpy as np

from caffelite.demo import expand_train_configs, prepare_experiment, run_demo
from caffelite.io.caffemodel import read_caffemodel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Chance level on this set is a few percent mIoU (over the classes present); a short
# run must be far above it.
MIOU_FLOOR = 0.30


def test_short_demo_learns(tmp_path):
    result = run_demo(str(tmp_path), max_iter=150, n_train=60, n_val=12)
    losses = result["losses"]
    assert len(losses) == 150
    assert np.mean(losses[-20:]) < 0.4 * np.mean(losses[:5])
    assert result["scores"]["miou_present"] > MIOU_FLOOR
    features = tmp_path / "voc_synth" / "features" / "aspp_slim" / "val" / "fc8"
    assert len(list(features.glob("*_blob_0.mat"))) == 12


def _train(cwd, *args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "caffelite.cli", "train", *args], cwd=cwd,
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


def _weights(path):
    return {l.name: [b.data for b in l.blobs] for l in read_caffemodel(path)}


def test_cli_train_resume_is_bit_identical(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp, _, config, defines = prepare_experiment(n_train=12, n_val=2, max_iter=8, batch_size=2)
    solver = tmp_path / config / "solver.prototxt"
    text = solver.read_text().replace("snapshot: ${MAX_ITER}", "snapshot: 4")
    solver.write_text(text)
    solver = expand_train_configs(config, defines)
    log = _train(tmp_path, "--solver", solver)
    assert "Iteration 0, loss = " in log and "Optimization Done." in log
    assert "train_iter_4.solverstate" in log
    model_dir = tmp_path / exp / "model" / "aspp_slim"
    straight = _weights(str(model_dir / "train_iter_8.caffemodel"))
    shutil.move(str(model_dir / "train_iter_8.caffemodel"), str(tmp_path / "straight.caffemodel"))
    _train(tmp_path, "--solver", solver, "--snapshot",
           str(model_dir / "train_iter_4.solverstate"), "--continue_streams")
    resumed = _weights(str(model_dir / "train_iter_8.caffemodel"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        for a, b in zip(straight[name], resumed[name]):
            np.testing.assert_array_equal(a, b)


def test_cli_train_rejects_weights_with_snapshot(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "caffelite.cli", "train", "--solver", "s",
                          "--weights", "a", "--snapshot", "b"], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 1 and "weights to finetune but not both" in out.stderr
