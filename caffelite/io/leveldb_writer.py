"""Write a LevelDB database as Caffe's ``convert_imageset`` does with the LevelDB C++
library: puts grouped into WriteBatches of ``batch_size`` (Caffe commits every 1000).

The database is left in the state LevelDB itself leaves after writes that never
filled its write buffer: everything is in the write-ahead log, and no table exists.
The directory holds

- ``000002.log``: one WriteBatch record per batch, in the log format;
- ``MANIFEST-000001``: a log-format file with one VersionEdit (bytewise comparator,
  log number 2, next file number 3, last sequence = the number of puts);
- ``CURRENT``: ``MANIFEST-000001`` and a newline, written last (through a temporary
  file and a rename), so that an interrupted run never leaves a directory that
  looks like a database.

When LevelDB opens the directory it replays the log into a table and writes a new
MANIFEST, as after any restart.  See :mod:`caffelite.io.leveldb` for the formats;
what a writer must also get right:

* a log file is cut into 32 KiB blocks; a record is written as fragments, each with
  a 7-byte header (masked CRC-32C of the type byte and payload, u16 length, type
  FULL/FIRST/MIDDLE/LAST), and a fragment never crosses a block boundary;
* a block tail shorter than a header is filled with zeros; a tail of exactly 7
  bytes gets a FIRST fragment with an empty payload.  Written that way, the log is
  byte for byte the one LevelDB writes for the same batches;
* a WriteBatch is the u64 sequence number of its first put, the u32 count of puts,
  then per put the type byte 1, the varint-prefixed key and the varint-prefixed
  value.  Sequence numbers start at 1 and each put takes the next one, so of two
  puts of a key the later one wins.

The log is streamed: a batch's header (whose count is only known when the batch
ends) is written as zeros, and the fragments that hold it are rewritten when the
batch ends, so that memory use does not grow with the batch.

The CRC-32C here is a faster one than ``caffelite.io.leveldb.crc32c`` (about ten
times, still standard library only); see :func:`crc32c`.
"""
import io
import os
import struct

from .leveldb import _CRC_TABLE, _FIRST, _FULL, _LAST, _LOG_BLOCK, _LOG_HEADER, _MIDDLE
from .wire import varint
from .db import NewDatabaseWriter, sync_dir

__all__ = ["LevelDBWriteError", "LevelDBWriter", "crc32c"]

_MANIFEST_NUMBER, _LOG_NUMBER, _NEXT_FILE_NUMBER = 1, 2, 3
_MANIFEST_NAME = "MANIFEST-%06d" % _MANIFEST_NUMBER
_LOG_NAME = "%06d.log" % _LOG_NUMBER
_CURRENT_TEMP = "%06d.dbtmp" % _MANIFEST_NUMBER  # the name LevelDB itself uses

# VersionEdit tags
_TAG_COMPARATOR, _TAG_LOG_NUMBER, _TAG_NEXT_FILE, _TAG_LAST_SEQUENCE = 1, 2, 3, 4
_BYTEWISE = b"leveldb.BytewiseComparator"

_TYPE_VALUE = 1
_BATCH_HEADER = struct.Struct("<QI")  # first sequence number, count
_FRAGMENT_HEADER = struct.Struct("<IHB")  # masked crc, payload length, type
_MAX_LENGTH = 0xFFFFFFFF  # keys and values are varint32-prefixed


class LevelDBWriteError(OSError):
    """A LevelDB database that cannot be written; the message names its path."""


# ------------------------------------------------------------------------- CRC-32C
# The table-driven CRC keeps a 32-bit state s and, per message byte b, sets
# s = Z(s ^ b), with Z(s) = T[s & 0xFF] ^ (s >> 8) the step over one zero byte.
# Z is linear over GF(2), so a message of L bytes leaves the XOR over its
# positions p of Z^(L - p) applied to byte p, plus Z^L of the initial state (the
# same as XOR-ing the state into the first four bytes).  That sum is computed in
# levels: the bytes are cut into groups of G, and a group's share is the XOR of
# 256-entry tables, one per position in the group, each applying the right power
# of Z.  bytes.translate looks a table up for every group at once (in C), one
# output byte at a time, and int XOR sums the looked-up strings, so one level
# costs a few dozen C calls whatever the length.  Its result is a (shorter)
# sequence of 32-bit values, spaced G times further apart, kept as four strings
# of their bytes; the next level folds those the same way, and a short loop adds
# up the few values left.  Padding zeros at the front changes nothing, since a
# value's share depends only on its distance from the end.

def _zero_step(state):
    return _CRC_TABLE[state & 0xFF] ^ (state >> 8)


