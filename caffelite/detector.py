"""pycaffe's ``caffe.Detector``: classify windows (crops) of images with a Net.

As the fork's python/caffe/detector.py (R-CNN style): each window ``(ymin, xmin, ymax,
xmax)`` of an image is cut out, optionally with ``context_pad`` pixels of surrounding
context (warped as R-CNN does, out-of-image parts filled with the mean), warped to the
net input by ``caffe.io.Transformer.preprocess`` and classified with ``forward_all``.
"""
import math
import os

import numpy as np

from . import io
from .backend import TEST
from .classifier import input_transformer
from .net import Net


class Detector(Net):
    """``Detector(model_file, pretrained_file, mean=None, input_scale=None,
    raw_scale=None, channel_swap=None, context_pad=None)``."""

    def __init__(self, model_file, pretrained_file, mean=None, input_scale=None,
                 raw_scale=None, channel_swap=None, context_pad=None):
        Net.__init__(self, model_file, pretrained_file, TEST)
        self.transformer = input_transformer(self, mean, input_scale, raw_scale,
                                             channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows):
        """[(image file, [window, ...]), ...] -> one dict per window: ``window``,
        ``prediction`` (the first net output for it) and ``filename``."""
        images_windows = [(name, list(windows)) for name, windows in images_windows]
        window_inputs = []
        for image_fname, windows in images_windows:
            image = io.load_image(image_fname).astype(np.float32)
            for window in windows:
                window_inputs.append(self.crop(image, window))
        if not window_inputs:
            raise ValueError(f"Detector.detect_windows: no windows given (for "
                             f"{len(images_windows)} image(s)); it takes [(image file, "
                             f"[(ymin, xmin, ymax, xmax), ...]), ...]")
        in_ = self.inputs[0]
        caffe_in = np.zeros((len(window_inputs), window_inputs[0].shape[2])
                            + tuple(self.blobs[in_].data.shape[2:]), dtype=np.float32)
        for ix, window_in in enumerate(window_inputs):
            caffe_in[ix] = self.transformer.preprocess(in_, window_in)
        predictions = self.forward_all(**{in_: caffe_in})[self.outputs[0]]
        detections = []
        ix = 0
        for image_fname, windows in images_windows:
            for window in windows:
                detections.append({"window": window, "prediction": predictions[ix],
                                   "filename": image_fname})
                ix += 1
        return detections

    def detect_selective_search(self, image_fnames):
        """Windows proposed by selective_search_ijcv_with_python (an external module,
        which needs MATLAB), then ``detect_windows``."""
        import selective_search_ijcv_with_python as selective_search
        image_fnames = [os.path.abspath(f) for f in image_fnames]
        windows_list = selective_search.get_windows(image_fnames,
                                                    cmd="selective_search_rcnn")
        return self.detect_windows(zip(image_fnames, windows_list))

    def crop(self, im, window):
        """The window of ``im`` (H x W x K); with ``context_pad``, R-CNN's box grown so
        that the window fills the net input minus the padding, clipped to the image and
        placed on a mean-filled input-sized crop."""
        window = np.asarray(window)
        if not self.context_pad:
            return im[int(window[0]):int(window[2]), int(window[1]):int(window[3])]
        crop_size = self.blobs[self.inputs[0]].width       # assumes a square input
        scale = crop_size / (1.0 * crop_size - self.context_pad * 2)
        half_h = (window[2] - window[0] + 1) / 2.0
        half_w = (window[3] - window[1] + 1) / 2.0
        centre = (window[0] + half_h, window[1] + half_w)
        box = np.round(np.tile(centre, 2) + scale * np.array((-half_h, -half_w,
                                                              half_h, half_w)))
        scale_h = crop_size / (box[2] - box[0] + 1)
        scale_w = crop_size / (box[3] - box[1] + 1)
        pad_y = _round_half_away(max(0, -box[0]) * scale_h)   # out of the image
        pad_x = _round_half_away(max(0, -box[1]) * scale_w)
        im_h, im_w = im.shape[:2]
        box = np.clip(box, 0.0, [im_h, im_w, im_h, im_w])
        clip_h, clip_w = box[2] - box[0] + 1, box[3] - box[1] + 1
        if not (clip_h > 0 and clip_w > 0):
            raise ValueError(f"window {window.tolist()} lies outside the {im_h} x {im_w} "
                             f"image")
        crop_h = min(_round_half_away(clip_h * scale_h), crop_size - pad_y)
        crop_w = min(_round_half_away(clip_w * scale_w), crop_size - pad_x)
        context = im[int(box[0]):int(box[2]), int(box[1]):int(box[3])]
        context = io.resize_image(context, (crop_h, crop_w))
        crop = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
        crop[pad_y:pad_y + crop_h, pad_x:pad_x + crop_w] = context
        return crop

    def configure_crop(self, context_pad):
        """Crop dimensions (H x W x K of the net input) and, for context padding, the
        mean in unprocessed image space (transpose, channel swap and raw scale undone)."""
        in_ = self.inputs[0]
        tpose = self.transformer.transpose[in_]
        inv_tpose = [tpose[t] for t in tpose]        # detector.py's inverse of (2, 0, 1)
        self.crop_dims = np.array(self.blobs[in_].data.shape[1:])[inv_tpose]
        self.context_pad = context_pad
        if not self.context_pad:
            return
        channel_order = self.transformer.channel_swap.get(in_)
        raw_scale = self.transformer.raw_scale.get(in_)
        mean = self.transformer.mean.get(in_)
        if mean is None:
            self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
            return
        crop_mean = mean.copy().transpose(inv_tpose)
        if channel_order is not None:
            order = list(channel_order)
            crop_mean = crop_mean[:, :, [order.index(i) for i in range(crop_mean.shape[2])]]
        if raw_scale is not None:
            crop_mean = crop_mean / raw_scale
        self.crop_mean = crop_mean


def _round_half_away(value):
    """Python 2's round() (detector.py ran under it): halves away from zero, as int."""
    return int(math.copysign(math.floor(abs(value) + 0.5), value))
