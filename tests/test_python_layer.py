"""type "Python": user layers subclassing caffe.Layer, as pycaffe runs them."""
import os
import sys
import textwrap
import uuid

import numpy as np
import pytest

import caffelite as caffe
from caffelite.net import NetError
from caffelite.proto import caffe_pb2
from google.protobuf import text_format

from gpu_modes import gpu_mode  # noqa: F401  (the fixture)

LAYERS_SOURCE = '''
import numpy as np
import caffelite as caffe


class Scale(caffe.Layer):
    """top = value * bottom, value from param_str."""

    def setup(self, bottom, top):
        self.value = float(self.param_str)
        self.setup_phase = self.phase

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.value * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = self.value * top[0].diff


class LearnedScale(caffe.Layer):
    """top = w * bottom with one learnable scalar w (added in setup)."""

    def setup(self, bottom, top):
        self.blobs.add_blob(1)
        self.blobs[0].data[0] = float(self.param_str or 1)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.blobs[0].data[0] * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        self.blobs[0].diff[0] += np.sum(top[0].diff * bottom[0].data)
        if propagate_down[0]:
            bottom[0].diff[...] = self.blobs[0].data[0] * top[0].diff


class LazyScale(LearnedScale):
    """LearnedScale whose blob is made in reshape, the first time it runs."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        if len(self.blobs) == 0:
            self.blobs.add_blob(1)
            self.blobs[0].data[0] = float(self.param_str or 1)
        top[0].reshape(*bottom[0].data.shape)


class WeightedSum(caffe.Layer):
    """sum(loss_weights * bottom) over the items: its own ``loss_weights`` attribute,
    which pycaffe never touches (Caffe keeps a layer's loss weights in C++)."""

    def setup(self, bottom, top):
        self.loss_weights = np.array([1.0, 2.0, 3.0])

    def reshape(self, bottom, top):
        top[0].reshape(1)

    def forward(self, bottom, top):
        top[0].data[0] = np.sum(self.loss_weights * bottom[0].data.reshape(-1, 3))

    def backward(self, top, propagate_down, bottom):
        pass


class SquareLoss(caffe.Layer):
    """0.5 * sum(bottom^2); a loss only through an explicit loss_weight, as in pycaffe."""

    def reshape(self, bottom, top):
        top[0].reshape(1)

    def forward(self, bottom, top):
        top[0].data[0] = 0.5 * np.sum(bottom[0].data ** 2)

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = top[0].diff[0] * bottom[0].data


class Counter(caffe.Layer):
    """A data layer: no bottoms, counts its forward calls; no backward defined."""

    def setup(self, bottom, top):
        self.calls = 0

    def reshape(self, bottom, top):
        top[0].reshape(2, 3)

    def forward(self, bottom, top):
        self.calls += 1
        top[0].data[...] = self.calls


class HostNumpy(caffe.Layer):
    """Writes numpy arrays into its top and overwrites its bottom data (pycaffe: numpy
    views of host memory, in GPU mode too)."""

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        assert type(bottom[0].data) is np.ndarray
        top[0].data[...] = np.asarray(bottom[0].data) + 1
        bottom[0].data[...] = 100

    def backward(self, top, propagate_down, bottom):
        self.seen = list(propagate_down)
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff
        propagate_down[0] = False           # a copy: the net's own list is untouched
        bottom.append(None)


class RaisesInForward(Scale):
    def forward(self, bottom, top):
        raise KeyError("no such entry")


class NegativeReshapeInBackward(Scale):
    def backward(self, top, propagate_down, bottom):
        bottom[0].reshape(2, -3)


class Broken(caffe.Layer):
    def setup(self, bottom, top):
        raise RuntimeError("broken on purpose")


class NotALayer(object):
    def __init__(self, param):
        pass
'''


