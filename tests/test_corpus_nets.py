"""Every released DeepLab net of the corpus builds and runs, TRAIN and TEST.

The nets read images with ``ImageSegData``; here that layer is replaced by an
``Input`` layer with the same tops and the shapes the layer would give (data
N×3×crop×crop, label N×1×crop×crop, data_dim N×1×1×2), ``MatWrite`` writes to a
temporary directory, and the weights are random (He-normal convolutions, identity
BatchNorm statistics).  Small crops keep CI fast; they keep the nets' arithmetic
valid: the ×8 label Interp (``label_shrink``) subsamples labels exactly only for
crops 8k+1 (16k+1 for ResNet's ``label_shrink16``), and the V1 DeepLab net first
crops one pixel (``pad_beg: -1``), so it wants 8k+2.  Labels look like an image's
(background plus two classes, some 255), as UniqueLabel's max_labels requires.

The acceptance cases run the ASPP-VGG and ResNet-101 MSC test nets at the real test
size 513×513 and check the blob sizes of spec section 21.  Values are checked
against OpenCV's Caffe importer on the nets OpenCV can run (it has no Interp
``shrink_factor``, so not the MSC pyramid).
"""
import os
import re

import numpy as np
import pytest
from google.protobuf import text_format

import caffelite as caffe
import caffelite.layers  # noqa: F401  (registers every layer type)
from caffelite.io import prototxt
from caffelite.io.caffemodel import write_caffemodel
from caffelite.io.matfile import read_mat
from caffelite.net import NetError, filter_net
from caffelite.proto import caffe_pb2
from conftest import CORPUS, corpus_path

TRAIN, TEST = caffe.TRAIN, caffe.TEST
EXP = "voc12"   # ${EXP} is part of blob names (fc8_${EXP}), so no slashes

# (config, phase, crop): every net prototxt of corpus/prototxt, in each phase it has
# a data layer for.
CASES = [
    ("deeplab_v1/train.prototxt", TRAIN, 66),
    ("deeplab_v1/train.prototxt", TEST, 66),
    ("deeplab_v1/test.prototxt", TEST, 66),
    ("deeplab_v1_largefov/train.prototxt", TRAIN, 65),
    ("deeplab_v1_largefov/test.prototxt", TEST, 65),
    ("deeplab_v1_msc/train.prototxt", TRAIN, 65),
    ("deeplab_v1_msc/test.prototxt", TEST, 65),
    ("deeplab_v1_msc_largefov/train.prototxt", TRAIN, 65),
    ("deeplab_v1_msc_largefov/test.prototxt", TEST, 65),
    ("deeplab_v1_weak_em_adapt/train.prototxt", TRAIN, 65),
    ("deeplabv2_vgg16_aspp_l/train.prototxt", TRAIN, 65),
    ("deeplabv2_vgg16_aspp_l/test.prototxt", TEST, 65),
    ("deeplabv2_resnet101_msc/train.prototxt", TRAIN, 65),
    ("deeplabv2_resnet101_msc/test.prototxt", TEST, 65),
    ("deeplabv2_resnet101_deploy/deploy.prototxt", TEST, 65),
]


def case_id(case):
    config, phase, crop = case
    return f"{config.replace('/', ':')}-{'TRAIN' if phase == TRAIN else 'TEST'}-{crop}"


# ---------------------------------------------------------------------- helpers
def corpus_defines(path, tmp):
    names = set(re.findall(r"\$\{(\w+)\}", open(path).read()))
    defines = {n: str(tmp / n.lower()) for n in names}
    defines.update(NUM_LABELS="21", EXP=EXP, NET_ID="deeplab")
    return defines


def read_config(config, tmp):
    path = corpus_path("prototxt", *config.split("/"))
    param, _ = prototxt.read_net(path, corpus_defines(path, tmp))
    return param


