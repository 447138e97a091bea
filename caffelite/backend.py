"""Array-module selection (Chainer's ``xp`` style) and the global mode/RNG state.

Layers write their maths once against ``xp = get_array_module(array)``: numpy on the
CPU, the device module (CuPy, or the numpy-backed emulator of ``kernels.emulator``) when
the Net hands them device arrays.

Blobs hold a host and a device mirror (``blob.SyncedMemory``). Which one ``blob.data``
returns depends on *who* asks: Python code (pycaffe scripts, host-only layers) always
gets the host array; the Net and the solver switch the calling thread to device access
(``device_access()``) while a device layer or a solver update runs in GPU mode.
"""
import os
import sys
import threading

import numpy as np

from .caffe_rng import CaffeRNG

TRAIN = 0
TEST = 1

_state = {"mode": "cpu", "device": 0, "xp": None, "tf32": False, "capturing": False,
          "host_reads": None, "graph_buffers": None, "mode_changes": 0,
          "seed_changes": 0, "entropy_seed": None}


class _Seeding:
    """A Caffe generator, the seed it was made from (None: entropy) and its number among
    all seedings (device generators start again when it changes)."""
    __slots__ = ("seed", "generator", "number")

    def __init__(self, seed, number):
        self.seed, self.number = seed, number
        self.generator = CaffeRNG(None if seed is None else seed & 0xFFFFFFFF)


class _ThreadSeeding(threading.local):
    seeding = None


# The process's generator, which set_random_seed in the main thread seeds and every
# thread draws from, as before threads; a thread that calls set_random_seed itself gets
# a generator of its own (Caffe's Caffe::Get() is per thread), so it neither reseeds
# the others nor is reseeded by them. Draws from a shared one are whole (its lock).
_seedings = {"process": _Seeding(None, 0)}
_thread_seeding = _ThreadSeeding()


def _seeding():
    return _thread_seeding.seeding or _seedings["process"]


class _Access(threading.local):
    device = False      # class default: every new thread starts with host access


_access = _Access()


def get_array_module(*arrays):
    """numpy, or the device array module if any of ``arrays`` lives on the device."""
    xp = _state["xp"] or sys.modules.get("cupy")
    if xp is not None:
        device_array = xp.ndarray
        for a in arrays:
            if isinstance(a, device_array):
                return xp
    return np


_OFF = ("0", "false", "off", "no")


def env_flag(name, default):
    """A switch from the environment: unset or empty gives ``default``; 0, false, off
    or no (any case) turn it off; anything else on."""
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value not in _OFF


def set_mode_cpu():
    _state["mode"] = "cpu"
    _state["mode_changes"] += 1


def set_mode_gpu(emulate=None):
    """Run layers and solvers on the GPU (device ``set_device``'s id, default 0).

    ``emulate=True`` (or the environment variable ``CAFFELITE_GPU_EMULATOR=1``) runs
    the whole GPU code path on the CPU instead: device arrays are numpy memory that
    refuses to mix with host arrays, and kernels run host-compiled from the same ``.cu``
    sources. It is how the GPU path is tested where there is no GPU.
    """
    from . import kernels
    if emulate is None:
        emulate = env_flag("CAFFELITE_GPU_EMULATOR", False)
    if emulate:
        from .kernels import emulator
        xp = emulator
    else:
        xp = kernels.require_cupy()
        count = xp.cuda.runtime.getDeviceCount()
        if not 0 <= _state["device"] < count:
            raise kernels.GPUUnavailableError(
                f"GPU {_state['device']} does not exist: CUDA reports {count} device(s)")
        xp.cuda.Device(_state["device"]).use()
        _apply_tf32(xp)
    _state["xp"] = xp
    _state["mode"] = "gpu"
    _state["mode_changes"] += 1


def set_device(device_id):
    _state["device"] = int(device_id)
    _state["mode_changes"] += 1
    if _state["mode"] == "gpu" and _state["xp"] is not None and \
            _state["xp"].__name__ == "cupy":
        _state["xp"].cuda.Device(int(device_id)).use()


def mode():
    return _state["mode"]


def is_gpu():
    return _state["mode"] == "gpu"


def device_module():
    """The device array module of GPU mode (CuPy or the emulator); an error in CPU mode."""
    if _state["mode"] != "gpu" or _state["xp"] is None:
        raise RuntimeError("no device array module: caffelite is in CPU mode "
                           "(call set_mode_gpu first)")
    return _state["xp"]


def synchronize():
    """Wait for the device's queued work (for timing); nothing to wait for on the CPU."""
    xp = _state["xp"]
    if _state["mode"] == "gpu" and xp is not None:
        xp.cuda.Device().synchronize()


