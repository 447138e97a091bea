"""Caffe's example converters (convert_cifar_data, convert_mnist_data) and the classic
CIFAR-10 workflow of Caffe's examples (create_cifar10.sh, then train_quick.sh) on the
corpus' released 2014 prototxt, with synthetic files in the real formats."""
import os
import shutil
import struct

import numpy as np
import pytest

from caffelite.cli import main
from caffelite.io.db import LEVELDB, LMDB, open_db
from caffelite.proto import caffe_pb2
from conftest import corpus_path

EXTRAS = ("models", "cifar10_quick_v1", "extras")


def write_cifar(folder, seed=0):
    """data_batch_1..5.bin and test_batch.bin: 10,000 records of a label byte and
    3072 pixel bytes each; returns {file name: (labels, pixels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, 10000, dtype=np.uint8)
        pixels = rng.integers(0, 256, (10000, 3072), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([labels[:, None], pixels], 1).tobytes())
        out[name] = (labels, pixels)
    return out


def read_all(path, backend):
    with open_db(path, backend) as reader:
        return list(reader.items())


def test_convert_cifar_data_and_train_the_released_quick_net(tmp_path, monkeypatch):
    """create_cifar10.sh (convert_cifar_data with leveldb, compute_image_mean) and
    train_quick.sh's first step, from Caffe's root, with the 2014 files unchanged."""
    pytest.importorskip("plyvel")          # the oracle reading what we wrote
    import plyvel
    data = write_cifar(tmp_path / "data" / "cifar10")
    examples = tmp_path / "examples" / "cifar10"
    examples.mkdir(parents=True)
    for name in ("cifar10_quick_train_test.prototxt", "cifar10_quick_solver.prototxt"):
        shutil.copy(corpus_path(*EXTRAS, name), examples / name)
    monkeypatch.chdir(tmp_path)
    assert main(["convert_cifar_data", "data/cifar10", "examples/cifar10", "leveldb"]) == 0
    train = read_all("examples/cifar10/cifar10_train_leveldb", LEVELDB)
    test = read_all("examples/cifar10/cifar10_test_leveldb", LEVELDB)
    assert [k for k, _ in train] == [b"%05d" % i for i in range(50000)]
    assert [k for k, _ in test] == [b"%05d" % i for i in range(10000)]
    for index in (0, 12345, 49999):
        labels, pixels = data[f"data_batch_{index // 10000 + 1}.bin"]
        datum = caffe_pb2.Datum.FromString(train[index][1])
        assert (datum.channels, datum.height, datum.width) == (3, 32, 32)
        assert datum.data == pixels[index % 10000].tobytes()
        assert datum.label == labels[index % 10000]
    db = plyvel.DB("examples/cifar10/cifar10_test_leveldb")
    assert caffe_pb2.Datum.FromString(db.get(b"09999")).label == data["test_batch.bin"][0][-1]
    db.close()
    assert main(["compute_image_mean", "-backend=leveldb",
                 "examples/cifar10/cifar10_train_leveldb",
                 "examples/cifar10/mean.binaryproto"]) == 0
    solver = (examples / "cifar10_quick_solver.prototxt").read_text()
    (examples / "cifar10_quick_solver.prototxt").write_text(
        solver.replace("max_iter: 4000", "max_iter: 2").replace("test_iter: 100",
                                                                 "test_iter: 1")
        .replace("test_interval: 500", "test_interval: 2").replace("snapshot: 4000",
                                                                   "snapshot: 0"))
    assert main(["train", "-solver", "examples/cifar10/cifar10_quick_solver.prototxt"]) == 0
    assert os.path.exists("examples/cifar10/cifar10_quick_iter_2.caffemodel")


def idx(path, magic, dims, payload):
    path.write_bytes(struct.pack(f">{1 + len(dims)}I", magic, *dims) + payload.tobytes())


@pytest.mark.parametrize("backend, kind", [("lmdb", LMDB), ("leveldb", LEVELDB)])
def test_convert_mnist_data(tmp_path, backend, kind):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (1200, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 1200, dtype=np.uint8)
    idx(tmp_path / "images", 2051, (1200, 28, 28), images)
    idx(tmp_path / "labels", 2049, (1200,), labels)
    db = str(tmp_path / f"mnist_{backend}")
    assert main(["convert_mnist_data", f"--backend={backend}", str(tmp_path / "images"),
                 str(tmp_path / "labels"), db]) == 0
    got = read_all(db, kind)
    assert [k for k, _ in got] == [b"%08d" % i for i in range(1200)]
    for i in (0, 999, 1199):
        datum = caffe_pb2.Datum.FromString(got[i][1])
        assert (datum.channels, datum.height, datum.width) == (1, 28, 28)
        assert datum.data == images[i].tobytes() and datum.label == labels[i]


def test_bad_inputs_are_one_line(tmp_path, capsys):
    idx(tmp_path / "images", 2049, (1, 2, 2), np.zeros(4, np.uint8))
    idx(tmp_path / "labels", 2049, (1,), np.zeros(1, np.uint8))
    assert main(["convert_mnist_data", str(tmp_path / "images"), str(tmp_path / "labels"),
                 str(tmp_path / "db")]) == 1
    assert "Incorrect image file magic" in capsys.readouterr().err
    assert not (tmp_path / "db").exists()
    assert main(["convert_cifar_data", str(tmp_path), str(tmp_path), "lmdb"]) == 1
    assert "data_batch_1.bin" in capsys.readouterr().err
