"""benchmarks/gpu_train.py: its FLOP count (hand-derived cases) and its CPU smoke mode
(caffelite CPU vs the torch twin at a tiny size; skipped without torch).  No timing is
asserted, only that every measurement ran and that both engines computed the same
numbers."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import caffelite as caffe
from caffelite.io import prototxt
from conftest import CORPUS, ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_train  # noqa: E402

FLOP_NET = """
input: "x" input_shape { dim: 2 dim: 3 dim: 5 dim: 5 }
layer { name: "a" type: "Convolution" bottom: "x" top: "a"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "b" type: "Convolution" bottom: "a" top: "b" %s
  convolution_param { num_output: 6 kernel_size: 1 group: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "b" top: "ip" loss_weight: 1
  inner_product_param { num_output: 7 } }
"""


@pytest.mark.parametrize("frozen, forward, training", [
    # a: 2·(2·4·25 outputs)·(3·9) = 10800, weight gradient only (x needs none): ×2
    # b: 2·(2·6·25)·(4/2 inputs per group) = 1200, ×3 (×2 when frozen: data gradient)
    # ip: 2·(2·7)·150 = 4200, ×3
    (False, 10800 + 1200 + 4200, 2 * 10800 + 3 * 1200 + 3 * 4200),
    (True, 10800 + 1200 + 4200, 2 * 10800 + 2 * 1200 + 3 * 4200),
])
def test_gemm_flops_counts_the_gemms_each_pass_needs(frozen, forward, training):
    params = "param { lr_mult: 0 } param { lr_mult: 0 }" if frozen else ""
    net = caffe.Net(param=prototxt.parse_net(FLOP_NET % params)[0], phase=caffe.TRAIN)
    assert gpu_train.gemm_flops(net, False) == forward
    assert gpu_train.gemm_flops(net, True) == training


def test_cpu_smoke_run(tmp_path):
    pytest.importorskip("torch")
    if not os.path.isdir(os.path.join(CORPUS, "prototxt", "deeplabv2_vgg16_aspp_l")):
        pytest.skip("corpus prototxt not available")
    out = tmp_path / "run.json"
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_train.py"), "--device", "cpu",
         "--net", "vgg", "--size", "33", "--test-size", "33", "--batch", "1", "--iters", "1",
         "--kernels", "fp32", "--corpus", CORPUS, "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| net | phase | input | engine |" in run.stdout
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["phase"], r["engine"]) for r in rows] == [
        ("train", "caffelite"), ("train", "torch"), ("test", "caffelite"), ("test", "torch")]
    for r in rows:
        assert "error" not in r, r
        assert r["iters"] == 1 and r["median_s"] > 0 and r["gflop"] > 0
        # Same weights and inputs: first-forward loss (train) and score map (test).
        assert r["check"] <= 1e-4, r
    train = rows[0]
    assert train["batch"] == 1 and train["iter_size"] == 1 and train["size"] == 33
    assert np.isfinite(train["loss_caffelite"]) and train["loss_caffelite"] > 0
    assert result["environment"]["device"] == "cpu"
    # The kernel profile needs CUDA's profiler: on the CPU the report says so.
    [profile] = result["kernel_profiles"]
    assert profile["error"].startswith("needs a CUDA device")
    assert "Kernels of one FP32 training iteration of ASPP-VGG" in run.stdout


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_fprop_implicit_gemm_tf32f32_tf32f32_f32_nhwckrsc_nchw_tilesize128x128x32",
     "convolution (cuDNN)"),
    ("sm80_xmma_wgrad_implicit_gemm_indexed_tf32f32_tf32f32_f32_nhwckrsc_nchw",
     "convolution (cuDNN)"),
    ("void cudnn::winograd_nonfused::winogradForwardData4x4<float, float>",
     "convolution (cuDNN)"),
    ("sm90_xmma_gemm_f32f32_tf32f32_f32_nn_n_tilesize128x128x32_warpgroupsize1x1x1",
     "GEMM (cuBLAS)"),
    ("ampere_sgemm_128x64_nn", "GEMM (cuBLAS)"),
    ("void splitKreduce_kernel<32, 16, int, float, float, float>", "GEMM (cuBLAS)"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm_128x128_32x3_nn_align4>",
     "GEMM (cuBLAS)"),
    ("im2col", "im2col / col2im"),
    ("col2im", "im2col / col2im"),
    ("cupy_maximum__float32_int_float32", "element-wise, copies"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::...>",
     "element-wise, copies"),
    ("channel_bn_scale_relu", "element-wise, copies"),
    ("max_pool_forward", "other"),
    ("softmax_loss_forward", "other"),
])
def test_kernel_kinds_from_names(name, kind):
    assert gpu_train.kernel_kind(name) == kind


def test_kernel_summary_and_report():
    """(name, µs) events add up per name and per kind, longest first, and the report puts
    the engines' kinds side by side."""
    events = [("ampere_sgemm_128x64_nn", 1500.0), ("im2col", 250.0),
              ("ampere_sgemm_128x64_nn", 500.0), ("max_pool_forward", 125.0)]
    summary = gpu_train.summarize_kernels(events)
    assert summary["total_ms"] == 2.375
    assert summary["kinds"] == {"GEMM (cuBLAS)": 2.0, "im2col / col2im": 0.25,
                                "other": 0.125}
    assert [(r["kernel"], r["calls"], r["ms"]) for r in summary["top"]] == [
        ("ampere_sgemm_128x64_nn", 2, 2.0), ("im2col", 1, 0.25), ("max_pool_forward", 1, 0.125)]
    torch_side = gpu_train.summarize_kernels([("sm90_xmma_fprop_implicit_gemm", 1000.0)])
    report = gpu_train.kernel_profile_markdown([
        {"net": "ASPP-VGG", "precision": "tf32",
         "engines": {"caffelite": summary, "torch": torch_side}},
        {"net": "ResNet", "precision": "fp32", "engines": {"caffelite": {"error": "boom"}}}])
    lines = report.splitlines()
    assert "Kernels of one TF32 training iteration of ASPP-VGG (torch.profiler, CUDA time):" \
        in lines
    assert "| kind | caffelite ms | torch ms |" in lines
    assert "| GEMM (cuBLAS) | 2.00 | 0.00 |" in lines
    assert "| convolution (cuDNN) | 0.00 | 1.00 |" in lines
    assert "| all | 2.38 | 1.00 |" in lines
    assert "| `ampere_sgemm_128x64_nn` | GEMM (cuBLAS) | 2 | 2.00 |" in lines
    assert "caffelite: boom" in lines


def test_emulated_run_measures_the_graphs_engine(tmp_path):
    """gpu_train.py --device emulated: caffelite's GPU code paths on the emulator (torch
    on the CPU). The caffelite-graphs rows record and launch ASPP-VGG as one segment
    after its data layer (Dropout included), and its test scores equal caffelite's bit
    for bit; the caffelite-im2col rows say they would equal caffelite's (no tap GEMM
    saves enough at this size)."""
    if not os.path.isdir(os.path.join(CORPUS, "prototxt", "deeplabv2_vgg16_aspp_l")):
        pytest.skip("corpus prototxt not available")
    out = tmp_path / "run.json"
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_train.py"), "--device",
         "emulated", "--net", "vgg", "--size", "33", "--test-size", "33", "--batch", "1",
         "--iters", "2", "--engines",
         "caffelite,caffelite-graphs,caffelite-im2col,caffelite-autotune",
         "--no-profile",
         "--corpus", CORPUS, "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {(r["phase"], r["engine"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(p, e) for p in ("train", "test")
                         for e in ("caffelite", "caffelite-graphs", "caffelite-im2col",
                                   "caffelite-autotune")}
    for (phase, engine), r in rows.items():
        if engine == "caffelite-im2col":    # at 33x33 and batch 1 no tap GEMM pays
            assert r["error"] == "RuntimeError: same as caffelite for this net", r
        else:
            assert "error" not in r, r
    train, test = rows["train", "caffelite-graphs"], rows["test", "caffelite-graphs"]
    assert train["graphs"] == "1 segments, 6 launches, 0 failed"
    assert test["graphs"] == "1 segments, 3 launches, 0 failed"
    assert test["same_bits_as_caffelite"] is True
    # autotuning: each distinct forward timed (ASPP-VGG's 25 convolutions have 15: conv3_2
    # and conv3_3, conv4_2 and conv4_3, the three conv5s and the branches' fc7s and fc8s
    # share their shapes), the backward's products only in training
    train, test = rows["train", "caffelite-autotune"], rows["test", "caffelite-autotune"]
    assert sum(train["autotune"]["forward"].values()) == 15
    assert set(train["autotune"]) == {"forward", "data", "weight"}
    assert set(test["autotune"]) == {"forward"}
    assert train["graphs"].endswith(" 0 failed")


