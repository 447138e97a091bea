"""Worker threads for the host's copies and element-wise work (im2col, pooling, ReLU,
BatchNorm, Scale, Eltwise ...).

The GEMMs run on every core (BLAS threads); numpy runs each operation on one. On a
machine with many cores the single-threaded parts then dominate a forward: ASPP-VGG at
513x513 spends about 0.5 s of 1.7 s in them on two cores. numpy releases the GIL inside
its copy and ufunc loops, so one operation split into disjoint slices runs on several
threads at once. Every element still comes from the same operation as before, so the
results are the same bits with any number of threads.

``CAFFELITE_HOST_THREADS`` sets the number of threads (1: none). Without it, the host
threads are used only where numpy's BLAS is OpenBLAS with idle threads that sleep soon
(``caffelite._blas_env``: caffelite sets ``OPENBLAS_THREAD_TIMEOUT`` when it is
imported before numpy); their number then follows the BLAS settings (``OMP_NUM_THREADS``,
``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``), else the CPUs this process may run on.
``set_threads(n)`` changes it at run time.
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _blas_env

ENV = "CAFFELITE_HOST_THREADS"
_BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# Elements one task should have at least: below this the hand-off costs more than the
# work (a task costs tens of microseconds; a core copies about 1M floats per ms).
MIN_TASK_ELEMENTS = 1 << 17


class HostThreadsError(ValueError):
    pass


class _State(threading.local):
    in_worker = False


_local = _State()
_lock = threading.Lock()
_settings = {"threads": None, "pool": None}


def _positive_int(name, text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise HostThreadsError(f"${name}='{text}' is not a positive number of threads")
    return value


def _default_threads():
    if os.environ.get(ENV, "").strip():
        return _positive_int(ENV, os.environ[ENV].strip())
    if not _blas_env.blas_threads_sleep_soon():
        return 1                # spinning BLAS threads would hold the cores
    for name in _BLAS_ENV:
        text = os.environ.get(name, "").split(",")[0].strip()
        if text.isdigit() and int(text) > 0:
            return int(text)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                    # not on Linux
        return os.cpu_count() or 1


def threads():
    """How many threads the host's element-wise work uses."""
    if _settings["threads"] is None:
        _settings["threads"] = _default_threads()
    return _settings["threads"]


def set_threads(count):
    """Use ``count`` threads from now on (None: the default again). Work already handed
    to the old pool finishes there."""
    if count is not None and (int(count) != count or count < 1):
        raise HostThreadsError(f"the number of host threads must be a positive integer, "
                               f"got {count!r}")
    with _lock:
        pool, _settings["pool"] = _settings["pool"], None
        _settings["threads"] = None if count is None else int(count)
    if pool is not None:
        pool.shutdown(wait=True)


def _submit(workers, tasks):
    """Hand ``tasks`` ((function, lo, hi) triples) to a pool of ``workers`` threads;
    under the lock, so that ``set_threads`` cannot shut that pool down in between."""
    with _lock:
        pool = _settings["pool"]
        if pool is None or pool._max_workers != workers:
            old, pool = pool, ThreadPoolExecutor(workers, thread_name_prefix="caffelite-host")
            _settings["pool"] = pool
            if old is not None:
                old.shutdown(wait=False)        # its queued tasks still run
        return [pool.submit(*task) for task in tasks]


def _forget_pool_in_child():
    # A fork()ed child has none of the parent's threads: it starts its own pool, and a
    # lock another thread held at the fork would never be released.
    global _lock
    _lock = threading.Lock()
    _settings["pool"] = None
    _local.in_worker = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def on_host(*arrays):
    """True when every array is a plain host numpy array (device arrays, and the GPU
    emulator's, which records its operations in order, are never split)."""
    return all(type(a) is np.ndarray for a in arrays)


def ranges(count, elements_per_item=1, threads_now=None):
    """``count`` items split into contiguous ``(lo, hi)`` ranges, one per thread that
    gets at least MIN_TASK_ELEMENTS elements of work (a single range when threads are
    off, the work is small, or the caller is itself a worker)."""
    total = count * max(int(elements_per_item), 1)
    parts = min(threads() if threads_now is None else threads_now, count,
                total // MIN_TASK_ELEMENTS)
    if parts <= 1 or _local.in_worker:
        return [(0, count)] if count else []
    bounds = [count * k // parts for k in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def for_ranges(function, count, elements_per_item=1):
    """``function(lo, hi)`` over ``ranges(count, elements_per_item)``: the first range
    here, the others on the worker threads (with this thread's numpy error settings);
    returns when all are done, raising the first error."""
    threads_now = threads()
    parts = ranges(count, elements_per_item, threads_now)
    if len(parts) <= 1:
        for lo, hi in parts:
            function(lo, hi)
        return
    errors, callback = np.geterr(), np.geterrcall()

    def work(lo, hi):
        _local.in_worker = True
        try:
            with np.errstate(call=callback, **errors):
                function(lo, hi)
        finally:
            _local.in_worker = False

    futures = _submit(threads_now - 1, [(work, lo, hi) for lo, hi in parts[1:]])
    try:
        function(*parts[0])
    finally:
        outcome = [f.exception() for f in futures]      # waits for every range
    for error in outcome:
        if error is not None:
            raise error


def for_axis(function, array, axis=1, work=1):
    """``function(lo, hi)`` over ranges of ``array``'s ``axis`` (channels by default),
    split as ``for_ranges`` splits when ``array`` is a host array (``work``: operations
    per element); one call over the whole axis otherwise."""
    count = array.shape[axis]
    if not on_host(array):
        function(0, count)
        return
    for_ranges(function, count, array.size // max(count, 1) * work)


def flat_map(function, *arrays):
    """``function(*slices)`` over matching slices of the flat views of ``arrays`` (one
    size), split as ``for_ranges`` splits; one call on the arrays themselves when one
    of them is not C-contiguous (its flat reshape would be a copy)."""
    if not on_host(*arrays) or not all(a.flags.c_contiguous for a in arrays):
        function(*arrays)
        return
    flat = [a.reshape(-1) for a in arrays]
    for_ranges(lambda lo, hi: function(*(f[lo:hi] for f in flat)), flat[0].size)
