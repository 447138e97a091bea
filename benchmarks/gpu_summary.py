"""The verdicts of one ``gpu_check.sh`` run, on one screen, for a session whose device
time is short: the tests, the smoke check, each net's time against PyTorch, what each
optional path gains (CUDA graphs, tap GEMMs, fused chains, image groups, the
implicit-GEMM convolution, autotuning), whether CUDA graphs still earn their place as
the default, whether the implicit-GEMM convolution or convolution autotuning should
become the TF32 default, and where the kernel time goes.

    python benchmarks/gpu_summary.py OUTDIR       # gpu_check.sh's output folder

It reads ``smoke.log``, ``gpu_tests.log``, ``conv_igemm.json`` and ``gpu_train.json``
there; a missing file is a line saying so. It measures nothing itself.
"""
import json
import math
import os
import re
import sys

# engine -> (what the engine changes, whether it is the "before" of the default, the
# engine it differs from by that one setting)
VARIANTS = {
    "caffelite-graphs": ("CUDA graphs (the default)", False, "caffelite"),
    "caffelite-im2col": ("tap GEMMs for large dilations", True, "caffelite"),
    "caffelite-unfused": ("fused BatchNorm -> Scale -> ReLU chains", True, "caffelite"),
    "caffelite-per-image": ("image groups", True, "caffelite"),
    "caffelite-implicit": ("implicit-GEMM convolution", False, "caffelite-graphs"),
    "caffelite-autotune": ("convolution autotuning", False, "caffelite-graphs"),
    "caffelite-blob-1x1": ("padded image groups for large 1x1 convolutions (TF32)", True,
                           "caffelite"),
}
# Both TF32: the implicit GEMM and im2col + cuBLAS differ by rounding, about 1e-3 of the
# largest value; far more is a broken kernel.
IMPLICIT_MAX_REL_DIFF = 1e-2


def read_text(folder, name):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    with open(path, errors="replace") as f:
        return f.read()


_PYTEST_SUMMARY = re.compile(r"^=*\s*((?:\d+ [\w ]+?(?:, )?)+) in [\d.]+s", re.M)


def pytest_summary(log):
    """pytest's last summary line ('2 failed, 660 passed, 3 skipped'), or None."""
    found = _PYTEST_SUMMARY.findall(log or "")
    return found[-1] if found else None


def test_verdict(log):
    if log is None:
        return "pytest -m gpu: no log (gpu_tests.log)"
    found = pytest_summary(log)
    if found is None:
        return "pytest -m gpu: no summary line (timed out or crashed; see gpu_tests.log)"
    return f"pytest -m gpu: {found}"


def tests_passed(log):
    found = pytest_summary(log)
    return bool(found) and "passed" in found and not re.search(r"failed|error", found)


# The smoke check's opt-in steps: {name: (what it prints when it fails, when it passes)}.
SMOKE_STEPS = {"implicit GEMM": ("IMPLICIT GEMM FAILED", "implicit GEMM agrees with im2col"),
               "autotuning": ("AUTOTUNE FAILED", "autotuned convolutions agree with im2col")}


def smoke_step(log, step):
    """FAILED, OK or not run: how the smoke check's opt-in ``step`` went."""
    failed, passed = SMOKE_STEPS[step]
    return "FAILED" if failed in log else "OK" if passed in log else "not run"


def smoke_failures(log):
    """{step: the reason against its path} of the smoke check's failed opt-in steps."""
    return {step: f"the smoke check's {step} step failed" for step in SMOKE_STEPS
            if smoke_step(log or "", step) == "FAILED"}


def smoke_verdict(log):
    if log is None:
        return "smoke: no log (smoke.log)", False, False
    ok = "GPU SMOKE OK" in log
    graphs_ok = ok and "CUDA GRAPHS FAILED" not in log
    steps = "; ".join(f"{step}: {smoke_step(log, step)}" for step in SMOKE_STEPS)
    return (f"smoke: {'OK' if ok else 'FAILED'}; CUDA graphs in the smoke check: "
            f"{'OK' if graphs_ok else 'FAILED'}; {steps}"), ok, graphs_ok


def _key(row):
    return row["net"], row["phase"], row["precision"]


