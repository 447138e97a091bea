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
"""
import io
import os
import struct

from .crc32c import crc32c, mask
from .leveldb import _FIRST, _FULL, _LAST, _LOG_BLOCK, _LOG_HEADER, _MIDDLE
from .wire import varint
from .db import NewDatabaseWriter, sync_dir

__all__ = ["LevelDBWriteError", "LevelDBWriter"]

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


_TYPE_CRCS = {kind: crc32c(bytes([kind])) for kind in (_FULL, _FIRST, _MIDDLE, _LAST)}


def _fragment(kind, payload):
    """Header and payload of one log fragment."""
    crc = mask(crc32c(payload, _TYPE_CRCS[kind]))
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
