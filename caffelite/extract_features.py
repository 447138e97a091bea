"""``caffelite extract_features``: Caffe's ``extract_features`` tool.

``extract_features pretrained_net_param feature_extraction_proto_file
blob1[,blob2,...] db1[,db2,...] num_mini_batches db_type [CPU|GPU] [DEVICE_ID]``

Builds the TEST net of the prototxt with the weights, runs ``num_mini_batches``
forwards (its data layer feeds them), and writes each listed blob's items, one Datum
per image (``float_data``, channels/height/width from the blob's legacy axes) under
the keys ``%010d`` (the image's index for that blob), into a new LMDB or LevelDB each.
"""
import os

import numpy as np

from .blob import legacy_shape
from .log import logger


class ExtractError(ValueError):
    """Bad arguments; the message names what is wrong."""


def feature_datum(item):
    """One image's features as the tool's Datum: float_data, legacy C x H x W."""
    from .proto import caffe_pb2
    _, channels, height, width = legacy_shape((1,) + item.shape)
    datum = caffe_pb2.Datum(channels=channels, height=height, width=width)
    datum.float_data.extend(np.asarray(item, np.float32).reshape(-1).tolist())
    return datum.SerializeToString()


def _items(data):
    """The blob's items as the tool takes them: num() of them (1 for a blob without
    axes, e.g. a loss: legacy num)."""
    return data.reshape((1,)) if data.ndim == 0 else data


def extract_features(weights, model, blob_names, db_names, num_mini_batches, db_type):
    """Write the features; returns {blob name: images written}."""
    import caffelite as caffe
    from .io.db import open_writer
    if len(blob_names) != len(db_names):
        raise ExtractError(f"the number of blob names ({len(blob_names)}) and dataset "
                           f"names ({len(db_names)}) must be equal")
    net = caffe.Net(model, caffe.TEST, weights=weights)
    for name in blob_names:
        if name not in net.blobs:
            raise ExtractError(f"Unknown feature blob name {name} in the network {model}")
    for path in db_names:
        if os.path.exists(path):
            raise ExtractError(f"'{path}' exists; extract_features writes new databases")
    counts = dict.fromkeys(blob_names, 0)
    writers = []
    try:
        for name, path in zip(blob_names, db_names):
            logger.info("Opening dataset %s", path)
            writers.append(open_writer(path, db_type))
        logger.error("Extacting Features")      # the tool's LOG(ERROR)s, its typo too
        for _ in range(num_mini_batches):
            net.forward()
            for name, writer in zip(blob_names, writers):
                for item in _items(net.blobs[name].data):
                    writer.put(b"%010d" % counts[name], feature_datum(item))
                    counts[name] += 1
                    if counts[name] % 1000 == 0:
                        logger.error("Extracted features of %d query images for feature "
                                     "blob %s", counts[name], name)
        for name, writer in zip(blob_names, writers):
            writer.close()
            logger.error("Extracted features of %d query images for feature blob %s",
                         counts[name], name)
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    logger.error("Successfully extracted the features!")
    return counts


def add_parser(sub):
    p = sub.add_parser("extract_features",
                       help="write blobs of a net's forward passes into LMDB/LevelDB, "
                            "like Caffe's extract_features",
                       description=__doc__.split("\n\n")[2])
    p.add_argument("pretrained_net_param", help="the .caffemodel")
    p.add_argument("feature_extraction_proto_file", help="the net (its TEST phase)")
    p.add_argument("blob_names", help="blob1[,blob2,...]")
    p.add_argument("dataset_names", help="db1[,db2,...]: new databases, one per blob")
    p.add_argument("num_mini_batches", type=int)
    p.add_argument("db_type", help="lmdb or leveldb")
    p.add_argument("mode", nargs="?", default="CPU", help="CPU (default) or GPU")
    p.add_argument("device_id", nargs="?", type=int, default=0)
    p.add_argument("--log", help="also write the log to this file")
    p.set_defaults(func=cmd_extract_features)
    return p


def cmd_extract_features(args):
    from . import backend
    if args.mode == "GPU":
        logger.error("Using GPU")
        logger.error("Using Device_id=%d", args.device_id)
        backend.use_gpu(args.device_id)
    else:
        logger.error("Using CPU")
        backend.set_mode_cpu()
    extract_features(args.pretrained_net_param, args.feature_extraction_proto_file,
                     args.blob_names.split(","), args.dataset_names.split(","),
                     args.num_mini_batches, args.db_type)
    return 0
