"""Convolution autotuning (``caffelite.layers.conv_autotune``): each device product's
paths are timed once per shape and the fastest is used.

The device's clock is replaced by a table (``conv_autotune.TIMER``) that makes one path
the fastest; the tuned pass must then give, bit for bit, what the fixed rules give when
they are set to take that path, the weight gradients included (their diffs are put back
between the timed runs). Also: each product is timed once, a failing path is left out,
nothing is timed while CUDA graphs record, and the command line's flag.
"""
import logging

import numpy as np
import pytest

from caffelite import backend, cli
from caffelite.kernels import emulator
from caffelite.layers import conv_autotune, im2col, implicit_gemm, tap_gemm
from caffelite.layers.im2col import ConvGeometry
from gpu_modes import gpu_mode  # noqa: F401  (a fixture)
from layer_testing import assert_same_bits
from test_conv_igemm import conv_net_pass


def favour(fastest, calls=None):
    """A TIMER making the path ``fastest`` take 1 s and every other 2 s; ``calls``
    collects (kind, path) of each timed run."""
    def timer(kind, name):
        if calls is not None:
            calls.append((kind, name))
        return 1.0 if name == fastest else 2.0
    return timer


@pytest.fixture
def tuned(monkeypatch):
    """Autotuning on; set_fastest(path) makes that path the fastest and returns the
    list of timed runs."""
    monkeypatch.setattr(conv_autotune, "ENABLED", True)

    def set_fastest(path):
        calls = []
        conv_autotune.forget()
        monkeypatch.setattr(conv_autotune, "TIMER", favour(path, calls))
        return calls
    return set_fastest


@pytest.fixture
def tf32():
    backend.set_tf32(True)
    try:
        yield
    finally:
        backend.set_tf32(False)


def timed_choices():
    """{ProductKey: chosen path} of the products that had paths to time."""
    return {key: best for key, (best, times) in conv_autotune.choices().items() if times}


def assert_same_pass(a, b):
    """Two conv_net_pass results equal bit for bit."""
    for (name, (data_a, diff_a)), (data_b, diff_b) in zip(a[0].items(), b[0].values()):
        assert_same_bits(data_a, data_b)
        assert_same_bits(diff_a, diff_b)
    for name in a[1]:
        for (data_a, diff_a), (data_b, diff_b) in zip(a[1][name], b[1][name]):
            assert_same_bits(data_a, data_b)
            assert_same_bits(diff_a, diff_b)


def rule_settings(monkeypatch, path):
    """Set the fixed rules so that every product that can takes ``path``."""
    if path.startswith("implicit"):
        monkeypatch.setattr(implicit_gemm, "ENABLED", True)
        monkeypatch.setattr(implicit_gemm, "MIN_TILES_PER_SM", 0)
        if path == "implicit-quad":
            monkeypatch.setattr(implicit_gemm, "TILE", "quad")
    elif path == "taps":
        monkeypatch.setattr(tap_gemm, "MAX_REACH", 1.0)
        monkeypatch.setattr(tap_gemm, "MIN_SAVED_FLOPS", 0)
    elif path == "columns":
        monkeypatch.setattr(im2col, "PADDED_1X1_FLOP", 0)


@pytest.mark.parametrize("path", ["implicit", "implicit-quad", "columns"])
def test_tf32_pass_takes_the_fastest_path_with_its_bits(tmp_path, gpu_mode, tuned, tf32,
                                                        monkeypatch, path):
    """With TF32, every forward, data and weight gradient that the path can compute
    takes it (the strided layer's data gradient has only columns), with the bits the
    fixed rules give when set to it."""
    calls = tuned(path)
    result = conv_net_pass(tmp_path, gpu_mode)
    chosen = timed_choices()
    assert set(chosen.values()) == {path}
    kinds = sorted(key.kind for key in chosen)
    assert kinds == ["data", "data", "forward", "forward", "forward",
                     "weight", "weight", "weight"]
    assert {name for _, name in calls} == {"columns", "implicit", "implicit-quad", "taps"}
    # the strided layer's data gradient: one path, kept without timing
    untimed = [(key.kind, best) for key, (best, times) in conv_autotune.choices().items()
               if not times]
    assert untimed == [("data", "columns")]

    monkeypatch.setattr(conv_autotune, "ENABLED", False)
    rule_settings(monkeypatch, path)
    assert_same_pass(result, conv_net_pass(tmp_path, gpu_mode))


