#!/usr/bin/env python
"""DeepLab inference the pycaffe way: one JPEG in, a VOC-coloured label PNG out.

Written as a pycaffe user writes it: ``caffe.Net``, ``caffe.io.load_image``,
``caffe.io.Transformer``, ``net.forward(start=..., end=...)``, argmax.  The one line a
pycaffe script changes is the import (with the optional ``caffelite-caffe-alias``
installed, ``import caffe`` works unchanged).

On the synthetic example, from the folder ``caffelite demo --out DIR`` filled (``$REPO``
is the caffelite checkout)::

    python $REPO/examples/pycaffe_inference.py \\
        --model voc_synth/config/aspp_slim/test_val.prototxt \\
        --weights voc_synth/model/aspp_slim/train_iter_600.caffemodel \\
        --image data/JPEGImages/val_0000.jpg --output val_0000.png

A DeepLab test net starts with an ImageSegData layer reading its list; like DeepLab's
own wrappers, the script fills the ``data`` blob itself (the image in BGR, minus the
mean, times the scale, padded at the bottom/right to the net's crop size as the data
layer pads with the mean) and runs the net from the layer after the data layer up to
the score blob (``fc8_interp``), so MatWrite layers after it are not run.  The mean and
scale are read from the data layer's ``transform_param`` (DeepLab's mean otherwise).
"""
import argparse
import sys

import numpy as np
from google.protobuf import text_format
from PIL import Image

import caffelite as caffe       # pycaffe: import caffe

DEEPLAB_MEAN_BGR = (104.008, 116.669, 122.675)


def voc_palette():
    """The PASCAL VOC colour map: class 1 dark red (128, 0, 0) ... 255 (224, 224, 192)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def data_transform(model_file, data_blob):
    """Mean and scale of the layer that produces ``data_blob`` in the prototxt."""
    net_param = caffe.proto.caffe_pb2.NetParameter()
    with open(model_file) as f:
        text_format.Merge(f.read(), net_param)
    for layer in net_param.layer:
        if data_blob in layer.top and layer.HasField("transform_param"):
            tp = layer.transform_param
            mean = tuple(tp.mean_value) if len(tp.mean_value) else DEEPLAB_MEAN_BGR
            return np.array(mean, dtype=np.float32), tp.scale
    return np.array(DEEPLAB_MEAN_BGR, dtype=np.float32), 1.0


def layer_after(net, blob):
    """Name of the first layer after the one that produces ``blob``."""
    producer = max(i for i, name in enumerate(net._layer_names) if blob in net.top_names[name])
    return net._layer_names[producer + 1]


def producer_of(net, blob):
    return [name for name in net._layer_names if blob in net.top_names[name]][-1]


def segment(net, image, mean, scale, data_blob="data", score_blob="fc8_interp"):
    """H x W x 3 RGB image in [0, 1] -> H x W uint8 class labels."""
    height, width = image.shape[:2]
    transformer = caffe.io.Transformer({data_blob: (1, 3, height, width)})
    transformer.set_transpose(data_blob, (2, 0, 1))        # H x W x C -> C x H x W
    transformer.set_channel_swap(data_blob, (2, 1, 0))     # RGB -> BGR
    transformer.set_raw_scale(data_blob, 255)              # [0, 1] -> [0, 255]
    transformer.set_mean(data_blob, mean)
    transformer.set_input_scale(data_blob, scale)
    x = transformer.preprocess(data_blob, image)

    _, _, crop_h, crop_w = net.blobs[data_blob].data.shape
    padded_h, padded_w = max(crop_h, height), max(crop_w, width)
    if (padded_h, padded_w) != (crop_h, crop_w):
        net.blobs[data_blob].reshape(1, 3, padded_h, padded_w)
    net.blobs[data_blob].data[...] = 0                     # the mean, after subtraction
    net.blobs[data_blob].data[0, :, :height, :width] = x

    out = net.forward(start=layer_after(net, data_blob), end=producer_of(net, score_blob))
    scores = out[score_blob][0, :, :height, :width]
    return scores.argmax(axis=0).astype(np.uint8)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="test (or deploy) prototxt")
    parser.add_argument("--weights", required=True, help="trained .caffemodel")
    parser.add_argument("--image", required=True, help="input JPEG")
    parser.add_argument("--output", required=True, help="label PNG to write")
    parser.add_argument("--score-blob", default="fc8_interp")
    args = parser.parse_args(argv)

    caffe.set_mode_cpu()
    net = caffe.Net(args.model, caffe.TEST, weights=args.weights)
    mean, scale = data_transform(args.model, "data")
    image = caffe.io.load_image(args.image)
    labels = segment(net, image, mean, scale, score_blob=args.score_blob)

    png = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
    png.putpalette(voc_palette())
    png.save(args.output)
    classes, counts = np.unique(labels, return_counts=True)
    print(f"{args.output}: {labels.shape[1]}x{labels.shape[0]}, classes "
          + ", ".join(f"{c} ({n} px)" for c, n in zip(classes, counts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
