"""caffelite's versions of Caffe's tool programs against the real BVLC Caffe 1.0 binaries.

Set CAFFELITE_BVLC_PYCAFFE as for tests/test_bvlc_oracle.py: ``env.sh`` beside that
launcher puts BVLC's ``convert_imageset``, ``compute_image_mean``, ``extract_features``,
``convert_mnist_data``, ``convert_cifar_data``, ``upgrade_net_proto_binary`` and
``upgrade_solver_proto_text`` on PATH (Debian bullseye's CPU build, git 99bd997 of
2018-08-21, OpenCV 4.5); without it these tests skip.  Each case writes its own small
inputs (PNG and JPEG images of odd sizes, gray and colour, 16-bit and palette PNGs,
progressive and CMYK JPEGs; MNIST IDX and CIFAR-10 binary files; V0/V1 caffemodels; old
solvers), runs the BVLC tool and caffelite's (``caffelite.cli.main``, in this process)
on the same files, and compares what they write: the KEY/VALUE records of the databases
(read with py-lmdb and plyvel where installed, else caffelite's own readers), which
hold serialized Datums and must be equal byte for byte; the .binaryproto means, the
upgraded caffemodels and solver texts, byte for byte; the exit status (zero or not: a
failed CHECK aborts Caffe with 134, caffelite exits with 1 and one line) and the log
lines a script would parse ("Processed N files.", the mean values, ...).

caffelite follows the DeepLab-v2 fork (BVLC Caffe of early 2016), not 1.0.  Where the
two Caffes differ and caffelite does what the fork did, the case asserts each side's
behaviour and says why:

* list files are read as ``while (infile >> filename >> label)`` (before BVLC PR #4059,
  May 2016): whitespace-separated tokens, no spaces in paths, the list ending at the
  first label that is not an int; 1.0 splits each line at its last space;
* ``matchExt`` compares the file's extension *with its dot*, so ``--encode_type``
  always re-encodes the image; 1.0 compares it without the dot and stores the file's
  own bytes when the extension names the encoding;
* re-encoded PNGs (and BMPs) come from Pillow's encoder (convert_imageset.py says so):
  the same pixels as OpenCV's ``imencode``, other bytes; re-encoded JPEGs are the same
  bytes;
* a net's ``input:`` fields stay input fields (1.0's upgrade makes an Input layer of
  them), and the text printer writes floats as protobuf 2.x did (``%.8g`` where ``%.6g``
  does not read back; 1.0's protobuf 3.x writes ``%.9g``);
* the fork's log words: compute_image_mean's "Starting Iteration" and "mean_value
  channel [c]:v", extract_features' "Extacting Features", convert_mnist_data's
  "Processed N files." at ERROR and only after a partial last batch;
* EXIF orientation is not applied (README "Known differences"; OpenCV >= 3.1 rotates).

Where caffelite refuses input that Caffe turns into a useless output with status 0 (a
truncated MNIST file, an empty database for compute_image_mean), the case asserts both
sides too (README: bad input stops with one line).

The shuffle cases build a small LD_PRELOAD library with the C compiler (skipped
without one) that hands Caffe's unseeded generator a chosen seed.
"""
import collections
import contextlib
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from test_bvlc_oracle import PYCAFFE     # the oracle's launcher (its env.sh beside it)
from conftest import caffelite_logger_kept, working_dir

ORACLE = os.path.dirname(PYCAFFE) if PYCAFFE else None
ENV_SH = os.path.join(ORACLE, "env.sh") if ORACLE else None
pytestmark = pytest.mark.skipif(
    not ENV_SH or not os.path.isfile(ENV_SH),
    reason="set CAFFELITE_BVLC_PYCAFFE (scripts/bvlc_caffe_oracle.py); its env.sh puts "
           "BVLC's tools on PATH")

Run = collections.namedtuple("Run", "rc log")
GLOG_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ [^\]]+\] (.*)$", re.M)


# ----------------------------------------------------------------------- running tools
def _bvlc_env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLOG_")}
    env.update(GLOG_logtostderr="1", **(extra or {}))
    return env


def bvlc(tool, *args, cwd, env=None, timeout=300):
    """BVLC's tool, run with env.sh's PATH and libraries, every log line on stderr."""
    proc = subprocess.run(["bash", "-c", f'. "{ENV_SH}" && exec "$0" "$@"', tool,
                           *map(str, args)], cwd=cwd, env=_bvlc_env(env),
                          capture_output=True, timeout=timeout)
    return Run(proc.returncode, proc.stderr.decode("utf-8", "replace"))


def have_tool(tool):
    return bool(ENV_SH) and subprocess.run(
        ["bash", "-c", f'. "{ENV_SH}" && command -v "$0"', tool],
        capture_output=True).returncode == 0


@contextlib.contextmanager
def _without_glog_environment():
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("GLOG_")}
    try:
        yield
    finally:
        os.environ.update(saved)


def caffelite(tool, *args, cwd):
    """caffelite's version of the tool (``caffelite <tool> ...``, as a link named after
    the tool runs it), in this process: (exit status, what it wrote on stderr)."""
    from caffelite.cli import main
    err = io.StringIO()
    with working_dir(cwd), _without_glog_environment(), contextlib.redirect_stderr(err), \
            caffelite_logger_kept():
        try:
            rc = main([tool, *map(str, args)])
        except SystemExit as e:     # argparse
            rc = e.code
    return Run(rc, err.getvalue())


def log_lines(run, level=None):
    """The messages of the run's glog lines (of one level, if given)."""
    return [msg for lev, msg in GLOG_LINE.findall(run.log) if level in (None, lev)]


def levels_of(run, pattern):
    """{message: level} of the glog lines whose message matches ``pattern``."""
    return {msg: lev for lev, msg in GLOG_LINE.findall(run.log) if re.search(pattern, msg)}


def both_ok(theirs, ours):
    assert theirs.rc == 0, theirs.log[-3000:]
    assert ours.rc == 0, ours.log[-3000:]


def both_fail(theirs, ours, *words):
    """Both refuse (Caffe's failed CHECK: 134; caffelite: 1 and one line), and both
    messages hold ``words``."""
    assert theirs.rc != 0, theirs.log[-3000:]
    assert ours.rc != 0, ours.log[-3000:]
    for word in words:
        assert word in theirs.log, (word, theirs.log[-3000:])
        assert word in ours.log, (word, ours.log[-3000:])


# -------------------------------------------------------------------- reading databases
def records(path, backend="lmdb"):
    """[(key, value)] of the database, in key order, read without writing to it."""
    path = str(path)
    if backend == "lmdb":
        try:
            import lmdb
        except ImportError:
            lmdb = None
        if lmdb is not None:
            with lmdb.open(path, readonly=True, lock=False) as env, env.begin() as txn:
                return [(bytes(k), bytes(v)) for k, v in txn.cursor()]
    else:
        try:
            import plyvel
        except ImportError:
            plyvel = None
        if plyvel is not None:      # plyvel may compact the log it opens: read a copy
            copy = path.rstrip("/") + ".readcopy"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(path, copy)
            db = plyvel.DB(copy)
            try:
                return list(db)
            finally:
                db.close()
                shutil.rmtree(copy, ignore_errors=True)
    from caffelite.io.db import BACKENDS_BY_NAME, open_db
    with _without_glog_environment():
        reader = open_db(path, BACKENDS_BY_NAME[backend])
    with reader:
        return [(bytes(k), bytes(v)) for k, v in reader.items()]


def datum(value):
    from caffelite.proto import caffe_pb2
    return caffe_pb2.Datum.FromString(value)


def decoded(data):
    """An encoded image's pixels as stored (PIL, mode kept): how two encoders' files
    of the same pixels compare."""
    from PIL import Image
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.mode, np.asarray(img)


def _is_png(data):
    return data.startswith(b"\x89PNG\r\n\x1a\n")


def _is_bmp(data):
    return data.startswith(b"BM")


