"""Images as Caffe's data layers see them: OpenCV-style uint8 arrays, decoded with
Pillow, and OpenCV's ``cv::resize`` reproduced bit for bit in NumPy.

* ``read_image(path, color)`` is ``cv::imread(path, IMREAD_COLOR / IMREAD_GRAYSCALE)``:
  H x W x 3 **BGR** uint8, or H x W uint8 (grayscale JPEGs are decoded straight to
  luma by libjpeg, as OpenCV does; CMYK JPEGs are converted with OpenCV's own formula;
  colour PNGs in gray use libpng's conversion, at 16 bits for 16-bit PNGs, through
  linear light where the file declares a gamma (gAMA or sRGB chunk); 16-bit
  PNGs keep their high byte).  Checked against ``cv2.imread`` for JPEG and PNG
  (colour and palette PNGs read in gray included).  EXIF orientation
  is not applied (OpenCV 2.4 ignored it; OpenCV >= 3.1 rotates).
* ``read_label(path)`` reads a segmentation ground truth as the fork does, through
  ``cv::imread(GRAYSCALE)``: a palette ("P" mode) PNG, such as VOC's
  ``SegmentationClass``, gives its colours' luminance, not its class indices (a
  warning says so; DeepLab reads raw index PNGs, e.g. ``SegmentationClassAug``).
* ``resize(img, (height, width), interpolation)`` is ``cv::resize`` for uint8 images
  with ``INTER_LINEAR`` (fixed-point, 11 coefficient bits, OpenCV's own rounding and
  its 2x2 area shortcut for exact halving) or ``INTER_NEAREST``.
"""
import contextlib
import logging
import threading

import numpy as np

from .png_gamma import (gamma_shift, gamma_table_8, gamma_table_16, gamma_table_16_to_8,
                        png_depth_and_colour_type, png_gammas, png_gray_setup)

logger = logging.getLogger("caffelite")

INTER_NEAREST = 0
INTER_LINEAR = 1

INTER_RESIZE_COEF_BITS = 11
INTER_RESIZE_COEF_SCALE = 1 << INTER_RESIZE_COEF_BITS


class ImageReadError(OSError):
    """An image that cannot be opened or decoded; the message names the file."""

    def __init__(self, path, reason):
        if BYTE_ORDER_MARK in str(path):
            reason += (" (the path holds an invisible UTF-8 byte-order mark, shown as "
                       "<U+FEFF>: its list file starts with one, which Caffe too reads as "
                       "part of the first path; save the list without it)")
        super().__init__(f"cannot read image '{shown_path(path)}': {reason}")
        self.path, self.reason = path, reason


def shown_path(path):
    """``path`` for a message: a byte-order mark in it made visible."""
    return str(path).replace(BYTE_ORDER_MARK, "<U+FEFF>")


BYTE_ORDER_MARK = "\ufeff"
_palette_warned = [False]
_deep_label_warned = [False]
_colour_label_warned = [False]


# ------------------------------------------------------------ Pillow's pixel limit
_limit_lifted = threading.local()
_hook_lock = threading.Lock()


def _lift_hook(Image):
    """Wrap Pillow's ``_decompression_bomb_check`` (once) so that it does nothing in a
    thread inside ``pixel_limit_lifted`` and is Pillow's own check everywhere else: the
    limit (``Image.MAX_IMAGE_PIXELS``, whatever the user sets it to) still guards the
    user's own ``Image.open`` calls, in every thread.  False where this Pillow has no
    such function to wrap."""
    check = getattr(Image, "_decompression_bomb_check", None)
    if check is None:
        return False
    if getattr(check, "_caffelite_lift", False):
        return True
    with _hook_lock:
        check = Image._decompression_bomb_check
        if not getattr(check, "_caffelite_lift", False):
            def guarded(*args, **kwargs):
                if getattr(_limit_lifted, "depth", 0):
                    return None
                return check(*args, **kwargs)
            guarded._caffelite_lift = True
            Image._decompression_bomb_check = guarded
    return True


@contextlib.contextmanager
def pixel_limit_lifted():
    """Pillow's decompression-bomb guard lifted for this thread's image reads inside the
    block.  Caffe reads images with ``cv::imread``, which has no such limit (OpenCV
    2.4; later versions allow 2**30 pixels), where Pillow warns past 89 Mpx and refuses
    past 179 Mpx: a 14000 x 14000 image Caffe trains on would be refused.  Pillow's
    ``MAX_IMAGE_PIXELS`` is left as it is, so the user's own Pillow calls (in this
    thread outside the block, or in other threads meanwhile) keep their limit."""
    from PIL import Image
    _lift_hook(Image)
    _limit_lifted.depth = getattr(_limit_lifted, "depth", 0) + 1
    try:
        yield
    finally:
        _limit_lifted.depth -= 1


