"""Whole-model acceptance: real released Caffe models against OpenCV's outputs.

Each folder of ``corpus/models`` holds a prototxt, a trained caffemodel, one input
(``input.npy``) and the outputs OpenCV's Caffe importer computed for it
(``output_<blob>.npy``; see ``SOURCES.md`` and ``manifest.json`` there).  caffelite
loads the pair, reshapes its input blob to the ``.npy`` shape, runs a TEST forward
and must agree with every stored output to 1e-4 relative to the output's largest
magnitude (OpenCV fuses Conv+BatchNorm+Scale+ReLU, so bitwise equality is not
expected).
"""
import json
import logging
import os

import numpy as np
import pytest

import caffelite as caffe
import caffelite.layers  # noqa: F401  (registers every layer type)
from caffelite.io import prototxt
from caffelite.layer import LAYER_REGISTRY
from conftest import CORPUS, corpus_path

MODELS = os.path.join(CORPUS, "models")
REQUIRED = ["enet_cityscapes_nnie", "resnet20_cifar10", "yoloface_50k", "fsrcnn_x3",
            "cifar10_quick_v1", "cifar10_full_v1"]
OPTIONAL = ["ultraface_rfb320", "yufacedetectnet_v1"]   # need the SSD-fork layer types
RTOL = 1e-4


def _manifest():
    with open(corpus_path("models", "manifest.json")) as f:
        return {m["name"]: m for m in json.load(f)["models"]}


def model_info(name):
    info = _manifest().get(name)
    if info is None:
        pytest.skip(f"model '{name}' is not in corpus/models/manifest.json")
    return info


def model_file(info, key):
    return corpus_path("models", info["name"], info[key])


def net_param(info):
    return prototxt.read_net(model_file(info, "prototxt"))[0]


def missing_types(info):
    param = net_param(info)
    return sorted({l.type for l in param.layer if l.type not in LAYER_REGISTRY})


def load_net(info, weights=None):
    missing = missing_types(info)
    if missing and info["name"] in OPTIONAL:
        pytest.skip(f"{info['name']} needs layer types not implemented: {', '.join(missing)}")
    weights = weights or model_file(info, "caffemodel")
    return caffe.Net(model_file(info, "prototxt"), caffe.TEST, weights=weights)


def forward(net, x):
    assert len(net.inputs) == 1, net.inputs
    blob = net.blobs[net.inputs[0]]
    blob.reshape(*x.shape)
    blob.data[...] = x
    net.forward()


def reference_outputs(info):
    return {o["blob"]: np.load(corpus_path("models", info["name"], o["file"]))
            for o in info["outputs"]}


def assert_matches(got, ref, what):
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, OpenCV has {ref.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    scale = float(np.abs(ref).max())
    rel = float(np.abs(got.astype(np.float64) - ref).max()) / scale
    assert rel <= RTOL, f"{what}: max |diff| / max |ref| = {rel:.3g} > {RTOL}"
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=RTOL * scale, err_msg=what)


def compare_model(net, info):
    forward(net, np.load(model_file(info, "input_file")))
    for blob, ref in reference_outputs(info).items():
        got = net.blobs[blob].data
        if blob == "detection_out":
            got, ref = detections(got), detections(ref)
        assert_matches(got, ref, f"{info['name']}:{blob}")


def detections(out):
    """SSD DetectionOutput rows (image, label, conf, box) with conf > 0, sorted.

    OpenCV zero-fills up to keep_top_k rows while Caffe emits only the kept ones, and
    NMS may order equal scores differently, so compare the set of real rows."""
    rows = out.reshape(-1, 7)
    rows = rows[rows[:, 2] > 0]
    return rows[np.lexsort((-rows[:, 2], rows[:, 1]))]


# ---------------------------------------------------------------------- the models
@pytest.mark.parametrize("name", REQUIRED)
def test_model_matches_opencv(name):
    info = model_info(name)
    compare_model(load_net(info), info)


@pytest.mark.parametrize("name", OPTIONAL)
def test_ssd_model_matches_opencv(name):
    info = model_info(name)
    compare_model(load_net(info), info)


def test_every_corpus_model_is_covered():
    assert sorted(_manifest()) == sorted(REQUIRED + OPTIONAL)


