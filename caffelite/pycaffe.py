"""pycaffe's ``caffe.pycaffe`` module, for scripts that import from it
(``from caffe.pycaffe import Net``): the Net with its Python wrappers and the solvers,
as that module exposes them."""
from collections import OrderedDict

import numpy as np

from . import Timer
from .net import Net
from .solver import (SGDSolver, NesterovSolver, AdaGradSolver,
                     RMSPropSolver, AdaDeltaSolver, AdamSolver)

__all__ = ["OrderedDict", "np", "Timer", "Net", "SGDSolver", "NesterovSolver",
           "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver", "AdamSolver"]
