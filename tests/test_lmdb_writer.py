"""caffelite.io.lmdb_writer.LMDBWriter: databases the LMDB C library (through
py-lmdb, the oracle) reads, writes on, and counts as it counts the pages of the same
entries appended by itself; and caffelite's own LMDBReader reads back."""
import os
import random

import pytest

from caffelite.io.lmdb import LMDBReader
from caffelite.io.lmdb_writer import LMDBWriteError, LMDBWriter

PAGE = 4096
NODE_MAX = 2038             # a leaf node over this many bytes puts its value on
#                             overflow pages (4096-byte pages)


def write(path, items, **kw):
    with LMDBWriter(path, **kw) as writer:
        for key, value in items:
            writer.put(key, value)
        assert len(writer) == len(items)
    return path


def lmdb_oracle():
    return pytest.importorskip("lmdb")


def appended_stat(path, items):
    """py-lmdb's stat of the same entries appended in one transaction: LMDB then
    fills pages as this writer does, so the page counts must agree."""
    lmdb = lmdb_oracle()
    env = lmdb.open(str(path), map_size=1 << 31)
    try:
        with env.begin(write=True) as txn:
            for key, value in items:
                txn.put(key, value, append=True)
        return env.stat()
    finally:
        env.close()


def check(tmp_path, items, **kw):
    """Write ``items``; py-lmdb and LMDBReader must read exactly them back."""
    lmdb = lmdb_oracle()
    path = write(tmp_path / "db", items, **kw)
    assert sorted(os.listdir(path)) == ["data.mdb"]
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        stat, info = env.stat(), env.info()
        with env.begin() as txn:
            assert [(bytes(k), bytes(v)) for k, v in txn.cursor()] == items
            for key, value in items:
                assert txn.get(key) == value
            present = {key for key, _ in items}
            for key, _ in items[::7]:
                for absent in (key + b"\x00", key[:-1]):
                    if absent and absent not in present:
                        assert txn.get(absent) is None
    finally:
        env.close()
    size = os.path.getsize(path / "data.mdb")
    page_size = kw.get("page_size", PAGE)
    assert stat["entries"] == len(items)
    assert stat["psize"] == page_size
    assert info["last_pgno"] == size // page_size - 1
    assert info["map_size"] >= size
    assert info["last_txnid"] == 1
    if page_size == PAGE:
        assert stat == appended_stat(tmp_path / "appended", items)
    with LMDBReader(path) as reader:
        assert len(reader) == len(items)
        assert list(reader.items()) == items
    return stat


def test_empty_database(tmp_path):
    stat = check(tmp_path, [])
    assert stat["depth"] == 0 and stat["leaf_pages"] == 0
    assert os.path.getsize(tmp_path / "db" / "data.mdb") == 2 * PAGE


def test_one_entry(tmp_path):
    stat = check(tmp_path, [(b"a", b"xyz")])
    assert (stat["depth"], stat["leaf_pages"], stat["branch_pages"]) == (1, 1, 0)


def test_three_levels(tmp_path):
    items = [(b"%08d_train/n01440764/img_%d.JPEG" % (i, i), b"v%d" % i * 12)
             for i in range(20000)]
    stat = check(tmp_path, items)
    assert stat["depth"] == 3 and stat["branch_pages"] > 1


@pytest.mark.parametrize("key_size", [1, 10, 511])
def test_values_around_the_overflow_threshold(tmp_path, key_size):
    inline = NODE_MAX - 8 - key_size          # the largest value kept in the leaf
    sizes = [inline - 2, inline - 1, inline, inline + 1, inline + 2, 0, inline + 1]
    items = [(b"%03d" % i + b"k" * (key_size - 3) if key_size >= 3 else bytes([i]),
              bytes(random.Random(i).getrandbits(8) for _ in range(size)))
             for i, size in enumerate(sizes)]
    stat = check(tmp_path, items)
    assert stat["overflow_pages"] == 3


def test_value_sizes(tmp_path):
    rnd = random.Random(3)
    sizes = [0, 1, 3 * 1024, 100 * 1024, 0, 1 << 20, 5, PAGE - 16, PAGE - 15, 3 * 1024]
    items = [(b"%04d" % i, rnd.randbytes(size)) for i, size in enumerate(sizes)]
    stat = check(tmp_path, items)
    # a run of overflow pages holds a 16-byte page header, then the value
    assert stat["overflow_pages"] == 1 + 26 + 257 + 1 + 2 + 1


def test_long_binary_and_prefix_keys(tmp_path):
    rnd = random.Random(7)
    keys = {b"a", b"ab", b"abc", b"abc\x00", b"abc\x00\x00", b"\x00", b"\x00\x00",
            b"\xff", b"\xff" * 511, b"a" * 511, b"a" * 510}
    while len(keys) < 3000:
        keys.add(rnd.randbytes(rnd.choice([1, 2, 3, 40, 200, 400, 510, 511])))
    items = [(key, rnd.randbytes(rnd.choice([0, 7, 300, 1600, 2100, 9000])))
             for key in sorted(keys)]
    stat = check(tmp_path, items)
    assert stat["depth"] >= 3


def test_page_size_8192(tmp_path):
    items = [(b"%05d" % i, b"x" * (i * 37 % 12000)) for i in range(500)]
    check(tmp_path, items, page_size=8192)


