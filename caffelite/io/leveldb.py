"""A read-only LevelDB reader, for Caffe's ``Data`` layer with ``backend: LEVELDB``.

Caffe's ``convert_imageset`` / ``convert_cifar_data`` write these databases with the
LevelDB C++ library (bytewise comparator, snappy-compressed table blocks when the
library was built with snappy).  A database directory holds:

- ``CURRENT``: the name of the live MANIFEST, ending in a newline;
- ``MANIFEST-NNNNNN``: a log-format file of VersionEdit records; replayed, they give
  the table files of each level and the number of the oldest write-ahead log whose
  writes are not yet in a table;
- ``NNNNNN.ldb`` (older: ``.sst``): sorted tables of internal keys;
- ``NNNNNN.log``: write-ahead logs of WriteBatches.  With Caffe's 256 MB write buffer
  a whole CIFAR-10 database often lives in its log only.

An internal key is the user key followed by a little-endian u64 tag, ``sequence << 8
| type`` (type 1 a value, 0 a deletion).  The live value of a user key is its entry
with the highest sequence over all tables and logs, unless that entry is a deletion.
Tables are sorted by user key, then by descending tag, so ``items`` merges the tables
(streamed block by block) and the log entries (held in memory) on ``(user key,
-tag)`` and keeps the first entry of each user key.

Pure Python (standard library only); snappy blocks are decoded by
:mod:`caffelite.io.snappy`.  Checksums are verified for MANIFEST records and for
the last block of each log (where a crash leaves a torn write); table blocks and the
rest of the logs are not checked, as a pure-Python CRC over hundreds of megabytes
would cost far more than the read.
"""
import heapq
import itertools
import logging
import os
import re
import struct

from .snappy import SnappyError, decompress as snappy_decompress
from .crc32c import masked_crc
from .wire import read_varint


logger = logging.getLogger("caffelite")


class LevelDBError(OSError):
    """A LevelDB database that cannot be read; the message names the file."""


# ------------------------------------------------------------------------- helpers
def _varint(buf, pos):
    """(value, position after it) of the varint at ``buf[pos]``; ValueError when it
    is cut off or too long."""
    return read_varint(buf, pos, len(buf), ValueError)


def _length_prefixed(buf, pos):
    length, pos = _varint(buf, pos)
    if pos + length > len(buf):
        raise ValueError("length-prefixed field runs past the end")
    return bytes(buf[pos:pos + length]), pos + length


# ------------------------------------------------------------------------- log files
_LOG_BLOCK = 32768
_LOG_HEADER = 7  # crc32c u32, payload length u16, record type u8
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _log_records(path, check_all_crcs, dropped=None):
    """Yield the records of a log-format file (a MANIFEST or a write-ahead log).

    A writer that dies leaves at most the tail of the file incomplete: a cut-off
    header or payload, a record begun by FIRST whose LAST never came, or (after a
    machine crash) garbage in the last block.  Like LevelDB's recovery, such a tail
    is dropped: checksums in the last block are always verified, and a mismatch there
    ends the file -- with a warning, and a note appended to ``dropped`` (LevelDB
    reports it as corruption in its LOG), as it may as well be damage.  A mismatch
    followed by an intact record is no torn write: an error.  Anything wrong before
    the last block is an error (LevelDB without paranoid_checks would skip it and
    lose those writes quietly), and so is any checksum mismatch when
    ``check_all_crcs`` (for the MANIFEST, which LevelDB too refuses to open when
    damaged).
    """
    try:
        size = os.path.getsize(path)
        stream = open(path, "rb")
    except OSError as e:
        raise LevelDBError(f"{path}: cannot read: {e.strerror or e}") from e
    last_block_start = (size - 1) // _LOG_BLOCK * _LOG_BLOCK if size else 0
    fragments = None  # payloads of a record begun by FIRST, or None outside one
    with stream:
        for block_start in range(0, size, _LOG_BLOCK):
            block = stream.read(_LOG_BLOCK)
            in_last_block = block_start >= last_block_start
            pos = 0
            # A block tail shorter than a header is padding.
            while len(block) - pos >= _LOG_HEADER:
                crc, length, kind = struct.unpack_from("<IHB", block, pos)
                end = pos + _LOG_HEADER + length
                if end > len(block):
                    if in_last_block:
                        return
                    raise LevelDBError(f"{path}: record at offset {block_start + pos} "
                                       f"runs past its 32 KiB block")
                if kind == 0 and length == 0:
                    # Zeros: a region that an mmap-based writer preallocated.
                    fragments = None
                    break
                if (check_all_crcs or in_last_block) and \
                        masked_crc(block[pos + 6:end]) != crc:  # type byte + payload
                    where = f"{path}: record at offset {block_start + pos}"
                    if in_last_block and not check_all_crcs:
                        if _intact_record(block, end):
                            raise LevelDBError(
                                f"{where}: checksum mismatch, with intact records after "
                                f"it: the file is damaged (not a crash's torn last "
                                f"write)")
                        note = (f"{where} fails its checksum: it and the rest of the "
                                f"log ({size - block_start - pos} bytes) are dropped, as "
                                f"LevelDB drops a crash's torn last write; if the "
                                f"database was closed cleanly, the file is damaged")
                        logger.warning("%s", note)
                        if dropped is not None:
                            dropped.append(note)
                        return
                    raise LevelDBError(f"{where}: checksum mismatch")
                payload = block[pos + _LOG_HEADER:end]
                if kind == _FULL and fragments is None:
                    yield payload
                elif kind == _FIRST and fragments is None:
                    fragments = [payload]
                elif kind == _MIDDLE and fragments is not None:
                    fragments.append(payload)
                elif kind == _LAST and fragments is not None:
                    fragments.append(payload)
                    yield b"".join(fragments)
                    fragments = None
                else:
                    problem = (f"record type {kind} out of sequence (a fragmented "
                               f"record is broken)" if _FULL <= kind <= _LAST
                               else f"unknown record type {kind}")
                    raise LevelDBError(f"{path}: record at offset {block_start + pos}: "
                                       f"{problem}")
                pos = end


