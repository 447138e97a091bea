"""read_image / decode_image against cv2.imread / cv2.imdecode (test-only oracle) where
OpenCV converts the decoder's samples itself: CMYK JPEGs (OpenCV's CMYK->BGR and
CMYK->gray formulas on libjpeg's samples as stored, with or without an Adobe APP14
marker), 16-bit colour PNGs read in gray (libpng converts to gray at 16 bits, then
drops the low byte) and colour PNGs declaring a gamma (gAMA, sRGB) read in gray
(libpng converts through linear light).  Fixtures are random images of odd sizes
written here.
"""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from caffelite.io.image import ImageReadError, decode_image, read_image

cv2 = pytest.importorskip("cv2")

SIZES = [(1, 1), (1, 7), (5, 1), (9, 13), (17, 31), (33, 47), (64, 65)]


def assert_reads_like_opencv(path, data):
    """read_image and decode_image, colour and gray, equal OpenCV's reads exactly."""
    buf = np.frombuffer(data, np.uint8)
    for color, flag in ((True, cv2.IMREAD_COLOR), (False, cv2.IMREAD_GRAYSCALE)):
        want = cv2.imread(str(path), flag)
        got = read_image(str(path), color)
        assert got.dtype == np.uint8 and got.shape == want.shape, (path, color)
        assert np.array_equal(got, want), (path, color, np.abs(got - want.astype(int)).max())
        got = decode_image(data, color)
        assert np.array_equal(got, cv2.imdecode(buf, flag)), (path, color)


# ---------------------------------------------------------------------- CMYK JPEG
def without_app14(jpeg):
    """The JPEG with its Adobe APP14 segment(s) removed (markers up to the scan)."""
    out, i = bytearray(jpeg[:2]), 2
    while jpeg[i + 1] != 0xDA:
        length = int.from_bytes(jpeg[i + 2:i + 4], "big")
        if jpeg[i + 1] != 0xEE:
            out += jpeg[i:i + 2 + length]
        i += 2 + length
    return bytes(out + jpeg[i:])


def cmyk_jpegs(rng):
    """Random CMYK JPEGs of odd sizes: noise in all four inks (so K varies) and RGB
    images converted by Pillow (K = 0), at a few qualities."""
    for i, (h, w) in enumerate(SIZES):
        if i % 2:
            img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "CMYK")
        else:
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("CMYK")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=(75, 90, 100)[i % 3])
        yield f"{h}x{w}", buf.getvalue()


@pytest.mark.parametrize("adobe", [True, False], ids=["adobe-marker", "no-marker"])
def test_cmyk_jpeg_reads_like_opencv(tmp_path, adobe):
    rng = np.random.default_rng(31)
    for name, data in cmyk_jpegs(rng):
        if not adobe:
            data = without_app14(data)
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(data)
        with Image.open(path) as img:
            assert img.mode == "CMYK"
            assert ("adobe" in img.info) == adobe   # Pillow writes the marker itself
        assert_reads_like_opencv(path, data)
        # IMREAD_UNCHANGED: OpenCV still gives 3-channel BGR for a CMYK JPEG.
        want = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        got = decode_image(data)
        assert got.shape == want.shape and np.array_equal(got, want), name


def test_cmyk_jpeg_covers_every_ink_and_black_level(tmp_path):
    """All 256 K levels against all 256 levels of one ink, in each ink position: the
    whole domain of OpenCV's per-channel formula (the JPEG at quality 100 keeps the
    samples near the written values, but the comparison is with whatever was decoded)."""
    ink, black = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    for channel in range(3):
        cmyk = np.zeros((256, 256, 4), np.uint8)
        cmyk[..., channel] = ink
        cmyk[..., 3] = black
        buf = io.BytesIO()
        Image.fromarray(cmyk, "CMYK").save(buf, "JPEG", quality=100)
        path = tmp_path / f"ramp{channel}.jpg"
        path.write_bytes(buf.getvalue())
        assert_reads_like_opencv(path, buf.getvalue())


# --------------------------------------------------------------------- 16-bit PNG
ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
         (1, 0, 2, 2), (0, 1, 1, 2)]          # x0, y0, dx, dy of each pass


