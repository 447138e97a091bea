"""benchmarks/torch_net.py: the PyTorch twin of a caffelite net computes what caffelite
computes (PyTorch CPU as the oracle; skipped without torch).

Whole-net comparisons run in float64 where the two must agree to rounding (1e-10 of
the largest value, every blob, the loss and every parameter gradient): in float32 the
different summation orders (~1e-6) flip the odd ReLU input that lies within rounding of
zero, which moves a weight gradient by one position's share, far above rounding.  Where
a net resizes by a ratio that is not a power of two (ResNet MSC's 3/4 input, the small
net's ×3) Caffe computes bilinear coordinates in float32 even in double nets;
``interp="caffe"`` gives torch the same coordinates there.  The float32 runs (what the
benchmark times, with ``F.interpolate``) check the score maps within 1e-4 of their
largest value: the nets' depth times float32 rounding.  One SGD step of the torch twin
(``gpu_train.torch_train_step``) is checked against caffelite's SGDSolver, momentum and
iter_size included.
"""
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import caffelite as caffe  # noqa: E402
from caffelite.io import prototxt  # noqa: E402
from caffelite.proto import caffe_pb2  # noqa: E402
from conftest import CORPUS  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import gpu_train  # noqa: E402
from torch_net import TorchNet, TorchNetError  # noqa: E402

TRAIN, TEST = caffe.TRAIN, caffe.TEST

# Every supported layer type, with odd shapes: ceil-mode pooling whose last window
# overhangs the padding, grouped dilated convolution, a non-square kernel, shared
# parameters, an auto Split, a cropping Interp, batch-statistics BatchNorm, a two-bottom
# Scale, two losses (VALID / legacy normalize: false, loss_weight, propagate_down).
EVERY_LAYER = """
name: "every_layer"
layer { name: "in" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 2 dim: 3 dim: 11 dim: 13 } shape { dim: 2 dim: 1 dim: 5 dim: 5 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 0 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" relu_param { negative_slope: 0.1 } }
layer { name: "convg" type: "Convolution" bottom: "conv1" top: "convg"
  convolution_param { num_output: 4 kernel_size: 3 pad: 2 dilation: 2 group: 2 bias_term: false } }
layer { name: "relu2" type: "ReLU" bottom: "convg" top: "relu2" }
layer { name: "pmax" type: "Pooling" bottom: "relu2" top: "pmax"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pave" type: "Pooling" bottom: "convg" top: "pave"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "pmax" bottom: "pave" top: "sum"
  eltwise_param { operation: SUM coeff: 0.5 coeff: -2 } }
layer { name: "prod" type: "Eltwise" bottom: "pmax" bottom: "sum" top: "prod"
  eltwise_param { operation: PROD } }
layer { name: "emax" type: "Eltwise" bottom: "prod" bottom: "sum" bottom: "pave" top: "emax"
  eltwise_param { operation: MAX } }
layer { name: "cat" type: "Concat" bottom: "emax" bottom: "pave" top: "cat" }
layer { name: "bn" type: "BatchNorm" bottom: "cat" top: "bn"
  batch_norm_param { use_global_stats: false } }
layer { name: "scale" type: "Scale" bottom: "bn" top: "bn" scale_param { bias_term: true } }
layer { name: "bias" type: "Bias" bottom: "bn" top: "biased" }
layer { name: "drop" type: "Dropout" bottom: "biased" top: "biased"
  dropout_param { dropout_ratio: 0.3 } }
layer { name: "up" type: "Interp" bottom: "biased" top: "up" interp_param { zoom_factor: 3 } }
layer { name: "crop" type: "Interp" bottom: "up" top: "crop"
  interp_param { shrink_factor: 2 pad_beg: -1 pad_end: 0 } }
layer { name: "resize" type: "Interp" bottom: "biased" top: "resize"
  interp_param { height: 5 width: 5 } }
layer { name: "score_a" type: "Convolution" bottom: "crop" top: "score_a"
  param { name: "score_w" } param { name: "score_b" }
  convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "score_b" type: "Convolution" bottom: "resize" top: "score_b"
  param { name: "score_w" } param { name: "score_b" }
  convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "score" type: "Eltwise" bottom: "score_a" bottom: "score_b" top: "score" }
layer { name: "gate" type: "InnerProduct" bottom: "pmax" top: "gate"
  inner_product_param { num_output: 3 } }
layer { name: "gated" type: "Scale" bottom: "score" bottom: "gate" top: "gated"
  scale_param { axis: 0 } }
layer { name: "prob" type: "Softmax" bottom: "gated" top: "prob" }
layer { name: "silence" type: "Silence" bottom: "prob" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "gated" bottom: "label"
  top: "loss" loss_param { ignore_label: 255 normalization: VALID } }
layer { name: "loss_full" type: "SoftmaxWithLoss" bottom: "score" bottom: "label"
  top: "loss_full" loss_weight: 0.5 propagate_down: true propagate_down: false
  loss_param { ignore_label: 255 normalize: false } }
"""
DROPOUT = """layer { name: "drop" type: "Dropout" bottom: "biased" top: "biased"
  dropout_param { dropout_ratio: 0.3 } }"""


