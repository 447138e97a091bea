"""Bad prototxt values and API misuse give one clear error naming the file, the layer
and the blob (Caffe stops at a CHECK there), never numpy's or Python's own exception."""
import numpy as np
import pytest

import caffelite as caffe
from caffelite.io.upgrade import UpgradeError
from caffelite.net import NetError

INPUT = ('layer { name: "in" type: "Input" top: "data" '
         'input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }\n')


def build(tmp_path, text):
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    return str(path), lambda: caffe.Net(str(path), caffe.TEST)


@pytest.mark.parametrize("text, words", [
    ('layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: -1 } } }',
     r"layer 'in' \(Input\): negative dimension in blob shape \(2, -1\)"),
    ('layer { name: "d" type: "DummyData" top: "x" dummy_data_param { shape { dim: -1 } } }',
     r"layer 'd' \(DummyData\): negative dimension"),
    ('layer { name: "in" type: "Input" top: "data" '
     'input_param { shape { dim: 50000 dim: 50000 } } }',
     r"layer 'in' \(Input\): blob size exceeds INT_MAX: shape \(50000, 50000\)"),
    ('layer { name: "in" type: "Input" top: "data" '        # Reshape checks axis by axis
     'input_param { shape { dim: 50000 dim: 50000 dim: 0 } } }',
     r"layer 'in' \(Input\): blob size exceeds INT_MAX: shape \(50000, 50000, 0\) has "
     r"2500000000 elements by axis 1"),
    (INPUT + 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
     'inner_product_param { num_output: 2147483648 } }',
     r"layer 'ip' \(InnerProduct\): blob size exceeds INT_MAX: shape \(2147483648, 243\)"),
    (INPUT + 'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
     'convolution_param { num_output: 4 kernel_size: 3 pad: 2147483648 } }',
     r"layer 'c' \(Convolution\): blob size exceeds INT_MAX"),
    (INPUT + 'layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param '
     '{ num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: nan } } }',
     r"layer 'c' \(Convolution\): gaussian sigma must be positive, got nan"),
    ('layer { name: "in" type: "Input" top: "data" top: "ref" input_param { shape { dim: 2 '
     'dim: 3 dim: 9 dim: 9 } shape { dim: 2 dim: 3 dim: 4 dim: 4 dim: 4 } } }\n'
     'layer { name: "up" type: "Interp" bottom: "data" bottom: "ref" top: "o" }',
     r"layer 'up' \(Interp\): Cannot use legacy accessors on Blobs with > 4 axes"),
    ('layer { name: "in" type: "Input" top: "f" top: "img" input_param { shape { dim: 1 '
     'dim: 3 dim: 4 dim: 4 } shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }\n'
     'layer { name: "prior" type: "PriorBox" bottom: "f" bottom: "img" top: "p" '
     'prior_box_param { min_size: 8 aspect_ratio: 0 } }',
     r"layer 'prior'.*aspect_ratio must be positive, got 0"),
    (INPUT + 'layer { name: "up" type: "Interp" bottom: "data" top: "data" '
     'interp_param { zoom_factor: 2 } }',
     r"layer 'up' \(Interp\) cannot work in place: it would reshape its blob 'data' from "
     r"\(2, 3, 9, 9\) to \(2, 3, 17, 17\)"),
])
def test_setup_errors_name_the_file_and_layer(tmp_path, text, words):
    path, make = build(tmp_path, text)
    with pytest.raises(NetError, match=words) as info:
        make()
    assert str(info.value).startswith(path)


def test_a_filler_error_in_forward_names_the_layer(tmp_path):
    """DummyData fills in forward: Caffe's CHECK(blob->count()) on an empty blob."""
    _, make = build(tmp_path, 'layer { name: "d" type: "DummyData" top: "x" dummy_data_param '
                              '{ shape { dim: 0 dim: 3 } data_filler { type: "gaussian" } } }')
    net = make()
    with pytest.raises(NetError, match=r"layer 'd' \(DummyData\) forward: gaussian filler: "
                                       r"cannot fill the empty blob \(0, 3\)"):
        net.forward()


def test_same_size_interp_may_work_in_place(tmp_path):
    _, make = build(tmp_path, INPUT + 'layer { name: "up" type: "Interp" bottom: "data" '
                                      'top: "data" interp_param { height: 9 width: 9 } }')
    net = make()
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 9)).astype(np.float32)
    np.testing.assert_array_equal(net.forward(data=x)["data"], x)