def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_file(samples, colour_type, depth=8, chunks=(), interlace=False, after_idat=()):
    """A PNG of ``samples`` (H x W x channels, or H x W: gray or palette indices) as
    stored, unfiltered rows (packed below 8 bits), optionally Adam7-interlaced;
    ``chunks`` are (type, body) pairs written in order between IHDR and IDAT (PLTE and
    tRNS included), ``after_idat`` those between IDAT and IEND."""
    samples = np.asarray(samples)
    samples = samples if samples.ndim == 3 else samples[:, :, None]
    h, w, _ = samples.shape

    def row_bytes(row):
        if depth == 16:
            return row.astype(">u2").tobytes()
        if depth == 8:
            return row.astype(np.uint8).tobytes()
        bits = np.unpackbits(row.astype(np.uint8).reshape(-1, 1), axis=1)[:, 8 - depth:]
        return np.packbits(bits.ravel()).tobytes()
    passes = [samples[y0::dy, x0::dx] for x0, y0, dx, dy in ADAM7] if interlace else [samples]
    raw = b"".join(b"\0" + row_bytes(row) for p in passes if p.size for row in p)
    header = struct.pack(">IIBBBBB", w, h, depth, colour_type, 0, 0, int(interlace))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + b"".join(chunk(kind, body) for kind, body in chunks)
            + chunk(b"IDAT", zlib.compress(raw))
            + b"".join(chunk(kind, body) for kind, body in after_idat) + chunk(b"IEND", b""))


def png16(rgb, interlace=False, trns=None):
    """A 16-bit RGB or RGBA PNG of ``rgb`` (H x W x 3|4 uint16, R G B [A] order),
    unfiltered rows, optionally Adam7-interlaced and with an RGB tRNS colour."""
    extra = [(b"tRNS", struct.pack(">HHH", *trns))] if trns is not None else []
    return png_file(rgb, {3: 2, 4: 6}[rgb.shape[2]], 16, extra, interlace)


def random16(rng, h, w, channels):
    """Noise over the whole 16-bit range, with some gray pixels (R == G == B) and the
    extremes 0 and 65535."""
    img = rng.integers(0, 65536, (h, w, channels), dtype=np.uint16)
    gray = rng.random((h, w)) < 0.2
    img[gray, 1] = img[gray, 0]
    img[gray, 2] = img[gray, 0]
    img[rng.random((h, w)) < 0.05, :3] = 0
    img[rng.random((h, w)) < 0.05, :3] = 65535
    return img


@pytest.mark.parametrize("channels", [3, 4], ids=["rgb", "rgba"])
@pytest.mark.parametrize("interlace", [False, True], ids=["plain", "adam7"])
def test_16bit_colour_png_reads_like_opencv(tmp_path, channels, interlace):
    rng = np.random.default_rng(47 + channels + 10 * interlace)
    for h, w in SIZES:
        img = random16(rng, h, w, channels)
        trns = tuple(int(v) for v in img[0, 0, :3]) if channels == 3 and h * w > 1 else None
        data = png16(img, interlace, trns)
        path = tmp_path / f"{h}x{w}.png"
        path.write_bytes(data)
        # The hand-written file is what it should be: OpenCV reads the samples back.
        stored = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert stored.dtype == np.uint16 and np.array_equal(
            stored[..., :3], img[..., 2::-1]), (h, w)
        assert_reads_like_opencv(path, data)
        with pytest.raises(ImageReadError, match="16-bit"):
            decode_image(data)            # IMREAD_UNCHANGED would give uint16: refused


def test_16bit_png_written_by_opencv_reads_gray_like_opencv(tmp_path):
    rng = np.random.default_rng(5)
    for i, (h, w) in enumerate(SIZES):
        channels = 3 if i % 2 else 4
        path = tmp_path / f"cv{i}.png"
        assert cv2.imwrite(str(path), random16(rng, h, w, channels))
        assert_reads_like_opencv(path, path.read_bytes())


# ------------------------------------------------------------- PNG gamma, read in gray
# Where a PNG declares a gamma and OpenCV sets no screen gamma, libpng converts colour
# to gray through linear light (its gamma tables; at 16 bits tables of 11-bit
# precision, and gray pixels rounded to 8 bits); colour reads and gray PNGs are
# unchanged.  An sRGB chunk stands for gamma 45455, over any gAMA.
def gama(value):
    return b"gAMA", struct.pack(">I", value)


