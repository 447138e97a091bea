"""pycaffe's caffe.io helpers."""
import numpy as np
import pytest
from PIL import Image

import caffelite as caffe
from caffelite.proto import caffe_pb2


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
    back = caffe.io.datum_to_array(d)
    np.testing.assert_array_equal(back, a)
    assert d.label == 4
    back[0, 0, 0] = 99              # pycaffe's np.fromstring array is a writable copy
    assert caffe.io.datum_to_array(d)[0, 0, 0] == 0


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
    with pytest.raises(ValueError, match=r"^Mean channels incompatible with input\. "):
        t.set_mean("data", np.zeros(2))


def test_oversample_gives_ten_crops():
    crops = caffe.io.oversample([np.random.rand(8, 10, 3)], (4, 4))
    assert crops.shape == (10, 4, 4, 3)


def test_blobproto_vector_strings_round_trip():
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.float32([[[7.5]]]),
              np.zeros((0,), np.float32)]
    data = caffe.io.arraylist_to_blobprotovector_str(arrays)
    assert isinstance(data, bytes)
    vec = caffe.proto.caffe_pb2.BlobProtoVector.FromString(data)
    assert [list(b.shape.dim) for b in vec.blobs] == [[2, 3], [1, 1, 1], [0]]
    back = caffe.io.blobprotovector_str_to_arraylist(data)
    assert len(back) == 3
    for a, b in zip(arrays, back):
        np.testing.assert_array_equal(a, b)


def test_blobproto_shapes_as_pycaffe():
    blob = caffe.proto.caffe_pb2.BlobProto()
    blob.data.extend([0.0] * 100)
    with pytest.raises(ValueError):                 # no shape at all: 100 values
        caffe.io.blobproto_to_array(blob)
    one = caffe.proto.caffe_pb2.BlobProto()
    one.data.append(123)
    assert caffe.io.blobproto_to_array(one) == 123   # a scalar
    with_diff = caffe.io.array_to_blobproto(np.ones((2, 2)), diff=np.full((2, 2), 3.0))
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(with_diff, return_diff=True),
                                  np.full((2, 2), 3.0))


def test_datum_label_and_float_data():
    with_label = caffe.io.array_to_datum(np.ones((3, 2, 2)), label=1)
    without = caffe.io.array_to_datum(np.ones((3, 2, 2)))
    # the fork's io.py (label=0, always written), not later BVLC's label=None
    assert without.HasField("label") and without.label == 0 and with_label.label == 1
    assert len(with_label.SerializeToString()) == len(without.SerializeToString())
    with pytest.raises(TypeError):
        caffe.io.array_to_datum(np.ones((3, 2, 2)), label=2.5)
    # BVLC 1.0's label=None leaves the label unset (the fork's io.py would fail)
    unset = caffe.io.array_to_datum(np.ones((3, 2, 2)), None)
    assert not unset.HasField("label") and len(unset.float_data) == 12
    assert len(without.float_data) == 12 and not without.data
    np.testing.assert_array_equal(caffe.io.datum_to_array(without), np.ones((3, 2, 2)))
    with pytest.raises(ValueError, match="C x H x W"):
        caffe.io.array_to_datum(np.ones((2, 2)))


def test_load_image_gray_color_and_alpha(tmp_path):
    gray = np.array([[0, 51], [102, 255]], np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    tiled = caffe.io.load_image(str(tmp_path / "g.png"))
    assert tiled.shape == (2, 2, 3)
    np.testing.assert_allclose(tiled[..., 2], gray / 255.0, rtol=1e-6)
    single = caffe.io.load_image(str(tmp_path / "g.png"), color=False)
    assert single.shape == (2, 2, 1)

    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 10)
    rgba[0, 1] = (0, 255, 255, 200)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "c.png")
    rgb = caffe.io.load_image(str(tmp_path / "c.png"))
    np.testing.assert_array_equal(rgb[0], [[1, 0, 0], [0, 1, 1]])       # alpha dropped
    lum = caffe.io.load_image(str(tmp_path / "c.png"), color=False)
    # skimage's rgb2gray, as pycaffe's load_image(color=False) gives
    np.testing.assert_allclose(lum[0, :, 0], [0.2125, 0.7154 + 0.0721], rtol=1e-6)
    with pytest.raises(OSError, match="missing.png"):
        caffe.io.load_image(str(tmp_path / "missing.png"))


