"""Read and write ``.caffemodel`` weights straight from the protobuf wire format.

Only layer names, types and blobs are read, whatever the dialect (V2 ``layer`` = 100,
V1 ``layers`` = 2, V0 ``layers.layer``): the parameter messages of BVLC Caffe and of
the DeepLab forks reuse the same field numbers for different things, so parsing them
with one schema would silently misread some.  Packed floats become numpy arrays with
``frombuffer`` (no per-element Python), so a 170 MB file loads in a fraction of a second.
A file with V1 ``layers`` ignores its V2 ``layer`` entries, as Caffe's upgrade does; an
empty file is an error.

``Net.save`` and solver snapshots write what the fork's Net::ToProto writes (the net
name, its input names, each layer's own LayerParameter with its blobs; see
``net_proto_bytes``), minus the fields that other Caffe dialects misread (``_portable``:
the fork's own messages 143-151).  ``caffemodel_bytes`` / ``write_caffemodel`` write
names, types and blobs only.
"""
import os
from dataclasses import dataclass, field

import numpy as np

from ..log import logger
from . import file_kind
from .wire import LEN, VARINT, BlobData, WireReader, blob_bytes, len_field, net_bytes, \
    read_blob, signed  # noqa: F401


class CaffemodelError(ValueError):
    pass


@dataclass
class LayerWeights:
    name: str
    type: str
    blobs: list = field(default_factory=list)
    v0: "LayerWeights | None" = None     # a V1 entry's V0 ``layer`` block


# Layer message layouts: (name field, type field, blobs field)
_V2_LAYER = (1, 2, 7)
_V1_LAYER = (4, 5, 6)
_V0_LAYER = (1, 2, 50)


def _read_layer(reader, span, layout, v1_enum_names, into=None):
    """The layer message at ``span``; ``into`` an earlier occurrence of the same
    (non-repeated) message, which this one merges into as protobuf merges: the fields
    it has replace, its blobs are added."""
    name_f, type_f, blobs_f = layout
    layer = into or LayerWeights("", "")
    for number, wire, value in reader.fields(*span):
        if number == name_f and wire == LEN:
            layer.name = reader.string(value)
        elif number == type_f and layout is not _V1_LAYER and wire == LEN:
            layer.type = reader.string(value)
        elif number == type_f and layout is _V1_LAYER and wire == VARINT:
            # a number outside V1's LayerType is an unknown field to protobuf
            layer.type = v1_enum_names.get(signed(value, 32), layer.type)
        elif number == blobs_f and wire == LEN:
            layer.blobs.append(read_blob(reader, *value, lazy=True))
        elif layout is _V1_LAYER and number == 1 and wire == LEN:
            layer.v0 = _read_layer(reader, value, _V0_LAYER, v1_enum_names, into=layer.v0)
    return layer


def _v0_upgraded(v1_layers):
    """Caffe's UpgradeV0Net, for weights: once any entry holds a V0 block the whole net is
    V0, and UpgradeV0LayerParameter clears each entry, taking name, type and blobs from
    its V0 block only (an entry without one keeps none)."""
    if not any(layer.v0 is not None for layer in v1_layers):
        return v1_layers
    return [layer.v0 or LayerWeights("", "") for layer in v1_layers]


def _v1_enum_names():
    """V1 LayerType numbers -> names, as the schema has them (BVLC's and DeepLab-v1's)."""
    from ..proto import caffe_pb2
    enum = caffe_pb2.V1LayerParameter.DESCRIPTOR.enum_types_by_name["LayerType"]
    return {value.number: value.name for value in enum.values}


def read_caffemodel(path):
    """Return the list of LayerWeights stored in a caffemodel, in file order (the V1
    ``layers`` only, when the file also has V2 ``layer`` entries).  A blob whose values
    do not fit its shape has ``data`` None and the reason in ``problem`` (Caffe checks
    that only for the layers it copies)."""
    try:
        with open(path, "rb") as f:
            buf = memoryview(f.read())
    except OSError as e:
        raise CaffemodelError(f"cannot read caffemodel '{path}': {e.strerror}") from None
    if len(buf) == 0:
        # Caffe parses an empty file as a net without layers and copies nothing: the
        # net would silently keep its initial weights. Empty = an interrupted write.
        raise CaffemodelError(f"{path}: the file is empty (0 bytes), not a caffemodel")
    reader = WireReader(buf, lambda what: CaffemodelError(
        f"{path}: truncated or corrupt caffemodel ({what}){_kind_hint(buf)}"))
    enum_names = _v1_enum_names()
    v2_layers, v1_layers = [], []
    for number, wire, value in reader.fields(0, len(buf)):
        if number == 100 and wire == LEN:
            v2_layers.append(_read_layer(reader, value, _V2_LAYER, enum_names))
        elif number == 2 and wire == LEN:
            v1_layers.append(_read_layer(reader, value, _V1_LAYER, enum_names))
    if v1_layers:                       # ReadNetParamsFromBinaryFileOrDie upgrades
        _log_upgrades(path, v1_layers)
        v1_layers = _v0_upgraded(v1_layers)
    # Caffe's V1 upgrade replaces the whole layer list: V2 entries beside V1 ones are dropped.
    layers = v1_layers or v2_layers
    if not layers:
        raise CaffemodelError(f"{path}: no layers found; is this a .caffemodel file?"
                              f"{_kind_hint(buf)}")
    return layers


