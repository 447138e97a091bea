"""What a written .caffemodel holds: Caffe's Net::ToProto of the fork (name, the net
input names, then every layer's own LayerParameter with its blobs: shape + float data,
diff only with snapshot_diff), in protobuf's canonical field order."""
import numpy as np
import pytest

import caffelite as caffe
from caffelite.proto import caffe_pb2
from caffelite.solver import Solver

NET = '''
name: "written"
input: "data" input_shape { dim: 2 dim: 3 dim: 4 dim: 4 }
input: "label" input_shape { dim: 2 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 3 kernel_size: 3
    weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv"
  batch_norm_param { use_global_stats: true } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" }
'''


def parse(path):
    raw = open(path, "rb").read()
    model = caffe_pb2.NetParameter()
    model.ParseFromString(raw)
    return model, raw


def check_model(model, raw, net, phase):
    # canonical order: what protobuf (C++ or Python) writes for this message
    assert model.SerializeToString() == raw
    assert model.name == "written"
    assert list(model.input) == ["data", "label"]
    assert len(model.input_shape) == 0 and len(model.input_dim) == 0
    split = "ip_ip_0_split"
    label_split = "label_input_1_split"       # net inputs split under the name "input"
    assert [l.name for l in model.layer] == [label_split, "conv", "bn", "ip", split,
                                             "loss", "acc"]
    by_name = {l.name: l for l in model.layer}
    for layer in model.layer:
        assert layer.phase == phase
    conv = by_name["conv"]
    assert conv.type == "Convolution"
    assert list(conv.bottom) == ["data"] and list(conv.top) == ["conv"]
    assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1), (2, 0)]
    assert conv.convolution_param.num_output == 3
    assert conv.convolution_param.weight_filler.std == np.float32(0.1)
    for blob, param in zip(conv.blobs, net.params["conv"]):
        assert tuple(blob.shape.dim) == param.shape
        assert np.array_equal(np.array(blob.data, np.float32).reshape(param.shape),
                              param.data)
        assert len(blob.diff) == 0 and not blob.HasField("num")
    # BatchNorm's LayerSetUp completed its own param specs with lr_mult 0
    bn = by_name["bn"]
    assert [p.lr_mult for p in bn.param] == [0, 0, 0]
    assert not any(p.HasField("decay_mult") for p in bn.param)
    assert [tuple(b.shape.dim) for b in bn.blobs] == [(3,), (3,), (1,)]
    assert by_name["bn"].batch_norm_param.use_global_stats
    assert list(by_name[split].top) == [split + "_0", split + "_1"]
    assert by_name[split].type == "Split" and len(by_name[split].blobs) == 0
    # LossLayer::LayerSetUp writes the default loss weight into its LayerParameter
    assert list(by_name["loss"].loss_weight) == [1.0]
    assert list(by_name["loss"].bottom) == [split + "_0", label_split + "_0"]
    assert list(by_name["acc"].bottom) == [split + "_1", label_split + "_1"]
    assert len(by_name["acc"].loss_weight) == 0


def test_net_save_writes_what_caffes_to_proto_writes(tmp_path):
    (tmp_path / "net.prototxt").write_text(NET)
    caffe.set_random_seed(2)
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST)
    net.save(str(tmp_path / "m.caffemodel"))
    model, raw = parse(tmp_path / "m.caffemodel")
    check_model(model, raw, net, caffe_pb2.TEST)
    # and it loads back by name
    other = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST,
                      weights=str(tmp_path / "m.caffemodel"))
    assert np.array_equal(other.params["ip"][0].data, net.params["ip"][0].data)


def test_snapshot_writes_the_train_net_and_diffs_only_on_request(tmp_path):
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path}/net.prototxt" base_lr: 0.01 lr_policy: "fixed" max_iter: 1 '
        f'snapshot_prefix: "{tmp_path}/s" random_seed: 1')
    solver = Solver(str(tmp_path / "solver.prototxt"))
    solver.net.blobs["data"].data[...] = 1
    solver.net.blobs["label"].data[...] = [0, 2]
    solver.solve()
    model, raw = parse(tmp_path / "s_iter_1.caffemodel")
    check_model(model, raw, solver.net, caffe_pb2.TRAIN)
    solver.param.snapshot_diff = True
    solver.snapshot()
    model, _ = parse(tmp_path / "s_iter_1.caffemodel")
    ip = [l for l in model.layer if l.name == "ip"][0]
    for blob, param in zip(ip.blobs, solver.net.params["ip"]):
        assert np.array_equal(np.array(blob.diff, np.float32).reshape(param.shape),
                              param.diff)


