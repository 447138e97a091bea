"""VideoSegData (spec deeplab_extra_layers.md section 5).

Oracles: ImageSegData on the same list without the background column (channels 0-2,
label, data_dim must be identical, random draws included) and OpenCV's cv2.resize
for the background channels (bilinear straight to the top size, mean-subtracted,
neither scaled, cropped nor mirrored)."""
import os

import numpy as np
import pytest
from PIL import Image

import caffelite
from caffelite.io.prototxt import parse_text
from caffelite.layer import LayerError
from caffelite.net import NetError
from caffelite.proto import caffe_pb2

MEAN = (104.0, 117.0, 123.0)


def data_net(kind, source, root, label_type="PIXEL", phase=caffelite.TRAIN, batch=2,
             transform="crop_size: 9 mirror: true scale: 0.5 "
                       "mean_value: 104 mean_value: 117 mean_value: 123", extra=""):
    text = f'''layer {{ name: "data" type: "{kind}" top: "data" top: "label" top: "dim"
      image_data_param {{ source: "{source}" root_folder: "{root}" batch_size: {batch}
                         label_type: {label_type} shuffle: true {extra} }}
      transform_param {{ {transform} }} }}'''
    return caffelite.Net(param=parse_text(text, caffe_pb2.NetParameter()), phase=phase)


def write_set(tmp_path, rng, n=3):
    video, plain, backgrounds = [], [], []
    for i in range(n):
        h, w = 11 + i, 13 - i
        # image i's pixels lie in [80 i, 80 i + 80): a batch item tells its source
        Image.fromarray(rng.integers(80 * i, 80 * i + 80, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 21, (h, w)).astype(np.uint8)).save(
            tmp_path / f"lab{i}.png")
        bg = rng.integers(0, 256, (7 + 2 * i, 15, 3), dtype=np.uint8)
        Image.fromarray(bg).save(tmp_path / f"bg{i}.png")
        backgrounds.append(np.ascontiguousarray(bg[:, :, ::-1]))       # BGR
        video.append(f"/img{i}.png /lab{i}.png /bg{i}.png")
        plain.append(f"/img{i}.png /lab{i}.png")
    (tmp_path / "video.txt").write_text("\n".join(video) + "\n")
    (tmp_path / "plain.txt").write_text("\n".join(plain) + "\n")
    return backgrounds


