"""The fastest way to compute each device convolution product, chosen by timing them.

A device convolution's three products (forward, data gradient, weight gradient) each
have several paths: im2col columns and cuBLAS (``columns``), the blobs themselves for a
1x1 kernel (``blobs``), one GEMM per tap over the outputs it reaches (``taps``), and
under TF32 the tensor-core implicit GEMM with its default or its four-warp tile
(``implicit``, ``implicit-quad``). Fixed rules pick one by default
(``implicit_gemm.ENABLED`` and ``fills_gpu``, ``tap_gemm.MAX_REACH`` and
``MIN_SAVED_FLOPS``, ``im2col.PADDED_1X1_FLOP``), set from one GPU's measurements.

With autotuning on, the first eager pass that meets a product runs every path that
can compute it (the rules' thresholds do not apply; ``CAFFELITE_TAP_GEMM=0`` still
leaves out the taps): once to warm up, then REPEATS times timed with CUDA events, and
the path with the least median is used for that product for the rest of the process,
as cuDNN's benchmark mode does. A product is its kind, the shapes, geometry, groups,
dtype, TF32 flag, device and the settings that change a path (``ProductKey``). Each
timed run waits behind a short spin of the device (HOLD_CYCLES), so the events measure
device time without the host's launch overhead: inside a CUDA graph, the default, that
overhead is gone. The weight gradient adds into its diff, so the diff gets its earlier
sums back before each run and after the last. A path that fails (out of memory) is left
out. A recording into a CUDA graph takes the choices made and times nothing (a product
not timed before takes the fixed rules' path there). Two threads that meet a new
product at once may both time it (the last choice stays); choices are never dropped,
so a deploy script that feeds many input sizes times each size once.

The paths sum in different orders, so a tuned run's bits differ from the default's in
the last places and, where two paths time alike, may differ between processes. Off by
default: ``CAFFELITE_CONV_AUTOTUNE=1``, ``--conv-autotune`` or
``caffelite.set_conv_autotune(True)``.
"""
import collections
import statistics
import threading
import time

import numpy as np

from .. import backend, kernels
from ..log import logger

ENABLED = backend.env_flag("CAFFELITE_CONV_AUTOTUNE", False)
REPEATS = 3
# Before each timed run the device spins this many cycles (timing.cu; about 2 ms), so
# that the host queues the whole run behind it: the events then measure device time
# only, which is what a run costs inside a CUDA graph (the default), where the host's
# launch overhead is gone. Where the device reached the start event before the host had
# queued the run, the hold doubles for the next runs (up to MAX_HOLD_CYCLES).
HOLD_CYCLES = 4_000_000
MAX_HOLD_CYCLES = 64_000_000
# Tests: a function (kind, path name) -> seconds used instead of the device's clock.
TIMER = None

# What a choice is kept under: the product ("forward", "data" or "weight"), the shapes of
# its image (N, C, ...), weights and output grid, the geometry, groups, dtype, TF32 flag
# and device, and the settings that change what a path does (``settings``).
ProductKey = collections.namedtuple(
    "ProductKey", "kind image weight grid geom group dtype tf32 device settings")

_choices = {}           # ProductKey -> (chosen path, {path: median seconds})
_forgotten = [0]        # how many times the choices were dropped
_lock = threading.Lock()


def set_enabled(enabled):
    """Turn autotuning on (True) or off; choices already made are kept."""
    global ENABLED
    ENABLED = bool(enabled)


def enabled():
    return ENABLED


def active(xp):
    """Whether a product on ``xp``'s arrays takes a timed path: on, on the device."""
    return ENABLED and xp is not np


def choices():
    """{ProductKey: (chosen path, {path: median seconds})} of this process's timed
    products."""
    with _lock:
        return dict(_choices)


def forget():
    """Drop every choice (the next pass times again)."""
    with _lock:
        _choices.clear()
        _forgotten[0] += 1


def settings():
    """What the choices depend on besides the products (part of a CUDA graph's key)."""
    return ENABLED, _forgotten[0]


def product_key(kind, xp, image, weight, grid, geom, group, path_settings=()):
    """The ProductKey of a product on the current device."""
    return ProductKey(kind, tuple(image.shape), tuple(weight.shape), tuple(grid.shape),
                      geom, group, np.dtype(image.dtype).str, backend.tf32_enabled(),
                      xp.cuda.Device().id, path_settings)


