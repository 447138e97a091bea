"""caffelite's Python-level pycaffe API against the real BVLC Caffe 1.0 pycaffe, side by side.

Set CAFFELITE_BVLC_PYCAFFE to the launcher that scripts/bvlc_caffe_oracle.py writes
(as for tests/test_bvlc_oracle.py); without it these tests skip.  Each case below is
one function ``case(caffe, ctx)`` that uses only numpy and the ``caffe`` module it is
given: the oracle process runs every case's source under the real pycaffe (Python 3.9,
numpy 1.19) and the tests run the same source with ``caffe = caffelite``, then compare
what the two return (arrays by dtype, shape and value; texts, bytes, names, orders and
the errors raised).  Inputs come from ``np.random.RandomState``, whose streams are the
same in every numpy, and the files the cases read (prototxts, PNG images) are written
once for both sides.

The oracle's launcher stubs out skimage and scipy (pycaffe's ``caffe.io`` imports them),
and pydot is not there.  scripts/bvlc_caffe_oracle.py unpacks CPython 3.9 wheels of
scikit-image 0.18.3, scipy 1.7.3, pydot 1.4.2 and their dependencies into ``site39``
beside the launcher (CAFFELITE_BVLC_PY39_SITE may name another such folder); the oracle
then puts it first on sys.path.  The cases that need them (``resize_image`` on 1 or 3
channels and everything built on it, ``load_image``, ``Classifier``, ``Detector``,
``caffe.draw``) skip without it.  Two shims give that newer skimage the behaviour of
the skimage of the fork's time (<= 0.14): ``resize`` without anti-aliasing (0.15 made
it the default for downsampling) and ``imread``'s ``as_grey`` keyword (renamed
``as_gray``, removed in 0.16).

The caffe.draw graph test also needs pydot on caffelite's side (it skips without it).

BVLC 1.0 (2017) is later than the DeepLab v2 fork (BVLC of early 2016), whose pycaffe
caffelite follows.  Where the two differ, the tests assert the fork's behaviour on
caffelite's side and BVLC 1.0's on the oracle's (``FORK`` notes say which); where
caffelite is deliberately kinder than both (README), that is asserted the same way.
"""
import base64
import inspect
import json
import os
import subprocess
import textwrap

import numpy as np
import pytest

import caffelite as caffe
# the structure as tests/test_bvlc_oracle.py compares it (tests/oracles/bvlc_pycaffe_runner.py)
from conftest import working_dir
from test_bvlc_oracle import _net_structure as net_structure

HERE = os.path.dirname(os.path.abspath(__file__))
PYCAFFE = os.environ.get("CAFFELITE_BVLC_PYCAFFE")
# scripts/bvlc_caffe_oracle.py unpacks it beside the launcher
SITE39 = os.environ.get("CAFFELITE_BVLC_PY39_SITE") or (
    PYCAFFE and os.path.isdir(os.path.join(os.path.dirname(PYCAFFE), "site39"))
    and os.path.join(os.path.dirname(PYCAFFE), "site39")) or None
pytestmark = pytest.mark.skipif(
    not PYCAFFE, reason="set CAFFELITE_BVLC_PYCAFFE (scripts/bvlc_caffe_oracle.py)")


# ----------------------------------------------------------------------------- encoding
# Results cross the process boundary as JSON; these two functions run on both sides
# (their source is sent to the oracle), so that both sides' results are compared in the
# same form.

def encode(value):
    if isinstance(value, np.ndarray):
        data = value.copy(order="C")    # (ascontiguousarray makes a 0-d array 1-d)
        return {"__nd__": [data.dtype.str, list(data.shape),
                           base64.b64encode(data.tobytes()).decode("ascii")]}
    if isinstance(value, np.generic):
        return {"__np__": encode(np.asarray(value))}
    if isinstance(value, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {"__dict__": [[encode(k), encode(v)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return {"__repr__": "%s: %r" % (type(value).__name__, value)}


def decode(value):
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__nd__" in value:
        dtype, shape, data = value["__nd__"]
        return np.frombuffer(base64.b64decode(data), dtype=dtype).reshape(shape).copy()
    if "__np__" in value:
        return decode(value["__np__"])[()]
    if "__bytes__" in value:
        return base64.b64decode(value["__bytes__"])
    if "__tuple__" in value:
        return tuple(decode(v) for v in value["__tuple__"])
    if "__dict__" in value:
        return dict((decode(k), decode(v)) for k, v in value["__dict__"])
    return ("repr", value["__repr__"])


def raised(fn, *args, **kwargs):
    """What a call gives: ("ok", value) or ("raises", exception type, text)."""
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as e:      # both sides' failures are compared, not raised
        return ("raises", type(e).__name__, str(e)[:300])


# ----------------------------------------------------------------------------- files
DEPLOY = """name: "tiny"
input: "data"
input_shape { dim: 3 dim: 3 dim: 6 dim: 6 }
force_backward: true
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
  inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""

# Two inputs, a layer with two tops and a loss: the structure of a training net.
TRAIN = """name: "trainer"
input: "data"
input_shape { dim: 4 dim: 2 dim: 3 dim: 3 }
input: "label"
input_shape { dim: 4 }
force_backward: true
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 4 } }
layer { name: "slice" type: "Slice" bottom: "ip" top: "a" top: "b"
  slice_param { axis: 1 slice_point: 2 } }
layer { name: "sig" type: "Sigmoid" bottom: "b" top: "sig" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss"
  loss_weight: 2 }
layer { name: "aux" type: "EuclideanLoss" bottom: "a" bottom: "sig" top: "aux"
  loss_weight: 0.5 include { phase: TRAIN } }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc"
  include { phase: TEST } }
"""

MEMORY = """name: "memory"
layer { name: "data" type: "MemoryData" top: "data" top: "label"
  memory_data_param { batch_size: 2 channels: 2 height: 2 width: 3 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 } }
"""

# A solver's net: constant data, so both sides train on the same numbers.
SOLVER_NET = """name: "regress"
layer { name: "data" type: "DummyData" top: "data" top: "target"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 }
    data_filler { type: "constant" value: 0.5 } data_filler { type: "constant" value: -1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "constant" value: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "target" top: "loss" }
"""

# A deploy net whose output stays 4-D (N x C x 1 x 1), for the Detector.
CONV_DEPLOY = """name: "convhead"
input: "data"
input_shape { dim: 2 dim: 3 dim: 4 dim: 4 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 3 kernel_size: 4 } }
layer { name: "prob" type: "Softmax" bottom: "conv" top: "prob" }
"""

CLASSIFY_DEPLOY = """name: "classify"
input: "data"
input_shape { dim: 4 dim: 3 dim: 4 dim: 4 }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""

FILES = {"deploy.prototxt": DEPLOY, "train.prototxt": TRAIN, "memory.prototxt": MEMORY,
         "solver_net.prototxt": SOLVER_NET, "conv_deploy.prototxt": CONV_DEPLOY,
         "classify.prototxt": CLASSIFY_DEPLOY}


def _write_images(folder):
    """PNGs for load_image: 8-bit gray, RGB, RGBA, 16-bit gray, palette."""
    from PIL import Image
    rs = np.random.RandomState(7)
    gray = rs.randint(0, 256, (5, 7)).astype(np.uint8)
    rgb = rs.randint(0, 256, (5, 7, 3)).astype(np.uint8)
    rgba = rs.randint(0, 256, (5, 7, 4)).astype(np.uint8)
    Image.fromarray(gray, "L").save(os.path.join(folder, "gray.png"))
    Image.fromarray(rgb, "RGB").save(os.path.join(folder, "rgb.png"))
    Image.fromarray(rgba, "RGBA").save(os.path.join(folder, "rgba.png"))
    deep = rs.randint(0, 65536, (5, 7)).astype(np.uint16)
    Image.fromarray(deep.astype(np.int32), "I").convert("I;16").save(
        os.path.join(folder, "gray16.png"))
    Image.fromarray(rgb, "RGB").convert("P", palette=Image.ADAPTIVE, colors=8).save(
        os.path.join(folder, "palette.png"))
    big = rs.randint(0, 256, (12, 10, 3)).astype(np.uint8)
    Image.fromarray(big, "RGB").save(os.path.join(folder, "big.png"))


# ----------------------------------------------------------------------------- cases
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def set_params(net, seed):
    """Every parameter blob from a RandomState of ``seed`` (the same on both sides)."""
    rs = np.random.RandomState(seed)
    for name in net.params:
        for blob in net.params[name]:
            blob.data[...] = rs.uniform(-1, 1, blob.data.shape)


def stub_missing(module_name):
    """True where the oracle's module is its launcher's stub (no real skimage/scipy)."""
    import importlib
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return True
    return "stub" in (getattr(module, "__file__", "") or "")


