"""pycaffe's Net and Solver surface, caffe.Timer and friends, and the `caffe` alias."""
import logging
import os
import subprocess
import sys
import re
import time
from collections import OrderedDict

import numpy as np
import pytest

import caffelite as caffe
from caffelite.net import NetError
from gpu_modes import gpu_mode  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALIAS_DIR = os.path.join(ROOT, "compat", "caffe_alias")

NET = """name: 'small' force_backward: true
layer { type: 'DummyData' name: 'data' top: 'data' top: 'label'
  dummy_data_param { shape { dim: 4 dim: 2 dim: 3 dim: 3 } shape { dim: 4 }
    data_filler { type: 'gaussian' std: 1 } data_filler { type: 'constant' } } }
layer { type: 'Convolution' name: 'conv' bottom: 'data' top: 'conv'
  convolution_param { num_output: 3 kernel_size: 2
    weight_filler { type: 'gaussian' std: 1 } bias_filler { type: 'constant' value: 1 } } }
layer { type: 'InnerProduct' name: 'ip' bottom: 'conv' top: 'ip_blob'
  inner_product_param { num_output: 5 weight_filler { type: 'gaussian' std: 1 } } }
layer { type: 'SoftmaxWithLoss' name: 'loss' bottom: 'ip_blob' bottom: 'label' top: 'loss' }
"""

DEPLOY = """name: 'deploy' force_backward: true input: 'data' input_shape { dim: 3 dim: 4 }
layer { type: 'InnerProduct' name: 'ip' bottom: 'data' top: 'ip'
  inner_product_param { num_output: 2 weight_filler { type: 'gaussian' std: 1 }
    bias_filler { type: 'constant' value: 0.5 } } }
layer { type: 'Softmax' name: 'prob' bottom: 'ip' top: 'prob' }
"""


@pytest.fixture
def net_file(tmp_path):
    path = tmp_path / "small.prototxt"
    path.write_text(NET)
    return str(path)


@pytest.fixture
def deploy(tmp_path):
    path = tmp_path / "deploy.prototxt"
    path.write_text(DEPLOY)
    return caffe.Net(str(path), caffe.TEST)


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_names_dicts_and_blob_lists(net_file):
    net = caffe.Net(net_file, caffe.TRAIN)
    assert net.top_names == OrderedDict([("data", ["data", "label"]), ("conv", ["conv"]),
                                         ("ip", ["ip_blob"]), ("loss", ["loss"])])
    assert net.bottom_names["loss"] == ["ip_blob", "label"]
    assert net._blob_names == ["data", "label", "conv", "ip_blob", "loss"]
    assert [b is net.blobs[n] for b, n in zip(net._blobs, net._blob_names)] == [True] * 5
    assert list(net.layer_dict) == net._layer_names
    assert [l.type for l in net.layers] == ["DummyData", "Convolution", "InnerProduct",
                                            "SoftmaxWithLoss"]
    assert net.blob_loss_weights["loss"] == 1 and net.blob_loss_weights["ip_blob"] == 0
    assert net.inputs == [] and net.outputs == ["loss"]
    # _caffe.cpp's index views, from which pycaffe.py builds inputs and outputs
    assert net._inputs == [] and net._outputs == [4]
    assert [net._blob_names[i] for i in net._top_ids(0)] == ["data", "label"]
    assert net._bottom_ids(3) == [3, 1] and net._top_ids(3) == [4]
    params = [p for ps in net.params.values() for p in ps]
    blobs = list(net.blobs.values())
    del net                                             # arrays outlive the net
    assert np.isfinite(sum(float(b.data.sum() + b.diff.sum()) for b in params + blobs))


def test_a_missing_params_entry_lists_the_layers_with_parameters(net_file):
    """Still pycaffe's KeyError (``in``, ``get`` and copies behave as a dict's)."""
    net = caffe.Net(net_file, caffe.TRAIN)
    with pytest.raises(KeyError, match=r"'fc8': no layer with parameters of that name "
                                       r"\(there are: 'conv', 'ip'\)"):
        net.params["fc8"]
    assert "fc8" not in net.params and net.params.get("fc8") is None
    assert dict(net.params).keys() == {"conv", "ip"}
    with pytest.raises(KeyError, match=r"'fc8': no blob of that name \(there are: 'data', "):
        net.blobs["fc8"]


