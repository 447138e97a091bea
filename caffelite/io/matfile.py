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
dimensions.  Before scipy sees a level-5 file, its header and the tags and sizes of
its elements are checked here (``_level5_variables``): scipy's C reader trusts them and
crashes the process (segmentation fault) on a corrupt type code, and gives bare
IndexErrors on a truncated header, where matio (the fork) refuses the file.
"""
import os
import platform
import struct
import sys
import time
import zlib

import numpy as np

from ..blob import legacy_shape

# MAT level-5 data types and array classes used here.
miINT8, miINT32, miUINT32, miSINGLE, miDOUBLE, miMATRIX = 1, 5, 6, 7, 9, 14
miCOMPRESSED, miUTF8 = 15, 16
mxDOUBLE_CLASS, mxSINGLE_CLASS = 6, 7
_CLASS_OF_DTYPE = {np.dtype(np.float32): (mxSINGLE_CLASS, miSINGLE, "single"),
                   np.dtype(np.float64): (mxDOUBLE_CLASS, miDOUBLE, "double")}
_DTYPE_OF_CLASS = {name: dtype for dtype, (_, _, name) in _CLASS_OF_DTYPE.items()}

HEADER_TEXT_BYTES = 116
HEADER_BYTES = 128

# Level-5 data types that can hold numeric values, with their item sizes, and the
# array classes (the last byte of the array flags) by the names whosmat gives them.
_MI_ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 9: 8, 12: 8, 13: 8}
_MI_NAMES = {1: "miINT8", 2: "miUINT8", 3: "miINT16", 4: "miUINT16", 5: "miINT32",
             6: "miUINT32", 7: "miSINGLE", 9: "miDOUBLE", 12: "miINT64", 13: "miUINT64",
             14: "miMATRIX", 15: "miCOMPRESSED", 16: "miUTF8", 17: "miUTF16", 18: "miUTF32"}
_CLASS_NAMES = {1: "cell", 2: "struct", 3: "object", 4: "char", 5: "sparse", 6: "double",
                7: "single", 8: "int8", 9: "uint8", 10: "int16", 11: "uint16", 12: "int32",
                13: "uint32", 14: "int64", 15: "uint64", 16: "function", 17: "opaque"}
_NUMERIC_CLASSES = range(6, 16)
_MAX_DIMS_BYTES = 128        # scipy reads at most 32 dims


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
        version, layout = _file_layout(path)
        if version == "7.3":
            variables = _read_v73(path)
        else:
            variables = _read_scipy(path, layout)
    except MatFileError:
        raise
    except (ValueError, OSError, _scipy_read_error()) as e:
        raise MatFileError(f"cannot read MAT file '{path}': {e}") from None
    except (TypeError, IndexError, KeyError, AttributeError, NameError, EOFError,
            OverflowError, struct.error, zlib.error) as e:   # scipy on a damaged file
        raise MatFileError(f"cannot read MAT file '{path}' (damaged?): "
                           f"{type(e).__name__}: {e}") from None
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
    values, dims, mat_class, is_complex = entry
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
    if is_complex or (values is not None and np.iscomplexobj(values)):
        raise MatFileError(f"MAT file '{path}': variable '{name}' is complex; it must be "
                           f"a real numeric array (keep real(...) of it in MATLAB)")
    values = np.asarray(values)
    if values.dtype == object or values.size != np.prod(dims):
        raise MatFileError(f"MAT file '{path}': variable '{name}' must be a real "
                           f"numeric array")
    linear = values.astype(dtype, copy=False).reshape(-1, order="F")
    return _blob_from_linear(linear, dims)


def _scipy_read_error():
    from scipy.io.matlab import MatReadError
    return MatReadError


def _read_scipy(path, layout):
    """name -> (array, dims, class, complex) for 'data' and 'diff' of a level-5 or v4
    file.  ``layout`` is the level-5 variables as ``_level5_variables`` checked them
    (None for v4): only real single or double ones are loaded -- anything else is
    refused by ``_checked`` from its header alone."""
    import scipy.io
    if layout is None:      # v4: scipy's pure-Python reader; no array flags, no classes
        layout = {name: (tuple(shape), cls, False)
                  for name, shape, cls in scipy.io.whosmat(path)}
        loadable = list(layout)
    else:
        loadable = [n for n, (_, cls, is_complex) in layout.items()
                    if cls in _DTYPE_OF_CLASS and not is_complex]
    wanted = [n for n in ("data", "diff") if n in loadable]
    contents = scipy.io.loadmat(path, variable_names=wanted, mat_dtype=True,
                                squeeze_me=False, chars_as_strings=False) if wanted else {}
    return {n: (contents.get(n), dims, cls, is_complex)
            for n, (dims, cls, is_complex) in layout.items()}


# ------------------------------------------------------- level-5 structure checks
def _file_layout(path):
    """``(version, variables)``: "4" (left to scipy), "5" with the level-5 variables
    checked by ``_level5_variables``, or "7.3" (HDF5).  A header that is none of
    these is refused as scipy's ``_get_matfile_version`` and matio's Mat_Open would:
    v4 files have a zero in their first 4 bytes, the others a 128-byte header ending
    in version and endian mark ('IM' written little-endian, 'MI' big-endian)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        if size == 0:
            raise MatFileError(f"MAT file '{path}' is empty (0 bytes)")
        if size >= 4 and 0 in head[:4]:
            _check_level4(path, f, size)
            return "4", None
        if size < HEADER_BYTES:
            raise MatFileError(
                f"MAT file '{path}' is truncated: it has {size} bytes, fewer than the "
                f"{HEADER_BYTES}-byte header of a level-5 MAT file")
        mark = head[126:128]
        if mark not in (b"IM", b"MI"):
            raise MatFileError(
                f"'{path}' is not a MAT file, or its header is corrupt: bytes 126-127 "
                f"are {mark!r}, not the endian mark 'IM' (or 'MI') of a level-5 MAT file")
        order = "<" if mark == b"IM" else ">"
        version = struct.unpack(order + "H", head[124:126])[0]
        if version >> 8 == 2:
            return "7.3", None
        if version >> 8 != 1:
            raise MatFileError(
                f"MAT file '{path}' has a corrupt header: version 0x{version:04x} at bytes "
                f"124-125 is neither level 5 (0x0100) nor v7.3 (0x0200)")
        return "5", _level5_variables(path, f, size, order)