# A linear map of 32-bit values is kept as the list of its images of 1 << i.
_IDENTITY = [1 << i for i in range(32)]
_ZERO_STEP = [_zero_step(1 << i) for i in range(32)]


def _apply(matrix, value):
    result = 0
    for image in matrix:
        if value & 1:
            result ^= image
        value >>= 1
        if not value:
            break
    return result


def _compose(outer, inner):
    return [_apply(outer, image) for image in inner]


def _power(matrix, exponent):
    result = _IDENTITY
    while exponent:
        if exponent & 1:
            result = _compose(matrix, result)
        matrix = _compose(matrix, matrix)
        exponent >>= 1
    return result


def _byte_images(matrix, shift):
    """The images of every byte value b, placed at ``b << shift``."""
    bits = [_apply(matrix, 1 << (shift + i)) for i in range(8)]
    images = [0] * 256
    for b in range(1, 256):
        lowest = (b & -b).bit_length() - 1
        images[b] = images[b & (b - 1)] ^ bits[lowest]
    return images


def _as_translations(images):
    """Four ``bytes.translate`` tables, giving byte 0..3 of each image."""
    return [bytes(image >> 8 * k & 0xFF for image in images) for k in range(4)]


_SMALL = 256        # shorter messages go through the plain byte loop
_FIRST_GROUP = 64   # bytes per group at level 0
_GROUP = 8          # values per group at the later levels
_FEW = 64           # values added up by the final loop
_levels = {}        # depth -> (group, tables[g][plane], step tables)


def _level(depth):
    """The tables of fold level ``depth`` (built on first use)."""
    level = _levels.get(depth)
    if level is None:
        level = _levels[depth] = _build_level(depth)
    return level


def _build_level(depth):
    group, planes = (_FIRST_GROUP, 1) if depth == 0 else (_GROUP, 4)
    spacing = 1 if depth == 0 else _FIRST_GROUP * _GROUP ** (depth - 1)
    step = _power(_ZERO_STEP, spacing)
    # At level 0 a byte goes through the register itself: one more step.
    share = _ZERO_STEP if depth == 0 else _IDENTITY
    tables = [None] * group
    for g in reversed(range(group)):
        tables[g] = [_as_translations(_byte_images(share, 8 * j)) for j in range(planes)]
        share = _compose(step, share)
    return group, tables, [_byte_images(step, 8 * j) for j in range(4)]


def _fold(planes, group, tables):
    """One level: ``planes`` (strings of byte j of each value, their length a
    multiple of ``group``) to the four planes of the groups' shares."""
    acc0 = acc1 = acc2 = acc3 = 0
    for g in range(group):
        for plane, (t0, t1, t2, t3) in zip(planes, tables[g]):
            column = plane[g::group]
            acc0 ^= int.from_bytes(column.translate(t0), "little")
            acc1 ^= int.from_bytes(column.translate(t1), "little")
            acc2 ^= int.from_bytes(column.translate(t2), "little")
            acc3 ^= int.from_bytes(column.translate(t3), "little")
    count = len(planes[0]) // group
    return [acc.to_bytes(count, "little") for acc in (acc0, acc1, acc2, acc3)]


def _crc32c_bytewise(data, crc):
    crc ^= 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32c(data, crc=0):
    """CRC-32C (Castagnoli) of the bytes-like ``data``, continuing from ``crc``;
    equal to ``caffelite.io.leveldb.crc32c``, and about ten times faster on long
    data."""
    data = memoryview(data).cast("B")
    if len(data) < _SMALL:
        return _crc32c_bytewise(data, crc)
    state = (crc ^ 0xFFFFFFFF) ^ int.from_bytes(data[:4], "little")
    pad = -len(data) % _FIRST_GROUP
    planes = [b"".join((bytes(pad), state.to_bytes(4, "little"), data[4:]))]
    depth = 0
    while True:
        group, tables, _ = _level(depth)
        pad = -len(planes[0]) % group
        if pad:
            planes = [bytes(pad) + plane for plane in planes]
        planes = _fold(planes, group, tables)
        depth += 1
        if len(planes[0]) <= _FEW:
            break
    # The values left are spaced by the next level's spacing; its step tables
    # carry the running sum over that distance.
    s0, s1, s2, s3 = _level(depth)[2]
    interleaved = bytearray(4 * len(planes[0]))
    for j, plane in enumerate(planes):
        interleaved[j::4] = plane
    state = 0
    for value in struct.unpack("<%dI" % len(planes[0]), interleaved):
        state = (s0[state & 0xFF] ^ s1[state >> 8 & 0xFF] ^ s2[state >> 16 & 0xFF]
                 ^ s3[state >> 24] ^ value)
    return state ^ 0xFFFFFFFF


