"""Run caffelite's CUDA kernels (caffelite/kernels/*.cu) on the CPU: the tests and the GPU emulator.

Each kernel module is compiled with g++ together with a generated driver: per kernel
and per float type, ``host_launch_<kernel>_<float|double>(grid, block, args...)`` sets
gridDim/blockDim, then for every block and every thread sets blockIdx/threadIdx and
calls the kernel (``host_shim.h`` supplies the CUDA keywords, index variables and
atomics). A module whose kernels call ``__syncthreads`` (``cooperative``) gets a driver
that runs each block's threads as fibers instead, which wait for each other at every
barrier (``caffelite_host::run_block``). The library is loaded with ctypes;
``HostKernels.run`` takes numpy arrays and writes the kernel's outputs into them, like a
launch on device arrays would.

Kernel signatures come from the loader's parser (``caffelite.kernels``), so the host
and the GPU see the same parameter list and the same argument type checks.

Sanitized builds (``HostKernels(dir, sanitize="address,undefined")`` or the environment
variable ``CAFFELITE_HOST_SANITIZE``) compile with AddressSanitizer / UBSan, so an
out-of-bounds access or undefined behaviour in a kernel (an illegal-address crash or
silent corruption on a GPU) aborts the process with a report. The sanitizer runtime
must be loaded first: run Python with ``sanitizer_environment()``'s variables
(LD_PRELOAD of the compiler's libasan, ...). An array argument that is only a view into
a larger buffer then runs on its own exact-size heap copy (``_isolated``), so that
redzones sit right before and after every array a kernel gets.
"""
import ctypes
import ctypes.util
import hashlib
import itertools
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np

from caffelite import kernels

# -ffp-contract=off: no fused multiply-add on hosts that have it (the GPU build uses
# --fmad=false), so float results round as the numpy layers' do.
CXX_FLAGS = ("-O2", "-shared", "-fPIC", "-std=c++14", "-ffp-contract=off", "-Wall",
             "-Wno-unused-function")
SHIM = os.path.join(kernels.KERNEL_DIR, "host_shim.h")

SANITIZE_ENV = "CAFFELITE_HOST_SANITIZE"
# -fno-sanitize-recover: UB aborts like an ASan error instead of printing and going on.
SANITIZE_FLAGS = ("-O1", "-fno-omit-frame-pointer", "-g", "-fno-sanitize-recover=all")

_CTYPES = {"int": ctypes.c_int, "unsigned long long": ctypes.c_ulonglong}
_FLOAT_CTYPES = {"float": ctypes.c_float, "double": ctypes.c_double}


def compiler():
    """The C++ compiler to use ($CXX or g++), or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


def cooperative(name):
    """Whether module ``name``'s kernels synchronise their blocks (``__syncthreads``):
    the host then runs each block's threads as fibers (``host_shim.h``)."""
    return "__syncthreads" in kernels.source(name)


def driver_source(name):
    """C++ source: the kernel file plus one host launcher per kernel and float type."""
    lines = [f'#include "{kernels.source_path(name)}"', ""]
    fibers = cooperative(name)
    for kernel, params in kernels.kernel_signatures(kernels.source(name)).items():
        for ctype in kernels.DTYPES.values():
            decls, uses = [], []
            for p in params:
                base = ctype if p.ctype == "T" else p.ctype
                decls.append(f"{base}{'*' if p.pointer else ''} {p.name}")
                uses.append(p.name)
            launcher = f"host_launch_{kernel}_{ctype}"
            call = f"{kernel}<{ctype}>({', '.join(uses)});"
            if fibers:
                lines += [
                    f"struct {launcher}_args {{ {' '.join(d + ';' for d in decls)} }};",
                    f"static void {launcher}_thread(void* p) {{",
                    f"  const {launcher}_args& launch_args = "
                    f"*static_cast<{launcher}_args*>(p);",
                    f"  {kernel}<{ctype}>({', '.join('launch_args.' + u for u in uses)});",
                    "}"]
                per_block = [f"    {launcher}_args launch_args = {{{', '.join(uses)}}};",
                             f"    caffelite_host::run_block({launcher}_thread, "
                             f"&launch_args);"]
            else:
                per_block = ["    for (unsigned int launch_t = 0; launch_t < launch_block; "
                             "++launch_t) {",
                             "      threadIdx.x = launch_t;",
                             f"      {call}",
                             "    }"]
            # (launch_ names: a kernel parameter may be called grid, block, a, b or t)
            lines += [
                f'extern "C" void {launcher}(unsigned int launch_grid, '
                f'unsigned int launch_block, {", ".join(decls)}) {{',
                "  gridDim.x = launch_grid; gridDim.y = gridDim.z = 1;",
                "  blockDim.x = launch_block; blockDim.y = blockDim.z = 1;",
                "  for (unsigned int launch_b = 0; launch_b < launch_grid; ++launch_b) {",
                "    blockIdx.x = launch_b;",
                *per_block,
                "  }",
                "}",
                ""]
    return "\n".join(lines)