def _check_level4(path, f, size):
    """Refuse a v4 file whose variable headers do not add up to its size (scipy would
    try to allocate what a corrupt header claims).  Each variable: 5 int32 (type code
    MOPT, rows, columns, imaginary flag, name length), the name, the values; the byte
    order is the one that makes the first MOPT valid, as scipy guesses it."""
    f.seek(0)
    first = struct.unpack("<i", f.read(4))[0]
    order = ">" if first < 0 or first > 5000 else "<"
    pos = 0
    while pos < size:
        where = f"MAT file '{path}' (v4), the variable at byte {pos}"
        mopt, rows, cols, imagf, namlen = _unpack_at(
            f, pos, size, order + "5i", f"{where} is truncated: {{left}} bytes, fewer than "
                                        f"the 20 of a v4 variable header")
        kind, precision = mopt % 10, mopt // 10 % 10
        if not 0 <= mopt <= 5000 or mopt // 100 % 10 or precision > 5 or kind > 2:
            raise MatFileError(f"{where} is corrupt: its type code (MOPT) {mopt} is not "
                               f"one of a v4 MAT file")
        if min(rows, cols, namlen) < 0:
            raise MatFileError(f"{where} is corrupt: negative size in its header (rows "
                               f"{rows}, columns {cols}, name length {namlen})")
        itemsize = (8, 4, 4, 2, 2, 1)[precision]
        values = rows * cols * (2 if imagf == 1 and kind != 2 else 1)
        end = pos + 20 + namlen + values * itemsize
        if end > size:
            raise MatFileError(
                f"{where} is truncated or corrupt: its header calls for {rows}x{cols}"
                f"{' complex' if values > rows * cols else ''} values and a {namlen}-byte "
                f"name, {end - pos} bytes, but the file ends {size - pos} bytes after its "
                f"start")
        pos = end


