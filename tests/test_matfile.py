"""MAT files: reading the fork's real MatWrite output, writing the same layout byte for
byte, and MatWrite -> MatRead through nets (spec section 4, corpus/matio/README.md)."""
import os
import struct

import numpy as np
import pytest
import scipy.io

import caffelite
from caffelite.io.matfile import MatFileError, mat_bytes, read_mat, write_mat
from caffelite.io.prototxt import parse_text
from caffelite.layer import LayerError
from caffelite.net import NetError
from caffelite.proto import caffe_pb2
from conftest import corpus_path

CORPUS_FILES = ["segacc_acc_cumul_batch1", "resnet_fc1_voc12_res05_img0",
                "trainvgg_fc8_voc12_forward3"]


def make_net(text, phase=caffelite.TEST):
    return caffelite.Net(param=parse_text(text, caffe_pb2.NetParameter()), phase=phase)


@pytest.mark.parametrize("name", CORPUS_FILES)
def test_real_matio_files_read_exactly(name):
    path = corpus_path("matio", name + ".mat")
    expected = np.load(corpus_path("matio", name + ".npy"))
    data, diff = read_mat(path)
    assert data.dtype == np.float32 and diff is None
    assert data.shape == expected.shape and np.array_equal(data, expected)


@pytest.mark.parametrize("name", CORPUS_FILES)
def test_writer_reproduces_real_files_after_the_header_text(name):
    real = open(corpus_path("matio", name + ".mat"), "rb").read()
    ours = mat_bytes({"data": np.load(corpus_path("matio", name + ".npy"))})
    assert len(ours) == len(real)
    assert ours[116:] == real[116:]          # subsystem offset, version, IM and the variable
    # Header text: same structure (text, NUL, space padding), different date/creator.
    for raw in (ours, real):
        assert raw[:20] == b"MATLAB 5.0 MAT-file,"
        text_end = raw.index(b"\0")
        assert text_end < 116 and raw[text_end + 1:116] == b" " * (115 - text_end)


def test_written_layout_rules(tmp_path):
    blob = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5) / 7
    path = str(tmp_path / "x.mat")
    write_mat(path, blob)
    raw = open(path, "rb").read()
    assert raw[116:124] == b" " * 8 and raw[124:128] == b"\x00\x01IM"
    mi_type, size = struct.unpack("<II", raw[128:136])
    assert mi_type == 14 and size == len(raw) - 136            # one miMATRIX, uncompressed
    assert struct.unpack("<IIII", raw[136:152]) == (6, 8, 7, 0)  # flags: mxSINGLE, no bits
    assert struct.unpack("<II4i", raw[152:176]) == (5, 16, 5, 4, 3, 2)   # [W, H, C, N]
    assert raw[176:184] == struct.pack("<HH", 1, 4) + b"data"   # small-element name
    assert struct.unpack("<II", raw[184:192]) == (7, blob.size * 4)
    assert raw[192:192 + blob.size * 4] == blob.tobytes()        # NCHW buffer = [W,H,C,N]
    loaded = scipy.io.loadmat(path)["data"]
    assert loaded.dtype == np.float32 and loaded.shape == (5, 4, 3, 2)
    assert np.array_equal(loaded.transpose(3, 2, 1, 0), blob)
    assert not [f for f in os.listdir(tmp_path) if f != "x.mat"]   # no temp file left


def test_legacy_shapes_and_double(tmp_path):
    path = str(tmp_path / "s.mat")
    write_mat(path, np.array([[1, 2, 3], [4, 5, 6]], np.float32))     # (N, C) -> [1,1,C,N]
    assert scipy.io.loadmat(path)["data"].shape == (1, 1, 3, 2)
    write_mat(path, np.array(2.5, np.float32))                         # scalar -> [1,1,1,1]
    assert scipy.io.loadmat(path)["data"].shape == (1, 1, 1, 1)
    assert np.array_equal(read_mat(path)[0], np.full((1, 1, 1, 1), 2.5, np.float32))
    blob = np.linspace(0, 1, 6).reshape(1, 2, 3, 1)
    write_mat(path, blob)
    assert scipy.io.whosmat(path) == [("data", (1, 3, 2, 1), "double")]
    assert np.array_equal(read_mat(path, np.float64)[0], blob)
    with pytest.raises(MatFileError, match="class 'double'.*'single'"):
        read_mat(path, dtype=np.float32)