ONE_BY_ONE = """
force_backward: true
input: "data" input_shape { dim: 2 dim: 6 dim: 9 dim: 9 }
layer { name: "fc" type: "Convolution" bottom: "data" top: "fc"
  convolution_param { num_output: 7 kernel_size: 1
    weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "c" type: "Convolution" bottom: "fc" top: "c"
  convolution_param { num_output: 4 kernel_size: 1 group: 1
    weight_filler { type: "gaussian" std: 0.5 } } }
"""


@pytest.mark.parametrize("one_by_one, path", [(False, "taps"), (False, "columns"),
                                               (True, "blobs"), (True, "columns")])
def test_other_paths_give_the_rules_bits(tmp_path, gpu_mode, tuned, monkeypatch, one_by_one,
                                         path):
    """In FP32 the implicit GEMM is not a path: the padded stride-1 layers choose
    between columns and per-tap GEMMs. A 1x1 convolution on an odd grid (with TF32)
    chooses between its products on the blobs and padded image groups (the rule's
    PADDED_1X1_FLOP). Each with the rules' bits."""
    import test_conv_igemm
    if one_by_one:
        monkeypatch.setattr(test_conv_igemm, "CONV_NET", ONE_BY_ONE)
        backend.set_tf32(True)
    try:
        calls = tuned(path)
        result = conv_net_pass(tmp_path, gpu_mode)
        assert {name for _, name in calls} == ({"blobs", "columns"} if one_by_one
                                               else {"columns", "taps"})
        assert set(timed_choices().values()) == {path}
        monkeypatch.setattr(conv_autotune, "ENABLED", False)
        rule_settings(monkeypatch, path)
        assert_same_pass(result, conv_net_pass(tmp_path, gpu_mode))
    finally:
        backend.set_tf32(False)


DECONV_NET = """
force_backward: true
input: "data" input_shape { dim: 2 dim: 6 dim: 7 dim: 8 }
layer { name: "up" type: "Deconvolution" bottom: "data" top: "a"
  convolution_param { num_output: 70 kernel_size: 3 pad: 2 dilation: 2
    weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "up2" type: "Deconvolution" bottom: "a" top: "c"
  convolution_param { num_output: 5 kernel_size: 3 stride: 2 pad: 1
    weight_filler { type: "gaussian" std: 0.5 } } }
"""


@pytest.mark.parametrize("path", ["implicit", "columns"])
def test_deconvolution_takes_the_fastest_path_with_its_bits(tmp_path, gpu_mode, tuned,
                                                             tf32, monkeypatch, path):
    """Deconvolution swaps the roles (its forward is a data gradient, its backward a
    weight gradient and a forward): the tuned pass gives the fixed rules' bits for the
    path, and when both backward products choose columns they share the image groups
    (one im2col of the top gradient for both)."""
    import test_conv_igemm
    monkeypatch.setattr(test_conv_igemm, "CONV_NET", DECONV_NET)
    shared = []
    groups = im2col._weight_and_forward_groups
    monkeypatch.setattr(im2col, "_weight_and_forward_groups", lambda *a: (
        shared.append(1), groups(*a)))
    tuned(path)
    result = conv_net_pass(tmp_path, gpu_mode)
    chosen = timed_choices()
    assert {key.kind for key in chosen} == {"forward", "data", "weight"}
    assert path in set(chosen.values()) <= {path, "columns"}
    assert len(shared) == (2 if path == "columns" else 0)
    monkeypatch.setattr(conv_autotune, "ENABLED", False)
    rule_settings(monkeypatch, path)
    assert_same_pass(result, conv_net_pass(tmp_path, gpu_mode))


