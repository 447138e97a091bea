"""caffelite.io.lmdb.LMDBReader against databases written by the LMDB C library
(through py-lmdb, used here only as the writer and as the oracle)."""
import os
import random
import struct

import pytest

from caffelite.io.lmdb import LMDBError, LMDBReader

lmdb = pytest.importorskip("lmdb")

MAP_SIZE = 1 << 30


def write(path, entries, deletes=(), subdir=True):
    """One write transaction of ``entries`` (key, value) then ``deletes``."""
    env = lmdb.open(str(path), map_size=MAP_SIZE, subdir=subdir)
    try:
        with env.begin(write=True) as txn:
            for key, value in entries:
                txn.put(key, value)
            for key in deletes:
                txn.delete(key)
    finally:
        env.close()


def oracle(path, subdir=True):
    """py-lmdb's own view: (all items in cursor order, entries, stat)."""
    env = lmdb.open(str(path), readonly=True, lock=False, subdir=subdir)
    try:
        with env.begin() as txn:
            items = [(bytes(k), bytes(v)) for k, v in txn.cursor()]
        return items, env.stat()
    finally:
        env.close()


def check_against_oracle(path, subdir=True):
    expected, stat = oracle(path, subdir)
    with LMDBReader(path) as reader:
        assert len(reader) == stat["entries"] == len(expected)
        assert list(reader.items()) == expected
    return expected, stat


def test_empty_database(tmp_path):
    lmdb.open(str(tmp_path), map_size=MAP_SIZE).close()
    check_against_oracle(tmp_path)
    write(tmp_path, [])                           # an empty committed transaction
    items, _ = check_against_oracle(tmp_path)
    assert items == []


def test_one_entry(tmp_path):
    write(tmp_path, [(b"00000000_cat.jpg", b"datum")])
    items, _ = check_against_oracle(tmp_path)
    assert items == [(b"00000000_cat.jpg", b"datum")]


def test_multi_level_tree_of_caffe_keys(tmp_path):
    rng = random.Random(0)
    entries = [(b"%08d_img%d.jpg" % (i, rng.randrange(10 ** 6)), os.urandom(rng.randrange(60)))
               for i in range(20000)]
    rng.shuffle(entries)
    write(tmp_path, entries)
    items, stat = check_against_oracle(tmp_path)
    assert stat["depth"] >= 3 and stat["branch_pages"] > 1
    assert items == sorted(entries)


def test_values_around_and_beyond_the_overflow_threshold(tmp_path):
    page = lmdb.open(str(tmp_path), map_size=MAP_SIZE).stat()["psize"]
    half = page // 2
    sizes = sorted({0, 1, 3072, 100_000, 1 << 20, page - 16, page - 15, page, 2 * page - 16,
                    2 * page - 15} | set(range(half - 40, half + 8)))
    entries = [(b"k%07d" % size, os.urandom(size)) for size in sizes]
    entries += [(b"long" * 100 + b"%07d" % size, os.urandom(size)) for size in sizes]
    write(tmp_path, entries)
    items, stat = check_against_oracle(tmp_path)
    assert stat["overflow_pages"] > 0
    assert items == sorted(entries)


def test_caffe_datums_of_cifar_size(tmp_path):
    from caffelite.proto import caffe_pb2
    entries = []
    for i in range(300):
        datum = caffe_pb2.Datum(channels=3, height=32, width=32, label=i % 10,
                                data=os.urandom(3072))
        entries.append((b"%05d" % i, datum.SerializeToString()))
    write(tmp_path, entries)
    items, _ = check_against_oracle(tmp_path)
    assert items == entries
    datum = caffe_pb2.Datum.FromString(items[7][1])
    assert (datum.label, len(datum.data)) == (7, 3072)


