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


def _warnings(caplog, word):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and word in r.getMessage()]


# --- UpgradeV1Net: V2 'layer' entries next to V1 'layers' are ignored -------------------

MIXED = """
name: "mixed"
input: "data" input_dim: 1 input_dim: 2 input_dim: 1 input_dim: 2
layer { name: "v2_relu" type: "ReLU" bottom: "data" top: "v2" }
layers { name: "v1_relu" type: RELU bottom: "data" top: "v1" }
"""


def test_v1_layers_win_and_v2_layer_entries_are_dropped(caplog):
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        net, _ = prototxt.parse_net(MIXED, "mixed.prototxt")
    expected = _v2('name: "mixed" input: "data" input_dim: 1 input_dim: 2 input_dim: 1 '
                   'input_dim: 2 layer { name: "v1_relu" type: "ReLU" bottom: "data" top: "v1" }')
    assert net == expected
    assert _warnings(caplog, "mixed.prototxt")