def test_reader_accepts_matlab_style_files(tmp_path):
    # MATLAB drops trailing singleton dims (W x H x C) and may add other variables.
    arr = np.arange(24, dtype=np.float32).reshape(4, 3, 2, order="F")
    path = str(tmp_path / "m.mat")
    scipy.io.savemat(path, {"data": arr, "other": np.zeros(3)})
    data, diff = read_mat(path)
    assert data.shape == (1, 2, 3, 4) and diff is None
    assert np.array_equal(data[0], arr.transpose(2, 1, 0))
    scipy.io.savemat(path, {"data": arr, "diff": -arr})
    data, diff = read_mat(path)
    assert np.array_equal(diff, -data)


def test_reader_errors(tmp_path):
    path = str(tmp_path / "e.mat")
    with pytest.raises(MatFileError, match="not found"):
        read_mat(path)
    scipy.io.savemat(path, {"other": np.zeros(3, np.float32)})
    with pytest.raises(MatFileError, match="no variable 'data'"):
        read_mat(path)
    scipy.io.savemat(path, {"data": np.zeros((1, 1, 1, 1, 2), np.float32)})
    with pytest.raises(MatFileError, match="5 dimensions"):
        read_mat(path)
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(MatFileError, match="junk.mat"):
        read_mat(str(tmp_path / "junk.mat"))