def test_input_fields_make_blobs_but_no_layer(tmp_path):
    """The fork has no Input layer: a net declared with ``input:`` fields has input
    blobs and only its own layers (indices, names, top/bottom names); a reshaped input
    keeps its shape through net.reshape(), and the blob splits still carry the name
    "input", as InsertSplits names them for net inputs."""
    path = tmp_path / "deploy.prototxt"
    path.write_text(DEPLOY.replace("layer { type: 'Softmax' name: 'prob' bottom: 'ip'",
                                   "layer { type: 'Eltwise' name: 'sum' bottom: 'data' "
                                   "bottom: 'data' top: 'twice' }\n"
                                   "layer { type: 'Softmax' name: 'prob' bottom: 'ip'"))
    net = caffe.Net(str(path), caffe.TEST)
    assert net._layer_names == ["data_input_0_split", "ip", "sum", "prob"]
    assert [l.type for l in net.layers] == ["Split", "InnerProduct", "Eltwise", "Softmax"]
    assert list(net.layer_dict) == net._layer_names
    assert list(net.top_names) == net._layer_names == list(net.bottom_names)
    assert net.inputs == ["data"] and net.blobs["data"].shape == (3, 4)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    net.blobs["data"].reshape(2, 4)
    net.reshape()
    assert net.blobs["data"].shape == (2, 4) and net.blobs["prob"].shape == (2, 2)
    out = net.forward(data=x)
    assert np.array_equal(net.blobs["twice"].data, 2 * x)
    w, b = (p.data for p in net.params["ip"])
    np.testing.assert_allclose(out["prob"], softmax(x @ w.T + b), rtol=1e-6)
    net._forward(1, 1)                      # pycaffe indices: layer 1 is 'ip' here
    np.testing.assert_allclose(net.blobs["ip"].data, x @ w.T + b, rtol=1e-6)


def test_forward_backward_start_end_return_the_layer_tops_and_its_namesake(net_file):
    net = caffe.Net(net_file, caffe.TRAIN)
    conv = np.random.default_rng(1).uniform(size=net.blobs["conv"].data.shape)
    net.blobs["conv"].data[...] = conv
    out = net.forward(start="ip", end="ip")
    assert set(out) == {"ip_blob"}
    w, b = (p.data.astype(np.float64) for p in net.params["ip"])
    # The weights come from the global filler stream (they depend on the tests run
    # before): bound the float32 error by the size of the terms, which may cancel.
    x = conv.reshape(4, -1)
    terms = np.abs(x) @ np.abs(w).T + np.abs(b)
    assert np.all(np.abs(out["ip_blob"] - (x @ w.T + b)) <= 1e-5 * terms)
    top_diff = np.random.default_rng(2).uniform(size=(4, 5))
    net.blobs["ip_blob"].diff[...] = top_diff
    grads = net.backward(start="ip", end="ip")
    assert set(grads) == {"conv"}
    # float32 sums may cancel: bound the error by the size of the terms, not the result
    scale = (np.abs(top_diff) @ np.abs(w)).reshape(conv.shape)
    assert np.all(np.abs(grads["conv"] - (top_diff @ w).reshape(conv.shape)) <= 1e-5 * scale)
    assert set(net.forward(blobs=["conv"])) == {"loss", "conv"}
    # The fork's pycaffe returns the blob named like the end layer; BVLC's later one
    # the layer's bottoms: both are there.
    net.blobs["loss"].diff[...] = 1
    grads = net.backward(start="ip", end="conv")
    assert set(grads) == {"data", "conv"}
    assert np.array_equal(grads["conv"], net.blobs["conv"].diff)


def test_forward_all_batches_and_unpads(deploy):
    x = np.random.default_rng(3).normal(size=(7, 4)).astype(np.float32)   # 3 + 3 + 1
    out = deploy.forward_all(data=x, blobs=["ip"])
    w, b = (p.data for p in deploy.params["ip"])
    assert set(out) == {"prob", "ip"} and out["prob"].shape == (7, 2)
    np.testing.assert_allclose(out["ip"], x @ w.T + b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["prob"], softmax(x @ w.T + b), rtol=1e-5)
    with pytest.raises(NetError, match="not net inputs"):
        deploy.forward(ip=x[:3])
    with pytest.raises(NetError, match="not batch sized"):
        deploy.forward(data=x[:2])


