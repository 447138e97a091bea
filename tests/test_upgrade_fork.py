"""Legacy-net upgrades as the fork's src/caffe/util/upgrade_proto.cpp does them (BVLC code of
spring 2016; spec 18): UpgradeV1Net, UpgradeV1LayerType, UpgradeNetDataTransformation,
UpgradeV0Net, plus what TextFormat::Parse itself refuses.  Expected nets are written by
hand from those functions; DeepLab v1's dialect (nets the fork cannot parse) keeps its
own meanings."""
import logging

import numpy as np
import pytest
from google.protobuf import text_format

import caffelite as caffe
from caffelite.io import prototxt
from caffelite.io.prototxt import PrototxtError
from caffelite.proto import caffe_pb2


def _v2(text):
    return text_format.Parse(text, caffe_pb2.NetParameter())


# --- UpgradeV1Net: V2 'layer' entries next to V1 'layers' are ignored -------------------

MIXED = """
name: "mixed"
input: "data" input_dim: 1 input_dim: 2 input_dim: 1 input_dim: 2
layer { name: "v2_relu" type: "ReLU" bottom: "data" top: "v2" }
layers { name: "v1_relu" type: RELU bottom: "data" top: "v1" }
"""


def test_v1_layers_win_and_v2_layer_entries_are_dropped(caplog):
    with caplog.at_level(logging.INFO, logger="caffelite"):
        net, _ = prototxt.parse_net(MIXED, "mixed.prototxt")
    expected = _v2('name: "mixed" input: "data" input_dim: 1 input_dim: 2 input_dim: 1 '
                   'input_dim: 2 layer { name: "v1_relu" type: "ReLU" bottom: "data" top: "v1" }')
    assert net == expected
    # UpgradeV1Net fails, so UpgradeNetAsNeeded logs its problem line, not a success.
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("ERROR", "Input NetParameter to be upgraded already specifies 'layer' fields; "
                     "these will be ignored for the upgrade.") in messages
    assert ("ERROR", "Warning: had one or more problems upgrading V1LayerParameter (see "
                     "above); continuing anyway.") in messages
    assert not any("Successfully" in m for _, m in messages)


# --- UpgradeV1LayerType: ARGMAX is "ArgMax" in nets the fork parses ----------------------

ARGMAX_NET = """
input: "data" input_dim: 1 input_dim: 2 input_dim: 1 input_dim: 2
layers { name: "am" type: ARGMAX bottom: "data" top: "am" }
"""


def test_argmax_of_a_bvlc_v1_net_is_the_forks_argmax(tmp_path):
    net_param, _ = prototxt.parse_net(ARGMAX_NET)
    assert net_param.layer[0].type == "ArgMax"
    path = tmp_path / "am.prototxt"
    path.write_text(ARGMAX_NET)
    net = caffe.Net(str(path), caffe.TEST)
    # channel 0 = [1, 5], channel 1 = [7, 2]: the fork's ArgMax without axis ranks the
    # flattened C*H*W = [1, 5, 7, 2] of the item -> index 2, top shape 1 x 1 x 1 x 1.
    net.blobs["data"].data[...] = np.array([[[[1, 5]], [[7, 2]]]], np.float32)
    net.forward()
    assert net.blobs["am"].data.shape == (1, 1, 1, 1)
    assert net.blobs["am"].data.ravel().tolist() == [2.0]


def test_argmax_of_a_deeplab_v1_net_stays_per_pixel():
    text = ARGMAX_NET + ('layers { name: "up" type: INTERP bottom: "am" top: "up" '
                         'interp_param { zoom_factor: 2 } }')
    net_param, _ = prototxt.parse_net(text)
    assert [l.type for l in net_param.layer] == ["ArgMaxV1", "Interp"]


