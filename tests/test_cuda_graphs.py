"""CUDA graphs (caffelite/cuda_graphs.py): a pass recorded once and launched whole gives
the bits of the layer-by-layer pass, iteration after iteration, while inputs, weights,
shapes and memory change under it.

The oracle is the same net run eagerly (graphs off): a launch must repeat the eager
pass's operations in order, so every blob, diff and parameter is compared for equality.
On the emulator, a stream capture records operations without running them and refuses
host reads, host-to-device copies and random draws (kernels/emulated_capture.py), so a
layer that relied on anything a graph does not replay gives other numbers from the
second iteration on, or fails to record. The same tests run on a GPU with CuPy's real
capture (-m gpu).
"""
import logging
import re

import numpy as np
import pytest

import caffelite
from caffelite import backend, cuda_graphs
from caffelite import blob as blob_module
from caffelite.kernels import emulated_capture, emulator
from caffelite.io import prototxt
from caffelite.layer import LAYER_REGISTRY
from caffelite.proto import caffe_pb2
from caffelite.solver import Solver
import test_fusion as fusion_test
from gpu_modes import gpu_mode  # noqa: F401  (fixture)

GAUSS = 'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 }'


def conv_param(n, k, p):
    return f"convolution_param {{ num_output: {n} kernel_size: {k} pad: {p} {GAUSS} }}"


HEAD = f"""
input: "data" input_shape {{ dim: 2 dim: 3 dim: 8 dim: 8 }}
input: "label" input_shape {{ dim: 2 dim: 1 dim: 8 dim: 8 }}
layer {{ name: "conv0" type: "Convolution" bottom: "data" top: "x" {conv_param(4, 3, 1)} }}
"""
TAIL = f"""
layer {{ name: "score" type: "Convolution" bottom: "y" top: "score" {conv_param(3, 1, 0)} }}
layer {{ name: "fit" type: "Interp" bottom: "score" top: "score_fit"
  interp_param {{ height: 8 width: 8 }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "score_fit" bottom: "label" top: "loss"
  loss_param {{ ignore_label: 255 }} }}
"""

# Between HEAD and TAIL: from blob "x" (2, 4, 8, 8) to blob "y" (4-D), using the type.
BODIES = {
    "Convolution": f"""layer {{ name: "c" type: "Convolution" bottom: "x" top: "y"
        convolution_param {{ num_output: 4 kernel_size: 3 dilation: 2 pad: 2 group: 2
        {GAUSS} }} }}""",
    "Deconvolution": f"""layer {{ name: "d" type: "Deconvolution" bottom: "x" top: "y"
        convolution_param {{ num_output: 3 kernel_size: 4 stride: 2 pad: 1 {GAUSS} }} }}""",
    "BatchNorm": """layer { name: "bn" type: "BatchNorm" bottom: "x" top: "b"
        batch_norm_param { use_global_stats: false moving_average_fraction: 0.9 } }
        layer { name: "bnf" type: "BatchNorm" bottom: "b" top: "y"
        batch_norm_param { use_global_stats: true } }""",
    "BN": """layer { name: "bn" type: "BN" bottom: "x" top: "b"
        bn_param { slope_filler { type: "gaussian" std: 1 } momentum: 0.9 } }
        layer { name: "bnf" type: "BN" bottom: "b" top: "y"
        bn_param { slope_filler { type: "constant" value: 1.5 } frozen: true } }""",
    "Scale": """layer { name: "s" type: "Scale" bottom: "x" top: "y"
        scale_param { bias_term: true filler { type: "gaussian" std: 1 } } }""",
    "Bias": """layer { name: "b" type: "Bias" bottom: "x" top: "y"
        bias_param { filler { type: "gaussian" std: 1 } } }""",
    "ReLU": """layer { name: "r" type: "ReLU" bottom: "x" top: "x"
        relu_param { negative_slope: 0.1 } }
        layer { name: "r2" type: "ReLU" bottom: "x" top: "y" }""",
    "PReLU": """layer { name: "p" type: "PReLU" bottom: "x" top: "y"
        prelu_param { filler { type: "constant" value: 0.3 } } }""",
    "ELU": """layer { name: "e" type: "ELU" bottom: "x" top: "y" elu_param { alpha: 0.7 } }""",
    "Sigmoid": """layer { name: "s" type: "Sigmoid" bottom: "x" top: "y" }""",
    "TanH": """layer { name: "t" type: "TanH" bottom: "x" top: "y" }""",
    "AbsVal": """layer { name: "a" type: "AbsVal" bottom: "x" top: "y" }""",
    "Power": """layer { name: "p" type: "Power" bottom: "x" top: "y"
        power_param { power: 2 scale: 0.5 shift: 1 } }""",
    "Exp": """layer { name: "t" type: "TanH" bottom: "x" top: "t" }
        layer { name: "e" type: "Exp" bottom: "t" top: "y" exp_param { scale: 0.5 } }""",
    "Log": """layer { name: "a" type: "AbsVal" bottom: "x" top: "a" }
        layer { name: "l" type: "Log" bottom: "a" top: "y" log_param { shift: 1 } }""",
    "BNLL": """layer { name: "b" type: "BNLL" bottom: "x" top: "y" }""",
    "Clip": """layer { name: "c" type: "Clip" bottom: "x" top: "y"
        clip_param { min: -0.5 max: 0.7 } }""",
    "Swish": """layer { name: "s" type: "Swish" bottom: "x" top: "y"
        swish_param { beta: 1.5 } }""",
    "Threshold": """layer { name: "t" type: "Threshold" bottom: "x" top: "t"
        threshold_param { threshold: 0.1 } }
        layer { name: "block" type: "Silence" bottom: "t" }
        layer { name: "id" type: "Power" bottom: "x" top: "y" }""",
    "Eltwise": """layer { name: "c" type: "Convolution" bottom: "x" top: "x2"
        convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "gaussian"
        std: 0.5 } } }
        layer { name: "sum" type: "Eltwise" bottom: "x" bottom: "x2" top: "s"
        eltwise_param { operation: SUM coeff: 0.5 coeff: -2 } }
        layer { name: "prod" type: "Eltwise" bottom: "s" bottom: "x2" top: "p"
        eltwise_param { operation: PROD } }
        layer { name: "max" type: "Eltwise" bottom: "p" bottom: "x" top: "y"
        eltwise_param { operation: MAX } }""",
    "InnerProduct": f"""layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "v"
        inner_product_param {{ num_output: 48 {GAUSS} }} }}
        layer {{ name: "r" type: "Reshape" bottom: "v" top: "y"
        reshape_param {{ shape {{ dim: 0 dim: 3 dim: 4 dim: 4 }} }} }}""",
    "Interp": """layer { name: "i" type: "Interp" bottom: "x" top: "y"
        interp_param { zoom_factor: 2 pad_beg: 0 pad_end: -1 } }""",
    "Pooling": """layer { name: "m" type: "Pooling" bottom: "x" top: "m"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
        layer { name: "a" type: "Pooling" bottom: "m" top: "y"
        pooling_param { pool: AVE kernel_size: 2 stride: 1 pad: 1 } }""",
    "Softmax": """layer { name: "s" type: "Softmax" bottom: "x" top: "y" }""",
    "SoftmaxWithLoss": """layer { name: "aux" type: "SoftmaxWithLoss" bottom: "x"
        bottom: "label" top: "aux" loss_weight: 0.5
        loss_param { normalization: FULL ignore_label: 255 } }
        layer { name: "id" type: "Power" bottom: "x" top: "y" }""",
    "Concat": """layer { name: "c" type: "Concat" bottom: "x" bottom: "x" top: "y" }""",
    "Slice": """layer { name: "s" type: "Slice" bottom: "x" top: "a" top: "b"
        slice_param { slice_point: 1 } }
        layer { name: "c" type: "Concat" bottom: "b" bottom: "a" top: "y" }""",
    "Split": """layer { name: "sp" type: "Split" bottom: "x" top: "a" top: "b" }
        layer { name: "c" type: "Eltwise" bottom: "a" bottom: "b" top: "y"
        eltwise_param { operation: PROD } }""",
    "Flatten": """layer { name: "f" type: "Flatten" bottom: "x" top: "f" }
        layer { name: "r" type: "Reshape" bottom: "f" top: "y"
        reshape_param { shape { dim: 2 dim: -1 dim: 8 dim: 8 } } }""",
    "Reshape": """layer { name: "r" type: "Reshape" bottom: "x" top: "y"
        reshape_param { shape { dim: 0 dim: 8 dim: 4 dim: -1 } } }""",
    "Crop": """layer { name: "p" type: "Pooling" bottom: "x" top: "small"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
        layer { name: "c" type: "Crop" bottom: "x" bottom: "small" top: "y"
        crop_param { axis: 2 offset: 1 offset: 2 } }""",
    "Silence": """layer { name: "t" type: "TanH" bottom: "x" top: "t" }
        layer { name: "quiet" type: "Silence" bottom: "t" }
        layer { name: "id" type: "Power" bottom: "x" top: "y" }""",
    "LRN": """layer { name: "across" type: "LRN" bottom: "x" top: "l"
        lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 } }
        layer { name: "within" type: "LRN" bottom: "l" top: "y"
        lrn_param { local_size: 3 alpha: 0.5 norm_region: WITHIN_CHANNEL } }""",
    "Dropout": """layer { name: "drop" type: "Dropout" bottom: "x" top: "x"
        dropout_param { dropout_ratio: 0.5 } }
        layer { name: "drop2" type: "Dropout" bottom: "x" top: "y"
        dropout_param { dropout_ratio: 0.2 } }""",
}


