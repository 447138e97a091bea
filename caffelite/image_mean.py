"""``caffelite compute_image_mean``: Caffe's ``compute_image_mean`` tool.

The mean of every Datum record of an LMDB or LevelDB database (encoded records decoded
as OpenCV's IMREAD_UNCHANGED), as a BlobProto of num 1 x C x H x W in the legacy
dimension fields, which transform_param's ``mean_file`` reads.  The sums are float32
and taken record by record, then divided by the count, as the tool's float BlobProto
arithmetic does; the per-channel means it logs are float32 running sums over each
channel's pixels.
"""
import os

import numpy as np

from .io.db import BACKENDS_BY_NAME, LMDB, DBError, open_db, without_records
from .log import logger, ostream_g


class ImageMeanError(ValueError):
    """A database the mean cannot be computed from; the message names it."""


def record_pixels(value, source, index):
    """A record's pixels as a flat float32 C x H x W array, that shape, and whether it
    was encoded (DecodeDatumNative: decoded as IMREAD_UNCHANGED)."""
    from .layers.db_data import DataError, datum_image, parse_datum
    where = f"{source}: record {index}"
    try:
        datum = parse_datum(value, where)
        chw = datum_image(datum, where).transpose(2, 0, 1)
    except DataError as e:
        raise ImageMeanError(str(e)) from None
    return chw.reshape(-1).astype(np.float32), chw.shape, datum.encoded


def compute_image_mean(source, backend=LMDB, progress_every=10000):
    """(mean as a 1 x C x H x W float32 array, record count, per-channel means)."""
    try:
        reader = open_db(source, backend, switch="-backend {flag}")
    except DBError as e:
        raise ImageMeanError(str(e)) from None
    total = shape = None
    count = 0
    with reader:
        for index, (_, value) in enumerate(reader.items()):
            pixels, record_shape, encoded = record_pixels(value, source, index)
            if total is None:
                shape = record_shape
                if encoded:
                    logger.info("Decoding Datum")
                logger.info("Starting Iteration")
                total = np.zeros(pixels.size, np.float32)
            elif pixels.size != total.size:
                raise ImageMeanError(f"{source}: record {index} holds {pixels.size} values"
                                     f", record 0 {total.size} (Incorrect data field size)")
            total += pixels
            count += 1
            if count % progress_every == 0:
                logger.info("Processed %d files.", count)
    if total is None:
        raise ImageMeanError(without_records(reader, source))
    if count % progress_every:
        logger.info("Processed %d files.", count)
    mean = (total / np.float32(count)).astype(np.float32)
    channels, dim = shape[0], shape[1] * shape[2]
    channel_means = [np.cumsum(mean[c * dim:(c + 1) * dim], dtype=np.float32)[-1]
                     / np.float32(dim) for c in range(channels)]
    return mean.reshape((1,) + tuple(shape)), count, channel_means


def mean_blobproto(mean):
    """The tool's BlobProto: num/channels/height/width, float data."""
    from .proto import caffe_pb2
    blob = caffe_pb2.BlobProto(num=1, channels=mean.shape[1], height=mean.shape[2],
                               width=mean.shape[3])
    blob.data.extend(mean.reshape(-1).tolist())
    return blob


def add_parser(sub):
    p = sub.add_parser("compute_image_mean",
                       help="the mean image of an LMDB/LevelDB database, like Caffe's "
                            "compute_image_mean",
                       description="Writes the mean of the database's Datum records as a "
                                   "binaryproto for transform_param { mean_file }.")
    p.add_argument("input_db")
    p.add_argument("output_file", nargs="?",
                   help="the binaryproto to write (without it, only the log)")
    p.add_argument("--backend", default="lmdb", choices=sorted(BACKENDS_BY_NAME),
                   help="the database's kind (default lmdb, as the tool's)")
    p.add_argument("--log", help="also write the log to this file")
    p.set_defaults(func=cmd_compute_image_mean)
    return p


def check_output_outside(output_file, input_db):
    """Refuse, before any work, an output file that is the input database or inside
    it (``DB/data.mdb``): writing the mean there would destroy the database.  The
    file is written to a temporary name and renamed, so what counts is the folder
    entry it replaces (a link to a database file is replaced, not followed)."""
    absolute = os.path.abspath(output_file)
    out = os.path.join(os.path.realpath(os.path.dirname(absolute)),
                       os.path.basename(absolute))
    db = os.path.realpath(input_db)
    if out == db or os.path.commonpath([out, db]) == db:
        where = "is" if out == db else "is inside"
        raise ImageMeanError(f"output file '{output_file}' {where} the input database "
                             f"'{input_db}': writing the mean there would destroy the "
                             f"database; write it elsewhere")


def cmd_compute_image_mean(args):
    from .io.caffemodel import write_proto_atomically
    if args.output_file:
        check_output_outside(args.output_file, args.input_db)
    mean, _, channel_means = compute_image_mean(args.input_db, BACKENDS_BY_NAME[args.backend])
    if args.output_file:
        logger.info("Write to %s", args.output_file)
        write_proto_atomically(args.output_file, mean_blobproto(mean).SerializeToString())
    logger.info("Number of channels: %d", len(channel_means))
    for c, value in enumerate(channel_means):
        logger.info("mean_value channel [%d]:%s", c, ostream_g(float(value)))
    return 0

