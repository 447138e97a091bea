"""HingeLoss, MultinomialLogisticLoss, InfogainLoss, ContrastiveLoss: loop references
written from the fork's definitions, torch (optional), hand-computed cases, Caffe's
gradient checker, loss_weight scaling, clear errors, and the device path on the GPU
emulator (the cases proposed for test_gpu_layers.py)."""
import numpy as np
import pytest

from caffelite.io import array_to_blobproto
from caffelite.layer import LAYER_REGISTRY, LayerError
from layer_testing import TRAIN, check_gradient, make_layer, run_forward, setup_layer

THRESHOLD = float(np.float32(1e-20))     # kLOG_THRESHOLD, a C float


def forward(text, arrays, dtype=np.float64):
    layer = make_layer(text, TRAIN, dtype)
    bottom, top = setup_layer(layer, arrays, dtype=dtype)
    return layer, bottom, top, run_forward(layer, bottom, top)[0]


def backward(layer, bottom, top, propagate, loss_weight=1.0):
    for b in bottom:
        b.diff[...] = np.nan
    top[0].diff[...] = loss_weight
    layer.backward(top, propagate, bottom)
    return [b.diff.copy() for b in bottom]


def away_from_kink(x, t, gap=0.05):
    """Move x so that 1 - t x stays at least ``gap`` from 0 (the hinge's kink)."""
    m = 1 - t * x
    return np.where(np.abs(m) < gap, x - t * np.sign(m + 1e-12) * gap, x)


# ---------------------------------------------------------------------- HingeLoss
def hinge_reference(x, labels, norm):
    """From the definition: t = +1 at the label, -1 elsewhere; a loop over items."""
    x = np.asarray(x, np.float64).reshape(len(labels), -1)
    loss, grad = 0.0, np.zeros_like(x)
    for n, label in enumerate(labels):
        t = -np.ones(x.shape[1])
        t[int(label)] = 1
        m = np.maximum(0.0, 1 - t * x[n])
        loss += m.sum() if norm == "L1" else (m ** 2).sum()
        grad[n] = -t * (np.sign(m) if norm == "L1" else 2 * m)
    return loss / len(labels), grad / len(labels)


def hinge_case(seed=0, shape=(4, 5)):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, int(np.prod(shape[1:])), shape[0]).astype(float)
    x = rng.normal(0, 1.5, shape).reshape(shape[0], -1)
    t = -np.ones_like(x)
    t[np.arange(shape[0]), labels.astype(int)] = 1
    return away_from_kink(x, t).reshape(shape), labels


