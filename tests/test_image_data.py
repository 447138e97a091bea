"""ImageSegData / ImageData / HDF5Data and the OpenCV-exact image helpers.

Oracles: OpenCV (``cv2.resize``, ``cv2.imread``; test-only) for decoding and
resizing, and expectations derived by hand from the fork's TransformImgAndSeg
(spec section 3) over synthetic images written here with Pillow.
"""
import ctypes
import ctypes.util
import logging
import os

import numpy as np
import pytest
from PIL import Image

import caffelite
from caffelite.caffe_rng import c_rand
from caffelite.io.image import INTER_LINEAR, INTER_NEAREST, read_image, read_label, resize
from caffelite.io.prototxt import parse_text
from caffelite.layer import LayerError
from caffelite.net import NetError
from caffelite.proto import caffe_pb2

MEAN = (104.0, 117.0, 123.0)


def make_net(text, phase=caffelite.TEST):
    return caffelite.Net(param=parse_text(text, caffe_pb2.NetParameter()), phase=phase)


def seg_net(source, root, batch=1, label_type="PIXEL", transform="", extra="",
            phase=caffelite.TEST, tops=("data", "label")):
    top_text = " ".join(f'top: "{t}"' for t in tops)
    return make_net(f'''
        layer {{ name: "data" type: "ImageSegData" {top_text}
          image_data_param {{ source: "{source}" root_folder: "{root}" batch_size: {batch}
                             label_type: {label_type} {extra} }}
          transform_param {{ {transform} }} }}''', phase)


def write_rgb(path, h, w, rng):
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return np.ascontiguousarray(rgb[:, :, ::-1])           # BGR as the layer sees it


def write_label(path, h, w, rng, classes=21):
    lab = rng.integers(0, classes, (h, w)).astype(np.uint8)
    Image.fromarray(lab).save(path)
    return lab


def make_dataset(tmp_path, sizes, seed=0):
    """Images + index labels of the given sizes; list lines start with '/' (string
    concatenation to root_folder, as the DeepLab lists do)."""
    rng = np.random.default_rng(seed)
    images, labels, lines = [], [], []
    for i, (h, w) in enumerate(sizes):
        images.append(write_rgb(tmp_path / f"img{i}.png", h, w, rng))
        labels.append(write_label(tmp_path / f"lab{i}.png", h, w, rng))
        lines.append(f"/img{i}.png /lab{i}.png extra_column_ignored")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "list.txt"), str(tmp_path), images, labels


def mean_transform(crop=8, mirror=False, more=""):
    means = " ".join(f"mean_value: {m}" for m in MEAN)
    return f"crop_size: {crop} mirror: {str(mirror).lower()} {means} {more}"


def expected_nchw(bgr):
    return (bgr.astype(np.float32) - np.float32(MEAN)).transpose(2, 0, 1)


# ------------------------------------------------------------------ OpenCV-exact I/O
def test_resize_matches_opencv_on_random_sizes():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    cases = [(int(h), int(w), int(dh), int(dw)) for h, w, dh, dw in
             rng.integers(1, 90, size=(250, 4))]
    for h, w in [(13, 17), (500, 375), (281, 500), (12, 16), (1, 9), (7, 1)]:   # DeepLab scales
        for s in (0.5, 0.75, 1.25, 1.5):
            cases.append((h, w, int(np.float32(h) * np.float32(s)),
                          int(np.float32(w) * np.float32(s))))
    checked = 0
    for h, w, dh, dw in cases:
        if dh < 1 or dw < 1:
            continue
        for cn in (1, 3):
            img = rng.integers(0, 256, (h, w, cn), dtype=np.uint8)
            img = img[:, :, 0] if cn == 1 else img
            for interp in (INTER_LINEAR, INTER_NEAREST):
                expected = cv2.resize(img, (dw, dh), interpolation=interp)
                got = resize(img, (dh, dw), interp)
                assert got.dtype == np.uint8 and got.shape == expected.shape
                assert np.array_equal(got, expected), (h, w, dh, dw, cn, interp)
                checked += 1
    assert checked > 1000


def test_resize_exact_halving_uses_area_rounding():
    # 2x downscale: OpenCV switches INTER_LINEAR to the 2x2 area mean, (a+b+c+d+2)>>2.
    img = np.array([[0, 1, 2, 2], [0, 0, 2, 3]], np.uint8)
    assert resize(img, (1, 2), INTER_LINEAR).tolist() == [[(0 + 1 + 0 + 0 + 2) >> 2,
                                                           (2 + 2 + 2 + 3 + 2) >> 2]]


def test_read_image_matches_imread(tmp_path):
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(2)
    rgb = cv2.GaussianBlur(rng.integers(0, 256, (21, 34, 3), dtype=np.uint8), (5, 5), 2)
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=90)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(np.dstack([rgb, rgb[:, :, :1]])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[:, :, 1]).save(tmp_path / "g.jpg")
    Image.fromarray(rng.integers(0, 65536, (9, 11)).astype(np.uint16)).save(tmp_path / "w.png")
    for name in ("c.jpg", "c.png", "rgba.png", "g.jpg", "w.png"):
        path = str(tmp_path / name)
        assert np.array_equal(read_image(path, True), cv2.imread(path, cv2.IMREAD_COLOR)), name
        assert np.array_equal(read_image(path, False),
                              cv2.imread(path, cv2.IMREAD_GRAYSCALE)), name


def test_colour_png_read_gray_matches_imread_on_noise(tmp_path):
    # Noise, not a blurred image: libpng's 15-bit RGB->gray coefficients round the last
    # bit differently from a naive 0.299/0.587 * 32768, on a few pixels in a thousand.
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(tmp_path / "n.png")
    pal = Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), mode="P")
    pal.putpalette(rng.integers(0, 256, 768).tolist())
    pal.save(tmp_path / "p.png")
    for name in ("n.png", "p.png"):
        path = str(tmp_path / name)
        assert np.array_equal(read_image(path, False),
                              cv2.imread(path, cv2.IMREAD_GRAYSCALE)), name
    # A colour (non-palette) label PNG is read as the fork does: imread(GRAYSCALE).
    path = str(tmp_path / "n.png")
    assert np.array_equal(read_label(path), cv2.imread(path, cv2.IMREAD_GRAYSCALE))


def test_palette_label_reads_its_luminance_as_the_fork_with_one_warning(tmp_path, caplog):
    """The fork reads labels with cv::imread(GRAYSCALE): a palette PNG gives its colours'
    luminance (VOC's SegmentationClass colours are not their indices), with a warning."""
    import caffelite.io.image as image_io
    idx = np.array([[0, 1, 2], [15, 1, 255]], np.uint8)
    img = Image.fromarray(idx, mode="L").convert("P")
    palette = [0] * 768
    palette[3:6] = [128, 0, 0]            # VOC colours: luminance != index
    palette[6:9] = [0, 128, 0]
    img.putpalette(palette)
    img.save(tmp_path / "p.png")
    image_io._palette_warned[0] = False
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        first = read_label(str(tmp_path / "p.png"))
        second = read_label(str(tmp_path / "p.png"))
    want = read_image(str(tmp_path / "p.png"), False)
    assert np.array_equal(first, want) and np.array_equal(second, want)
    assert first[0, 1] == 38 and first[0, 2] == 75       # libpng's 15-bit coefficients
    warnings = [r for r in caplog.records if "palette" in r.getMessage()]
    assert len(warnings) == 1 and "luminance" in warnings[0].getMessage()
    cv2 = pytest.importorskip("cv2")
    assert np.array_equal(first, cv2.imread(str(tmp_path / "p.png"), cv2.IMREAD_GRAYSCALE))


def test_colour_label_reads_its_luminance_with_one_warning(tmp_path, caplog):
    """VOC's SegmentationClass colours saved as RGB: read as the fork reads them
    (imread GRAYSCALE), once with a warning; a grey picture stored as RGB is no colour."""
    cv2 = pytest.importorskip("cv2")
    import caffelite.io.image as image_io
    colours = np.zeros((2, 3, 3), np.uint8)
    colours[0, 0] = (0, 0, 128)
    colours[1, 2] = (128, 0, 0)
    grey = np.repeat(np.array([[0, 1, 2], [15, 1, 255]], np.uint8)[:, :, None], 3, axis=2)
    Image.fromarray(colours).save(tmp_path / "colours.png")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    image_io._colour_label_warned[0] = False
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        assert np.array_equal(read_label(str(tmp_path / "grey.png")), grey[:, :, 0])
        assert not caplog.records
        for _ in range(2):
            assert np.array_equal(read_label(str(tmp_path / "colours.png")),
                                  cv2.imread(str(tmp_path / "colours.png"),
                                             cv2.IMREAD_GRAYSCALE))
    assert [r.getMessage()[:70] for r in caplog.records] == [
        f"label '{tmp_path / 'colours.png'}' is a colour image: reading its luminance"[:70]]


