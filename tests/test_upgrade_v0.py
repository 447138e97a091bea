"""BVLC V0 (pre-2014) nets and weights: upgrade to V2 by Caffe's documented mapping
(upgrade_proto.cpp: UpgradeV0PaddingLayers, UpgradeV0LayerParameter, UpgradeV0LayerType,
then V1 -> V2), forward equal to a hand-written V2 net, and OpenCV's own V0 importer."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

import caffelite as caffe
from caffelite.io import prototxt
from caffelite.io.caffemodel import read_caffemodel
from caffelite.io.upgrade import UpgradeError
from caffelite.proto import caffe_pb2
from layer_testing import opencv_forward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every V0 parameter of the data/conv/pool/innerproduct/dropout/lrn/loss layers.
V0_TRAIN = """
name: "v0_train"
layers {
  layer { name: "mnist" type: "data" source: "train_leveldb" batchsize: 64
          meanfile: "mean.binaryproto" cropsize: 24 mirror: true scale: 0.00390625
          rand_skip: 7 }
  top: "data" top: "label"
}
layers {
  layer { name: "pad1" type: "padding" pad: 2 }
  bottom: "data" top: "pad1"
}
layers {
  layer { name: "conv1" type: "conv" num_output: 20 kernelsize: 5 stride: 2 group: 1
          biasterm: true
          weight_filler { type: "gaussian" std: 0.01 }
          bias_filler { type: "constant" value: 0.5 }
          blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0 }
  bottom: "pad1" top: "conv1"
}
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers {
  layer { name: "pool1" type: "pool" pool: AVE kernelsize: 3 stride: 2 pad: 1 }
  bottom: "conv1" top: "pool1"
}
layers {
  layer { name: "norm1" type: "lrn" local_size: 3 alpha: 0.0001 beta: 0.75 k: 2 }
  bottom: "pool1" top: "norm1"
}
layers {
  layer { name: "ip1" type: "innerproduct" num_output: 10 biasterm: false
          weight_filler { type: "xavier" } }
  bottom: "norm1" top: "ip1"
}
layers { layer { name: "drop1" type: "dropout" dropout_ratio: 0.3 } bottom: "ip1" top: "ip1" }
layers { layer { name: "loss" type: "softmax_loss" } bottom: "ip1" bottom: "label" top: "loss" }
layers {
  layer { name: "accuracy" type: "accuracy" }
  bottom: "ip1" bottom: "label" top: "accuracy"
}
"""

# The same net written by hand in V2 from Caffe's documented V0 -> V1 -> V2 mapping:
# the padding layer disappears into conv1's pad, data transforms move to transform_param,
# blobs_lr/weight_decay become param { lr_mult decay_mult }, lower-case types become
# the V2 names, and only the V0 fields that were set appear.
V2_TRAIN = """
name: "v0_train"
layer {
  name: "mnist" type: "Data" top: "data" top: "label"
  transform_param { scale: 0.00390625 mean_file: "mean.binaryproto" crop_size: 24
                    mirror: true }
  data_param { source: "train_leveldb" batch_size: 64 rand_skip: 7 }
}
layer {
  name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 }
  param { lr_mult: 2 decay_mult: 0 }
  convolution_param {
    num_output: 20 bias_term: true pad: 2 kernel_size: 5 group: 1 stride: 2
    weight_filler { type: "gaussian" std: 0.01 }
    bias_filler { type: "constant" value: 0.5 }
  }
}
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer {
  name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: AVE pad: 1 kernel_size: 3 stride: 2 }
}
layer {
  name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
  lrn_param { local_size: 3 alpha: 0.0001 beta: 0.75 k: 2 }
}
layer {
  name: "ip1" type: "InnerProduct" bottom: "norm1" top: "ip1"
  inner_product_param { num_output: 10 bias_term: false weight_filler { type: "xavier" } }
}
layer {
  name: "drop1" type: "Dropout" bottom: "ip1" top: "ip1"
  dropout_param { dropout_ratio: 0.3 }
}
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "ip1" bottom: "label" top: "accuracy" }
"""

# A runnable V0 net (net inputs instead of a data layer) and its hand-written V2 twin.
V0_INPUTS = """
name: "v0_small"
input: "data" input_dim: 2 input_dim: 3 input_dim: 7 input_dim: 7
input: "label" input_dim: 2 input_dim: 1 input_dim: 1 input_dim: 1
"""
V0_BODY = """
layers { layer { name: "pad1" type: "padding" pad: 1 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 3 stride: 2 }
         bottom: "pad1" top: "conv1" }
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers { layer { name: "pad2" type: "padding" pad: 1 } bottom: "conv1" top: "pad2" }
layers { layer { name: "pool1" type: "pool" pool: MAX kernelsize: 3 stride: 2 }
         bottom: "pad2" top: "pool1" }