def test_each_product_is_timed_once(tmp_path, gpu_mode, tuned, tf32, caplog):
    """A second pass times nothing; each path ran REPEATS + 1 times (one warm-up); the
    log names each product, its paths' times and the choice."""
    calls = tuned("implicit")
    with caplog.at_level(logging.INFO, logger="caffelite"):
        conv_net_pass(tmp_path, gpu_mode)
    timed = len(calls)
    paths = sum(len(times) for _, times in conv_autotune.choices().values())
    assert timed == paths * (conv_autotune.REPEATS + 1)
    assert ("Convolution autotune: forward of 2x3x9x10 by 70 3x3 filters: implicit "
            "1000.000 ms, ") in caplog.text
    assert "forward of 2x70x9x10 by 5 3x3 filters dilation 2x2:" in caplog.text
    assert "; using implicit" in caplog.text
    conv_net_pass(tmp_path, gpu_mode)
    assert len(calls) == timed


def test_a_failing_path_is_left_out(tmp_path, gpu_mode, tuned, tf32, monkeypatch, caplog):
    """A path that runs out of memory is not used: the next fastest is."""
    calls = tuned("implicit-quad")
    forward = implicit_gemm.forward

    def failing(*args, tile=None, **kwargs):
        if tile == "quad":
            raise MemoryError("out of memory allocating 1 GiB")
        return forward(*args, tile=tile, **kwargs)

    monkeypatch.setattr(implicit_gemm, "forward", failing)
    monkeypatch.setattr(conv_autotune, "TIMER", lambda kind, name: calls.append(name) or {
        "implicit-quad": 1.0, "implicit": 2.0}.get(name, 3.0))
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        result = conv_net_pass(tmp_path, gpu_mode)
    assert "implicit-quad failed for forward of 2x3x9x10 by 70 3x3 filters" in caplog.text
    chosen = timed_choices()
    assert {best for key, best in chosen.items() if key.kind != "weight"} == {"implicit"}
    assert {best for key, best in chosen.items() if key.kind == "weight"} == \
        {"implicit-quad"}                    # its own kernel does not fail
    monkeypatch.setattr(conv_autotune, "ENABLED", False)
    monkeypatch.setattr(implicit_gemm, "forward", forward)
    monkeypatch.setattr(implicit_gemm, "ENABLED", True)
    monkeypatch.setattr(implicit_gemm, "MIN_TILES_PER_SM", 0)
    weight_grad = implicit_gemm.weight_grad
    monkeypatch.setattr(implicit_gemm, "weight_grad",
                        lambda *a, tile=None: weight_grad(*a, tile="quad"))
    assert_same_pass(result, conv_net_pass(tmp_path, gpu_mode))


@pytest.mark.parametrize("path", ["columns", "implicit", "taps"])
def test_weight_gradient_adds_to_the_diff_once(gpu_mode, tuned, tf32, path):
    """The weight gradient adds into a diff holding earlier sums: timed runs leave it as
    it was, and the chosen one adds once (equal to the fixed rules' sum with the same
    path)."""
    rng = np.random.default_rng(4)
    geom = ConvGeometry((3, 3), (1, 1), (2, 2), (2, 2))
    xp = gpu_mode.on()
    image = xp.asarray(rng.standard_normal((2, 5, 8, 9)).astype(np.float32))
    grid = xp.asarray(rng.standard_normal((2, 6, 8, 9)).astype(np.float32))
    earlier = rng.standard_normal((6, 5, 3, 3)).astype(np.float32)
    tuned(path)
    diff = xp.asarray(earlier.copy())
    im2col.weight_gemm(image, grid, diff, geom, 1)
    assert set(timed_choices().values()) == {path}
    conv_autotune.set_enabled(False)
    expected = xp.asarray(earlier.copy())
    if path == "implicit":
        implicit_gemm.weight_grad(xp, image, grid, expected, geom)
    elif path == "taps":
        windows = tap_gemm.tap_windows(geom, (8, 9), (8, 9))
        tap_gemm.weight_grad(xp, image, grid, expected, windows, 1)
    else:
        im2col.weight_gemm(image, grid, expected, geom, 1)
    assert_same_bits(xp.asnumpy(diff), xp.asnumpy(expected))


