"""Read and write Caffe's ``.solverstate`` (the ``SolverState`` message), straight from
the protobuf wire format (the snapshot's caffemodel is ``Net.to_proto_bytes``).

A solverstate holds ``iter`` (1), ``learned_net`` (2, the caffemodel written next to
it), one ``history`` BlobProto (3) per history buffer and ``current_step`` (4).
History blobs are as large as the net, so floats go through ``np.frombuffer`` /
``tobytes`` instead of per-element protobuf calls; states written by real Caffe
(legacy num/channels/height/width shapes included) read back the same way.

``snapshot_format: HDF5`` states (``.solverstate.h5``) hold the same as datasets, as
SGDSolver's SnapshotSolverStateToHDF5 writes them with HDF5's lite API: scalar int
``iter`` and ``current_step``, a fixed-length string ``learned_net``, and a group
``history`` with one float dataset per buffer, named ``0``, ``1``, ...

caffelite adds one field that Caffe does not know, ``EXTENSION_FIELD`` (a JSON
document: the random generator's state and the states of layers that keep some
outside their blobs), so that a resume asked to continue them
(``Solver.restore(path, continue_streams=True)``) goes on bit-identically; a default
resume ignores it, as Caffe does.  Caffe's protobuf parser keeps unknown fields and
ignores them, so Caffe still reads our files.
"""
import json
from dataclasses import dataclass, field

import numpy as np

from . import file_kind
from .caffemodel import is_double, write_file_atomically, write_proto_atomically
from .wire import LEN, VARINT, BlobData, WireReader, blob_bytes, key, len_field, \
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


NET_LAYER_FIELD = 100          # NetParameter.layer: a caffemodel given as a solverstate


def read_solverstate(path):
    try:
        with open(path, "rb") as f:
            buf = memoryview(f.read())
    except OSError as e:
        raise SolverStateError(f"cannot read solverstate '{path}': {e.strerror}") from None
    if not len(buf):
        raise SolverStateError(f"{path}: the file is empty (0 bytes), not a solverstate")
    w = WireReader(buf, lambda what: SolverStateError(
        f"{path}: corrupt or truncated solverstate ({what}){_kind_hint(buf)}"))
    state = SolverStateData()
    for number, wire, value in w.fields(0, len(buf)):
        if number == NET_LAYER_FIELD and wire == LEN:
            raise SolverStateError(f"{path}: this is a caffemodel (a net's weights), not a "
                                   f"solverstate; give it with --weights")
        if number == 1 and wire == VARINT:
            state.iter = signed(value, 32)
        elif number == 2 and wire == LEN:
            state.learned_net = w.string(value)
        elif number == 3 and wire == LEN:
            state.history.append(read_blob(w, *value))
        elif number == 4 and wire == VARINT:
            state.current_step = signed(value, 32)
        elif number == EXTENSION_FIELD and wire == LEN:
            try:
                state.extension = json.loads(w.bytes_of(value).decode("utf-8"))
            except ValueError:
                raise w.fail("the caffelite extension is not valid JSON") from None
    return state


def _kind_hint(buf):
    """What a file that is no solverstate seems to be (a failed download, an HDF5
    state without the .h5 suffix, a prototxt ...)."""
    head = bytes(buf[:4096])
    hint = file_kind.download_or_archive_hint(head)
    if hint:
        return hint
    if file_kind.is_hdf5(head):
        return (" (this is an HDF5 file: Caffe reads a solverstate as HDF5 only when its "
                "name ends in .h5, as snapshot_format: HDF5 names them)")
    if file_kind.is_text(head):
        return " (this is a text file, not a binary .solverstate)"
    return ""


# ----------------------------------------------------------------------------- writing
def solverstate_bytes(iter, learned_net, history, current_step, extension=None):
    out = key(1, VARINT) + varint(_int32("iter", iter))
    out += len_field(2, learned_net.encode("utf-8", "surrogateescape"))
    out += b"".join(len_field(3, blob_bytes(h, double=is_double(h))) for h in history)
    out += key(4, VARINT) + varint(_int32("current_step", current_step))
    if extension is not None:
        out += len_field(EXTENSION_FIELD, json.dumps(extension, default=_json_default,
                                                      sort_keys=True).encode("utf-8"))
    return out


def _int32(name, value):
    """SolverState's iter and current_step are int32: a larger value would read back
    as another number in Caffe."""
    value = int(value)
    if not -2**31 <= value < 2**31:
        raise SolverStateError(f"cannot write a solverstate with {name} {value}: Caffe "
                               f"keeps it in 32 bits")
    return value


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("latin-1")
    raise TypeError(f"cannot store a {type(value).__name__} in a solverstate")