def test_enet_batchnorm_params_are_upgraded_as_bvlc_reads_them(caplog):
    """ENet's three BatchNorm layers give their statistics ``param { lr_mult: 1 }``
    (a Caffe from before they were masked). The fork refuses that at setup; BVLC's
    UpgradeNetBatchNorm, run when a net is read, sets lr_mult and decay_mult to 0 on
    layers with three specs, and so does caffelite for the nets the fork refuses."""
    info = model_info("enet_cityscapes_nnie")
    with caplog.at_level(logging.INFO, logger="caffelite"):
        net = caffe.Net(model_file(info, "prototxt"), caffe.TEST)
    assert "Attempting to upgrade batch norm layers using deprecated params" in caplog.text
    layer = net.layer_dict["bn0_1"]
    assert [(s.lr_mult, s.decay_mult) for s in layer.layer_param.param] == [(0, 0)] * 3


def test_enet_ignores_caffemodel_layers_missing_from_prototxt():
    """The ENet caffemodel has 83 BN and 27 Python layers the prototxt dropped."""
    from caffelite.io.caffemodel import read_caffemodel
    info = model_info("enet_cityscapes_nnie")
    stored = {l.name for l in read_caffemodel(model_file(info, "caffemodel"))}
    net = load_net(info)
    extra = stored - set(net._layer_names)
    assert len(extra) >= 83 + 27
    assert "conv2_3_1_a" in net.params      # the asymmetric 5x1 conv was loaded
    assert net.params["conv2_3_1_a"][0].shape[2:] == (5, 1)


@pytest.mark.slow
def test_enet_full_resolution_argmax():
    """512x1024 forward: argmax agrees with OpenCV's on >= 99.9% of pixels (ties)."""
    info = model_info("enet_cityscapes_nnie")
    extra = info["extra_check"]
    x = np.load(corpus_path("models", info["name"], extra["input"].split()[0]))
    ref = np.load(corpus_path("models", info["name"], extra["output"].split()[0]))
    net = load_net(info)
    forward(net, x.astype(np.float32))
    scores = net.blobs["deconv6_0_0"].data
    assert scores.shape == (1, 33) + ref.shape
    assert np.all(np.isfinite(scores))
    agree = float(np.mean(scores[0].argmax(axis=0) == ref))
    assert agree >= 0.999, f"argmax agrees on {agree:.5f} of pixels"
    hist = np.bincount(scores[0].argmax(axis=0).ravel(), minlength=33)
    np.testing.assert_allclose(hist, extra["class_histogram"], atol=0.001 * ref.size)


# ---------------------------------------------------------------------- weights I/O
@pytest.mark.parametrize("name", REQUIRED)
def test_save_and_reload_gives_identical_outputs(name, tmp_path):
    info = model_info(name)
    net = load_net(info)
    x = np.load(model_file(info, "input_file"))
    forward(net, x)
    before = {b: net.blobs[b].data.copy() for b in reference_outputs(info)}
    path = str(tmp_path / "saved.caffemodel")
    net.save(path)
    again = load_net(info, weights=path)
    for layer, blobs in net.params.items():
        for a, b in zip(blobs, again.params[layer]):
            assert np.array_equal(a.data, b.data), layer
    forward(again, x)
    for blob, value in before.items():
        assert np.array_equal(again.blobs[blob].data, value), blob


@pytest.mark.parametrize("name", ["resnet20_cifar10", "cifar10_full_v1"])
def test_opencv_reads_our_caffemodel(name, tmp_path):
    """cv2.dnn loads a caffemodel written by Net.save() and computes the stored outputs.

    resnet20: V2 prototxt, BatchNorm with its scale-factor blob, Scale with bias.
    cifar10_full: V1 prototxt whose original caffemodel uses legacy 4-D blob dims;
    ours writes BlobShape."""
    cv2 = pytest.importorskip("cv2")
    info = model_info(name)
    path = str(tmp_path / "ours.caffemodel")
    load_net(info).save(path)
    net = cv2.dnn.readNetFromCaffe(model_file(info, "prototxt"), path)
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    net.setInput(np.load(model_file(info, "input_file")))
    refs = reference_outputs(info)
    outs = net.forward(list(refs))
    for (blob, ref), got in zip(refs.items(), outs):
        assert_matches(np.asarray(got).reshape(ref.shape), ref, f"OpenCV on our file:{blob}")
