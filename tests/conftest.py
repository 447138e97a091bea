import contextlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

SHARED = os.environ.get("CAFFELITE_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
CORPUS = os.path.join(SHARED, "corpus")

# Where cupy is importable (no GPU needed), the GPU emulator checks every array-API call
# against it, so what the emulated GPU tests run is what CuPy accepts (set the variable
# to 0 to switch the check off); subprocesses inherit the variable.
os.environ.setdefault("CAFFELITE_EMULATOR_CUPY_CHECK", "1")
# `caffelite train` without --gpu follows the solver's solver_mode (GPU by default, as in
# Caffe): the tests train on the CPU wherever they run, unless a test says otherwise.
os.environ.setdefault("CAFFELITE_SOLVER_MODE", "cpu")
# The GPU emulator's empty/empty_like give NaN-filled memory in every test (as CuPy's pool
# hands back memory holding what it held), so device code that reads an element it never
# wrote shows; 0 switches it off.
os.environ.setdefault("CAFFELITE_EMULATOR_POISON_EMPTY", "1")
from caffelite.kernels import emulator as _emulator  # noqa: E402

_emulator.set_cupy_check(None)


@contextlib.contextmanager
def working_dir(folder):
    """``folder`` as the working directory for the block (contextlib.chdir from 3.11)."""
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def caffelite_logger_kept():
    """The 'caffelite' logger as it was before the block (CLI entry points reconfigure
    it: glog handlers, no propagation, a level)."""
    import logging
    log = logging.getLogger("caffelite")
    saved = (list(log.handlers), log.propagate, log.level)
    try:
        yield
    finally:
        log.handlers[:], log.propagate = saved[0], saved[1]
        log.setLevel(saved[2])      # (not log.level =: setLevel clears logging's cache)


@pytest.fixture(autouse=True)
def _restore_caffelite_logger():
    """Every test gets the logger as it found it (a module-scoped fixture that runs a
    CLI entry point, which runs before this, keeps it with ``caffelite_logger_kept``)."""
    with caffelite_logger_kept():
        yield


@pytest.fixture(autouse=True)
def _restore_cuda_graphs_flag():
    """Tests switch CUDA graphs on or off; every test starts from the default (on, or
    CAFFELITE_CUDA_GRAPHS)."""
    from caffelite import cuda_graphs
    saved = cuda_graphs.enabled()
    yield
    cuda_graphs.set_enabled(saved)


@pytest.fixture(autouse=True)
def _restore_conv_autotune():
    """Tests switch convolution autotuning on; every test starts from the default (off,
    or CAFFELITE_CONV_AUTOTUNE) with no choices made."""
    from caffelite.layers import conv_autotune
    saved = conv_autotune.enabled()
    yield
    conv_autotune.set_enabled(saved)
    conv_autotune.forget()


@pytest.fixture
def poisoned_device_memory():
    """The GPU emulator's ``empty``/``empty_like`` give memory with every bit set (NaN in
    a float) for the test, as CuPy's pool hands back memory holding what it held: a
    device element that a path forgets to write then shows. On a real GPU every new
    allocation from CuPy's pool is filled so too."""
    previous = _emulator.set_poison_empty(True)
    with _real_device_memory_poisoned():
        yield
    _emulator.set_poison_empty(previous)


def _usable_cupy():
    """CuPy where it has a device to run on, else None."""
    try:
        import cupy
        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:       # noqa: BLE001  (not installed, no driver, no device)
        return None


@contextlib.contextmanager
def _real_device_memory_poisoned():
    """On a real GPU, the same: every allocation from CuPy's default pool is set to 0xFF
    bytes (NaN in a float) on the current stream before the caller gets it."""
    cupy = _usable_cupy()
    if cupy is None:
        yield
        return
    pool = cupy.get_default_memory_pool()

    def poisoned_malloc(size):
        memory = pool.malloc(size)
        if size:
            cupy.cuda.runtime.memsetAsync(memory.ptr, 0xFF, size,
                                          cupy.cuda.get_current_stream().ptr)
        return memory
    previous = cupy.cuda.get_allocator()
    cupy.cuda.set_allocator(poisoned_malloc)
    try:
        yield
    finally:
        cupy.cuda.set_allocator(previous)


@pytest.fixture(params=["full_grid", "small_grid"])
def launch(request):
    """Kernel launch shapes: the loader's default grid, and a 2x3-thread grid whose
    grid-stride loops walk many elements per thread."""
    return {} if request.param == "full_grid" else {"grid": 2, "block": 3}


def compile_oracle(tmp_path_factory, name, *flags, why=""):
    """Build tests/oracles/<name>.cpp with g++ (or $CXX) into a temporary folder and
    return the executable's path; skip the test without a compiler."""
    import shutil
    import subprocess
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx:
        pytest.skip(f"no C++ compiler (g++ or $CXX) for {why or name}")
    exe = str(tmp_path_factory.mktemp(name) / name)
    source = os.path.join(ROOT, "tests", "oracles", f"{name}.cpp")
    subprocess.run([cxx, "-O2", *flags, "-o", exe, source], check=True, capture_output=True)
    return exe


def corpus_path(*parts):
    path = os.path.join(CORPUS, *parts)
    if not os.path.exists(path):
        pytest.skip(f"corpus file not available: {path}")
    return path


@pytest.fixture
def untrained(tmp_path):
    """--weights for `caffelite test`, which needs weights to score (as Caffe's): a
    caffemodel with none of a test net's layers, so the net keeps its fillers' weights
    (with a warning)."""
    from caffelite.proto import caffe_pb2
    path = tmp_path / "untrained.caffemodel"
    model = caffe_pb2.NetParameter(name="none")
    model.layer.add(name="unrelated")
    path.write_bytes(model.SerializeToString())
    return str(path)