def small_net(text=EVERY_LAYER, phase=TRAIN, dtype=np.float64, seed=0):
    param, _ = prototxt.parse_net(text)
    caffe.set_random_seed(seed)
    net = caffe.Net(param=param, phase=phase, dtype=dtype)
    rng = np.random.default_rng(seed)
    for name, blobs in net.params.items():
        for i, b in enumerate(blobs):
            if net.layer_dict[name].type == "BatchNorm":
                b.data[...] = [0.5, 2.0, 1.0][i] * rng.uniform(0.5, 1.5, b.shape)
            else:
                b.data[...] = rng.normal(0, 0.5, b.shape)
    net.blobs["data"].data[...] = rng.normal(0, 1, net.blobs["data"].shape)
    labels = rng.integers(0, 3, net.blobs["label"].shape).astype(float)
    labels[rng.random(labels.shape) < 0.2] = 255
    net.blobs["label"].data[...] = labels
    return net


def inputs_of(net):
    return {n: torch.from_numpy(np.array(net.blobs[n].data)) for n in net.inputs}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)) if b.size else 0.0


def run_both(net, tnet, backward=True):
    """caffelite forward(+backward), then torch on the same inputs and dropout masks;
    returns (caffelite loss, caffelite blob data, torch loss, torch blobs)."""
    loss = net.forward_from_to()
    data = {n: np.array(b.data) for n, b in net.blobs.items()}
    if backward:
        net.clear_param_diffs()
        net.backward_from_to()
    masks = gpu_train.dropout_masks(net)
    with torch.set_grad_enabled(backward):
        tloss, blobs = tnet(inputs_of(net), keep="all", dropout_masks=masks)
        if backward:
            tloss.backward()
    return loss, data, float(tloss.detach()), {k: v.detach().numpy() for k, v in blobs.items()}


def assert_same_net(net, tnet, tol, backward=True):
    loss, data, tloss, blobs = run_both(net, tnet, backward)
    assert abs(loss - tloss) <= tol * abs(tloss), (loss, tloss)
    missing = set(data) - set(blobs) - {"(automatic)"}
    assert not missing, sorted(missing)[:5]
    for name, value in data.items():
        if name in blobs:       # in-place blobs: both hold the last layer's output
            assert value.shape == blobs[name].shape, name
            assert rel(value, blobs[name]) <= tol, (name, rel(value, blobs[name]))
    if backward:
        assert_same_gradients(net, tnet, tol)
    return loss


def assert_same_gradients(net, tnet, tol):
    learnt = 0
    for name, layer in net.layer_dict.items():
        if layer.type == "BatchNorm":
            continue                        # statistics, not parameters
        for i, blob in enumerate(layer.blobs):
            p = tnet.parameter_of(name, i)
            if p.grad is None:              # frozen in torch: no gradient in caffelite
                assert not layer.param_propagate_down[i], (name, i)
                assert not np.any(blob.diff), (name, i)
                continue
            assert rel(blob.diff, p.grad.numpy()) <= tol, (name, i, rel(blob.diff, p.grad))
            learnt += 1
    assert learnt > 0