def _intact_record(block, pos):
    """Whether a whole record with a good checksum starts at ``block[pos]``."""
    if len(block) - pos < _LOG_HEADER:
        return False
    crc, length, kind = struct.unpack_from("<IHB", block, pos)
    end = pos + _LOG_HEADER + length
    return (_FULL <= kind <= _LAST and end <= len(block)
            and masked_crc(block[pos + 6:end]) == crc)


# ------------------------------------------------------------------------- manifest
_COMPARATOR, _LOG_NUMBER, _NEXT_FILE, _LAST_SEQUENCE = 1, 2, 3, 4
_COMPACT_POINTER, _DELETED_FILE, _NEW_FILE, _PREV_LOG_NUMBER = 5, 6, 7, 9
_BYTEWISE = b"leveldb.BytewiseComparator"


class _Version:
    """What replaying a MANIFEST gives: the live tables and the logs to read."""

    def __init__(self):
        self.comparator = None
        self.log_number = 0
        self.prev_log_number = 0
        self.files = {}  # (level, file number) -> smallest internal key

    def apply(self, edit):
        """Apply one encoded VersionEdit; ValueError/IndexError when malformed."""
        pos = 0
        while pos < len(edit):
            tag, pos = _varint(edit, pos)
            if tag == _COMPARATOR:
                self.comparator, pos = _length_prefixed(edit, pos)
            elif tag == _LOG_NUMBER:
                self.log_number, pos = _varint(edit, pos)
            elif tag == _PREV_LOG_NUMBER:
                self.prev_log_number, pos = _varint(edit, pos)
            elif tag in (_NEXT_FILE, _LAST_SEQUENCE):
                _, pos = _varint(edit, pos)
            elif tag == _COMPACT_POINTER:
                _, pos = _varint(edit, pos)
                _, pos = _length_prefixed(edit, pos)
            elif tag == _DELETED_FILE:
                level, pos = _varint(edit, pos)
                number, pos = _varint(edit, pos)
                self.files.pop((level, number), None)
            elif tag == _NEW_FILE:
                level, pos = _varint(edit, pos)
                number, pos = _varint(edit, pos)
                _, pos = _varint(edit, pos)  # file size
                smallest, pos = _length_prefixed(edit, pos)
                _, pos = _length_prefixed(edit, pos)  # largest key
                self.files[(level, number)] = smallest
            else:
                raise ValueError(f"unknown VersionEdit tag {tag}")


def _read_manifest(dbpath):
    current = os.path.join(dbpath, "CURRENT")
    try:
        with open(current, "rb") as f:
            name = f.read()
    except FileNotFoundError:
        raise LevelDBError(f"{current}: missing, so {dbpath} is not a LevelDB "
                           f"database") from None
    except OSError as e:
        raise LevelDBError(f"{current}: cannot read: {e.strerror or e}") from e
    if not name.endswith(b"\n") or not re.fullmatch(rb"MANIFEST-\d+", name[:-1]):
        raise LevelDBError(f"{current}: does not name a MANIFEST file (holds {name[:80]!r})")
    manifest = os.path.join(dbpath, name[:-1].decode())
    if not os.path.isfile(manifest):
        raise LevelDBError(f"{manifest}: missing (named by {current})")
    version = _Version()
    for offset, edit in enumerate(_log_records(manifest, check_all_crcs=True)):
        try:
            version.apply(edit)
        except (ValueError, IndexError) as e:
            raise LevelDBError(f"{manifest}: VersionEdit record {offset} is malformed: "
                               f"{e}") from None
    if version.comparator not in (None, _BYTEWISE):
        raise LevelDBError(f"{manifest}: the database uses the comparator "
                           f"{version.comparator.decode(errors='replace')!r}; only "
                           f"{_BYTEWISE.decode()} is supported")
    return manifest, version


