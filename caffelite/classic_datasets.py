"""Caffe's example converters for its classic data sets, writing LMDB or LevelDB:

* ``caffelite convert_cifar_data INPUT_FOLDER OUTPUT_FOLDER DB_TYPE`` (Caffe's
  examples/cifar10/convert_cifar_data): the binary batches ``data_batch_1.bin`` ..
  ``data_batch_5.bin`` into ``OUTPUT_FOLDER/cifar10_train_<db_type>`` (keys ``%05d``,
  50,000 records) and ``test_batch.bin`` into ``cifar10_test_<db_type>``; each record
  a 3 x 32 x 32 Datum of the file's bytes as they are (R, G, B planes) and its label;
* ``caffelite convert_mnist_data [--backend lmdb] IMAGES LABELS DB`` (Caffe's
  examples/mnist/convert_mnist_data): the IDX files (magic 2051 / 2049, big-endian
  counts) into 1 x rows x cols Datums under ``%08d`` keys.

Labels are read as C's (signed) char, as those programs read them.
"""
import os
import struct

from .io.db import open_writer
from .log import logger

CIFAR_SIZE, CIFAR_BYTES, CIFAR_BATCH = 32, 3072, 10000


class ConvertDataError(ValueError):
    """A missing or malformed input file; the message names it."""


def _signed_char(byte):
    return byte - 256 if byte > 127 else byte


def _read(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConvertDataError(f"Unable to open {what} '{path}': {e.strerror}") from None


def _datum(channels, height, width, data, label):
    from .proto import caffe_pb2
    return caffe_pb2.Datum(channels=channels, height=height, width=width, data=data,
                           label=label).SerializeToString()


def _cifar_records(path, what):
    """The 10,000 (label, 3072 bytes) records of one CIFAR-10 binary batch."""
    data = _read(path, what)
    record = 1 + CIFAR_BYTES
    if len(data) < CIFAR_BATCH * record:
        raise ConvertDataError(f"'{path}' holds {len(data)} bytes, a CIFAR-10 batch "
                               f"{CIFAR_BATCH * record} ({CIFAR_BATCH} records of 1 + "
                               f"{CIFAR_BYTES})")
    for i in range(CIFAR_BATCH):
        start = i * record
        yield _signed_char(data[start]), data[start + 1:start + record]


def convert_cifar_data(input_folder, output_folder, db_type):
    """Write the train and test databases; returns their paths."""
    train = os.path.join(output_folder, f"cifar10_train_{db_type}")
    test = os.path.join(output_folder, f"cifar10_test_{db_type}")
    batches = [os.path.join(input_folder, f"data_batch_{i}.bin") for i in range(1, 6)]
    for path in batches + [os.path.join(input_folder, "test_batch.bin")]:
        if not os.path.isfile(path):
            raise ConvertDataError(f"Unable to open '{path}' (the folder needs "
                                   f"data_batch_1.bin .. data_batch_5.bin and "
                                   f"test_batch.bin, gunzipped)")
    logger.info("Writing Training data")
    with open_writer(train, db_type) as writer:
        for file_id, path in enumerate(batches):
            logger.info("Training Batch %d", file_id + 1)
            for item, (label, pixels) in enumerate(_cifar_records(path, "train file")):
                writer.put(b"%05d" % (file_id * CIFAR_BATCH + item),
                           _datum(3, CIFAR_SIZE, CIFAR_SIZE, pixels, label))
    logger.info("Writing Testing data")
    with open_writer(test, db_type) as writer:
        records = _cifar_records(os.path.join(input_folder, "test_batch.bin"), "test file")
        for item, (label, pixels) in enumerate(records):
            writer.put(b"%05d" % item, _datum(3, CIFAR_SIZE, CIFAR_SIZE, pixels, label))
    return train, test


def _idx_header(data, path, magic, fields):
    """The big-endian u32 counts after the magic number of an IDX file."""
    need = 4 * (1 + fields)
    if len(data) < need:
        raise ConvertDataError(f"'{path}' is too short for an IDX header")
    values = struct.unpack_from(f">{1 + fields}I", data)
    if values[0] != magic:
        kind = "image" if magic == 2051 else "label"
        raise ConvertDataError(f"Incorrect {kind} file magic in '{path}': {values[0]}, "
                               f"expected {magic}")
    return values[1:], need


def convert_mnist_data(image_file, label_file, db_path, backend="lmdb"):
    """Write the database; returns the number of items."""
    images, labels = _read(image_file, "file"), _read(label_file, "file")
    (count, rows, cols), image_start = _idx_header(images, image_file, 2051, 3)
    (label_count,), label_start = _idx_header(labels, label_file, 2049, 1)
    if count != label_count:
        raise ConvertDataError(f"'{image_file}' holds {count} images, '{label_file}' "
                               f"{label_count} labels")
    size = rows * cols
    if len(images) < image_start + count * size or len(labels) < label_start + count:
        raise ConvertDataError(f"'{image_file}' or '{label_file}' is shorter than its "
                               f"header says ({count} items of {rows} x {cols})")
    logger.info("Opening %s %s", backend, db_path)
    logger.info("A total of %d items.", count)
    logger.info("Rows: %d Cols: %d", rows, cols)
    with open_writer(db_path, backend) as writer:
        for item in range(count):
            pixels = images[image_start + item * size:image_start + (item + 1) * size]
            label = _signed_char(labels[label_start + item])
            writer.put(b"%08d" % item, _datum(1, rows, cols, pixels, label))
    if count % 1000:            # the tool logs it (at ERROR) for a partial last batch only
        logger.error("Processed %d files.", count)
    return count


def add_parsers(sub):
    cifar, mnist = __doc__.split("\n\n")[1].removeprefix("* ").split("\n* ")
    c = sub.add_parser("convert_cifar_data", help="CIFAR-10 binary batches to "
                       "LMDB/LevelDB, like Caffe's examples/cifar10/convert_cifar_data",
                       description=cifar.replace("``", "").rstrip(";") + ".")
    c.add_argument("input_folder")
    c.add_argument("output_folder")
    c.add_argument("db_type", help="lmdb or leveldb")
    c.add_argument("--log", help="also write the log to this file")
    c.set_defaults(func=cmd_convert_cifar_data)
    m = sub.add_parser("convert_mnist_data", help="MNIST IDX files to LMDB/LevelDB, like "
                       "Caffe's examples/mnist/convert_mnist_data",
                       description=mnist.replace("``", ""))
    m.add_argument("input_image_file")
    m.add_argument("input_label_file")
    m.add_argument("output_db_file")
    m.add_argument("--backend", default="lmdb", help="lmdb (default) or leveldb")
    m.add_argument("--log", help="also write the log to this file")
    m.set_defaults(func=cmd_convert_mnist_data)


def cmd_convert_cifar_data(args):
    convert_cifar_data(args.input_folder, args.output_folder, args.db_type)
    return 0


def cmd_convert_mnist_data(args):
    convert_mnist_data(args.input_image_file, args.input_label_file, args.output_db_file,
                       args.backend)
    return 0
