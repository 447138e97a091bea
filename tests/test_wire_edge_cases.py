"""Wire-format corners of caffemodels and solverstates, each checked against protobuf's
own parser (caffe_pb2) reading the same bytes: fields of a wire type their schema does not
give them (unknown to protobuf), empty packed runs, 32-bit fields in long varints, odd
dimensions, merged messages, non-UTF-8 strings, and encodings protobuf refuses."""
import numpy as np
import pytest

from caffelite.io.caffemodel import CaffemodelError, layer_bytes, read_caffemodel
from caffelite.io.solverstate import SolverStateError, read_solverstate, solverstate_bytes
from caffelite.io.wire import I32, I64, LEN, VARINT, key, len_field, varint
from caffelite.proto import caffe_pb2


def f32(*values):
    return np.array(values, "<f4").tobytes()


def blob(*fields):
    return b"".join(fields)


def shape(*dims):
    return len_field(7, len_field(1, b"".join(varint(d) for d in dims)))


def v2_net(*blobs, name=b"L"):
    layer = len_field(1, name) + len_field(2, b"T") + b"".join(len_field(7, b) for b in blobs)
    return len_field(100, layer)


def read(tmp_path, payload, kind="caffemodel"):
    path = tmp_path / f"x.{kind}"
    path.write_bytes(payload)
    return (read_caffemodel if kind == "caffemodel" else read_solverstate)(str(path))


def protobuf_net(payload):
    return caffe_pb2.NetParameter.FromString(payload)


def test_float_values_sent_as_64_bit_fields_are_unknown_to_protobuf(tmp_path):
    """data/diff are floats (I32 unpacked); double_data as I32 is unknown too."""
    payload = v2_net(blob(shape(2), len_field(5, f32(1, 2)),
                          key(6, I64) + f32(3, 4),                 # diff as I64: unknown
                          key(8, I32) + f32(5)))                   # double_data as I32
    oracle = protobuf_net(payload).layer[0].blobs[0]
    assert list(oracle.data) == [1, 2] and not oracle.diff and not oracle.double_data
    [layer] = read(tmp_path, payload)
    np.testing.assert_array_equal(layer.blobs[0].data, [1, 2])
    assert layer.blobs[0].diff is None


def test_unpacked_values_of_the_right_wire_type_are_read(tmp_path):
    payload = v2_net(blob(shape(2), key(5, I32) + f32(1), key(5, I32) + f32(2),
                          key(9, I64) + np.array([7], "<f8").tobytes(),
                          key(9, I64) + np.array([8], "<f8").tobytes()))
    oracle = protobuf_net(payload).layer[0].blobs[0]
    [layer] = read(tmp_path, payload)
    np.testing.assert_array_equal(layer.blobs[0].data, oracle.data)
    np.testing.assert_array_equal(layer.blobs[0].diff, oracle.double_diff)


def test_a_packed_run_of_part_values_is_corrupt_in_words(tmp_path):
    payload = v2_net(blob(shape(1), len_field(5, f32(1) + b"\0\0")))
    with pytest.raises(Exception):
        protobuf_net(payload)
    with pytest.raises(CaffemodelError, match="field 5 of 6 bytes .* not a whole number "
                                              "of 4-byte values"):
        read(tmp_path, payload)
    state = len_field(3, blob(shape(1), len_field(5, b"\0" * 6)))
    with pytest.raises(SolverStateError, match="not a whole number"):
        read(tmp_path, state, "solverstate")


def test_an_empty_packed_diff_is_no_diff(tmp_path):
    payload = v2_net(blob(shape(2), len_field(5, f32(1, 2)), len_field(6, b"")))
    assert not protobuf_net(payload).layer[0].blobs[0].diff
    [layer] = read(tmp_path, payload)
    assert layer.blobs[0].problem is None and layer.blobs[0].diff is None
    state = read(tmp_path, len_field(3, blob(shape(2), len_field(5, f32(1, 2)),
                                             len_field(6, b""))), "solverstate")
    np.testing.assert_array_equal(state.history[0].data, [1, 2])


def test_a_dimension_of_a_fixed_width_wire_type_is_unknown_to_protobuf(tmp_path):
    dims = len_field(7, key(1, I32) + b"\1\0\0\0" + key(1, VARINT) + varint(2))
    payload = v2_net(blob(dims, len_field(5, f32(1, 2))))
    assert list(protobuf_net(payload).layer[0].blobs[0].shape.dim) == [2]
    [layer] = read(tmp_path, payload)
    assert layer.blobs[0].shape == (2,)


@pytest.mark.parametrize("dims, why", [
    ((-1, 0), "negative dimension"),
    ((2**32, 2**32), "exceeds INT_MAX"),
    ((2**31 - 1, 2**31 - 1, 0), "exceeds INT_MAX"),
])
def test_dimensions_caffe_refuses_fail_only_when_copied(tmp_path, dims, why):
    """Blob::Reshape CHECKs each dimension >= 0 and the count (up to a 0) <= INT_MAX;
    Caffe does that in FromProto, for the layers it copies."""
    payload = v2_net(blob(shape(*dims)))
    assert list(protobuf_net(payload).layer[0].blobs[0].shape.dim) == list(dims)
    [layer] = read(tmp_path, payload)
    assert layer.blobs[0].data is None and why in layer.blobs[0].problem
    with pytest.raises(SolverStateError, match=why):
        read(tmp_path, len_field(3, blob(shape(*dims))), "solverstate")


