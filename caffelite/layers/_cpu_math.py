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
import numpy as np


def double(xp, a):
    """``a`` promoted to C's double if it is host float32 data; otherwise unchanged."""
    if xp is np and getattr(a, "dtype", None) == np.float32:
        return np.asarray(a, dtype=np.float64)
    return a


def caffe_exp(xp, a):
    """caffe_exp (vsExp): exp of every element, stored back in ``a``'s dtype."""
    return xp.exp(double(xp, a)).astype(a.dtype, copy=False)


def caffe_log(xp, a):
    """caffe_log (vsLn): log of every element, stored back in ``a``'s dtype."""
    return xp.log(double(xp, a)).astype(a.dtype, copy=False)


def caffe_powx(xp, a, b):
    """caffe_powx (vsPowx): ``pow(a[i], b)``, stored back in ``a``'s dtype."""
    return xp.power(double(xp, a), double(xp, b)).astype(a.dtype, copy=False)


def caffe_sign(x):
    """caffe_cpu_sign (and its GPU twin): (0 < x) - (x < 0) in x's dtype, so 0 and NaN
    give 0 where numpy's sign gives NaN for NaN."""
    return (x > 0).astype(x.dtype) - (x < 0).astype(x.dtype)


def c_double(value):
    """A Python or numpy scalar as C's double (for setup-time constants)."""
    return np.float64(value)


def sequential_sum(values, dtype, start=0.0):
    """``Dtype acc = start; for v: acc += v;`` with each double ``v`` added in double and
    the sum stored back into a ``dtype`` accumulator every step, as the fork's loss
    loops (``loss -= log(...)``) do. ``values``: a float64 sequence.

    For float it runs numpy's sequential float accumulate over the values rounded to
    float, block by block, and redoes a block from the first step where rounding the
    value first changed the sum (rare: a few per million), so the result is the loop's.
    """
    with np.errstate(invalid="ignore", over="ignore"):     # the C loop's inf and NaN
        return _sequential_sum(values, np.dtype(dtype).type, start)


def _sequential_sum(values, real, start):
    values = np.asarray(values, dtype=np.float64).ravel()
    if real is np.float64:
        return real(_accumulate(values, np.float64, real(start))[-1]) if values.size \
            else real(start)
    acc = real(start)
    for block in range(0, values.size, _BLOCK):
        v = values[block:block + _BLOCK]
        while v.size:
            sums = _accumulate(v.astype(np.float32), np.float32, acc)
            before = np.concatenate([[acc], sums[:-1]]).astype(np.float64)
            exact = (before + v).astype(np.float32)       # the loop's own step
            # NaN == NaN here: once a NaN is in, every later step agrees (it stays NaN)
            wrong = np.flatnonzero((exact != sums) & ~(np.isnan(exact) & np.isnan(sums)))
            if not wrong.size:
                acc = sums[-1]
                break
            j = int(wrong[0])
            acc, v = exact[j], v[j + 1:]
    return acc


_BLOCK = 1 << 14


def _accumulate(values, dtype, start):
    """start + v0, (start + v0) + v1, ... strictly left to right in ``dtype``."""
    out = np.empty(values.size + 1, dtype=dtype)
    out[0] = start
    out[1:] = values
    return np.add.accumulate(out, dtype=dtype)[1:]
