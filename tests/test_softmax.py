"""Softmax and SoftmaxWithLoss: OpenCV / torch / float64-formula oracles, hand-computed
normalisation cases, Caffe's gradient checker, and clear errors."""
import numpy as np
import pytest

from caffelite.layer import LayerError

from gpu_modes import gpu_mode  # noqa: F401  (fixture)
from layer_testing import (TEST, TRAIN, check_gradient, make_layer, opencv_forward,
                           run_forward, setup_layer)

FLT_MIN = float(np.finfo(np.float32).tiny)


def np_softmax(x, axis):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def oracle_loss(scores, labels, axis=1, ignore=None, mode="VALID"):
    """Spec section 6, in float64, one position at a time (no shared code with the layer)."""
    p = np_softmax(scores, axis)
    p = np.moveaxis(p, axis, -1)                      # (..., C) per position
    positions = p.reshape(-1, p.shape[-1])
    labels = np.asarray(labels, np.float64).reshape(-1)
    outer = int(np.prod(scores.shape[:axis]))
    total, valid = 0.0, 0
    for probs, raw in zip(positions, labels):
        lab = int(raw)                                # C truncation toward zero
        if ignore is not None and lab == ignore:
            continue
        total -= np.log(max(probs[lab], FLT_MIN))
        valid += 1
    norm = {"FULL": positions.shape[0], "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode]
    return total / max(1.0, norm)


def loss_layer(params="", phase=TRAIN, dtype=np.float64):
    return make_layer(f'type: "SoftmaxWithLoss" {params}', phase, dtype)


def random_case(shape=(2, 4, 3, 3), ignore_frac=0.0, seed=0, ignore=255):
    rng = np.random.default_rng(seed)
    scores = rng.normal(0, 2, size=shape)
    labels = rng.integers(0, shape[1], size=(shape[0], 1) + shape[2:]).astype(np.float64)
    if ignore_frac:
        labels[rng.random(labels.shape) < ignore_frac] = ignore
    return scores, labels


# ----------------------------------------------------------------------- Softmax
@pytest.mark.parametrize("axis", [1, 2, -1])
def test_softmax_matches_opencv(axis):
    x = np.random.default_rng(1).normal(0, 3, size=(2, 3, 4, 5)).astype(np.float32)
    text = f'type: "Softmax" softmax_param {{ axis: {axis} }}'
    layer = make_layer(text, TEST, np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    ours = run_forward(layer, bottom, top)[0]
    assert ours.dtype == np.float32
    net = ('input: "data"\ninput_shape { dim: 2 dim: 3 dim: 4 dim: 5 }\n'
           f'layer {{ name: "sm" {text} bottom: "data" top: "out" }}\n')
    cv = opencv_forward(net, [], {"data": x}, ["sm"])[0]
    np.testing.assert_allclose(ours, cv, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours, np_softmax(x, axis), rtol=1e-5, atol=1e-7)


def test_softmax_is_stable_for_large_inputs():
    x = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1000.0, -1000.0]], np.float32)
    layer = make_layer('type: "Softmax"', TEST, np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    out = run_forward(layer, bottom, top)[0]
    e = np.exp([-1.0, 0.0, -2.0])
    np.testing.assert_allclose(out[0], e / e.sum(), rtol=1e-6)
    np.testing.assert_allclose(out[1], [1 / 3] * 3, rtol=1e-6)


@pytest.mark.parametrize("axis,shape", [(1, (2, 3, 2, 3)), (2, (2, 3, 4, 2)), (0, (3, 4))])
def test_softmax_gradient(axis, shape):
    x = np.random.default_rng(2).normal(size=shape)
    layer = make_layer(f'type: "Softmax" softmax_param {{ axis: {axis} }}')
    bottom, top = setup_layer(layer, [x])
    check_gradient(layer, bottom, top)


def test_softmax_in_place_matches_out_of_place():
    x = np.random.default_rng(3).normal(size=(2, 4, 3))
    dy = np.random.default_rng(4).normal(size=x.shape)
    layer = make_layer('type: "Softmax"')
    bottom, top = setup_layer(layer, [x])
    y = run_forward(layer, bottom, top)[0]
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    expected = bottom[0].diff.copy()
    inplace = make_layer('type: "Softmax"')
    b, _ = setup_layer(inplace, [x])
    inplace.reshape(b, b)
    inplace.forward(b, b)
    np.testing.assert_allclose(b[0].data, y, rtol=1e-12)
    b[0].diff[...] = dy
    inplace.backward(b, [True], b)
    np.testing.assert_allclose(b[0].diff, expected, rtol=1e-12, atol=1e-15)


def test_softmax_bad_axis_is_a_clear_error():
    layer = make_layer('type: "Softmax" softmax_param { axis: 4 }')
    with pytest.raises(ValueError, match="axis 4"):
        setup_layer(layer, [np.zeros((2, 3, 4, 5))])


# ------------------------------------------------------------- SoftmaxWithLoss
@pytest.mark.parametrize("mode", ["VALID", "FULL", "BATCH_SIZE", "NONE"])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.3])
def test_loss_matches_float64_oracle(mode, ignore_frac):
    scores, labels = random_case(ignore_frac=ignore_frac, seed=5)
    layer = loss_layer(f"loss_param {{ ignore_label: 255 normalization: {mode} }}")
    bottom, top = setup_layer(layer, [scores, labels])
    assert top[0].shape == ()
    loss = run_forward(layer, bottom, top)[0]
    assert loss == pytest.approx(oracle_loss(scores, labels, ignore=255, mode=mode), rel=1e-12)


