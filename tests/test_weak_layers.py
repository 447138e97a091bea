"""Weak / semi-supervised layers (spec deeplab_extra_layers.md sections 3 and 4):
UniqueLabel, BiasChannel, AdaptiveBiasChannel, DeepLab v1's ArgMax (ArgMaxV1) and
softmax loss (SoftmaxWithLoss + softmaxloss_param), and the Weak-EM-Adapt corpus net.

Oracles: cases worked out by hand from the spec (order statistics, ignore labels,
-1 fillers, suppression, the final shift), scalar transcriptions of the spec written
here, and central finite differences (float64) for every backward.
"""
import ctypes
import ctypes.util
import os
import tempfile

import numpy as np
import pytest

import caffelite as caffe
from caffelite.caffe_rng import c_rand
from caffelite.io import prototxt
from caffelite.layer import LayerError
from layer_testing import TRAIN, check_gradient, make_layer, run_forward, setup_layer

FLT_MIN = float(np.finfo(np.float32).tiny)


def run(text, arrays, dtype=np.float64):
    layer = make_layer(text, TRAIN, dtype)
    bottom, top = setup_layer(layer, arrays, 1, dtype)
    (y,) = run_forward(layer, bottom, top)
    return layer, bottom, top, y


def label_list(rows, length):
    out = np.full((len(rows), length, 1, 1), -1.0)
    for i, r in enumerate(rows):
        out[i, :len(r), 0, 0] = r
    return out


# ====================================================================== UniqueLabel
UNIQUE = 'type: "UniqueLabel" unique_label_param { max_labels: 5 ignore_label: 255 }'


def test_unique_label_sorted_values_padded_with_minus_one():
    lab = np.array([[7, 0, 0, 255], [3, 7, 255, 0]], float).reshape(1, 1, 2, 4)
    lab2 = np.full((1, 1, 2, 4), 255.0)
    _, _, _, y = run(UNIQUE, [np.concatenate([lab, lab2])])
    assert y.shape == (2, 5, 1, 1)
    np.testing.assert_array_equal(y[0].ravel(), [0, 3, 7, -1, -1])
    np.testing.assert_array_equal(y[1].ravel(), [-1] * 5)       # all ignored


def test_unique_label_exact_float_values_and_force_labels():
    """Values are compared exactly: 2.5 is its own label and 255.5 is not ignored;
    force labels are added whether present or not."""
    text = ('type: "UniqueLabel" unique_label_param { max_labels: 6 ignore_label: 255 '
            'force_label: 0 force_label: 9 }')
    lab = np.array([2.5, 1, 255, 255.5, 1, 9]).reshape(1, 1, 2, 3)
    _, _, _, y = run(text, [lab])
    np.testing.assert_array_equal(y.ravel(), [0, 1, 2.5, 9, 255.5, -1])


def test_unique_label_errors():
    with pytest.raises(LayerError, match="more than unique_label_param.max_labels 5"):
        run(UNIQUE, [np.arange(6, dtype=float).reshape(1, 1, 2, 3)])
    with pytest.raises(LayerError, match="must exceed the number of distinct force_label"):
        run('type: "UniqueLabel" unique_label_param { max_labels: 2 force_label: 0 '
            'force_label: 1 force_label: 1 }', [np.zeros((1, 1, 2, 2))])
    with pytest.raises(LayerError, match="one channel"):
        run(UNIQUE, [np.zeros((1, 2, 2, 2))])
    layer, bottom, top, _ = run(UNIQUE, [np.zeros((1, 1, 2, 2))])
    with pytest.raises(LayerError, match="cannot back-propagate"):
        layer.backward(top, [True], bottom)
    layer.backward(top, [False], bottom)


# ====================================================================== BiasChannel
def test_bias_channel_image_labels():
    """Label 0 gets bg_bias, others fg_bias per occurrence (duplicates twice), -1 and
    ignore labels skipped, values truncated (5.9 -> 5); background_label does not
    change IMAGE mode (background is channel 0)."""
    scores = np.random.default_rng(0).normal(size=(2, 6, 2, 3))
    labels = label_list([[0, 5.9, 255, 5], [2]], 4)
    text = ('type: "BiasChannel" bias_channel_param { bg_bias: 1.5 fg_bias: 0.25 '
            'ignore_label: 255 background_label: 3 }')
    _, _, _, y = run(text, [scores, labels])
    expected = scores.copy()
    expected[0, 0] += 1.5
    expected[0, 5] += 0.5
    expected[1, 2] += 0.25
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-15)