def graph_safe_types():
    """Every registered type whose layers may be recorded (in some configuration)."""
    return sorted(name for name, cls in LAYER_REGISTRY.items()
                  if name == cls.type_name and
                  any(c.__dict__.get("graph_safe", False) is not False for c in cls.__mro__))


def test_every_graph_safe_type_is_tested_here():
    assert set(graph_safe_types()) <= set(BODIES), \
        f"graph-safe types without a case here: {set(graph_safe_types()) - set(BODIES)}"


def solver_for(net_text, tmp_path, iter_size=2, phase_test=False):
    param = caffe_pb2.SolverParameter()
    net_param, _ = prototxt.parse_net(net_text)
    param.train_net_param.CopyFrom(net_param)
    param.base_lr = 0.005
    param.lr_policy = "poly"
    param.power = 0.9
    param.max_iter = 100
    param.momentum = 0.9
    param.weight_decay = 5e-4
    param.iter_size = iter_size
    param.display = 0
    param.snapshot_prefix = str(tmp_path / "snap")
    caffelite.set_random_seed(11)
    return Solver(param)


def feed(net, rng):
    data, label = net.blobs["data"], net.blobs["label"]
    data.data[...] = rng.standard_normal(data.shape)
    labels = rng.integers(0, 3, label.shape).astype(np.float32)
    labels.flat[::5] = 255
    label.data[...] = labels


def unit_statistics(net):
    """Stored BatchNorm statistics of mean 0 and variance 1 (zero-filled ones divide by
    sqrt(eps))."""
    for layer in net.layers:
        if layer.type == "BatchNorm":
            layer.blobs[1].data[...] = 1
            layer.blobs[2].data[...] = 1


def snapshot(net, param_data=True):
    """Copies of every blob and parameter. The data is read as a read-only host access
    (both sides stay valid), the diff as a mutable one (the host side becomes newest), so
    the passes that follow meet blobs in both states. ``param_data=False``: passes
    without a solver step leave the weights as they are, so only the parameter diffs
    are kept, each shared one once (ResNet-101 MSC's weights, three times over, made
    these copies take gigabytes)."""
    def values(b):
        return b.read_host_data().copy(), b.host_diff.copy()
    blobs = {n: values(b) for n, b in net.blobs.items()}
    if param_data:
        return blobs, {n: [values(p) for p in ps] for n, ps in net.params.items()}
    params, seen = {}, set()
    for name, ps in net.params.items():
        params[name] = []
        for p in ps:
            diff = p.host_diff
            address = diff.__array_interface__["data"][0]
            if address not in seen:
                seen.add(address)
                params[name].append((None, diff.copy()))
    return blobs, params


def assert_same(a, b, what):
    fusion_test.assert_same(a, b, f"{what}: ")


def train(gpu_mode, net_text, tmp_path, graphs, steps=4, between=None):
    """Solver steps with new inputs each time: per step, every blob and parameter."""
    cuda_graphs.set_enabled(graphs)
    try:
        gpu_mode.on()
        solver = solver_for(net_text, tmp_path)
        unit_statistics(solver.net)
        rng = np.random.default_rng(3)
        out = []
        for step in range(steps):
            feed(solver.net, rng)
            if between is not None:
                between(solver.net, step)
            solver.step(1)
            out.append(snapshot(solver.net))
        return out, solver
    finally:
        cuda_graphs.set_enabled(False)
        gpu_mode.off()


def launches(net):
    return net._graphs.launches()


def compare_runs(eager, graphed):
    assert len(eager) == len(graphed)
    for step, (a, b) in enumerate(zip(eager, graphed)):
        assert_same(a, b, f"step {step}")
    blobs, params = eager[-1]
    for name, (data, diff) in blobs.items():    # the runs trained, and stayed finite
        assert np.isfinite(data).all() and np.isfinite(diff).all(), name
    assert any(np.abs(diff).max() > 0 for ps in params.values() for _, diff in ps)