def sanitizers(spec):
    """The sanitizer names of ``spec`` ("address,undefined", as for -fsanitize=)."""
    names = tuple(dict.fromkeys(s.strip() for s in (spec or "").split(",") if s.strip()))
    for name in names:
        if not name.replace("-", "").isalpha():
            raise ValueError(f"{SANITIZE_ENV}: bad sanitizer name {name!r} in {spec!r}")
    return names


def runtime_library(name):
    """The compiler's shared runtime ``lib<name>.so`` (e.g. "asan"), or None."""
    cxx = compiler()
    if cxx is None:
        return None
    out = subprocess.run([cxx, f"-print-file-name=lib{name}.so"], capture_output=True,
                         text=True, check=False).stdout.strip()
    return out if os.path.isabs(out) and os.path.exists(out) else None


def sanitizer_environment(spec="address,undefined", base=None):
    """``base`` (default os.environ) plus what a Python process needs to load kernels
    built with ``spec``: CAFFELITE_HOST_SANITIZE, LD_PRELOAD of libasan (ASan's runtime
    must come before every other library; UBSan's is loaded with the kernels), no leak
    check (the interpreter keeps its objects at exit by design)."""
    names = sanitizers(spec)
    env = dict(os.environ if base is None else base)
    env[SANITIZE_ENV] = ",".join(names)
    if "address" in names:
        asan = runtime_library("asan")
        if asan is None:
            raise RuntimeError("no libasan.so for the C++ compiler: cannot preload ASan")
        env["LD_PRELOAD"] = " ".join(p for p in (asan, env.get("LD_PRELOAD", "")) if p)
        env["ASAN_OPTIONS"] = "detect_leaks=0"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1"
    return env


def _partial(path):
    """A unique name to write ``path`` under before renaming it into place (two
    processes, or two HostKernels, may build the same module at once)."""
    return f"{path}.{os.getpid()}-{next(_partial_serial)}.tmp"


_partial_serial = itertools.count()


def _compiler_environment():
    """os.environ without a preloaded sanitizer runtime (it would slow the compiler
    down, intercepting every malloc)."""
    env = dict(os.environ)
    kept = [p for p in env.get("LD_PRELOAD", "").split()
            if not os.path.basename(p).startswith(("libasan", "libubsan"))]
    env["LD_PRELOAD"] = " ".join(kept)
    if not kept:
        del env["LD_PRELOAD"]
    return env


def _asan_loaded():
    return hasattr(ctypes.CDLL(None), "__asan_init")


def _whole_heap_block(a):
    """Whether ``a`` is all of a numpy-allocated heap block. Such a block already has
    ASan's redzones right before and after it, whatever its size: numpy takes its data
    from malloc (its small-block cache hands a freed block back only for the same byte
    count, and its huge-page hint for >= 4 MiB only madvises inside the block)."""
    owner = a
    while isinstance(_numpy_attribute(owner, "base"), np.ndarray):
        owner = _numpy_attribute(owner, "base")
    return (_numpy_attribute(owner, "flags").owndata and _numpy_attribute(owner, "nbytes")
            == a.nbytes and _numpy_attribute(owner, "ctypes").data == a.ctypes.data)


