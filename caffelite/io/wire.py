"""The protobuf wire format, for the two files whose payload is mostly floats:
caffemodels and solverstates.  Packed floats go through ``np.frombuffer`` /
``tobytes`` instead of per-element protobuf calls.

Field numbers of BlobProto: num=1, channels=2, height=3, width=4 (legacy shape),
data=5, diff=6 (packed float), shape=7 (BlobShape, dim=1 packed int64),
double_data=8, double_diff=9.
"""
from dataclasses import dataclass

import numpy as np

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
    LevelDB's); ``fail(message)`` makes the exception for one that is cut off at
    ``end`` or too long."""
    result = shift = 0
    while True:
        if pos >= end:
            raise fail(f"a varint runs past the end at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise fail(f"a varint is too long at byte {pos}")


class WireReader:
    """Walks protobuf messages inside one memoryview; ``fail(what)`` makes the error."""

    def __init__(self, buf, fail):
        self.buf = buf
        self.fail = fail

    def varint(self, pos, end):
        return read_varint(self.buf, pos, end, self.fail)

    def fields(self, start, end):
        """Yield (field number, wire type, value); LEN/I32/I64 values are (start, end)."""
        pos = start
        while pos < end:
            key, pos = self.varint(pos, end)
            number, wire = key >> 3, key & 7
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
            key, pos = self.varint(pos, end)
            inner, wire = key >> 3, key & 7
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
            length, pos = self.varint(pos, end)
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
        return self.bytes_of(span).decode("utf-8", errors="replace")

    def packed_varints(self, span):
        out = []
        pos, end = span
        while pos < end:
            value, pos = self.varint(pos, end)
            out.append(value)
        return out


def signed(value, bits=64):
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def read_blob(reader, start, end, lazy=False):
    """One BlobProto: shape (legacy 4-D dims win, as in Caffe), data and diff as float32,
    or float64 from ``double_data``/``double_diff`` when present (the reader casts them
    to its net's type).  Values that do not fit the shape
    are an error; with ``lazy`` the error is kept in ``problem`` instead, for Caffe
    checks them only in Blob::FromProto, when the blob is copied."""
    legacy, dims = {}, []
    chunks = {5: [], 6: [], 8: [], 9: []}
    for number, wire, value in reader.fields(start, end):
        if number in (1, 2, 3, 4) and wire == VARINT:
            legacy[number] = signed(value)
        elif number == 7 and wire == LEN:
            for n2, w2, v2 in reader.fields(*value):
                if n2 == 1:
                    raw = reader.packed_varints(v2) if w2 == LEN else [v2]
                    dims.extend(signed(d) for d in raw)
        elif number in chunks and wire in (LEN, I32, I64):
            dtype = "<f4" if number in (5, 6) else "<f8"
            chunks[number].append(np.frombuffer(reader.buf[value[0]:value[1]], dtype=dtype))
    shape = tuple(legacy.get(i, 0) for i in (1, 2, 3, 4)) if legacy else tuple(dims)
    count = int(np.prod(shape, dtype=np.int64))

    def join(single, double):
        parts = chunks[double] if sum(p.size for p in chunks[double]) else chunks[single]
        if not parts:
            return None
        values = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if values.size != count:
            raise _BlobValues(f"a blob of shape {shape} holds {values.size} values "
                              f"instead of {count}")
        return values.astype(values.dtype.newbyteorder("=")).reshape(shape)

    try:
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
