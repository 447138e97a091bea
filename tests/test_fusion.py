"""GPU mode's fused BatchNorm -> Scale [-> ReLU] chains (caffelite/fusion.py): which
chains qualify, and that a fused net gives the unfused net's bits, forward and backward,
with ranges that cut a chain and with debug_info (both run the layers one by one)."""
import numpy as np
import pytest

import caffelite
from caffelite import backend, fusion
from gpu_modes import gpu_mode  # noqa: F401  (fixture)

FROZEN = "param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 }"
NET = f"""
input: "data" input_shape {{ dim: 2 dim: 3 dim: 9 dim: 7 }}
input: "label" input_shape {{ dim: 2 dim: 1 dim: 9 dim: 7 }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 4 kernel_size: 3 pad: 1
                       weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" {FROZEN}
  batch_norm_param {{ use_global_stats: true }} }}
layer {{ name: "sc1" type: "Scale" bottom: "conv1" top: "conv1"
  param {{ lr_mult: 0 }} param {{ lr_mult: 0 }} scale_param {{ bias_term: true }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param {{ num_output: 4 kernel_size: 1 bias_term: false
                       weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2" {FROZEN}
  batch_norm_param {{ use_global_stats: true }} }}
layer {{ name: "sc2" type: "Scale" bottom: "conv2" top: "conv2" param {{ lr_mult: 0 }} }}
layer {{ name: "sum" type: "Eltwise" bottom: "conv1" bottom: "conv2" top: "sum" }}
layer {{ name: "relu2" type: "ReLU" bottom: "sum" top: "sum"
  relu_param {{ negative_slope: 0.1 }} }}
layer {{ name: "bn3" type: "BatchNorm" bottom: "sum" top: "bn3" {FROZEN}
  batch_norm_param {{ use_global_stats: true }} }}
layer {{ name: "sc3" type: "Scale" bottom: "bn3" top: "bn3" }}
layer {{ name: "relu3" type: "ReLU" bottom: "bn3" top: "bn3" }}
layer {{ name: "bn4" type: "BatchNorm" bottom: "bn3" top: "bn3" {FROZEN}
  batch_norm_param {{ use_global_stats: true }} }}
layer {{ name: "sc4" type: "Scale" bottom: "bn3" top: "bn3" param {{ lr_mult: 1 }} }}
layer {{ name: "score" type: "Convolution" bottom: "bn3" top: "score"
  convolution_param {{ num_output: 3 kernel_size: 1
                       weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss"
  loss_param {{ ignore_label: 255 }} }}
"""


def make_net(tmp_path, debug_info=False):
    path = tmp_path / "net.prototxt"
    path.write_text(NET + ("debug_info: true\n" if debug_info else ""))
    caffelite.set_random_seed(7)
    net = caffelite.Net(str(path), caffelite.TRAIN)
    rng = np.random.default_rng(0)
    for name, layer in net.layer_dict.items():
        if layer.type == "BatchNorm":
            c = layer.blobs[0].count
            layer.blobs[0].data[...] = rng.standard_normal(c)
            layer.blobs[1].data[...] = rng.uniform(0.5, 2, c)
            layer.blobs[2].data[...] = 0.9
        elif layer.type == "Scale":
            for b in layer.blobs:
                b.data[...] = rng.standard_normal(b.shape)
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].shape)
    labels = rng.integers(0, 3, net.blobs["label"].shape).astype(float)
    labels.flat[::7] = 255
    net.blobs["label"].data[...] = labels
    return net


def run(net):
    net.forward()
    net.clear_param_diffs()
    net.backward()
    with backend.device_access(False):
        blobs = {n: (b.data.copy(), b.diff.copy()) for n, b in net.blobs.items()}
        params = {n: [(p.data.copy(), p.diff.copy()) for p in ps]
                  for n, ps in net.params.items()}
    return blobs, params