def test_one_path_is_kept_untimed_and_the_tap_switch_is_obeyed(gpu_mode, tuned,
                                                              monkeypatch):
    """CAFFELITE_TAP_GEMM=0 (tap_gemm.ENABLED off) leaves an FP32 dilated product one
    path: kept at once, nothing timed, the diff not copied (a product with two paths
    copies it once, to time them); a product whose every path fails is kept too (with
    the first), so it is not timed again."""
    rng = np.random.default_rng(8)
    geom = ConvGeometry((3, 3), (1, 1), (2, 2), (2, 2))
    xp = gpu_mode.on()
    image = xp.asarray(rng.standard_normal((2, 5, 8, 9)).astype(np.float32))
    grid = xp.asarray(rng.standard_normal((2, 6, 8, 9)).astype(np.float32))
    diff = xp.zeros((6, 5, 3, 3), np.float32)
    monkeypatch.setattr(tap_gemm, "ENABLED", False)
    calls = tuned("taps")
    copies = []                 # the copies of the diff made to put it back
    restorer = conv_autotune._restorer
    monkeypatch.setattr(conv_autotune, "_restorer", lambda array: (
        copies.append(array.shape), restorer(array))[1])
    im2col.weight_gemm(image, grid, diff, geom, 1)
    im2col.weight_gemm(image, grid, diff, geom, 1)
    assert calls == [] and copies == []
    assert [(key.kind, best, times) for key, (best, times) in
            conv_autotune.choices().items()] == [("weight", "columns", {})]
    monkeypatch.setattr(tap_gemm, "ENABLED", True)
    for _ in range(2):          # another product with two paths: one copy, when timed
        im2col.weight_gemm(image[:1], grid[:1], diff, geom, 1)
    assert len(calls) == 2 * (conv_autotune.REPEATS + 1) and copies == [diff.shape]

    calls.clear()
    monkeypatch.setattr(conv_autotune, "TIMER", lambda kind, name: calls.append(name) or
                        (_ for _ in ()).throw(MemoryError("out of memory")))
    out = xp.zeros((2, 6, 8, 9), np.float32)
    weight = xp.asarray(rng.standard_normal((6, 5, 3, 3)).astype(np.float32))
    im2col.forward_gemm(image, weight, out, geom, 1)
    assert calls == ["columns", "taps"]
    im2col.forward_gemm(image, weight, out, geom, 1)
    assert calls == ["columns", "taps"]
    forward = [(best, times) for key, (best, times) in conv_autotune.choices().items()
               if key.kind == "forward"]
    assert forward == [("columns", {})]


def test_graphs_record_the_tuned_paths_without_timing(tmp_path, gpu_mode, tuned, tf32):
    """Training with CUDA graphs: the eager first pass times, the recordings time
    nothing, take its choices and repeat the layer-by-layer bits."""
    import test_cuda_graphs as graphs_test
    body = """layer { name: "c" type: "Convolution" bottom: "x" top: "c"
        convolution_param { num_output: 16 kernel_size: 3 dilation: 2 pad: 2
        weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 }
        } }
        layer { name: "c2" type: "Convolution" bottom: "c" top: "y"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1
        weight_filler { type: "gaussian" std: 0.3 } } }"""
    text = graphs_test.HEAD + body + graphs_test.TAIL
    tuned("implicit")
    eager, _ = graphs_test.train(gpu_mode, text, tmp_path, graphs=False, steps=3)
    calls = tuned("implicit")
    before_step = []
    graphed, solver = graphs_test.train(gpu_mode, text, tmp_path, graphs=True, steps=3,
                                        between=lambda net, step: before_step.append(
                                            len(calls)))
    assert before_step[0] == 0 and before_step[1] == before_step[2] == len(calls) > 0
    assert graphs_test.launches(solver.net) >= 2
    graphs_test.compare_runs(eager, graphed)


