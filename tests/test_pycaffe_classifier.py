"""pycaffe's caffe.Classifier and caffe.Detector (python/caffe/classifier.py,
detector.py), checked against crops cut by hand and the net evaluated in numpy."""
import numpy as np
import pytest
from PIL import Image

import caffelite as caffe

DEPLOY = """name: 'cls' input: 'data' input_shape { dim: 2 dim: 3 dim: 4 dim: 4 }
layer { type: 'InnerProduct' name: 'ip' bottom: 'data' top: 'ip'
  inner_product_param { num_output: 5 weight_filler { type: 'gaussian' std: 0.002 }
    bias_filler { type: 'gaussian' std: 1 } } }
layer { type: 'Softmax' name: 'prob' bottom: 'ip' top: 'prob' }
"""
DETECT = DEPLOY.replace("layer { type: 'Softmax' name: 'prob' bottom: 'ip' top: 'prob' }",
                        "")
MEAN = np.array([0.25, 0.5, 0.75]) * 255
SWAP = (2, 1, 0)


def save_net(tmp_path, text, name):
    proto = tmp_path / f"{name}.prototxt"
    proto.write_text(text)
    net = caffe.Net(str(proto), caffe.TEST)
    weights = str(tmp_path / f"{name}.caffemodel")
    net.save(weights)
    w, b = (p.data.astype(np.float64) for p in net.params["ip"])
    return str(proto), weights, w, b


def preprocess_by_hand(crop):
    """H x W x 3 RGB in [0, 1] -> 3 x H x W BGR * 255 - mean."""
    x = crop.astype(np.float64).transpose(2, 0, 1)[list(SWAP)]
    return x * 255 - MEAN[:, None, None]


def scores(w, b, crop, softmax=True):
    z = w @ preprocess_by_hand(crop).ravel() + b
    if not softmax:
        return z
    e = np.exp(z - z.max())
    return e / e.sum()


def test_classifier_averages_the_ten_oversampled_crops(tmp_path):
    proto, weights, w, b = save_net(tmp_path, DEPLOY, "cls")
    clf = caffe.Classifier(proto, weights, image_dims=(6, 7), mean=MEAN, raw_scale=255,
                           channel_swap=SWAP)
    rng = np.random.default_rng(5)
    images = [rng.random((6, 7, 3)).astype(np.float32) for _ in range(3)]
    predictions = clf.predict(images)
    assert predictions.shape == (3, 5)
    for image, got in zip(images, predictions):
        # corners (0,0) (0,3) (2,0) (2,3), the centre (1,1), then the same mirrored
        boxes = [(0, 0), (0, 3), (2, 0), (2, 3), (1, 1)]
        crops = [image[y:y + 4, x:x + 4] for y, x in boxes]
        crops += [c[:, ::-1] for c in crops]
        expected = np.mean([scores(w, b, c) for c in crops], axis=0)
        assert expected.max() < 0.99        # not one-hot: the values are compared
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_classifier_centre_crop_truncates_the_box(tmp_path):
    proto, weights, w, b = save_net(tmp_path, DEPLOY, "cls")
    clf = caffe.Classifier(proto, weights, image_dims=(6, 7), mean=MEAN, raw_scale=255,
                           channel_swap=SWAP)
    image = np.random.default_rng(6).random((6, 7, 3)).astype(np.float32)
    got = clf.predict([image], oversample=False)
    # centre (3, 3.5) -+ (2, 2): rows 1..5, columns int(1.5)..int(5.5) = 1..5
    expected = scores(w, b, image[1:5, 1:5])
    assert expected.max() < 0.99
    np.testing.assert_allclose(got[0], expected, rtol=1e-4, atol=1e-6)


@pytest.fixture
def image_file(tmp_path):
    pixels = np.random.default_rng(7).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    path = str(tmp_path / "im.png")
    Image.fromarray(pixels).save(path)
    return path, pixels.astype(np.float64) / 255


def test_detector_classifies_plain_windows(tmp_path, image_file):
    path, image = image_file
    proto, weights, w, b = save_net(tmp_path, DETECT, "det")
    det = caffe.Detector(proto, weights, mean=MEAN, raw_scale=255, channel_swap=SWAP)
    windows = [np.array([0, 0, 4, 4]), np.array([3, 4, 7, 8]), np.array([1, 2, 5, 6])]
    found = det.detect_windows([(path, windows)])
    assert [d["filename"] for d in found] == [path] * 3
    for d, (y0, x0, y1, x1) in zip(found, windows):
        np.testing.assert_allclose(d["prediction"],
                                   scores(w, b, image[y0:y1, x0:x1], softmax=False),
                                   rtol=1e-4, atol=1e-4)


def test_detector_context_padding_as_rcnn(tmp_path, image_file):
    path, image = image_file
    proto, weights, w, b = save_net(tmp_path, DETECT, "det")
    det = caffe.Detector(proto, weights, mean=MEAN, raw_scale=255, channel_swap=SWAP,
                         context_pad=1)
    found = det.detect_windows([(path, [np.array([2, 2, 3, 3]), np.array([0, 0, 1, 1])])])
    # crop 4, pad 1: scale 2.  Window (2,2,3,3): half 1, centre (3,3), box (1,1,5,5),
    # 5 px -> 4 px: the 4 x 4 image part [1:5, 1:5] fills the input.
    np.testing.assert_allclose(found[0]["prediction"],
                               scores(w, b, image[1:5, 1:5], softmax=False),
                               rtol=1e-4, atol=1e-4)
    # Window (0,0,1,1): box (-1,-1,3,3), scale 0.8: pad round(0.8) = 1 row/column of
    # mean (0 after preprocessing), the clipped 4-row box gives round(3.2) = 3 rows:
    # image[0:3, 0:3] lands at [1:4, 1:4].
    crop = np.broadcast_to(MEAN[::-1] / 255, (4, 4, 3)).copy()
    crop[1:4, 1:4] = image[0:3, 0:3]
    np.testing.assert_allclose(found[1]["prediction"], scores(w, b, crop, softmax=False),
                               rtol=1e-4, atol=1e-4)