def _unpack_at(f, pos, size, fmt, message):
    """The ``struct`` format ``fmt`` read at byte ``pos`` of the file ``f`` of ``size``
    bytes; where the file ends first, MatFileError(message with {left}: bytes left)."""
    length = struct.calcsize(fmt)
    if size - pos < length:
        raise MatFileError(message.format(left=size - pos))
    f.seek(pos)
    return struct.unpack(fmt, f.read(length))


def _level5_variables(path, f, size, order):
    """name -> (dims, class, complex) of each top-level variable (the first of a name,
    as loadmat takes it), after checking every element tag scipy will follow: each
    variable is a miMATRIX (or miCOMPRESSED one) that fits in the file, its array
    flags, dims and name are well formed and its class is known, and for 'data' and
    'diff' of a numeric class the real (and imaginary) parts have a numeric type and
    exactly the values their dims call for."""
    variables = {}
    pos = HEADER_BYTES
    while pos < size:
        where = f"MAT file '{path}', the variable at byte {pos}"
        mi, count = _unpack_at(f, pos, size, order + "II",
                               f"MAT file '{path}' is truncated or corrupt: {{left}} stray "
                               f"bytes at its end (byte {pos}), too few for a tag")
        if mi not in (miMATRIX, miCOMPRESSED):
            raise MatFileError(f"{where} is corrupt: its tag has data type {mi}, where a "
                               f"variable is a miMATRIX (14) or miCOMPRESSED (15) element")
        if count == 0:
            raise MatFileError(f"{where} is corrupt: its element is empty (0 bytes)")
        if pos + 8 + count > size:
            raise MatFileError(
                f"{where} is truncated: its element has {count} bytes but the file ends "
                f"{size - pos - 8} bytes after its tag")
        if mi == miCOMPRESSED:
            f.seek(pos + 8)
            inflated = _Inflated(f.read(count), where)
            inner = inflated.at(0, 8)
            if len(inner) < 8:
                raise MatFileError(f"{where} is corrupt: its compressed data ends before "
                                   f"the tag of the variable")
            mi, inner_count = struct.unpack(order + "II", inner)
            if mi != miMATRIX or inner_count == 0:
                raise MatFileError(
                    f"{where} is corrupt: its compressed data holds an element of data "
                    f"type {_mi_name(mi)} and {inner_count} bytes, not a miMATRIX")
            entry = _matrix_info(lambda off, n: inflated.at(8 + off, n), inner_count, order,
                                 where + " (compressed)", ("data", "diff"), inflated=True)
        else:
            def at(off, n, base=pos + 8):
                f.seek(base + off)
                return f.read(n)
            entry = _matrix_info(at, count, order, where, ("data", "diff"))
        name, info = entry
        variables.setdefault(name, info)
        pos += 8 + count
    return variables


class _Inflated:
    """The decompressed bytes of a miCOMPRESSED element, inflated as far as asked."""

    def __init__(self, raw, where):
        self._inflater, self._pending, self._where = zlib.decompressobj(), raw, where
        self._bytes, self._done = bytearray(), False

    def at(self, off, n):
        """Up to n bytes from ``off`` (fewer where the compressed data ends)."""
        while len(self._bytes) < off + n and not self._done:
            try:
                chunk = self._inflater.decompress(
                    self._pending, max(off + n - len(self._bytes), 1 << 16))
            except zlib.error as e:
                raise MatFileError(f"{self._where} is corrupt: its compressed data does "
                                   f"not inflate ({e})") from None
            self._pending = self._inflater.unconsumed_tail
            self._bytes += chunk
            self._done = self._inflater.eof or not (chunk or self._pending)
        return bytes(self._bytes[off:off + n])


def _mi_name(mi):
    return _MI_NAMES.get(mi, f"{mi} (unknown)")


