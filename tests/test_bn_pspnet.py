"""PSPNet's ``BN`` layer: against PyTorch's batch norm (test-only oracle), a loop-by-loop
transcription of bn_layer.cpp's stored-statistics forward, Caffe's gradient checker, the
param specs its LayerSetUp sets, and a PSPNet-style pyramid head built from prototxt."""
import itertools
import math

import numpy as np
import pytest

import caffelite as caffe
from caffelite.backend import TEST, TRAIN
from caffelite.layer import LayerError
from caffelite.proto import caffe_pb2

from layer_testing import check_gradient, make_layer, setup_layer

torch = pytest.importorskip("torch")
F = torch.nn.functional

FROZEN = "frozen: true momentum: 0.95"


def _layer(bn_param="", phase=TEST, dtype=np.float64):
    return make_layer(f'type: "BN" bn_param {{ {bn_param} }}', phase, dtype)


def _set_params(layer, rng, var_low=0.2):
    slope, bias, mean, var = layer.blobs
    slope.data[...] = rng.uniform(0.5, 2.0, slope.shape)
    bias.data[...] = rng.normal(0, 1, bias.shape)
    mean.data[...] = rng.normal(0, 1, mean.shape)
    var.data[...] = rng.uniform(var_low, 3.0, var.shape)


def _torch_bn(x, layer, training, momentum=None):
    slope, bias, mean, var = (torch.tensor(b.data.reshape(-1).copy()) for b in layer.blobs)
    out = F.batch_norm(torch.tensor(x), mean, var, slope, bias, training=training,
                       momentum=0.0 if momentum is None else 1 - momentum,
                       eps=layer.eps)
    return out.numpy(), mean.numpy(), var.numpy()


