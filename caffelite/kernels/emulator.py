"""A CPU stand-in for CuPy, so caffelite's whole GPU code path runs where there is no GPU.

``caffelite.set_mode_gpu(emulate=True)`` makes this module the device array module:

* device arrays are ``emulator.ndarray``, numpy memory that behaves like CuPy's device
  memory where it matters for catching bugs: mixing it with a host numpy array in a
  ufunc or array function raises ``TypeError`` (as CuPy does), reductions give 0-d
  device arrays instead of scalars, and ``asnumpy`` is the only way back to the host;
* array functions (``emulator.zeros``, ``emulator.matmul`` …) are numpy's, returning
  device arrays; optionally (``set_poison_empty()``, or
  ``CAFFELITE_EMULATOR_POISON_EMPTY=1``; off by default) ``empty``/``empty_like`` fill
  what they give with all bits set (NaN in a float), as device memory reused from
  CuPy's pool holds whatever it held;
* ``kernels.launch`` runs the ``.cu`` kernels compiled for the host by g++
  (``kernels.host``), from the same sources NVRTC compiles on a GPU.

It is for tests and kernel development: it is slow and checks nothing about real
GPU timing, memory or atomics ordering.

Being numpy, it would accept any numpy function, method or keyword, also those CuPy
lacks. Its conformance mode (``set_cupy_check()``, or ``CAFFELITE_EMULATOR_CUPY_CHECK=1``;
needs an importable ``cupy``, no GPU) checks every call made through it against the
installed CuPy and raises ``TypeError`` for what CuPy would reject
(``kernels.cupy_conformance``).
"""
import contextlib
import functools
import os
import stat
import sys
import tempfile
import types

import numpy as _np

from . import cupy_conformance as _conformance
from . import emulated_capture as _capture

class ndarray(_np.ndarray):        # noqa: N801  (CuPy's spelling)
    """Host memory posing as device memory; refuses to mix with host arrays."""

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        if _conformance.active() and _conformance.called_by_user(1):
            given = kwargs if out is None else dict(kwargs, out=out)
            _conformance.check_array_ufunc(ufunc, method, inputs, given)
        inputs = tuple(_to_plain(x, ufunc.__name__) for x in inputs)
        if out is not None:
            kwargs["out"] = tuple(_to_plain(o, ufunc.__name__) for o in out)
        fn = getattr(ufunc, method)
        if _capture.active():
            _refuse_cublas(ufunc.__name__)
            if out is None and method != "at":
                return _capture.record_result(fn, inputs, kwargs, _to_device_result)
            _capture.record_write(fn, *inputs, **kwargs)
        else:
            result = fn(*inputs, **kwargs)
            if out is None:
                return _to_device_result(result)
        if out is None:
            return None
        return out[0] if len(out) == 1 else out

    def __array_function__(self, func, types_, args, kwargs):
        if _conformance.active() and _conformance.called_by_user(1):
            _conformance.check_array_function(func, args, kwargs)
        name = getattr(func, "__name__", "function")
        return _call(func, _to_plain_tree(args, name), _to_plain_tree(kwargs, name), name)

    def __getitem__(self, index):
        index = _index_on_device(index)
        if not _capture.active():
            return super().__getitem__(index)
        if any(getattr(part, "dtype", None) == bool
               for part in (index if isinstance(index, tuple) else (index,))):
            _capture.refuse("boolean-mask indexing (its result size is read on the host)")
        return _capture.record_result(_np.ndarray.__getitem__, (self.view(_np.ndarray), index),
                                      {}, _to_device_result)

    def __setitem__(self, index, value):
        if _is_host_array(value):
            raise TypeError("a host numpy array assigned into a device array: move it with "
                            "xp.asarray (an explicit copy) instead")
        if _capture.active():
            _capture.record_write(_np.ndarray.__setitem__, self.view(_np.ndarray),
                                  _index_on_device(index), _plain_value(value))
            return
        super().__setitem__(_index_on_device(index), _plain_value(value))

    def argsort(self, axis=-1, kind=None, order=None):
        if _capture.active():
            return _capture.record_result(_np.ndarray.argsort, (self.view(_np.ndarray),),
                                          {"axis": axis, "kind": "stable", "order": order},
                                          _to_device_result)
        return _np.ndarray.argsort(self, axis=axis, kind="stable", order=order)

    def sort(self, axis=-1, kind=None, order=None):
        if _capture.active():
            _capture.record_write(_np.ndarray.sort, self.view(_np.ndarray), axis=axis,
                                  kind="stable", order=order)
            return
        _np.ndarray.sort(self, axis=axis, kind="stable", order=order)

    # Conversions to host scalars read the device (CuPy synchronises).
    def __float__(self):
        _capture.refuse("float() of a device array (a device-to-host read)")
        return float(self.view(_np.ndarray))

    def __int__(self):
        _capture.refuse("int() of a device array (a device-to-host read)")
        return int(self.view(_np.ndarray))

    def __bool__(self):
        _capture.refuse("bool() of a device array (a device-to-host read)")
        return bool(self.view(_np.ndarray))

    def get(self, stream=None, order="C", out=None, blocking=True):
        """CuPy's device→host copy."""
        return asnumpy(self, stream=stream, order=order, out=out, blocking=blocking)

    def __index__(self):
        raise TypeError("a device array used as an index or size: cupy.ndarray has no "
                        "__index__; convert it with int() (a device-to-host copy)")

    def set(self, arr, stream=None):
        """CuPy's host→device copy into this array (same shape, a numpy array)."""
        if not isinstance(arr, _np.ndarray) or isinstance(arr, ndarray):
            raise TypeError("set() takes a host numpy array")
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError(f"set(): shape/dtype {arr.shape} {arr.dtype} differ from "
                             f"{self.shape} {self.dtype}")
        _capture.refuse("ndarray.set (a host-to-device copy from pageable memory)")
        _np.copyto(self.view(_np.ndarray), arr)

    def __repr__(self):
        return "emulated_device_" + repr(self.view(_np.ndarray))