def _matrix_info(at, limit, order, where, full_names, inflated=False):
    """``(name, (dims, class, complex))`` of the miMATRIX body of ``limit`` bytes that
    ``at(offset, n)`` reads, with the checks ``_level5_variables`` describes (the
    values of the variables named in ``full_names`` included).  ``inflated``: the
    body is decompressed data, which may end before ``limit``; an uncompressed body
    is known to fit in the file."""
    def element(off, what):
        """(type, byte count, offset of the data, offset of the next element)"""
        tag = at(off, 8) if off + 8 <= limit else b""
        if len(tag) < 8:
            raise MatFileError(f"{where} is truncated or corrupt: it ends before its {what}")
        first, second = struct.unpack(order + "II", tag)
        if first >> 16:                 # small data element: type and size in one word
            mi, count = first & 0xFFFF, first >> 16
            if count > 4:
                raise MatFileError(f"{where} is corrupt: the element of its {what} is a "
                                   f"small data element of {count} bytes (at most 4)")
            return mi, count, off + 4, off + 8
        if off + 8 + second > limit:
            raise MatFileError(
                f"{where} is truncated or corrupt: the element of its {what} "
                f"({_mi_name(first)}, {second} bytes at byte {off + 8} of the variable) "
                f"runs past the variable's {limit} bytes")
        return first, second, off + 8, off + 8 + second + (-second % 8)

    def payload(start, count, what):
        raw = at(start, count)
        if len(raw) < count:
            raise MatFileError(f"{where} is truncated or corrupt: its {what} ends early")
        return raw

    mi, count, start, off = element(0, "array flags")
    if mi not in (miINT32, miUINT32) or count != 8:
        raise MatFileError(f"{where} is corrupt: its array flags have data type "
                           f"{_mi_name(mi)} and {count} bytes, not miUINT32 and 8 bytes")
    flags = struct.unpack(order + "I", payload(start, 4, "array flags"))[0]
    mx_class = flags & 0xFF
    if mx_class not in _CLASS_NAMES:
        raise MatFileError(f"{where} is corrupt: its array flags give the unknown "
                           f"array class {mx_class}")
    dims = ()
    if mx_class != 17:              # mxOPAQUE has a name only
        mi, count, start, off = element(off, "dimensions")
        if mi not in (miINT32, miUINT32) or count % 4 or not 0 < count <= _MAX_DIMS_BYTES:
            raise MatFileError(
                f"{where} is corrupt: its dimensions have data type {_mi_name(mi)} and "
                f"{count} bytes, not miINT32 with 1 to {_MAX_DIMS_BYTES // 4} values")
        dims = struct.unpack(f"{order}{count // 4}i", payload(start, count, "dimensions"))
        if min(dims) < 0:
            raise MatFileError(f"{where} is corrupt: negative dimension in "
                               f"{list(dims)}")
    mi, count, start, off = element(off, "name")
    raw_name = payload(start, count, "name")
    if mi not in (miINT8, miUTF8) or (mi == miUTF8 and max(raw_name, default=0) > 127):
        raise MatFileError(f"{where} is corrupt: its name has data type {_mi_name(mi)}, "
                           f"not ASCII miINT8")
    name = raw_name.decode("latin1")
    where = f"{where} ('{name}')"
    is_complex = bool(flags >> 11 & 1)
    if mx_class in _NUMERIC_CLASSES and name in full_names:
        values = int(np.prod(dims, dtype=object))
        for part in ("real part", "imaginary part")[:1 + is_complex]:
            mi, count, start, off = element(off, part)
            if mi not in _MI_ITEMSIZE:
                raise MatFileError(f"{where} is corrupt: its {part} has data type "
                                   f"{_mi_name(mi)}, not a numeric type")
            if count != values * _MI_ITEMSIZE[mi]:
                raise MatFileError(
                    f"{where} is truncated or corrupt: its dims {list(dims)} call for "
                    f"{values} values but its {part} has {count} bytes of {_mi_name(mi)}")
            if inflated and count:          # inflates it all, as scipy will
                payload(start + count - 1, 1, part)
    mat_class = "logical" if flags >> 9 & 1 else _CLASS_NAMES[mx_class]
    return name, (tuple(dims), mat_class, is_complex)


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
        out[n] = (value, dims, cls, False)     # complex values are refused by _checked
    return out