# caffe.io ------------------------------------------------------------------------------
@case
def io_transformer_pipeline(caffe, ctx):
    rs = np.random.RandomState(1)
    t = caffe.io.Transformer({"data": (2, 3, 4, 5)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255.0)
    t.set_mean("data", np.array([104.0, 117.0, 123.0]))
    t.set_input_scale("data", 0.017)
    img32 = rs.rand(4, 5, 3).astype(np.float32)
    img64 = rs.rand(4, 5, 3)
    img8 = (rs.rand(4, 5, 3) * 255).astype(np.uint8)
    x32 = t.preprocess("data", img32.copy())
    x64 = t.preprocess("data", img64)
    x8 = t.preprocess("data", img8)
    return {"x32": x32, "x64": x64, "x8": x8,
            "back": t.deprocess("data", x32[np.newaxis]),
            "back64": t.deprocess("data", x64.astype(np.float64)),
            "mean": t.mean["data"], "transpose": t.transpose["data"],
            "swap": t.channel_swap["data"], "raw": t.raw_scale["data"],
            "scale": t.input_scale["data"]}


@case
def io_transformer_each_setter(caffe, ctx):
    rs = np.random.RandomState(2)
    img = rs.rand(4, 5, 3).astype(np.float32)
    chw = rs.rand(3, 4, 5).astype(np.float32)
    out = {}
    t = caffe.io.Transformer({"data": (1, 3, 4, 5)})
    # fresh copies: io.py works in place on a float32 image of the blob's size, and may
    # hand back the caller's own array (io_transformer_in_place)
    out["nothing"] = t.preprocess("data", img.copy())
    t = caffe.io.Transformer({"data": (1, 3, 4, 5)})
    t.set_transpose("data", (2, 0, 1))
    out["transpose"] = t.preprocess("data", img.copy())
    out["transpose_back"] = t.deprocess("data", out["transpose"])
    t = caffe.io.Transformer({"data": (1, 3, 4, 5)})
    t.set_channel_swap("data", [2, 0, 1])   # on the image's first axis (no transpose)
    out["swap_only"] = raised(t.preprocess, "data", rs.rand(4, 5, 3).astype(np.float32))
    t = caffe.io.Transformer({"data": (1, 3, 4, 5)})
    t.set_raw_scale("data", 2)
    out["raw_int"] = t.preprocess("data", img.copy())
    t = caffe.io.Transformer({"data": (1, 3, 4, 5)})
    t.set_transpose("data", (2, 0, 1))
    full = rs.rand(3, 4, 5) * 100
    t.set_mean("data", full)
    out["full_mean"] = t.preprocess("data", img.copy())
    out["full_mean_back"] = t.deprocess("data", out["full_mean"])
    t = caffe.io.Transformer({"data": (1, 1, 4, 5)})
    t.set_mean("data", rs.rand(4, 5).astype(np.float32))
    out["hw_mean_kept"] = t.mean["data"]
    out["hw_mean"] = raised(t.preprocess, "data", rs.rand(4, 5, 1).astype(np.float32))[:2]
    t.set_transpose("data", (2, 0, 1))
    out["hw_mean_transposed"] = t.preprocess("data", rs.rand(4, 5, 1).astype(np.float32))
    t = caffe.io.Transformer({"data": (1, 3, 4, 5)})
    t.set_input_scale("data", np.float32(0.5))
    out["input_scale"] = t.preprocess("data", chw.transpose(1, 2, 0))
    t = caffe.io.Transformer({"data": (1, 3, 4, 5), "aux": (1, 2, 4, 5)})
    t.set_raw_scale("aux", 10)
    out["other_input_untouched"] = t.preprocess("data", img.copy())
    out["aux"] = t.preprocess("aux", rs.rand(4, 5, 2).astype(np.float32))
    return out


@case
def io_transformer_in_place(caffe, ctx):
    """io.py's astype(float32, copy=False): a float32 image of the blob's size is
    scaled in place."""
    t = caffe.io.Transformer({"data": (1, 3, 2, 2)})
    t.set_transpose("data", (2, 0, 1))
    t.set_raw_scale("data", 255.0)
    img = np.full((2, 2, 3), 0.5, np.float32)
    t.preprocess("data", img)
    return {"caller_image_after": img}


@case
def io_transformer_errors(caffe, ctx):
    t = caffe.io.Transformer({"data": (1, 3, 4, 5)})
    out = {}
    out["unknown_input"] = raised(t.set_raw_scale, "label", 1)
    out["transpose_len"] = raised(t.set_transpose, "data", (1, 0))
    out["swap_len"] = raised(t.set_channel_swap, "data", (1, 0))
    out["mean_channels"] = raised(t.set_mean, "data", np.zeros(4))
    out["mean_ndim"] = raised(t.set_mean, "data", np.zeros((1, 3, 4, 5)))
    out["preprocess_unknown"] = raised(t.preprocess, "label", np.zeros((4, 5, 3)))
    out["deprocess_unknown"] = raised(t.deprocess, "label", np.zeros((3, 4, 5)))
    return {k: v[:2] for k, v in out.items()}


@case
def io_transformer_mean_other_size(caffe, ctx):
    """BVLC 1.0 resizes an elementwise mean of another H x W; the fork refuses it."""
    t = caffe.io.Transformer({"data": (1, 3, 4, 5)})
    rs = np.random.RandomState(3)
    r = raised(t.set_mean, "data", rs.rand(3, 8, 10) * 50)
    return {"set": r[:2], "mean": t.mean.get("data")}


@case
def io_resize_constant(caffe, ctx):
    """Constant images: io.py fills without calling skimage."""
    out = {}
    for name, im in (("f32", np.full((3, 4, 3), 0.25, np.float32)),
                     ("u8", np.full((3, 4, 1), 7, np.uint8)),
                     ("f64neg", np.full((2, 2, 3), -3.5))):
        out[name] = caffe.io.resize_image(im, (5, 6))
    return out


def _resize_variants(caffe, sizes, seed):
    rs = np.random.RandomState(seed)
    images = {"f32_rgb": rs.rand(4, 5, 3).astype(np.float32),
              "f64_gray": rs.rand(4, 5, 1) * 300 - 50,
              "u8_rgb": rs.randint(0, 256, (4, 5, 3)).astype(np.uint8),
              "f32_wide": (rs.rand(3, 7, 3) * 2 - 1).astype(np.float32)}
    out = {}
    for name, im in sorted(images.items()):
        for size in sizes:
            for order in (0, 1):
                out["%s_%dx%d_o%d" % ((name,) + tuple(size) + (order,))] = \
                    caffe.io.resize_image(im, size, interp_order=order)
    return out


@case
def io_resize_skimage_up(caffe, ctx):
    if stub_missing("skimage"):
        return "needs skimage"
    return _resize_variants(caffe, [(8, 10), (5, 9), (4, 5)], 4)


@case
def io_resize_skimage_down(caffe, ctx):
    if stub_missing("skimage"):
        return "needs skimage"
    return _resize_variants(caffe, [(2, 3), (3, 2), (1, 1)], 5)


@case
def io_resize_zoom(caffe, ctx):
    """Channel counts other than 1 and 3: scipy.ndimage.zoom."""
    if stub_missing("scipy"):
        return "needs scipy"
    rs = np.random.RandomState(6)
    out = {}
    for name, im in (("f32_2", rs.rand(4, 5, 2).astype(np.float32)),
                     ("f64_4", rs.rand(3, 3, 4) * 10),
                     ("u8_4", rs.randint(0, 256, (4, 4, 4)).astype(np.uint8))):
        for size in ((8, 10), (2, 3), (6, 5)):
            for order in (0, 1):
                out["%s_%dx%d_o%d" % ((name,) + size + (order,))] = \
                    caffe.io.resize_image(im, size, interp_order=order)
    return out


@case
def io_transformer_resizes(caffe, ctx):
    if stub_missing("skimage"):
        return "needs skimage"
    rs = np.random.RandomState(8)
    t = caffe.io.Transformer({"data": (1, 3, 6, 8)})
    t.set_transpose("data", (2, 0, 1))
    t.set_raw_scale("data", 255)
    t.set_mean("data", np.array([1.0, 2.0, 3.0]))
    return {"up": t.preprocess("data", rs.rand(3, 4, 3).astype(np.float32)),
            "down": t.preprocess("data", rs.rand(12, 16, 3))}


@case
def io_load_image(caffe, ctx):
    if stub_missing("skimage"):
        return "needs skimage"
    out = {}
    for name in ("gray", "rgb", "rgba", "gray16", "palette"):
        path = os.path.join(ctx["dir"], name + ".png")
        for color in (True, False):
            out["%s_%s" % (name, color)] = raised(caffe.io.load_image, path, color)
    out["missing"] = raised(caffe.io.load_image, os.path.join(ctx["dir"], "nope.png"))[:2]
    return out


@case
def io_oversample(caffe, ctx):
    rs = np.random.RandomState(9)
    images = [rs.rand(7, 9, 3).astype(np.float32), rs.rand(7, 9, 3).astype(np.float32)]
    return {"list": caffe.io.oversample(images, (4, 5)),
            "array": caffe.io.oversample(np.array(images), (3, 3)),
            "odd": caffe.io.oversample([rs.rand(6, 5, 1)], (3, 2)),
            "f64": caffe.io.oversample([rs.rand(4, 4, 2)], [4, 4]),
            "u8": caffe.io.oversample([rs.randint(0, 255, (5, 5, 3)).astype(np.uint8)],
                                      (2, 2))}


@case
def io_blobproto(caffe, ctx):
    rs = np.random.RandomState(10)
    arr = rs.randn(2, 3, 4).astype(np.float32)
    diff = rs.randn(2, 3, 4)
    blob = caffe.io.array_to_blobproto(arr, diff)
    out = {"bytes": blob.SerializeToString(),
           "data": caffe.io.blobproto_to_array(blob),
           "diff": caffe.io.blobproto_to_array(blob, return_diff=True),
           "no_diff": caffe.io.array_to_blobproto(arr).SerializeToString(),
           "f64_1d": caffe.io.array_to_blobproto(rs.randn(5)).SerializeToString(),
           "int_5d": caffe.io.array_to_blobproto(
               np.arange(32).reshape(1, 2, 2, 2, 4)).SerializeToString(),
           "scalar": caffe.io.array_to_blobproto(np.array(3.5)).SerializeToString()}
    proto = caffe.proto.caffe_pb2
    legacy = proto.BlobProto()
    legacy.num, legacy.channels, legacy.height, legacy.width = 2, 3, 1, 2
    legacy.data.extend(list(range(12)))
    legacy.diff.extend([0.5] * 12)
    out["legacy"] = caffe.io.blobproto_to_array(legacy)
    out["legacy_diff"] = caffe.io.blobproto_to_array(legacy, return_diff=True)
    partial = proto.BlobProto()
    partial.channels = 3
    partial.data.extend([1, 2, 3])
    out["legacy_partial"] = raised(caffe.io.blobproto_to_array, partial)[:2]
    both = proto.BlobProto()
    both.shape.dim.extend([3, 2])
    both.num = 1
    both.channels = 1
    both.height = 2
    both.width = 3
    both.data.extend(list(range(6)))
    out["legacy_wins"] = caffe.io.blobproto_to_array(both)
    one = proto.BlobProto()
    one.data.append(4.0)
    out["no_shape"] = caffe.io.blobproto_to_array(one)
    empty = proto.BlobProto()
    empty.shape.dim.extend([2, 0])
    out["empty"] = caffe.io.blobproto_to_array(empty)
    return out


@case
def io_blobprotovector(caffe, ctx):
    rs = np.random.RandomState(11)
    arrays = [rs.randn(2, 3).astype(np.float32), rs.randn(1, 1, 1, 4), np.zeros((0,))]
    data = caffe.io.arraylist_to_blobprotovector_str(arrays)
    return {"bytes": data, "back": caffe.io.blobprotovector_str_to_arraylist(data)}


@case
def io_datum(caffe, ctx):
    rs = np.random.RandomState(12)
    u8 = rs.randint(0, 256, (3, 2, 4)).astype(np.uint8)
    f32 = rs.randn(2, 3, 2).astype(np.float32)
    out = {}
    d = caffe.io.array_to_datum(u8, 7)
    out["u8"] = d.SerializeToString()
    out["u8_back"] = caffe.io.datum_to_array(d)
    d = caffe.io.array_to_datum(f32, label=3)
    out["f32"] = d.SerializeToString()
    out["f32_back"] = caffe.io.datum_to_array(d)
    out["int64"] = caffe.io.array_to_datum(np.arange(6).reshape(1, 2, 3), 1).SerializeToString()
    out["bad_ndim"] = raised(caffe.io.array_to_datum, np.zeros((2, 2)))[:2]
    return out


@case
def io_datum_label_none(caffe, ctx):
    d = caffe.io.array_to_datum(np.zeros((1, 1, 2), np.uint8), None)
    return {"bytes": d.SerializeToString(), "has_label": d.HasField("label")}


@case
def io_datum_default_label(caffe, ctx):
    d = caffe.io.array_to_datum(np.zeros((1, 1, 2), np.uint8))
    return {"bytes": d.SerializeToString(), "has_label": d.HasField("label")}


@case
def io_resize_2d(caffe, ctx):
    """An H x W array (no channel axis) whose last axis is 1 or 3 goes to skimage,
    which resizes it as a 2-D image; any other width fails in scipy's zoom."""
    if stub_missing("skimage"):
        return "needs skimage"
    rs = np.random.RandomState(13)
    return {"w3": raised(caffe.io.resize_image, rs.rand(4, 3), (6, 8)),
            "w1": raised(caffe.io.resize_image, rs.rand(5, 1).astype(np.float32), (2, 2)),
            "w5": raised(caffe.io.resize_image, rs.rand(4, 5), (6, 8))[:2]}


@case
def io_resize_high_order(caffe, ctx):
    if stub_missing("skimage"):
        return "needs skimage"
    rs = np.random.RandomState(14)
    im = rs.rand(5, 6, 3).astype(np.float32)
    return dict(("o%d_%dx%d" % ((order,) + size),
                 caffe.io.resize_image(im, size, interp_order=order))
                for order in (2, 3) for size in ((10, 12), (3, 4)))


@case
def io_resize_dims_forms(caffe, ctx):
    if stub_missing("skimage"):
        return "needs skimage"
    rs = np.random.RandomState(15)
    im = rs.rand(4, 4, 3)
    return {"floats": raised(caffe.io.resize_image, im, (2.0, 3.0)),
            "array": raised(caffe.io.resize_image, im, np.array([2, 3])),
            "list": raised(caffe.io.resize_image, im, [5, 3]),
            "zero": raised(caffe.io.resize_image, im, (0, 3))[:1],
            "empty_image": raised(caffe.io.resize_image, np.zeros((0, 3, 3)), (2, 2))[:1]}


# caffe.net_spec ------------------------------------------------------------------------
@case
def netspec_typical(caffe, ctx):
    L, P = caffe.layers, caffe.params
    n = caffe.NetSpec()
    n.data, n.label = L.DummyData(shape=[dict(dim=[8, 3, 16, 16]), dict(dim=[8])],
                                  data_filler=[dict(type="gaussian", std=0.5),
                                               dict(type="constant", value=1)], ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=3, num_output=8, pad=1, stride=1,
                            weight_filler=dict(type="xavier"),
                            bias_filler=dict(type="constant", value=0.1),
                            param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)])
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.drop = L.Dropout(n.pool1, dropout_ratio=0.3, in_place=True)
    n.a, n.b, n.c = L.Slice(n.pool1, slice_point=[2, 5], axis=1, ntop=3)
    n.sum = L.Eltwise(n.a, n.a, operation=P.Eltwise.SUM, coeff=[1, -1])
    n.cat = L.Concat(n.sum, n.b, n.c, axis=1)
    n.fc = L.InnerProduct(n.cat, num_output=10, weight_filler=dict(type="gaussian", std=0.01))
    n.loss = L.SoftmaxWithLoss(n.fc, n.label, loss_weight=1.5,
                               loss_param=dict(ignore_label=255, normalize=False))
    n.acc = L.Accuracy(n.fc, n.label, include=dict(phase=caffe.TEST), top_k=2)
    n.silence = L.Silence(n.b, ntop=0)
    n.py = L.Python(n.fc, module="mymodule", layer="MyLayer", param_str="{'a': 1}")
    n.interp_in = L.Input(shape=dict(dim=[1, 2, 3]))
    return str(n.to_proto())