def test_image_channels_match_image_seg_data_and_background_is_resized(tmp_path):
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    backgrounds = write_set(tmp_path, rng)
    outs = []
    for kind, lst in (("VideoSegData", "video.txt"), ("ImageSegData", "plain.txt")):
        caffelite.set_random_seed(3)          # same shuffle, mirror and crop draws
        net = data_net(kind, tmp_path / lst, tmp_path)
        batches = []
        for _ in range(3):
            net.forward()
            batches.append({k: net.blobs[k].data.copy() for k in ("data", "label", "dim")})
        outs.append(batches)
    order = []
    for video, plain in zip(*outs):
        assert video["data"].shape == (2, 6, 9, 9)
        np.testing.assert_array_equal(video["data"][:, :3], plain["data"])
        np.testing.assert_array_equal(video["label"], plain["label"])
        np.testing.assert_array_equal(video["dim"], plain["dim"])
        order.append(video)
    # background channels: the item's own background, resized to 9 x 9, minus the means
    # only (the image channels are (pixel - mean) * 0.5, whose range names the source)
    expected = [(cv2.resize(bg, (9, 9), interpolation=cv2.INTER_LINEAR).astype(np.float32)
                 - np.float32(MEAN)).transpose(2, 0, 1) for bg in backgrounds]
    seen = set()
    for batch in order:
        for item in batch["data"]:
            sources = np.unique((item[0] / 0.5 + MEAN[0]) // 80)
            assert len(sources) == 1
            seen.add(int(sources[0]))
            np.testing.assert_array_equal(item[3:], expected[int(sources[0])])
    assert seen == {0, 1, 2}


def test_label_type_none_reads_two_columns(tmp_path):
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    backgrounds = write_set(tmp_path, rng, n=1)
    (tmp_path / "none.txt").write_text("/img0.png /bg0.png\n")
    net = data_net("VideoSegData", tmp_path / "none.txt", tmp_path, label_type="NONE",
                   phase=caffelite.TEST, batch=1,
                   transform="crop_size: 9 mean_value: 104 mean_value: 117 mean_value: 123")
    net.forward()
    expected = cv2.resize(backgrounds[0], (9, 9), interpolation=cv2.INTER_LINEAR)
    expected = (expected.astype(np.float32) - np.float32(MEAN)).transpose(2, 0, 1)
    np.testing.assert_array_equal(net.blobs["data"].data[0, 3:], expected)
    assert np.all(net.blobs["label"].data == 255)


def test_errors(tmp_path):
    rng = np.random.default_rng(2)
    write_set(tmp_path, rng, n=1)
    with pytest.raises(NetError, match=r"plain.txt:1: no background column"):
        data_net("VideoSegData", tmp_path / "plain.txt", tmp_path)
    with pytest.raises(NetError, match="needs colour"):
        data_net("VideoSegData", tmp_path / "video.txt", tmp_path, extra="is_color: false",
                 transform="crop_size: 9 mean_value: 104")
    (tmp_path / "missing.txt").write_text("/img0.png /lab0.png /nope.png\n")
    net = data_net("VideoSegData", tmp_path / "missing.txt", tmp_path)
    with pytest.raises(Exception, match="could not load background image"):
        net.forward()


@pytest.mark.parametrize("lines", ["/img0.png /bg0.png\n", "/img0.png /bg0.png /lab0.png\n"])
def test_label_type_image_takes_the_background_from_the_second_column(tmp_path, lines):
    # The fork reads column 2 into the label string; IMAGE's label is its atoi (0 for a
    # path) and the background is read from that same string's first word
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(4)
    backgrounds = write_set(tmp_path, rng, n=1)
    (tmp_path / "image.txt").write_text(lines)
    for label_type in ("IMAGE", None):      # IMAGE is image_data_param's default
        text = f'label_type: {label_type} ' if label_type else ""
        net = caffelite.Net(param=parse_text(f'''layer {{ name: "data" type: "VideoSegData"
          top: "data" top: "label" top: "dim"
          image_data_param {{ source: "{tmp_path / 'image.txt'}" root_folder: "{tmp_path}"
                             batch_size: 1 {text}}}
          transform_param {{ crop_size: 9 mean_value: 104 mean_value: 117
                             mean_value: 123 }} }}''', caffe_pb2.NetParameter()),
                            phase=caffelite.TEST)
        net.forward()
        expected = cv2.resize(backgrounds[0], (9, 9), interpolation=cv2.INTER_LINEAR)
        expected = (expected.astype(np.float32) - np.float32(MEAN)).transpose(2, 0, 1)
        np.testing.assert_array_equal(net.blobs["data"].data[0, 3:], expected)
        label = net.blobs["label"].data
        assert np.all((label == 0) | (label == 255)) and np.any(label == 0)


def test_blank_lines_are_samples_and_names_are_bytes(tmp_path):
    """As ImageSegData's: the fork's getline loop keeps a blank line as a sample (it
    counts in the list and fails when reached), and reads names as bytes."""
    rng = np.random.default_rng(3)
    write_set(tmp_path, rng, n=1)
    try:
        Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).save(
            os.fsdecode(os.fsencode(tmp_path) + b"/bg\xe9.png"))
    except (OSError, UnicodeError):
        pytest.skip("the file system refuses file names that are not UTF-8")
    (tmp_path / "b.txt").write_bytes(b"/img0.png /lab0.png /bg\xe9.png\r\n")
    data_net("VideoSegData", tmp_path / "b.txt", tmp_path, batch=1).forward()
    (tmp_path / "b.txt").write_bytes(b"/img0.png /lab0.png /bg\xe9.png\r\n\r\n")
    # batch 2 holds both samples, in either order (the blank one first fails setup)
    with pytest.raises((NetError, LayerError), match=r"b.txt:2: line 2 of the list is empty"):
        data_net("VideoSegData", tmp_path / "b.txt", tmp_path, batch=2).forward()