def _numpy_attribute(a, name):
    """``a.<name>`` through numpy's own descriptor (the GPU emulator's array subclass
    polices attribute reads in its CuPy conformance mode; the owner of a kernel
    argument's memory may be one of its arrays)."""
    return getattr(np.ndarray, name).__get__(a)


def _isolated(params, values):
    """The arguments with every array that is only part of its buffer (one image of a
    batch, a prefix of the column workspace: an overrun would land in its neighbours
    unseen) on an exact-size heap copy with its own redzones. Arguments that are the
    same memory share one copy (in-place kernels); ones that only partly overlap stay as
    they are. Also returns the (original, copy) pairs to write back (those with a
    non-const pointer parameter)."""
    spans = {}
    for i, (p, v) in enumerate(zip(params, values)):
        if p.pointer:
            spans.setdefault((v.ctypes.data, v.nbytes), []).append(i)
    out, writeback = list(values), []
    for (start, size), users in spans.items():
        original = values[users[0]]
        if _whole_heap_block(original) or any(
                start < s + n and s < start + size for s, n in spans if (s, n) != (start, size)):
            continue
        copy = original.copy()
        for i in users:
            out[i] = copy
        if any(not params[i].const for i in users):
            writeback.append((original, copy))
    return out, writeback


class HostModule:
    """One compiled kernel module: ``run(kernel, dtype, *args, grid=None, block=None)``;
    ``isolate`` runs array views on exact-size copies (sanitized builds, ``_isolated``)."""

    def __init__(self, name, library, isolate=False):
        self.name = name
        self.signatures = kernels.kernel_signatures(kernels.source(name))
        self.lib = ctypes.CDLL(library)
        self.isolate = isolate

    def run(self, kernel, dtype, *args, grid=None, block=kernels.BLOCK):
        params = self.signatures[kernel]
        ctype = kernels.ctype_name(dtype)
        values = kernels.convert_args(params, dtype, args, np)
        for p, v in zip(params, values):
            if p.pointer and not p.const and not v.flags.writeable:
                raise ValueError(f"{kernel}: output '{p.name}' is read-only")
        grid = kernels.grid_for(values[0], block) if grid is None else grid
        writeback = []
        if self.isolate:
            values, writeback = _isolated(params, values)
        c_args = []
        for p, v in zip(params, values):
            if p.pointer:
                c_args.append(ctypes.c_void_p(v.ctypes.data))
            elif p.ctype == "T":
                c_args.append(_FLOAT_CTYPES[ctype](v))
            else:
                c_args.append(_CTYPES[p.ctype](v))
        fn = getattr(self.lib, f"host_launch_{kernel}_{ctype}")
        fn.restype = None
        fn(ctypes.c_uint(grid), ctypes.c_uint(block), *c_args)
        for original, copy in writeback:
            np.copyto(original, copy)