def test_a_dimension_varint_keeps_its_low_64_bits(tmp_path):
    over = bytes([0x82] + [0x80] * 8 + [0x7E])        # 2 + bits above bit 63 only
    payload = v2_net(blob(len_field(7, key(1, VARINT) + over), len_field(5, f32(1, 2))))
    assert list(protobuf_net(payload).layer[0].blobs[0].shape.dim) == [2]
    [layer] = read(tmp_path, payload)
    np.testing.assert_array_equal(layer.blobs[0].data, [1, 2])


def test_int32_fields_read_their_low_32_bits(tmp_path):
    state = (key(1, VARINT) + bytes([0xFF] * 4 + [0x0F])          # iter 0xFFFFFFFF
             + key(4, VARINT) + bytes([0x80] * 4 + [0x08]))       # current_step 2**31
    oracle = caffe_pb2.SolverState.FromString(state)
    got = read(tmp_path, state, "solverstate")
    assert (got.iter, got.current_step) == (oracle.iter, oracle.current_step) == (-1, -2**31)
    legacy = (key(1, VARINT) + varint(2**32 + 1) + key(2, VARINT) + varint(1)
              + key(3, VARINT) + varint(1) + key(4, VARINT) + varint(1))
    payload = v2_net(blob(legacy, len_field(5, f32(3))))
    assert protobuf_net(payload).layer[0].blobs[0].num == 1
    [layer] = read(tmp_path, payload)
    assert layer.blobs[0].shape == (1, 1, 1, 1) and layer.blobs[0].data.item() == 3


def test_a_solverstate_is_written_only_with_32_bit_counters():
    with pytest.raises(SolverStateError, match="iter 2147483648: Caffe keeps it in 32"):
        solverstate_bytes(2**31, "a.caffemodel", [], 0)
    oracle = caffe_pb2.SolverState.FromString(solverstate_bytes(-5, "a", [], 2**31 - 1))
    assert (oracle.iter, oracle.current_step) == (-5, 2**31 - 1)


def test_a_v0_block_given_twice_merges_as_protobuf_merges(tmp_path):
    first = len_field(1, b"conv1") + len_field(2, b"conv") + len_field(
        50, blob(shape(1), len_field(5, f32(1))))
    second = len_field(1, b"")                        # names the layer '' again
    payload = len_field(2, len_field(4, b"v1name") + len_field(1, first) + len_field(1, second))
    oracle = protobuf_net(payload).layers[0].layer
    [layer] = read(tmp_path, payload)
    assert (layer.name, layer.type) == (oracle.name, oracle.type) == ("", "conv")
    assert len(layer.blobs) == len(oracle.blobs) == 1


def test_layer_types_come_from_the_fields_protobuf_knows(tmp_path):
    def v1(*fields):
        return len_field(2, len_field(4, b"L") + b"".join(fields))
    cases = [
        (v1(key(5, VARINT) + varint(41)), "INTERP"),               # DeepLab-v1's number
        (v1(key(5, VARINT) + varint(4), key(5, VARINT) + varint(9999)), "CONVOLUTION"),
        (v1(key(5, VARINT) + varint(4), len_field(5, b"x")), "CONVOLUTION"),
        (len_field(100, len_field(1, b"L") + key(2, VARINT) + varint(4)), ""),
    ]
    for payload, expected in cases:
        [layer] = read(tmp_path, payload)
        assert layer.type == expected, payload.hex()


def test_names_that_are_not_utf8_keep_their_bytes(tmp_path):
    [layer] = read(tmp_path, v2_net(blob(shape(1), len_field(5, f32(1))), name=b"conv\xff"))
    assert layer.name.encode("utf-8", "surrogateescape") == b"conv\xff"
    target = tmp_path / "w\xff.caffemodel".encode("utf-8", "surrogateescape").decode(
        "utf-8", "surrogateescape")
    state = read(tmp_path, len_field(2, str(target).encode("utf-8", "surrogateescape")),
                 "solverstate")
    assert state.learned_net == str(target)
    again = caffe_pb2.SolverState.FromString(solverstate_bytes(0, state.learned_net, [], 0))
    assert again.learned_net.encode("utf-8", "surrogateescape") == \
        str(target).encode("utf-8", "surrogateescape")


@pytest.mark.parametrize("prefix, why", [
    (key(0, VARINT) + b"\1", "field number 0"),
    (bytes([0x8A, 0x80, 0x80, 0x80, 0x80, 0x00]) + b"\1", "field tag longer than 5 bytes"),
    (bytes([0x80, 0x80, 0x80, 0x80, 0x10, 0x01]), "field tag beyond 32 bits"),  # field 2**29
    (key(1, LEN) + bytes([0x81, 0x80, 0x80, 0x80, 0x80, 0x00]) + b"n", "length longer"),
    (key(1, VARINT) + bytes([0x80] * 10 + [0x01]), "varint is longer than 10 bytes"),
])
def test_encodings_protobuf_refuses_are_refused_in_words(tmp_path, prefix, why):
    payload = prefix + v2_net(blob(shape(1), len_field(5, f32(1))))
    with pytest.raises(Exception):
        protobuf_net(payload)
    with pytest.raises(CaffemodelError, match=why):
        read(tmp_path, payload)


def test_a_layers_unknown_fields_are_written_once_at_its_end():
    layer = caffe_pb2.LayerParameter(name="ip", type="InnerProduct")
    layer.top.append("y")
    layer.MergeFromString(key(4004, VARINT) + varint(5))   # a field of another dialect
    ours = layer_bytes(layer, [np.ones((2, 1), np.float32)])
    expected = caffe_pb2.LayerParameter()
    expected.CopyFrom(layer)
    expected.blobs.add().CopyFrom(caffe_pb2.BlobProto.FromString(
        len_field(5, f32(1, 1)) + shape(2, 1)))
    assert ours == expected.SerializeToString(deterministic=True)