def speed_lines(rows):
    """Per net, phase and precision: caffelite against torch, then each variant against
    caffelite (a variant that is the 'before' of a default shows the default's gain)."""
    groups = {}
    for row in rows:
        groups.setdefault(_key(row), {})[row["engine"]] = row
    lines = []
    for (net, phase, precision), engines in groups.items():
        ours, torch = engines.get("caffelite"), engines.get("torch")
        label = f"{net} {phase} {precision.upper()}"
        if not _timed(ours):
            lines.append(f"{label}: caffelite {_why(ours)}")
            continue
        versus = (f"{ours['median_s'] / torch['median_s']:.2f}x torch" if _timed(torch)
                  else f"torch {_why(torch)}")
        lines.append(f"{label}: caffelite {ours['median_s']:.4f} s = {versus}")
        for engine, (what, is_before, baseline) in VARIANTS.items():
            row = engines.get(engine)
            if row is None:
                continue
            if not _timed(row):
                lines.append(f"    {what}: {_why(row)}")
                continue
            base = engines.get(baseline)
            if not _timed(base):
                lines.append(f"    {what}: {row['median_s']:.4f} s ({baseline} "
                             f"{_why(base)})")
                continue
            if is_before:
                gain = row["median_s"] / base["median_s"]
                text = f"speed-up {gain:.2f}x (without it: {row['median_s']:.4f} s)"
            else:
                gain = base["median_s"] / row["median_s"]
                text = f"speed-up {gain:.2f}x (with it: {row['median_s']:.4f} s)"
                if _timed(torch):
                    text += f", {row['median_s'] / torch['median_s']:.2f}x torch"
            if "graphs" in row:
                text += f"; {row['graphs']}"
            if "autotune" in row:
                text += "; chose " + autotune_text(row["autotune"])
            if "same_bits_as_caffelite" in row:
                text += "; bits " + ("equal" if row["same_bits_as_caffelite"] else "DIFFER")
            lines.append(f"    {what}: {text}")
    return lines


def autotune_text(chosen):
    """{kind: {path: products}} as 'forward implicit 12, columns 3; ...'."""
    return "; ".join(f"{kind} " + ", ".join(f"{path} {count}" for path, count in
                                            sorted(paths.items(), key=lambda p: -p[1]))
                     for kind, paths in sorted(chosen.items())) or "nothing"


def _timed(row):
    return row is not None and "median_s" in row and row["median_s"] > 0


def _why(row):
    return "not run" if row is None else row.get("error", "no time")


def graphs_default_verdict(rows, tests_ok, smoke_graphs_ok):
    """Whether CUDA graphs (the default since session 10) may stay so: the tests and the
    smoke check pass, every graphs row recorded without failures, test scores kept
    their bits, and no graphs row is slower than layer by layer."""
    graph_rows = [r for r in rows if r["engine"] == "caffelite-graphs"]
    reasons = []
    if not tests_ok:
        reasons.append("pytest -m gpu did not pass")
    if not smoke_graphs_ok:
        reasons.append("the smoke check's graphs failed")
    if not graph_rows:
        reasons.append("no caffelite-graphs rows were measured")
    for row in graph_rows:
        label = " ".join(str(x) for x in _key(row))
        if not _timed(row):
            reasons.append(f"{label}: {_why(row)}")
            continue
        failed = re.search(r"(\d+) failed", row.get("graphs", ""))
        if failed is None or int(failed.group(1)):
            reasons.append(f"{label}: {row.get('graphs', 'no recording counts')}")
        if row.get("same_bits_as_caffelite") is False:
            reasons.append(f"{label}: the scores' bits differ from layer by layer")
        ours = next((r for r in rows if _key(r) == _key(row) and r["engine"] == "caffelite"),
                    None)
        if _timed(ours) and row["median_s"] > ours["median_s"] * 1.02:
            reasons.append(f"{label}: slower than layer by layer")
    if reasons:
        return "keep CUDA graphs the default: NO (" + "; ".join(reasons) + ")"
    return ("keep CUDA graphs the default: YES (tests, smoke check and every graphs row "
            "pass, bits equal)")