def write_v73(path, blob):
    """A MATLAB v7.3 file: HDF5 with a 512-byte MAT header block, dataset 'data'
    stored with the dims reversed (so its C-order shape is the blob's NCHW)."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("data", data=blob).attrs["MATLAB_class"] = np.bytes_("single")
    text = b"MATLAB 7.3 MAT-file, Platform: test, Created by: caffelite tests HDF5 schema 1.00 ."
    header = text.ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0200) + b"IM"
    with open(path, "r+b") as f:
        f.write(header.ljust(512, b"\0"))


def test_v73_files_read_through_pymatreader(tmp_path):
    pytest.importorskip("pymatreader")
    blob = np.random.default_rng(0).standard_normal((1, 1, 4, 3)).astype(np.float32)
    path = str(tmp_path / "v73.mat")
    write_v73(path, blob)           # singleton C (pymatreader squeezes it away)
    data, _ = read_mat(path)
    assert data.shape == blob.shape and np.array_equal(data, blob)


# -------------------------------------------------------------------------- layers
def dummy_to_matwrite(prefix, source="", period=1, shape=(1, 3, 4, 5)):
    dims = " ".join(f"dim: {d}" for d in shape)
    src = f'source: "{source}"' if source else ""
    return make_net(f'''
        layer {{ name: "d" type: "DummyData" top: "data" top: "two"
          dummy_data_param {{ shape {{ {dims} }} shape {{ dim: 1 dim: 2 }}
                             data_filler {{ type: "gaussian" std: 3 }} }} }}
        layer {{ name: "w" type: "MatWrite" bottom: "data" bottom: "two"
          mat_write_param {{ prefix: "{prefix}" {src} strip: 4 period: {period} }} }}''')


def test_matwrite_then_matread_round_trip(tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("2007_000032.jpg extra\n\n2007_000039.jpg\n2007_000063.jpg\n")
    out = tmp_path / "fc8"
    out.mkdir()
    caffelite.set_random_seed(0)
    writer = dummy_to_matwrite(f"{out}/", str(ids))
    written = []
    for _ in range(3):
        writer.forward()
        written.append(writer.blobs["data"].data.copy())
    assert sorted(os.listdir(out)) == sorted(f"2007_0000{i}_blob_{b}.mat"
                                             for i in ("32", "39", "63") for b in (0, 1))
    assert scipy.io.loadmat(out / "2007_000039_blob_1.mat")["data"].shape == (1, 1, 2, 1)
    with pytest.raises(LayerError, match=r"more iterations.*the source list '.*ids.txt' has "
                                         r"3 names \(run 3 iterations\)"):
        writer.forward()
    reader = make_net(f'''
        layer {{ name: "r" type: "MatRead" top: "feat"
          mat_read_param {{ prefix: "{out}/" source: "{ids}" strip: 4 batch_size: 2 }} }}''')
    assert reader.blobs["feat"].shape == (2, 3, 4, 5)
    reader.forward()
    assert np.array_equal(reader.blobs["feat"].data, np.concatenate(written[:2]))
    reader.forward()                                  # wraps around the name list
    assert np.array_equal(reader.blobs["feat"].data,
                          np.concatenate([written[2], written[0]]))
    assert reader.layers[0].state_dict() == {"iter": 1}


def test_id_lists_are_read_as_the_forks_bytes(tmp_path):
    """The fork reads the list as bytes: lines end at "\\n" only, the first token ends
    at C whitespace, and a name that is not UTF-8 names the file with those bytes."""
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"caf\xe9.jpg\tx\r\nab\xc2\xa0cd.jpg\n\x0cpad.jpg\n")
    out = tmp_path / "out"
    out.mkdir()
    writer = dummy_to_matwrite(f"{out}/", str(ids))
    for _ in range(3):
        writer.forward()
    assert sorted(os.listdir(os.fsencode(out))) == sorted(
        name + b"_blob_" + i for name in (b"caf\xe9", b"ab\xc2\xa0cd", b"pad")
        for i in (b"0.mat", b"1.mat"))


def test_id_list_strip_counts_bytes(tmp_path):
    """The fork's substr(0, size() - strip) counts bytes: stripping one byte off a name
    ending in a two-byte character leaves its first byte, and a one-character name of
    two bytes is longer than strip: 1."""
    from caffelite.layers.deeplab_eval import read_id_list

    class Layer:
        def error(self, message):
            return ValueError(message)
    ids = tmp_path / "ids.txt"
    ids.write_bytes("photo_\u00e9\n\u00e9\n".encode())
    names = read_id_list(str(ids), 1, Layer())
    assert [os.fsencode(n) for n in names] == [b"photo_\xc3", b"\xc3"]
    with pytest.raises(ValueError, match="strip=2 bytes"):
        read_id_list(str(ids), 2, Layer())


def test_matwrite_period_and_iter_names_and_matread_without_source(tmp_path):
    caffelite.set_random_seed(1)
    writer = dummy_to_matwrite(f"{tmp_path}/", period=2)
    written = {}
    for it in range(5):
        writer.forward()
        written[it] = writer.blobs["data"].data.copy()
    names = sorted(f for f in os.listdir(tmp_path) if f.endswith("_blob_0.mat"))
    assert names == ["iter_0_blob_0.mat", "iter_2_blob_0.mat", "iter_4_blob_0.mat"]
    assert np.array_equal(read_mat(str(tmp_path / "iter_2_blob_0.mat"))[0], written[2])
    reader = make_net(f'''layer {{ name: "r" type: "MatRead" top: "x"
        mat_read_param {{ prefix: "{tmp_path}/" }} }}''')
    reader.forward()
    assert np.array_equal(reader.blobs["x"].data, written[0])


def test_matread_errors(tmp_path):
    (tmp_path / "ids.txt").write_text("a\nb\n")

    def reader(extra=""):
        return make_net(f'''layer {{ name: "r" type: "MatRead" top: "x"
            mat_read_param {{ prefix: "{tmp_path}/" source: "{tmp_path / 'ids.txt'}"
                             {extra} }} }}''')
    with pytest.raises(NetError, match=r"a_blob_0.mat"):
        reader()                                            # missing file
    write_mat(str(tmp_path / "a_blob_0.mat"), np.zeros((2, 1, 2, 2), np.float32))
    with pytest.raises(NetError, match="N = 1 per file"):
        reader()
    write_mat(str(tmp_path / "a_blob_0.mat"), np.zeros((1, 1, 2, 2), np.float64))
    with pytest.raises(NetError, match="class 'double'"):
        reader()
    write_mat(str(tmp_path / "a_blob_0.mat"), np.zeros((1, 1, 2, 2), np.float32))
    write_mat(str(tmp_path / "b_blob_0.mat"), np.zeros((1, 1, 3, 2), np.float32))
    net = reader()
    net.forward()
    with pytest.raises(LayerError, match=r"b_blob_0.mat.*\(1, 3, 2\).*\(1, 2, 2\)"):
        net.forward()
    with pytest.raises(NetError, match="batch_size must be positive"):
        reader("batch_size: 0")
    with pytest.raises(NetError, match="too much stripping"):
        reader("strip: 1")


def test_matwrite_bad_period(tmp_path):
    with pytest.raises(NetError, match="period must be positive"):
        dummy_to_matwrite(f"{tmp_path}/", period=0)


def test_corpus_files_through_matread(tmp_path):
    paths = [corpus_path("matio", n + ".mat") for n in CORPUS_FILES[:2]]
    for p in paths:
        os.symlink(p, tmp_path / (os.path.basename(p)[:-4] + "_blob_0.mat"))
    (tmp_path / "ids.txt").write_text("resnet_fc1_voc12_res05_img0\n")
    net = make_net(f'''layer {{ name: "r" type: "MatRead" top: "x"
        mat_read_param {{ prefix: "{tmp_path}/" source: "{tmp_path / 'ids.txt'}" }} }}''')
    net.forward()
    assert np.array_equal(net.blobs["x"].data,
                          np.load(corpus_path("matio", CORPUS_FILES[1] + ".npy")))