def use_gpu(device_id, tf32=False, graphs=None, autotune=None):
    """GPU mode on ``device_id`` with TF32 GEMMs or not, CUDA graphs and convolution
    autotuning on or off (None: caffelite's default), as ``--gpu``, ``--tf32``,
    ``--cuda-graphs`` and ``--conv-autotune`` ask. Raises ``GPUUnavailableError`` where
    no GPU can be used."""
    set_device(device_id)
    set_tf32(tf32)
    set_mode_gpu()
    if graphs is not None:
        from . import cuda_graphs
        cuda_graphs.set_enabled(graphs)
    if autotune is not None:
        from .layers import conv_autotune
        conv_autotune.set_enabled(autotune)


def set_tf32(enabled):
    """Opt in (True) to TF32 tensor-core GEMMs on the GPU; FP32 (False) is the default
    and gives Caffe's float results. Has no effect on the CPU or the emulator."""
    _state["tf32"] = bool(enabled)
    xp = _state["xp"]
    if xp is not None and xp.__name__ == "cupy":
        _apply_tf32(xp)


def tf32_enabled():
    return _state["tf32"]


def capturing():
    """True while a pass is being recorded into a CUDA graph (``caffelite.cuda_graphs``):
    layers then leave out host reads that only serve error messages."""
    return _state["capturing"]


def graph_buffer(array):
    """Device scratch memory shared outside the layers (the column workspace) that work
    being recorded into a CUDA graph uses: the graph keeps it alive, so a later, larger
    workspace cannot free memory a launch writes to."""
    kept = _state["graph_buffers"]
    if kept is not None:
        kept.append(array)


def _apply_tf32(cupy):
    # CuPy reads CUPY_TF32 once, when a float32 GEMM first asks for its compute type;
    # set_compute_type changes it at any time. Set both so the flag holds either way.
    os.environ["CUPY_TF32"] = "1" if _state["tf32"] else "0"
    try:
        from cupy._core import _routines_linalg as linalg
        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if _state["tf32"]
                                else linalg.COMPUTE_TYPE_DEFAULT)
    except Exception as e:      # an old CuPy, or a GPU without tensor cores
        from .log import logger
        logger.warning("could not set CuPy's float32 GEMM compute type (%s); CUPY_TF32=%s "
                       "applies", e, os.environ["CUPY_TF32"])


class device_access:       # noqa: N801  (used like a function: ``with device_access():``)
    """Within the block, blobs hand this thread their device arrays (if ``enabled``).
    A class rather than a generator context manager: the Net enters one per layer call,
    and this costs a fraction of a generator's set-up."""
    __slots__ = ("enabled", "previous")

    def __init__(self, enabled=True):
        self.enabled = bool(enabled)

    def __enter__(self):
        self.previous = _access.device
        _access.device = self.enabled

    def __exit__(self, *exc):
        _access.device = self.previous
        return False


def to_host(array, out=None):
    """A numpy array with the values of ``array`` (host or device); with ``out`` (a
    C-contiguous numpy array of the same shape) copied straight into it."""
    xp = get_array_module(array)
    if xp is np:
        if out is None:
            return np.asarray(array)
        out[...] = array
        return out
    return xp.asnumpy(array, out=out)


def to_device(array, xp=None):
    """``array`` on the device of GPU mode (a copy if it is a host array)."""
    xp = xp or device_module()
    return xp.asarray(array)


def set_random_seed(seed):
    """Caffe::set_random_seed: reseed the mt19937 (fillers, dropout, the data layers'
    seeds) with the low 32 bits of ``seed``, as Caffe's unsigned int does: the process's
    generator from the main thread, a generator of the calling thread's own from any
    other thread."""
    _state["seed_changes"] += 1
    seeding = _Seeding(int(seed), _state["seed_changes"])
    if threading.current_thread() is threading.main_thread():
        _seedings["process"] = seeding
    else:
        _thread_seeding.seeding = seeding
    xp = _state["xp"]
    if xp is not None:
        xp.random.seed(int(seed))


def device_seed():
    """(64-bit key, seeding number) for the device's counter-based generators
    (Dropout): the seed of the set_random_seed that made this thread's generator, or,
    before any, one drawn from the OS per process (Caffe then seeds from entropy too)."""
    seeding = _seeding()
    seed = seeding.seed
    if seed is None:
        seed = _state["entropy_seed"]
        if seed is None:
            seed = _state["entropy_seed"] = int.from_bytes(os.urandom(8), "little")
    return seed & 0xFFFFFFFFFFFFFFFF, seeding.number


def rng():
    """The Caffe generator this thread draws from (caffelite.caffe_rng.CaffeRNG): its
    own after it called set_random_seed, else the process's."""
    return _seeding().generator


def seeded():
    """Whether set_random_seed (a solver's random_seed) fixed the generator this thread
    draws from: without it, as in Caffe, its stream is different every run."""
    return _seeding().seed is not None


def seeding_number():
    """Changes whenever the generator this thread draws from is seeded again."""
    return _seeding().number