# ---------------------------------------------------------------------- small net
def test_every_layer_type_matches_caffelite():
    net = small_net()
    tnet = TorchNet(net, interp="caffe")
    loss = assert_same_net(net, tnet, 1e-10)
    assert loss > 0
    # Both applied one batch-statistics update to the BatchNorm sums.
    for mine, theirs in zip(net.params["bn"], tnet.buffers_of["bn"]):
        assert rel(mine.data, theirs.numpy()) <= 1e-12
    # The shared 1x1 classifier is one torch parameter holding both layers' gradients.
    assert tnet.parameter_of("score_a", 0) is tnet.parameter_of("score_b", 0)


def test_test_phase_uses_stored_statistics_and_no_dropout():
    net = small_net(phase=TEST)
    assert_same_net(net, TorchNet(net, interp="caffe"), 1e-10, backward=False)


def test_sgd_steps_match_caffelite_solver():
    """Two iterations of iter_size 2 (no dropout, so both see the same passes): weight
    updates equal within float32 rounding of the weights."""
    param, _ = prototxt.parse_net(EVERY_LAYER.replace(DROPOUT, ""))
    sp = caffe_pb2.SolverParameter(base_lr=0.05, momentum=0.9, weight_decay=0.01,
                                   lr_policy="fixed", iter_size=2, max_iter=10)
    sp.train_net_param.CopyFrom(param)
    solver = caffe.get_solver(sp)
    template = small_net(EVERY_LAYER.replace(DROPOUT, ""), dtype=np.float32)
    for name, blobs in template.params.items():
        for mine, theirs in zip(solver.net.params[name], blobs):
            mine.data[...] = theirs.data
    for name in ("data", "label"):
        solver.net.blobs[name].data[...] = template.blobs[name].data
    tnet = TorchNet(solver.net)
    sgd = tnet.sgd(sp.base_lr, sp.momentum, sp.weight_decay)
    inputs = inputs_of(solver.net)
    for _ in range(2):
        before = {n: np.array(b[0].data) for n, b in solver.net.params.items()}
        solver.step(1)
        gpu_train.torch_train_step(tnet, inputs, sgd, sp.iter_size)
        for name, blobs in solver.net.params.items():
            if solver.net.layer_dict[name].type == "BatchNorm":
                continue
            mine = blobs[0].data - before[name]
            theirs = tnet.parameter_of(name, 0).detach().numpy() - before[name]
            assert np.abs(theirs).max() > 0, name
            np.testing.assert_allclose(mine, theirs, rtol=0,
                                       atol=1e-4 * np.abs(theirs).max(), err_msg=name)


def test_saturated_loss_is_clamped_like_caffe():
    """Hand case: scores (0, 200) with label 0 give p = e^-200, below FLT_MIN, so Caffe's
    loss is -log(FLT_MIN) = 87.3365 while the gradient stays p - onehot = (-1, 1)."""
    text = ('input: "s" input_shape { dim: 1 dim: 2 } input: "l" input_shape { dim: 1 } '
            'force_backward: true '
            'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "loss" }')
    net = caffe.Net(param=prototxt.parse_net(text)[0], phase=TRAIN, dtype=np.float64)
    net.blobs["s"].data[...] = [[0, 200]]
    net.blobs["l"].data[...] = [0]
    scores = torch.tensor([[0.0, 200.0]], dtype=torch.float64, requires_grad=True)
    loss, _ = TorchNet(net)({"s": scores, "l": torch.zeros(1, dtype=torch.float64)})
    loss.backward()
    expected = -np.log(np.float64(np.finfo(np.float32).tiny))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(scores.grad.numpy(), [[-1, 1]], atol=1e-12)
    assert net.forward_from_to() == pytest.approx(expected, rel=1e-6)