def _captured_method(name, kind):
    """ndarray method ``name`` as a stream capture sees it (outside a capture: numpy's).
    ``kind``: "result" (makes an array, or a view), "write" (into the array) or
    "host" (reads values on the host)."""
    base = getattr(_np.ndarray, name)

    def method(self, *args, **kwargs):
        if not _capture.active():
            return base(self, *args, **kwargs)
        if kind == "host":
            _capture.refuse(f"ndarray.{name} (a device-to-host read)")
        _refuse_cublas(name)
        plain = self.view(_np.ndarray)
        args, kwargs = _to_plain_tree(args, name), _to_plain_tree(kwargs, name)
        if kind == "write":
            _capture.record_write(base, plain, *args, **kwargs)
            return None
        return _capture.record_result(base, (plain,) + args, kwargs, _to_device_result)
    method.__name__ = name
    method.__doc__ = base.__doc__
    return method


# numpy methods that bypass __array_ufunc__/__array_function__ (C implementations)
for _name in ("copy", "astype", "flatten", "ravel", "reshape", "argmax", "argmin", "take",
              "repeat", "cumsum", "cumprod", "dot", "round", "diagonal", "squeeze",
              "transpose", "swapaxes", "trace"):
    setattr(ndarray, _name, _captured_method(_name, "result"))
for _name in ("fill", "put", "partition", "itemset", "setfield"):
    if hasattr(_np.ndarray, _name):
        setattr(ndarray, _name, _captured_method(_name, "write"))
for _name in ("item", "tolist", "tobytes", "nonzero", "__complex__"):
    setattr(ndarray, _name, _captured_method(_name, "host"))
del _name


# Functions that write into an argument (other than ``out``), functions whose result
# size depends on the values (CuPy reads it on the host), uninitialised allocations.
_WRITES = frozenset({"copyto", "put", "place", "putmask", "fill_diagonal", "put_along_axis",
                     "at"})
_HOST_SIZED = frozenset({"nonzero", "argwhere", "flatnonzero", "unique", "extract",
                         "compress"})
_UNINITIALISED = frozenset({"empty", "empty_like"})

# Poisoned allocations (``set_poison_empty()``, or CAFFELITE_EMULATOR_POISON_EMPTY=1): what
# ``empty``/``empty_like`` give holds every bit set (NaN in a float, -1 or the maximum in
# an integer) instead of numpy's fresh, often zero, memory, as device memory reused from
# CuPy's pool holds what it held; an element the device code forgets to write then shows.
_poison_empty = [os.environ.get("CAFFELITE_EMULATOR_POISON_EMPTY", "0") not in ("", "0")]