# ------------------------------------------------------------------- ImageSegData
def test_test_phase_pads_bottom_right_and_centre_crops(tmp_path):
    # Odd sizes smaller than, mixed with and larger than the 8 x 8 crop.
    source, root, images, labels = make_dataset(tmp_path, [(5, 7), (11, 13), (5, 13)])
    net = seg_net(source, root, transform=mean_transform(8))
    assert net.blobs["data"].shape == (1, 3, 8, 8)
    assert net.blobs["(automatic)"].shape == (1, 1, 1, 2)
    for img, lab in zip(images, labels):
        net.forward()
        h, w = lab.shape
        ph, pw = max(8 - h, 0), max(8 - w, 0)
        h_off, w_off = (h + ph - 8) // 2, (w + pw - 8) // 2        # centre, floor
        canvas = np.zeros((3, h + ph, w + pw), np.float32)      # mean pad -> exactly 0
        canvas[:, :h, :w] = expected_nchw(img)
        lab_canvas = np.full((h + ph, w + pw), 255, np.float32)
        lab_canvas[:h, :w] = lab
        data = net.blobs["data"].data[0]
        assert np.array_equal(data, canvas[:, h_off:h_off + 8, w_off:w_off + 8])
        assert np.array_equal(net.blobs["label"].data[0, 0],
                              lab_canvas[h_off:h_off + 8, w_off:w_off + 8])
        assert net.blobs["(automatic)"].data.ravel().tolist() == [min(8, h), min(8, w)]
    # The small image sits at the top-left: its padding is exactly 0 / 255.
    net2 = seg_net(source, root, transform=mean_transform(8))
    net2.forward()
    assert np.all(net2.blobs["data"].data[0, :, 5:, :] == 0)
    assert np.all(net2.blobs["data"].data[0, :, :, 7:] == 0)
    assert np.all(net2.blobs["label"].data[0, 0, 5:, :] == 255)


def test_train_random_crop_offsets_and_mirror(tmp_path):
    source, root, images, labels = make_dataset(tmp_path, [(10, 9)])
    caffelite.set_random_seed(7)
    net = seg_net(source, root, transform=mean_transform(8, mirror=True),
                  phase=caffelite.TRAIN)
    full = expected_nchw(images[0])
    seen = set()
    for _ in range(80):
        net.forward()
        data, lab = net.blobs["data"].data[0], net.blobs["label"].data[0, 0]
        matches = [(dy, dx, m) for dy in range(3) for dx in range(2) for m in (False, True)
                   if np.array_equal(data, (full[:, dy:dy + 8, dx:dx + 8][:, :, ::-1] if m
                                            else full[:, dy:dy + 8, dx:dx + 8]))]
        assert len(matches) == 1
        dy, dx, m = matches[0]
        crop = labels[0][dy:dy + 8, dx:dx + 8]
        assert np.array_equal(lab, crop[:, ::-1] if m else crop)   # same crop and flip
        seen.add(matches[0])
    # Offsets are uniform over the inclusive range 0..H-crop, 0..W-crop, both flips.
    assert seen == {(dy, dx, m) for dy in range(3) for dx in range(2) for m in (False, True)}


