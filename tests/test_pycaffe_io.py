"""pycaffe's caffe.io helpers."""
import numpy as np
import pytest
from PIL import Image

import caffelite as caffe


def test_blobproto_round_trip_and_legacy_shape():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    blob = caffe.io.array_to_blobproto(a)
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob), a)
    legacy = caffe.proto.caffe_pb2.BlobProto(num=1, channels=2, height=1, width=3)
    legacy.data.extend(range(6))
    assert caffe.io.blobproto_to_array(legacy).shape == (1, 2, 1, 3)


def test_datum_round_trip():
    a = np.arange(12, dtype=np.uint8).reshape(3, 2, 2)
    d = caffe.io.array_to_datum(a, label=4)
    np.testing.assert_array_equal(caffe.io.datum_to_array(d), a)
    assert d.label == 4


def test_load_image_and_transformer(tmp_path):
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 255                      # pure red
    path = str(tmp_path / "im.png")
    Image.fromarray(rgb).save(path)
    im = caffe.io.load_image(path)
    assert im.shape == (4, 6, 3) and im.dtype == np.float32 and im[0, 0, 0] == 1.0
    t = caffe.io.Transformer({"data": (1, 3, 4, 6)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    t.set_mean("data", np.array([104.0, 117.0, 123.0]))
    x = t.preprocess("data", im)
    assert x.shape == (3, 4, 6)
    np.testing.assert_allclose(x[:, 0, 0], [0 - 104, 0 - 117, 255 - 123])   # BGR
    np.testing.assert_allclose(t.deprocess("data", x), im, atol=1e-5)
    with pytest.raises(ValueError, match="3 channels"):
        t.set_mean("data", np.zeros(2))


def test_oversample_gives_ten_crops():
    crops = caffe.io.oversample([np.random.rand(8, 10, 3)], (4, 4))
    assert crops.shape == (10, 4, 4, 3)