@pytest.mark.parametrize("kind", ["Pooling", "Interp"])
def test_layer_by_layer_training_gives_the_same_bits_twice(tmp_path, gpu_mode, kind):
    """The premise of the comparisons below: without graphs, two runs of the same
    training give the same bits, on a GPU too. These nets really resample in Interp,
    whose device backward adds its terms in a fixed order (an atomic scatter would
    not)."""
    text = HEAD + BODIES[kind] + TAIL
    first, _ = train(gpu_mode, text, tmp_path, graphs=False)
    second, _ = train(gpu_mode, text, tmp_path, graphs=False)
    compare_runs(first, second)


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_training_with_graphs_gives_the_eager_bits(tmp_path, gpu_mode, kind):
    """Four solver steps (iter_size 2, momentum, poly lr), new data each step: equal to
    the eager run's every blob and parameter, data and diff, with graphs launched."""
    text = HEAD + BODIES[kind] + TAIL
    eager, _ = train(gpu_mode, text, tmp_path, graphs=False)
    graphed, solver = train(gpu_mode, text, tmp_path, graphs=True)
    compare_runs(eager, graphed)
    graphs = solver.net._graphs
    assert len(graphs.segments) == 1 and graphs.segments[0].first == 0
    for rec in (graphs.segments[0].fwd, graphs.segments[0].bwd):
        assert not rec.failed
        assert rec.launches >= 5        # 8 passes: eager, record + launch, 6 launches


def test_test_phase_net_forward_with_graphs(tmp_path, gpu_mode):
    """A TEST net (Dropout as identity, BatchNorm with stored statistics) forward only:
    the graph's outputs follow new inputs."""
    text = HEAD + BODIES["Dropout"] + BODIES["BatchNorm"].replace('bottom: "x" top: "b"',
                                                                 'bottom: "y" top: "b"') \
        .replace('top: "y"', 'top: "z"') + TAIL.replace('bottom: "y"', 'bottom: "z"')
    path = tmp_path / "test.prototxt"
    path.write_text(text)
    results = {}
    for graphs in (False, True):
        cuda_graphs.set_enabled(graphs)
        gpu_mode.on()
        caffelite.set_random_seed(2)
        net = caffelite.Net(str(path), caffelite.TEST)
        unit_statistics(net)
        rng = np.random.default_rng(4)
        results[graphs] = []
        for _ in range(4):
            feed(net, rng)
            loss = net.forward()["loss"].copy()
            results[graphs].append((loss, snapshot(net)))
        if graphs:
            assert launches(net) == 3
        gpu_mode.off()
    cuda_graphs.set_enabled(False)
    for (la, va), (lb, vb) in zip(results[False], results[True]):
        np.testing.assert_array_equal(lb, la)
        assert_same(va, vb, "test forward")


def test_fused_chains_inside_graphs(tmp_path, gpu_mode):
    """The fusion test's ResNet-like net (fused BatchNorm -> Scale -> ReLU chains, Eltwise,
    a learned Scale): the graphs record the fused kernels."""
    text = fusion_test.NET
    eager, _ = train(gpu_mode, text, tmp_path, graphs=False)
    graphed, solver = train(gpu_mode, text, tmp_path, graphs=True)
    compare_runs(eager, graphed)
    assert launches(solver.net) >= 10


def test_host_reads_and_writes_between_passes(tmp_path, gpu_mode):
    """Between steps, every blob is read on the host (both sides valid) and, every other
    step, a weight is written on the host: a launch uploads the write in place and leaves
    the blobs' newest side where the eager pass leaves it."""
    def between(net, step):
        for blob in list(net.blobs.values()) + [b for ps in net.params.values() for b in ps]:
            blob.read_host_data()
            if step == 1:
                blob.host_data      # a mutable host access: the host side becomes newest
        if step % 2:
            net.params["score"][0].data[...] *= 0.5

    text = HEAD + BODIES["Convolution"] + TAIL
    eager, _ = train(gpu_mode, text, tmp_path, graphs=False, between=between)
    graphed, solver = train(gpu_mode, text, tmp_path, graphs=True, between=between)
    compare_runs(eager, graphed)
    assert launches(solver.net) >= 10


def test_new_shapes_and_new_memory_are_recorded_again(tmp_path, gpu_mode):
    """A larger batch (step 2), a weight given new memory (step 4), a forward that stops
    inside the segment (step 5) and a forward on the CPU (step 6) each make the segment
    run eagerly or be recorded again; the numbers stay the eager run's."""
    def between(net, step):
        if step == 2:
            net.blobs["data"].reshape(3, 3, 8, 8)
            net.blobs["label"].reshape(3, 1, 8, 8)
            feed(net, np.random.default_rng(step))
        if step == 4:
            weights = net.params["conv0"][0]
            with backend.device_access(False):
                weights.set_data_array(weights.data * np.float32(0.9))
        if step == 5:
            net.forward(end="c")
        if step == 6:
            backend.set_mode_cpu()
            net.forward()
            gpu_mode.on()

    text = HEAD + BODIES["Convolution"] + TAIL
    eager, _ = train(gpu_mode, text, tmp_path, graphs=False, between=between, steps=8)
    graphed, solver = train(gpu_mode, text, tmp_path, graphs=True, between=between, steps=8)
    compare_runs(eager, graphed)
    fwd = solver.net._graphs.segments[0].fwd
    assert fwd.launches >= 6 and not fwd.failed


def test_a_net_reshape_at_another_size_in_between_is_not_launched_over(tmp_path, gpu_mode):
    """pycaffe's net.reshape() for another batch (no forward), then back: the inputs'
    shapes and every memory match the recording, but the blobs inside the segment have
    the other shapes, and a launch skips the reshapes that would set them back."""
    def between(net, step):
        if step in (3, 5):
            for name, shape in (("data", (1, 3, 8, 8)), ("label", (1, 1, 8, 8))):
                net.blobs[name].reshape(*shape)
            net.reshape()
            for name, shape in (("data", (2, 3, 8, 8)), ("label", (2, 1, 8, 8))):
                net.blobs[name].reshape(*shape)
            feed(net, np.random.default_rng(step))

    text = HEAD + BODIES["Convolution"] + TAIL
    eager, _ = train(gpu_mode, text, tmp_path, graphs=False, between=between, steps=7)
    graphed, solver = train(gpu_mode, text, tmp_path, graphs=True, between=between, steps=7)
    compare_runs(eager, graphed)
    assert launches(solver.net) >= 4