def test_forward_backward_all(deploy):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    g = rng.normal(size=(5, 2)).astype(np.float32)
    outs, diffs = deploy.forward_backward_all(data=x, prob=g, blobs=["ip"], diffs=["ip"])
    w, b = (p.data.astype(np.float64) for p in deploy.params["ip"])
    p = softmax(x @ w.T + b)
    d_ip = p * (g - (g * p).sum(axis=1, keepdims=True))      # softmax backward
    np.testing.assert_allclose(outs["prob"], p, rtol=1e-5)
    np.testing.assert_allclose(diffs["ip"], d_ip, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(diffs["data"], d_ip @ w, rtol=1e-4, atol=1e-6)
    assert outs["prob"].shape == (5, 2) and diffs["data"].shape == (5, 4)


def test_batch_pads_the_last_batch_with_zeros(deploy):
    batches = list(deploy._batch({"data": np.ones((4, 4))}))
    assert [b["data"].shape for b in batches] == [(3, 4), (3, 4)]
    np.testing.assert_array_equal(batches[1]["data"], [[1] * 4, [0] * 4, [0] * 4])


def test_set_input_arrays_feeds_memory_data(tmp_path):
    path = tmp_path / "mem.prototxt"
    path.write_text("""layer { name: 'data' type: 'MemoryData' top: 'data' top: 'label'
      memory_data_param { batch_size: 2 channels: 1 height: 2 width: 2 } }
      layer { name: 'ip' type: 'InnerProduct' bottom: 'data' top: 'ip'
        inner_product_param { num_output: 1 weight_filler { type: 'constant' value: 1 } } }
      layer { name: 'silence' type: 'Silence' bottom: 'label' }""")
    net = caffe.Net(str(path), caffe.TEST)
    assert net.blobs["label"].shape == (2,)      # DataLayerSetUp: label_shape(1, batch)
    data = np.arange(16, dtype=np.float32).reshape(4, 1, 2, 2)
    net.set_input_arrays(data, np.array([0, 1, 2, 3], np.float32))
    first = net.forward()["ip"].ravel().tolist()
    assert first == [0 + 1 + 2 + 3, 4 + 5 + 6 + 7]
    # Forward_cpu: top[1]->Reshape(batch_size_, 1, 1, 1), kept by the empty Reshape
    assert net.blobs["label"].shape == (2, 1, 1, 1)
    assert net.blobs["label"].data.ravel().tolist() == [0, 1]
    net.reshape()
    assert net.blobs["label"].shape == (2, 1, 1, 1)
    assert net.forward()["ip"].ravel().tolist() == [8 + 9 + 10 + 11, 12 + 13 + 14 + 15]
    assert net.blobs["label"].data.ravel().tolist() == [2, 3]
    # pycaffe's own label layout: N x 1 x 1 x 1 (a 1-d array is expanded to it)
    net.set_input_arrays(data, np.array([4, 5, 6, 7], np.float32).reshape(4, 1, 1, 1))
    net.forward()
    assert net.blobs["label"].data.ravel().tolist() == [4, 5]
    net._set_input_arrays(data, np.array([8, 9, 6, 7], np.float32).reshape(4, 1, 1, 1))
    assert net.forward()["ip"].ravel().tolist() == [0 + 1 + 2 + 3, 4 + 5 + 6 + 7]
    assert net.blobs["label"].data.ravel().tolist() == [8, 9]    # _caffe.cpp's binding
    with pytest.raises(RuntimeError, match=r"^data and labels must have the same first "
                                           r"dimension \(4 vs 3\)$"):
        net.set_input_arrays(data, np.zeros(3, np.float32))
    # pycaffe's CheckContiguousArray's shape checks (float64 and non-contiguous arrays
    # are converted, as the README says)
    for bad_data, bad_labels, message in [
            (data.reshape(4, 4), None, r"^data array must be 4-d \(its shape is \(4, 4\)\)$"),
            (data.reshape(4, 1, 1, 4), None, r"^data array has wrong number of height \(1; "
                                             r"the MemoryData layer takes 2\)$"),
            (data, np.zeros((4, 1), np.float32), r"^labels array must be 4-d"),
            (data, np.zeros((4, 2, 1, 1), np.float32), r"^labels array has wrong number of "
                                                      r"channels \(2;")]:
        labels = np.array([0, 1, 2, 3], np.float32) if bad_labels is None else bad_labels
        with pytest.raises(RuntimeError, match=message):
            net.set_input_arrays(bad_data, labels)
    with pytest.raises(RuntimeError, match=r"must be a multiple of batch_size \(2\)"):
        net.set_input_arrays(data[:3], np.zeros(3, np.float32))
    net.set_input_arrays(data[:, :, :, ::-1].astype(np.float64), np.arange(4))
    assert net.forward()["ip"].ravel().tolist() == [0 + 1 + 2 + 3, 4 + 5 + 6 + 7]
    assert net.blobs["label"].data.ravel().tolist() == [0, 1]
    deploy = tmp_path / "d.prototxt"
    deploy.write_text(DEPLOY)
    with pytest.raises(RuntimeError, match="first layer is a MemoryData layer"):
        caffe.Net(str(deploy), caffe.TEST).set_input_arrays(data, np.zeros(4))


def test_memory_data_labels_feed_losses_in_caffes_shape(tmp_path):
    """Losses and Accuracy after MemoryData see Caffe's N x 1 x 1 x 1 label from the
    first forward on (they were set up with the N label of DataLayerSetUp)."""
    path = tmp_path / "mem.prototxt"
    path.write_text("""layer { name: 'data' type: 'MemoryData' top: 'data' top: 'label'
      memory_data_param { batch_size: 2 channels: 3 height: 1 width: 1 } }
      layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'data' bottom: 'label'
        top: 'loss' }
      layer { name: 'acc' type: 'Accuracy' bottom: 'data' bottom: 'label' top: 'acc' }""")
    net = caffe.Net(str(path), caffe.TEST)
    data = np.array([[0, 5, 0], [9, 0, 0]], np.float32).reshape(2, 3, 1, 1)
    net.set_input_arrays(data, np.array([1, 2], np.float32))
    for _ in range(2):
        out = net.forward()
        assert net.blobs["label"].shape == (2, 1, 1, 1)
        assert float(out["acc"]) == 0.5
        x = data.reshape(2, 3).astype(np.float64)
        logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
        assert float(out["loss"]) == pytest.approx(-(logp[0, 1] + logp[1, 2]) / 2, rel=1e-6)


def test_save_and_load_hdf5_in_caffes_layout(net_file, tmp_path):
    h5py = pytest.importorskip("h5py")
    net = caffe.Net(net_file, caffe.TRAIN)
    path = str(tmp_path / "w.h5")
    net.save_hdf5(path)
    with h5py.File(path, "r") as f:
        assert sorted(f["data"]) == ["conv", "data", "ip", "loss"]
        np.testing.assert_array_equal(f["data/conv/0"][()], net.params["conv"][0].data)
        assert f["data/ip/1"].shape == (5,)
    other = caffe.Net(net_file, caffe.TRAIN)
    other.load_hdf5(path)
    for name in net.params:
        for a, b in zip(net.params[name], other.params[name]):
            np.testing.assert_array_equal(a.data, b.data)
    third = caffe.Net(net_file, caffe.TEST)
    third.copy_from(path)                           # Caffe picks HDF5 by the file itself
    np.testing.assert_array_equal(third.params["ip"][0].data, net.params["ip"][0].data)


def test_hdf5_skips_shared_copies(tmp_path):
    pytest.importorskip("h5py")
    path = tmp_path / "shared.prototxt"
    path.write_text("""input: 'x' input_shape { dim: 1 dim: 3 }
      layer { name: 'a' type: 'InnerProduct' bottom: 'x' top: 'a' param { name: 'w' }
        inner_product_param { num_output: 3 bias_term: false
          weight_filler { type: 'gaussian' std: 1 } } }
      layer { name: 'b' type: 'InnerProduct' bottom: 'a' top: 'b' param { name: 'w' }
        inner_product_param { num_output: 3 bias_term: false } }""")
    net = caffe.Net(str(path), caffe.TEST)
    weights = str(tmp_path / "s.h5")
    net.save_hdf5(weights, write_diff=True)
    import h5py
    with h5py.File(weights, "r") as f:
        assert list(f["data/a"]) == ["0"] and list(f["data/b"]) == []
        assert list(f["diff/b"]) == ["0"]
    other = caffe.Net(str(path), caffe.TEST)
    other.load_hdf5(weights)
    np.testing.assert_array_equal(other.params["b"][0].data, net.params["a"][0].data)


def test_hdf5_weights_go_to_the_last_layer_of_a_name_and_by_count(tmp_path):
    """CopyTrainedLayersFromHDF5 finds a layer through layer_names_index_ (the last of
    a name) and reshapes the blob to the file's shape without a check: the layers read
    the values by count. Another count is an error."""
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "dup.prototxt"
    path.write_text("""input: 'x' input_shape { dim: 1 dim: 2 }
      layer { name: 'ip' type: 'InnerProduct' bottom: 'x' top: 'a'
        inner_product_param { num_output: 3 bias_term: false } }
      layer { name: 'ip' type: 'InnerProduct' bottom: 'x' top: 'b'
        inner_product_param { num_output: 3 bias_term: false } }""")
    weights = str(tmp_path / "w.h5")
    values = np.arange(6, dtype=np.float32) + 1
    with h5py.File(weights, "w") as f:
        f["data/ip/0"] = values.reshape(3, 2, 1, 1)
    net = caffe.Net(str(path), caffe.TEST)
    net.copy_from(weights)
    first, last = (net.layers[i] for i, n in enumerate(net._layer_names) if n == "ip")
    assert np.all(first.blobs[0].data == 0)
    np.testing.assert_array_equal(last.blobs[0].data, values.reshape(3, 2))
    net.blobs["x"].data[...] = [[1, 10]]
    np.testing.assert_array_equal(net.forward()["b"], [[21, 43, 65]])
    with h5py.File(weights, "w") as f:
        f["data/ip/0"] = values[:4]
    with pytest.raises(caffe.net.NetError, match="shape \\(4,\\) in the file"):
        net.copy_from(weights)


def test_hdf5_weights_problems_name_the_file(tmp_path, caplog):
    """As with binary caffemodels: weights of another net warn (every weight would keep
    its initial value), and a cut-off file or string data is an error naming the file."""
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "net.prototxt"
    path.write_text(DEPLOY)
    net = caffe.Net(str(path), caffe.TEST)
    other = str(tmp_path / "other.caffemodel.h5")
    with h5py.File(other, "w") as f:
        f["data/fc/0"] = np.ones((2, 4), np.float32)
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        net.copy_from(other)
    assert any(f"{other}: no layer with weights in this file has the name of a layer of "
               f"the net (ip)" in r.getMessage() for r in caplog.records)
    cut = tmp_path / "cut.caffemodel.h5"
    cut.write_bytes(open(other, "rb").read()[:1000])
    with pytest.raises(caffe.net.NetError, match=f"^{re.escape(str(cut))}: cannot read the "
                                                 f"HDF5 weights"):
        net.copy_from(str(cut))
    strings = str(tmp_path / "strings.caffemodel.h5")
    with h5py.File(strings, "w") as f:
        f["data/ip/0"] = np.array([b"abc"] * 8)
    with pytest.raises(caffe.net.NetError, match=f"^{re.escape(strings)}: layer 'ip' blob 0"):
        net.copy_from(strings)


def test_hand_written_loop_follows_the_schedule(net_file, tmp_path, monkeypatch):
    """forward, backward, apply_update: BVLC's ApplyUpdate advances iter, so the step
    policy and solver.lr (BVLC pycaffe's read-only rate at the current iteration; BVLC's
    getter advances a multistep current_step, caffelite's does not) move with the updates (real pycaffe: lr 1, 0.1, 0.01
    at iters 0, 1, 2 for gamma 0.1 and stepsize 1)."""
    monkeypatch.chdir(tmp_path)
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f"net: '{net_file}' base_lr: 1 lr_policy: 'step' gamma: 0.1 "
                           "stepsize: 1 max_iter: 10 snapshot_prefix: 'snap'")
    solver = caffe.SGDSolver(str(solver_file))
    seen = []
    for _ in range(3):
        seen.append((solver.iter, solver.lr))
        solver.net.forward()
        solver.net.backward()
        solver.apply_update()
    assert [i for i, _ in seen] == [0, 1, 2] and solver.iter == 3
    np.testing.assert_allclose([lr for _, lr in seen], [1, 0.1, 0.01], rtol=1e-6)
    with pytest.raises(AttributeError):
        solver.lr = 5


