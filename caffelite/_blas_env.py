"""Run before numpy is first imported (``caffelite/__init__`` imports this module
first): let OpenBLAS's idle threads go to sleep soon after a GEMM.

OpenBLAS's worker threads spin for 2**28 cycles (about 0.1 s) after each GEMM before
they sleep. Between two GEMMs caffelite's host threads (``caffelite.host_threads``) run
the copies and element-wise work, and spinning BLAS threads would take their cores:
with the default, splitting that work over threads made small nets slower, not faster.
2**20 cycles (a fraction of a millisecond) is enough for a band loop's back-to-back
GEMMs. A value the user set is kept; when numpy was imported before caffelite, nothing
can be changed any more, and the host threads stay off unless asked for.
"""
import os
import sys

TIMEOUT_ENV = "OPENBLAS_THREAD_TIMEOUT"
DEFAULT_TIMEOUT = "20"          # log2 of the cycles an idle OpenBLAS thread spins
SOON_ENOUGH = 22                # about 1.6 ms at 2.6 GHz

NUMPY_LOADED_BEFORE = "numpy" in sys.modules
if not NUMPY_LOADED_BEFORE:
    os.environ.setdefault(TIMEOUT_ENV, DEFAULT_TIMEOUT)
_TIMEOUT_AT_LOAD = os.environ.get(TIMEOUT_ENV, "")


def blas_threads_sleep_soon():
    """True when numpy's BLAS is OpenBLAS and its idle threads sleep within about a
    millisecond (``OPENBLAS_THREAD_TIMEOUT`` was set when numpy loaded)."""
    text = _TIMEOUT_AT_LOAD.strip()
    if not text.isdigit() or int(text) > SOON_ENOUGH:
        return False
    try:
        import numpy as np
        blas = np.__config__.CONFIG["Build Dependencies"]["blas"]["name"]
    except (AttributeError, KeyError, TypeError):
        return False
    return "openblas" in str(blas).lower()
