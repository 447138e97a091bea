"""caffemodel reading/writing against protobuf's own decoder and OpenCV."""
import glob
import os

import numpy as np
import pytest

from caffelite.io.caffemodel import CaffemodelError, read_caffemodel, write_caffemodel
from caffelite.proto import caffe_pb2
from conftest import CORPUS

MODELS = sorted(glob.glob(os.path.join(CORPUS, "models", "*", "*.caffemodel")))


def _protobuf_blobs(path):
    """Decode with the generated protobuf classes: an independent reader."""
    net = caffe_pb2.NetParameter()
    net.ParseFromString(open(path, "rb").read())
    out = []
    for layer in list(net.layer) + list(net.layers):
        blobs = []
        for b in layer.blobs:
            shape = (tuple(b.shape.dim) if b.HasField("shape")
                     else (b.num, b.channels, b.height, b.width))
            values = np.array(b.double_data if len(b.double_data) else b.data, np.float32)
            blobs.append((shape, values))
        out.append((layer.name, blobs))
    return out


@pytest.mark.parametrize("path", MODELS, ids=lambda p: os.path.basename(p))
def test_real_caffemodels_match_protobuf_decoding(path):
    ours = read_caffemodel(path)
    theirs = _protobuf_blobs(path)
    assert [l.name for l in ours] == [n for n, _ in theirs]
    for layer, (_, blobs) in zip(ours, theirs):
        assert len(layer.blobs) == len(blobs)
        for b, (shape, values) in zip(layer.blobs, blobs):
            assert tuple(b.shape) == shape
            np.testing.assert_array_equal(b.data.reshape(-1), values)


def test_v1_caffemodel_has_legacy_shapes_and_enum_types():
    path = os.path.join(CORPUS, "models", "cifar10_quick_v1", "cifar10_quick_iter_5000.caffemodel")
    layers = {l.name: l for l in read_caffemodel(path)}
    assert layers["conv1"].type == "CONVOLUTION"
    assert layers["conv1"].blobs[0].legacy_shape
    assert layers["conv1"].blobs[0].shape == (32, 3, 5, 5)


def test_round_trip_and_protobuf_reads_ours(tmp_path):
    rng = np.random.default_rng(0)
    weights = [("conv", "Convolution", [rng.standard_normal((4, 3, 3, 3)), np.arange(4.0)]),
               ("relu", "ReLU", []),
               ("ip", "InnerProduct", [rng.standard_normal((2, 5))])]
    path = str(tmp_path / "m.caffemodel")
    write_caffemodel(path, weights, "net")
    back = read_caffemodel(path)
    assert [l.name for l in back] == ["conv", "relu", "ip"]
    for (_, _, arrays), layer in zip(weights, back):
        for a, b in zip(arrays, layer.blobs):
            np.testing.assert_array_equal(b.data, np.float32(a))
    net = caffe_pb2.NetParameter()
    net.ParseFromString(open(path, "rb").read())
    assert net.name == "net" and net.layer[0].type == "Convolution"
    assert list(net.layer[0].blobs[0].shape.dim) == [4, 3, 3, 3]


def test_zero_axis_blob_is_written_as_caffe_writes_it(tmp_path):
    """Blob::ToProto adds the shape message only while adding dims, so a 0-axis blob
    (PReLU's shared slope) has data and no shape field: the bytes equal protobuf's own
    serialisation of such a BlobProto, and it reads back with 0 axes."""
    path = str(tmp_path / "m.caffemodel")
    write_caffemodel(path, [("prelu", "PReLU", [np.array(0.25, np.float32)])], "net")
    net = caffe_pb2.NetParameter()
    net.ParseFromString(open(path, "rb").read())
    blob = net.layer[0].blobs[0]
    assert not blob.HasField("shape") and list(blob.data) == [0.25]
    expected = caffe_pb2.BlobProto()
    expected.data.append(0.25)
    assert blob.SerializeToString() == expected.SerializeToString()
    [layer] = read_caffemodel(path)
    assert layer.blobs[0].data.shape == () and layer.blobs[0].data == np.float32(0.25)


