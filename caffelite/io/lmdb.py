"""Read-only LMDB reader for Caffe's ``Data`` layer (``backend: LMDB``).

Reads the databases Caffe's ``convert_imageset`` / ``convert_cifar_data`` write with
the LMDB C library (64-bit little-endian build, default flags): a directory holding
``data.mdb`` (and ``lock.mdb``, which is never touched), or the data file itself
(``MDB_NOSUBDIR``).  The file is mapped read-only; no lock is taken and nothing is
written.  Only the main (unnamed) database is read, in its stored key order.

On-disk format, as used here (all integers little-endian):

* Page ``n`` lies at ``n * page_size``.  Its 16-byte header: pgno u64, pad u16,
  flags u16, then lower u16 and upper u16 -- or, on the first page of an overflow
  run, a u32 count of pages in the run.
* Pages 0 and 1 are meta pages; the valid one with the larger txnid is current.
  After the header: magic u32, version u32, address u64, mapsize u64, the FREE and
  MAIN database records (pad u32 -- the page size in FREE's --, flags u16,
  depth u16, branch/leaf/overflow page counts u64, entries u64, root u64), last
  pgno u64, txnid u64.
* Branch and leaf pages: ``(lower - 16) / 2`` u16 node offsets follow the header.
  A node is lo u16, hi u16, flags u16, key size u16, key, data.  In a leaf the
  data size is ``lo | hi << 16``; with the BIGDATA flag the data is a u64 overflow
  page number and the value starts after that page's header.  In a branch the
  child page is ``lo | hi << 16 | flags << 32``.
"""
import mmap
import os
import struct

__all__ = ["LMDBError", "LMDBReader"]

_MAGIC = 0xBEEFC0DE
_DATA_VERSION = 1
_NO_PAGE = 0xFFFFFFFFFFFFFFFF            # root of an empty database

_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_META = 0x01, 0x02, 0x04, 0x08
_P_LEAF2, _P_SUBP = 0x20, 0x40
_F_BIGDATA, _F_SUBDATA, _F_DUPDATA = 0x01, 0x02, 0x04
_MDB_REVERSEKEY, _MDB_DUPSORT, _MDB_INTEGERKEY = 0x02, 0x04, 0x08

_PAGE_HEADER = struct.Struct("<QHHHH")    # pgno, pad, flags, lower, upper
_OVERFLOW_HEADER = struct.Struct("<QHHI")  # pgno, pad, flags, page count
_HEADER_SIZE = _PAGE_HEADER.size
_META_HEAD = struct.Struct("<IIQQ")       # magic, version, address, mapsize
_DB_RECORD = struct.Struct("<IHHQQQQQ")   # pad, flags, depth, branch, leaf, overflow,
#                                           entries, root
_META_TAIL = struct.Struct("<QQ")         # last pgno, txnid
_META_SIZE = _META_HEAD.size + 2 * _DB_RECORD.size + _META_TAIL.size
_NODE = struct.Struct("<HHHH")            # lo, hi, flags, key size
_PGNO = struct.Struct("<Q")
_U32_LE, _U32_BE = struct.Struct("<I"), struct.Struct(">I")

_MIN_PAGE_SIZE, _MAX_PAGE_SIZE = 512, 65536


class LMDBError(OSError):
    """An LMDB database that cannot be read; the message names its path."""


class _Meta:
    """The fields of one meta page this reader needs."""

    def __init__(self, page_size, flags, depth, entries, root, last_pgno, txnid):
        self.page_size, self.flags, self.depth = page_size, flags, depth
        self.entries, self.root = entries, root
        self.last_pgno, self.txnid = last_pgno, txnid


