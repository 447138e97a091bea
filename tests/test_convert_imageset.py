"""caffelite convert_imageset: the LMDB it writes holds what OpenCV reads from the
images (cv2.imread / cv2.resize), under Caffe's keys; py-lmdb (the real library) reads
it; the Data layer and compute_image_mean take it."""
import os

import numpy as np
import pytest

from caffelite.cli import main
from caffelite.io.db import LEVELDB, LMDB, open_db
from caffelite.proto import caffe_pb2

cv2 = pytest.importorskip("cv2")


def make_images(root, specs, seed=0):
    """specs: (name, (h, w), channels); PNGs and JPEGs written by OpenCV."""
    rng = np.random.default_rng(seed)
    for name, (h, w), c in specs:
        shape = (h, w, c) if c > 1 else (h, w)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), rng.integers(0, 256, shape, dtype=np.uint8))


def records(db, backend="lmdb"):
    with open_db(db, {"lmdb": LMDB, "leveldb": LEVELDB}[backend]) as reader:
        return [(k, caffe_pb2.Datum.FromString(v)) for k, v in reader.items()]


def chw(img):
    return img[None] if img.ndim == 2 else img.transpose(2, 0, 1)


SPECS = [("a.png", (9, 7), 3), ("sub/b_c.jpg", (6, 11), 3), ("g.png", (5, 5), 1),
         ("d.jpeg", (8, 8), 3)]
# the fork's ">> filename >> label" tokens: any whitespace between them
LIST = "a.png 3\nsub/b_c.jpg\t7\ng.png  0\nmissing.png 4 d.jpeg -2\n"


def convert(tmp_path, *flags, name="db"):
    root = tmp_path / "images"
    make_images(root, SPECS)
    (tmp_path / "list.txt").write_text(LIST)
    db = str(tmp_path / name)
    code = main(["convert_imageset", *flags, f"{root}/", str(tmp_path / "list.txt"), db])
    return code, root, db


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_raw_datums_hold_what_opencv_reads(tmp_path, backend):
    code, root, db = convert(tmp_path, "-backend=" + backend)
    assert code == 0
    got = records(db, backend)
    names = ["a.png", "sub/b_c.jpg", "g.png", "d.jpeg"]
    ids = [0, 1, 2, 4]                       # line 3's image is missing: skipped
    assert [k for k, _ in got] == [b"%08d_%s" % (i, n.encode()) for i, n in zip(ids, names)]
    for (_, datum), name, label in zip(got, names, [3, 7, 0, -2]):
        want = chw(cv2.imread(str(root / name), cv2.IMREAD_COLOR))
        assert (datum.channels, datum.height, datum.width) == want.shape
        assert datum.data == want.tobytes() and datum.label == label
        assert not datum.encoded
    if backend == "lmdb":
        lmdb = pytest.importorskip("lmdb")
        env = lmdb.open(db, readonly=True, lock=False)
        with env.begin() as txn:
            pairs = [(k, caffe_pb2.Datum.FromString(v).label) for k, v in txn.cursor()]
        env.close()
    else:
        plyvel = pytest.importorskip("plyvel")
        opened = plyvel.DB(db)
        pairs = [(k, caffe_pb2.Datum.FromString(v).label) for k, v in opened]
        opened.close()
    assert pairs == [(k, d.label) for k, d in got]


def test_gray_and_resize_as_opencv(tmp_path):
    code, root, db = convert(tmp_path, "-gray", "-resize_height=6", "-resize_width=4")
    assert code == 0
    for key, datum in records(db):
        name = key[9:].decode()
        img = cv2.imread(str(root / name), cv2.IMREAD_GRAYSCALE)
        want = cv2.resize(img, (4, 6), interpolation=cv2.INTER_LINEAR)
        assert (datum.channels, datum.height, datum.width) == (1, 6, 4)
        assert datum.data == want.tobytes()