@case
def netspec_autonames(caffe, ctx):
    L, P = caffe.layers, caffe.params
    data = L.Input(shape=[dict(dim=[1, 3, 4, 4])])
    conv = L.Convolution(data, num_output=2, kernel_size=1)
    relu = L.ReLU(conv, in_place=True)
    pool = L.Pooling(relu, pool=P.Pooling.AVE, global_pooling=True)
    two = L.Slice(pool, ntop=2)
    conv2 = L.Convolution(two[1], num_output=1, kernel_size=1)
    out = {"top": str(conv2.to_proto()), "fn": str(caffe.to_proto(two[0], conv2))}
    n = caffe.NetSpec()
    n["named"] = L.ReLU(conv)          # item assignment; the conv keeps an automatic name
    n.sil = L.Silence(n.named, ntop=0)
    out["mixed"] = str(n.to_proto())
    n2 = caffe.NetSpec()
    n2.x = L.Input(shape=dict(dim=[2]))
    n2.y = L.Power(L.Power(n2.x, power=2), scale=3)
    n2.z = L.Power(L.Power(n2.x), shift=1)
    out["counters"] = str(n2.to_proto())
    out["keys"] = list(n2.tops.keys())
    return out


@case
def netspec_values(caffe, ctx):
    L, P = caffe.layers, caffe.params
    out = {}

    def proto_of(**kwargs):
        n = caffe.NetSpec()
        n.x = L.Input(shape=dict(dim=[1]))
        n.y = L.Convolution(n.x, **kwargs)
        return str(n.to_proto())

    out["repeated_scalar"] = raised(proto_of, kernel_size=3, pad=[1, 2], stride=2)
    out["numpy_ints"] = raised(proto_of, num_output=np.int64(4), kernel_size=np.int32(3))
    out["enum_value"] = raised(proto_of, engine=P.Convolution.CAFFE)
    out["enum_name"] = raised(proto_of, engine="CAFFE")
    out["float_field"] = raised(proto_of, weight_filler=dict(type="gaussian", std=0.01,
                                                            mean=-0.25))
    out["bool_field"] = raised(proto_of, bias_term=False)
    out["layer_field"] = raised(proto_of, propagate_down=[True], exclude=dict(stage="x"))
    out["unknown"] = raised(proto_of, no_such_field=1)[:2]
    out["tuple"] = raised(proto_of, pad=(1, 2))[:2]
    out["not_a_top"] = raised(L.ReLU, 3)[:2]
    out["P_enum"] = [P.Pooling.MAX, P.Pooling.AVE, P.Pooling.STOCHASTIC,
                     P.Eltwise.PROD, P.Eltwise.MAX]
    return out


# Net ---------------------------------------------------------------------------------
def net_summary(net):
    """What a script sees of a net's layout."""
    out = {"blobs": [(k, tuple(v.data.shape)) for k, v in net.blobs.items()],
           "params": [(k, [tuple(b.data.shape) for b in v]) for k, v in net.params.items()],
           "inputs": list(net.inputs), "outputs": list(net.outputs),
           "layer_names": list(net._layer_names),
           "layer_dict": [(k, l.type, len(l.blobs)) for k, l in net.layer_dict.items()],
           "layers": [l.type for l in net.layers],
           "top_names": list(net.top_names.items()),
           "bottom_names": list(net.bottom_names.items()),
           "blob_loss_weights": [(k, float(w)) for k, w in net.blob_loss_weights.items()],
           "blob_api": [(k, b.count, b.num, b.channels, b.height, b.width,
                         b.data.dtype.str, b.diff.dtype.str)
                        for k, b in net.blobs.items() if len(b.shape) == 4]}
    from collections import OrderedDict
    out["types"] = [type(net.inputs).__name__, type(net.outputs).__name__] + [
        isinstance(d, OrderedDict) for d in (net.blobs, net.params, net.layer_dict,
                                             net.top_names, net.bottom_names,
                                             net.blob_loss_weights)]
    return out


@case
def net_layout(caffe, ctx):
    d = ctx["dir"]
    out = {}
    for name, prototxt, phase in (("deploy", "deploy", caffe.TEST), ("train", "train", caffe.TRAIN),
                                  ("test", "train", caffe.TEST),
                                  ("memory", "memory", caffe.TEST)):
        net = caffe.Net(os.path.join(d, prototxt + ".prototxt"), phase)
        out[name] = net_summary(net)
        out[name]["structure"] = net_structure(net)
    return out


@case
def net_forward_backward(caffe, ctx):
    net = caffe.Net(os.path.join(ctx["dir"], "deploy.prototxt"), caffe.TEST)
    set_params(net, 20)
    rs = np.random.RandomState(21)
    x = rs.randn(3, 3, 6, 6).astype(np.float32)
    out = {}
    r = net.forward(data=x)
    out["fwd_keys"] = sorted(r)
    out["fwd"] = {k: v.copy() for k, v in r.items()}
    out["fwd_is_view"] = bool(np.shares_memory(r["prob"], net.blobs["prob"].data))
    out["fwd_blobs"] = {k: v.copy() for k, v in net.forward(blobs=["conv", "pool"]).items()}
    out["fwd_start"] = sorted(net.forward(start="pool"))
    out["fwd_end_ip"] = {k: v.copy() for k, v in net.forward(end="ip").items()}
    out["fwd_start_end"] = sorted(net.forward(start="conv", end="pool"))
    out["fwd_end_inplace"] = raised(lambda: sorted(net.forward(end="relu")))
    out["fwd_bad_kw"] = raised(net.forward, prob=x)[:2]
    out["fwd_bad_batch"] = raised(net.forward, data=x[:2])[:2]
    out["fwd_bad_start"] = raised(net.forward, start="nope")[:2]
    net.forward(data=x)
    top = rs.randn(3, 5).astype(np.float32)
    net.blobs["prob"].diff[...] = top
    g = net.backward()
    out["bwd_keys"] = sorted(g)
    out["bwd"] = {k: v.copy() for k, v in g.items()}
    out["bwd_kw"] = {k: v.copy() for k, v in net.backward(prob=top * 2).items()}
    out["bwd_diffs"] = {k: v.copy() for k, v in net.backward(diffs=["conv", "ip"]).items()}
    out["bwd_start_end"] = sorted(net.backward(start="ip", end="pool"))
    out["bwd_end_inplace"] = raised(lambda: sorted(net.backward(start="ip", end="relu")))
    out["bwd_bad_kw"] = raised(net.backward, data=x)[:2]
    out["param_diffs"] = {k: [b.diff.copy() for b in v] for k, v in net.params.items()}
    return out


@case
def net_reshape(caffe, ctx):
    """A DeepLab script's way: reshape the input blob, net.reshape(), forward."""
    net = caffe.Net(os.path.join(ctx["dir"], "conv_deploy.prototxt"), caffe.TEST)
    set_params(net, 41)
    net.blobs["data"].reshape(1, 3, 8, 8)
    out = {"shapes_before": [(k, tuple(b.data.shape)) for k, b in net.blobs.items()]}
    net.reshape()
    out["shapes"] = [(k, tuple(b.data.shape)) for k, b in net.blobs.items()]
    rs = np.random.RandomState(42)
    net.blobs["data"].data[...] = rs.randn(1, 3, 8, 8)
    out["fwd"] = net.forward()["prob"].copy()
    out["fwd_kw"] = net.forward(data=rs.randn(1, 3, 8, 8).astype(np.float32))["prob"].copy()
    out["wrong_ip"] = raised(net.forward, data=rs.randn(1, 3, 6, 6))[:1]
    return out