def test_reopened_for_writing(tmp_path):
    """LMDB writes on the database (new keys, deletes, copy-on-write with the
    free-page database) and locks it: a fully valid environment."""
    lmdb = lmdb_oracle()
    rnd = random.Random(11)
    items = [(b"%06d" % i, rnd.randbytes(rnd.choice([10, 500, 3000]))) for i in
             range(6000)]
    path = write(tmp_path / "db", items)
    expected = dict(items)
    for round_ in range(3):
        env = lmdb.open(str(path), map_size=1 << 30)
        try:
            with env.begin(write=True) as txn:
                for i in range(round_, 8000, 3):
                    key = b"%06d" % i if i % 2 else b"%06dn" % i
                    value = b"r%d" % round_ * (i % 700)
                    txn.put(key, value)
                    expected[key] = value
                for key in sorted(expected)[round_::5]:
                    assert txn.delete(key)
                    del expected[key]
            with env.begin() as txn:
                assert [(bytes(k), bytes(v)) for k, v in txn.cursor()] == \
                    sorted(expected.items())
            assert env.info()["last_txnid"] == 2 + round_
        finally:
            env.close()
    assert sorted(os.listdir(path)) == ["data.mdb", "lock.mdb"]
    with LMDBReader(path) as reader:
        assert list(reader.items()) == sorted(expected.items())


def test_default_locking_reader(tmp_path):
    lmdb = lmdb_oracle()
    path = write(tmp_path / "db", [(b"k%d" % i, b"v") for i in range(10)])
    env = lmdb.open(str(path), readonly=True)
    try:
        with env.begin() as txn:
            assert txn.get(b"k7") == b"v"
    finally:
        env.close()
    assert sorted(os.listdir(path)) == ["data.mdb", "lock.mdb"]


def test_existing_empty_directory(tmp_path):
    (tmp_path / "db").mkdir()
    check(tmp_path, [(b"a", b"1"), (b"b", b"2")])


@pytest.mark.parametrize("keys", [[b"b", b"a"], [b"a", b"a"], [b"ab", b"a"]])
def test_refuses_keys_out_of_order(tmp_path, keys):
    with LMDBWriter(tmp_path / "db") as writer:
        writer.put(keys[0], b"1")
        with pytest.raises(ValueError, match="increasing"):
            writer.put(keys[1], b"2")
        assert len(writer) == 1
    with LMDBReader(tmp_path / "db") as reader:
        assert list(reader.items()) == [(keys[0], b"1")]


@pytest.mark.parametrize("key", [b"", b"k" * 512])
def test_refuses_key_sizes(tmp_path, key):
    with LMDBWriter(tmp_path / "db") as writer:
        with pytest.raises(ValueError, match="1 to 511 bytes"):
            writer.put(key, b"v")


def test_refuses_other_types(tmp_path):
    with LMDBWriter(tmp_path / "db") as writer:
        with pytest.raises(TypeError):
            writer.put("text", b"v")
        with pytest.raises(TypeError):
            writer.put(b"k", "text")
        writer.put(bytearray(b"k"), memoryview(b"value"))
    with LMDBReader(tmp_path / "db") as reader:
        assert list(reader.items()) == [(b"k", b"value")]


def test_refuses_non_empty_directory(tmp_path):
    path = tmp_path / "db"
    path.mkdir()
    (path / "data.mdb").write_bytes(b"user data")
    with pytest.raises(LMDBWriteError, match="not empty") as e:
        LMDBWriter(path)
    assert str(path) in str(e.value)
    assert (path / "data.mdb").read_bytes() == b"user data"
    assert os.listdir(path) == ["data.mdb"]


def test_refuses_a_file(tmp_path):
    path = tmp_path / "db"
    path.write_bytes(b"x")
    with pytest.raises(LMDBWriteError, match="not a directory"):
        LMDBWriter(path)
    assert path.read_bytes() == b"x"


def test_refuses_bad_page_size(tmp_path):
    with pytest.raises(ValueError, match="page size"):
        LMDBWriter(tmp_path / "db", page_size=5000)
    assert not (tmp_path / "db").exists()


def test_no_data_mdb_until_closed(tmp_path):
    path = tmp_path / "db"
    writer = LMDBWriter(path)
    for i in range(2000):
        writer.put(b"%05d" % i, b"x" * 3000)
    assert "data.mdb" not in os.listdir(path)
    writer.close()
    writer.close()
    assert os.listdir(path) == ["data.mdb"]
    with pytest.raises(ValueError, match="closed"):
        writer.put(b"99999", b"")


def test_failure_inside_with_leaves_no_database(tmp_path):
    path = tmp_path / "db"
    with pytest.raises(RuntimeError):
        with LMDBWriter(path) as writer:
            for i in range(2000):
                writer.put(b"%05d" % i, b"x" * 3000)
            raise RuntimeError("image failed")
    assert not path.exists()                  # the writer made it, and it is empty

    path.mkdir()
    with pytest.raises(ValueError):
        with LMDBWriter(path) as writer:
            writer.put(b"b", b"1")
            writer.put(b"a", b"2")
    assert path.is_dir() and os.listdir(path) == []