def with_inputs(param, crop, phase, tmp, batch=None):
    """The net with ImageSegData -> Input (same tops) and MatWrite into ``tmp``.

    Returns (NetParameter, {input blob: shape})."""
    ids = tmp / "ids.txt"
    ids.write_text("2007_000033\n")
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    out.ClearField("layer")
    shapes = {}
    for layer in param.layer:
        new = out.layer.add()
        new.CopyFrom(layer)
        if layer.type == "ImageSegData":
            n = batch or (min(layer.image_data_param.batch_size, 2) if phase == TRAIN else 1)
            assert layer.transform_param.crop_size > 0, layer.name
            new.type = "Input"
            for field in ("transform_param", "image_data_param"):
                new.ClearField(field)
            for top, shape in zip(layer.top, ([n, 3, crop, crop], [n, 1, crop, crop],
                                              [n, 1, 1, 2])):
                new.input_param.shape.add().dim.extend(shape)
                if any(r.phase == phase for r in layer.include) or not len(layer.include):
                    shapes[top] = tuple(shape)
        elif layer.type == "MatWrite":
            new.mat_write_param.prefix = str(tmp / f"{layer.name}_")
            new.mat_write_param.source = str(ids)
    return out, shapes


def randomize(net, seed=0, random_bn=False):
    """He-normal convolutions (std sqrt(2/fan_in)), small biases.

    BatchNorm: mean 0, variance 1, scale factor 1 (or random statistics with a random
    factor when ``random_bn``).  Scale: gamma 1 and beta 0, except on the last conv of
    each residual branch (``*branch2c*``), where gamma 0.2 keeps the 33 residual sums
    of ResNet-101 from doubling the variance at each block."""
    rng = np.random.default_rng(seed)
    for name, blobs in net.params.items():
        kind = net.layer_dict[name].type
        if kind in ("Convolution", "Deconvolution", "InnerProduct"):
            w = blobs[0].data
            w[...] = rng.standard_normal(w.shape, np.float32) * np.float32(np.sqrt(2 / w[0].size))
            if len(blobs) > 1:
                blobs[1].data[...] = rng.normal(0, 0.01, blobs[1].shape)
        elif kind == "BatchNorm":
            c = blobs[0].shape[0]
            if random_bn:
                factor = np.float32(rng.uniform(0.5, 2))
                blobs[0].data[...] = rng.normal(0, 0.1, c) * factor
                blobs[1].data[...] = rng.uniform(0.5, 2, c) * factor
                blobs[2].data[...] = factor
            else:
                blobs[0].data[...] = 0
                blobs[1].data[...] = 1
                blobs[2].data[...] = 1
        elif kind == "Scale":
            gamma = 0.2 if "branch2c" in name else 1.0
            jitter = rng.uniform(0.8, 1.2, blobs[0].shape) if random_bn else 1.0
            blobs[0].data[...] = gamma * jitter
            if len(blobs) > 1:
                blobs[1].data[...] = rng.normal(0, 0.1, blobs[1].shape) if random_bn else 0


def fill_inputs(net, shapes, seed=1):
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        blob = net.blobs[name]
        assert blob.shape == shape, (name, blob.shape, shape)
        if name == "data":
            blob.data[...] = rng.normal(0, 50, shape)       # mean-subtracted BGR pixels
        elif name == "data_dim":
            blob.data[...] = net.blobs["data"].shape[2:]    # (height, width)
        else:           # labels like an image's: background + 2 classes, some 255
            for n in range(shape[0]):
                classes = np.array([0, *rng.choice(np.arange(1, 21), 2, replace=False)])
                labels = classes[rng.integers(0, 3, shape[1:])]
                labels[rng.random(shape[1:]) < 0.1] = 255
                blob.data[n] = labels


def build(config, phase, crop, tmp, batch=None, random_bn=False):
    param, shapes = with_inputs(read_config(config, tmp), crop, phase, tmp, batch)
    caffe.set_random_seed(5)
    net = caffe.Net(param=param, phase=phase)
    randomize(net, random_bn=random_bn)
    fill_inputs(net, shapes)
    return net, param


def assert_all_finite(net):
    bad = [n for n, b in net.blobs.items() if not np.all(np.isfinite(b.data))]
    assert not bad, f"non-finite values in blobs {bad[:5]}"


def spatial(net, name):
    return tuple(net.blobs[name].shape[2:])


