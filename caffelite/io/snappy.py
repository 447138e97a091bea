"""Snappy decompression: the raw (unframed) format LevelDB uses for compressed blocks.

A stream is the uncompressed length as a varint, then elements, each starting with
a tag byte whose low two bits give its kind:

- 0, literal: the upper six bits are length - 1 when below 60; 60..63 say that the
  length - 1 follows in 1..4 little-endian bytes.  The literal bytes follow.
- 1, copy with a 1-byte offset: length 4 + bits 2..4, offset bits 5..7 (high) and
  the next byte (low).
- 2, copy with a 2-byte offset: length 1 + the upper six bits, offset u16 LE.
- 3, copy with a 4-byte offset: length 1 + the upper six bits, offset u32 LE.

A copy repeats ``length`` bytes that start ``offset`` bytes back in the output; when
the length exceeds the offset the copy overlaps itself and so repeats a pattern.
"""


class SnappyError(ValueError):
    """A malformed snappy stream."""


def _preamble(data):
    """The uncompressed length and where the elements start."""
    length = shift = 0
    for pos in range(min(len(data), 5)):
        byte = data[pos]
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            if length >= 1 << 32:
                break
            return length, pos + 1
        shift += 7
    raise SnappyError("bad uncompressed-length preamble")


def decompress(data):
    """The bytes a raw snappy stream encodes; SnappyError when it is malformed."""
    data = bytes(data)
    expected, pos = _preamble(data)
    try:
        out, pos = _elements(data, pos)
    except IndexError:
        raise SnappyError("an element runs past the end of the input") from None
    if pos != len(data):
        raise SnappyError("an element runs past the end of the input")
    if len(out) != expected:
        raise SnappyError(f"decodes to {len(out)} bytes, the preamble says {expected}")
    return bytes(out)


def _elements(data, pos):
    """Decode the elements from ``pos`` on: (output, position after the last).

    A table block holds thousands of elements, so this loop is kept flat.  Elements
    cut off by the end of the input show as an IndexError or as a position past
    the end, which the caller checks once.
    """
    end = len(data)
    out = bytearray()
    while pos < end:
        tag = data[pos]
        kind = tag & 3
        if kind == 0:
            length = (tag >> 2) + 1
            pos += 1
            if length > 60:
                width = length - 60
                length = int.from_bytes(data[pos:pos + width], "little") + 1
                pos += width
            out += data[pos:pos + length]
            pos += length
            continue
        if kind == 1:
            length = ((tag >> 2) & 7) + 4
            offset = (tag >> 5) << 8 | data[pos + 1]
            pos += 2
        elif kind == 2:
            length = (tag >> 2) + 1
            offset = data[pos + 1] | data[pos + 2] << 8
            pos += 3
        else:
            length = (tag >> 2) + 1
            offset = int.from_bytes(data[pos + 1:pos + 5], "little")
            pos += 5
        start = len(out) - offset
        if start < 0 or offset == 0:
            raise SnappyError(f"copy offset {offset} outside the {len(out)} bytes "
                              f"decoded so far")
        if length <= offset:
            out += out[start:start + length]
        else:
            out += (out[start:] * (length // offset + 1))[:length]
    return out, pos
