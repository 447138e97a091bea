"""caffelite.io.leveldb_writer: the pure-Python LevelDB writer, against plyvel's LevelDB.

The oracle tests check that LevelDB opens what the writer wrote (also with
paranoid_checks), reads every entry, and goes on writing, deleting and compacting;
and that for the same WriteBatches the writer's log is byte for byte the log LevelDB
writes.  caffelite's own LevelDBReader reads the output too.
"""
import os
import random
import struct
import tracemalloc

import pytest

from caffelite.io import leveldb
from caffelite.io.leveldb import LevelDBReader
from caffelite.io.crc32c import crc32c, masked_crc
from caffelite.io.leveldb_writer import LevelDBWriteError, LevelDBWriter

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def oracle():
    """plyvel's LevelDB, or a skip for the test that needs it."""
    return pytest.importorskip("plyvel")


def write(path, pairs, **options):
    with LevelDBWriter(path, **options) as writer:
        for key, value in pairs:
            writer.put(key, value)
    return path


def expected(pairs):
    """The entries LevelDB should hold after ``pairs``: sorted, later put wins."""
    return sorted(dict(pairs).items())


def read_back(path):
    with LevelDBReader(path) as reader:
        return list(reader.items())


def check_with_plyvel(path, entries):
    """plyvel opens ``path`` (default options, then paranoid checks), iterates
    exactly ``entries`` and finds each key; then it writes, deletes and compacts,
    and everything reads back after a reopen."""
    plyvel = oracle()
    for options in ({}, {"paranoid_checks": True}):
        db = plyvel.DB(str(path), **options)
        try:
            assert list(db.iterator()) == entries
            for key, value in entries:
                assert db.get(key) == value
        finally:
            db.close()
    live = dict(entries)
    db = plyvel.DB(str(path), paranoid_checks=True)
    try:
        for i in range(50):
            key = b"added-%03d" % i
            db.put(key, key * 3)
            live[key] = key * 3
        for key, _ in entries[::3]:
            db.delete(key)
            del live[key]
        db.delete(b"added-007")
        del live[b"added-007"]
        db.compact_range()
    finally:
        db.close()
    db = plyvel.DB(str(path), paranoid_checks=True)
    try:
        assert list(db.iterator()) == sorted(live.items())
    finally:
        db.close()
    assert read_back(path) == sorted(live.items())


def plyvel_log(path, batches):
    """The write-ahead log LevelDB writes for ``batches`` (lists of puts), each
    written as one WriteBatch to a new database whose write buffer never fills."""
    plyvel = oracle()
    db = plyvel.DB(str(path), create_if_missing=True, write_buffer_size=1 << 30)
    try:
        for batch in batches:
            with db.write_batch() as wb:
                for key, value in batch:
                    wb.put(key, value)
    finally:
        db.close()
    logs = [name for name in os.listdir(path) if name.endswith(".log")]
    assert len(logs) == 1
    with open(os.path.join(path, logs[0]), "rb") as f:
        return f.read()


def log_bytes(path):
    with open(os.path.join(path, "000002.log"), "rb") as f:
        return f.read()