def test_the_shape_key_is_rebuilt_only_after_some_blob_changed_shape(tmp_path, gpu_mode):
    """A launch checks one counter of shape changes instead of every blob's shape; any
    blob's reshape (in the segment or not) makes the next key read the shapes again."""
    shapes_read = []

    def between(net, step):
        if step == 1 and net._graphs is not None:
            rec = net._graphs.segments[0].fwd
            real = rec._blob_shapes
            rec._blob_shapes = lambda: (shapes_read.append(rec._shapes_at != blob_module.
                                                           shape_changes()), real())[1]
        if step == 4:       # same shapes again: a change counted, the key still matches
            net.blobs["loss"].reshape(2)
            net.blobs["loss"].reshape(())

    text = HEAD + BODIES["Convolution"] + TAIL
    eager, _ = train(gpu_mode, text, tmp_path, graphs=False, between=between, steps=6)
    shapes_read.clear()
    graphed, solver = train(gpu_mode, text, tmp_path, graphs=True, between=between, steps=6)
    compare_runs(eager, graphed)
    # steps 1..5, two passes each (iter_size 2), all launched; only the first pass of
    # step 4 reads the shapes again
    assert shapes_read == [False] * 6 + [True] + [False] * 3
    assert solver.net._graphs.segments[0].fwd.launches >= 10


def test_a_launch_leaves_the_heads_of_memory_it_does_not_write(gpu_mode):
    """A blob the backward graph does not write was synced (a const host read) when
    the graph was recorded; a later forward launch rewrites it on the device, and the
    backward launch must not mark it synced again (pycaffe then read stale values)."""
    text = """input: "data" input_shape { dim: 1 dim: 1 dim: 2 dim: 2 }
    force_backward: true
    layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
      convolution_param { num_output: 1 kernel_size: 1
        weight_filler { type: "constant" value: 1 } } }
    layer { name: "c2" type: "Convolution" bottom: "c1" top: "c2"
      convolution_param { num_output: 1 kernel_size: 1
        weight_filler { type: "constant" value: 1 } } }
    layer { name: "t" type: "TanH" bottom: "c2" top: "t" }
    layer { name: "loss" type: "Power" bottom: "t" top: "loss" loss_weight: 1 }"""
    cuda_graphs.set_enabled(True)
    try:
        gpu_mode.on()
        net = caffelite.Net(param=prototxt.parse_net(text)[0], phase=caffelite.TRAIN)
        net.blobs["data"].data[...] = 1
        net.forward_backward()
        net.forward()                           # the forward graph is recorded
        net.blobs["c2"].read_host_data()        # both sides valid
        net.backward()                          # the backward graph is recorded
        net.blobs["data"].data[...] = 5
        net.forward_backward()                  # both launched
        assert launches(net) >= 4
        assert net.blobs["c2"].data.ravel().tolist() == [5, 5, 5, 5]
    finally:
        cuda_graphs.set_enabled(False)
        gpu_mode.off()


HELD_VIEW_NET = """input: "data" input_shape { dim: 2 dim: 3 dim: 5 dim: 5 }
input: "label" input_shape { dim: 2 dim: 1 dim: 1 dim: 1 }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1
    weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu" type: "ReLU" bottom: "c1" top: "c1" }
layer { name: "ip" type: "InnerProduct" bottom: "c1" top: "score"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }"""


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_writes_through_views_held_across_a_launch_reach_the_next_pass(gpu_mode, graphs):
    """A launch leaves memory its pass does not use on the side that is newest (a diff in
    a forward, a bias in a backward), as the eager pass does: a host view taken before
    the pass and written after it is what the next pass uses."""
    caffelite.set_random_seed(1)
    cuda_graphs.set_enabled(graphs)
    try:
        gpu_mode.on()
        net = caffelite.Net(param=prototxt.parse_net(HELD_VIEW_NET)[0],
                            phase=caffelite.TRAIN)
        net.blobs["data"].data[...] = np.random.default_rng(0).normal(size=(2, 3, 5, 5))
        net.blobs["label"].data[...] = np.array([0, 2]).reshape(2, 1, 1, 1)
        for _ in range(3):                      # eager, recorded, launched
            net.forward_backward()
        weight_diff = net.params["c1"][0].diff  # the host is the newest side
        net.forward()
        weight_diff[...] = 100
        net.backward()                          # adds this pass's gradient to the 100s
        gradient = net.params["c1"][0].diff - 100
        assert np.abs(gradient).max() < 50 and np.abs(gradient).max() > 0
        bias = net.params["ip"][1].data
        net.backward()
        bias[...] = 5
        net.forward()
        assert net.params["ip"][1].data.tolist() == [5, 5, 5]
        np.testing.assert_allclose(
            net.blobs["score"].data - 5,
            net.blobs["c1"].data.reshape(2, -1) @ net.params["ip"][0].data.T,
            rtol=1e-5, atol=1e-5)
        assert not graphs or launches(net) >= 6
    finally:
        cuda_graphs.set_enabled(False)
        gpu_mode.off()


def test_a_dropped_net_with_graphs_is_freed_at_once(tmp_path, gpu_mode):
    """The net holds its graphs, and they hold the net (and a recording its segment)
    weakly: `del net` frees it, its blobs' device memory and the graphs without waiting
    for the cyclic collector."""
    import gc
    import weakref
    text = HEAD + BODIES["Convolution"] + TAIL
    cuda_graphs.set_enabled(True)
    gc.disable()
    try:
        gpu_mode.on()
        solver = solver_for(text, tmp_path)
        for _ in range(3):
            solver.step(1)
        assert launches(solver.net) >= 1
        refs = [weakref.ref(solver.net), weakref.ref(solver.net.blobs["y"]),
                weakref.ref(solver.net._graphs.segments[0])]
        del solver
        assert [r() for r in refs] == [None] * 3
    finally:
        gc.enable()
        cuda_graphs.set_enabled(False)
        gpu_mode.off()


def test_blob_shape_changes_count_only_real_changes():
    b = caffelite.Blob((2, 3))
    start = blob_module.shape_changes()
    b.reshape(2, 3)
    b.set_data_array(np.zeros((2, 3), np.float32))
    assert blob_module.shape_changes() == start
    b.reshape(3, 2)
    assert blob_module.shape_changes() == start + 1
    b.set_data_array(np.zeros(6, np.float32))
    assert blob_module.shape_changes() == start + 2 and b.shape == (6,) and b.count == 6