def test_submodules_are_attributes_as_in_pycaffe():
    """pycaffe's __init__ imports pycaffe and _caffe, so scripts use caffe.pycaffe.Net
    and caffe._caffe.Layer without importing them."""
    import importlib
    import subprocess
    import sys
    code = ("import caffelite as caffe; assert caffe.pycaffe.Net is caffe.Net; "
            "assert caffe._caffe.Net is caffe.Net")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert importlib.import_module("caffelite.pycaffe") is caffe.pycaffe


def test_solver_surface(net_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f"net: '{net_file}' test_iter: 2 test_interval: 5 base_lr: 0.01 "
                           "momentum: 0.9 weight_decay: 0.0005 lr_policy: 'fixed' "
                           "max_iter: 6 snapshot_prefix: 'snap' snapshot_after_train: false")
    solver = caffe.get_solver(str(solver_file))
    assert isinstance(solver, caffe.SGDSolver) and len(solver.test_nets) == 1
    events = []
    solver.add_callback(lambda: events.append(("start", solver.iter)),
                        lambda: events.append(("grad", solver.iter)))
    solver.step(2)
    assert events == [("start", 0), ("grad", 0), ("start", 1), ("grad", 1)]
    assert solver.iter == 2
    # apply_update: zero weights, unit diff, no history -> w = -lr (weight decay of 0)
    blob = solver.net.layers[1].blobs[0]
    data = blob.data
    data[...] = 0
    solver.net.clear_param_diffs()
    blob.diff[...] = 1
    solver.history[0][...] = 0
    solver.apply_update()
    np.testing.assert_allclose(data, -0.01, rtol=1e-6)
    assert solver.iter == 3                   # BVLC's ApplyUpdate counts the update
    model, state = solver.snapshot()
    assert os.path.basename(model) == "snap_iter_3.caffemodel" and os.path.isfile(state)
    fresh = caffe.SGDSolver(str(solver_file))
    fresh.restore(state)
    assert fresh.iter == 3
    np.testing.assert_array_equal(fresh.net.params["conv"][0].data, data)
    fresh.solve()
    assert fresh.iter == 6
    other = caffe.Net(net_file, caffe.TEST)
    fresh.share_weights(other)
    assert other.params["ip"][0].data is not fresh.net.params["ip"][0].data
    fresh.net.params["ip"][0].data[...] = 3
    assert (other.params["ip"][0].data == 3).all()


