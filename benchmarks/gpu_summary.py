"""The verdicts of one ``gpu_check.sh`` run, on one screen, for a session whose device
time is short: the tests, the smoke check, each net's time against PyTorch, what each
optional path gains (CUDA graphs, tap GEMMs, fused chains, image groups), whether CUDA
graphs still earn their place as the default, and where the kernel time goes.

    python benchmarks/gpu_summary.py OUTDIR       # gpu_check.sh's output folder

It reads ``smoke.log``, ``gpu_tests.log`` and ``gpu_train.json`` there; a missing file
is a line saying so. It measures nothing itself.
"""
import json
import os
import re
import sys

# engine -> (what the engine changes, whether it is the "before" of the default)
VARIANTS = {
    "caffelite-graphs": ("CUDA graphs (the default)", False),
    "caffelite-im2col": ("tap GEMMs for large dilations", True),
    "caffelite-unfused": ("fused BatchNorm -> Scale -> ReLU chains", True),
    "caffelite-per-image": ("image groups", True),
}


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


def smoke_verdict(log):
    if log is None:
        return "smoke: no log (smoke.log)", False, False
    ok = "GPU SMOKE OK" in log
    graphs_ok = ok and "CUDA GRAPHS FAILED" not in log
    return (f"smoke: {'OK' if ok else 'FAILED'}; CUDA graphs in the smoke check: "
            f"{'OK' if graphs_ok else 'FAILED'}"), ok, graphs_ok


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
        for engine, (what, is_before) in VARIANTS.items():
            row = engines.get(engine)
            if row is None:
                continue
            if not _timed(row):
                lines.append(f"    {what}: {_why(row)}")
                continue
            if is_before:
                gain = row["median_s"] / ours["median_s"]
                text = f"speed-up {gain:.2f}x (without it: {row['median_s']:.4f} s)"
            else:
                gain = ours["median_s"] / row["median_s"]
                text = f"speed-up {gain:.2f}x (with it: {row['median_s']:.4f} s)"
                if _timed(torch):
                    text += f", {row['median_s'] / torch['median_s']:.2f}x torch"
            if "graphs" in row:
                text += f"; {row['graphs']}"
            if "same_bits_as_caffelite" in row:
                text += "; bits " + ("equal" if row["same_bits_as_caffelite"] else "DIFFER")
            lines.append(f"    {what}: {text}")
    return lines


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
    text = read_text(folder, "gpu_train.json")
    if text is None:
        lines.append("gpu_train.py: no gpu_train.json (not run, or stopped before the end)")
        return lines
    result = json.loads(text)
    rows = result.get("rows", [])
    lines += speed_lines(rows)
    lines.append(graphs_default_verdict(rows, tests_passed(tests_log), smoke_graphs_ok))
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
