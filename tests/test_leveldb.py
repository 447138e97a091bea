"""caffelite.io.leveldb: the pure-Python LevelDB reader, against plyvel's LevelDB.

Each oracle test writes a database with plyvel, takes plyvel's own iteration as the
expected entries while the writer still has it open, closes it (which leaves the
memtable in the write-ahead log, as Caffe's tools do) and reads it back.
"""
import os
import random
import shutil
import struct

import pytest

from caffelite.io import leveldb
from caffelite.io.leveldb import LevelDBError, LevelDBReader
from caffelite.io.snappy import SnappyError, decompress
from caffelite.io.wire import varint



def oracle():
    """plyvel's LevelDB, or a skip for the test that needs it."""
    return pytest.importorskip("plyvel")


def read_all(path):
    with LevelDBReader(path) as reader:
        return list(reader.items())


def write_db(path, ops, compact=False, **options):
    """Apply ``ops`` ((key, value) puts, (key, None) deletes) through plyvel; the
    entries plyvel itself sees before closing."""
    db = oracle().DB(str(path), create_if_missing=True, **options)
    for key, value in ops:
        if value is None:
            db.delete(key)
        else:
            db.put(key, value)
    if compact:
        db.compact_range()
    expected = list(db.iterator())
    db.close()
    return expected


def files(path, suffix):
    return sorted(name for name in os.listdir(path) if name.endswith(suffix))


def block_compressions(table):
    """The compression type byte of every data block of a table file."""
    handle = leveldb._index_handle(table)
    with open(table, "rb") as f:
        index = leveldb._read_block(f, table, *handle)
        kinds = []
        for _, entry in leveldb._block_entries(index):
            offset, pos = leveldb._varint(entry, 0)
            length, _ = leveldb._varint(entry, pos)
            f.seek(offset + length)
            kinds.append(f.read(1)[0])
    return kinds


def numbered(n, value=b"value-%d"):
    """Puts of keys key000000, key000001, ...; a %d in ``value`` becomes the number."""
    return [(b"key%06d" % i, value.replace(b"%d", b"%d" % i)) for i in range(n)]


# ------------------------------------------------------------------------- snappy
def literal(data):
    """A literal element, with the shortest length encoding."""
    n = len(data) - 1
    if n < 60:
        return bytes([n << 2]) + data
    width = (n.bit_length() + 7) // 8
    return bytes([(59 + width) << 2]) + n.to_bytes(width, "little") + data


def literal_wide(data, width):
    """A literal whose length takes ``width`` extra bytes even when fewer would do."""
    return bytes([(59 + width) << 2]) + (len(data) - 1).to_bytes(width, "little") + data


def copy1(offset, length):
    assert 4 <= length <= 11 and offset < 2048
    return bytes([(offset >> 8) << 5 | (length - 4) << 2 | 1, offset & 0xFF])


def copy2(offset, length):
    return bytes([(length - 1) << 2 | 2]) + offset.to_bytes(2, "little")


def copy4(offset, length):
    return bytes([(length - 1) << 2 | 3]) + offset.to_bytes(4, "little")


def stream(expected_length, *elements):
    return varint(expected_length) + b"".join(elements)


def test_snappy_literals_of_each_length_width():
    assert decompress(stream(0)) == b""
    assert decompress(stream(5, literal(b"hello"))) == b"hello"
    for size, width in ((60, 0), (61, 1), (256, 1), (257, 2), (70000, 3)):
        data = bytes(random.Random(size).randrange(256) for _ in range(size))
        assert decompress(stream(size, literal(data))) == data
        if width:
            assert len(literal(data)) == 1 + width + size
    for width in (1, 2, 3, 4):
        assert decompress(stream(3, literal_wide(b"abc", width))) == b"abc"


def test_snappy_copies():
    head = b"0123456789abcdef"
    assert decompress(stream(24, literal(head), copy1(16, 8))) == head + b"01234567"
    assert decompress(stream(21, literal(head), copy1(5, 5))) == head + b"bcdef"
    far = bytes(range(256)) * 8  # 2048 bytes: the offset 2000 needs the high bits
    assert decompress(stream(2058, literal(far), copy1(2000, 10))) == far + far[48:58]
    assert decompress(stream(2112, literal(far), copy2(2048, 64))) == far + far[:64]
    assert decompress(stream(2049, literal(far), copy2(1, 1))) == far + far[-1:]
    big = bytes(random.Random(0).randrange(256) for _ in range(70000))
    assert decompress(stream(70033, literal(big), copy4(70000, 33))) == big + big[:33]


