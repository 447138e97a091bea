"""Bad input through caffelite's image reading, pycaffe's Classifier, Detector, io and
Blob, and the HDF5 data, output and weight files: one clear error naming the file, the
layer, the blob or the input, never numpy's, h5py's or Pillow's own exception; and what
Caffe reads (images of any size) or pycaffe accepts (a gray H x W x 1 image) still
works."""
import threading
import warnings

import numpy as np
import pytest
from PIL import Image

import caffelite as caffe
from caffelite import evaluate
from caffelite.io import caffemodel
from caffelite.io import image as image_io
from caffelite.io.image import ImageReadError, decode_image, read_image, read_label
from caffelite.io.prototxt import parse_text
from caffelite.layer import LayerError
from caffelite.layers.hdf5_output import refuse_truncating_an_input
from caffelite.net import NetError
from caffelite.proto import caffe_pb2

DEPLOY = """name: 'cls' input: 'data' input_shape { dim: 2 dim: 3 dim: 8 dim: 8 }
layer { type: 'InnerProduct' name: 'ip' bottom: 'data' top: 'ip'
  inner_product_param { num_output: 4 weight_filler { type: 'gaussian' std: 0.3 } } }
layer { type: 'Softmax' name: 'prob' bottom: 'ip' top: 'prob' }
"""
TRAIN = """name: 'train'
layer { name: 'data' type: 'DummyData' top: 'data' top: 'label'
  dummy_data_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } shape { dim: 2 } } }
layer { type: 'InnerProduct' name: 'ip' bottom: 'data' top: 'ip'
  inner_product_param { num_output: 4 } }
layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'ip' bottom: 'label' top: 'loss' }
"""


def write(path, text):
    path.write_text(text)
    return str(path)


# ------------------------------------------------------- F4: Pillow's pixel limit
@pytest.fixture
def tiny_pixel_limit(monkeypatch):
    """Pillow's decompression-bomb limit at 40 pixels: a 10 x 10 image (100 pixels,
    more than twice the limit) is one Pillow refuses, as it refuses 14000 x 14000."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)


@pytest.fixture
def big_files(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "big.png")
    Image.fromarray(rgb).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray((rgb[:, :, 0] % 5).astype(np.uint8)).save(tmp_path / "label.png")
    return tmp_path, rgb


def test_caffelite_reads_images_over_pillows_limit(tiny_pixel_limit, big_files):
    """cv::imread has no pixel limit: every caffelite read takes the image, with no
    DecompressionBombWarning either."""
    folder, rgb = big_files
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # a DecompressionBombWarning fails the test
        np.testing.assert_array_equal(read_image(str(folder / "big.png")), rgb[:, :, ::-1])
        assert read_image(str(folder / "big.jpg"), color=False).shape == (10, 10)
        np.testing.assert_array_equal(read_label(str(folder / "label.png")),
                                      rgb[:, :, 0] % 5)
        png = (folder / "big.png").read_bytes()
        np.testing.assert_array_equal(decode_image(png, True), rgb[:, :, ::-1])
        np.testing.assert_allclose(caffe.io.load_image(str(folder / "big.png")),
                                   rgb / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(
            evaluate.read_label_map(str(folder / "label.png")), rgb[:, :, 0] % 5)


def test_the_users_own_pillow_keeps_its_limit(tiny_pixel_limit, big_files):
    """Pillow's MAX_IMAGE_PIXELS is left alone: after caffelite's reads, and in another
    thread while one of them runs, the user's Image.open still refuses the image."""
    folder, _ = big_files
    read_image(str(folder / "big.png"))
    assert Image.MAX_IMAGE_PIXELS == 40
    with pytest.raises(Image.DecompressionBombError):
        Image.open(folder / "big.png")
    inside, done, seen = threading.Event(), threading.Event(), []

    def caffelite_read():
        with image_io.pixel_limit_lifted():
            seen.append(Image.open(folder / "big.png").size)   # lifted in this thread
            inside.set()
            done.wait(10)

    thread = threading.Thread(target=caffelite_read)
    thread.start()
    try:
        assert inside.wait(10)
        with pytest.raises(Image.DecompressionBombError):      # not in this one
            Image.open(folder / "big.png")
    finally:
        done.set()
        thread.join()
    assert seen == [(10, 10)]
    with warnings.catch_warnings(record=True) as caught:       # the warning stays too
        warnings.simplefilter("always")
        Image.MAX_IMAGE_PIXELS = 80
        Image.open(folder / "big.png")
    assert any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught)


