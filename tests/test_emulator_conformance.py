"""The GPU emulator's CuPy conformance mode (kernels/cupy_conformance.py).

Each case runs one call on the emulator in conformance mode and the same call on real
CuPy, the oracle: without a GPU, CuPy gets to its missing CUDA driver exactly when it
accepted the arguments (a call it refuses raises TypeError, AttributeError or
NotImplementedError first, or its __array_function__/__array_ufunc__ gives
NotImplemented). The verdicts must agree, and match the case's expected verdict.
"""
import copy
import pickle
import sys

import numpy as np
import pytest

from caffelite import backend, kernels
from caffelite.kernels import cupy_conformance, emulator

from gpu_modes import cuda_available

ACCEPTS, REJECTS = "accepts", "rejects"


def _cupy_or_skip():
    return pytest.importorskip("cupy", reason="the conformance mode needs an importable cupy")


@pytest.fixture
def xp():
    """The emulator in conformance mode (restored to its previous state afterwards)."""
    _cupy_or_skip()
    previous = emulator.cupy_check_active()
    assert emulator.set_cupy_check(True)
    try:
        yield emulator
    finally:
        emulator.set_cupy_check(previous)


@pytest.fixture
def cupy_operands():
    """cupy, and its operands: real arrays where a GPU is, else arrays over no memory
    (CuPy's argument handling runs, the first device access fails)."""
    cupy = _cupy_or_skip()

    def operand(shape, dtype):
        if cuda_available():
            return cupy.zeros(shape, dtype)
        memory = cupy.cuda.MemoryPointer(cupy.cuda.memory.BaseMemory(), 0)
        return cupy.ndarray(shape, dtype, memptr=memory)
    return cupy, operand((2, 3), np.float32), operand((1,), np.int32)


def cupy_verdict(call):
    try:
        result = call()
    except (TypeError, AttributeError, NotImplementedError):
        return REJECTS
    except Exception:       # past the argument checks (no driver, no device, no cuBLAS)
        return ACCEPTS
    return REJECTS if result is NotImplemented else ACCEPTS


def emulator_verdict(call):
    try:
        call()
    except cupy_conformance.CupyConformanceError:
        return REJECTS
    return ACCEPTS


def _af(func, *args, **kwargs):
    """numpy function ``func`` on CuPy arrays, as numpy dispatches it."""
    return lambda cp, c, i: c.__array_function__(func, (type(c),), args_of(args, c, i),
                                                 kwargs)


def _au(ufunc, method, *args, **kwargs):
    """numpy ufunc method on CuPy arrays, as numpy dispatches it."""
    return lambda cp, c, i: c.__array_ufunc__(ufunc, method, *args_of(args, c, i), **kwargs)


def args_of(args, c, i):
    return tuple(c if a == "A" else i if a == "I" else a for a in args)