def write_solverstate(path, iter, learned_net, history, current_step, extension=None):
    write_proto_atomically(path, solverstate_bytes(iter, learned_net, history,
                                                   current_step, extension))


# ------------------------------------------------------------------------------- HDF5
# caffelite's extension in an HDF5 state: one more string dataset at the root (Caffe's
# restore reads its own names only, and counts the links of 'history' alone).
HDF5_EXTENSION = "caffelite_extension"


def write_solverstate_hdf5(path, iter, learned_net, history, current_step,
                           extension=None):
    h5py = require_h5py()

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            # hdf5_save_int: H5LTmake_dataset_int of rank 1, one element
            f.create_dataset("iter", data=np.array([iter], np.int32))
            _string_dataset(h5py, f, "learned_net", learned_net)
            f.create_dataset("current_step", data=np.array([current_step], np.int32))
            group = f.create_group("history")
            for i, h in enumerate(history):
                group.create_dataset(str(i), data=np.asarray(
                    h, np.float64 if is_double(h) else np.float32))
            if extension is not None:
                _string_dataset(h5py, f, HDF5_EXTENSION, json.dumps(
                    extension, default=_json_default, sort_keys=True))
    write_file_atomically(path, write)


def _string_dataset(h5py, f, name, text):
    """A scalar fixed-length, null-terminated string, as H5LTmake_dataset_string makes
    (Caffe's hdf5_load_string reads that kind, not h5py's variable-length strings)."""
    data = text.encode("utf-8", "surrogateescape") + b"\0"
    kind = h5py.h5t.C_S1.copy()
    kind.set_size(len(data))
    kind.set_strpad(h5py.h5t.STR_NULLTERM)
    dataset = h5py.h5d.create(f.id, name.encode("utf-8"), kind,
                              h5py.h5s.create(h5py.h5s.SCALAR))
    dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, np.array(data, dtype=f"S{len(data)}"),
                  mtype=kind)


def _read_string(dataset):
    value = dataset[()]
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, bytes):
        value = value.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    return str(value)


def _read_int(path, f, name):
    """hdf5_load_int: the one integer of a dataset (Caffe writes shape (1,); a scalar
    is read too)."""
    if not hasattr(f[name], "shape"):                   # a group, not a dataset
        raise SolverStateError(f"{path}: '{name}' must be a dataset holding one integer "
                               f"(it is a group)")
    values = np.asarray(f[name][()]).reshape(-1)
    if values.size != 1 or values.dtype.kind not in "iu":
        raise SolverStateError(f"{path}: '{name}' must hold one integer (it holds "
                               f"{values.size} value(s) of type {values.dtype})")
    return int(values[0])


def read_solverstate_hdf5(path):
    """SGDSolver::RestoreSolverStateFromHDF5's reading: iter, learned_net when there is
    one, current_step, and the history datasets 0 .. n-1 of the 'history' group."""
    h5py = require_h5py()
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        hint = file_kind.download_or_archive_hint(file_kind.read_head(path))
        raise SolverStateError(f"cannot read HDF5 solverstate '{path}': {e}{hint}") from None
    with f:
        for name in ("iter", "current_step", "history"):
            if name not in f:
                hint = (" (these are HDF5 weights, a .caffemodel.h5: give them with "
                        "--weights)" if "data" in f else "")
                raise SolverStateError(f"{path}: an HDF5 solverstate needs '{name}' (it has "
                                       f"{', '.join(sorted(f)) or 'nothing'}){hint}")
        state = SolverStateData(iter=_read_int(path, f, "iter"),
                                current_step=_read_int(path, f, "current_step"))
        if "learned_net" in f:
            state.learned_net = _read_string(f["learned_net"])
        group = f["history"]
        for i in range(len(group)):
            if str(i) not in group:
                raise SolverStateError(f"{path}: history has {len(group)} datasets but no "
                                       f"'{i}'")
            values = np.asarray(group[str(i)][()])
            values = values.astype(np.float64 if values.dtype == np.float64 else np.float32)
            state.history.append(BlobData(tuple(values.shape), values.reshape(-1)))
        if HDF5_EXTENSION in f:
            try:
                state.extension = json.loads(_read_string(f[HDF5_EXTENSION]))
            except ValueError:
                raise SolverStateError(f"{path}: the caffelite extension is not valid "
                                       f"JSON") from None
    return state


def require_h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError("HDF5 snapshots and weights need h5py: pip install h5py (or "
                          "caffelite[hdf5])") from None
    return h5py

