"""SigmoidCrossEntropyLoss, EuclideanLoss, Accuracy: float64 formula oracles, torch
(optional), hand-computed cases, Caffe's gradient checker and clear errors."""
import numpy as np
import pytest

from layer_testing import TEST, TRAIN, check_gradient, make_layer, run_forward, setup_layer


# ------------------------------------------------------- SigmoidCrossEntropyLoss
def sce_oracle(x, t, ignore=None, mode="BATCH_SIZE"):
    """-[t log s + (1 - t) log(1 - s)], s = sigmoid(x), in float64 via logaddexp."""
    x = np.asarray(x, np.float64)
    t = np.asarray(t, np.float64).reshape(x.shape)
    per = np.logaddexp(0.0, x) - x * t
    valid = np.ones(x.shape, bool) if ignore is None else t.astype(int) != ignore
    total = per[valid].sum()
    n = x.shape[0]
    norm = {"FULL": x.size, "VALID": valid.sum(), "BATCH_SIZE": n, "NONE": 1}[mode]
    return total / max(1.0, norm)


def sce_case(shape=(2, 3, 2, 2), ignore_frac=0.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 2, size=shape)
    t = rng.random(shape)
    if ignore_frac:
        t[rng.random(shape) < ignore_frac] = -1
    return x, t


def sce_layer(params="", dtype=np.float64):
    return make_layer(f'type: "SigmoidCrossEntropyLoss" {params}', TRAIN, dtype)


@pytest.mark.parametrize("params", ["", "loss_param { normalize: true }",
                                    "loss_param { normalize: false }",
                                    "loss_param { normalization: FULL }",
                                    "loss_param { normalization: VALID }",
                                    "loss_param { normalization: NONE }",
                                    "loss_param { ignore_label: -1 normalization: VALID }"])
def test_sce_divides_by_num_whatever_loss_param_says(params):
    # The fork's sigmoid_cross_entropy_loss_layer.cpp (BVLC of early 2016) reads neither
    # ignore_label nor normalization/normalize: loss = sum over every element / num.
    x, t = sce_case(ignore_frac=0.3, seed=1)
    layer = sce_layer(params)
    bottom, top = setup_layer(layer, [x, t])
    assert top[0].shape == ()
    assert run_forward(layer, bottom, top)[0] == pytest.approx(
        sce_oracle(x, t, mode="BATCH_SIZE"), rel=1e-12)


def test_sce_by_hand():
    # x = 0 -> s = 1/2: each element costs log 2 whatever the target (-1 included):
    # 6 log 2 / num 2. Gradient (s - t) * loss_weight / num, at every element.
    t = np.array([[0.0, 1.0, 0.3], [-1.0, -1.0, 1.0]])
    layer = sce_layer("loss_param { ignore_label: -1 normalization: VALID }")
    bottom, top = setup_layer(layer, [np.zeros((2, 3)), t])
    assert run_forward(layer, bottom, top)[0] == pytest.approx(3 * np.log(2), rel=1e-12)
    top[0].diff[...] = 3
    layer.backward(top, [True, False], bottom)
    np.testing.assert_allclose(bottom[0].diff, (0.5 - t) * 3 / 2, rtol=1e-12)


def test_sce_matches_torch():
    torch = pytest.importorskip("torch")
    x, t = sce_case(shape=(3, 4, 5), seed=3)
    xt = torch.tensor(x, requires_grad=True)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(
        xt, torch.tensor(t), reduction="sum") / 3
    ref.backward()
    layer = sce_layer()
    bottom, top = setup_layer(layer, [x, t])
    assert run_forward(layer, bottom, top)[0] == pytest.approx(ref.item(), rel=1e-12)
    top[0].diff[...] = 1
    layer.backward(top, [True, False], bottom)
    np.testing.assert_allclose(bottom[0].diff, xt.grad.numpy(), rtol=1e-10, atol=1e-15)


def test_sce_stable_for_large_logits_float32():
    x = np.array([[100.0, -100.0, 80.0, -80.0]], np.float32)
    t = np.array([[0.0, 1.0, 1.0, 0.0]], np.float32)
    layer = sce_layer(dtype=np.float32)
    bottom, top = setup_layer(layer, [x, t], dtype=np.float32)
    loss = run_forward(layer, bottom, top)[0]
    assert loss.dtype == np.float32 and np.isfinite(loss)
    assert float(loss) == pytest.approx(sce_oracle(x, t), rel=1e-6)     # = 200


@pytest.mark.parametrize("params", ["", "loss_param { ignore_label: -1 normalization: VALID }"])
def test_sce_gradient(params):
    x, t = sce_case(ignore_frac=0.3 if params else 0.0, seed=4)
    layer = sce_layer(params)
    bottom, top = setup_layer(layer, [x, t])
    check_gradient(layer, bottom, top, check_bottom=[0], top_id=0)
    check_gradient(layer, bottom, top, check_bottom=[0], top_id=0, top_data_id=0)


