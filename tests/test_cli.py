"""The caffelite command line: Caffe's verbs, glog lines, one-line errors."""
import os
import re
import subprocess
import sys

import numpy as np


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NET = '''
name: "${NAME}"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } shape { dim: 2 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
'''


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "caffelite.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd)


GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] ")


def test_test_verb_logs_batches_and_means(tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    out = run("test", "--model", str(net), "--iterations", "3", "-D", "NAME=n",
              "--log", str(tmp_path / "log.txt"))
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    batch = [l for l in lines if "Batch 2, loss = " in l]
    assert batch and GLOG.match(batch[0])
    assert any(re.search(r"\] loss = [\d.]+ \(\* 1 = [\d.]+ loss\)", l) for l in lines)
    assert "Batch 0, loss" in (tmp_path / "log.txt").read_text()


def test_test_verb_sums_in_float_like_caffe(tmp_path):
    """tools/caffe.cpp's test() adds each batch's outputs in float and divides in float:
    1000 batches of a constant 0.1 output mean 0.099999, not 0.1; the weighted mean is
    the float product."""
    net = tmp_path / "net.prototxt"
    net.write_text('layer { name: "d" type: "DummyData" top: "c" dummy_data_param {\n'
                   '  shape { dim: 1 } data_filler { type: "constant" value: 0.1 } } }\n'
                   'layer { name: "w" type: "Power" bottom: "c" top: "w" loss_weight: 3 }\n')
    out = run("test", "--model", str(net), "--iterations", "1000")
    assert out.returncode == 0, out.stderr
    total = np.float32(0)
    for _ in range(1000):
        total = np.float32(total + np.float32(0.1))
    mean = total / np.float32(1000)
    expected = "w = %g (* 3 = %g loss)" % (mean, np.float32(3) * mean)
    assert expected == "w = 0.099999 (* 3 = 0.299997 loss)"
    assert re.search(r"\] " + re.escape(expected) + "$", out.stderr, re.M), out.stderr[-500:]
    loss = np.float32(0)
    for _ in range(1000):                    # each batch's loss: 3 * 0.1 in float
        loss = np.float32(loss + np.float32(3) * np.float32(0.1))
    assert re.search(r"\] Loss: %s$" % re.escape("%g" % (loss / np.float32(1000))),
                     out.stderr, re.M)


def test_test_verb_keeps_the_files_state_level(tmp_path):
    """`caffe test` in the fork builds Net(model, TEST): the prototxt's state { level }
    decides which layers exist unless --level is given."""
    net = tmp_path / "net.prototxt"
    net.write_text(NET.replace("${NAME}", "n") + 'state { level: 2 }\n' +
                   'layer { name: "deep" type: "Power" bottom: "ip" top: "deep" '
                   'include { min_level: 2 } }\n')
    kept = run("test", "--model", str(net), "--iterations", "1")
    assert kept.returncode == 0, kept.stderr
    assert re.search(r"\] deep = ", kept.stderr)
    lowered = run("test", "--model", str(net), "--iterations", "1", "--level", "0")
    assert lowered.returncode == 0, lowered.stderr
    assert "deep = " not in lowered.stderr and re.search(r"\] loss = ", lowered.stderr)


def test_caffe_verbs_take_gflags_single_dash_flags(tmp_path):
    """`caffe test -model m -iterations 2` (gflags) runs as it is; -D defines and
    negative values are left alone."""
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    out = run("test", "-model", str(net), "-iterations=2", "-DNAME=n", "-level", "-1")
    assert out.returncode == 0, out.stderr
    assert "Batch 1, loss = " in out.stderr and "Batch 2," not in out.stderr


def test_missing_define_is_one_line_error(tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    out = run("test", "--model", str(net), "--iterations", "1")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "NAME (line 2)" in out.stderr and str(net) in out.stderr


def test_time_verb_prints_per_layer_averages(tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    out = run("time", "--model", str(net), "--iterations", "2", "-D", "NAME=n")
    assert out.returncode == 0, out.stderr
    assert re.search(r"ip\tforward: [\d.e-]+ ms\.", out.stderr)
    assert "Average Forward-Backward:" in out.stderr


def test_upgrade_verb_writes_v2_text(tmp_path):
    src = tmp_path / "v1.prototxt"
    src.write_text('name: "v1"\ninput: "data"\ninput_dim: 1\ninput_dim: 1\ninput_dim: 5\n'
                   'input_dim: 5\nlayers { name: "c" type: CONVOLUTION bottom: "data" top: "c" '
                   'blobs_lr: 1 blobs_lr: 2 convolution_param { num_output: 2 kernel_size: 3 '
                   'hole: 2 } }\n')
    dst = tmp_path / "v2.prototxt"
    out = run("upgrade", str(src), str(dst))
    assert out.returncode == 0, out.stderr
    text = dst.read_text()
    assert 'type: "Convolution"' in text and "dilation: 2" in text and "lr_mult: 2" in text
    assert "hole" not in text and "layers" not in text
    import caffelite as caffe
    net = caffe.Net(str(dst), caffe.TEST)
    assert net.blobs["c"].shape == (1, 2, 1, 1)


def test_bad_weights_file_is_one_line_error(tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    bad = tmp_path / "w.caffemodel"
    bad.write_bytes(b"\x0a\xff\xff")
    out = run("test", "--model", str(net), "--weights", str(bad), "-D", "NAME=n")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "truncated or corrupt" in out.stderr and str(bad) in out.stderr