def set_poison_empty(enabled=True):
    """Poisoned ``empty``/``empty_like`` results on (True) or off (False); returns the
    previous setting."""
    previous, _poison_empty[0] = _poison_empty[0], bool(enabled)
    return previous


def poison_empty_active():
    return _poison_empty[0]


def _poisoned(name, result):
    if _poison_empty[0] and name in _UNINITIALISED and isinstance(result, _np.ndarray):
        plain = result.view(_np.ndarray)
        if plain.dtype.kind in "fc":
            plain.fill(_np.nan)
        elif plain.dtype.kind in "iu":
            plain.fill(_np.iinfo(plain.dtype).max if plain.dtype.kind == "u" else -1)
        elif plain.dtype.kind == "b":
            plain.fill(True)
    return result


def _call(fn, args, kwargs, name):
    """``fn`` on plain (numpy) arguments, device results; recorded while capturing."""
    if not _capture.active():
        return _poisoned(name, _to_device_result(fn(*args, **kwargs)))
    if name in _HOST_SIZED or (name == "where" and len(args) == 1 and not kwargs):
        _capture.refuse(f"{name} (its result size is read on the host)")
    _refuse_cublas(name)
    out = kwargs.get("out")
    if out is None and name not in _WRITES:
        return _poisoned(name, _capture.record_result(fn, args, kwargs, _to_device_result,
                                                      record=name not in _UNINITIALISED))
    _capture.record_write(fn, *args, **kwargs)
    if isinstance(out, tuple):
        out = out[0] if len(out) == 1 else out
    return _to_device_result(out)


def _is_host_array(x):
    return isinstance(x, _np.ndarray) and not isinstance(x, ndarray) and x.ndim > 0


def _to_plain(x, what):
    if isinstance(x, ndarray):
        return x.view(_np.ndarray)
    if _is_host_array(x):
        raise TypeError(f"{what}: a host numpy array mixed with device arrays (CuPy "
                        f"refuses this; move it with xp.asarray or backend.to_device)")
    return x


def _index_on_device(index):
    """An index for a device array: host index arrays are refused (keep index arrays on
    the device, as a GPU needs them there)."""
    parts = index if isinstance(index, tuple) else (index,)
    for part in parts:
        if _is_host_array(part):
            raise TypeError("a device array indexed by a host numpy array: make the index "
                            "array with xp (on the device)")
    if isinstance(index, tuple):
        return tuple(p.view(_np.ndarray) if isinstance(p, ndarray) else p for p in index)
    return index.view(_np.ndarray) if isinstance(index, ndarray) else index


def _plain_value(value):
    return value.view(_np.ndarray) if isinstance(value, ndarray) else value


def _to_plain_tree(obj, what):
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_plain_tree(o, what) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_plain_tree(v, what) for k, v in obj.items()}
    return _to_plain(obj, what)


def _to_device_result(result):
    if isinstance(result, _np.ndarray):
        return result.view(ndarray)
    if isinstance(result, _np.generic):         # CuPy reductions give 0-d arrays
        return _np.asarray(result).view(ndarray)
    if isinstance(result, tuple):
        return tuple(_to_device_result(r) for r in result)
    if isinstance(result, list):
        return [_to_device_result(r) for r in result]
    return result


def _device_function(fn, cupy_fn=None, label=None):
    """numpy function ``fn`` taking device (not host) arrays, giving device arrays; its
    calls are checked against CuPy's ``cupy_fn`` (named ``label``) if one is given."""
    name = getattr(fn, "__name__", "function")

    def call(*args, **kwargs):
        if cupy_fn is not None and _conformance.active():
            _conformance.check_call(label, cupy_fn, args, kwargs)
        return _call(fn, _to_plain_tree(args, name), _to_plain_tree(kwargs, name), name)
    call.__name__ = name
    call.__doc__ = fn.__doc__
    return call


def _cupy_counterpart(namespace, name):
    """In conformance mode: CuPy's ``namespace.name`` (an error if CuPy has none)."""
    if not _conformance.active() or name.startswith("_"):
        return None
    return _conformance.cupy_attribute(namespace, name)


def _cupy_api(fn):
    """An emulator function standing for ``cupy.<its name>``: calls checked against it."""
    @functools.wraps(fn)
    def checked(*args, **kwargs):
        if _conformance.active():
            cupy_fn = _conformance.cupy_attribute("", fn.__name__)
            _conformance.check_call(f"cupy.{fn.__name__}", cupy_fn, args, kwargs)
        return fn(*args, **kwargs)
    return checked