def _key(number, wire):
    from caffelite.io.wire import varint
    return varint(number << 3 | wire)


@pytest.mark.parametrize("where", ["net", "layer", "blob"])
def test_unknown_groups_are_skipped_as_protobuf_skips_them(tmp_path, where):
    """Group-encoded fields (wire types 3 and 4, nested, holding every other wire type)
    are valid protobuf; caffe.proto has none, so its parser skips them as unknown."""
    from caffelite.io.wire import varint
    path = str(tmp_path / "m.caffemodel")
    write_caffemodel(path, [("ip", "InnerProduct", [np.arange(6.0).reshape(2, 3)])], "net")
    inner = (_key(1, 0) + varint(300) + _key(2, 2) + varint(3) + b"abc" + _key(3, 5)
             + b"\0" * 4 + _key(4, 1) + b"\0" * 8)
    group = (_key(77, 3) + inner + _key(78, 3) + inner + _key(78, 4) + inner
             + _key(77, 4))
    net = caffe_pb2.NetParameter.FromString(open(path, "rb").read())
    if where == "net":
        payload = group + net.SerializeToString()
    else:
        target = net.layer[0] if where == "layer" else net.layer[0].blobs[0]
        target.MergeFromString(group)
        payload = net.SerializeToString()
    with open(path, "wb") as f:
        f.write(payload)
    assert caffe_pb2.NetParameter.FromString(payload).layer[0].name == "ip"   # the oracle
    [layer] = read_caffemodel(path)
    np.testing.assert_array_equal(layer.blobs[0].data, np.arange(6.0).reshape(2, 3))
    with open(path, "wb") as f:
        f.write(payload.replace(_key(77, 4), _key(79, 4)))
    with pytest.raises(CaffemodelError, match="group 77 ends as group 79"):
        read_caffemodel(path)


def test_groups_nested_too_deeply_are_refused_in_words(tmp_path):
    path = str(tmp_path / "m.caffemodel")
    with open(path, "wb") as f:
        f.write(_key(77, 3) * 10000 + _key(77, 4) * 10000)
    with pytest.raises(CaffemodelError, match="groups nested deeper than 100"):
        read_caffemodel(path)


def test_truncated_caffemodel_is_a_clear_error(tmp_path):
    src = os.path.join(CORPUS, "models", "yoloface_50k", "yoloface-50k.caffemodel")
    data = open(src, "rb").read()
    bad = tmp_path / "cut.caffemodel"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CaffemodelError, match="truncated or corrupt"):
        read_caffemodel(str(bad))
    with pytest.raises(CaffemodelError, match="cannot read"):
        read_caffemodel(str(tmp_path / "missing.caffemodel"))


def test_large_caffemodel_over_64mb(tmp_path):
    big = np.arange(17 * 1024 * 1024, dtype=np.float32).reshape(17, 1024, 1024)  # 68 MB
    path = str(tmp_path / "big.caffemodel")
    write_caffemodel(path, [("fc", "InnerProduct", [big, np.ones(3)])])
    layer = read_caffemodel(path)[0]
    assert layer.blobs[0].shape == big.shape
    np.testing.assert_array_equal(layer.blobs[0].data, big)
    assert layer.blobs[1].data.tolist() == [1, 1, 1]