def test_hole_marks_a_net_as_deeplab_v1():
    text = ARGMAX_NET + ('layers { name: "c" type: CONVOLUTION bottom: "data" top: "c" '
                         'convolution_param { num_output: 1 kernel_size: 1 hole: 2 } }')
    net_param, _ = prototxt.parse_net(text)
    assert net_param.layer[0].type == "ArgMaxV1"
    assert list(net_param.layer[1].convolution_param.dilation) == [2]


# --- TextFormat::Parse refuses a message whose required fields are missing ---------------

def test_missing_required_field_is_a_parse_error(tmp_path):
    path = tmp_path / "mw.prototxt"
    path.write_text('input: "data"\ninput_dim: 1 input_dim: 1 input_dim: 1 input_dim: 1\n'
                    'layer { name: "out" type: "MatWrite" bottom: "data"\n'
                    '        mat_write_param { source: "list.txt" } }\n')
    with pytest.raises(PrototxtError) as info:
        prototxt.read_net(str(path))
    message = str(info.value)
    assert str(path) in message and "layer[0].mat_write_param.prefix" in message
    assert "\n" not in message


def test_required_field_inside_a_solver_net_param(tmp_path):
    path = tmp_path / "solver.prototxt"
    path.write_text('base_lr: 0.1\nnet_param { layer { name: "u" type: "UniqueLabel" '
                    'unique_label_param { ignore_label: 255 } } }\n')
    with pytest.raises(PrototxtError, match=r"net_param\.layer\[0\]\.unique_label_param"
                                            r"\.max_labels"):
        prototxt.read_solver(str(path))


def test_absent_message_with_required_fields_is_fine():
    # Only a present sub-message is checked (a MatWrite layer without mat_write_param
    # parses, as in Caffe).
    net, _ = prototxt.parse_net('layer { name: "out" type: "MatWrite" bottom: "x" }')
    assert net.layer[0].type == "MatWrite"


# --- UpgradeNetDataTransformation ------------------------------------------------------

DATA_V1 = """
layers { name: "d1" type: DATA top: "a" top: "la"
         data_param { source: "db1" mirror: true crop_size: 3 scale: 0.5 mean_file: "m" } }
layers { name: "d2" type: DATA top: "b" top: "lb" data_param { source: "db2" } }
layers { name: "img" type: IMAGE_DATA top: "c" top: "lc"
         image_data_param { source: "list" } data_param { scale: 2 } }
"""

# Each type's own parameter message gives its fields to transform_param; once any layer
# needs that, every DATA / IMAGE_DATA / WINDOW_DATA layer gets both messages (empty ones
# included), and a data_param on an IMAGE_DATA layer is not touched.
DATA_V2 = """
layer { name: "d1" type: "Data" top: "a" top: "la"
        transform_param { scale: 0.5 mirror: true crop_size: 3 mean_file: "m" }
        data_param { source: "db1" } }
layer { name: "d2" type: "Data" top: "b" top: "lb" transform_param { }
        data_param { source: "db2" } }
layer { name: "img" type: "ImageData" top: "c" top: "lc" transform_param { }
        data_param { scale: 2 } image_data_param { source: "list" } }
"""


def test_data_transformation_fields_move_per_layer_type():
    net, _ = prototxt.parse_net(DATA_V1)
    assert net == _v2(DATA_V2)
    assert net.layer[1].HasField("transform_param")


def test_image_seg_data_transform_fields_move_as_caffelites_own_rule():
    """caffelite's own rule, with no reference behaviour: BVLC's
    UpgradeNetDataTransformation (and every stored fork copy) knows only DATA,
    IMAGE_DATA and WINDOW_DATA. caffelite moves a DeepLab v1 IMAGE_SEG_DATA layer's old
    transform fields out of its image_data_param in the same way, so that the fork's
    ImageSegData (which reads transform_param) crops and mirrors as v1 did."""
    net, _ = prototxt.parse_net(
        'layers { name: "seg" type: IMAGE_SEG_DATA top: "d" top: "l" image_data_param { '
        'source: "list" crop_size: 5 mirror: true batch_size: 2 } }')
    assert net == _v2('layer { name: "seg" type: "ImageSegData" top: "d" top: "l" '
                      'transform_param { mirror: true crop_size: 5 } '
                      'image_data_param { source: "list" batch_size: 2 } }')


