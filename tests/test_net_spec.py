"""NetSpec (caffe.NetSpec, caffe.layers as L, caffe.params as P) and caffe.draw."""
import re
import sys

import numpy as np
import pytest
from google.protobuf import text_format

import caffelite as caffe
from caffelite import draw
from caffelite import layers as L
from caffelite import params as P
from caffelite.proto import caffe_pb2


def small_convnet(batch=2):
    n = caffe.NetSpec()
    n.data, n.label = L.DummyData(shape=[dict(dim=[batch, 1, 12, 12]), dict(dim=[batch])],
                                  data_filler=[dict(type="gaussian", std=1),
                                               dict(type="constant", value=1)], ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=3, num_output=4, pad=1,
                            weight_filler=dict(type="xavier"),
                            param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2)])
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.relu1 = L.ReLU(n.pool1, in_place=True)
    n.ip = L.InnerProduct(n.relu1, num_output=5, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.ip, n.label, loss_weight=2)
    return n


def test_layers_params_and_names():
    proto = small_convnet().to_proto()
    assert [l.name for l in proto.layer] == ["data", "conv1", "pool1", "relu1", "ip", "loss"]
    assert [l.type for l in proto.layer] == ["DummyData", "Convolution", "Pooling", "ReLU",
                                             "InnerProduct", "SoftmaxWithLoss"]
    data, conv, pool, relu, ip, loss = proto.layer
    assert list(data.top) == ["data", "label"]
    assert [list(s.dim) for s in data.dummy_data_param.shape] == [[2, 1, 12, 12], [2]]
    assert [f.type for f in data.dummy_data_param.data_filler] == ["gaussian", "constant"]
    # keywords of the type's own message, repeated scalars given as scalars
    assert list(conv.convolution_param.kernel_size) == [3]
    assert list(conv.convolution_param.pad) == [1]
    assert conv.convolution_param.num_output == 4
    assert conv.convolution_param.weight_filler.type == "xavier"
    # LayerParameter fields: param list of dicts, loss_weight
    assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1), (2, 1)]
    assert not conv.param[1].HasField("decay_mult")
    assert list(loss.loss_weight) == [2]
    assert pool.pooling_param.pool == caffe_pb2.PoolingParameter.MAX == P.Pooling.MAX
    # in place: tops are the bottoms, the layer keeps the assigned name
    assert list(relu.bottom) == list(relu.top) == ["pool1"]
    assert list(ip.bottom) == ["pool1"] and list(loss.bottom) == ["ip", "label"]


def test_text_parses_in_caffelite_and_builds_a_net(tmp_path):
    text = str(small_convnet().to_proto())
    path = tmp_path / "spec.prototxt"
    path.write_text(text)
    net = caffe.Net(str(path), caffe.TRAIN)
    assert net._layer_names == ["data", "conv1", "pool1", "relu1", "ip", "loss"]
    assert net.blobs["ip"].data.shape == (2, 5)
    assert net.blob_loss_weights["loss"] == 2
    assert np.isfinite(net.forward()["loss"])


def test_text_parses_with_opencvs_caffe_importer(tmp_path):
    """OpenCV's Caffe importer (its own copy of BVLC's caffe.proto and text parser)
    reads the generated text: a deploy-style net built with NetSpec."""
    cv2 = pytest.importorskip("cv2")
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.conv = L.Convolution(n.data, kernel_size=3, num_output=2, pad=1, bias_term=False)
    n.relu = L.ReLU(n.conv, in_place=True)
    n.pool = L.Pooling(n.relu, pool=P.Pooling.AVE, kernel_size=2, stride=2)
    n.prob = L.Softmax(n.pool)
    path = tmp_path / "deploy.prototxt"
    path.write_text(str(n.to_proto()))
    cv_net = cv2.dnn.readNetFromCaffe(str(path))
    assert list(cv_net.getLayerNames()) == ["conv", "relu", "pool", "prob"]
    # and BVLC field names only: a fresh BVLC-shaped parse of the same text
    parsed = text_format.Parse(path.read_text(), caffe_pb2.NetParameter())
    assert parsed.layer[3].pooling_param.pool == caffe_pb2.PoolingParameter.AVE


def test_anonymous_tops_are_named_by_type_and_count():
    data, label = L.DummyData(shape=[dict(dim=[1, 2]), dict(dim=[1])], ntop=2)
    ip1 = L.InnerProduct(data, num_output=3)
    ip2 = L.InnerProduct(ip1, num_output=2)
    proto = L.SoftmaxWithLoss(ip2, label).to_proto()
    assert [(l.name, list(l.bottom), list(l.top)) for l in proto.layer] == [
        ("DummyData1", [], ["DummyData1", "DummyData2"]),
        ("InnerProduct1", ["DummyData1"], ["InnerProduct1"]),
        ("InnerProduct2", ["InnerProduct1"], ["InnerProduct2"]),
        ("SoftmaxWithLoss1", ["InnerProduct2", "DummyData2"], ["SoftmaxWithLoss1"])]
    assert caffe.to_proto(ip2) .layer[-1].name == "InnerProduct2"


