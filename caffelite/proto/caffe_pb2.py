"""``caffe_pb2`` as pycaffe users import it, built at import time from caffe.proto.

``from caffelite.proto import caffe_pb2; caffe_pb2.NetParameter()`` works as with
Caffe's generated module, on any supported protobuf runtime.
"""
import os as _os

from .schema import load_proto as _load_proto

_names, DESCRIPTOR = _load_proto(
    _os.path.join(_os.path.dirname(__file__), "caffe.proto"), "caffelite/caffe.proto")
globals().update(_names)
del _names
