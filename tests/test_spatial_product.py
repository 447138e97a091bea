"""SpatialProduct (spec deeplab_extra_layers.md 2.1) and the Attention-to-Scale example
net of 2.2 (examples/attention_to_scale), trained briefly on the synthetic set.

Oracles: a hand-computed case; the fork's own equivalent Tile {axis 1} + Eltwise PROD
built as a net; central finite differences (float64) for both gradients; for the
example, the attention weights must be a softmax over scales and the fused map the
attention-weighted sum of the per-scale scores.
"""
import os

import numpy as np
import pytest

import caffelite as caffe
from caffelite.io import prototxt
from caffelite.layer import LayerError
from caffelite.solver import get_solver
from layer_testing import TRAIN, check_gradient, make_layer, run_forward, setup_layer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "attention_to_scale")


def test_forward_by_hand():
    f = np.array([[[1, 2], [3, 4]], [[-1, 0], [0.5, 2]]]).reshape(1, 2, 2, 2)
    m = np.array([[2, 0], [-1, 0.5]]).reshape(1, 1, 2, 2)
    layer = make_layer('type: "SpatialProduct"', TRAIN, np.float32)
    bottom, top = setup_layer(layer, [f, m], 1, np.float32)
    (y,) = run_forward(layer, bottom, top)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y[0], [[[2, 0], [-3, 2]], [[-2, 0], [-0.5, 1]]])


def test_matches_tile_and_eltwise_prod():
    """The fork's alternative: Tile the map over the channels, then Eltwise PROD."""
    rng = np.random.default_rng(0)
    f = rng.normal(size=(2, 5, 3, 4)).astype(np.float32)
    m = rng.uniform(size=(2, 1, 3, 4)).astype(np.float32)
    text = """
    layer { name: "in" type: "Input" top: "f" top: "m"
      input_param { shape { dim: 2 dim: 5 dim: 3 dim: 4 } shape { dim: 2 dim: 1 dim: 3 dim: 4 } } }
    layer { name: "sp" type: "SpatialProduct" bottom: "f" bottom: "m" top: "sp" }
    layer { name: "tile" type: "Tile" bottom: "m" top: "mt" tile_param { axis: 1 tiles: 5 } }
    layer { name: "prod" type: "Eltwise" bottom: "f" bottom: "mt" top: "prod"
      eltwise_param { operation: PROD } }
    """
    param, _ = prototxt.parse_net(text)
    net = caffe.Net(param=param, phase=caffe.TEST)
    net.blobs["f"].data[...] = f
    net.blobs["m"].data[...] = m
    net.forward()
    np.testing.assert_array_equal(net.blobs["sp"].data, net.blobs["prod"].data)


def test_gradients():
    rng = np.random.default_rng(1)
    layer = make_layer('type: "SpatialProduct"', TRAIN)
    bottom, top = setup_layer(layer, [rng.normal(size=(2, 3, 3, 4)),
                                      rng.normal(size=(2, 1, 3, 4))])
    check_gradient(layer, bottom, top)


def test_each_gradient_only_when_asked():
    rng = np.random.default_rng(2)
    layer = make_layer('type: "SpatialProduct"', TRAIN)
    bottom, top = setup_layer(layer, [rng.normal(size=(1, 3, 2, 2)),
                                      rng.normal(size=(1, 1, 2, 2))])
    run_forward(layer, bottom, top)
    top[0].diff[...] = rng.normal(size=top[0].shape)
    for b in bottom:
        b.diff[...] = 9
    layer.backward(top, [False, True], bottom)
    assert np.all(bottom[0].diff == 9)
    np.testing.assert_allclose(bottom[1].diff, (top[0].diff * bottom[0].data).sum(1, keepdims=True))
    layer.backward(top, [True, False], bottom)
    np.testing.assert_allclose(bottom[0].diff, top[0].diff * bottom[1].data)