def test_sce_errors():
    layer = sce_layer()
    with pytest.raises(ValueError, match="same count"):
        setup_layer(layer, [np.zeros((2, 3)), np.zeros((2, 4))])
    layer = sce_layer()
    bottom, top = setup_layer(layer, [np.zeros((2, 3)), np.zeros((2, 3))])
    run_forward(layer, bottom, top)
    with pytest.raises(ValueError, match="target"):
        layer.backward(top, [True, True], bottom)


# ---------------------------------------------------------------- EuclideanLoss
def test_euclidean_by_hand():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([[0.0, 2.0], [5.0, 1.0]])
    layer = make_layer('type: "EuclideanLoss"', TRAIN)
    bottom, top = setup_layer(layer, [a, b])
    # (1 + 0 + 4 + 9) / (2 * 2)
    assert run_forward(layer, bottom, top)[0] == pytest.approx(3.5, rel=1e-15)
    top[0].diff[...] = 2.0
    layer.backward(top, [True, True], bottom)
    np.testing.assert_allclose(bottom[0].diff, (a - b) * 2 / 2)
    np.testing.assert_allclose(bottom[1].diff, -(a - b) * 2 / 2)


def test_euclidean_matches_oracle_and_reshapes_labels():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(3, 2, 2, 2)), rng.normal(size=(3, 8))
    layer = make_layer('type: "EuclideanLoss"', TRAIN)
    bottom, top = setup_layer(layer, [a, b])
    expect = np.sum((a.reshape(3, 8) - b) ** 2) / 3 / 2
    assert run_forward(layer, bottom, top)[0] == pytest.approx(expect, rel=1e-12)


def test_euclidean_gradient_both_bottoms():
    rng = np.random.default_rng(6)
    layer = make_layer('type: "EuclideanLoss"', TRAIN)
    bottom, top = setup_layer(layer, [rng.normal(size=(2, 3, 2)), rng.normal(size=(2, 3, 2))])
    check_gradient(layer, bottom, top, check_bottom=[0, 1], top_id=0)
    check_gradient(layer, bottom, top, check_bottom=[0, 1], top_id=0, top_data_id=0)
    assert layer.allow_force_backward(1)


def test_euclidean_dimension_mismatch():
    layer = make_layer('type: "EuclideanLoss"', TRAIN)
    with pytest.raises(ValueError, match="same dimension"):
        setup_layer(layer, [np.zeros((2, 3)), np.zeros((2, 4))])


# --------------------------------------------------------------------- Accuracy
def accuracy_layer(params="", num_top=1, scores=None, labels=None):
    layer = make_layer(f'type: "Accuracy" {params}', TEST)
    bottom, top = setup_layer(layer, [scores, labels], num_top=num_top)
    return [np.asarray(o) for o in run_forward(layer, bottom, top)], layer, bottom, top


SCORES = np.array([[0.1, 0.5, 0.4],    # ranking 1, 2, 0
                   [0.7, 0.2, 0.1],    # 0, 1, 2
                   [0.2, 0.3, 0.5],    # 2, 1, 0
                   [0.3, 0.3, 0.4]])   # 2, then the tie 1 before 0 (higher index first)


@pytest.mark.parametrize("top_k,labels,expect", [
    (1, [1, 0, 2, 2], 1.0),
    (1, [2, 1, 0, 0], 0.0),
    (2, [2, 1, 0, 1], 0.75),     # sample 2: label 0 is third
    (2, [0, 2, 1, 0], 0.25),     # only sample 2 (label 1 second); sample 3 label 0 is third
    (3, [0, 2, 0, 0], 1.0)])
def test_accuracy_top_k_by_hand(top_k, labels, expect):
    (acc,), *_ = accuracy_layer(f"accuracy_param {{ top_k: {top_k} }}", 1, SCORES,
                                np.array(labels, np.float64))
    assert acc.shape == ()
    assert float(acc) == pytest.approx(expect)


def test_accuracy_ties_rank_the_higher_class_index_first():
    # The fork's std::partial_sort of (score, index) pairs with std::greater: among equal
    # scores the higher class index ranks first.
    scores = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [2.0, 2.0, 2.0], [2.0, 2.0, 2.0]])
    (acc,), *_ = accuracy_layer("", 1, scores, np.array([0.0, 1.0, 2.0, 0.0]))
    assert float(acc) == pytest.approx(0.5)            # samples 1 and 2 right
    (acc,), *_ = accuracy_layer("accuracy_param { top_k: 2 }", 1, scores,
                                np.array([0.0, 1.0, 1.0, 0.0]))
    assert float(acc) == pytest.approx(0.75)           # sample 3: label 0 third of three


def test_accuracy_ignore_label_and_per_class_top():
    labels = np.array([1.0, 0.0, 255.0, 0.0])
    (acc, per_class), *_ = accuracy_layer("accuracy_param { ignore_label: 255 }", 2,
                                          SCORES, labels)
    assert float(acc) == pytest.approx(2 / 3)          # sample 3 (label 0) is wrong
    np.testing.assert_allclose(per_class, [0.5, 1.0, 0.0])   # class 2 absent -> 0
    assert per_class.shape == (3,)