def test_image_data_layer_reads_an_image_over_pillows_limit(tiny_pixel_limit, big_files):
    folder, rgb = big_files
    write(folder / "list.txt", "big.png 3\n")
    net = caffe.Net(param=parse_text(f"""
        layer {{ name: "d" type: "ImageData" top: "data" top: "label"
          image_data_param {{ source: "{folder / 'list.txt'}" root_folder: "{folder}/"
                             batch_size: 1 }} }}""", caffe_pb2.NetParameter()),
        phase=caffe.TEST)
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data[0],
                                  rgb[:, :, ::-1].transpose(2, 0, 1))


def test_a_pillow_without_the_hook_gets_an_error_naming_the_file(monkeypatch, big_files):
    """Where this Pillow has no check to wrap, the refusal names the file and says how
    to lift the limit, instead of Pillow's bare DecompressionBombError."""
    folder, _ = big_files

    def refuse(size, *args, **kwargs):
        raise Image.DecompressionBombError("Image size (100 pixels) exceeds limit")

    monkeypatch.setattr(image_io, "_lift_hook", lambda Image: False)
    monkeypatch.setattr(Image, "_decompression_bomb_check", refuse)
    path = str(folder / "big.png")
    with pytest.raises(ImageReadError, match=rf"cannot read image '{path}': Image size .*"
                       r"MAX_IMAGE_PIXELS = None"):
        read_image(path)
    with pytest.raises(OSError, match=rf"cannot read image '{path}'"):
        caffe.io.load_image(path)
    with pytest.raises(evaluate.EvalError, match=rf"cannot read prediction '{path}'"):
        evaluate.read_label_map(path)


# ------------------------------------------- F7: Classifier, Detector, Transformer
@pytest.fixture
def deploy(tmp_path):
    proto = write(tmp_path / "deploy.prototxt", DEPLOY)
    weights = str(tmp_path / "w.caffemodel")
    caffe.Net(proto, caffe.TEST).save(weights)
    return proto, weights


@pytest.mark.parametrize("cls", [caffe.Classifier, caffe.Detector])
def test_classifier_and_detector_on_a_train_net_name_the_net(tmp_path, deploy, cls):
    train = write(tmp_path / "train.prototxt", TRAIN)
    name = cls.__name__
    with pytest.raises(NetError, match=rf"^{train}: {name} feeds images to the net's first "
                       rf"input blob, but this net declares no inputs \(its data come from "
                       rf"the layer\(s\) 'data' \(DummyData\)\): give {name} the deploy "
                       rf"prototxt"):
        cls(train, deploy[1])


def test_predict_takes_gray_images_as_pycaffe_does(deploy):
    """pycaffe (checked with BVLC's): an H x W x 1 image on a 3-channel net is broadcast
    to the three channels, as the same image tiled."""
    gray = np.random.default_rng(1).random((10, 10, 1)).astype(np.float32)
    c = caffe.Classifier(*deploy)
    for oversample in (True, False):
        np.testing.assert_allclose(c.predict([gray], oversample),
                                   c.predict([np.tile(gray, (1, 1, 3))], oversample),
                                   rtol=1e-6)
    colour = np.tile(gray, (1, 1, 3))
    assert c.predict([colour, gray]).shape == (2, 4)      # a later gray image too