def _messages(caplog):
    return [(r.levelname, r.getMessage()) for r in caplog.records]


def test_upgrade_net_as_needed_logs_each_upgrade(caplog):
    """UpgradeNetAsNeeded's lines, in its order: V0 (with its warning), then the data
    transformation fields, then V1."""
    with caplog.at_level(logging.INFO, logger="caffelite"):
        prototxt.parse_net('input: "x" layers { layer { name: "r" type: "relu" } '
                           'bottom: "x" top: "x" }', "v0.prototxt")
        prototxt.parse_net(DATA_V1, "data.prototxt")
        prototxt.parse_net('layer { name: "r" type: "ReLU" bottom: "x" top: "x" }', "v2")
    attempt = "Attempting to upgrade input file specified using deprecated "
    done = "Successfully upgraded file specified using deprecated "
    assert _messages(caplog) == [
        ("INFO", attempt + "V0LayerParameter: v0.prototxt"),
        ("INFO", done + "V0LayerParameter"),
        ("WARNING", "Note that future Caffe releases will not support V0NetParameter; use "
                    "./build/tools/upgrade_net_proto_text for prototxt and "
                    "./build/tools/upgrade_net_proto_binary for model weights upgrade this "
                    "and any other net protos to the new format. (caffelite: caffelite "
                    "upgrade IN OUT, caffelite upgrade --binary IN OUT.)"),
        ("INFO", attempt + "V1LayerParameter: v0.prototxt"),
        ("INFO", done + "V1LayerParameter"),
        ("INFO", attempt + "transformation parameters: data.prototxt"),
        ("INFO", done + "data transformation parameters."),
        ("WARNING", "Note that future Caffe releases will only support transform_param "
                    "messages for transformation fields."),
        ("INFO", attempt + "V1LayerParameter: data.prototxt"),
        ("INFO", done + "V1LayerParameter")]


def test_v1_weights_and_solver_type_upgrades_are_logged(caplog, tmp_path):
    from conftest import CORPUS
    from caffelite.io.caffemodel import read_caffemodel
    path = f"{CORPUS}/models/cifar10_quick_v1/cifar10_quick_iter_5000.caffemodel"
    solver = tmp_path / "solver.prototxt"
    solver.write_text('net: "n" base_lr: 0.1 solver_type: NESTEROV')
    with caplog.at_level(logging.INFO, logger="caffelite"):
        read_caffemodel(path)
        assert prototxt.read_solver(str(solver)).type == "Nesterov"
    assert _messages(caplog) == [
        ("INFO", "Attempting to upgrade input file specified using deprecated "
                 f"V1LayerParameter: {path}"),
        ("INFO", "Successfully upgraded file specified using deprecated V1LayerParameter"),
        ("INFO", "Attempting to upgrade input file specified using deprecated "
                 f"'solver_type' field (enum)': {solver}"),
        ("INFO", "Successfully upgraded file specified using deprecated 'solver_type' "
                 "field (enum) to 'type' field (string)."),
        ("WARNING", "Note that future Caffe releases will only support 'type' field "
                    "(string) for a solver's type.")]


def test_no_data_upgrade_leaves_data_layers_alone():
    net, _ = prototxt.parse_net('layers { name: "d" type: DATA top: "a" '
                                'data_param { source: "db" } }')
    assert not net.layer[0].HasField("transform_param")


# --- DeepLab v1 hole: "hole is hole OR hole_h and hole_w are required" (v1 conv CHECK) ----