def _kind_hint(buf):
    """What a file that is no caffemodel seems to be (swapped --model and --weights, a
    failed download ...)."""
    head = bytes(buf[:4096])
    hint = file_kind.download_or_archive_hint(head)
    if hint:
        return hint
    if head[:1] == b"\x08":           # field 1 as a number: SolverState's iter
        return " (this looks like a .solverstate: resume from it with --snapshot)"
    if file_kind.is_text(head):
        return " (this is a text file, a prototxt perhaps, not a binary .caffemodel)"
    return ""


def _log_upgrades(path, v1_layers):
    from .upgrade import log_upgrade_done, log_upgrade_start
    kinds = (["V0"] if any(layer.v0 is not None for layer in v1_layers) else []) + ["V1"]
    for kind in kinds:
        log_upgrade_start(kind, path)
        log_upgrade_done(kind)


_LAYER_BLOBS_FIELD = 7


def _portable(number):
    """Whether a LayerParameter field number may be written to a weights file. Not the
    fork's own messages (interp_param 143 ... mat_read_param 151): BVLC Caffe and
    OpenCV read 143-148 as input/crop/parameter/recurrent/swish/clip params, and
    mat_write_param's prefix string, read as a BlobShape, makes their parse of the whole
    file fail. Not our text-only renumberings (1000 and up) either. Readers take layer
    parameters from the prototxt and only the blobs from the weights."""
    return not (143 <= number <= 151 or number >= 1000)


def layer_bytes(layer_param, blobs):
    """A LayerParameter with ``blobs`` (arrays or ``(data, diff)`` pairs) in place of
    its own, serialised in field-number order as Caffe's Layer::ToProto + protobuf do:
    the fields before ``blobs`` (7), the blobs, then the fields after, without the
    fields that other Caffe dialects misread (``_portable``)."""
    from ..proto import caffe_pb2
    head, tail = caffe_pb2.LayerParameter(), caffe_pb2.LayerParameter()
    head.CopyFrom(layer_param)
    tail.CopyFrom(layer_param)
    for fd, _ in layer_param.ListFields():
        if fd.number >= _LAYER_BLOBS_FIELD:
            head.ClearField(fd.name)
        if fd.number <= _LAYER_BLOBS_FIELD or not _portable(fd.number):
            tail.ClearField(fd.name)
    # A ClearField keeps the unknown fields (those of a binary-parsed LayerParameter), and
    # protobuf writes them after the known ones: the tail writes them, the head must not.
    unknown = _unknown_fields_bytes(layer_param)
    head_bytes = head.SerializeToString()
    if unknown and head_bytes.endswith(unknown):
        head_bytes = head_bytes[:-len(unknown)]
    body = [head_bytes]
    for blob in blobs:
        data, diff = blob if isinstance(blob, tuple) else (blob, None)
        body.append(len_field(_LAYER_BLOBS_FIELD, blob_bytes(data, diff, is_double(data))))
    body.append(tail.SerializeToString())
    return b"".join(body)


def _unknown_fields_bytes(message):
    """The serialised unknown fields of ``message`` (its known fields cleared)."""
    rest = type(message)()
    rest.CopyFrom(message)
    for fd, _ in message.ListFields():
        rest.ClearField(fd.name)
    return rest.SerializeToString()


def is_double(array):
    """Whether ``array`` is a blob of a double net (Blob<double>::ToProto writes
    double_data)."""
    return np.asarray(array).dtype == np.float64


def net_proto_bytes(net_name, inputs, layers):
    """Caffe's Net::ToProto of the fork: name (1), the net input names (3), then one
    ``layer`` (100) per ``(LayerParameter, blobs)``."""
    parts = [len_field(1, net_name.encode("utf-8"))]
    parts += [len_field(3, name.encode("utf-8")) for name in inputs]
    parts += [len_field(100, layer_bytes(lp, blobs)) for lp, blobs in layers]
    return b"".join(parts)


