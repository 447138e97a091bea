"""``import caffe`` resolving to caffelite — only where no real Caffe would be hidden.

Three ways in, all through this module:

* ``caffelite.install_alias()`` in a script: makes ``import caffe`` (and ``caffe.io``,
  ``caffe.proto.caffe_pb2``, ``caffe.net_spec``, ``caffe.coord_map``, ``caffe.draw`` …)
  give caffelite's modules for the rest of the process.  It refuses (RuntimeError)
  when a real Caffe is importable, unless called with ``force=True``.
* the optional ``caffelite-caffe-alias`` distribution (``compat/caffe_alias``), whose
  ``caffe`` package hands over to caffelite when imported — or, when a real Caffe is
  also installed, steps aside and imports that one, with a warning
  (``CAFFELITE_CAFFE_ALIAS=force`` picks caffelite anyway, also with a warning).
* Python layers: a layer module that does ``import caffe`` while no Caffe is installed
  gets caffelite (logged), since there is nothing it could shadow.

Submodules are the very same module objects as ``caffelite.*`` (``caffe.io is
caffelite.io``), so message classes, layer registries and isinstance checks agree.
"""
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings

from .log import logger

ALIAS = "caffe"
TARGET = "caffelite"
MARKER = "__caffelite_alias__"
ENV = "CAFFELITE_CAFFE_ALIAS"


def _is_our_alias(origin):
    try:
        with open(origin, encoding="utf-8", errors="replace") as f:
            return MARKER in f.read(4096)
    except OSError:
        return False


def find_real_caffe(exclude_dirs=()):
    """Where a ``caffe`` module other than caffelite's alias would be imported from
    (its file), or None."""
    excluded = {os.path.realpath(d) for d in exclude_dirs}
    for entry in list(sys.path):
        directory = entry or os.getcwd()
        if not isinstance(directory, str) or os.path.realpath(directory) in excluded:
            continue
        try:
            spec = importlib.machinery.PathFinder.find_spec(ALIAS, [directory])
        except (ImportError, ValueError, OSError):
            continue
        origin = getattr(spec, "origin", None)
        if spec is None or origin in (None, "namespace"):     # a mere folder named caffe
            continue
        if _is_our_alias(origin):
            continue
        return origin
    return None


class _AliasLoader(importlib.abc.Loader):
    """Hands out an already-imported caffelite module under its ``caffe.*`` name."""

    def __init__(self, module):
        self.module = module
        self.spec = module.__spec__

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        module.__spec__ = self.spec      # the import system set it to the alias spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(ALIAS + ".") or not _active():
            return None
        target_name = TARGET + fullname[len(ALIAS):]
        try:
            module = importlib.import_module(target_name)
        except ModuleNotFoundError as e:
            if e.name == target_name:
                return None
            raise
        return importlib.util.spec_from_loader(
            fullname, _AliasLoader(module), is_package=hasattr(module, "__path__"))


_FINDER = _AliasFinder()


def _active():
    return sys.modules.get(ALIAS) is sys.modules.get(TARGET)


def _activate():
    target = importlib.import_module(TARGET)
    sys.modules[ALIAS] = target
    for name, module in list(sys.modules.items()):
        if name.startswith(TARGET + ".") and module is not None:
            sys.modules.setdefault(ALIAS + name[len(TARGET):], module)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    return target


def install_alias(force=False):
    """Make ``import caffe`` give caffelite in this process; returns caffelite.

    Refuses (RuntimeError) if another ``caffe`` is already imported, or if a real Caffe
    is importable and ``force`` is false (with ``force`` it warns and goes ahead).
    """
    current = sys.modules.get(ALIAS)
    if current is not None:
        if current is sys.modules.get(TARGET):
            return current
        raise RuntimeError(f"a module named 'caffe' is already imported (from "
                           f"{getattr(current, '__file__', '?')}); caffelite will not "
                           f"replace it. Use `import caffelite as caffe` instead")
    real = find_real_caffe()
    if real and not force:
        raise RuntimeError(f"a real Caffe is importable ({real}); install_alias() will not "
                           f"hide it. Use `import caffelite as caffe`, or "
                           f"install_alias(force=True) to use caffelite as `caffe` anyway")
    if real:
        warnings.warn(f"`import caffe` now gives caffelite, hiding the Caffe at {real}",
                      stacklevel=2)
    return _activate()


def provide_for_python_layer(module_name):
    """A Python layer module needs ``caffe``: provide caffelite if nothing is hidden."""
    if sys.modules.get(ALIAS) is not None or find_real_caffe():
        return False
    logger.info("Python layer module '%s' imports caffe and no Caffe is installed: "
                "caffelite stands in for it", module_name)
    _activate()
    return True


def activate_from_package(package_dir):
    """Called by the alias distribution's ``caffe/__init__.py`` (living in
    ``package_dir``): hand over to caffelite, or to a real Caffe found elsewhere."""
    real = find_real_caffe(exclude_dirs=[package_dir])
    choice = os.environ.get(ENV, "").strip().lower()
    if real and choice not in ("force", "caffelite", "1"):
        warnings.warn(f"the caffelite `caffe` alias is installed, but a real Caffe exists "
                      f"({real}): importing that one. Set {ENV}=force to use caffelite, or "
                      f"uninstall caffelite-caffe-alias", stacklevel=3)
        return _import_real(real)
    if real:
        warnings.warn(f"{ENV}={choice}: `import caffe` gives caffelite, hiding the Caffe at "
                      f"{real}", stacklevel=3)
    return _activate()


def _import_real(origin):
    directory = os.path.dirname(origin)
    if os.path.basename(origin).startswith("__init__."):
        directory = os.path.dirname(directory)
    spec = importlib.machinery.PathFinder.find_spec(ALIAS, [directory])
    module = importlib.util.module_from_spec(spec)
    sys.modules[ALIAS] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(ALIAS, None)
        raise
    return sys.modules[ALIAS]