def test_bias_channel_pixel_labels_with_background():
    """PIXEL with background_label 2 written: label 2 -> +bg on channel 2; label l in
    [0, C) -> +bg on channel 2 and +fg on channel l; ignore labels and -1 skipped."""
    scores = np.zeros((1, 4, 1, 5))
    labels = np.array([2, 0, 3, 255, -1], float).reshape(1, 1, 1, 5)
    text = ('type: "BiasChannel" bias_channel_param { label_type: PIXEL bg_bias: 1 '
            'fg_bias: 10 ignore_label: 255 background_label: 2 }')
    _, _, _, y = run(text, [scores, labels])
    expected = np.zeros((4, 5))
    expected[2, 0] = 1                      # background pixel
    expected[2, 1], expected[0, 1] = 1, 10  # label 0 is a foreground class here
    expected[2, 2], expected[3, 2] = 1, 10
    np.testing.assert_array_equal(y[0, :, 0], expected)
    # The fork adds to the biased entries only: the others keep their bits (-0.0 too).
    _, _, _, y = run(text, [np.full((1, 4, 1, 5), -0.0), labels])
    untouched = expected == 0
    assert np.all(np.signbit(y[0, :, 0][untouched]))
    np.testing.assert_array_equal(y[0, :, 0], expected)


def test_bias_channel_pixel_background_switched_by_presence():
    """bg_bias written (default background_label 0) switches the background on; with
    neither written, label 0 just gets fg_bias on channel 0."""
    scores = np.zeros((1, 3, 1, 2))
    labels = np.array([0, 1], float).reshape(1, 1, 1, 2)
    _, _, _, y = run('type: "BiasChannel" bias_channel_param { label_type: PIXEL '
                     'bg_bias: 1 fg_bias: 10 }', [scores, labels])
    np.testing.assert_array_equal(y[0, :, 0], [[1, 1], [0, 10], [0, 0]])
    _, _, _, y = run('type: "BiasChannel" bias_channel_param { label_type: PIXEL '
                     'fg_bias: 10 }', [scores, labels])
    np.testing.assert_array_equal(y[0, :, 0], [[10, 0], [0, 10], [0, 0]])


def test_bias_channel_gradient_and_errors():
    rng = np.random.default_rng(1)
    layer = make_layer('type: "BiasChannel" bias_channel_param { fg_bias: 3 }', TRAIN)
    bottom, top = setup_layer(layer, [rng.normal(size=(2, 3, 2, 2)), label_list([[1], [0, 2]], 3)])
    check_gradient(layer, bottom, top, check_bottom=[0])
    with pytest.raises(LayerError, match="label input"):
        layer.backward(top, [True, True], bottom)
    with pytest.raises(LayerError, match="unexpected label 3"):
        run('type: "BiasChannel"', [np.zeros((1, 3, 2, 2)), label_list([[3]], 2)])
    with pytest.raises(LayerError, match="unexpected label 255"):     # not ignored here
        run('type: "BiasChannel" bias_channel_param { label_type: PIXEL }',
            [np.zeros((1, 3, 1, 1)), np.full((1, 1, 1, 1), 255.0)])
    with pytest.raises(LayerError, match="non-negative"):
        run('type: "BiasChannel" bias_channel_param { bg_bias: -1 }',
            [np.zeros((1, 3, 2, 2)), label_list([[1]], 2)])
    with pytest.raises(LayerError, match="N x L x 1 x 1"):
        run('type: "BiasChannel"', [np.zeros((1, 3, 2, 2)), np.zeros((1, 1, 2, 2))])


# ====================================================================== AdaptiveBiasChannel
ADAPT = ('type: "AdaptiveBiasChannel" adaptive_bias_channel_param {{ num_iter: {it} '
         'bg_portion: {bg} fg_portion: {fg} suppress_others: {sup} margin_others: {m} }}')


def adapt_text(it=1, bg=0.4, fg=0.2, sup="true", m=0.5):
    return ADAPT.format(it=it, bg=bg, fg=fg, sup=sup, m=m)