@pytest.mark.parametrize("eager_forward", ["partial", "debug_info"])
def test_a_backward_after_an_eager_forward_runs_eagerly(tmp_path, gpu_mode, eager_forward):
    """Training BatchNorm keeps its normalised input for the backward. After a forward
    that ran eagerly (one that stops inside the segment, or one with debug_info, which
    runs layer by layer) the backward must read the arrays it made, not those of the
    recorded forward: it runs eagerly, and the forward is recorded again."""
    text = HEAD + BODIES["BatchNorm"] + TAIL
    runs = {}
    for graphs in (False, True):
        cuda_graphs.set_enabled(graphs)
        gpu_mode.on()
        try:
            solver = solver_for(text, tmp_path)
            net = solver.net
            rng = np.random.default_rng(8)
            for _ in range(3):
                feed(net, rng)
                net.forward_backward()
            feed(net, rng)
            if eager_forward == "partial":
                net.forward(end="bn")
            else:
                net.debug_info = True
                net.forward()
                net.debug_info = False
            net.clear_param_diffs()
            net.backward()
            runs[graphs] = snapshot(net)
            if graphs:      # passes 2 and 3, each way; none after the partial forward
                assert launches(net) == 4
                assert net._graphs.segments[0].fwd.graph is None    # recorded again
        finally:
            cuda_graphs.set_enabled(False)
            gpu_mode.off()
    assert_same(runs[False], runs[True], f"backward after a {eager_forward} forward")


def test_graphs_keep_the_memory_they_use_alive(tmp_path, gpu_mode):
    """A recording keeps the column workspace and the arrays its layers hold (BatchNorm's
    statistics buffer ...), so memory a launch writes stays its own when their owners
    let it go: after the workspace is released and an array allocated in its place, the
    next steps leave that array alone and still give the eager numbers."""
    from caffelite.layers import im2col
    junk = {}

    def between(net, step):
        if step == 3:
            xp = backend.device_module()
            junk["workspace"] = im2col.workspace_buffers()[xp.__name__]
            im2col.release_workspace()
            junk["array"] = xp.full(1 << 16, np.nan, np.float32)

    text = HEAD + BODIES["BatchNorm"].replace("use_global_stats: false",
                                              "use_global_stats: true") + TAIL
    eager, _ = train(gpu_mode, text, tmp_path, graphs=False, between=between, steps=5)
    graphed, solver = train(gpu_mode, text, tmp_path, graphs=True, between=between, steps=5)
    compare_runs(eager, graphed)
    assert np.isnan(backend.to_host(junk["array"])).all()
    seg = solver.net._graphs.segments[0]
    bn = solver.net.layer_dict["bnf"]
    assert any(a is bn._stats_buffer for a in seg.fwd.kept)
    for rec in (seg.fwd, seg.bwd):
        assert rec.launches >= 5
        assert any(a is junk["workspace"] for a in rec.kept)


def test_dropout_draws_new_masks_at_every_launch(tmp_path, gpu_mode):
    """Dropout's generator counter advances on the device, so a graph that recorded a
    training Dropout draws a new mask at each launch, the eager run's masks; after
    set_random_seed (step 3) both restart from the new seed."""
    def between(net, step):
        if step == 3:
            backend.set_random_seed(99)

    text = HEAD + BODIES["Dropout"] + TAIL
    eager, _ = train(gpu_mode, text, tmp_path, graphs=False, between=between, steps=6)
    graphed, solver = train(gpu_mode, text, tmp_path, graphs=True, between=between,
                            steps=6)
    compare_runs(eager, graphed)
    assert launches(solver.net) >= 14
    masks = [step[0]["y"][0] == 0 for step in graphed]
    assert all(not np.array_equal(a, b) for a, b in zip(masks, masks[1:]))


def test_random_layers_split_the_net_into_segments(tmp_path, gpu_mode):
    """Stochastic pooling in training draws from CuPy's generator, whose state a graph
    would freeze, so it runs outside the graphs, between two recorded segments; its
    windows still change from pass to pass."""
    body = (BODIES["Scale"].replace('top: "y"', 'top: "s1"') +
            """layer { name: "t1" type: "TanH" bottom: "s1" top: "s2" }
               layer { name: "p1" type: "Power" bottom: "s2" top: "s"
               power_param { scale: 2 } }""" +
            """layer { name: "drop" type: "Pooling" bottom: "s" top: "sp"
               pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 1 } }""" +
            BODIES["TanH"].replace('bottom: "x"', 'bottom: "sp"').replace('top: "y"',
                                                                       'top: "t"') +
            BODIES["Power"].replace('bottom: "x"', 'bottom: "t"'))
    text = HEAD + body + TAIL
    eager, _ = train(gpu_mode, text, tmp_path, graphs=False)
    graphed, solver = train(gpu_mode, text, tmp_path, graphs=True)
    compare_runs(eager, graphed)
    net = solver.net
    drop = net._layer_names.index("drop")
    assert [(s.first, s.last) for s in net._graphs.segments] == [
        (0, drop - 1), (drop + 1, len(net.layers) - 1)]
    assert all(r.launches >= 5 for r in net._graphs.recordings())
    pooled = [step[0]["sp"][0] for step in graphed]
    assert not np.array_equal(pooled[-1], pooled[-2])


def test_a_segment_that_cannot_be_recorded_runs_layer_by_layer(tmp_path, gpu_mode,
                                                               monkeypatch, caplog):
    """A layer that reads the device on the host inside a segment: the recording fails
    (CuPy and the emulator refuse the read), one warning names the segment, and the
    pass runs eagerly with the same numbers from then on."""
    from caffelite.layers.softmax import SoftmaxWithLossLayer
    plain = SoftmaxWithLossLayer._forward_device
    recording = []

    def reads_the_host(self, xp, bottom, top):
        recording.append(backend.capturing())
        float(bottom[0].data.sum())
        return plain(self, xp, bottom, top)
    monkeypatch.setattr(SoftmaxWithLossLayer, "_forward_device", reads_the_host)
    text = HEAD + BODIES["Convolution"] + TAIL
    eager, _ = train(gpu_mode, text, tmp_path, graphs=False)
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        graphed, solver = train(gpu_mode, text, tmp_path, graphs=True)
    compare_runs(eager, graphed)
    seg = solver.net._graphs.segments[0]
    assert seg.fwd.failed and seg.fwd.launches == 0 and seg.bwd.launches == 0
    warnings = [r.getMessage() for r in caplog.records if "CUDA graphs" in r.getMessage()]
    assert len(warnings) == 1 and "forward of layers conv0 .. loss" in warnings[0]
    assert seg.fwd.failure and seg.fwd.failure in warnings[0]    # kept for the reports
    if gpu_mode.emulated:       # the first error is the one reported
        assert "float() of a device array" in warnings[0]
    # eager run (x4 in the eager solver), then in the graphed one: eager, the failed
    # recording, and eager passes that no longer see a recording under way
    assert recording[8:] == [False, True] + [False] * 7


