"""SSD-fork layers: Permute, Normalize, PriorBox, DetectionOutput.

Forward oracle: OpenCV's Caffe importer (it implements all four), plus small
hand-derived cases; gradients by finite differences (Permute, Normalize)."""
import logging

import numpy as np
import pytest

from caffelite.blob import Blob
from caffelite.layer import TEST, TRAIN, LayerError
from layer_testing import (blobs_from, check_gradient, make_layer, opencv_forward,
                           run_forward, setup_layer)

RNG = np.random.default_rng(7)


def single_layer_net(layer_text, inputs):
    head = "".join(f'input: "{n}" input_shape {{ {" ".join(f"dim: {d}" for d in s)} }}\n'
                   for n, s in inputs.items())
    return head + f"layer {{ name: \"l\" {layer_text} top: \"out\" }}\n"


# ---------------------------------------------------------------------- Permute
@pytest.mark.parametrize("order, expected", [([0, 2, 3, 1], (0, 2, 3, 1)),
                                             ([1, 0], (1, 0, 2, 3)),
                                             ([], (0, 1, 2, 3))])
def test_permute_forward(order, expected):
    x = RNG.standard_normal((2, 3, 4, 5))
    text = 'type: "Permute" permute_param { ' + " ".join(f"order: {o}" for o in order) + " }"
    layer = make_layer(text)
    bottom, top = setup_layer(layer, [x])
    assert layer.order == expected
    np.testing.assert_array_equal(run_forward(layer, bottom, top)[0], x.transpose(expected))


