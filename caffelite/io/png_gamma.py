"""libpng's gamma handling in gray reads of colour PNGs, as OpenCV's decoder gets it.

OpenCV sets no screen gamma.  libpng then takes the screen gamma as the reciprocal of
the file's (libpng 1.6 pngrtran.c png_init_gamma_values), so colour reads change
nothing, but rgb_to_gray needs linear light: where the file gamma or that screen gamma
is over 5% from 1, png_init_read_transformations builds the tables of png.c
png_build_gamma_table and png_do_rgb_to_gray uses them.  Gammas are libpng's fixed
point, 1e-5 units; the tables come from libpng's floating-point code, reproduced here
with the same double operations (math.pow is the C library's pow, as libpng's).
Checked against ``cv2.imread`` (libpng 1.6.58 in opencv-python 4.14).
"""
import math
import os
import struct

import numpy as np

PNG_FP_1 = 100000
PNG_GAMMA_THRESHOLD_FIXED = 5000
PNG_GAMMA_sRGB_INVERSE = 45455     # what an sRGB chunk stands for
PNG_MAX_GAMMA_8 = 11               # bits the 16-bit tables keep when output is 8-bit
_INT32 = (-2 ** 31, 2 ** 31 - 1)


def png_gammas(file_gamma):
    """The gammas of libpng's tables for a file gamma (0: none declared): to linear,
    from linear, then the overall correction for 8-bit and for 16-bit samples; None
    where libpng builds no tables."""
    if not file_gamma:
        return None
    screen = _png_reciprocal(file_gamma)           # 0 where it overflows
    if not (_gamma_significant(file_gamma) or _gamma_significant(screen)):
        return None
    if screen == 0:
        return screen, file_gamma, PNG_FP_1, PNG_FP_1
    return (screen, _png_reciprocal(screen), _png_reciprocal2(file_gamma, screen),
            _png_product2(file_gamma, screen))


def _gamma_significant(gamma):
    return abs(gamma - PNG_FP_1) > PNG_GAMMA_THRESHOLD_FIXED


def _png_fixed(r):
    """A rounded double as png_fixed_point; 0 (libpng's overflow value) outside 32 bits."""
    r = math.floor(r + .5)
    return r if _INT32[0] <= r <= _INT32[1] else 0


def _png_reciprocal(a):
    return _png_fixed(1e10 / a)


def _png_reciprocal2(a, b):
    """1 / (a * b), divided in this order as png_reciprocal2 does."""
    return _png_fixed(1e15 / a / b) if a and b else 0


def _png_product2(a, b):
    return _png_fixed(a * 1e-5 * b)


def gamma_shift(sig_bit):
    """png_build_gamma_table's gamma_shift: the low bits the 16-bit tables ignore, the
    insignificant bits per sBIT but at least 16 - PNG_MAX_GAMMA_8 (the output is
    8-bit), at most 8."""
    shift = 16 - sig_bit if 0 < sig_bit < 16 else 0
    return min(max(shift, 16 - PNG_MAX_GAMMA_8), 8)


def gamma_table_8(gamma):
    """png_build_8bit_table: png_gamma_8bit_correct of 0..255, or the identity."""
    if not _gamma_significant(gamma):
        return np.arange(256, dtype=np.int64)
    exponent = gamma * .00001
    return np.array([v if v in (0, 255) else math.floor(255 * math.pow(v / 255., exponent) + .5)
                     for v in range(256)], dtype=np.int64)


def gamma_table_16(gamma, shift):
    """png_build_16bit_table, flattened: indexed by ``sample >> shift``.  Without a
    significant gamma it only rescales to 16 bits."""
    top = (1 << (16 - shift)) - 1
    if not _gamma_significant(gamma):
        index = np.arange(top + 1, dtype=np.int64)
        return (index * 65535 + (1 << (15 - shift))) // top if shift else index
    scale, exponent = 1.0 / top, gamma * .00001
    return np.array([math.floor(65535. * math.pow(i * scale, exponent) + .5)
                     for i in range(top + 1)], dtype=np.int64)