def conv_igemm_lines(result):
    """The per-layer benchmark's totals and worst difference, one line each."""
    if result is None:
        return ["conv_igemm.py: no conv_igemm.json (not run, or stopped before the end)"]
    rows = result.get("rows", [])
    errors = [f"{r['layer']}: {r['error']}" for r in rows if "error" in r]
    totals = result.get("totals", {})
    lines = []
    for what in ("forward", "data_grad", "weight_grad"):
        cells = [f"{e} {totals[f'{what}/{e}']:.2f} ms" for e in ("im2col", "implicit",
                                                                 "cudnn")
                 if f"{what}/{e}" in totals]
        lines.append(f"conv_igemm.py ASPP-VGG 3x3 {what} (sum over layers): " +
                     ", ".join(cells))
    diffs = [max(r["rel_diff"].values()) for r in rows if "rel_diff" in r]
    if diffs:
        lines.append(f"conv_igemm.py: implicit vs im2col largest relative difference "
                     f"{max(diffs):.1e}")
    for what in ("forward", "weight_grad"):
        tiles = sorted({k.split("/implicit-", 1)[1] for k in totals
                        if k.startswith(f"{what}/implicit-")})
        cells = []
        for tile in tiles:
            key = tile if what == "forward" else f"{tile}/{what}"
            worst = _worst([r.get("tile_rel_diff", {}).get(key, NAN) for r in rows
                            if "ms" in r])
            verdict = "agrees" if worst <= IMPLICIT_MAX_REL_DIFF else "DIFFERS"
            cells.append(f"{tile} {totals[f'{what}/implicit-{tile}']:.2f} ms "
                         f"(diff {worst:.1e}: {verdict})")
        if cells:
            lines.append(f"conv_igemm.py {what} with each tile forced: " + ", ".join(cells))
    lines += quad_tile_verdict(rows, totals)
    if errors:
        lines.append("conv_igemm.py errors: " + "; ".join(errors))
    return lines


NAN = float("nan")


def _worst(values):
    """The largest difference; NaN when there is none or any is NaN (an unwritten
    output), so that a comparison with a bound fails."""
    values = list(values)
    if not values or any(math.isnan(v) for v in values):
        return NAN
    return max(values)


def quad_tile_verdict(rows, totals):
    """Whether the quad tiles (four warps of 64 x 64) should replace the eight-warp wide
    ones: they agree with im2col and are faster in total, forward and weight gradient."""
    keys = ("forward/implicit-quad", "forward/implicit-wide", "weight_grad/implicit-quad",
            "weight_grad/implicit")
    if not all(k in totals for k in keys):
        return []
    worst = _worst([r.get("tile_rel_diff", {}).get(k, NAN) for r in rows if "ms" in r
                    for k in ("quad", "quad/weight_grad")])
    forward = totals["forward/implicit-quad"] / totals["forward/implicit-wide"]
    weights = totals["weight_grad/implicit-quad"] / totals["weight_grad/implicit"]
    yes = worst <= IMPLICIT_MAX_REL_DIFF and forward < 0.97 and weights < 0.97
    return [f"make the quad tiles the implicit GEMM's default: {'YES' if yes else 'NO'} "
            f"(quad / wide time: forward {forward:.2f}, weight gradient {weights:.2f}; "
            f"largest difference {worst:.1e})"]


NCU_KEYS = ("conv_igemm_forward", "conv_igemm_wgrad", "Duration", "Compute (SM) Throughput",
            "Memory Throughput", "Achieved Occupancy", "Registers Per Thread",
            "Bank Conflicts")


def ncu_lines(text, limit=60):
    """The lines of ncu.txt that say what limits the implicit-GEMM kernels."""
    if text is None:
        return []
    picked = [" ".join(line.split()) for line in text.splitlines()
              if any(key in line for key in NCU_KEYS)]
    return ["ncu: " + line for line in picked[:limit]] or ["ncu: no kernel metrics in "
                                                          "ncu.txt"]


def tf32_default_verdict(rows, tests_ok, engine, what, reasons=(), agree=""):
    """Whether ``engine``'s setting should become the TF32 default: no ``reasons``
    against it, the tests pass, no TF32 row of it is more than 2 % slower than the
    default path's (caffelite-graphs; small layers barely change) and at least one is
    5 % faster. ``agree``: what the YES line adds after "tests pass"."""
    reasons = list(reasons)
    if not tests_ok:
        reasons.append("pytest -m gpu did not pass")
    engine_rows = [r for r in rows if r["engine"] == engine and r["precision"] == "tf32"]
    if not engine_rows:
        reasons.append(f"no TF32 {engine} rows were measured")
    faster = False
    for row in engine_rows:
        label = " ".join(str(x) for x in _key(row))
        base = next((r for r in rows if _key(r) == _key(row)
                     and r["engine"] == "caffelite-graphs"), None)
        if not _timed(row) or not _timed(base):
            reasons.append(f"{label}: {_why(row) if not _timed(row) else 'no graphs row'}")
        elif row["median_s"] > base["median_s"] * 1.02:
            reasons.append(f"{label}: {row['median_s']:.4f} s, slower than "
                           f"{base['median_s']:.4f} s")
        faster = faster or (_timed(row) and _timed(base)
                            and row["median_s"] <= base["median_s"] * 0.95)
    if engine_rows and not faster:
        reasons.append("no TF32 row 5 % faster")
    if reasons:
        return f"make {what} the TF32 default: NO (" + "; ".join(reasons) + ")"
    return (f"make {what} the TF32 default: YES (tests pass{agree}, no TF32 row slower, "
            "some faster)")