def test_keys_of_various_lengths_and_bytes(tmp_path):
    rng = random.Random(1)
    keys = {b"a", b"ab", b"abc", b"abd", b"b", b"\x00", b"\x00\x00", b"\x00\x01", b"\xff",
            b"\xff" * 511, b"a" * 511, b"a" * 510}
    keys |= {bytes(rng.randrange(256) for _ in range(rng.randrange(1, 512)))
             for _ in range(2000)}
    entries = [(key, os.urandom(rng.randrange(5000))) for key in keys]
    write(tmp_path, entries)
    items, _ = check_against_oracle(tmp_path)
    assert [k for k, _ in items] == sorted(keys)    # memcmp: a prefix sorts first


def test_overwritten_and_deleted_keys(tmp_path):
    rng = random.Random(2)
    entries = [(b"%06d" % i, os.urandom(rng.choice([10, 3000, 9000]))) for i in range(3000)]
    write(tmp_path, entries)
    rewrites = [(key, os.urandom(rng.choice([0, 5, 2500, 20000]))) for key, _ in entries[::3]]
    write(tmp_path, rewrites, deletes=[key for key, _ in entries[1::4]])
    check_against_oracle(tmp_path)
    write(tmp_path, [], deletes=[key for key, _ in entries if int(key) % 4 != 1])
    items, stat = check_against_oracle(tmp_path)
    assert items == [] and stat["depth"] == 0


def test_several_transactions_alternate_the_meta_pages(tmp_path):
    seen_txnids = set()
    for txn in range(6):
        write(tmp_path, [(b"%d_%05d" % (txn, i), os.urandom(i % 4000)) for i in range(400)],
              deletes=[b"%d_%05d" % (txn - 1, i) for i in range(0, 400, 7)] if txn else ())
        env = lmdb.open(str(tmp_path), readonly=True, lock=False)
        seen_txnids.add(env.info()["last_txnid"] % 2)
        env.close()
        items, _ = check_against_oracle(tmp_path)
        assert len(items) == 400 * (txn + 1) - 58 * txn
    assert seen_txnids == {0, 1}                     # the newer meta was page 0 and page 1


def test_single_file_layout(tmp_path):
    path = tmp_path / "train.mdb"
    entries = [(b"%08d" % i, os.urandom(i * 37 % 6000)) for i in range(1000)]
    write(path, entries, subdir=False)
    items, _ = check_against_oracle(path, subdir=False)
    assert items == entries


def test_items_restarts_and_generators_are_independent(tmp_path):
    entries = [(b"%04d" % i, b"v%d" % i) for i in range(2000)]
    write(tmp_path, entries)
    with LMDBReader(str(tmp_path)) as reader:
        first, second = reader.items(), reader.items()
        assert [next(first) for _ in range(10)] == entries[:10]
        assert list(second) == entries
        assert list(first) == entries[10:]
        assert list(reader.items()) == list(reader.items()) == entries


def test_reader_writes_nothing_and_close(tmp_path):
    write(tmp_path, [(b"%04d" % i, os.urandom(5000)) for i in range(100)])
    os.remove(tmp_path / "lock.mdb")                 # no lock is taken or created
    before = {name: ((tmp_path / name).read_bytes(), os.stat(tmp_path / name).st_mtime_ns)
              for name in os.listdir(tmp_path)}
    reader = LMDBReader(tmp_path)
    assert len(list(reader.items())) == 100
    reader.close()
    reader.close()
    after = {name: ((tmp_path / name).read_bytes(), os.stat(tmp_path / name).st_mtime_ns)
             for name in os.listdir(tmp_path)}
    assert after == before
    with pytest.raises(ValueError, match="closed"):
        list(reader.items())


# -- errors -------------------------------------------------------------------------

def expect_error(path, *words, iterate=False):
    with pytest.raises(LMDBError) as info:
        with LMDBReader(path) as reader:
            if iterate:
                list(reader.items())
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message
    return message


def test_missing_path_and_directory_without_data(tmp_path):
    expect_error(tmp_path / "nope", "No such file")
    expect_error(tmp_path, "data.mdb")