def pixel_limit_reason(e):
    """The reason for an ``ImageReadError`` from Pillow's ``DecompressionBombError``
    (only where ``pixel_limit_lifted`` could not lift it)."""
    return (f"{e} (Pillow's decompression-bomb limit, which caffelite could not lift in "
            f"this Pillow version; set PIL.Image.MAX_IMAGE_PIXELS = None to read it)")


# --------------------------------------------------------------------------- decoding
def _open(path, gray=False, name=None):
    """Decode with Pillow; a colour JPEG wanted in gray is decoded by libjpeg straight
    to its luma plane (what OpenCV's IMREAD_GRAYSCALE asks libjpeg for).  Where OpenCV
    converts the decoder's samples itself (CMYK JPEGs; 16-bit colour PNGs in gray,
    which libpng converts before dropping the low byte) the result is an "RGB" or "L"
    image made here; so is the gray of a colour PNG whose declared gamma makes libpng
    convert through linear light.  ``path`` may be a file object, then ``name`` is what
    messages call it."""
    from PIL import Image
    name = path if name is None else name
    try:
        with pixel_limit_lifted():      # cv::imread reads images of any size
            img = Image.open(path)
            if gray and img.format == "JPEG" and img.mode in ("RGB", "YCbCr"):
                img.draft("L", img.size)          # same size, luma output
            if img.format == "JPEG" and img.mode == "CMYK":
                rgb = cmyk_to_rgb(_load_as(img, "CMYK"))
                return Image.fromarray(rgb_to_gray(rgb) if gray else rgb)
            if gray and img.format == "PNG" and img.mode in ("RGB", "RGBA", "P"):
                colour, gamma, sig_bit = png_gray_setup(path)
                if _rawmode(img) in ("RGB;16B", "RGBA;16B"):
                    return Image.fromarray(png16_rgb_to_gray(_png16_rgb(path, img), gamma,
                                                             sig_bit))
                if colour and png_gammas(gamma):
                    return Image.fromarray(png_rgb_to_gray(_rgb_samples(img), gamma))
            img.load()
    except FileNotFoundError:
        raise ImageReadError(name, "no such file") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(name, f"cannot decode it ({e})") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(name, pixel_limit_reason(e)) from None
    return img


def _rawmode(img):
    """How Pillow will unpack the decoder's samples of an opened, not loaded, image."""
    args = img.tile[0][3] if len(img.tile) == 1 else None
    return args if isinstance(args, str) or args is None else args[0]


def _load_as(img, rawmode):
    """Load an opened image with Pillow's decoder but unpacking ``rawmode`` instead of
    Pillow's own choice; the pixels as an array."""
    (tile,) = img.tile
    args = rawmode if isinstance(tile[3], str) else (rawmode, *tile[3][1:])
    img.tile = [tile._replace(args=args) if hasattr(tile, "_replace")
                else (*tile[:3], args)]
    img.load()
    return np.asarray(img)


def _png16_rgb(source, img):
    """The full 16-bit R, G, B samples of a 16-bit colour PNG (``img``: ``source``
    opened, not loaded).  Pillow keeps the high byte of each sample; a second decode
    unpacking ";16L" keeps the other byte, which in PNG's big-endian order is the low
    one."""
    from PIL import Image
    rawmode = _rawmode(img)
    high = _load_as(img, rawmode)[..., :3].astype(np.int64)
    low = _load_as(Image.open(source), rawmode.replace(";16B", ";16L"))[..., :3]
    return (high << 8) | low


def _high_byte(arr):
    """16/32-bit samples -> uint8 the way imread without IMREAD_ANYDEPTH does (>> 8)."""
    return (np.asarray(arr).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)


def _to_gray(img):
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        return _high_byte(img)
    if mode == "1":
        return np.asarray(img.convert("L"), dtype=np.uint8)
    if mode == "LA":
        return np.asarray(img.getchannel(0), dtype=np.uint8)
    rgb = _rgb_samples(img)
    if img.format == "PNG":
        return png_rgb_to_gray(rgb)
    return rgb_to_gray(rgb)