# ---------------------------------------------------------------------- every net
def test_cases_cover_the_corpus():
    root = os.path.join(CORPUS, "prototxt")
    if not os.path.isdir(root):
        pytest.skip("corpus/prototxt not available")
    nets = {f"{d}/{f}" for d in os.listdir(root) for f in os.listdir(os.path.join(root, d))
            if f.endswith(".prototxt") and not f.startswith("solver")}
    assert nets == {c[0] for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_corpus_net_runs(case, tmp_path):
    """One forward (and backward in TRAIN)."""
    config, phase, crop = case
    net, _ = build(config, phase, crop, tmp_path)
    loss = net.forward_from_to()
    assert np.isfinite(loss)
    assert_all_finite(net)
    for name, blob in net.blobs.items():
        if name.startswith("label_shrink"):            # exact subsampling: integer labels
            assert np.array_equal(blob.data, np.round(blob.data)), name
    losses = [n for n, w in net.blob_loss_weights.items() if w]
    if phase == TRAIN:
        assert losses and loss > 0
        check_backward(net)
    if config == "deeplab_v1/test.prototxt":       # V1 PADDING: a crop by 7 and 8
        np.testing.assert_array_equal(net.blobs["fc8_crop"].data,
                                      net.blobs["fc8_interp"].data[:, :, 7:-8, 7:-8])
    for lp in net.layer_params:
        if lp.type == "MatWrite":
            out, _ = read_mat(f"{lp.mat_write_param.prefix}2007_000033_blob_0.mat")
            np.testing.assert_array_equal(out, net.blobs[lp.bottom[0]].data)


def check_backward(net):
    """Learnable params get finite, non-zero gradients; frozen ones (lr_mult 0,
    BatchNorm statistics) get none."""
    net.clear_param_diffs()
    net.backward_from_to()
    learnt = 0
    for name, layer, needed in zip(net._layer_names, net.layers, net.layer_need_backward):
        for j, (blob, propagate) in enumerate(zip(layer.blobs, layer.param_propagate_down)):
            diff = blob.diff
            assert np.all(np.isfinite(diff)), f"{name} param {j}"
            if propagate and needed and j == 0 and layer.type == "Convolution":
                assert np.abs(diff).max() > 0, f"{name}: zero weight gradient"
                learnt += 1
            elif not propagate and not _shared_with_learnt(net, blob):
                assert not np.any(diff), f"{name} param {j} is frozen but has a gradient"
    assert learnt > 0


def _shared_with_learnt(net, blob):
    return any(p.blob is not blob and np.shares_memory(p.blob.diff, blob.diff)
               for p in net.learnable_params)


NO_DATA = sorted({(c, 1 - ph) for c, ph, _ in CASES if "deploy" not in c}
                 - {(c, ph) for c, ph, _ in CASES})


@pytest.mark.parametrize("config, phase", NO_DATA,
                         ids=[f"{c}-{'TRAIN' if p == TRAIN else 'TEST'}" for c, p in NO_DATA])
def test_phase_without_data_layer_fails_clearly(config, phase, tmp_path):
    """A train-only (or test-only) file in the other phase has no data layer."""
    param, _ = with_inputs(read_config(config, tmp_path), 65, phase, tmp_path)
    with pytest.raises(NetError, match=r"Unknown bottom blob 'data'"):
        caffe.Net(param=param, phase=phase)


# ---------------------------------------------------------------------- OpenCV
def opencv_text(param, phase):
    """The phase-filtered net without the layers OpenCV lacks (MatWrite, Silence,
    SegAccuracy) and with only the ``data`` input."""
    state = caffe_pb2.NetState(phase=phase)
    net = filter_net(param, state)
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    out.ClearField("layer")
    for layer in net.layer:
        if layer.type in ("MatWrite", "Silence", "SegAccuracy"):
            continue
        new = out.layer.add()
        new.CopyFrom(layer)
        new.ClearField("include")
        new.ClearField("exclude")
        if layer.type == "Input":
            del new.top[1:]
            del new.input_param.shape[1:]
    return text_format.MessageToString(out)


@pytest.mark.parametrize("config, outputs", [
    ("deeplabv2_vgg16_aspp_l/test.prototxt", ["pool5", f"fc8_{EXP}", "fc8_interp"]),
    ("deeplab_v1_largefov/test.prototxt", ["fc8_interp"]),
    ("deeplabv2_resnet101_deploy/deploy.prototxt", ["res3a_relu", f"fc1_{EXP}"]),
])
def test_small_net_matches_opencv(config, outputs, tmp_path):
    """Whole nets with random weights (and random BatchNorm statistics with a scale
    factor != 1) against cv2.dnn at 65×65.  Blobs overwritten by in-place layers are
    compared through the in-place layer's name (OpenCV keeps them apart)."""
    cv2 = pytest.importorskip("cv2")
    net, param = build(config, TEST, 65, tmp_path, random_bn=True)
    net.forward()
    (tmp_path / "cv.prototxt").write_text(opencv_text(param, TEST))
    write_caffemodel(str(tmp_path / "w.caffemodel"), net.to_weights())
    cvnet = cv2.dnn.readNetFromCaffe(str(tmp_path / "cv.prototxt"),
                                     str(tmp_path / "w.caffemodel"))
    cvnet.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cvnet.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    cvnet.setInput(np.ascontiguousarray(net.blobs["data"].data))
    for name, ref in zip(outputs, cvnet.forward(outputs)):
        blob = net.top_names[name][0] if name in net.top_names else name
        got = net.blobs[blob].data
        scale = float(np.abs(ref).max())
        assert got.shape == ref.shape, name
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * scale, err_msg=name)