SRGB = (b"sRGB", b"\0")
CICP = (b"cICP", bytes([1, 13, 0, 1]))
GAMMA_CHUNKS = {
    "gAMA-45455": [gama(45455)],
    "gAMA-100000": [gama(100000)],
    "gAMA-22727": [gama(22727)],
    "gAMA-50000": [gama(50000)],
    "gAMA-220000": [gama(220000)],
    "sRGB": [SRGB],
    "sRGB+gAMA-45455": [SRGB, gama(45455)],
    "gAMA-100000+sRGB": [gama(100000), SRGB],          # sRGB wins: 45455
    "sRGB+gAMA-220000": [SRGB, gama(220000)],
}
# colour type, bit depth, channels stored (palette: indices into a 256-colour PLTE)
PNG_KINDS = {
    "rgb8": (2, 8, 3), "rgba8": (6, 8, 4), "palette8": (3, 8, 1), "palette8-trns": (3, 8, 1),
    "palette4": (3, 4, 1), "gray-alpha8": (4, 8, 2), "gray8": (0, 8, 1),
    "rgb16": (2, 16, 3), "rgba16": (6, 16, 4), "gray-alpha16": (4, 16, 2), "gray16": (0, 16, 1),
}


def random_png(rng, kind, h, w, chunks=(), interlace=False):
    """A random PNG of one of PNG_KINDS: noise, with gray pixels (R == G == B, which
    libpng converts apart) and the extremes; ``chunks`` go before PLTE."""
    colour_type, depth, channels = PNG_KINDS[kind]
    chunks = list(chunks)
    if colour_type == 3:
        palette = random_samples(rng, 256, 1, 3, 8)[:, 0]
        samples = rng.integers(0, 1 << depth, (h, w), dtype=np.uint8)
        chunks.append((b"PLTE", palette[: 1 << depth].tobytes()))
        if kind.endswith("trns"):
            chunks.append((b"tRNS", rng.integers(0, 256, 100, dtype=np.uint8).tobytes()))
    else:
        samples = random_samples(rng, h, w, channels, depth)
    return png_file(samples, colour_type, depth, chunks, interlace)


def random_samples(rng, h, w, channels, depth):
    top = (1 << depth) - 1
    img = rng.integers(0, top + 1, (h, w, channels), dtype=np.uint16 if depth == 16 else np.uint8)
    if channels >= 3:
        gray = rng.random((h, w)) < 0.2
        img[gray, 1] = img[gray, 0]
        img[gray, 2] = img[gray, 0]
    img[rng.random((h, w)) < 0.05, :3] = 0
    img[rng.random((h, w)) < 0.05, :3] = top
    return img


def gray_without_gamma(data):
    """OpenCV's gray read of the same PNG with its gAMA and sRGB chunks dropped."""
    out, i = bytearray(data[:8]), 8
    while i < len(data):
        length = int.from_bytes(data[i:i + 4], "big")
        if data[i + 4:i + 8] not in (b"gAMA", b"sRGB"):
            out += data[i:i + 12 + length]
        i += 12 + length
    return cv2.imdecode(np.frombuffer(bytes(out), np.uint8), cv2.IMREAD_GRAYSCALE)


@pytest.mark.parametrize("kind", list(PNG_KINDS))
@pytest.mark.parametrize("chunks", list(GAMMA_CHUNKS))
def test_png_with_gamma_reads_like_opencv(tmp_path, chunks, kind):
    rng = np.random.default_rng(sum(map(ord, chunks + kind)))
    changed = False
    for i, (h, w) in enumerate(SIZES):
        data = random_png(rng, kind, h, w, GAMMA_CHUNKS[chunks], interlace=i % 2 == 1)
        path = tmp_path / f"{h}x{w}.png"
        path.write_bytes(data)
        assert_reads_like_opencv(path, data)
        if PNG_KINDS[kind][1] == 8:          # IMREAD_UNCHANGED: no gamma either
            want = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(decode_image(data), want), (h, w)
        changed |= not np.array_equal(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE),
                                      gray_without_gamma(data))
    # The fixtures do exercise the gamma: OpenCV's gray changes exactly where libpng
    # builds its tables (colour types, gamma over 5% from 1).
    colour = PNG_KINDS[kind][0] & 2
    assert changed == bool(colour and chunks != "gAMA-100000"), (chunks, kind)