def test_scale_factors_resize_like_opencv(tmp_path):
    cv2 = pytest.importorskip("cv2")
    source, root, images, labels = make_dataset(tmp_path, [(13, 17)])
    caffelite.set_random_seed(3)
    net = seg_net(source, root, phase=caffelite.TRAIN,
                  transform=mean_transform(30, more="scale_factors: 0.5 scale_factors: 0.75 "
                                                    "scale_factors: 1.25 scale_factors: 1.5"))
    seen = set()
    for _ in range(25):
        net.forward()
        lab = net.blobs["label"].data[0, 0]
        h = int((lab[:, 0] != 255).sum())
        w = int((lab[0, :] != 255).sum())
        scale = {(6, 8): 0.5, (9, 12): 0.75, (16, 21): 1.25, (19, 25): 1.5}[(h, w)]
        seen.add(scale)
        img = cv2.resize(images[0], (w, h), interpolation=cv2.INTER_LINEAR)
        seg = cv2.resize(labels[0], (w, h), interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(net.blobs["data"].data[0, :, :h, :w], expected_nchw(img))
        assert np.array_equal(lab[:h, :w], seg)
        assert np.all(net.blobs["data"].data[0, :, h:, :] == 0)
        # data_dim is the size before random scaling.
        assert net.blobs["(automatic)"].data.ravel().tolist() == [13, 17]
    assert seen == {0.5, 0.75, 1.25, 1.5}


def test_new_size_and_data_dim(tmp_path, caplog):
    cv2 = pytest.importorskip("cv2")
    source, root, images, labels = make_dataset(tmp_path, [(9, 14)])
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        net = seg_net(source, root, transform=mean_transform(8),
                      extra="new_height: 6 new_width: 11")
    assert any("new_height/new_width resize the label maps bilinearly, as the fork does"
               in r.getMessage() for r in caplog.records)
    net.forward()
    img = cv2.resize(images[0], (11, 6), interpolation=cv2.INTER_LINEAR)
    lab = cv2.resize(labels[0], (11, 6), interpolation=cv2.INTER_LINEAR)   # the fork's quirk
    canvas = np.zeros((3, 8, 11), np.float32)
    canvas[:, :6] = expected_nchw(img)
    assert np.array_equal(net.blobs["data"].data[0], canvas[:, :, 1:9])   # w_off = 3 // 2
    assert np.array_equal(net.blobs["label"].data[0, 0, :6], lab[:, 1:9])
    assert net.blobs["(automatic)"].data.ravel().tolist() == [6, 8]      # min(crop, size)


def test_no_crop_uses_first_image_size(tmp_path, monkeypatch, caplog):
    from caffelite.layers import image_data
    monkeypatch.setattr(image_data, "_cut_warned", [False])
    source, root, images, _ = make_dataset(tmp_path, [(6, 7), (8, 9), (4, 4)])
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        net = seg_net(source, root, transform=" ".join(f"mean_value: {m}" for m in MEAN))
        assert net.blobs["data"].shape == (1, 3, 6, 7)
        net.forward()
        assert np.array_equal(net.blobs["data"].data[0], expected_nchw(images[0]))
        net.forward()                       # larger: the top-left, where the fork overflows
    assert np.array_equal(net.blobs["data"].data[0], expected_nchw(images[1])[:, :6, :7])
    assert "list.txt:2: image is 8x9, larger than the 6x7 data top set by the first " \
           "image" in caplog.text
    with pytest.raises(LayerError, match=r"list.txt:3.*smaller than the 6x7"):
        net.forward()


def test_label_type_none_and_image(tmp_path):
    rng = np.random.default_rng(4)
    img = write_rgb(tmp_path / "a.png", 5, 6, rng)
    (tmp_path / "none.txt").write_text("/a.png\n")
    net = seg_net(str(tmp_path / "none.txt"), str(tmp_path), label_type="NONE",
                  transform=mean_transform(8), extra="ignore_label: 7")
    net.forward()
    assert np.all(net.blobs["label"].data == 7)          # content and padding
    assert np.array_equal(net.blobs["data"].data[0, :, :5, :6], expected_nchw(img))
    (tmp_path / "image.txt").write_text("/a.png 3\n/a.png 300\n")
    net = seg_net(str(tmp_path / "image.txt"), str(tmp_path), label_type="IMAGE",
                  transform=mean_transform(8))
    net.forward()
    lab = net.blobs["label"].data[0, 0]
    assert np.all(lab[:5, :6] == 3) and np.all(lab[5:, :] == 255) and np.all(lab[:, 6:] == 255)
    net.forward()
    assert np.all(net.blobs["label"].data[0, 0, :5, :6] == 255)     # saturate_cast<uchar>


def test_label_type_image_with_label_image_paths_warns_once(tmp_path, caplog):
    """DeepLab v1's MSc train net leaves label_type at IMAGE over a list of label
    images: atoi reads every path as class 0, as in the fork, with one warning naming
    the first such line; numeric labels give none."""
    rng = np.random.default_rng(4)
    write_rgb(tmp_path / "a.png", 5, 6, rng)
    (tmp_path / "seg.txt").write_text("/a.png 3\n/a.png /Seg/a.png\n/a.png /Seg/b.png\n")
    with caplog.at_level("WARNING", logger="caffelite"):
        net = seg_net(str(tmp_path / "seg.txt"), str(tmp_path), label_type="IMAGE",
                      transform=mean_transform(8))
    warnings = [r.getMessage() for r in caplog.records if "label_type IMAGE" in r.getMessage()]
    assert warnings == [f"layer 'data': {tmp_path / 'seg.txt'}:2: label '/Seg/a.png' is no "
                        f"number; label_type IMAGE (the default) makes it class 0 for the "
                        f"whole image, as the fork's atoi does (label images need "
                        f"label_type: PIXEL)"]
    net.forward()
    net.forward()
    assert np.all(net.blobs["label"].data[0, 0, :5, :6] == 0)
    # VOC names start with digits: atoi reads 2007, saturated to 255 (ignored everywhere)
    for lines, said in (("/a.png 4\n/a.png 2007_000032.png\n", "label '2007_000032.png' is "
                                                               "no number; label_type IMAGE "
                                                               "(the default) makes it class "
                                                               "255"),
                        ("/a.png\n", "there is no label column; label_type IMAGE (the "
                                     "default) makes it class 0"),
                        ("/a.png 3\n/a.png -2\n/a.png +300\n", None)):
        caplog.clear()
        (tmp_path / "l.txt").write_text(lines)
        with caplog.at_level("WARNING", logger="caffelite"):
            seg_net(str(tmp_path / "l.txt"), str(tmp_path), label_type="IMAGE",
                    transform=mean_transform(8))
        warnings = [r.getMessage() for r in caplog.records
                    if "label_type IMAGE" in r.getMessage()]
        assert len(warnings) == (said is not None) and (said is None or said in warnings[0])


def test_palette_label_through_the_layer_reads_luminance(tmp_path):
    rng = np.random.default_rng(5)
    write_rgb(tmp_path / "a.png", 4, 4, rng)
    idx = rng.integers(0, 21, (4, 4)).astype(np.uint8)
    p = Image.fromarray(idx, mode="L").convert("P")
    p.putpalette([(i * 37) % 256 for i in range(768)])
    p.save(tmp_path / "a_lab.png")
    (tmp_path / "l.txt").write_text("/a.png /a_lab.png\n")
    net = seg_net(str(tmp_path / "l.txt"), str(tmp_path), transform=mean_transform(4))
    net.forward()
    want = read_image(str(tmp_path / "a_lab.png"), False)
    assert not np.array_equal(want, idx)
    assert np.array_equal(net.blobs["label"].data[0, 0], want)


def test_batch_size_greater_than_one_wraps_in_order(tmp_path):
    source, root, images, _ = make_dataset(tmp_path, [(4, 5), (5, 4), (6, 6), (3, 3)])
    net = seg_net(source, root, batch=3, transform=mean_transform(6),
                  tops=("data", "label", "dim"))
    assert net.blobs["data"].shape == (3, 3, 6, 6) and net.blobs["dim"].shape == (3, 1, 1, 2)
    order = []
    for _ in range(2):
        net.forward()
        for n in range(3):
            dim = tuple(int(v) for v in net.blobs["dim"].data[n].ravel())
            order.append([i for i, im in enumerate(images) if im.shape[:2] == dim][0])
            h, w = dim
            assert np.array_equal(net.blobs["data"].data[n, :, :h, :w],
                                  expected_nchw(images[order[-1]]))
    assert order == [0, 1, 2, 3, 0, 1]


def _epoch_sequence(source, root, seed, forwards):
    caffelite.set_random_seed(seed)
    net = seg_net(source, root, label_type="IMAGE", transform=mean_transform(4),
                  extra="shuffle: true")
    out = []
    for _ in range(forwards):
        net.forward()
        out.append(int(net.blobs["label"].data[0, 0, 0, 0]))
    return out, net


def _six_class_images(tmp_path):
    """(list, root): six 4x4 images, line i labelled i."""
    rng = np.random.default_rng(6)
    for i in range(6):
        write_rgb(tmp_path / f"s{i}.png", 4, 4, rng)
    (tmp_path / "s.txt").write_text("".join(f"/s{i}.png {i}\n" for i in range(6)))
    return str(tmp_path / "s.txt"), str(tmp_path)


def test_shuffle_is_reproducible_and_reshuffles_each_epoch(tmp_path):
    source, root = _six_class_images(tmp_path)
    a, _ = _epoch_sequence(source, root, 11, 18)
    b, _ = _epoch_sequence(source, root, 11, 18)
    c, _ = _epoch_sequence(source, root, 12, 18)
    assert a == b and a != c
    epochs = [a[i:i + 6] for i in range(0, 18, 6)]
    assert all(sorted(e) == list(range(6)) for e in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]


@pytest.mark.parametrize("where", ["waiting", "planning"])
def test_ctrl_c_in_a_forward_loses_no_batch(tmp_path, where):
    """KeyboardInterrupt while forward waits for a prefetched batch, or while the next
    batch is being planned: the interrupted forward raises, and the next ones go on
    with the batch that was next (shuffled, so the transformer and shuffle words too)."""
    source, root = _six_class_images(tmp_path)
    want, _ = _epoch_sequence(source, root, 11, 14)
    got, net = _epoch_sequence(source, root, 11, 4)
    layer = net.layers[0]
    if where == "waiting":
        future = layer._inflight[0][0]
        real = future.result

        def interrupted(*args):
            future.result = real
            raise KeyboardInterrupt
        future.result = interrupted
    else:
        real = layer.plan_batch

        def interrupted():
            del layer.plan_batch            # the class's own from now on
            real()                          # takes its samples, then the interrupt
            raise KeyboardInterrupt
        layer.plan_batch = interrupted
    with pytest.raises(KeyboardInterrupt):
        net.forward()
    for _ in range(10):
        net.forward()
        got.append(int(net.blobs["label"].data[0, 0, 0, 0]))
    assert got == want


def test_a_failed_batch_build_is_used_up_once(tmp_path):
    """A batch whose build fails in the pool (not an interrupt) raises at its forward,
    once: the next forward delivers the batch after it."""
    source, root = _six_class_images(tmp_path)
    want, _ = _epoch_sequence(source, root, 11, 12)
    got, net = _epoch_sequence(source, root, 11, 2)
    layer = net.layers[0]
    real = layer.plan_batch

    def failing():
        del layer.plan_batch
        _, args = real()

        def build(*_):
            raise RuntimeError("the build failed")
        return build, args
    layer.plan_batch = failing      # batch 7: batches 2 to 6 are queued already
    for _ in range(9):
        try:
            net.forward()
        except RuntimeError as e:
            assert "the build failed" in str(e)
            got.append(None)
            continue
        got.append(int(net.blobs["label"].data[0, 0, 0, 0]))
    assert got[:7] == want[:7] and got[7] is None and got[8:] == want[8:11]


def test_set_up_logs_the_forks_lines_in_its_order(tmp_path, caplog):
    """DataLayerSetUp's INFO lines: the list opened, the shuffle, the count, then each
    top's size (ImageSegData: data, label and data_dim; ImageData: data)."""
    source, root, _, _ = make_dataset(tmp_path, [(9, 10), (8, 8), (12, 7)])
    caplog.set_level(logging.INFO, logger="caffelite")
    seg_net(source, root, batch=2, transform="crop_size: 8", extra="shuffle: true",
            tops=("data", "label", "dim"))
    _image_data_net(tmp_path, "/img0.png 1\n/img0.png 0\n", 3)
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith(("Opening", "Shuffling", "A total", "output"))]
    assert lines == [
        f"Opening file {source}", "Shuffling data", "A total of 3 images.",
        "output data size: 2,3,8,8", "output label size: 2,1,8,8",
        "output data_dim size: 2,1,1,2",
        f"Opening file {tmp_path / 'cls.txt'}", "A total of 2 images.",
        "output data size: 3,3,9,10"]