def test_predict_bad_images_are_named(deploy):
    gray = np.random.default_rng(1).random((10, 10, 1)).astype(np.float32)
    c = caffe.Classifier(*deploy)
    with pytest.raises(ValueError, match=r"^Classifier\.predict: no images given"):
        c.predict([])
    with pytest.raises(ValueError, match=r"^Classifier\.predict: image 0 has shape "
                       r"\(10, 10\): it takes H x W x K images \(a gray one is H x W x 1"):
        c.predict([gray[:, :, 0]])
    with pytest.raises(ValueError, match=r"^Classifier\.predict: image 1 has 3 channels, "
                       r"image 0 has 1"):
        c.predict([gray, np.tile(gray, (1, 1, 3))])
    with pytest.raises(ValueError, match=r"^Classifier\.predict: image 1: resize_image "
                       r"needs an H x W x K array"):
        c.predict([gray, gray[:, :, 0]])


def test_gray_images_with_channel_swap_or_mean_say_so(deploy):
    """pycaffe stops at an IndexError (channel swap) or numpy's in-place refusal (a
    3-channel mean on 1 channel); both are named, with the way out."""
    gray = np.random.default_rng(1).random((10, 10, 1)).astype(np.float32)
    swap = caffe.Classifier(*deploy, channel_swap=(2, 1, 0))
    with pytest.raises(ValueError, match=r"^Transformer\.preprocess\('data'\): the channel "
                       r"swap \(2, 1, 0\) takes 3 channels .* has shape \(1, 8, 8\) \(a gray "
                       r"image: load it with caffe\.io\.load_image\(path\), color=True"):
        swap.predict([gray])
    mean = caffe.Classifier(*deploy, mean=np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"^Transformer\.preprocess\('data'\): the image "
                       r".* has shape \(1, 8, 8\), which the mean of shape \(3, 1, 1\) does "
                       r"not fit \(a gray image for a 3-channel mean"):
        mean.predict([gray])
    # raw_scale and input_scale are scalars: a gray image passes, as in pycaffe
    scaled = caffe.Classifier(*deploy, raw_scale=255.0)
    assert scaled.predict([gray]).shape == (1, 4)


def test_transformer_shape_errors_name_the_input():
    t = caffe.io.Transformer({"data": (1, 3, 4, 4)})
    t.set_transpose("data", (2, 0, 1))
    t.set_mean("data", np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"^Transformer\.preprocess\('data'\): the image has "
                       r"shape \(4, 4\), but the transpose \(2, 0, 1\) takes 3 axes"):
        t.preprocess("data", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"^Transformer\.deprocess\('data'\): the squeezed "
                       r"array has shape \(5, 4, 4\), which the mean of shape \(3, 1, 1\) "
                       r"does not fit$"):
        t.deprocess("data", np.zeros((5, 4, 4)))
    back = t.deprocess("data", t.preprocess("data", np.ones((4, 4, 3), np.float32)))
    np.testing.assert_allclose(back, np.ones((4, 4, 3)))
    swap = caffe.io.Transformer({"data": (1, 3, 4, 4)})
    swap.set_transpose("data", (2, 0, 1))
    swap.set_channel_swap("data", (2, 1, 0))
    with pytest.raises(ValueError, match=r"^Transformer\.deprocess\('data'\): the channel "
                       r"swap \(2, 1, 0\) takes 3 channels along the first axis; the "
                       r"squeezed array has shape \(2, 4, 4\)$"):
        swap.deprocess("data", np.zeros((2, 4, 4)))
    # io.py's x[order] may drop channels: a 4-channel image through a 3-channel swap
    assert swap.preprocess("data", np.zeros((4, 4, 4), np.float32)).shape == (3, 4, 4)


def test_detect_windows_without_windows_is_named(tmp_path, deploy):
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "a.png")
    d = caffe.Detector(*deploy)
    with pytest.raises(ValueError, match=r"^Detector\.detect_windows: no windows given "
                       r"\(for 1 image\(s\)\)"):
        d.detect_windows([(str(tmp_path / "a.png"), [])])


