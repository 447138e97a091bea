"""The optional ``caffe`` alias for caffelite (distribution ``caffelite-caffe-alias``).

``import caffe`` gives caffelite — unless a real Caffe is importable too, in which case
this package steps aside and imports that one with a warning (set
``CAFFELITE_CAFFE_ALIAS=force`` to pick caffelite anyway).  See ``caffelite.alias``.
"""
import os as _os

__caffelite_alias__ = True

from caffelite import alias as _alias  # noqa: E402

_alias.activate_from_package(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
