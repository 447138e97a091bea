"""SegAccuracy against confusion matrices worked out by hand from spec section 5
(ties -> highest class, int() truncation of labels, ignore labels, reset, IoU 1 for
classes absent from both GT and prediction, mean recall over present classes)."""
import numpy as np
import pytest

from caffelite.layer import LayerError
from layer_testing import make_layer, run_forward, setup_layer

# Scores N=1, C=3, H=2, W=3, listed per pixel as (c0, c1, c2).
PIXEL_SCORES = [[(0.1, 0.5, 0.2), (0.7, 0.7, 0.1), (0.3, 0.3, 0.3)],
                [(0.9, 0.0, 0.1), (0.2, 0.1, 0.6), (0.5, 0.4, 0.0)]]
# predictions:   1                 1 (tie 0/1)       2 (3-way tie)
#                0                 2                 0
LABELS = [[1, 0, 255], [0.9, 2, 1]]          # 255 ignored; 0.9 -> int 0
# confusion (rows GT, cols prediction): [[1,1,0],[1,1,0],[0,0,1]]
EXPECTED = [3 / 5, (1 / 2 + 1 / 2 + 1) / 3, (1 / 3 + 1 / 3 + 1) / 3]


def scores_blob(pixel_scores, channels=3):
    s = np.full((1, channels) + np.shape(pixel_scores)[:2], -5.0, np.float32)
    s[0, :3] = np.asarray(pixel_scores, np.float32).transpose(2, 0, 1)
    return s


def labels_blob(labels):
    return np.asarray(labels, np.float32)[None, None]


def seg_accuracy(params="ignore_label: 255", channels=3, scores=None, labels=None):
    layer = make_layer(f'type: "SegAccuracy" seg_accuracy_param {{ {params} }}',
                       dtype=np.float32)
    scores = scores_blob(PIXEL_SCORES, channels) if scores is None else scores
    labels = labels_blob(LABELS) if labels is None else labels
    bottom, top = setup_layer(layer, [scores, labels], 1, dtype=np.float32)
    return layer, bottom, top


def test_hand_computed_confusion_matrix():
    layer, bottom, top = seg_accuracy()
    out = run_forward(layer, bottom, top)[0]
    assert out.shape == (1, 1, 1, 3) and out.dtype == np.float32
    assert out.ravel().tolist() == np.float32(EXPECTED).tolist()
    assert layer.confusion.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


def test_absent_class_counts_iou_one_and_is_left_out_of_recall():
    layer, bottom, top = seg_accuracy(channels=4)      # class 3 never labelled/predicted
    out = run_forward(layer, bottom, top)[0].ravel()
    expected = [3 / 5, (1 / 2 + 1 / 2 + 1) / 3, (1 / 3 + 1 / 3 + 1 + 1) / 4]
    assert out.tolist() == np.float32(expected).tolist()


def test_reset_false_accumulates_and_reset_true_clears():
    all_zero = (np.zeros((1, 1, 2, 3), np.float32))
    zero_scores = scores_blob([[(1, 0, 0)] * 3] * 2)
    for reset, expected in [
            ("false", [9 / 11, (7 / 8 + 1 / 2 + 1) / 3, (7 / 9 + 1 / 3 + 1) / 3]),
            ("true", [1.0, 1.0, 1.0])]:
        layer, bottom, top = seg_accuracy(f"ignore_label: 255 reset: {reset}")
        run_forward(layer, bottom, top)
        bottom[0].data[...] = zero_scores
        bottom[1].data[...] = all_zero
        out = run_forward(layer, bottom, top)[0].ravel()
        assert out.tolist() == np.float32(expected).tolist(), reset


def test_batch_and_several_ignore_labels():
    scores = np.concatenate([scores_blob(PIXEL_SCORES)] * 2)
    labels = np.concatenate([labels_blob(LABELS), labels_blob([[-1, -1, -1], [2, 2, 2]])])
    # second image: predictions 0, 2, 0 on the bottom row against GT 2 -> M[2][0] += 2,
    # M[2][2] += 1; its top row is ignored (-1).
    layer, bottom, top = seg_accuracy("ignore_label: 255 ignore_label: -1", scores=scores,
                                      labels=labels)
    run_forward(layer, bottom, top)
    assert layer.confusion.tolist() == [[1, 1, 0], [1, 1, 0], [2, 0, 2]]


def test_labels_are_truncated_toward_zero():
    labels = labels_blob([[1.99, -0.7, 255], [0.9, 2.5, 1.2]])   # -> 1, 0, ign, 0, 2, 1
    layer, bottom, top = seg_accuracy(labels=labels)
    run_forward(layer, bottom, top)
    assert layer.confusion.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


@pytest.mark.parametrize("bad", [3, -1, 255])
def test_unexpected_label_is_an_error(bad):
    labels = labels_blob([[1, 0, bad], [0, 2, 1]])
    layer, bottom, top = seg_accuracy("", labels=labels)
    with pytest.raises(LayerError, match=f"unexpected label {bad} at num 0, row 0, col 2"):
        run_forward(layer, bottom, top)


def test_empty_confusion_gives_zero_accuracy():
    labels = labels_blob([[255] * 3] * 2)
    layer, bottom, top = seg_accuracy(labels=labels)
    out = run_forward(layer, bottom, top)[0].ravel()
    assert out.tolist() == [0.0, 0.0, 1.0]


def test_shape_mismatch_is_an_error():
    layer = make_layer('type: "SegAccuracy"', dtype=np.float32)
    with pytest.raises(LayerError, match="N x 1 x H x W"):
        setup_layer(layer, [np.zeros((1, 3, 2, 3)), np.zeros((1, 1, 2, 2))], 1)


def test_blobs_of_three_axes_use_the_legacy_shape():
    """The fork checks num/channels/height/width, 1 for missing axes: scores N x C x H
    with labels N x 1 x H are the 4-D case with W = 1 (here the first column of the
    hand-computed example: predictions 1, 0 against labels 1, 0.9 -> 0)."""
    scores = scores_blob(PIXEL_SCORES)[..., 0]
    labels = labels_blob(LABELS)[..., 0]
    layer, bottom, top = seg_accuracy(scores=scores, labels=labels)
    assert run_forward(layer, bottom, top)[0].ravel().tolist() == [1.0, 1.0, 1.0]
    assert layer.confusion.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    bad = labels.copy()
    bad[0, 0, 1] = 7
    layer, bottom, top = seg_accuracy(scores=scores, labels=bad)
    with pytest.raises(LayerError, match="unexpected label 7 at num 0, row 1, col 0"):
        run_forward(layer, bottom, top)


def test_nan_scores_predict_as_caffes_partial_sort():
    """A NaN compares false both ways, so the class after it restarts the search:
    (NaN, 1, 0) -> 1, (1, NaN, 0) -> 2, (0, 2, 1) -> 1 (seg_accuracy_layer.cpp)."""
    scores = np.array([[(np.nan, 1, 0), (1, np.nan, 0), (0, 2, 1)]], np.float32)
    layer, bottom, top = seg_accuracy(scores=scores_blob(scores),
                                      labels=labels_blob([[1, 1, 2]]))
    run_forward(layer, bottom, top)
    assert layer.confusion.tolist() == [[0, 0, 0], [0, 1, 1], [0, 1, 0]]
