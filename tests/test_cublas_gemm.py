"""caffelite.kernels.cublas: the GEMM that calls cuBLAS directly (CUDA-graph capturable).

Without a GPU, the row-major -> column-major argument mapping is checked against a
column-major GEMM written here from cuBLAS's documented definition (op(A) is m x k,
op(B) k x n, C m x n, each stored column-major with its leading dimension, which must
be at least the stored rows), reading and writing the arrays through the pointers the
call passes. Small-integer data makes every sum exact, so results compare for equality.
On a GPU (``-m gpu``) the real library is compared with CuPy's matmul, and a product is
recorded into a CUDA graph and launched.
"""
import ctypes
import types

import numpy as np
import pytest

from caffelite import backend
from caffelite.kernels import cublas

INVALID_VALUE = 7       # CUBLAS_STATUS_INVALID_VALUE


def column_major(ptr, rows, cols, ld, dtype):
    dtype = np.dtype(dtype)
    count = (cols - 1) * ld + rows
    flat = np.frombuffer((ctypes.c_char * (count * dtype.itemsize)).from_address(ptr), dtype)
    return np.lib.stride_tricks.as_strided(flat, (rows, cols),
                                           (dtype.itemsize, ld * dtype.itemsize))


class FakeCublas:
    """cublasGemmEx and friends over host memory, by cuBLAS's definitions."""
    DTYPES = {0: np.float32, 1: np.float64}

    def __init__(self):
        self.calls = []

    def cublasCreate_v2(self, handle_ref):
        self.calls.append("create")
        return 0

    def cublasSetStream_v2(self, handle, stream):
        self.calls.append(("stream", stream.value))
        return 0

    def cublasSetWorkspace_v2(self, handle, pointer, size):
        self.calls.append(("workspace", pointer.value, size.value))
        return 0

    def cublasGetStatusString(self, status):
        return {3: b"CUBLAS_STATUS_ALLOC_FAILED", 7: b"CUBLAS_STATUS_INVALID_VALUE"}[status]

    def cublasGemmEx(self, handle, transa, transb, m, n, k, alpha, a, atype, lda, b, btype,
                     ldb, beta, c, ctype, ldc, compute, algo):
        self.calls.append(("gemm", compute))
        dtype = self.DTYPES[ctype]
        assert atype == btype == ctype and algo == cublas.GEMM_DEFAULT
        a_rows, a_cols = (m, k) if transa == cublas.OP_N else (k, m)
        b_rows, b_cols = (k, n) if transb == cublas.OP_N else (n, k)
        if lda < max(1, a_rows) or ldb < max(1, b_rows) or ldc < max(1, m):
            return INVALID_VALUE
        op_a = column_major(a, a_rows, a_cols, lda, dtype)
        op_b = column_major(b, b_rows, b_cols, ldb, dtype)
        op_a = op_a if transa == cublas.OP_N else op_a.T
        op_b = op_b if transb == cublas.OP_N else op_b.T
        out = column_major(c, m, n, ldc, dtype)
        alpha, beta = alpha.contents.value, beta.contents.value
        product = alpha * (op_a.astype(np.float64) @ op_b.astype(np.float64))
        if beta != 0:
            product += beta * out
        out[...] = product
        return 0


class Stream:
    ptr = 0


def fake_cupy():
    """Just what kernels.cublas asks of CuPy, over numpy arrays."""
    cuda = types.SimpleNamespace(
        Device=lambda: types.SimpleNamespace(id=0),
        get_current_stream=lambda: Stream,
        memory=types.SimpleNamespace(Memory=lambda size: types.SimpleNamespace(ptr=4096)),
        device=types.SimpleNamespace(get_cublas_handle=lambda: None))
    return types.SimpleNamespace(__name__="cupy", empty=np.empty, matmul=np.matmul,
                                 ascontiguousarray=np.ascontiguousarray, cuda=cuda)


@pytest.fixture
def fake(monkeypatch):
    yield from use_library(monkeypatch, FakeCublas())


def use_library(monkeypatch, lib):
    """kernels.cublas on ``lib``, with no handle yet, on stream 0; TF32 off after."""
    monkeypatch.setattr(cublas, "_library", [lib])
    monkeypatch.setattr(cublas, "_handles", {})
    monkeypatch.setattr(Stream, "ptr", 0)
    yield lib
    backend.set_tf32(False)