@pytest.mark.parametrize("gamma", [45455, 220000])
def test_8bit_png_gamma_all_levels(tmp_path, gamma):
    """Each level of each channel against the others' extremes and the gray ramp, and
    a large set of random colours."""
    rng = np.random.default_rng(gamma)
    levels = np.arange(256, dtype=np.uint8)
    rows = [np.stack([levels] * 3, axis=1)]
    for c in range(3):
        for other in (0, 128, 255):
            row = np.full((256, 3), other, np.uint8)
            row[:, c] = levels
            rows.append(row)
    img = np.concatenate([np.stack(rows), rng.integers(0, 256, (247, 256, 3), dtype=np.uint8)])
    data = png_file(img, 2, 8, [gama(gamma)])
    path = tmp_path / "levels.png"
    path.write_bytes(data)
    assert_reads_like_opencv(path, data)


@pytest.mark.parametrize("name, chunks, after_idat", [
    ("gAMA after PLTE is out of place", [(b"PLTE", bytes(48)), gama(45455)], []),
    ("sRGB after PLTE is out of place", [(b"PLTE", bytes(48)), SRGB], []),
    ("gAMA after IDAT is out of place", [], [gama(45455)]),
    ("the first gAMA counts", [gama(220000), gama(45455)], []),
    ("gAMA 0 is no gamma, and a later gAMA a duplicate", [gama(0), gama(220000)], []),
    ("gAMA 0 then sRGB", [gama(0), SRGB], []),
    ("gAMA 2**31 is invalid", [gama(2 ** 31), gama(220000)], []),
    ("sRGB with intent 4 is invalid", [(b"sRGB", b"\4"), gama(220000)], []),
    ("after cICP sRGB keeps a gAMA", [CICP, gama(220000), SRGB], []),
    ("after cICP sRGB sets an unset gamma", [CICP, SRGB, gama(220000)], []),
    ("cICP alone is no gamma", [CICP], []),
    ("gamma 1e-5: reciprocal overflows", [gama(1)], []),
    ("gamma 5e-5", [gama(5)], []),
    ("gamma 21474.83647", [gama(2 ** 31 - 1)], []),
    ("gamma 0.95 is not significant", [gama(95000)], []),
    ("gamma 0.94999 is", [gama(94999)], []),
    ("gamma 0.95001: only its reciprocal is", [gama(95001)], []),
    ("gamma 1.05", [gama(105000)], []),
    ("gamma 1.05001", [gama(105001)], []),
    ("sBIT 9 bits", [gama(45455), (b"sBIT", bytes([9, 9, 9]))], []),
    ("sBIT uneven, the maximum counts", [gama(45455), (b"sBIT", bytes([9, 3, 6]))], []),
    ("sBIT 4 bits", [gama(22727), (b"sBIT", bytes([4, 4, 4]))], []),
    ("sBIT 0 is invalid", [gama(45455), (b"sBIT", bytes([0, 9, 9]))], []),
    ("sBIT of the wrong length", [gama(45455), (b"sBIT", bytes([9, 9]))], []),
    ("sBIT after PLTE", [gama(45455), (b"PLTE", bytes(48)), (b"sBIT", bytes([9, 9, 9]))], []),
])
@pytest.mark.parametrize("depth", [8, 16])
def test_png_gamma_chunk_rules_like_opencv(tmp_path, name, chunks, after_idat, depth):
    """Which chunks set libpng's file gamma, its limits and the 16-bit tables'
    precision (sBIT) on an RGB PNG (PLTE here is a suggested palette)."""
    rng = np.random.default_rng(len(name) + depth)
    img = random_samples(rng, 37, 41, 3, depth)
    data = png_file(img, 2, depth, chunks, after_idat=after_idat)
    path = tmp_path / "rules.png"
    path.write_bytes(data)
    assert_reads_like_opencv(path, data)


def test_animated_png_ignores_gamma_as_opencv():
    """OpenCV decodes an animated PNG's frames without handing libpng its gAMA or
    sRGB chunk: the gray read does not change with them (the gray of animated PNGs
    itself is not compared: OpenCV converts their frames with its own cvtColor)."""
    rng = np.random.default_rng(3)
    frames = [Image.fromarray(random_samples(rng, 16, 16, 3, 8)) for _ in range(2)]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    plain = buf.getvalue()
    assert b"acTL" in plain
    with_gamma = plain[:33] + chunk(*gama(45455)) + plain[33:]
    for data in (with_gamma, plain[:33] + chunk(*SRGB) + plain[33:]):
        assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE),
                              cv2.imdecode(np.frombuffer(plain, np.uint8), cv2.IMREAD_GRAYSCALE))
        assert np.array_equal(decode_image(data, False), decode_image(plain, False))