def test_permute_matches_opencv():
    x = RNG.standard_normal((2, 6, 3, 5)).astype(np.float32)
    text = 'type: "Permute" bottom: "x" permute_param { order: 0 order: 2 order: 3 order: 1 }'
    ref = opencv_forward(single_layer_net(text, {"x": x.shape}), [], {"x": x}, ["l"])[0]
    layer = make_layer(text, dtype=np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    np.testing.assert_array_equal(run_forward(layer, bottom, top)[0], ref)


def test_permute_gradient():
    layer = make_layer('type: "Permute" permute_param { order: 0 order: 3 order: 1 }')
    bottom, top = setup_layer(layer, [RNG.standard_normal((2, 3, 2, 4))])
    check_gradient(layer, bottom, top)


@pytest.mark.parametrize("order, message", [([0, 4], "not an axis"), ([1, 1], "repeats")])
def test_permute_bad_order(order, message):
    layer = make_layer('type: "Permute" permute_param { '
                       + " ".join(f"order: {o}" for o in order) + " }")
    with pytest.raises(LayerError, match=message):
        setup_layer(layer, [np.zeros((1, 2, 3, 4))])


# ---------------------------------------------------------------------- Normalize
def normalize_reference(x, scale, across_spatial, eps=1e-10):
    axes = (1, 2, 3) if across_spatial else (1,)
    norm = np.sqrt((x.astype(np.float64) ** 2).sum(axis=axes, keepdims=True) + eps)
    return x / norm * np.asarray(scale).reshape(1, -1, 1, 1)


@pytest.mark.parametrize("across, shared", [(False, False), (False, True), (True, True),
                                            (True, False)])
def test_normalize_matches_opencv_and_formula(across, shared):
    x = RNG.standard_normal((2, 5, 3, 4)).astype(np.float32)
    text = (f'type: "Normalize" bottom: "x" norm_param {{ across_spatial: {str(across).lower()} '
            f'channel_shared: {str(shared).lower()} '
            f'scale_filler {{ type: "constant" value: 10 }} }}')
    layer = make_layer(text, dtype=np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    assert layer.blobs[0].shape == (() if shared else (5,))     # SSD: 0 axes when shared
    scale = RNG.uniform(1, 5, layer.blobs[0].shape).astype(np.float32)
    layer.blobs[0].data[...] = scale
    got = run_forward(layer, bottom, top)[0]
    np.testing.assert_allclose(got, normalize_reference(x, scale, across), rtol=1e-5, atol=1e-6)
    if across and not shared:
        return      # OpenCV 4.14 asserts scale.total() == 1 with across_spatial: formula only
    ref = opencv_forward(single_layer_net(text, {"x": x.shape}), [("l", "Normalize", [scale])],
                         {"x": x}, ["l"])[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_normalize_default_scale_is_one():
    layer = make_layer('type: "Normalize" norm_param { channel_shared: false }')
    setup_layer(layer, [np.ones((1, 3, 2, 2))])
    np.testing.assert_array_equal(layer.blobs[0].data, np.ones(3))


@pytest.mark.parametrize("across, shared", [(False, False), (True, True), (False, True),
                                            (True, False)])
def test_normalize_gradient(across, shared):
    """SSD's backward is the true gradient where all scales are equal (one shared
    scale, or per-channel scales of one value, as SSD's constant-20 filler makes)."""
    layer = make_layer(f'type: "Normalize" norm_param {{ across_spatial: {str(across).lower()} '
                       f'channel_shared: {str(shared).lower()} }}')
    bottom, top = setup_layer(layer, [RNG.standard_normal((2, 3, 2, 3))])
    layer.blobs[0].data[...] = RNG.uniform(0.5, 2)
    check_gradient(layer, bottom, top)


def ssd_normalize(x, dy, scale, across, shared, eps, in_place):
    """SSD's normalize_layer.cpp, Forward_cpu then Backward_cpu, image by image in
    float32, with its buffers; in place, data and diff are one array each (top ==
    bottom), so later steps read what earlier ones wrote. Returns (top data, bottom
    diff, scale diff added to zeros)."""
    f = np.float32
    num, channels = x.shape[:2]
    data = x.copy()
    top = data if in_place else np.empty_like(x)
    top_diff = dy.copy()
    bottom_diff = top_diff if in_place else np.full_like(x, np.nan)
    s = scale.reshape(-1)
    norms = []
    for n in range(num):
        sq = data[n] * data[n]
        if across:
            norm = f(np.sqrt(f(sq.sum(dtype=np.float64)) + f(eps)))
            top[n] = data[n] * f(1.0 / float(norm))
        else:
            norm = np.sqrt(sq.sum(axis=0, dtype=np.float64).astype(f) + f(eps)).astype(f)
            top[n] = data[n] / norm[None]
        norms.append(norm)
        top[n] = top[n] * (s[0] if shared else s[:, None, None])
    scale_diff = np.zeros_like(s)
    if shared:
        scale_diff[0] += f(np.dot(top.reshape(-1).astype(np.float64),
                                  top_diff.reshape(-1)).astype(f) / s[0])
    else:
        for n in range(num):
            per_channel = (top[n] * top_diff[n]).sum(axis=(1, 2), dtype=np.float64).astype(f)
            scale_diff += per_channel / s
    for n in range(num):
        bd, td, norm = bottom_diff[n], top_diff[n], norms[n]
        if across:
            a = f(np.dot(data[n].reshape(-1).astype(np.float64), td.reshape(-1)))
            bd[...] = data[n] * f(f(a / norm) / norm)
            bd[...] = td - bd
            bd[...] = bd * f(1.0 / float(norm))
        else:
            dot = (data[n] * td).sum(axis=0, dtype=np.float64).astype(f)
            bd[...] = data[n] * dot[None]
            bd[...] = bd / (norm * norm)[None]
            bd[...] = td - bd
            bd[...] = bd / norm[None]
        bd[...] = bd * (s[0] if shared else s[:, None, None])
    return top, bottom_diff, scale_diff.reshape(scale.shape)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("across, shared", [(False, False), (True, True), (False, True),
                                            (True, False)])
def test_normalize_backward_is_ssds(across, shared, in_place):
    """Against SSD's own steps with unequal (and negative) scales, where its backward is
    not the true gradient, and in place, where its diffs overwrite each other. Sums
    are in double here (BLAS orders them its own way), so the comparison allows
    rounding; the in-place bottom diff is zero as in SSD's code."""
    rng = np.random.default_rng(21)
    x = rng.standard_normal((2, 4, 3, 2)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    text = (f'type: "Normalize" norm_param {{ across_spatial: {str(across).lower()} '
            f'channel_shared: {str(shared).lower()} eps: 0.001 }}')
    layer = make_layer(text, dtype=np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    if in_place:
        top = bottom
        layer.reshape(bottom, top)
    scale = (np.float32(-1.5) if shared else np.float32([0.5, -2.0, 3.0, 1.25]))
    layer.blobs[0].data[...] = scale
    layer.blobs[0].diff[...] = 0
    layer.forward(bottom, top)
    top[0].diff[...] = dy
    if not in_place:
        bottom[0].diff[...] = np.nan
    layer.backward(top, [True], bottom)
    want_top, want_diff, want_scale_diff = ssd_normalize(x, dy, np.asarray(scale), across,
                                                         shared, 0.001, in_place)
    np.testing.assert_allclose(top[0].data, want_top, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(layer.blobs[0].diff, want_scale_diff, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bottom[0].diff, want_diff, rtol=1e-5, atol=1e-6)
    if in_place:
        assert not bottom[0].diff.any()
    elif not shared:
        assert not np.allclose(want_diff, _true_normalize_gradient(x, dy, scale, across),
                               rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("phase, in_place, warns", [(TRAIN, True, True), (TEST, True, False),
                                                    (TRAIN, False, False)])
def test_normalize_in_place_training_warns_of_its_zero_gradient(phase, in_place, warns,
                                                                caplog):
    layer = make_layer('type: "Normalize" name: "conv4_3_norm"', phase=phase)
    bottom = blobs_from([np.ones((1, 3, 2, 2))])
    top = bottom if in_place else [Blob((), np.float64)]
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        layer.setup(bottom, top)
    said = [r.getMessage() for r in caplog.records if "zero gradient" in r.getMessage()]
    assert len(said) == warns
    if warns:
        assert "conv4_3_norm" in said[0] and "own name" in said[0]


def _true_normalize_gradient(x, dy, scale, across):
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    axes = (1, 2, 3) if across else (1,)
    norm = np.sqrt((x * x).sum(axis=axes, keepdims=True) + 0.001)
    s = np.asarray(scale, np.float64).reshape(1, -1, 1, 1)
    g = dy * s
    return g / norm - x * (g * x).sum(axis=axes, keepdims=True) / norm ** 3


def test_normalize_bad_params():
    layer = make_layer('type: "Normalize" norm_param { eps: -1 }')
    with pytest.raises(LayerError, match="eps"):
        setup_layer(layer, [np.ones((1, 3, 2, 2))])


# ---------------------------------------------------------------------- PriorBox
PRIOR = ('type: "PriorBox" bottom: "f" bottom: "img" prior_box_param {{ '
         'min_size: 30 max_size: 60 min_size: 60 max_size: 111 aspect_ratio: 2 aspect_ratio: 3 '
         'flip: true clip: {clip} variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 '
         '{step} offset: 0.5 }}')


def test_prior_box_hand_case():
    """One 1x2 map over a 100x200 image, min 40: centres (50, 50) and (150, 50)."""
    layer = make_layer('type: "PriorBox" prior_box_param { min_size: 40 aspect_ratio: 4 '
                       'flip: false variance: 0.1 }', dtype=np.float32)
    bottom, top = setup_layer(layer, [np.zeros((1, 8, 1, 2)), np.zeros((1, 3, 100, 200))],
                              dtype=np.float32)
    out = run_forward(layer, bottom, top)[0]
    assert out.shape == (1, 2, 2 * 2 * 4)
    boxes = out[0, 0].reshape(2, 2, 4)
    # ratio 1: 40x40; ratio 4: 80 wide, 20 high
    np.testing.assert_allclose(boxes[0, 0], [30 / 200, 30 / 100, 70 / 200, 70 / 100], rtol=1e-6)
    np.testing.assert_allclose(boxes[0, 1], [10 / 200, 40 / 100, 90 / 200, 60 / 100], rtol=1e-6)
    np.testing.assert_allclose(boxes[1, 0], [130 / 200, 30 / 100, 170 / 200, 70 / 100],
                               rtol=1e-6)
    np.testing.assert_allclose(out[0, 1], 0.1, rtol=1e-6)


@pytest.mark.parametrize("clip, step", [("false", ""), ("true", "step: 16")])
def test_prior_box_matches_opencv(clip, step):
    f = np.zeros((1, 4, 5, 6), np.float32)
    img = np.zeros((1, 3, 80, 96), np.float32)
    text = PRIOR.format(clip=clip, step=step)
    ref = opencv_forward(single_layer_net(text, {"f": f.shape, "img": img.shape}), [],
                         {"f": f, "img": img}, ["l"])[0]
    layer = make_layer(text, dtype=np.float32)
    assert layer.layer_param.prior_box_param.clip == (clip == "true")
    bottom, top = setup_layer(layer, [f, img], dtype=np.float32)
    got = run_forward(layer, bottom, top)[0]
    assert layer.num_priors == 2 * (1 + 1 + 4)
    assert got.shape == ref.shape == (1, 2, 5 * 6 * 12 * 4)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("params, message", [
    ("", "min_size"), ("min_size: 10 max_size: 5", "greater"),
    ("min_size: 10 max_size: 20 max_size: 30", "one per min_size"),
    ("min_size: 10 variance: 0.1 variance: 0.2", "1 or 4"),
    ("min_size: 10 step: 8 step_h: 8", "not both"), ("min_size: 10 img_h: 8", "both")])
def test_prior_box_bad_params(params, message):
    layer = make_layer(f'type: "PriorBox" prior_box_param {{ {params} }}')
    with pytest.raises(LayerError, match=message):
        setup_layer(layer, [np.zeros((1, 2, 3, 3)), np.zeros((1, 3, 30, 30))])


# ---------------------------------------------------------------------- DetectionOutput
def detection_layer(extra="", classes=3, dtype=np.float64):
    return make_layer(f'type: "DetectionOutput" detection_output_param {{ num_classes: {classes} '
                      f'share_location: true background_label_id: 0 code_type: CENTER_SIZE '
                      f'nms_param {{ nms_threshold: 0.45 top_k: 20 }} {extra} }}', dtype=dtype)


def test_detection_output_hand_case():
    """Three priors; zero offsets decode to the priors.  Class 1: priors 0 and 1
    overlap (IoU 0.78 > 0.45), so the lower-scored 1 is suppressed; prior 2 is apart."""
    priors = np.array([[0.1, 0.1, 0.5, 0.5], [0.15, 0.1, 0.55, 0.5], [0.6, 0.6, 0.9, 0.9]])
    prior_blob = np.stack([priors.reshape(-1), np.full(12, 0.1)])[None]
    conf = np.array([[0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2]])
    layer = detection_layer("confidence_threshold: 0.15")
    bottom, top = setup_layer(layer, [np.zeros((1, 12)), conf.reshape(1, -1), prior_blob])
    out = run_forward(layer, bottom, top)[0].reshape(-1, 7)
    expected = [[0, 1, 0.8, *priors[0]], [0, 1, 0.3, *priors[2]], [0, 2, 0.2, *priors[2]]]
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_detection_output_keep_top_k_and_empty():
    priors = np.array([[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7]])
    prior_blob = np.stack([priors.reshape(-1), np.full(8, 0.1)])[None]
    conf = np.array([[0.0, 0.9, 0.6], [0.0, 0.7, 0.8]]).reshape(1, -1)
    layer = detection_layer("keep_top_k: 2")
    bottom, top = setup_layer(layer, [np.zeros((1, 8)), conf, prior_blob])
    out = run_forward(layer, bottom, top)[0].reshape(-1, 7)
    # the two best (0.9 class 1 prior 0, 0.8 class 2 prior 1), grouped by class; zero
    # offsets decode to the priors
    np.testing.assert_allclose(out, [[0, 1, 0.9, *priors[0]], [0, 2, 0.8, *priors[1]]],
                               rtol=1e-12)
    layer = detection_layer("confidence_threshold: 0.95")
    bottom, top = setup_layer(layer, [np.zeros((2, 8)), np.tile(conf, (2, 1)), prior_blob])
    out = run_forward(layer, bottom, top)[0]
    np.testing.assert_array_equal(out.reshape(-1, 7), [[0] + [-1] * 6, [1] + [-1] * 6])


def test_detection_output_matches_opencv():
    num_priors, classes = 60, 3
    rng = np.random.default_rng(3)
    centres = rng.uniform(0.1, 0.9, (num_priors, 2))
    sizes = rng.uniform(0.05, 0.3, (num_priors, 2))
    priors = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
    prior_blob = np.stack([priors.reshape(-1), np.tile([0.1, 0.1, 0.2, 0.2], num_priors)])
    prior_blob = prior_blob[None].astype(np.float32)
    loc = rng.normal(0, 1, (2, num_priors * 4)).astype(np.float32)
    logits = rng.normal(0, 2, (2, num_priors, classes))
    conf = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).reshape(2, -1)
    conf = conf.astype(np.float32)
    extra = "confidence_threshold: 0.05 keep_top_k: 25"
    layer = detection_layer(extra, classes, np.float32)
    bottom, top = setup_layer(layer, [loc, conf, prior_blob], dtype=np.float32)
    got = run_forward(layer, bottom, top)[0].reshape(-1, 7)
    text = (f'type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior" '
            f'detection_output_param {{ num_classes: {classes} share_location: true '
            f'background_label_id: 0 code_type: CENTER_SIZE '
            f'nms_param {{ nms_threshold: 0.45 top_k: 20 }} {extra} }}')
    inputs = {"loc": loc, "conf": conf, "prior": prior_blob}
    ref = opencv_forward(single_layer_net(text, {k: v.shape for k, v in inputs.items()}), [],
                         inputs, ["l"])[0].reshape(-1, 7)
    ref = ref[ref[:, 2] > 0]

    def order(rows):
        return rows[np.lexsort((-rows[:, 2], rows[:, 1], rows[:, 0]))]
    assert got.shape == ref.shape and len(got) > 10
    np.testing.assert_allclose(order(got), order(ref), rtol=1e-5, atol=1e-5)


def test_detection_output_bad_params():
    with pytest.raises(LayerError, match="num_classes"):
        setup_layer(make_layer('type: "DetectionOutput"'),
                    [np.zeros((1, 4)), np.zeros((1, 2)), np.zeros((1, 2, 4))])
    layer = detection_layer(classes=3)
    with pytest.raises(LayerError, match="conf bottom"):
        setup_layer(layer, [np.zeros((1, 8)), np.zeros((1, 4)), np.zeros((1, 2, 8))])