layers { layer { name: "ip1" type: "innerproduct" num_output: 5 } bottom: "pool1" top: "ip1" }
"""
V0_LOSS = """
layers { layer { name: "loss" type: "softmax_loss" } bottom: "ip1" bottom: "label" top: "loss" }
"""
V2_SMALL = """
name: "v2_small"
input: "data" input_dim: 2 input_dim: 3 input_dim: 7 input_dim: 7
input: "label" input_dim: 2 input_dim: 1 input_dim: 1 input_dim: 1
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 pad: 1 kernel_size: 3 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX pad: 1 kernel_size: 3 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
        inner_product_param { num_output: 5 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
"""


def _weights():
    """Conv 4x3x3x3 + bias, IP 5x(4*3*3) + bias (conv1 is 4x4: floor((7+2-3)/2)+1;
    pool1 is 3x3: ceil((4+2-3)/2)+1)."""
    rng = np.random.default_rng(7)
    return {"conv1": [rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                      rng.standard_normal(4).astype(np.float32)],
            "ip1": [rng.standard_normal((5, 36)).astype(np.float32),
                    rng.standard_normal(5).astype(np.float32)]}


def _write_v0_caffemodel(path, net_text, weights):
    """A V0 caffemodel as pre-2014 Caffe wrote it: the whole V0 net with each layer's
    blobs (legacy num/channels/height/width shapes) inside ``layers { layer {} }``,
    serialised by protobuf itself."""
    net = text_format.Parse(net_text, caffe_pb2.NetParameter())
    for entry in net.layers:
        for array in weights.get(entry.layer.name, []):
            blob = entry.layer.blobs.add()
            dims = (1,) * (4 - array.ndim) + array.shape
            blob.num, blob.channels, blob.height, blob.width = dims
            blob.data.extend(array.ravel().tolist())
    with open(path, "wb") as f:
        f.write(net.SerializeToString())


def _inputs():
    rng = np.random.default_rng(3)
    return rng.standard_normal((2, 3, 7, 7)).astype(np.float32), np.array([1, 4], np.float32)


def _forward(net):
    data, label = _inputs()
    net.blobs["data"].data[...] = data
    net.blobs["label"].data[...] = label.reshape(2, 1, 1, 1)
    net.forward()
    return {name: net.blobs[name].data.copy() for name in ("conv1", "pool1", "ip1", "loss")}


@pytest.fixture
def v0_files(tmp_path):
    proto = tmp_path / "v0.prototxt"
    proto.write_text(V0_INPUTS + V0_BODY + V0_LOSS)
    model = tmp_path / "v0.caffemodel"
    _write_v0_caffemodel(str(model), V0_INPUTS + V0_BODY + V0_LOSS, _weights())
    return proto, model


def test_v0_net_upgrades_to_the_documented_v2_net():
    upgraded, relaxed = prototxt.parse_net(V0_TRAIN, "v0.prototxt")
    expected = text_format.Parse(V2_TRAIN, caffe_pb2.NetParameter())
    assert text_format.MessageToString(upgraded) == text_format.MessageToString(expected)
    assert upgraded == expected and not relaxed


V0_OTHER = """
layers { layer { name: "img" type: "images" source: "list.txt" batchsize: 4 rand_skip: 2
                 shuffle_images: true new_height: 32 new_width: 40 mirror: true }
         top: "a" top: "la" }
layers { layer { name: "win" type: "window_data" source: "win.txt" batchsize: 8 cropsize: 9
                 det_fg_threshold: 0.6 det_bg_threshold: 0.4 det_fg_fraction: 0.3
                 det_context_pad: 16 det_crop_mode: "square" }
         top: "b" top: "lb" }
layers { layer { name: "cat" type: "concat" concat_dim: 0 } bottom: "a" bottom: "b" top: "c" }
layers { layer { name: "out" type: "hdf5_output" hdf5_output_param { file_name: "o.h5" } }
         bottom: "c" bottom: "la" }
layers { layer { name: "gain" type: "infogain_loss" source: "H.binaryproto" }
         bottom: "c" bottom: "lb" top: "g" }
"""

V2_OTHER = """
layer { name: "img" type: "ImageData" top: "a" top: "la"
        transform_param { mirror: true }
        image_data_param { source: "list.txt" batch_size: 4 rand_skip: 2 shuffle: true
                           new_height: 32 new_width: 40 } }
layer { name: "win" type: "WindowData" top: "b" top: "lb"
        transform_param { crop_size: 9 }
        window_data_param { source: "win.txt" batch_size: 8 fg_threshold: 0.6
                            bg_threshold: 0.4 fg_fraction: 0.3 context_pad: 16
                            crop_mode: "square" } }
layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "c"
        concat_param { concat_dim: 0 } }
