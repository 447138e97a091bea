"""``type: "Python"``: layers written in Python against pycaffe's ``caffe.Layer``.

As in Caffe, ``python_param { module: "m" layer: "Cls" param_str: "..." }`` imports
``m``, instantiates ``m.Cls(layer_param)`` and the net calls its ``setup``, ``reshape``,
``forward`` and ``backward`` over the bottom/top blobs.  The object in ``net.layers`` is
the user's own instance (so ``net.layers[0].my_attribute`` works as in pycaffe), with
``self.param_str``, ``self.phase`` and ``self.blobs`` (``self.blobs.add_blob(*shape)``
in ``setup`` adds a parameter blob that the net trains, saves and loads).

Modules are looked up on ``sys.path`` first (Caffe's rule), then in the folder of the
prototxt being loaded (appended to ``sys.path`` once, with a log line).  A module that
does ``import caffe`` gets caffelite through ``caffelite.alias`` when no real Caffe is
installed; where a real Caffe is importable it is left alone.
"""
import contextlib
import contextvars
import importlib
import os
import sys

import numpy as np

from ..blob import Blob
from ..layer import TEST, Layer, LayerError, register
from ..log import logger

_search_dirs = contextvars.ContextVar("caffelite_python_layer_dirs", default=())


@contextlib.contextmanager
def module_search_dir(directory):
    """While building a net from a prototxt in ``directory``, also look there for
    Python layer modules."""
    if not directory:
        yield
        return
    token = _search_dirs.set(_search_dirs.get() + (directory,))
    try:
        yield
    finally:
        _search_dirs.reset(token)


class BlobVec(list):
    """A layer's parameter blobs with pycaffe's ``add_blob(*shape)``."""

    def __init__(self, layer, blobs=()):
        super().__init__(blobs)
        self._layer = layer

    def add_blob(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        blob = Blob(shape, self._layer.dtype)
        self.append(blob)
        self._layer.param_propagate_down.append(True)
        return blob


def _missing(error, name):
    """Is ``error`` (ModuleNotFoundError) about ``name`` itself or one of its parents?"""
    missing = getattr(error, "name", None) or ""
    return bool(missing) and (name == missing or name.startswith(missing + "."))


def _wants_caffe(error):
    missing = getattr(error, "name", None) or ""
    return missing == "caffe" or missing.startswith("caffe.")


def _import(module_name, layer_name):
    """Import ``module_name`` as Caffe would, with the prototxt folder as a fallback and
    caffelite standing in for a missing ``caffe``."""
    tried_dirs, aliased = False, False
    while True:
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if _wants_caffe(e) and not aliased:
                aliased = True
                from .. import alias
                if alias.provide_for_python_layer(module_name):
                    continue
                raise
            if _missing(e, module_name) and not tried_dirs:
                tried_dirs = True
                if _add_prototxt_dirs(module_name):
                    continue
            if _missing(e, module_name):
                dirs = [d for d in _search_dirs.get()]
                where = "sys.path" + (f" or next to the prototxt ({', '.join(dirs)})"
                                      if dirs else "")
                raise LayerError(
                    f"Python layer '{layer_name}': cannot import module '{module_name}': "
                    f"not found on {where}. Put its folder on PYTHONPATH") from None
            raise


def _add_prototxt_dirs(module_name):
    top = module_name.split(".")[0]
    added = False
    for directory in _search_dirs.get():
        has_module = os.path.isfile(os.path.join(directory, top + ".py")) or \
            os.path.isfile(os.path.join(directory, top, "__init__.py"))
        if has_module and directory not in sys.path:
            logger.info("Python layer module '%s' is not on sys.path; using the one next "
                        "to the prototxt (appending %s to sys.path)", module_name, directory)
            sys.path.append(directory)
            importlib.invalidate_caches()
            added = True
    return added


def _prepare(layer, layer_param, phase, dtype):
    """Give the user's instance the state the net and pycaffe expect, whatever its own
    ``__init__`` did."""
    # pycaffe hands a Python layer numpy views of host memory, in GPU mode too, and
    # whatever it writes (bottoms included) is seen by the layers after it.
    for attr, value in (("layer_param", layer_param), ("name", layer_param.name),
                        ("type", layer_param.type), ("phase", int(phase)),
                        ("dtype", np.dtype(dtype)),
                        ("param_str", layer_param.python_param.param_str),
                        ("runs_on_device", False), ("graph_safe", False),
                        ("python_layer", True)):
        try:
            setattr(layer, attr, value)
        except AttributeError:      # a read-only property the user defined
            pass
    if type(layer).backward is Layer.backward:
        layer.backward = _missing_backward(layer)
    blobs = getattr(layer, "blobs", None) or []
    if not isinstance(blobs, BlobVec):
        layer.blobs = BlobVec(layer, blobs)
    propagate = list(getattr(layer, "param_propagate_down", None) or [])
    layer.param_propagate_down = (propagate + [True] * len(layer.blobs))[:len(layer.blobs)]
    return layer


class MissingBackward(LayerError, AttributeError):
    """pycaffe's AttributeError for a missing backward (a LayerError too, so the
    command line reports it in one line)."""


def _missing_backward(layer):
    """pycaffe calls ``self.backward`` whenever the net needs the layer's backward (any
    layer under force_backward): without one it raises AttributeError, where a silent
    no-op would train on zero gradients."""
    cls = type(layer)

    def backward(top, propagate_down, bottom):
        raise MissingBackward(
            f"Python layer '{layer.name}' ({cls.__module__}.{cls.__name__}) has no "
            f"backward(self, top, propagate_down, bottom), and the net needs its backward "
            f"(define one; `pass` for a layer without gradients)")
    return backward


def create_python_layer(layer_param, phase=TEST, dtype=np.float32):
    p = layer_param.python_param
    name = layer_param.name
    if not p.module or not p.layer:
        raise LayerError(f"layer '{name}' (Python): python_param needs both 'module' and "
                         f"'layer' (got module '{p.module}', layer '{p.layer}')")
    module = _import(p.module, name)
    cls = getattr(module, p.layer, None)
    if cls is None:
        raise LayerError(f"layer '{name}' (Python): module '{p.module}' "
                         f"({getattr(module, '__file__', '?')}) has no class '{p.layer}'")
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        hint = ""
        base = getattr(sys.modules.get("caffe"), "Layer", None)
        if base is not None and base is not Layer and isinstance(cls, type) and \
                issubclass(cls, base):
            hint = (f" It subclasses the Layer of another Caffe "
                    f"({getattr(sys.modules['caffe'], '__file__', '?')}), not caffelite's")
        raise LayerError(f"layer '{name}' (Python): '{p.module}.{p.layer}' must be a "
                         f"subclass of caffe.Layer (caffelite.Layer).{hint}")
    return _prepare(cls(layer_param), layer_param, phase, dtype)


@register("Python")
class PythonLayer(Layer):
    """Registry entry for "Python": building one returns the user's layer instance."""
    runs_on_device = False

    def __new__(cls, layer_param, phase=TEST, dtype=np.float32):
        return create_python_layer(layer_param, phase, dtype)