def test_gpu_smoke_script_passes_on_the_emulator():
    """benchmarks/gpu_smoke.py, the first step of gpu_check.sh, in its emulated mode: a
    small net's GPU-mode training steps equal the CPU's within its bound, with CUDA
    graphs they equal the layer-by-layer steps, the implicit GEMM and autotuning agree
    with im2col, and the script says so (on a device it runs the same checks through
    CuPy)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_smoke.py"),
                             "--emulate"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "GPU SMOKE OK" in result.stdout and "CUDA GRAPHS FAILED" not in result.stdout
    assert "IMPLICIT GEMM FAILED" not in result.stdout
    assert "implicit GEMM agrees with im2col in TF32" in result.stdout
    assert "AUTOTUNE FAILED" not in result.stdout
    assert "autotuned convolutions agree with im2col in TF32" in result.stdout
    assert result.stdout.count("   ok (") == 7
    assert "graph launches; weights equal to the layer-by-layer run" in result.stdout


def test_crf_benchmark_gpu_part_runs_on_the_emulator():
    """benchmarks/crf.py --gpu, the last step of gpu_check.sh, end to end on the emulator
    at a small size: every row of its report is printed, the device-built tables equal
    the host-built ones, and each GPU variant's labels agree with the CPU path."""
    env = dict(os.environ, CAFFELITE_GPU_EMULATOR="1")
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "crf.py"), "--gpu", "0",
         "--gpu-only", "--width", "40", "--height", "30", "--repeats", "1"],
        capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "on emulated GPU" in run.stdout
    assert "device-built tables equal the host-built ones: yes" in run.stdout
    agreements = re.findall(r"labels agree with the CPU path on ([\d.]+) %", run.stdout)
    assert len(agreements) == 3 and all(float(a) >= 99.0 for a in agreements)
    assert "mean field:" in run.stdout and "| whole image, gather splat" in run.stdout


