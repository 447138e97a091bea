"""BVLC's ``Data`` layer: Datum records from an LMDB or LevelDB database (what
``convert_imageset`` and ``convert_cifar_data`` write), as the DeepLab fork's Caffe reads
them (its DataLayer with a DataReader).

* Records are read in key order, one after the other, starting again at the first key
  after the last; a batch takes the next ``batch_size`` of them.  ``rand_skip`` is not
  read by that Caffe (its DataReader never skips), so it is ignored here too, with a
  warning.
* A Datum holds C x H x W uint8 ``data``, or ``float_data``, or (``encoded``) a JPEG/PNG
  file decoded as ``cv::imdecode`` does: IMREAD_UNCHANGED, or colour / gray where
  transform_param asks for ``force_color`` / ``force_gray``.  The label top gets
  ``datum.label``.
* Each batch has the shape of its first record (crop_size, if set, gives H and W);
  transform_param applies as in ``DataTransformer::Transform``: mirror, crop (random in
  TRAIN, centred in TEST), mean_file (of the full record size) or mean_value, scale.
* Random numbers as the fork draws them: at setup one word for the DataReader's thread,
  the transformer seed twice (InitRand; the second is the one used) and one for the
  prefetch thread; per record ``Rand(2)`` for mirror, then the crop offsets.
"""
import logging

import numpy as np

from ..caffe_rng import CaffeRNG
from ..io.db import Cursor, DBError, open_db
from ..io.image import ImageReadError, decode_image
from ..layer import TRAIN, register
from .image_data import (DataError, PrefetchingDataLayer, _caffe_rng_rand, _Config,
                         _mean_values, init_transformer_rand, read_transform_mean,
                         transform_draws, transform_image, until_exit)

logger = logging.getLogger("caffelite")


@register("Data")
class DataLayer(PrefetchingDataLayer):
    """Tops: data N x C x H x W and (optional) label N.  ``state_dict()`` /
    ``load_state_dict()`` keep the record position and the transformer's generator."""
    min_top, max_top = 1, 2

    def setup(self, bottom, top):
        p, tp = self.layer_param.data_param, self.layer_param.transform_param
        if p.batch_size <= 0:
            raise self.error("data_param.batch_size must be positive")
        if tp.force_color and tp.force_gray:
            raise self.error("cannot set both force_color and force_gray")
        mean = read_transform_mean(tp, self)
        self.cursor = self._open(p)
        _caffe_rng_rand()           # the DataReader's body starts its thread
        init_transformer_rand(tp, self.phase)   # BaseDataLayer::LayerSetUp's; replaced
        if p.rand_skip:
            logger.warning("%s: rand_skip %d is ignored, as in the fork's Caffe (its "
                           "DataReader reads from the first record)", self.name, p.rand_skip)
        seed = init_transformer_rand(tp, self.phase)
        self.transform_rng = CaffeRNG(seed) if seed is not None else None
        crop = tp.crop_size
        self.config = _Config(
            source=p.source, crop=crop, mean=mean, scale=float(tp.scale), mirror=tp.mirror,
            train=self.phase == TRAIN, dtype=self.dtype,
            color=True if tp.force_color else False if tp.force_gray else None)
        first, encoded = self._first_record()
        if (tp.force_color or tp.force_gray) and not encoded:
            logger.warning("%s: force_color and force_gray only for encoded datum "
                           "(the records of '%s' are raw pixels)", self.name, p.source)
        channels, height, width = first.shape[2], first.shape[0], first.shape[1]
        self.config.means = _mean_values(tp, channels, self)
        if mean is not None and mean.shape[0] != channels:
            raise self.error(f"mean file '{tp.mean_file}' has {mean.shape[0]} channels, "
                             f"the records {channels}")
        if crop and (height < crop or width < crop):
            raise self.error(f"{p.source}: record 0 is {height}x{width}, smaller than "
                             f"crop_size {crop}")
        self.batch_size = p.batch_size
        self.draws_per_sample = transform_draws(tp, self.phase)
        h, w = (crop, crop) if crop else (height, width)
        top[0].reshape((p.batch_size, channels, h, w))
        logger.info("output data size: %d,%d,%d,%d", p.batch_size, channels, h, w)
        if len(top) > 1:
            top[1].reshape((p.batch_size,))
        self.start_prefetch()

    def _open(self, p):
        try:
            return Cursor(open_db(p.source, p.backend), p.source)
        except OSError as e:        # DBError, or the reader's own on the first record
            raise self.error(str(e)) from None

    def _first_record(self):
        """(image, encoded) of record 0, which sizes the tops."""
        where = self._where(0)
        try:
            datum = parse_datum(self.cursor.value(), where)
            return datum_image(datum, where, self.config.color), datum.encoded
        except DataError as e:
            raise self.error(str(e)) from None

    def _where(self, index):
        return f"{self.config.source}: record {index}"

    def plan_batch(self):
        records = []
        for _ in range(self.batch_size):
            draws = (self.transform_rng.words(self.draws_per_sample).tolist()
                     if self.transform_rng is not None else [])
            records.append((self.cursor.value(), self._where(self.cursor.index), draws))
            try:
                self.cursor.next()
            except OSError as e:    # a damaged page or block met on the way
                raise self.error(str(e)) from None
        return _build_datum_batch, (self.config, records)

    def position_state(self):
        return {"index": self.cursor.index,
                "transform_rng": (self.transform_rng.get_state()
                                  if self.transform_rng is not None else None)}

    def restore_position(self, state):
        try:
            self.cursor.seek(int(state["index"]))
        except DBError as e:
            raise self.error(str(e)) from None
        if self.transform_rng is not None and state.get("transform_rng") is not None:
            self.transform_rng.set_state(state["transform_rng"])