def test_hole_and_dilation_together_are_refused(tmp_path):
    """DeepLab v1's schema has hole, v2's dilation; no Caffe parses both."""
    _, make = build(tmp_path, INPUT + 'layer { name: "c" type: "Convolution" bottom: "data" '
                                      'top: "c" convolution_param { num_output: 4 '
                                      'kernel_size: 3 dilation: 3 hole: 2 } }')
    with pytest.raises(UpgradeError, match="layer 'c': give either DeepLab v1's hole"):
        make()


def test_input_dim_errors_name_the_file(tmp_path):
    path, make = build(tmp_path, 'input: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 4\n')
    with pytest.raises(NetError, match="1 inputs need 4 input_dim values, got 3") as info:
        make()
    assert str(info.value).startswith(path)


def test_prior_box_reads_legacy_height_and_width_of_2d_bottoms(tmp_path):
    """SSD's PriorBox uses height()/width(): 1 on a blob of two axes, one cell."""
    _, make = build(tmp_path, 'layer { name: "in" type: "Input" top: "f" top: "img" '
                              'input_param { shape { dim: 6 dim: 3 } shape { dim: 6 dim: 3 } } }\n'
                              'layer { name: "prior" type: "PriorBox" bottom: "f" bottom: "img" '
                              'top: "p" prior_box_param { min_size: 8 img_size: 16 } }')
    assert make().forward()["p"].shape == (1, 2, 4)


def test_forward_arrays_of_the_wrong_shape_name_the_blob(tmp_path):
    _, make = build(tmp_path, INPUT + 'layer { name: "r" type: "ReLU" bottom: "data" '
                                      'top: "out" }')
    net = make()
    with pytest.raises(NetError, match=r"input 'data': an array of shape \(2, 3, 8, 8\) does "
                                       r"not fit the blob's shape \(2, 3, 9, 9\)"):
        net.forward(data=np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(KeyError, match="forward\\(blobs=...\\): no blob named 'nope'"):
        net.forward(blobs=["nope"])
    net.forward()
    with pytest.raises(NetError, match=r"diff 'out': an array of shape \(2, 1\)"):
        net.backward(out=np.zeros((2, 1), np.float32))
    with pytest.raises(KeyError, match="backward\\(diffs=...\\): no blob named 'x'"):
        net.backward(diffs=["x"])


def test_a_phase_that_is_no_phase_is_named(tmp_path):
    path, _ = build(tmp_path, INPUT)
    with pytest.raises(NetError, match="phase must be caffe.TRAIN or caffe.TEST, got 'x'"):
        caffe.Net(path, path, "x")


def test_a_same_count_in_place_reshape_is_allowed(tmp_path):
    """Caffe keeps a blob's memory through a same-count reshape, so a Python layer may
    view its in-place blob in another shape; only a new count is refused."""
    (tmp_path / "view_layers.py").write_text(
        "import caffelite as caffe\n"
        "class AsImage(caffe.Layer):\n"
        "    def setup(self, bottom, top): pass\n"
        "    def reshape(self, bottom, top): top[0].reshape(*bottom[0].shape, 1, 1)\n"
        "    def forward(self, bottom, top): pass\n"
        "    def backward(self, top, propagate_down, bottom): pass\n")
    _, make = build(tmp_path, 'layer { name: "in" type: "Input" top: "x" input_param { '
                              'shape { dim: 2 dim: 3 } } }\n'
                              'layer { name: "v" type: "Python" bottom: "x" top: "x" '
                              'python_param { module: "view_layers" layer: "AsImage" } }')
    assert make().blobs["x"].shape == (2, 3, 1, 1)


def test_continue_streams_before_the_verb_and_without_a_snapshot():
    from caffelite import cli
    assert cli.gflags_style(["--continue_streams", "train", "-solver", "s"]) == \
        ["train", "--continue_streams", "--solver", "s"]
    assert cli.main(["train", "--solver", "s", "--continue_streams"]) == 1


LOSS_NET = ('layer { name: "in" type: "Input" top: "s" top: "l" input_param { '
            'shape { dim: 1 dim: 3 dim: 2 dim: 2 } shape { dim: 1 dim: 1 dim: 2 dim: 2 } } }\n'
            'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "x" '
            'softmaxloss_param { weight_source: "%s" } }\n')


@pytest.mark.parametrize("content, words", [
    ("1 2 3".encode("utf-16"), "must hold whitespace-separated numbers"),
    (b"1 nan 3", "must be finite and not negative"),
    (b"1 inf 3", "must be finite and not negative"),
    (b"1 -2 3", "must be finite and not negative"),
])
def test_class_weights_that_are_no_weights_name_the_file_and_layer(tmp_path, content, words):
    weights = tmp_path / "weights.txt"
    weights.write_bytes(content)
    _, make = build(tmp_path, LOSS_NET % weights)
    with pytest.raises(NetError, match=r"layer 'loss' \(SoftmaxWithLoss\): .*" + words):
        make()


def test_class_weights_are_read_as_bytes(tmp_path):
    weights = tmp_path / "weights.txt"
    weights.write_bytes(b"1\r\n0.5\r\n2\r\n")
    _, make = build(tmp_path, LOSS_NET % weights)
    assert make().layers[1].v1.class_weights == [1.0, 0.5, 2.0]


def test_one_stage_given_as_a_string_is_one_stage(tmp_path):
    path, _ = build(tmp_path, INPUT + 'layer { name: "p" type: "Power" bottom: "data" '
                    'top: "p" include { stage: "deploy" } }')
    assert caffe.Net(path, caffe.TEST, stages="deploy").outputs == ["p"]
    assert caffe.Net(path, caffe.TEST, stages=("deploy",)).outputs == ["p"]
    with pytest.raises(TypeError, match="level must be an integer, got '1'"):
        caffe.Net(path, caffe.TEST, level="1")
    with pytest.raises(TypeError, match="stages must be strings, got 1"):
        caffe.Net(path, caffe.TEST, stages=["a", 1])


@pytest.mark.parametrize("settings, words", [
    ("momentum: 1", r"Adam's momentum \(beta1\) should lie in \[0, 1\), got 1"),
    ("momentum: 0.9 momentum2: 1.5", r"momentum2 \(beta2\) should lie in \[0, 1\], got 1.5"),
])
def test_adam_moments_outside_their_range_name_the_solver(tmp_path, settings, words):
    from caffelite.solver import SolverError, get_solver
    net, _ = build(tmp_path, INPUT)
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{net}" type: "Adam" base_lr: 0.1 lr_policy: "fixed" '
                      f'{settings}\n')
    with pytest.raises(SolverError, match=words) as info:
        get_solver(str(solver))
    assert str(info.value).startswith(str(solver))