def test_a_bad_label_is_named_when_graphs_run(tmp_path, gpu_mode):
    """A graph leaves out SoftmaxWithLoss's host check; the NaN loss makes the Net ask
    the launched layers for it (check_recorded_inputs), which names the label as
    without graphs."""
    text = HEAD + BODIES["Convolution"] + TAIL
    _, solver = train(gpu_mode, text, tmp_path, graphs=True, steps=3)
    assert launches(solver.net) > 0
    cuda_graphs.set_enabled(True)
    gpu_mode.on()
    try:
        solver.net.blobs["label"].data[0, 0, 2, 3] = 7
        with pytest.raises(caffelite.layer.LayerError, match="label value 7 is out of range"):
            solver.net.forward_backward()
    finally:
        cuda_graphs.set_enabled(False)
        gpu_mode.off()


def test_a_nan_loss_with_graphs_runs_nothing_twice(gpu_mode):
    """A pass that launched graphs and gave a NaN loss looks for a bad label without
    running the layers again: BatchNorm's running statistics and Dropout's generator
    advance once, as without graphs."""
    text = """input: "data" input_shape { dim: 2 dim: 2 dim: 3 dim: 3 }
    layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
      convolution_param { num_output: 2 kernel_size: 1
        weight_filler { type: "constant" value: 0.5 } } }
    layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv"
      param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 }
      batch_norm_param { use_global_stats: false } }
    layer { name: "drop" type: "Dropout" bottom: "conv" top: "drop" }
    layer { name: "conv2" type: "Convolution" bottom: "drop" top: "conv2"
      convolution_param { num_output: 2 kernel_size: 1
        weight_filler { type: "constant" value: 0.5 } } }
    layer { name: "loss" type: "Power" bottom: "conv2" top: "loss" loss_weight: 1
      power_param { power: 2 } }"""

    def run(graphs):
        cuda_graphs.set_enabled(graphs)
        try:
            gpu_mode.on()
            caffelite.set_random_seed(1)
            net = caffelite.Net(param=prototxt.parse_net(text)[0], phase=caffelite.TRAIN)
            data = np.arange(36, dtype=np.float32).reshape(2, 2, 3, 3) / 36
            losses = []
            for step in range(6):
                poisoned = data.copy()
                if step == 3:
                    poisoned[0, 0, 0, 0] = np.nan
                net.blobs["data"].data[...] = poisoned
                losses.append(net.forward_from_to())
            return losses, [b.read_host_data().copy() for b in net.params["bn"]], net
        finally:
            cuda_graphs.set_enabled(False)
            gpu_mode.off()

    (eager, eager_bn, _), (graphed, graphed_bn, net) = run(False), run(True)
    assert launches(net) >= 3 and np.isnan(eager[3])
    np.testing.assert_array_equal(graphed, eager)
    for a, b in zip(graphed_bn, eager_bn):
        np.testing.assert_array_equal(a, b)


def test_a_bad_label_of_a_list_names_its_line_when_graphs_run(tmp_path, gpu_mode):
    """After a graph's NaN loss the label check runs on the batch the pass read, and
    the error names its list line (running the data layer again would read the next
    batch, and the bad label of this one would be named nowhere)."""
    from PIL import Image
    labels = [1, 0, 2, 1, 0, 1, 7, 1]                  # line 7: class 7 of 5
    for i in range(len(labels)):
        Image.fromarray(np.full((4, 4, 3), 10 * i, np.uint8)).save(tmp_path / f"s{i}.png")
    (tmp_path / "cls.txt").write_text("".join(f"s{i}.png {label}\n"
                                              for i, label in enumerate(labels)))
    (tmp_path / "net.prototxt").write_text(f"""
layer {{ name: "d" type: "ImageData" top: "data" top: "label"
  image_data_param {{ source: "{tmp_path / 'cls.txt'}" root_folder: "{tmp_path}/"
                     batch_size: 2 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: 5 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "ip" top: "ip" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip" top: "ip2"
  inner_product_param {{ num_output: 5 }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "ip2" top: "ip2" }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
""")
    cuda_graphs.set_enabled(True)
    gpu_mode.on()
    try:
        net = caffelite.Net(str(tmp_path / "net.prototxt"), caffelite.TRAIN)
        for _ in range(3):
            assert np.isfinite(float(net.forward()["loss"]))
        assert launches(net) > 0
        with pytest.raises(caffelite.layer.LayerError,
                           match=r"label value 7 is out of range.*; item 0 of the batch is "
                                 r"line 7 of '.*cls\.txt' \(ImageData layer 'd'\)$"):
            net.forward()
    finally:
        cuda_graphs.set_enabled(False)
        gpu_mode.off()


def test_graphs_need_gpu_mode_and_no_debug_info(tmp_path):
    text = HEAD + BODIES["Convolution"] + TAIL
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    cuda_graphs.set_enabled(True)
    try:
        net = caffelite.Net(str(path), caffelite.TRAIN)
        net.forward()
        assert net._graphs is None                   # CPU mode
        backend.set_mode_gpu(emulate=True)
        net.debug_info = True
        net.forward()
        assert net._graphs is None
    finally:
        cuda_graphs.set_enabled(False)
        backend.set_mode_cpu()


# ----------------------------------------------------------- the emulator's capture
@pytest.fixture
def emulated():
    backend.set_mode_gpu(emulate=True)
    yield emulator
    backend.set_mode_cpu()


def capture(xp, work):
    stream = xp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            work()
        finally:
            graph = stream.end_capture() if emulated_capture.active() else None
    return graph


def test_emulated_capture_records_writes_and_results_without_running_them(emulated):
    xp = emulated
    a = xp.asarray(np.arange(4, dtype=np.float32))
    out = xp.zeros(4, np.float32)
    kept = {}

    def work():
        kept["doubled"] = a * 2                       # a new array: recomputed at launch
        kept["view"] = a[1:3]                         # a view: not an operation
        xp.add(kept["doubled"], 1, out=out)           # a write: recorded, not run
        out[0] = -5
    graph = capture(xp, work)
    assert emulator.asnumpy(out).tolist() == [0, 0, 0, 0]
    a[...] = xp.asarray(np.array([10, 20, 30, 40], np.float32))
    graph.launch()
    assert emulator.asnumpy(kept["doubled"]).tolist() == [20, 40, 60, 80]
    assert emulator.asnumpy(out).tolist() == [-5, 41, 61, 81]
    assert emulator.asnumpy(kept["view"]).tolist() == [20, 30]


