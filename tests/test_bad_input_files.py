"""Damaged or mistaken input files (MAT features, id lists, databases) and output paths
that would overwrite the user's files: one clear error (or warning) naming the file,
never a crash, a bare traceback or a silent wrong result."""
import os
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.io
from PIL import Image

import caffelite
from caffelite import cli, pascal
from caffelite.io.matfile import MatFileError, read_mat, write_mat
from caffelite.io.prototxt import parse_text
from caffelite.layer import LayerError
from caffelite.net import NetError
from caffelite.proto import caffe_pb2
from conftest import corpus_path
from test_cli_errors import _main

CORPUS_FILES = ["segacc_acc_cumul_batch1", "resnet_fc1_voc12_res05_img0",
                "trainvgg_fc8_voc12_forward3"]


def make_net(text):
    return caffelite.Net(param=parse_text(text, caffe_pb2.NetParameter()),
                         phase=caffelite.TEST)


def mat_file(tmp_path, name="a_blob_0.mat", shape=(1, 3, 4, 4)):
    path = tmp_path / name
    write_mat(str(path), np.arange(np.prod(shape), dtype=np.float32).reshape(shape))
    return path


def damaged(path, offset=None, value=None, length=None):
    raw = bytearray(path.read_bytes())
    if offset is not None:
        raw[offset] = value
    path.write_bytes(bytes(raw[:length]))
    return str(path)


def big_endian_matwrite_file(path, blob):
    """What matio writes on a big-endian machine: 'MI', every number big-endian."""
    def element(mi, payload):
        return struct.pack(">II", mi, len(payload)) + payload + b"\0" * (-len(payload) % 8)
    body = (element(6, struct.pack(">II", 7, 0))
            + element(5, struct.pack(">4i", *blob.shape[::-1]))
            + struct.pack(">HH", 4, 1) + b"data"
            + element(7, blob.astype(">f4").tobytes()))
    path.write_bytes(b"MATLAB 5.0 MAT-file, big-endian".ljust(116, b" ") + b" " * 8
                     + struct.pack(">H", 0x0100) + b"MI"
                     + struct.pack(">II", 14, len(body)) + body)


# ------------------------------------------------------------- F1: valid files still read
def test_valid_mat_files_pass_the_structure_checks(tmp_path):
    for name in CORPUS_FILES:
        data, diff = read_mat(corpus_path("matio", name + ".mat"))
        assert np.array_equal(data, np.load(corpus_path("matio", name + ".npy")))
        assert diff is None
    blob = np.linspace(-1, 1, 24).reshape(1, 2, 3, 4)
    write_mat(str(tmp_path / "d.mat"), blob, -blob)                 # double, with diff
    data, diff = read_mat(str(tmp_path / "d.mat"), np.float64)
    assert np.array_equal(data, blob) and np.array_equal(diff, -blob)
    write_mat(str(tmp_path / "s.mat"), np.array(2.5, np.float32))    # 1 value
    assert read_mat(str(tmp_path / "s.mat"))[0].shape == (1, 1, 1, 1)
    arr = np.arange(24, dtype=np.float32).reshape(4, 3, 2, order="F")
    for compress in (False, True):                   # MATLAB-style: other variables first
        path = str(tmp_path / f"m{compress}.mat")
        scipy.io.savemat(path, {"name": "x", "cells": np.array([1, "a"], dtype=object),
                                "data": arr, "diff": -arr}, do_compression=compress)
        data, diff = read_mat(path)
        assert np.array_equal(data[0], arr.transpose(2, 1, 0)) and np.array_equal(diff, -data)
    scipy.io.savemat(str(tmp_path / "small.mat"), {"data": np.float32(3)})  # small element
    assert read_mat(str(tmp_path / "small.mat"))[0].ravel().tolist() == [3.0]
    scipy.io.savemat(str(tmp_path / "v4.mat"), {"data": np.arange(6.).reshape(2, 3)},
                     format="4")
    assert read_mat(str(tmp_path / "v4.mat"), np.float64)[0].shape == (1, 1, 3, 2)
    blob = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    big_endian_matwrite_file(tmp_path / "be.mat", blob)
    assert scipy.io.loadmat(str(tmp_path / "be.mat"))["data"].shape == (4, 3, 2, 1)
    assert np.array_equal(read_mat(str(tmp_path / "be.mat"))[0], blob)