def test_hinge_by_hand():
    # item 0, label 1: x = (0.5, 2, -3) -> margins 1.5, max(0, 1 - 2) = 0, max(0, -2) = 0
    # item 1, label 0: x = (0.2, 0.4, 1) -> margins 0.8, 1.4, 2
    x = np.array([[0.5, 2.0, -3.0], [0.2, 0.4, 1.0]])
    labels = np.array([1.0, 0.0])
    layer, bottom, top, loss = forward('type: "HingeLoss"', [x, labels])
    assert loss == pytest.approx((1.5 + 0.8 + 1.4 + 2) / 2, rel=1e-15)
    diff = backward(layer, bottom, top, [True, False])[0]
    np.testing.assert_array_equal(diff, np.array([[1, 0, 0], [-1, 1, 1]]) / 2)
    layer, bottom, top, loss = forward('type: "HingeLoss" hinge_loss_param { norm: L2 }',
                                       [x, labels])
    assert loss == pytest.approx((1.5 ** 2 + 0.8 ** 2 + 1.4 ** 2 + 4) / 2, rel=1e-15)
    diff = backward(layer, bottom, top, [True, False])[0]
    np.testing.assert_allclose(diff, 2 * np.array([[1.5, 0, 0], [-0.8, 1.4, 2]]) / 2)


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_matches_reference_and_torch(norm):
    x, labels = hinge_case(seed=1, shape=(5, 3, 2, 1))
    layer, bottom, top, loss = forward(
        f'type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}', [x, labels])
    ref_loss, ref_grad = hinge_reference(x, labels, norm)
    assert loss == pytest.approx(ref_loss, rel=1e-13)
    diff = backward(layer, bottom, top, [True, False])[0]
    np.testing.assert_allclose(diff, ref_grad.reshape(x.shape), rtol=1e-13, atol=1e-16)
    torch = pytest.importorskip("torch")
    xt = torch.tensor(x.reshape(5, -1), requires_grad=True)
    t = -torch.ones(5, 6, dtype=torch.float64)
    t[torch.arange(5), torch.tensor(labels).long()] = 1
    m = torch.relu(1 - t * xt)
    ((m if norm == "L1" else m ** 2).sum() / 5).backward()
    assert loss == pytest.approx(((m if norm == "L1" else m ** 2).sum() / 5).item(), rel=1e-13)
    np.testing.assert_allclose(diff.reshape(5, -1), xt.grad.numpy(), rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_gradient_and_loss_weight(norm):
    x, labels = hinge_case(seed=2)
    text = f'type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}'
    layer, bottom, top, _ = forward(text, [x, labels])
    check_gradient(layer, bottom, top, check_bottom=[0], top_id=0)
    one = backward(layer, bottom, top, [True, False])[0]
    three = backward(layer, bottom, top, [True, False], loss_weight=3.0)[0]
    np.testing.assert_allclose(three, 3 * one, rtol=1e-15)


def test_hinge_zero_margin_has_zero_gradient_and_labels_truncate():
    # label 1.9 is class 1 (C's truncation); x = 1 at the label and -1 elsewhere: every
    # margin is exactly 0, so loss and gradient are 0 (sign(0) = 0 in L1).
    x = np.array([[-1.0, 1.0, -1.0]])
    layer, bottom, top, loss = forward('type: "HingeLoss"', [x, np.array([1.9])])
    assert loss == 0
    np.testing.assert_array_equal(backward(layer, bottom, top, [True, False])[0], 0)


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_nan_score_gives_zero_margin_as_std_max(norm):
    # The fork: diff = max(Dtype(0), 1 + diff) with std::max(a, b) = (a < b) ? b : a, so
    # a NaN score leaves a margin of 0; the L1 gradient is caffe_cpu_sign's (0 at 0).
    x = np.array([[np.nan, 0.5, -3.0], [0.2, np.nan, 1.0]], np.float32)
    labels = np.array([0.0, 0.0])
    text = f'type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}'
    layer, bottom, top, loss = forward(text, [x, labels], dtype=np.float32)

    def std_max(a, b):
        return b if a < b else a

    margins = np.zeros((2, 3), np.float32)
    for i in range(2):
        for j in range(3):
            v = -x[i, j] if j == int(labels[i]) else x[i, j]
            margins[i, j] = std_max(np.float32(0), np.float32(1) + v)
    want = margins.sum() if norm == "L1" else (margins * margins).sum()
    assert np.isfinite(loss) and loss == pytest.approx(want / 2, rel=1e-6)
    diff = backward(layer, bottom, top, [True, False])[0]
    signed = margins.copy()
    signed[np.arange(2), labels.astype(int)] *= -1
    per = (signed > 0).astype(np.float32) - (signed < 0) if norm == "L1" else 2 * signed
    np.testing.assert_allclose(diff, per / 2, rtol=1e-6)
    assert diff[0, 0] == 0 and diff[1, 1] == 0


# ------------------------------------------------------ MultinomialLogisticLoss
def probabilities(rng, n, c):
    p = rng.random((n, c)) + 0.05
    return p / p.sum(axis=1, keepdims=True)


def test_multinomial_matches_torch_nll():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    p, labels = probabilities(rng, 6, 4), rng.integers(0, 4, 6).astype(float)
    layer, bottom, top, loss = forward('type: "MultinomialLogisticLoss"', [p, labels])
    pt = torch.tensor(p, requires_grad=True)
    ref = torch.nn.functional.nll_loss(torch.log(pt), torch.tensor(labels).long())
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-14)
    diff = backward(layer, bottom, top, [True, False])[0]
    np.testing.assert_allclose(diff, pt.grad.numpy(), rtol=1e-14)