def _masked(crc):
    """LevelDB stores CRCs rotated and offset (see caffelite.io.leveldb)."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


_TYPE_CRCS = {kind: crc32c(bytes([kind])) for kind in (_FULL, _FIRST, _MIDDLE, _LAST)}


def _fragment(kind, payload):
    """Header and payload of one log fragment."""
    crc = _masked(crc32c(payload, _TYPE_CRCS[kind]))
    return _FRAGMENT_HEADER.pack(crc, len(payload), kind), payload


# ------------------------------------------------------------------------- log files
class _LogWriter:
    """Appends records in the log format to a binary file opened for writing at
    offset 0, streaming each record's fragments as its blocks fill.

    A record may begin with ``head_size`` bytes that are only known when it ends
    (a WriteBatch's count): they are written as zeros, and the fragments holding
    them are written again by ``end_record``.
    """

    def __init__(self, file):
        self._file = file
        self._offset = 0
        self._pending = bytearray()  # payload of the open record not yet written
        self._written = 0            # payload bytes of the open record written
        self._fragments = 0          # fragments of the open record written
        self._head_size = 0
        self._head_fragments = []    # (file offset, kind, payload start, payload)

    def add_record(self, payload):
        self.begin_record()
        self.extend(payload)
        self.end_record()

    def begin_record(self, head_size=0):
        self._pending = bytearray(head_size)
        self._written = 0
        self._fragments = 0
        self._head_size = head_size
        self._head_fragments = []

    def extend(self, *parts):
        """Add ``parts`` to the open record; write the fragments that now fill
        their blocks.  A fragment is written only once more bytes follow it, so
        that a record ending exactly at a block's end ends with that fragment."""
        for part in parts:
            self._pending += part
        room = self._room()
        if len(self._pending) <= room:
            return
        start = 0
        with memoryview(self._pending) as pending:
            while len(pending) - start > room:
                self._write_fragment(pending[start:start + room], last=False)
                start += room
                room = self._room()
        del self._pending[:start]

    def end_record(self, head=b""):
        """Write the rest of the open record, and its head."""
        if len(head) != self._head_size:
            raise ValueError(f"record head of {len(head)} bytes, not {self._head_size}")
        if self._written < len(head):
            self._pending[:len(head) - self._written] = head[self._written:]
        self._room()
        self._write_fragment(self._pending, last=True)
        self._pending = bytearray()
        if self._head_fragments:
            end = self._offset
            for offset, kind, start, payload in self._head_fragments:
                patched = bytearray(payload)
                size = min(len(head) - start, len(patched))
                patched[:size] = head[start:start + size]
                self._file.seek(offset)
                self._file.write(b"".join(_fragment(kind, patched)))
            self._file.seek(end)
            self._head_fragments = []

    def _room(self):
        """Payload bytes that fit in the current block, after moving to the next
        block when the rest of this one cannot hold a header."""
        left = _LOG_BLOCK - self._offset % _LOG_BLOCK
        if left < _LOG_HEADER:
            self._file.write(bytes(left))
            self._offset += left
            left = _LOG_BLOCK
        return left - _LOG_HEADER

    def _write_fragment(self, payload, last):
        if self._fragments == 0:  # (an empty FIRST fragment still counts)
            kind = _FULL if last else _FIRST
        else:
            kind = _LAST if last else _MIDDLE
        if self._written < self._head_size and not last:
            self._head_fragments.append((self._offset, kind, self._written,
                                         bytes(payload)))
        header, payload = _fragment(kind, payload)
        self._file.write(header)
        self._file.write(payload)
        self._offset += len(header) + len(payload)
        self._written += len(payload)
        self._fragments += 1


# ------------------------------------------------------------------------- encoding
def _length_prefixed(data):
    return varint(len(data)) + bytes(data)


def _version_edit(last_sequence):
    """The MANIFEST's only record: the state of a database whose writes are all
    in log ``_LOG_NUMBER``."""
    return b"".join((
        varint(_TAG_COMPARATOR), _length_prefixed(_BYTEWISE),
        varint(_TAG_LOG_NUMBER), varint(_LOG_NUMBER),
        varint(_TAG_NEXT_FILE), varint(_NEXT_FILE_NUMBER),
        varint(_TAG_LAST_SEQUENCE), varint(last_sequence)))


# ------------------------------------------------------------------------- writer
class LevelDBWriter(NewDatabaseWriter):
    """Write a new LevelDB database at directory ``path`` (created; an existing one
    must be empty), ``batch_size`` puts to a WriteBatch.

    Keys may come in any order (LevelDB sorts them); of two puts of a key the later
    one wins.  ``close`` writes the last batch, the MANIFEST and then ``CURRENT``;
    as a context manager the writer closes on success and, on an exception, removes
    what it wrote (and the directory, when it created it and nothing else is in
    it).  ``len(writer)`` is the number of puts so far.
    """
    kind = "LevelDB"
    error_class = LevelDBWriteError

    def __init__(self, path, batch_size=1000):
        self.path = os.fspath(path)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or \
                not 1 <= batch_size <= 0xFFFFFFFF:
            raise ValueError(f"LevelDB '{self.path}': batch size {batch_size!r} is not "
                             f"a whole number from 1 to {0xFFFFFFFF}")
        self.batch_size = batch_size
        self._puts = 0
        self._in_batch = 0
        self._created = []  # names of the files written, for abort
        self._file = None
        self._made_dir = self._make_dir()
        log_path = os.path.join(self.path, _LOG_NAME)
        try:
            self._file = open(log_path, "xb", buffering=1 << 20)
        except OSError as e:
            self._remove_dir()
            self._fail(f"cannot create {_LOG_NAME}", e)
        self._created.append(_LOG_NAME)
        self._log = _LogWriter(self._file)

    def __len__(self):
        return self._puts

    def put(self, key, value):
        """Store ``value`` under ``key`` (both bytes-like)."""
        self._require_open()
        key = _as_bytes(key, "key")
        value = _as_bytes(value, "value")
        for what, data in (("key", key), ("value", value)):
            if len(data) > _MAX_LENGTH:
                raise ValueError(f"LevelDB '{self.path}': {what} of {len(data)} bytes "
                                 f"(at most {_MAX_LENGTH})")
        try:
            if self._in_batch == 0:
                self._log.begin_record(_BATCH_HEADER.size)
            self._log.extend(bytes([_TYPE_VALUE]) + _length_prefixed(key)
                             + varint(len(value)), value)
            self._in_batch += 1
            self._puts += 1
            if self._in_batch == self.batch_size:
                self._end_batch()
        except OSError as e:
            self._fail(f"cannot write {_LOG_NAME}", e)

    def close(self):
        """Write the last batch, the MANIFEST and CURRENT, all synced to disk.
        Closing again does nothing."""
        if self._file is None:
            return
        try:
            try:
                if self._in_batch:
                    self._end_batch()
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
            except OSError as e:
                self._fail(f"cannot write {_LOG_NAME}", e)
            self._write_manifest()
            self._write_current()
        except BaseException:
            self.abort()
            raise
        self._file = None
        sync_dir(self.path)

    def abort(self):
        """Drop what was written: the files, and the directory when this writer
        created it and it is now empty.  Does nothing once closed."""
        if self._file is None:
            return
        try:
            self._file.close()
        except OSError:
            pass
        self._file = None
        for name in self._created:
            try:
                os.remove(os.path.join(self.path, name))
            except OSError:
                pass
        self._remove_dir()

    def __repr__(self):
        state = "closed" if self._file is None else "open"
        return f"<LevelDBWriter {self.path!r} ({state}, {len(self)} puts)>"

    # -- files -----------------------------------------------------------------------

    def _end_batch(self):
        first_sequence = self._puts - self._in_batch + 1
        self._log.end_record(_BATCH_HEADER.pack(first_sequence, self._in_batch))
        self._in_batch = 0

    def _write_manifest(self):
        buffer = io.BytesIO()
        _LogWriter(buffer).add_record(_version_edit(self._puts))
        self._write_synced(_MANIFEST_NAME, buffer.getvalue())

    def _write_current(self):
        self._write_synced(_CURRENT_TEMP, f"{_MANIFEST_NAME}\n".encode())
        try:
            os.replace(os.path.join(self.path, _CURRENT_TEMP),
                       os.path.join(self.path, "CURRENT"))
        except OSError as e:
            self._fail(f"cannot rename {_CURRENT_TEMP} to CURRENT", e)
        self._created[self._created.index(_CURRENT_TEMP)] = "CURRENT"

    def _write_synced(self, name, data):
        try:
            with open(os.path.join(self.path, name), "xb") as f:
                self._created.append(name)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            self._fail(f"cannot write {name}", e)


def _as_bytes(data, what):
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return memoryview(data).cast("B")
    raise TypeError(f"LevelDB {what} must be bytes, not {type(data).__name__}")
