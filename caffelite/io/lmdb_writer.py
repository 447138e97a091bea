"""Write an LMDB environment as Caffe's ``convert_imageset`` does with the LMDB C
library (64-bit little-endian build, default flags): a directory holding
``data.mdb``.  ``lock.mdb`` is not written; LMDB creates it when the database is
opened with locking.

Keys arrive in increasing order, so the B+tree is built bottom-up in one pass: leaf
pages are filled and written as they fill (big values go to overflow pages at once),
and each branch level keeps only the page it is filling.  ``close`` writes what is
left of every level, then the two meta pages.  The result is the state a fresh
environment reaches after one write transaction: meta page 0 holds the empty
database (txnid 0), meta page 1 the written one (txnid 1), and the free-page
database is empty.  The on-disk layout is the one ``caffelite.io.lmdb`` reads (see
its docstring), plus what a writer must also get right:

* a node takes ``8 + key size + data size`` bytes rounded up to even, plus a u16
  offset after the page header; nodes fill the page from its end downward;
* a leaf value goes to overflow pages when its node would exceed the node-size
  limit ``((page_size - 16) // 2 & ~1) - 2`` (2038 bytes for 4096-byte pages); the
  node then holds the u64 number of the first of ``ceil((16 + size) / page_size)``
  overflow pages;
* the first node of a branch page has an empty key (searches never compare it);
  every other branch node holds the first key of its child's subtree;
* the FREE database record carries the page size in its pad field and the
  INTEGERKEY flag; an empty database has root ``2**64 - 1`` and depth 0.
"""
import os
import struct

from .db import NewDatabaseWriter, sync_dir
from .lmdb import (_DATA_VERSION, _DB_RECORD, _F_BIGDATA, _HEADER_SIZE, _MAGIC,
                   _MDB_INTEGERKEY, _META_HEAD, _META_TAIL, _NO_PAGE, _NODE,
                   _OVERFLOW_HEADER, _P_BRANCH, _P_LEAF, _P_META, _P_OVERFLOW,
                   _PAGE_HEADER, _PGNO)

__all__ = ["LMDBWriteError", "LMDBWriter", "MAX_KEY_SIZE"]

MAX_KEY_SIZE = 511
_MAX_VALUE_SIZE = 0xFFFFFFFF              # a node stores the value size in 32 bits

_DEFAULT_MAP_SIZE = 1 << 20               # the C library's default map size
_INDEX_SIZE = 2                           # a u16 node offset

_MIN_PAGE_SIZE = 4096
# Above 32 KiB the u16 upper bound of an empty page would overflow; the C library
# caps its page size there too.
_MAX_PAGE_SIZE = 32768

_TEMP_NAME = "data.mdb.partial"


class LMDBWriteError(OSError):
    """An LMDB database that cannot be written; the message names its path."""


def _even(n):
    return n + (n & 1)


