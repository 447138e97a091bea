"""CUDA stream capture, as the GPU emulator plays it.

On a GPU, work queued on a capturing stream is not run: it is recorded into a graph,
and each launch of the graph runs the recorded work again, on the memory it was
recorded with and with the scalar arguments it was given then. Code that is captured
must therefore leave nothing to the host: a device-to-host read, a host-to-device copy
from pageable memory or a synchronisation fails during capture, and host-side state
(a Python attribute, a random draw, a host scalar computed from device values) is
frozen at what it was when the graph was recorded.

The emulator reproduces that, so a pass that relies on anything a graph would not
replay fails its tests here as it would on a device:

* while capturing, every operation that writes into existing device memory (an
  ``out=`` argument, ``a[i] = v``, ``xp.copyto``, ``fill``, a kernel launch) is
  recorded and *not* run;
* an operation that makes a new array runs (to give its shape and dtype) and is
  recorded, to compute that same array again at each launch;
* views are not operations: they alias memory the recorded work reads at launch time;
* host reads, host-to-device copies, synchronisations and random draws raise
  ``CaptureError``, where CUDA or CuPy would fail or silently freeze the values;
* ``Graph.launch`` runs the recorded operations in order.
"""
import numpy as np


class CaptureError(RuntimeError):
    """An operation a CUDA stream capture cannot record (CuPy raises a CUDA error)."""


_ops = [None]       # the operations recorded so far, while a stream is capturing


def active():
    return _ops[0] is not None


def begin():
    if active():
        raise CaptureError("a stream is already capturing")
    _ops[0] = []


def end():
    ops, _ops[0] = _ops[0], None
    if ops is None:
        raise CaptureError("end_capture on a stream that is not capturing")
    return ops


def refuse(what):
    """Raise if capturing: ``what`` needs the host, which a graph cannot record."""
    if active():
        _ops[0] = None          # CUDA invalidates the capture; the stream leaves it
        raise CaptureError(f"operation not permitted when stream is capturing: {what}")


def record_write(fn, *args, **kwargs):
    """A write into existing memory: recorded for the launches, not run now."""
    _ops[0].append(lambda: fn(*args, **kwargs))


def record_result(fn, args, kwargs, to_device, record=True):
    """A computation giving new arrays: run now, and recorded to write the same arrays
    again at each launch (unless ``record`` is false: uninitialised memory). Results
    that are views of the arguments are not recomputed: they alias the memory."""
    with np.errstate(all="ignore"):     # on a GPU nothing is computed now
        result = to_device(fn(*args, **kwargs))
    if not record:
        return result
    sources = [a.view(np.ndarray) for a in _leaves((args, kwargs))
               if isinstance(a, np.ndarray)]
    results = list(_leaves(result))
    fresh = [i for i, r in enumerate(results) if isinstance(r, np.ndarray) and
             not any(np.may_share_memory(r.view(np.ndarray), s) for s in sources)]
    if fresh:
        targets = [results[i].view(np.ndarray) for i in fresh]

        def again():
            values = list(_leaves(fn(*args, **kwargs)))
            for target, i in zip(targets, fresh):
                np.copyto(target, values[i], casting="unsafe")
        _ops[0].append(again)
    return result


def _leaves(tree):
    if isinstance(tree, (list, tuple)):
        for t in tree:
            yield from _leaves(t)
    elif isinstance(tree, dict):
        for t in tree.values():
            yield from _leaves(t)
    else:
        yield tree


class Graph:
    """A recorded capture (``cupy.cuda.Graph``): ``launch`` runs it again."""

    def __init__(self, ops):
        self._ops = ops

    def launch(self, stream=None):
        refuse("launching a graph")
        for op in self._ops:
            op()

    def upload(self, stream=None):
        pass

    def __len__(self):
        return len(self._ops)