def integers(rng, shape, dtype=np.float32):
    return rng.integers(-8, 9, shape).astype(dtype)


def layouts(rng, rows, cols, dtype=np.float32):
    """The same matrix in several memory layouts, each a view cuBLAS sees differently."""
    x = integers(rng, (rows, cols), dtype)
    wide = np.zeros((rows, cols + 3), dtype)
    wide[:, :cols] = x
    tall = np.zeros((cols, rows + 5), dtype)
    tall[:, :rows] = x.T
    strided = np.zeros((2 * rows, 2 * cols), dtype)
    strided[::2, ::2] = x
    return {"C": x, "F": np.asfortranarray(x), "row padded": wide[:, :cols],
            "column padded": tall[:, :rows].T, "strided": strided[::2, ::2]}


SHAPES = [(5, 7, 3), (1, 6, 4), (6, 1, 4), (4, 6, 1), (1, 1, 1), (3, 2, 9)]


def assert_every_layout(rng, m, k, n, dtype=np.float32, accumulate=False):
    """gemm on every pair of operand layouts into every output layout: the exact
    product, written over a NaN-poisoned output or added to what is there."""
    xp = fake_cupy()
    for name_a, a in layouts(rng, m, k, dtype).items():
        for name_b, b in layouts(rng, k, n, dtype).items():
            expected = a.astype(np.float64) @ b.astype(np.float64)
            for name_out, out in layouts(rng, m, n, dtype).items():
                if not accumulate:
                    out[...] = np.nan
                before = out.copy() if accumulate else 0
                cublas.gemm(xp, a, b, out, accumulate=accumulate)
                np.testing.assert_array_equal(out, before + expected,
                                              err_msg=f"a {name_a}, b {name_b}, out {name_out}")


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_every_layout_gives_the_product(fake, m, k, n):
    assert_every_layout(np.random.default_rng(m * 100 + k * 10 + n), m, k, n)


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_accumulate_adds_the_product_as_beta_one(fake, m, k, n):
    rng = np.random.default_rng(7)
    xp = fake_cupy()
    a, b = integers(rng, (m, k)), integers(rng, (k, n))
    for name, out in layouts(rng, m, n).items():
        before = out.copy()
        cublas.gemm(xp, a.T.copy().T, b, out, accumulate=True)
        np.testing.assert_array_equal(out, before + a.astype(np.float64) @ b, err_msg=name)


def test_contiguous_operands_go_in_without_copies_and_transposes_as_op_t():
    rng = np.random.default_rng(1)
    w, col = integers(rng, (8, 5)), integers(rng, (8, 12))
    out = np.empty((5, 12), np.float32)
    transa, transb, m, n, k, pa, lda, pb, ldb, pc, ldc = cublas.gemm_call(w.T, col, out)
    # out^T = col^T w: col (row-major) is col^T column-major, op N; w.T is op T.
    assert (transa, transb, m, n, k) == (cublas.OP_N, cublas.OP_T, 12, 5, 8)
    assert (pa, lda, pb, ldb, pc, ldc) == (col.ctypes.data, 12, w.ctypes.data, 5,
                                           out.ctypes.data, 12)
    assert cublas._layout(integers(rng, (6, 6))[::2, ::2]) is None


def test_compute_types_follow_dtype_and_the_tf32_flag(fake):
    xp = fake_cupy()
    a = np.ones((2, 3), np.float32)
    b = np.ones((3, 4), np.float32)
    cublas.gemm(xp, a, b, np.empty((2, 4), np.float32))
    backend.set_tf32(True)
    cublas.gemm(xp, a, b, np.empty((2, 4), np.float32))
    cublas.gemm(xp, a.astype(np.float64), b.astype(np.float64), np.empty((2, 4)))
    assert [c[1] for c in fake.calls if c[0] == "gemm"] == [
        cublas.COMPUTE_32F, cublas.COMPUTE_32F_FAST_TF32, cublas.COMPUTE_64F]


def test_the_workspace_is_set_again_after_every_stream_change(fake):
    xp = fake_cupy()
    a, b = np.ones((2, 2), np.float32), np.ones((2, 2), np.float32)
    cublas.gemm(xp, a, b, np.empty((2, 2), np.float32))
    cublas.gemm(xp, a, b, np.empty((2, 2), np.float32))     # same stream: nothing set
    Stream.ptr = 77
    cublas.gemm(xp, a, b, np.empty((2, 2), np.float32))
    workspace = ("workspace", 4096, cublas.WORKSPACE_BYTES)
    assert fake.calls == ["create", ("stream", None), workspace, ("gemm", cublas.COMPUTE_32F),
                          ("gemm", cublas.COMPUTE_32F), ("stream", 77), workspace,
                          ("gemm", cublas.COMPUTE_32F)]