def caffemodel_bytes(layers, net_name=""):
    """Serialise ``[(name, type, [arrays])]`` as a V2 NetParameter (name, type, blobs only)."""
    return net_bytes(layers, net_name)


def write_atomically(path, payload):
    """Write to a temporary file next to ``path`` and rename it into place."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    write_file_atomically(path, write)


# Caffe's ReadProtoFromBinaryFile (and OpenCV's importer) read at most INT_MAX bytes.
PROTO_READ_LIMIT = 2**31 - 1


def write_proto_atomically(path, payload):
    """A binary protobuf file (caffemodel, solverstate, mean), written atomically; one
    larger than Caffe can read is written, with a warning."""
    if len(payload) > PROTO_READ_LIMIT:
        logger.warning("%s is %d bytes: Caffe and OpenCV read binary protobuf files of at "
                       "most 2 GB - 1 byte (%d), so only caffelite can read it back",
                       path, len(payload), PROTO_READ_LIMIT)
    write_atomically(path, payload)


def write_file_atomically(path, write):
    """``write(temporary path)`` makes the file next to ``path``; it is then renamed
    into place, so a failure never leaves ``path`` half-written."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CaffemodelError(f"cannot write '{path}': directory '{directory}' does not exist")
    if os.path.isdir(path):
        raise CaffemodelError(f"cannot write '{path}': it is a directory")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_caffemodel(path, layers, net_name=""):
    write_proto_atomically(path, caffemodel_bytes(layers, net_name))


# ------------------------------------------------------------------- HDF5 weights
def hdf5_weight_layers(f, path, wanted, error=CaffemodelError):
    """The layers of Caffe's HDF5 weights (``Net::ToHDF5``; read by
    ``CopyTrainedLayersFromHDF5``): (name, group) for each member of the file's ``data``
    group, in the file's order.  The group of a layer named in ``wanted`` is checked to
    be one (of datasets ``0``, ``1`` … read with ``hdf5_weight_blob``); other layers,
    which Caffe ignores unopened, come with None.  ``f``: the open h5py File.  A file
    of another layout is refused naming the file and the member, where h5py would
    give an AttributeError or a member's row count would pass for its blob count.
    ``error``: the exception class raised (the Net passes its NetError)."""
    import h5py
    if "data" not in f:
        hint = (" (this is an HDF5 solverstate: resume from it with --snapshot)"
                if "history" in f and "iter" in f else "")
        raise error(f"{path}: not a Caffe HDF5 weights file (no 'data' group){hint}")
    data = f["data"]
    if not isinstance(data, h5py.Group):
        raise error(
            f"{path}: not a Caffe HDF5 weights file: 'data' is {_h5_member(data)}, not "
            f"the group of layers that Caffe writes (data/<layer>/0, data/<layer>/1 …)")
    for name in data:
        if name not in wanted:
            yield name, None
            continue
        group = _h5_get(data, name, path, f"layer '{name}' (data/{name})", error)
        if not isinstance(group, h5py.Group):
            raise error(
                f"{path}: layer '{name}' (data/{name}) is {_h5_member(group)}, not a group "
                f"of blobs (data/{name}/0, data/{name}/1 …, as Caffe writes them)")
        yield name, group


def hdf5_weight_blob(group, j, path, name, error=CaffemodelError):
    """Blob ``j`` of layer ``name`` (``group``, from ``hdf5_weight_layers``) as an array:
    a dataset of floats or integers, which is what Caffe's hdf5_load_nd_dataset reads."""
    import h5py
    where = f"layer '{name}' blob {j} (data/{name}/{j})"
    dataset = _h5_get(group, str(j), path, where, error)
    if not isinstance(dataset, h5py.Dataset):
        raise error(f"{path}: {where} is {_h5_member(dataset)}, not a dataset of the "
                    f"blob's values")
    if dataset.dtype.kind not in "fiu":
        raise error(f"{path}: {where} holds {dataset.dtype} values; Caffe reads float "
                    f"and integer datasets only")
    try:
        return dataset[()]
    except (OSError, ValueError, TypeError) as e:
        raise error(f"{path}: {where}: cannot read it ({e})") from None


def _h5_get(group, key, path, where, error):
    try:
        return group[key]
    except (KeyError, OSError, ValueError) as e:      # a broken or external link
        raise error(f"{path}: {where}: cannot open it ({e})") from None


def _h5_member(obj):
    """How a message calls an HDF5 member: 'a group', 'a dataset of shape (…)' …"""
    import h5py
    if isinstance(obj, h5py.Group):
        return "a group"
    if isinstance(obj, h5py.Dataset):
        return f"a dataset of shape {tuple(obj.shape)}"
    return f"an HDF5 {type(obj).__name__}"
