"""``caffelite convert_imageset``: Caffe's ``convert_imageset`` tool.

``convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME``: LISTFILE is read as the
fork's tool reads it, ``<path> <label>`` pairs of whitespace-separated tokens (so no
spaces in paths; the list ends at the first label that is not an int).  Each image is
read as ``cv::imread`` does (colour, or gray with ``--gray``), resized with
``cv::resize`` (bilinear) when both ``--resize_height`` and ``--resize_width`` are set,
and stored as a Datum under the key ``%08d_<path>`` (the pair's index), in list order
(or shuffled with ``--shuffle``).  Raw Datums hold C x H x W bytes; ``--encoded``
stores the file's own bytes when the image needs no change (the encoding guessed from
the file name), and ``--encode_type`` (or a resize flag, or a colour change) re-encodes
it, as the fork's matchExt decides (Pillow's encoder: PNG is lossless, a JPEG's bytes
differ from OpenCV's).  An image that cannot
be read is skipped with an error line, as the tool does.  The database (``--backend``
lmdb, the default, or leveldb) is written by caffelite's own writers; it is a new
directory, never an existing one.
"""
import argparse
import io
import os

import numpy as np

from . import backend
from .caffe_rng import shuffle
from .io.image import INTER_LINEAR, ImageReadError, read_image, resize
from .log import logger


class ConvertError(ValueError):
    """Bad arguments or input; the message names the file."""


class _ListErrors:
    """What ImageData's list reader needs to name an error: ConvertErrors here."""

    @staticmethod
    def error(message):
        return ConvertError(message)


def read_list(path):
    """[(file name, label)] as the fork's tool reads LISTFILE (BVLC before PR #4059,
    as its ImageData): ``while (infile >> filename >> label)``, whitespace-separated
    tokens, ending at the first label that is not an int."""
    from .layers.image_data import read_label_pairs
    return [entry.fields for entry in read_label_pairs(path, _ListErrors, allow_empty=True)]


def _match_ext(name, encoding):
    """The fork's matchExt: the file's extension *with its dot* (the whole name if it
    has none) against the encoding, lower-cased: the guessed encoding (".jpg") matches,
    an explicit --encode_type (jpg) never does, so that one always re-encodes."""
    dot = name.rfind(".")
    ext = (name[dot:] if dot >= 0 else name).lower()
    encoding = encoding.lower()
    return ext == encoding or (encoding == "jpg" and ext == "jpeg")


def _encode(img, encoding, path):
    """cv::imencode("." + encoding) with Pillow: BGR(A)/gray in, file bytes out."""
    from PIL import Image
    formats = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "bmp": "BMP", "tif": "TIFF",
               "tiff": "TIFF", "ppm": "PPM", "pgm": "PPM"}
    fmt = formats.get(encoding.lower().lstrip("."))
    if fmt is None:
        raise ConvertError(f"{path}: cannot encode as '{encoding}' (known: "
                           f"{', '.join(sorted(formats))})")
    rgb = img if img.ndim == 2 else img[:, :, ::-1]
    buf = io.BytesIO()
    options = {"quality": 95} if fmt == "JPEG" else {}     # OpenCV's default quality
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, fmt, **options)
    return buf.getvalue()


def image_datum(path, label, resize_flags, is_color, encoding):
    """ReadImageToDatum: the Datum of one image, or None when it cannot be read (the
    tool logs and skips it).  ``resize_flags`` (height, width) as given: the
    image is resized only when both are set, but either one set makes an encoded
    record re-encoded instead of the file's bytes, as in the fork."""
    resize_hw = resize_flags if all(resize_flags) else None
    from .proto import caffe_pb2
    try:
        img = read_image(path, is_color)
    except ImageReadError as e:
        logger.error("Could not open or find file %s (%s)", path, e.reason)
        return None
    if resize_hw:
        img = resize(img, resize_hw, INTER_LINEAR)
    datum = caffe_pb2.Datum(label=label)
    if encoding:
        if (img.ndim == 3) == is_color and not any(resize_flags) and \
                _match_ext(path, encoding):
            with open(path, "rb") as f:            # ReadFileToDatum: the file as it is
                datum.data = f.read()
        else:
            datum.data = _encode(img, encoding, path)
        datum.encoded = True
        return datum
    chw = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)
    datum.channels, datum.height, datum.width = chw.shape
    datum.data = np.ascontiguousarray(chw).tobytes()
    datum.encoded = False                   # CVMatToDatum sets it: the same bytes
    return datum


