"""Run caffelite's CUDA kernels (caffelite/kernels/*.cu) on the CPU: the tests and the GPU emulator.

Each kernel module is compiled with g++ together with a generated driver: per kernel
and per float type, ``host_launch_<kernel>_<float|double>(grid, block, args...)`` sets
gridDim/blockDim, then for every block and every thread sets blockIdx/threadIdx and
calls the kernel (``host_shim.h`` supplies the CUDA keywords, index variables and
atomics). The library is loaded with ctypes; ``HostKernels.run`` takes numpy arrays
and writes the kernel's outputs into them, like a launch on device arrays would.

Kernel signatures come from the loader's parser (``caffelite.kernels``), so the host
and the GPU see the same parameter list and the same argument type checks.
"""
import ctypes
import ctypes.util
import hashlib
import os
import shutil
import subprocess

import numpy as np

from caffelite import kernels

# -ffp-contract=off: no fused multiply-add on hosts that have it (the GPU build uses
# --fmad=false), so float results round as the numpy layers' do.
CXX_FLAGS = ("-O2", "-shared", "-fPIC", "-std=c++14", "-ffp-contract=off", "-Wall",
             "-Wno-unused-function")
SHIM = os.path.join(kernels.KERNEL_DIR, "host_shim.h")

_CTYPES = {"int": ctypes.c_int, "unsigned long long": ctypes.c_ulonglong}
_FLOAT_CTYPES = {"float": ctypes.c_float, "double": ctypes.c_double}


