"""pycaffe's compiled ``caffe._caffe`` module, for scripts that import from it
(``from caffe._caffe import set_mode_gpu``): the names its bindings define."""
from . import (TRAIN, TEST, Blob, Layer, Net, Solver, SGDSolver,
               NesterovSolver, AdaGradSolver, RMSPropSolver, AdaDeltaSolver, AdamSolver,
               Timer, get_solver, has_nccl, init_log, layer_type_list, log,
               set_device, set_mode_cpu, set_mode_gpu, set_multiprocess,
               set_random_seed, set_solver_count, set_solver_rank, solver_count,
               solver_rank)

__all__ = ["TRAIN", "TEST", "Blob", "Layer", "Net", "Solver", "SGDSolver",
           "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
           "AdamSolver", "Timer", "get_solver", "has_nccl", "init_log",
           "layer_type_list", "log", "set_device", "set_mode_cpu", "set_mode_gpu",
           "set_multiprocess", "set_random_seed", "set_solver_count",
           "set_solver_rank", "solver_count", "solver_rank"]
