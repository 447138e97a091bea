"""read_image / decode_image against cv2.imread / cv2.imdecode (test-only oracle) where
OpenCV converts the decoder's samples itself: CMYK JPEGs (OpenCV's CMYK->BGR and
CMYK->gray formulas on libjpeg's samples as stored, with or without an Adobe APP14
marker) and 16-bit colour PNGs read in gray (libpng converts to gray at 16 bits, then
drops the low byte).  Fixtures are random images of odd sizes written here.
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


def png16(rgb, interlace=False, trns=None):
    """A 16-bit RGB or RGBA PNG of ``rgb`` (H x W x 3|4 uint16, R G B [A] order),
    unfiltered rows, optionally Adam7-interlaced and with an RGB tRNS colour."""
    h, w, channels = rgb.shape
    samples = rgb.astype(">u2")
    passes = [samples[y0::dy, x0::dx] for x0, y0, dx, dy in ADAM7] if interlace else [samples]
    raw = b"".join(b"\0" + row.tobytes() for p in passes if p.size for row in p)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[channels], 0, 0, int(interlace))
    extra = chunk(b"tRNS", struct.pack(">HHH", *trns)) if trns is not None else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


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