@pytest.fixture
def clean_caffe_alias():
    """Undo whatever a test does to ``caffe`` in sys.modules and to sys.meta_path."""
    saved = {k: v for k, v in sys.modules.items() if k == "caffe" or k.startswith("caffe.")}
    meta_path = list(sys.meta_path)
    for k in saved:
        del sys.modules[k]
    yield
    for k in [k for k in sys.modules if k == "caffe" or k.startswith("caffe.")]:
        del sys.modules[k]
    sys.modules.update(saved)
    sys.meta_path[:] = meta_path


def write_module(directory, source=LAYERS_SOURCE):
    name = f"pylayers_{uuid.uuid4().hex[:8]}"
    (directory / f"{name}.py").write_text(textwrap.dedent(source))
    return name


@pytest.fixture
def module(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    return write_module(tmp_path)


def python_layer(name, module, cls, bottom=(), top=(), param_str=None, extra=""):
    text = f"layer {{ name: '{name}' type: 'Python' "
    text += "".join(f"bottom: '{b}' " for b in bottom)
    text += "".join(f"top: '{t}' " for t in top)
    text += f"python_param {{ module: '{module}' layer: '{cls}' "
    if param_str is not None:
        text += f"param_str: '{param_str}' "
    return text + "} " + extra + "}\n"


def write_net(path, body, inputs="input: 'data' input_shape { dim: 2 dim: 3 dim: 4 }"):
    path.write_text(f"name: 'pynet' force_backward: true\n{inputs}\n{body}")
    return str(path)


def test_forward_backward_param_str_and_phase(tmp_path, module):
    body = (python_layer("ten", module, "Scale", ["data"], ["ten"], "10")
            + python_layer("half", module, "Scale", ["ten"], ["half"], "0.5"))
    path = write_net(tmp_path / "net.prototxt", body)
    for phase in (caffe.TRAIN, caffe.TEST):
        net = caffe.Net(path, phase)
        layer = net.layer_dict["ten"]
        assert type(layer).__name__ == "Scale" and layer.type == "Python"
        assert layer.param_str == "10" and layer.setup_phase == phase == layer.phase
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    out = net.forward(data=x)
    np.testing.assert_allclose(out["half"], 5 * x, rtol=1e-6)
    diff = net.backward(half=np.ones_like(x))
    np.testing.assert_allclose(diff["data"], np.full_like(x, 5.0), rtol=1e-6)


def test_reshape_follows_the_input(tmp_path, module):
    path = write_net(tmp_path / "net.prototxt",
                     python_layer("ten", module, "Scale", ["data"], ["ten"], "10"))
    net = caffe.Net(path, caffe.TEST)
    net.blobs["data"].reshape(5, 1, 2)
    net.blobs["data"].data[...] = 1
    assert net.forward()["ten"].shape == (5, 1, 2)
    assert (net.blobs["ten"].data == 10).all()


def scale_and_square_loss(module, scale_class):
    """A net x = 2 (2 x 3) -> scale_class (w = 3) -> SquareLoss, and an SGD solver on it
    (lr 0.01, no momentum): (net text, solver)."""
    net_text = (
        "name: 'learn' layer { name: 'data' type: 'DummyData' top: 'data' "
        "dummy_data_param { shape { dim: 2 dim: 3 } data_filler { type: 'constant' "
        "value: 2 } } }\n"
        + python_layer("w", module, scale_class, ["data"], ["y"], "3")
        + python_layer("loss", module, "SquareLoss", ["y"], ["loss"], extra="loss_weight: 1 "))
    solver_param = caffe_pb2.SolverParameter()
    text_format.Parse("base_lr: 0.01 lr_policy: 'fixed' max_iter: 1 momentum: 0", solver_param)
    text_format.Parse(net_text, solver_param.net_param)
    return net_text, caffe.SGDSolver(solver_param)


def test_blobs_added_in_setup_are_learned_saved_and_loaded(tmp_path, module):
    """SGD on w for loss 0.5 * sum((w x)^2): dL/dw = w * sum(x^2)."""
    net_text, solver = scale_and_square_loss(module, "LearnedScale")
    layer = solver.net.layer_dict["w"]
    assert len(solver.net.learnable_params) == 1
    assert solver.net.learnable_params[0].blob is layer.blobs[0]
    solver.step(1)
    # loss = 0.5 * 6 * (2w)^2 -> dL/dw = 24 w = 72 at w = 3
    np.testing.assert_allclose(layer.blobs[0].data, [3 - 0.01 * 72], rtol=1e-6)
    assert solver.net.blob_loss_weights["loss"] == 1

    model = str(tmp_path / "learn.caffemodel")
    solver.net.save(model)
    path = tmp_path / "learn.prototxt"
    path.write_text(net_text)
    fresh = caffe.Net(str(path), caffe.TEST)
    assert fresh.layer_dict["w"].blobs[0].data[0] == 3
    fresh.copy_from(model)
    np.testing.assert_array_equal(fresh.layer_dict["w"].blobs[0].data, layer.blobs[0].data)
    shared = caffe.Net(str(path), caffe.TEST)
    shared.share_with(solver.net)
    layer.blobs[0].data[0] = 7
    assert shared.layer_dict["w"].blobs[0].data[0] == 7


def test_blobs_added_in_the_first_reshape_are_params(tmp_path, module):
    # Net::Init counts a layer's params after Layer::SetUp, which ends with Reshape
    net_text, solver = scale_and_square_loss(module, "LazyScale")
    layer = solver.net.layer_dict["w"]
    assert [p.blob for p in solver.net.learnable_params] == [layer.blobs[0]]
    solver.step(1)
    np.testing.assert_allclose(layer.blobs[0].data, [3 - 0.01 * 72], rtol=1e-6)

    frozen = net_text.replace("param_str: '3' } ", "param_str: '3' } param { lr_mult: 0 } ")
    assert frozen != net_text
    path = tmp_path / "frozen.prototxt"
    path.write_text(frozen)
    net = caffe.Net(str(path), caffe.TRAIN)
    assert net.layer_dict["w"].param_propagate_down == [False]
    assert net.learnable_params[0].lr_mult == 0


def test_loss_weight_reaches_a_python_loss(tmp_path, module):
    body = python_layer("loss", module, "SquareLoss", ["data"], ["loss"],
                        extra="loss_weight: 0.5 ")
    net = caffe.Net(write_net(tmp_path / "net.prototxt", body), caffe.TRAIN)
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    net.blobs["data"].data[...] = x
    loss = net.forward_backward()
    assert loss == pytest.approx(0.5 * 0.5 * float(np.sum(x.astype(np.float64) ** 2)))
    np.testing.assert_allclose(net.blobs["data"].diff, 0.5 * x)


def test_python_layer_without_backward(tmp_path, module):
    """A layer without backward runs where the net needs no backward from it; under
    force_backward (every layer's backward runs) pycaffe raises AttributeError."""
    body = python_layer("counter", module, "Counter", top=["count"])
    path = tmp_path / "net.prototxt"
    net = caffe.Net(write_net(path, body, inputs=""), caffe.TRAIN)
    net.forward()
    assert (net.forward()["count"] == 2).all() and net.layers[0].calls == 2
    with pytest.raises(AttributeError, match="Python layer 'counter' .*Counter.* has no "
                                             "backward"):
        net.backward()
    path.write_text(path.read_text().replace("force_backward: true", ""))
    net = caffe.Net(str(path), caffe.TRAIN)
    net.forward()
    net.backward()                                  # not needed: not called


def test_backward_errors_name_the_layer(tmp_path, module):
    """A shape Caffe's Blob refuses, asked for in a backward, is reported with the layer's
    name and direction, as in the forward."""
    body = python_layer("bad", module, "NegativeReshapeInBackward", ["data"], ["out"], "2")
    net = caffe.Net(write_net(tmp_path / "net.prototxt", body), caffe.TRAIN)
    net.forward()
    with pytest.raises(NetError, match=r"net\.prototxt: layer 'bad' \(Python\) backward: "):
        net.backward()


def test_the_command_line_names_a_python_layers_error_and_where_it_was_raised(
        tmp_path, module, capsys, monkeypatch):
    """One line, no traceback: the net file, the layer, the exception's type and the
    line of the user's module that raised it (pycaffe code still gets the KeyError)."""
    from caffelite import cli
    monkeypatch.delenv("CAFFELITE_TRACEBACK", raising=False)
    body = python_layer("bad", module, "RaisesInForward", ["data"], ["out"], "2")
    path = write_net(tmp_path / "net.prototxt", body)
    assert cli.main(["time", "--model", path, "--iterations", "1"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    source = tmp_path / f"{module}.py"
    raised_at = source.read_text().splitlines().index(
        '        raise KeyError("no such entry")') + 1
    assert line == (f"caffelite time: error: {path}: layer 'bad' (Python) forward: KeyError: "
                    f"'no such entry' at {source}:{raised_at} (CAFFELITE_TRACEBACK=1 shows "
                    f"the traceback)")
    net = caffe.Net(path, caffe.TRAIN)
    with pytest.raises(KeyError):
        net.forward()


def test_module_found_next_to_the_prototxt(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    models = tmp_path / "models"
    models.mkdir()
    name = write_module(models)
    path = write_net(models / "net.prototxt",
                     python_layer("ten", name, "Scale", ["data"], ["ten"], "10"))
    monkeypatch.chdir(tmp_path)
    net = caffe.Net(os.path.join("models", "net.prototxt"), caffe.TEST)
    assert net.layer_dict["ten"].value == 10
    assert str(models) in sys.path
    assert os.path.dirname(path) == str(models)


def test_module_that_imports_caffe_gets_caffelite(tmp_path, monkeypatch, clean_caffe_alias):
    monkeypatch.syspath_prepend(str(tmp_path))
    name = write_module(tmp_path, LAYERS_SOURCE.replace("import caffelite as caffe",
                                                        "import caffe"))
    path = write_net(tmp_path / "net.prototxt",
                     python_layer("ten", name, "Scale", ["data"], ["ten"], "10"))
    net = caffe.Net(path, caffe.TEST)
    assert sys.modules["caffe"] is caffe
    assert isinstance(net.layers[-1], caffe.Layer)


def test_a_real_caffe_is_not_replaced(tmp_path, monkeypatch, clean_caffe_alias):
    real = tmp_path / "real"
    (real / "caffe").mkdir(parents=True)
    (real / "caffe" / "__init__.py").write_text("class Layer(object):\n    pass\n")
    monkeypatch.syspath_prepend(str(real))
    monkeypatch.syspath_prepend(str(tmp_path))
    name = write_module(tmp_path, LAYERS_SOURCE.replace("import caffelite as caffe",
                                                        "import caffe"))
    path = write_net(tmp_path / "net.prototxt",
                     python_layer("ten", name, "Scale", ["data"], ["ten"], "10"))
    with pytest.raises(NetError, match="must be a subclass of caffe.Layer.*another Caffe"):
        caffe.Net(path, caffe.TEST)
    assert sys.modules["caffe"].__file__ == str(real / "caffe" / "__init__.py")


def test_errors_name_the_problem(tmp_path, module):
    def net_with(layer_text):
        return write_net(tmp_path / f"n{uuid.uuid4().hex[:6]}.prototxt", layer_text)

    with pytest.raises(RuntimeError, match="broken on purpose"):    # the user's own error
        caffe.Net(net_with(python_layer("b", module, "Broken", ["data"], ["b"])), caffe.TEST)
    with pytest.raises(NetError, match="cannot import module 'no_such_mod_x'.*sys.path"):
        caffe.Net(net_with(python_layer("m", "no_such_mod_x", "X", ["data"], ["m"])),
                  caffe.TEST)
    with pytest.raises(NetError, match=f"module '{module}'.*has no class 'Missing'"):
        caffe.Net(net_with(python_layer("c", module, "Missing", ["data"], ["c"])), caffe.TEST)
    with pytest.raises(NetError, match="must be a subclass of caffe.Layer"):
        caffe.Net(net_with(python_layer("n", module, "NotALayer", ["data"], ["n"])),
                  caffe.TEST)
    with pytest.raises(NetError, match="python_param needs both 'module' and 'layer'"):
        caffe.Net(net_with("layer { name: 'e' type: 'Python' bottom: 'data' top: 'e' }"),
                  caffe.TEST)


def test_net_spec_python_layer(tmp_path, module):
    from caffelite import layers as L
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3]))
    n.ten = L.Python(n.data, module=module, layer="Scale", param_str="10")
    n.twice = L.Python(n.ten, python_param=dict(module=module, layer="Scale", param_str="2"),
                       share_in_parallel=False)
    proto = n.to_proto()
    assert proto.layer[1].python_param.module == module
    assert proto.layer[2].python_param.param_str == "2"
    path = tmp_path / "spec.prototxt"
    path.write_text(str(proto))
    net = caffe.Net(str(path), caffe.TEST)
    out = net.forward(data=np.ones((2, 3), np.float32))
    assert (out["twice"] == 20).all()


def test_python_layers_see_host_numpy_views_in_gpu_mode(tmp_path, module, gpu_mode):
    """In GPU mode too a Python layer gets numpy arrays, and what it writes to any blob
    (its bottom here) reaches the device layers after it; it gets copies of the lists
    (propagate_down included), as boost.python hands them."""
    body = ('layer { name: "two" type: "Power" bottom: "data" top: "a" '
            'power_param { scale: 2 } }\n'
            + python_layer("py", module, "HostNumpy", ["a"], ["b"])
            + 'layer { name: "again" type: "Power" bottom: "a" top: "c" }\n'
            + 'layer { name: "sum" type: "Eltwise" bottom: "b" bottom: "c" top: "s" }\n')
    path = write_net(tmp_path / "net.prototxt", body)
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    results = []
    for on in (False, True):
        if on:
            gpu_mode.on()           # (the fixture turns it off after the test)
        net = caffe.Net(path, caffe.TRAIN)
        out = net.forward(data=x)
        results.append((np.array(out["s"]), np.array(net.blobs["c"].data)))
        for _ in range(2):
            diff = net.backward(s=np.ones_like(x))
            assert net.layer_dict["py"].seen == [True]
        results[-1] += (np.array(diff["data"]),)
    for host, device in zip(*results):
        np.testing.assert_array_equal(host, device)
    np.testing.assert_array_equal(results[0][1], np.full_like(x, 100))
    np.testing.assert_array_equal(results[0][0], 2 * x + 1 + 100)


def test_a_layers_own_attribute_named_like_the_nets_state_is_left_alone(tmp_path, module):
    body = python_layer("loss", module, "WeightedSum", ["data"], ["loss"],
                        extra="loss_weight: 2 ")
    net = caffe.Net(write_net(tmp_path / "net.prototxt", body,
                              "input: 'data' input_shape { dim: 2 dim: 3 }"), caffe.TRAIN)
    assert list(net.layers[0].loss_weights) == [1.0, 2.0, 3.0]
    out = net.forward(data=np.ones((2, 3), np.float32))
    assert out["loss"] == 12.0
    assert net.layer_loss_weights == [[2.0]]
    assert net.forward_from_to() == 24.0             # the net's loss: weight 2 x 12


def test_time_skips_a_missing_backward_the_net_does_not_need(tmp_path, module):
    """caffelite time runs every layer's backward as caffe time does, except a Python
    layer's that is missing where the net needs none (such nets timed before)."""
    from caffelite import cli
    body = python_layer("counter", module, "Counter", top=["count"])
    path = tmp_path / "net.prototxt"
    write_net(path, body, inputs="")
    path.write_text(path.read_text().replace("force_backward: true", ""))
    assert cli.main(["time", "--model", str(path), "--iterations", "2"]) == 0
