"""caffelite: run Caffe (DeepLab fork) models and experiments in Python.

pycaffe-compatible: ``import caffelite as caffe`` and existing scripts keep working::

    net = caffe.Net("deploy.prototxt", caffe.TEST, weights="model.caffemodel")
    out = net.forward(data=image_batch)

(``caffelite.install_alias()``, or the optional ``caffelite-caffe-alias`` distribution,
lets an unchanged ``import caffe`` find caffelite where no real Caffe is installed; see
``caffelite.alias``.)
"""
import time as _time

from . import _blas_env  # noqa: F401  (first: it must run before numpy is imported)
from .backend import (TRAIN, TEST, set_mode_cpu, set_mode_gpu, set_device,  # noqa: F401
                      set_random_seed)
from .blob import Blob  # noqa: F401
from .cuda_graphs import set_enabled as set_cuda_graphs  # noqa: F401
from .layers.conv_autotune import set_enabled as set_conv_autotune  # noqa: F401
from .layer import Layer, layer_type_list as _registered_types
from .net import Net  # noqa: F401
from .solver import (Solver, SGDSolver, NesterovSolver, AdaGradSolver,  # noqa: F401
                     RMSPropSolver, AdaDeltaSolver, AdamSolver, get_solver)
from . import io  # noqa: F401
from .classifier import Classifier  # noqa: F401
from .detector import Detector  # noqa: F401
from . import proto  # noqa: F401
from .net_spec import params, NetSpec, to_proto  # noqa: F401
# ``caffe.layers`` (NetSpec's ``L``) is the package of layer implementations itself:
# net_spec gives it the capitalised NetSpec functions (L.Convolution …).
from . import layers  # noqa: F401,E402
from .alias import install_alias  # noqa: F401
from .log import logger as _logger

__version__ = "0.1.0"

__all__ = ["TRAIN", "TEST", "set_mode_cpu", "set_mode_gpu", "set_device", "set_random_seed",
           "set_cuda_graphs", "set_conv_autotune",
           "Blob", "Layer", "layer_type_list", "Net", "Solver", "SGDSolver",
           "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
           "AdamSolver", "get_solver", "Classifier", "Detector", "io", "proto", "layers",
           "params", "NetSpec",
           "to_proto", "Timer", "install_alias", "init_log", "log", "solver_count",
           "set_solver_count", "solver_rank", "set_solver_rank", "set_multiprocess",
           "has_nccl"]


def layer_type_list():
    """The registered layer type names, sorted (Caffe's LayerRegistry::LayerTypeList):
    V2 names only, LRN and BNLL included."""
    from . import layers as _implementations  # noqa: F401  (registers every type)
    return _registered_types()


class Timer:
    """pycaffe's Timer: ``start()``, ``stop()``, ``ms`` (milliseconds between them;
    reading ``ms`` stops a running timer, as Caffe's Timer::MilliSeconds does)."""

    def __init__(self):
        self._start = self._stop = None

    def start(self):
        self._start, self._stop = _time.perf_counter(), None

    def stop(self):
        if self._start is not None and self._stop is None:
            self._stop = _time.perf_counter()

    @property
    def running(self):
        return self._start is not None and self._stop is None

    @property
    def ms(self):
        if self._start is None:
            _logger.warning("Timer has never been run before reading time.")
            return 0.0
        self.stop()
        return (self._stop - self._start) * 1000.0

    @property
    def seconds(self):
        return self.ms / 1000.0


# pycaffe's process-level helpers (single-process caffelite: one solver, rank 0).
def init_log(level=0, stderr=True):
    """pycaffe's ``caffe.init_log([level[, stderr]])``: Caffe's whole log (glog lines from
    severity ``level`` up, 0 INFO .. 3 FATAL; GLOG_minloglevel may raise it) on stderr,
    and in glog's files where GLOG_log_dir asks for them. Without it a script sees
    caffelite's warnings and errors only. Unlike pycaffe, ``stderr=False`` does not
    move the lines into files: they always go to stderr."""
    from .log import glog_level, setup_logging
    setup_logging(level=glog_level(level))


def log(message):
    _logger.info("%s", message)


def solver_count():
    return 1


def set_solver_count(count):
    if int(count) != 1:
        raise RuntimeError("caffelite trains with one solver (no multi-GPU/NCCL)")


def solver_rank():
    return 0


def set_solver_rank(rank):
    if int(rank) != 0:
        raise RuntimeError("caffelite trains with one solver (rank 0 only)")


def set_multiprocess(value):
    """Multi-process training is not supported; kept for pycaffe scripts."""


def has_nccl():
    return False


# pycaffe's __init__ imports these submodules (``from .pycaffe import Net ...``,
# ``from ._caffe import ...``), so scripts reach them as attributes without importing
# them: ``caffe.pycaffe.Net``, ``caffe._caffe.Layer``. Last: both import names above.
from . import pycaffe, _caffe  # noqa: F401,E402