def test_multinomial_clamps_at_the_log_threshold_and_reads_flattened_items():
    # bottom N x C x H x W: the label indexes the C*H*W values of its item.
    p = np.full((2, 2, 1, 3), 0.5)
    p[0, 1, 0, 2] = 0.0                   # item 0, flat index 5: clamped to 1e-20
    labels = np.array([5.0, 1.0])
    layer, bottom, top, loss = forward('type: "MultinomialLogisticLoss"', [p, labels])
    assert loss == pytest.approx((-np.log(THRESHOLD) - np.log(0.5)) / 2, rel=1e-15)
    diff = backward(layer, bottom, top, [True, False], loss_weight=2.0)[0].reshape(2, 6)
    expect = np.zeros((2, 6))
    expect[0, 5], expect[1, 1] = -1.0 / THRESHOLD, -1.0 / 0.5
    np.testing.assert_array_equal(diff, expect)


def test_multinomial_float32_is_the_fork_loop():
    # Dtype loss = 0; loss -= log(max(p, 1e-20f)) with C's double log; loss / num.
    rng = np.random.default_rng(4)
    p = probabilities(rng, 64, 5).astype(np.float32)
    labels = rng.integers(0, 5, 64).astype(np.float32)
    *_, loss = forward('type: "MultinomialLogisticLoss"', [p, labels], np.float32)
    acc = np.float32(0)
    for n in range(64):
        prob = max(p[n, int(labels[n])], np.float32(1e-20))
        acc = np.float32(np.float64(acc) - np.log(np.float64(prob)))
    assert loss.dtype == np.float32 and loss == acc / np.float32(64)


def test_multinomial_gradient():
    rng = np.random.default_rng(5)
    p, labels = probabilities(rng, 3, 4), rng.integers(0, 4, 3).astype(float)
    layer, bottom, top, _ = forward('type: "MultinomialLogisticLoss"', [p, labels])
    check_gradient(layer, bottom, top, check_bottom=[0], top_id=0, step=1e-5)


# ---------------------------------------------------------------- InfogainLoss
def infogain_reference(p, labels, H):
    """-1/N sum_n sum_k H[label_n, k] log(max(p_nk, 1e-20)), and its gradient."""
    p = np.asarray(p, np.float64).reshape(len(labels), -1)
    loss, grad = 0.0, np.zeros_like(p)
    for n, label in enumerate(labels):
        for k in range(p.shape[1]):
            prob = max(p[n, k], THRESHOLD)
            loss -= H[int(label), k] * np.log(prob)
            grad[n, k] = -H[int(label), k] / prob
    return loss / len(labels), grad / len(labels)


def write_matrix(path, H, legacy=True):
    blob = array_to_blobproto(H)
    if legacy:
        blob.ClearField("shape")
        blob.num, blob.channels, blob.height, blob.width = 1, 1, *H.shape
    path.write_bytes(blob.SerializeToString())
    return str(path)


def infogain_case(seed, n=4, c=3):
    rng = np.random.default_rng(seed)
    return probabilities(rng, n, c), rng.integers(0, c, n).astype(float), rng.random((c, c))


def test_infogain_with_source_file_matches_reference(tmp_path):
    p, labels, H = infogain_case(6)
    H32 = H.astype(np.float32).astype(np.float64)     # a binaryproto holds floats
    source = write_matrix(tmp_path / "H.b", H)
    text = f'type: "InfogainLoss" infogain_loss_param {{ source: "{source}" }}'
    layer, bottom, top, loss = forward(text, [p, labels])
    ref_loss, ref_grad = infogain_reference(p, labels, H32)
    assert loss == pytest.approx(ref_loss, rel=1e-14)
    diff = backward(layer, bottom, top, [True, False], loss_weight=0.5)[0]
    np.testing.assert_allclose(diff, 0.5 * ref_grad, rtol=1e-14)


