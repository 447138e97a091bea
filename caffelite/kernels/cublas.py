"""Matrix products on the GPU: cuBLAS's GEMM, called directly (ctypes), like Caffe's
``caffe_gpu_gemm``.

CuPy refuses every cuBLAS call while a stream is being captured ("calling cuBLAS API
during stream capture is currently unsupported", as of CuPy 14.2), so ``cupy.matmul``
cannot be recorded into a CUDA graph (``caffelite.cuda_graphs``), although cuBLAS's GEMM
itself can be. caffelite keeps a cuBLAS handle of its own per device, on the library
CuPy already loaded, and calls ``cublasGemmEx`` on CuPy's current stream:

* the handle gets a workspace of its own (cuBLAS's advice for graphs: no allocation
  while capturing), set again whenever the stream changes (``cublasSetStream`` resets
  it), so every call sees the same workspace and cuBLAS picks the same algorithm, and
  a recorded product gives the eager product's bits;
* ``accumulate`` is Caffe's beta = 1 (the weight gradients): the sum happens in the
  GEMM's epilogue, with no temporary product and no separate addition;
* FP32 computes with CUBLAS_COMPUTE_32F, or CUBLAS_COMPUTE_32F_FAST_TF32 with the TF32
  flag (``backend.set_tf32``), as CuPy's matmul does; float64 with CUBLAS_COMPUTE_64F.

Row-major arrays meet column-major cuBLAS by computing out^T = b^T a^T: a row-major
matrix is its transpose in column-major order, so C-ordered operands go in as they are
(op N) and transposed views (``w.T``) as op T, with the leading dimension taken from the
strides. Operands of any other layout are copied first; an output whose rows are not
contiguous receives the product through a temporary.

numpy computes with ``matmul``; the GPU emulator with ``emulator.cublas_gemm``, which
a stream capture records like a kernel launch (its ``matmul`` is refused, as CuPy's).
"""
import ctypes
import os
import re

import numpy as np

from .. import backend
from ..log import logger

WORKSPACE_BYTES = 32 << 20      # cuBLAS's recommended workspace on Hopper

OP_N, OP_T = 0, 1
_DATA_TYPE = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}    # CUDA_R_32F, CUDA_R_64F
COMPUTE_32F, COMPUTE_32F_FAST_TF32, COMPUTE_64F = 68, 77, 70
GEMM_DEFAULT = -1
_SCALAR = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}

_library = []
_handles = {}       # device id -> _Handle, or None where cuBLAS could not be set up
_MISSING = object()


class CublasError(RuntimeError):
    pass


def gemm(xp, a, b, out, accumulate=False):
    """``out = a @ b``, or ``out += a @ b`` with ``accumulate``; 2-D arrays of one
    dtype, ``out`` of shape (a rows, b columns)."""
    if xp is np:
        _matmul(xp, a, b, out, accumulate)
        return
    if xp.__name__ != "cupy" or a.dtype not in _DATA_TYPE or \
            not (a.dtype == b.dtype == out.dtype):
        if hasattr(xp, "cublas_gemm"):      # the GPU emulator
            xp.cublas_gemm(a, b, out, accumulate)
        else:
            _matmul(xp, a, b, out, accumulate)
        return
    m, k = a.shape
    n = b.shape[1]
    if b.shape[0] != k or out.shape != (m, n):
        raise ValueError(f"gemm: shapes {a.shape} @ {b.shape} -> {out.shape} do not match")
    if m == 0 or n == 0:
        return
    if k == 0:
        if not accumulate:
            out.fill(0)
        return
    handle = _handle(xp)
    if handle is None:
        _matmul(xp, a, b, out, accumulate)
        return
    a, layout_a = _operand(xp, a)
    b, layout_b = _operand(xp, b)
    layout_out = _layout(out)
    if layout_out is None or layout_out[0] != OP_N:
        product = xp.empty((m, n), out.dtype)
        _device_gemm(handle, _call_arguments(a, layout_a, b, layout_b, product, (OP_N, n)),
                     out.dtype, False)
        if accumulate:
            out += product
        else:
            out[...] = product
        return
    _device_gemm(handle, _call_arguments(a, layout_a, b, layout_b, out, layout_out),
                 out.dtype, accumulate)


def _matmul(xp, a, b, out, accumulate):
    if accumulate:
        out += xp.matmul(a, b)
    else:
        xp.matmul(a, b, out=out)


def gemm_call(a, b, out):
    """cublasGemmEx's layout arguments for row-major ``out = a @ b``, computed as
    out^T = b^T a^T: (transa, transb, m, n, k, A, lda, B, ldb, C, ldc) with pointers
    as integers; ``a``, ``b`` and ``out`` must have a layout ``_layout`` knows."""
    return _call_arguments(a, _layout(a), b, _layout(b), out, _layout(out))


def _call_arguments(a, layout_a, b, layout_b, out, layout_out):
    rows, inner = a.shape
    return (layout_b[0], layout_a[0], b.shape[1], rows, inner, _pointer(b), layout_b[1],
            _pointer(a), layout_a[1], _pointer(out), layout_out[1])


def _layout(x):
    """(OP_N, leading dimension) for a matrix whose rows are contiguous (column-major
    x^T), (OP_T, leading dimension) for one whose columns are (column-major x), None
    for anything else."""
    rows, cols = x.shape
    row_stride, col_stride = x.strides
    size = x.itemsize
    if (cols == 1 or col_stride == size) and row_stride % size == 0 and \
            (rows == 1 or row_stride >= cols * size):
        return OP_N, row_stride // size if rows > 1 else max(cols, 1)
    if (rows == 1 or row_stride == size) and col_stride % size == 0 and \
            (cols == 1 or col_stride >= rows * size):
        return OP_T, col_stride // size if cols > 1 else max(rows, 1)
    return None


