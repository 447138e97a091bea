"""The first minute of a GPU session: does GPU mode work at all?

Compiles and launches one kernel of every module, builds a small net with every kind of
kernel-backed layer in GPU mode, runs a training step and compares it with CPU mode,
trains it again with and without CUDA graphs (the default) for equal bits, and times a
convolution GEMM shape as a 2-D (cublasGemmEx) and a batched 3-D matmul with TF32 off
and on. Exit status 1 with the traceback on the first failure, so a broken GPU path
costs one minute of device time instead of a whole check run. Last, the opt-in
implicit-GEMM convolution and convolution autotuning against im2col + cuBLAS in TF32:
a failure there prints "IMPLICIT GEMM FAILED" or "AUTOTUNE FAILED" and the traceback
but does not fail the smoke check.

    python benchmarks/gpu_smoke.py
    python benchmarks/gpu_smoke.py --emulate      # the same on the CPU emulator (CI)
"""
import os
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import caffelite as caffe  # noqa: E402
from caffelite import backend, fusion, kernels  # noqa: E402

NET = """
name: "smoke"
input: "data" input_shape { dim: 2 dim: 3 dim: 17 dim: 17 }
input: "label" input_shape { dim: 2 dim: 1 dim: 17 dim: 17 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 2 dilation: 2
                            weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1"
        param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 }
        batch_norm_param { use_global_stats: true } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1"
        param { lr_mult: 0 } param { lr_mult: 0 } scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "a" type: "Convolution" bottom: "pool1" top: "a"
        convolution_param { num_output: 4 kernel_size: 1
                            weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "b" type: "Convolution" bottom: "pool1" top: "b"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1
                            weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "max" type: "Eltwise" bottom: "a" bottom: "b" top: "max"
        eltwise_param { operation: MAX } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "max" top: "sum" }
layer { name: "up" type: "Interp" bottom: "sum" top: "up"
        interp_param { height: 17 width: 17 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "up" bottom: "label" top: "loss"
        loss_param { ignore_label: 255 } }
layer { name: "acc" type: "SegAccuracy" bottom: "up" bottom: "label" top: "acc"
        seg_accuracy_param { ignore_label: 255 } }
"""


def step(section, fn):
    t = time.perf_counter()
    print(f"-- {section} ...", flush=True)
    fn()
    print(f"   ok ({time.perf_counter() - t:.1f} s)", flush=True)


EMULATE = "--emulate" in sys.argv[1:]


def device_module():
    backend.set_mode_gpu(emulate=EMULATE)
    return backend.device_module()


def kernel_per_module():
    xp = device_module()
    try:
        if not EMULATE:
            for name in kernels.module_names():
                for kernel in kernels.module_signatures(name):
                    kernels.get_kernel(name, kernel, np.float32)
                    kernels.get_kernel(name, kernel, np.float64)
        x = xp.arange(8, dtype=np.float32) - 4
        dx = xp.full(8, np.nan, np.float32)
        kernels.launch("relu", "relu_backward", np.float32, 8, x, xp.ones(8, np.float32),
                       0.0, dx)
        assert xp.asnumpy(dx).tolist() == [0, 0, 0, 0, 0, 1, 1, 1], xp.asnumpy(dx)
    finally:
        backend.set_mode_cpu()


def solver(param_text):
    from google.protobuf import text_format
    sp = caffe.proto.caffe_pb2.SolverParameter()
    text_format.Merge('base_lr: 0.01 momentum: 0.9 weight_decay: 0.0005 lr_policy: "fixed"'
                      ' max_iter: 100 display: 0 random_seed: 3', sp)
    text_format.Merge(param_text, sp.net_param)
    s = caffe.get_solver(sp)
    rng = np.random.default_rng(0)
    s.net.blobs["data"].data[...] = rng.standard_normal((2, 3, 17, 17))
    label = rng.integers(0, 4, (2, 1, 17, 17)).astype(np.float32)
    label[0, 0, :3] = 255
    s.net.blobs["label"].data[...] = label
    mean, var, factor = s.net.params["bn1"]
    mean.data[...], var.data[...], factor.data[...] = 0.1, 2.0, 1.0
    return s