def parse_datum(value, where):
    from ..proto import caffe_pb2
    try:
        return caffe_pb2.Datum.FromString(value)
    except Exception as e:      # protobuf's DecodeError
        raise DataError(f"{where} is not a Datum: {e}") from None


def datum_image(datum, where, color=None):
    """The Datum's H x W x C image: uint8 pixels, float_data as float32, or the decoded
    image of an encoded Datum (``color`` as ``decode_image``'s)."""
    if datum.encoded:
        try:
            img = decode_image(datum.data, color, name=where)
        except ImageReadError as e:
            raise DataError(f"{where}: could not decode its image: {e.reason}") from None
        return img[:, :, None] if img.ndim == 2 else img
    shape = (datum.channels, datum.height, datum.width)
    count = int(np.prod(shape))
    if min(shape) <= 0:
        raise DataError(f"{where}: Datum of {shape[0]}x{shape[1]}x{shape[2]} "
                        f"(channels x height x width) holds no pixels")
    if len(datum.data):
        if len(datum.data) != count:
            raise DataError(f"{where}: Datum of {shape[0]}x{shape[1]}x{shape[2]} holds "
                            f"{len(datum.data)} bytes of data, not {count}")
        pixels = np.frombuffer(datum.data, dtype=np.uint8)
    elif len(datum.float_data) == count:
        pixels = np.asarray(datum.float_data, dtype=np.float32)
    else:
        raise DataError(f"{where}: Datum of {shape[0]}x{shape[1]}x{shape[2]} holds "
                        f"{len(datum.float_data)} float_data values and no data bytes")
    return pixels.reshape(shape).transpose(1, 2, 0)


def _build_datum_batch(cfg, records):
    data = label = None
    for i, (value, where, draws) in enumerate(until_exit(records)):
        datum = parse_datum(value, where)
        img = datum_image(datum, where, cfg.color)
        if data is None:
            h, w = (cfg.crop, cfg.crop) if cfg.crop else img.shape[:2]
            data = np.empty((len(records), img.shape[2], h, w), cfg.dtype)
            label = np.empty((len(records),), cfg.dtype)
        if img.shape[2] != data.shape[1]:
            raise DataError(f"{where} has {img.shape[2]} channels, the batch "
                            f"{data.shape[1]} (the channels of its first record)")
        data[i] = transform_image(cfg, img, draws, data.shape[2:], where)
        label[i] = datum.label
    return data, label
