"""caffelite's own CUDA kernels (``*.cu`` next to this file) and their one loader.

Every kernel is a ``template <typename T> __global__ void name(const int n, ...)``: a
grid-stride loop over ``n`` elements (``n`` is always the first parameter), no
``__syncthreads`` or shared memory, atomics for scatters. So the same source compiles
with NVRTC for the GPU and with g++ for the host (``host_shim.h``; the tests in
``tests/test_kernels_host.py`` run every kernel on the CPU against the numpy layers).
The one exception is ``conv_igemm.cu``, a tiled tensor-core convolution: its blocks
share memory and synchronise, and the host runs each block's threads as fibers
(``host.cooperative``); its launches name their grid.

    from caffelite import kernels
    kernels.launch("pooling", "max_pool_forward", cupy.float32, n, bottom, ...)

``load_module(name)`` compiles ``name.cu`` once per process and device (CuPy
``RawModule``, instantiated for float and double); ``get_kernel`` picks one kernel;
``launch`` converts the arguments to the kernel's exact C types (CuPy would pass a
Python int as a 64-bit value to an ``int`` parameter) and picks the grid. CuPy is
imported only here and only when a kernel is asked for: importing caffelite never needs
it.
"""
import os
import re

import numpy as np

KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))

# Exactness first: no fast math, and no fused multiply-add contraction (NVRTC's default
# --fmad=true would round a*b+c once and break bit-equality with the numpy layers).
NVRTC_OPTIONS = ("-std=c++14", "--fmad=false")

# The instantiations every module provides.
DTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

BLOCK = 256
MAX_GRID = 1 << 16          # more elements than grid*block: the loops stride over them
MAX_ELEMENTS = 2 ** 31 - 1  # kernels index with int, like Caffe

# C type of a parameter -> numpy dtype ("T" is the instantiation's float type).
_C_TYPES = {"int": np.dtype(np.int32), "unsigned long long": np.dtype(np.uint64)}

_KERNEL_RE = re.compile(
    r"template\s*<\s*typename\s+T\s*>\s*__global__\s+void\s+"
    r"(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)")

_modules = {}
_cupy_checked = []


class GPUUnavailableError(RuntimeError):
    """CuPy or a CUDA device is missing; the message says which, in one sentence, and
    what to do (``advice``, which ``reason`` leaves out)."""

    def __init__(self, reason, advice=""):
        super().__init__(f"{reason}; {advice}" if advice else reason)
        self.reason = reason


_RUN_ON_CPU = "run on the CPU instead (without --gpu; set_mode_cpu() in Python)"


class Param:
    """One kernel parameter: C base type ("T", "int", ...), pointer?, const?, name."""
    __slots__ = ("ctype", "pointer", "const", "name")

    def __init__(self, ctype, pointer, const, name):
        self.ctype, self.pointer, self.const, self.name = ctype, pointer, const, name

    def dtype(self, t):
        """The numpy dtype of this parameter (its elements, for a pointer) for T = ``t``."""
        return np.dtype(t) if self.ctype == "T" else _C_TYPES[self.ctype]

    def __repr__(self):
        return (f"{'const ' if self.const else ''}{self.ctype}"
                f"{'*' if self.pointer else ''} {self.name}")


def module_names():
    """Every kernel module shipped with caffelite (the ``.cu`` basenames)."""
    return sorted(f[:-3] for f in os.listdir(KERNEL_DIR) if f.endswith(".cu"))


def source_path(name):
    path = os.path.join(KERNEL_DIR, f"{name}.cu")
    if not os.path.isfile(path):
        raise ValueError(f"no kernel module '{name}' (known: {', '.join(module_names())})")
    return path


def source(name):
    with open(source_path(name), encoding="utf-8") as f:
        return f.read()


def _parse_param(text, kernel):
    tokens = text.replace("*", " * ").split()
    const = "const" in tokens
    tokens = [t for t in tokens if t not in ("const", "__restrict__")]
    pointer = tokens.count("*")
    tokens = [t for t in tokens if t != "*"]
    if pointer > 1 or len(tokens) < 2:
        raise ValueError(f"kernel {kernel}: cannot read parameter '{text.strip()}'")
    ctype, name = " ".join(tokens[:-1]), tokens[-1]
    if ctype != "T" and ctype not in _C_TYPES:
        raise ValueError(f"kernel {kernel}: parameter '{text.strip()}' has a type the "
                         f"loader does not map (T, {', '.join(_C_TYPES)})")
    return Param(ctype, bool(pointer), const, name)


def kernel_signatures(text):
    """{kernel name: [Param, ...]} of the ``template <typename T> __global__`` kernels."""
    out = {}
    for m in _KERNEL_RE.finditer(text):
        name = m.group(1)
        params = [_parse_param(p, name) for p in m.group(2).split(",")]
        first = params[0]
        if first.pointer or first.ctype != "int":
            raise ValueError(f"kernel {name}: the first parameter must be the element count "
                             f"'const int n', got '{first!r}'")
        out[name] = params
    return out


def ctype_name(dtype):
    try:
        return DTYPES[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"caffelite kernels are instantiated for float32 and float64 only, "
                        f"not {np.dtype(dtype)}") from None


