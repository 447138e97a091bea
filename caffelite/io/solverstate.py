"""Read and write Caffe's ``.solverstate`` (the ``SolverState`` message) and snapshot
caffemodels, straight from the protobuf wire format.

A solverstate holds ``iter`` (1), ``learned_net`` (2, the caffemodel written next to
it), one ``history`` BlobProto (3) per history buffer and ``current_step`` (4).
History blobs are as large as the net, so floats go through ``np.frombuffer`` /
``tobytes`` instead of per-element protobuf calls; states written by real Caffe
(legacy num/channels/height/width shapes included) read back the same way.

caffelite adds one field that Caffe does not know, ``EXTENSION_FIELD`` (a JSON
document: the random generator's state and the states of layers that keep some
outside their blobs), so that a resumed run continues bit-identically.  Caffe's
protobuf parser keeps unknown fields and ignores them, so Caffe still reads our
files, and files without the field (Caffe's) restore as Caffe restores them.
"""
import json
from dataclasses import dataclass, field

import numpy as np

from .caffemodel import write_atomically


class SolverStateError(ValueError):
    pass


EXTENSION_FIELD = 9000

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


@dataclass
class BlobArray:
    shape: tuple
    data: np.ndarray
    diff: np.ndarray = None
    legacy_shape: bool = False   # shape came from num/channels/height/width


@dataclass
class SolverStateData:
    iter: int = 0
    learned_net: str = None
    current_step: int = 0
    history: list = field(default_factory=list)
    extension: dict = None


# ----------------------------------------------------------------------------- reading
class _Wire:
    def __init__(self, buf, path):
        self.buf = buf
        self.path = path

    def fail(self, what):
        return SolverStateError(f"{self.path}: corrupt or truncated solverstate ({what})")

    def varint(self, pos, end):
        result = shift = 0
        while True:
            if pos >= end:
                raise self.fail("a varint runs past the end")
            b = self.buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result, pos
            shift += 7
            if shift > 70:
                raise self.fail("a varint is too long")

    def fields(self, pos, end):
        """Yield (field number, wire type, value); LEN/I32/I64 values are (start, end)."""
        while pos < end:
            key, pos = self.varint(pos, end)
            number, wire = key >> 3, key & 7
            if wire == _VARINT:
                value, pos = self.varint(pos, end)
            elif wire in (_LEN, _I32, _I64):
                if wire == _LEN:
                    length, pos = self.varint(pos, end)
                else:
                    length = 4 if wire == _I32 else 8
                if pos + length > end:
                    raise self.fail(f"field {number} runs past the end")
                value = (pos, pos + length)
                pos += length
            else:
                raise self.fail(f"unsupported wire type {wire} in field {number}")
            yield number, wire, value

    def bytes_of(self, span):
        return bytes(self.buf[span[0]:span[1]])


def _signed(value, bits=64):
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def _read_blob(w, start, end):
    legacy, dims = {}, []
    chunks = {5: [], 6: [], 8: [], 9: []}    # data, diff (float32); double_data, double_diff
    for number, wire, value in w.fields(start, end):
        if number in (1, 2, 3, 4) and wire == _VARINT:
            legacy[number] = _signed(value)
        elif number == 7 and wire == _LEN:
            for n2, w2, v2 in w.fields(*value):
                if n2 != 1:
                    continue
                if w2 == _LEN:
                    pos, stop = v2
                    while pos < stop:
                        d, pos = w.varint(pos, stop)
                        dims.append(_signed(d))
                else:
                    dims.append(_signed(v2))
        elif number in chunks and wire in (_LEN, _I32, _I64):
            dtype = "<f4" if number in (5, 6) else "<f8"
            chunks[number].append(np.frombuffer(w.buf[value[0]:value[1]], dtype=dtype))
    shape = tuple(legacy.get(i, 0) for i in (1, 2, 3, 4)) if legacy else tuple(dims)
    count = int(np.prod(shape, dtype=np.int64))

    def join(single, double):
        parts = chunks[double] if sum(p.size for p in chunks[double]) else chunks[single]
        if not parts:
            return None
        values = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if values.size != count:
            raise w.fail(f"a blob of shape {shape} holds {values.size} values, not {count}")
        return values.astype(np.float32).reshape(shape)

    data = join(5, 8)
    if data is None:
        if count:
            raise w.fail(f"a blob of shape {shape} has no data")
        data = np.zeros(shape, np.float32)
    return BlobArray(shape, data, join(6, 9), bool(legacy))


