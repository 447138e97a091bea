"""WindowData against a transcription of the fork's WindowDataLayer::load_batch that
reads, warps and flips with OpenCV itself (cv2.imread / cv2.resize / cv2.flip), and
Caffe's random-number order at setup and per window."""
import math

import numpy as np
import pytest

import caffelite as caffe
from caffelite.caffe_rng import CaffeRNG
from caffelite.io import array_to_blobproto, prototxt
from layer_testing import assert_data_position_resumes, net_build_error

cv2 = pytest.importorskip("cv2")


# ---------------------------------------------------------------------- fixtures
def write_images(tmp_path, sizes, seed=0):
    rng = np.random.default_rng(seed)
    names = []
    for i, (h, w) in enumerate(sizes):
        name = f"img{i}.png"
        cv2.imwrite(str(tmp_path / name), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        names.append(name)
    return names


def random_windows(rng, h, w, count):
    out = []
    for _ in range(count):
        x1, x2 = sorted(rng.integers(0, w, 2))
        y1, y2 = sorted(rng.integers(0, h, 2))
        label = int(rng.integers(1, 5))
        overlap = float(rng.choice([0.0, 0.1, 0.3, 0.5, 0.7, 1.0]))
        out.append((label, overlap, int(x1), int(y1), int(x2), int(y2)))
    return out


def write_window_file(path, names, sizes, windows, prefix=""):
    lines = []
    for i, (name, (h, w), wins) in enumerate(zip(names, sizes, windows)):
        lines += ["# %d" % i, prefix + name, "3", str(h), str(w), str(len(wins))]
        lines += ["%d %g %d %d %d %d" % win for win in wins]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def window_net(source, batch, window="", transform="crop_size: 12"):
    text = (f'layer {{ name: "w" type: "WindowData" top: "data" top: "label" '
            f'transform_param {{ {transform} }} '
            f'window_data_param {{ source: "{source}" batch_size: {batch} {window} }} }}')
    return prototxt.parse_net(text)[0]


# ---------------------------------------------------------------------- the oracle
def c_round(v):
    v = float(v)
    return int(math.floor(v + 0.5)) if v >= 0 else int(math.ceil(v - 0.5))


def caffe_window_batch(paths, fg, bg, rng, batch, fg_fraction, crop, context_pad, square,
                       mirror, mean, mean_values, scale):
    """load_batch, line by line, in float32."""
    f = np.float32
    data = np.zeros((batch, 3, crop, crop), f)
    labels = np.zeros(batch, f)
    num_fg = int(f(batch) * f(fg_fraction))
    item = 0
    for is_fg, count in ((0, batch - num_fg), (1, num_fg)):
        for _ in range(count):
            windows = fg if is_fg else bg
            win = windows[rng.rand() % len(windows)]
            do_mirror = bool(mirror and rng.rand() % 2)
            img = cv2.imread(paths[win[0]], cv2.IMREAD_COLOR)
            x1, y1, x2, y2 = win[3:]
            pad_w = pad_h = 0
            size_w = size_h = crop
            if context_pad > 0 or square:
                context_scale = f(crop) / f(crop - 2 * context_pad)
                half_height = f(f(y2 - y1 + 1) / 2.0)
                half_width = f(f(x2 - x1 + 1) / 2.0)
                center_x = f(x1) + half_width
                center_y = f(y1) + half_height
                if square:
                    if half_height > half_width:
                        half_width = half_height
                    else:
                        half_height = half_width
                x1 = c_round(center_x - half_width * context_scale)
                x2 = c_round(center_x + half_width * context_scale)
                y1 = c_round(center_y - half_height * context_scale)
                y2 = c_round(center_y + half_height * context_scale)
                unclipped_height, unclipped_width = y2 - y1 + 1, x2 - x1 + 1
                pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
                pad_x2 = max(0, x2 - img.shape[1] + 1)
                pad_y2 = max(0, y2 - img.shape[0] + 1)
                x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
                scale_x = f(crop) / f(unclipped_width)
                scale_y = f(crop) / f(unclipped_height)
                size_w = c_round(f(x2 - x1 + 1) * scale_x)
                size_h = c_round(f(y2 - y1 + 1) * scale_y)
                pad_x1 = c_round(f(pad_x1) * scale_x)
                pad_x2 = c_round(f(pad_x2) * scale_x)
                pad_y1 = c_round(f(pad_y1) * scale_y)
                pad_h = pad_y1
                pad_w = pad_x2 if do_mirror else pad_x1
                if pad_h + size_h > crop:
                    size_h = crop - pad_h
                if pad_w + size_w > crop:
                    size_w = crop - pad_w
            warped = cv2.resize(img[y1:y2 + 1, x1:x2 + 1], (size_w, size_h),
                                interpolation=cv2.INTER_LINEAR)
            if do_mirror:
                warped = cv2.flip(warped, 1)
            for h in range(warped.shape[0]):
                for w in range(warped.shape[1]):
                    for c in range(3):
                        pixel = f(warped[h, w, c])
                        if mean is not None:
                            _, mh, mw = mean.shape
                            off = int((mw - crop) / 2)
                            m = mean.reshape(-1)[(c * mh + h + off + pad_h) * mw + w + off
                                                 + pad_w]
                            v = (pixel - m) * f(scale)
                        elif mean_values:
                            v = (pixel - f(mean_values[c])) * f(scale)
                        else:
                            v = pixel * f(scale)
                        data[item, c, h + pad_h, w + pad_w] = v
            labels[item] = win[1]
            item += 1
    return data, labels


def split_windows(windows, fg_threshold=0.5, bg_threshold=0.5):
    fg, bg = [], []
    for index, wins in enumerate(windows):
        for label, overlap, *box in wins:
            if np.float32(overlap) >= np.float32(fg_threshold):
                fg.append((index, label, overlap, *box))
            elif np.float32(overlap) < np.float32(bg_threshold):
                bg.append((index, 0, 0.0, *box))
    return fg, bg


# ---------------------------------------------------------------------- batches
CASES = [
    # phase, window_data_param, transform_param extras, mean kind
    (caffe.TRAIN, "", "", None),
    (caffe.TRAIN, "context_pad: 2", "mirror: true", "file"),
    (caffe.TEST, 'crop_mode: "square" context_pad: 1', "mirror: true", "values"),
    (caffe.TRAIN, 'crop_mode: "square" scale: 0.5 fg_fraction: 0.5', "", "file"),
    (caffe.TEST, "context_pad: 3 cache_images: true", "", None),
]


@pytest.mark.parametrize("phase, window, transform, mean_kind", CASES)
def test_batches_match_the_fork(tmp_path, phase, window, transform, mean_kind):
    sizes = [(30, 40), (25, 33), (41, 20)]
    names = write_images(tmp_path, sizes)
    rng = np.random.default_rng(1)
    windows = [random_windows(rng, h, w, 9) for h, w in sizes]
    source = write_window_file(tmp_path / "windows.txt", names, sizes, windows)
    window += f' root_folder: "{tmp_path}/"'
    mean = mean_values = None
    if mean_kind == "file":
        mean = rng.uniform(0, 255, (3, 16, 16)).astype(np.float32)
        (tmp_path / "mean.binaryproto").write_bytes(
            array_to_blobproto(mean[None]).SerializeToString())
        transform += f' mean_file: "{tmp_path}/mean.binaryproto"'
    elif mean_kind == "values":
        mean_values = [104.0, 117.0, 123.5]
        transform += " mean_value: 104 mean_value: 117 mean_value: 123.5"
    param = window_net(source, 8, window, "crop_size: 12 " + transform)
    lp = param.layer[0]
    caffe.set_random_seed(77)
    net = caffe.Net(param=param, phase=phase)
    main = CaffeRNG(77)
    if lp.transform_param.mirror or phase == caffe.TRAIN:
        main.rand()                         # the transformer's InitRand
    sampling = CaffeRNG(main.rand())
    fg, bg = split_windows(windows, lp.window_data_param.fg_threshold,
                           lp.window_data_param.bg_threshold)
    p = lp.window_data_param
    paths = [str(tmp_path / n) for n in names]
    for _ in range(3):
        want = caffe_window_batch(paths, fg, bg, sampling, 8, p.fg_fraction, 12, p.context_pad,
                                  p.crop_mode == "square", lp.transform_param.mirror, mean,
                                  mean_values, p.scale)
        net.forward()
        np.testing.assert_array_equal(net.blobs["data"].data, want[0])
        np.testing.assert_array_equal(net.blobs["label"].data, want[1])


def test_setup_draws_the_forks_words(tmp_path):
    """InitRand (mirror or TRAIN), sampling seed, InitRand, prefetch thread."""
    names = write_images(tmp_path, [(20, 20)])
    source = write_window_file(tmp_path / "w.txt", names, [(20, 20)],
                               [[(1, 0.9, 0, 0, 9, 9), (2, 0.1, 3, 3, 15, 15)]])
    window = f'root_folder: "{tmp_path}/"'
    for phase, transform, used in ((caffe.TRAIN, "", 4), (caffe.TEST, "", 2),
                                   (caffe.TEST, "mirror: true", 4)):
        caffe.set_random_seed(3)
        caffe.Net(param=window_net(source, 2, window, "crop_size: 8 " + transform),
                  phase=phase)
        ref = CaffeRNG(3)
        for _ in range(used):
            ref.rand()
        assert caffe.backend.rng().rand() == ref.rand(), (phase, transform)


def test_state_dict_resumes_the_sampling(tmp_path):
    names = write_images(tmp_path, [(30, 30)])
    rng = np.random.default_rng(2)
    source = write_window_file(tmp_path / "w.txt", names, [(30, 30)],
                               [random_windows(rng, 30, 30, 12)])
    param = window_net(source, 4, f'root_folder: "{tmp_path}/" fg_fraction: 0.5',
                       "crop_size: 10 mirror: true")
    assert_data_position_resumes(param, caffe.TRAIN, 2)


# ---------------------------------------------------------------------- errors
def build_error(param, phase=caffe.TRAIN):
    return net_build_error(param, phase)


def test_window_file_errors(tmp_path):
    names = write_images(tmp_path, [(20, 20)])
    root = f'root_folder: "{tmp_path}/"'
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "Window file is empty" in build_error(window_net(str(empty), 2, root))
    bad = tmp_path / "bad.txt"
    bad.write_text(f"# 0\n{names[0]}\n3\n20\n20\n1\n1 0.9 0 0 x 9\n")
    assert "bad.txt:7: 'x' is not a window's x2" in build_error(window_net(str(bad), 2, root))
    missing = tmp_path / "short.txt"
    missing.write_text(f"# 0\n{names[0]}\n3\n20\n")
    assert "ends where the image's width should be" in build_error(
        window_net(str(missing), 2, root))
    assert "Failed to open window file" in build_error(window_net(str(tmp_path / "no"), 2))
    no_fg = write_window_file(tmp_path / "nofg.txt", names, [(20, 20)],
                              [[(1, 0.1, 0, 0, 9, 9)]])
    assert "no foreground windows" in build_error(window_net(no_fg, 8, root))
    assert "no foreground windows" in build_error(
        window_net(no_fg, 8, root + " fg_fraction: 0"))
    zero = write_window_file(tmp_path / "zero.txt", names, [(20, 20)],
                             [[(0, 0.9, 0, 0, 9, 9)]])
    assert "foreground classes must be > 0" in build_error(window_net(zero, 2, root))
    ok = write_window_file(tmp_path / "ok.txt", names, [(20, 20)],
                           [[(1, 0.9, 0, 0, 9, 9), (1, 0.1, 0, 0, 9, 9)]])
    assert "crop_size must be positive" in build_error(window_net(ok, 2, root, ""))
    assert "Could not open or find file" in build_error(window_net(ok, 2))   # no root
    assert "Could not open or find file" in build_error(
        window_net(ok, 2, "cache_images: true"))
    outside = write_window_file(tmp_path / "out.txt", names, [(20, 20)],
                                [[(1, 0.9, 5, 5, 25, 9), (1, 0.1, 5, 5, 25, 9)]])
    assert "lies outside the image" in build_error(window_net(outside, 2, root))
