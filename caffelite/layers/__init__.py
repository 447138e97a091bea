"""Layer implementations, one small module per family.

Importing this package imports every module in it, and each module registers its
classes by Caffe type name (``caffelite.layer.register``).
"""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")


def __getattr__(name):
    """``from caffe import layers as L``: pycaffe's ``caffe.layers`` is NetSpec's layer
    namespace, so ``L.Convolution(...)`` (a capitalised name) builds a NetSpec top."""
    if name[:1].isupper():
        from ..net_spec import layers
        return getattr(layers, name)
    raise AttributeError(f"module '{__name__}' has no attribute '{name}'")