layer { name: "out" type: "HDF5Output" bottom: "c" bottom: "la"
        hdf5_output_param { file_name: "o.h5" } }
layer { name: "gain" type: "InfogainLoss" bottom: "c" bottom: "lb" top: "g"
        infogain_loss_param { source: "H.binaryproto" } }
"""


def test_v0_data_concat_output_and_infogain_parameters_find_their_v2_homes():
    upgraded, _ = prototxt.parse_net(V0_OTHER, "v0.prototxt")
    expected = text_format.Parse(V2_OTHER, caffe_pb2.NetParameter())
    assert text_format.MessageToString(upgraded) == text_format.MessageToString(expected)


def test_v0_caffemodel_blobs_are_read_from_the_nested_layer(v0_files):
    _, model = v0_files
    layers = read_caffemodel(str(model))
    assert [l.name for l in layers] == ["pad1", "conv1", "relu1", "pad2", "pool1", "ip1", "loss"]
    by_name = {l.name: l for l in layers}
    assert by_name["conv1"].type == "conv" and by_name["pad1"].blobs == []
    w = _weights()
    for name in ("conv1", "ip1"):
        blobs = by_name[name].blobs
        assert [b.legacy_shape for b in blobs] == [True, True]
        assert blobs[1].shape == (1, 1, 1, w[name][1].size)
        for blob, array in zip(blobs, w[name]):
            np.testing.assert_array_equal(blob.data.reshape(array.shape), array)
    assert by_name["ip1"].blobs[0].shape == (1, 1, 5, 36)


def test_v0_caffemodel_entries_take_only_their_v0_block(tmp_path):
    """Once one entry holds a V0 block the whole file is V0 (NetNeedsV0ToV1Upgrade), and
    UpgradeV0LayerParameter clears every entry first: name, type and blobs come from the
    V0 block alone, so an entry without one copies nothing into the net."""
    param = caffe_pb2.NetParameter(name="mixed")
    plain = param.layers.add()
    plain.layer.name, plain.layer.type = "conv1", "conv"
    renamed = param.layers.add()
    renamed.name, renamed.layer.name, renamed.layer.type = "outer", "inner", "relu"
    v1_only = param.layers.add()
    v1_only.name, v1_only.type = "ip", caffe_pb2.V1LayerParameter.INNER_PRODUCT
    for shape, value in (([2, 3], 9.0), ([2], 9.0)):
        blob = v1_only.blobs.add()
        blob.shape.dim.extend(shape)
        blob.data.extend([value] * int(np.prod(shape)))
    model = tmp_path / "mixed.caffemodel"
    model.write_bytes(param.SerializeToString())
    layers = read_caffemodel(str(model))
    assert [(l.name, l.type, len(l.blobs)) for l in layers] == [
        ("conv1", "conv", 0), ("inner", "relu", 0), ("", "", 0)]
    net_path = tmp_path / "ip.prototxt"
    net_path.write_text(
        'input: "data" input_dim: 1 input_dim: 3 input_dim: 1 input_dim: 1\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
        'inner_product_param { num_output: 2 } }\n')
    net = caffe.Net(str(net_path), caffe.TEST, weights=str(model))
    np.testing.assert_array_equal(net.params["ip"][1].data, [0, 0])


def test_v0_net_and_weights_run_like_the_hand_written_v2_net(v0_files, tmp_path):
    proto, model = v0_files
    v0_net = caffe.Net(str(proto), str(model), caffe.TEST)
    v2_path = tmp_path / "v2.prototxt"
    v2_path.write_text(V2_SMALL)
    v2_net = caffe.Net(str(v2_path), caffe.TEST)
    for name, arrays in _weights().items():
        for blob, array in zip(v2_net.params[name], arrays):
            blob.data[...] = array
    assert list(v0_net.params) == ["conv1", "ip1"]
    ours, theirs = _forward(v0_net), _forward(v2_net)
    assert ours["pool1"].shape == (2, 4, 3, 3)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_opencv_upgrades_the_same_v0_net_and_agrees(v0_files, tmp_path):
    """OpenCV's importer upgrades V0 text itself.  It drops the blobs nested in V0
    layers (its upgrade moves the V1-level ``blobs`` instead), so it gets the same
    arrays from a V2 caffemodel while caffelite reads them from the V0 file."""
    pytest.importorskip("cv2")
    deploy = V0_INPUTS.replace('input: "label" input_dim: 2 input_dim: 1 input_dim: 1 '
                               'input_dim: 1\n', "") + V0_BODY
    weights = [(name, "", arrays) for name, arrays in _weights().items()]
    data, _ = _inputs()
    relu1, ip1 = opencv_forward(deploy, weights, {"data": data}, ["relu1", "ip1"])
    _, model = v0_files
    proto = tmp_path / "deploy.prototxt"
    proto.write_text(deploy)
    ours = caffe.Net(str(proto), str(model), caffe.TEST)
    ours.blobs["data"].data[...] = data
    ours.forward()
    np.testing.assert_allclose(ours.blobs["conv1"].data, relu1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.blobs["ip1"].data, ip1.reshape(2, 5), rtol=1e-5, atol=1e-5)


def test_upgrade_verb_writes_v0_nets_as_v2(v0_files, tmp_path):
    proto, _ = v0_files
    out = tmp_path / "v2.prototxt"
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-m", "caffelite.cli", "upgrade", str(proto), str(out)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    written = text_format.Parse(out.read_text(), caffe_pb2.NetParameter())
    expected = text_format.Parse(V2_SMALL, caffe_pb2.NetParameter())
    expected.name = "v0_small"
    assert written == expected


@pytest.mark.parametrize("body, message", [
    ('layers { layer { name: "p" type: "padding" pad: 1 } bottom: "data" top: "p" }\n'
     'layers { layer { name: "r" type: "relu" } bottom: "p" top: "r" }',
     "layer 'r': a V0 padding layer ('p') can only feed a conv or pool layer, not 'relu'"),
    ('layers { layer { name: "c" type: "convolution" } bottom: "data" top: "c" }',
     "layer 'c': unknown V0 layer type 'convolution'"),
    ('layers { layer { name: "r" type: "relu" } bottom: "nothing" top: "r" }',
     "layer 'r': unknown bottom blob 'nothing'"),
    ('layers { layer { name: "p" type: "padding" pad: 1 } bottom: "data" top: "p" }\n'
     'layers { layer { name: "c" type: "concat" } bottom: "p" bottom: "data" top: "c" }',
     "layer 'c': a V0 padding layer ('p') can only feed a conv or pool layer, not 'concat'"),
    ('layers { layer { name: "r" type: "relu" } bottom: "data" top: "r" }\n'
     'layers { name: "s" type: SOFTMAX bottom: "r" top: "s" }',
     "layer #2 ('s') has no V0 'layer' block in a V0 net"),
])
def test_bad_v0_nets_are_one_line_errors(body, message):
    text = 'input: "data" input_dim: 1 input_dim: 1 input_dim: 3 input_dim: 3\n' + body
    with pytest.raises(UpgradeError) as info:
        prototxt.parse_net(text, "bad.prototxt")
    assert str(info.value) == f"bad.prototxt: {message}"
    assert "\n" not in str(info.value)


def test_v0_parameters_a_type_does_not_take_are_dropped_with_an_error_line(caplog):
    """UpgradeV0LayerParameter logs "Unknown parameter kernelsize for layer type relu",
    leaves it out and goes on; new_num/new_channels have no V1 home and vanish."""
    text = ('input: "data" input_dim: 1 input_dim: 1 input_dim: 3 input_dim: 3\n'
            'layers { layer { name: "r" type: "relu" kernelsize: 3 new_height: 4 new_num: 2 '
            'new_channels: 5 } bottom: "data" top: "r" }')
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        net, _ = prototxt.parse_net(text, "v0.prototxt")
    expected = text_format.Parse(
        'input: "data" input_dim: 1 input_dim: 1 input_dim: 3 input_dim: 3 '
        'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }', caffe_pb2.NetParameter())
    assert net == expected
    messages = [(r.levelname, r.getMessage()) for r in caplog.records
                if r.levelno >= logging.WARNING]
    assert ("ERROR", "Unknown parameter kernelsize for layer type relu") in messages
    assert ("ERROR", "Unknown parameter new_height for layer type relu") in messages
    assert not any("new_num" in m or "new_channels" in m for _, m in messages)
    # ... and UpgradeNetAsNeeded reports the V0 upgrade as failed (it goes on)
    assert ("ERROR", "Warning: had one or more problems upgrading V0NetParameter to "
                     "NetParameter (see above); continuing anyway.") in messages


def test_v0_upgrade_keeps_only_caffes_fields():
    """UpgradeV0LayerParameter takes bottom/top from the V1 entry and everything else
    from the V0 block; UpgradeV0Net keeps only the net's name, inputs, input_dim and
    force_backward (state, debug_info, V2 'layer' entries are dropped)."""
    text = ('name: "n" force_backward: true debug_info: true state { phase: TRAIN }\n'
            'input: "data" input_dim: 1 input_dim: 1 input_dim: 3 input_dim: 3\n'
            'layer { name: "v2" type: "ReLU" bottom: "data" top: "v2" }\n'
            'layers { layer { name: "r" type: "relu" } name: "r1" loss_weight: 2\n'
            '         include { phase: TEST } bottom: "data" top: "r" }')
    net, _ = prototxt.parse_net(text, "v0.prototxt")
    expected = text_format.Parse(
        'name: "n" input: "data" input_dim: 1 input_dim: 1 input_dim: 3 input_dim: 3 '
        'force_backward: true layer { name: "r" type: "ReLU" bottom: "data" top: "r" }',
        caffe_pb2.NetParameter())
    assert net == expected