# (what, call on the emulator (xp, a = float32 (2, 3), idx = int32 [0]), call on CuPy
# (cp, c, i: the same operands there), expected verdict)
CASES = [
    # module functions
    ("cupy.sum axis", lambda xp, a, idx: xp.sum(a, axis=0),
     lambda cp, c, i: cp.sum(c, axis=0), ACCEPTS),
    ("cupy.sum where", lambda xp, a, idx: xp.sum(a, where=a > 0),
     lambda cp, c, i: cp.sum(c, where=True), REJECTS),
    ("cupy.errstate", lambda xp, a, idx: xp.errstate,
     lambda cp, c, i: cp.errstate, REJECTS),
    ("cupy.insert", lambda xp, a, idx: xp.insert(a, 0, 1.0),
     lambda cp, c, i: cp.insert(c, 0, 1.0), REJECTS),
    ("cupy.sort kind", lambda xp, a, idx: xp.sort(a, kind="stable"),
     lambda cp, c, i: cp.sort(c, kind="stable"), ACCEPTS),
    ("cupy.sort order", lambda xp, a, idx: xp.sort(a, order=None),
     lambda cp, c, i: cp.sort(c, order=None), REJECTS),
    ("cupy.concatenate dtype", lambda xp, a, idx: xp.concatenate([a, a], dtype=np.float64),
     lambda cp, c, i: cp.concatenate([c, c], dtype=np.float64), ACCEPTS),
    ("cupy.asnumpy blocking", lambda xp, a, idx: xp.asnumpy(a, blocking=True),
     lambda cp, c, i: cp.asnumpy(c, blocking=True), ACCEPTS),
    ("cupy.array ndmin", lambda xp, a, idx: xp.array(a, copy=True, ndmin=3),
     lambda cp, c, i: cp.array(c, copy=True, ndmin=3), ACCEPTS),
    ("cupy.array subok", lambda xp, a, idx: xp.array(a, subok=True),
     lambda cp, c, i: cp.array(c, subok=True), REJECTS),
    ("cupy.full_like", lambda xp, a, idx: xp.full_like(a, 2.0, dtype=np.float64),
     lambda cp, c, i: cp.full_like(c, 2.0, dtype=np.float64), ACCEPTS),
    ("cupy.full_like subok", lambda xp, a, idx: xp.full_like(a, 2.0, subok=False),
     lambda cp, c, i: cp.full_like(c, 2.0, subok=False), REJECTS),
    # ufuncs and their methods
    ("cupy.maximum out", lambda xp, a, idx: xp.maximum(a, 1.0, out=a),
     lambda cp, c, i: cp.maximum(c, 1.0, out=c), ACCEPTS),
    ("cupy.add positional out", lambda xp, a, idx: xp.add(a, a, a),
     lambda cp, c, i: cp.add(c, c, c), ACCEPTS),
    ("cupy.exp casting", lambda xp, a, idx: xp.exp(a, casting="unsafe", dtype=np.float64),
     lambda cp, c, i: cp.exp(c, casting="unsafe", dtype=np.float64), ACCEPTS),
    ("cupy.maximum where", lambda xp, a, idx: xp.maximum(a, 1.0, where=a > 0),
     lambda cp, c, i: cp.maximum(c, 1.0, where=True), REJECTS),
    ("cupy.exp order", lambda xp, a, idx: xp.exp(a, order="C"),
     lambda cp, c, i: cp.exp(c, order="C"), REJECTS),
    ("cupy.add.reduce", lambda xp, a, idx: xp.add.reduce(a, axis=0, keepdims=True),
     lambda cp, c, i: cp.add.reduce(c, axis=0, keepdims=True), ACCEPTS),
    ("cupy.add.reduce initial", lambda xp, a, idx: xp.add.reduce(a, axis=0, initial=0.0),
     lambda cp, c, i: cp.add.reduce(c, axis=0, initial=0.0), REJECTS),
    ("cupy.maximum.reduce", lambda xp, a, idx: xp.maximum.reduce(a),
     lambda cp, c, i: cp.maximum.reduce(c), REJECTS),
    ("cupy.add.at", lambda xp, a, idx: xp.add.at(a, idx, 1.0),
     lambda cp, c, i: cp.add.at(c, i, 1.0), ACCEPTS),
    ("cupy.multiply.at", lambda xp, a, idx: xp.multiply.at(a, idx, 2.0),
     lambda cp, c, i: cp.multiply.at(c, i, 2.0), REJECTS),
    ("cupy.maximum.accumulate", lambda xp, a, idx: xp.maximum.accumulate(a),
     lambda cp, c, i: cp.maximum.accumulate(c), REJECTS),
    ("cupy.add.identity", lambda xp, a, idx: xp.add.identity,
     lambda cp, c, i: cp.add.identity, REJECTS),
    # numpy functions on device arrays (__array_function__)
    ("np.sum axis", lambda xp, a, idx: np.sum(a, axis=1), _af(np.sum, "A", axis=1), ACCEPTS),
    ("np.sum where", lambda xp, a, idx: np.sum(a, where=a > 0),
     _af(np.sum, "A", where=True), REJECTS),
    ("np.linalg.norm", lambda xp, a, idx: np.linalg.norm(a, axis=1),
     _af(np.linalg.norm, "A", axis=1), ACCEPTS),
    ("np.insert", lambda xp, a, idx: np.insert(a, 0, 1.0), _af(np.insert, "A", 0, 1.0),
     REJECTS),
    ("np.nanpercentile", lambda xp, a, idx: np.nanpercentile(a, 50),
     _af(np.nanpercentile, "A", 50), REJECTS),
    ("np.argsort order", lambda xp, a, idx: np.argsort(a, order=None),
     _af(np.argsort, "A", order=None), REJECTS),
    # numpy ufuncs on device arrays (__array_ufunc__)
    ("np.add", lambda xp, a, idx: np.add(a, a), _au(np.add, "__call__", "A", "A"), ACCEPTS),
    ("np.add where", lambda xp, a, idx: np.add(a, a, where=True),
     _au(np.add, "__call__", "A", "A", where=True), REJECTS),
    ("np.add subok", lambda xp, a, idx: np.add(a, a, subok=False),
     _au(np.add, "__call__", "A", "A", subok=False), REJECTS),
    ("np.maximum.reduce", lambda xp, a, idx: np.maximum.reduce(a),
     _au(np.maximum, "reduce", "A"), REJECTS),
    ("np.add.reduce", lambda xp, a, idx: np.add.reduce(a, axis=0),
     _au(np.add, "reduce", "A", axis=0), ACCEPTS),
    ("np.spacing", lambda xp, a, idx: np.spacing(a), _au(np.spacing, "__call__", "A"),
     REJECTS),
    # ndarray members
    ("ndarray.sum", lambda xp, a, idx: a.sum(axis=0, keepdims=True),
     lambda cp, c, i: c.sum(axis=0, keepdims=True), ACCEPTS),
    ("ndarray.sum where", lambda xp, a, idx: a.sum(where=a > 0),
     lambda cp, c, i: c.sum(where=True), REJECTS),
    ("ndarray.resize", lambda xp, a, idx: a.resize((3, 2)),
     lambda cp, c, i: c.resize((3, 2)), REJECTS),
    ("ndarray.ctypes", lambda xp, a, idx: a.ctypes, lambda cp, c, i: c.ctypes, REJECTS),
    ("ndarray.argsort kind", lambda xp, a, idx: a.argsort(axis=1, kind="stable"),
     lambda cp, c, i: c.argsort(axis=1, kind="stable"), ACCEPTS),
    ("ndarray.argsort order", lambda xp, a, idx: a.argsort(order=None),
     lambda cp, c, i: c.argsort(order=None), REJECTS),
    ("ndarray.astype copy", lambda xp, a, idx: a.astype(np.float64, copy=False),
     lambda cp, c, i: c.astype(np.float64, copy=False), ACCEPTS),
    ("ndarray.max initial", lambda xp, a, idx: a.max(initial=0.0),
     lambda cp, c, i: c.max(initial=0.0), REJECTS),
    ("ndarray.get", lambda xp, a, idx: a.get(), lambda cp, c, i: c.get(), ACCEPTS),
    # random
    ("cupy.random.random_sample", lambda xp, a, idx: xp.random.random_sample((2,)),
     lambda cp, c, i: cp.random.random_sample((2,)), ACCEPTS),
    ("cupy.random.get_state", lambda xp, a, idx: xp.random.get_state(),
     lambda cp, c, i: cp.random.get_state(), REJECTS),
]


