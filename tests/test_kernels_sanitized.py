"""caffelite's CUDA kernels under AddressSanitizer and UBSan, on the host (no GPU).

On a GPU an out-of-bounds access in a kernel is an illegal-address crash at best and a
silently corrupted neighbouring buffer at worst, and compute-sanitizer needs a device.
Here the host kernel tests (test_kernels_host.py, test_crf_gpu_kernels.py) and the
emulated GPU layer tests (test_gpu_layers.py: the layers' own launches, with their
views into batches and workspaces) run again in a subprocess whose kernels are built
with ``-fsanitize=address,undefined,float-cast-overflow`` (caffelite.kernels.host with
CAFFELITE_HOST_SANITIZE; a separate build directory) and whose Python preloads the
compiler's libasan. Any out-of-bounds read or write of a kernel argument, signed
overflow, bad shift, misaligned or null access, or float-to-int conversion out of
int's range aborts that run with a report, and the test fails showing it.
float-cast-overflow is not part of "undefined" but matters doubly here: a GPU
saturates such conversions (NaN -> 0) where the host does something else, so the two
would silently disagree.

Why an overrun of any argument is seen: numpy takes array data from malloc, so under
ASan every array is its own heap block with poisoned redzones right before and after
it, for every size (checked with a deliberately overrunning kernel for 1 to 2 M
elements, float and double, reading one element past the end and one before the
start): numpy's small-block cache (< 1024 bytes) only hands a freed block back for the
same byte count, so a reused block still ends at a redzone, and its huge-page hint
(>= 4 MiB) only madvises pages inside the block. What malloc cannot show is an overrun
of a VIEW into a larger array (one image of a batch, a prefix of the column
workspace): it lands in the neighbouring elements. A sanitized HostKernels therefore
runs every argument that is not a whole heap block on an exact-size copy
(host._isolated), which test_sanitizers_catch_deliberate_bugs checks too.

Each test_sanitizers_catch_deliberate_bugs case runs a tiny deliberately broken kernel
(written to tmp_path, built through the same host.py path) in a sanitized subprocess
and requires the sanitizer's report, so a sanitizer that silently stopped working
fails here rather than passing everything.
"""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from caffelite import kernels
from caffelite.kernels import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANITIZE = "address,undefined,float-cast-overflow"
SUITES = ["tests/test_kernels_host.py", "tests/test_crf_gpu_kernels.py",
          "tests/test_gpu_layers.py", "tests/test_conv_igemm.py",
          # the label-conversion test below, whose fix only a sanitized build can see
          "tests/test_kernels_sanitized.py::test_labels_beyond_int_are_bad_labels"]
FLOATS = [np.float32, np.float64]


@pytest.fixture(scope="module")
def sanitized_env():
    """Environment for a Python that loads sanitized kernel builds (or skip)."""
    if host.compiler() is None:
        pytest.skip("no C++ compiler (g++ or $CXX): nothing to build sanitized kernels with")
    if host.runtime_library("asan") is None:
        pytest.skip(f"{host.compiler()} has no libasan.so (-print-file-name=libasan.so): "
                    f"AddressSanitizer is not installed for it")
    env = host.sanitizer_environment(SANITIZE)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    started = subprocess.run([sys.executable, "-c", "import numpy"], env=env, cwd=ROOT,
                             capture_output=True, text=True, check=False)
    if started.returncode != 0:
        pytest.skip(f"Python does not start with ASan preloaded here: "
                    f"{(started.stderr.strip().splitlines() or ['?'])[-1]}")
    return env


REPORTS = ("ERROR: AddressSanitizer", "runtime error:")


def _tail(text, lines=60):
    return "\n".join(text.splitlines()[-lines:])


def _report(output):
    """The first sanitizer report in ``output`` with the test running then (pytest -v
    names each test before it runs), or the output's tail."""
    starts = [output.find(r) for r in REPORTS if r in output]
    if not starts:
        return _tail(output)
    lines = output[:min(starts)].splitlines()
    return "\n".join(lines[-3:]) + "\n" + "\n".join(
        output[min(starts):].splitlines()[:40])