def test_timer_and_process_helpers():
    t = caffe.Timer()
    assert t.ms == 0.0
    t.start()
    time.sleep(0.02)
    t.stop()
    first = t.ms
    assert 15 <= first < 2000 and t.ms == first           # stopped: stays put
    t.start()
    assert t.running and t.ms >= 0 and not t.running      # reading stops it, as Caffe
    assert caffe.solver_count() == 1 and caffe.solver_rank() == 0 and not caffe.has_nccl()
    assert "Python" in caffe.layer_type_list() and "Convolution" in caffe.layer_type_list()
    caffe.set_random_seed(5)
    caffe.log("hello from a pycaffe script")


def test_init_log_shows_caffes_info_lines_on_stderr(capsys, net_file):
    """Without init_log a script sees warnings only (Python's last-resort handler);
    caffe.init_log() prints the glog lines, INFO included, as pycaffe does."""
    script = ("import caffelite as caffe; from caffelite.log import logger; "
              "caffe.log('not shown'); logger.warning('a warning')")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0
    assert "a warning" in out.stderr and "not shown" not in out.stderr
    caffe.init_log()            # the conftest fixture gives the next test its logger back
    caffe.log("hello from a pycaffe script")
    caffe.Net(net_file, caffe.TEST)
    err = capsys.readouterr().err
    assert re.search(r"^I\d{4} .* __init__.py:\d+\] hello from a pycaffe script$", err, re.M)
    assert "Network initialization done." in err
    assert "Created layer" not in err           # caffelite's own debug lines stay out
    caffe.init_log(1)
    caffe.log("dropped")
    assert "dropped" not in capsys.readouterr().err


def test_pycaffe_names_resolve():
    for name in ("Net", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver",
                 "AdaDeltaSolver", "AdamSolver", "get_solver", "Layer", "layer_type_list",
                 "set_mode_cpu", "set_device", "set_random_seed", "Timer", "NetSpec",
                 "to_proto", "TRAIN", "TEST"):
        assert hasattr(caffe, name), name
    from caffelite.proto import caffe_pb2
    assert caffe.proto.caffe_pb2 is caffe_pb2
    assert caffe_pb2.TRAIN == caffe.TRAIN and caffe_pb2.TEST == caffe.TEST
    assert callable(caffe.layers.Convolution) and caffe.params.Pooling.AVE == 1
    import caffelite.layers.conv as conv_module     # the implementation package still
    assert conv_module.__name__ == "caffelite.layers.conv"


