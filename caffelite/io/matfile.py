"""MATLAB .mat files as DeepLab's MatWrite/MatRead use them (spec section 4).

A blob is stored as the variable ``data`` (and optionally ``diff``) with dims
``[W, H, C, N]``: the blob's row-major NCHW buffer is the column-major array MATLAB
sees, so ``data(w+1, h+1, c+1, n+1) = blob[n, c, h, w]``.

``write_mat`` writes exactly the layout of matio's ``Mat_Create`` + ``Mat_VarWrite``
with ``MAT_COMPRESSION_NONE`` (what the fork's MatWrite produced, checked against real
files): a 128-byte level-5 header whose subsystem-offset field holds 8 spaces, then
one uncompressed miMATRIX element per variable with 4 dims (trailing 1s kept), the
4-character name packed in a small data element, and the raw little-endian values.

``read_mat`` reads level-5 files with scipy and v7.3 (HDF5) files with pymatreader,
and checks what the fork's ReadBlobFromMat checks: the variable exists, its MATLAB
class is the net's (single for float nets -- no conversion), and it has at most 4
dimensions.
"""
import os
import platform
import struct
import sys
import time

import numpy as np

from ..blob import legacy_shape

# MAT level-5 data types and array classes used here.
miINT8, miINT32, miUINT32, miSINGLE, miDOUBLE, miMATRIX = 1, 5, 6, 7, 9, 14
mxDOUBLE_CLASS, mxSINGLE_CLASS = 6, 7
_CLASS_OF_DTYPE = {np.dtype(np.float32): (mxSINGLE_CLASS, miSINGLE, "single"),
                   np.dtype(np.float64): (mxDOUBLE_CLASS, miDOUBLE, "double")}
_DTYPE_OF_CLASS = {name: dtype for dtype, (_, _, name) in _CLASS_OF_DTYPE.items()}

HEADER_TEXT_BYTES = 116


class MatFileError(ValueError):
    """A .mat file that cannot be read or written as a blob; the message names it."""


# ---------------------------------------------------------------------- blob <-> MAT
def blob_dims(shape):
    """Caffe's legacy (num, channels, height, width) of a blob shape, as MAT dims
    ``[W, H, C, N]`` (missing trailing axes count as 1, like ``Blob::LegacyShape``)."""
    shape = tuple(int(s) for s in shape)
    nchw = legacy_shape(shape)
    if nchw is None:
        raise MatFileError(f"a blob of shape {shape} has more than 4 axes; MAT files "
                           f"written by MatWrite hold at most 4")
    return list(reversed(nchw))


def blob_to_mat_array(blob):
    """Blob array -> the [W, H, C, N] array MATLAB sees in the file."""
    a = np.asarray(blob)
    dims = blob_dims(a.shape)
    return np.ascontiguousarray(a).reshape(dims[::-1]).transpose(3, 2, 1, 0)


def mat_array_to_blob(array):
    """An array with MATLAB dims (trailing singleton dims possibly dropped) -> NCHW,
    as ReadBlobFromMat shapes it: (dims[3] or 1, dims[2] or 1, dims[1] or 1, dims[0])."""
    a = np.asarray(array)
    if a.ndim > 4:
        raise MatFileError(f"variable has {a.ndim} dimensions; at most 4 are allowed")
    return _blob_from_linear(a.reshape(-1, order="F"), a.shape)


def _blob_from_linear(values, dims):
    dims = tuple(int(d) for d in dims)
    shape = (dims[3] if len(dims) > 3 else 1, dims[2] if len(dims) > 2 else 1,
             dims[1] if len(dims) > 1 else 1, dims[0] if len(dims) > 0 else 0)
    return np.asarray(values).reshape(shape)


# ------------------------------------------------------------------------- writing
def _pad8(payload):
    return payload + b"\0" * (-len(payload) % 8)


def _element(data_type, payload):
    return struct.pack("<II", data_type, len(payload)) + _pad8(payload)


def _name_element(name):
    raw = name.encode("ascii")
    if 0 < len(raw) <= 4:   # small data element: type and size packed in one word
        return struct.pack("<HH", miINT8, len(raw)) + raw + b"\0" * (4 - len(raw))
    return _element(miINT8, raw)


def _matrix_element(name, blob):
    blob = np.asarray(blob)
    if blob.dtype not in _CLASS_OF_DTYPE:
        raise MatFileError(f"cannot write '{name}' of dtype {blob.dtype}: MatWrite "
                           f"writes single (float32) or double (float64) blobs")
    mx_class, mi_type, _ = _CLASS_OF_DTYPE[blob.dtype]
    dims = blob_dims(blob.shape)
    body = (_element(miUINT32, struct.pack("<II", mx_class, 0))
            + _element(miINT32, struct.pack("<4i", *dims))
            + _name_element(name)
            + _element(mi_type, np.ascontiguousarray(blob).astype(
                blob.dtype.newbyteorder("<"), copy=False).tobytes()))
    return struct.pack("<II", miMATRIX, len(body)) + body


def mat_header(text=None):
    """The 128-byte level-5 header: text, 8 spaces (subsystem offset), 0x0100, 'IM'."""
    if text is None:
        from .. import __version__
        text = (f"MATLAB 5.0 MAT-file, Platform: {platform.machine()}-{sys.platform}, "
                f"Created by: caffelite v{__version__} on {time.ctime()}\n")
    raw = text.encode("ascii", "replace")[:HEADER_TEXT_BYTES - 1] + b"\0"
    raw = raw + b" " * (HEADER_TEXT_BYTES - len(raw))
    return raw + b" " * 8 + struct.pack("<H", 0x0100) + b"IM"