def test_infogain_matrix_as_third_bottom_matches_torch():
    torch = pytest.importorskip("torch")
    p, labels, H = infogain_case(7, n=5, c=4)
    layer, bottom, top, loss = forward('type: "InfogainLoss"',
                                       [p, labels, H.reshape(1, 1, 4, 4)])
    pt = torch.tensor(p, requires_grad=True)
    ref = -(torch.tensor(H)[torch.tensor(labels).long()] * torch.log(pt)).sum() / 5
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-14)
    diff = backward(layer, bottom, top, [True, False, False])
    np.testing.assert_allclose(diff[0], pt.grad.numpy(), rtol=1e-14)
    assert np.isnan(diff[1]).all() and np.isnan(diff[2]).all()   # untouched


def test_infogain_identity_is_multinomial_logistic():
    p, labels, _ = infogain_case(8, n=6, c=5)
    p[2, int(labels[2])] = 0.0
    *_, info = forward('type: "InfogainLoss"', [p, labels, np.eye(5).reshape(1, 1, 5, 5)])
    *_, mll = forward('type: "MultinomialLogisticLoss"', [p, labels])
    assert info == pytest.approx(mll, rel=1e-15)


def test_infogain_float32_is_the_fork_loop():
    p, labels, H = infogain_case(9, n=16, c=4)
    p, labels, H = (a.astype(np.float32) for a in (p, labels, H))
    *_, loss = forward('type: "InfogainLoss"', [p, labels, H.reshape(1, 1, 4, 4)],
                       np.float32)
    acc = np.float32(0)
    for n in range(16):
        for k in range(4):
            prob = max(p[n, k], np.float32(1e-20))
            term = np.float64(H[int(labels[n]), k]) * np.log(np.float64(prob))
            acc = np.float32(np.float64(acc) - term)
    assert loss == acc / np.float32(16)


def test_infogain_gradient_and_no_gradient_to_labels_or_matrix():
    p, labels, H = infogain_case(10)
    layer, bottom, top, _ = forward('type: "InfogainLoss"',
                                    [p, labels, H.reshape(1, 1, 3, 3)])
    check_gradient(layer, bottom, top, check_bottom=[0], top_id=0, step=1e-5)
    # LossLayer's rule (InfogainLoss keeps it): only the labels are exempt from
    # force_backward, so a forced H bottom reaches the refusal below, as in Caffe
    assert layer.allow_force_backward(0) and layer.allow_force_backward(2)
    assert not layer.allow_force_backward(1)
    with pytest.raises(LayerError, match="infogain matrix input"):
        layer.backward(top, [True, False, True], bottom)
    with pytest.raises(LayerError, match="label inputs"):
        layer.backward(top, [True, True, False], bottom)


def test_infogain_errors(tmp_path):
    p, labels, H = infogain_case(11)
    with pytest.raises(LayerError, match="source must be specified"):
        forward('type: "InfogainLoss"', [p, labels])
    with pytest.raises(LayerError, match="cannot read the infogain matrix"):
        forward(f'type: "InfogainLoss" infogain_loss_param {{ source: '
                f'"{tmp_path / "none.b"}" }}', [p, labels])
    # Caffe's check: 1 x 1 x dim x dim (a 2-axis blob is dim x dim x 1 x 1 to it)
    flat = write_matrix(tmp_path / "flat.b", H, legacy=False)
    with pytest.raises(LayerError, match=r"1 x 1 x 3 x 3.*got shape \(3, 3\)"):
        forward(f'type: "InfogainLoss" infogain_loss_param {{ source: "{flat}" }}',
                [p, labels])
    with pytest.raises(LayerError, match="1 x 1 x 3 x 3"):
        forward('type: "InfogainLoss"', [p, labels, np.ones((1, 1, 4, 4))])
    with pytest.raises(LayerError, match="BVLC 1.0"):
        forward('type: "InfogainLoss" infogain_loss_param { axis: 1 }',
                [p, labels, H.reshape(1, 1, 3, 3)])
    with pytest.raises(LayerError, match=r"under_test.*InfogainLoss.*label value 3"):
        forward('type: "InfogainLoss"', [p, np.array([0, 1, 3, 2.0]), H.reshape(1, 1, 3, 3)])