def test_accuracy_all_ignored_is_nan_as_in_the_fork():
    (acc,), *_ = accuracy_layer("accuracy_param { ignore_label: 255 }", 1, SCORES,
                                np.full(4, 255.0))
    assert np.isnan(acc)


def rank_oracle(scores, label):
    order = sorted(range(len(scores)), key=lambda k: (scores[k], k), reverse=True)
    return order.index(label)


def test_accuracy_spatial_axis_matches_sort_oracle():
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 4, size=(2, 5, 3, 4)).astype(np.float64)   # many ties
    labels = rng.integers(0, 5, size=(2, 1, 3, 4)).astype(np.float64)
    labels[0, 0, 1, :2] = 9
    for top_k in (1, 2, 4):
        (acc, per_class), *_ = accuracy_layer(
            f"accuracy_param {{ top_k: {top_k} ignore_label: 9 }}", 2, scores, labels)
        hits, totals = np.zeros(5), np.zeros(5)
        for n in range(2):
            for h in range(3):
                for w in range(4):
                    lab = int(labels[n, 0, h, w])
                    if lab == 9:
                        continue
                    totals[lab] += 1
                    hits[lab] += rank_oracle(list(scores[n, :, h, w]), lab) < top_k
        assert float(acc) == pytest.approx(hits.sum() / totals.sum())
        np.testing.assert_allclose(per_class, np.where(totals > 0, hits / np.maximum(totals, 1),
                                                       0))


def test_accuracy_axis_2():
    rng = np.random.default_rng(8)
    scores = rng.normal(size=(2, 3, 4))                 # classes on axis 2
    labels = rng.integers(0, 4, size=(2, 3)).astype(np.float64)
    (acc,), *_ = accuracy_layer("accuracy_param { axis: 2 }", 1, scores, labels)
    assert float(acc) == pytest.approx(np.mean(scores.argmax(axis=2) == labels))


def test_accuracy_errors():
    with pytest.raises(ValueError, match="top_k"):
        accuracy_layer("accuracy_param { top_k: 4 }", 1, SCORES, np.zeros(4))
    with pytest.raises(ValueError, match="number of labels must match"):
        accuracy_layer("", 1, SCORES, np.zeros(3))
    with pytest.raises(ValueError, match="label value 3"):
        accuracy_layer("", 1, SCORES, np.array([0.0, 3.0, 1.0, 1.0]))
    _, layer, bottom, top = accuracy_layer("", 1, SCORES, np.zeros(4))
    with pytest.raises(ValueError, match="no backward"):
        layer.backward(top, [True, False], bottom)


def test_accuracy_top_k_0_is_zero_as_in_the_fork():
    # accuracy_layer.cpp sets no lower bound: with top_k 0 its loop over the k best
    # never runs, so nothing counts as correct: 0 / count (NaN if every label is ignored).
    labels = np.array([1.0, 0.0, 255.0, 2.0])
    (acc, per_class), *_ = accuracy_layer("accuracy_param { top_k: 0 ignore_label: 255 }",
                                          2, SCORES, labels)
    assert float(acc) == 0.0
    np.testing.assert_array_equal(per_class, [0.0, 0.0, 0.0])
    (acc,), *_ = accuracy_layer("accuracy_param { top_k: 0 ignore_label: 255 }", 1, SCORES,
                                np.full(4, 255.0))
    assert np.isnan(acc)


# ---------------------------------------------------------------- more than 4 axes
@pytest.mark.parametrize("text,bottoms", [
    ('type: "SigmoidCrossEntropyLoss"', [(2, 1, 1, 1, 3), (2, 1, 1, 1, 3)]),
    ('type: "EuclideanLoss"', [(2, 3), (2, 1, 1, 1, 3)]),
    ('type: "HingeLoss"', [(2, 1, 1, 1, 3), (2, 1, 1, 1)]),
    ('type: "MultinomialLogisticLoss"', [(2, 1, 1, 1, 3), (2, 1, 1, 1)]),
    ('type: "InfogainLoss"', [(2, 1, 1, 1, 3), (2, 1, 1, 1), (1, 1, 3, 3)]),
    ('type: "ContrastiveLoss"', [(2, 3, 1, 1, 1), (2, 3, 1, 1), (2, 1, 1, 1)]),
    ('type: "SoftmaxWithLoss"', [(2, 3, 1, 1, 2), (2, 1, 1, 1, 2)]),
])
def test_loss_layers_refuse_bottoms_of_more_than_4_axes(text, bottoms):
    # LossLayer::Reshape: CHECK_EQ(bottom[0]->num(), bottom[1]->num()); num() is a
    # legacy accessor, which CHECKs num_axes() <= 4.
    layer = make_layer(text, TRAIN)
    with pytest.raises(ValueError, match="under_test.*5 axes.*at most 4 axes"):
        setup_layer(layer, [np.zeros(s) for s in bottoms])