def test_state_dict_resumes_bit_identically(tmp_path):
    source, root, _, _ = make_dataset(tmp_path, [(9, 10), (10, 9), (7, 12), (12, 7)])
    transform = mean_transform(6, mirror=True, more="scale_factors: 0.75 scale_factors: 1.0")

    def run(net, n):
        out = []
        for _ in range(n):
            net.forward()
            out.append((net.blobs["data"].data.copy(), net.blobs["label"].data.copy()))
        return out

    caffelite.set_random_seed(21)
    net = seg_net(source, root, transform=transform, extra="shuffle: true",
                  phase=caffelite.TRAIN)
    run(net, 5)
    state = net.layers[0].state_dict()
    reference = run(net, 6)
    caffelite.set_random_seed(999)                  # a fresh net with other seeds ...
    resumed = seg_net(source, root, transform=transform, extra="shuffle: true",
                      phase=caffelite.TRAIN)
    resumed.layers[0].load_state_dict(state)        # ... continues exactly
    for (d0, l0), (d1, l1) in zip(reference, run(resumed, 6)):
        assert np.array_equal(d0, d1) and np.array_equal(l0, l1)


def test_rand_skip_starts_inside_the_list(tmp_path):
    rng = np.random.default_rng(8)
    for i in range(5):
        write_rgb(tmp_path / f"r{i}.png", 3, 3, rng)
    (tmp_path / "r.txt").write_text("".join(f"/r{i}.png {i}\n" for i in range(5)))
    firsts = set()
    for seed in range(12):
        caffelite.set_random_seed(seed)
        net = seg_net(str(tmp_path / "r.txt"), str(tmp_path), label_type="IMAGE",
                      transform=mean_transform(3), extra="rand_skip: 3")
        net.forward()
        firsts.add(int(net.blobs["label"].data[0, 0, 0, 0]))
    assert firsts <= {0, 1, 2} and len(firsts) > 1


def test_gray_images_with_one_mean_value(tmp_path):
    rng = np.random.default_rng(9)
    gray = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    (tmp_path / "g.txt").write_text("/g.png\n")
    net = seg_net(str(tmp_path / "g.txt"), str(tmp_path), label_type="NONE",
                  extra="is_color: false", transform="crop_size: 7 mean_value: 100 scale: 0.5")
    net.forward()
    data = net.blobs["data"].data[0]
    assert data.shape == (1, 7, 7)
    expected = (gray.astype(np.float32) - np.float32(100)) * np.float32(0.5)
    assert np.array_equal(data[0, :5, :6], expected) and np.all(data[0, 5:] == 0)


def test_missing_image_error_names_file_and_list_line(tmp_path):
    source, root, _, _ = make_dataset(tmp_path, [(4, 4), (4, 4)])
    with open(source, "a") as f:
        f.write("/missing.png /lab0.png\n")
    net = seg_net(source, root, transform=mean_transform(4))
    net.forward()
    net.forward()
    with pytest.raises(LayerError, match=r"list.txt:3.*missing\.png"):
        net.forward()
    (tmp_path / "first.txt").write_text("/gone.jpg /lab0.png\n")
    with pytest.raises(NetError, match=r"first.txt:1.*gone\.jpg"):
        seg_net(str(tmp_path / "first.txt"), root, transform=mean_transform(4))


def _class_images(tmp_path, count, prefix="s"):
    """4 x 4 images; with label_type IMAGE a sample's label top shows its list label."""
    rng = np.random.default_rng(30)
    for i in range(count):
        write_rgb(tmp_path / f"{prefix}{i}.png", 4, 4, rng)


def _labels_until_error(net, forwards):
    """The label of each forward (batch 1) and the error that stopped them, if any."""
    labels = []
    for _ in range(forwards):
        try:
            net.forward()
        except LayerError as e:
            return labels, str(e)
        labels.append(int(net.blobs["label"].data[0, 0, 0, 0]))
    return labels, None


def test_blank_lines_are_samples_in_the_shuffle_as_in_the_fork(tmp_path):
    """The fork's 'while (std::getline(...)) { iss >> imgfn >> segfn; push_back }'
    keeps a blank line as the entry ("", ""): it is shuffled with the others and the
    fork fails when it reaches it.  Expected order: the audit's own simulation of the
    fork (boost::mt19937 from numpy's MT19937, boost's uniform_int written out,
    caffe::shuffle), seed 1234, 7 images and one trailing blank line, mirror: true in
    TRAIN (InitRand draws the first global word, the shuffle seed the second):
    [img2, img1, img4, img0, img6, img5, '', img3]."""
    _class_images(tmp_path, 7)
    (tmp_path / "b.txt").write_text("".join(f"/s{i}.png {i}\n" for i in range(7)) + "\n")
    caffelite.set_random_seed(1234)
    net = seg_net(str(tmp_path / "b.txt"), str(tmp_path), label_type="IMAGE",
                  transform=mean_transform(4, mirror=True), extra="shuffle: true",
                  phase=caffelite.TRAIN)
    assert len(net.layers[0].entries) == 8
    labels, error = _labels_until_error(net, 8)
    assert labels == [2, 1, 4, 0, 6, 5]
    assert error is not None and "b.txt:8: line 8 of the list is empty" in error


@pytest.mark.parametrize("text, blank", [
    # std::getline: the final newline ends the last line and adds no entry ...
    ("/s0.png 0\n/s1.png 1\n/s2.png 2\n\n", [3]),
    # ... each further newline does; a last line without a newline still counts
    ("/s0.png 0\n\n\n/s1.png 1\n/s2.png 2", [1, 2]),
    # Windows line ends: '\r' is whitespace for >>, so "\r" alone is a blank line
    ("/s0.png 0\r\n/s1.png 1\r\n\r\n/s2.png 2\r\n", [2]),
    ("/s0.png 0\n \t\n/s1.png 1\n/s2.png 2\n", [1]),
])
def test_blank_lines_count_in_the_list_and_fail_when_reached(tmp_path, text, blank):
    """Derivation: the entries are the getline lines (blank = the 0-based indices
    listed, the rest /s0../s2 in order); the epoch order is caffe::shuffle over all of
    them with the first word of the global stream as its seed (TEST, no mirror: no
    InitRand), computed with CaffeRNG/shuffle, which tests/test_caffe_rng.py checks
    against boost."""
    from caffelite.caffe_rng import CaffeRNG, shuffle
    _class_images(tmp_path, 3)
    (tmp_path / "w.txt").write_bytes(text.encode())
    n = 3 + len(blank)
    labels = iter(range(3))
    entry_label = [None if i in blank else next(labels) for i in range(n)]
    for seed in (3, 4, 5):
        order = shuffle(CaffeRNG(CaffeRNG(seed).words(1)[0]), list(range(n)))
        first_blank = min(order.index(b) for b in blank)
        line = order[first_blank] + 1

        def make():
            caffelite.set_random_seed(seed)
            return seg_net(str(tmp_path / "w.txt"), str(tmp_path), label_type="IMAGE",
                           transform=mean_transform(4), extra="shuffle: true")
        if first_blank == 0:        # the first sample sizes the tops: setup fails
            with pytest.raises(NetError, match=f"w.txt:{line}: line {line} of the list"):
                make()
            continue
        labels, error = _labels_until_error(make(), n)
        assert labels == [entry_label[i] for i in order[:first_blank]]
        assert f"w.txt:{line}: line {line} of the list is empty" in error


def test_a_blank_line_without_shuffle_is_reached_in_place(tmp_path):
    _class_images(tmp_path, 2)
    (tmp_path / "p.txt").write_text("/s0.png 0\n\n/s1.png 1\n")
    net = seg_net(str(tmp_path / "p.txt"), str(tmp_path), label_type="IMAGE",
                  transform=mean_transform(4))
    assert _labels_until_error(net, 3) == ([0], f"layer 'data' (ImageSegData): "
                                                f"{tmp_path / 'p.txt'}:2: line 2 of the list "
                                                f"is empty (the fork keeps blank lines as "
                                                f"samples, in the list size and the "
                                                f"shuffle, and fails when it reaches one); "
                                                f"delete it")
    (tmp_path / "first.txt").write_text("  \n/s0.png 0\n")
    with pytest.raises(NetError, match=r"first.txt:1: line 1 of the list is empty"):
        seg_net(str(tmp_path / "first.txt"), str(tmp_path), label_type="IMAGE",
                transform=mean_transform(4))
    (tmp_path / "none.txt").write_text("")
    with pytest.raises(NetError, match=r"none.txt' lists no samples"):
        seg_net(str(tmp_path / "none.txt"), str(tmp_path), label_type="IMAGE",
                transform=mean_transform(4))