def _rgb_samples(img):
    """R, G, B as uint8 (a palette's colours; alpha and tRNS dropped)."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")      # to RGB straight, Pillow warns of the tRNS
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def rgb_to_gray(rgb):
    """``cv::cvtColor(RGB2GRAY)`` for uint8: fixed-point 0.299/0.587/0.114, 14 bits."""
    rgb = np.asarray(rgb, dtype=np.int32)
    y = rgb[..., 0] * 4899 + rgb[..., 1] * 9617 + rgb[..., 2] * 1868 + (1 << 13)
    return (y >> 14).astype(np.uint8)


def _png_weighted(rgb):
    """libpng's ``png_set_rgb_to_gray(1, 0.299, 0.587)`` as OpenCV's PNG decoder asks
    for it: the weighted sum, scaled by 2**15.  libpng stores the coefficients as 1e-5
    fixed point (29900, 58700) and scales them to 15 bits by integer division: red
    9797, green 19234, blue the rest (3737)."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return rgb[..., 0] * 9797 + rgb[..., 1] * 19234 + rgb[..., 2] * 3737


def png_rgb_to_gray(rgb, file_gamma=0):
    """libpng's RGB to gray for 8-bit samples.  Without gamma tables (see
    ``png_gammas``): the weighted sum truncated (not rounded).  With them: each sample
    to linear light through a 256-entry table, the weighted sum rounded, back through
    another table; gray pixels (R == G == B) skip both and only go through the table
    of the overall correction (file times screen gamma, the identity here)."""
    gammas = png_gammas(file_gamma)
    if gammas is None:
        return (_png_weighted(rgb) >> 15).astype(np.uint8)
    rgb = np.asarray(rgb, dtype=np.int64)
    to_linear, from_linear, overall = (gamma_table_8(g) for g in gammas[:3])
    gray = from_linear[(_png_weighted(to_linear[rgb]) + (1 << 14)) >> 15]
    return _gray_pixels_apart(rgb, gray, overall[rgb[..., 0]]).astype(np.uint8)


def png16_rgb_to_gray(rgb16, file_gamma=0, sig_bit=0):
    """libpng's RGB to gray for 16-bit samples, then ``png_set_strip_16``: libpng runs
    the conversion before the strip, and at 16 bits it rounds; the high byte of the
    16-bit gray is kept.  With gamma tables the samples and the sum go through
    libpng's 16-bit tables, which look at the top ``16 - shift`` bits only
    (``gamma_shift``), and gray pixels through its 16-to-8 table of the overall
    correction, which rounds to the nearest 8-bit value instead of truncating."""
    gammas = png_gammas(file_gamma)
    if gammas is None:
        return ((_png_weighted(rgb16) + (1 << 14)) >> 23).astype(np.uint8)
    rgb16 = np.asarray(rgb16, dtype=np.int64)
    shift = gamma_shift(sig_bit)
    to_linear, from_linear = (gamma_table_16(g, shift) for g in gammas[:2])
    linear = to_linear[rgb16 >> shift]
    gray = from_linear[((_png_weighted(linear) + (1 << 14)) >> 15) >> shift]
    overall = gamma_table_16_to_8(gammas[3], shift)[rgb16[..., 0] >> shift]
    return (_gray_pixels_apart(rgb16, gray, overall) >> 8).astype(np.uint8)


def _gray_pixels_apart(rgb, gray, gray_pixels):
    """``gray``, except where R == G == B, which png_do_rgb_to_gray converts apart."""
    same = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
    return np.where(same, gray_pixels, gray)


def cmyk_to_rgb(cmyk):
    """OpenCV's own conversion of a CMYK JPEG: libjpeg hands it the samples as stored
    (Adobe's inverted CMYK, 255 = no ink, whatever the APP14 marker says) and each of
    R, G, B is ``k - ((255 - s) * k >> 8)`` for the C, M, Y sample s and K sample k.
    Gray is then ``rgb_to_gray`` of that."""
    s = np.asarray(cmyk, dtype=np.int32)
    k = s[..., 3:]
    return (k - (((255 - s[..., :3]) * k) >> 8)).astype(np.uint8)


def read_image(path, color=True):
    """``cv::imread``: H x W x 3 BGR uint8 (``color``) or H x W uint8 (gray)."""
    return _as_read(_open(path, gray=not color), color)