def _operand(xp, x):
    """``x`` and its layout, or a C-ordered copy of it where cuBLAS cannot read it."""
    layout = _layout(x)
    if layout is None:
        x = xp.ascontiguousarray(x)
        layout = _layout(x)
    return x, layout


def _pointer(x):
    data = x.data
    return data.ptr if hasattr(data, "ptr") else x.ctypes.data


# alpha = 1, beta = 0 or 1, in the dtype's C type (cuBLAS's host pointer mode).
_ONE = {dtype: ctypes.pointer(scalar(1.0)) for dtype, scalar in _SCALAR.items()}
_ZERO = {dtype: ctypes.pointer(scalar(0.0)) for dtype, scalar in _SCALAR.items()}


def _device_gemm(handle, arguments, dtype, accumulate):
    if dtype == np.float64:
        compute = COMPUTE_64F
    else:
        compute = COMPUTE_32F_FAST_TF32 if backend.tf32_enabled() else COMPUTE_32F
    transa, transb, m, n, k, pa, lda, pb, ldb, pc, ldc = arguments
    data_type = _DATA_TYPE[dtype]
    handle.check(handle.lib.cublasGemmEx(
        handle.handle, transa, transb, m, n, k, _ONE[dtype], pa, data_type, lda, pb,
        data_type, ldb, (_ONE if accumulate else _ZERO)[dtype], pc, data_type, ldc,
        compute, GEMM_DEFAULT), "cublasGemmEx")


class _Handle:
    """One device's cuBLAS handle with its workspace, following CuPy's current stream."""

    def __init__(self, xp, lib):
        self.lib = lib
        handle = ctypes.c_void_p()
        self.check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        self.handle = handle
        # Plain cudaMalloc, outside any memory pool a recording may be using.
        self.workspace = xp.cuda.memory.Memory(WORKSPACE_BYTES)
        self.stream = None

    def use_stream(self, stream_ptr):
        if stream_ptr == self.stream:
            return
        self.check(self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream_ptr)),
                   "cublasSetStream")
        # cublasSetStream resets the workspace to cuBLAS's own pool: set ours again.
        self.check(self.lib.cublasSetWorkspace_v2(
            self.handle, ctypes.c_void_p(self.workspace.ptr),
            ctypes.c_size_t(WORKSPACE_BYTES)), "cublasSetWorkspace")
        self.stream = stream_ptr

    def check(self, status, call):
        if status != 0:
            raise CublasError(f"{call} failed: {_status_name(self.lib, status)}")


def _handle(xp):
    """This device's handle on CuPy's current stream; None where cuBLAS could not be
    set up (said once, in a warning: the GEMMs then go through CuPy's matmul)."""
    device = xp.cuda.Device().id
    handle = _handles.get(device, _MISSING)
    if handle is _MISSING:
        try:
            handle = _Handle(xp, _cublas_library(xp))
        except (OSError, AttributeError, CublasError) as e:
            logger.warning("caffelite's own cuBLAS calls are unavailable (%s): GEMMs go "
                           "through CuPy's matmul, which CUDA graphs cannot record", e)
            handle = None
        _handles[device] = handle
    if handle is not None:
        handle.use_stream(xp.cuda.get_current_stream().ptr)
    return handle


def _status_name(lib, status):
    try:
        name = lib.cublasGetStatusString(status)
        return f"{name.decode()} ({status})" if name else f"status {status}"
    except AttributeError:
        return f"status {status}"


def _cublas_library(xp):
    """The libcublas CuPy uses (already loaded by CuPy's own handle), with the argument
    types of the calls made here."""
    if not _library:
        xp.cuda.device.get_cublas_handle()      # makes CuPy load libcublas
        lib = None
        for path in [_loaded_library_path("libcublas")] + [
                f"libcublas.so.{v}" for v in (13, 12, 11)]:
            if path is None:
                continue
            try:
                lib = open_library(path)
                break
            except OSError:
                continue
        if lib is None:
            raise CublasError("cuBLAS could not be loaded for caffelite's GEMMs (CuPy's "
                              "libcublas was not found)")
        _library.append(lib)
    return _library[0]


def open_library(path):
    """The cuBLAS library at ``path`` with the argument types of the calls made here."""
    lib = ctypes.CDLL(path)
    _declare(lib)
    return lib


def _loaded_library_path(name):
    """The path of a shared library this process has mapped (``/proc/self/maps``)."""
    pattern = re.compile(r"/" + re.escape(name) + r"\.so[.\d]*$")
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if pattern.search(path) and os.path.exists(path):
                    return path
    except OSError:
        pass
    return None


def _declare(lib):
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.cublasCreate_v2.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    lib.cublasSetStream_v2.argtypes = [p, p]
    lib.cublasSetWorkspace_v2.argtypes = [p, p, ctypes.c_size_t]
    lib.cublasGemmEx.argtypes = [p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i, i, i, i]
    for f in (lib.cublasCreate_v2, lib.cublasSetStream_v2, lib.cublasSetWorkspace_v2,
              lib.cublasGemmEx):
        f.restype = ctypes.c_int
    try:
        lib.cublasGetStatusString.argtypes = [ctypes.c_int]
        lib.cublasGetStatusString.restype = ctypes.c_char_p
    except AttributeError:
        pass