def test_snappy_overlapping_copies_repeat_a_pattern():
    assert decompress(stream(11, literal(b"a"), copy1(1, 10))) == b"a" * 11
    assert decompress(stream(67, literal(b"abc"), copy2(3, 64))) == b"abc" * 22 + b"a"
    assert decompress(stream(9, literal(b"xyz12"), copy4(2, 4))) == b"xyz121212"
    data = stream(12, literal(b"ab"), copy1(2, 5), copy1(3, 5))
    assert decompress(data) == b"abababa" + b"abababa"[-3:] + b"ab"


@pytest.mark.parametrize("data, message", [
    (b"", "preamble"),
    (b"\xff\xff\xff\xff\xff\xff", "preamble"),
    (stream(4, b"\x0c" + b"ab"), "past the end"),  # literal of 4, 2 bytes there
    (stream(4, b"\xf0\x05"), "past the end"),  # 2-byte literal length cut off
    (stream(5, literal(b"a"), b"\x01"), "past the end"),  # copy-1 offset cut off
    (stream(5, literal(b"a"), b"\x02\x01"), "past the end"),  # copy-2 offset cut off
    (stream(5, literal(b"a"), b"\x03\x01\x00"), "past the end"),  # copy-4 cut off
    (stream(5, literal(b"a"), copy1(0, 4)), "offset 0"),
    (stream(6, literal(b"ab"), copy2(3, 4)), "offset 3"),
    (stream(3, literal(b"ab")), "preamble says 3"),
    (stream(1, literal(b"ab")), "preamble says 1"),
])
def test_snappy_malformed_streams(data, message):
    with pytest.raises(SnappyError, match=message):
        decompress(data)


# ------------------------------------------------------------------------- plyvel oracle
def test_plyvel_compresses_with_snappy_when_asked(tmp_path):
    ops = numbered(2000, b"abcabcabc" * 30)
    for compression, kind in (("snappy", 1), (None, 0)):
        path = tmp_path / str(compression)
        expected = write_db(path, ops, compact=True, compression=compression,
                            block_size=4096)
        (table,) = files(path, ".ldb")
        kinds = block_compressions(str(path / table))
        assert len(kinds) > 10 and set(kinds) == {kind}
        assert read_all(path) == expected == ops


def test_empty_database(tmp_path):
    assert write_db(tmp_path / "db", []) == []
    assert read_all(tmp_path / "db") == []
    assert write_db(tmp_path / "db2", [(b"a", b"1"), (b"a", None)]) == []
    assert read_all(tmp_path / "db2") == []


@pytest.mark.parametrize("compression", ["snappy", None])
@pytest.mark.parametrize("compact", [False, True], ids=["log", "tables"])
def test_entries_in_the_log_or_in_tables(tmp_path, compression, compact):
    rng = random.Random(1)
    ops = [(b"%05d" % rng.randrange(3000), b"v%d" % i * rng.randrange(1, 40))
           for i in range(4000)]
    ops += [(b"%05d" % rng.randrange(3000), None) for _ in range(500)]
    path = tmp_path / "db"
    expected = write_db(path, ops, compact=compact, compression=compression)
    assert files(path, ".ldb") if compact else not files(path, ".ldb")
    reader = LevelDBReader(path)
    assert list(reader.items()) == expected
    assert list(reader.items()) == expected  # each call starts from the first key
    reader.close()


def test_deletions_in_tables_hide_older_tables_and_the_log_overrides(tmp_path):
    path = tmp_path / "db"
    write_db(path, numbered(1000, b"first-%d"), compact=True)
    later = [(b"key%06d" % i, None) for i in range(0, 1000, 3)]
    later += [(b"key%06d" % i, b"second") for i in range(1, 1000, 5)]
    write_db(path, later)
    # Reopening recovers that log into a level-0 table above the compacted one.
    last = [(b"key%06d" % i, b"third") for i in range(0, 1000, 7)]
    last += [(b"key%06d" % i, None) for i in range(2, 1000, 11)]
    expected = write_db(path, last)
    with LevelDBReader(path) as reader:
        levels = reader._levels
        assert len(levels) >= 2
        deletions = [t for t in levels[0] for _, negative_tag, _ in
                     leveldb._table_entries(*t) if -negative_tag & 0xFF == 0]
        assert deletions
        assert list(reader.items()) == expected
    assert len(expected) == 701