def require_cupy():
    """The cupy module, or GPUUnavailableError saying in one sentence what is missing."""
    if _cupy_checked:
        return _cupy_checked[0]
    try:
        import cupy
    except ImportError as e:
        raise GPUUnavailableError(
            f"GPU mode needs CuPy, which is not installed ({e}); install the CUDA extra, "
            f"e.g. pip install 'caffelite[cuda12]', or run on the CPU") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:      # CUDARuntimeError: no driver, no device, ...
        raise GPUUnavailableError(f"GPU mode needs an NVIDIA GPU, but CUDA reports none ({e})",
                                  _RUN_ON_CPU) from None
    if count < 1:
        raise GPUUnavailableError("GPU mode needs an NVIDIA GPU, but CUDA reports none",
                                  _RUN_ON_CPU)
    _cupy_checked.append(cupy)
    return cupy


def load_module(name):
    """The CuPy RawModule of ``name.cu``, compiled once per process and device."""
    cupy = require_cupy()
    key = (name, cupy.cuda.Device().id)
    module = _modules.get(key)
    if module is None:
        expressions = [f"{k}<{t}>" for k in module_signatures(name) for t in DTYPES.values()]
        # (a RawModule is a Cython object: it takes no extra attributes)
        module = cupy.RawModule(code=source(name), options=NVRTC_OPTIONS,
                                name_expressions=expressions)
        _modules[key] = module
    return module


_kernels = {}


def get_kernel(module, name, dtype=None):
    """Kernel ``name`` of ``module`` (a RawModule or a module name): ``name`` is either
    an instantiation such as ``"im2col<float>"`` or a bare name with ``dtype`` given.
    Looked up once per module and instantiation (CuPy's get_function makes a new
    RawKernel and asks the driver for the function on every call)."""
    if isinstance(module, str):
        module = load_module(module)
    if dtype is not None:
        name = f"{name}<{ctype_name(dtype)}>"
    key = (id(module), name)
    cached = _kernels.get(key)
    if cached is None or cached[0] is not module:
        cached = _kernels[key] = (module, module.get_function(name))
    return cached[1]


def convert_args(params, dtype, args, xp):
    """``args`` as the kernel's exact C types: arrays checked (``xp`` arrays of the
    parameter's dtype, C-contiguous), scalars cast to int32 / uint64 / ``dtype``."""
    return _convert(params, tuple(p.dtype(dtype) for p in params), args, xp)


def _convert(params, wants, args, xp):
    # On the launch path of every kernel (thousands per ResNet pass): the parameter
    # dtypes come precomputed, and the checks read each array's attributes once.
    if len(args) != len(params):
        raise TypeError(f"kernel takes {len(params)} arguments ({params}), got {len(args)}")
    out = []
    array_type = xp.ndarray
    for p, want, a in zip(params, wants, args):
        if p.pointer:
            if not isinstance(a, array_type):
                raise TypeError(f"argument '{p.name}' must be a {xp.__name__} array, "
                                f"got {type(a).__name__}")
            if a.dtype != want or not a.flags.c_contiguous:
                raise TypeError(f"argument '{p.name}' must be a C-contiguous {want} array, "
                                f"got {a.dtype} (contiguous: {a.flags.c_contiguous})")
            out.append(a)
        else:
            out.append(want.type(a))
    n = int(out[0])
    if not 0 <= n <= MAX_ELEMENTS:
        raise ValueError(f"element count {n} is outside the kernels' int range")
    return out


def grid_for(n, block=BLOCK):
    return max(1, min(MAX_GRID, -(-int(n) // block)))


_signature_cache = {}


def module_signatures(name):
    """{kernel: [Param, ...]} of module ``name`` (parsed once)."""
    sigs = _signature_cache.get(name)
    if sigs is None:
        sigs = _signature_cache[name] = kernel_signatures(source(name))
    return sigs


_emulator_array = []


def _emulated(args):
    if not _emulator_array:
        from . import emulator
        _emulator_array.append(emulator.ndarray)
    array_type = _emulator_array[0]
    return any(isinstance(a, array_type) for a in args)


_launch_specs = {}


def _launch_spec(module_name, kernel_name, dtype):
    """(parameters, their numpy dtypes) of one kernel instantiation, built once."""
    key = (module_name, kernel_name, dtype)
    spec = _launch_specs.get(key)
    if spec is None:
        params = module_signatures(module_name).get(kernel_name)
        if params is None:
            raise ValueError(f"kernel module '{module_name}' has no kernel '{kernel_name}' "
                             f"(it has {', '.join(module_signatures(module_name))})")
        ctype_name(dtype)
        spec = _launch_specs[key] = (params, tuple(p.dtype(dtype) for p in params))
    return spec


_device_functions = {}


def _device_function(cupy, module_name, kernel_name, dtype):
    key = (module_name, kernel_name, dtype, cupy.cuda.runtime.getDevice())
    function = _device_functions.get(key)
    if function is None:
        function = _device_functions[key] = get_kernel(load_module(module_name),
                                                       kernel_name, dtype)
    return function


def launch(module_name, kernel_name, dtype, *args, grid=None, block=BLOCK):
    """Run kernel ``kernel_name<dtype>`` of ``module_name.cu`` on device arrays: CuPy
    arrays on the GPU, or the emulator's arrays (host-compiled kernels, no GPU)."""
    params, wants = _launch_spec(module_name, kernel_name, dtype)
    if _emulated(args):
        from . import emulator
        values = _convert(params, wants, args, emulator)
        emulator.launch(module_name, kernel_name, dtype, *values, grid=grid, block=block)
        return
    cupy = require_cupy()
    values = _convert(params, wants, args, cupy)
    grid = grid_for(values[0], block) if grid is None else grid
    _device_function(cupy, module_name, kernel_name, dtype)((grid,), (block,), tuple(values))