# -------------------------------------------------------- F8: HDF5Data of no rows
def test_hdf5_data_file_without_rows_names_the_file_and_layer(tmp_path):
    h5py = pytest.importorskip("h5py")
    h5 = str(tmp_path / "empty.h5")
    with h5py.File(h5, "w") as f:
        f["data"] = np.zeros((0, 3, 2, 2), np.float32)
        f["label"] = np.zeros(0, np.float32)
    source = write(tmp_path / "list.txt", h5 + "\n")
    proto = write(tmp_path / "net.prototxt", f"""
        layer {{ name: "d" type: "HDF5Data" top: "data" top: "label"
          hdf5_data_param {{ source: "{source}" batch_size: 2 }} }}""")
    with pytest.raises(NetError, match=rf"^{proto}: layer 'd' \(HDF5Data\): HDF5 file "
                       rf"'{h5}': the datasets \['data', 'label'\] have no rows \(shapes "
                       rf"\[\(0, 3, 2, 2\), \(0,\)\]\)"):
        caffe.Net(proto, caffe.TEST)


# ------------------------------------------------------ F9: HDF5 weights' layout
def h5_weights(path, fill):
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        fill(f)
    return str(path)


def read_weights(path, wanted=("ip",), error=caffemodel.CaffemodelError):
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "r") as f:
        return [(name, None if group is None else
                 [caffemodel.hdf5_weight_blob(group, j, path, name, error)
                  for j in range(len(group))])
                for name, group in caffemodel.hdf5_weight_layers(f, path, wanted, error)]


WEIGHT_LAYOUTS = [
    (lambda f: f.create_dataset("data", data=np.zeros(3)),
     r"not a Caffe HDF5 weights file: 'data' is a dataset of shape \(3,\), not the group "
     r"of layers"),
    (lambda f: f.create_dataset("weights", data=np.zeros(3)),
     r"not a Caffe HDF5 weights file \(no 'data' group\)"),
    (lambda f: f.create_dataset("data/ip", data=np.zeros((3, 48), np.float32)),
     r"layer 'ip' \(data/ip\) is a dataset of shape \(3, 48\), not a group of blobs"),
    (lambda f: (f.create_group("data/ip/0"), f.create_group("data/ip/1")),
     r"layer 'ip' blob 0 \(data/ip/0\) is a group, not a dataset of the blob's values"),
    (lambda f: f.create_dataset("data/ip/0", data=np.array([b"abc"] * 3)),
     r"layer 'ip' blob 0 \(data/ip/0\) holds \|S3 values; Caffe reads float and integer "
     r"datasets only"),
    (lambda f: f.__setitem__("data/ip/0", h5py_soft_link("/nowhere")),
     r"layer 'ip' blob 0 \(data/ip/0\): cannot open it"),
]


@pytest.mark.parametrize("fill, words", WEIGHT_LAYOUTS)
def test_hdf5_weights_of_another_layout_name_the_file_and_member(tmp_path, fill, words):
    path = h5_weights(tmp_path / "w.h5", fill)
    with pytest.raises(caffemodel.CaffemodelError, match=rf"^{path}: {words}"):
        read_weights(path)
    with pytest.raises(NetError, match=rf"^{path}: {words}"):     # the Net's own class
        read_weights(path, error=NetError)


def h5py_soft_link(target):
    import h5py
    return h5py.SoftLink(target)


def test_hdf5_weights_of_caffes_layout_are_read(tmp_path):
    """Blobs of float or integer type are read; a malformed layer that the net does not
    have is passed over unopened, as Caffe ignores it."""
    path = h5_weights(tmp_path / "w.h5", lambda f: (
        f.create_dataset("data/ip/0", data=np.ones((3, 48), np.float64)),
        f.create_dataset("data/ip/1", data=np.arange(3, dtype=np.int32)),
        f.create_dataset("data/other", data=np.zeros(5))))
    (ip_name, (w, b)), (other, skipped) = read_weights(path)
    assert (ip_name, other, skipped) == ("ip", "other", None)
    np.testing.assert_array_equal(w, np.ones((3, 48)))
    np.testing.assert_array_equal(b, [0, 1, 2])