@pytest.mark.parametrize("shapes, message", [
    (((1, 3, 2, 2), (1, 2, 2, 2)), "one-channel map"),
    (((1, 3, 2, 2), (1, 1, 2, 3)), "one-channel map"),
    (((1, 3, 2, 2), (2, 1, 2, 2)), "one-channel map"),
])
def test_bad_shapes(shapes, message):
    layer = make_layer('type: "SpatialProduct"', TRAIN)
    with pytest.raises(LayerError, match=message):
        setup_layer(layer, [np.zeros(s) for s in shapes])


# ------------------------------------------------------------------ the example net
def test_attention_to_scale_example_trains(tmp_path, monkeypatch):
    """Tiny settings: 8 synthetic images, batch 2, 12 SGD iterations (< 20 s)."""
    from caffelite.demo.dataset import make_dataset
    monkeypatch.chdir(tmp_path)
    make_dataset("data", os.path.join("exp", "list"), n_train=8, n_val=1)
    os.makedirs(os.path.join("exp", "model", "att2scale"))
    defines = {"DATA_ROOT": "data", "EXP": "exp", "TRAIN_SET": "train", "BATCH_SIZE": "2",
               "NUM_LABELS": "21", "MAX_ITER": "12",
               "NET": os.path.join(EXAMPLE, "train.prototxt")}
    solver = get_solver(os.path.join(EXAMPLE, "solver.prototxt"), defines)
    net = solver.net
    assert net.blobs["data_res075"].shape[2:] == (49, 49)
    assert net.blobs["data_res05"].shape[2:] == (33, 33)
    for name in ("fc8", "fc8_res075_interp", "fc8_res05_interp", "fc_fusion"):
        assert net.blobs[name].shape == (2, 21, 9, 9), name
    losses = []
    solver.add_callback(on_gradients=lambda: losses.append(
        sum(float(net.blobs[n].data) for n in ("loss", "loss_1", "loss_075", "loss_05"))))
    solver.step(12)
    assert all(np.isfinite(losses))
    # four softmax losses over 21 classes; noisy batches of 2, so compare the end with
    # the start rather than step by step
    assert losses[0] > 4 * np.log(21) * 0.8
    assert np.mean(losses[-4:]) < 0.8 * losses[0]
    # the branch computes what the paper's formula says
    att = net.blobs["attention"].data
    np.testing.assert_allclose(att.sum(axis=1), 1, rtol=1e-5)
    fused = sum(net.blobs[f].data * att[:, i:i + 1]
                for i, f in enumerate(("fc8", "fc8_res075_interp", "fc8_res05_interp")))
    np.testing.assert_allclose(net.blobs["fc_fusion"].data, fused, rtol=1e-4, atol=1e-5)
    # one shared tower: the three scales' conv1 blobs are the same parameters
    assert net.params["conv1_res05"][0].data is net.params["conv1"][0].data or \
        np.shares_memory(net.params["conv1_res05"][0].data, net.params["conv1"][0].data)
    assert np.abs(net.params["att_conv2"][0].diff).max() > 0


def test_in_place_map_gradient_reads_what_the_feature_gradient_wrote():
    """The fork's Backward_cpu writes dF = dY * M into the diff it then reads as the
    top's for dM = sum_c dY * F, and F's data is the top's: in place (top == F), with
    f = (2, 3), m = 5 and dY = 1, dF = (5, 5) and dM = 5 * 10 + 5 * 15 = 125 (25 out of
    place, the true 5 neither)."""
    layer = make_layer('type: "SpatialProduct"', TRAIN)
    f, m = np.array([2.0, 3.0]).reshape(1, 2, 1, 1), np.array([5.0]).reshape(1, 1, 1, 1)
    bottom, _ = setup_layer(layer, [f, m])
    layer.reshape(bottom, bottom[:1])
    layer.forward(bottom, bottom[:1])
    np.testing.assert_array_equal(bottom[0].data.ravel(), [10, 15])
    bottom[0].diff[...] = 1
    layer.backward(bottom[:1], [True, True], bottom)
    np.testing.assert_array_equal(bottom[0].diff.ravel(), [5, 5])
    np.testing.assert_array_equal(bottom[1].diff.ravel(), [125])