def test_transformer_elementwise_mean_and_checks():
    t = caffe.io.Transformer({"data": (1, 2, 3, 4)})
    mean = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    t.set_mean("data", mean)
    x = np.ones((3, 4, 2), np.float32)
    t.set_transpose("data", (2, 0, 1))
    np.testing.assert_allclose(t.preprocess("data", x), 1 - mean)
    t2 = caffe.io.Transformer({"data": (1, 1, 3, 4)})
    t2.set_mean("data", np.ones((3, 4)))                 # H x W for one channel
    assert t2.mean["data"].shape == (3, 4)               # kept as given (io.py)
    # pycaffe's texts (io.py), with the shapes after them
    with pytest.raises(ValueError, match=r"^Mean shape incompatible with input shape\. "):
        t.set_mean("data", np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match=r"^Mean shape invalid "):
        t.set_mean("data", np.zeros((1, 3, 4, 4)))
    with pytest.raises(ValueError, match="^label is not one of the net inputs: "):
        t.set_raw_scale("label", 255)
    with pytest.raises(ValueError, match=r"^Channel swap needs to have the same number of "
                       r"dimensions as the input channels\.$"):
        t.set_channel_swap("data", (2, 1, 0))
    with pytest.raises(ValueError, match=r"^Transpose order needs to have the same number "
                       r"of dimensions as the input\.$"):
        t.set_transpose("data", (1, 0))


def test_oversample_corners_centre_and_mirrors():
    image = np.arange(5 * 6, dtype=np.float32).reshape(5, 6, 1)
    crops = caffe.io.oversample([image, image + 100], (3, 4))
    assert crops.shape == (20, 3, 4, 1)
    expected = [image[0:3, 0:4], image[0:3, 2:6], image[2:5, 0:4], image[2:5, 2:6],
                image[1:4, 1:5]]
    for i, e in enumerate(expected):
        np.testing.assert_array_equal(crops[i], e)
        np.testing.assert_array_equal(crops[5 + i], e[:, ::-1])
        np.testing.assert_array_equal(crops[10 + i], e + 100)


# caffe.io.resize_image (io.py) on 1 or 3 channels: scale to [0, 1] by min/max, then
# skimage.transform.resize with the defaults of the fork's time (mode 'constant', cval 0,
# no anti-aliasing): output pixel i samples (i + 0.5) * in / out - 0.5, outside reads 0.
# Orders 2 and 3 are scipy's splines, as in skimage >= 0.19 (the oracle below).
ROW = np.array([[0.2, 1.0, 0.6]], np.float32)[:, :, None]     # 1 x 3 x 1, std [0, 1, .5]


def test_resize_image_bilinear_blends_borders_with_the_minimum():
    out = caffe.io.resize_image(ROW, (1, 6))
    assert out.shape == (1, 6, 1) and out.dtype == np.float32
    # samples -0.25 .. 2.25: 0.75*0 + 0.25*cval, 0.25*1, 0.75*1, .75*1 + .25*.5,
    # .25*1 + .75*.5, 0.75*0.5 + 0.25*cval; back to [0.2, 1.0] by * 0.8 + 0.2
    np.testing.assert_allclose(out[0, :, 0], [0.2, 0.4, 0.8, 0.9, 0.7, 0.5], rtol=1e-6)


def test_resize_image_nearest_rounds_half_away_from_zero():
    np.testing.assert_allclose(caffe.io.resize_image(ROW, (1, 6), 0)[0, :, 0],
                               [0.2, 0.2, 1.0, 1.0, 0.6, 0.6], rtol=1e-6)
    four = np.array([[0.2, 1.0, 0.6, 0.4]], np.float32)[:, :, None]
    # samples 0.5 and 2.5 round to pixels 1 and 3
    np.testing.assert_allclose(caffe.io.resize_image(four, (1, 2), 0)[0, :, 0], [1.0, 0.4],
                               rtol=1e-6)


def test_resize_image_constant_and_other_channel_counts():
    flat = caffe.io.resize_image(np.full((2, 3, 3), 7.5), (4, 5))
    assert flat.shape == (4, 5, 3) and flat.dtype == np.float32 and np.all(flat == 7.5)
    two = np.zeros((2, 2, 2), np.float32)
    two[..., 0] = [[0, 4], [8, 12]]
    two[..., 1] = 1
    out = caffe.io.resize_image(two, (3, 3))          # scipy zoom: corners aligned
    np.testing.assert_allclose(out[..., 0], [[0, 2, 4], [4, 6, 8], [8, 10, 12]], atol=1e-5)
    np.testing.assert_allclose(out[..., 1], np.ones((3, 3)), atol=1e-6)


@pytest.mark.parametrize("order", [0, 1, 2, 3])
@pytest.mark.parametrize("shape,dims", [((5, 7, 3), (11, 4)), ((6, 6, 1), (3, 3)),
                                        ((13, 5, 1), (2, 17)), ((1, 1, 3), (3, 2))])
def test_resize_image_matches_skimage_constant_mode(order, shape, dims):
    skimage_transform = pytest.importorskip("skimage.transform")
    im = (np.random.default_rng(3).random(shape) * 200 - 50).astype(np.float32)
    lo, hi = im.min(), im.max()
    std = ((im - lo) / (hi - lo)).astype(np.float64)
    expected = skimage_transform.resize(std, dims, order=order, mode="constant", cval=0,
                                        anti_aliasing=False) * (hi - lo) + lo
    np.testing.assert_allclose(caffe.io.resize_image(im, dims, order), expected,
                               rtol=0, atol=2e-5)


