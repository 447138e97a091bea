"""Our caffe.proto: wire facts, and it loads on every protobuf backend we support."""
import os
import subprocess
import sys

import pytest

from caffelite.proto import caffe_pb2

# (message, field, number) facts of Caffe's wire format that weights and solver
# states depend on (BVLC caffe.proto and the DeepLab v2 fork).
WIRE_FACTS = [
    ("NetParameter", "name", 1), ("NetParameter", "layers", 2), ("NetParameter", "input", 3),
    ("NetParameter", "input_dim", 4), ("NetParameter", "input_shape", 8),
    ("NetParameter", "layer", 100),
    ("LayerParameter", "name", 1), ("LayerParameter", "type", 2),
    ("LayerParameter", "blobs", 7), ("LayerParameter", "convolution_param", 106),
    ("LayerParameter", "interp_param", 143), ("LayerParameter", "seg_accuracy_param", 144),
    ("LayerParameter", "mat_write_param", 145), ("LayerParameter", "dense_crf_param", 146),
    ("V1LayerParameter", "name", 4), ("V1LayerParameter", "type", 5),
    ("V1LayerParameter", "blobs", 6), ("V1LayerParameter", "blobs_lr", 7),
    ("BlobProto", "num", 1), ("BlobProto", "data", 5), ("BlobProto", "diff", 6),
    ("BlobProto", "shape", 7), ("BlobProto", "double_data", 8),
    ("SolverState", "iter", 1), ("SolverState", "learned_net", 2),
    ("SolverState", "history", 3), ("SolverState", "current_step", 4),
    ("ConvolutionParameter", "dilation", 18), ("TransformationParameter", "scale_factors", 8),
]


@pytest.mark.parametrize("message,field,number", WIRE_FACTS)
def test_wire_field_numbers(message, field, number):
    desc = getattr(caffe_pb2, message).DESCRIPTOR
    assert desc.fields_by_name[field].number == number


def test_defaults_from_the_fork():
    lp = caffe_pb2.LayerParameter()
    assert lp.image_data_param.label_type == caffe_pb2.ImageDataParameter.IMAGE
    assert lp.image_data_param.ignore_label == 255
    assert lp.loss_param.normalization == caffe_pb2.LossParameter.VALID
    assert lp.batch_norm_param.moving_average_fraction == pytest.approx(0.999)
    assert lp.seg_accuracy_param.reset is True
    assert caffe_pb2.SolverParameter().type == "SGD"
    assert caffe_pb2.SolverParameter().regularization_type == "L2"


def test_rms_decay_has_no_default_as_in_the_fork():
    # The fork's caffe.proto declares ``optional float rms_decay = 38;`` with no default,
    # so an RMSProp solver that leaves it out decays with 0 (BVLC 1.0 says 0.99).
    solver = caffe_pb2.SolverParameter()
    assert not solver.HasField("rms_decay") and solver.rms_decay == 0.0


def test_packed_floats_on_the_wire():
    blob = caffe_pb2.BlobProto()
    blob.data.extend([1.0, 2.0])
    # field 5, wire type 2 (packed), 8 bytes
    assert blob.SerializeToString() == b"\x2a\x08" + b"\x00\x00\x80\x3f\x00\x00\x00\x40"


@pytest.mark.parametrize("impl", ["python", "upb"])
def test_schema_loads_on_each_protobuf_backend(impl):
    import google.protobuf
    if impl == "upb" and int(google.protobuf.__version__.split(".")[0]) < 4:
        pytest.skip("protobuf < 4.21 has no upb backend")
    code = ("from caffelite.proto import caffe_pb2; from google.protobuf import text_format;"
            "n = text_format.Parse('layer { name: \"a\" type: \"Convolution\" "
            "convolution_param { dilation: 2 } }', caffe_pb2.NetParameter());"
            "assert caffe_pb2.NetParameter.FromString(n.SerializeToString()) == n;"
            "assert caffe_pb2.Phase.Value('TEST') == caffe_pb2.TEST == 1;"
            "print('ok')")
    env = dict(os.environ, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=impl,
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_top_level_enums_are_wrapped_as_protocs_modules_have_them():
    """SSD-era NetSpec scripts write include=dict(phase=caffe_pb2.Phase.Value('TRAIN'))."""
    assert caffe_pb2.Phase.Value("TRAIN") == caffe_pb2.TRAIN == 0
    assert caffe_pb2.Phase.Name(1) == "TEST"
    assert list(caffe_pb2.Phase.keys()) == ["TRAIN", "TEST"]
    assert caffe_pb2.Phase.DESCRIPTOR.values_by_name["TEST"].number == 1