FORK_PARAMS_NET = '''
name: "fork_params"
input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
input: "label" input_shape { dim: 1 dim: 1 dim: 15 dim: 15 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 3 kernel_size: 3 pad: 1
    weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "up" type: "Interp" bottom: "conv" top: "up" interp_param { zoom_factor: 2 } }
layer { name: "acc" type: "SegAccuracy" bottom: "up" bottom: "label" top: "acc"
  seg_accuracy_param { ignore_label: 255 } }
layer { name: "dt" type: "DomainTransform" bottom: "up" bottom: "label" bottom: "label"
  top: "dt" domain_transform_param { num_iter: 2 spatial_sigma: 9 } }
layer { name: "write" type: "MatWrite" bottom: "dt" mat_write_param { prefix: "unused/" } }
'''

DEPLOY = '''
name: "deploy"
input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 3 kernel_size: 3 pad: 1 } }
'''


def test_opencv_reads_a_caffemodel_holding_the_forks_own_layer_params(tmp_path):
    """The fork numbers interp_param, seg_accuracy_param, mat_write_param and
    domain_transform_param 143, 144, 145 and 147, where BVLC's (and OpenCV's) schema has
    input_param, crop_param, parameter_param and swish_param: mat_write_param's prefix
    read as a BlobShape breaks OpenCV's parse of the whole file. Weights files leave
    these params out (readers take layer params from the prototxt), keep the rest of
    each layer's parameter, and load in OpenCV."""
    cv2 = pytest.importorskip("cv2")
    (tmp_path / "net.prototxt").write_text(FORK_PARAMS_NET)
    (tmp_path / "deploy.prototxt").write_text(DEPLOY)
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST)
    net.save(str(tmp_path / "m.caffemodel"))
    model, _ = parse(tmp_path / "m.caffemodel")
    by_name = {l.name: l for l in model.layer}
    for name, field in (("up", "interp_param"), ("acc", "seg_accuracy_param"),
                        ("dt", "domain_transform_param"), ("write", "mat_write_param")):
        assert not by_name[name].HasField(field), name
        assert by_name[name].type == net.layer_dict[name].type
    assert list(by_name["dt"].bottom) == ["up_up_0_split_1", "label_input_1_split_1",
                                          "label_input_1_split_2"]
    assert by_name["conv"].convolution_param.num_output == 3
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    cv = cv2.dnn.readNetFromCaffe(str(tmp_path / "deploy.prototxt"),
                                  str(tmp_path / "m.caffemodel"))
    cv.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cv.setInput(x)
    got = cv.forward()
    net.blobs["data"].data[...] = x
    net.forward(end="conv")
    expected = net.blobs["conv"].data
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_weights_of_another_net_warn_that_nothing_was_copied(tmp_path, caplog):
    """Caffe copies by name and silently keeps the initial weights when no name
    matches; we do too, with one warning naming the file, and none when some match."""
    import logging
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "other.prototxt").write_text(FORK_PARAMS_NET.replace('"conv"', '"conv_x"'))
    caffe.Net(str(tmp_path / "other.prototxt"), caffe.TEST).save(str(tmp_path / "o.caffemodel"))
    caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST).save(str(tmp_path / "m.caffemodel"))
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST,
                        weights=str(tmp_path / "o.caffemodel"))
        caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST,
                  weights=str(tmp_path / "m.caffemodel"))
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and "caffemodel" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "o.caffemodel" in warnings[0] and "conv, bn, ip" in warnings[0]
    assert net.params["conv"][0].data.any()        # its own (filler) weights remain


def test_a_file_larger_than_caffe_reads_is_written_with_a_warning(tmp_path, caplog,
                                                                   monkeypatch):
    """Caffe's ReadProtoFromBinaryFile stops at INT_MAX bytes (a limit made small here)."""
    import logging
    from caffelite.io import caffemodel
    (tmp_path / "net.prototxt").write_text(NET)
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST)
    size = len(net.to_proto_bytes())
    monkeypatch.setattr(caffemodel, "PROTO_READ_LIMIT", size - 1)
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        net.save(str(tmp_path / "big.caffemodel"))
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'big.caffemodel'} is {size} bytes: Caffe and OpenCV read binary "
        f"protobuf files of at most 2 GB - 1 byte ({size - 1}), so only caffelite can read "
        f"it back"]
    assert (tmp_path / "big.caffemodel").stat().st_size == size
    monkeypatch.setattr(caffemodel, "PROTO_READ_LIMIT", size)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        net.save(str(tmp_path / "fits.caffemodel"))
    assert not caplog.records