def test_emulated_capture_replays_methods_indexing_and_kernels(emulated):
    """Array methods numpy implements in C (astype, copy, argmax, fill), fancy indexing,
    numpy functions on device arrays and kernel launches are recorded too; views are
    not (they alias the memory the launch reads)."""
    from caffelite import kernels
    xp = emulated
    a = xp.asarray(np.array([3, -1, 4, -1], np.float32))
    index = xp.asarray(np.array([2, 0]))
    out = xp.zeros(4, np.float32)
    kept = {}

    def work():
        kept["cast"] = a.astype(np.float64)
        kept["copy"] = a.copy()
        kept["argmax"] = a.argmax()
        kept["picked"] = a[index]
        kept["reshaped"] = a.reshape(2, 2)            # a view
        kept["clipped"] = np.clip(a, 0, 3)            # numpy's function, device arrays
        out.fill(7)
        kernels.launch("relu", "relu_backward", np.float32, 4, a, out, 0.0, out)
    graph = capture(xp, work)
    assert emulator.asnumpy(out).tolist() == [0, 0, 0, 0]
    a[...] = xp.asarray(np.array([-2, 5, 1, 8], np.float32))
    graph.launch()
    assert emulator.asnumpy(kept["cast"]).tolist() == [-2, 5, 1, 8]
    assert emulator.asnumpy(kept["copy"]).tolist() == [-2, 5, 1, 8]
    assert int(kept["argmax"]) == 3
    assert emulator.asnumpy(kept["picked"]).tolist() == [1, -2]
    assert emulator.asnumpy(kept["reshaped"]).tolist() == [[-2, 5], [1, 8]]
    assert emulator.asnumpy(kept["clipped"]).tolist() == [0, 3, 1, 3]
    assert emulator.asnumpy(out).tolist() == [0, 7, 7, 7]       # fill, then relu_backward
    assert len(graph) == 7      # all but the view


@pytest.mark.parametrize("what, work", [
    ("device-to-host copy", lambda xp, a: xp.asnumpy(a)),
    ("float()", lambda xp, a: float(a.sum())),
    ("bool()", lambda xp, a: bool(a.any())),
    ("ndarray.item", lambda xp, a: a[0].item()),
    ("ndarray.set", lambda xp, a: a.set(np.ones(4, np.float32))),
    ("host-to-device copy", lambda xp, a: xp.asarray(np.ones(3))),
    ("random", lambda xp, a: xp.random.random_sample(3)),
    ("boolean-mask", lambda xp, a: a[a > 1]),
    ("nonzero", lambda xp, a: xp.nonzero(a)),
    ("synchronize", lambda xp, a: xp.cuda.Device().synchronize()),
])
def test_emulated_capture_refuses_what_needs_the_host(emulated, what, work):
    xp = emulated
    a = xp.asarray(np.arange(4, dtype=np.float32))
    with pytest.raises(emulated_capture.CaptureError, match="not permitted when stream is "
                                                          "capturing"):
        capture(xp, lambda: work(xp, a))
    assert not emulated_capture.active()          # the capture was invalidated and ended


# ------------------------------------------------------------- corpus net and the CLI
def corpus_solver(tmp_path, config="deeplabv2_resnet101_msc"):
    """A corpus config's train net and solver (poly lr, momentum, weight decay), Input
    data at 65x65, batch 1, iter_size 2, random weights and a small rate."""
    from test_corpus_nets import (TRAIN, corpus_defines, corpus_path, fill_inputs,
                                  randomize, read_config, with_inputs)
    net_param, shapes = with_inputs(read_config(f"{config}/train.prototxt", tmp_path), 65,
                                    TRAIN, tmp_path, batch=1)
    path = corpus_path("prototxt", config, "solver.prototxt")
    param = prototxt.read_solver(path, dict(corpus_defines(path, tmp_path), TRAIN_SET="t"))
    param.ClearField("train_net")
    param.train_net_param.CopyFrom(net_param)
    param.ClearField("snapshot")
    param.snapshot_prefix = str(tmp_path / "snap")
    param.base_lr, param.iter_size = 1e-7, 2
    caffelite.set_random_seed(5)
    solver = Solver(param)
    randomize(solver.net)
    fill_inputs(solver.net, shapes)
    return solver, shapes


@pytest.mark.parametrize("config", ["deeplabv2_resnet101_msc", "deeplabv2_vgg16_aspp_l"])
def test_corpus_training_with_graphs(tmp_path, gpu_mode, config):
    """Two solver steps (four passes) of a corpus train net with and without graphs:
    the same weights, diffs and blobs, with new data every step.

    * ResNet-101 MSC (1479 layers, fused chains, three scales, four losses): one
      segment runs from the data to the first loss; the SegAccuracy layers (host) and
      the losses between them run eagerly.
    * ASPP-VGG, its Dropout layers included (their masks come from the same Philox
      streams both ways): one segment from the data to the loss."""
    from test_corpus_nets import fill_inputs
    runs = {}
    for graphs in (False, True):
        cuda_graphs.set_enabled(graphs)
        gpu_mode.on()
        try:
            solver, shapes = corpus_solver(tmp_path, config)
            runs[graphs] = []
            for step in range(2):
                fill_inputs(solver.net, shapes, seed=10 + step)
                solver.step(1)
                runs[graphs].append(snapshot(solver.net))
            net = solver.net
        finally:
            cuda_graphs.set_enabled(False)
            gpu_mode.off()
    compare_runs(runs[False], runs[True])
    [seg] = net._graphs.segments
    assert net.layers[seg.first - 1].type == "Input" and seg.last == net._layer_index("loss")
    assert seg.fwd.launches == 3 and seg.bwd.launches == 3
    if config == "deeplabv2_vgg16_aspp_l":
        assert any(layer.type == "Dropout" for layer in net.layers[seg.first:seg.last])


def test_cli_train_with_cuda_graphs_logs_the_same_losses(tmp_path, monkeypatch):
    """`caffelite train --gpu 0` records CUDA graphs by default (emulator): the demo's
    losses and outputs, digit for digit, as with --no-cuda-graphs or
    CAFFELITE_CUDA_GRAPHS=0."""
    from test_gpu_nets import demo_solver, loss_log, train_log
    monkeypatch.chdir(tmp_path)
    solver = demo_solver(tmp_path)
    env = {"CAFFELITE_GPU_EMULATOR": "1"}
    plain_log = train_log(tmp_path, solver, "--gpu", "0", "--no-cuda-graphs", env=env)
    assert "caffelite: CUDA graphs" not in plain_log
    plain = loss_log(plain_log)
    off_by_env = train_log(tmp_path, solver, "--gpu", "0",
                           env=dict(env, CAFFELITE_CUDA_GRAPHS="0"))
    assert "caffelite: CUDA graphs" not in off_by_env
    log = train_log(tmp_path, solver, "--gpu", "0", env=env)
    assert "Using GPUs 0" in log and "caffelite: CUDA graphs" in log
    assert "cannot be recorded" not in log
    assert len(plain) >= 12 and loss_log(log) == plain == loss_log(off_by_env)


