"""Caffe's ``db::DB`` for reading: the LMDB and LevelDB databases that Caffe's
``convert_imageset`` and ``convert_*_data`` tools write, read by pure-Python readers
(``caffelite.io.lmdb``, ``caffelite.io.leveldb``): nothing to install, nothing locked
or written.  ``Cursor`` walks the values in key order and starts again at the first
key after the last one, as the data layers' readers do."""
import os

LEVELDB, LMDB = 0, 1                # DataParameter.DB
BACKEND_NAMES = {LEVELDB: "LEVELDB", LMDB: "LMDB"}


class DBError(OSError):
    """A database that cannot be opened or read; the message names it."""


def open_db(source, backend):
    """A reader (``items()``, ``close()``) of the database at ``source``."""
    if backend not in BACKEND_NAMES:
        raise DBError(f"unknown database backend {backend} for '{source}' "
                      f"(known: 0 = LEVELDB, 1 = LMDB)")
    if not os.path.exists(source):
        raise DBError(f"cannot open {BACKEND_NAMES[backend]} database '{source}': "
                      f"no such file or directory")
    if backend == LMDB:
        from .lmdb import LMDBReader as reader_class
    else:
        from .leveldb import LevelDBReader as reader_class
    try:
        return reader_class(source)
    except OSError as e:
        hint = _other_backend_hint(source, backend)
        raise DBError(f"{e}{hint}") from None


def _other_backend_hint(source, backend):
    """A LevelDB opened as LMDB (or the reverse) is the usual mistake: say so."""
    looks_lmdb = os.path.isfile(os.path.join(source, "data.mdb")) or (
        os.path.isfile(source) and source.endswith(".mdb"))
    looks_leveldb = os.path.isfile(os.path.join(source, "CURRENT"))
    if backend == LEVELDB and looks_lmdb:
        return " (it looks like an LMDB database: set data_param { backend: LMDB })"
    if backend == LMDB and looks_leveldb:
        return " (it looks like a LevelDB database: set data_param { backend: LEVELDB })"
    return ""


class Cursor:
    """The values of a database in key order, endlessly: after the last key the
    cursor goes back to the first (Caffe's ``SeekToFirst`` on ``!valid()``).
    ``index`` counts the values passed since the last restart."""

    def __init__(self, reader, source):
        self.reader, self.source = reader, source
        self.index = 0
        self._restart()

    def _restart(self):
        self._items = iter(self.reader.items())
        self.index = 0
        self._value = self._read()
        if self._value is None:
            raise DBError(f"database '{self.source}' is empty")

    def _read(self):
        item = next(self._items, None)
        return None if item is None else item[1]

    def value(self):
        return self._value

    def next(self):
        self._value = self._read()
        self.index += 1
        if self._value is None:
            self._restart()

    def seek(self, index):
        """Position ``index`` after a restart (resuming a saved data position)."""
        self._restart()
        for _ in range(index):
            self.next()
            if self.index == 0:
                raise DBError(f"database '{self.source}' has fewer than {index + 1} "
                              f"entries; cannot resume at entry {index}")

    def close(self):
        self.reader.close()
