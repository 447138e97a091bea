"""Database speed: caffelite's pure-Python LMDB and LevelDB readers and writers against
the C libraries (py-lmdb, plyvel), on CIFAR-10-sized records (50,000 Datums of 3 x 32 x
32 bytes and a label, keys ``%05d`` as convert_cifar_data writes them).

Timed, each engine interleaved with its peer, median (and min) of ``--repeats``:

* write: a new database of all records (caffelite's writer; the library writing in
  transactions/batches of 1000 puts, as Caffe's tools do);
* read: every (key, value) in key order from a database the library wrote (for
  LevelDB both as written, the data in the log, and after ``compact_range()``, the
  data in snappy-compressed tables);
* Data layer: batches of 100 through caffelite's ``Data`` layer (Datum parsing and the
  transform with a mean file), per 50,000 records.

    python benchmarks/db_io.py --repeats 5
"""
import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from caffelite.io.leveldb import LevelDBReader  # noqa: E402
from caffelite.io.leveldb_writer import LevelDBWriter  # noqa: E402
from caffelite.io.lmdb import LMDBReader  # noqa: E402
from caffelite.io.lmdb_writer import LMDBWriter  # noqa: E402
from caffelite.proto import caffe_pb2  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=50000)
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def records(count, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        datum = caffe_pb2.Datum(channels=3, height=32, width=32, label=int(i % 10),
                                data=rng.integers(0, 256, 3072, dtype=np.uint8).tobytes())
        out.append((b"%05d" % i, datum.SerializeToString()))
    return out


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def fresh(work, name):
    path = os.path.join(work, name)
    shutil.rmtree(path, ignore_errors=True)
    return path


def write_ours(kind, work, data):
    writer = LMDBWriter if kind == "lmdb" else LevelDBWriter
    with writer(fresh(work, "ours")) as w:
        for k, v in data:
            w.put(k, v)


def write_library(kind, work, data, name="theirs", compact=False):
    path = fresh(work, name)
    if kind == "lmdb":
        import lmdb
        env = lmdb.open(path, map_size=1 << 32)
        for start in range(0, len(data), 1000):
            with env.begin(write=True) as txn:
                for k, v in data[start:start + 1000]:
                    txn.put(k, v)
        env.close()
    else:
        import plyvel
        db = plyvel.DB(path, create_if_missing=True, write_buffer_size=268435456,
                       block_size=65536)
        for start in range(0, len(data), 1000):
            with db.write_batch() as batch:
                for k, v in data[start:start + 1000]:
                    batch.put(k, v)
        if compact:
            db.compact_range()
        db.close()
    return path


def read_ours(kind, path):
    reader = LMDBReader(path) if kind == "lmdb" else LevelDBReader(path)
    with reader:
        return sum(len(v) for _, v in reader.items())


def read_library(kind, path):
    if kind == "lmdb":
        import lmdb
        env = lmdb.open(path, readonly=True, lock=False)
        with env.begin() as txn:
            total = sum(len(v) for _, v in txn.cursor())
        env.close()
        return total
    import plyvel
    db = plyvel.DB(path)
    total = sum(len(v) for _, v in db)
    db.close()
    return total


def data_layer_rate(path, backend, work, count):
    import caffelite as caffe
    from caffelite.io import array_to_blobproto, prototxt
    mean = os.path.join(work, "mean.binaryproto")
    with open(mean, "wb") as f:
        f.write(array_to_blobproto(np.full((1, 3, 32, 32), 120, np.float32))
                .SerializeToString())
    net = caffe.Net(param=prototxt.parse_net(
        f'layer {{ name: "d" type: "Data" top: "data" top: "label" transform_param {{ '
        f'mean_file: "{mean}" }} data_param {{ source: "{path}" batch_size: 100 '
        f'backend: {backend} }} }}')[0], phase=caffe.TEST)
    net.forward()

    def run():
        for _ in range(count // 100):
            net.forward()
    return run


def row(name, ours, theirs):
    peer = f"{theirs[0]:.3f} ({theirs[1]:.3f})" if theirs else "-"
    ratio = f"{ours[0] / theirs[0]:.2f}" if theirs else "-"
    return f"| {name} | {ours[0]:.3f} ({ours[1]:.3f}) | {peer} | {ratio} |"


def main(args):
    data = records(args.records)
    size = sum(len(v) for _, v in data) / 1e6
    print(f"{args.records} records, {size:.0f} MB of Datums; Python "
          f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs; "
          f"median (min) seconds of {args.repeats}", file=sys.stderr)
    lines = ["| step | caffelite | library | caffelite / library |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as work:
        for kind in ("lmdb", "leveldb"):
            ours = timed(lambda: write_ours(kind, work, data), args.repeats)
            theirs = timed(lambda: write_library(kind, work, data), args.repeats)
            lines.append(row(f"{kind} write", ours, theirs))
            layouts = [("", False)] + ([(" (compacted)", True)] if kind == "leveldb" else [])
            for label, compact in layouts:
                path = write_library(kind, work, data, f"source{label}", compact)
                assert read_ours(kind, path) == read_library(kind, path)
                ours = timed(lambda: read_ours(kind, path), args.repeats)
                theirs = timed(lambda: read_library(kind, path), args.repeats)
                lines.append(row(f"{kind} read{label}", ours, theirs))
            run = data_layer_rate(path, kind.upper(), work, args.records)
            lines.append(row(f"Data layer, {kind}", timed(run, args.repeats), None))
    print("\n".join(lines))


if __name__ == "__main__":
    main(parse_args())