def decode_image(data, color=None, name="<encoded datum>"):
    """``cv::imdecode`` of encoded bytes: ``color`` True / False as ``read_image``;
    None is IMREAD_UNCHANGED (what Caffe's DecodeDatumToCVMatNative asks for): the
    file's own channels, H x W for gray, BGR, or BGRA where the file has alpha (a
    palette with transparency included).  Deeper than 8 bits is refused: Caffe's
    transformer takes 8-bit images only."""
    import io
    data = bytes(data)
    img = _open(io.BytesIO(data), gray=color is False, name=name)
    if color is not None:
        return _as_read(img, color)
    # Pillow reads 16-bit colour PNGs as 8-bit ones: look at the IHDR bit depth.
    header = png_depth_and_colour_type(data[:26])
    deep_png = header is not None and header[0] == 16
    if img.mode.startswith("I") or img.mode == "F" or deep_png:
        raise ImageReadError(name, "16-bit samples: only 8-bit images can be used (Caffe's "
                             "transformer stops at them: 'Image data type must be "
                             "unsigned byte')")
    if img.mode in ("P", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")           # a tRNS chunk: OpenCV gives 4 channels
    elif img.mode == "P":
        img = img.convert("RGB")
    if img.mode in ("L", "1"):
        return np.asarray(img.convert("L"), dtype=np.uint8)
    if img.mode == "LA":
        img = img.convert("RGBA")
    if img.mode not in ("RGB", "RGBA"):
        img = img.convert("RGB")
    pixels = np.asarray(img, dtype=np.uint8)
    order = [2, 1, 0, 3][:pixels.shape[2]]
    return np.ascontiguousarray(pixels[:, :, order])


def _as_read(img, color):
    if not color:
        return _to_gray(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        gray = _high_byte(img)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.ascontiguousarray(_rgb_samples(img)[:, :, ::-1])


def read_label(path):
    """A segmentation label map as uint8 H x W (see the module docstring)."""
    img = _open(path)
    if img.mode == "P" and not _palette_warned[0]:
        _palette_warned[0] = True
        logger.warning(
            "label '%s' is a palette PNG: read as the fork reads labels, with "
            "cv::imread(GRAYSCALE), its values are the palette colours' luminance, not "
            "class indices. DeepLab's lists name raw index PNGs such as VOC's "
            "SegmentationClassAug; convert palette labels with "
            "Image.fromarray(numpy.asarray(Image.open(p))).save(q) or the kit's "
            "SavePngAsRawPng.m (warned once).", path)
    if img.mode.startswith("I") and not _deep_label_warned[0]:
        _deep_label_warned[0] = True
        logger.warning(
            "label '%s' is a %s-bit PNG: reading the high byte of each value, as the fork's "
            "cv::imread(GRAYSCALE) does (labels 0..255 stored in 16 bits all read as 0; "
            "save labels as 8-bit PNGs).", path,
            # PNG has no 32-bit gray; Pillow < 10.3 opens its 16-bit gray as mode "I".
            16 if "16" in img.mode or img.format == "PNG" else 32)
    if img.mode in ("RGB", "RGBA", "CMYK") and not _colour_label_warned[0]:
        _warn_if_coloured(img, path)
    return read_image(path, color=False)


def _warn_if_coloured(img, path):
    """Once: a label whose channels differ is a colour rendering (e.g. VOC's
    SegmentationClass colours saved as RGB), whose luminance is not its classes."""
    rgb = np.asarray(img.convert("RGB"))
    if (rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 1] == rgb[:, :, 2]).all():
        return
    _colour_label_warned[0] = True
    logger.warning(
        "label '%s' is a colour image: reading its luminance, as the fork's "
        "cv::imread(GRAYSCALE) does, which is not its classes (VOC's class colours "
        "read as unrelated values, some of them valid classes); labels must be raw "
        "class-index PNGs (e.g. SegmentationClassAug).", path)


# ------------------------------------------------------------------------- resizing
def resize(img, size, interpolation=INTER_LINEAR):
    """``cv::resize(img, dst, Size(width, height), 0, 0, interpolation)`` for uint8.

    ``img`` is H x W or H x W x C uint8; ``size`` is ``(height, width)``.
    """
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"resize expects a uint8 image, got {img.dtype}")
    dh, dw = int(size[0]), int(size[1])
    sh, sw = img.shape[:2]
    if dh <= 0 or dw <= 0:
        raise ValueError(f"cannot resize a {sh}x{sw} image to {dh}x{dw}")
    if sh <= 0 or sw <= 0:
        raise ValueError("cannot resize an empty image")
    if (dh, dw) == (sh, sw):
        return img.copy()
    squeeze = img.ndim == 2
    src = img[:, :, None] if squeeze else img
    # OpenCV: inv_scale = dsize/ssize, scale = 1/inv_scale, both in double.
    scale_y = 1.0 / (dh / sh)
    scale_x = 1.0 / (dw / sw)
    if interpolation == INTER_NEAREST:
        out = _resize_nearest(src, dh, dw, scale_y, scale_x)
    elif interpolation == INTER_LINEAR:
        if scale_x == 2.0 and scale_y == 2.0:
            out = _resize_area_half(src)
        else:
            out = _resize_linear(src, dh, dw, scale_y, scale_x)
    else:
        raise ValueError(f"unsupported interpolation {interpolation}")
    return out[:, :, 0] if squeeze else out