def convert_imageset(root, list_file, db_path, gray=False, do_shuffle=False,
                     resize_height=0, resize_width=0, check_size=False, encoded=False,
                     encode_type="", backend_name="lmdb"):
    """Write the database; returns the number of images stored."""
    if os.path.exists(db_path):
        raise ConvertError(f"'{db_path}' exists; convert_imageset writes a new database "
                           f"(remove it or choose another DB_NAME)")
    lines = read_list(list_file)
    if do_shuffle:
        logger.info("Shuffling data")
        order = np.arange(len(lines))
        shuffle(backend.rng(), order)
        lines = [lines[i] for i in order]
    logger.info("A total of %d images.", len(lines))
    if not lines:       # the tool writes the empty database and exits 0
        logger.warning("'%s' lists no '<image path> <integer label>' pairs: '%s' will "
                       "hold no records", list_file, db_path)
    if encode_type and not encoded:
        logger.info("encode_type specified, assuming encoded=true.")
        encoded = True
    resize_flags = (max(0, resize_height), max(0, resize_width))
    from .io.db import open_writer
    count, data_size = 0, None
    with open_writer(db_path, backend_name) as writer:
        for line_id, (name, label) in enumerate(lines):
            encoding = encode_type
            if encoded and not encoding:
                # the fork guesses from the name, keeping the dot (".jpg")
                if "." not in name:
                    raise ConvertError(f"Failed to guess the encoding of '{name}' (no "
                                       f"extension; the fork's tool stops there): give "
                                       f"--encode_type")
                encoding = name[name.rfind("."):].lower()
            datum = image_datum(root + name, label, resize_flags, not gray, encoding)
            if datum is None:
                continue
            if check_size:
                data_size = _check_size(datum, data_size, root + name)
            writer.put(b"%08d_" % line_id + os.fsencode(name), datum.SerializeToString())
            count += 1
            if count % 1000 == 0:
                logger.info("Processed %d files.", count)
    if count % 1000:
        logger.info("Processed %d files.", count)
    # The tool skips unreadable images and exits 0 even when it stored none; say so.
    if lines and not count:
        logger.error("None of the %d images could be read (see the errors above): '%s' "
                     "holds no records. Each image is read from ROOTFOLDER + its list "
                     "path: is ROOTFOLDER '%s' right?", len(lines), db_path, root)
    elif count < len(lines):
        logger.warning("%d of the %d images could not be read and are not in '%s' (see "
                       "the errors above)", len(lines) - count, len(lines), db_path)
    return count


def _check_size(datum, data_size, path):
    """--check_size as the tool does it: the first Datum's channels x height x width
    against each later one's data bytes (so encoded Datums, whose dimensions are 0,
    fail it as they do there)."""
    if data_size is None:
        return datum.channels * datum.height * datum.width
    if len(datum.data) != data_size:
        raise ConvertError(f"{path}: Incorrect data field size {len(datum.data)} (the "
                           f"first image's is {data_size})")
    return data_size


def add_parser(sub):
    p = sub.add_parser("convert_imageset",
                       help="images + a list file to an LMDB or LevelDB of Datums, like "
                            "Caffe's convert_imageset",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("root", metavar="ROOTFOLDER/", help="prepended to each list path")
    p.add_argument("list_file", metavar="LISTFILE")
    p.add_argument("db_name", metavar="DB_NAME", help="the database directory to create")
    for flag, helptext in (("gray", "read the images as grayscale"),
                           ("shuffle", "shuffle the list before storing"),
                           ("check_size", "check that every Datum has the same size"),
                           ("encoded", "store encoded images (the file's bytes)")):
        gflags_bool(p, flag, helptext)
    p.add_argument("--backend", default="lmdb", help="lmdb (default) or leveldb")
    p.add_argument("--resize_width", type=int, default=0)
    p.add_argument("--resize_height", type=int, default=0)
    p.add_argument("--encode_type", default="", help="png, jpg, ...: encode as this")
    p.add_argument("--log", help="also write the log to this file")
    p.set_defaults(func=cmd_convert_imageset)
    return p


def gflags_bool(parser, name, helptext):
    """A gflags boolean: --name (--name=true), --noname (--name=false; the cli
    rewrites the ``=`` forms)."""
    parser.add_argument(f"--{name}", action="store_true", help=helptext)
    parser.add_argument(f"--no{name}", dest=name, action="store_false",
                        help=argparse.SUPPRESS)


def cmd_convert_imageset(args):
    convert_imageset(args.root, args.list_file, args.db_name, gray=args.gray,
                     do_shuffle=args.shuffle, resize_height=args.resize_height,
                     resize_width=args.resize_width, check_size=args.check_size,
                     encoded=args.encoded,
                     encode_type=args.encode_type, backend_name=args.backend)
    return 0