# ------------------------------------------------------------- F1: damaged files refused
@pytest.mark.parametrize("length, words", [
    (0, r"is empty \(0 bytes\)"),
    (3, r"is truncated: it has 3 bytes, fewer than the 128-byte header"),
    (100, r"is truncated: it has 100 bytes, fewer than the 128-byte header"),
    (127, r"is truncated: it has 127 bytes"),
    (132, r"4 stray bytes at its end \(byte 128\)"),
    (150, r"the variable at byte 128 is truncated: its element has 248 bytes but the "
          r"file ends 14 bytes after its tag"),
    (383, r"the variable at byte 128 is truncated"),
])
def test_truncated_mat_files_name_the_file(tmp_path, length, words):
    path = damaged(mat_file(tmp_path), length=length)
    with pytest.raises(MatFileError, match=f"MAT file '{path}'.*{words}"):
        read_mat(path)


@pytest.mark.parametrize("offset, value, words", [
    (184, 0x89, r"\('data'\) is corrupt: its real part has data type 137 \(unknown\), "
                r"not a numeric type"),                  # scipy: segmentation fault
    (184, 8, r"its real part has data type 8 \(unknown\)"),
    (184, 16, r"its real part has data type miUTF8, not a numeric type"),
    (144, 38, r"is corrupt: its array flags give the unknown array class 38"),
    (126, ord("X"), r"is not a MAT file, or its header is corrupt: bytes 126-127 are "
                    r"b'XM'"),
    (125, 3, r"has a corrupt header: version 0x0300"),
    (128, 13, r"the variable at byte 128 is corrupt: its tag has data type 13"),
    (140, 9, r"its array flags have data type miUINT32 and 9 bytes"),
    (152, 1, r"its dimensions have data type miINT8"),
    (160, 0xFF, r"\('data'\) is truncated or corrupt: its dims \[255, 4, 3, 1\] call "
                r"for 3060 values but its real part has 192 bytes of miSINGLE"),
    (176, 2, r"its name has data type miUINT8, not ASCII miINT8"),
    (178, 9, r"the element of its name is a small data element of 9 bytes \(at most 4\)"),
    (189, 0x10, r"the element of its real part \(miSINGLE, 4288 bytes at byte 56 of the variable\) "
                r"runs past the variable's 248 bytes"),
])
def test_damaged_mat_element_tags_are_refused_before_scipy_reads_them(
        tmp_path, offset, value, words):
    path = damaged(mat_file(tmp_path), offset, value)
    with pytest.raises(MatFileError, match=f"'{path}'.*{words}"):
        read_mat(path)


def test_damaged_compressed_and_v4_files(tmp_path):
    path = str(tmp_path / "c.mat")
    scipy.io.savemat(path, {"data": np.ones((5, 5), np.float32)}, do_compression=True)
    raw = bytearray(open(path, "rb").read())
    raw[140:150] = b"\xff" * 10
    open(path, "wb").write(bytes(raw))
    with pytest.raises(MatFileError, match=f"MAT file '{path}', the variable at byte 128 "
                                           f"is corrupt: its compressed data does not "
                                           f"inflate"):
        read_mat(path)
    path = str(tmp_path / "v4.mat")
    scipy.io.savemat(path, {"data": np.arange(6.).reshape(2, 3)}, format="4")
    raw = bytearray(open(path, "rb").read())
    raw[7] = 0x53                     # rows 2 -> 2 + 0x53 << 24: MemoryError in scipy
    open(path, "wb").write(bytes(raw))
    with pytest.raises(MatFileError, match=f"MAT file '{path}' \\(v4\\), the variable at "
                                           f"byte 0 is truncated or corrupt"):
        read_mat(path)