def mat_bytes(variables, header_text=None):
    """File contents holding ``variables`` (name -> blob array, written in order)."""
    return mat_header(header_text) + b"".join(
        _matrix_element(name, blob) for name, blob in variables.items())


def write_mat(path, data, diff=None):
    """Write a blob (``data``, optionally ``diff``) as MatWrite does, atomically."""
    variables = {"data": np.asarray(data)}
    if diff is not None:
        variables["diff"] = np.asarray(diff)
    payload = mat_bytes(variables)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except OSError as e:
        raise MatFileError(f"cannot write MAT file '{path}': {e.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ------------------------------------------------------------------------- reading
def read_mat(path, dtype=np.float32):
    """``(data, diff)`` of a MatWrite-style file as NCHW arrays of ``dtype``.

    ``diff`` is None when the file has no (or an empty) ``diff`` variable.  The MATLAB
    class of each variable must be the one of ``dtype`` (single for float32);
    ``dtype=None`` takes either, as the file stores it (MATLAB scripts do).
    """
    dtype = None if dtype is None else np.dtype(dtype)
    if dtype is not None and dtype not in _CLASS_OF_DTYPE:
        raise MatFileError(f"MAT blobs can be read as float32 or float64, not {dtype}")
    if not os.path.isfile(path):
        raise MatFileError(f"MAT file not found: '{path}'")
    try:
        variables = _read_v5(path)
    except NotImplementedError:          # scipy: "use HDF reader for v7.3 files"
        variables = _read_v73(path)
    except (ValueError, TypeError, OSError, struct.error, _scipy_read_error()) as e:
        raise MatFileError(f"cannot read MAT file '{path}': {e}") from None
    if "data" not in variables:
        raise MatFileError(f"MAT file '{path}' has no variable 'data' (it has: "
                           f"{', '.join(sorted(variables)) or 'none'})")
    data = _checked(path, "data", variables["data"], dtype)
    diff = None
    if "diff" in variables and int(np.prod(variables["diff"][1])) > 0:
        values = _checked(path, "diff", variables["diff"], dtype)
        if values.size < data.size:
            raise MatFileError(f"MAT file '{path}': 'diff' has {values.size} values, "
                               f"fewer than the {data.size} of 'data'")
        diff = values.reshape(-1)[:data.size].reshape(data.shape)
    return data, diff


def _checked(path, name, entry, dtype):
    values, dims, mat_class = entry
    if dtype is None:
        dtype = _DTYPE_OF_CLASS.get(mat_class, np.dtype(np.float32))
    want = _CLASS_OF_DTYPE[dtype][2]
    if mat_class != want:
        raise MatFileError(
            f"MAT file '{path}': variable '{name}' is of class '{mat_class}', but a "
            f"{dtype.name} net reads class '{want}' (the fork does not convert; save "
            f"it with {want}(...) in MATLAB)")
    if len(dims) > 4:
        raise MatFileError(f"MAT file '{path}': variable '{name}' has {len(dims)} "
                           f"dimensions; at most 4 are allowed")
    values = np.asarray(values)
    if values.dtype == object or np.iscomplexobj(values) or values.size != np.prod(dims):
        raise MatFileError(f"MAT file '{path}': variable '{name}' must be a real "
                           f"numeric array")
    linear = values.astype(dtype, copy=False).reshape(-1, order="F")
    return _blob_from_linear(linear, dims)


def _scipy_read_error():
    from scipy.io.matlab import MatReadError
    return MatReadError


def _read_v5(path):
    """name -> (array, dims, class) for 'data' and 'diff' of a level-5 file."""
    import scipy.io
    info = {name: (tuple(shape), cls) for name, shape, cls in scipy.io.whosmat(path)}
    wanted = [n for n in ("data", "diff") if n in info]
    contents = scipy.io.loadmat(path, variable_names=wanted, mat_dtype=True,
                                squeeze_me=False, chars_as_strings=False) if wanted else {}
    out = {n: (contents[n], info[n][0], info[n][1]) for n in wanted if n in contents}
    for n in info:
        out.setdefault(n, (None, info[n][0], info[n][1]))
    return out


def _read_v73(path):
    """The same for a v7.3 (HDF5) file, through pymatreader.  pymatreader squeezes
    singleton dimensions, so the values are put back into the stored dims."""
    try:
        import pymatreader
    except ImportError:
        raise MatFileError(f"'{path}' is a MAT v7.3 (HDF5) file; reading it needs the "
                           f"pymatreader package (pip install pymatreader)") from None
    try:
        info = {name: (tuple(shape), cls) for name, shape, cls in pymatreader.whosmat(path)}
        wanted = [n for n in ("data", "diff") if n in info]
        contents = pymatreader.read_mat(path, variable_names=wanted) if wanted else {}
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise MatFileError(f"cannot read MAT v7.3 file '{path}': {e}") from None
    out = {}
    for n in info:
        dims, cls = info[n]
        value = contents.get(n)
        if value is not None and np.size(value) == int(np.prod(dims)):
            value = np.reshape(np.asarray(value), dims, order="F")
        out[n] = (value, dims, cls)
    return out