def test_many_tables_over_several_levels(tmp_path):
    rng = random.Random(2)
    ops = []
    for i in range(20000):
        key = b"k%05d" % rng.randrange(6000)
        ops.append((key, None) if rng.random() < 0.15 else (key, b"%d" % i * 20))
    path = tmp_path / "db"
    # A layout that does not hang on LevelDB's background compactions: the first 12000
    # operations compacted to the bottom, then three batches each left in the log (the
    # 4 MiB write buffer flushes none) and written as a level-0 table by the next open;
    # three level-0 tables start no compaction (four do).
    write_db(path, ops[:12000], compact=True, block_size=1024)
    for batch in (ops[12000:15000], ops[15000:18000], ops[18000:]):
        write_db(path, batch, block_size=1024)
    expected = write_db(path, [])
    with LevelDBReader(path) as reader:
        assert len(reader._levels) >= 2 and len(reader._levels[0]) == 3
        assert sum(len(tables) for tables in reader._levels.values()) >= 4
        assert list(reader.items()) == expected


@pytest.mark.parametrize("block_size, restart", [(256, 1), (1024, 2), (65536, 16)])
def test_block_sizes_and_restart_intervals(tmp_path, block_size, restart):
    ops = numbered(3000, b"payload-%d" * 5)
    path = tmp_path / "db"
    expected = write_db(path, ops, compact=True, block_size=block_size,
                        block_restart_interval=restart)
    assert read_all(path) == expected == ops


@pytest.mark.parametrize("compact", [False, True], ids=["log", "tables"])
def test_long_shared_prefixes_binary_keys_and_empty_values(tmp_path, compact):
    rng = random.Random(3)
    prefix = b"/data/imagenet/train/n01440764/" * 8
    ops = [(prefix + b"%08d.JPEG" % i, b"") for i in range(500)]
    ops += [(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))),
             bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300))))
            for _ in range(800)]
    ops += [(b"", b"the empty key"), (b"\x00", b""), (b"\xff" * 200, b"\x00" * 200)]
    path = tmp_path / "db"
    expected = write_db(path, ops, compact=compact, block_size=512)
    assert len(expected) > 1200
    assert read_all(path) == expected


@pytest.mark.parametrize("compact", [False, True], ids=["log", "tables"])
def test_large_values_span_log_blocks(tmp_path, compact):
    rng = random.Random(4)
    ops = [(b"k%d" % i, bytes(rng.randrange(256) for _ in range(size)))
           for i, size in enumerate([40_000, 100_000, 5, 32_761, 32_768, 70_000])]
    path = tmp_path / "db"
    expected = write_db(path, ops, compact=compact)
    assert (os.path.getsize(path / files(path, ".log")[0]) > 200_000) != compact
    assert read_all(path) == expected


def test_caffe_style_write_batches(tmp_path):
    """convert_imageset commits 1000 puts per WriteBatch, with Caffe's options."""
    rng = random.Random(5)
    path = tmp_path / "db"
    plyvel = oracle()
    db = plyvel.DB(str(path), create_if_missing=True, block_size=65536,
                   write_buffer_size=268435456)
    for start in range(0, 3000, 1000):
        with db.write_batch() as batch:
            for i in range(start, start + 1000):
                batch.put(b"%08d_img.png" % i, bytes(rng.randrange(256)
                                                     for _ in range(100)) * 30)
    expected = list(db.iterator())
    db.close()
    assert read_all(path) == expected
    db = plyvel.DB(str(path), block_size=65536)
    db.compact_range()
    db.close()
    assert files(path, ".ldb") and read_all(path) == expected


# ------------------------------------------------------------------------- log tails
def log_path(path):
    (name,) = files(path, ".log")
    return path / name


def plyvel_recovery(path, tmp_path):
    """What plyvel's LevelDB recovers from a copy of the database."""
    copy = tmp_path / "recovered"
    shutil.copytree(path, copy)
    db = oracle().DB(str(copy))
    entries = list(db.iterator())
    db.close()
    return entries