# ---------------------------------------------------------------------- 513×513
@pytest.mark.slow
def test_aspp_vgg_test_net_at_513(tmp_path):
    net, _ = build("deeplabv2_vgg16_aspp_l/test.prototxt", TEST, 513, tmp_path)
    net.forward()
    expected = {"data": 513, "conv1_2": 513, "pool1": 257, "pool2": 129, "pool3": 65,
                "pool4": 65, "pool5": 65, f"fc8_{EXP}": 65, "fc8_interp": 513}
    for i in range(1, 5):
        expected[f"fc6_{i}"] = expected[f"fc8_{EXP}_{i}"] = 65
    for name, size in expected.items():
        assert spatial(net, name) == (size, size), name
    assert net.blobs["fc8_interp"].shape == (1, 21, 513, 513)
    assert_all_finite(net)
    assert np.abs(net.blobs["fc8_interp"].data).max() > 0


@pytest.mark.slow
def test_resnet101_msc_test_net_at_513(tmp_path):
    net, _ = build("deeplabv2_resnet101_msc/test.prototxt", TEST, 513, tmp_path)
    net.forward()
    expected = {
        # resolution 1
        "data": 513, "conv1": 257, "pool1": 129, "res3a": 65, "res5c": 65,
        f"fc1_{EXP}": 65,
        # 0.75: 513 -> 385 -> 193 -> 97 -> 49 -> 65
        "data_res075": 385, "conv1_res075": 193, "pool1_res075": 97, "res3a_res075": 49,
        "res5c_res075": 49, f"fc1_{EXP}_res075": 49, f"fc1_{EXP}_res075_interp": 65,
        # 0.5: 513 -> 257 -> 129 -> 65 -> 33 -> 65
        "data_res05": 257, "conv1_res05": 129, "pool1_res05": 65, "res3a_res05": 33,
        "res5c_res05": 33, f"fc1_{EXP}_res05": 33, f"fc1_{EXP}_res05_interp": 65,
        # fusion (Eltwise MAX) and the ×8 score map
        "fc_fusion": 65, "fc1_interp": 513,
    }
    for name, size in expected.items():
        assert spatial(net, name) == (size, size), name
    assert net.blobs["res5c"].shape[1] == 2048
    assert net.blobs["fc1_interp"].shape == (1, 21, 513, 513)
    assert_all_finite(net)
    fusion = net.blobs["fc_fusion"].data
    parts = [net.blobs[b].data for b in (f"fc1_{EXP}", f"fc1_{EXP}_res075_interp",
                                         f"fc1_{EXP}_res05_interp")]
    np.testing.assert_array_equal(fusion, np.maximum(np.maximum(parts[0], parts[1]), parts[2]))
    assert 1 < np.abs(fusion).max() < 1e6        # neither vanished nor exploded