_UFUNC_METHODS = frozenset({"reduce", "accumulate", "reduceat", "at", "outer"})


class _DeviceUfunc:
    """A numpy ufunc refusing host arrays; methods (``reduce``, ``at`` …) too. Calls
    are checked against CuPy's ufunc ``cupy_ufunc`` if one is given."""

    def __init__(self, ufunc, cupy_ufunc=None, label=None):
        self._ufunc = ufunc
        self._cupy = cupy_ufunc
        self._label = label
        self.__name__ = ufunc.__name__

    def __call__(self, *args, **kwargs):
        if self._cupy is not None and _conformance.active():
            _conformance.check_ufunc_call(self._label, self._cupy, args, kwargs)
        nin = self._ufunc.nin
        if len(args) > nin:     # outputs given by position: a write, as out= is
            kwargs = dict(kwargs, out=tuple(args[nin:]))
            args = args[:nin]
        return _device_function(self._ufunc)(*args, **kwargs)

    def __getattr__(self, name):
        attr = getattr(self._ufunc, name)
        if self._cupy is not None and _conformance.active() and not name.startswith("_"):
            return self._checked_attribute(name, attr)
        return _device_function(attr) if callable(attr) else attr

    def _checked_attribute(self, name, attr):
        if name not in _UFUNC_METHODS:
            if not hasattr(self._cupy, name):
                raise _conformance.CupyMissingError(
                    f"CuPy's {self._label} has no attribute '{name}'")
            return _device_function(attr) if callable(attr) else attr
        _conformance.ufunc_method(self._label, self._cupy, name)
        run = _device_function(attr)

        def method(*args, **kwargs):
            _conformance.check_ufunc_method_call(self._label, self._cupy, name, args, kwargs)
            return run(*args, **kwargs)
        method.__name__ = name
        return method


# --- host <-> device ------------------------------------------------------------------
@_cupy_api
def asarray(a, dtype=None, order=None):
    """To the device (a copy from host memory, like CuPy's transfer)."""
    if isinstance(a, ndarray):
        if dtype is None or a.dtype == dtype:
            return a
        return _call(_np.array, (a.view(_np.ndarray),), {"dtype": dtype, "order": order or "K"},
                     "array")
    _capture.refuse("a host-to-device copy from pageable memory")
    return _np.array(a, dtype=dtype, order=order or "K").view(ndarray)


@_cupy_api
def array(a, dtype=None, copy=True, order="K", ndmin=0):
    if not isinstance(a, ndarray):
        _capture.refuse("a host-to-device copy from pageable memory")
    plain = a.view(_np.ndarray) if isinstance(a, ndarray) else a
    return _call(_np.array, (plain,),
                 {"dtype": dtype, "copy": copy, "order": order, "ndmin": ndmin}, "array")


@_cupy_api
def ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):
        return asarray(_np.ascontiguousarray(a, dtype=dtype))
    return _call(_np.ascontiguousarray, (a.view(_np.ndarray),), {"dtype": dtype},
                 "ascontiguousarray")


# Device->host copies so far (asnumpy / get): tests read it to find hidden syncs.
copies_to_host = [0]


@_cupy_api
def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if isinstance(a, ndarray):
        _capture.refuse("a device-to-host copy")
        copies_to_host[0] += 1
        host = _np.array(a.view(_np.ndarray), order=order)
    else:
        host = _np.asarray(a, order=order)
    if out is not None:
        out[...] = host
        return out
    return host


@_cupy_api
def get_array_module(*arrays):
    for a in arrays:
        if isinstance(a, ndarray):
            return sys.modules[__name__]
    return _np


# --- CuPy namespaces caffelite uses ---------------------------------------------------
class _Random:
    """``cupy.random``: numpy's generator, device results."""

    def __init__(self):
        self._rng = _np.random.RandomState()

    def seed(self, seed=None):
        self._rng.seed(seed)

    def random_sample(self, size=None, dtype=float):
        """CuPy's takes a dtype (float32 draws halve the memory traffic)."""
        _refuse_random("random_sample")

        def draw(size=None, dtype=float):
            return self._rng.random_sample(size).astype(dtype, copy=False)
        return _device_function(draw, _cupy_counterpart("random", "random_sample"),
                                "cupy.random.random_sample")(size, dtype)

    def __getattr__(self, name):
        fn = getattr(self._rng, name)
        cupy_fn = _cupy_counterpart("random", name)
        checked = _device_function(fn, cupy_fn, f"cupy.random.{name}")

        def draw(*args, **kwargs):
            _refuse_random(name)
            return checked(*args, **kwargs)
        return draw