def test_empty_products_and_a_failing_call(fake):
    xp = fake_cupy()
    out = np.full((3, 2), 5, np.float32)
    cublas.gemm(xp, np.empty((3, 0), np.float32), np.empty((0, 2), np.float32), out,
                accumulate=True)
    assert (out == 5).all()
    cublas.gemm(xp, np.empty((3, 0), np.float32), np.empty((0, 2), np.float32), out)
    assert (out == 0).all()
    with pytest.raises(ValueError, match=r"\(3, 4\) @ \(5, 2\)"):
        cublas.gemm(xp, np.ones((3, 4), np.float32), np.ones((5, 2), np.float32), out)
    fake.cublasGemmEx = lambda *args: INVALID_VALUE
    with pytest.raises(cublas.CublasError, match="cublasGemmEx failed: "
                                                 "CUBLAS_STATUS_INVALID_VALUE"):
        cublas.gemm(xp, np.ones((3, 4), np.float32), np.ones((4, 2), np.float32), out)


def test_numpy_keeps_matmul():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((4, 5)).astype(np.float32), \
        rng.standard_normal((5, 3)).astype(np.float32)
    out = np.ones((4, 3), np.float32)
    cublas.gemm(np, a, b, out, accumulate=True)
    np.testing.assert_array_equal(out, np.ones((4, 3), np.float32) + np.matmul(a, b))


def test_the_emulator_records_its_gemm_and_refuses_matmul_while_capturing():
    from caffelite.kernels import emulated_capture, emulator
    rng = np.random.default_rng(4)
    a = emulator.asarray(integers(rng, (3, 4)))
    b = emulator.asarray(integers(rng, (4, 2)))
    out = emulator.zeros((3, 2), np.float32)
    stream = emulator.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        cublas.gemm(emulator, a, b, out, accumulate=True)
        graph = stream.end_capture()
    assert (emulator.asnumpy(out) == 0).all()       # recorded, not run
    graph.launch()
    graph.launch()
    np.testing.assert_array_equal(emulator.asnumpy(out),
                                  2 * (emulator.asnumpy(a) @ emulator.asnumpy(b)))
    for product in (lambda: emulator.matmul(a, b), lambda: a.dot(b), lambda: a @ b):
        with stream:
            stream.begin_capture()
            with pytest.raises(emulated_capture.CaptureError, match="cuBLAS"):
                product()
            assert not stream.is_capturing()


def test_a_loaded_library_is_found_by_name():
    path = cublas._loaded_library_path("libc")
    assert path is not None and "/libc" in path
    assert cublas._loaded_library_path("libno_such_library") is None


# ------------------------------------- the real ctypes calls, on a compiled stand-in
@pytest.fixture(scope="module")
def stand_in_path(tmp_path_factory):
    from conftest import compile_oracle
    return compile_oracle(tmp_path_factory, "fake_cublas", "-shared", "-fPIC",
                          why="the cuBLAS stand-in library")


@pytest.fixture
def stand_in(monkeypatch, stand_in_path):
    """tests/oracles/fake_cublas.cpp loaded as caffelite loads libcublas: the argument
    types declared in kernels.cublas convert every argument, as they would for cuBLAS."""
    lib = cublas.open_library(stand_in_path)
    for name in ("fake_last_stream", "fake_last_workspace"):
        getattr(lib, name).restype = ctypes.c_void_p
    lib.fake_last_workspace_bytes.restype = ctypes.c_size_t
    yield from use_library(monkeypatch, lib)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_declared_calls_compute_every_layout(stand_in, dtype, m, k, n):
    calls = stand_in.fake_gemm_calls()
    assert_every_layout(np.random.default_rng(m * 100 + k * 10 + n + 1), m, k, n, dtype,
                        accumulate=True)
    assert stand_in.fake_gemm_calls() - calls == 5 ** 3
    assert stand_in.fake_last_compute() == (cublas.COMPUTE_64F if dtype == np.float64
                                            else cublas.COMPUTE_32F)


