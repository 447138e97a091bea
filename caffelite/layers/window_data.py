"""BVLC's ``WindowData`` layer (R-CNN fine-tuning), as the DeepLab fork's Caffe has it.

The window file lists images and their candidate windows::

    # image_index
    image_path            (root_folder is prepended)
    channels
    height
    width
    num_windows
    class_index overlap x1 y1 x2 y2      (num_windows lines, pixel coordinates)

A window with ``overlap >= fg_threshold`` is foreground (its class must be positive);
one with ``overlap < bg_threshold`` is background (label 0); others are unused.  Each
batch samples ``int(batch_size * fg_fraction)`` foreground windows after the
background ones, uniformly with replacement (a word of the layer's own generator
modulo the list size), mirrors each with a second word when ``mirror``, and warps the
window to ``crop_size`` x ``crop_size`` with ``cv::resize`` (bilinear).  With
``context_pad`` (or ``crop_mode: "square"``) the window is first grown so that the
warped crop has that much context on each side; parts outside the image are left 0.
Then ``(pixel - mean) * window_data_param.scale`` (transform_param.scale is not read by
this layer); the mean file is indexed at its centre crop, shifted by the padding.

The geometry is computed in the net's float type with C's ``round`` (half away from
zero), as the layer's code does.  Setup draws from the global generator: the
transformer seed (mirror, or TRAIN), the layer's sampling seed, the transformer seed
again and the prefetch thread's.
"""
import logging
import math
import os

import numpy as np

from ..caffe_rng import CaffeRNG
from ..io.image import INTER_LINEAR, ImageReadError, decode_image, read_image, resize
from .image_data import (DataError, PrefetchingDataLayer, _caffe_rng_rand, _Config,
                         _mean_values, init_transformer_rand, read_transform_mean,
                         until_exit)
from ..layer import register

logger = logging.getLogger("caffelite")

IMAGE, LABEL, OVERLAP, X1, Y1, X2, Y2 = range(7)


class WindowFileError(ValueError):
    """A malformed window file; the message names the file and line."""


def _tokens(path):
    """(token, line number) pairs of the file, as ``ifstream >>`` reads it."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise WindowFileError(f"Failed to open window file '{path}': "
                              f"{e.strerror or e}") from None
    for lineno, line in enumerate(text.split(b"\n"), 1):
        for token in line.split():
            yield token, lineno


def read_window_file(path, fg_threshold, bg_threshold):
    """([(image path, (channels, height, width))], fg windows, bg windows, label
    counts); a window is (image index, label, overlap, x1, y1, x2, y2)."""
    tokens = _tokens(path)
    images, fg, bg, hist = [], [], [], {0: 0}
    fg_threshold, bg_threshold = np.float32(fg_threshold), np.float32(bg_threshold)

    def take(kind, what):
        token, lineno = next(tokens, (None, None))
        if token is None:
            raise WindowFileError(f"{path}: the file ends where {what} should be")
        try:
            return kind(token.decode("latin-1")) if kind is not bytes else token
        except ValueError:
            raise WindowFileError(f"{path}:{lineno}: '{token.decode('latin-1')}' is not "
                                  f"{what}") from None

    first = next(tokens, None)
    if first is None:
        raise WindowFileError(f"{path}: Window file is empty")
    hashtag = first
    while hashtag is not None:
        token, lineno = hashtag
        if token != b"#":
            raise WindowFileError(f"{path}:{lineno}: expected '#' before an image "
                                  f"index, found '{token.decode('latin-1')}'")
        index = take(int, "an image index")
        name = take(bytes, "an image path")
        size = tuple(take(int, f"the image's {d}") for d in ("channels", "height", "width"))
        count = take(int, "a window count")
        images.append((index, os.fsdecode(name), size, count))
        for _ in range(count):
            label = take(int, "a window's class")
            overlap = np.float32(take(float, "a window's overlap"))
            box = [take(int, f"a window's {c}") for c in ("x1", "y1", "x2", "y2")]
            window = (index, label, overlap, *box)
            if overlap >= fg_threshold:
                if label <= 0:
                    raise WindowFileError(f"{path}: image {index}: a foreground window "
                                          f"(overlap {overlap}) has class {label}; "
                                          f"foreground classes must be > 0")
                fg.append(window)
                hist[label] = hist.get(label, 0) + 1
            elif overlap < bg_threshold:
                bg.append((index, 0, np.float32(0), *box))
                hist[0] += 1
        hashtag = next(tokens, None)
    return images, fg, bg, hist


def c_round(value):
    """C's round(): halves away from zero (exact for any double)."""
    magnitude = abs(float(value))
    whole = math.floor(magnitude)
    whole += 1 if magnitude - whole >= 0.5 else 0
    return int(math.copysign(whole, value)) if whole else 0