@case
def net_forward_all(caffe, ctx):
    net = caffe.Net(os.path.join(ctx["dir"], "deploy.prototxt"), caffe.TEST)
    set_params(net, 22)
    rs = np.random.RandomState(23)
    x = rs.randn(7, 3, 6, 6).astype(np.float32)
    out = {}
    r = net.forward_all(data=x)
    out["all"] = r
    out["all_blobs"] = net.forward_all(blobs=["ip", "pool"], data=x)
    out["exact_batches"] = net.forward_all(data=x[:6])
    out["f64_inputs"] = net.forward_all(data=x[:4].astype(np.float64))
    diffs = rs.randn(7, 5).astype(np.float32)
    fwd, bwd = net.forward_backward_all(data=x, prob=diffs)
    out["fb"] = (fwd, bwd)
    out["fb_extra"] = net.forward_backward_all(blobs=["ip"], diffs=["conv"], data=x[:5],
                                               prob=diffs[:5])
    out["batch"] = [dict((k, v.copy()) for k, v in b.items())
                    for b in net._batch({"data": x[:4]})]
    return out


@case
def net_set_input_arrays(caffe, ctx):
    net = caffe.Net(os.path.join(ctx["dir"], "memory.prototxt"), caffe.TEST)
    set_params(net, 24)
    rs = np.random.RandomState(25)
    data = rs.randn(4, 2, 2, 3).astype(np.float32)
    labels = np.arange(4, dtype=np.float32)
    net.set_input_arrays(data, labels)
    out = {"first": {k: v.copy() for k, v in net.forward().items()},
           "data1": net.blobs["data"].data.copy(), "label1": net.blobs["label"].data.copy()}
    net.forward()
    out["data2"] = net.blobs["data"].data.copy()
    out["label2"] = net.blobs["label"].data.copy()
    net.forward()
    out["data3_wraps"] = net.blobs["data"].data.copy()
    out["bad_count"] = raised(net.set_input_arrays, data[:3], labels[:3])[:1]
    out["bad_shape"] = raised(net.set_input_arrays, rs.randn(2, 2, 3, 2).astype(np.float32),
                              labels[:2])[:1]
    return out


@case
def net_constructors_and_weights(caffe, ctx):
    d, out_dir = ctx["dir"], ctx["out"]
    deploy = os.path.join(d, "deploy.prototxt")
    net = caffe.Net(deploy, caffe.TEST)
    set_params(net, 26)
    path = os.path.join(out_dir, "tiny.caffemodel")
    net.save(path)
    out = {"saved": {k: [b.data.copy() for b in v] for k, v in net.params.items()}}
    forms = {"kw_weights": lambda: caffe.Net(deploy, caffe.TEST, weights=path),
             "legacy_positional": lambda: caffe.Net(deploy, path, caffe.TEST),
             "phase_kw": lambda: caffe.Net(deploy, phase=caffe.TEST),
             "no_phase": lambda: caffe.Net(deploy),
             "level_stages": lambda: caffe.Net(deploy, caffe.TEST, level=0, stages=["a"],
                                               weights=path)}
    for name, make in forms.items():
        r = raised(make)
        out[name] = (r[0], {k: [b.data.copy() for b in v] for k, v in r[1].params.items()}
                     if r[0] == "ok" else r[1])
    fresh = caffe.Net(deploy, caffe.TEST)
    fresh.copy_from(path)
    out["copy_from"] = {k: [b.data.copy() for b in v] for k, v in fresh.params.items()}
    out["missing_weights"] = raised(caffe.Net, deploy, caffe.TEST,
                                    weights=os.path.join(out_dir, "nope.caffemodel"))[:1]
    return out


@case
def net_read_other_sides_weights(caffe, ctx):
    """Each side reads the caffemodel the other side wrote (see the test)."""
    path = ctx.get("foreign_weights")
    if not path or not os.path.exists(path):
        return "no file"
    net = caffe.Net(os.path.join(ctx["dir"], "deploy.prototxt"), caffe.TEST, weights=path)
    return {k: [b.data.copy() for b in v] for k, v in net.params.items()}


SHARED = """name: "shared"
input: "data"
input_shape { dim: 2 dim: 3 }
force_backward: true
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  param { name: "w" } param { name: "b" } inner_product_param { num_output: 3 } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param { name: "w" lr_mult: 2 } param { name: "b" } inner_product_param { num_output: 3 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip2" bottom: "data" top: "loss" }
"""

PYLAYER_NET = """name: "pynet"
input: "data"
input_shape { dim: 2 dim: 3 }
force_backward: true
layer { name: "py" type: "Python" bottom: "data" top: "y"
  python_param { module: "affine_layer" layer: "Affine" param_str: "{'k': 3}" } }
layer { name: "ip" type: "InnerProduct" bottom: "y" top: "ip"
  inner_product_param { num_output: 2 } }
"""

PYLAYER_MODULE = """import numpy as np
try:
    import caffe
except ImportError:
    import caffelite as caffe


class Affine(caffe.Layer):
    def setup(self, bottom, top):
        self.k = float(eval(self.param_str)["k"])
        self.calls = []

    def reshape(self, bottom, top):
        self.calls.append("reshape")
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        self.calls.append("forward")
        top[0].data[...] = self.k * bottom[0].data + 1

    def backward(self, top, propagate_down, bottom):
        self.calls.append("backward %s" % (list(propagate_down),))
        bottom[0].diff[...] = self.k * top[0].diff
"""


@case
def net_shared_params(caffe, ctx):
    path = os.path.join(ctx["out"], "shared.prototxt")
    with open(path, "w") as f:
        f.write(ctx["shared_net"])
    net = caffe.Net(path, caffe.TRAIN)
    out = {"params": [(k, len(v)) for k, v in net.params.items()]}
    set_params(net, 33)
    net.params["ip1"][0].data[0, 0] = 42
    out["ip2_sees_ip1"] = float(net.params["ip2"][0].data[0, 0])
    rs = np.random.RandomState(34)
    out["loss"] = net.forward(data=rs.randn(2, 3).astype(np.float32))["loss"].copy()
    net.backward()
    out["diffs"] = dict((k, [b.diff.copy() for b in v]) for k, v in net.params.items())
    out["data"] = dict((k, [b.data.copy() for b in v]) for k, v in net.params.items())
    return out


@case
def python_layer(caffe, ctx):
    import sys
    with open(os.path.join(ctx["out"], "affine_layer.py"), "w") as f:
        f.write(ctx["pylayer_module"])
    path = os.path.join(ctx["out"], "pynet.prototxt")
    with open(path, "w") as f:
        f.write(ctx["pylayer_net"])
    sys.path.insert(0, ctx["out"])
    try:
        net = caffe.Net(path, caffe.TEST)
        set_params(net, 35)
        rs = np.random.RandomState(36)
        out = {"fwd": net.forward(data=rs.randn(2, 3).astype(np.float32))["ip"].copy()}
        net.blobs["ip"].diff[...] = rs.randn(2, 2)
        out["bwd"] = net.backward()["data"].copy()
        layer = net.layer_dict["py"]
        out["type"] = layer.type
        out["same_object"] = layer is net.layers[list(net._layer_names).index("py")]
        out["k"] = getattr(layer, "k", None)
        out["param_str"] = layer.param_str
        out["calls"] = list(getattr(layer, "calls", []))
        out["blobs"] = len(layer.blobs)
    finally:
        sys.path.remove(ctx["out"])
        sys.modules.pop("affine_layer", None)
    return out


@case
def net_forward_all_edges(caffe, ctx):
    d = ctx["dir"]
    net = caffe.Net(os.path.join(d, "deploy.prototxt"), caffe.TEST)
    set_params(net, 37)
    out = {"no_arrays": raised(lambda: sorted(net.forward_all()))[:2]}
    train = caffe.Net(os.path.join(d, "train.prototxt"), caffe.TRAIN)
    set_params(train, 38)
    rs = np.random.RandomState(39)
    out["scalar_outputs"] = raised(train.forward_all, data=rs.randn(4, 2, 3, 3),
                                   label=np.arange(4) % 3)[:2]
    mem = caffe.Net(os.path.join(d, "memory.prototxt"), caffe.TEST)
    out["f64_arrays"] = raised(mem.set_input_arrays, rs.randn(2, 2, 2, 3),
                               np.zeros(2, np.float32))[:2]
    out["strided"] = raised(mem.set_input_arrays,
                            rs.randn(2, 2, 2, 6).astype(np.float32)[..., ::2],
                            np.zeros(2, np.float32))[:2]
    return out


# Net::FilterNet / StateMeetsRule: a level equal to max_level (or min_level) meets the
# rule; every stage of a rule must be in the state (include and exclude alike).
STATE_RULES_NET = """name: "rules"
input: "x"
input_shape { dim: 1 dim: 2 }
layer { name: "max2" type: "ReLU" bottom: "x" top: "max2" include { max_level: 2 } }
layer { name: "max1" type: "ReLU" bottom: "x" top: "max1" include { max_level: 1 } }
layer { name: "min2" type: "ReLU" bottom: "x" top: "min2" include { min_level: 2 } }
layer { name: "min3" type: "ReLU" bottom: "x" top: "min3" include { min_level: 3 } }
layer { name: "in_ab" type: "ReLU" bottom: "x" top: "in_ab" include { stage: "a" stage: "b" } }
layer { name: "ex_ab" type: "ReLU" bottom: "x" top: "ex_ab" exclude { stage: "a" stage: "b" } }
"""

# Two net inputs shaped by the deprecated input_dim: four values each, in order.
INPUT_DIM_NET = """name: "dims"
input: "x"
input_dim: 2 input_dim: 3 input_dim: 4 input_dim: 5
input: "y"
input_dim: 2 input_dim: 1 input_dim: 1 input_dim: 1
layer { name: "fx" type: "Flatten" bottom: "x" top: "fx" }
layer { name: "fy" type: "Flatten" bottom: "y" top: "fy" }
layer { name: "cat" type: "Concat" bottom: "fx" bottom: "fy" top: "cat" }
"""

# Loss weights on a one-top layer and on both tops of a Slice (not loss layers).
LOSS_SUM_NET = """name: "losses"
input: "x"
input_shape { dim: 1 }
input: "y"
input_shape { dim: 1 dim: 2 }
layer { name: "relu" type: "ReLU" bottom: "x" top: "r" loss_weight: 1 }
layer { name: "slice" type: "Slice" bottom: "y" top: "a" top: "b"
  loss_weight: 1 loss_weight: 1 slice_param { axis: 1 } }
"""

# A V1 net whose two layers share a weight of the same count but another shape.
V1_PERMISSIVE_NET = """name: "v1shared"
input: "x"
input_dim: 1 input_dim: 6 input_dim: 1 input_dim: 1
input: "z"
input_dim: 1 input_dim: 4 input_dim: 1 input_dim: 1
layers { name: "ip1" type: INNER_PRODUCT bottom: "x" top: "ip1" param: "w"
  blob_share_mode: PERMISSIVE inner_product_param { num_output: 2 bias_term: false } }
layers { name: "ip2" type: INNER_PRODUCT bottom: "z" top: "ip2" param: "w"
  blob_share_mode: PERMISSIVE inner_product_param { num_output: 3 bias_term: false } }
"""

