"""pycaffe's ``caffe.Classifier``: a Net that predicts class probabilities of images.

As the fork's python/caffe/classifier.py: images (H x W x K, e.g. from
``caffe.io.load_image``) are resized to ``image_dims``, then either cut into the ten
``caffe.io.oversample`` crops (predictions averaged over them) or centre-cropped to the
net's input size, run through ``caffe.io.Transformer.preprocess`` and ``forward_all``;
the result is the first net output (outputs sorted by name, as Caffe lists them).
"""
import numpy as np

from . import io
from .backend import TEST
from .net import Net, NetError


def first_input(net, what):
    """The net's first input blob, which pycaffe's Classifier and Detector feed; a net
    that declares none (a train/test prototxt, whose data layers make the images) is
    refused by name where pycaffe stops at an IndexError."""
    if net.inputs:
        return net.inputs[0]
    sources = [f"'{lp.name}' ({lp.type})" for lp in net.layer_params if not lp.bottom]
    raise NetError(f"{net.source}: {what} feeds images to the net's first input blob, but "
                   f"this net declares no inputs"
                   + (f" (its data come from the layer(s) {', '.join(sources)})"
                      if sources else "")
                   + f": give {what} the deploy prototxt (with 'input:' or an Input "
                   f"layer), not the train/test one")


def input_transformer(net, mean, input_scale, raw_scale, channel_swap):
    """The Transformer of pycaffe's Classifier and Detector for the net's first input:
    H x W x K images to K x H x W, then the options that are given."""
    in_ = first_input(net, type(net).__name__)
    transformer = io.Transformer({in_: net.blobs[in_].data.shape})
    transformer.set_transpose(in_, (2, 0, 1))
    for value, setter in ((mean, transformer.set_mean),
                          (input_scale, transformer.set_input_scale),
                          (raw_scale, transformer.set_raw_scale),
                          (channel_swap, transformer.set_channel_swap)):
        if value is not None:
            setter(in_, value)
    return transformer


class Classifier(Net):
    """``Classifier(model_file, pretrained_file, image_dims=None, mean=None,
    input_scale=None, raw_scale=None, channel_swap=None)``."""

    def __init__(self, model_file, pretrained_file, image_dims=None, mean=None,
                 input_scale=None, raw_scale=None, channel_swap=None):
        Net.__init__(self, model_file, pretrained_file, TEST)
        in_ = first_input(self, "Classifier")
        self.transformer = input_transformer(self, mean, input_scale, raw_scale,
                                             channel_swap)
        self.crop_dims = np.array(self.blobs[in_].data.shape[2:])
        if image_dims is None or len(image_dims) == 0:
            image_dims = self.crop_dims
        self.image_dims = image_dims

    def predict(self, inputs, oversample=True):
        """N images -> N x C class probabilities (the ten crops averaged when
        ``oversample``, the centre crop otherwise)."""
        height, width = int(self.image_dims[0]), int(self.image_dims[1])
        if len(inputs) == 0:
            raise ValueError("Classifier.predict: no images given (it takes a list of "
                             "H x W x K images, as caffe.io.load_image gives them)")
        if len(np.shape(inputs[0])) != 3:
            raise ValueError(f"Classifier.predict: image 0 has shape {np.shape(inputs[0])}: "
                             f"it takes H x W x K images (a gray one is H x W x 1, as "
                             f"caffe.io.load_image(path, color=False) gives it)")
        resized = np.zeros((len(inputs), height, width, inputs[0].shape[2]), np.float32)
        for ix, image in enumerate(inputs):
            try:
                image = io.resize_image(image, (height, width))
            except ValueError as e:
                raise ValueError(f"Classifier.predict: image {ix}: {e}") from None
            if image.shape[2] not in (1, resized.shape[3]):    # 1 is broadcast, as in io.py
                raise ValueError(f"Classifier.predict: image {ix} has {image.shape[2]} "
                                 f"channels, image 0 has {resized.shape[3]}: the images "
                                 f"must have image 0's channel count (or 1)")
            resized[ix] = image
        if oversample:
            crops = io.oversample(resized, self.crop_dims)
        else:
            crops = resized[(slice(None),) + self._centre_crop()]
        in_ = self.inputs[0]
        caffe_in = np.zeros(np.array(crops.shape)[[0, 3, 1, 2]], dtype=np.float32)
        for ix, crop in enumerate(crops):
            caffe_in[ix] = self.transformer.preprocess(in_, crop)
        predictions = self.forward_all(**{in_: caffe_in})[self.outputs[0]]
        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1)).mean(1)
        return predictions

    def _centre_crop(self):
        """classifier.py's centre box: image_dims / 2 -+ crop_dims / 2, truncated."""
        centre = np.array(self.image_dims) / 2.0
        box = np.tile(centre, 2) + np.concatenate([-self.crop_dims / 2.0,
                                                   self.crop_dims / 2.0])
        box = box.astype(int)
        return slice(box[0], box[2]), slice(box[1], box[3])