def chosen(key, paths):
    """The path already chosen for ``key`` among ``paths``, or None."""
    with _lock:
        found = _choices.get(key)
    return found[0] if found is not None and found[0] in paths else None


def choose(xp, key, paths, accumulated=None):
    """The name of the fastest of ``paths`` ({name: a function computing the product},
    "columns" first: the one used when no other can run) for ``key``, timing them the
    first time; None while a CUDA graph records a product not timed before (the
    caller's fixed rules choose). ``accumulated``: the array the product adds into; it
    gets its sums back before each timed run and after the last. A product with one
    path is kept without timing."""
    found = chosen(key, paths)
    if found is not None or backend.capturing():
        return found
    times = {}
    if len(paths) > 1:
        reset = None if accumulated is None else _restorer(accumulated)
        try:
            times = _time_paths(xp, key, paths, reset)
        finally:
            if reset is not None:
                reset()
    best = min(times, key=lambda name: times[name]) if times else next(iter(paths))
    with _lock:
        _choices[key] = (best, times)
    if len(paths) > 1:
        logger.info("Convolution autotune: %s", describe(key, best, times))
    return best


def _restorer(array):
    """A function that puts ``array``'s present values back (a copy is kept)."""
    saved = array.copy()

    def reset():
        array[...] = saved
    return reset


def _time_paths(xp, key, paths, reset):
    """{name: median seconds} of the paths that ran (a failing one is left out)."""
    times = {}
    for name, run in paths.items():
        try:
            times[name] = _median_seconds(xp, key.kind, name, run, reset)
        except (MemoryError, RuntimeError) as e:     # CuPy's out-of-memory, a failed launch
            logger.warning("Convolution autotune: %s failed for %s (%s); not used", name,
                           describe(key), e)
    return times


def describe(key, best=None, times=None):
    """A product's description, with its paths' times and the choice if given."""
    geom = key.geom
    shape = "x".join(map(str, key.image))
    kernel = "x".join(map(str, geom.kernel))
    dilation = "" if all(d == 1 for d in geom.dilation) else \
        f" dilation {'x'.join(map(str, geom.dilation))}"
    stride = "" if all(s == 1 for s in geom.stride) else \
        f" stride {'x'.join(map(str, geom.stride))}"
    product = f"{key.kind} of {shape} by {key.weight[0]} {kernel} filters{dilation}{stride}"
    if times is None:
        return product
    timed = ", ".join(f"{name} {seconds * 1e3:.3f} ms"
                      for name, seconds in sorted(times.items(), key=lambda t: t[1]))
    return f"{product}: {timed or 'every path failed'}; using {best}"


def _median_seconds(xp, kind, name, run, reset):
    samples = []
    for repeat in range(REPEATS + 1):       # the first run warms up (compiles, allocates)
        if reset is not None:
            reset()
        seconds = _timed(xp, kind, name, run)
        if repeat:
            samples.append(seconds)
    return statistics.median(samples)


def _timed(xp, kind, name, run):
    if TIMER is not None:
        run()
        return TIMER(kind, name)
    cuda = xp.cuda
    if not hasattr(cuda, "Event"):          # the emulator: the host's clock
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    start, stop = cuda.Event(), cuda.Event()
    device = xp.cuda.Device().id
    _hold(xp, device)
    start.record()
    run()
    stop.record()
    if start.done:                          # the hold ended before the run was queued
        _hold_cycles[device] = min(2 * _hold_cycles[device], MAX_HOLD_CYCLES)
    stop.synchronize()
    return cuda.get_elapsed_time(start, stop) * 1e-3


_hold_flags = {}        # device -> the flag hold_device writes
_hold_cycles = {}       # device -> its hold's cycles


def _hold(xp, device):
    """Queue the device's hold (HOLD_CYCLES at first): one thread of timing.cu's
    hold_device spinning."""
    flag = _hold_flags.get(device)
    if flag is None:
        flag = _hold_flags[device] = xp.zeros(1, np.float32)
        _hold_cycles[device] = HOLD_CYCLES
    kernels.launch("timing", "hold_device", np.float32, 1, _hold_cycles[device], flag,
                   grid=1, block=1)