def test_eltwise_max_ties_send_the_gradient_to_the_earlier_bottom():
    """Caffe's CPU rule (spec): with a == b the whole gradient goes to a."""
    text = ('input: "a" input_shape { dim: 1 dim: 4 } input: "b" input_shape { dim: 1 dim: 4 } '
            'force_backward: true layer { name: "m" type: "Eltwise" bottom: "a" bottom: "b" '
            'top: "m" loss_weight: 1 eltwise_param { operation: MAX } }')
    net = caffe.Net(param=prototxt.parse_net(text)[0], phase=TRAIN, dtype=np.float64)
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[1.0, 5.0, 3.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss, _ = TorchNet(net)({"a": a, "b": b})
    loss.backward()
    np.testing.assert_array_equal(a.grad.numpy(), [[1, 0, 1, 1]])
    np.testing.assert_array_equal(b.grad.numpy(), [[0, 1, 0, 0]])


# ---------------------------------------------------------------------- errors
def test_unsupported_layer_is_named():
    net = caffe.Net(param=prototxt.parse_net(
        'input: "x" input_shape { dim: 1 dim: 3 dim: 5 dim: 5 } '
        'layer { name: "norm1" type: "LRN" bottom: "x" top: "y" }')[0], phase=TEST)
    with pytest.raises(TorchNetError, match=r"layer 'norm1' \(LRN\): no PyTorch version"):
        TorchNet(net)


def test_skipped_layer_whose_top_is_read_is_refused():
    net = small_net(phase=TEST)
    with pytest.raises(TorchNetError, match=r"layer 'silence'.*bottom 'prob' comes from a "
                                            r"skipped layer"):
        TorchNet(net, skip_types=("Softmax",))


def test_pooling_size_torch_cannot_reproduce_is_an_error():
    """Caffe's ceil mode without padding keeps a last window that starts past the input
    (6 → ceil(5/3)+1 = 3 outputs); torch drops it (2): a shape error naming the layer."""
    text = ('input: "x" input_shape { dim: 1 dim: 2 dim: 6 dim: 6 } '
            'layer { name: "p" type: "Pooling" bottom: "x" top: "y" '
            '  pooling_param { pool: MAX kernel_size: 1 stride: 3 } }')
    net = caffe.Net(param=prototxt.parse_net(text)[0], phase=TEST)
    assert net.blobs["y"].shape == (1, 2, 3, 3)
    tnet = TorchNet(net)
    with pytest.raises(TorchNetError, match=r"layer 'p' \(Pooling\): PyTorch gives top 'y' "
                                            r"the shape \(1, 2, 2, 2\), caffelite \(1, 2, 3, 3\)"):
        tnet({"x": torch.zeros(1, 2, 6, 6)})


# ---------------------------------------------------------------------- corpus nets
def corpus_net(key, phase, size, batch, dtype):
    if not os.path.isdir(os.path.join(CORPUS, "prototxt", gpu_train.NETS[key]["dir"])):
        pytest.skip("corpus prototxt not available")
    param, shapes = gpu_train.bench_net(CORPUS, key, phase, size, batch)
    caffe.set_random_seed(5)
    net = caffe.Net(param=param, phase=phase, dtype=dtype)
    gpu_train.random_weights(net, key)
    gpu_train.fill_inputs(net, shapes)
    return net


def test_aspp_vgg_train_matches_in_float64():
    net = corpus_net("vgg", TRAIN, 65, 1, np.float64)
    loss = assert_same_net(net, TorchNet(net), 1e-10)
    assert 1 < loss < 20                  # the calmed classifier: not saturated


def test_aspp_vgg_test_net_matches_in_float32():
    net = corpus_net("vgg", TEST, 65, 1, np.float32)
    _, data, _, blobs = run_both(net, TorchNet(net), backward=False)
    assert data["fc8_interp"].shape == (1, 21, 65, 65)
    assert rel(data["fc8_interp"], blobs["fc8_interp"]) <= 1e-4


@pytest.mark.slow
def test_resnet101_msc_train_matches_in_float64():
    net = corpus_net("resnet", TRAIN, 65, 1, np.float64)
    loss = assert_same_net(net, TorchNet(net, interp="caffe"), 1e-10)
    assert np.isfinite(loss) and loss > 0


@pytest.mark.slow
def test_resnet101_msc_test_net_matches_in_float32():
    net = corpus_net("resnet", TEST, 65, 1, np.float32)
    _, data, _, blobs = run_both(net, TorchNet(net), backward=False)
    assert data["fc1_interp"].shape == (1, 21, 65, 65)
    for name in ("fc_fusion", "fc1_interp"):
        assert rel(data[name], blobs[name]) <= 1e-4, name