def test_a_recording_takes_the_choice_and_times_nothing(monkeypatch):
    """While a graph records, a timed product gets its choice, an untimed one None (the
    fixed rules), and nothing runs."""
    monkeypatch.setattr(conv_autotune, "ENABLED", True)
    assert conv_autotune.active(emulator) and not conv_autotune.active(np)
    monkeypatch.setattr(conv_autotune, "TIMER", favour("b"))
    ran = []
    paths = {name: (lambda name=name: ran.append(name)) for name in ("a", "b")}
    x = emulator.zeros((1, 2, 5, 5), np.float32)
    geom = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1))
    timed, untimed = (conv_autotune.product_key(kind, emulator, x, x, x, geom, 1)
                      for kind in ("forward", "data"))
    assert conv_autotune.choose(emulator, timed, paths) == "b"
    assert ran == ["a"] * 4 + ["b"] * 4
    monkeypatch.setitem(backend._state, "capturing", True)
    assert conv_autotune.choose(emulator, timed, paths) == "b"
    assert conv_autotune.choose(emulator, untimed, paths) is None
    assert len(ran) == 8


def test_the_clock_picks_the_fastest_median(tmp_path, gpu_mode, monkeypatch):
    """With the real clock (CUDA events on a device, the host's on the emulator) every
    product's choice is the path with the least median time, and the pass agrees with
    the fixed rules' within float rounding."""
    monkeypatch.setattr(conv_autotune, "ENABLED", True)
    blobs, params = conv_net_pass(tmp_path, gpu_mode)
    choices = conv_autotune.choices()
    assert choices
    for best, times in choices.values():
        assert all(t > 0 for t in times.values())
        assert not times or times[best] == min(times.values())
    conv_autotune.set_enabled(False)
    expected_blobs, expected_params = conv_net_pass(tmp_path, gpu_mode)
    # FP32 paths differ in their summation order only: far below 1e-4 of the largest
    # value for these sums of at most a few thousand terms
    pairs = [(f"blob {name} {what}", got, expected_blobs[name][k])
             for name, values in blobs.items() for k, (what, got) in
             enumerate(zip(("data", "diff"), values))]
    pairs += [(f"param {name} {what}", got, want)
              for name, values in params.items()
              for (p, q) in zip(values, expected_params[name])
              for what, got, want in zip(("data", "diff"), p, q)]
    for label, got, want in pairs:
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale, err_msg=label)


def test_command_line_flag(monkeypatch, caplog):
    """--conv-autotune turns it on in GPU mode (logged with the other features) and is a
    warning on the CPU."""
    monkeypatch.setenv("CAFFELITE_GPU_EMULATOR", "1")
    parser = cli.build_parser()
    args = parser.parse_args(["time", "--model", "m.prototxt", "--gpu", "0",
                              "--conv-autotune"])
    try:
        with caplog.at_level(logging.INFO, logger="caffelite"):
            assert cli._select_device(args) == 0
        assert conv_autotune.enabled()
        assert "caffelite: CUDA graphs, convolution autotuning" in caplog.text
        conv_autotune.set_enabled(False)
        args = parser.parse_args(["time", "--model", "m.prototxt", "--conv-autotune"])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="caffelite"):
            assert cli._select_device(args) is None
        assert "--conv-autotune applies to GPU mode only" in caplog.text
        assert not conv_autotune.enabled()
    finally:
        backend.set_mode_cpu()