@pytest.mark.parametrize("holes, dilation", [
    ("hole: 3", [3]), ("hole_h: 2 hole_w: 4", [2, 4]),
    ("hole_h: 2", None), ("hole_w: 2", None), ("hole: 2 hole_h: 2 hole_w: 2", None),
])
def test_hole_fields_become_dilation(holes, dilation):
    text = ('layers { name: "c" type: CONVOLUTION bottom: "x" top: "c" '
            f'convolution_param {{ num_output: 1 kernel_size: 3 {holes} }} }}')
    if dilation is None:
        with pytest.raises(ValueError, match="layer 'c'.*hole_h and hole_w"):
            prototxt.parse_net(text, "h.prototxt")
        return
    net, _ = prototxt.parse_net(text, "h.prototxt")
    conv = net.layer[0].convolution_param
    assert list(conv.dilation) == dilation
    assert not any(conv.HasField(f) for f in ("hole", "hole_h", "hole_w"))


# --- caffelite upgrade writes what upgrade_net_proto_text writes --------------------------

UPGRADE_IN = """
name: "v1"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 5 input_dim: 5
layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv"
         blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
         convolution_param { num_output: 4 kernel_size: 3
                             weight_filler { type: "gaussian" std: 0.01 }
                             bias_filler { type: "constant" value: 1000000 } } }
layers { name: "pow" type: POWER bottom: "conv" top: "pow"
         power_param { power: 2 scale: 0.1 shift: 1e-07 } }
layers { name: "drop" type: DROPOUT bottom: "pow" top: "pow" include { phase: TRAIN }
         dropout_param { dropout_ratio: 0.3333333 } }
"""

# TextFormat::Printer: fields in number order, two-space indent, floats as SimpleFtoa
# ("%.6g", or "%.8g" when that does not read back as the same float: protobuf up to
# 3.3, the fork's), strings CEscaped.
UPGRADE_OUT = """name: "v1"
input: "data"
input_dim: 1
input_dim: 3
input_dim: 5
input_dim: 5
layer {
  name: "conv"
  type: "Convolution"
  bottom: "data"
  top: "conv"
  param {
    lr_mult: 1
    decay_mult: 1
  }
  param {
    lr_mult: 2
    decay_mult: 0
  }
  convolution_param {
    num_output: 4
    kernel_size: 3
    weight_filler {
      type: "gaussian"
      std: 0.01
    }
    bias_filler {
      type: "constant"
      value: 1e+06
    }
  }
}
layer {
  name: "pow"
  type: "Power"
  bottom: "conv"
  top: "pow"
  power_param {
    power: 2
    scale: 0.1
    shift: 1e-07
  }
}
layer {
  name: "drop"
  type: "Dropout"
  bottom: "pow"
  top: "pow"
  include {
    phase: TRAIN
  }
  dropout_param {
    dropout_ratio: 0.33333331
  }
}
"""


def test_upgrade_verb_output_is_caffes_text_format(tmp_path):
    from caffelite import cli
    src, dst = tmp_path / "v1.prototxt", tmp_path / "v2.prototxt"
    src.write_text(UPGRADE_IN)
    assert cli.main(["upgrade", str(src), str(dst)]) == 0
    assert dst.read_text() == UPGRADE_OUT


def test_upgrade_verb_makes_a_cropping_padding_with_a_zero_pad_an_interp(tmp_path):
    """spec (deeplab_v2_semantics.md, "Not registered in the fork"): the fork has no
    Padding layer; a V1 PADDING that only crops becomes an Interp with the same pads.
    pad_end 0 with a negative pad_beg still only crops, so the upgraded text (read here
    by protobuf) has type "Interp" (zoom_factor 1: a copy of the cropped region), and
    the net gives x[:, :, 2:, 2:]."""
    from caffelite import cli
    src, dst = tmp_path / "v1.prototxt", tmp_path / "v2.prototxt"
    src.write_text('input: "x" input_dim: 1 input_dim: 2 input_dim: 4 input_dim: 5\n'
                   'layers { name: "pad" type: PADDING bottom: "x" top: "y" '
                   'padding_param { pad_beg: -2 pad_end: 0 } }\n')
    assert cli.main(["upgrade", str(src), str(dst)]) == 0
    upgraded = text_format.Parse(dst.read_text(), caffe_pb2.NetParameter())
    assert [(l.type, l.interp_param.pad_beg, l.interp_param.pad_end,
             l.interp_param.zoom_factor) for l in upgraded.layer] == [("Interp", -2, 0, 1)]
    net = caffe.Net(str(dst), caffe.TEST)
    x = np.arange(40, dtype=np.float32).reshape(1, 2, 4, 5)
    np.testing.assert_array_equal(net.forward(x=x)["y"], x[:, :, 2:, 2:])