class LMDBReader:
    """Iterate the main database of an LMDB environment, read-only.

    ``path`` is the environment directory (holding ``data.mdb``) or the data file
    itself.  ``len(reader)`` is the number of entries; ``reader.items()`` yields
    ``(key, value)`` bytes pairs in key order, from the first key on every call.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._map = _map_file(_data_file(self.path), self.path)
        try:
            self._meta = self._current_meta()
            self._check_main_db()
        except BaseException:
            self.close()
            raise

    def __len__(self):
        self._require_open()
        return self._meta.entries

    def items(self):
        """Generator of ``(key, value)`` in key order (memcmp: shorter key first on a
        common prefix)."""
        self._require_open()
        meta = self._meta
        if meta.root == _NO_PAGE:
            return
        # One iterator of child page numbers per branch level on the way down; the
        # tree's depth bounds the stack, so a corrupt page loop cannot run forever.
        stack = [iter((meta.root,))]
        while stack:
            pgno = next(stack[-1], None)
            if pgno is None:
                stack.pop()
                continue
            level = len(stack)
            flags, offsets, start = self._tree_page(pgno)
            if flags & _P_BRANCH:
                if level >= meta.depth:
                    self._fail(f"branch page {pgno} below the tree depth {meta.depth}")
                stack.append(iter(self._children(start, offsets)))
            else:
                if level != meta.depth:
                    self._fail(f"leaf page {pgno} at level {level}, tree depth "
                               f"{meta.depth}")
                yield from self._leaf_items(pgno, start, offsets)

    def close(self):
        if self._map is not None:
            self._map.close()
            self._map = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self._map is None else f"{self._meta.entries} entries"
        return f"<LMDBReader {self.path!r} ({state})>"

    # -- meta pages ---------------------------------------------------------------

    def _current_meta(self):
        size = len(self._map)
        if size < _HEADER_SIZE + _META_SIZE:
            if size >= 20 and _U32_LE.unpack_from(self._map, 16)[0] == _MAGIC:
                self._fail(f"truncated: {size} bytes, too short for a meta page")
            self._reject_foreign()
        first = self._read_meta(0, 0)
        if size < 2 * first.page_size:
            self._fail(f"truncated: {size} bytes, less than the two meta pages of "
                       f"{first.page_size} bytes")
        second = self._read_meta(1, first.page_size)
        if second.page_size != first.page_size:
            self._fail(f"meta pages disagree on the page size ({first.page_size}, "
                       f"{second.page_size})")
        meta = second if second.txnid > first.txnid else first
        needed = (meta.last_pgno + 1) * meta.page_size
        if meta.last_pgno < 1 or needed > size:
            self._fail(f"truncated: the database uses {meta.last_pgno + 1} pages "
                       f"({needed} bytes), the file has {size} bytes")
        return meta

    def _read_meta(self, pgno, offset):
        m = self._map
        _, _, flags, _, _ = _PAGE_HEADER.unpack_from(m, offset)
        magic, version, _, _ = _META_HEAD.unpack_from(m, offset + _HEADER_SIZE)
        if magic != _MAGIC:
            if pgno == 0:
                self._reject_foreign()
            self._fail(f"meta page {pgno} has no LMDB magic number")
        if version != _DATA_VERSION:
            self._fail(f"LMDB data format version {version} (only version "
                       f"{_DATA_VERSION} is read)")
        if not flags & _P_META:
            self._fail(f"page {pgno} is not a meta page (flags 0x{flags:x})")
        at = offset + _HEADER_SIZE + _META_HEAD.size
        page_size = _DB_RECORD.unpack_from(m, at)[0]       # FREE record's pad
        main = _DB_RECORD.unpack_from(m, at + _DB_RECORD.size)
        last_pgno, txnid = _META_TAIL.unpack_from(m, at + 2 * _DB_RECORD.size)
        if not (_MIN_PAGE_SIZE <= page_size <= _MAX_PAGE_SIZE
                and page_size & (page_size - 1) == 0):
            self._fail(f"meta page {pgno} gives an invalid page size {page_size}")
        _, flags, depth, _, _, _, entries, root = main
        return _Meta(page_size, flags, depth, entries, root, last_pgno, txnid)

    def _reject_foreign(self):
        """Name the LMDB variants this reader cannot read, when page 0 shows one."""
        m = self._map
        if len(m) >= 20 and _U32_BE.unpack_from(m, 16)[0] == _MAGIC:
            self._fail("big-endian LMDB file (only little-endian files are read)")
        if len(m) >= 16 and _U32_LE.unpack_from(m, 12)[0] == _MAGIC:
            self._fail("LMDB file of a 32-bit build (only 64-bit files are read)")
        if len(m) >= 16 and _U32_BE.unpack_from(m, 12)[0] == _MAGIC:
            self._fail("big-endian LMDB file of a 32-bit build (only 64-bit "
                       "little-endian files are read)")
        self._fail("not an LMDB file (no LMDB magic number in its meta page)")

    def _check_main_db(self):
        meta = self._meta
        if meta.flags & _MDB_DUPSORT:
            self._fail("main database is DUPSORT (several values per key), which "
                       "this reader does not support (Caffe never writes one)")
        if meta.flags:
            self._fail(f"main database has flags 0x{meta.flags:x} (only a plain "
                       f"database, flags 0, is supported)")
        empty = meta.root == _NO_PAGE
        if empty != (meta.depth == 0) or (empty and meta.entries):
            self._fail(f"inconsistent main database record (root {meta.root}, depth "
                       f"{meta.depth}, {meta.entries} entries)")
        if not empty:
            self._page_offset(meta.root)

    # -- pages ---------------------------------------------------------------------

    def _page_offset(self, pgno, count=1):
        """File offset of page ``pgno`` (the first of ``count``), checked to lie in the
        database."""
        last = pgno + count - 1
        if pgno < 2 or last > self._meta.last_pgno:
            pages = f"page {pgno}" if count == 1 else f"pages {pgno}..{last}"
            self._fail(f"{pages} outside the database's pages 2..{self._meta.last_pgno} "
                       f"(truncated or corrupt)")
        return pgno * self._meta.page_size

    def _tree_page(self, pgno):
        """(flags, node offsets, file offset) of branch or leaf page ``pgno``."""
        m = self._require_open()
        start = self._page_offset(pgno)
        stored, _, flags, lower, upper = _PAGE_HEADER.unpack_from(m, start)
        if stored != pgno:
            self._fail(f"page {pgno} holds the header of page {stored}")
        if flags & (_P_LEAF2 | _P_SUBP | _P_OVERFLOW | _P_META) \
                or (flags & (_P_BRANCH | _P_LEAF)) not in (_P_BRANCH, _P_LEAF):
            self._fail(f"page {pgno} is not a branch or leaf page (flags 0x{flags:x})")
        count, odd = divmod(lower - _HEADER_SIZE, 2)
        if count < 0 or odd or upper < lower or upper > self._meta.page_size:
            self._fail(f"page {pgno} has a corrupt header (lower {lower}, upper "
                       f"{upper})")
        offsets = _node_offsets(count).unpack_from(m, start + _HEADER_SIZE)
        if offsets and (min(offsets) < upper
                        or max(offsets) > self._meta.page_size - _NODE.size):
            self._fail(f"page {pgno} has a node outside its node area")
        return flags, offsets, start

    def _children(self, start, offsets):
        m, node = self._map, _NODE.unpack_from
        for offset in offsets:
            lo, hi, high, _ = node(m, start + offset)
            yield lo | hi << 16 | high << 32

    def _leaf_items(self, pgno, start, offsets):
        """The (key, value) pairs of leaf page ``pgno``, as a list."""
        m, node = self._map, _NODE.unpack_from
        page_end = start + self._meta.page_size
        items = []
        for offset in offsets:
            at = start + offset
            lo, hi, flags, key_size = node(m, at)
            key_at = at + _NODE.size
            data_at = key_at + key_size
            size = lo | hi << 16
            if flags & (_F_SUBDATA | _F_DUPDATA):
                what = "a named sub-database" if flags & _F_SUBDATA else \
                    "duplicate values of a key"
                self._fail(f"leaf page {pgno} holds {what} (node flags 0x{flags:x}), "
                           f"which this reader does not support (Caffe never writes "
                           f"them)")
            big = flags & _F_BIGDATA
            if data_at + (_PGNO.size if big else size) > page_end:
                self._fail(f"leaf page {pgno} has a node running past the page")
            if big:
                value = self._overflow_value(_PGNO.unpack_from(m, data_at)[0], size,
                                             pgno)
            else:
                value = m[data_at:data_at + size]
            items.append((m[key_at:data_at], value))
        return items

    def _overflow_value(self, first, size, leaf_pgno):
        """The ``size``-byte value stored from overflow page ``first`` on."""
        m = self._map
        start = self._page_offset(first)
        stored, _, flags, count = _OVERFLOW_HEADER.unpack_from(m, start)
        if stored != first or not flags & _P_OVERFLOW:
            self._fail(f"page {first}, named by leaf page {leaf_pgno}, is not an "
                       f"overflow page (flags 0x{flags:x})")
        self._page_offset(first, count)
        if _HEADER_SIZE + size > count * self._meta.page_size:
            self._fail(f"value of {size} bytes does not fit overflow page {first} "
                       f"({count} pages)")
        return m[start + _HEADER_SIZE:start + _HEADER_SIZE + size]

    # -- helpers -------------------------------------------------------------------

    def _require_open(self):
        if self._map is None:
            raise ValueError(f"LMDB reader of '{self.path}' is closed")
        return self._map

    def _fail(self, what):
        raise LMDBError(f"cannot read LMDB '{self.path}': {what}")


_OFFSET_STRUCTS = {}


def _node_offsets(count):
    """The struct of ``count`` u16 node offsets (cached: pages repeat few counts)."""
    s = _OFFSET_STRUCTS.get(count)
    if s is None:
        s = _OFFSET_STRUCTS[count] = struct.Struct(f"<{count}H")
    return s


def _data_file(path):
    """The data file of ``path`` (a directory holding data.mdb, or the file), opened
    for reading."""
    if os.path.isdir(path):
        name = os.path.join(path, "data.mdb")
        if not os.path.exists(name):
            raise LMDBError(f"cannot read LMDB '{path}': the directory holds no "
                            f"data.mdb")
    else:
        name = path
    try:
        return open(name, "rb")
    except OSError as e:
        raise LMDBError(f"cannot read LMDB '{path}': {e.strerror or e}") from None


def _map_file(file, path):
    """Map ``file`` read-only and close it (the map keeps its own handle)."""
    with file:
        if os.fstat(file.fileno()).st_size == 0:
            raise LMDBError(f"cannot read LMDB '{path}': empty file, not an LMDB "
                            f"database")
        try:
            return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise LMDBError(f"cannot read LMDB '{path}': cannot map it ({e})") \
                from None