def read_solverstate(path):
    try:
        with open(path, "rb") as f:
            buf = memoryview(f.read())
    except OSError as e:
        raise SolverStateError(f"cannot read solverstate '{path}': {e.strerror}") from None
    w = _Wire(buf, path)
    state = SolverStateData()
    for number, wire, value in w.fields(0, len(buf)):
        if number == 1 and wire == _VARINT:
            state.iter = _signed(value)
        elif number == 2 and wire == _LEN:
            state.learned_net = w.bytes_of(value).decode("utf-8", "replace")
        elif number == 3 and wire == _LEN:
            state.history.append(_read_blob(w, *value))
        elif number == 4 and wire == _VARINT:
            state.current_step = _signed(value)
        elif number == EXTENSION_FIELD and wire == _LEN:
            try:
                state.extension = json.loads(w.bytes_of(value).decode("utf-8"))
            except ValueError:
                raise w.fail("the caffelite extension is not valid JSON") from None
    return state


# ----------------------------------------------------------------------------- writing
def _varint(value):
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


def _key(number, wire):
    return _varint((number << 3) | wire)


def _len_field(number, payload):
    return _key(number, _LEN) + _varint(len(payload)) + payload


def blob_bytes(data, diff=None):
    """A BlobProto as Caffe's Blob::ToProto writes it: packed float data (5), optional
    diff (6), then the shape (7), in Caffe's field order."""
    data = np.asarray(data)
    out = b""
    if data.size:
        out += _len_field(5, np.ascontiguousarray(data, dtype="<f4").tobytes())
        if diff is not None:
            out += _len_field(6, np.ascontiguousarray(diff, dtype="<f4").tobytes())
    if data.ndim:
        out += _len_field(7, _len_field(1, b"".join(_varint(int(d)) for d in data.shape)))
    return out


def solverstate_bytes(iter, learned_net, history, current_step, extension=None):
    out = _key(1, _VARINT) + _varint(int(iter))
    out += _len_field(2, learned_net.encode("utf-8"))
    out += b"".join(_len_field(3, blob_bytes(h)) for h in history)
    out += _key(4, _VARINT) + _varint(int(current_step))
    if extension is not None:
        out += _len_field(EXTENSION_FIELD, json.dumps(extension, default=_json_default,
                                                      sort_keys=True).encode("utf-8"))
    return out


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("latin-1")
    raise TypeError(f"cannot store a {type(value).__name__} in a solverstate")


def write_solverstate(path, iter, learned_net, history, current_step, extension=None):
    write_atomically(path, solverstate_bytes(iter, learned_net, history, current_step,
                                             extension))


def snapshot_model_bytes(layers, net_name=""):
    """A caffemodel from ``[(name, type, [(data, diff_or_None), ...])]`` (name, type and
    blobs per layer, as ``Net.save`` writes; diffs included where given)."""
    parts = [_len_field(1, net_name.encode("utf-8"))] if net_name else []
    for name, type_name, blobs in layers:
        body = _len_field(1, name.encode("utf-8")) + _len_field(2, type_name.encode("utf-8"))
        body += b"".join(_len_field(7, blob_bytes(d, g)) for d, g in blobs)
        parts.append(_len_field(100, body))
    return b"".join(parts)


def write_snapshot_model(path, layers, net_name=""):
    write_atomically(path, snapshot_model_bytes(layers, net_name))