def test_transformer_resizes_then_transposes_swaps_scales_and_subtracts():
    rgb = np.concatenate([ROW, ROW * 0.5, ROW * 0.25], axis=2)   # 1 x 3 x 3, min 0.05
    t = caffe.io.Transformer({"data": (1, 3, 1, 6)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    t.set_mean("data", np.array([10.0, 20.0, 30.0]))
    x = t.preprocess("data", rgb)
    # blob channel 2 = R resized: interior samples are plain bilinear, the two border
    # samples weigh the outside (the global minimum 0.05) by 0.25
    red = np.array([0.75 * 0.2 + 0.25 * 0.05, 0.75 * 0.2 + 0.25 * 1.0,
                    0.25 * 0.2 + 0.75 * 1.0, 0.75 * 1.0 + 0.25 * 0.6,
                    0.25 * 1.0 + 0.75 * 0.6, 0.75 * 0.6 + 0.25 * 0.05])
    np.testing.assert_allclose(x[2, 0], red * 255 - 30, rtol=1e-5)


def test_transformer_subtracts_a_float64_mean_in_float64():
    t = caffe.io.Transformer({"data": (1, 1, 1, 1)})
    t.set_mean("data", np.array([0.3]))
    x = t.preprocess("data", np.full((1, 1, 1), 0.5, np.float32))
    # numpy's float32 -= float64 array: float32(0.5 - 0.3) = float32(0.2), not
    # 0.5 - float32(0.3) = 0.19999998807907104
    assert x.dtype == np.float32 and x[0, 0, 0] == np.float32(0.2)
    back = t.deprocess("data", x)
    assert back.dtype == np.float32 and back == np.float32(0.5)


def test_blobproto_to_array_gives_float64_like_pycaffe():
    # io.py: np.array(blob.data) of the proto's Python floats is float64
    blob = caffe.proto.caffe_pb2.BlobProto(num=1, channels=3, height=1, width=1)
    blob.data.extend([104.00698793, 116.66876762, 122.67891434])
    arr = caffe.io.blobproto_to_array(blob)
    assert arr.dtype == np.float64 and arr.shape == (1, 3, 1, 1)
    np.testing.assert_array_equal(arr.ravel(), np.float32([104.00698793, 116.66876762,
                                                           122.67891434]))
    assert caffe.io.arraylist_to_blobprotovecor_str([np.ones(2)]) == \
        caffe.io.arraylist_to_blobprotovector_str([np.ones(2)])


def test_blobproto_to_array_reads_data_as_io_py():
    # io.py reads blob.data (or blob.diff); double_data only where those are empty
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.append(2)
    blob.data.extend([1, 2])
    blob.double_data.extend([3, 4])
    blob.double_diff.extend([5, 6])
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob), [1, 2])
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob, return_diff=True), [5, 6])
    del blob.data[:]
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob), [3, 4])


def test_load_image_keeps_float_images_and_scales_int32_as_skimage(tmp_path):
    """img_as_float: float images keep their values, int32 ones are divided by
    2**31 - 1; a missing file is a FileNotFoundError as skimage's imread raises."""
    values = np.array([[0.02, 0.5], [0.98, 1.5]], np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    got = caffe.io.load_image(str(tmp_path / "f.tif"), color=False)
    assert got.shape == (2, 2, 1) and got.dtype == np.float32
    np.testing.assert_array_equal(got[:, :, 0], values)
    tiled = caffe.io.load_image(str(tmp_path / "f.tif"))
    assert tiled.shape == (2, 2, 3) and np.array_equal(tiled[:, :, 2], values)
    ints = np.array([[0, 1 << 20], [1 << 30, 2 ** 31 - 1]], np.int32)
    Image.fromarray(ints, mode="I").save(tmp_path / "i.tif")
    got = caffe.io.load_image(str(tmp_path / "i.tif"), color=False)[:, :, 0]
    np.testing.assert_array_equal(got, (ints / (2 ** 31 - 1)).astype(np.float32))
    with pytest.raises(FileNotFoundError, match="cannot read image '.*nope.png': no such"):
        caffe.io.load_image(str(tmp_path / "nope.png"))


def test_load_image_downloads_a_url_as_skimage_does(tmp_path):
    """skimage.io.imread (pycaffe's load_image) reads http(s) URLs; served here locally."""
    import functools
    import http.server
    import threading
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "cat.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        np.testing.assert_array_equal(caffe.io.load_image(f"{url}/cat.png"),
                                      caffe.io.load_image(str(tmp_path / "cat.png")))
        with pytest.raises(OSError, match=f"^cannot read image '{url}/dog.png': File not "
                                          f"found$"):
            caffe.io.load_image(f"{url}/dog.png")
        np.testing.assert_array_equal(caffe.io.load_image(f"file://{tmp_path}/cat.png"),
                                      caffe.io.load_image(str(tmp_path / "cat.png")))
    finally:
        server.shutdown()
        server.server_close()