def test_blobs_and_fillers_as_layer_setup_makes_them():
    layer = _layer("slope_filler { type: 'constant' value: 1 } bias_filler { value: 0.5 }")
    setup_layer(layer, [np.zeros((2, 3, 4, 5))])
    assert [b.shape for b in layer.blobs] == [(1, 3, 1, 1)] * 4
    assert [float(b.data.mean()) for b in layer.blobs] == [1.0, 0.5, 0.0, 0.0]
    frozen = _layer(FROZEN)
    setup_layer(frozen, [np.zeros((2, 3, 4, 5))])
    # unset slope filler: FillerParameter's default, constant 0; frozen: variance 1
    assert [float(b.data.mean()) for b in frozen.blobs] == [0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("bn_param,phase", [(FROZEN, TRAIN), (FROZEN, TEST), ("", TEST)])
def test_stored_statistics_forward_matches_torch(bn_param, phase):
    rng = np.random.default_rng(3)
    layer = _layer(bn_param + " eps: 0.001", phase)
    x = rng.normal(1, 2, (2, 4, 5, 3))
    bottom, top = setup_layer(layer, [x])
    _set_params(layer, rng)
    stored = [b.data.copy() for b in layer.blobs]
    layer.forward(bottom, top)
    want, _, _ = _torch_bn(x, layer, training=False)
    np.testing.assert_allclose(top[0].data, want, rtol=1e-12, atol=1e-12)
    for b, s in zip(layer.blobs, stored):        # the statistics are left alone
        assert np.array_equal(b.data, s)


def test_float32_forward_is_bn_layer_cpp_element_by_element():
    """bn_layer.cpp with stored statistics, as its CPU loops round: x + (-mean), then
    var + eps, libm's pow(., -0.5) (caffe_powx) stored as float, times it, times the
    slope, plus the bias; in float32."""
    rng = np.random.default_rng(4)
    layer = _layer(FROZEN, TEST, np.float32)
    x = rng.normal(0, 3, (2, 64, 2, 3)).astype(np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    _set_params(layer, rng, var_low=1e-3)
    layer.forward(bottom, top)
    slope, bias, mean, var = (b.data.reshape(-1) for b in layer.blobs)
    eps = np.float32(layer.eps)
    want = np.empty_like(x)
    for n, c, h, w in np.ndindex(x.shape):
        centered = np.float32(x[n, c, h, w] + np.float32(-mean[c]))
        inv_std = np.float32(math.pow(float(np.float32(var[c] + eps)), -0.5))
        want[n, c, h, w] = np.float32(np.float32(centered * inv_std) * slope[c]) + bias[c]
    assert np.array_equal(top[0].data, want)


def test_training_uses_batch_statistics_and_updates_the_moving_averages():
    rng = np.random.default_rng(5)
    layer = _layer("momentum: 0.95 eps: 1e-5", TRAIN)
    x = rng.normal(-1, 2, (3, 4, 6, 5))
    bottom, top = setup_layer(layer, [x])
    _set_params(layer, rng)
    old_mean, old_var = layer.blobs[2].data.copy(), layer.blobs[3].data.copy()
    layer.forward(bottom, top)
    want, _, _ = _torch_bn(x, layer, training=True)
    np.testing.assert_allclose(top[0].data, want, rtol=1e-10, atol=1e-10)
    tx = torch.tensor(x)
    batch_mean = tx.mean(dim=(0, 2, 3)).numpy().reshape(old_mean.shape)
    biased_var = tx.var(dim=(0, 2, 3), unbiased=False).numpy().reshape(old_var.shape)
    m = float(np.float32(0.95))         # a float field, widened for a double net
    np.testing.assert_allclose(layer.blobs[2].data, (1 - m) * batch_mean + m * old_mean,
                               rtol=1e-12)
    # bn_layer.cpp keeps the biased variance (PyTorch's running_var is unbiased)
    np.testing.assert_allclose(layer.blobs[3].data, (1 - m) * biased_var + m * old_var,
                               rtol=1e-12)


def test_batch_mean_multiplies_by_the_rounded_reciprocals_in_two_steps():
    """bn_layer.cpp's batch mean is two GEMVs in float: each (n, c) row sum times
    Dtype(1. / (height * width)), then the sum of those over n times Dtype(1. / num).
    Whole numbers keep every row sum exact, and the three-term sum rounds alike in any
    order (any BLAS); the mean in one step would be 8 / 9 rounded once.  momentum 0
    stores the batch mean itself: 1 * mean + 0 * 0."""
    x = np.array([1, 5, -2, 3, 2, -5, -1, 4, 1], np.float32).reshape(3, 1, 1, 3)
    layer = _layer("momentum: 0", TRAIN, np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    layer.forward(bottom, top)
    f = np.float32(1.0 / 3)
    rows = [np.float32(np.float32(total) * f) for total in x.reshape(3, 3).sum(axis=1)]
    sums = {np.float32(np.float32(a + b) + c) for a, b, c in itertools.permutations(rows)}
    assert len(sums) == 1
    expected = np.float32(sums.pop() * f)
    assert expected != np.float32(8) / np.float32(9)
    assert layer.blobs[2].data.reshape(-1)[0] == expected


def test_training_gradients():
    rng = np.random.default_rng(6)
    layer = _layer("momentum: 0.9", TRAIN)
    bottom, top = setup_layer(layer, [rng.normal(0, 1.5, (2, 3, 3, 4))])
    _set_params(layer, rng)
    check_gradient(layer, bottom, top, step=1e-4, threshold=1e-5)


def test_training_gradients_match_torch_autograd_and_accumulate():
    rng = np.random.default_rng(7)
    layer = _layer("", TRAIN)
    x = rng.normal(0, 1, (2, 3, 4, 4))
    dy = rng.normal(0, 1, x.shape)
    bottom, top = setup_layer(layer, [x])
    _set_params(layer, rng)
    for b in layer.blobs:
        b.diff[...] = 0.25
    layer.forward(bottom, top)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    tx = torch.tensor(x, requires_grad=True)
    slope = torch.tensor(layer.blobs[0].data.reshape(-1).copy(), requires_grad=True)
    bias = torch.tensor(layer.blobs[1].data.reshape(-1).copy(), requires_grad=True)
    out = F.batch_norm(tx, None, None, slope, bias, training=True, eps=layer.eps)
    out.backward(torch.tensor(dy))
    np.testing.assert_allclose(bottom[0].diff, tx.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(layer.blobs[0].diff.reshape(-1), 0.25 + slope.grad.numpy(),
                               rtol=1e-10)
    np.testing.assert_allclose(layer.blobs[1].diff.reshape(-1), 0.25 + bias.grad.numpy(),
                               rtol=1e-10)
    assert np.all(layer.blobs[2].diff == 0.25) and np.all(layer.blobs[3].diff == 0.25)


def test_frozen_gradient_reaches_the_bottom_only():
    rng = np.random.default_rng(8)
    layer = _layer(FROZEN, TRAIN)
    bottom, top = setup_layer(layer, [rng.normal(0, 1, (2, 3, 3, 3))])
    _set_params(layer, rng)
    layer.param_propagate_down = [False] * 4        # as the net sets it (lr_mult 0)
    check_gradient(layer, bottom, top, step=1e-4, threshold=1e-6)
    layer.param_propagate_down = [True] * 4
    for b in layer.blobs:
        b.diff[...] = 0
    layer.forward(bottom, top)
    top[0].diff[...] = 1
    layer.backward(top, [True], bottom)
    assert all(np.all(b.diff == 0) for b in layer.blobs)    # frozen: no parameter diffs


def test_in_place_matches_out_of_place():
    rng = np.random.default_rng(9)
    x = rng.normal(0, 1, (2, 3, 4, 4))
    dy = rng.normal(0, 1, x.shape)
    results = []
    for in_place in (False, True):
        layer = _layer("", TRAIN)
        bottom, top = setup_layer(layer, [x])
        _set_params(layer, np.random.default_rng(1))
        if in_place:
            top = bottom
        layer.forward(bottom, top)
        y = top[0].data.copy()
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
        results.append((y, bottom[0].diff.copy(), layer.blobs[0].diff.copy()))
    for a, b in zip(*results):
        assert np.array_equal(a, b)


def test_bad_shapes_are_named():
    layer = _layer()
    with pytest.raises(LayerError, match="at most 4 axes"):
        setup_layer(layer, [np.zeros((1, 2, 2, 2, 2))])
    layer = _layer()
    bottom, top = setup_layer(layer, [np.zeros((1, 3, 2, 2))])
    bottom[0].reshape((1, 4, 2, 2))
    with pytest.raises(LayerError, match="has 4 channels, but the layer was set up "
                                               "for 3"):
        layer.reshape(bottom, top)


PSP_BN = """
  param { lr_mult: 1 decay_mult: 0 } param { lr_mult: 1 decay_mult: 0 }
  param { lr_mult: 0 decay_mult: 0 } param { lr_mult: 0 decay_mult: 0 }
  bn_param { slope_filler { type: "constant" value: 1 }
             bias_filler { type: "constant" value: 0 } %s momentum: 0.95 }"""


def _psp_head(frozen=True):
    """A PSPNet head as the released prototxts write it: in-place BN after each
    convolution, a pyramid of AVE pools (kernel = stride), Interp back, Concat."""
    bn = PSP_BN % ("frozen: true" if frozen else "")
    layers = ["""input: "data" input_dim: 1 input_dim: 4 input_dim: 12 input_dim: 12
layer { name: "conv5" type: "Convolution" bottom: "data" top: "conv5"
  convolution_param { num_output: 6 kernel_size: 3 pad: 2 dilation: 2 bias_term: false
                      weight_filler { type: "msra" } } }""",
              f'layer {{ name: "conv5/bn" type: "BN" bottom: "conv5" top: "conv5" {bn} }}',
              'layer { name: "conv5/relu" type: "ReLU" bottom: "conv5" top: "conv5" }']
    concat = ['bottom: "conv5"']
    for bins in (1, 2, 3, 6):
        k = 12 // bins
        name = f"pool{bins}"
        layers += [f"""layer {{ name: "{name}" type: "Pooling" bottom: "conv5" top: "{name}"
  pooling_param {{ pool: AVE kernel_size: {k} stride: {k} }} }}
layer {{ name: "{name}_conv" type: "Convolution" bottom: "{name}" top: "{name}_conv"
  convolution_param {{ num_output: 2 kernel_size: 1 bias_term: false
                       weight_filler {{ type: "msra" }} }} }}
layer {{ name: "{name}_conv/bn" type: "BN" bottom: "{name}_conv" top: "{name}_conv" {bn} }}
layer {{ name: "{name}_conv/relu" type: "ReLU" bottom: "{name}_conv" top: "{name}_conv" }}
layer {{ name: "{name}_interp" type: "Interp" bottom: "{name}_conv" top: "{name}_interp"
  interp_param {{ height: 12 width: 12 }} }}"""]
        concat.append(f'bottom: "{name}_interp"')
    layers += [f'layer {{ name: "concat" type: "Concat" {" ".join(concat)} top: "concat" }}',
               """layer { name: "conv6" type: "Convolution" bottom: "concat" top: "conv6"
  convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "msra" } } }
layer { name: "conv6_interp" type: "Interp" bottom: "conv6" top: "conv6_interp"
  interp_param { zoom_factor: 2 } }"""]
    return "\n".join(layers)


def _torch_head(net, x):
    def bn(name, t):
        slope, bias, mean, var = (torch.tensor(b.data.reshape(-1).astype(np.float64))
                                  for b in net.params[name])
        return F.relu(F.batch_norm(t, mean, var, slope, bias, training=False, eps=1e-5))

    def conv(name, t, **kw):
        p = net.params[name]
        return F.conv2d(t, torch.tensor(p[0].data.astype(np.float64)),
                        torch.tensor(p[1].data.astype(np.float64)) if len(p) > 1 else None,
                        **kw)
    t = bn("conv5/bn", conv("conv5", torch.tensor(x.astype(np.float64)), padding=2,
                            dilation=2))
    parts = [t]
    for bins in (1, 2, 3, 6):
        pooled = F.avg_pool2d(t, 12 // bins)
        branch = bn(f"pool{bins}_conv/bn", conv(f"pool{bins}_conv", pooled))
        parts.append(F.interpolate(branch, size=(12, 12), mode="bilinear",
                                   align_corners=True))
    out = conv("conv6", torch.cat(parts, dim=1))
    # zoom_factor 2: (12 - 1) * 2 + 1 = 23, corners aligned
    return F.interpolate(out, size=(23, 23), mode="bilinear", align_corners=True).numpy()


def test_pspnet_head_runs_from_prototxt_and_round_trips_a_caffemodel(tmp_path):
    proto = tmp_path / "psp.prototxt"
    proto.write_text(_psp_head())
    net = caffe.Net(str(proto), caffe.TEST)
    rng = np.random.default_rng(10)
    for name, layer_params in net.params.items():
        if "/bn" in name:
            for i, b in enumerate(layer_params):
                b.data[...] = (rng.uniform(0.5, 1.5, b.shape) if i in (0, 3)
                               else rng.normal(0, 0.5, b.shape))
    x = rng.normal(0, 1, (1, 4, 12, 12)).astype(np.float32)
    net.blobs["data"].data[...] = x
    out = net.forward()["conv6_interp"].copy()
    assert out.shape == (1, 3, 23, 23)
    np.testing.assert_allclose(out, _torch_head(net, x), rtol=1e-5, atol=1e-5)
    weights = tmp_path / "psp.caffemodel"
    net.save(str(weights))
    param = caffe_pb2.NetParameter()
    param.ParseFromString(weights.read_bytes())
    saved = {lp.name: lp for lp in param.layer}
    bn = saved["conv5/bn"]
    assert [tuple(b.shape.dim) for b in bn.blobs] == [(1, 6, 1, 1)] * 4
    assert bn.bn_param.frozen and bn.bn_param.momentum == pytest.approx(0.95)
    again = caffe.Net(str(proto), str(weights), caffe.TEST)
    again.blobs["data"].data[...] = x
    assert np.array_equal(again.forward()["conv6_interp"], out)


@pytest.mark.parametrize("frozen", [True, False])
def test_learning_rates_follow_the_layers_own_specs(tmp_path, frozen):
    """LayerSetUp zeroes the statistics' lr and decay, and with ``frozen`` the slope's
    and bias's too; the solver then leaves those blobs alone."""
    proto = tmp_path / "psp.prototxt"
    proto.write_text(_psp_head(frozen).replace(
        'top: "conv6_interp"\n  interp_param { zoom_factor: 2 } }',
        'top: "conv6_interp"\n  interp_param { zoom_factor: 2 } }\n'
        'layer { name: "loss" type: "EuclideanLoss" bottom: "conv6_interp" '
        'bottom: "target" top: "loss" }').replace(
        'input: "data"', 'input: "target" input_dim: 1 input_dim: 3 input_dim: 23 '
                         'input_dim: 23\ninput: "data"'))
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f'net: "{proto}" base_lr: 0.1 lr_policy: "fixed" '
                           f'weight_decay: 0.01 max_iter: 1 display: 0 solver_mode: CPU '
                           f'snapshot_after_train: false')
    solver = caffe.SGDSolver(str(solver_file))
    net = solver.net
    lp = net.layer_dict["conv5/bn"].layer_param
    assert [(s.lr_mult, s.decay_mult) for s in lp.param] == (
        [(0, 0)] * 4 if frozen else [(1, 0), (1, 0), (0, 0), (0, 0)])
    rng = np.random.default_rng(11)
    net.blobs["data"].data[...] = rng.normal(0, 1, net.blobs["data"].shape)
    net.blobs["target"].data[...] = rng.normal(0, 1, net.blobs["target"].shape)
    before = [b.data.copy() for b in net.params["conv5/bn"]]
    solver.step(1)
    after = [b.data for b in net.params["conv5/bn"]]
    changed = [not np.array_equal(a, b) for a, b in zip(before, after)]
    # frozen: nothing moves; else slope and bias learn and the statistics are moving
    # averages updated by the forward
    assert changed == ([False] * 4 if frozen else [True] * 4)