def train_step_matches_cpu():
    backend.set_mode_cpu()
    cpu = solver(NET)
    cpu.step(2)
    device_module()
    try:
        gpu = solver(NET)
        gpu.step(2)
        backend.synchronize()
    finally:
        backend.set_mode_cpu()
    for name in cpu.net.params:
        for a, b in zip(cpu.net.params[name], gpu.net.params[name]):
            err = float(np.max(np.abs(a.data - b.data)))
            scale = float(np.max(np.abs(a.data))) + 1e-30
            assert err <= 1e-4 * scale, f"{name}: GPU weights differ by {err:.3g}"
    chains = fusion.channel_chains(gpu.net)
    assert len(chains) == 1, "bn1 -> scale1 -> relu1 should run as one fused kernel"
    print(f"   loss CPU {float(cpu.net.blobs['loss'].data):.6f} "
          f"GPU {float(gpu.net.blobs['loss'].data):.6f} (one fused BatchNorm chain)")


def graphs_match_layer_by_layer():
    """Four steps of the smoke net with CUDA graphs: the weights of four steps without,
    bit for bit, with the recorded segment launched (not failed)."""
    from caffelite import cuda_graphs
    results, saved = {}, cuda_graphs.enabled()
    device_module()
    try:
        for graphs in (False, True):
            cuda_graphs.set_enabled(graphs)
            s = solver(NET)
            s.step(4)
            backend.synchronize()
            results[graphs] = [b.read_host_data().copy() for ps in s.net.params.values()
                               for b in ps]
            if graphs:
                recordings = s.net._graphs.recordings()
                failures = [r.failure for r in recordings if r.failed]
                assert recordings and not failures, f"recording failed: {failures}"
                count = s.net._graphs.launches()
                assert count >= 6, f"only {count} graph launches"
    finally:
        cuda_graphs.set_enabled(saved)
        backend.set_mode_cpu()
    for a, b in zip(results[False], results[True]):
        assert np.array_equal(a, b), "weights trained with CUDA graphs differ"
    print(f"   {count} graph launches; weights equal to the layer-by-layer run")


def gemm_paths():
    """A VGG conv5-like forward GEMM at 81x81 (512 x 4608 @ 4608 x 6561): CuPy's 2-D and
    3-D matmul, and caffelite's own cuBLAS call (kernels.cublas, what the layers use),
    which must give matmul's values."""
    from caffelite.kernels import cublas
    xp = device_module()
    m, k, n = (512, 4608, 6561) if not EMULATE else (64, 288, 100)
    try:
        rng = np.random.default_rng(1)
        a = xp.asarray(rng.standard_normal((m, k), dtype=np.float32))
        b = xp.asarray(rng.standard_normal((k, n), dtype=np.float32))
        out = xp.empty((m, n), np.float32)
        cublas.gemm(xp, a, b, out)
        expected = backend.to_host(xp.matmul(a, b))
        err = float(np.max(np.abs(backend.to_host(out) - expected)) / np.max(np.abs(expected)))
        handle = "emulated" if EMULATE else "its own handle" \
            if cublas._handles.get(xp.cuda.Device().id) is not None else \
            "no handle: CuPy's matmul"
        print(f"   caffelite's gemm ({handle}) vs matmul, FP32: max rel diff {err:.2g}")
        assert err < 1e-5, "caffelite's cuBLAS GEMM differs from CuPy's matmul"
        for tf32 in (False, True):
            backend.set_tf32(tf32)
            for label, fn in (("2-D", lambda: xp.matmul(a, b, out=out)),
                              ("3-D", lambda: xp.matmul(a[None], b[None], out=out[None])),
                              ("caffelite", lambda: cublas.gemm(xp, a, b, out))):
                fn()
                backend.synchronize()
                t = time.perf_counter()
                for _ in range(10):
                    fn()
                backend.synchronize()
                rate = 2 * m * k * n * 10 / (time.perf_counter() - t) / 1e12
                print(f"   {label} GEMM {m}x{k} @ {k}x{n}, TF32 {'on' if tf32 else 'off'}"
                      f": {rate:.2f} TFLOP/s")
    finally:
        backend.set_tf32(False)
        backend.set_mode_cpu()


def _small_convolution(xp):
    """(image, weights, top gradient, geometry) of a small dilated convolution."""
    from caffelite.layers import im2col
    rng = np.random.default_rng(2)
    x = xp.asarray(rng.standard_normal((2, 24, 19, 17), dtype=np.float32))
    w = xp.asarray(rng.standard_normal((80, 24, 3, 3), dtype=np.float32))
    g = xp.asarray(rng.standard_normal((2, 80, 19, 17), dtype=np.float32))
    return x, w, g, im2col.ConvGeometry((3, 3), (1, 1), (2, 2), (2, 2))