def test_solver_type_and_type_together_name_the_file(tmp_path):
    from caffelite.io import prototxt
    solver = tmp_path / "solver.prototxt"
    solver.write_text('net: "n" solver_type: SGD type: "Adam"\n')
    with pytest.raises(UpgradeError, match=r"^.*solver.prototxt: the solver sets both"):
        prototxt.read_solver(str(solver))


def test_finetuning_from_a_snapshot_this_run_writes_is_refused(tmp_path, monkeypatch):
    """Caffe overwrites the --weights file with its own snapshot; caffelite refuses
    before training, so the starting point is kept."""
    from caffelite import cli
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text(
        INPUT + 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
        'inner_product_param { num_output: 2 } }\n'
        'layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "ip" top: "l" }\n')
    (tmp_path / "model").mkdir()
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt" lr_policy: "fixed" base_lr: 0.1 max_iter: 4 snapshot: 2\n'
        'snapshot_prefix: "model/train"\n')
    assert cli.main(["train", "--solver", "solver.prototxt"]) == 0
    for n in (2, 4):
        before = (tmp_path / f"model/train_iter_{n}.caffemodel").read_bytes()
        assert cli.main(["train", "--solver", "solver.prototxt", "--weights",
                         f"model/train_iter_{n}.caffemodel"]) == 1
        assert (tmp_path / f"model/train_iter_{n}.caffemodel").read_bytes() == before
    from caffelite.solver import get_solver
    solver = get_solver("solver.prototxt")
    assert solver.snapshot_iteration_of("model/train_iter_4.caffemodel") == 4
    assert solver.snapshot_iteration_of("./model/../model/train_iter_2.solverstate") == 2
    assert solver.snapshot_iteration_of("model/train_iter_3.caffemodel") is None
    assert solver.snapshot_iteration_of("model/train_iter_6.caffemodel") is None
    assert solver.snapshot_iteration_of("model/other_iter_4.caffemodel") is None