# A two-top Python layer whose top "a" feeds a loss that does not propagate down and
# whose top "b" feeds only a Sigmoid that reaches no loss.
NEED_BACKWARD_NET = """name: "needs"
input: "data"
input_shape { dim: 2 dim: 3 }
input: "t"
input_shape { dim: 2 dim: 2 }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 4 } }
layer { name: "halves" type: "Python" bottom: "ip" top: "a" top: "b"
  python_param { module: "halves_layer" layer: "Halves" } }
layer { name: "sig" type: "Sigmoid" bottom: "b" top: "sig" }
layer { name: "loss" type: "EuclideanLoss" bottom: "a" bottom: "t" top: "loss"
  propagate_down: false propagate_down: false }
"""

HALVES_MODULE = """try:
    import caffe
except ImportError:
    import caffelite as caffe


class Halves(caffe.Layer):
    calls = []

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        n, c = bottom[0].data.shape
        top[0].reshape(n, c // 2)
        top[1].reshape(n, c - c // 2)

    def forward(self, bottom, top):
        c = bottom[0].data.shape[1] // 2
        top[0].data[...] = bottom[0].data[:, :c]
        top[1].data[...] = bottom[0].data[:, c:]

    def backward(self, top, propagate_down, bottom):
        Halves.calls.append("backward %s" % (list(propagate_down),))
        bottom[0].diff[...] = 0
"""


def _write_net(ctx, name, text):
    path = os.path.join(ctx["out"], name)
    with open(path, "w") as f:
        f.write(text)
    return path


@case
def net_state_rules(caffe, ctx):
    path = _write_net(ctx, "rules.prototxt", ctx["state_rules_net"])
    out = {}
    for level in (1, 2, 3):
        for stages in ([], ["a"], ["b"], ["a", "b"], ["b", "c", "a"]):
            net = caffe.Net(path, caffe.TEST, level=level, stages=stages)
            out["%d:%s" % (level, ",".join(stages))] = [
                name for name, layer in zip(net._layer_names, net.layers)
                if layer.type != "Split"]
    return out


@case
def net_input_dim_inputs(caffe, ctx):
    net = caffe.Net(_write_net(ctx, "dims.prototxt", ctx["input_dim_net"]), caffe.TEST)
    out = {"shapes": [(k, tuple(v.data.shape)) for k, v in net.blobs.items()],
           "inputs": list(net.inputs)}
    rs = np.random.RandomState(43)
    out["cat"] = net.forward(x=rs.randn(2, 3, 4, 5).astype(np.float32),
                             y=rs.randn(2, 1, 1, 1).astype(np.float32))["cat"].copy()
    return out


@case
def net_loss_sum(caffe, ctx):
    net = caffe.Net(_write_net(ctx, "losses.prototxt", ctx["loss_sum_net"]), caffe.TEST)
    net.blobs["x"].data[...] = 1
    net.blobs["y"].data[...] = 2.0 ** -24
    loss = net._forward(0, len(net.layers) - 1)
    return {"loss": float(loss),
            "tops": [float(net.blobs[k].data.ravel()[0]) for k in ("r", "a", "b")],
            "weights": [(k, float(w)) for k, w in net.blob_loss_weights.items()
                        if k in ("r", "a", "b")]}


@case
def net_v1_permissive_sharing(caffe, ctx):
    path = _write_net(ctx, "v1shared.prototxt", ctx["v1_permissive_net"])
    net = raised(caffe.Net, path, caffe.TEST)
    if net[0] != "ok":
        return net[:2]
    net = net[1]
    out = {"params": [(k, [tuple(b.data.shape) for b in v]) for k, v in net.params.items()]}
    net.params["ip1"][0].data[...] = (np.arange(12, dtype=np.float32).reshape(2, 6) - 5) / 8
    rs = np.random.RandomState(44)
    r = net.forward(x=rs.randn(1, 6, 1, 1).astype(np.float32),
                    z=rs.randn(1, 4, 1, 1).astype(np.float32))
    out["ip2_weights"] = net.params["ip2"][0].data.copy()
    out["fwd"] = {k: v.copy() for k, v in r.items()}
    return out


@case
def net_need_backward(caffe, ctx):
    import sys
    with open(os.path.join(ctx["out"], "halves_layer.py"), "w") as f:
        f.write(ctx["halves_module"])
    path = _write_net(ctx, "needs.prototxt", ctx["need_backward_net"])
    sys.path.insert(0, ctx["out"])
    try:
        net = caffe.Net(path, caffe.TRAIN)
        set_params(net, 45)
        rs = np.random.RandomState(46)
        net.forward(data=rs.randn(2, 3).astype(np.float32),
                    t=rs.randn(2, 2).astype(np.float32))
        net.backward()
        import halves_layer
        out = {"calls": list(halves_layer.Halves.calls),
               "ip_diff": net.params["ip"][0].diff.copy()}
    finally:
        sys.path.remove(ctx["out"])
        sys.modules.pop("halves_layer", None)
    return out


@case
def api_presence(caffe, ctx):
    names = ["Net", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver",
             "AdaDeltaSolver", "AdamSolver", "Timer", "init_log", "log", "set_mode_cpu",
             "set_mode_gpu", "set_device", "Layer", "get_solver", "layer_type_list",
             "set_random_seed", "solver_count", "set_solver_count", "solver_rank",
             "set_solver_rank", "set_multiprocess", "has_nccl", "TRAIN", "TEST",
             "Classifier", "Detector", "io", "layers", "params", "NetSpec", "to_proto",
             "NCCL", "__version__", "proto"]
    out = {"present": [n for n in names if hasattr(caffe, n)],
           "phases": (caffe.TRAIN, caffe.TEST)}
    caffe.set_mode_cpu()
    caffe.set_random_seed(5)
    # (set_device is not called: CPU-only Caffe aborts the process on it)
    out["has_nccl"] = caffe.has_nccl()
    out["solver_count"] = caffe.solver_count()
    t = caffe.Timer()
    t.start()
    t.stop()
    out["timer_ms_type"] = type(t.ms).__name__
    types = caffe.layer_type_list()
    out["layer_types_sorted"] = list(types) == sorted(types)
    out["common_types"] = sorted(set(types) & {"Convolution", "Input", "Python", "ReLU",
                                               "InnerProduct", "Crop", "Reshape"})
    import importlib
    pycaffe = importlib.import_module(caffe.__name__ + ".pycaffe")
    out["pycaffe_module"] = sorted(n for n in ("Net", "SGDSolver", "Timer", "OrderedDict")
                                   if hasattr(pycaffe, n))
    return out


@case
def solver_api(caffe, ctx):
    out_dir = ctx["out"]
    solver_file = os.path.join(out_dir, "solver.prototxt")
    with open(solver_file, "w") as f:
        f.write('net: "%s"\ntest_iter: 1\ntest_interval: 1000\nbase_lr: 0.1\n'
                'lr_policy: "fixed"\nmomentum: 0.9\nmax_iter: 5\ndisplay: 0\n'
                'snapshot_prefix: "%s"\nsolver_mode: CPU\n'
                % (os.path.join(ctx["dir"], "solver_net.prototxt"),
                   os.path.join(out_dir, "snap")))
    s = caffe.SGDSolver(solver_file)
    out = {"iter0": s.iter, "n_test": len(s.test_nets),
           "net_type": type(s.net).__name__,
           "net_blobs": list(s.net.blobs), "test_blobs": list(s.test_nets[0].blobs)}
    set_params(s.net, 27)
    out["test_shares"] = bool(np.array_equal(s.test_nets[0].params["ip"][0].data,
                                             s.net.params["ip"][0].data))
    s.step(2)
    out["iter2"] = s.iter
    out["after2"] = [b.data.copy() for b in s.net.params["ip"]]
    out["test_after2"] = [b.data.copy() for b in s.test_nets[0].params["ip"]]
    out["loss2"] = s.net.blobs["loss"].data.copy()
    s.snapshot()
    out["snapshot_files"] = sorted(f for f in os.listdir(out_dir) if f.startswith("snap"))
    s.step(1)
    after3 = [b.data.copy() for b in s.net.params["ip"]]
    s2 = caffe.SGDSolver(solver_file)
    s2.restore(os.path.join(out_dir, "snap_iter_2.solverstate"))
    out["restored_iter"] = s2.iter
    s2.step(1)
    out["resume_matches"] = [bool(np.allclose(a, b.data, rtol=1e-6, atol=1e-7))
                             for a, b in zip(after3, s2.net.params["ip"])]
    s2.solve()
    out["solved_iter"] = s2.iter
    out["solved"] = [b.data.copy() for b in s2.net.params["ip"]]
    out["attrs"] = sorted(n for n in ("net", "test_nets", "iter", "step", "solve",
                                      "snapshot", "restore", "apply_update",
                                      "share_weights", "add_callback", "lr", "param")
                          if hasattr(s, n))
    out["get_solver"] = type(caffe.get_solver(solver_file)).__name__
    return out


@case
def classifier(caffe, ctx):
    if stub_missing("skimage"):
        return "needs skimage"
    d, out_dir = ctx["dir"], ctx["out"]
    deploy = os.path.join(d, "classify.prototxt")
    net = caffe.Net(deploy, caffe.TEST)
    set_params(net, 28)
    weights = os.path.join(out_dir, "classify.caffemodel")
    net.save(weights)
    rs = np.random.RandomState(29)
    images = [rs.rand(6, 7, 3).astype(np.float32) for _ in range(3)]
    c = caffe.Classifier(deploy, weights, image_dims=(6, 6), mean=np.array([0.1, 0.2, 0.3]),
                         raw_scale=2.0, channel_swap=(2, 1, 0), input_scale=0.5)
    out = {"over": c.predict(images), "centre": c.predict(images, oversample=False),
           "crop_dims": c.crop_dims, "image_dims": c.image_dims}
    plain = caffe.Classifier(deploy, weights)
    out["plain_centre"] = plain.predict(images[:2], oversample=False)
    out["plain_dims"] = (plain.crop_dims, plain.image_dims)
    return out


def _detector(caffe, ctx, prototxt, seed, arrays=False, **kwargs):
    d, out_dir = ctx["dir"], ctx["out"]
    deploy = os.path.join(d, prototxt)
    net = caffe.Net(deploy, caffe.TEST)
    set_params(net, seed)
    weights = os.path.join(out_dir, prototxt + ".caffemodel")
    net.save(weights)
    det = caffe.Detector(deploy, weights, **kwargs)
    image = os.path.join(d, "big.png")
    windows = [(0, 0, 4, 4), (2, 3, 10, 9), (5, 1, 12, 10)]
    if arrays:
        windows = [np.array(w) for w in windows]
    found = det.detect_windows([(image, windows), (image, windows[:1])])
    return {"crop_dims": det.crop_dims,
            "found": [(f["filename"] == image, f["window"], f["prediction"]) for f in found]}