@pytest.mark.parametrize("what, on_emulator, on_cupy, expected", CASES,
                         ids=[c[0] for c in CASES])
def test_emulator_accepts_what_cupy_accepts(xp, cupy_operands, what, on_emulator, on_cupy,
                                            expected):
    cupy, c, i = cupy_operands
    a = xp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    idx = xp.asarray(np.zeros(1, np.int32))
    assert cupy_verdict(lambda: on_cupy(cupy, c, i)) == expected, "the oracle changed"
    assert emulator_verdict(lambda: on_emulator(xp, a, idx)) == expected


def test_violations_are_type_errors_that_name_what_cupy_lacks(xp):
    a = xp.asarray(np.ones((2, 3), np.float32))
    with pytest.raises(TypeError, match=r"CuPy's cupy\.sum does not accept keyword 'where'"):
        xp.sum(a, where=a > 0)
    with pytest.raises(TypeError, match=r"CuPy has no cupy\.insert"):
        xp.insert(a, 0, 1.0)
    with pytest.raises(TypeError, match=r"CuPy's ndarray has no attribute 'resize'"):
        a.resize((3, 2))
    with pytest.raises(TypeError, match=r"CuPy's cupy\.maximum does not accept keyword "
                                        r"'where'"):
        np.maximum(a, 0.0, where=a > 0)
    with pytest.raises(TypeError, match=r"numpy\.insert on device arrays fails on a GPU"):
        np.insert(a, 0, 1.0)
    assert not hasattr(xp, "errstate") and not hasattr(a, "ctypes")   # as on CuPy