def assert_same(a, b, context=""):
    """(blobs, params) of two runs, as ``run`` gives them, equal bit for bit."""
    blobs_a, params_a = a
    blobs_b, params_b = b
    for name in blobs_a:
        for k, what in enumerate(("data", "diff")):
            np.testing.assert_array_equal(blobs_a[name][k], blobs_b[name][k],
                                          err_msg=f"{context}blob {name} {what}")
    for name in params_a:
        for (d1, g1), (d2, g2) in zip(params_a[name], params_b[name]):
            np.testing.assert_array_equal(d1, d2, err_msg=f"{context}param {name}")
            np.testing.assert_array_equal(g1, g2, err_msg=f"{context}param diff {name}")


def test_which_chains_qualify(tmp_path, gpu_mode):
    gpu_mode.on()
    net = make_net(tmp_path)
    chains = fusion.channel_chains(net)
    names = {net._layer_names[i]: [net._layer_names[k] for k in range(c.first, c.last + 1)]
             for i, c in chains.items()}
    # bn3 is not in place, and sc4 learns its scale: both run layer by layer.
    assert names == {"bn1": ["bn1", "sc1", "relu1"], "bn2": ["bn2", "sc2"]}


def test_fused_net_gives_the_layer_by_layer_bits(tmp_path, gpu_mode, monkeypatch):
    gpu_mode.on()
    fused = run(make_net(tmp_path))
    monkeypatch.setattr(fusion, "ENABLED", False)
    unfused = run(make_net(tmp_path))
    assert_same(fused, unfused)
    assert np.isfinite(fused[0]["loss"][0]).all()
    assert np.abs(fused[0]["conv1"][1]).sum() > 0        # gradients reached the chain


def test_fused_chains_run_the_kernels(tmp_path, gpu_mode, monkeypatch):
    gpu_mode.on()
    net = make_net(tmp_path)
    seen = []
    real = fusion.launch
    monkeypatch.setattr(fusion, "launch", lambda m, k, *a: (seen.append(k), real(m, k, *a)))
    net.forward()
    net.backward()
    assert seen.count("channel_bn_scale_relu") == 2
    assert seen.count("channel_bn_scale_relu_backward") == 2


def test_ranges_that_cut_a_chain_and_debug_info_run_layer_by_layer(tmp_path, gpu_mode):
    gpu_mode.on()
    reference = run(make_net(tmp_path))
    net = make_net(tmp_path)
    names = net._layer_names
    cut = names.index("sc1")
    net.forward(end=names[cut])            # ends inside bn1 -> sc1 -> relu1
    net.forward(start=names[cut + 1])
    net.clear_param_diffs()
    net.backward(end=names[cut + 1])       # ends inside the chain
    net.backward(start=names[cut])
    with backend.device_access(False):
        for name in ("conv1", "conv2", "sum", "loss"):
            np.testing.assert_array_equal(net.blobs[name].data, reference[0][name][0])
            np.testing.assert_array_equal(net.blobs[name].diff, reference[0][name][1])
        for name in ("conv1", "conv2"):
            np.testing.assert_array_equal(net.params[name][0].diff,
                                          reference[1][name][0][1])
    # debug_info prints every layer, and force_backward makes every Scale learn (as in
    # Caffe's Net::Init): no fusion.
    net = make_net(tmp_path, debug_info=True)
    assert net._fused_chains() is None
    path = tmp_path / "forced.prototxt"
    path.write_text(NET + "force_backward: true\n")
    assert fusion.channel_chains(caffelite.Net(str(path), caffelite.TRAIN)) == {}


def test_cpu_mode_never_fuses(tmp_path):
    backend.set_mode_cpu()
    net = make_net(tmp_path)
    assert net._fused_chains() is None