def test_declared_calls_set_stream_workspace_and_compute_type(stand_in):
    xp = fake_cupy()
    a, b = np.ones((2, 3), np.float32), np.ones((3, 2), np.float32)
    out = np.empty((2, 2), np.float32)
    cublas.gemm(xp, a, b, out)
    assert stand_in.fake_last_stream() is None          # the default stream, 0
    assert stand_in.fake_last_workspace() == 4096
    assert stand_in.fake_last_workspace_bytes() == cublas.WORKSPACE_BYTES
    Stream.ptr = 0x5000
    backend.set_tf32(True)
    cublas.gemm(xp, a, b, out)
    assert stand_in.fake_last_stream() == 0x5000
    assert stand_in.fake_last_workspace() == 4096       # set again after the stream
    assert stand_in.fake_last_compute() == cublas.COMPUTE_32F_FAST_TF32
    assert (out == 3).all()


def test_a_refused_call_is_named_with_cublas_status_string(stand_in, monkeypatch):
    monkeypatch.setattr(cublas, "GEMM_DEFAULT", 5)      # the stand-in refuses other algos
    with pytest.raises(cublas.CublasError, match="cublasGemmEx failed: "
                                                 "CUBLAS_STATUS_INVALID_VALUE"):
        cublas.gemm(fake_cupy(), np.ones((2, 3), np.float32), np.ones((3, 2), np.float32),
                    np.empty((2, 2), np.float32))


# ------------------------------------------------------------------ on a real GPU
def _cupy_or_skip():
    from gpu_modes import cuda_available
    if not cuda_available():
        pytest.skip("no CuPy with a CUDA device")
    import cupy
    return cupy


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_device_gemm_matches_cupy_matmul(dtype):
    cupy = _cupy_or_skip()
    rng = np.random.default_rng(5)
    for m, k, n in [(64, 147, 1681), (1, 300, 7), (21, 1, 40), (256, 4608, 169)]:
        a = cupy.asarray(rng.standard_normal((m, k)).astype(dtype))
        bt = cupy.asarray(rng.standard_normal((n, k)).astype(dtype))
        expected = cupy.asnumpy(cupy.matmul(a, bt.T)).astype(np.float64)
        out = cupy.full((m, n), np.nan, dtype)
        cublas.gemm(cupy, a, bt.T, out)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        scale = np.abs(expected).max() + 1
        assert np.abs(cupy.asnumpy(out) - expected).max() <= tol * scale * np.sqrt(k)
        cublas.gemm(cupy, a, bt.T, out, accumulate=True)
        assert np.abs(cupy.asnumpy(out) - 2 * expected).max() <= 2 * tol * scale * np.sqrt(k)


@pytest.mark.gpu
def test_device_gemm_records_into_a_cuda_graph_with_the_eager_bits():
    cupy = _cupy_or_skip()
    rng = np.random.default_rng(6)
    a = cupy.asarray(rng.standard_normal((96, 1152)).astype(np.float32))
    b = cupy.asarray(rng.standard_normal((1152, 2500)).astype(np.float32))
    eager = cupy.full((96, 2500), np.nan, np.float32)
    cublas.gemm(cupy, a, b, eager)
    recorded = cupy.full((96, 2500), np.nan, np.float32)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        cublas.gemm(cupy, a, b, recorded)
        graph = stream.end_capture()
    assert bool(cupy.isnan(recorded).all())     # captured work does not run
    graph.launch(stream=cupy.cuda.get_current_stream())
    cupy.cuda.get_current_stream().synchronize()
    np.testing.assert_array_equal(cupy.asnumpy(recorded), cupy.asnumpy(eager))


def test_without_a_usable_cublas_the_product_goes_through_matmul(fake, caplog):
    xp = fake_cupy()
    fake.cublasCreate_v2 = lambda handle_ref: 3        # CUBLAS_STATUS_ALLOC_FAILED
    a, b = np.full((2, 3), 2, np.float32), np.ones((3, 4), np.float32)
    out = np.ones((2, 4), np.float32)
    with caplog.at_level("WARNING", logger="caffelite"):
        cublas.gemm(xp, a, b, out, accumulate=True)
        cublas.gemm(xp, a, b, out, accumulate=True)
    assert (out == 13).all()
    warnings = [r.getMessage() for r in caplog.records if "cuBLAS" in r.getMessage()]
    assert len(warnings) == 1 and "cublasCreate failed" in warnings[0]
    assert not [c for c in fake.calls if c[0] == "gemm"]