@case
def detector(caffe, ctx):
    if stub_missing("skimage"):
        return "needs skimage"
    return _detector(caffe, ctx, "classify.prototxt", 30, mean=np.array([0.5, 0.4, 0.3]),
                     raw_scale=255.0, channel_swap=(2, 1, 0))


@case
def detector_4d_output(caffe, ctx):
    if stub_missing("skimage"):
        return "needs skimage"
    return _detector(caffe, ctx, "conv_deploy.prototxt", 31)


@case
def detector_context_pad(caffe, ctx):
    if stub_missing("skimage"):
        return "needs skimage"
    return {"tuples": raised(_detector, caffe, ctx, "classify.prototxt", 32,
                             mean=np.array([0.5, 0.4, 0.3]), context_pad=1)[:2],
            "arrays": raised(_detector, caffe, ctx, "classify.prototxt", 32,
                             mean=np.array([0.5, 0.4, 0.3]), context_pad=1,
                             arrays=True)[:2]}


# caffe.draw ----------------------------------------------------------------------------
def graph_summary(graph):
    """A pydot graph as what its drawing shows: each node's text and style, each edge
    between node texts with its label."""
    def text(node):
        label = node.get("label")
        return (label if label is not None else node.get_name()).strip('"')

    nodes = {}
    for node in graph.get_nodes():
        if node.get_name() in ("node", "edge", "graph"):
            continue
        nodes[node.get_name().strip('"')] = node
    summary = sorted((text(n),) + tuple(str(n.get(a)).strip('"')
                                        for a in ("shape", "fillcolor", "style"))
                     for n in nodes.values())
    edges = sorted((text(nodes[e.get_source().strip('"')]),
                    text(nodes[e.get_destination().strip('"')]),
                    str(e.get("label")).strip('"')) for e in graph.get_edges())
    return {"nodes": summary, "edges": edges,
            "rankdir": str(graph.get("rankdir")).strip('"'),
            "name": graph.get_name().strip('"')}


@case
def draw_labels(caffe, ctx):
    import importlib
    try:
        draw = importlib.import_module(caffe.__name__ + ".draw")
    except ImportError as e:
        return "needs pydot: %s" % e
    from google.protobuf import text_format
    net = caffe.proto.caffe_pb2.NetParameter()
    text_format.Merge(open(os.path.join(ctx["dir"], "deploy.prototxt")).read(), net)
    out = {}
    for layer in net.layer:
        for rankdir in ("LR", "TB"):
            out["label_%s_%s" % (layer.name, rankdir)] = draw.get_layer_label(
                layer, rankdir)
        out["edge_" + layer.name] = draw.get_edge_label(layer)
        out["color_" + layer.name] = draw.choose_color_by_layertype(layer.type)
    out["pooling_types"] = draw.get_pooling_types_dict()
    return out


@case
def draw_graph(caffe, ctx):
    import importlib
    try:
        importlib.import_module("pydot")
        draw = importlib.import_module(caffe.__name__ + ".draw")
    except ImportError as e:
        return "needs pydot: %s" % e
    from google.protobuf import text_format
    out = {}
    for name in ("deploy.prototxt", "train.prototxt"):
        net = caffe.proto.caffe_pb2.NetParameter()
        text_format.Merge(open(os.path.join(ctx["dir"], name)).read(), net)
        out[name] = graph_summary(draw.get_pydot_graph(net, "TB"))
        out[name + "_test"] = graph_summary(draw.get_pydot_graph(
            net, "LR", label_edges=False, phase=caffe.TEST))
    return out


# texts the cases write themselves
CTX = {"shared_net": SHARED, "pylayer_net": PYLAYER_NET, "pylayer_module": PYLAYER_MODULE,
       "state_rules_net": STATE_RULES_NET, "input_dim_net": INPUT_DIM_NET,
       "loss_sum_net": LOSS_SUM_NET, "v1_permissive_net": V1_PERMISSIVE_NET,
       "need_backward_net": NEED_BACKWARD_NET, "halves_module": HALVES_MODULE}


# ----------------------------------------------------------------------------- oracle
ORACLE_MAIN = r'''
import sys, os, json, base64, traceback
site = os.environ.get("CAFFELITE_BVLC_PY39_SITE")
if site:
    sys.path.insert(0, site)
import numpy as np


def _fork_era_skimage():
    """skimage of the fork's time (<= 0.14): resize without anti-aliasing, and
    imread(as_grey=...)."""
    try:
        import skimage.transform, skimage.io
    except ImportError:
        return
    if not hasattr(skimage, "__version__"):
        return
    resize = skimage.transform.resize

    def old_resize(image, output_shape, **kwargs):
        kwargs.setdefault("anti_aliasing", False)
        return resize(image, output_shape, **kwargs)
    skimage.transform.resize = old_resize
    imread = skimage.io.imread

    def old_imread(fname, as_grey=False, plugin=None, **kwargs):
        return imread(fname, as_gray=as_grey, plugin=plugin, **kwargs)
    skimage.io.imread = old_imread


_fork_era_skimage()
import caffe
import caffe.io
caffe.set_mode_cpu()
ctx = json.loads(sys.argv[1])
results = {}
for name in sys.argv[3:]:
    try:
        results[name] = ["ok", encode(CASES[name](caffe, ctx))]
    except Exception as e:
        results[name] = ["raises", type(e).__name__, str(e)[:300],
                         traceback.format_exc()[-1500:]]
with open(sys.argv[2], "w") as f:
    json.dump(results, f)
'''


def _oracle_source():
    parts = ["import os", "import numpy as np", "import base64"]
    for fn in (encode, decode, raised, case):
        parts.append(inspect.getsource(fn))
    parts.append("CASES = {}")
    helpers = (set_params, stub_missing, _resize_variants, net_summary, net_structure,
               _detector, graph_summary, _write_net)
    parts += [inspect.getsource(fn) for fn in helpers]
    parts += [inspect.getsource(fn) for fn in CASES.values()]
    parts.append(ORACLE_MAIN)
    return "\n\n".join(textwrap.dedent(p) for p in parts)


def _run_oracle(ctx, names, folder):
    """Every case in one oracle process; where a failed CHECK aborts it, each case in a
    process of its own (an aborted case's result is ["aborted", stderr])."""
    script = os.path.join(folder, "oracle_cases.py")
    with open(script, "w") as f:
        f.write(_oracle_source())
    env = dict(os.environ)
    if SITE39:
        env["CAFFELITE_BVLC_PY39_SITE"] = SITE39

    def run(batch, out):
        proc = subprocess.run([PYCAFFE, script, json.dumps(ctx), out] + list(batch),
                              capture_output=True, text=True, timeout=300, env=env,
                              cwd=folder)
        if proc.returncode != 0 or not os.path.exists(out):
            return proc.stderr[-3000:]
        with open(out) as f:
            return {k: ([v[0], decode(v[1])] if v[0] == "ok" else v)
                    for k, v in json.load(f).items()}

    results = run(names, os.path.join(folder, "oracle_results.json"))
    if isinstance(results, dict):
        return results
    results = {}
    for name in names:
        one = run([name], os.path.join(folder, f"oracle_{name}.json"))
        results[name] = one[name] if isinstance(one, dict) else ["aborted", one]
    return results


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    """The shared input folder, and the oracle's result of every case."""
    shared = tmp_path_factory.mktemp("pycaffe_api_shared")
    for name, text in FILES.items():
        (shared / name).write_text(text)
    _write_images(str(shared))
    # a caffemodel written by caffelite, for the oracle to read
    net = caffe.Net(str(shared / "deploy.prototxt"), caffe.TEST)
    set_params(net, 40)
    net.save(str(shared / "caffelite.caffemodel"))
    theirs_dir = tmp_path_factory.mktemp("pycaffe_api_oracle")
    ctx = dict(CTX, dir=str(shared), out=str(theirs_dir),
               foreign_weights=str(shared / "caffelite.caffemodel"))
    theirs = _run_oracle(ctx, sorted(CASES), str(theirs_dir))
    return shared, theirs_dir, theirs, tmp_path_factory


def _ours(sides, name, **extra):
    shared, theirs_dir, _, factory = sides
    out = factory.mktemp("pycaffe_api_ours_" + name)
    ctx = dict(CTX, dir=str(shared), out=str(out))
    ctx.update(extra)
    with working_dir(out):
        return raised(CASES[name], caffe, ctx)


def _theirs(sides, name):
    result = sides[2][name]
    if result[0] == "aborted":
        pytest.fail(f"the oracle aborted in case {name}: {result[1]}")
    if result[0] != "ok":
        pytest.fail(f"the oracle raised in case {name}: {result[1]}: {result[2]}\n"
                    f"{result[3]}")
    value = result[1]
    if isinstance(value, str) and value.startswith("needs "):
        pytest.skip(f"the oracle {value} (no site39: see scripts/bvlc_caffe_oracle.py)")
    return value


def _mine(sides, name, **extra):
    result = _ours(sides, name, **extra)
    if result[0] != "ok":
        pytest.fail(f"caffelite raised in case {name}: {result[1]}: {result[2]}")
    return result[1]


def same(ours, theirs, path="", rtol=0.0, atol=0.0, problems=None):
    """Every difference between two results (dtype, shape, values, types, keys)."""
    problems = [] if problems is None else problems
    if isinstance(theirs, np.ndarray) or isinstance(ours, np.ndarray):
        if not (isinstance(ours, np.ndarray) and isinstance(theirs, np.ndarray)):
            problems.append(f"{path}: {type(ours).__name__} vs {type(theirs).__name__}")
        elif ours.dtype != theirs.dtype:
            problems.append(f"{path}: dtype {ours.dtype} vs {theirs.dtype}")
        elif ours.shape != theirs.shape:
            problems.append(f"{path}: shape {ours.shape} vs {theirs.shape}")
        elif ours.dtype.kind in "fc":
            if not np.allclose(ours, theirs, rtol=rtol, atol=atol, equal_nan=True):
                err = np.abs(ours.astype(np.float64) - theirs)
                i = np.unravel_index(np.argmax(err), err.shape)
                problems.append(f"{path}: values differ, max |diff| {err.max():.3g} at {i} "
                                f"({ours[i]!r} vs {theirs[i]!r})")
        elif not np.array_equal(ours, theirs):
            problems.append(f"{path}: values differ: {ours.ravel()[:8]} vs "
                            f"{theirs.ravel()[:8]}")
    elif isinstance(theirs, dict) and isinstance(ours, dict):
        if set(ours) != set(theirs):
            problems.append(f"{path}: keys {sorted(map(str, ours))} vs "
                            f"{sorted(map(str, theirs))}")
        for k in theirs:
            if k in ours:
                same(ours[k], theirs[k], f"{path}/{k}", rtol, atol, problems)
    elif isinstance(theirs, (list, tuple)) and isinstance(ours, (list, tuple)):
        if type(ours) is not type(theirs):
            problems.append(f"{path}: {type(ours).__name__} vs {type(theirs).__name__}")
        if len(ours) != len(theirs):
            problems.append(f"{path}: {len(ours)} items vs {len(theirs)}: {ours!r:.300} vs "
                            f"{theirs!r:.300}")
        else:
            for i, (a, b) in enumerate(zip(ours, theirs)):
                same(a, b, f"{path}[{i}]", rtol, atol, problems)
    elif isinstance(theirs, str) and isinstance(ours, str) and "\n" in theirs + ours:
        if ours != theirs:
            import difflib
            diff = difflib.unified_diff(theirs.splitlines(), ours.splitlines(),
                                        "BVLC", "caffelite", lineterm="", n=2)
            problems.append(f"{path}: texts differ:\n" + "\n".join(diff))
    elif isinstance(theirs, float) and isinstance(ours, float):
        if not np.isclose(ours, theirs, rtol=rtol, atol=atol, equal_nan=True):
            problems.append(f"{path}: {ours!r} vs {theirs!r}")
    else:
        if type(ours) is not type(theirs) or ours != theirs:
            problems.append(f"{path}: {ours!r:.500} vs {theirs!r:.500}")
    return problems