def test_text_format_of_special_values():
    net = caffe_pb2.NetParameter()
    layer = net.layer.add()
    layer.name = "q'\"\\\n\u00e9"
    layer.loss_weight.extend([float("inf"), float("-inf"), 0, -2.5, 123456789])
    # CEscape: \' \" \\ \n and octal bytes for non-ASCII; 123456789 is the float
    # 123456792, which "%.6g" (1.23457e+08) does not give back and "%.8g" does.
    assert prototxt.net_to_text(net) == (
        'layer {\n'
        '  name: "q\\\'\\"\\\\\\n\\303\\251"\n'
        '  loss_weight: inf\n  loss_weight: -inf\n  loss_weight: 0\n'
        '  loss_weight: -2.5\n  loss_weight: 1.2345679e+08\n'
        '}\n')


# --- bytes that are not UTF-8 ------------------------------------------------------------

def test_non_utf8_comment_is_skipped_like_caffe(tmp_path):
    # Caffe's tokenizer skips a '#' comment whatever its bytes are (GBK comments are
    # common in Chinese Caffe configs).
    path = tmp_path / "gbk.prototxt"
    path.write_bytes('name: "n"  # \u7f51\u7edc\nlayer { name: "a" type: "ReLU" }\n'
                     .encode("gbk"))
    net, _ = prototxt.read_net(str(path))
    assert net.name == "n" and net.layer[0].name == "a"


def test_placeholder_in_a_comment_after_an_escaped_quote_needs_no_define():
    # The comment starts at the '#' after the string "a\"b"; Caffe never reads it.
    net, _ = prototxt.parse_net(prototxt.fill_templates('name: "a\\"b" # ${UNSET}\n', {}))
    assert net.name == 'a"b'


def test_absent_v1_name_and_type_stay_absent():
    # UpgradeV1LayerParameter sets name / type only when the V1 layer has them.
    net, _ = prototxt.parse_net('layers { bottom: "a" top: "b" }')
    assert net == _v2('layer { bottom: "a" top: "b" }')
    assert not net.layer[0].HasField("name") and not net.layer[0].HasField("type")


@pytest.mark.parametrize("extra, label_type", [("", "NONE"), ("label_type: PIXEL", "PIXEL"),
                                               ("has_label: true", "IMAGE")])
def test_deeplab_v1_has_label_false_is_label_type_none(extra, label_type):
    """DeepLab v1's test nets read lists of images alone with has_label: false, which
    the v2 fork's proto does not have: its label_type NONE (an explicit label_type
    stays)."""
    text = ('layers { name: "data" type: IMAGE_SEG_DATA top: "data" image_data_param { '
            f'source: "list.txt" {"has_label: false" if "has_label" not in extra else ""} '
            f'{extra} }} }}')
    net, _ = prototxt.parse_net(text)
    param = net.layer[0].image_data_param
    assert not param.HasField("has_label")
    assert caffe_pb2.ImageDataParameter.LabelType.Name(param.label_type) == label_type