def test_single_byte_damage_never_crashes_the_reader(tmp_path):
    """Every value in each byte of the tags (scipy's reader segfaults on some) gives
    the data or a MatFileError; run in a child process, so a crash fails the test."""
    src = corpus_path("matio", CORPUS_FILES[1] + ".mat")
    script = f"""
import sys, warnings
warnings.simplefilter("ignore")
from caffelite.io.matfile import MatFileError, read_mat
raw = open({src!r}, "rb").read()
path = {str(tmp_path / "f.mat")!r}
outcomes = set()
for offset in range(116, 200):
    for value in list(range(24)) + [0x40, 0x7f, 0x80, 0x89, 0xfe, 0xff]:
        b = bytearray(raw); b[offset] = value
        open(path, "wb").write(bytes(b))
        try:
            read_mat(path, dtype=None)
            outcomes.add("ok")
        except MatFileError as e:
            assert path in str(e), e
            outcomes.add("error")
print(sorted(outcomes))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['error', 'ok']"


def test_damaged_features_through_eval_crf_and_matread(tmp_path, capsys):
    feat, img, gt = (tmp_path / d for d in ("feat", "img", "gt"))
    for d in (feat, img, gt):
        d.mkdir()
    Image.fromarray(np.array([[0, 1, 2], [2, 1, 0]], np.uint8)).save(gt / "a.png")
    Image.fromarray(np.full((2, 3, 3), 90, np.uint8)).save(img / "a.jpg")
    path = damaged(mat_file(feat), 184, 0x89)
    (tmp_path / "ids.txt").write_text("a\n")
    ids = str(tmp_path / "ids.txt")
    words = (f"MAT file '{path}', the variable at byte 128 ('data') is corrupt: its real "
             f"part has data type 137 (unknown), not a numeric type")
    code, line = _main(capsys, "eval", "--gt", str(gt), "--list", ids, "--features",
                       str(feat), "--num-labels", "3")
    assert code == 1 and line == f"caffelite eval: error: {words}"
    code, line = _main(capsys, "crf", "--features", str(feat), "--images", str(img),
                       "--list", ids, "--out", str(tmp_path / "out"))
    assert code == 1 and line == f"caffelite crf: error: {words}"
    with pytest.raises(NetError, match=f"layer 'r' \\(MatRead\\): MAT file '{path}'.*"
                                       f"data type 137"):
        make_net(f'''layer {{ name: "r" type: "MatRead" top: "x"
            mat_read_param {{ prefix: "{feat}/" source: "{ids}" }} }}''')


# ------------------------------------------------------------------ F18: complex values
def test_complex_mat_variable_is_refused_not_cast(tmp_path):
    path = str(tmp_path / "c.mat")
    scipy.io.savemat(path, {"data": (np.ones((4, 4, 3, 1)) * (1 + 2j)).astype(np.complex64)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # no ComplexWarning either
        with pytest.raises(MatFileError, match=f"MAT file '{path}': variable 'data' is "
                                               f"complex; it must be a real numeric array"):
            read_mat(path)
        with pytest.raises(MatFileError, match="is complex"):
            read_mat(path, dtype=None)


# -------------------------------------------------------- F3: pascal and Latin-1 id lists
def test_pascal_reads_id_lists_as_the_matwrite_layer_does(tmp_path):
    (tmp_path / "ids.txt").write_bytes(b"0\n1\xe9 extra\n\n")
    net = tmp_path / "test.prototxt"
    net.write_text(f'''name: "n"
layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ dim: 1 dim: 2 }} }} }}
layer {{ name: "mw" type: "MatWrite" bottom: "x"
  mat_write_param {{ prefix: "{tmp_path}/f/" source: "{tmp_path / 'ids.txt'}" }} }}''')
    outputs = pascal.mat_write_outputs(str(net), 5)
    assert [os.fsencode(p) for p in outputs] == [
        os.fsencode(f"{tmp_path}/f/") + name + b"_blob_0.mat" for name in (b"0", b"1\xe9")]
    net.write_text(net.read_text().replace("ids.txt", "missing.txt"))
    with pytest.raises(pascal.PipelineError, match=f"{net}: MatWrite layer 'mw': cannot "
                                                   f"open the source list file "
                                                   f"'{tmp_path / 'missing.txt'}'"):
        pascal.mat_write_outputs(str(net), 1)


def test_pascal_weak_list_keeps_latin1_ids(tmp_path, monkeypatch):
    from test_pascal import NET, _make_experiment
    exp, data = _make_experiment(tmp_path)
    lists = exp / "list"
    lines = [b"/JPEGImages/a.jpg /Seg/a.png", b"/JPEGImages/\xe9t\xe9.jpg /Seg/\xe9t\xe9.png"]
    (lists / "train.txt").write_bytes(b"".join(line + b"\n" for line in lines))
    (lists / "strong.txt").write_bytes(lines[0] + b"\n")
    p = pascal.Pipeline(str(exp), NET, data_root=str(data),
                        defines={"TRAIN_SET_STRONG": "strong"})
    monkeypatch.chdir(tmp_path)
    assert p._weak_list("train") == "train_diff_strong"
    assert (lists / "train_diff_strong.txt").read_bytes() == lines[1] + b"\n"


# ------------------------------------------------- F10: label folders are not overwritten
@pytest.fixture
def labels(tmp_path):
    feat, img, gt = (tmp_path / d for d in ("feat", "img", "SegmentationClass"))
    for d in (feat, img, gt):
        d.mkdir()
    Image.fromarray(np.array([[0, 1, 2], [2, 1, 0]], np.uint8)).save(gt / "a.png")
    Image.fromarray(np.full((2, 3, 3), 90, np.uint8)).save(img / "a.jpg")
    write_mat(str(feat / "a_blob_0.mat"), np.zeros((1, 3, 4, 4), np.float32))
    (tmp_path / "ids.txt").write_text("a\n")
    return {"feat": feat, "img": img, "gt": gt, "ids": tmp_path / "ids.txt",
            "root": tmp_path}


def test_crf_out_refuses_a_folder_of_labels_it_did_not_write(capsys, labels):
    before = (labels["gt"] / "a.png").read_bytes()
    argv = ["crf", "--features", str(labels["feat"]), "--images", str(labels["img"]),
            "--list", str(labels["ids"]), "--max_iter", "1", "--out"]
    code, line = _main(capsys, *argv, str(labels["gt"]))
    assert code == 1
    assert line == (f"caffelite crf: error: --out: '{labels['gt']}' already holds 1 of the "
                    f"files this run would write (e.g. '{labels['gt'] / 'a.png'}') and is "
                    f"no folder that 'caffelite crf' wrote before: they could be ground "
                    f"truth or other results, and would be overwritten; give --out a new "
                    f"or empty folder (or delete those files)")
    assert (labels["gt"] / "a.png").read_bytes() == before
    out = labels["root"] / "crf"
    for _ in range(2):                               # its own folder: runs again into it
        assert _main(capsys, *argv, str(out))[0] == 0
        assert os.path.isfile(out / "a.png")


def test_eval_vis_refuses_a_folder_of_labels_it_did_not_write(capsys, labels):
    aug = labels["root"] / "SegmentationClassAug"
    aug.mkdir()
    (aug / "a.png").write_bytes((labels["gt"] / "a.png").read_bytes())
    argv = ["eval", "--gt", str(labels["gt"]), "--list", str(labels["ids"]), "--features",
            str(labels["feat"]), "--num-labels", "3", "--vis"]
    code, line = _main(capsys, *argv, str(aug))
    assert code == 1
    assert line.startswith(f"caffelite eval: error: --vis: '{aug}' already holds 1 of the "
                           f"files this run would write (e.g. '{aug / 'a.png'}') and is no "
                           f"folder that 'caffelite eval --vis' wrote before")
    assert (aug / "a.png").read_bytes() == (labels["gt"] / "a.png").read_bytes()
    code, line = _main(capsys, *argv, str(labels["gt"]))
    assert code == 1 and "is the --gt input" in line
    vis = labels["root"] / "vis"
    for _ in range(2):
        assert _main(capsys, *argv, str(vis))[0] == 0
        assert os.path.isfile(vis / "a.png")


# ------------------------------------------------ F12, F17, F19: databases and the tools
@pytest.fixture
def image_list(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "list.txt").write_text("img/0.png 0\nimg/1.png 1\nimg/2.png 2\n")
    return tmp_path


def test_compute_image_mean_never_writes_into_its_input_db(capsys, image_list):
    db = image_list / "train_lmdb"
    assert cli.main(["convert_imageset", f"{image_list}/", str(image_list / "list.txt"),
                     str(db)]) == 0
    before = (db / "data.mdb").read_bytes()
    for out, where in ((db / "data.mdb", "is inside"), (db, "is"),
                       (db / ".." / db.name / "mean.binaryproto", "is inside")):
        code, line = _main(capsys, "compute_image_mean", str(db), str(out))
        assert code == 1
        assert line == (f"caffelite compute_image_mean: error: output file '{out}' {where} "
                        f"the input database '{db}': writing the mean there would destroy "
                        f"the database; write it elsewhere")
    assert (db / "data.mdb").read_bytes() == before
    assert _main(capsys, "compute_image_mean", str(db),
                 str(image_list / "mean.binaryproto"))[0] == 0


def test_convert_imageset_says_when_images_could_not_be_read(capsys, image_list):
    code = cli.main(["convert_imageset", f"{image_list}/wrong/", str(image_list / "list.txt"),
                     str(image_list / "db")])
    err = capsys.readouterr().err.splitlines()
    assert code == 0                                  # as Caffe's tool: `return 0`
    assert err[-1].startswith("E") and err[-1].endswith(
        f"None of the 3 images could be read (see the errors above): "
        f"'{image_list / 'db'}' holds no records. Each image is read from ROOTFOLDER + its "
        f"list path: is ROOTFOLDER '{image_list}/wrong/' right?")
    os.remove(image_list / "img" / "1.png")
    assert cli.main(["convert_imageset", f"{image_list}/", str(image_list / "list.txt"),
                     str(image_list / "db2")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("W") and err[-1].endswith(
        f"1 of the 3 images could not be read and are not in '{image_list / 'db2'}' (see "
        f"the errors above)")


def test_damaged_small_leveldb_is_called_damaged_not_empty(capsys, image_list):
    db = image_list / "db"
    assert cli.main(["convert_imageset", "--backend", "leveldb", f"{image_list}/",
                     str(image_list / "list.txt"), str(db)]) == 0
    log = db / "000002.log"
    raw = bytearray(log.read_bytes())
    raw[300] ^= 0xFF                                # the log's one record (one batch)
    log.write_bytes(bytes(raw))
    code, line = _main(capsys, "compute_image_mean", "--backend", "leveldb", str(db))
    assert code == 1
    assert line == (f"caffelite compute_image_mean: error: database '{db}' has no readable "
                    f"record: {log}: record at offset 0 fails its checksum: it and the "
                    f"rest of the log ({len(raw)} bytes) are dropped, as LevelDB drops a "
                    f"crash's torn last write; if the database was closed cleanly, the "
                    f"file is damaged")


def test_damage_before_intact_log_records_is_an_error(tmp_path):
    from caffelite.io.leveldb import LevelDBError, LevelDBReader
    from caffelite.io.leveldb_writer import LevelDBWriter
    path = tmp_path / "db"
    with LevelDBWriter(str(path), batch_size=1) as writer:     # three log records
        for i in range(3):
            writer.put(b"k%d" % i, b"v" * 50)
    log = path / "000002.log"
    raw = bytearray(log.read_bytes())
    raw[20] ^= 0xFF                                 # inside the first of three records
    log.write_bytes(bytes(raw))
    with pytest.raises(LevelDBError, match=f"{log}: record at offset 0: checksum mismatch, "
                                           f"with intact records after it: the file is "
                                           f"damaged"):
        LevelDBReader(path)


# ---------------------------------------------------- F16: MatWrite given the image list
def test_matwrite_source_that_lists_images_gets_a_hint(tmp_path, caplog):
    (tmp_path / "val.txt").write_text("/JPEGImages/2007_000033.jpg /Seg/2007_000033.png\n")
    (tmp_path / "features").mkdir()
    text = f'''layer {{ name: "in" type: "DummyData" top: "x"
      dummy_data_param {{ shape {{ dim: 1 dim: 2 }} }} }}
    layer {{ name: "mw" type: "MatWrite" bottom: "x"
      mat_write_param {{ prefix: "{tmp_path}/features/" source: "{tmp_path / 'val.txt'}" }} }}'''
    hint = (f"{tmp_path / 'val.txt'}:1: '/JPEGImages/2007_000033.jpg' looks like an image "
            f"path, not an id: mat_write_param.source lists ids, one per line (the kit's "
            f"${{TEST_SET}}_id.txt, not the image list ${{TEST_SET}}.txt)")
    net = make_net(text)
    assert any(hint in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    with pytest.raises(LayerError) as info:
        net.forward()
    assert str(info.value).startswith(
        f"layer 'mw' (MatWrite): cannot write MAT file '{tmp_path}/features//JPEGImages/"
        f"2007_000033.jpg_blob_0.mat': No such file or directory; {hint}")


# ------------------------------------------------------------ weights and states that are
# something else: a failed download, an archive, the other kind of HDF5 file
_DOWNLOAD_MISTAKES = {
    "lfs": (lambda raw: b"version https://git-lfs.github.com/spec/v1\noid sha256:"
            + b"0" * 64 + b"\nsize 1234\n", "Git LFS pointer"),
    "html": (lambda raw: b"\n<!DOCTYPE html>\n<html><body>Sign in</body></html>\n",
             "HTML page"),
    "gzip": (lambda raw: __import__("gzip").compress(raw), "gzip-compressed"),
    "zip": (lambda raw: b"PK\x03\x04" + raw, "zip archive"),
    "bzip2": (lambda raw: __import__("bz2").compress(raw), "bzip2-compressed"),
}
_IP_NET = ('input: "data" input_shape { dim: 1 dim: 1 dim: 2 dim: 2 }\n'
           'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"\n'
           '        inner_product_param { num_output: 2 } }\n')


@pytest.mark.parametrize("kind", sorted(_DOWNLOAD_MISTAKES))
def test_weights_from_a_failed_download_or_an_archive_say_so(tmp_path, kind):
    from caffelite.io.caffemodel import CaffemodelError
    from caffelite.io.prototxt import PrototxtError
    from caffelite.io.solverstate import SolverStateError, read_solverstate
    make, words = _DOWNLOAD_MISTAKES[kind]
    net = make_net(_IP_NET)
    good = tmp_path / "good.caffemodel"
    net.save(str(good))
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(make(good.read_bytes()))
    for read, error in ((net.copy_from, CaffemodelError), (read_solverstate, SolverStateError),
                        (lambda p: caffelite.Net(p, caffelite.TEST), PrototxtError)):
        with pytest.raises(error) as caught:
            read(str(path))
        assert str(path) in str(caught.value) and words in str(caught.value)


def test_hdf5_state_and_weights_swapped_say_which_flag_takes_them(tmp_path):
    h5py = pytest.importorskip("h5py")
    from caffelite.io.solverstate import SolverStateError, read_solverstate, \
        read_solverstate_hdf5
    net = make_net(_IP_NET)
    weights = tmp_path / "w.caffemodel.h5"
    net.save_hdf5(str(weights))
    state = tmp_path / "s.solverstate.h5"
    with h5py.File(state, "w") as f:
        f["iter"], f["current_step"] = 3, 0
        f.create_group("history")
    with pytest.raises(NetError, match=r"no 'data' group\) \(this is an HDF5 solverstate: "
                                       r"resume from it with --snapshot\)"):
        net.copy_from(str(state))
    with pytest.raises(SolverStateError, match=r"these are HDF5 weights.*--weights"):
        read_solverstate_hdf5(str(weights))
    unsuffixed = tmp_path / "s.solverstate"
    unsuffixed.write_bytes(state.read_bytes())
    with pytest.raises(SolverStateError, match=r"an HDF5 file: Caffe reads a solverstate as "
                                               r"HDF5 only when its name ends in \.h5"):
        read_solverstate(str(unsuffixed))


def test_hdf5_weights_after_a_user_block_are_read_as_h5fis_hdf5_finds_them(tmp_path):
    h5py = pytest.importorskip("h5py")
    net = make_net(_IP_NET)
    path = tmp_path / "ub.caffemodel.h5"
    weights = np.arange(8, dtype=np.float32).reshape(2, 4)
    with h5py.File(path, "w", userblock_size=1024) as f:
        f["data/ip/0"], f["data/ip/1"] = weights, np.ones(2, np.float32)
    assert path.read_bytes()[:8] != b"\x89HDF\r\n\x1a\n"
    net.copy_from(str(path))
    assert np.array_equal(net.params["ip"][0].data, weights)
    assert np.array_equal(net.params["ip"][1].data, np.ones(2, np.float32))


def test_data_layer_on_a_damaged_small_leveldb_calls_it_damaged(image_list):
    db = image_list / "db"
    assert cli.main(["convert_imageset", "--backend", "leveldb", f"{image_list}/",
                     str(image_list / "list.txt"), str(db)]) == 0
    log = db / "000002.log"
    raw = bytearray(log.read_bytes())
    raw[300] ^= 0xFF
    log.write_bytes(bytes(raw))
    with pytest.raises(NetError, match=rf"layer .d.*database '{db}' has no readable "
                                       rf"record: {log}: record at offset 0 fails its "
                                       r"checksum") as caught:
        make_net(f'layer {{ name: "d" type: "Data" top: "data" top: "label" data_param '
                 f'{{ source: "{db}" backend: LEVELDB batch_size: 1 }} }}')
    assert "is empty" not in str(caught.value)
