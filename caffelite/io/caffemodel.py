"""Read and write ``.caffemodel`` weights straight from the protobuf wire format.

Only layer names, types and blobs are read, whatever the dialect (V2 ``layer`` = 100,
V1 ``layers`` = 2, V0 ``layers.layer``): the parameter messages of BVLC Caffe and of
the DeepLab forks reuse the same field numbers for different things, so parsing them
with one schema would silently misread some.  Packed floats become numpy arrays with
``frombuffer`` (no per-element Python), so a 170 MB file loads in a fraction of a second.
"""
import os
from dataclasses import dataclass, field

import numpy as np


class CaffemodelError(ValueError):
    pass


@dataclass
class BlobData:
    shape: tuple
    data: np.ndarray
    legacy_shape: bool = False   # shape came from num/channels/height/width


@dataclass
class LayerWeights:
    name: str
    type: str
    blobs: list = field(default_factory=list)


_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class _Reader:
    """Walks length-delimited protobuf messages inside one memoryview."""

    def __init__(self, buf, path):
        self.buf = buf
        self.path = path

    def fail(self, pos, what):
        return CaffemodelError(
            f"{self.path}: truncated or corrupt caffemodel ({what} at byte {pos})")

    def varint(self, pos, end):
        result = shift = 0
        buf = self.buf
        while True:
            if pos >= end:
                raise self.fail(pos, "varint runs past the end")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result, pos
            shift += 7
            if shift > 70:
                raise self.fail(pos, "varint too long")

    def fields(self, start, end):
        """Yield (field_number, wire_type, value_or_(start, end)) for a message span."""
        pos = start
        while pos < end:
            key, pos = self.varint(pos, end)
            number, wire = key >> 3, key & 7
            if wire == _VARINT:
                value, pos = self.varint(pos, end)
                yield number, wire, value
            elif wire == _LEN:
                length, pos = self.varint(pos, end)
                if pos + length > end:
                    raise self.fail(pos, f"field {number} of length {length} runs past the end")
                yield number, wire, (pos, pos + length)
                pos += length
            elif wire == _I32:
                if pos + 4 > end:
                    raise self.fail(pos, "fixed32 runs past the end")
                yield number, wire, (pos, pos + 4)
                pos += 4
            elif wire == _I64:
                if pos + 8 > end:
                    raise self.fail(pos, "fixed64 runs past the end")
                yield number, wire, (pos, pos + 8)
                pos += 8
            else:
                raise self.fail(pos, f"unsupported wire type {wire}")

    def string(self, span):
        return bytes(self.buf[span[0]:span[1]]).decode("utf-8", errors="replace")

    def packed_varints(self, span):
        out = []
        pos, end = span
        while pos < end:
            value, pos = self.varint(pos, end)
            out.append(value)
        return out


def _read_blob(reader, start, end):
    legacy = {}
    dims = []
    chunks = {5: [], 8: []}   # data (float32), double_data (float64)
    for number, wire, value in reader.fields(start, end):
        if number in (1, 2, 3, 4) and wire == _VARINT:
            legacy[number] = value
        elif number == 7 and wire == _LEN:
            for n2, w2, v2 in reader.fields(*value):
                if n2 == 1:
                    dims.extend(reader.packed_varints(v2) if w2 == _LEN else [v2])
        elif number in chunks:
            dtype = "<f4" if number == 5 else "<f8"
            s, e = value
            chunks[number].append(np.frombuffer(reader.buf[s:e], dtype=dtype))
    if legacy:
        shape = tuple(legacy.get(i, 0) for i in (1, 2, 3, 4))
    else:
        shape = tuple(int(d) for d in dims)
    double = chunks[8]
    parts = double if double and sum(p.size for p in double) else chunks[5]
    data = np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else np.zeros(0, "<f4"))
    count = int(np.prod(shape, dtype=np.int64))
    if data.size != count:
        raise CaffemodelError(
            f"{reader.path}: a blob of shape {shape} holds {data.size} values instead of {count}")
    return BlobData(shape, data.astype(np.float32).reshape(shape), bool(legacy))


# Layer message layouts: (name field, type field, blobs field, type is an enum)
_V2_LAYER = (1, 2, 7)
_V1_LAYER = (4, 5, 6)
_V0_LAYER = (1, 2, 50)


def _read_layer(reader, span, layout, v1_enum_names):
    name_f, type_f, blobs_f = layout
    name, type_name, blobs = "", "", []
    for number, wire, value in reader.fields(*span):
        if number == name_f and wire == _LEN:
            name = reader.string(value)
        elif number == type_f:
            if wire == _LEN:
                type_name = reader.string(value)
            elif wire == _VARINT:
                type_name = v1_enum_names.get(value, str(value))
        elif number == blobs_f and wire == _LEN:
            blobs.append(_read_blob(reader, *value))
        elif layout is _V1_LAYER and number == 1 and wire == _LEN:
            v0 = _read_layer(reader, value, _V0_LAYER, v1_enum_names)
            name, type_name, blobs = name or v0.name, type_name or v0.type, blobs or v0.blobs
    return LayerWeights(name, type_name, blobs)


def _v1_enum_names():
    from .upgrade import V1_TYPE_NUMBERS
    return {number: name for name, number in V1_TYPE_NUMBERS.items()}


def read_caffemodel(path):
    """Return the list of LayerWeights stored in a caffemodel, in file order."""
    try:
        with open(path, "rb") as f:
            buf = memoryview(f.read())
    except OSError as e:
        raise CaffemodelError(f"cannot read caffemodel '{path}': {e.strerror}") from None
    reader = _Reader(buf, path)
    enum_names = _v1_enum_names()
    layers = []
    for number, wire, value in reader.fields(0, len(buf)):
        if number == 100 and wire == _LEN:
            layers.append(_read_layer(reader, value, _V2_LAYER, enum_names))
        elif number == 2 and wire == _LEN:
            layers.append(_read_layer(reader, value, _V1_LAYER, enum_names))
    if not layers and len(buf) > 0:
        raise CaffemodelError(f"{path}: no layers found; is this a .caffemodel file?")
    return layers


# ----------------------------------------------------------------------------- writing
def _varint(value):
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(number, payload):
    return _varint((number << 3) | _LEN) + _varint(len(payload)) + payload


def _blob_bytes(array):
    array = np.asarray(array)
    dims = b"".join(_varint(int(d)) for d in array.shape)
    shape = _len_field(1, dims) if array.shape else b""
    data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return _len_field(7, shape) + _len_field(5, data)


def caffemodel_bytes(layers, net_name=""):
    """Serialise ``[(name, type, [arrays])]`` as a V2 NetParameter (name, type, blobs only)."""
    parts = [_len_field(1, net_name.encode())] if net_name else []
    for name, type_name, arrays in layers:
        body = _len_field(1, name.encode()) + _len_field(2, type_name.encode())
        body += b"".join(_len_field(7, _blob_bytes(a)) for a in arrays)
        parts.append(_len_field(100, body))
    return b"".join(parts)


def write_atomically(path, payload):
    """Write to a temporary file next to ``path`` and rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CaffemodelError(f"cannot write '{path}': directory '{directory}' does not exist")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_caffemodel(path, layers, net_name=""):
    write_atomically(path, caffemodel_bytes(layers, net_name))