def assert_same_records(theirs, ours, lossless_pixels=True):
    """The same keys in the same order and byte-identical Datums; with
    ``lossless_pixels``, a PNG or BMP both sides re-encoded may hold other bytes (Pillow's
    encoder, documented) as long as its pixels and the Datum's other fields are the
    same."""
    assert [k for k, _ in theirs] == [k for k, _ in ours]
    for (key, v_theirs), (_, v_ours) in zip(theirs, ours):
        if v_theirs == v_ours:
            continue
        d_theirs, d_ours = datum(v_theirs), datum(v_ours)
        lossless = lossless_pixels and d_theirs.encoded and d_ours.encoded and (
            (_is_png(d_theirs.data) and _is_png(d_ours.data))
            or (_is_bmp(d_theirs.data) and _is_bmp(d_ours.data)))
        assert lossless, (key, _describe(d_theirs), _describe(d_ours))
        mode_t, px_t = decoded(d_theirs.data)
        mode_o, px_o = decoded(d_ours.data)
        assert (mode_t, px_t.shape) == (mode_o, px_o.shape), key
        np.testing.assert_array_equal(px_o, px_t, err_msg=str(key))
        d_theirs.ClearField("data")
        d_ours.ClearField("data")
        assert d_theirs == d_ours, key


def _describe(d):
    return dict(channels=d.channels, height=d.height, width=d.width, label=d.label,
                encoded=d.encoded, data=len(d.data), head=d.data[:12],
                float_data=len(d.float_data))


# ------------------------------------------------------------------------------ images
def _smooth(rng, h, w, c):
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                     (x * 13 + y * 7) % 256], -1)[..., :c]
    return np.clip(base + rng.integers(-35, 35, base.shape), 0, 255).astype(np.uint8)


def _png_chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def _raw_png(path, pixels, color_type, depth, extra=b""):
    """A PNG written by hand: 16-bit samples and gAMA/sRGB chunks as given."""
    h, w = pixels.shape[:2]
    sample = ">u2" if depth == 16 else np.uint8
    raw = b"".join(b"\x00" + pixels[r].astype(sample).tobytes() for r in range(h))
    header = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + extra
                + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


