"""Would real CuPy accept this call? The GPU emulator's conformance mode asks here.

The emulator (``kernels.emulator``) is numpy underneath, so on its own it accepts every
numpy function, method and keyword, also those CuPy lacks (``xp.sum(..., where=)``,
``a.itemset``, ``np.maximum.reduce`` on device arrays ...); such code passes in CI and
fails on the first real GPU run. In conformance mode (``emulator.set_cupy_check``, or
the environment variable ``CAFFELITE_EMULATOR_CUPY_CHECK=1``) the emulator checks
each call against the installed ``cupy`` package, which needs no GPU to be imported:

* the name must exist in CuPy (``cupy.<name>``, ``cupy.random.<name>``, a
  ``cupy.ndarray`` member, a method CuPy's ufunc implements);
* the arguments must bind to CuPy's signature (``inspect.signature``, or the
  signature line Cython writes at the top of a docstring; without either only the
  name is checked); CuPy's ufuncs take only ``out``, ``dtype`` and ``casting``;
* numpy functions and ufuncs called on device arrays are resolved the way CuPy's
  ``__array_function__`` / ``__array_ufunc__`` resolve them (``numpy.linalg.norm`` →
  ``cupy.linalg.norm``).

Without an importable ``cupy`` the mode is off, silently.
"""
import inspect
import re
import sys

ENVIRONMENT_VARIABLE = "CAFFELITE_EMULATOR_CUPY_CHECK"

# What CuPy's ufunc.__call__ accepts besides the operands (found by calling CuPy 14
# with each keyword: every other one raises "Wrong arguments").
UFUNC_CALL_KEYWORDS = frozenset({"out", "dtype", "casting"})

# Parameters CuPy declares for numpy compatibility but refuses at any value other than
# its default (``zeros_like(subok=False)``: "subok is not supported yet").
DEFAULT_ONLY_PARAMETERS = frozenset({"subok"})

_cupy = [None]          # the cupy module while the mode is on, else None


class CupyConformanceError(TypeError):
    """A call the emulator would run but real CuPy would reject."""


class CupyMissingError(CupyConformanceError, AttributeError):
    """A name CuPy lacks (also an AttributeError, as on CuPy: ``hasattr`` is False)."""


def configure(enabled=None):
    """Turn the mode on or off (``None``: as the environment variable says); it stays
    off where ``cupy`` cannot be imported. Returns whether it is on."""
    if enabled is None:
        from ..backend import env_flag
        enabled = env_flag(ENVIRONMENT_VARIABLE, False)
    _cupy[0] = _import_cupy() if enabled else None
    return _cupy[0] is not None


def active():
    return _cupy[0] is not None


def cupy_module():
    """The cupy module the checks use (None while the mode is off)."""
    return _cupy[0]


def _import_cupy():
    try:
        import cupy
    except Exception:       # not installed, or a broken install: no check
        return None
    return cupy


# --- who is calling ---------------------------------------------------------------------
_INTERNAL_PACKAGES = frozenset({"numpy", "_pytest", "pytest", "pluggy"})
_OWN_MODULES = frozenset({__name__, "caffelite.kernels.emulator"})


def called_by_user(depth):
    """Whether the frame ``depth`` levels above the caller is code to check: not the
    emulator itself, numpy's internals (which call methods on the emulator's arrays),
    the standard library or pytest."""
    module = sys._getframe(depth + 1).f_globals.get("__name__", "")
    if module in _OWN_MODULES:
        return False
    package = module.partition(".")[0]
    return package not in _INTERNAL_PACKAGES and package not in sys.stdlib_module_names


# --- names ------------------------------------------------------------------------------
def cupy_attribute(namespace, name):
    """``cupy.<namespace>.<name>`` (namespace "" for cupy itself), or CupyMissingError."""
    target = _cupy[0]
    label = "cupy"
    for part in (namespace.split(".") if namespace else []) + [name]:
        target = getattr(target, part, None)
        label += "." + part
        if target is None:
            raise CupyMissingError(f"CuPy has no {label} (numpy has it, so only the "
                                   f"emulator accepts it)")
    return target