def _refuse_random(name):
    # On a GPU the generator's state advances on the host: a captured draw would give
    # the same numbers at every launch of the graph.
    _capture.refuse(f"cupy.random.{name} (a graph would replay the same draw)")


random = _Random()


class _MemoryPool:
    """Stands in for CuPy's memory pool (the emulator has no device memory)."""

    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass

    def set_limit(self, size=None, fraction=None):
        pass

    def malloc(self, size):
        raise RuntimeError("the GPU emulator allocates no device memory")


_POOL = _MemoryPool()


def get_default_memory_pool():
    return _POOL


class _Device:
    def __init__(self, device=0):
        self.id = int(device)

    def use(self):
        pass

    def synchronize(self):
        _capture.refuse("device synchronize")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Stream:
    """``cupy.cuda.Stream``: only capture does anything (``emulated_capture``)."""
    null = None         # the legacy default stream, set below

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self._is_null = null
        self._capturing = False

    def __enter__(self):
        _streams.append(self)
        return self

    def __exit__(self, *exc):
        _streams.pop()
        return False

    def use(self):
        _streams[:] = [self]
        return self

    def synchronize(self):
        _capture.refuse("stream synchronize")

    def begin_capture(self, mode=None):
        if self._is_null:
            raise _capture.CaptureError("the legacy default stream cannot capture")
        _capture.begin()
        self._capturing = True

    def end_capture(self):
        self._capturing = False
        return _capture.Graph(_capture.end())

    def is_capturing(self):
        return self._capturing and _capture.active()


_Stream.null = _Stream(null=True)
_streams = []


@contextlib.contextmanager
def _using_allocator(allocator=None):
    yield


cuda = types.SimpleNamespace(
    Device=_Device,
    Stream=_Stream,
    Graph=_capture.Graph,
    MemoryPool=_MemoryPool,
    using_allocator=_using_allocator,
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
    get_current_stream=lambda: _streams[-1] if _streams else _Stream.null,
)


# --- kernels ---------------------------------------------------------------------------
_host_kernels = []


def host_kernels():
    """The process's host-compiled kernel modules (built on first use, cached on disk)."""
    if not _host_kernels:
        from .host import HostKernels, compiler
        if compiler() is None:
            raise RuntimeError("the GPU emulator runs the .cu kernels compiled for the host "
                               "and needs a C++ compiler (g++ or $CXX)")
        cache = os.environ.get("CAFFELITE_KERNEL_CACHE") or os.path.join(
            tempfile.gettempdir(), f"caffelite-host-kernels-{os.getuid()}")
        _check_private_folder(cache)
        _host_kernels.append(HostKernels(cache))
    return _host_kernels[0]


