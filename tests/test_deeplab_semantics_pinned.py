"""DeepLab-layer semantics that a mutation run (session 32) found no other test pinned,
each against an oracle of its own: the fork's per-axis Interp sizes and plain
subsampling, ImageSegData's random words (CaffeRNG, checked against mt19937) with
cv2.resize, C's cast of a NaN label, v1's loss loop written out, scipy's MAT reader."""
import math

import numpy as np
import pytest

import caffelite as caffe
from caffelite.caffe_rng import CaffeRNG
from caffelite.io import prototxt
from caffelite.io.matfile import MatFileError, mat_bytes, read_mat
from caffelite.layer import LayerError
from caffelite.proto import caffe_pb2
from layer_testing import TRAIN, make_layer, run_forward, setup_layer

FLT_MIN = float(np.finfo(np.float32).tiny)


# ---- Interp shrink on a rectangular map (interp_layer.cpp: each axis (n-1)/s+1)
@pytest.mark.parametrize("body,shape,want", [
    ("shrink_factor: 4", (1, 2, 17, 9), (5, 3)),
    ("shrink_factor: 4 zoom_factor: 3", (1, 2, 33, 25), (25, 19)),
])
def test_interp_shrink_keeps_height_and_width_apart(body, shape, want):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    layer = make_layer(f'type: "Interp" interp_param {{ {body} }}')
    bottom, top = setup_layer(layer, [x])
    got = run_forward(layer, bottom, top)[0]
    assert got.shape[2:] == want
    if body == "shrink_factor: 4":     # ratio exactly 4 on both axes: plain subsampling
        np.testing.assert_array_equal(got, x[:, :, ::4, ::4])


# ---- ImageSegData's transformer words: mirror, scale index, h_off, w_off
def _seg_list(tmp_path, h=6, w=7):
    from PIL import Image
    ramp = np.add.outer(10 * np.arange(h), np.arange(w))
    Image.fromarray(np.repeat(ramp[:, :, None], 3, axis=2).astype(np.uint8)).save(
        tmp_path / "i.png")
    Image.fromarray(np.zeros((h, w), np.uint8)).save(tmp_path / "l.png")
    (tmp_path / "list.txt").write_text("/i.png /l.png\n")
    return ramp


def _seg_net(tmp_path, transform, phase, batch):
    text = f'''layer {{ name: "data" type: "ImageSegData" top: "data" top: "label"
        image_data_param {{ root_folder: "{tmp_path}" source: "{tmp_path / 'list.txt'}"
        batch_size: {batch} label_type: PIXEL }}
        transform_param {{ {transform} mean_value: 0 mean_value: 0 mean_value: 0 }} }}'''
    return caffe.Net(param=prototxt.parse_text(text, caffe_pb2.NetParameter()), phase=phase)


def test_seg_words_mirror_then_scale_then_offsets(tmp_path):
    cv2 = pytest.importorskip("cv2")
    ramp = _seg_list(tmp_path)
    caffe.set_random_seed(77)
    net = _seg_net(tmp_path, "mirror: true crop_size: 4 scale_factors: 1 scale_factors: 2",
                   caffe.TRAIN, 8)
    # setup draws: InitRand, InitRand again (the seed used), the thread seed
    _, transform_seed, _ = CaffeRNG(77).words(3)
    words = CaffeRNG(transform_seed).words(32).reshape(8, 4)
    net.forward()
    img = np.repeat(ramp[:, :, None], 3, axis=2).astype(np.uint8)
    for n, (mirror, scale, hw, ww) in enumerate(words):
        s = (1, 2)[scale % 2]
        im = img if s == 1 else cv2.resize(img, (7 * s, 6 * s), interpolation=cv2.INTER_LINEAR)
        h_off, w_off = hw % (im.shape[0] - 4 + 1), ww % (im.shape[1] - 4 + 1)
        want = im[h_off:h_off + 4, w_off:w_off + 4, 0].astype(np.float32)
        if mirror % 2:
            want = want[:, ::-1]
        assert np.array_equal(net.blobs["data"].data[n, 0], want), n


def test_seg_test_phase_draws_no_crop_words(tmp_path):
    ramp = _seg_list(tmp_path)
    caffe.set_random_seed(5)
    net = _seg_net(tmp_path, "mirror: true crop_size: 4", caffe.TEST, 12)
    _, transform_seed, _ = CaffeRNG(5).words(3)
    words = CaffeRNG(transform_seed).words(12)          # one word (mirror) per sample
    net.forward()
    centre = ramp[1:5, 1:5].astype(np.float32)          # (6-4)//2, (7-4)//2
    for n, word in enumerate(words):
        want = centre[:, ::-1] if word % 2 else centre
        assert np.array_equal(net.blobs["data"].data[n, 0], want), n


