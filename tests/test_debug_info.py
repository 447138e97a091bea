"""debug_info (net.cpp ForwardDebugInfo / BackwardDebugInfo / InputDebugInfo, Backward's
all-params line; solver.cpp turns it on for display iterations of the train net and for
every test-net forward): line formats and values, derived by hand in float64."""
import logging
import re

import numpy as np
import pytest

import caffelite as caffe
from caffelite.log import GlogFormatter, logger
from caffelite.solver import Solver

NET = '''
name: "dbg"
input: "x" input_shape { dim: 2 dim: 3 }
input: "y" input_shape { dim: 2 dim: 2 }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
  param { name: "w" } param { lr_mult: 2 }
  inner_product_param { num_output: 2
    weight_filler { type: "constant" value: 0.5 } bias_filler { type: "constant" value: 1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "loss" }
'''
X = np.array([[1, -2, 3], [0.5, 4, -1]])
Y = np.array([[1, 2], [-3, 0.25]])


@pytest.fixture
def lines():
    out = []

    class Collect(logging.Handler):
        def emit(self, record):
            out.append(self.format(record))

    handler = Collect()
    handler.setFormatter(GlogFormatter())
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield out
    logger.removeHandler(handler)
    logger.setLevel(old)


def expected():
    """The debug lines of one forward + backward, values in float64."""
    w, b = np.full((2, 3), 0.5), np.ones(2)
    ip = X @ w.T + b
    d = ip - Y
    loss = (d ** 2).sum() / 2 / 2
    dip = d / 2
    dw, db = dip.T @ X, dip.sum(0)
    fwd = [("[Forward] Input x data:", np.abs(X).mean()),
           ("[Forward] Input y data:", np.abs(Y).mean()),
           ("[Forward] Layer ip, top blob ip data:", np.abs(ip).mean()),
           ("[Forward] Layer ip, param blob w data:", 0.5),
           ("[Forward] Layer ip, param blob 1 data:", 1.0),
           ("[Forward] Layer loss, top blob loss data:", loss)]
    bwd = [("[Backward] Layer loss, bottom blob ip diff:", np.abs(dip).mean()),
           ("[Backward] Layer ip, param blob 0 diff:", np.abs(dw).mean()),
           ("[Backward] Layer ip, param blob 1 diff:", np.abs(db).mean())]
    l1 = (3.0 + 2.0, np.abs(dw).sum() + np.abs(db).sum())
    l2 = (np.sqrt(6 * 0.25 + 2.0), np.sqrt((dw ** 2).sum() + (db ** 2).sum()))
    return fwd, bwd, l1, l2


def debug_lines(lines):
    return [l for l in lines if "[Forward]" in l or "[Backward]" in l]


def check_values(found, wanted):
    assert len(found) == len(wanted)
    for line, (text, value) in zip(found, wanted):
        head, _, number = line.rpartition(" ")
        assert head.endswith("]     " + text), line
        assert float(number) == pytest.approx(value, rel=2e-5)


def check_all_params_line(line, l1, l2):
    assert line.startswith("E")         # Caffe logs it with LOG(ERROR)
    m = re.search(r"\]     \[Backward\] All net params \(data, diff\): L1 norm = "
                  r"\((\S+), (\S+)\); L2 norm = \((\S+), (\S+)\)$", line)
    assert m, line
    got = [float(v) for v in m.groups()]
    assert got == pytest.approx([*l1, *l2], rel=2e-5)


def test_net_debug_info_lines(tmp_path, lines):
    (tmp_path / "net.prototxt").write_text('debug_info: true\n' + NET)
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TRAIN)
    net.blobs["x"].data[...] = X
    net.blobs["y"].data[...] = Y
    net.forward_backward()
    fwd, bwd, l1, l2 = expected()
    found = debug_lines(lines)
    check_values(found[:6], fwd)
    check_values(found[6:9], bwd)
    check_all_params_line(found[9], l1, l2)
    assert len(found) == 10


def test_solver_debug_info_on_display_iterations_only(tmp_path, lines):
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path}/net.prototxt" base_lr: 0 lr_policy: "fixed" max_iter: 3 '
        f'display: 2 debug_info: true snapshot_after_train: false')
    solver = Solver(str(tmp_path / "solver.prototxt"))
    solver.net.blobs["x"].data[...] = X
    solver.net.blobs["y"].data[...] = Y
    solver.step(3)
    found = debug_lines(lines)
    # iterations 0 and 2 display (10 lines each); iteration 1 does not
    assert len(found) == 20
    fwd, bwd, l1, l2 = expected()       # base_lr 0: the weights never change
    for start in (0, 10):
        check_values(found[start:start + 6], fwd)
        check_values(found[start + 6:start + 9], bwd)
        check_all_params_line(found[start + 9], l1, l2)
    iteration_lines = [i for i, l in enumerate(lines) if re.search(r"Iteration \d+, loss", l)]
    assert iteration_lines and iteration_lines[0] > lines.index(found[9])


def test_backward_lines_name_each_layers_own_bottoms_when_layer_names_repeat(tmp_path,
                                                                            lines):
    # Two layers named "twin": each backward line names that layer's own bottom blob
    # (Caffe: blob_names_[bottom_id_vecs_[layer_id][i]]), not the other twin's.
    (tmp_path / "net.prototxt").write_text('''
name: "twins" debug_info: true force_backward: true
input: "x" input_shape { dim: 2 dim: 3 }
layer { name: "twin" type: "Power" bottom: "x" top: "a" power_param { scale: 2 } }
layer { name: "twin" type: "Power" bottom: "a" top: "b" power_param { scale: 3 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "b" bottom: "x" top: "loss" }
''')
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TRAIN)
    net.blobs["x"].data[...] = X
    net.forward_backward()
    # b = 6x, loss = sum((b - x)^2) / 2 / num: db = 5x / 2, da = 3 db, dx (to twin 1) = 2 da
    wanted = [("[Backward] Layer twin, bottom blob a diff:", np.abs(7.5 * X).mean()),
              ("[Backward] Layer twin, bottom blob x_input_0_split_0 diff:",
               np.abs(15 * X).mean())]
    found = [l for l in debug_lines(lines) if "[Backward] Layer twin" in l]
    check_values(found, wanted)