# ------------------------------------------------------------------------- write-ahead logs
_PUT, _DELETE = 1, 0


def _apply_batch(batch, memtable, where):
    """Put the entries of one WriteBatch record into ``memtable`` (user key ->
    (tag, value)); where two writes of a key meet, the higher sequence stays."""
    if len(batch) < 12:
        raise LevelDBError(f"{where}: WriteBatch of {len(batch)} bytes is too short")
    sequence, count = struct.unpack_from("<QI", batch, 0)
    pos = 12
    try:
        for index in range(count):
            kind = batch[pos]
            key, pos = _length_prefixed(batch, pos + 1)
            if kind == _PUT:
                value, pos = _length_prefixed(batch, pos)
            elif kind == _DELETE:
                value = b""
            else:
                raise ValueError(f"unknown entry type {kind}")
            tag = (sequence + index) << 8 | kind
            old = memtable.get(key)
            if old is None or old[0] < tag:
                memtable[key] = (tag, value)
    except (ValueError, IndexError) as e:
        raise LevelDBError(f"{where}: WriteBatch entry {index} of {count} is "
                           f"malformed: {e}") from None
    if pos != len(batch):
        raise LevelDBError(f"{where}: WriteBatch has {len(batch) - pos} bytes after "
                           f"its {count} entries")


def _read_logs(dbpath, version, dropped=None):
    """The writes of the live logs, as a sorted list of (user key, -tag, value);
    ``dropped`` gets a note for each log tail dropped for a checksum mismatch."""
    numbers = []
    for name in os.listdir(dbpath):
        match = re.fullmatch(r"(\d+)\.log", name)
        if match:
            number = int(match.group(1))
            if number >= version.log_number or (version.prev_log_number and
                                                number == version.prev_log_number):
                numbers.append((number, name))
    memtable = {}
    for _, name in sorted(numbers):
        path = os.path.join(dbpath, name)
        for index, batch in enumerate(_log_records(path, False, dropped)):
            _apply_batch(batch, memtable, f"{path}: record {index}")
    return sorted((key, -tag, value) for key, (tag, value) in memtable.items())


# ------------------------------------------------------------------------- tables
_FOOTER = 48
_TABLE_MAGIC = 0xDB4775248B80FB57
_BLOCK_TRAILER = 5  # compression type u8, crc32c u32
_NO_COMPRESSION, _SNAPPY = 0, 1


def _table_path(dbpath, number):
    for suffix in (".ldb", ".sst"):
        path = os.path.join(dbpath, "%06d%s" % (number, suffix))
        if os.path.isfile(path):
            return path
    return None