def test_missing_list_file_and_bad_params(tmp_path):
    with pytest.raises(NetError, match=r"nolist\.txt"):
        seg_net(str(tmp_path / "nolist.txt"), str(tmp_path), transform=mean_transform(4))
    source, root, _, _ = make_dataset(tmp_path, [(4, 4)])
    bad = {
        "mean_file: 'm.binaryproto'": "does not support mean file",
        "crop_size: 4 crop_height: 4 crop_width: 4": "either crop_size or both",
        "crop_height: 4": "either crop_size or both",
        "mean_value: 1 mean_value: 2": "1 mean_value or as many as channels",
    }
    for transform, message in bad.items():
        with pytest.raises(NetError, match=message):
            seg_net(source, root, transform=transform)
    with pytest.raises(NetError, match="new_height and new_width"):
        seg_net(source, root, transform=mean_transform(4), extra="new_height: 5")


def test_rectangular_crop(tmp_path):
    source, root, images, _ = make_dataset(tmp_path, [(7, 9)])
    means = " ".join(f"mean_value: {m}" for m in MEAN)
    net = seg_net(source, root, transform=f"crop_height: 5 crop_width: 10 {means}")
    assert net.blobs["data"].shape == (1, 3, 5, 10)
    net.forward()
    canvas = np.zeros((3, 7, 10), np.float32)
    canvas[:, :, :9] = expected_nchw(images[0])
    assert np.array_equal(net.blobs["data"].data[0], canvas[:, 1:6, :])


# ---------------------------------------------------------------------- ImageData
def test_image_data_with_mean_file_crop_and_scale(tmp_path):
    from caffelite.io import array_to_blobproto
    rng = np.random.default_rng(10)
    images = [write_rgb(tmp_path / f"i{i}.png", 6, 7, rng) for i in range(3)]
    (tmp_path / "cls.txt").write_text("i0.png 4\ni1.png 0\ni2.png 17\n")
    mean = rng.uniform(0, 255, (1, 3, 6, 7)).astype(np.float32)
    (tmp_path / "mean.binaryproto").write_bytes(array_to_blobproto(mean).SerializeToString())
    net = make_net(f'''
        layer {{ name: "data" type: "ImageData" top: "data" top: "label"
          image_data_param {{ source: "{tmp_path / 'cls.txt'}" root_folder: "{tmp_path}/"
                             batch_size: 2 }}
          transform_param {{ crop_size: 4 scale: 0.25
                            mean_file: "{tmp_path / 'mean.binaryproto'}" }} }}''')
    assert net.blobs["data"].shape == (2, 3, 4, 4) and net.blobs["label"].shape == (2,)
    net.forward()
    for n in range(2):
        full = (images[n].transpose(2, 0, 1).astype(np.float32) - mean[0]) * np.float32(0.25)
        assert np.array_equal(net.blobs["data"].data[n], full[:, 1:5, 1:5])   # centre crop
    assert net.blobs["label"].data.tolist() == [4, 0]
    net.forward()
    assert net.blobs["label"].data.tolist() == [17, 4]


def test_a_mean_file_with_double_data_is_read_as_blob_from_proto(tmp_path, caplog):
    """Blob::FromProto takes double_data whenever it has any (pycaffe's
    blobproto_to_array would take data); DataTransformer logs the file it loads."""
    import logging
    from caffelite.proto import caffe_pb2
    rng = np.random.default_rng(12)
    image = write_rgb(tmp_path / "i0.png", 3, 4, rng)
    (tmp_path / "cls.txt").write_text("i0.png 1\n")
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend([1, 3, 3, 4])
    blob.data.extend([1.0] * 36)
    double = rng.uniform(0, 255, 36)
    blob.double_data.extend(double.tolist())
    (tmp_path / "mean.binaryproto").write_bytes(blob.SerializeToString())
    text = f'''layer {{ name: "data" type: "ImageData" top: "data" top: "label"
          image_data_param {{ source: "{tmp_path / 'cls.txt'}" root_folder: "{tmp_path}/"
                             batch_size: 1 }}
          transform_param {{ mean_file: "{tmp_path / 'mean.binaryproto'}" }} }}'''
    with caplog.at_level(logging.INFO, logger="caffelite"):
        net = make_net(text)
    assert f"Loading mean file from: {tmp_path / 'mean.binaryproto'}" in caplog.messages
    net.forward()
    mean = double.astype(np.float32).reshape(3, 3, 4)
    assert np.array_equal(net.blobs["data"].data[0],
                          image.transpose(2, 0, 1).astype(np.float32) - mean)
    del blob.double_data[-1]
    blob.ClearField("data")
    (tmp_path / "mean.binaryproto").write_bytes(blob.SerializeToString())
    with pytest.raises(NetError, match=r"mean file '.*mean\.binaryproto' holds 35 values, "
                                       r"which do not fit its blob shape"):
        make_net(text)


def test_hdf5_data_logs_its_list_as_caffe(tmp_path, caplog):
    import logging
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "x.h5", "w") as h:
        h["data"] = np.zeros((2, 1))
    (tmp_path / "x.txt").write_text(f"{tmp_path / 'x.h5'}\n{tmp_path / 'x.h5'}\n")
    with caplog.at_level(logging.INFO, logger="caffelite"):
        make_net(f'''layer {{ name: "d" type: "HDF5Data" top: "data"
                   hdf5_data_param {{ source: "{tmp_path / 'x.txt'}" batch_size: 1 }} }}''')
    start = caplog.messages.index(f"Loading list of HDF5 filenames from: {tmp_path / 'x.txt'}")
    assert caplog.messages[start + 1] == "Number of HDF5 files: 2"


def test_image_data_resize_mirror_and_batch_shapes(tmp_path):
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(11)
    images = [write_rgb(tmp_path / f"j{i}.png", 5 + i, 8 - i, rng) for i in range(2)]
    (tmp_path / "j.txt").write_text("j0.png 1\nj1.png 2\n")
    caffelite.set_random_seed(2)
    net = make_net(f'''
        layer {{ name: "data" type: "ImageData" top: "data" top: "label"
          image_data_param {{ source: "{tmp_path / 'j.txt'}" root_folder: "{tmp_path}/"
                             new_height: 9 new_width: 4 batch_size: 1 }}
          transform_param {{ mirror: true mean_value: 10 }} }}''', caffelite.TRAIN)
    flips = set()
    for it in range(12):
        net.forward()
        img = cv2.resize(images[it % 2], (4, 9), interpolation=cv2.INTER_LINEAR)
        plain = img.transpose(2, 0, 1).astype(np.float32) - np.float32(10)
        data = net.blobs["data"].data[0]
        flips.add(np.array_equal(data, plain[:, :, ::-1]) and not np.array_equal(data, plain))
        assert np.array_equal(data, plain) or np.array_equal(data, plain[:, :, ::-1])
    assert flips == {True, False}


def _image_data_net(tmp_path, text, batch):
    (tmp_path / "cls.txt").write_bytes(text.encode())
    return make_net(f"""layer {{ name: "d" type: "ImageData" top: "data" top: "label"
        image_data_param {{ source: "{tmp_path / 'cls.txt'}" root_folder: "{tmp_path}"
                           batch_size: {batch} }} }}""")


# The fork (BVLC before PR #4059) reads 'while (infile >> filename >> label)': a stream
# of whitespace-separated tokens; int extraction takes an optional sign and the digits
# that follow and leaves the rest of the token for the next filename; the first
# failure ends the list without a word.  Expected (filename, label, line) by hand.
@pytest.mark.parametrize("text, pairs, token", [
    # 'img.png' is no int: the list is the first pair only
    ("/c0.png 0\n/my img.png 1\n/c2.png 2\n", [("/c0.png", 0, 1)], "'img.png' after '/my'"),
    # the last name has no label: dropped
    ("/c0.png 3\n/c1.png 5\n/c2.png\n", [("/c0.png", 3, 1), ("/c1.png", 5, 2)],
     "'/c2.png' has no label"),
    # '4.0' reads 4; '.0' is the next filename and '/c2.png' its label, which fails
    ("/c0.png 3\n/c1.png 4.0\n/c2.png 7\n", [("/c0.png", 3, 1), ("/c1.png", 4, 2)],
     "'/c2.png' after '.0'"),
    # pairs, not lines: two on a line, one across lines, Windows line ends, signs
    ("/c0.png 3 /c1.png\r\n\r\n  -5\t/c2.png\x0b+7\x0c", [("/c0.png", 3, 1), ("/c1.png", -5, 1),
                                                    ("/c2.png", 7, 3)], None),
    # '3/c1.png' reads 3, then '/c1.png' is a filename
    ("/c0.png 3/c1.png 1\n", [("/c0.png", 3, 1), ("/c1.png", 1, 1)], None),
    # the int range: -2^31 fits, 2^31 does not
    ("/c0.png -2147483648\n/c1.png 2147483648\n", [("/c0.png", -2147483648, 1)],
     "'2147483648' of '/c1.png' does not fit an int"),
])
def test_image_data_reads_the_list_as_an_istream(tmp_path, caplog, text, pairs, token):
    _class_images(tmp_path, 3, prefix="c")
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        net = _image_data_net(tmp_path, text, batch=3)
    entries = net.layers[0].entries
    assert [(e.fields[0], e.fields[1], e.lineno) for e in entries] == pairs
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if token is None:
        assert not warnings
    else:
        assert len(warnings) == 1 and "cls.txt:" in warnings[0] and token in warnings[0]
    net.forward()
    labels = [pairs[i % len(pairs)][1] for i in range(3)]
    assert net.blobs["label"].data.tolist() == labels