def test_write_is_atomic_and_needs_existing_dir(tmp_path):
    with pytest.raises(CaffemodelError, match="does not exist"):
        write_caffemodel(str(tmp_path / "nodir" / "m.caffemodel"), [])
    path = tmp_path / "m.caffemodel"
    write_caffemodel(str(path), [("a", "ReLU", [])])
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_a_bad_blob_fails_only_when_its_layer_is_copied(tmp_path):
    """Caffe parses the whole file, then checks the value count of a blob in
    Blob::FromProto, i.e. only for layers of the net being loaded."""
    import caffelite as caffe
    from caffelite.net import NetError
    model = caffe_pb2.NetParameter()
    good = model.layer.add(name="ip", type="InnerProduct")
    good.blobs.add(shape=caffe_pb2.BlobShape(dim=[2, 3]), data=list(range(6)))
    bad = model.layer.add(name="other", type="InnerProduct")
    bad.blobs.add(shape=caffe_pb2.BlobShape(dim=[2, 2]), data=[1, 2, 3])
    weights = tmp_path / "w.caffemodel"
    weights.write_bytes(model.SerializeToString())
    net_text = """input: 'x' input_shape { dim: 1 dim: 3 }
        layer { name: '%s' type: 'InnerProduct' bottom: 'x' top: 'y'
                inner_product_param { num_output: 2 bias_term: false } }"""
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(net_text % "ip")
    net = caffe.Net(str(prototxt), str(weights), caffe.TEST)
    np.testing.assert_array_equal(net.params["ip"][0].data, np.arange(6).reshape(2, 3))
    prototxt.write_text((net_text % "other").replace("dim: 3", "dim: 2"))
    with pytest.raises(NetError, match="layer 'other' blob 0: a blob of shape \\(2, 2\\) "
                                       "holds 3 values instead of 4"):
        caffe.Net(str(prototxt), str(weights), caffe.TEST)


def test_the_forks_own_layer_parameters_are_never_written(tmp_path):
    """caffelite's documented rule for weights files (caffemodel._portable): a layer's
    parameters numbered 143 (interp_param) to 151 (mat_read_param) are the fork's own,
    which BVLC Caffe and OpenCV read as other messages (143-148) or not at all; they
    stay in the prototxt and out of the saved LayerParameters. protobuf reads the file."""
    import caffelite
    from caffelite.io.prototxt import parse_text
    ids = tmp_path / "ids.txt"
    ids.write_text("2007_000032.jpg\n")
    out = tmp_path / "feat"
    out.mkdir()

    def make_net(text):
        return caffelite.Net(param=parse_text(text, caffe_pb2.NetParameter()),
                             phase=caffelite.TEST)

    make_net(f'''
        layer {{ name: "d" type: "DummyData" top: "data" top: "two"
          dummy_data_param {{ shape {{ dim: 1 dim: 3 dim: 4 dim: 5 }} shape {{ dim: 1 dim: 2 }}
                              data_filler {{ type: "gaussian" std: 1 }} }} }}
        layer {{ name: "w" type: "MatWrite" bottom: "data" bottom: "two"
          mat_write_param {{ prefix: "{out}/" source: "{ids}" strip: 4 }} }}''').forward()
    net = make_net(f'''
        layer {{ name: "r" type: "MatRead" top: "feat"
          mat_read_param {{ prefix: "{out}/" source: "{ids}" strip: 4 batch_size: 1 }} }}
        layer {{ name: "i" type: "Interp" bottom: "feat" top: "z"
          interp_param {{ zoom_factor: 1 }} }}
        layer {{ name: "c" type: "Convolution" bottom: "z" top: "c"
          convolution_param {{ num_output: 2 kernel_size: 1 }} }}
        layer {{ name: "w" type: "MatWrite" bottom: "c"
          mat_write_param {{ prefix: "{out}/c_" source: "{ids}" strip: 4 }} }}''')
    for name in ("r", "i", "w"):      # the prototxt has them
        assert any(143 <= fd.number <= 151 for fd, _ in
                   net.layer_dict[name].layer_param.ListFields()), name
    path = str(tmp_path / "saved.caffemodel")
    net.save(path)
    saved = caffe_pb2.NetParameter()
    saved.ParseFromString(open(path, "rb").read())
    assert [(layer.name, layer.type) for layer in saved.layer] == [
        ("r", "MatRead"), ("i", "Interp"), ("c", "Convolution"), ("w", "MatWrite")]
    for layer in saved.layer:
        assert [fd.number for fd, _ in layer.ListFields() if 143 <= fd.number <= 151] == [], \
            layer.name
    assert [list(b.shape.dim) for b in saved.layer[2].blobs] == [[2, 3, 1, 1], [2]]