def _check_private_folder(path):
    """The folder of compiled kernel libraries, which the emulator loads, must be this
    user's alone: in a shared /tmp another user could plant a library there. A folder of
    the user's that others may write (made under umask 002, or by an older caffelite) is
    closed, and the libraries found in it are dropped (they are built again)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.stat(path)
    except OSError as e:
        raise RuntimeError(f"cannot create the host-kernel cache folder {path} "
                           f"({e.strerror}); set CAFFELITE_KERNEL_CACHE to a writable "
                           f"folder of your own") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise RuntimeError(
            f"the host-kernel cache folder {path} is not this user's (owner uid "
            f"{info.st_uid}, mode {stat.filemode(info.st_mode)}), so the libraries in it "
            f"are not loaded; remove it, or set CAFFELITE_KERNEL_CACHE to a folder of your "
            f"own")
    if info.st_mode & 0o022:
        try:
            os.chmod(path, 0o700)
            for name in os.listdir(path):
                if name.endswith(".so"):
                    os.remove(os.path.join(path, name))
        except OSError as e:
            raise RuntimeError(f"the host-kernel cache folder {path} can be written by "
                               f"others and could not be closed ({e.strerror}); set "
                               f"CAFFELITE_KERNEL_CACHE to a folder of your own") from None


def launch(module_name, kernel_name, dtype, *args, grid=None, block=256):
    """Run a kernel on emulated device arrays (``kernels.launch`` checked the arguments)."""
    plain = [a.view(_np.ndarray) if isinstance(a, ndarray) else a for a in args]
    if _capture.active():
        _capture.record_write(host_kernels().run, module_name, kernel_name, dtype, *plain,
                              grid=grid, block=block)
        return
    host_kernels().run(module_name, kernel_name, dtype, *plain, grid=grid, block=block)


def cublas_gemm(a, b, out, accumulate=False):
    """``kernels.cublas.gemm`` on emulated device arrays: ``out = a @ b`` (``+=`` with
    ``accumulate``), written like a kernel's output (recorded while capturing), as
    caffelite's own cuBLAS calls are, where CuPy's matmul is refused."""
    plain = [x.view(_np.ndarray) for x in (a, b, out)]
    if _capture.active():
        _capture.record_write(_host_gemm, *plain, accumulate)
        return
    _host_gemm(*plain, accumulate)


def _host_gemm(a, b, out, accumulate):
    if accumulate:
        out += _np.matmul(a, b)
    else:
        _np.matmul(a, b, out=out)


# CuPy functions that call cuBLAS, which CuPy refuses while a stream is capturing.
_CUBLAS = frozenset({"matmul", "dot", "vdot", "inner", "tensordot", "einsum"})


def _refuse_cublas(name):
    if name in _CUBLAS:
        _capture.refuse(f"{name}: calling cuBLAS API during stream capture is currently "
                        f"unsupported (CuPy)")


@_cupy_api
def sort(a, axis=-1, kind=None, order=None):
    """CuPy's sorts are stable; so are the emulator's (ties keep their order)."""
    return _device_function(_np.sort)(a, axis=axis, kind="stable", order=order)


@_cupy_api
def argsort(a, axis=-1, kind=None, order=None):
    return _device_function(_np.argsort)(a, axis=axis, kind="stable", order=order)


# Everything else: numpy's functions (device in, device out) and its types and constants.
def __getattr__(name):
    attr = getattr(_np, name)
    cupy_attr = _cupy_counterpart("", name)
    if isinstance(attr, _np.ufunc):
        return _DeviceUfunc(attr, cupy_attr, f"cupy.{name}")
    if isinstance(attr, type) or not callable(attr):
        return attr
    return _device_function(attr, cupy_attr, f"cupy.{name}")


# --- conformance mode: would real CuPy accept these calls? --------------------------------
_generic_getattribute = _np.ndarray.__getattribute__
_cupy_properties = set()     # cupy.ndarray's non-method members (shape, dtype ...)


def _checked_getattribute(self, name):
    """ndarray.__getattribute__ in conformance mode: a public member that caffelite
    code (not numpy's or the emulator's internals) reads must exist on cupy.ndarray,
    and a method's arguments must bind to CuPy's signature."""
    value = _generic_getattribute(self, name)
    if name in _cupy_properties or name.startswith("_") or \
            not _conformance.called_by_user(1):
        return value
    member = _conformance.ndarray_member(name)
    if not callable(value) or not _conformance.is_ndarray_method(member):
        return value

    def method(*args, **kwargs):
        _conformance.check_call(f"cupy.ndarray.{name}", member, args, kwargs)
        return value(*args, **kwargs)
    method.__name__ = name
    return method


def set_cupy_check(enabled=True):
    """Conformance mode on (True) or off (False), or as ``CAFFELITE_EMULATOR_CUPY_CHECK``
    says (None). It stays off where ``cupy`` cannot be imported. Returns whether it is on.

    In the mode, every function, ufunc (and ufunc method), ``random`` function and
    ndarray member used through the emulator, and every numpy function or ufunc
    called on its arrays, must exist in CuPy and take the given arguments there;
    otherwise ``TypeError`` (``cupy_conformance.CupyConformanceError``)."""
    on = _conformance.configure(enabled)
    if on:
        cupy_ndarray = _conformance.cupy_module().ndarray
        _cupy_properties.clear()
        _cupy_properties.update(n for n in dir(cupy_ndarray) if not n.startswith("_") and
                                not _conformance.is_ndarray_method(getattr(cupy_ndarray, n)))
        ndarray.__getattribute__ = _checked_getattribute
    elif "__getattribute__" in ndarray.__dict__:
        del ndarray.__getattribute__
    return on


def cupy_check_active():
    return _conformance.active()


set_cupy_check(None)