def compiler():
    """The C++ compiler to use ($CXX or g++), or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


def driver_source(name):
    """C++ source: the kernel file plus one host launcher per kernel and float type."""
    lines = [f'#include "{kernels.source_path(name)}"', ""]
    for kernel, params in kernels.kernel_signatures(kernels.source(name)).items():
        for ctype in kernels.DTYPES.values():
            decls, uses = [], []
            for p in params:
                base = ctype if p.ctype == "T" else p.ctype
                decls.append(f"{base}{'*' if p.pointer else ''} {p.name}")
                uses.append(p.name)
            lines += [
                f'extern "C" void host_launch_{kernel}_{ctype}(unsigned int grid, '
                f'unsigned int block, {", ".join(decls)}) {{',
                "  gridDim.x = grid; gridDim.y = gridDim.z = 1;",
                "  blockDim.x = block; blockDim.y = blockDim.z = 1;",
                "  for (unsigned int b = 0; b < grid; ++b) {",
                "    blockIdx.x = b;",
                "    for (unsigned int t = 0; t < block; ++t) {",
                "      threadIdx.x = t;",
                f"      {kernel}<{ctype}>({', '.join(uses)});",
                "    }",
                "  }",
                "}",
                ""]
    return "\n".join(lines)


class HostModule:
    """One compiled kernel module: ``run(kernel, dtype, *args, grid=None, block=None)``."""

    def __init__(self, name, library):
        self.name = name
        self.signatures = kernels.kernel_signatures(kernels.source(name))
        self.lib = ctypes.CDLL(library)

    def run(self, kernel, dtype, *args, grid=None, block=kernels.BLOCK):
        params = self.signatures[kernel]
        ctype = kernels.ctype_name(dtype)
        values = kernels.convert_args(params, dtype, args, np)
        c_args = []
        for p, v in zip(params, values):
            if p.pointer:
                if not p.const and not v.flags.writeable:
                    raise ValueError(f"{kernel}: output '{p.name}' is read-only")
                c_args.append(ctypes.c_void_p(v.ctypes.data))
            elif p.ctype == "T":
                c_args.append(_FLOAT_CTYPES[ctype](v))
            else:
                c_args.append(_CTYPES[p.ctype](v))
        grid = kernels.grid_for(values[0], block) if grid is None else grid
        fn = getattr(self.lib, f"host_launch_{kernel}_{ctype}")
        fn.restype = None
        fn(ctypes.c_uint(grid), ctypes.c_uint(block), *c_args)


class HostKernels:
    """Builds kernel modules into ``build_dir`` (once per source version) and loads them."""

    def __init__(self, build_dir):
        self.build_dir = str(build_dir)
        self.modules = {}
        self.pending = {}

    def _paths(self, name):
        driver = driver_source(name)
        with open(SHIM, encoding="utf-8") as f:
            shim = f.read()
        key = hashlib.sha256("\0".join((driver, kernels.source(name), shim,
                                        " ".join(CXX_FLAGS))).encode()).hexdigest()[:16]
        stem = os.path.join(self.build_dir, f"{name}-{key}")
        return driver, stem + ".cpp", stem + ".so"

    def start(self, names):
        """Start compiling ``names`` in parallel (they are waited for on first use)."""
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler (g++ or $CXX) to build the host kernels")
        for name in names:
            if name in self.modules or name in self.pending:
                continue
            driver, cpp, lib = self._paths(name)
            if os.path.exists(lib):
                self.pending[name] = (None, lib, cpp)
                continue
            with open(cpp, "w", encoding="utf-8") as f:
                f.write(driver)
            cmd = [cxx, *CXX_FLAGS, "-I", kernels.KERNEL_DIR, "-include", SHIM, "-x", "c++",
                   cpp, "-o", lib + ".tmp"]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            self.pending[name] = (proc, lib, cpp)

    def module(self, name):
        if name not in self.modules:
            self.start([name])
            proc, lib, cpp = self.pending.pop(name)
            if proc is not None:
                out, _ = proc.communicate()
                if proc.returncode != 0:
                    raise RuntimeError(f"g++ failed on {name}.cu (driver {cpp}):\n{out}")
                if out.strip():     # warnings are bugs in kernels meant for two compilers
                    raise RuntimeError(f"g++ warned on {name}.cu (driver {cpp}):\n{out}")
                os.replace(lib + ".tmp", lib)
            self.modules[name] = HostModule(name, lib)
        return self.modules[name]

    def run(self, module, kernel, dtype, *args, grid=None, block=kernels.BLOCK):
        self.module(module).run(kernel, dtype, *args, grid=grid, block=block)


# ------------------------------------------------------------------ NVRTC (no GPU needed)
def _nvrtc_candidates():
    env = os.environ.get("CAFFELITE_NVRTC")
    if env:
        yield env
    try:
        import nvidia       # pip's nvidia-cuda-nvrtc wheels (namespace package)
        for root in nvidia.__path__:
            for sub in ("cu13/lib", "cu12/lib", "cuda_nvrtc/lib"):
                d = os.path.join(root, sub)
                if os.path.isdir(d):
                    for f in sorted(os.listdir(d)):
                        if f.startswith("libnvrtc.so"):
                            yield os.path.join(d, f)
    except ImportError:
        pass
    found = ctypes.util.find_library("nvrtc")
    if found:
        yield found


def nvrtc_library():
    """A loaded libnvrtc (with its builtins library), or None."""
    for path in _nvrtc_candidates():
        try:
            d = os.path.dirname(path)
            if d:
                for f in sorted(os.listdir(d)):
                    if f.startswith("libnvrtc-builtins.so"):
                        ctypes.CDLL(os.path.join(d, f), mode=ctypes.RTLD_GLOBAL)
                        break
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def nvrtc_compile(lib, name, options, arch="compute_90"):
    """Compile ``name.cu`` as the loader does (name expressions for float and double);
    returns (ptx, {name expression: lowered symbol})."""
    def check(rc, what):
        if rc != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise RuntimeError(f"{what} on {name}.cu: {lib.nvrtcGetErrorString(rc).decode()}")

    text = kernels.source(name)
    prog = ctypes.c_void_p()
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), f"{name}.cu".encode(),
                                 0, None, None), "nvrtcCreateProgram")
    try:
        expressions = [f"{k}<{t}>" for k in kernels.kernel_signatures(text)
                       for t in kernels.DTYPES.values()]
        for e in expressions:
            check(lib.nvrtcAddNameExpression(prog, e.encode()), "nvrtcAddNameExpression")
        opts = [o.encode() for o in (*options, f"--gpu-architecture={arch}")]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if rc != 0 or log.value.strip():
            raise RuntimeError(f"NVRTC on {name}.cu:\n{log.value.decode()}")
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
        lowered = {}
        for e in expressions:
            symbol = ctypes.c_char_p()
            check(lib.nvrtcGetLoweredName(prog, e.encode(), ctypes.byref(symbol)),
                  "nvrtcGetLoweredName")
            lowered[e] = symbol.value.decode()
        return ptx.value.decode(), lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