def test_image_data_truncated_list_wraps_over_what_was_read(tmp_path):
    """The audit's case: batch 3 over the one pair read gives that sample three times."""
    _class_images(tmp_path, 3, prefix="c")
    net = _image_data_net(tmp_path, "/c0.png 0\n/my img.png 1\n/c2.png 2\n", batch=3)
    net.forward()
    data = net.blobs["data"].data
    assert net.blobs["label"].data.tolist() == [0, 0, 0]
    assert np.array_equal(data[0], data[1]) and np.array_equal(data[0], data[2])


def test_image_data_without_a_single_pair_is_an_error(tmp_path, caplog):
    for text, why in (("", ""), (" \n\n", ""),
                      ("a.png x\n", ": .*cls.txt:1: the label 'x' after 'a.png' is not an "
                                   "integer$"),
                      ("a.png\n", ": .*cls.txt:1: 'a.png' has no label$")):
        with pytest.raises(NetError, match=r"cls.txt' lists no samples \(ImageData reads "
                                           r"'<image path> <integer label>' pairs\)" + why):
            _image_data_net(tmp_path, text, batch=1)


def test_list_files_that_are_not_utf8_name_the_bytes_on_disk(tmp_path):
    """The fork reads list files as bytes: a Latin-1 'é' (b'\xe9', no UTF-8) in a
    file name must open that very file."""
    rng = np.random.default_rng(31)
    root = os.fsencode(tmp_path)
    try:
        image = write_rgb(os.fsdecode(root + b"/caf\xe9.png"), 4, 4, rng)
        label = write_label(os.fsdecode(root + b"/lab\xe9.png"), 4, 4, rng)
    except (OSError, UnicodeError):
        pytest.skip("the file system refuses file names that are not UTF-8")
    (tmp_path / "seg.txt").write_bytes(b"/caf\xe9.png /lab\xe9.png\n")
    (tmp_path / "cls.txt").write_bytes(b"/caf\xe9.png 6\n")
    net = seg_net(str(tmp_path / "seg.txt"), str(tmp_path), transform=mean_transform(4))
    net.forward()
    assert np.array_equal(net.blobs["data"].data[0], expected_nchw(image))
    assert np.array_equal(net.blobs["label"].data[0, 0], label)
    net = make_net(f"""layer {{ name: "d" type: "ImageData" top: "data" top: "label"
        image_data_param {{ source: "{tmp_path / 'cls.txt'}" root_folder: "{tmp_path}"
                           batch_size: 1 }} }}""")
    net.forward()
    assert net.blobs["label"].data.tolist() == [6]
    assert np.array_equal(net.blobs["data"].data[0], image.transpose(2, 0, 1))
    (tmp_path / "bad.txt").write_bytes(b"/caf\xe9.png /gone\xe9.png\n")
    net = seg_net(str(tmp_path / "bad.txt"), str(tmp_path), transform=mean_transform(4))
    with pytest.raises(LayerError, match="bad.txt:1: could not load label"):
        net.forward()


# ----------------------------------------------------------------------- HDF5Data
def test_hdf5_data_rows_files_and_shuffle(tmp_path):
    h5py = pytest.importorskip("h5py")
    rows = []
    for f in range(2):
        data = np.arange(f * 30, f * 30 + 30, dtype=np.float64).reshape(5, 2, 3)
        with h5py.File(tmp_path / f"d{f}.h5", "w") as h:
            h["data"] = data
            h["label"] = np.arange(5) + 10 * f
        rows.extend(data)
    (tmp_path / "h5.txt").write_text(f"{tmp_path / 'd0.h5'}\n{tmp_path / 'd1.h5'}\n")
    text = f'''layer {{ name: "d" type: "HDF5Data" top: "data" top: "label"
               hdf5_data_param {{ source: "{tmp_path / 'h5.txt'}" batch_size: 3 SHUF }} }}'''
    net = make_net(text.replace("SHUF", ""))
    assert net.blobs["data"].shape == (3, 2, 3) and net.blobs["label"].shape == (3,)
    labels = []
    for _ in range(5):
        net.forward()
        labels.extend(net.blobs["label"].data.tolist())
    assert labels == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 0, 1, 2, 3, 4]
    net.forward()
    assert np.array_equal(net.blobs["data"].data, np.array(rows[5:8], np.float32))

    def shuffled():
        c_rand().reseed(1)          # a fresh process: rand() was never seeded
        n = make_net(text.replace("SHUF", "shuffle: true"))
        out = []
        for _ in range(10):
            n.forward()
            out.extend(n.blobs["label"].data.tolist())
        return out
    a = shuffled()
    assert a == shuffled() and sorted(a[:10]) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    assert a == hdf5_shuffled_labels_by_libc([[0, 1, 2, 3, 4], [10, 11, 12, 13, 14]], 30)

    # Resuming: the solverstate restores the process's rand() stream, then the layer's
    # cursor and orders; reloading the current file must not draw from rand().
    c_rand().reseed(1)
    first = make_net(text.replace("SHUF", "shuffle: true"))
    for _ in range(4):
        first.forward()
    state, stream = first.layer_dict["d"].state_dict(), c_rand().get_state()
    straight = []
    for _ in range(5):
        first.forward()
        straight.extend(first.blobs["label"].data.tolist())
    second = make_net(text.replace("SHUF", "shuffle: true"))
    c_rand().set_state(stream)
    second.layer_dict["d"].load_state_dict(state)
    resumed = []
    for _ in range(5):
        second.forward()
        resumed.extend(second.blobs["label"].data.tolist())
    assert resumed == straight


def hdf5_shuffled_labels_by_libc(file_labels, count):
    """HDF5DataLayer's shuffled row order (hdf5_data_layer.cpp), with std::random_shuffle
    drawing from this process's own C library rand() after srand(1)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.srand(1)

    def random_shuffle(items):
        for i in range(1, len(items)):
            j = libc.rand() % (i + 1)
            items[i], items[j] = items[j], items[i]

    files = list(range(len(file_labels)))
    random_shuffle(files)
    current_file = 0
    rows = list(range(len(file_labels[files[0]])))
    random_shuffle(rows)                                   # LoadHDF5FileData
    out, current_row = [], 0
    while len(out) < count:
        out.append(file_labels[files[current_file]][rows[current_row]])
        current_row += 1
        if current_row == len(rows):
            current_file += 1
            if current_file == len(files):
                current_file = 0
                random_shuffle(files)
            rows = list(range(len(file_labels[files[current_file]])))
            random_shuffle(rows)                           # LoadHDF5FileData
            current_row = 0
            random_shuffle(rows)                           # Forward_cpu's own shuffle
    return out


def test_hdf5_data_missing_dataset(tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "x.h5", "w") as h:
        h["data"] = np.zeros((2, 1))
    (tmp_path / "x.txt").write_text(str(tmp_path / "x.h5"))
    with pytest.raises(NetError, match="no dataset 'label'"):
        make_net(f'''layer {{ name: "d" type: "HDF5Data" top: "data" top: "label"
                   hdf5_data_param {{ source: "{tmp_path / 'x.txt'}" batch_size: 1 }} }}''')


def test_hdf5_data_reads_top_level_datasets_only(tmp_path):
    """H5LTfind_dataset looks among the file's own members: a top named 'grp/data' is
    not found, as in Caffe."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "x.h5", "w") as h:
        h["grp/data"] = np.zeros((2, 1))
    (tmp_path / "x.txt").write_text(str(tmp_path / "x.h5"))
    with pytest.raises(NetError, match="has no dataset 'grp/data'.*at the file's top level"):
        make_net(f'''layer {{ name: "d" type: "HDF5Data" top: "grp/data"
                   hdf5_data_param {{ source: "{tmp_path / 'x.txt'}" batch_size: 1 }} }}''')