def ndarray_member(name):
    """``cupy.ndarray.<name>``, or CupyMissingError."""
    member = getattr(_cupy[0].ndarray, name, None)
    if member is None:
        raise CupyMissingError(f"CuPy's ndarray has no attribute '{name}' (numpy's "
                               f"ndarray has, so only the emulator accepts it)")
    return member


def is_ndarray_method(member):
    return callable(member) and not isinstance(member, type)


# --- signatures -------------------------------------------------------------------------
_DOC_SIGNATURE = re.compile(r"^[\w.]+\((.*)\)\s*(->.*)?$")
_signatures = {}


def signature(obj):
    """CuPy ``obj``'s signature without ``self`` (an unbound ndarray method's), or None
    where none can be read."""
    key = id(obj)
    if key not in _signatures:
        sig = _read_signature(obj)
        if sig is not None:
            sig = sig.replace(parameters=[p for p in sig.parameters.values()
                                          if p.name != "self"])
        _signatures[key] = (obj, sig)       # obj kept alive: its id stays its own
    return _signatures[key][1]


def _read_signature(obj):
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        pass
    doc = (getattr(obj, "__doc__", None) or "").strip()
    match = _DOC_SIGNATURE.match(doc.split("\n", 1)[0].replace("\\*", "*"))
    if match is None:
        return None
    try:
        return inspect.Signature(_doc_parameters(match.group(1)))
    except ValueError:      # a line that does not read as a signature
        return None


def _doc_parameters(text):
    """inspect.Parameters of a Cython signature line ("int axis=-1", "/", "*", ...)."""
    params = []
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    for part in _top_level_split(text):
        if part == "/":
            params = [p.replace(kind=inspect.Parameter.POSITIONAL_ONLY) for p in params]
        elif part == "*":
            kind = inspect.Parameter.KEYWORD_ONLY
        elif part.startswith("**"):
            params.append(inspect.Parameter(part[2:].split(":")[0].strip(),
                                            inspect.Parameter.VAR_KEYWORD))
        elif part.startswith("*"):
            params.append(inspect.Parameter(part[1:].split(":")[0].strip(),
                                            inspect.Parameter.VAR_POSITIONAL))
            kind = inspect.Parameter.KEYWORD_ONLY
        else:
            head, eq, _ = part.partition("=")
            name = head.split(":")[0].split()[-1]       # drop a Cython type / annotation
            default = None if eq else inspect.Parameter.empty
            params.append(inspect.Parameter(name, kind, default=default))
    return params


def _top_level_split(text):
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


# --- calls ------------------------------------------------------------------------------
def check_call(label, cupy_callable, args, kwargs):
    """CupyConformanceError unless ``cupy_callable(*args, **kwargs)`` binds."""
    sig = signature(cupy_callable)
    if sig is None:
        return
    params = sig.parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        accepted = {p.name for p in params
                    if p.kind not in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL)}
        for key in kwargs:
            if key not in accepted:
                raise CupyConformanceError(f"CuPy's {label} does not accept keyword '{key}'")
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise CupyConformanceError(f"CuPy's {label} does not accept these arguments: "
                                   f"{e} (signature {label}{sig})") from None
    for name in DEFAULT_ONLY_PARAMETERS.intersection(bound.arguments):
        value, default = bound.arguments[name], sig.parameters[name].default
        if value is not None and value is not default and value != default:
            raise CupyConformanceError(f"CuPy's {label} takes {name} only at its default "
                                       f"(it raises for {name}={value!r})")


def check_ufunc_call(label, cupy_ufunc, args, kwargs):
    """A call of CuPy ufunc ``cupy_ufunc`` (or of a CuPy function standing for a numpy
    ufunc, e.g. ``matmul``)."""
    if not isinstance(cupy_ufunc, _cupy[0].ufunc):
        check_call(label, cupy_ufunc, args, kwargs)
        return
    for key in kwargs:
        if key not in UFUNC_CALL_KEYWORDS:
            raise CupyConformanceError(
                f"CuPy's {label} does not accept keyword '{key}' (CuPy's ufuncs take "
                f"only {', '.join(sorted(UFUNC_CALL_KEYWORDS))})")
    if len(args) > cupy_ufunc.nargs:
        raise CupyConformanceError(f"CuPy's {label} takes at most {cupy_ufunc.nargs} "
                                   f"positional arguments, got {len(args)}")