# ---------------------------------------------------------------- ContrastiveLoss
def contrastive_reference(a, b, y, margin=1.0, legacy=False):
    """From the definition, with Caffe's gradient (the 1e-4 in d + 1e-4)."""
    n = a.shape[0]
    a, b = a.reshape(n, -1), b.reshape(n, -1)
    loss, grad = 0.0, np.zeros_like(a)
    for i in range(n):
        diff = a[i] - b[i]
        d2 = diff @ diff
        if int(y[i]):
            loss += d2
            grad[i] = diff
        elif legacy:
            loss += max(margin - d2, 0.0)
            grad[i] = -diff if margin - d2 > 0 else 0
        else:
            d = np.sqrt(d2)
            loss += max(margin - d, 0.0) ** 2
            grad[i] = -(margin - d) / (d + 1e-4) * diff if margin - d > 0 else 0
    return loss / n / 2, grad / n


def contrastive_case(seed, n=6, c=3, margin=1.0, legacy=False):
    """Pairs whose distance stays off the margin's kink, with both kinds of pair."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-0.6, 0.6, (n, c, 1, 1))
    b = rng.uniform(-0.6, 0.6, (n, c, 1, 1))
    y = (np.arange(n) % 2).astype(float)
    for i in range(n):
        d = np.linalg.norm(a[i] - b[i])
        size = d * d if legacy else d
        if abs(size - margin) < 0.1 or d < 0.1:
            b[i] = a[i] + (b[i] - a[i]) * (0.5 * margin if legacy else 0.5) / max(d, 1e-3)
    return a, b, y


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_matches_reference(legacy):
    a, b, y = contrastive_case(12, margin=1.3, legacy=legacy)
    y[0], y[1] = 2.0, 0.7         # static_cast<int>: 2 -> similar, 0.7 -> dissimilar
    text = (f'type: "ContrastiveLoss" contrastive_loss_param {{ margin: 1.3 '
            f'legacy_version: {str(legacy).lower()} }}')
    layer, bottom, top, loss = forward(text, [a, b, y])
    ref_loss, ref_grad = contrastive_reference(a, b, y, np.float32(1.3), legacy)
    assert loss == pytest.approx(ref_loss, rel=1e-13)
    da, db, dy = backward(layer, bottom, top, [True, True, False], loss_weight=2.0)
    np.testing.assert_allclose(da.reshape(ref_grad.shape), 2 * ref_grad, rtol=1e-13,
                               atol=1e-16)
    np.testing.assert_allclose(db.reshape(ref_grad.shape), -2 * ref_grad, rtol=1e-13,
                               atol=1e-16)
    assert np.isnan(dy).all()


def test_contrastive_by_hand_and_zero_distance():
    # pair 0 similar, d^2 = 9 + 16 = 25; pair 1 dissimilar at d = 0: (1 - 0)^2;
    # pair 2 dissimilar, d = 5 >= margin 1: 0.  loss = (25 + 1 + 0) / (2 * 3)
    a = np.array([[3.0, 4.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[0.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    layer, bottom, top, loss = forward('type: "ContrastiveLoss"', [a, b, np.array([1, 0, 0.])])
    assert loss == pytest.approx(26 / 6, rel=1e-15)
    da, db, _ = backward(layer, bottom, top, [True, True, False])
    # d = 0: the gradient is -(1 - 0) / (0 + 1e-4) * 0 = 0, not NaN
    np.testing.assert_array_equal(da, [[1.0, 4 / 3], [0, 0], [0, 0]])
    np.testing.assert_array_equal(db, -da)


def test_contrastive_matches_torch_away_from_the_epsilon():
    # torch's loss from the definition; Caffe's gradient differs by the 1e-4 epsilon
    # (relative 1e-4 / d), so the comparison is to 1e-3.
    torch = pytest.importorskip("torch")
    a, b, y = contrastive_case(13, n=8, c=4)
    layer, bottom, top, loss = forward('type: "ContrastiveLoss"', [a, b, y])
    at = torch.tensor(a.reshape(8, 4), requires_grad=True)
    bt = torch.tensor(b.reshape(8, 4))
    d = torch.linalg.norm(at - bt, dim=1)
    yt = torch.tensor(y)
    ref = (yt * d ** 2 + (1 - yt) * torch.relu(1 - d) ** 2).sum() / 16
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-13)
    da = backward(layer, bottom, top, [True, True, False])[0]
    np.testing.assert_allclose(da.reshape(8, 4), at.grad.numpy(), rtol=1e-3, atol=1e-12)


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_gradient(legacy):
    a, b, y = contrastive_case(14, legacy=legacy)
    layer, bottom, top, _ = forward(
        f'type: "ContrastiveLoss" contrastive_loss_param {{ legacy_version: '
        f'{str(legacy).lower()} }}', [a, b, y])
    # Caffe's d + 1e-4 puts the non-legacy gradient a relative ~1e-4 / d off the loss's
    # own (the formula itself is checked above), so Caffe's float threshold applies
    check_gradient(layer, bottom, top, check_bottom=[0, 1], top_id=0,
                   threshold=1e-6 if legacy else 1e-3)
    assert layer.allow_force_backward(0) and layer.allow_force_backward(1)
    assert not layer.allow_force_backward(2)


def test_contrastive_float32_forward_is_the_fork_loop():
    a, b, y = contrastive_case(15, n=9, c=5)
    a, b, y = (v.astype(np.float32) for v in (a, b, y))
    *_, loss = forward('type: "ContrastiveLoss" contrastive_loss_param { margin: 1.1 }',
                       [a, b, y], np.float32)
    margin = np.float32(1.1)
    diff = (a - b).reshape(9, 5)
    acc = np.float32(0)
    for i in range(9):
        d2 = (diff[i] * diff[i]).sum(dtype=np.float32)
        if int(y[i]):
            acc = np.float32(acc + d2)
        else:
            dist = max(np.float32(np.float64(margin) - np.sqrt(np.float64(d2))), np.float32(0))
            acc = np.float32(acc + dist * dist)
    assert loss == acc / np.float32(9) / np.float32(2)


def test_contrastive_shape_errors():
    a = np.zeros((3, 2))
    with pytest.raises(LayerError, match="same C"):
        forward('type: "ContrastiveLoss"', [a, np.zeros((3, 3)), np.zeros(3)])
    with pytest.raises(LayerError, match="N x C x 1 x 1"):
        forward('type: "ContrastiveLoss"', [np.zeros((3, 2, 2)), np.zeros((3, 2, 2)),
                                            np.zeros(3)])
    with pytest.raises(LayerError, match="similarity blob"):
        forward('type: "ContrastiveLoss"', [a, a, np.zeros((3, 2))])


# ------------------------------------------------------------ shared: labels, names
@pytest.mark.parametrize("text", ['type: "HingeLoss"', 'type: "MultinomialLogisticLoss"'])
def test_bad_labels_are_refused_with_the_layer_name(text):
    x = np.full((2, 3), 0.3)
    with pytest.raises(LayerError, match=r"'under_test'.*label value 3 is out of range"):
        forward(text, [x, np.array([0.0, 3.0])])
    with pytest.raises(LayerError, match="label value -1"):
        forward(text, [x, np.array([-1.0, 0.0])])
    with pytest.raises(LayerError, match="label value nan"):
        forward(text, [x, np.array([np.nan, 0.0])])
    with pytest.raises(LayerError, match=r"one value per item, N x 1 x 1 x 1; got shape \(2, 2\)"):
        forward(text, [x, np.zeros((2, 2))])
    with pytest.raises(LayerError, match="same num"):
        forward(text, [x, np.zeros(3)])
    layer, bottom, top, _ = forward(text, [x, np.array([0.0, 2.0])])
    with pytest.raises(LayerError, match="label inputs"):
        layer.backward(top, [True, True], bottom)


@pytest.mark.parametrize("v1, v2", [("HINGE_LOSS", "HingeLoss"),
                                    ("INFOGAIN_LOSS", "InfogainLoss"),
                                    ("MULTINOMIAL_LOGISTIC_LOSS", "MultinomialLogisticLoss"),
                                    ("CONTRASTIVE_LOSS", "ContrastiveLoss")])
def test_v1_names_are_registered(v1, v2):
    assert LAYER_REGISTRY[v1] is LAYER_REGISTRY[v2]
    assert LAYER_REGISTRY[v2].type_name == v2