def test_ntop_zero_and_items(tmp_path):
    n = caffe.NetSpec()
    n["data"], n["aux"] = L.DummyData(shape=dict(dim=3), ntop=2)
    n.silence = L.Silence(n.data, n["aux"], ntop=0)
    assert n.keys() == ["data", "aux", "silence"]
    proto = n.to_proto()
    assert proto.layer[1].name == "silence" and len(proto.layer[1].top) == 0
    assert list(proto.layer[0].dummy_data_param.shape[0].dim) == [3]
    path = tmp_path / "silent.prototxt"
    path.write_text(str(proto))
    assert caffe.Net(str(path), caffe.TEST).forward() == {}


def test_enum_names_explicit_names_and_generic_params():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    n.pool = L.Pooling(n.data, pool="AVE", kernel_size=2, name="avg",
                       include=dict(phase=caffe.TEST),
                       pooling_param=dict(stride=2))
    layer = n.to_proto().layer[1]
    assert layer.name == "avg" and list(layer.top) == ["pool"]
    assert layer.pooling_param.pool == caffe_pb2.PoolingParameter.AVE
    assert layer.pooling_param.stride == 2 and layer.pooling_param.kernel_size == 2
    assert layer.include[0].phase == caffe.TEST


def test_clear_errors():
    data = L.DummyData(ntop=2)
    with pytest.raises(TypeError, match=re.escape(
            "Silence input 0 is not a Top (type is <class 'tuple'>)")):
        L.Silence(data, ntop=0)
    L.Silence(*data, ntop=0)
    with pytest.raises(AttributeError, match="'kernal_size' is a field of neither "
                                             "convolution_param nor LayerParameter"):
        L.Convolution(data[0], kernal_size=3).to_proto()
    with pytest.raises(ValueError, match="'MAXIMUM' is not one of MAX, AVE, STOCHASTIC"):
        L.Pooling(data[0], pool="MAXIMUM").to_proto()
    with pytest.raises(AttributeError, match="NetSpec has no top 'nothing'"):
        caffe.NetSpec().nothing


# ---------------------------------------------------------------------- caffe.draw
def test_draw_dot_without_dependencies(tmp_path):
    proto = small_convnet().to_proto()
    proto.name = "small"
    path = tmp_path / "net.dot"
    draw.draw_net_to_file(proto, str(path), rankdir="TB")
    dot = path.read_text()
    assert dot.startswith('digraph "small" {') and 'rankdir="TB"' in dot
    assert '"conv1_Convolution" [shape="record", fillcolor="#FF5050"' in dot
    assert '"relu1_ReLU" [shape="record", fillcolor="#90EE90"' in dot       # in place
    assert '"data_blob" -> "conv1_Convolution";' in dot
    assert '"conv1_Convolution" -> "conv1_blob" [label="4"];' in dot
    assert "kernel size: 3 stride: 1 pad: 1" in dot                          # TB: one line
    assert "pool1 (MAX Pooling) kernel size: 2" in dot                      # the fork's words
    assert '"loss_blob" [label="loss"];' in dot       # a top last: unstyled, as pycaffe's


def test_draw_phase_filter():
    proto = text_format.Parse(
        "layer { name: 'a' type: 'Input' top: 'x' input_param { shape { dim: 1 } } } "
        "layer { name: 'b' type: 'ReLU' bottom: 'x' top: 'y' include { phase: TRAIN } }",
        caffe_pb2.NetParameter())
    assert "b_ReLU" in draw.to_dot(proto)
    assert "b_ReLU" not in draw.to_dot(proto, phase=caffe.TEST)


def test_draw_image_needs_graphviz(tmp_path, monkeypatch):
    proto = small_convnet().to_proto()
    monkeypatch.setenv("PATH", str(tmp_path))              # no `dot` on PATH
    with pytest.raises(draw.DrawError, match="Graphviz's `dot` program.*apt-get install"):
        draw.draw_net_to_file(proto, str(tmp_path / "net.png"))
    fake = tmp_path / "dot"                                # a stand-in renderer
    fake.write_text(f"#!{sys.executable}\nimport sys\n"
                    "sys.stdout.write(sys.argv[1] + '\\n' + sys.stdin.read())\n")
    fake.chmod(0o755)
    png = draw.draw_net(proto, "LR", ext="png")
    assert png.startswith(b"-Tpng\ndigraph")


def test_pydot_is_optional(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydot", None)
    with pytest.raises(ImportError, match="needs the pydot package"):
        draw.get_pydot_graph(small_convnet().to_proto(), "LR")