def test_kernel_tests_pass_with_sanitized_kernels(sanitized_env, tmp_path):
    # -v names every test before it runs; --capture=sys lets the sanitizer's report
    # (written to fd 2 by the C runtime, then the process ends) reach us. The NVRTC
    # checks run no host kernel.
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "--capture=sys", "-p", "no:cacheprovider",
         "-k", "not nvrtc", f"--basetemp={tmp_path / 'run'}", *SUITES],
        env=sanitized_env, cwd=ROOT, capture_output=True, text=True, check=False)
    output = run.stdout + run.stderr
    assert not any(r in output for r in REPORTS), _report(output)
    assert run.returncode == 0, f"sanitized kernel tests failed:\n{_tail(output)}"
    # They really ran sanitized builds of every module (not the plain ones).
    flavour = "sanitize-" + "-".join(sorted(host.sanitizers(SANITIZE)))
    built = {f.split("-")[0] for d, _, files in os.walk(tmp_path / "run")
             if os.path.basename(d) == flavour for f in files if f.endswith(".so")}
    assert built == set(kernels.module_names())


PROBE_KERNELS = """\
#ifndef CAFFELITE_KERNEL_LOOP
#define CAFFELITE_KERNEL_LOOP(i, n) \\
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)
#endif

// y[i] = x[i + shift]: shift 1 reads one element past the end of x.
template <typename T>
__global__ void shifted_read(const int n, const T* x, const int shift, T* y) {
  CAFFELITE_KERNEL_LOOP(i, n) { y[i] = x[i + shift]; }
}

// y[i + shift] = x[i]: shift -1 writes one element before the start of y.
template <typename T>
__global__ void shifted_write(const int n, const T* x, const int shift, T* y) {
  CAFFELITE_KERNEL_LOOP(i, n) { y[i + shift] = x[i]; }
}

// y[i] = int(x[i]) * factor: overflows for a large factor; NaN x has no int value.
template <typename T>
__global__ void scaled_int(const int n, const T* x, const int factor, T* y) {
  CAFFELITE_KERNEL_LOOP(i, n) { y[i] = T(static_cast<int>(x[i]) * factor); }
}
"""

PROBE_SCRIPT = """\
import sys
import numpy as np
from caffelite import kernels
from caffelite.kernels.host import HostKernels

kernels.KERNEL_DIR = sys.argv[1]      # where probe.cu is; the build is host.py's as ever
built = HostKernels(sys.argv[2])
case = sys.argv[3]
f32 = np.float32
x, y = np.arange(8, dtype=f32), np.zeros(8, f32)
if case == "in_bounds":
    built.run("probe", "shifted_read", f32, 8, x, 0, y)
    assert y.tolist() == x.tolist()
elif case == "read_past_the_end":
    built.run("probe", "shifted_read", f32, 8, x, 1, y)
elif case == "write_before_a_view":       # in the parent's memory: only _isolated sees it
    parent = np.zeros(10, f32)
    built.run("probe", "shifted_write", f32, 8, x, -1, parent[1:9])
elif case == "signed_overflow":
    built.run("probe", "scaled_int", f32, 8, x, 1 << 30, y)
elif case == "nan_to_int":
    x[5] = np.nan
    built.run("probe", "scaled_int", f32, 8, x, 1, y)
print("the kernel returned")
"""

CASES = {   # case: what the sanitizer must report
    "read_past_the_end": ["AddressSanitizer: heap-buffer-overflow", "READ of size 4"],
    "write_before_a_view": ["AddressSanitizer: heap-buffer-overflow", "WRITE of size 4"],
    "signed_overflow": ["runtime error: signed integer overflow"],
    "nan_to_int": ["runtime error: nan is outside the range of representable values"],
}


@pytest.fixture(scope="module")
def probe(sanitized_env, tmp_path_factory):
    """Runs a probe case in a sanitized Python; the module is built by the first run,
    the in-bounds control, which must pass."""
    source_dir = tmp_path_factory.mktemp("probe_source")
    (source_dir / "probe.cu").write_text(PROBE_KERNELS)
    (source_dir / "probe.py").write_text(PROBE_SCRIPT)
    build_dir = tmp_path_factory.mktemp("probe_build")

    def run(case):
        return subprocess.run([sys.executable, str(source_dir / "probe.py"), str(source_dir),
                               str(build_dir), case], env=sanitized_env, cwd=ROOT,
                              capture_output=True, text=True, check=False)

    control = run("in_bounds")
    assert control.returncode == 0 and "the kernel returned" in control.stdout, \
        _tail(control.stdout + control.stderr)
    return run