def ufunc_method(label, cupy_ufunc, method):
    """CuPy ufunc ``cupy_ufunc``'s ``method`` (reduce, at ...), or CupyMissingError where
    CuPy lacks it or raises NotImplementedError for this ufunc."""
    bound = getattr(cupy_ufunc, method, None)
    if bound is None:
        raise CupyMissingError(f"CuPy's {label} has no method '{method}'")
    if isinstance(cupy_ufunc, _cupy[0].ufunc) and not _method_implemented(cupy_ufunc, method):
        raise CupyMissingError(f"CuPy's {label}.{method} is not implemented (CuPy raises "
                               f"NotImplementedError for it)")
    return bound


def check_ufunc_method_call(label, cupy_ufunc, method, args, kwargs):
    ufunc_method(label, cupy_ufunc, method)
    unbound = getattr(type(cupy_ufunc), method)     # one object (signature cache) per method
    if method == "outer":       # outer(A, B, **kwargs): the keywords go to __call__
        if len(args) != 2:
            raise CupyConformanceError(f"CuPy's {label}.outer takes 2 operands, "
                                       f"got {len(args)}")
        check_ufunc_call(f"{label}.outer", cupy_ufunc, (), kwargs)
    else:
        check_call(f"{label}.{method}", unbound, args, kwargs)


class _Accepted(Exception):
    pass


class _Probe:
    """Stands for an array: CuPy's ufunc methods call a method on it (``sum``,
    ``_scatter_op`` ...) where they are implemented, raising _Accepted, and raise
    NotImplementedError before touching it where they are not."""

    def __getattr__(self, name):
        def accepted(*args, **kwargs):
            raise _Accepted(name)
        return accepted

    def __getitem__(self, index):
        raise _Accepted("__getitem__")


_implemented = {}


def _method_implemented(cupy_ufunc, method):
    key = (cupy_ufunc.__name__, method)
    if key not in _implemented:
        operands = {"reduceat": 2, "at": 3, "outer": 2}.get(method, 1)
        try:
            getattr(cupy_ufunc, method)(*[_Probe() for _ in range(operands)])
            _implemented[key] = True
        except NotImplementedError:
            _implemented[key] = False
        except Exception:       # got past the check (or failed in a way we cannot read)
            _implemented[key] = True
    return _implemented[key]


def check_array_function(func, args, kwargs):
    """A numpy function called on device arrays: CuPy's ``__array_function__`` finds
    ``cupy.<func's numpy submodule>.<name>``, gives NotImplemented (numpy raises
    TypeError) without one, then calls it with the same arguments."""
    module = getattr(func, "__module__", None) or "numpy"
    name = getattr(func, "__name__", repr(func))
    namespace = ".".join(module.split(".")[1:])
    try:
        cupy_func = cupy_attribute(namespace, name)
    except CupyMissingError as e:
        raise CupyConformanceError(f"{module}.{name} on device arrays fails on a GPU: "
                                   f"{e}") from None
    if cupy_func is func:
        raise CupyConformanceError(f"{module}.{name} on device arrays fails on a GPU: "
                                   f"CuPy exports numpy's own {name}, so its "
                                   f"__array_function__ gives NotImplemented")
    check_call(f"cupy{module[len('numpy'):]}.{name}", cupy_func, args, kwargs)


def check_array_ufunc(ufunc, method, inputs, kwargs):
    """A numpy ufunc (or ufunc method) called on device arrays: CuPy's
    ``__array_ufunc__`` calls CuPy's ufunc of the same name, same method."""
    name = ufunc.__name__
    cupy_ufunc = cupy_attribute("", name)
    if method == "__call__":
        check_ufunc_call(f"cupy.{name}", cupy_ufunc, inputs, kwargs)
    else:
        check_ufunc_method_call(f"cupy.{name}", cupy_ufunc, method, inputs, kwargs)