def _node_max(page_size):
    """Largest node kept inside a page; a leaf node over it puts its value on
    overflow pages."""
    return ((page_size - _HEADER_SIZE) // 2 & ~1) - _INDEX_SIZE


def _overflow_pages(size, page_size):
    return (_HEADER_SIZE + size + page_size - 1) // page_size


class _Tree:
    """Page counts of the main database, for its record in the meta page."""

    def __init__(self):
        self.branch = self.leaf = self.overflow = self.entries = 0
        self.depth, self.root = 0, _NO_PAGE


class _BranchLevel:
    """The branch page one level is filling: its (key, child pgno) nodes and their
    size.  The first node's key is not stored; it is the key the page is known by in
    the level above."""

    def __init__(self, page_size):
        self.capacity = page_size - _HEADER_SIZE
        self.nodes = []
        self.used = 0
        self.pages_written = 0

    def fits(self, key):
        return self.used + _branch_node_size(key) <= self.capacity

    def add(self, key, pgno):
        self.used += _branch_node_size(key if self.nodes else b"")
        self.nodes.append((key, pgno))

    def restart_with(self, nodes):
        self.nodes, self.used = [], 0
        for key, pgno in nodes:
            self.add(key, pgno)


def _branch_node_size(key):
    return _even(_NODE.size + len(key)) + _INDEX_SIZE


def _branch_page(pgno, nodes, page_size):
    """The bytes of a branch page holding ``nodes`` (first key left out)."""
    page = bytearray(page_size)
    upper = page_size
    offsets = []
    for i, (key, child) in enumerate(nodes):
        key = key if i else b""
        upper -= _even(_NODE.size + len(key))
        _NODE.pack_into(page, upper, child & 0xFFFF, child >> 16 & 0xFFFF, child >> 32,
                        len(key))
        page[upper + _NODE.size:upper + _NODE.size + len(key)] = key
        offsets.append(upper)
    lower = _HEADER_SIZE + _INDEX_SIZE * len(offsets)
    _PAGE_HEADER.pack_into(page, 0, pgno, 0, _P_BRANCH, lower, upper)
    struct.pack_into(f"<{len(offsets)}H", page, _HEADER_SIZE, *offsets)
    return page


def _meta_page(pgno, page_size, map_size, tree, last_pgno, txnid):
    page = bytearray(page_size)
    _PAGE_HEADER.pack_into(page, 0, pgno, 0, _P_META, 0, 0)
    at = _HEADER_SIZE
    _META_HEAD.pack_into(page, at, _MAGIC, _DATA_VERSION, 0, map_size)
    at += _META_HEAD.size
    _DB_RECORD.pack_into(page, at, page_size, _MDB_INTEGERKEY, 0, 0, 0, 0, 0,
                         _NO_PAGE)
    at += _DB_RECORD.size
    _DB_RECORD.pack_into(page, at, 0, 0, tree.depth, tree.branch, tree.leaf,
                         tree.overflow, tree.entries, tree.root)
    at += _DB_RECORD.size
    _META_TAIL.pack_into(page, at, last_pgno, txnid)
    return page


class LMDBWriter(NewDatabaseWriter):
    """Write a new LMDB database at directory ``path`` (created; an existing one
    must be empty), entries in strictly increasing key order (memcmp: on a common
    prefix the shorter key first).

    The data goes to a temporary file in the directory, renamed to ``data.mdb`` by
    ``close``; as a context manager the writer closes on success and, on an
    exception, removes the temporary file (and the directory, when it created it and
    nothing else is in it).  ``len(writer)`` is the number of entries put so far.
    """
    kind = "LMDB"
    error_class = LMDBWriteError

    def __init__(self, path, page_size=4096):
        self.path = os.fspath(path)
        if not (_MIN_PAGE_SIZE <= page_size <= _MAX_PAGE_SIZE
                and page_size & (page_size - 1) == 0):
            raise ValueError(f"LMDB '{self.path}': page size {page_size} is not a "
                             f"power of two from {_MIN_PAGE_SIZE} to {_MAX_PAGE_SIZE}")
        self.page_size = page_size
        self._node_max = _node_max(page_size)
        self._tree = _Tree()
        self._levels = []
        self._last_key = None
        self._next_pgno = 2                  # pages 0 and 1 are the meta pages
        self._new_leaf()
        self._file = None
        self._made_dir = self._make_dir()
        self._temp = os.path.join(self.path, _TEMP_NAME)
        try:
            fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as e:
            self._remove_dir()
            self._fail(f"cannot create {_TEMP_NAME}", e)
        self._file = os.fdopen(fd, "wb", buffering=1 << 20)
        try:
            self._write(bytes(2 * page_size))    # the meta pages, written last
        except BaseException:
            self.abort()
            raise

    def __len__(self):
        return self._tree.entries

    def put(self, key, value):
        """Append ``value`` under ``key``, which must sort after every key put
        before."""
        self._require_open()
        key = _as_bytes(key, "key")
        if not 1 <= len(key) <= MAX_KEY_SIZE:
            raise ValueError(f"LMDB '{self.path}': key of {len(key)} bytes (LMDB keys "
                             f"are 1 to {MAX_KEY_SIZE} bytes)")
        if self._last_key is not None and key <= self._last_key:
            what = "repeats" if key == self._last_key else "sorts before"
            raise ValueError(f"LMDB '{self.path}': key {key[:64]!r} {what} the previous "
                             f"key {self._last_key[:64]!r} (keys must be put in strictly "
                             f"increasing byte order)")
        value = memoryview(_as_bytes(value, "value")).cast("B")
        if len(value) > _MAX_VALUE_SIZE:
            raise ValueError(f"LMDB '{self.path}': value of {len(value)} bytes (LMDB "
                             f"values are at most {_MAX_VALUE_SIZE} bytes)")
        if _NODE.size + len(key) + len(value) > self._node_max:
            self._put_node(key, _F_BIGDATA, len(value),
                           _PGNO.pack(self._write_overflow(value)))
        else:
            self._put_node(key, 0, len(value), value)
        self._last_key = key
        self._tree.entries += 1

    def close(self):
        """Write the rest of the tree and the meta pages, and rename the file to
        ``data.mdb``.  Closing again does nothing."""
        if self._file is None:
            return
        final = os.path.join(self.path, "data.mdb")
        try:
            self._finish_tree()
            self._write_meta_pages()
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
            except OSError as e:
                self._fail(f"cannot write {_TEMP_NAME}", e)
            if os.path.lexists(final):
                self._fail("data.mdb appeared in the directory while it was written; "
                           "it is left as it is")
            try:
                os.rename(self._temp, final)
            except OSError as e:
                self._fail(f"cannot rename {_TEMP_NAME} to data.mdb", e)
        except BaseException:
            self.abort()
            raise
        self._file = None
        sync_dir(self.path)

    def abort(self):
        """Drop what was written: the temporary file, and the directory when this
        writer created it and it is now empty.  Does nothing once closed."""
        if self._file is None:
            return
        try:
            self._file.close()
        except OSError:
            pass
        self._file = None
        try:
            os.remove(self._temp)
        except OSError:
            pass
        self._remove_dir()

    def __repr__(self):
        state = "closed" if self._file is None else "open"
        return f"<LMDBWriter {self.path!r} ({state}, {len(self)} entries)>"

    # -- directory and file ----------------------------------------------------------

    def _write(self, data):
        try:
            self._file.write(data)
        except OSError as e:
            self._fail(f"cannot write {_TEMP_NAME}", e)

    def _new_pgno(self, count=1):
        pgno = self._next_pgno
        self._next_pgno += count
        return pgno

    # -- pages -----------------------------------------------------------------------

    def _new_leaf(self):
        self._leaf = bytearray(self.page_size)
        self._leaf_offsets = []
        self._leaf_upper = self.page_size
        self._leaf_first_key = None

    def _put_node(self, key, flags, size, data):
        """Add a leaf node (its data inline, or an overflow page number), writing
        the leaf first when the node does not fit."""
        node_size = _even(_NODE.size + len(key) + len(data))
        lower = _HEADER_SIZE + _INDEX_SIZE * (len(self._leaf_offsets) + 1)
        if self._leaf_upper - node_size < lower:
            self._write_leaf()
        upper = self._leaf_upper - node_size
        page = self._leaf
        _NODE.pack_into(page, upper, size & 0xFFFF, size >> 16, flags, len(key))
        at = upper + _NODE.size
        page[at:at + len(key)] = key
        at += len(key)
        page[at:at + len(data)] = data
        self._leaf_upper = upper
        self._leaf_offsets.append(upper)
        if self._leaf_first_key is None:
            self._leaf_first_key = key

    def _write_leaf(self):
        offsets = self._leaf_offsets
        pgno = self._new_pgno()
        lower = _HEADER_SIZE + _INDEX_SIZE * len(offsets)
        _PAGE_HEADER.pack_into(self._leaf, 0, pgno, 0, _P_LEAF, lower,
                               self._leaf_upper)
        struct.pack_into(f"<{len(offsets)}H", self._leaf, _HEADER_SIZE, *offsets)
        self._write(self._leaf)
        self._tree.leaf += 1
        first_key = self._leaf_first_key
        self._new_leaf()
        self._add_child(0, first_key, pgno)

    def _write_overflow(self, value):
        """Write ``value`` to a run of overflow pages; the first one's number."""
        count = _overflow_pages(len(value), self.page_size)
        pgno = self._new_pgno(count)
        self._write(_OVERFLOW_HEADER.pack(pgno, 0, _P_OVERFLOW, count))
        self._write(value)
        self._write(bytes(count * self.page_size - _HEADER_SIZE - len(value)))
        self._tree.overflow += count
        return pgno

    def _add_child(self, level, key, pgno):
        """Add page ``pgno``, whose subtree starts at ``key``, to branch level
        ``level`` (0: the parents of the leaves)."""
        if level == len(self._levels):
            self._levels.append(_BranchLevel(self.page_size))
        branch = self._levels[level]
        if branch.nodes and not branch.fits(key):
            # The full page's last node moves to the new page, so that no branch
            # page but the root ever has a single child (LMDB rebalances such a
            # page, and some of its code assumes a sibling exists).
            carried = branch.nodes.pop()
            self._write_branch(level, branch.nodes)
            branch.restart_with([carried])
        branch.add(key, pgno)

    def _write_branch(self, level, nodes):
        pgno = self._new_pgno()
        self._write(_branch_page(pgno, nodes, self.page_size))
        self._tree.branch += 1
        self._levels[level].pages_written += 1
        self._add_child(level + 1, nodes[0][0], pgno)

    def _finish_tree(self):
        tree = self._tree
        if self._leaf_offsets:
            self._write_leaf()
        level = 0
        while level < len(self._levels):
            branch = self._levels[level]
            if branch.pages_written == 0 and len(branch.nodes) == 1:
                tree.root = branch.nodes[0][1]
                tree.depth = level + 1
                break
            self._write_branch(level, branch.nodes)
            branch.restart_with([])
            level += 1

    def _write_meta_pages(self):
        last_pgno = self._next_pgno - 1
        file_size = (last_pgno + 1) * self.page_size
        map_size = max(_DEFAULT_MAP_SIZE, -(-file_size // _DEFAULT_MAP_SIZE)
                       * _DEFAULT_MAP_SIZE)
        empty = _Tree()
        metas = (_meta_page(0, self.page_size, map_size, empty, 1, 0)
                 + _meta_page(1, self.page_size, map_size, self._tree, last_pgno, 1))
        try:
            self._file.flush()
            self._file.seek(0)
        except OSError as e:
            self._fail(f"cannot write {_TEMP_NAME}", e)
        self._write(metas)


def _as_bytes(data, what):
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data) if what == "key" else data
    raise TypeError(f"LMDB {what} must be bytes, not {type(data).__name__}")