@pytest.mark.parametrize("case", sorted(CASES))
def test_sanitizers_catch_deliberate_bugs(probe, case):
    result = probe(case)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"{case} was not caught:\n{_tail(output)}"
    assert "the kernel returned" not in result.stdout, _tail(output)
    for report in CASES[case]:
        assert report in output, f"{case}: no '{report}' in\n{_tail(output)}"
    assert "probe.cu" in output, _tail(output)     # the report points into the kernel


def test_plain_builds_refuse_to_mix_with_sanitized_ones(tmp_path):
    plain = host.HostKernels(tmp_path, sanitize="")
    sanitized = host.HostKernels(tmp_path, sanitize=SANITIZE)
    assert plain.build_dir == str(tmp_path)
    assert sanitized.build_dir != plain.build_dir
    assert os.path.dirname(sanitized.build_dir) == str(tmp_path)
    for name in kernels.module_names():
        assert os.path.basename(plain._paths(name)[2]) != \
            os.path.basename(sanitized._paths(name)[2])
    with pytest.raises(ValueError, match="bad sanitizer name"):
        host.HostKernels(tmp_path, sanitize="address;rm")


# ----------------------------------------------------------- the bug the sanitizer found
# softmax_loss.cu and seg_confusion.cu converted float labels with static_cast<int>:
# undefined for NaN, +-inf and values beyond int (UBSan's float-cast-overflow), and a GPU
# turns NaN into 0, a silent class-0 label where the numpy layers report a bad label.
# On x86 the conversion happens to give INT_MIN, so a plain host build passes this test
# either way; in the sanitized run (SUITES) it aborted before the fix.

@pytest.fixture(scope="module")
def kern(tmp_path_factory):
    if host.compiler() is None:
        pytest.skip("no C++ compiler (g++ or $CXX): the host-compiled kernel tests need one")
    return host.HostKernels(tmp_path_factory.mktemp("label_kernels"))


def numpy_labels(labels, ignore):
    """The numpy layers' rule (softmax.integer_labels + check_label_range, SegAccuracy's
    forward): labels.astype(int64); bad = not ignored and outside [0, C)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # NaN/inf casts
        lab = labels.astype(np.int64)
    return lab, lab != ignore


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("ignore", [-1, 255])
def test_labels_beyond_int_are_bad_labels(kern, dtype, ignore):
    channels = 3
    labels = np.array([0, np.nan, 1, np.inf, -np.inf, 3e9, -3e9, 2.0 ** 31, 2, ignore,
                       -0.5, 2.9], dtype)
    n = labels.size
    lab, kept = numpy_labels(labels, ignore)
    bad = kept & ((lab < 0) | (lab >= channels))
    assert bad.tolist() == [False, True, False, True, True, True, True, True, False, False,
                            False, False]
    counted = kept & ~bad
    rng = np.random.default_rng(0)
    prob = rng.uniform(0.1, 1.0, (1, channels, n)).astype(dtype)
    prob /= prob.sum(axis=1, keepdims=True)

    loss = np.full(n, -7.0, dtype)      # not NaN: NaN is what a bad label must get
    counts = np.full(n, np.nan, dtype)
    kern.run("softmax_loss", "softmax_loss_forward", dtype, n, prob, labels, channels, n,
             1, ignore, loss, counts)
    assert np.isnan(loss).tolist() == bad.tolist()          # NaN = reported as bad
    assert counts.tolist() == kept.astype(dtype).tolist()
    picked = prob[0, np.where(counted, lab, 0), np.arange(n)][counted]
    np.testing.assert_allclose(loss[counted], -np.log(picked), rtol=4 * np.finfo(dtype).eps)
    assert (loss[~kept] == 0).all()

    confusion = np.zeros((channels, channels), np.uint64)
    first_bad = np.array([n], np.int32)
    kern.run("seg_confusion", "seg_confusion", dtype, n, prob, labels, channels, n,
             np.array([ignore], np.int32), 1, confusion, first_bad)
    assert first_bad[0] == np.flatnonzero(bad)[0]
    pred = channels - 1 - np.argmax(prob[0, ::-1], axis=0)      # ties to the highest class
    expected = np.zeros((channels, channels), np.uint64)
    np.add.at(expected, (lab[counted], pred[counted]), 1)
    np.testing.assert_array_equal(confusion, expected)