def assert_same(ours, theirs, rtol=0.0, atol=0.0):
    problems = same(ours, theirs, rtol=rtol, atol=atol)
    assert not problems, "caffelite vs BVLC pycaffe:\n" + "\n".join(problems[:40])


def compare(sides, name, rtol=0.0, atol=0.0, **extra):
    theirs = _theirs(sides, name)
    assert_same(_mine(sides, name, **extra), theirs, rtol, atol)


# ----------------------------------------------------------------------------- tests
# Where the two agree (arrays to float32 rounding where BLAS sums differ).
@pytest.mark.parametrize("name,rtol", [
    ("io_transformer_pipeline", 1e-6), ("io_transformer_each_setter", 1e-6),
    ("io_resize_constant", 0), ("io_oversample", 0), ("io_blobproto", 0),
    ("io_blobprotovector", 0), ("io_datum", 0), ("io_datum_label_none", 0),
    ("io_resize_zoom", 1e-6),
    ("io_resize_skimage_up", 1e-5), ("io_resize_skimage_down", 1e-5),
    ("io_resize_dims_forms", 1e-5), ("io_transformer_resizes", 1e-5),
    ("net_set_input_arrays", 1e-6), ("net_reshape", 1e-5), ("net_shared_params", 1e-5), ("python_layer", 1e-5),
    ("solver_api", 1e-5), ("classifier", 1e-5), ("detector", 1e-5)])
def test_same_as_bvlc(sides, name, rtol):
    compare(sides, name, rtol=rtol, atol=1e-6 if rtol else 0)


def test_transformer_errors_raise_where_pycaffe_raises(sides):
    """pycaffe raises a bare Exception for an unknown input or a wrong transpose or
    channel swap length; caffelite a ValueError (an Exception too), with its message."""
    theirs = _theirs(sides, "io_transformer_errors")
    ours = _mine(sides, "io_transformer_errors")
    assert set(ours) == set(theirs)
    for key, (kind, error) in theirs.items():
        assert kind == "raises" and ours[key][0] == "raises", key
        if error != "Exception":
            assert ours[key][1] == error, key


def test_transformer_leaves_the_callers_image_alone(sides):
    """README: io.py scales a float32 image of the blob's size in place (the fork's
    too); caffelite's preprocess never writes into the caller's image."""
    theirs = _theirs(sides, "io_transformer_in_place")["caller_image_after"]
    ours = _mine(sides, "io_transformer_in_place")["caller_image_after"]
    np.testing.assert_array_equal(theirs, np.full((2, 2, 3), 127.5, np.float32))
    np.testing.assert_array_equal(ours, np.full((2, 2, 3), 0.5, np.float32))


def test_elementwise_mean_of_another_size_is_refused_as_in_the_fork(sides):
    """FORK: the fork's set_mean refuses an elementwise mean whose H x W is not the
    input's ("Mean shape incompatible with input shape."); BVLC 1.0 resizes it."""
    theirs = _theirs(sides, "io_transformer_mean_other_size")
    ours = _mine(sides, "io_transformer_mean_other_size")
    if theirs["set"][0] == "raises":       # the stub skimage: 1.0 tried to resize
        assert theirs["set"][1] == "NotImplementedError"
    else:
        assert theirs["mean"].shape == (3, 4, 5)
    assert ours["set"] == ("raises", "ValueError") and ours["mean"] is None


def test_datum_label_defaults_to_0_as_in_the_fork(sides):
    """FORK (as caffelite documents it in tests/test_pycaffe_io.py): array_to_datum's
    label defaults to 0 and is always written; BVLC 1.0's defaults to None (no label
    field)."""
    theirs = _theirs(sides, "io_datum_default_label")
    ours = _mine(sides, "io_datum_default_label")
    assert theirs["has_label"] is False and ours["has_label"] is True
    assert ours["bytes"] == theirs["bytes"] + b"\x28\x00"     # label (field 5) = 0


def test_resize_image_of_a_2d_array(sides):
    """io.py hands an H x W array whose last axis is 1 or 3 to skimage, which resizes
    it as a gray image (H' x W', float32); other widths fail in scipy's zoom."""
    theirs = _theirs(sides, "io_resize_2d")
    ours = _mine(sides, "io_resize_2d")
    assert theirs["w5"][0] == "raises" and ours["w5"][0] == "raises"
    assert_same({k: ours[k] for k in ("w3", "w1")}, {k: theirs[k] for k in ("w3", "w1")},
                rtol=1e-5, atol=1e-6)


def test_resize_image_orders_2_and_3_use_scipy_splines(sides):
    """README: interp_order 2 or 3 uses scipy's splines, not skimage's kernels (which
    the oracle's skimage 0.18 still has, as the fork's time did); order 1, which the
    Transformer and the Classifier use, is the same (test_same_as_bvlc). The values of
    orders 2 and 3 are compared with skimage >= 0.19's in test_pycaffe_io."""
    theirs = _theirs(sides, "io_resize_high_order")
    ours = _mine(sides, "io_resize_high_order")
    for key in theirs:
        assert ours[key].shape == theirs[key].shape and ours[key].dtype == np.float32
        assert np.all(np.isfinite(ours[key])), key
        assert not np.allclose(ours[key], theirs[key], atol=1e-3), key


def test_load_image(sides):
    """load_image as pycaffe's (skimage imread + img_as_float).  FORK: with
    color=False an RGBA image becomes the luminance of its RGB (skimage of the fork's
    time took rgb[..., :3]); the oracle's skimage 0.18 blends it over white first."""
    theirs = _theirs(sides, "io_load_image")
    ours = _mine(sides, "io_load_image")
    rgba_gray = ours.pop("rgba_False")
    theirs.pop("rgba_False")
    assert_same(ours, theirs, rtol=1e-6, atol=1e-7)
    rgb = theirs["rgba_True"][1].astype(np.float64)    # alpha dropped by io.py itself
    expected = (rgb @ [0.2125, 0.7154, 0.0721]).astype(np.float32)[:, :, None]
    assert rgba_gray[0] == "ok"
    np.testing.assert_allclose(rgba_gray[1], expected, rtol=1e-6)


def _normalized_text(text):
    """A prototxt text with its numbers as float32 values (protobuf 3.12 prints a float
    field as its double, 0.009999999776482582, and 1 as 1.0; newer protobuf prints the
    shortest form that reads back)."""
    import re
    return re.sub(r"(?<=: )-?[0-9][0-9.e+-]*(?=\n)",
                  lambda m: repr(float(np.float32(float(m.group(0))))), text)


def _same_proto(ours, theirs):
    from google.protobuf import text_format
    a = caffe.proto.caffe_pb2.NetParameter()
    b = caffe.proto.caffe_pb2.NetParameter()
    text_format.Merge(ours, a)
    text_format.Merge(theirs, b)
    assert a == b
    assert_same(_normalized_text(ours), _normalized_text(theirs))


def test_net_spec_texts(sides):
    """to_proto() of the same NetSpec code: the same layers, names (automatic ones
    included), tops, parameters and order; the texts equal but for how each protobuf
    runtime prints floats."""
    theirs = _theirs(sides, "netspec_typical")
    _same_proto(_mine(sides, "netspec_typical"), theirs)
    theirs = _theirs(sides, "netspec_autonames")
    ours = _mine(sides, "netspec_autonames")
    assert ours["keys"] == theirs["keys"]
    for key in ("top", "fn", "mixed", "counters"):
        _same_proto(ours[key], theirs[key])


def test_net_spec_values(sides):
    """Parameter values as pycaffe's assign_proto takes them.  Kinder than pycaffe:
    caffelite also takes an enum value's name (pycaffe's protobuf refuses the string)
    and a tuple for a repeated field (pycaffe fails in protobuf's extend)."""
    theirs = _theirs(sides, "netspec_values")
    ours = _mine(sides, "netspec_values")
    for key in ("enum_name", "tuple"):
        assert theirs[key][:2] == ("raises", "TypeError"), key
        assert ours.pop(key)[0] == "ok", key
        theirs.pop(key)
    assert ours["enum_value"][0] == "ok"
    for key in ("repeated_scalar", "numpy_ints", "enum_value", "float_field",
                "bool_field", "layer_field"):
        assert ours[key][0] == theirs[key][0] == "ok", key
        _same_proto(ours.pop(key)[1], theirs.pop(key)[1])
    assert ours["unknown"][0] == theirs["unknown"][0] == "raises"
    assert ours.pop("unknown")[1] == theirs.pop("unknown")[1] == "AttributeError"
    assert_same(ours, theirs)


def _without_input_layer(summary):
    """BVLC 1.0 upgrades a prototxt's ``input:`` fields to an Input layer named "input";
    FORK: the fork keeps them as net inputs without a layer (README)."""
    summary = dict(summary)
    structure = summary["structure"] = dict(summary["structure"])
    for where in (summary, structure):
        for key in ("layer_names", "layers", "layer_dict", "top_names", "bottom_names",
                    "layer_types"):
            if key not in where or not isinstance(where[key], list):
                continue
            assert where[key][0] in ("input", "Input", ("input", "Input", 0),
                                     ("input", summary["inputs"]), ("input", []),
                                     ["input", summary["inputs"]], ["input", []]), key
            where[key] = where[key][1:]
    structure["layers"] -= 1
    return summary


def test_net_layout(sides):
    """blobs, params (order and shapes), inputs, outputs, layers, layer_dict,
    top/bottom names, blob_loss_weights and the Blob API, for a deploy net, a training
    net in TRAIN and TEST phase (splits, a two-top layer, loss weights) and a MemoryData
    net."""
    theirs = _theirs(sides, "net_layout")
    ours = _mine(sides, "net_layout")
    for name in ("deploy", "train", "test"):
        theirs[name] = _without_input_layer(theirs[name])
    assert_same(ours, theirs)