def _three_products(xp, x, w, g, geom):
    """Host copies of the forward, data gradient and weight gradient (into a diff of
    ones), from outputs poisoned with NaN."""
    from caffelite.layers import im2col
    out = xp.full(g.shape, np.nan, np.float32)
    dx = xp.full(x.shape, np.nan, np.float32)
    dw = xp.ones(w.shape, np.float32)
    im2col.forward_gemm(x, w, out, geom, 1)
    im2col.backward_gemm(g, w, dx, geom, 1)
    im2col.weight_gemm(x, g, dw, geom, 1)
    return [backend.to_host(a) for a in (out, dx, dw)]


def _agree_in_tf32(label, results, reference):
    for what, got, ref in zip(("forward", "data gradient", "weight gradient"), results,
                              reference):
        diff = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        assert np.isfinite(got).all(), f"{label} {what}: unwritten elements"
        assert diff < 1e-2, f"{label} {what} differs from im2col by {diff:.2g}"
        print(f"   {what}: largest difference from im2col {diff:.1e} of the largest "
              f"value")


def implicit_gemm_convolution():
    """The implicit-GEMM convolution (opt-in, TF32) on a small dilated convolution: its
    forward and gradients fill their outputs and agree with im2col + cuBLAS in TF32
    (both round their operands to TF32: about 1e-3 of the largest value; the exact
    bounds are in tests/test_conv_igemm.py, which pytest -m gpu runs next)."""
    from caffelite.layers import implicit_gemm
    xp = device_module()
    backend.set_tf32(True)
    saved = implicit_gemm.ENABLED, implicit_gemm.MIN_TILES_PER_SM
    implicit_gemm.MIN_TILES_PER_SM = 0      # a small layer: implicit even on a large GPU
    try:
        x, w, g, geom = _small_convolution(xp)
        results = {}
        for implicit in (False, True):
            implicit_gemm.ENABLED = implicit
            results[implicit] = _three_products(xp, x, w, g, geom)
        assert implicit_gemm.applies_forward(xp, geom, x, w, xp.empty(g.shape), 1)
        _agree_in_tf32("implicit GEMM", results[True], results[False])
    finally:
        implicit_gemm.ENABLED, implicit_gemm.MIN_TILES_PER_SM = saved
        backend.set_tf32(False)
        backend.set_mode_cpu()
    print("   implicit GEMM agrees with im2col in TF32")


def convolution_autotuning():
    """Convolution autotuning (opt-in) in TF32 on the same convolution: every product
    times its paths on the device (the hold kernel, CUDA events), and the chosen ones
    fill their outputs and agree with im2col + cuBLAS."""
    from caffelite.layers import conv_autotune
    xp = device_module()
    backend.set_tf32(True)
    try:
        x, w, g, geom = _small_convolution(xp)
        conv_autotune.set_enabled(False)
        reference = _three_products(xp, x, w, g, geom)
        conv_autotune.forget()
        conv_autotune.set_enabled(True)
        tuned = _three_products(xp, x, w, g, geom)
        choices = conv_autotune.choices()
        assert len(choices) == 3, f"{len(choices)} products timed, not 3"
        for key, (best, times) in choices.items():
            print(f"   {conv_autotune.describe(key, best, times)}")
        _agree_in_tf32("autotuned", tuned, reference)
    finally:
        conv_autotune.set_enabled(False)
        conv_autotune.forget()
        backend.set_tf32(False)
        backend.set_mode_cpu()
    print("   autotuned convolutions agree with im2col in TF32")


def main():
    try:
        step("GPU mode" + (" (emulated)" if EMULATE else ""),
             lambda: (device_module(), backend.set_mode_cpu()))
        step("every kernel module compiles; relu_backward runs", kernel_per_module)
        step("a small net trains two steps in GPU mode like on the CPU",
             train_step_matches_cpu)
        step("GEMM paths", gemm_paths)
        step("CUDA graphs: four steps like layer by layer", graphs_match_layer_by_layer)
    except Exception:                      # noqa: BLE001 (the point is the traceback)
        traceback.print_exc()
        print("GPU SMOKE FAILED", flush=True)
        return 1
    # opt-in paths: a failure is reported, and the rest of the check still runs
    for section, check, failed in (
            ("implicit-GEMM convolution (TF32)", implicit_gemm_convolution,
             "IMPLICIT GEMM FAILED"),
            ("convolution autotuning (TF32)", convolution_autotuning, "AUTOTUNE FAILED")):
        try:
            step(section, check)
        except Exception:                  # noqa: BLE001
            traceback.print_exc()
            print(failed, flush=True)
    print("GPU SMOKE OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