@register("WindowData")
class WindowDataLayer(PrefetchingDataLayer):
    """Tops: data N x C x crop x crop and label N.  ``state_dict()`` keeps the
    sampling generator."""
    exact_num_top = 2

    def setup(self, bottom, top):
        p, tp = self.layer_param.window_data_param, self.layer_param.transform_param
        mean = read_transform_mean(tp, self)
        init_transformer_rand(tp, self.phase)        # BaseDataLayer::LayerSetUp
        logger.info("Window data layer:\n  foreground (object) overlap threshold: %g\n"
                    "  background (non-object) overlap threshold: %g\n"
                    "  foreground sampling fraction: %g\n  cache_images: %d\n"
                    "  root_folder: %s", p.fg_threshold, p.bg_threshold, p.fg_fraction,
                    p.cache_images, p.root_folder)
        self.sampling_rng = (CaffeRNG(_caffe_rng_rand())
                             if tp.mirror or tp.crop_size else None)
        try:
            images, fg, bg, hist = read_window_file(p.source, p.fg_threshold,
                                                    p.bg_threshold)
        except WindowFileError as e:
            raise self.error(str(e)) from None
        self.fg, self.bg = fg, bg
        paths = self._image_table(images, p)
        cached = self._cache(paths) if p.cache_images else None
        logger.info("Number of images: %d", images[-1][0] + 1)
        for label in sorted(hist):
            logger.info("class %d has %d samples", label, hist[label])
        logger.info("Amount of context padding: %d", p.context_pad)
        logger.info("Crop mode: %s", p.crop_mode)
        crop = tp.crop_size
        if crop <= 0:
            raise self.error("transform_param.crop_size must be positive (the size "
                             "windows are warped to)")
        channels = images[-1][2][0]
        if channels != 3:
            raise self.error(f"{p.source}: images are read in colour (3 channels), but "
                             f"the window file gives {channels} channels")
        self.batch_size = p.batch_size
        num_fg = int(np.float32(p.batch_size) * np.float32(p.fg_fraction))
        self.num_samples = (p.batch_size - num_fg, num_fg)
        # The fork checks both lists at every batch, whatever fg_fraction takes.
        for windows, kind in ((bg, "background"), (fg, "foreground")):
            if not windows:
                raise self.error(f"{p.source}: the file has no {kind} windows "
                                 f"(fg_threshold {p.fg_threshold:g}, bg_threshold "
                                 f"{p.bg_threshold:g}); the fork needs both kinds")
        top[0].reshape((p.batch_size, channels, crop, crop))
        logger.info("output data size: %d,%d,%d,%d", p.batch_size, channels, crop, crop)
        top[1].reshape((p.batch_size,))
        if 2 * p.context_pad >= crop and (p.context_pad > 0 or p.crop_mode == "square"):
            raise self.error(f"context_pad {p.context_pad} leaves no room in a "
                             f"{crop}x{crop} crop")
        self.config = _Config(
            source=p.source, paths=paths, cached=cached, crop=crop,
            context_pad=p.context_pad, square=p.crop_mode == "square",
            mean=None if mean is None else mean.reshape(-1),
            mean_shape=None if mean is None else mean.shape,
            means=_mean_values(tp, channels, self), scale=float(p.scale),
            channels=channels, dtype=self.dtype)
        self.mirror = bool(tp.mirror)
        init_transformer_rand(tp, self.phase)        # BasePrefetchingDataLayer::LayerSetUp
        self.start_prefetch()

    def _image_table(self, images, p):
        """The image paths in file order: a window's image index is a position in
        this list (the layer's image_database_), whatever the '#' lines number."""
        paths = []
        for index, name, size, count in images:
            if index % 100 == 0:
                logger.info("num: %d %s %d %d %d windows to process: %d", index,
                            p.root_folder + name, *size, count)
            paths.append(p.root_folder + name)
        return paths

    def _cache(self, paths):
        """cache_images: every image file's bytes, read once at setup."""
        cached = []
        for position, path in enumerate(paths):
            try:
                with open(path, "rb") as f:
                    cached.append(f.read())
            except OSError as e:
                raise self.error(f"Could not open or find file '{path}' (image "
                                 f"{position} of the window file): {e.strerror or e}") \
                    from None
        return cached

    def plan_batch(self):
        samples = []
        for windows, count in ((self.bg, self.num_samples[0]), (self.fg, self.num_samples[1])):
            for _ in range(count):
                window = windows[self.sampling_rng.rand() % len(windows)]
                do_mirror = self.mirror and self.sampling_rng.rand() % 2 == 1
                samples.append((window, do_mirror))
        return _build_window_batch, (self.config, samples)

    def position_state(self):
        return {"sampling_rng": self.sampling_rng.get_state()}

    def restore_position(self, state):
        self.sampling_rng.set_state(state["sampling_rng"])