class HostKernels:
    """Builds kernel modules into ``build_dir`` (once per source version) and loads them.

    ``sanitize`` ("address,undefined"; default $CAFFELITE_HOST_SANITIZE, "" = none)
    builds with those sanitizers into the subdirectory ``sanitize-<names>``, so
    sanitized and plain libraries never mix."""

    def __init__(self, build_dir, sanitize=None):
        if sanitize is None:
            sanitize = os.environ.get(SANITIZE_ENV, "")
        self.sanitizers = sanitizers(sanitize)
        self.flags = CXX_FLAGS
        self.build_dir = str(build_dir)
        if self.sanitizers:
            self.flags += (f"-fsanitize={','.join(self.sanitizers)}",) + SANITIZE_FLAGS
            self.build_dir = os.path.join(self.build_dir,
                                          "sanitize-" + "-".join(sorted(self.sanitizers)))
            os.makedirs(self.build_dir, exist_ok=True)
        self.modules = {}
        self.pending = {}

    def _paths(self, name):
        driver = driver_source(name)
        with open(SHIM, encoding="utf-8") as f:
            shim = f.read()
        key = hashlib.sha256("\0".join((driver, kernels.source(name), shim,
                                        " ".join(self.flags))).encode()).hexdigest()[:16]
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
                self.pending[name] = (None, lib, cpp, None)
                continue
            written = _partial(cpp)
            with open(written, "w", encoding="utf-8") as f:
                f.write(driver)
            os.replace(written, cpp)
            built = _partial(lib)
            cmd = [cxx, *self.flags, "-I", kernels.KERNEL_DIR, "-include", SHIM, "-x", "c++",
                   cpp, "-o", built]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, env=_compiler_environment())
            self.pending[name] = (proc, lib, cpp, built)

    def module(self, name):
        if name not in self.modules:
            if "address" in self.sanitizers and not _asan_loaded():
                # Loading the library would abort the whole process instead.
                raise RuntimeError(
                    f"{SANITIZE_ENV}={','.join(self.sanitizers)}: the ASan runtime is not "
                    f"loaded; run Python with LD_PRELOAD=$(g++ -print-file-name=libasan.so) "
                    f"ASAN_OPTIONS=detect_leaks=0 (host.sanitizer_environment())")
            self.start([name])
            proc, lib, cpp, built = self.pending.pop(name)
            if proc is not None:
                out, _ = proc.communicate()
                if proc.returncode != 0:
                    raise RuntimeError(f"g++ failed on {name}.cu (driver {cpp}):\n{out}")
                if out.strip():     # warnings are bugs in kernels meant for two compilers
                    raise RuntimeError(f"g++ warned on {name}.cu (driver {cpp}):\n{out}")
                os.replace(built, lib)
            self.modules[name] = HostModule(name, lib, isolate=bool(self.sanitizers))
        return self.modules[name]

    def run(self, module, kernel, dtype, *args, grid=None, block=kernels.BLOCK):
        self.module(module).run(kernel, dtype, *args, grid=grid, block=block)


# ------------------------------------------------------------------ NVRTC (no GPU needed)
def _nvidia_wheel_dirs(subdirs):
    """The folders ``subdirs`` of pip's nvidia-* wheels (the ``nvidia`` namespace
    package) that exist."""
    try:
        import nvidia
    except ImportError:
        return
    for root in nvidia.__path__:
        for sub in subdirs:
            d = os.path.join(root, sub)
            if os.path.isdir(d):
                yield d


def _nvrtc_candidates():
    env = os.environ.get("CAFFELITE_NVRTC")
    if env:
        yield env
    for d in _nvidia_wheel_dirs(("cu13/lib", "cu12/lib", "cuda_nvrtc/lib")):
        for f in sorted(os.listdir(d)):
            if f.startswith("libnvrtc.so"):
                yield os.path.join(d, f)
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


def ptxas_path():
    """ptxas ($CAFFELITE_PTXAS, pip's nvidia-cuda-nvcc wheel, or on PATH), or None."""
    env = os.environ.get("CAFFELITE_PTXAS")
    if env:
        return env
    for d in _nvidia_wheel_dirs(("cu13/bin", "cuda_nvcc/bin")):
        if os.path.isfile(os.path.join(d, "ptxas")):
            return os.path.join(d, "ptxas")
    return shutil.which("ptxas")


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for")
_PTXAS_NUMBERS = {
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "registers": re.compile(r"Used (\d+) registers"),
    "smem_bytes": re.compile(r"(\d+) bytes smem"),
}


def ptxas_usage(ptxas, ptx, arch="sm_90"):
    """{entry symbol: {registers, stack_bytes, spill_stores, spill_loads, smem_bytes}}:
    what ``ptxas -v`` reports for ``ptx`` on ``arch``."""
    with tempfile.TemporaryDirectory() as d:
        source = os.path.join(d, "module.ptx")
        with open(source, "w", encoding="utf-8") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, f"-arch={arch}", "-v", source, "-o",
                               os.path.join(d, "module.cubin")],
                              capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{proc.stderr}")
    usage, entry = {}, None
    for line in proc.stderr.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            entry = usage.setdefault(m.group(1), dict.fromkeys(_PTXAS_NUMBERS, 0))
            continue
        if entry is not None:
            for key, pattern in _PTXAS_NUMBERS.items():
                found = pattern.search(line)
                if found:
                    entry[key] = int(found.group(1))
    return usage