def varint_size(n):
    return max(1, (n.bit_length() + 6) // 7)


def value_size_leaving(tail, key):
    """Size of a value whose one-put batch, written from a block's start, leaves
    ``tail`` bytes of the block."""
    for size in range(BLOCK):
        payload = 12 + 1 + varint_size(len(key)) + len(key) + varint_size(size) + size
        if HEADER + payload == BLOCK - tail:
            return size
    raise AssertionError(f"no value size leaves {tail} bytes")


def fragments(log):
    """(offset, type, payload length) of each fragment, checking every CRC and
    that a block tail under a header is zeros."""
    out, pos = [], 0
    while pos < len(log):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            assert log[pos:pos + left] == bytes(left)
            pos += left
            continue
        crc, length, kind = struct.unpack_from("<IHB", log, pos)
        assert HEADER + length <= left
        assert crc == masked_crc(log[pos + 6:pos + HEADER + length])
        out.append((pos, kind, length))
        pos += HEADER + length
    return out


# ------------------------------------------------------------------------- CRC
def reference_crc32c(data, crc=0):
    """CRC-32C by its definition, bit by bit (reflected polynomial 0x82F63B78)."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_equals_the_definition_on_random_data():
    """The folding CRC against the bit loop (sizes around its switch-over and
    folding levels), and against the byte-table loop on long data."""
    from caffelite.io.crc32c import _crc32c_bytewise
    rng = random.Random(5)
    for size in list(range(0, 300, 7)) + [255, 256, 257, 511, 4096, 32761, 32768, 40000]:
        data = rng.randbytes(size)
        start = rng.getrandbits(32)
        assert crc32c(data) == reference_crc32c(data), size
        assert crc32c(data, start) == reference_crc32c(data, start), size
    for size in (100_003, 1 << 20, 3_000_001):
        data = rng.randbytes(size)
        start = rng.getrandbits(32)
        assert crc32c(data, start) == _crc32c_bytewise(data, start), size
    data = rng.randbytes(70_000)
    assert crc32c(data[40_000:], crc32c(data[:40_000])) == crc32c(data)
    assert crc32c(memoryview(data)[5:50_005]) == crc32c(data[5:50_005])
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(bytes(32)) == 0x8A9136AA      # RFC 3720 test pattern


# ------------------------------------------------------------------------- layout
def test_layout_of_the_directory(tmp_path):
    path = write(tmp_path / "db", [(b"b", b"2"), (b"a", b"1"), (b"b", b"3")],
                 batch_size=2)
    assert sorted(os.listdir(path)) == ["000002.log", "CURRENT", "MANIFEST-000001"]
    assert (path / "CURRENT").read_bytes() == b"MANIFEST-000001\n"
    edits = list(leveldb._log_records(str(path / "MANIFEST-000001"), True))
    assert len(edits) == 1
    fields, pos, edit = [], 0, edits[0]
    while pos < len(edit):
        tag, pos = leveldb._varint(edit, pos)
        if tag == 1:
            value, pos = leveldb._length_prefixed(edit, pos)
        else:
            value, pos = leveldb._varint(edit, pos)
        fields.append((tag, value))
    assert fields == [(1, b"leveldb.BytewiseComparator"), (2, 2), (3, 3), (4, 3)]
    batches = list(leveldb._log_records(str(path / "000002.log"), True))
    assert batches == [
        struct.pack("<QI", 1, 2) + b"\x01\x01b\x012" + b"\x01\x01a\x011",
        struct.pack("<QI", 3, 1) + b"\x01\x01b\x013"]
    assert read_back(path) == [(b"a", b"1"), (b"b", b"3")]


def test_empty_database(tmp_path):
    path = write(tmp_path / "db", [])
    assert (path / "000002.log").read_bytes() == b""
    assert read_back(path) == []
    check_with_plyvel(path, [])


def test_one_entry(tmp_path):
    path = write(tmp_path / "db", [(b"key", b"value")])
    assert read_back(path) == [(b"key", b"value")]
    check_with_plyvel(path, [(b"key", b"value")])


def test_block_tails(tmp_path):
    """A first record leaving 0..20 bytes of its block: tails under 7 bytes are
    zeros, a 7-byte tail gets an empty FIRST fragment, and the next batch's header
    may be split across fragments (written as zeros, then patched)."""
    try:
        import plyvel
    except ImportError:
        plyvel = None
    big = bytes(range(256)) * 160  # 40 KB: the second batch spans blocks
    for tail in range(21):
        pairs = [(b"k", b"v" * value_size_leaving(tail, b"k")), (b"x", big),
                 (b"y", b"z" * 100)]
        path = write(tmp_path / f"db{tail}", pairs, batch_size=1)
        log = log_bytes(path)
        found = fragments(log)
        assert found[0] == (0, FULL, BLOCK - tail - HEADER)
        if tail < HEADER:
            assert log[BLOCK - tail:BLOCK] == bytes(tail)
            assert found[1] == (BLOCK, FIRST, BLOCK - HEADER)
        else:
            assert found[1] == (BLOCK - tail, FIRST, tail - HEADER)
        assert [kind for _, kind, _ in found[2:]] == [MIDDLE] * (len(found) - 4) \
            + [LAST, FULL]
        assert read_back(path) == expected(pairs)
        if plyvel is not None:
            assert log == plyvel_log(tmp_path / f"plyvel{tail}", [[p] for p in pairs])


@pytest.mark.parametrize("batch_size", [1, 2, 1000])
def test_log_is_the_one_leveldb_writes(tmp_path, batch_size):
    rng = random.Random(batch_size)
    pairs = []
    for tail in range(21):
        pairs.append((b"t%02d" % tail, bytes(value_size_leaving(tail, b"t00"))))
        pairs.append((rng.randbytes(rng.randrange(1, 40)),
                      rng.randbytes(rng.choice([0, 1, 3000, 40_000]))))
    pairs += [(b"dup", b"1"), (b"dup", b"2"), (b"big", rng.randbytes(1 << 20))]
    ours = log_bytes(write(tmp_path / "ours", pairs, batch_size=batch_size))
    batches = [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]
    assert ours == plyvel_log(tmp_path / "theirs", batches)


# ------------------------------------------------------------------------- contents
def test_many_entries_across_batches(tmp_path):
    pairs = [(b"%08d" % i, b"value-%d" % (i * 7)) for i in range(20_000)]
    path = write(tmp_path / "db", pairs)
    assert len(list(leveldb._log_records(str(path / "000002.log"), True))) == 20
    assert read_back(path) == pairs
    check_with_plyvel(path, pairs)


def test_value_sizes(tmp_path):
    rng = random.Random(3)
    pairs = [(b"size-%07d" % size, rng.randbytes(size))
             for size in (0, 3000, 40_000, 100_000, 1 << 20, 1, 32_000)]
    for batch_size in (1, 3, 1000):
        path = write(tmp_path / f"db{batch_size}", pairs, batch_size=batch_size)
        assert read_back(path) == expected(pairs)
        check_with_plyvel(path, expected(pairs))


def test_binary_out_of_order_and_duplicate_keys(tmp_path):
    rng = random.Random(9)
    pairs = [(rng.randbytes(rng.randrange(0, 30)), rng.randbytes(rng.randrange(300)))
             for _ in range(3000)]
    pairs += [(b"\x00", b"zero"), (b"\xff" * 9, b"high"), (b"", b"empty key")]
    pairs += [(key, b"again") for key, _ in pairs[100:400:7]]
    pairs += [(b"\x00", b"zero again")]
    rng.shuffle(pairs[:1000])
    path = write(tmp_path / "db", pairs, batch_size=250)
    assert read_back(path) == expected(pairs)
    check_with_plyvel(path, expected(pairs))


def test_bytes_like_keys_and_values(tmp_path):
    value = bytearray(b"abc")
    path = tmp_path / "db"
    with LevelDBWriter(path) as writer:
        writer.put(bytearray(b"k1"), value)
        value[0] = ord("X")  # the writer copied the value already
        writer.put(memoryview(b"k2"), memoryview(b"vv"))
        assert len(writer) == 2
    assert read_back(path) == [(b"k1", b"abc"), (b"k2", b"vv")]


def test_streams_a_batch_as_it_fills(tmp_path):
    value = bytes(1 << 20)
    tracemalloc.start()
    try:
        writer = LevelDBWriter(tmp_path / "db")
        for i in range(24):
            writer.put(b"%02d" % i, value)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    assert os.path.getsize(tmp_path / "db" / "000002.log") > 16 << 20
    assert not os.path.exists(tmp_path / "db" / "CURRENT")
    writer.close()
    assert len(list(leveldb._log_records(str(tmp_path / "db" / "000002.log"),
                                         True))) == 1
    assert read_back(tmp_path / "db") == [(b"%02d" % i, value) for i in range(24)]


# ------------------------------------------------------------------------- refusals
def test_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "keep.txt").write_bytes(b"mine")
    with pytest.raises(LevelDBWriteError, match="not empty") as info:
        LevelDBWriter(tmp_path / "db")
    assert str(tmp_path / "db") in str(info.value)
    assert os.listdir(tmp_path / "db") == ["keep.txt"]
    assert (tmp_path / "db" / "keep.txt").read_bytes() == b"mine"
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(LevelDBWriteError, match="not a directory"):
        LevelDBWriter(tmp_path / "file")


def test_writes_into_an_existing_empty_directory(tmp_path):
    (tmp_path / "db").mkdir()
    write(tmp_path / "db", [(b"a", b"b")])
    assert read_back(tmp_path / "db") == [(b"a", b"b")]


def test_refuses_str_keys_and_values_and_bad_batch_sizes(tmp_path):
    with LevelDBWriter(tmp_path / "db") as writer:
        with pytest.raises(TypeError, match="key must be bytes"):
            writer.put("key", b"value")
        with pytest.raises(TypeError, match="value must be bytes"):
            writer.put(b"key", "value")
        assert len(writer) == 0
    assert read_back(tmp_path / "db") == []
    for size in (0, -1, 1.5, True, 1 << 32):
        with pytest.raises(ValueError, match="batch size"):
            LevelDBWriter(tmp_path / "other", batch_size=size)
        assert not os.path.exists(tmp_path / "other")


def test_closed_writer(tmp_path):
    writer = LevelDBWriter(tmp_path / "db")
    writer.put(b"a", b"1")
    writer.close()
    writer.close()
    writer.abort()  # after close: the database stays
    with pytest.raises(ValueError, match="closed"):
        writer.put(b"b", b"2")
    assert read_back(tmp_path / "db") == [(b"a", b"1")]


def test_failure_inside_with_removes_what_was_written(tmp_path):
    with pytest.raises(RuntimeError):
        with LevelDBWriter(tmp_path / "made", batch_size=10) as writer:
            for i in range(95):
                writer.put(b"%03d" % i, bytes(5000))
            assert not os.path.exists(tmp_path / "made" / "CURRENT")
            raise RuntimeError("conversion failed")
    assert not os.path.exists(tmp_path / "made")
    (tmp_path / "given").mkdir()
    with pytest.raises(RuntimeError):
        with LevelDBWriter(tmp_path / "given") as writer:
            writer.put(b"a", b"1")
            raise RuntimeError("conversion failed")
    assert os.listdir(tmp_path / "given") == []


def test_no_current_before_close(tmp_path):
    writer = LevelDBWriter(tmp_path / "db", batch_size=1)
    writer.put(b"a", b"1")
    assert sorted(os.listdir(tmp_path / "db")) == ["000002.log"]
    writer.abort()
    assert not os.path.exists(tmp_path / "db")
