"""Layer implementations, one small module per family.

Importing this package imports every module in it, and each module registers its
classes by Caffe type name (``caffelite.layer.register``).
"""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