def test_forward_backward(sides):
    """forward/backward with kwargs, blobs=, diffs=, start= and end=, and their errors.
    FORK: backward(end=L) returns the blob named L (the fork's ``[end] + diffs``) besides
    BVLC 1.0's bottoms of L, which caffelite gives too."""
    theirs = _theirs(sides, "net_forward_backward")
    ours = _mine(sides, "net_forward_backward")
    assert ours.pop("bwd_start_end") == ["conv", "pool"]
    assert theirs.pop("bwd_start_end") == ["conv"]
    for key in ("fwd_bad_kw", "fwd_bad_batch", "fwd_bad_start", "bwd_bad_kw"):
        # pycaffe raises Exception (ValueError for an unknown layer); caffelite NetError,
        # a ValueError
        assert ours[key][0] == theirs[key][0] == "raises", key
        assert theirs[key][1] in ("Exception", "ValueError"), key
        assert issubclass(getattr(caffe.net, ours[key][1]), ValueError), key
        del ours[key], theirs[key]
    assert_same(ours, theirs, rtol=1e-5, atol=1e-6)


def test_forward_all_and_forward_backward_all(sides):
    """Batches with the last one zero-padded, padding dropped from every result.
    (pycaffe's own _batch pads with float64 zeros; caffelite keeps the arrays' dtype:
    the net receives the same values.)"""
    theirs = _theirs(sides, "net_forward_all")
    ours = _mine(sides, "net_forward_all")
    assert [b["data"].dtype for b in theirs["batch"]] == [np.float32, np.float64]
    for mine, their in zip(ours.pop("batch"), theirs.pop("batch")):
        np.testing.assert_array_equal(mine["data"], their["data"])
    assert_same(ours, theirs, rtol=1e-5, atol=1e-6)


def test_forward_all_and_set_input_arrays_kinder_than_pycaffe(sides):
    """README: forward_all() without arrays runs one pass (pycaffe: RuntimeError from
    its generator); set_input_arrays converts float64 or non-contiguous arrays (pycaffe
    refuses them).  Also kinder: forward_all over a net whose outputs are scalar losses
    (pycaffe's extend of a 0-d array is a TypeError)."""
    theirs = _theirs(sides, "net_forward_all_edges")
    ours = _mine(sides, "net_forward_all_edges")
    assert theirs == {"no_arrays": ("raises", "RuntimeError"),
                      "scalar_outputs": ("raises", "TypeError"),
                      "f64_arrays": ("raises", "RuntimeError"),
                      "strided": ("raises", "RuntimeError")}
    assert ours["no_arrays"] == ("ok", ["prob"])
    assert ours["scalar_outputs"][0] == ours["f64_arrays"][0] == ours["strided"][0] == "ok"


def test_net_constructors_save_and_copy_from(sides):
    """Net(file, phase, weights=), Net(file, weights, phase), level/stages, save and
    copy_from.  Kinder than pycaffe: Net(file) without a phase is a TEST net (pycaffe:
    Boost.Python ArgumentError)."""
    theirs = _theirs(sides, "net_constructors_and_weights")
    ours = _mine(sides, "net_constructors_and_weights")
    assert theirs.pop("no_phase") == ("raises", "ArgumentError")
    assert ours.pop("no_phase")[0] == "ok"
    assert_same(ours, theirs)


def test_each_side_reads_the_others_caffemodel(sides):
    theirs = _theirs(sides, "net_read_other_sides_weights")
    net = caffe.Net(str(sides[0] / "deploy.prototxt"), caffe.TEST)
    set_params(net, 40)
    assert_same(theirs, {k: [b.data.copy() for b in v] for k, v in net.params.items()})
    theirs_file = str(sides[1] / "tiny.caffemodel")
    ours = _mine(sides, "net_read_other_sides_weights", foreign_weights=theirs_file)
    assert_same(ours, _theirs(sides, "net_constructors_and_weights")["saved"])


def test_module_surface(sides):
    """The names of pycaffe's caffe module; README: NCCL is not there."""
    theirs = _theirs(sides, "api_presence")
    ours = _mine(sides, "api_presence")
    theirs["present"].remove("NCCL")
    assert_same(ours, theirs)


def test_detector_keeps_4d_outputs_as_pycaffe(sides):
    """An N x C x 1 x 1 output gives C x 1 x 1 predictions, unsqueezed: pycaffe's
    Detector lost its ``squeeze(axis=(2, 3))`` with N-D blobs (BVLC, 2015), when
    InnerProduct outputs became N x C, before the fork."""
    theirs = _theirs(sides, "detector_4d_output")
    ours = _mine(sides, "detector_4d_output")
    for found in theirs["found"]:
        assert found[2].shape == (3, 1, 1)
    assert_same(ours, theirs, rtol=1e-5, atol=1e-6)


def test_detector_context_pad(sides):
    """BVLC 1.0's Detector with context_pad fails under Python 3 (window.copy() on a
    tuple; float slice indices for arrays); the fork's ran under Python 2.  caffelite
    crops as the fork did."""
    theirs = _theirs(sides, "detector_context_pad")
    ours = _mine(sides, "detector_context_pad")
    assert theirs == {"tuples": ("raises", "AttributeError"),
                      "arrays": ("raises", "TypeError")}
    for key in ("tuples", "arrays"):
        assert ours[key][0] == "ok"
        assert [f[2].shape for f in ours[key][1]["found"]] == [(3,)] * 4


def _draw_label_forms(label):
    """BVLC 1.0's pooling label "(Pooling MAX)" and the fork's "(MAX Pooling)"."""
    return {label, label.replace("(Pooling MAX)", "(MAX Pooling)")}


def test_draw_labels(sides):
    """get_layer_label, get_edge_label, choose_color_by_layertype and
    get_pooling_types_dict as pycaffe's (the fork's label for pooling is
    "(MAX Pooling)", BVLC 1.0's "(Pooling MAX)"; either is accepted)."""
    theirs = _theirs(sides, "draw_labels")
    ours = _mine(sides, "draw_labels")
    problems = []
    for key, value in theirs.items():
        if key.startswith("label_"):
            if ours[key] not in _draw_label_forms(value):
                problems.append(f"{key}: {ours[key]!r} vs {value!r}")
        else:
            problems += same(ours[key], value, key)
    assert not problems, "caffelite vs BVLC pycaffe:\n" + "\n".join(problems)


def test_draw_graph(sides):
    """get_pydot_graph as a drawing shows it: node texts and styles, edges and their
    labels (an absent label and pycaffe's '""' both draw nothing)."""
    theirs = _theirs(sides, "draw_graph")
    ours = _mine(sides, "draw_graph")
    if isinstance(ours, str):
        pytest.skip(f"caffelite {ours}")

    def normal(summary):
        summary = dict(summary)
        summary["edges"] = sorted((a, b, "" if c in ("None", '""') else c)
                                  for a, b, c in summary["edges"])
        return summary

    for key, summary in theirs.items():
        summary = normal(summary)
        mine = normal(ours[key])
        if str(mine) != str(summary).replace("(Pooling MAX)", "(MAX Pooling)"):
            assert_same(mine, summary)


def _drop_input_layer(names):
    """BVLC 1.0's "input" layer (the upgraded ``input:`` fields; FORK: none)."""
    assert names[0] == "input", names
    return names[1:]


def test_state_rules_keep_the_layers_bvlc_keeps(sides):
    """Net::StateMeetsRule: ``level > max_level`` and ``level < min_level`` fail a rule,
    so a level equal to either bound meets it; a rule's stages must all be in the
    state, for include and exclude rules alike."""
    theirs = {k: _drop_input_layer(v) for k, v in _theirs(sides, "net_state_rules").items()}
    ours = _mine(sides, "net_state_rules")
    for key, names in theirs.items():
        level, stages = int(key.split(":")[0]), set(key.split(":")[1].split(",")) - {""}
        expected = [name for name, kept in (
            ("max2", level <= 2), ("max1", level <= 1), ("min2", level >= 2),
            ("min3", level >= 3), ("in_ab", {"a", "b"} <= stages),
            ("ex_ab", not {"a", "b"} <= stages)) if kept]
        assert names == expected, key
    assert_same(ours, theirs)


def test_two_inputs_take_four_input_dims_each(sides):
    """Net::Init (the fork's AppendTop for layer -1; BVLC 1.0's UpgradeNetInput): input
    i is shaped by input_dim(4i) .. input_dim(4i + 3)."""
    theirs = _theirs(sides, "net_input_dim_inputs")
    ours = _mine(sides, "net_input_dim_inputs")
    assert theirs["shapes"] == [("x", (2, 3, 4, 5)), ("y", (2, 1, 1, 1)), ("fx", (2, 60)),
                                ("fy", (2, 1)), ("cat", (2, 61))]
    assert_same(ours, theirs)


def test_net_loss_adds_each_layers_summed_tops(sides):
    """Layer::Forward sums its own tops' weighted losses (in Dtype), then
    Net::ForwardFromTo adds that layer loss: 1 + (2^-24 + 2^-24) = 1 + 2^-23 in float32,
    where adding the tops one at a time to the net's loss would give 1 (ties to even)."""
    theirs = _theirs(sides, "net_loss_sum")
    ours = _mine(sides, "net_loss_sum")
    expected = np.float32(1) + (np.float32(2.0 ** -24) + np.float32(2.0 ** -24))
    assert expected == np.float32(1 + 2.0 ** -23)
    assert theirs["loss"] == float(expected)
    assert_same(ours, theirs)


def test_v1_blob_share_mode_permissive_shares_weights_of_another_shape(sides):
    """UpgradeV1LayerParameter moves blob_share_mode to each ParamSpec's share_mode;
    Net::AppendParam then checks only the counts (12 = 2x6 = 3x4) of PERMISSIVE
    sharers, and the sharer reads the owner's values in its own shape."""
    theirs = _theirs(sides, "net_v1_permissive_sharing")
    ours = _mine(sides, "net_v1_permissive_sharing")
    assert isinstance(theirs, dict), theirs
    assert theirs["params"] == [("ip1", [(2, 6)]), ("ip2", [(3, 4)])]
    np.testing.assert_array_equal(
        theirs["ip2_weights"], (np.arange(12, dtype=np.float32).reshape(3, 4) - 5) / 8)
    assert_same(ours, theirs, rtol=1e-6, atol=1e-6)


def test_a_layer_whose_tops_all_skip_backward_is_not_run_backward(sides):
    """Net::Init's pass from the last layer: the Sigmoid reaches no loss, so its bottom
    "b" skips backward; the loss does not propagate down to "a"; the two-top Python
    layer (and the InnerProduct below it) then need no backward: pycaffe never calls
    the Python layer's backward."""
    theirs = _theirs(sides, "net_need_backward")
    ours = _mine(sides, "net_need_backward")
    assert theirs["calls"] == []
    assert not np.any(theirs["ip_diff"])
    assert_same(ours, theirs)