def test_adaptive_bias_hand_computed_case():
    """C = 3, P = 5, labels {0, 2}, bg 0.4 -> nth 2, fg 0.2 -> nth 1, margin 0.5.
    Worked out from spec 3.3:
      suppress: m = min(s0, s2) = [0, -.5, -1, -2, -3]; s1 above m -> m - 0.5
      M = [3, 0, 0, 0, 0], mu0 = 0.6
      label 0: gap = [3, 0, 0, 0, 0] -> 0-based 2nd smallest 0 -> s0 unchanged
      label 2: gap = [0, .5, 1, 2, 3] -> 1st smallest 0.5 -> s2 += 0.5; M = [3.5, 0...]
      mu1 = 0.7 -> every channel -= 0.1."""
    s = np.array([[0, 0, 0, 0, 0],
                  [5, 0, 0, 0, 0],
                  [3, -0.5, -1, -2, -3]], float).reshape(1, 3, 1, 5)
    _, _, _, y = run(adapt_text(), [s, label_list([[2, 0, -1]], 4)])
    expected = np.array([[-0.1] * 5,
                         [-0.6, -1.1, -1.6, -2.6, -3.6],
                         [3.4, -0.1, -0.6, -1.6, -2.6]])
    np.testing.assert_allclose(y[0, :, 0], expected, rtol=0, atol=1e-12)


def reference_adapt(scores, labels, it, bg, fg, suppress, margin, orders):
    """Spec 3.3 with explicit loops; ``orders`` gives the label order of every round."""
    s = np.array(scores, np.float64).reshape(scores.shape[0], -1)
    present = sorted(labels)
    p = s.shape[1]
    if suppress:
        m = np.min([s[l] for l in present], axis=0)
        for c in range(s.shape[0]):
            if c not in present:
                for i in range(p):
                    if s[c, i] > m[i]:
                        s[c, i] = m[i] - margin
    big = np.max([s[l] for l in present], axis=0)
    mean0 = big.mean()
    for r in range(it):
        for l in orders[r]:
            nth = int(np.float32(bg if l == 0 else fg) * np.float32(p))
            beta = np.sort(big - s[l])[nth]
            s[l] += beta
            big = np.maximum(big, s[l])
    return (s + (mean0 - big.mean())).reshape(scores.shape)