def test_strict_dim_false_survives_the_upgrade_to_v2_text(tmp_path):
    """DeepLab v1's strict_dim: false (weights copied by element count) is carried into
    the V2 layer, so an upgraded v1 net still takes its old-layout weights; it stays
    out of caffemodels (a text-only field number)."""
    v1 = tmp_path / "v1.prototxt"
    v1.write_text('input: "data" input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 3\n'
                  'layers { name: "fc" type: CONVOLUTION bottom: "data" top: "fc" '
                  'strict_dim: false convolution_param { num_output: 4 kernel_size: 3 } }\n')
    net, relaxed = prototxt.read_net(str(v1))
    assert relaxed == {"fc"}
    v2 = tmp_path / "v2.prototxt"
    v2.write_text(prototxt.net_to_text(net))
    assert "strict_dim: false" in v2.read_text()
    assert prototxt.read_net(str(v2))[1] == {"fc"}
    weights = tmp_path / "old_layout.caffemodel"
    model = caffe_pb2.NetParameter()
    layer = model.layer.add(name="fc", type="Convolution")
    for count in (4 * 2 * 3 * 3, 4):             # blobs of another shape, same counts
        blob = layer.blobs.add()
        blob.shape.dim.extend([1, 1, 1, count])
        blob.data.extend(np.arange(count, dtype=np.float32))
    weights.write_bytes(model.SerializeToString())
    upgraded = caffe.Net(str(v2), caffe.TEST, weights=str(weights))
    np.testing.assert_array_equal(upgraded.params["fc"][0].data.ravel(), np.arange(72))
    saved = caffe_pb2.NetParameter.FromString(upgraded.to_proto_bytes())
    assert not saved.layer[0].HasField("strict_dim")


# --- BatchNorm statistics declared as learnt parameters ---------------------------------

def _batch_norm_net(*lr_mults):
    specs = " ".join(f"param {{ lr_mult: {m} }}" for m in lr_mults)
    return ('name: "bn" input: "data" input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 3 '
            f'layer {{ name: "bn" type: "BatchNorm" bottom: "data" top: "out" {specs} }}')


def test_learnt_batch_norm_statistics_get_bvlcs_upgrade(caplog):
    """The fork refuses them at setup; BVLC's UpgradeNetBatchNorm zeroes lr_mult and
    decay_mult of a BatchNorm with three specs, so such models run as in BVLC."""
    with caplog.at_level(logging.INFO, logger="caffelite"):
        net, _ = prototxt.parse_net(_batch_norm_net(1, 1, 0), "bn.prototxt")
    assert [(s.lr_mult, s.decay_mult) for s in net.layer[0].param] == [(0, 0)] * 3
    assert [r.getMessage() for r in caplog.records] == [
        "Attempting to upgrade batch norm layers using deprecated params: bn.prototxt",
        "Successfully upgraded batch norm layers using deprecated params."]


def test_frozen_batch_norm_statistics_are_left_as_the_fork_reads_them(caplog):
    """DeepLab's ResNets give three ``param { lr_mult: 0 }``: no upgrade, no log line,
    decay_mult unset."""
    with caplog.at_level(logging.INFO, logger="caffelite"):
        net, _ = prototxt.parse_net(_batch_norm_net(0, 0, 0), "bn.prototxt")
    assert net == _v2(_batch_norm_net(0, 0, 0))
    assert not caplog.records


def test_learnt_statistics_without_three_specs_are_refused_as_caffe_does(tmp_path):
    path = tmp_path / "bn.prototxt"
    path.write_text(_batch_norm_net(1))
    with pytest.raises(ValueError, match=r"layer 'bn' \(BatchNorm\): param 0 has lr_mult "
                                         r"1.0: cannot configure batch normalization"):
        caffe.Net(str(path), caffe.TEST)


def test_upgrade_verb_writes_the_batch_norm_upgrade(tmp_path, caplog):
    from caffelite import cli
    src, dst = tmp_path / "bn.prototxt", tmp_path / "bn_new.prototxt"
    src.write_text(_batch_norm_net(1, 1, 1))
    with caplog.at_level(logging.INFO, logger="caffelite"):
        assert cli.main(["upgrade", str(src), str(dst)]) == 0
    assert "already in latest proto format" not in caplog.text
    upgraded, _ = prototxt.parse_net(dst.read_text(), str(dst))
    assert [(s.lr_mult, s.decay_mult) for s in upgraded.layer[0].param] == [(0, 0)] * 3