def test_loss_matches_torch_cross_entropy():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    scores, labels = random_case(shape=(3, 5, 4, 6), ignore_frac=0.25, seed=6)
    target = torch.tensor(labels[:, 0]).long()
    s = torch.tensor(scores, requires_grad=True)
    valid = F.cross_entropy(s, target, ignore_index=255)                   # mean over valid
    full = F.cross_entropy(s, target, ignore_index=255, reduction="sum") / (3 * 4 * 6)
    for mode, ref in [("VALID", valid), ("FULL", full)]:
        layer = loss_layer(f"loss_param {{ ignore_label: 255 normalization: {mode} }}")
        bottom, top = setup_layer(layer, [scores, labels])
        assert run_forward(layer, bottom, top)[0] == pytest.approx(ref.item(), rel=1e-10)
    # gradient of the VALID loss, loss weight 1
    valid.backward()
    layer = loss_layer("loss_param { ignore_label: 255 }")
    bottom, top = setup_layer(layer, [scores, labels])
    run_forward(layer, bottom, top)
    top[0].diff[...] = 1.0
    layer.backward(top, [True, False], bottom)
    np.testing.assert_allclose(bottom[0].diff, s.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_loss_float32_keeps_dtype_and_matches_oracle():
    scores, labels = random_case(ignore_frac=0.2, seed=7)
    layer = loss_layer("loss_param { ignore_label: 255 }", dtype=np.float32)
    bottom, top = setup_layer(layer, [scores, labels], dtype=np.float32)
    loss = run_forward(layer, bottom, top)[0]
    assert loss.dtype == np.float32
    ref = oracle_loss(bottom[0].data.astype(np.float64), labels, ignore=255)
    assert float(loss) == pytest.approx(ref, rel=1e-5)


class TestNormalizationByHand:
    """Scores all 0 over C = 4 classes: every position costs log 4.  N=2, H=2, W=3 gives
    12 positions, 3 of them ignored -> sum = 9 log 4."""
    N, C, H, W = 2, 4, 2, 3

    def run(self, params, ignored=3):
        labels = np.arange(self.N * self.H * self.W).reshape(self.N, 1, self.H, self.W) % self.C
        labels = labels.astype(np.float64)
        labels.reshape(-1)[:ignored] = 255
        layer = loss_layer(params)
        bottom, top = setup_layer(layer, [np.zeros((self.N, self.C, self.H, self.W)), labels])
        return float(run_forward(layer, bottom, top)[0]), layer, bottom, top

    @pytest.mark.parametrize("mode,norm", [("VALID", 9), ("FULL", 12), ("BATCH_SIZE", 2),
                                           ("NONE", 1)])
    def test_modes_with_ignored_pixels(self, mode, norm):
        loss, *_ = self.run(f"loss_param {{ ignore_label: 255 normalization: {mode} }}")
        assert loss == pytest.approx(9 * np.log(4) / norm, rel=1e-12)

    @pytest.mark.parametrize("mode,norm", [("VALID", 12), ("FULL", 12), ("BATCH_SIZE", 2),
                                           ("NONE", 1)])
    def test_modes_without_ignored_pixels(self, mode, norm):
        loss, *_ = self.run(f"loss_param {{ normalization: {mode} }}", ignored=0)
        assert loss == pytest.approx(12 * np.log(4) / norm, rel=1e-12)

    def test_default_is_valid(self):
        loss, *_ = self.run("loss_param { ignore_label: 255 }")
        assert loss == pytest.approx(np.log(4), rel=1e-12)

    def test_without_ignore_label_255_is_out_of_range(self):
        with pytest.raises(ValueError, match="label value 255"):
            self.run("")

    @pytest.mark.parametrize("normalize,norm", [("true", 9), ("false", 2)])
    def test_legacy_normalize(self, normalize, norm):
        loss, *_ = self.run(f"loss_param {{ ignore_label: 255 normalize: {normalize} }}")
        assert loss == pytest.approx(9 * np.log(4) / norm, rel=1e-12)

    def test_normalization_wins_over_normalize(self):
        loss, *_ = self.run("loss_param { ignore_label: 255 normalize: true normalization: NONE }")
        assert loss == pytest.approx(9 * np.log(4), rel=1e-12)

    def test_all_ignored_gives_normalizer_one(self):
        loss, layer, bottom, top = self.run("loss_param { ignore_label: 255 }", ignored=12)
        assert loss == 0.0
        top[0].diff[...] = 1.0
        bottom[0].diff[...] = np.nan
        layer.backward(top, [True, False], bottom)
        assert np.all(bottom[0].diff == 0)

    def test_gradient_by_hand(self):
        # d loss / d score = (p - onehot) / normalizer, zero at ignored positions.
        loss, layer, bottom, top = self.run("loss_param { ignore_label: 255 }")
        top[0].diff[...] = 1.0
        layer.backward(top, [True, False], bottom)
        g = bottom[0].diff
        lab = bottom[1].data
        for n in range(self.N):
            for h in range(self.H):
                for w in range(self.W):
                    if lab[n, 0, h, w] == 255:
                        expect = np.zeros(self.C)
                    else:
                        expect = np.full(self.C, 0.25)
                        expect[int(lab[n, 0, h, w])] -= 1
                        expect /= 9
                    np.testing.assert_allclose(g[n, :, h, w], expect, rtol=1e-12, atol=1e-15)


def test_labels_are_truncated_toward_zero():
    scores = np.random.default_rng(8).normal(size=(1, 3, 1, 4))
    raw = np.array([2.7, 0.9, -0.5, 1.999]).reshape(1, 1, 1, 4)
    layer = loss_layer("loss_param { normalization: NONE }")
    bottom, top = setup_layer(layer, [scores, raw])
    p = np_softmax(scores, 1)[0, :, 0, :]
    expect = -(np.log(p[2, 0]) + np.log(p[0, 1]) + np.log(p[0, 2]) + np.log(p[1, 3]))
    assert run_forward(layer, bottom, top)[0] == pytest.approx(expect, rel=1e-12)


@pytest.mark.parametrize("dtype,gap", [(np.float32, 200.0), (np.float64, 1000.0)])
def test_probability_clamped_at_flt_min(dtype, gap):
    # p[label] underflows to exactly 0: Caffe charges -log(FLT_MIN) in both precisions.
    scores = np.array([0.0, gap]).reshape(1, 2, 1, 1)
    layer = loss_layer("", dtype=dtype)
    bottom, top = setup_layer(layer, [scores, np.zeros((1, 1, 1, 1))], dtype=dtype)
    loss = run_forward(layer, bottom, top)[0]
    assert np.isfinite(loss)
    assert float(loss) == pytest.approx(-np.log(FLT_MIN), rel=1e-6)


def test_second_top_is_refused_as_caffe_cannot_build_it():
    """Caffe's LossLayer adds one loss_weight, which two tops fail (BVLC issue #2968;
    the real BVLC Caffe aborts: 'loss_weight must be unspecified or specified once per
    top blob')."""
    scores, labels = random_case(seed=9)
    with pytest.raises(LayerError, match="second \\(probability\\) top"):
        setup_layer(loss_layer(), [scores, labels], num_top=2)


def test_softmax_axis_2():
    # scores (N, A, C, W) with the classes on axis 2: N*A*W labels
    rng = np.random.default_rng(10)
    scores = rng.normal(size=(2, 3, 4, 5))
    labels = rng.integers(0, 4, size=(2, 3, 5)).astype(np.float64)
    layer = loss_layer("softmax_param { axis: 2 } loss_param { normalization: BATCH_SIZE }")
    bottom, top = setup_layer(layer, [scores, labels])
    loss = run_forward(layer, bottom, top)[0]
    # BATCH_SIZE is the outer count N*A = 6 for axis 2
    assert loss == pytest.approx(oracle_loss(scores, labels, axis=2, mode="BATCH_SIZE"),
                                 rel=1e-12)
    check_gradient(layer, bottom, top, check_bottom=[0], top_id=0)


@pytest.mark.parametrize("mode", ["VALID", "FULL", "BATCH_SIZE", "NONE"])
def test_loss_gradient_each_mode_with_ignore(mode):
    scores, labels = random_case(shape=(2, 3, 2, 3), ignore_frac=0.3, seed=11)
    layer = loss_layer(f"loss_param {{ ignore_label: 255 normalization: {mode} }}")
    bottom, top = setup_layer(layer, [scores, labels])
    check_gradient(layer, bottom, top, check_bottom=[0], top_id=0)            # weight = loss
    check_gradient(layer, bottom, top, check_bottom=[0], top_id=0, top_data_id=0)  # weight 1


def test_loss_weight_two_scales_the_gradient():
    scores, labels = random_case(shape=(2, 3, 2, 2), ignore_frac=0.25, seed=12)
    layer = loss_layer("loss_param { ignore_label: 255 }")
    bottom, top = setup_layer(layer, [scores, labels])

    def loss_at(x):
        bottom[0].data[...] = x
        return float(run_forward(layer, bottom, top)[0])

    run_forward(layer, bottom, top)
    top[0].diff[...] = 2.0
    layer.backward(top, [True, False], bottom)
    analytic = bottom[0].diff.copy()
    numeric = np.zeros_like(scores)
    step = 1e-4
    for i in range(scores.size):
        plus, minus = scores.copy(), scores.copy()
        plus.flat[i] += step
        minus.flat[i] -= step
        numeric.flat[i] = 2.0 * (loss_at(plus) - loss_at(minus)) / (2 * step)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


def test_out_of_range_label_names_the_value():
    scores, labels = random_case(seed=13)
    labels[1, 0, 2, 1] = 7
    layer = loss_layer("loss_param { ignore_label: 255 }")
    bottom, top = setup_layer(layer, [scores, labels])
    with pytest.raises(ValueError, match="label value 7 .*\\[0, 4\\)"):
        run_forward(layer, bottom, top)
    labels[1, 0, 2, 1] = -1
    bottom[1].data[...] = labels
    with pytest.raises(ValueError, match="label value -1"):
        run_forward(layer, bottom, top)


def test_ignore_label_may_be_any_value():
    scores, labels = random_case(seed=14)
    labels[0, 0, 0, :] = -1
    layer = loss_layer("loss_param { ignore_label: -1 }")
    bottom, top = setup_layer(layer, [scores, labels])
    assert run_forward(layer, bottom, top)[0] == pytest.approx(
        oracle_loss(scores, labels, ignore=-1), rel=1e-12)


def test_label_count_mismatch_is_a_clear_error():
    layer = loss_layer()
    with pytest.raises(ValueError, match="number of labels must match"):
        setup_layer(layer, [np.zeros((2, 3, 4, 4)), np.zeros((2, 1, 4, 3))])


def test_no_gradient_to_labels():
    scores, labels = random_case(seed=15)
    layer = loss_layer()
    bottom, top = setup_layer(layer, [scores, labels])
    run_forward(layer, bottom, top)
    top[0].diff[...] = 1
    with pytest.raises(ValueError, match="label"):
        layer.backward(top, [True, True], bottom)
    assert not layer.allow_force_backward(1)


@pytest.mark.parametrize("loss", ["loss_param { ignore_label: 255 }",
                                  "softmaxloss_param { ignore_label: 255 }"],
                         ids=["fork", "v1"])
def test_backward_reads_the_labels_again_as_caffe_does(loss, gpu_mode, tmp_path):
    """Caffe's Backward reads bottom[1] itself (and counts the valid labels again for
    the VALID normaliser; v1 sums its batch weight again): labels changed between the
    forward and the backward give the gradient of the new labels, on the CPU and on
    the GPU alike. Oracle: a fresh forward and backward with the new labels."""
    import caffelite
    text = f"""force_backward: true
    input: "score" input_shape {{ dim: 2 dim: 4 dim: 3 dim: 3 }}
    input: "label" input_shape {{ dim: 2 dim: 1 dim: 3 dim: 3 }}
    layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label"
      top: "loss" {loss} }}"""
    (tmp_path / "net.prototxt").write_text(text)
    scores, before = random_case(ignore_frac=0.5, seed=21)
    _, after = random_case(ignore_frac=0.2, seed=22)

    def gradient(first, second):
        net = caffelite.Net(str(tmp_path / "net.prototxt"), caffelite.TRAIN)
        net.blobs["score"].data[...] = scores
        net.blobs["label"].data[...] = first
        net.forward()
        net.blobs["label"].data[...] = second
        net.backward()
        return net.blobs["score"].diff.copy()

    for device in (False, True):
        if device:
            gpu_mode.on()
        changed, fresh = gradient(before, after), gradient(after, after)
        np.testing.assert_array_equal(changed, fresh)
        assert np.abs(changed - gradient(before, before)).max() > 0.01
