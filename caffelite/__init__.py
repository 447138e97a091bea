"""caffelite: run Caffe (DeepLab fork) models and experiments in Python.

pycaffe-compatible: ``import caffelite as caffe`` and existing scripts keep working::

    net = caffe.Net("deploy.prototxt", caffe.TEST, weights="model.caffemodel")
    out = net.forward(data=image_batch)
"""
from .backend import (TRAIN, TEST, set_mode_cpu, set_mode_gpu, set_device,  # noqa: F401
                      set_random_seed)
from .blob import Blob  # noqa: F401
from .layer import Layer, layer_type_list  # noqa: F401
from .net import Net  # noqa: F401
from .solver import (Solver, SGDSolver, NesterovSolver, AdaGradSolver,  # noqa: F401
                     RMSPropSolver, AdaDeltaSolver, AdamSolver, get_solver)
from . import io  # noqa: F401

__version__ = "0.1.0"