def implicit_gemm_calls_per_step(gpu_mode, tmp_path, monkeypatch, switch, steps):
    """Trains test_cuda_graphs' one-convolution net (3x3, 16 outputs) with CUDA graphs
    for ``steps`` steps, counting the implicit GEMM's forwards: the count before each
    step, read before ``switch(step)`` changes a setting."""
    import test_cuda_graphs as graphs_test
    body = """layer { name: "c" type: "Convolution" bottom: "x" top: "y"
        convolution_param { num_output: 16 kernel_size: 3 pad: 1
        weight_filler { type: "gaussian" std: 0.3 } } }"""
    text = graphs_test.HEAD + body + graphs_test.TAIL
    monkeypatch.setattr(implicit_gemm, "MIN_TILES_PER_SM", 0)
    implicit_calls = []
    forward = implicit_gemm.forward
    monkeypatch.setattr(implicit_gemm, "forward", lambda *a, **k: (
        implicit_calls.append(1), forward(*a, **k)))
    seen = []

    def between(net, step):
        seen.append(len(implicit_calls))
        switch(step)

    graphs_test.train(gpu_mode, text, tmp_path, graphs=True, steps=steps, between=between)
    return seen


def test_graphs_recorded_under_other_convolution_settings_are_not_launched(
        tmp_path, gpu_mode, tf32, monkeypatch):
    """A recording made with the implicit GEMM off is not launched once it is on (or
    once autotuning starts): the pass runs its layers again and records anew (the
    benchmarks switch these settings between measurements of one net)."""
    def switch(step):
        if step == 3:
            implicit_gemm.ENABLED = True
        if step == 6:
            conv_autotune.set_enabled(True)
            conv_autotune.TIMER = favour("columns")

    try:
        seen = implicit_gemm_calls_per_step(gpu_mode, tmp_path, monkeypatch, switch, 9)
    finally:
        implicit_gemm.ENABLED = False
        conv_autotune.TIMER = None
    assert seen[:4] == [0, 0, 0, 0]
    assert seen[4] > 0                               # run and recorded again
    assert seen[4] == seen[5] == seen[6]             # then launched
    assert seen[7] > seen[6]                         # timed, implicit among the paths
    assert seen[8] == seen[7]                        # columns recorded, then launched


def test_device_timing_waits_behind_a_spin(monkeypatch):
    """On a device each timed run is queued behind timing.cu's hold_device, so the
    events around it measure device time only: the hold, then the start event, the
    run, the stop event and its wait, in that order. Where the device had already
    passed the start event when the run was queued, the next hold is twice as long."""
    import types
    from caffelite import kernels
    order = []
    passed = [True, False]          # the start event was already done: the first time

    class Event:
        def __init__(self):
            self.name = "start" if len(order) % 2 == 0 else "stop"
            order.append(f"new {self.name}")

        def record(self):
            order.append(f"record {self.name}")

        @property
        def done(self):
            return passed.pop(0)

        def synchronize(self):
            order.append(f"wait {self.name}")

    cuda = types.SimpleNamespace(Event=Event, get_elapsed_time=lambda a, b: 2.5,
                                 Device=lambda: types.SimpleNamespace(id=7))
    xp = types.SimpleNamespace(cuda=cuda, zeros=np.zeros)
    monkeypatch.setattr(kernels, "launch", lambda module, kernel, dtype, n, cycles, flag,
                        grid, block: order.append(f"{kernel} {n} {cycles} {grid} {block}"))
    monkeypatch.setattr(conv_autotune, "_hold_flags", {})
    monkeypatch.setattr(conv_autotune, "_hold_cycles", {})
    hold = conv_autotune.HOLD_CYCLES
    for cycles in (hold, 2 * hold):
        order.clear()
        assert conv_autotune._timed(xp, "forward", "columns",
                                    lambda: order.append("run")) == 2.5e-3
        assert order == ["new start", "new stop", f"hold_device 1 {cycles} 1 1",
                         "record start", "run", "record stop", "wait stop"]
