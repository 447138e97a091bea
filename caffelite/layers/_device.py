"""Small helpers for layers that run on the host (numpy) and on the device (CuPy or the
emulator) from one code path."""
import numpy as np

from .. import backend, kernels


def on_device(xp):
    """True when ``xp`` (from ``backend.get_array_module``) is a device array module."""
    return xp is not np


def scalar(array):
    """The first value of a (host or device) array as a Python float: one small
    device-to-host copy, like Caffe's ``cpu_data()[0]`` on a GPU blob."""
    return float(backend.to_host(array).reshape(-1)[0])


def launch(module, kernel, dtype, *args):
    """Run ``kernel<dtype>`` of ``caffelite/kernels/<module>.cu`` on device arrays."""
    kernels.launch(module, kernel, np.dtype(dtype), *args)


def reused(array, xp, shape, dtype):
    """``array`` when it is an ``xp`` array of ``shape`` and ``dtype``, else a new
    uninitialised one: a work array a layer keeps from one pass to the next."""
    shape = tuple(shape)
    if (array is None or backend.get_array_module(array) is not xp or array.shape != shape
            or array.dtype != dtype):
        return xp.empty(shape, dtype)
    return array


def contiguous(xp, array):
    """``array`` itself when C-contiguous, else a contiguous copy (a kernel input)."""
    return array if array.flags.c_contiguous else xp.ascontiguousarray(array)