@pytest.mark.parametrize("cut", [1, 5, 8, 3000, 40_000])
def test_torn_log_tail_is_dropped_as_leveldb_recovery_does(tmp_path, cut):
    path = tmp_path / "db"
    ops = numbered(40, b"x" * 1000) + [(b"last", b"y" * 50_000)]
    expected = write_db(path, ops)
    log = log_path(path)
    with open(log, "r+b") as f:
        f.truncate(os.path.getsize(log) - cut)
    got = read_all(path)
    assert got == plyvel_recovery(path, tmp_path)
    assert got == [entry for entry in expected if entry[0] != b"last"]


def test_garbage_in_the_last_log_block_is_dropped(tmp_path):
    path = tmp_path / "db"
    expected = write_db(path, numbered(200, b"v" * 300))  # 2 blocks of log
    log = log_path(path)
    with open(log, "r+b") as f:
        f.seek(os.path.getsize(log) - 100)
        f.write(b"\x5a" * 50)
    got = read_all(path)
    assert got == plyvel_recovery(path, tmp_path)
    assert 100 < len(got) < len(expected) and got == expected[:len(got)]


def test_a_broken_record_before_the_last_log_block_is_an_error(tmp_path):
    path = tmp_path / "db"
    write_db(path, numbered(200, b"v" * 300))
    with open(log_path(path), "r+b") as f:
        f.seek(6)  # the type of the first record
        f.write(b"\x09")
    with pytest.raises(LevelDBError, match=r"\.log: record at offset 0: unknown record type 9"):
        LevelDBReader(path)


# ------------------------------------------------------------------------- errors
def test_missing_directory_and_missing_current(tmp_path):
    with pytest.raises(LevelDBError, match="no such directory") as info:
        LevelDBReader(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LevelDBError, match=r"empty/CURRENT: missing"):
        LevelDBReader(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "CURRENT").write_bytes(b"MANIFEST-000009\n")
    with pytest.raises(LevelDBError, match=r"bad/MANIFEST-000009: missing"):
        LevelDBReader(tmp_path / "bad")


def compacted(tmp_path, **options):
    path = tmp_path / "db"
    write_db(path, numbered(500), compact=True, **options)
    (table,) = files(path, ".ldb")
    return path, path / table


def test_corrupted_footer_magic(tmp_path):
    path, table = compacted(tmp_path)
    with open(table, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x00")
    with pytest.raises(LevelDBError, match=rf"{table.name}: bad table magic"):
        LevelDBReader(path)


def test_missing_table(tmp_path):
    path, table = compacted(tmp_path)
    table.unlink()
    with pytest.raises(LevelDBError, match=rf"{table.name}: missing \(a level-\d table"):
        LevelDBReader(path)


def test_unknown_compression_type(tmp_path):
    path, table = compacted(tmp_path, compression=None)
    with open(table, "r+b") as f:  # the index block's trailer precedes the footer
        f.seek(-48 - 5, os.SEEK_END)
        f.write(b"\x07")
    reader = LevelDBReader(path)
    with pytest.raises(LevelDBError, match=rf"{table.name}: .*unknown compression type 7"):
        list(reader.items())


def test_malformed_snappy_block(tmp_path):
    path, table = compacted(tmp_path, compression="snappy")
    assert block_compressions(str(table))[0] == 1
    with open(table, "r+b") as f:  # the first data block's uncompressed length
        f.write(b"\x01")
    reader = LevelDBReader(path)
    with pytest.raises(LevelDBError, match=rf"{table.name}: block at offset 0: "
                                           r"malformed snappy data"):
        list(reader.items())


def test_other_comparator(tmp_path):
    path = tmp_path / "db"
    db = oracle().DB(str(path), create_if_missing=True, comparator=lambda a, b: (a < b) - (a > b),
                     comparator_name=b"reversed")
    db.put(b"a", b"1")
    db.close()
    with pytest.raises(LevelDBError, match=r"MANIFEST-\d+: the database uses the "
                                           r"comparator 'reversed'"):
        LevelDBReader(path)


def test_closed_reader(tmp_path):
    path = tmp_path / "db"
    write_db(path, numbered(3))
    reader = LevelDBReader(path)
    reader.close()
    with pytest.raises(ValueError, match="closed"):
        list(reader.items())


def test_crc32c():
    from caffelite.io.crc32c import crc32c
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert struct.pack("<I", crc32c(bytes(32))) == bytes.fromhex("aa36918a")