def _index_handle(path):
    """(offset, size) of the table's index block, from its footer."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _FOOTER:
                raise LevelDBError(f"{path}: {size} bytes, too short for a table")
            f.seek(size - _FOOTER)
            footer = f.read(_FOOTER)
    except LevelDBError:
        raise
    except OSError as e:
        raise LevelDBError(f"{path}: cannot read: {e.strerror or e}") from e
    magic, = struct.unpack_from("<Q", footer, 40)
    if magic != _TABLE_MAGIC:
        raise LevelDBError(f"{path}: bad table magic {magic:#018x} (not a LevelDB table, "
                           f"or a damaged one)")
    try:
        _, pos = _varint(footer, 0)  # metaindex offset
        _, pos = _varint(footer, pos)  # metaindex size
        offset, pos = _varint(footer, pos)
        length, pos = _varint(footer, pos)
    except (ValueError, IndexError):
        raise LevelDBError(f"{path}: malformed footer") from None
    if pos > 40 or offset + length + _BLOCK_TRAILER > size - _FOOTER:
        raise LevelDBError(f"{path}: malformed footer (index block handle "
                           f"{offset}+{length} in a file of {size} bytes)")
    return offset, length


def _read_block(stream, path, offset, length):
    stream.seek(offset)
    raw = stream.read(length + _BLOCK_TRAILER)
    if len(raw) != length + _BLOCK_TRAILER:
        raise LevelDBError(f"{path}: block at offset {offset} runs past the end of the file")
    compression = raw[length]
    if compression == _NO_COMPRESSION:
        return raw[:length]
    if compression == _SNAPPY:
        try:
            return snappy_decompress(raw[:length])
        except SnappyError as e:
            raise LevelDBError(f"{path}: block at offset {offset}: malformed snappy "
                               f"data: {e}") from None
    raise LevelDBError(f"{path}: block at offset {offset} has unknown compression type "
                       f"{compression} (this reader knows 0, none, and 1, snappy)")


def _block_entries(block):
    """Yield the (key, value) entries of a table block; ValueError/IndexError when
    it is malformed.  Each key shares a prefix with the one before it; the restart
    array at the end only matters for seeking, so it is skipped."""
    restarts, = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * restarts
    if limit < 0:
        raise ValueError(f"restart array of {restarts} entries larger than the block")
    key = b""
    pos = 0
    while pos < limit:
        shared, unshared, value_length = block[pos], block[pos + 1], block[pos + 2]
        if shared | unshared | value_length < 0x80:  # the usual one-byte varints
            pos += 3
        else:
            shared, pos = _varint(block, pos)
            unshared, pos = _varint(block, pos)
            value_length, pos = _varint(block, pos)
        if shared > len(key):
            raise ValueError(f"entry shares {shared} bytes of a {len(key)}-byte key")
        value_start = pos + unshared
        key = key[:shared] + block[pos:value_start]
        pos = value_start + value_length
        if pos > limit:
            raise ValueError("entry runs into the restart array")
        yield key, block[value_start:pos]


def _table_entries(path, index_handle):
    """Yield the entries of a table as (user key, -tag, value), in table order."""
    try:
        stream = open(path, "rb")
    except OSError as e:
        raise LevelDBError(f"{path}: cannot read: {e.strerror or e}") from e
    with stream:
        where = f"index block at offset {index_handle[0]}"
        try:
            index = _read_block(stream, path, *index_handle)
            for _, handle in _block_entries(index):
                offset, pos = _varint(handle, 0)
                length, _ = _varint(handle, pos)
                where = f"data block at offset {offset}"
                block = _read_block(stream, path, offset, length)
                for internal_key, value in _block_entries(block):
                    if len(internal_key) < 8:
                        raise ValueError(f"internal key {internal_key!r} is shorter than "
                                         f"its 8-byte tag")
                    tag = int.from_bytes(internal_key[-8:], "little")
                    if tag & 0xFF > _PUT:
                        raise ValueError(f"unknown entry type {tag & 0xFF}")
                    yield internal_key[:-8], -tag, value
        except (ValueError, IndexError, struct.error) as e:
            raise LevelDBError(f"{path}: {where} is malformed: {e}") from None


def _internal_order(smallest):
    return smallest[:-8], -int.from_bytes(smallest[-8:], "little")


# ------------------------------------------------------------------------- reader
class LevelDBReader:
    """Read the live entries of a LevelDB database directory, in key order.

    Read-only: takes no LOCK and never writes, repairs or recovers anything, so the
    database should not be open for writing meanwhile (a compaction could delete a
    table between the MANIFEST read here and the table's).
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise LevelDBError(f"{self.path}: no such directory (a LevelDB database is "
                               f"a directory)")
        self._manifest, version = _read_manifest(self.path)
        # level -> [(table path, index block handle)] in key order within the level
        self._levels = {}
        for (level, number), smallest in sorted(
                version.files.items(),
                key=lambda item: (item[0][0], _internal_order(item[1]))):
            path = _table_path(self.path, number)
            if path is None:
                raise LevelDBError(f"{os.path.join(self.path, '%06d.ldb' % number)}: "
                                   f"missing (a level-{level} table named by "
                                   f"{self._manifest})")
            self._levels.setdefault(level, []).append((path, _index_handle(path)))
        # notes on log tails dropped for a checksum mismatch: damage, or a crash's
        # torn write (an empty database then says so)
        self.dropped = []
        self._log_entries = _read_logs(self.path, version, self.dropped)
        self._closed = False

    def items(self):
        """Generator of the live (key, value) pairs in bytewise key order; each call
        starts again from the first key."""
        if self._closed:
            raise ValueError(f"{self.path}: the LevelDBReader is closed")
        streams = [iter(self._log_entries)]
        for level, tables in sorted(self._levels.items()):
            tables = [_table_entries(path, handle) for path, handle in tables]
            if level == 0:
                streams.extend(tables)  # level-0 tables may overlap each other
            else:
                streams.append(itertools.chain.from_iterable(tables))
        previous = None
        for key, negative_tag, value in heapq.merge(*streams):
            if key == previous:
                continue  # an older write of a key already decided
            previous = key
            if -negative_tag & 0xFF == _PUT:
                yield key, value

    def close(self):
        self._closed = True
        self._log_entries = []
        self._levels = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
