"""examples/pycaffe_inference.py on the synthetic DeepLab example.

A short training with the demo's own configs gives the weights; the script runs as a
user runs it (a subprocess in the experiment folder).  Its labels are checked against
the test net run the DeepLab way, with ImageSegData reading, padding and normalising
the same JPEG (an independent path from caffe.io.load_image + Transformer).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import caffelite as caffe
from caffelite.demo import expand_train_configs, prepare_experiment
from caffelite.io.prototxt import read_text
from caffelite.solver import get_solver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "pycaffe_inference.py")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deeplab_synth")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        exp, _, config, defines = prepare_experiment(n_train=6, n_val=2, max_iter=10,
                                                     batch_size=2)
        get_solver(expand_train_configs(config, defines)).solve()
        test = os.path.join(config, "test_val.prototxt")
        with open(test, "w") as f:
            f.write(read_text(os.path.join(config, "test.prototxt"), defines))
        trained = os.path.join(exp, "model", "aspp_slim", "train_iter_10.caffemodel")
        assert os.path.isfile(trained)
        # Ten iterations predict the background everywhere: random weights in the
        # trained model's layout give score maps whose argmax varies.
        weights = os.path.join(exp, "model", "aspp_slim", "random.caffemodel")
        net = caffe.Net(test, caffe.TEST, weights=trained)
        rng = np.random.default_rng(5)
        for params in net.params.values():
            for p in params:
                p.data[...] = rng.normal(0, 0.5, p.data.shape)
        net.save(weights)
    finally:
        os.chdir(cwd)
    return root, test, weights


def run_script(root, *args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def reference_labels(root, test, weights):
    """The test net fed by its own ImageSegData layer (first val image)."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        net = caffe.Net(test, caffe.TEST, weights=weights)
        end = net._layer_names.index("fc8_interp")
        net.forward_from_to(0, end)
        scores = net.blobs["fc8_interp"].data[0].copy()
    finally:
        os.chdir(cwd)
    return scores


def test_inference_script_writes_voc_png(experiment):
    root, test, weights = experiment
    image = os.path.join("data", "JPEGImages", "val_0000.jpg")
    result = run_script(root, "--model", test, "--weights", weights, "--image", image,
                        "--output", "val_0000.png")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "val_0000.png" in result.stdout

    png = Image.open(root / "val_0000.png")
    width, height = Image.open(root / image).size
    assert png.mode == "P" and png.size == (width, height)
    palette = png.getpalette()
    assert palette[3:6] == [128, 0, 0] and palette[45:48] == [192, 128, 128]  # 1, 15
    labels = np.asarray(png)
    assert labels.max() <= 20

    scores = reference_labels(root, test, weights)
    expected = scores[:, :height, :width].argmax(axis=0)
    top2 = np.sort(scores[:, :height, :width], axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-4 * np.abs(top2).max()   # not a float near-tie
    assert clear.mean() > 0.95
    assert len(np.unique(expected[clear])) >= 3
    np.testing.assert_array_equal(labels[clear], expected[clear])


def test_inference_script_reports_a_missing_image(experiment):
    root, test, weights = experiment
    result = run_script(root, "--model", test, "--weights", weights, "--image",
                        "no_such.jpg", "--output", "x.png")
    assert result.returncode != 0
    assert "no_such.jpg" in result.stderr