def test_not_an_lmdb_file(tmp_path):
    junk = tmp_path / "junk.mdb"
    junk.write_bytes(random.Random(3).randbytes(3 * 4096))
    expect_error(junk, "not an LMDB file")
    junk.write_bytes(b"")
    expect_error(junk, "empty")
    junk.write_bytes(b"\x00" * 40)
    expect_error(junk, "not an LMDB file")


def test_truncated_data_file(tmp_path):
    write(tmp_path, [(b"%06d" % i, os.urandom(3000)) for i in range(200)])
    data = (tmp_path / "data.mdb").read_bytes()
    for size in (len(data) - 4096, len(data) // 2, 4096 + 100, 100):
        (tmp_path / "data.mdb").write_bytes(data[:size])
        expect_error(tmp_path, "truncated")


def test_foreign_builds_are_named(tmp_path):
    write(tmp_path, [(b"k", b"v")])
    data = bytearray((tmp_path / "data.mdb").read_bytes())
    magic = data[16:20]
    be = bytearray(data)
    be[16:20] = magic[::-1]
    (tmp_path / "data.mdb").write_bytes(bytes(be))
    expect_error(tmp_path, "big-endian")
    b32 = bytearray(data)
    b32[12:20] = magic + b"\x01\x00\x00\x00"       # 12-byte header: magic, version 1
    (tmp_path / "data.mdb").write_bytes(bytes(b32))
    expect_error(tmp_path, "32-bit")


def main_db_flags_set(path, flags):
    """Patch the MAIN record's flags in both meta pages (py-lmdb may not set flags
    on the main database)."""
    data = bytearray((path / "data.mdb").read_bytes())
    page = struct.unpack_from("<I", data, 16 + 24)[0]       # FREE record's pad
    for meta_at in (0, page):
        struct.pack_into("<H", data, meta_at + 16 + 24 + 48 + 4, flags)
    (path / "data.mdb").write_bytes(bytes(data))


def test_unsupported_databases(tmp_path):
    write(tmp_path, [(b"k", b"v")])
    main_db_flags_set(tmp_path, 0x04)
    expect_error(tmp_path, "DUPSORT")
    main_db_flags_set(tmp_path, 0x08)
    expect_error(tmp_path, "flags 0x8")
    env = lmdb.open(str(tmp_path / "named"), map_size=MAP_SIZE, max_dbs=2)
    with env.begin(write=True, db=env.open_db(b"labels")) as txn:
        txn.put(b"k", b"v")
    env.close()
    expect_error(tmp_path / "named", "named sub-database", iterate=True)


def test_corrupt_pages(tmp_path):
    write(tmp_path, [(b"%06d" % i, os.urandom(3000 if i % 10 else 10)) for i in range(2000)])
    data = (tmp_path / "data.mdb").read_bytes()
    _, stat = oracle(tmp_path)
    assert stat["depth"] >= 2
    page = stat["psize"]
    meta_at = page if data[page + 144:page + 152] > data[144:152] else 0
    root_at = meta_at + 16 + 24 + 48 + 40               # the MAIN record's root
    root = struct.unpack_from("<Q", data, root_at)[0]
    last = struct.unpack_from("<Q", data, root_at + 8)[0]

    bad_root = bytearray(data)
    struct.pack_into("<Q", bad_root, root_at, last + 1)
    (tmp_path / "data.mdb").write_bytes(bytes(bad_root))
    expect_error(tmp_path, "outside")

    for pgno in range(2, last + 1):                     # an overflow page's flags cleared
        if data[pgno * page + 10] == 0x04:
            bad_overflow = bytearray(data)
            bad_overflow[pgno * page + 10] = 0
            (tmp_path / "data.mdb").write_bytes(bytes(bad_overflow))
            expect_error(tmp_path, "not an overflow page", iterate=True)
            break

    zeroed = bytearray(data)                            # every non-root page cleared
    for pgno in range(2, last + 1):
        if pgno != root:
            zeroed[pgno * page:(pgno + 1) * page] = bytes(page)
    (tmp_path / "data.mdb").write_bytes(bytes(zeroed))
    expect_error(tmp_path, "page", iterate=True)