@pytest.mark.gpu
def test_device_memory_stops_growing_once_recorded(tmp_path):
    """On a GPU, with graphs: after the step that records, neither CuPy's pool nor the
    recordings' own pools grow (a launch allocates nothing)."""
    from gpu_modes import cuda_available
    if not cuda_available():
        pytest.skip("no CuPy with a CUDA device")
    import cupy
    cuda_graphs.set_enabled(True)
    backend.set_mode_gpu(emulate=False)
    try:
        text = HEAD + BODIES["BatchNorm"] + BODIES["Eltwise"].replace('bottom: "x"',
                                                                     'bottom: "y"') \
            .replace('top: "y"', 'top: "z"') + TAIL.replace('bottom: "y"', 'bottom: "z"')
        solver = solver_for(text, tmp_path)
        unit_statistics(solver.net)
        feed(solver.net, np.random.default_rng(0))
        solver.step(2)                          # passes 1-4: eager, record, launches

        def total():
            cupy.cuda.get_current_stream().synchronize()
            recs = solver.net._graphs.recordings()
            return cupy.get_default_memory_pool().total_bytes() + sum(
                r.pool.total_bytes() for r in recs if r.pool is not None)
        after_two = total()
        solver.step(6)
        assert total() == after_two and after_two > 0
        assert launches(solver.net) >= 14
    finally:
        cuda_graphs.set_enabled(False)
        backend.set_mode_cpu()


def test_cli_time_with_cuda_graphs_times_whole_passes(tmp_path):
    """`caffelite time --gpu 0 --cuda-graphs` (emulator): Caffe's per-layer lines, then
    the whole passes through the graphs, every one launched."""
    import os
    import subprocess
    import sys
    from test_gpu_nets import ROOT
    path = tmp_path / "net.prototxt"
    path.write_text(HEAD + BODIES["Convolution"] + TAIL)
    env = dict(os.environ, PYTHONPATH=ROOT, CAFFELITE_GPU_EMULATOR="1")
    out = subprocess.run([sys.executable, "-m", "caffelite.cli", "time", "--model", str(path),
                          "--iterations", "3", "--gpu", "0", "--cuda-graphs"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Average Forward-Backward:" in out.stderr
    assert out.stderr.count("Average Forward-Backward") == 1   # Caffe's line only
    found = re.search(r"CUDA graphs, whole forward-backward passes \(1 segments, "
                      r"(\d+) launches\): average [\d.e-]+ ms\.", out.stderr)
    assert found, out.stderr[-2000:]
    assert int(found.group(1)) >= 2 * 3     # at least the timed passes, each way


def test_cli_time_with_cuda_graphs_runs_no_extra_pass_through_a_file_writer(tmp_path):
    """With a MatWrite layer (DeepLab's test nets), `caffelite time --gpu 0` runs
    Caffe's 1 + N forwards only: more would write more feature files (and run past a
    MatWrite id list)."""
    import os
    import subprocess
    import sys
    from test_gpu_nets import ROOT
    path = tmp_path / "net.prototxt"
    features = tmp_path / "features"
    features.mkdir()
    path.write_text(HEAD + BODIES["Convolution"] + TAIL + f"""
layer {{ name: "w" type: "MatWrite" bottom: "score" mat_write_param {{ prefix: "{features}/" }} }}
""")
    env = dict(os.environ, PYTHONPATH=ROOT, CAFFELITE_GPU_EMULATOR="1")
    out = subprocess.run([sys.executable, "-m", "caffelite.cli", "time", "--model", str(path),
                          "--iterations", "3", "--gpu", "0"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Not timing whole passes with CUDA graphs: 'w' (MatWrite) writes files at " \
           "every forward." in out.stderr
    assert "whole forward-backward passes" not in out.stderr
    assert sorted(os.listdir(features)) == [f"iter_{i}_blob_0.mat" for i in range(4)]


def _corpus_cases():
    """test_corpus_nets.CASES but the two training nets that
    test_corpus_training_with_graphs trains with a solver."""
    from test_corpus_nets import CASES, TRAIN, case_id
    solver_trained = {f"{c}/train.prototxt" for c in ("deeplabv2_resnet101_msc",
                                                       "deeplabv2_vgg16_aspp_l")}
    cases = [c for c in CASES if not (c[0] in solver_trained and c[1] == TRAIN)]
    return pytest.mark.parametrize("case", cases, ids=[case_id(c) for c in cases])


@_corpus_cases()
def test_every_corpus_net_gives_the_eager_bits_with_graphs(tmp_path, gpu_mode, case):
    """Graphs are the GPU default, so every net of the corpus, in each phase it has data
    for: three passes (forward, and backward in TRAIN) with new inputs each time, with
    and without graphs, give the same bits in every blob, diff and parameter gradient;
    every recording of the graphs run succeeded and its segments were launched."""
    from test_corpus_nets import fill_inputs, randomize, read_config, with_inputs
    config, phase, crop = case
    param, shapes = with_inputs(read_config(config, tmp_path), crop, phase, tmp_path)
    if len(param.input):
        # A deploy net: its declared input at the crop size, with random data (at its
        # own 321x321 the emulated passes and their snapshots take about 20 GB).
        assert list(param.input) == ["data"] and param.input_dim[:2] == [1, 3]
        del param.input_dim[:]
        param.input_dim.extend([1, 3, crop, crop])
        shapes["data"] = (1, 3, crop, crop)
    (tmp_path / "ids.txt").write_text("a\nb\nc\n")     # MatWrite: one name per pass
    runs, nets = {}, {}
    for graphs in (False, True):
        cuda_graphs.set_enabled(graphs)
        gpu_mode.on()
        try:
            caffelite.set_random_seed(5)
            net = caffelite.Net(param=param, phase=phase)
            randomize(net)
            runs[graphs] = []
            for step in range(3):
                fill_inputs(net, shapes, seed=20 + step)
                net.forward()
                if phase == caffelite.TRAIN:
                    net.backward()
                runs[graphs].append(snapshot(net, param_data=False))
            nets[graphs] = net
        finally:
            gpu_mode.off()
    for step, (a, b) in enumerate(zip(runs[False], runs[True])):
        assert_same(a, b, f"pass {step}")
    blobs, params = runs[False][-1]     # equal NaNs would compare equal: stay finite
    for name, (data, diff) in blobs.items():
        assert np.isfinite(data).all() and np.isfinite(diff).all(), name
    for name, ps in params.items():
        assert all(np.isfinite(diff).all() for _, diff in ps), name
    graphed = nets[True]._graphs
    assert graphed is not None and graphed.segments, "no run of graph-safe layers"
    recordings = graphed.recordings()
    assert recordings and not [r.failure for r in recordings if r.failed]
    assert all(seg.fwd.launches == 2 for seg in graphed.segments)
    if phase == caffelite.TRAIN:
        assert all(seg.bwd.launches == 2 for seg in graphed.segments)