def test_hdf5_data_refuses_a_later_file_with_other_row_shapes(tmp_path):
    """The tops keep the first file's shape (HDF5DataLayer::Reshape does nothing);
    Caffe would copy a later file's rows at the wrong stride."""
    h5py = pytest.importorskip("h5py")
    for name, shape in (("a", (2, 3)), ("b", (2, 4))):
        with h5py.File(tmp_path / f"{name}.h5", "w") as h:
            h["data"] = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    (tmp_path / "x.txt").write_text(f"{tmp_path / 'a.h5'}\n{tmp_path / 'b.h5'}\n")
    net = make_net(f'''layer {{ name: "d" type: "HDF5Data" top: "data"
                   hdf5_data_param {{ source: "{tmp_path / 'x.txt'}" batch_size: 2 }} }}''')
    net.forward()
    assert net.blobs["data"].data.tolist() == [[0, 1, 2], [3, 4, 5]]
    net.blobs["data"].reshape(5, 5)
    net.reshape()
    assert net.blobs["data"].shape == (2, 3)
    with pytest.raises(LayerError, match=r"layer 'd' \(HDF5Data\): HDF5 file '.*b\.h5': "
                                         r"dataset 'data' has rows of shape \(4,\), but the "
                                         r"tops have the first file's \(3,\)"):
        net.forward()


def test_hdf5_data_list_is_bytes_and_c_whitespace(tmp_path):
    """BVLC reads 'while (source_file >> line)': names split at C whitespace only
    (a no-break space belongs to the name) and taken as bytes."""
    h5py = pytest.importorskip("h5py")
    names = [os.fsencode(tmp_path) + b"/r\xe9.h5", os.fsencode(tmp_path / "a\u00a0b.h5")]
    try:
        for i, name in enumerate(names):
            with h5py.File(os.fsdecode(name), "w") as h:
                h["data"] = np.full((1, 2), i, np.float32)
    except (OSError, UnicodeError):
        pytest.skip("the file system refuses file names that are not UTF-8")
    (tmp_path / "x.txt").write_bytes(b"\r\n".join(names) + b"\r\n")
    net = make_net(f"""layer {{ name: "d" type: "HDF5Data" top: "data"
        hdf5_data_param {{ source: "{tmp_path / 'x.txt'}" batch_size: 2 }} }}""")
    net.forward()
    assert net.blobs["data"].data.tolist() == [[0, 0], [1, 1]]


# ----------------------------------------------------------------------- prefetching
def test_batches_are_prepared_in_the_background(tmp_path):
    import time
    from caffelite.layers.image_data import PREFETCH_COUNT
    source, root, _, _ = make_dataset(tmp_path, [(4, 4), (5, 5)])
    net = seg_net(source, root, transform=mean_transform(4))
    layer = net.layers[0]
    assert len(layer._inflight) == PREFETCH_COUNT
    deadline = time.monotonic() + 10
    while not all(f.done() for f, *_ in layer._inflight) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(f.done() for f, *_ in layer._inflight)     # without any forward call
    net.forward()
    assert len(layer._inflight) == PREFETCH_COUNT        # topped up again


def test_interpreter_exit_does_not_wait_for_prefetching(tmp_path):
    import subprocess
    import sys
    import textwrap
    source, root, _, _ = make_dataset(tmp_path, [(40, 40)] * 3)
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(caffelite.__path__[0] + '/..')!r})
        import caffelite
        from caffelite.io.prototxt import parse_text
        from caffelite.proto import caffe_pb2
        text = '''layer {{ name: "d" type: "ImageSegData" top: "data" top: "label"
          image_data_param {{ source: "{source}" root_folder: "{root}" batch_size: 64
                             label_type: PIXEL }}
          transform_param {{ crop_size: 300 scale_factors: 1.5 mirror: true }} }}'''
        net = caffelite.Net(param=parse_text(text, caffe_pb2.NetParameter()), phase=0)
        import time
        from caffelite.layers.image_data import worker_pool
        for _ in range(8):                     # far more work than the time limit
            worker_pool().submit(time.sleep, 60)
        print("built")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert "built" in done.stdout


def test_a_stopping_pool_ends_batch_builds_at_the_next_sample():
    """At exit the data pool stops: a running batch build (looping over until_exit)
    stops at its next sample, queued jobs are dropped, and stop() returns once no job
    runs, so no daemon thread is left inside C code while the interpreter finalises
    (which aborted the process: "terminate called without an active exception")."""
    import threading
    import time
    from concurrent.futures import CancelledError
    from caffelite.layers.image_data import _WorkerPool, until_exit
    pool = _WorkerPool(1)
    started, seen = threading.Event(), []

    def build(n):
        for i in until_exit(range(n)):
            seen.append(i)
            started.set()
            time.sleep(0.01)
        return "done"
    running = pool.submit(build, 100000)
    queued = pool.submit(build, 3)
    assert started.wait(10)
    t = time.perf_counter()
    pool.stop(timeout=10)
    assert time.perf_counter() - t < 5
    assert running.exception(timeout=1) is not None and len(seen) < 100000
    with pytest.raises(CancelledError):
        queued.result(timeout=5)
    assert list(until_exit(range(3))) == [0, 1, 2]     # outside the pool: no stop


def test_a_forked_child_does_not_wait_for_the_parents_pool():
    """fork() copies the pool's exit hook but not its threads: in the child, stop()
    returns at once instead of waiting EXIT_WAIT_S for jobs no thread will finish."""
    import threading
    from caffelite.layers.image_data import _WorkerPool
    pool = _WorkerPool(1)
    release, started = threading.Event(), threading.Event()
    job = pool.submit(lambda: (started.set(), release.wait(10)))
    assert started.wait(10)
    pool.pid = -1                   # as seen from a child process
    pool.stop(timeout=30)
    assert not pool._stopping.is_set() and not job.done()
    pool.pid = os.getpid()
    release.set()
    pool.stop(timeout=10)
    assert job.result(timeout=10)


def test_hdf5_data_without_h5py_is_a_clear_error(tmp_path, monkeypatch):
    import sys
    (tmp_path / "x.txt").write_text("x.h5\n")
    monkeypatch.setitem(sys.modules, "h5py", None)          # import h5py -> ImportError
    with pytest.raises(NetError, match="needs the h5py package"):
        make_net(f'''layer {{ name: "d" type: "HDF5Data" top: "data"
                   hdf5_data_param {{ source: "{tmp_path / 'x.txt'}" batch_size: 1 }} }}''')


def test_mean_file_read_through_the_legacy_accessors(tmp_path):
    """DataTransformer reads the mean blob's channels/height/width (axes 1-3) and its
    item 0: a 2 x C x H x W mean works; a C x H x W shape is channels H, height W."""
    from caffelite.io import array_to_blobproto
    rng = np.random.default_rng(12)
    images = [write_rgb(tmp_path / f"m{i}.png", 4, 5, rng) for i in range(2)]
    (tmp_path / "m.txt").write_text("m0.png 1\nm1.png 2\n")
    text = '''layer {{ name: "data" type: "ImageData" top: "data" top: "label"
          image_data_param {{ source: "{0}/m.txt" root_folder: "{0}/" batch_size: 1 }}
          transform_param {{ mean_file: "{0}/mean.binaryproto" }} }}'''.format(tmp_path)
    mean = rng.uniform(0, 255, (2, 3, 4, 5)).astype(np.float32)
    (tmp_path / "mean.binaryproto").write_bytes(array_to_blobproto(mean).SerializeToString())
    net = make_net(text)
    net.forward()
    want = images[0].transpose(2, 0, 1).astype(np.float32) - mean[0]
    assert np.array_equal(net.blobs["data"].data[0], want)
    blob = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[3, 4, 5]),
                               data=mean[0].reshape(-1).tolist())
    (tmp_path / "mean.binaryproto").write_bytes(blob.SerializeToString())
    with pytest.raises(NetError, match="has 4 channels, the images 3"):
        make_net(text)