def _load(cfg, index):
    if not 0 <= index < len(cfg.paths):
        raise DataError(f"{cfg.source}: a window names image {index}, but the file "
                        f"lists {len(cfg.paths)} images (indices are positions)")
    path = cfg.paths[index]
    try:
        if cfg.cached is not None:
            return decode_image(cfg.cached[index], True, name=path)
        return read_image(path, True)
    except ImageReadError as e:
        raise DataError(f"Could not open or find file '{path}': {e.reason}") from None


def window_geometry(cfg, window, do_mirror, image_shape):
    """(x1, y1, x2, y2, warped height, warped width, pad_h, pad_w): the region to cut
    from the image, the size it is warped to and where it goes in the crop."""
    T = np.dtype(cfg.dtype).type
    crop = cfg.crop
    x1, y1, x2, y2 = window[X1:]
    height = width = crop
    pad_h = pad_w = 0
    if cfg.context_pad > 0 or cfg.square:
        context_scale = T(crop) / T(crop - 2 * cfg.context_pad)
        half_height = T(float(T(y2 - y1 + 1)) / 2.0)
        half_width = T(float(T(x2 - x1 + 1)) / 2.0)
        center_x = T(x1) + half_width
        center_y = T(y1) + half_height
        if cfg.square:
            half_height = half_width = max(half_height, half_width)
        x1 = c_round(center_x - half_width * context_scale)
        x2 = c_round(center_x + half_width * context_scale)
        y1 = c_round(center_y - half_height * context_scale)
        y2 = c_round(center_y + half_height * context_scale)
        unclipped_height, unclipped_width = y2 - y1 + 1, x2 - x1 + 1
        rows, cols = image_shape
        pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
        pad_x2, pad_y2 = max(0, x2 - cols + 1), max(0, y2 - rows + 1)
        x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
        scale_x = T(crop) / T(unclipped_width)
        scale_y = T(crop) / T(unclipped_height)
        width = c_round(T(x2 - x1 + 1) * scale_x)
        height = c_round(T(y2 - y1 + 1) * scale_y)
        pad_x1, pad_x2 = c_round(T(pad_x1) * scale_x), c_round(T(pad_x2) * scale_x)
        pad_y1 = c_round(T(pad_y1) * scale_y)
        pad_h = pad_y1
        pad_w = pad_x2 if do_mirror else pad_x1
        height = min(height, crop - pad_h)
        width = min(width, crop - pad_w)
    return x1, y1, x2, y2, height, width, pad_h, pad_w


def _build_window_batch(cfg, samples):
    dtype = np.dtype(cfg.dtype)
    data = np.zeros((len(samples), cfg.channels, cfg.crop, cfg.crop), dtype)
    label = np.empty((len(samples),), dtype)
    scale = dtype.type(cfg.scale)
    for i, (window, do_mirror) in enumerate(until_exit(samples)):
        img = _load(cfg, window[IMAGE])
        x1, y1, x2, y2, h, w, pad_h, pad_w = window_geometry(cfg, window, do_mirror,
                                                             img.shape[:2])
        where = (f"{cfg.source}: window ({window[X1]}, {window[Y1]}, {window[X2]}, "
                 f"{window[Y2]}) of image {window[IMAGE]} ({img.shape[0]}x{img.shape[1]})")
        if not (0 <= x1 <= x2 < img.shape[1] and 0 <= y1 <= y2 < img.shape[0]):
            raise DataError(f"{where} lies outside the image")
        if h <= 0 or w <= 0:
            raise DataError(f"{where} warps to an empty {h}x{w} region")
        warped = resize(img[y1:y2 + 1, x1:x2 + 1], (h, w), INTER_LINEAR)
        if do_mirror:
            warped = warped[:, ::-1]
        pixels = warped.transpose(2, 0, 1).astype(dtype)
        if cfg.mean is not None:
            pixels = pixels - _mean_patch(cfg, h, w, pad_h, pad_w, where).astype(dtype)
        elif cfg.means:
            pixels = pixels - np.asarray(cfg.means, dtype)[:, None, None]
        data[i, :, pad_h:pad_h + h, pad_w:pad_w + w] = pixels * scale
        label[i] = window[LABEL]
    return data, label


def _mean_patch(cfg, h, w, pad_h, pad_w, where):
    """The mean values the layer subtracts: its flat index, mean_off from the mean's
    width for both axes, as the layer computes it."""
    _, mean_height, mean_width = cfg.mean_shape
    off = int((mean_width - cfg.crop) / 2)          # C's division truncates
    c = np.arange(cfg.channels)[:, None, None]
    hh = np.arange(h)[None, :, None]
    ww = np.arange(w)[None, None, :]
    index = (c * mean_height + hh + off + pad_h) * mean_width + ww + off + pad_w
    if index.min() < 0 or index.max() >= cfg.mean.size:
        raise DataError(f"{where}: the mean file ({'x'.join(map(str, cfg.mean_shape))}) "
                        f"is too small for crop_size {cfg.crop}")
    return cfg.mean[index]
