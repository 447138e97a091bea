"""Caffe's ``db::DB``: the LMDB and LevelDB databases that Caffe's ``convert_imageset``
and ``convert_*_data`` tools write, read by pure-Python readers (``caffelite.io.lmdb``,
``caffelite.io.leveldb``: nothing to install, nothing locked or written) and written
by pure-Python writers (``open_writer``).  ``Cursor`` walks the values in key order
and starts again at the first key after the last one, as the data layers' readers do."""
import logging
import os

logger = logging.getLogger("caffelite")

LEVELDB, LMDB = 0, 1                # DataParameter.DB
BACKEND_NAMES = {LEVELDB: "LEVELDB", LMDB: "LMDB"}
BACKENDS_BY_NAME = {"lmdb": LMDB, "leveldb": LEVELDB}     # the tools' db_type / --backend


class DBError(OSError):
    """A database that cannot be opened or read; the message names it."""


DATA_PARAM_SWITCH = "set data_param {{ backend: {name} }}"


def open_db(source, backend, switch=DATA_PARAM_SWITCH):
    """A reader (``items()``, ``close()``) of the database at ``source``.  ``switch``
    tells how to choose the other backend, where the database looks like one (``{name}``:
    LMDB or LEVELDB, ``{flag}``: lmdb or leveldb)."""
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
        reader = reader_class(source)
    except OSError as e:
        hint = _other_backend_hint(source, backend, switch)
        raise DBError(f"{e}{hint}") from None
    logger.info("Opened %s %s", BACKEND_NAMES[backend].lower(), source)
    return reader


def _other_backend_hint(source, backend, switch):
    """A LevelDB opened as LMDB (or the reverse) is the usual mistake: say so."""
    looks_lmdb = os.path.isfile(os.path.join(source, "data.mdb")) or (
        os.path.isfile(source) and source.endswith(".mdb"))
    looks_leveldb = os.path.isfile(os.path.join(source, "CURRENT"))
    if backend == LEVELDB and looks_lmdb:
        return f" (it looks like an LMDB database: {switch.format(name='LMDB', flag='lmdb')})"
    if backend == LMDB and looks_leveldb:
        return (f" (it looks like a LevelDB database: "
                f"{switch.format(name='LEVELDB', flag='leveldb')})")
    return ""


def without_records(reader, source):
    """Why a database gave no record: empty, or (LevelDB) every record lost to a log
    tail that failed its checksum."""
    dropped = getattr(reader, "dropped", None)
    if dropped:
        return f"database '{source}' has no readable record: {dropped[0]}"
    return f"database '{source}' is empty"


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
            raise DBError(without_records(self.reader, self.source))

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


def open_writer(path, backend_name):
    """A new database at ``path`` (``put(key, value)``, ``close()``, a context
    manager), as Caffe's db::GetDB(name)->Open(path, NEW): "lmdb" or "leveldb"."""
    kind = BACKENDS_BY_NAME.get(str(backend_name).lower())
    if kind is None:
        raise DBError(f"Unknown db backend '{backend_name}' (known: lmdb, leveldb)")
    if kind == LMDB:
        from .lmdb_writer import LMDBWriter as writer_class
    else:
        from .leveldb_writer import LevelDBWriter as writer_class
    writer = writer_class(path)
    logger.info("Opened %s %s", BACKEND_NAMES[kind].lower(), path)
    return writer


def make_database_dir(path, kind, fail):
    """Create ``path`` for a new ``kind`` database, or take an existing empty
    directory (never one holding anything); True when this call made it.
    ``fail(what, error=None)`` raises the writer's error."""
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        pass
    except OSError as e:
        fail("cannot create the directory", e)
    if not os.path.isdir(path):
        fail("exists and is not a directory")
    try:
        names = os.listdir(path)
    except OSError as e:
        fail("cannot list the directory", e)
    if names:
        fail(f"the directory is not empty (holds {sorted(names)[0]!r}); a new {kind} "
             f"database is written to a new or empty directory")
    return False


def remove_made_dir(path, made):
    """Remove the directory a writer made (if it is empty again)."""
    if made:
        try:
            os.rmdir(path)
        except OSError:
            pass


class NewDatabaseWriter:
    """What the LMDB and LevelDB writers share: a new (or empty) directory, made by
    ``_make_dir`` and removed again by ``_remove_dir`` when it was made here, and a
    ``with`` block that closes on success and aborts on an exception."""
    kind = "?"
    error_class = OSError

    def _require_open(self):
        if self._file is None:
            raise ValueError(f"{self.kind} writer of '{self.path}' is closed")

    def _fail(self, what, error=None):
        detail = f": {error.strerror or error}" if error is not None else ""
        raise self.error_class(f"cannot write {self.kind} '{self.path}': {what}{detail}") \
            from None

    def _make_dir(self):
        """Create the directory; True when this call made it."""
        return make_database_dir(self.path, self.kind, self._fail)

    def _remove_dir(self):
        remove_made_dir(self.path, self._made_dir)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def sync_dir(path):
    """Make the rename durable; not every system can open a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