def test_memory_data_and_dummy_data_set_up_checks(tmp_path):
    for param, message in [
            ("batch_size: 2", r"must be specified and positive .*\(2, 0, 0, 0\)"),
            ("batch_size: 2 channels: 1 height: 1 width: 1 } transform_param { "
             "mean_value: 3 mean_file: 'x'", "mean_file and mean_value at the same time"),
            ("batch_size: 2 channels: 1 height: 1 width: 1 } transform_param { "
             f"mean_file: '{tmp_path}/missing'", "cannot read mean file")]:
        with pytest.raises(NetError, match=message):
            make_net('layer { name: "d" type: "MemoryData" top: "data" top: "label" '
                     'memory_data_param { ' + param + ' } }')
    with pytest.raises(NetError, match="Both shape and legacy fields were specified"):
        make_net('layer { name: "d" type: "DummyData" top: "x" dummy_data_param { '
                 'shape { dim: 2 dim: 3 } num: 5 channels: 1 height: 1 width: 1 } }')


@pytest.mark.parametrize("values, message", [
    (np.array([True, False]), "float and integer datasets only"),
    (np.array([b"1.5", b"2"]), "float and integer datasets only"),
    (None, "'data' is a group, not a dataset")])
def test_hdf5_data_reads_float_and_integer_datasets_only(tmp_path, values, message):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "x.h5", "w") as h:
        if values is None:
            h.create_group("data")
        else:
            h["data"] = values
    (tmp_path / "x.txt").write_text(str(tmp_path / "x.h5"))
    with pytest.raises(NetError, match=message):
        make_net(f'''layer {{ name: "d" type: "HDF5Data" top: "data"
                   hdf5_data_param {{ source: "{tmp_path / 'x.txt'}" batch_size: 1 }} }}''')


@pytest.mark.parametrize("loss", ["SoftmaxWithLoss", "Accuracy", "SegAccuracy"])
def test_a_bad_label_error_names_the_list_line_of_its_image(tmp_path, loss):
    """The loss names the label; the net adds which list line that batch item was read
    from (with shuffling, the position in the list says nothing)."""
    source, root, _, _ = make_dataset(tmp_path, [(6, 6)] * 4)
    bad = np.zeros((6, 6), np.uint8)
    bad[2, 3] = 30                                  # neither a class of 21 nor 255
    Image.fromarray(bad).save(tmp_path / "lab2.png")
    param = {"SoftmaxWithLoss": "loss_param", "Accuracy": "accuracy_param",
             "SegAccuracy": "seg_accuracy_param"}[loss]
    net = make_net(f'''
        layer {{ name: "data" type: "ImageSegData" top: "data" top: "label"
          image_data_param {{ source: "{source}" root_folder: "{root}" batch_size: 2
                             label_type: PIXEL }}
          transform_param {{ {mean_transform(6)} }} }}
        layer {{ name: "score" type: "Convolution" bottom: "data" top: "score"
          convolution_param {{ num_output: 21 kernel_size: 1 }} }}
        layer {{ name: "loss" type: "{loss}" bottom: "score" bottom: "label" top: "loss"
          {param} {{ ignore_label: 255 }} }}''', caffelite.TRAIN)
    net.forward()                                    # lines 1 and 2: good
    with pytest.raises(LayerError) as e:
        net.forward()
    if loss == "SegAccuracy":
        what = ("unexpected label 30 at num 0, row 2, col 3 (labels must be in [0, 21) or "
                "one of the ignore labels [255])")
    else:
        what = (f"label value 30 is out of range: labels must be integers in [0, 21) (the "
                f"size of the {'softmax' if loss == 'SoftmaxWithLoss' else 'class'} axis 1 "
                f"of the scores, (2, 21, 6, 6)); 1 label(s) are out of range and "
                f"ignore_label is 255")
    assert str(e.value) == (f"layer 'loss' ({loss}): {what}; item 0 of the batch is line 3 "
                            f"of '{source}' (ImageSegData layer 'data')")


def test_a_bad_class_label_names_the_image_data_line(tmp_path):
    _class_images(tmp_path, 3)
    (tmp_path / "cls.txt").write_text("/s0.png 1\n/s1.png 7\n/s2.png 0\n")
    net = make_net(f"""layer {{ name: "d" type: "ImageData" top: "data" top: "label"
        image_data_param {{ source: "{tmp_path / 'cls.txt'}" root_folder: "{tmp_path}"
                           batch_size: 3 }} }}
        layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
          inner_product_param {{ num_output: 5 }} }}
        layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" }}""")
    with pytest.raises(LayerError, match=r"label value 7 is out of range.*; item 1 of the "
                                         r"batch is line 2 of '.*cls\.txt' \(ImageData "
                                         r"layer 'd'\)$"):
        net.forward()


def test_net_reshape_keeps_the_last_batchs_shape_as_caffe(tmp_path):
    """BaseDataLayer::Reshape does nothing: after a forward, net.reshape() leaves the
    data top in the shape of the batch it holds, not the next one's."""
    rng = np.random.default_rng(40)
    for i, (h, w) in enumerate([(4, 5), (6, 3), (5, 5)]):
        write_rgb(tmp_path / f"v{i}.png", h, w, rng)
    (tmp_path / "cls.txt").write_text("/v0.png 0\n/v1.png 1\n/v2.png 2\n")
    net = make_net(f"""layer {{ name: "d" type: "ImageData" top: "data" top: "label"
        image_data_param {{ source: "{tmp_path / 'cls.txt'}" root_folder: "{tmp_path}"
                           batch_size: 1 }} }}""")
    assert net.blobs["data"].shape == (1, 3, 4, 5)
    net.forward()
    net.reshape()
    assert net.blobs["data"].shape == (1, 3, 4, 5)
    net.forward()
    assert net.blobs["data"].shape == (1, 3, 6, 3)
    net.reshape()
    assert net.blobs["data"].shape == (1, 3, 6, 3)


def test_a_byte_order_mark_is_read_as_the_fork_reads_it_and_said(tmp_path, caplog):
    """A list saved with a UTF-8 byte-order mark (Windows Notepad): the fork reads the
    mark as part of the first path, and so does caffelite, but it says so (a warning at
    set-up, the mark shown in the error) instead of naming a path that looks right."""
    source, root, _, _ = make_dataset(tmp_path, [(5, 7)])
    with open(source, "rb") as f:
        text = f.read()
    with open(source, "wb") as f:
        f.write(b"\xef\xbb\xbf" + text)
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        with pytest.raises(ValueError) as error:
            seg_net(source, root + "/", transform=mean_transform(8))
    assert any(f"layer 'data': the list '{source}' starts with a UTF-8 byte-order mark"
               in r.getMessage() for r in caplog.records)
    message = str(error.value)
    assert "\ufeff" not in message
    assert f"'{root}/<U+FEFF>/img0.png'" in message and "byte-order mark" in message


def test_a_prototxt_with_a_byte_order_mark_says_so():
    with pytest.raises(caffelite.io.prototxt.PrototxtError,
                       match="starts with a UTF-8 byte-order mark"):
        parse_text('\ufeffname: "x"', caffe_pb2.NetParameter())


def test_a_root_folder_without_its_slash_says_the_paths_are_joined_as_strings(tmp_path):
    source, root, _, _ = make_dataset(tmp_path, [(5, 7)])
    with open(source) as f:
        lines = f.read().replace(" /", " ")
    with open(source, "w") as f:
        f.write(lines[1:])                      # "img0.png lab0.png ...": no leading '/'
    with pytest.raises(ValueError, match=r"could not load image '.*img0\.png': no such "
                                         r"file \(root_folder '.*' and the list's "
                                         r"'img0\.png' are joined as plain strings, as in "
                                         r"Caffe: end root_folder with '/'\)"):
        seg_net(source, root, transform=mean_transform(8))


def test_an_image_missing_at_a_later_batch_names_the_net_file_as_at_set_up(tmp_path):
    source, root, _, _ = make_dataset(tmp_path, [(5, 7), (5, 7)])
    os.remove(tmp_path / "img1.png")
    path = tmp_path / "net.prototxt"
    path.write_text(f'''layer {{ name: "data" type: "ImageSegData" top: "data" top: "label"
        image_data_param {{ source: "{source}" root_folder: "{root}" batch_size: 1 }}
        transform_param {{ {mean_transform(8)} }} }}''')
    net = caffelite.Net(str(path), caffelite.TEST)
    net.forward()
    with pytest.raises(LayerError) as error:
        net.forward()
    assert str(error.value).startswith(f"{path}: layer 'data' (ImageSegData): {source}:2: "
                                       f"could not load image '{root}/img1.png'")