def implicit_default_verdict(rows, tests_ok, igemm, smoke_failed=None):
    """Whether the implicit-GEMM convolution should become the TF32 default:
    ``tf32_default_verdict`` for the caffelite-implicit engine, and its results agree
    with im2col's (conv_igemm.json) and in the smoke check (``smoke_failures``)."""
    reasons = _implicit_reasons(igemm, smoke_failed or {})
    return tf32_default_verdict(rows, tests_ok, "caffelite-implicit",
                                "the implicit-GEMM convolution", reasons, ", results agree")


def _implicit_reasons(igemm, smoke_failed):
    """What the smoke check and conv_igemm.json say against the implicit GEMM's
    results."""
    reasons = [smoke_failed["implicit GEMM"]] if "implicit GEMM" in smoke_failed else []
    if igemm is None:
        return reasons + ["no conv_igemm.json"]
    for row in igemm.get("rows", []):
        if "error" in row:
            reasons.append(f"conv_igemm.py {row['layer']}: {row['error']}")
        elif not _worst(row["rel_diff"].values()) <= IMPLICIT_MAX_REL_DIFF:
            reasons.append(f"conv_igemm.py {row['layer']}: differs from im2col by "
                           f"{_worst(row['rel_diff'].values()):.1e}")
    return reasons


def autotune_default_verdict(rows, tests_ok, igemm, smoke_failed=None):
    """Whether convolution autotuning should become the TF32 default:
    ``tf32_default_verdict`` for the caffelite-autotune engine, its smoke step passed,
    and where it chose an implicit-GEMM path, that kernel's results agree with
    im2col's."""
    smoke_failed = smoke_failed or {}
    chose_implicit = any(path.startswith("implicit")
                         for row in rows if row["engine"] == "caffelite-autotune"
                         for paths in row.get("autotune", {}).values() for path in paths)
    reasons = [smoke_failed["autotuning"]] if "autotuning" in smoke_failed else []
    if chose_implicit:
        reasons += _implicit_reasons(igemm, smoke_failed)
    return tf32_default_verdict(rows, tests_ok, "caffelite-autotune",
                                "convolution autotuning", reasons)


def kernel_lines(profiles):
    lines = []
    for p in profiles:
        label = f"{p['net']} train {p['precision'].upper()} kernels"
        if "error" in p:
            lines.append(f"{label}: {p['error']}")
            continue
        parts = []
        for engine, v in p["engines"].items():
            if "error" in v:
                parts.append(f"{engine}: {v['error']}")
                continue
            kinds = sorted(v["kinds"].items(), key=lambda kv: -kv[1])[:4]
            parts.append(f"{engine} {v['total_ms']:.1f} ms (" +
                         ", ".join(f"{k} {ms:.1f}" for k, ms in kinds) + ")")
        lines.append(f"{label}: " + "; ".join(parts))
    return lines


def summary(folder):
    lines = []
    tests_log = read_text(folder, "gpu_tests.log")
    lines.append(test_verdict(tests_log))
    smoke_line, _, smoke_graphs_ok = smoke_verdict(read_text(folder, "smoke.log"))
    lines.append(smoke_line)
    igemm_text = read_text(folder, "conv_igemm.json")
    igemm = None if igemm_text is None else json.loads(igemm_text)
    lines += conv_igemm_lines(igemm)
    lines += ncu_lines(read_text(folder, "ncu.txt"))
    text = read_text(folder, "gpu_train.json")
    if text is None:
        lines.append("gpu_train.py: no gpu_train.json (not run, or stopped before the end)")
        return lines
    result = json.loads(text)
    rows = result.get("rows", [])
    lines += speed_lines(rows)
    lines.append(graphs_default_verdict(rows, tests_passed(tests_log), smoke_graphs_ok))
    smoke_failed = smoke_failures(read_text(folder, "smoke.log"))
    lines.append(implicit_default_verdict(rows, tests_passed(tests_log), igemm,
                                          smoke_failed))
    lines.append(autotune_default_verdict(rows, tests_passed(tests_log), igemm,
                                          smoke_failed))
    lines += kernel_lines(result.get("kernel_profiles", []))
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.stderr.write("usage: gpu_summary.py OUTDIR\n")
        return 2
    print("\n".join(summary(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