def replay_orders(labels, it):
    """The label orders of a process whose rand() is fresh: std::random_shuffle with
    this process's own C library rand() after srand(1), applied as the spec says
    (labels after a present background, cumulative over rounds)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.srand(1)
    order = sorted(labels)
    start = int(order[0] == 0)
    orders = []
    for _ in range(it):
        tail = order[start:]
        for i in range(1, len(tail)):
            j = libc.rand() % (i + 1)
            tail[i], tail[j] = tail[j], tail[i]
        order = order[:start] + tail
        orders.append(list(order))
    return orders


@pytest.mark.parametrize("labels, suppress", [([0, 3, 5, 8], "true"), ([2, 4, 5], "false"),
                                              ([0, 1, 1], "true")])
def test_adaptive_bias_matches_transcription(labels, suppress):
    """41 x 41 maps (P = 1681: nth 672 for bg 0.4, 336 for fg 0.2), five rounds."""
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(1, 10, 41, 41))
    c_rand().reseed(1)
    layer = make_layer(adapt_text(it=5, sup=suppress, m=1e-5), TRAIN)
    bottom, top = setup_layer(layer, [scores, label_list([labels], 10)])
    orders = replay_orders(labels, 5)
    if labels[0] == 0:
        assert all(o[0] == 0 for o in orders)
    (y,) = run_forward(layer, bottom, top)
    expected = reference_adapt(scores[0], labels, 5, 0.4, 0.2, suppress == "true",
                               float(np.float32(1e-5)), orders)
    np.testing.assert_allclose(y[0], expected, rtol=0, atol=1e-12)
    # The last label of the last round attains the running max on >= nth + 1 pixels.
    last = orders[-1][-1]
    present = y[0, sorted(set(labels))].max(axis=0)
    nth = 672 if last == 0 else 336
    assert (y[0, last] == present).sum() >= nth + 1


def test_adaptive_bias_shuffles_follow_the_process_rand_stream():
    """Like the fork's rand(), the stream is the process's: set_random_seed does not
    touch it, a fresh stream (seed 1) repeats, and one that moved on shuffles anew."""
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(2, 8, 9, 9)).astype(np.float32)
    labels = label_list([[0, 1, 2, 3, 4, 5], [3, 6, 7]], 8)

    def once(fresh):
        if fresh:
            c_rand().reseed(1)
        caffe.set_random_seed(5)
        layer = make_layer(adapt_text(it=5, m=1e-5), TRAIN, np.float32)
        bottom, top = setup_layer(layer, [scores, labels], 1, np.float32)
        return np.concatenate([run_forward(layer, bottom, top)[0] for _ in range(3)])

    a, b = once(True), once(True)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, once(False))


def test_adaptive_bias_skips_empty_lists_and_has_no_gradient():
    scores = np.random.default_rng(5).normal(size=(2, 3, 2, 2))
    layer, bottom, top, y = run(adapt_text(), [scores, label_list([[], [1]], 2)])
    np.testing.assert_array_equal(y[0], scores[0])           # only -1: unchanged
    assert np.argmax(y[1].reshape(3, -1), axis=0).tolist() == [1] * 4
    bottom[0].diff[...] = 3
    layer.backward(top, [True, True], bottom)
    assert np.all(bottom[0].diff == 3)


def test_adaptive_bias_float32_argmax_stays_in_present_labels():
    rng = np.random.default_rng(6)
    scores = rng.normal(size=(3, 21, 17, 17)).astype(np.float32)
    lists = [[0, 15], [4], [0, 2, 7, 9]]
    caffe.set_random_seed(0)
    _, _, _, y = run(adapt_text(it=5, m=1e-5), [scores, label_list(lists, 10)], np.float32)
    assert y.dtype == np.float32
    for n, present in enumerate(lists):
        assert set(np.unique(np.argmax(y[n], axis=0))) <= set(present)


@pytest.mark.parametrize("text, bottoms, message", [
    (adapt_text(), [np.zeros((1, 3, 2, 2)), label_list([[255]], 2)], "unexpected label 255"),
    (adapt_text(), [np.zeros((1, 1, 2, 2)), label_list([[0]], 2)], "more than one channel"),
    (adapt_text(), [np.zeros((1, 3, 2, 2)), np.zeros((1, 1, 2, 2))], "N x L x 1 x 1"),
    (adapt_text(bg=1.5), [np.zeros((1, 3, 2, 2)), label_list([[0]], 2)], "bg_portion"),
    (adapt_text(it=0), [np.zeros((1, 3, 2, 2)), label_list([[0]], 2)], "num_iter"),
    (adapt_text(m=-1), [np.zeros((1, 3, 2, 2)), label_list([[0]], 2)], "margin_others"),
])
def test_adaptive_bias_errors(text, bottoms, message):
    with pytest.raises(LayerError, match=message):
        run(text, bottoms)


def test_label_blobs_of_fewer_axes_are_read_as_the_forks_legacy_shapes():
    """The fork reads label shapes through num/channels/height/width (1 for a missing
    axis): an N x L list (e.g. image-level labels from HDF5) is N x L x 1 x 1, and an
    (N,) label blob one channel; the results are those of the 4-D blobs."""
    scores = np.random.default_rng(5).normal(size=(2, 3, 2, 2))
    lists = label_list([[0, 2], [1]], 2)
    flat = lists.reshape(2, 2)
    bias = ('type: "BiasChannel" bias_channel_param { bg_bias: 1.5 fg_bias: 0.25 '
            'ignore_label: 255 }')
    for text in (bias, adapt_text()):
        np.testing.assert_array_equal(run(text, [scores, flat])[3],
                                      run(text, [scores, lists])[3])
    labels = np.array([3.0, 1.0])
    np.testing.assert_array_equal(run(UNIQUE, [labels])[3],
                                  run(UNIQUE, [labels.reshape(2, 1, 1, 1)])[3])
    with pytest.raises(LayerError, match="one channel"):
        run(UNIQUE, [np.zeros((1, 1, 2, 2, 1))])      # more than the legacy 4 axes


# ====================================================================== v1 ArgMax
def test_argmax_v1_is_per_pixel_with_ties_to_the_highest_index():
    x = np.zeros((1, 3, 1, 4))
    x[0, :, 0, 0] = [1, 1, 0]
    x[0, :, 0, 1] = [2, 2, 2]
    x[0, :, 0, 2] = [3, 1, 2]
    x[0, :, 0, 3] = [0, 4, 4]
    _, _, _, y = run('type: "ArgMaxV1"', [x])
    assert y.shape == (1, 1, 1, 4)
    np.testing.assert_array_equal(y.ravel(), [1, 2, 0, 2])


def test_argmax_v1_out_max_val_layout():
    """N x 2K x H x W: K index channels then K value channels."""
    x = np.array([[5, 1, 3], [0, 9, 9]], float).T.reshape(1, 3, 1, 2)
    _, _, _, y = run('type: "ArgMaxV1" argmax_param { top_k: 2 out_max_val: true }', [x])
    assert y.shape == (1, 4, 1, 2)
    np.testing.assert_array_equal(y[0, :, 0, 0], [0, 2, 5, 3])
    np.testing.assert_array_equal(y[0, :, 0, 1], [2, 1, 9, 9])


def test_argmax_v1_backward_is_silent_and_errors():
    layer, bottom, top, _ = run('type: "ArgMaxV1"', [np.ones((1, 2, 2, 2))])
    bottom[0].diff[...] = 5
    layer.backward(top, [True], bottom)
    assert np.all(bottom[0].diff == 5)
    with pytest.raises(LayerError, match="larger than the 2 channels"):
        run('type: "ArgMaxV1" argmax_param { top_k: 3 }', [np.ones((1, 2, 2, 2))])
    with pytest.raises(LayerError, match="always works over the channels"):
        run('type: "ArgMaxV1" argmax_param { axis: 1 }', [np.ones((1, 2, 2, 2))])


# ====================================================================== v1 softmax loss
def v1_loss(extra="", dtype=np.float64):
    return make_layer('type: "SoftmaxWithLoss" softmaxloss_param { ignore_label: 255 '
                      f'ignore_label: 4 {extra} }}', TRAIN, dtype)


def weights_file(values):
    f = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    half = len(values) // 2                              # two lines, any whitespace
    f.write(" ".join(map(str, values[:half])) + "\n\t" + "  ".join(map(str, values[half:])))
    f.close()
    return f.name


def v1_oracle(scores, labels, weights, ignore):
    """Spec 4.2 in float64, one position at a time."""
    x = np.asarray(scores, np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    n, c = x.shape[:2]
    p = p.reshape(n, c, -1)
    lab = np.asarray(labels).reshape(-1)[:n * p.shape[2]].reshape(n, -1)
    total = wsum = 0.0
    for i in range(n):
        for j in range(p.shape[2]):
            l = int(lab[i, j])
            if l in ignore:
                continue
            total -= weights[l] * np.log(max(p[i, l, j], FLT_MIN))
            wsum += weights[l]
    return total / wsum


def test_v1_loss_weights_and_repeated_ignore_labels():
    rng = np.random.default_rng(7)
    scores = rng.normal(size=(2, 5, 2, 3))
    labels = rng.integers(0, 5, size=(2, 1, 2, 3)).astype(float)
    labels[0, 0, 0, 0] = 255
    labels[1, 0, 1, 2] = 2.7                # truncated to 2 (weight 2), not rounded to 3
    w = [0.5, 1.0, 2.0, 0.0, 3.0]
    path = weights_file(w)
    try:
        layer = v1_loss(f'weight_source: "{path}"')
        bottom, top = setup_layer(layer, [scores, labels])
        (loss,) = run_forward(layer, bottom, top)
        assert np.isclose(float(loss), v1_oracle(scores, labels, w, {255, 4}), rtol=1e-12)
        # ignored pixels keep their diff (test_v1_loss_stale_diffs_at_ignored_positions...)
        check_gradient(layer, bottom, top, check_bottom=[0], poison=0.0)
    finally:
        os.unlink(path)


def test_v1_loss_in_float_is_v1s_loop():
    """softmax_loss_layer.cpp of v1: ``loss -= w * log(max(p, FLT_MIN))`` with C's
    double log into a float accumulator, and ``batch_weight += w`` in float, pixel by
    pixel: the float32 loss is that loop's, bit for bit."""
    rng = np.random.default_rng(8)
    scores = rng.normal(size=(3, 21, 9, 11)).astype(np.float32) * 4
    labels = rng.integers(0, 21, size=(3, 1, 9, 11)).astype(np.float32)
    labels[rng.random(labels.shape) < 0.2] = 255
    w = np.float32(rng.uniform(0.1, 3, 21))
    path = weights_file(w.tolist())
    try:
        layer = make_layer('type: "SoftmaxWithLoss" softmaxloss_param { ignore_label: 255 '
                           f'weight_source: "{path}" }} top: "loss" top: "prob"', TRAIN,
                           np.float32)
        bottom, top = setup_layer(layer, [scores, labels], 2, dtype=np.float32)
        loss, prob = run_forward(layer, bottom, top)
    finally:
        os.unlink(path)
    p = prob.reshape(3, 21, -1)
    weights = w
    total, batch_weight = np.float32(0), np.float32(0)
    for i, row in enumerate(labels.reshape(3, -1)):
        for j, label in enumerate(row):
            if label == 255:
                continue
            l = int(label)
            batch_weight = np.float32(batch_weight + weights[l])
            clamped = max(p[i, l, j], np.float32(FLT_MIN))
            total = np.float32(np.float64(total) - np.float64(weights[l]) *
                               np.log(np.float64(clamped)))
    assert loss.dtype == np.float32 and loss == np.float32(total / batch_weight)


