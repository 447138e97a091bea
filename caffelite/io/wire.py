"""The protobuf wire format, for the two files whose payload is mostly floats:
caffemodels and solverstates.  Packed floats go through ``np.frombuffer`` /
``tobytes`` instead of per-element protobuf calls.

Field numbers of BlobProto: num=1, channels=2, height=3, width=4 (legacy shape),
data=5, diff=6 (packed float), shape=7 (BlobShape, dim=1 packed int64),
double_data=8, double_diff=9.
"""
import math
from dataclasses import dataclass

import numpy as np

from ..blob import BlobShapeError, checked_shape

VARINT, I64, LEN, I32 = 0, 1, 2, 5
START_GROUP, END_GROUP = 3, 4
# protobuf's default recursion limit for nested messages and groups
MAX_NESTING = 100


@dataclass
class BlobData:
    shape: tuple
    data: np.ndarray
    diff: np.ndarray = None
    legacy_shape: bool = False   # shape came from num/channels/height/width
    problem: str = None          # lazy=True: why the values do not fit (data is None)


def read_varint(buf, pos, end, fail):
    """(value, position after it) of the base-128 varint at ``buf[pos]`` (protobuf's,
    LevelDB's): at most ten bytes, the value kept to its low 64 bits as protobuf keeps
    it; ``fail(message)`` makes the exception for one that is cut off at ``end`` or too
    long."""
    result = shift = 0
    while True:
        if pos >= end:
            raise fail(f"a varint runs past the end at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & _UINT64, pos
        shift += 7
        if shift >= 70:
            raise fail(f"a varint is longer than 10 bytes at byte {pos}")


_UINT64 = (1 << 64) - 1


class WireReader:
    """Walks protobuf messages inside one memoryview; ``fail(what)`` makes the error."""

    def __init__(self, buf, fail):
        self.buf = buf
        self.fail = fail

    def varint(self, pos, end):
        return read_varint(self.buf, pos, end, self.fail)

    def varint32(self, pos, end, what):
        """A tag or a length: protobuf's parser refuses one longer than five bytes or
        beyond 32 bits (so field numbers stay below 2**29)."""
        value, after = self.varint(pos, end)
        if after - pos > 5:
            raise self.fail(f"a {what} longer than 5 bytes at byte {pos}")
        if value >> 32:
            raise self.fail(f"a {what} beyond 32 bits at byte {pos}")
        return value, after

    def tag(self, pos, end):
        """(field number, wire type, position after the tag); field number 0 is
        refused, as protobuf refuses it."""
        key, after = self.varint32(pos, end, "field tag")
        if key >> 3 == 0:
            raise self.fail(f"field number 0 at byte {pos}")
        return key >> 3, key & 7, after

    def fields(self, start, end):
        """Yield (field number, wire type, value); LEN/I32/I64 values are (start, end)."""
        pos = start
        while pos < end:
            number, wire, pos = self.tag(pos, end)
            if wire == START_GROUP:
                # no field of caffe.proto is a group: an unknown one, skipped as
                # protobuf's parser skips it
                pos = self.skip_group(number, pos, end)
                continue
            value, pos = self._value(number, wire, pos, end)
            yield number, wire, value

    def skip_group(self, number, pos, end):
        """The position after the END_GROUP of group ``number`` whose fields start at
        ``pos``, inner groups skipped whole (nested at most as deep as protobuf's
        parser allows)."""
        open_groups = [number]
        while pos < end:
            inner, wire, pos = self.tag(pos, end)
            if wire == END_GROUP:
                if inner != open_groups[-1]:
                    raise self.fail(f"group {open_groups[-1]} ends as group {inner} at byte "
                                    f"{pos}")
                open_groups.pop()
                if not open_groups:
                    return pos
            elif wire == START_GROUP:
                if len(open_groups) >= MAX_NESTING:
                    raise self.fail(f"groups nested deeper than {MAX_NESTING} at byte {pos}")
                open_groups.append(inner)
            else:
                pos = self._value(inner, wire, pos, end)[1]
        raise self.fail(f"group {number} has no end")

    def _value(self, number, wire, pos, end):
        """(value, position after it) of a VARINT, or of a LEN/I32/I64 field as its
        (start, end) span."""
        if wire == VARINT:
            return self.varint(pos, end)
        if wire == LEN:
            length, pos = self.varint32(pos, end, "length")
        elif wire in (I32, I64):
            length = 4 if wire == I32 else 8
        else:
            raise self.fail(f"unsupported wire type {wire} in field {number} at byte {pos}")
        if pos + length > end:
            raise self.fail(f"field {number} of length {length} runs past the end at byte "
                            f"{pos}")
        return (pos, pos + length), pos + length

    def bytes_of(self, span):
        return bytes(self.buf[span[0]:span[1]])

    def string(self, span):
        """A string field as text; bytes that are not UTF-8 become lone surrogates (as
        os.fsdecode makes them), so such a name matches no layer of a prototxt and such
        a path opens the file it names."""
        return self.bytes_of(span).decode("utf-8", errors="surrogateescape")

    def packed_values(self, span, dtype, number):
        """The little-endian ``dtype`` items of a packed (or one unpacked) field; a
        length that is not a whole number of items is corrupt, as protobuf finds it."""
        size = np.dtype(dtype).itemsize
        if (span[1] - span[0]) % size:
            raise self.fail(f"field {number} of {span[1] - span[0]} bytes at byte "
                            f"{span[0]} is not a whole number of {size}-byte values")
        return np.frombuffer(self.buf[span[0]:span[1]], dtype=dtype)

    def packed_varints(self, span):
        out = []
        pos, end = span
        while pos < end:
            value, pos = self.varint(pos, end)
            out.append(value)
        return out


def signed(value, bits=64):
    """An int32/int64 field's value: its low ``bits`` bits, two's complement (protobuf
    reads the low 32 bits of a varint for an int32)."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


# BlobProto's value fields: (item type, the wire type of one unpacked item)
_VALUE_FIELDS = {5: ("<f4", I32), 6: ("<f4", I32), 8: ("<f8", I64), 9: ("<f8", I64)}


def read_blob(reader, start, end, lazy=False):
    """One BlobProto: shape (legacy 4-D dims win, as in Caffe), data and diff as float32,
    or float64 from ``double_data``/``double_diff`` when present (the reader casts them
    to its net's type).  Values that do not fit the shape
    are an error; with ``lazy`` the error is kept in ``problem`` instead, for Caffe
    checks them only in Blob::FromProto, when the blob is copied.  A field of a wire
    type its schema does not give it is an unknown field to protobuf, and skipped."""
    legacy, dims = {}, []
    chunks = {number: [] for number in _VALUE_FIELDS}
    for number, wire, value in reader.fields(start, end):
        if number in (1, 2, 3, 4) and wire == VARINT:
            legacy[number] = signed(value, 32)
        elif number == 7 and wire == LEN:
            for n2, w2, v2 in reader.fields(*value):
                if n2 == 1 and w2 in (LEN, VARINT):
                    raw = reader.packed_varints(v2) if w2 == LEN else [v2]
                    dims.extend(signed(d) for d in raw)
        elif number in chunks and wire in (LEN, _VALUE_FIELDS[number][1]):
            values = reader.packed_values(value, _VALUE_FIELDS[number][0], number)
            if values.size:
                chunks[number].append(values)
    shape = tuple(legacy.get(i, 0) for i in (1, 2, 3, 4)) if legacy else tuple(dims)
    count = math.prod(shape)

    def join(single, double):
        parts = chunks[double] or chunks[single]
        if not parts:
            return None
        values = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if values.size != count:
            raise _BlobValues(f"a blob of shape {shape} holds {values.size} values "
                              f"instead of {count}")
        return values.astype(values.dtype.newbyteorder("=")).reshape(shape)

    try:
        _check_caffe_shape(shape)
        data = join(5, 8)
        if data is None:
            if count:
                raise _BlobValues(f"a blob of shape {shape} holds no values")
            data = np.zeros(shape, np.float32)
        diff = join(6, 9)
    except _BlobValues as e:
        if not lazy:
            raise reader.fail(str(e)) from None
        return BlobData(shape, None, None, bool(legacy), problem=str(e))
    return BlobData(shape, data, diff, bool(legacy))


def _check_caffe_shape(shape):
    """Blob::Reshape's checks (``blob.checked_shape``), as a blob whose values do not
    fit."""
    try:
        checked_shape(shape)
    except BlobShapeError as e:
        raise _BlobValues(str(e)) from None


class _BlobValues(ValueError):
    """A blob's values do not fit its shape."""


# ----------------------------------------------------------------------------- writing
def varint(value):
    value &= (1 << 64) - 1          # negative int32/int64 values: ten-byte two's complement
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(number, wire):
    return varint((number << 3) | wire)


def len_field(number, payload):
    return key(number, LEN) + varint(len(payload)) + payload


def blob_bytes(data, diff=None, double=False):
    """A BlobProto as Caffe's Blob::ToProto writes it, in field-number order: packed
    float data (5), optional diff (6), then the shape (7); for a double blob
    (``double``) the shape, then double_data (8) and double_diff (9). A 0-axis blob has
    no shape field: ToProto only creates the shape while adding its dims."""
    data = np.asarray(data)
    values = b""
    if data.size:
        kind, first = ("<f8", 8) if double else ("<f4", 5)
        values += len_field(first, np.ascontiguousarray(data, dtype=kind).tobytes())
        if diff is not None:
            values += len_field(first + 1, np.ascontiguousarray(diff, dtype=kind).tobytes())
    shape = b""
    if data.ndim:
        shape = len_field(7, len_field(1, b"".join(varint(int(d)) for d in data.shape)))
    return shape + values if double else values + shape


def net_bytes(layers, net_name=""):
    """A weights-only NetParameter: ``[(name, type, [blob, ...])]`` where a blob is an
    array or a ``(data, diff)`` pair; V2 layers (100) with name, type and blobs."""
    parts = [len_field(1, net_name.encode("utf-8"))] if net_name else []
    for name, type_name, blobs in layers:
        body = len_field(1, name.encode("utf-8")) + len_field(2, type_name.encode("utf-8"))
        for blob in blobs:
            data, diff = blob if isinstance(blob, tuple) else (blob, None)
            body += len_field(7, blob_bytes(data, diff))
        parts.append(len_field(100, body))
    return b"".join(parts)
