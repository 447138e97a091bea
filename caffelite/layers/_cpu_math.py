"""The fork's CPU arithmetic around C's math functions.

Caffe's CPU code calls exp, log, tanh and pow unqualified (directly, or through the
vsExp/vsLn/vsPowx loops of mkl_alternate.hpp). Compiled with the GCC of the fork's
era (<= 5, before libstdc++'s <math.h> added float overloads to the global namespace)
they are the C library's double functions: a float is promoted, the call and the rest
of its expression run in double, and storing into a float blob rounds once. So for
host float32 data the layers evaluate such expressions in float64 and let the store
round. numpy's own float32 exp and log are not correctly rounded (they differ from
C's in the last bit for about 40 % and 9 % of inputs). Device arrays keep their
dtype: the fork's CUDA kernels call the float functions.
"""
from array import array

import numpy as np


def double(xp, a):
    """``a`` promoted to C's double if it is host float32 data; otherwise unchanged."""
    if xp is np and getattr(a, "dtype", None) == np.float32:
        return np.asarray(a, dtype=np.float64)
    return a


def c_double(value):
    """A Python or numpy scalar as C's double (for setup-time constants)."""
    return np.float64(value)


def sequential_sum(values, dtype, start=0.0):
    """``Dtype acc = start; for v: acc += v;`` with each double ``v`` added in double and
    the sum stored back into a ``dtype`` accumulator every step, as the fork's loss
    loops (``loss -= log(...)``) do. ``values``: a float64 sequence."""
    acc = array("f" if np.dtype(dtype) == np.float32 else "d", [start])
    for v in np.asarray(values, dtype=np.float64).tolist():
        acc[0] = acc[0] + v
    return np.dtype(dtype).type(acc[0])