# ---------------------------------------------------------------------- the alias
def run_python(code, *, path=(), env=None, cwd=None):
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(list(path) + [ROOT]))
    environment.pop("CAFFELITE_CAFFE_ALIAS", None)
    environment.update(env or {})
    return subprocess.run([sys.executable, "-c", code], env=environment, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


ALIAS_CHECK = """
import caffe, caffelite
import caffe.io, caffe.proto.caffe_pb2 as pb
from caffe import layers as L, params as P
from caffe.coord_map import crop
import caffe.draw
assert caffe is caffelite and caffe.io is caffelite.io
assert pb is caffelite.proto.caffe_pb2 and caffelite.proto.__spec__.name == 'caffelite.proto'
assert caffe.draw is caffelite.draw and callable(L.Convolution) and P.Pooling.MAX == 0
from caffe.pycaffe import Net, SGDSolver
from caffe._caffe import set_mode_cpu, layer_type_list, Blob
assert Net is caffelite.Net and SGDSolver is caffelite.SGDSolver
assert set_mode_cpu is caffelite.set_mode_cpu and Blob is caffelite.Blob
namespace = {}
exec('from caffe.pycaffe import *', namespace)
assert namespace['Net'] is caffelite.Net and 'AdamSolver' in namespace
print('ALIAS-OK')
"""


def fake_real_caffe(tmp_path):
    real = tmp_path / "real"
    (real / "caffe").mkdir(parents=True)
    (real / "caffe" / "__init__.py").write_text("REAL = True\n")
    return str(real)


def test_alias_package_gives_caffelite(tmp_path):
    result = run_python(ALIAS_CHECK, path=[ALIAS_DIR], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ALIAS-OK" in result.stdout and "Warning" not in result.stderr


def test_alias_package_steps_aside_for_a_real_caffe(tmp_path):
    real = fake_real_caffe(tmp_path)
    code = "import caffe; print('REAL' if getattr(caffe, 'REAL', False) else 'LITE')"
    result = run_python(code, path=[ALIAS_DIR, real], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "REAL"
    assert "a real Caffe exists" in result.stderr and "CAFFELITE_CAFFE_ALIAS=force" in \
        result.stderr
    forced = run_python(code, path=[ALIAS_DIR, real], env={"CAFFELITE_CAFFE_ALIAS": "force"},
                        cwd=tmp_path)
    assert forced.stdout.strip() == "LITE" and "hiding the Caffe at" in forced.stderr


def test_install_alias(tmp_path):
    result = run_python("import caffelite; caffelite.install_alias()\n" + ALIAS_CHECK,
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ALIAS-OK" in result.stdout
    real = fake_real_caffe(tmp_path)
    refused = run_python("import caffelite; caffelite.install_alias()", path=[real],
                         cwd=tmp_path)
    assert refused.returncode != 0
    assert "a real Caffe is importable" in refused.stderr and "force=True" in refused.stderr
    forced = run_python("import caffelite, caffe; import sys\n"
                        "try:\n    caffelite.install_alias()\nexcept RuntimeError as e:\n"
                        "    print('REFUSED', e)", path=[real], cwd=tmp_path)
    assert "REFUSED a module named 'caffe' is already imported" in forced.stdout


TWO_INPUTS = """name: 'two' force_backward: true
input: 'a' input_shape { dim: 2 dim: 3 } input: 'b' input_shape { dim: 2 dim: 3 }
layer { type: 'Eltwise' name: 'sum' bottom: 'a' bottom: 'b' top: 'sum' }
layer { type: 'Eltwise' name: 'prod' bottom: 'a' bottom: 'b' top: 'prod'
  eltwise_param { operation: PROD } }
"""


def test_forward_and_backward_take_all_inputs_or_outputs(tmp_path):
    # pycaffe.py _Net_forward/_Net_backward: the keyword arrays must name exactly the
    # net's inputs ("Input blob arguments do not match net inputs.") or outputs ("Top
    # diff arguments do not match net outputs."), each batch sized.
    path = tmp_path / "two.prototxt"
    path.write_text(TWO_INPUTS)
    net = caffe.Net(str(path), caffe.TEST)
    a, b = np.full((2, 3), 2.0, np.float32), np.full((2, 3), 5.0, np.float32)
    with pytest.raises(NetError, match="Input blob arguments do not match net inputs"):
        net.forward(a=a)
    out = net.forward(a=a, b=b)
    assert set(out) == {"sum", "prod"}
    np.testing.assert_array_equal(out["sum"], a + b)
    with pytest.raises(NetError, match="Top diff arguments do not match net outputs"):
        net.backward(sum=np.ones((2, 3)))
    with pytest.raises(NetError, match="'prod' is not batch sized"):
        net.backward(sum=np.ones((2, 3)), prod=np.ones((1, 3)))
    diffs = net.backward(sum=np.ones((2, 3)), prod=np.full((2, 3), 10.0))
    np.testing.assert_array_equal(diffs["a"], 1 + 10 * b)   # d(a+b)/da + 10 d(ab)/da
    np.testing.assert_array_equal(diffs["b"], 1 + 10 * a)


def test_layer_type_list_has_the_all_capital_v2_names():
    # spec 19: LRN, BNLL, MVN and ELU are the fork's type names; CONVOLUTION, RELU ...
    # are V1 enum names that only the upgrade knows
    types = caffe.layer_type_list()
    assert {"LRN", "BNLL", "MVN", "ELU", "Convolution", "ReLU", "Interp"} <= set(types)
    assert not {"CONVOLUTION", "RELU", "SOFTMAX_LOSS", "IMAGE_SEG_DATA"} & set(types)
    assert types == sorted(types)


def test_unknown_type_error_lists_the_same_type_names(tmp_path):
    # the "Known types" of the error are LayerTypeList's: LRN in, V1 enum names out
    path = tmp_path / "net.prototxt"
    path.write_text('layer { name: "f" type: "Foo" }')
    with pytest.raises(ValueError, match="Unknown layer type: Foo") as error:
        caffe.Net(str(path), caffe.TEST)
    known = str(error.value).split("(known types: ", 1)[1].rstrip(")").split(", ")
    assert "LRN" in known and "BNLL" in known and "CONVOLUTION" not in known
    assert known == caffe.layer_type_list()


def test_index_based_forward_and_backward(net_file):
    # pycaffe's _forward/_backward(start_ind, end_ind): Net::ForwardFromTo/BackwardFromTo
    net = caffe.Net(net_file, caffe.TRAIN)
    start = net._layer_names.index("ip")
    conv = np.random.default_rng(8).normal(size=net.blobs["conv"].data.shape)
    net.blobs["conv"].data[...] = conv
    net._forward(start, start)
    w, b = (p.data.astype(np.float64) for p in net.params["ip"])
    expected = conv.reshape(len(conv), -1) @ w.T + b
    np.testing.assert_allclose(net.blobs["ip_blob"].data, expected, rtol=1e-5, atol=1e-5)
    top = np.random.default_rng(9).normal(size=expected.shape)
    net.blobs["ip_blob"].diff[...] = top
    net._backward(start, start)
    np.testing.assert_allclose(net.blobs["conv"].diff.reshape(len(conv), -1), top @ w,
                               rtol=1e-5, atol=1e-5)
    assert net._blob_loss_weights == [0, 0, 0, 0, 1]


def test_constructor_forms(net_file, tmp_path):
    # _caffe.cpp: Net(file, phase) and Net(file, weights, phase); caffelite also takes
    # weights= and path-like arguments
    import pathlib
    net = caffe.Net(net_file, caffe.TEST)
    weights = tmp_path / "w.caffemodel"
    net.save(str(weights))
    expected = net.params["conv"][0].data.copy()
    for made in (caffe.Net(net_file, str(weights), caffe.TEST),
                 caffe.Net(pathlib.Path(net_file), weights, caffe.TEST),
                 caffe.Net(net_file, caffe.TEST, weights=str(weights))):
        assert made.phase == caffe.TEST
        np.testing.assert_array_equal(made.params["conv"][0].data, expected)


def test_bvlc_1_0_positional_forms_and_paths_that_are_not_paths(tmp_path, capfd):
    """BVLC 1.0's Net(file, phase, level=0, stages=None, weights=None) by position; a
    weights argument that is not a path (an int would be opened as a file descriptor,
    closing stdout) is a TypeError."""
    path = tmp_path / "levels.prototxt"
    path.write_text(DEPLOY + "layer { type: 'Power' name: 'deep' bottom: 'prob' "
                             "top: 'deep' include { min_level: 1 } }\n"
                             "layer { type: 'Power' name: 'staged' bottom: 'prob' "
                             "top: 'staged' include { stage: 's' } }\n")
    shallow = caffe.Net(str(path), caffe.TEST, 0)
    weights = tmp_path / "w.caffemodel"
    shallow.params["ip"][0].data[...] = 3
    shallow.save(str(weights))
    assert list(shallow.layer_dict) == ["ip", "prob"]
    assert "deep" in caffe.Net(str(path), caffe.TEST, 1).layer_dict
    staged = caffe.Net(str(path), caffe.TEST, 0, ["s"], str(weights))
    assert list(staged.layer_dict) == ["ip", "prob", "staged"]
    assert (staged.params["ip"][0].data == 3).all()
    for bad in (1, 2.0, [str(weights)]):
        with pytest.raises(TypeError, match="expected a file path"):
            caffe.Net(str(path), caffe.TEST, weights=bad)
        with pytest.raises(TypeError, match="expected a file path"):
            shallow.copy_from(bad)
    with pytest.raises(TypeError, match="phase 'TEST' is a string; give caffe.TRAIN or "
                                        "caffe.TEST"):
        caffe.Net(str(path), "TEST")
    print("stdout is open")
    assert capfd.readouterr().out == "stdout is open\n"


def test_layer_callbacks_see_every_layer_in_caffes_order(tmp_path, gpu_mode):
    """BVLC 1.0's net.before_forward/after_forward/before_backward/after_backward: the
    callable gets each layer's index around its Forward (ForwardFromTo) and around
    every layer of BackwardFromTo, needing a backward or not; fused chains and CUDA
    graphs step aside so that no layer is skipped."""
    from caffelite import cuda_graphs
    path = tmp_path / "two.prototxt"
    path.write_text(TWO_INPUTS)
    gpu_mode.on()
    cuda_graphs.set_enabled(True)
    try:
        net = caffe.Net(str(path), caffe.TEST)
        calls = []
        for when in ("before_forward", "after_forward", "before_backward", "after_backward"):
            getattr(net, when)(lambda i, when=when: calls.append((when, i)))
        a, b = np.full((2, 3), 2.0, np.float32), np.full((2, 3), 5.0, np.float32)
        for _ in range(3):                       # graphs would record on the second
            calls.clear()
            net.forward(a=a, b=b)
            assert calls == [(when, i) for i in range(len(net.layers))   # splits too
                             for when in ("before_forward", "after_forward")]
        calls.clear()
        net.backward(sum=np.ones((2, 3), np.float32), prod=np.ones((2, 3), np.float32))
        assert calls == [(when, i) for i in reversed(range(len(net.layers)))
                         for when in ("before_backward", "after_backward")]
        assert net._graphs is None or net._graphs.launches() == 0
    finally:
        cuda_graphs.set_enabled(False)


ZERO_FILLED = """name: "finetune"
input: "x" input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 3
layer { name: "conv" type: "Convolution" bottom: "x" top: "c"
  convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" } } }
layer { name: "fc6_1" type: "Convolution" bottom: "c" top: "f1"
  convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "frozen" type: "Convolution" bottom: "c" top: "f2"
  param { lr_mult: 0 } convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "bn" type: "BatchNorm" bottom: "f1" top: "b" }
layer { name: "shift" type: "Bias" bottom: "b" top: "s" }
"""


@pytest.mark.parametrize("fmt", ["binary", "hdf5"])
def test_learning_layers_left_with_zero_weights_warn(tmp_path, caplog, fmt):
    """Finetuning DeepLab from a model without its fc6_1..: Caffe keeps their constant-0
    fillers silently and they never learn. Only learning layers whose weights the file
    does not give and that stay all zero are named (not the frozen one, not BatchNorm's
    zero-initialised statistics, not a Bias, zero by design)."""
    path, pretrained = tmp_path / "net.prototxt", tmp_path / "pretrained.prototxt"
    path.write_text(ZERO_FILLED)
    pretrained.write_text(ZERO_FILLED[:ZERO_FILLED.index('layer { name: "fc6_1"')])
    source = caffe.Net(str(pretrained), caffe.TEST)
    only_conv = tmp_path / ("conv.caffemodel" + (".h5" if fmt == "hdf5" else ""))
    if fmt == "hdf5":
        pytest.importorskip("h5py")
        source.save_hdf5(str(only_conv))
    else:
        source.save(str(only_conv))
    net = caffe.Net(str(path), caffe.TRAIN)
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        net.copy_from(str(only_conv))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{only_conv} has no weights for fc6_1, which keeps all-zero weights "
                        f"from the filler (weight_filler constant 0, Caffe's default); such "
                        f"a layer before a ReLU never learns. Is a layer named otherwise in "
                        f"the file, or is a weight_filler missing?"]
    caplog.clear()
    net.params["fc6_1"][0].data[...] = 1
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        net.copy_from(str(only_conv))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_solver_warns_of_zero_weights_once_after_all_its_weights(tmp_path, caplog):
    """caffe train --weights a,b copies into the train net and the test nets; a layer
    the first file misses but the second gives is no mistake, and the test nets get
    their weights from the train net (no warning of their own)."""
    from caffelite.solver import Solver
    path, pretrained = tmp_path / "net.prototxt", tmp_path / "pretrained.prototxt"
    path.write_text(ZERO_FILLED)
    pretrained.write_text(ZERO_FILLED[:ZERO_FILLED.index('layer { name: "fc6_1"')])
    caffe.Net(str(pretrained), caffe.TEST).save(str(tmp_path / "conv.caffemodel"))
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{path}" test_iter: 1 test_interval: 100 base_lr: 0.1 lr_policy: "fixed" '
        f'max_iter: 1')
    full = caffe.Net(str(path), caffe.TEST)
    full.params["fc6_1"][0].data[...] = 1
    full.save(str(tmp_path / "full.caffemodel"))
    for weights, named in ((["conv.caffemodel"], True),
                           (["conv.caffemodel", "full.caffemodel"], False)):
        solver = Solver(str(tmp_path / "solver.prototxt"))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="caffelite"):
            solver.load_weights([str(tmp_path / w) for w in weights])
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert warnings == ([f"{tmp_path / 'conv.caffemodel'} has no weights for fc6_1, "
                             f"which keeps all-zero weights from the filler (weight_filler "
                             f"constant 0, Caffe's default); such a layer before a ReLU "
                             f"never learns. Is a layer named otherwise in the file, or is "
                             f"a weight_filler missing?"] if named else []), weights