def test_encoded_keeps_the_files_bytes_or_reencodes(tmp_path):
    """--encoded guesses ".png" from the name (the fork keeps the dot) and stores the
    file; the fork's matchExt never matches an explicit --encode_type ("png" against
    ".png"), nor a run with a resize flag: those re-encode."""
    code, root, db = convert(tmp_path, "--encoded")
    assert code == 0
    for key, datum in records(db):
        assert datum.encoded
        assert datum.data == (root / key[9:].decode()).read_bytes()
    for flags, name in ((["--encode_type", "png"], "db2"),
                        (["--encoded", "--resize_height", "5"], "db3")):
        code, root, db2 = convert(tmp_path, *flags, name=name)
        assert code == 0
        for key, datum in records(db2):
            img = cv2.imread(str(root / key[9:].decode()), cv2.IMREAD_COLOR)
            assert datum.encoded and datum.data != (root / key[9:].decode()).read_bytes()
            decoded = cv2.imdecode(np.frombuffer(datum.data, np.uint8), cv2.IMREAD_UNCHANGED)
            if key.endswith(b".png"):                  # lossless: the same pixels
                np.testing.assert_array_equal(decoded, img)
    code, root, db4 = convert(tmp_path, "--encode_type", "png", "--resize_height", "5",
                              "--resize_width", "6", name="db4")
    assert code == 0
    for key, datum in records(db4):
        img = cv2.imread(str(root / key[9:].decode()), cv2.IMREAD_COLOR)
        want = cv2.resize(img, (6, 5), interpolation=cv2.INTER_LINEAR)
        decoded = cv2.imdecode(np.frombuffer(datum.data, np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(decoded, want)


def test_data_layer_and_image_mean_read_it(tmp_path):
    import caffelite as caffe
    from caffelite.io import prototxt
    (tmp_path / "images").mkdir()
    make_images(tmp_path / "images", [(f"{i}.png", (6, 6), 3) for i in range(5)])
    (tmp_path / "list.txt").write_text("".join(f"{i}.png {i}\n" for i in range(5)))
    db = str(tmp_path / "db")
    assert main(["convert_imageset", "--shuffle", f"{tmp_path}/images/",
                 str(tmp_path / "list.txt"), db]) == 0
    labels = sorted(d.label for _, d in records(db))
    assert labels == [0, 1, 2, 3, 4]
    mean = str(tmp_path / "mean.binaryproto")
    assert main(["compute_image_mean", db, mean]) == 0
    net = caffe.Net(param=prototxt.parse_net(
        f'layer {{ name: "d" type: "Data" top: "data" top: "label" transform_param {{ '
        f'mean_file: "{mean}" }} data_param {{ source: "{db}" batch_size: 5 '
        f'backend: LMDB }} }}')[0], phase=caffe.TEST)
    net.forward()
    images = [chw(cv2.imread(str(tmp_path / "images" / f"{int(i)}.png")))
              for i in net.blobs["label"].data]
    want = np.stack(images).astype(np.float32)
    want -= want.mean(axis=0)
    np.testing.assert_allclose(net.blobs["data"].data, want, atol=1e-4)


def test_errors_are_one_line(tmp_path, capsys):
    code, _, db = convert(tmp_path)
    assert code == 0
    code, _, _ = convert(tmp_path)                  # the database exists already
    assert code == 1 and "exists" in capsys.readouterr().err
    code, _, _ = convert(tmp_path, "--backend", "rocksdb", name="l")
    assert code == 1 and "Unknown db backend 'rocksdb'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "l")
    code, _, _ = convert(tmp_path, "--check_size", name="c")
    assert code == 1 and "Incorrect data field size" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "c" / "data.mdb")
    assert main(["convert_imageset", "r/", str(tmp_path / "nolist"), str(tmp_path / "x")]) == 1
    assert "nolist" in capsys.readouterr().err
    make_images(tmp_path / "images", [("noext.png", (4, 4), 3)])
    os.rename(tmp_path / "images" / "noext.png", tmp_path / "images" / "noext")
    (tmp_path / "noext.txt").write_text("noext 1\n")
    assert main(["convert_imageset", "--encoded", f"{tmp_path}/images/",
                 str(tmp_path / "noext.txt"), str(tmp_path / "y")]) == 1
    assert "Failed to guess the encoding of 'noext'" in capsys.readouterr().err


def test_list_ends_at_the_first_label_that_is_not_an_int(tmp_path):
    make_images(tmp_path / "images", SPECS)
    (tmp_path / "list.txt").write_text("a.png 3\ng.png x\nd.jpeg 1\n")
    db = str(tmp_path / "db")
    assert main(["convert_imageset", f"{tmp_path}/images/", str(tmp_path / "list.txt"),
                 db]) == 0
    assert [k for k, _ in records(db)] == [b"00000000_a.png"]


def test_gflags_booleans():
    from caffelite.cli import gflags_style
    assert gflags_style(["convert_imageset", "-gray=true", "-shuffle=false", "--encoded",
                         "-check_size=0", "r/", "l", "d"]) == \
        ["convert_imageset", "--gray", "--noshuffle", "--encoded", "--nocheck_size", "r/",
         "l", "d"]