# ---- a label without an int value is bad even when ignore_label is -1
# (the fork's static_cast<int> gives INT_MIN on x86, never -1)
@pytest.mark.parametrize("bad", [np.nan, 3e9])
def test_seg_accuracy_nan_label_with_ignore_minus_one_is_an_error(bad):
    scores = np.random.default_rng(1).standard_normal((1, 3, 2, 3)).astype(np.float32)
    labels = np.array([[[[0, 1, -1], [2, bad, 1]]]], np.float32)
    layer = make_layer('type: "SegAccuracy" seg_accuracy_param { ignore_label: -1 }',
                       dtype=np.float32)
    bottom, top = setup_layer(layer, [scores, labels], 1, dtype=np.float32)
    with pytest.raises(LayerError, match="unexpected label .* at num 0, row 1, col 1"):
        run_forward(layer, bottom, top)


@pytest.mark.parametrize("bad", [np.nan, 3e9])
def test_softmax_loss_nan_label_with_ignore_minus_one_is_an_error(bad):
    scores = np.random.default_rng(2).standard_normal((1, 3, 2, 3))
    labels = np.array([[[[0, 1, -1], [2, bad, 1]]]])
    layer = make_layer('type: "SoftmaxWithLoss" loss_param { ignore_label: -1 }', TRAIN)
    bottom, top = setup_layer(layer, [scores, labels])
    with pytest.raises(LayerError, match="out of range"):
        run_forward(layer, bottom, top)


# ---- v1 loss with loss_param.ignore_label as well (caffelite's documented union)
def test_v1_loss_also_ignores_loss_param_ignore_label():
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((2, 4, 3, 3))
    labels = rng.integers(0, 4, (2, 1, 3, 3)).astype(float)
    labels[0, 0, 0, :] = 3
    layer = make_layer('type: "SoftmaxWithLoss" softmaxloss_param { ignore_label: 255 } '
                       'loss_param { ignore_label: 3 }', TRAIN)
    bottom, top = setup_layer(layer, [scores, labels])
    loss = float(run_forward(layer, bottom, top)[0])
    p = np.exp(scores - scores.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    lab = labels[:, 0].astype(int)
    keep = lab != 3
    n, h, w = np.nonzero(keep)
    want = -np.log(p[n, lab[keep], h, w]).mean()
    assert loss == pytest.approx(want, rel=1e-12)


# ---- v1 loss bits: C's double log into a float accumulator, pixel by pixel
# (test_v1_loss_in_float_is_v1s_loop's loop, over several seeds: one seed catches a
# float32 log only about one time in three)
@pytest.mark.parametrize("seed", range(12))
def test_v1_loss_float_bits_over_seeds(seed):
    rng = np.random.default_rng(seed)
    scores = (rng.standard_normal((2, 21, 9, 11)) * 4).astype(np.float32)
    labels = rng.integers(0, 21, (2, 1, 9, 11)).astype(np.float32)
    labels[rng.random(labels.shape) < 0.2] = 255
    layer = make_layer('type: "SoftmaxWithLoss" softmaxloss_param { ignore_label: 255 } '
                       'top: "loss" top: "prob"', TRAIN, np.float32)
    bottom, top = setup_layer(layer, [scores, labels], 2, dtype=np.float32)
    loss, prob = run_forward(layer, bottom, top)
    p = prob.reshape(2, 21, -1)
    total, weight = np.float32(0), np.float32(0)
    for i, row in enumerate(labels.reshape(2, -1)):
        for j, label in enumerate(row):
            if label == 255:
                continue
            weight = np.float32(weight + np.float32(1))
            clamped = max(p[i, int(label), j], np.float32(FLT_MIN))
            total = np.float32(np.float64(total) - 1.0 * math.log(float(clamped)))
    assert loss == np.float32(total / weight)


# ---- two variables named 'data': the first one counts (matio's Mat_VarReadInfo,
# scipy.loadmat(variable_names=[...]) alike)
def test_duplicate_data_variable_first_wins(tmp_path):
    import scipy.io
    a = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)
    b = np.arange(20, dtype=np.float32).reshape(1, 1, 4, 5)
    body = mat_bytes({"data": b})[128:]
    path = tmp_path / "dup.mat"
    path.write_bytes(mat_bytes({"data": a}) + body)
    want = scipy.io.loadmat(str(path), variable_names=["data"])["data"]
    assert want.shape == (3, 2, 1, 1)                       # the first variable, [W,H,C,N]
    data, _ = read_mat(str(path))
    assert data.shape == (1, 1, 2, 3) and np.array_equal(data, a)


# ---- a 'diff' smaller than 'data' is a MatFileError naming it
def test_short_diff_is_refused(tmp_path):
    import scipy.io
    path = str(tmp_path / "d.mat")
    scipy.io.savemat(path, {"data": np.zeros((3, 2, 1, 1), np.float32),
                            "diff": np.zeros((2, 1), np.float32)}, format="5")
    with pytest.raises(MatFileError, match="'diff' has 2 values, fewer than the 6"):
        read_mat(path)