def test_gpu_check_script_is_valid_bash():
    """gpu_check.sh runs only where a GPU is lent: at least its syntax is checked here."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    check = subprocess.run([bash, "-n", os.path.join(ROOT, "benchmarks", "gpu_check.sh")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def _row(engine, precision, median, **extra):
    return dict(net="ASPP-VGG", phase="test", precision=precision, engine=engine,
                median_s=median, **extra)


def test_gpu_summary_verdicts(tmp_path):
    """benchmarks/gpu_summary.py turns gpu_check.sh's outputs into one screen: the test
    and smoke results, the ratios against torch, each optional path's gain and whether
    CUDA graphs should stay the default."""
    import gpu_summary
    rows = [_row("caffelite", "fp32", 0.010), _row("torch", "fp32", 0.020),
            _row("caffelite-graphs", "fp32", 0.008, graphs="1 segments, 3 launches, 0 failed",
                 same_bits_as_caffelite=True),
            _row("caffelite-im2col", "fp32", 0.015),
            dict(_row("caffelite-unfused", "fp32", 0), error="RuntimeError: same as "
                 "caffelite for this net")]
    profile = {"net": "ASPP-VGG", "precision": "tf32", "engines": {
        "caffelite": gpu_train.summarize_kernels([("ampere_sgemm_64x64_nn", 3000.0),
                                                  ("im2col", 1000.0)]),
        "torch": {"error": "boom"}}}
    (tmp_path / "gpu_train.json").write_text(json.dumps(
        {"rows": rows, "kernel_profiles": [profile]}))
    (tmp_path / "smoke.log").write_text("...\nGPU SMOKE OK\n")
    (tmp_path / "gpu_tests.log").write_text("F.\n=== 669 passed, 2 skipped in 35.70s ===\n")
    lines = gpu_summary.summary(str(tmp_path))
    assert lines[:4] == [
        "pytest -m gpu: 669 passed, 2 skipped",
        "smoke: OK; CUDA graphs in the smoke check: OK; implicit GEMM: not run; "
        "autotuning: not run",
        "conv_igemm.py: no conv_igemm.json (not run, or stopped before the end)",
        "ASPP-VGG test FP32: caffelite 0.0100 s = 0.50x torch"]
    assert ("    CUDA graphs (the default): speed-up 1.25x (with it: 0.0080 s), 0.40x torch; "
            "1 segments, 3 launches, 0 failed; bits equal") in lines
    assert "    tap GEMMs for large dilations: speed-up 1.50x (without it: 0.0150 s)" \
        in lines
    assert ("    fused BatchNorm -> Scale -> ReLU chains: RuntimeError: same as caffelite "
            "for this net") in lines
    assert lines[-4].startswith("keep CUDA graphs the default: YES")
    assert lines[-3] == ("make the implicit-GEMM convolution the TF32 default: NO (no "
                         "conv_igemm.json; no TF32 caffelite-implicit rows were measured)")
    assert lines[-2] == ("make convolution autotuning the TF32 default: NO (no TF32 "
                         "caffelite-autotune rows were measured)")
    assert lines[-1] == ("ASPP-VGG train TF32 kernels: caffelite 4.0 ms (GEMM (cuBLAS) 3.0, "
                         "im2col / col2im 1.0); torch: boom")
    # A failed recording, different bits or failed tests say NO, with the reasons.
    rows[2].update(graphs="1 segments, 2 launches, 1 failed", same_bits_as_caffelite=False)
    (tmp_path / "gpu_train.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "gpu_tests.log").write_text("=== 1 failed, 668 passed in 40.1s ===\n")
    verdict = [l for l in gpu_summary.summary(str(tmp_path)) if l.startswith("keep CUDA graphs")][0]
    assert verdict.startswith("keep CUDA graphs the default: NO (pytest -m gpu did not pass")
    assert "1 segments, 2 launches, 1 failed" in verdict and "bits differ" in verdict
    # Missing outputs are lines, not errors.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert gpu_summary.summary(str(empty)) == [
        "pytest -m gpu: no log (gpu_tests.log)", "smoke: no log (smoke.log)",
        "conv_igemm.py: no conv_igemm.json (not run, or stopped before the end)",
        "gpu_train.py: no gpu_train.json (not run, or stopped before the end)"]


def test_gpu_summary_implicit_gemm_verdict(tmp_path):
    """The implicit-GEMM engine is compared with the default path (CUDA graphs), the
    per-layer benchmark's totals are printed, and the verdict says YES only when the
    tests pass, the results agree with im2col and every TF32 row is faster."""
    import gpu_summary
    rows = [_row("caffelite", "tf32", 0.010), _row("torch", "tf32", 0.004),
            _row("caffelite-graphs", "tf32", 0.008, graphs="1 segments, 3 launches, 0 "
                 "failed", same_bits_as_caffelite=True),
            _row("caffelite-implicit", "tf32", 0.005, graphs="1 segments, 3 launches, 0 "
                 "failed"),
            _row("caffelite", "fp32", 0.02),
            dict(_row("caffelite-implicit", "fp32", 0),
                 error="RuntimeError: TF32 only (FP32 keeps im2col)")]
    igemm = {"rows": [{"layer": "conv1_2", "count": 1, "ms": {},
                       "rel_diff": {"forward": 3e-4, "data_grad": 4e-4},
                       "tile_rel_diff": {"wide": 3e-4, "quad": 0.25,
                                         "quad/weight_grad": 5e-4}}],
             "totals": {"forward/im2col": 2.0, "forward/implicit": 1.5,
                        "forward/cudnn": 1.0, "data_grad/im2col": 3.0,
                        "data_grad/implicit": 1.25, "forward/implicit-wide": 1.5,
                        "forward/implicit-quad": 1.125,
                        "weight_grad/implicit-quad": 2.5}}
    (tmp_path / "gpu_train.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "conv_igemm.json").write_text(json.dumps(igemm))
    (tmp_path / "smoke.log").write_text("implicit GEMM agrees with im2col in TF32\n"
                                        "GPU SMOKE OK\n")
    (tmp_path / "gpu_tests.log").write_text("=== 900 passed in 50.0s ===\n")
    lines = gpu_summary.summary(str(tmp_path))
    assert ("smoke: OK; CUDA graphs in the smoke check: OK; implicit GEMM: OK; autotuning: "
            "not run") in lines
    assert ("conv_igemm.py ASPP-VGG 3x3 forward (sum over layers): im2col 2.00 ms, "
            "implicit 1.50 ms, cudnn 1.00 ms") in lines
    assert ("conv_igemm.py ASPP-VGG 3x3 data_grad (sum over layers): im2col 3.00 ms, "
            "implicit 1.25 ms") in lines
    assert "conv_igemm.py ASPP-VGG 3x3 weight_grad (sum over layers): " in lines
    assert "conv_igemm.py: implicit vs im2col largest relative difference 4.0e-04" in lines
    assert ("conv_igemm.py forward with each tile forced: quad 1.12 ms (diff 2.5e-01: "
            "DIFFERS), wide 1.50 ms (diff 3.0e-04: agrees)") in lines
    assert ("conv_igemm.py weight_grad with each tile forced: quad 2.50 ms (diff 5.0e-04: "
            "agrees)") in lines
    assert not any(line.startswith("make the quad tiles") for line in lines)   # no wgrad
    igemm["totals"]["weight_grad/implicit"] = 3.0
    (tmp_path / "conv_igemm.json").write_text(json.dumps(igemm))
    assert ("make the quad tiles the implicit GEMM's default: NO (quad / wide time: forward "
            "0.75, weight gradient 0.83; largest difference 2.5e-01)") in \
        gpu_summary.summary(str(tmp_path))
    igemm["rows"][0]["tile_rel_diff"]["quad"] = 3e-4
    (tmp_path / "conv_igemm.json").write_text(json.dumps(igemm))
    assert ("make the quad tiles the implicit GEMM's default: YES (quad / wide time: "
            "forward 0.75, weight gradient 0.83; largest difference 5.0e-04)") in \
        gpu_summary.summary(str(tmp_path))
    igemm["rows"][0]["tile_rel_diff"]["quad/weight_grad"] = float("nan")   # unwritten
    (tmp_path / "conv_igemm.json").write_text(json.dumps(igemm))
    assert any(line.startswith("make the quad tiles the implicit GEMM's default: NO")
               and "largest difference nan" in line
               for line in gpu_summary.summary(str(tmp_path)))
    igemm["rows"][0]["tile_rel_diff"]["quad/weight_grad"] = 5e-4
    igemm["rows"][0]["tile_rel_diff"]["quad"] = 0.25
    del igemm["totals"]["weight_grad/implicit"]
    (tmp_path / "conv_igemm.json").write_text(json.dumps(igemm))
    assert ("    implicit-GEMM convolution: speed-up 1.60x (with it: 0.0050 s), 1.25x "
            "torch; 1 segments, 3 launches, 0 failed") in lines
    assert "    implicit-GEMM convolution: RuntimeError: TF32 only (FP32 keeps im2col)" \
        in lines
    assert lines[-2].startswith("make the implicit-GEMM convolution the TF32 default: YES")
    # No row faster: NO; slower than the default path, or results that disagree: NO,
    # with the reasons.
    rows[3]["median_s"] = 0.0081
    (tmp_path / "gpu_train.json").write_text(json.dumps({"rows": rows}))
    verdict = gpu_summary.summary(str(tmp_path))[-2]
    assert verdict == ("make the implicit-GEMM convolution the TF32 default: NO (no TF32 "
                       "row 5 % faster)")
    rows[3]["median_s"] = 0.009
    igemm["rows"][0]["rel_diff"]["forward"] = 0.5
    (tmp_path / "gpu_train.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "conv_igemm.json").write_text(json.dumps(igemm))
    verdict = gpu_summary.summary(str(tmp_path))[-2]
    assert verdict.startswith("make the implicit-GEMM convolution the TF32 default: NO")
    assert "conv1_2: differs from im2col by 5.0e-01" in verdict
    assert "ASPP-VGG test tf32: 0.0090 s, slower than 0.0080 s" in verdict


def test_gpu_summary_autotune_verdict(tmp_path):
    """The autotuning engine against the default path: its gain, the paths it chose,
    and YES only when the tests pass and no TF32 row is slower, one 5 % faster."""
    import gpu_summary
    chose = {"forward": {"columns": 2, "implicit": 15}, "weight": {"implicit-quad": 17}}
    rows = [_row("caffelite", "tf32", 0.010), _row("torch", "tf32", 0.004),
            _row("caffelite-graphs", "tf32", 0.008),
            _row("caffelite-autotune", "tf32", 0.006, autotune=chose),
            _row("caffelite", "fp32", 0.02), _row("caffelite-graphs", "fp32", 0.018),
            _row("caffelite-autotune", "fp32", 0.019, autotune={})]
    (tmp_path / "gpu_train.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "gpu_tests.log").write_text("=== 900 passed in 50.0s ===\n")
    (tmp_path / "conv_igemm.json").write_text(json.dumps({"rows": [
        {"layer": "conv1_2", "rel_diff": {"forward": 3e-4}}], "totals": {}}))
    lines = gpu_summary.summary(str(tmp_path))
    assert ("    convolution autotuning: speed-up 1.33x (with it: 0.0060 s), 1.50x torch; "
            "chose forward implicit 15, columns 2; weight implicit-quad 17") in lines
    assert ("    convolution autotuning: speed-up 0.95x (with it: 0.0190 s); chose "
            "nothing") in lines
    assert lines[-1] == ("make convolution autotuning the TF32 default: YES (tests pass, "
                         "no TF32 row slower, some faster)")
    # it chose the implicit GEMM, whose per-layer check failed: NO
    (tmp_path / "conv_igemm.json").write_text(json.dumps({"rows": [
        {"layer": "conv1_2", "rel_diff": {"forward": 0.5}}]}))
    assert gpu_summary.summary(str(tmp_path))[-1] == (
        "make convolution autotuning the TF32 default: NO (conv_igemm.py conv1_2: differs "
        "from im2col by 5.0e-01)")
    # the smoke check's autotuning step failed: NO whatever it chose
    (tmp_path / "conv_igemm.json").write_text(json.dumps({"rows": [], "totals": {}}))
    (tmp_path / "smoke.log").write_text("AUTOTUNE FAILED\nGPU SMOKE OK\n")
    rows[3]["autotune"] = {"forward": {"columns": 17}}
    (tmp_path / "gpu_train.json").write_text(json.dumps({"rows": rows}))
    assert gpu_summary.summary(str(tmp_path))[-1] == (
        "make convolution autotuning the TF32 default: NO (the smoke check's autotuning "
        "step failed)")
    (tmp_path / "smoke.log").write_text("GPU SMOKE OK\n")
    rows[3]["median_s"] = 0.0083
    (tmp_path / "gpu_train.json").write_text(json.dumps({"rows": rows}))
    assert gpu_summary.summary(str(tmp_path))[-1] == (
        "make convolution autotuning the TF32 default: NO (ASPP-VGG test tf32: 0.0083 s, "
        "slower than 0.0080 s; no TF32 row 5 % faster)")


def test_autotune_engine_tunes_each_net_from_nothing():
    """gpu_train.py's caffelite-autotune engine: the default path with autotuning on
    from no choices, off again afterwards, and the row counts the choices."""
    from caffelite import cuda_graphs
    from caffelite.layers import conv_autotune
    from caffelite.layers.im2col import ConvGeometry
    seen = []
    key = conv_autotune.ProductKey("forward", (1, 2, 3, 3), (4, 2, 3, 3), (1, 4, 3, 3),
                                   ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1)), 1,
                                   "<f4", True, 0, ())

    def run(seconds):
        seen.append((conv_autotune.enabled(), cuda_graphs.enabled(),
                     len(conv_autotune.choices())))
        conv_autotune._choices[key] = ("implicit", {"implicit": 1.0, "columns": 2.0})
        return {"median_s": 1.0}

    class FakeNet:
        _graphs = None
    engine = gpu_train.variants(run, FakeNet())["caffelite-autotune"]
    conv_autotune._choices[key._replace(kind="data")] = ("columns", {})
    assert engine(1.0) == {"median_s": 1.0, "autotune": {"forward": {"implicit": 1}}}
    assert seen == [(True, True, 0)]
    assert not conv_autotune.enabled()


def test_implicit_engine_runs_with_tf32_and_graphs_only():
    """gpu_train.py's caffelite-implicit engine: TF32 rows run the default path (CUDA
    graphs) with implicit_gemm.ENABLED on, and restore it; FP32 rows say why they do
    not run."""
    from caffelite import backend, cuda_graphs
    from caffelite.layers import implicit_gemm
    seen = []

    def run(seconds):
        seen.append((implicit_gemm.ENABLED, cuda_graphs.enabled()))
        return {"median_s": 1.0}

    class FakeNet:
        _graphs = None
    engine = gpu_train.variants(run, FakeNet())["caffelite-implicit"]
    with pytest.raises(RuntimeError, match="TF32 only"):
        engine(1.0)
    backend.set_tf32(True)
    try:
        assert engine(1.0) == {"median_s": 1.0}
    finally:
        backend.set_tf32(False)
    assert seen == [(True, True)]
    assert implicit_gemm.ENABLED is False


def test_conv_igemm_benchmark_runs_on_the_emulator(tmp_path):
    """benchmarks/conv_igemm.py (gpu_check.sh step 2b) at a tiny size on the emulator: a
    row per chosen layer with both caffelite paths timed and agreeing, and the totals."""
    out = tmp_path / "igemm.json"
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "conv_igemm.py"), "--device",
         "emulated", "--size", "9", "--batch", "1", "--layers", "conv1_2,conv2_1",
         "--repeats", "1", "--calls", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert [r["layer"] for r in result["rows"]] == ["conv1_2", "conv2_1"]
    for row in result["rows"]:
        assert set(row["ms"]) == {f"{p}/{e}" for p in ("forward", "data_grad", "weight_grad")
                                  for e in ("im2col", "implicit")} | {
            "forward/implicit-wide", "forward/implicit-narrow", "forward/implicit-quad",
            "weight_grad/implicit-quad"}
        assert all(v < 1e-2 for v in row["rel_diff"].values())      # a NaN fails
        assert set(row["tile_rel_diff"]) == {"wide", "narrow", "quad", "quad/weight_grad"}
        assert all(v < 1e-2 for v in row["tile_rel_diff"].values())
    assert set(result["totals"]) == set(result["rows"][0]["ms"])
    assert "| conv1_2 | 1 |" in run.stdout and "Totals (weighted by count)" in run.stdout