def test_v1_loss_stale_diffs_at_ignored_positions_and_nan():
    """Ignored positions are not written, then the whole diff is scaled by
    loss_weight / W; with every pixel ignored the loss is 0/0 = NaN."""
    scores = np.zeros((1, 2, 1, 3))
    labels = np.array([0, 255, 1], float).reshape(1, 1, 1, 3)
    layer = v1_loss()
    bottom, top = setup_layer(layer, [scores, labels])
    (loss,) = run_forward(layer, bottom, top)
    assert np.isclose(float(loss), np.log(2))
    bottom[0].diff[...] = 8.0
    top[0].diff[...] = 1.0
    layer.backward(top, [True, True], bottom)             # labels: silently ignored
    np.testing.assert_allclose(bottom[0].diff[0, :, 0], [[-0.25, 4.0, 0.25],
                                                         [0.25, 4.0, -0.25]])
    bottom[1].data[...] = 255
    (loss,) = run_forward(layer, bottom, top)
    assert np.isnan(loss)


def test_v1_loss_reads_labels_by_flat_position_and_checks_only_num():
    scores = np.random.default_rng(8).normal(size=(2, 3, 1, 2))
    labels = np.array([0, 1, 2, 1, 255, 255], float).reshape(2, 1, 1, 3)   # 3 per item
    layer = v1_loss()
    bottom, top = setup_layer(layer, [scores, labels])
    (loss,) = run_forward(layer, bottom, top)
    flat = labels.ravel()[:4].reshape(2, 1, 1, 2)         # n * H*W + j of the scores
    assert np.isclose(float(loss), v1_oracle(scores, flat, [1] * 3, {255, 4}), rtol=1e-12)


