"""caffelite extract_features: Caffe's tool's databases (keys %010d, float_data Datums
with the blob's legacy C x H x W), from a net fed by a Data layer."""
import numpy as np
import pytest

import caffelite as caffe
from caffelite.cli import main
from caffelite.io.db import LEVELDB, LMDB, open_db
from caffelite.io.lmdb_writer import LMDBWriter
from caffelite.proto import caffe_pb2

NET = '''
layer { name: "d" type: "Data" top: "data" top: "label"
        data_param { source: "%s" batch_size: 3 backend: LMDB } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 2 kernel_size: 3
                            weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.1 } } }
'''


def make_inputs(tmp_path, count=7):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 1, 5, 5), dtype=np.uint8)
    source = str(tmp_path / "images")
    with LMDBWriter(source) as w:
        for i, im in enumerate(images):
            w.put(b"%03d" % i, caffe_pb2.Datum(channels=1, height=5, width=5,
                                               data=im.tobytes(), label=i).SerializeToString())
    model = tmp_path / "net.prototxt"
    model.write_text(NET % source)
    net = caffe.Net(str(model), caffe.TEST)
    weights = str(tmp_path / "w.caffemodel")
    net.save(weights)
    return images, str(model), weights


def read_db(path, backend):
    with open_db(path, backend) as reader:
        return [(k, caffe_pb2.Datum.FromString(v)) for k, v in reader.items()]


@pytest.mark.parametrize("db_type, backend", [("lmdb", LMDB), ("leveldb", LEVELDB)])
def test_features_of_each_image_under_caffes_keys(tmp_path, db_type, backend):
    if db_type == "leveldb":
        pytest.importorskip("caffelite.io.leveldb_writer")
    images, model, weights = make_inputs(tmp_path)
    out_conv, out_ip = str(tmp_path / "f_conv"), str(tmp_path / "f_ip")
    assert main(["extract_features", weights, model, "conv,ip", f"{out_conv},{out_ip}",
                 "3", db_type]) == 0
    ref = caffe.Net(model, caffe.TEST, weights=weights)
    want_conv, want_ip = [], []
    for _ in range(3):                      # 9 images: the 7 records, then 0 and 1 again
        ref.forward()
        want_conv += list(ref.blobs["conv"].data.copy())
        want_ip += list(ref.blobs["ip"].data.copy())
    conv, ip = read_db(out_conv, backend), read_db(out_ip, backend)
    assert [k for k, _ in conv] == [b"%010d" % i for i in range(9)] == [k for k, _ in ip]
    for (_, d), want in zip(conv, want_conv):
        assert (d.channels, d.height, d.width) == (2, 3, 3) and not d.data
        np.testing.assert_array_equal(np.array(d.float_data, np.float32), want.reshape(-1))
    for (_, d), want in zip(ip, want_ip):
        assert (d.channels, d.height, d.width) == (4, 1, 1)
        np.testing.assert_array_equal(np.array(d.float_data, np.float32), want)


def test_a_blob_without_axes_gives_one_record_per_batch(tmp_path):
    """A loss-like 0-d blob: the tool's num() and C x H x W are legacy 1s, count 1."""
    images, model, weights = make_inputs(tmp_path)
    with open(model, "a") as f:
        f.write('layer { name: "total" type: "Reduction" bottom: "ip" top: "total" }\n')
    out = str(tmp_path / "f_total")
    assert main(["extract_features", weights, model, "total", out, "2", "lmdb"]) == 0
    ref = caffe.Net(model, caffe.TEST, weights=weights)
    want = []
    for _ in range(2):
        ref.forward()
        want.append(float(ref.blobs["total"].data))
    records = read_db(out, LMDB)
    assert [k for k, _ in records] == [b"%010d" % i for i in range(2)]
    for (_, d), value in zip(records, want):
        assert (d.channels, d.height, d.width) == (1, 1, 1)
        assert list(d.float_data) == [np.float32(value)]


def test_bad_arguments_are_one_line(tmp_path, capsys):
    _, model, weights = make_inputs(tmp_path)
    assert main(["extract_features", weights, model, "nope", str(tmp_path / "x"), "1",
                 "lmdb"]) == 1
    assert "Unknown feature blob name nope" in capsys.readouterr().err
    assert main(["extract_features", weights, model, "conv,ip", str(tmp_path / "x"), "1",
                 "lmdb"]) == 1
    assert "must be equal" in capsys.readouterr().err
    assert main(["extract_features", weights, model, "conv", str(tmp_path / "x"), "1",
                 "rocksdb"]) == 1
    assert "Unknown db backend 'rocksdb'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