# Every image of the shared folder, in list order (label = index); none may hold a
# space or lack an extension (those have cases of their own).
IMAGES = ["a.png", "sub/b420.jpg", "c_gray.png", "d_gray.jpg", "e_rgba.png", "F.JPEG",
          "pal.png", "ptrns.png", "la.png", "p16rgb.png", "p16gray.png", "pgama.png",
          "psrgb.png", "j444.jpg", "jprog.jpg", "jcmyk.jpg", "n16x20.png", "n31x17.png",
          "n3x2.png", "g16x20.png", "g31x17.png"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of images (``img/``) and list files: ``all.txt`` (every image, and a
    missing one), ``same.txt`` (three images of one size)."""
    from PIL import Image
    root = tmp_path_factory.mktemp("tools_images")
    img = root / "img"
    (img / "sub").mkdir(parents=True)
    rng = np.random.default_rng(20261206)

    def save(name, array, mode=None, **options):
        Image.fromarray(array, mode).save(img / name, **options)

    save("a.png", _smooth(rng, 7, 11, 3))
    save("sub/b420.jpg", _smooth(rng, 13, 9, 3), quality=90, subsampling=2)
    save("c_gray.png", _smooth(rng, 10, 15, 1)[..., 0])
    save("d_gray.jpg", _smooth(rng, 17, 6, 1)[..., 0], quality=85)
    save("e_rgba.png", np.dstack([_smooth(rng, 9, 9, 3), _smooth(rng, 9, 9, 1)]))
    save("F.JPEG", _smooth(rng, 8, 12, 3), quality=92)
    Image.fromarray(_smooth(rng, 5, 5, 3)).convert(
        "P", palette=Image.ADAPTIVE, colors=8).save(img / "pal.png")
    Image.fromarray(_smooth(rng, 6, 7, 3)).convert(
        "P", palette=Image.ADAPTIVE, colors=6).save(img / "ptrns.png", transparency=2)
    save("la.png", np.dstack([_smooth(rng, 8, 8, 1), _smooth(rng, 8, 8, 1)]), "LA")
    _raw_png(img / "p16rgb.png", rng.integers(0, 65536, (7, 9, 3)), 2, 16)
    _raw_png(img / "p16gray.png", rng.integers(0, 65536, (5, 6)), 0, 16)
    _raw_png(img / "pgama.png", _smooth(rng, 6, 8, 3), 2, 8,
             _png_chunk(b"gAMA", struct.pack(">I", 45455)))
    _raw_png(img / "psrgb.png", _smooth(rng, 6, 8, 3), 2, 8, _png_chunk(b"sRGB", b"\x00"))
    save("j444.jpg", _smooth(rng, 13, 11, 3), quality=90, subsampling=0)
    save("jprog.jpg", _smooth(rng, 15, 17, 3), quality=80, progressive=True)
    Image.fromarray(_smooth(rng, 12, 10, 3)).convert("CMYK").save(img / "jcmyk.jpg",
                                                                  quality=90)
    for h, w in [(16, 20), (31, 17), (3, 2)]:
        save(f"n{h}x{w}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    for h, w in [(16, 20), (31, 17)]:
        save(f"g{h}x{w}.png", rng.integers(0, 256, (h, w), dtype=np.uint8))
    assert sorted(IMAGES) == sorted(str(p.relative_to(img)) for p in img.rglob("*.*"))
    listed = IMAGES[:3] + ["missing.png"] + IMAGES[3:]
    (root / "all.txt").write_text("".join(f"{n} {i}\n" for i, n in enumerate(listed)))
    (root / "same.txt").write_text("a.png 0\na.png 1\na.png 2\n")
    return root


def convert_both(root, name, flags, list_file="all.txt", folder="img/"):
    """Both converters on the same list: (BVLC's run, caffelite's run, BVLC's database,
    caffelite's database)."""
    ours_db, theirs_db = root / f"cl_{name}", root / f"bvlc_{name}"
    for path in (ours_db, theirs_db):
        shutil.rmtree(path, ignore_errors=True)
    theirs = bvlc("convert_imageset", *flags, folder, list_file, theirs_db.name, cwd=root)
    ours = caffelite("convert_imageset", *flags, folder, list_file, ours_db.name, cwd=root)
    return theirs, ours, theirs_db, ours_db


def _backend(flags):
    return "leveldb" if "--backend=leveldb" in flags else "lmdb"


# -------------------------------------------------------------------- convert_imageset
CONVERT_CASES = {
    "default": [],
    "gray": ["--gray"],
    "resize_down": ["--resize_height=10", "--resize_width=7"],
    "resize_up": ["--resize_height=37", "--resize_width=23"],
    "resize_halving": ["--resize_height=8", "--resize_width=10"],
    "resize_odd": ["--resize_height=5", "--resize_width=13"],
    "resize_1x1": ["--resize_height=1", "--resize_width=1"],
    "resize_gray": ["--gray", "--resize_height=11", "--resize_width=9"],
    "resize_height_only": ["--resize_height=5"],
    "leveldb": ["--backend=leveldb"],
    "leveldb_resize": ["--backend=leveldb", "--resize_height=9", "--resize_width=9"],
    "encoded": ["--encoded"],
    "encoded_gray": ["--encoded", "--gray"],
    "encoded_resize": ["--encoded", "--resize_height=9", "--resize_width=11"],
    "encoded_gray_resize": ["--encoded", "--gray", "--resize_height=6",
                            "--resize_width=5"],
    "encoded_leveldb": ["--encoded", "--backend=leveldb"],
    # one resize flag resizes nothing, but makes an encoded image re-encoded
    "encoded_height_only": ["--encoded", "--resize_height=5"],
    "resize_negative": ["--resize_height=-5", "--resize_width=7"],
    "root_without_slash": [],
}


@pytest.mark.parametrize("case", sorted(CONVERT_CASES))
def test_convert_imageset_records_match(images, case):
    """The same keys (``%08d_<path>``, the list index, a missing image's index skipped)
    and the same Datums: OpenCV's decoding (16-bit, palette, alpha, gamma and CMYK
    files; libpng's colour-to-gray; libjpeg's luma), cv::resize's INTER_LINEAR bytes,
    encoded files' own bytes or the same pixels re-encoded."""
    flags = CONVERT_CASES[case]
    folder = "img" if case == "root_without_slash" else "img/"
    theirs, ours, theirs_db, ours_db = convert_both(images, case, flags, folder=folder)
    both_ok(theirs, ours)
    theirs_recs, ours_recs = records(theirs_db, _backend(flags)), records(ours_db,
                                                                         _backend(flags))
    assert_same_records(theirs_recs, ours_recs)
    expected = 0 if case == "root_without_slash" else len(IMAGES)
    assert len(theirs_recs) == expected
    # the lines a script parses: the list size, each unreadable file, the count (none
    # when no image was read: only a partial batch of 1000 is reported at the end)
    listed = IMAGES[:3] + ["missing.png"] + IMAGES[3:]
    unreadable = listed if case == "root_without_slash" else ["missing.png"]
    prefix = "Could not open or find file "
    for run in (theirs, ours):
        assert f"A total of {len(listed)} images." in log_lines(run, "I")
        processed = [m for m in log_lines(run, "I") if m.startswith("Processed ")]
        assert processed == ([f"Processed {expected} files."] if expected else [])
        errors = [m[len(prefix):].split(" (")[0] for m in log_lines(run, "E")
                  if m.startswith(prefix)]
        assert errors == [folder + name for name in unreadable]


GFLAGS_SPELLINGS = {
    "single_dash": ["-gray", "img/", "same.txt"],
    "bool_true": ["-gray=true", "img/", "same.txt"],
    "bool_false": ["--gray=false", "img/", "same.txt"],
    "bool_zero": ["-gray=0", "img/", "same.txt"],
    "no_prefix": ["-nogray", "img/", "same.txt"],
    "separate_values": ["-resize_height", "10", "-resize_width", "7", "img/", "same.txt"],
    "backend_word": ["-backend", "leveldb", "img/", "same.txt"],
    "flags_after": ["img/", "same.txt", "-gray", "--resize_height=4", "-resize_width=3"],
    "encoded_one": ["img/", "same.txt", "-encoded=1", "-encode_type", "jpg"],
}


@pytest.mark.parametrize("case", sorted(GFLAGS_SPELLINGS))
def test_convert_imageset_gflags_spellings(images, case):
    """Scripts' command lines as gflags reads them (one or two dashes, ``=`` or a
    separate value, ``-noflag``, ``=0``/``=true``, flags after the arguments)."""
    argv = GFLAGS_SPELLINGS[case]
    backend = "leveldb" if "leveldb" in argv else "lmdb"
    theirs_db, ours_db = images / f"bvlc_flags_{case}", images / f"cl_flags_{case}"
    for db in (theirs_db, ours_db):
        shutil.rmtree(db, ignore_errors=True)
    place = max(i for i, a in enumerate(argv) if a == "same.txt") + 1
    theirs = bvlc("convert_imageset", *argv[:place], theirs_db.name, *argv[place:],
                  cwd=images)
    ours = caffelite("convert_imageset", *argv[:place], ours_db.name, *argv[place:],
                     cwd=images)
    both_ok(theirs, ours)
    theirs_recs = records(theirs_db, backend)
    assert len(theirs_recs) == 3
    assert_same_records(theirs_recs, records(ours_db, backend))


def test_convert_imageset_keys_long_and_non_ascii(images):
    """Keys are ``format_int(line_id, 8) + "_" + path`` with the path's bytes as listed:
    one of almost 300 characters (nested folders), UTF-8 and Latin-1 names."""
    deep = "d" * 120 + "/" + "e" * 120
    (images / "img" / deep).mkdir(parents=True, exist_ok=True)
    long_name = f"{deep}/{'f' * 40}.png"
    names = [long_name.encode(), "\u00e9.png".encode(), b"\xe9l.png"]
    folder = os.fsencode(images / "img")
    for name in names:
        shutil.copy(images / "img" / "a.png", os.path.join(folder, name))
    (images / "keys.txt").write_bytes(b"".join(n + b" %d\n" % i
                                               for i, n in enumerate(names)))
    theirs, ours, theirs_db, ours_db = convert_both(images, "keys", [], "keys.txt")
    both_ok(theirs, ours)
    theirs_recs = records(theirs_db)
    assert_same_records(theirs_recs, records(ours_db))
    assert [k for k, _ in theirs_recs] == [b"%08d_" % i + n for i, n in enumerate(names)]


def test_convert_imageset_check_size(images):
    """--check_size: images of one size pass; the first of another size stops both,
    naming its data size."""
    theirs, ours, theirs_db, ours_db = convert_both(images, "check_ok", ["--check_size"],
                                                    "same.txt")
    both_ok(theirs, ours)
    assert_same_records(records(theirs_db), records(ours_db))
    theirs, ours, theirs_db, ours_db = convert_both(images, "check_bad", ["--check_size"])
    both_fail(theirs, ours, "Incorrect data field size 351")
    # Caffe aborts with the database made (nothing committed); caffelite removes it.
    assert theirs_db.exists() and records(theirs_db) == []
    assert not ours_db.exists()


def test_convert_imageset_check_size_of_encoded_datums(images):
    """Encoded Datums have no dimensions (0 x 0 x 0): the second record fails the check
    on both sides."""
    theirs, ours, _, _ = convert_both(images, "check_enc", ["--check_size", "--encoded"],
                                      "same.txt")
    both_fail(theirs, ours, "Incorrect data field size")


def test_convert_imageset_exif_orientation(images):
    """README "Known differences": EXIF orientation is not applied (as OpenCV 2.4, the
    fork's era); BVLC 1.0's OpenCV 4.5 rotates (orientation 6: 90 degrees clockwise)."""
    from PIL import Image
    exif = Image.Exif()
    exif[0x0112] = 6
    (images / "exif").mkdir(exist_ok=True)
    Image.fromarray(_smooth(np.random.default_rng(6), 6, 10, 3)).save(
        images / "exif" / "rot6.jpg", quality=90, exif=exif.tobytes())
    (images / "exif.txt").write_text("rot6.jpg 0\n")
    theirs, ours, theirs_db, ours_db = convert_both(images, "exif", [], "exif.txt",
                                                    folder="exif/")
    both_ok(theirs, ours)
    (_, v_theirs), = records(theirs_db)
    (_, v_ours), = records(ours_db)
    d_theirs, d_ours = datum(v_theirs), datum(v_ours)
    chw = np.frombuffer(d_ours.data, np.uint8).reshape(3, d_ours.height, d_ours.width)
    rotated = np.rot90(chw, k=-1, axes=(1, 2))         # clockwise
    assert (d_theirs.channels, d_theirs.height, d_theirs.width) == (3, 10, 6)
    assert (d_ours.height, d_ours.width) == (6, 10)
    np.testing.assert_array_equal(
        np.frombuffer(d_theirs.data, np.uint8).reshape(3, 10, 6), rotated)


def _bvlc_only(root, name, flags, list_file="all.txt"):
    """{key: value} of BVLC's database of the list."""
    db = root / f"bvlc_{name}"
    shutil.rmtree(db, ignore_errors=True)
    run = bvlc("convert_imageset", *flags, "img/", list_file, db.name, cwd=root)
    assert run.rc == 0, run.log[-3000:]
    return dict(records(db))


def _raw_pixels(value):
    """A raw Datum's pixels as PIL holds them: H x W RGB, or H x W gray."""
    d = datum(value)
    hwc = np.frombuffer(d.data, np.uint8).reshape(d.channels, d.height,
                                                  d.width).transpose(1, 2, 0)
    return hwc[..., ::-1] if d.channels == 3 else hwc[..., 0]


def _matches_in_bvlc_1_0(name, kind):
    """1.0's matchExt: the extension without its dot, 'jpeg' matching 'jpg'."""
    ext = name[name.rfind(".") + 1:].lower()
    return ext == kind or (kind == "jpg" and ext == "jpeg")


@pytest.mark.parametrize("gray", [False, True], ids=["colour", "gray"])
@pytest.mark.parametrize("kind", ["jpg", "png"])
def test_convert_imageset_encode_type(images, kind, gray):
    """--encode_type and the fork's matchExt, which compares the extension *with its
    dot* (never equal to 'jpg' or 'png'): caffelite re-encodes every image, where 1.0
    stores the file of a matching extension as it is.  What caffelite stores is what
    Caffe's encoder makes of the pixels as read: the same JPEG bytes (BVLC given those
    pixels in a PNG file re-encodes them), a PNG of the same pixels."""
    mode = ["--gray"] if gray else []
    flags = mode + [f"--encode_type={kind}"]
    theirs, ours, theirs_db, ours_db = convert_both(images, f"type_{kind}_{gray}", flags)
    both_ok(theirs, ours)
    theirs_recs, ours_recs = records(theirs_db), records(ours_db)
    assert [k for k, _ in theirs_recs] == [k for k, _ in ours_recs]
    raw = _bvlc_only(images, f"raw_{gray}", mode)
    fork_jpegs = []
    for (key, v_theirs), (_, v_ours) in zip(theirs_recs, ours_recs):
        name = key.split(b"_", 1)[1].decode()
        d_theirs, d_ours = datum(v_theirs), datum(v_ours)
        assert d_ours.encoded and d_theirs.encoded and d_ours.label == d_theirs.label
        file_bytes = (images / "img" / name).read_bytes()
        if _matches_in_bvlc_1_0(name, kind):
            assert d_theirs.data == file_bytes, name    # 1.0 keeps the file
            if kind == "jpg":
                assert d_ours.data != file_bytes, name  # the fork re-encodes
                fork_jpegs.append((key, name, d_ours.data))
        else:
            assert_same_records([(key, v_theirs)], [(key, v_ours)])
        if kind == "png":       # the pixels as read (for e_rgba.png: 3 channels of 4)
            _, pixels = decoded(d_ours.data)
            np.testing.assert_array_equal(pixels, _raw_pixels(raw[key]), err_msg=name)
            if name == "e_rgba.png":
                assert decoded(d_theirs.data)[0] == "RGBA" and pixels.ndim == (2 if gray
                                                                               else 3)
    assert fork_jpegs or kind == "png"
    if fork_jpegs:
        from PIL import Image
        lines = []
        for i, (key, name, _) in enumerate(fork_jpegs):
            Image.fromarray(np.ascontiguousarray(_raw_pixels(raw[key]))).save(
                images / "img" / f"px_{gray}_{i}.png")
            lines.append(f"px_{gray}_{i}.png 0\n")
        (images / f"px_{gray}.txt").write_text("".join(lines))
        fork = _bvlc_only(images, f"px_{gray}", flags, f"px_{gray}.txt")
        assert len(fork) == len(fork_jpegs)
        for (_, name, ours_data), value in zip(fork_jpegs, (fork[k] for k in sorted(fork))):
            assert ours_data == datum(value).data, name


def test_convert_imageset_encode_type_log_line(images):
    """--encode_type without --encoded: "encode_type specified, assuming encoded=true."
    (the fork's tool has the line since BVLC PR #1878, February 2015)."""
    theirs, ours, _, _ = convert_both(images, "type_line", ["--encode_type=png"],
                                      "same.txt")
    both_ok(theirs, ours)
    line = "encode_type specified, assuming encoded=true."
    assert line in log_lines(theirs, "I")
    assert line in log_lines(ours, "I")


LIST_CASES = {
    # name: (list text, BVLC 1.0's [(key, label)], the fork's = caffelite's)
    "space_in_path": ("a.png 0\nmy img.png 3\nF.JPEG 1\n",
                      [(b"00000000_a.png", 0), (b"00000001_my img.png", 3),
                       (b"00000002_F.JPEG", 1)],
                      [(b"00000000_a.png", 0)]),
    "tab": ("a.png\t4\nF.JPEG\t1\n", [], [(b"00000000_a.png", 4), (b"00000001_F.JPEG", 1)]),
    "blank_line": ("a.png 0\n\nF.JPEG 1\n",
                   [(b"00000000_a.png", 0), (b"00000002_F.JPEG", 1)],
                   [(b"00000000_a.png", 0), (b"00000001_F.JPEG", 1)]),
    "trailing_space": ("a.png 5 \nF.JPEG 1\n", [(b"00000001_F.JPEG", 1)],
                       [(b"00000000_a.png", 5), (b"00000001_F.JPEG", 1)]),
    "leading_spaces": ("  a.png   7\n", [], [(b"00000000_a.png", 7)]),
    "no_label": ("a.png 0\nF.JPEG\n", [(b"00000000_a.png", 0), (b"00000001_F.JPEG", 0)],
                 [(b"00000000_a.png", 0)]),
    "signs_and_hex": ("a.png -3\nF.JPEG +2\npal.png 0x10\nc_gray.png 2147483648\n",
                      [(b"00000000_a.png", -3), (b"00000001_F.JPEG", 2),
                       (b"00000002_pal.png", 0), (b"00000003_c_gray.png", -2147483648)],
                      [(b"00000000_a.png", -3), (b"00000001_F.JPEG", 2),
                       (b"00000002_pal.png", 0)]),
    "crlf": ("a.png 0\r\nF.JPEG 1\r\n", [(b"00000000_a.png", 0), (b"00000001_F.JPEG", 1)],
             [(b"00000000_a.png", 0), (b"00000001_F.JPEG", 1)]),
    "no_final_newline": ("a.png 0\nF.JPEG 1", [(b"00000000_a.png", 0),
                                               (b"00000001_F.JPEG", 1)],
                         [(b"00000000_a.png", 0), (b"00000001_F.JPEG", 1)]),
}


@pytest.mark.parametrize("case", sorted(LIST_CASES))
def test_convert_imageset_list_files(images, case):
    """LISTFILE as the fork reads it, ``infile >> filename >> label`` (BVLC before PR
    #4059, May 2016), against 1.0's ``getline`` split at the last space: each side's
    own records, and the same Datums where both read an image."""
    text, bvlc_expected, fork_expected = LIST_CASES[case]
    shutil.copy(images / "img" / "a.png", images / "img" / "my img.png")
    (images / f"list_{case}.txt").write_text(text)
    theirs, ours, theirs_db, ours_db = convert_both(images, f"list_{case}", [],
                                                    f"list_{case}.txt")
    both_ok(theirs, ours)
    theirs_recs, ours_recs = records(theirs_db), records(ours_db)
    assert [(k, datum(v).label) for k, v in theirs_recs] == bvlc_expected
    assert [(k, datum(v).label) for k, v in ours_recs] == fork_expected
    by_key = dict(theirs_recs)
    for key, value in ours_recs:
        if key in by_key:
            assert value == by_key[key], key


def test_convert_imageset_empty_list(images):
    """An empty LISTFILE: the fork (as 1.0) logs "A total of 0 images.", writes an empty
    database and exits with 0; so does caffelite."""
    (images / "empty.txt").write_text("")
    theirs, ours, theirs_db, ours_db = convert_both(images, "empty", [], "empty.txt")
    assert theirs.rc == 0 and "A total of 0 images." in log_lines(theirs, "I")
    assert records(theirs_db) == []
    assert ours.rc == 0 and "A total of 0 images." in log_lines(ours, "I"), ours.log
    assert records(ours_db) == []


def _shim(tmp):
    """An LD_PRELOAD library that makes Caffe's cluster_seedgen read URANDOM_SEED from
    "/dev/urandom", so the unseeded tool shuffles as after Caffe::set_random_seed."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("needs a C compiler for the seed shim")
    source = tmp / "seed.c"
    source.write_text(r'''
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static FILE *seeded(const char *path) {
  static int64_t seed;
  const char *s = getenv("URANDOM_SEED");
  if (!path || strcmp(path, "/dev/urandom") != 0 || !s) return NULL;
  seed = strtoll(s, 0, 10);
  return fmemopen(&seed, sizeof seed, "rb");
}
#define OPEN(name) FILE *name(const char *path, const char *mode) { \
  static FILE *(*real)(const char *, const char *); FILE *f = seeded(path); \
  if (f) return f; if (!real) real = dlsym(RTLD_NEXT, #name); return real(path, mode); }
OPEN(fopen)
OPEN(fopen64)
''')
    library = tmp / "seed.so"
    proc = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(library),
                           str(source), "-ldl"], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot build the seed shim: {proc.stderr[-500:]}")
    return library


@pytest.mark.parametrize("seed", [1701, 20260101])
def test_convert_imageset_shuffle_with_the_same_seed(images, tmp_path, seed):
    """--shuffle: Caffe shuffles with caffe_rng, seeded from /dev/urandom (a different
    order every run, on both sides).  Given the same seed (Caffe's through a shim,
    caffelite's through set_random_seed), the orders, keys and Datums are the same."""
    library = _shim(tmp_path)
    lines = [f"{IMAGES[i % len(IMAGES)]} {i}" for i in range(40)]
    lines.insert(17, "missing.png 99")
    (images / "shuffle.txt").write_text("\n".join(lines) + "\n")
    theirs_db, ours_db = images / f"bvlc_shuffle_{seed}", images / f"cl_shuffle_{seed}"
    for path in (theirs_db, ours_db):
        shutil.rmtree(path, ignore_errors=True)
    theirs = bvlc("convert_imageset", "--shuffle", "img/", "shuffle.txt", theirs_db.name,
                  cwd=images, env={"LD_PRELOAD": str(library), "URANDOM_SEED": str(seed)})
    code = ("import sys, caffelite; caffelite.set_random_seed(int(sys.argv[1])); "
            "from caffelite.cli import main; sys.exit(main(sys.argv[2:]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLOG_")}
    proc = subprocess.run([sys.executable, "-c", code, str(seed), "convert_imageset",
                           "--shuffle", "img/", "shuffle.txt", ours_db.name], cwd=images,
                          env=env, capture_output=True, text=True, timeout=300)
    assert theirs.rc == 0, theirs.log[-2000:]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Shuffling data" in log_lines(theirs, "I")
    assert "Shuffling data" in proc.stderr
    theirs_recs = records(theirs_db)
    assert len(theirs_recs) == 40
    assert_same_records(theirs_recs, records(ours_db))


def test_convert_imageset_errors(images):
    """Bad command lines and databases stop both tools with a status other than 0."""
    # an existing database
    (images / "exists_db").mkdir(exist_ok=True)
    theirs = bvlc("convert_imageset", "img/", "same.txt", "exists_db", cwd=images)
    ours = caffelite("convert_imageset", "img/", "same.txt", "exists_db", cwd=images)
    both_fail(theirs, ours, "exists_db")
    # an unknown backend
    theirs = bvlc("convert_imageset", "--backend=rocks", "img/", "same.txt", "x_rocks",
                  cwd=images)
    ours = caffelite("convert_imageset", "--backend=rocks", "img/", "same.txt",
                     "x_rocks2", cwd=images)
    both_fail(theirs, ours)
    assert "Unknown" in theirs.log and "Unknown" in ours.log
    # too few arguments: Caffe prints its usage and returns 1
    theirs = bvlc("convert_imageset", "img/", "same.txt", cwd=images)
    ours = caffelite("convert_imageset", "img/", "same.txt", cwd=images)
    both_fail(theirs, ours)
    # --encoded with a name without extension: 1.0 throws, the fork's substr(npos)
    # throws; caffelite says so
    shutil.copy(images / "img" / "a.png", images / "img" / "noext")
    (images / "noext.txt").write_text("noext 1\n")
    theirs, ours, _, _ = convert_both(images, "noext", ["--encoded"], "noext.txt")
    both_fail(theirs, ours, "Failed to guess the encoding of 'noext'")


# ------------------------------------------------------------------ compute_image_mean
MEAN_LINE = re.compile(r"^mean_value channel \[(\d+)\]:( ?)(\S+)$")


def _means(run):
    """[(channel, value)] of the logged mean values, and the separators after ':'."""
    found = [MEAN_LINE.match(m) for m in log_lines(run, "I")]
    found = [m for m in found if m]
    return [(int(m.group(1)), float(m.group(3))) for m in found], {m.group(2)
                                                                    for m in found}


def _mean_both(db, backend, out_dir, tag):
    args = [f"--backend={backend}"] if backend != "lmdb" else []
    out_t = out_dir / f"mean_{tag}_bvlc.binaryproto"
    out_o = out_dir / f"mean_{tag}_cl.binaryproto"
    theirs = bvlc("compute_image_mean", *args, db, out_t, cwd=out_dir)
    ours = caffelite("compute_image_mean", *args, db, out_o, cwd=out_dir)
    return theirs, ours, out_t, out_o


def _assert_means_match(theirs, ours, out_t, out_o, count):
    both_ok(theirs, ours)
    assert out_t.read_bytes() == out_o.read_bytes()
    for run in (theirs, ours):
        assert f"Processed {count} files." in log_lines(run, "I")
    (means_t, sep_t), (means_o, sep_o) = _means(theirs), _means(ours)
    assert means_t == means_o and means_t
    n_t = [m for m in log_lines(theirs, "I") if m.startswith("Number of channels")]
    assert n_t == [m for m in log_lines(ours, "I") if m.startswith("Number of channels")]
    # the fork's words: "Starting Iteration", "mean_value channel [0]:v"; 1.0's:
    # "Starting iteration", "mean_value channel [0]: v"
    assert "Starting iteration" in log_lines(theirs, "I") and sep_t == {" "}
    assert "Starting Iteration" in log_lines(ours, "I") and sep_o == {""}


@pytest.mark.parametrize("case", ["default", "resize_down", "leveldb_resize",
                                  "encoded_resize", "encoded_gray_resize"])
def test_compute_image_mean_of_both_databases(images, case):
    """The mean of the same records: each tool on the database each side wrote, the
    same .binaryproto bytes (float32 sums taken record by record), the same logged
    values.  The default case has images of many sizes: both refuse it."""
    flags = CONVERT_CASES[case]
    backend = _backend(flags)
    theirs_db, ours_db = images / f"bvlc_{case}", images / f"cl_{case}"
    if not theirs_db.exists() or not ours_db.exists():
        convert_both(images, case, flags)
    for side, db in (("bvlc_db", theirs_db), ("cl_db", ours_db)):
        theirs, ours, out_t, out_o = _mean_both(db, backend, images, f"{case}_{side}")
        if case == "default":
            both_fail(theirs, ours, "Incorrect data field size")
            continue
        _assert_means_match(theirs, ours, out_t, out_o, len(IMAGES))
        if "encoded" in case:
            assert "Decoding Datum" in log_lines(theirs, "I")
            assert "Decoding Datum" in log_lines(ours, "I")


def test_compute_image_mean_rounding_of_many_records(tmp_path):
    """90001 records of bright pixels: the float32 sums pass 2**24, where the order
    and precision of the additions show (and "Processed N files." every 10000)."""
    rng = np.random.default_rng(4)
    n, rows, cols = 90001, 1, 3
    (tmp_path / "img.idx").write_bytes(struct.pack(">IIII", 2051, n, rows, cols)
                                       + rng.integers(180, 256, (n, rows, cols),
                                                      dtype=np.uint8).tobytes())
    (tmp_path / "lab.idx").write_bytes(struct.pack(">II", 2049, n) + bytes(n))
    assert bvlc("convert_mnist_data", "img.idx", "lab.idx", "big", cwd=tmp_path).rc == 0
    theirs, ours, out_t, out_o = _mean_both(tmp_path / "big", "lmdb", tmp_path, "big")
    _assert_means_match(theirs, ours, out_t, out_o, n)
    for run in (theirs, ours):
        assert [m for m in log_lines(run, "I") if m.startswith("Processed")] == [
            f"Processed {k} files." for k in range(10000, n, 10000)] + [
            f"Processed {n} files."]


def test_compute_image_mean_refusals(images, tmp_path):
    """An empty database: Caffe reads an invalid cursor (a mean of no channels and
    status 0, or an abort, depending on the memory it finds); caffelite refuses it
    (README: bad input stops with one line).  A database that is not there, or of the
    other backend: both stop."""
    theirs, ours, _, _ = convert_both(images, "none_readable", [], folder="img")
    both_ok(theirs, ours)
    for db in ("bvlc_none_readable", "cl_none_readable"):
        theirs, ours, out_t, out_o = _mean_both(images / db, "lmdb", tmp_path, db)
        # Caffe parses the value of a cursor that is not valid: an uninitialized
        # MDB_val, so either a mean of no channels (status 0) or an abort
        assert (theirs.rc == 0 and "Number of channels: 0" in log_lines(theirs, "I")
                and out_t.exists()) or theirs.rc != 0, theirs.log[-2000:]
        assert ours.rc == 1 and "is empty" in ours.log and not out_o.exists()
    theirs, ours, _, _ = _mean_both(tmp_path / "nowhere", "lmdb", tmp_path, "nowhere")
    both_fail(theirs, ours)
    theirs, ours, _, _ = _mean_both(images / "bvlc_resize_down", "leveldb", tmp_path,
                                    "wrong_backend")
    both_fail(theirs, ours)


# -------------------------------------------------------------------- extract_features
NET = '''name: "tiny"
layer {{ name: "data" type: "Data" top: "data" top: "label"
  transform_param {{ scale: 0.00390625 }}
  data_param {{ source: "{source}" backend: {backend} batch_size: {batch} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 4 kernel_size: 3 }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1"
  inner_product_param {{ num_output: 5 }} }}
layer {{ name: "prob" type: "Softmax" bottom: "ip1" top: "prob" }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }}
'''


@pytest.fixture(scope="module")
def feature_net(tmp_path_factory):
    """A folder with two databases of 7 images (LMDB written by caffelite, LevelDB by
    Caffe), a net for each batch size and weights caffelite writes (multiples of 1/8:
    the forward sums are exact in float32, whatever their order)."""
    import caffelite as caffe
    from PIL import Image
    root = tmp_path_factory.mktemp("tools_features")
    (root / "img").mkdir()
    rng = np.random.default_rng(3)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(
            root / "img" / f"i{i}.png")
    (root / "list.txt").write_text("".join(f"i{i}.png {i % 3}\n" for i in range(7)))
    assert caffelite("convert_imageset", "img/", "list.txt", "db_lmdb", cwd=root).rc == 0
    assert bvlc("convert_imageset", "--backend=leveldb", "img/", "list.txt", "db_leveldb",
                cwd=root).rc == 0
    for backend in ("LMDB", "LEVELDB"):
        for batch in (3, 250):
            (root / f"net_{backend}_{batch}.prototxt").write_text(NET.format(
                source=f"db_{backend.lower()}", backend=backend, batch=batch))
    with working_dir(root):          # the Data layer's source is relative
        net = caffe.Net("net_LMDB_3.prototxt", caffe.TEST)
    for blobs in net.params.values():
        for blob in blobs:
            blob.data[...] = rng.integers(-8, 9, blob.shape) / 8.0
    net.save(str(root / "w.caffemodel"))
    return root


BLOBS = ["data", "label", "conv1", "ip1", "prob", "loss"]


def _assert_same_features(theirs, ours, blob):
    """The same Datums; where exp and log enter (prob, loss) values a few ulp apart are
    allowed: 1.0's GCC calls expf/logf, caffelite the fork's double exp/log (README
    "Known differences"), and the loss sums the batch's terms (up to 1 ulp each)."""
    if blob not in ("prob", "loss"):
        assert_same_records(theirs, ours, lossless_pixels=False)
        return
    assert [k for k, _ in theirs] == [k for k, _ in ours]
    for (key, v_theirs), (_, v_ours) in zip(theirs, ours):
        d_theirs, d_ours = datum(v_theirs), datum(v_ours)
        f_theirs = np.array(d_theirs.float_data, np.float32)
        f_ours = np.array(d_ours.float_data, np.float32)
        assert f_theirs.shape == f_ours.shape, key
        np.testing.assert_array_max_ulp(f_ours, f_theirs, maxulp=4)
        d_theirs.ClearField("float_data")
        d_ours.ClearField("float_data")
        assert d_theirs == d_ours, key


@pytest.mark.parametrize("backend,db_type", [("LMDB", "lmdb"), ("LEVELDB", "leveldb")])
def test_extract_features_records_match(feature_net, backend, db_type):
    """Every listed blob's items as float_data Datums (legacy C x H x W) under keys
    ``%010d``, over 4 mini-batches of 3 (the Data layer wrapping around its 7 records),
    in an LMDB or LevelDB; "Extracted features of N query images for feature blob B"."""
    root, tag = feature_net, f"{backend}_{db_type}"
    names_t = [f"bvlc_{tag}_{b}" for b in BLOBS]
    names_o = [f"cl_{tag}_{b}" for b in BLOBS]
    for name in names_t + names_o:
        shutil.rmtree(root / name, ignore_errors=True)
    common = ["w.caffemodel", f"net_{backend}_3.prototxt", ",".join(BLOBS)]
    theirs = bvlc("extract_features", *common, ",".join(names_t), 4, db_type, cwd=root)
    ours = caffelite("extract_features", *common, ",".join(names_o), 4, db_type, cwd=root)
    both_ok(theirs, ours)
    for blob, name_t, name_o in zip(BLOBS, names_t, names_o):
        theirs_recs, ours_recs = records(root / name_t, db_type), records(root / name_o,
                                                                          db_type)
        count = 4 if blob == "loss" else 12     # a blob without axes: num() is 1
        assert [k for k, _ in theirs_recs] == [b"%010d" % i for i in range(count)]
        _assert_same_features(theirs_recs, ours_recs, blob)
        message = f"Extracted features of {count} query images for feature blob {blob}"
        assert message in log_lines(theirs) and message in log_lines(ours)
    for run in (theirs, ours):
        assert "Successfully extracted the features!" in log_lines(run)
    # 1.0 fixed the fork's typo
    assert "Extracting Features" in log_lines(theirs)
    assert "Extacting Features" in log_lines(ours)


def test_extract_features_thousand_records(feature_net):
    """1000 images (4 batches of 250): the progress line at 1000, and the closing one
    after it, on both sides; the mean of the features (float_data) on both tools."""
    root = feature_net
    for name in ("bvlc_k", "cl_k"):
        shutil.rmtree(root / name, ignore_errors=True)
    common = ["w.caffemodel", "net_LMDB_250.prototxt", "ip1"]
    theirs = bvlc("extract_features", *common, "bvlc_k", 4, "lmdb", cwd=root)
    ours = caffelite("extract_features", *common, "cl_k", 4, "lmdb", cwd=root)
    both_ok(theirs, ours)
    theirs_recs = records(root / "bvlc_k")
    assert len(theirs_recs) == 1000
    assert_same_records(theirs_recs, records(root / "cl_k"), lossless_pixels=False)
    message = "Extracted features of 1000 query images for feature blob ip1"
    assert log_lines(theirs).count(message) == 2
    assert log_lines(ours).count(message) == 2
    for db in ("bvlc_k", "cl_k"):
        t, o, out_t, out_o = _mean_both(root / db, "lmdb", root, f"features_{db}")
        both_ok(t, o)
        assert out_t.read_bytes() == out_o.read_bytes()


def test_extract_features_log_levels(feature_net):
    """The tool logs its progress with LOG(ERROR), in the fork as in 1.0 (and sets no
    alsologtostderr: on a terminal these are its only lines; GLOG_minloglevel=1 keeps
    them, the ERROR log file holds them)."""
    root = feature_net
    for name in ("bvlc_lv", "cl_lv"):
        shutil.rmtree(root / name, ignore_errors=True)
    common = ["w.caffemodel", "net_LMDB_3.prototxt", "ip1"]
    theirs = bvlc("extract_features", *common, "bvlc_lv", 2, "lmdb", cwd=root)
    ours = caffelite("extract_features", *common, "cl_lv", 2, "lmdb", cwd=root)
    both_ok(theirs, ours)
    pattern = r"^(Using CPU|Extr?acting Features|Extracted features|Successfully)"
    want = levels_of(theirs, pattern)
    assert set(want.values()) == {"E"} and len(want) == 4
    got = levels_of(ours, pattern)
    assert len(got) == 4
    assert set(got.values()) == {"E"}, got


def test_extract_features_errors(feature_net):
    root = feature_net
    common = ["w.caffemodel", "net_LMDB_3.prototxt"]
    cases = [
        (["nope", "x_nope", 1, "lmdb"], "Unknown feature blob name nope in the network"),
        (["ip1,prob", "x_two", 1, "lmdb"], "must be equal"),
        (["ip1", "db_lmdb", 1, "lmdb"], "db_lmdb"),
        (["ip1", "x_kind", 1, "rocksdb"], "Unknown"),
        (["ip1", "x_few"], ""),
    ]
    for args, words in cases:
        theirs = bvlc("extract_features", *common, *args, cwd=root)
        ours = caffelite("extract_features", *common, *args, cwd=root)
        both_fail(theirs, ours, words)


# ---------------------------------------------------------- convert_mnist_data / cifar
def _idx(path_images, path_labels, count, rows, cols, rng):
    pixels = rng.integers(0, 256, (count, rows, cols), dtype=np.uint8)
    labels = rng.integers(0, 10, count, dtype=np.uint8)
    labels[:3] = [255, 128, 3]          # read as signed char: -1, -128
    path_images.write_bytes(struct.pack(">IIII", 2051, count, rows, cols)
                            + pixels.tobytes())
    path_labels.write_bytes(struct.pack(">II", 2049, count) + labels.tobytes())


@pytest.mark.skipif(not have_tool("convert_mnist_data"), reason="no convert_mnist_data")
@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_convert_mnist_data(tmp_path, backend):
    """The IDX files as 1 x rows x cols Datums under ``%08d``, labels read as signed
    char; "A total of N items.", "Rows: r Cols: c".  "Processed N files." is the fork's
    LOG(ERROR) after a partial last batch only (1.0: INFO, always)."""
    rng = np.random.default_rng(8)
    for count in (37, 2000):
        _idx(tmp_path / "img.idx", tmp_path / "lab.idx", count, 5, 7, rng)
        flags = [f"--backend={backend}"]
        shutil.rmtree(tmp_path / "bvlc_db", ignore_errors=True)
        shutil.rmtree(tmp_path / "cl_db", ignore_errors=True)
        theirs = bvlc("convert_mnist_data", *flags, "img.idx", "lab.idx", "bvlc_db",
                      cwd=tmp_path)
        ours = caffelite("convert_mnist_data", *flags, "img.idx", "lab.idx", "cl_db",
                         cwd=tmp_path)
        both_ok(theirs, ours)
        theirs_recs = records(tmp_path / "bvlc_db", backend)
        assert len(theirs_recs) == count
        assert_same_records(theirs_recs, records(tmp_path / "cl_db", backend))
        assert [datum(v).label for _, v in theirs_recs[:3]] == [-1, -128, 3]
        for run in (theirs, ours):
            assert f"A total of {count} items." in log_lines(run, "I")
            assert "Rows: 5 Cols: 7" in log_lines(run, "I")
        processed = f"Processed {count} files."
        assert processed in log_lines(theirs, "I")
        assert (processed in log_lines(ours, "E")) == (count % 1000 != 0)


@pytest.mark.skipif(not have_tool("convert_mnist_data"), reason="no convert_mnist_data")
def test_convert_mnist_data_bad_input(tmp_path):
    rng = np.random.default_rng(9)
    _idx(tmp_path / "img.idx", tmp_path / "lab.idx", 37, 5, 7, rng)
    (tmp_path / "magic.idx").write_bytes(struct.pack(">IIII", 2050, 1, 1, 1) + b"x")
    (tmp_path / "lab5.idx").write_bytes(struct.pack(">II", 2049, 5) + bytes(5))
    for args, words in ((["magic.idx", "lab.idx"], "magic"),
                        (["img.idx", "lab5.idx"], ""),
                        (["none.idx", "lab.idx"], "Unable to open file")):
        theirs = bvlc("convert_mnist_data", *args, "bvlc_x", cwd=tmp_path)
        ours = caffelite("convert_mnist_data", *args, "cl_x", cwd=tmp_path)
        both_fail(theirs, ours, words)
        for db in ("bvlc_x", "cl_x"):
            shutil.rmtree(tmp_path / db, ignore_errors=True)
    # a file shorter than its header: Caffe stores what its failed reads leave (exit
    # 0); caffelite refuses (README: bad input stops with one line)
    (tmp_path / "short.idx").write_bytes((tmp_path / "img.idx").read_bytes()[:100])
    theirs = bvlc("convert_mnist_data", "short.idx", "lab.idx", "bvlc_s", cwd=tmp_path)
    ours = caffelite("convert_mnist_data", "short.idx", "lab.idx", "cl_s", cwd=tmp_path)
    assert theirs.rc == 0 and len(records(tmp_path / "bvlc_s")) == 37
    assert ours.rc == 1 and "shorter than its header" in ours.log


@pytest.mark.skipif(not have_tool("convert_cifar_data"), reason="no convert_cifar_data")
def test_convert_cifar_data(tmp_path):
    """The five training batches and the test batch (10000 records of 1 + 3072 bytes
    each) as 3 x 32 x 32 Datums under ``%05d``, labels as signed char."""
    rng = np.random.default_rng(10)
    data = tmp_path / "cifar"
    data.mkdir()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        batch = rng.integers(0, 256, (10000, 3073), dtype=np.uint8)
        batch[:, 0] = rng.integers(0, 10, 10000)
        batch[:4, 0] = [200, 255, 128, 127]
        batch.tofile(data / name)
    for side in ("bvlc", "cl"):
        (tmp_path / side).mkdir()
    try:
        theirs = bvlc("convert_cifar_data", "cifar", "bvlc", "lmdb", cwd=tmp_path)
        ours = caffelite("convert_cifar_data", "cifar", "cl", "lmdb", cwd=tmp_path)
        both_ok(theirs, ours)
        for run in (theirs, ours):
            lines = log_lines(run, "I")
            assert [m for m in lines if m.startswith(("Writing", "Training Batch"))] == [
                "Writing Training data"] + [f"Training Batch {i}" for i in range(1, 6)] + [
                "Writing Testing data"]
        for part, count in (("train", 50000), ("test", 10000)):
            theirs_recs = records(tmp_path / "bvlc" / f"cifar10_{part}_lmdb")
            assert len(theirs_recs) == count
            assert theirs_recs == records(tmp_path / "cl" / f"cifar10_{part}_lmdb")
        labels = [datum(v).label for _, v in records(tmp_path / "bvlc" /
                                                     "cifar10_train_lmdb")[:4]]
        assert labels == [-56, -1, -128, 127]
        # the folder lacks the batches: both stop
        (tmp_path / "empty").mkdir()
        theirs = bvlc("convert_cifar_data", "empty", "bvlc", "lmdb", cwd=tmp_path)
        ours = caffelite("convert_cifar_data", "empty", "cl", "lmdb", cwd=tmp_path)
        both_fail(theirs, ours)
    finally:
        for folder in ("cifar", "bvlc", "cl"):
            shutil.rmtree(tmp_path / folder, ignore_errors=True)


# --------------------------------------------------------------------- upgrade tools
V1_NET = '''name: "v1net"
layers { name: "data" type: DATA top: "data" top: "label"
  data_param { source: "train_lmdb" backend: LMDB batch_size: 4 }
  transform_param { scale: 0.00390625 mirror: true crop_size: 3 }
  include { phase: TRAIN } }
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 2 kernel_size: 2
    weight_filler { type: "gaussian" std: 0.01 } } }
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 1 } }
layers { name: "ip1" type: INNER_PRODUCT bottom: "pool1" top: "ip1"
  blobs_lr: 1 blobs_lr: 2 inner_product_param { num_output: 3 } }
layers { name: "drop" type: DROPOUT bottom: "ip1" top: "ip1"
  dropout_param { dropout_ratio: 0.25 } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip1" bottom: "label" top: "loss"
  loss_weight: 1 }
'''

V0_NET = '''name: "v0"
input: "data" input_dim: 1 input_dim: 3 input_dim: 6 input_dim: 6
layers { layer { name: "pad1" type: "padding" pad: 1 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 2 kernelsize: 3 stride: 1
  biasterm: true blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0 }
  bottom: "pad1" top: "conv1" }
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: MAX kernelsize: 2 stride: 2 }
  bottom: "conv1" top: "pool1" }
layers { layer { name: "fc" type: "innerproduct" num_output: 3 } bottom: "pool1"
  top: "fc" }
layers { layer { name: "prob" type: "softmax" } bottom: "fc" top: "prob" }
'''


def _with_blobs(text, where, shapes, v0=False):
    """The net of ``text`` as a binary NetParameter with random float blobs."""
    from google.protobuf import text_format
    from caffelite.proto import caffe_pb2
    rng = np.random.default_rng(11)
    net = text_format.Parse(text, caffe_pb2.NetParameter())
    for index, blob_shapes in zip(where, shapes):
        holder = net.layers[index].layer if v0 else net.layers[index]
        for shape in blob_shapes:
            blob = holder.blobs.add()
            blob.num, blob.channels, blob.height, blob.width = shape
            blob.data.extend(rng.standard_normal(int(np.prod(shape))).astype(
                np.float32).tolist())
    return net


def _varint(data, i):
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _top_fields(data):
    """[(field number, the field's bytes)] of a serialized message, in file order."""
    out, i = [], 0
    while i < len(data):
        start = i
        key, i = _varint(data, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            i += size
        else:
            i += {1: 8, 5: 4}[wire]
        out.append((key >> 3, data[start:i]))
    return out


def _upgrade_both(folder, tool, source, suffix):
    theirs = bvlc(tool, source, f"bvlc_{source}{suffix}", cwd=folder)
    ours = caffelite(tool, source, f"cl_{source}{suffix}", cwd=folder)
    return (theirs, ours, (folder / f"bvlc_{source}{suffix}"),
            (folder / f"cl_{source}{suffix}"))


def test_upgrade_net_proto_binary(tmp_path):
    """V1 weights to V2, blobs kept: the same bytes.  A V2 file is written as it is,
    "File already in latest proto format"."""
    net = _with_blobs(V1_NET, [1, 4], [[(2, 3, 2, 2), (1, 1, 1, 2)],
                                        [(1, 1, 3, 8), (1, 1, 1, 3)]])
    (tmp_path / "v1.caffemodel").write_bytes(net.SerializeToString())
    theirs, ours, out_t, out_o = _upgrade_both(tmp_path, "upgrade_net_proto_binary",
                                               "v1.caffemodel", "")
    both_ok(theirs, ours)
    assert out_t.read_bytes() == out_o.read_bytes()
    for run, out in ((theirs, out_t), (ours, out_o)):
        assert any(m.startswith("Attempting to upgrade input file specified using "
                                "deprecated V1LayerParameter") for m in log_lines(run))
        assert f"Wrote upgraded NetParameter binary proto to {out.name}" in log_lines(run)
    shutil.copy(out_t, tmp_path / "v2.caffemodel")
    theirs, ours, out_t, out_o = _upgrade_both(tmp_path, "upgrade_net_proto_binary",
                                               "v2.caffemodel", "")
    both_ok(theirs, ours)
    assert out_t.read_bytes() == out_o.read_bytes()
    assert out_o.read_bytes() == (tmp_path / "v2.caffemodel").read_bytes()
    for run in (theirs, ours):
        assert "File already in latest proto format: v2.caffemodel" in log_lines(run, "E")


@pytest.mark.parametrize("dialect", ["v1_input", "v0"])
def test_upgrade_net_proto_binary_input_fields(tmp_path, dialect):
    """A net with ``input:`` fields (V0 with its padding layer folded, or V1): 1.0 makes
    an Input layer of them (2016, after the fork); caffelite keeps the fields, as the
    fork.  The layers after it are the same bytes."""
    if dialect == "v0":
        net = _with_blobs(V0_NET, [1, 4], [[(2, 3, 3, 3), (1, 1, 1, 2)],
                                            [(1, 1, 3, 18), (1, 1, 1, 3)]], v0=True)
    else:
        net = _with_blobs(V1_NET, [1, 4], [[(2, 3, 2, 2), (1, 1, 1, 2)],
                                            [(1, 1, 3, 8), (1, 1, 1, 3)]])
        del net.layers[0]
        net.input.append("data")
        net.input_dim.extend([1, 3, 4, 4])
    (tmp_path / "in.caffemodel").write_bytes(net.SerializeToString())
    theirs, ours, out_t, out_o = _upgrade_both(tmp_path, "upgrade_net_proto_binary",
                                               "in.caffemodel", "")
    both_ok(theirs, ours)
    fields_t, fields_o = _top_fields(out_t.read_bytes()), _top_fields(out_o.read_bytes())
    layers_t = [f for n, f in fields_t if n == 100]
    layers_o = [f for n, f in fields_o if n == 100]
    assert b"\x12\x05Input" in layers_t[0] and len(layers_t) == len(layers_o) + 1
    assert layers_t[1:] == layers_o
    assert [n for n, _ in fields_o if n != 100] == [1, 3, 4, 4, 4, 4]      # name, inputs
    assert [n for n, _ in fields_t if n != 100] == [1]


SOLVER = '''net: "train.prototxt"
test_iter: 10
test_interval: 100
base_lr: 0.01
lr_policy: "step"
gamma: 0.1
stepsize: 1000
display: 20
max_iter: 4500
momentum: 0.9
weight_decay: 0.0005
snapshot: 1000
snapshot_prefix: "snap/x"
solver_mode: CPU
delta: 1e-08
'''


@pytest.mark.parametrize("solver_type", ["SGD", "NESTEROV", "ADAGRAD", "RMSPROP",
                                         "ADADELTA", "ADAM", None])
def test_upgrade_solver_proto_text(tmp_path, solver_type):
    """``solver_type: X`` to ``type: "X"``: the same text (fields in number order);
    a solver already in the latest format is written back as it is."""
    text = SOLVER + (f"solver_type: {solver_type}\n" if solver_type else 'type: "Adam"\n')
    (tmp_path / "s.prototxt").write_text(text)
    theirs, ours, out_t, out_o = _upgrade_both(tmp_path, "upgrade_solver_proto_text",
                                               "s.prototxt", "")
    both_ok(theirs, ours)
    assert out_t.read_text() == out_o.read_text()
    if solver_type is None:
        for run in (theirs, ours):
            assert "File already in latest proto format: s.prototxt" in log_lines(run, "E")


def test_upgrade_solver_proto_text_floats_and_conflicts(tmp_path):
    """Floats that need more than 6 digits: protobuf 2.x's ``%.8g`` (the fork's, and
    caffelite's, README) against protobuf 3.x's ``%.9g`` (1.0's): each reads back as the
    same float.  ``solver_type`` with ``type``: both refuse."""
    (tmp_path / "f.prototxt").write_text("base_lr: 1.0000001\nmomentum: 0.95\n"
                                         "rms_decay: 0.98\nsolver_type: RMSPROP\n")
    theirs, ours, out_t, out_o = _upgrade_both(tmp_path, "upgrade_solver_proto_text",
                                               "f.prototxt", "")
    both_ok(theirs, ours)
    text_t, text_o = out_t.read_text(), out_o.read_text()
    assert "base_lr: 1.00000012\n" in text_t and "base_lr: 1.0000001\n" in text_o
    assert text_t.replace("1.00000012", "1.0000001") == text_o
    assert np.float32(1.00000012) == np.float32(1.0000001)
    for i, other in enumerate(('type: "SGD"\n', 'type: "RMSProp"\n')):
        (tmp_path / "c.prototxt").write_text("base_lr: 0.1\nsolver_type: RMSPROP\n" + other)
        theirs, ours, _, _ = _upgrade_both(tmp_path, "upgrade_solver_proto_text",
                                           "c.prototxt", f".{i}")
        both_fail(theirs, ours, "solver_type")
