"""Read and write Caffe's ``.solverstate`` (the ``SolverState`` message), straight from
the protobuf wire format (the snapshot's caffemodel is ``Net.to_proto_bytes``).

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
from .wire import LEN, VARINT, WireReader, blob_bytes, key, len_field, \
    read_blob, signed, varint


class SolverStateError(ValueError):
    pass


EXTENSION_FIELD = 9000

@dataclass
class SolverStateData:
    iter: int = 0
    learned_net: str = None
    current_step: int = 0
    history: list = field(default_factory=list)
    extension: dict = None


def read_solverstate(path):
    try:
        with open(path, "rb") as f:
            buf = memoryview(f.read())
    except OSError as e:
        raise SolverStateError(f"cannot read solverstate '{path}': {e.strerror}") from None
    w = WireReader(buf, lambda what: SolverStateError(
        f"{path}: corrupt or truncated solverstate ({what})"))
    state = SolverStateData()
    for number, wire, value in w.fields(0, len(buf)):
        if number == 1 and wire == VARINT:
            state.iter = signed(value)
        elif number == 2 and wire == LEN:
            state.learned_net = w.bytes_of(value).decode("utf-8", "replace")
        elif number == 3 and wire == LEN:
            state.history.append(read_blob(w, *value))
        elif number == 4 and wire == VARINT:
            state.current_step = signed(value)
        elif number == EXTENSION_FIELD and wire == LEN:
            try:
                state.extension = json.loads(w.bytes_of(value).decode("utf-8"))
            except ValueError:
                raise w.fail("the caffelite extension is not valid JSON") from None
    return state


# ----------------------------------------------------------------------------- writing
def solverstate_bytes(iter, learned_net, history, current_step, extension=None):
    out = key(1, VARINT) + varint(int(iter))
    out += len_field(2, learned_net.encode("utf-8"))
    out += b"".join(len_field(3, blob_bytes(h)) for h in history)
    out += key(4, VARINT) + varint(int(current_step))
    if extension is not None:
        out += len_field(EXTENSION_FIELD, json.dumps(extension, default=_json_default,
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