def test_v1_loss_errors():
    with pytest.raises(LayerError, match="unexpected label 7"):
        layer = v1_loss()
        bottom, top = setup_layer(layer, [np.zeros((1, 3, 1, 1)), np.full((1, 1, 1, 1), 7.0)])
        run_forward(layer, bottom, top)
    path = weights_file([1, 2])
    try:
        with pytest.raises(LayerError, match="has 2 class weights but the scores have 3"):
            setup_layer(v1_loss(f'weight_source: "{path}"'),
                        [np.zeros((1, 3, 1, 1)), np.zeros((1, 1, 1, 1))])
    finally:
        os.unlink(path)
    with pytest.raises(LayerError, match="cannot open"):
        setup_layer(v1_loss('weight_source: "/nonexistent/w.txt"'),
                    [np.zeros((1, 3, 1, 1)), np.zeros((1, 1, 1, 1))])
    with pytest.raises(LayerError, match="cannot be combined"):
        setup_layer(make_layer('type: "SoftmaxWithLoss" softmaxloss_param { } '
                               'loss_param { normalization: FULL }', TRAIN),
                    [np.zeros((1, 3, 1, 1)), np.zeros((1, 1, 1, 1))])


# ====================================================================== V1 upgrade
def test_v1_dialect_selects_the_v1_layers():
    text = """
    layers { name: "am" type: ARGMAX bottom: "s" top: "a" argmax_param { top_k: 1 } }
    layers { name: "loss" type: SOFTMAX_LOSS bottom: "s" bottom: "a"
      softmaxloss_param { ignore_label: 255 ignore_label: 0 weight_source: "w.txt" } }
    layers { name: "plain" type: SOFTMAX_LOSS bottom: "s" bottom: "a" }
    """
    net, _ = prototxt.parse_net(text)
    am, loss, plain = net.layer
    assert am.type == "ArgMaxV1" and not am.argmax_param.HasField("axis")
    assert loss.type == "SoftmaxWithLoss" and list(loss.softmaxloss_param.ignore_label) == [255, 0]
    assert loss.softmaxloss_param.weight_source == "w.txt"
    assert not plain.HasField("softmaxloss_param")          # BVLC's V1 loss stays BVLC's
    one, _ = prototxt.parse_net('layers { name: "l" type: SOFTMAX_LOSS bottom: "s" '
                                'bottom: "a" softmaxloss_param { ignore_label: 255 } }')
    assert one.layer[0].loss_param.ignore_label == 255      # also where the fork has it