def gamma_table_16_to_8(gamma, shift):
    """png_build_16to8_table, flattened as ``gamma_table_16``: the 16-bit value
    ``257 * i`` of the 8-bit output i, i changing where png_gamma_16bit_correct of the
    midpoint ``257 * i + 128`` falls, rounded to the table's precision."""
    top = (1 << (16 - shift)) - 1
    exponent = gamma * .00001
    bounds = [(math.floor(65535 * math.pow((257 * i + 128) / 65535., exponent) + .5) * top
               + 32768) // 65535 + 1 for i in range(255)]
    return np.searchsorted(bounds, np.arange(top + 1), side="right").astype(np.int64) * 257


def png_gray_setup(source):
    """What libpng's gray conversion of a PNG depends on: whether the colour type has
    colour, the file gamma (``png_file_gamma``; 0 for none, and for animated PNGs,
    whose frames OpenCV decodes without handing libpng those chunks) and the sBIT
    significant bits of the colour channels (their maximum; 0 for none)."""
    ihdr, chunks, frames = _png_header(source)
    if len(ihdr) != 13:
        return False, 0, 0
    depth, colour_type = ihdr[8], ihdr[9]
    sbit = [data for kind, data in chunks if kind == b"sBIT"][:1]
    # sBIT: one byte per channel (alpha included), each in 1..bit depth (else ignored)
    channels = {2: 3, 3: 3, 6: 4}.get(colour_type, 0)
    sample_depth = 8 if colour_type == 3 else depth
    sig_bit = (max(sbit[0][:3]) if sbit and len(sbit[0]) == channels
               and all(0 < b <= sample_depth for b in sbit[0]) else 0)
    gamma = png_file_gamma(chunks) if frames <= 1 else 0
    return bool(colour_type & 2), gamma, sig_bit


def png_file_gamma(chunks):
    """The file gamma libpng 1.6 uses, from (type, data) chunks before PLTE and IDAT in
    file order: the first valid gAMA (0..2**31-1; later ones are duplicates, and 0 is
    none), unless an sRGB chunk (valid intent 0..3) replaces it by 45455, which it does
    not after a cICP chunk once a gamma is set.  iCCP and cICP themselves set none; 0
    where there is none."""
    gamma, gama, cicp = 0, False, False
    for kind, data in chunks:
        if kind == b"gAMA" and len(data) == 4 and not gama:
            value = int.from_bytes(data, "big")
            if value <= _INT32[1]:
                gama = True
                gamma = gamma or value
        elif kind == b"sRGB" and len(data) == 1 and data[0] <= 3:
            if not cicp or gamma == 0:
                gamma = PNG_GAMMA_sRGB_INVERSE
        elif kind == b"cICP" and len(data) == 4:
            cicp = True
    return gamma


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_depth_and_colour_type(head):
    """(bit depth, colour type) from a PNG's first 26 bytes, or None where they are no
    PNG signature followed by its IHDR chunk."""
    if len(head) < 26 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _png_header(source):
    """A PNG's IHDR data, its gAMA, sRGB, cICP and sBIT chunks as (type, data) in file
    order (only those before PLTE: libpng ignores them after, "out of place"), and
    the frame count of an acTL chunk (1 without).  ``source`` is a path or a file
    object, whose position is kept."""
    if isinstance(source, (str, bytes, os.PathLike)):
        with open(source, "rb") as f:
            return _png_header(f)
    position = source.tell()
    ihdr, chunks, frames, palette = b"", [], 1, False
    try:
        source.seek(8)
        while True:
            head = source.read(8)
            if len(head) < 8:
                break
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IDAT":
                break
            wanted = kind in (b"IHDR", b"acTL") or (
                not palette and kind in (b"gAMA", b"sRGB", b"cICP", b"sBIT"))
            if wanted and length <= 13:        # longer ones are invalid anyway
                data = source.read(length)
                if kind == b"IHDR":
                    ihdr = data
                elif kind == b"acTL":
                    frames = int.from_bytes(data[:4], "big") if len(data) == 8 else 1
                else:
                    chunks.append((kind, data))
                length = 0
            palette = palette or kind == b"PLTE"
            source.seek(length + 4, os.SEEK_CUR)
    finally:
        source.seek(position)
    return ihdr, chunks, frames