def test_numpy_internals_on_device_arrays_are_not_flagged(xp):
    """numpy's own code calls methods with numpy-only keywords on the arrays it is
    given (mean's true_divide(..., subok=False), printing, pickling): not caffelite's
    calls, so not checked. The values are numpy's on the host copy."""
    host = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
    a = xp.asarray(host)
    assert float(a.mean()) == host.mean() and float(a.std(axis=None)) == host.std()
    assert float(np.mean(a)) == np.mean(host) and float(np.var(a)) == np.var(host)
    assert str(a) == str(host) and repr(a).startswith("emulated_device_array(")
    for clone in (copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
        np.testing.assert_array_equal(xp.asnumpy(clone), host)
    np.testing.assert_array_equal(xp.asnumpy(a.T.copy()), host.T)


def test_mode_off_runs_numpy_only_calls(xp):
    a = xp.asarray(np.array([1.0, -2.0, 3.0]))
    emulator.set_cupy_check(False)
    assert not emulator.cupy_check_active()
    assert float(xp.sum(a, where=a > 0)) == 4.0
    assert xp.errstate is np.errstate and a.ctypes is not None


def test_mode_stays_off_without_cupy(monkeypatch):
    previous = emulator.cupy_check_active()
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "cupy", None)           # import cupy -> ImportError
        try:
            assert emulator.set_cupy_check(True) is False
            a = emulator.asarray(np.array([1.0, -2.0, 3.0]))
            assert float(emulator.sum(a, where=a > 0)) == 4.0
        finally:
            emulator.set_cupy_check(False)
    emulator.set_cupy_check(previous)


def test_environment_variable_turns_the_mode_on(monkeypatch):
    _cupy_or_skip()
    previous = emulator.cupy_check_active()
    try:
        monkeypatch.setenv(cupy_conformance.ENVIRONMENT_VARIABLE, "1")
        assert emulator.set_cupy_check(None) is True
        monkeypatch.setenv(cupy_conformance.ENVIRONMENT_VARIABLE, "0")
        assert emulator.set_cupy_check(None) is False
    finally:
        emulator.set_cupy_check(previous)


def test_the_suite_runs_the_emulator_in_conformance_mode():
    """tests/conftest.py turns the mode on wherever cupy is importable (CI installs it),
    unless CAFFELITE_EMULATOR_CUPY_CHECK is 0 (false, off, no)."""
    _cupy_or_skip()
    from caffelite.backend import env_flag
    if not env_flag(cupy_conformance.ENVIRONMENT_VARIABLE, True):
        pytest.skip("switched off by CAFFELITE_EMULATOR_CUPY_CHECK")
    assert emulator.cupy_check_active()


@pytest.mark.parametrize("value, on", [("1", True), ("yes", True), ("0", False),
                                       ("false", False), ("Off", False), ("no", False),
                                       ("", False)])
def test_the_conformance_switch_reads_the_off_words_as_the_others(monkeypatch, value, on):
    _cupy_or_skip()
    was = cupy_conformance.active()
    monkeypatch.setenv(cupy_conformance.ENVIRONMENT_VARIABLE, value)
    try:
        assert cupy_conformance.configure() is on
    finally:
        cupy_conformance.configure(was)


@pytest.mark.parametrize("line, expected", [
    ("_ndarray_base.sort(self, int axis=-1, kind=None)", "(axis=None, kind=None)"),
    ("_ndarray_base.reshape(self, *shape, order='C', copy=None)",
     "(*shape, order=None, copy=None)"),
    ("_ndarray_base.dot(self, _ndarray_base b, _ndarray_base out=None)", "(b, out=None)"),
    ("maximum(x1, x2, /, out=None, \\*, casting='same_kind', dtype=None)",
     "(x1, x2, /, out=None, *, casting=None, dtype=None)"),
    ("ufunc.outer(self, A, B, **kwargs)", "(A, B, **kwargs)"),
    ("Shape-reversed view of the array.", None),
])
def test_signatures_read_from_cython_docstrings(line, expected):
    """Cython functions have no inspect.signature; their docstring's first line is one
    (defaults are not needed to bind, so they read as None)."""
    class Builtin:          # not callable: inspect.signature fails, as on Cython's
        __doc__ = line + "\n\n    More text."
    sig = cupy_conformance.signature(Builtin())
    assert (None if sig is None else str(sig)) == expected


def test_cupy_without_a_gpu_is_no_gpu(monkeypatch):
    """An importable cupy is not a GPU: GPU mode still fails in one sentence, and the
    -m gpu fixtures skip."""
    _cupy_or_skip()
    if cuda_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.setattr(kernels, "_cupy_checked", [])
    monkeypatch.delenv("CAFFELITE_GPU_EMULATOR", raising=False)
    with pytest.raises(kernels.GPUUnavailableError, match="needs an NVIDIA GPU"):
        kernels.require_cupy()
    with pytest.raises(kernels.GPUUnavailableError, match="needs an NVIDIA GPU"):
        backend.set_mode_gpu(emulate=False)
    assert backend.mode() == "cpu"