# ====================================================================== the corpus net
def test_weak_em_adapt_corpus_net_runs_unchanged(tmp_path):
    """The Weak-EM-Adapt train net as released (V1 file), ImageSegData replaced by an
    Input of its shapes (crop 65, batch 2): UniqueLabel lists the classes of the crop,
    the E-step labels are present classes, and the fc8 gradient is the v1 softmax
    loss's with the E-step labels as constant targets."""
    from test_corpus_nets import randomize, read_config, with_inputs
    param = read_config("deeplab_v1_weak_em_adapt/train.prototxt", tmp_path)
    param, shapes = with_inputs(param, 65, TRAIN, tmp_path)
    caffe.set_random_seed(5)
    net = caffe.Net(param=param, phase=TRAIN)
    randomize(net)
    rng = np.random.default_rng(0)
    net.blobs["data"].data[...] = rng.normal(0, 50, shapes["data"])
    lab = np.zeros(shapes["label_strong"])
    lab[:, :, 10:40, 20:50] = 3
    lab[1, :, 30:60, 5:30] = 15
    lab[:, :, :3] = 255
    net.blobs["label_strong"].data[...] = lab
    loss = net.forward_from_to()
    assert np.isfinite(loss) and loss > 0
    weak = net.blobs["label_weak"].data.reshape(2, 10)
    np.testing.assert_array_equal(weak[0], [0, 3] + [-1] * 8)
    np.testing.assert_array_equal(weak[1], [0, 3, 15] + [-1] * 7)
    estep = net.blobs["label_estep"].data
    assert estep.shape == (2, 1, 9, 9)
    assert set(np.unique(estep[0])) <= {0, 3} and set(np.unique(estep[1])) <= {0, 3, 15}
    net.clear_param_diffs()
    net.backward_from_to()
    fc8 = net.blobs["fc8_voc12"]
    x = fc8.data.astype(np.float64)
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    onehot = np.arange(21)[None, :, None, None] == estep.astype(int)
    expected = (p - onehot) / estep.size
    np.testing.assert_allclose(fc8.diff, expected, rtol=1e-4, atol=1e-7)
    for name in ("fc8_voc12", "conv1_1"):
        diff = net.params[name][0].diff
        assert np.all(np.isfinite(diff)) and np.abs(diff).max() > 0


# ====================================================================== the example
def test_weak_demo_runs_at_tiny_settings(tmp_path):
    """``python -m caffelite.demo.weak`` end to end with 6 iterations on 6 images."""
    from caffelite.demo.weak import run_weak
    result = run_weak(str(tmp_path), max_iter=6, n_train=6, n_val=2, batch_size=2)
    assert len(result["losses"]) == 6 and np.all(np.isfinite(result["losses"]))
    assert 0 <= result["scores"]["miou"] <= 1
    assert result["background_only"]["miou"] > 0
    features = tmp_path / "voc_synth" / "features" / "aspp_slim_weak" / "val" / "fc8"
    assert len(list(features.glob("*_blob_0.mat"))) == 2