def _resize_nearest(src, dh, dw, scale_y, scale_x):
    sy = np.minimum(np.floor(np.arange(dh) * scale_y).astype(np.int64), src.shape[0] - 1)
    sx = np.minimum(np.floor(np.arange(dw) * scale_x).astype(np.int64), src.shape[1] - 1)
    return src[sy[:, None], sx[None, :]]


def _resize_area_half(src):
    """OpenCV turns an exact 2x INTER_LINEAR downscale into its fast 2x2 area mean."""
    s = src.astype(np.int32)
    total = s[0::2, 0::2] + s[0::2, 1::2] + s[1::2, 0::2] + s[1::2, 1::2]
    if src.shape[2] in (1, 3, 4):
        return ((total + 2) >> 2).astype(np.uint8)
    return np.rint(total.astype(np.float32) * np.float32(0.25)).astype(np.uint8)


def _linear_coefficients(dst_size, scale, src_size, clamp):
    """Source index and the two fixed-point weights per output index.

    Mirrors OpenCV: ``f = float((d + 0.5) * scale - 0.5)`` in double then float,
    ``s = floor(f)``, ``f -= s`` in float, weights ``saturate_cast<short>((1-f)*2048)``
    and ``saturate_cast<short>(f*2048)`` (round half to even).  Along x, indices
    outside the image are clamped with ``f = 0``; along y only the row indices are
    clamped later (the weights are kept), as OpenCV does.
    """
    f = ((np.arange(dst_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f)
    f = (f - s).astype(np.float32)
    s = s.astype(np.int64)
    if clamp:
        low = s < 0
        f[low], s[low] = 0, 0
        high = s >= src_size - 1
        f[high], s[high] = 0, src_size - 1
    one = np.float32(INTER_RESIZE_COEF_SCALE)
    w0 = np.rint((np.float32(1) - f) * one).clip(-32768, 32767).astype(np.int32)
    w1 = np.rint(f * one).clip(-32768, 32767).astype(np.int32)
    return s, w0, w1


def _resize_linear(src, dh, dw, scale_y, scale_x):
    sh, sw, cn = src.shape
    sx, a0, a1 = _linear_coefficients(dw, scale_x, sw, clamp=True)
    sy, b0, b1 = _linear_coefficients(dh, scale_y, sh, clamp=False)
    rows0 = np.clip(sy, 0, sh - 1)
    rows1 = np.clip(sy + 1, 0, sh - 1)
    needed = np.unique(np.concatenate([rows0, rows1]))
    # Horizontal pass: exact integers (every OpenCV kernel agrees), then the >> 4
    # that the 8-bit vertical kernel applies to each row before multiplying.
    s = src[needed].reshape(len(needed), sw * cn)
    channel = np.arange(cn)
    left = (sx[:, None] * cn + channel).ravel()
    right = (np.minimum(sx + 1, sw - 1)[:, None] * cn + channel).ravel()
    horiz = np.take(s, left, axis=1).astype(np.int32)
    horiz *= np.repeat(a0, cn)
    other = np.take(s, right, axis=1).astype(np.int32)
    other *= np.repeat(a1, cn)
    horiz += other
    horiz >>= 4
    top = np.take(horiz, np.searchsorted(needed, rows0), axis=0)
    bottom = np.take(horiz, np.searchsorted(needed, rows1), axis=0)
    return _vertical_linear(top, bottom, b0[:, None], b1[:, None]).reshape(dh, dw, cn)


def _vertical_linear(r0, r1, b0, b1):
    """Blend two horizontally-resized rows (scaled by 2048, already shifted right by 4)
    into uint8, as OpenCV's 8-bit vertical kernel (SIMD and its matching scalar tail):
    not ``(r0*b0 + r1*b1 + 2**21) >> 22`` but the high 16 bits of each product, added,
    then ``(sum + 2) >> 2``.  Overwrites r0 and r1.
    """
    r0 *= b0
    r0 >>= 16
    r1 *= b1
    r1 >>= 16
    r0 += r1
    r0 += 2
    r0 >>= 2
    return r0.astype(np.uint8)      # 0..255 by construction (weights sum to 2048)