# -------------------------------------------- F13: HDF5Output over the HDF5Data input
def hdf5_net_layers(tmp_path, listed, output):
    source = write(tmp_path / "list.txt", listed + "\n")
    net = parse_text(f"""
        layer {{ name: "d" type: "HDF5Data" top: "data" top: "label"
          hdf5_data_param {{ source: "{source}" batch_size: 2 }} }}
        layer {{ name: "o" type: "HDF5Output" bottom: "data" bottom: "label"
          hdf5_output_param {{ file_name: "{output}" }} }}""", caffe_pb2.NetParameter())
    return source, list(net.layer)


@pytest.fixture
def train_h5(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "train.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.ones((4, 3, 2, 2), np.float32)
        f["label"] = np.arange(4, dtype=np.float32)
    return path


def test_hdf5_output_onto_the_nets_own_input_is_refused(tmp_path, train_h5):
    other_spelling = str(tmp_path / "." / "train.h5")
    source, layers = hdf5_net_layers(tmp_path, other_spelling, str(train_h5))
    before = train_h5.read_bytes()
    with pytest.raises(LayerError, match=rf"^layer 'o' \(HDF5Output\): hdf5_output_param"
                       rf"\.file_name '{train_h5}' is the file '{other_spelling}' that "
                       rf"layer 'd' \(HDF5Data\) reads \(listed in '{source}'\); HDF5Output "
                       rf"empties its file when the net is built"):
        refuse_truncating_an_input(layers)
    assert train_h5.read_bytes() == before


@pytest.mark.parametrize("case", ["another output", "no such output yet",
                                  "unreadable list"])
def test_hdf5_output_elsewhere_is_caffes(tmp_path, train_h5, case):
    """Only the net's own existing input is protected; otherwise Caffe's behaviour (the
    output file truncated at set-up) is kept, and a list HDF5Data cannot read is left
    to its own error."""
    output = str(tmp_path / ("out.h5" if case != "unreadable list" else "train.h5"))
    if case == "another output":
        (tmp_path / "out.h5").write_bytes(b"old")
    source, layers = hdf5_net_layers(tmp_path, str(train_h5), output)
    if case == "unreadable list":
        layers[0].hdf5_data_param.source = str(tmp_path / "missing.txt")
    refuse_truncating_an_input(layers)


# ------------------------------------------------------------ F20: small API cases
@pytest.fixture
def blob():
    return caffe.Blob((2, 3))


@pytest.mark.parametrize("dims, words", [
    (("2", "x"), r"blob shape \('2', 'x'\): axis 0 is '2' \(str\), not an integer"),
    ((2, None), r"blob shape \(2, None\): axis 1 is None \(NoneType\)"),
    ((2.5, 3), r"blob shape \(2\.5, 3\): axis 0 is 2\.5 \(float\)"),
    ((float("nan"),), r"axis 0 is nan \(float\)"),
])
def test_blob_reshape_names_a_dimension_that_is_no_integer(blob, dims, words):
    """pycaffe's boost.python takes integers only; int('x') or int(2.5) were a bare
    ValueError or a silent 2."""
    with pytest.raises(TypeError, match=words):
        blob.reshape(*dims)
    assert blob.shape == (2, 3)


def test_blob_reshape_keeps_taking_numpy_integers(blob):
    blob.reshape(np.int64(4), np.int32(5))
    assert blob.shape == (4, 5) and all(type(s) is int for s in blob.shape)
    blob.reshape(True, 3)
    assert blob.shape == (1, 3)


def test_resize_image_sizes_are_named():
    im = np.random.default_rng(2).random((4, 4, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"^resize_image: cannot resize the image of shape "
                       r"\(4, 4, 3\) to \(0, 5\): a size of 0"):
        caffe.io.resize_image(im, (0, 5))
    with pytest.raises(ValueError, match=r"^resize_image: new_dims \(-1, 5\) has a negative "
                       r"size"):
        caffe.io.resize_image(im, (-1, 5))
    with pytest.raises(ValueError, match=r"^resize_image: the image of shape \(0, 4, 3\) has "
                       r"no pixels"):
        caffe.io.resize_image(np.zeros((0, 4, 3)), (2, 2))
    # io.py gives these an empty array: a constant image (np.empty().fill) and other
    # channel counts (scipy's zoom)
    assert caffe.io.resize_image(np.ones((4, 4, 3)), (0, 5)).shape == (0, 5, 3)
    assert caffe.io.resize_image(im[:, :, :2], (0, 5)).shape == (0, 5, 2)


def test_blobproto_to_array_counts_are_named():
    bp = caffe_pb2.BlobProto()
    bp.shape.dim.extend([3, 4, 4])
    bp.data.extend([0.0] * 10)
    with pytest.raises(ValueError, match=r"^blobproto_to_array: the BlobProto has 10 data "
                       r"values, which its shape \(3, 4, 4\) does not hold$"):
        caffe.io.blobproto_to_array(bp)
    with pytest.raises(ValueError, match=r"has 0 diff values"):
        caffe.io.blobproto_to_array(bp, return_diff=True)
    inferred = caffe_pb2.BlobProto()        # numpy's reshape infers a -1, as in io.py
    inferred.shape.dim.extend([-1, 5])
    inferred.data.extend([1.0] * 10)
    assert caffe.io.blobproto_to_array(inferred).shape == (2, 5)


HOOK_NET = """name: 'n' input: 'data' input_shape { dim: 2 dim: 3 dim: 4 dim: 4 }
layer { type: 'InnerProduct' name: 'ip' bottom: 'data' top: 'ip'
  inner_product_param { num_output: 3 } }
"""


@pytest.mark.parametrize("fill, words", WEIGHT_LAYOUTS)
def test_net_hdf5_weights_of_another_layout(tmp_path, fill, words):
    proto = tmp_path / "net.prototxt"
    proto.write_text(HOOK_NET)
    path = h5_weights(tmp_path / "w.h5", fill)
    with pytest.raises(NetError, match=rf"^{path}: {words}"):
        caffe.Net(str(proto), caffe.TEST, weights=path)


def test_net_refuses_hdf5_output_onto_its_hdf5_data_input(tmp_path, monkeypatch):
    h5py = pytest.importorskip("h5py")
    monkeypatch.chdir(tmp_path)
    with h5py.File("train.h5", "w") as f:
        f["data"] = np.ones((4, 3, 2, 2), np.float32)
        f["label"] = np.arange(4, dtype=np.float32)
    (tmp_path / "list.txt").write_text("train.h5\n")
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "d" type: "HDF5Data" top: "data" top: "label" '
        'hdf5_data_param { source: "list.txt" batch_size: 2 } }\n'
        'layer { name: "o" type: "HDF5Output" bottom: "data" bottom: "label" '
        'hdf5_output_param { file_name: "train.h5" } }\n')
    with pytest.raises(NetError, match=r"^net\.prototxt: layer 'o' \(HDF5Output\): "
                       r"hdf5_output_param\.file_name 'train\.h5' is the file 'train\.h5' "
                       r"that layer 'd' \(HDF5Data\) reads"):
        caffe.Net("net.prototxt", caffe.TEST)
    with h5py.File("train.h5", "r") as f:
        assert sorted(f) == ["data", "label"]


def test_layer_dict_and_top_names_name_the_layers(tmp_path):
    proto = tmp_path / "net.prototxt"
    proto.write_text(HOOK_NET)
    net = caffe.Net(str(proto), caffe.TEST)
    for mapping in (net.layer_dict, net.top_names, net.bottom_names):
        with pytest.raises(KeyError, match=r"'fc8': no layer of that name \(there are: "
                           r"'ip'\)"):
            mapping["fc8"]