def test_out_of_memory_names_the_layer_or_chain(tmp_path, monkeypatch, caplog):
    """A device allocation that fails (CuPy's OutOfMemoryError, a MemoryError) inside a
    layer or a fused chain is one error naming it, what the pools hold where that is
    known, and what needs less memory. One that fails while a pass is being recorded
    into a CUDA graph leaves that segment layer by layer, with a warning saying so, and
    the layer-by-layer pass then names the layer."""
    from caffelite import cuda_graphs
    from caffelite.layers.conv import ConvolutionLayer
    from caffelite.net import NetOutOfMemory

    class OutOfMemoryError(MemoryError):       # what cupy.cuda.memory raises
        pass
    OutOfMemoryError.__module__ = "cupy.cuda.memory"

    def fail(*args):
        raise OutOfMemoryError("Out of memory allocating 1,048,576 bytes "
                               "(allocated so far: 3,221,225,472 bytes).")
    backend.set_mode_gpu(emulate=True)
    try:
        cuda_graphs.set_enabled(False)
        net = make_net(tmp_path)
        with monkeypatch.context() as m:
            m.setattr(fusion.ChannelChain, "forward", fail)
            with pytest.raises(NetOutOfMemory) as chain_error:
                net.forward()
        net.forward()
        with monkeypatch.context() as m:
            m.setattr(ConvolutionLayer, "backward", fail)
            with pytest.raises(NetOutOfMemory) as layer_error:
                net.backward()
        cuda_graphs.set_enabled(True)
        graphed = make_net(tmp_path)
        graphed.forward()                       # eager: the next one records
        with monkeypatch.context() as m, caplog.at_level("WARNING", logger="caffelite"):
            m.setattr(ConvolutionLayer, "forward", fail)
            with pytest.raises(NetOutOfMemory) as recorded_error:
                graphed.forward()
        [failed] = [r for r in graphed._graphs.recordings() if r.failed]
    finally:
        backend.set_mode_cpu()
    assert str(chain_error.value).startswith(
        "layers 'bn1' .. 'relu1' (a fused BatchNorm chain) forward ran out of GPU memory "
        "(Out of memory allocating 1,048,576 bytes (allocated so far: 3,221,225,472 "
        "bytes)). ")
    text = str(layer_error.value)
    assert text.startswith("layer 'score' (Convolution) backward ran out of GPU memory")
    assert "CAFFELITE_DEVICE_WORKSPACE_MB" in text and "--no-cuda-graphs" in text
    assert isinstance(layer_error.value.__cause__, OutOfMemoryError)
    assert failed.failure == "layer 'conv1' (Convolution) forward ran out of memory"
    assert "cannot be recorded (layer 'conv1' (Convolution) forward ran out of memory)" \
        in caplog.text
    assert str(recorded_error.value).startswith(
        "layer 'conv1' (Convolution) forward ran out of GPU memory")


def _reshaped_input(net, shape, rng):
    net.blobs["data"].reshape(*shape)
    net.blobs["label"].reshape(shape[0], 1, *shape[2:])
    net.blobs["data"].data[...] = rng.standard_normal(shape)
    net.blobs["label"].data[...] = rng.integers(0, 3, net.blobs["label"].shape)


@pytest.mark.parametrize("detour", ["net.reshape()", "partial forward", "cpu mode"])
def test_a_chain_reshapes_its_layers_again_after_they_ran_at_another_size(
        tmp_path, gpu_mode, detour):
    """The layers of a chain can be reshaped for another size without the chain
    (net.reshape(), a range that cuts it, a CPU pass); back at the chain's last size
    it must reshape them again, not reuse their stale spatial size."""
    gpu_mode.on()
    net, fresh = make_net(tmp_path), make_net(tmp_path)
    first = net.blobs["data"].shape
    run(net)
    _reshaped_input(net, (1, 3, 5, 11), np.random.default_rng(1))
    if detour == "net.reshape()":
        net.reshape()
    elif detour == "partial forward":
        net.forward(end="sc1")
    else:
        gpu_mode.off()
        net.forward()
        gpu_mode.on()
    for target in (net, fresh):
        _reshaped_input(target, first, np.random.default_rng(2))
    assert_same(run(net), run(fresh), f"after {detour}: ")
