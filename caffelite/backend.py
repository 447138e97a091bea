"""Array-module selection (Chainer's ``xp`` style) and the global mode/RNG state.

Layers write their maths once against ``xp = get_array_module(array)``; numpy on
the CPU, CuPy when a later GPU backend hands them device arrays.
"""
import numpy as np

TRAIN = 0
TEST = 1

_state = {"mode": "cpu", "device": 0, "seed": None, "rng": np.random.default_rng()}


def get_array_module(*arrays):
    try:
        import cupy
    except ImportError:
        return np
    return cupy.get_array_module(*arrays)


def set_mode_cpu():
    _state["mode"] = "cpu"


def set_mode_gpu():
    raise RuntimeError(
        "GPU mode is not available yet in this caffelite build; run on the CPU (set_mode_cpu)")


def set_device(device_id):
    _state["device"] = int(device_id)


def mode():
    return _state["mode"]


def set_random_seed(seed):
    """Seed every random draw caffelite makes (fillers, dropout, shuffles)."""
    _state["seed"] = int(seed)
    _state["rng"] = np.random.default_rng(int(seed))


def rng():
    """The global numpy Generator; reseeded by set_random_seed."""
    return _state["rng"]
