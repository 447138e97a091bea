"""Evaluation as MyVOCevalseg prints it: a hand-computed confusion matrix, classes
absent from the set, features vs prediction PNGs, MATLAB's report, bad inputs."""
import argparse
import importlib.util
import json
import sys

import numpy as np
import pytest
from PIL import Image

from caffelite import eval_cli
from caffelite.evaluate import (EvalError, EvalItem, EvalResult, evaluate,
                                evaluate_features, matlab_report, plot_iou, read_list,
                                scores_from_confusion, voc_palette)
from caffelite.io.image import read_label
from caffelite.io.matfile import write_mat

# Two tiny images, 3 labels; 255 is ignored.  Rows = GT, columns = prediction:
#   A: (0,0) (0,1) (1,1) (1,1) (2,2) [255 ignored]     B: (0,0) (0,0) (2,2) (2,1)
GT = {"a": np.array([[0, 0, 1], [1, 2, 255]], np.uint8),
      "b": np.array([[0, 0], [2, 2]], np.uint8)}
PRED = {"a": np.array([[0, 1, 1], [1, 2, 0]], np.uint8),
        "b": np.array([[0, 0], [2, 1]], np.uint8)}
CONFUSION = np.array([[3, 1, 0],
                      [0, 2, 0],
                      [0, 1, 2]])
# By hand: TP 3,2,2; GT rows 4,2,3; prediction columns 3,4,2; unions 4,4,3.
IOU = [75.0, 50.0, 200 / 3]
CLASS_ACC = [75.0, 100.0, 200 / 3]


def _write_png(path, label, palette=False):
    img = Image.fromarray(label)
    if palette:
        img.putpalette(voc_palette())
    img.save(path)


def _features(pred, num_labels, pad=(3, 2), tie_pixel=None):
    """Scores whose first-max argmax is ``pred``, on a canvas larger than the image
    (bottom/right padding with garbage favouring the last class)."""
    h, w = pred.shape
    scores = np.zeros((1, num_labels, h + pad[0], w + pad[1]), np.float32)
    scores[0, -1] = 5.0                       # padding region: never evaluated
    scores[0, :, :h, :w] = np.random.default_rng(0).uniform(-1, 0, (num_labels, h, w))
    for c in range(num_labels):
        scores[0, c, :h, :w][pred == c] = 2.0 + c
    if tie_pixel is not None:                 # all classes equal: first max = class 0
        y, x = tie_pixel
        scores[0, :, y, x] = 1.5
    return scores


@pytest.fixture
def dataset(tmp_path):
    """GT dir (palette PNG for 'a'), prediction dir, features dir, image dir."""
    d = {k: tmp_path / k for k in ("gt", "pred", "feat", "img")}
    for p in d.values():
        p.mkdir()
    for name in GT:
        _write_png(d["gt"] / f"{name}.png", GT[name], palette=(name == "a"))
        _write_png(d["pred"] / f"{name}.png", PRED[name])
        pred = PRED[name].copy()
        tie = None
        if name == "b":
            pred[0, 1] = 0                    # a tie at (0,1) must resolve to class 0
            tie = (0, 1)
        write_mat(str(d["feat"] / f"{name}_blob_0.mat"), _features(pred, 3, tie_pixel=tie))
        rgb = np.full(GT[name].shape + (3,), 100, np.uint8)
        Image.fromarray(rgb).save(d["img"] / f"{name}.jpg")
    (tmp_path / "val_id.txt").write_text("a\nb\n")
    (tmp_path / "val.txt").write_text("/JPEGImages/a.jpg /Seg/a.png\n\n/JPEGImages/b.jpg "
                                      "/Seg/b.png\n")
    d["root"] = tmp_path
    return d


def _items(d, ids=("a", "b")):
    return [EvalItem(i, str(d["gt"] / f"{i}.png"), str(d["img"] / f"{i}.jpg")) for i in ids]


def test_hand_computed_confusion_and_scores(dataset):
    result = evaluate(_items(dataset), 3, pred_dir=str(dataset["pred"]),
                      names=["bg", "x", "y"])
    np.testing.assert_array_equal(result.confusion, CONFUSION)
    s = result.scores
    np.testing.assert_allclose(s["iou_percent"], IOU, rtol=1e-15)
    np.testing.assert_allclose(s["class_accuracy_percent"], CLASS_ACC, rtol=1e-15)
    assert s["pixel_accuracy_percent"] == pytest.approx(700 / 9, rel=1e-15)
    assert s["miou_percent"] == pytest.approx(sum(IOU) / 3, rel=1e-15)
    assert s["mean_class_accuracy_percent"] == pytest.approx(sum(CLASS_ACC) / 3, rel=1e-15)
    assert s["miou"] == pytest.approx(sum(IOU) / 300)


def test_matlab_report_lines(dataset):
    result = evaluate(_items(dataset), 3, pred_dir=str(dataset["pred"]),
                      names=["background", "x", "y"])
    lines = result.report().splitlines()
    assert lines[0] == "Percentage of pixels correctly labelled overall: 77.778%"
    assert lines[1] == "Accuracy for each class (pixel accuracy)"
    assert lines[2] == "      background: 75.000%"
    assert lines[3] == "               x: 100.000%"
    assert "Mean Class Accuracy: 80.556%" in lines
    assert "               y: 66.667%" in lines
    assert lines[-1] == "Average accuracy: 63.889%"


def test_absent_classes_count_zero_over_all_classes(dataset):
    # Labels 3 and 4 never occur in GT; label 4 is predicted once (a false positive).
    pred_b = PRED["b"].copy()
    pred_b[1, 1] = 4
    _write_png(dataset["pred"] / "b.png", pred_b)
    result = evaluate(_items(dataset), 5, pred_dir=str(dataset["pred"]))
    s = result.scores
    # by hand: class 2 loses its (2,1) cell -> rows 0,1 unchanged, row 2 = [0,0,2,0,1]
    assert result.confusion[2].tolist() == [0, 0, 2, 0, 1]
    # class 1: TP 2, GT 2, predicted 3; class 2: TP 2, GT 3, predicted 2; 3 and 4: TP 0
    iou = [75.0, 200 / 3, 200 / 3, 0.0, 0.0]
    np.testing.assert_allclose(s["iou_percent"], iou, rtol=1e-15)
    # MyVOCevalseg: 0/0 -> denominator 1 -> IoU 0, and the mean is over all 5 classes
    assert s["miou_percent"] == pytest.approx(sum(iou) / 5, rel=1e-15)
    assert s["mean_class_accuracy_percent"] == pytest.approx((75 + 100 + 200 / 3) / 5)
    assert s["present"].tolist() == [True, True, True, False, True]
    assert s["miou_present"] == pytest.approx(sum(iou) / 4 / 100)
    assert "Average accuracy: " + f"{sum(iou) / 5:6.3f}%" in result.report()


def test_empty_confusion_prints_nan_like_matlab():
    s = scores_from_confusion(np.zeros((2, 2), np.int64))
    assert s["iou_percent"] == [0.0, 0.0] and s["miou_percent"] == 0.0
    report = matlab_report(s, ["a", "b"])
    assert report.splitlines()[0].endswith("   NaN%")


def test_features_and_predictions_give_the_same_numbers(dataset):
    from_pred = evaluate(_items(dataset), 3, pred_dir=str(dataset["pred"]))
    from_feat = evaluate(_items(dataset), 3, feature_dir=str(dataset["feat"]))
    # (b's features tie all classes at (0, 1), where the PNG says 0: first max wins)
    np.testing.assert_array_equal(from_feat.confusion, from_pred.confusion)
    assert from_feat.scores["miou_percent"] == from_pred.scores["miou_percent"]
    assert evaluate_features(str(dataset["feat"]), str(dataset["gt"]), ["a", "b"], 3) \
        .tolist() == CONFUSION.tolist()


def test_refine_program_bins_are_predictions_too(dataset, tmp_path):
    """DeepLab's dense CRF writes <id>.bin (int32 rows, cols, 1, then int16 labels
    column-major); --pred takes them where no <id>.png is, as GetDenseCRFResult.m's PNGs
    would be read."""
    bins = tmp_path / "bins"
    bins.mkdir()
    for name, pred in PRED.items():
        header = np.array([pred.shape[0], pred.shape[1], 1], "<i4").tobytes()
        (bins / f"{name}.bin").write_bytes(header + pred.astype("<i2").tobytes(order="F"))
    result = evaluate(_items(dataset), 3, pred_dir=str(bins))
    np.testing.assert_array_equal(result.confusion, CONFUSION)
    (bins / "a.bin").write_bytes(b"\0" * 13)
    with pytest.raises(EvalError, match="a.bin'.* does not match its 1 bytes"):
        evaluate(_items(dataset), 3, pred_dir=str(bins))


def test_double_features_are_read_like_single_ones(tmp_path):
    """EvalSegResults loads a feature file of any class; a double one gives the same
    prediction as its single twin (the nets' MatRead stays strict about the class)."""
    from caffelite.evaluate import prediction_from_features
    scores = _features(PRED["a"], 3)
    write_mat(str(tmp_path / "s_blob_0.mat"), scores)
    write_mat(str(tmp_path / "d_blob_0.mat"), scores.astype(np.float64))
    single = prediction_from_features(str(tmp_path / "s_blob_0.mat"), 2, 3, 3)
    double = prediction_from_features(str(tmp_path / "d_blob_0.mat"), 2, 3, 3)
    assert single.tolist() == double.tolist() == PRED["a"].tolist()


def test_feature_ties_take_the_first_maximum(tmp_path):
    gt = np.zeros((2, 2), np.uint8)
    _write_png(tmp_path / "t.png", gt)
    scores = np.zeros((1, 3, 2, 2), np.float32)   # every pixel ties between all classes
    write_mat(str(tmp_path / "t_blob_0.mat"), scores)
    r = evaluate([EvalItem("t", str(tmp_path / "t.png"))], 3, feature_dir=str(tmp_path))
    assert r.confusion[0, 0] == 4


def test_feature_nans_are_ignored_like_matlab_max(tmp_path):
    """EvalSegResults' ``max(., [], 3)`` skips NaN (first maximum of the other values;
    index 1 when all are NaN); numpy's argmax would pick the first NaN."""
    from caffelite.evaluate import prediction_from_features
    nan, inf = np.nan, np.inf
    pixels = [([nan, 1, 3, 3], 2), ([nan, nan, nan, nan], 0), ([2, nan, 5, nan], 2),
              ([-inf, nan, nan, nan], 0), ([nan, -inf, nan, -inf], 1),
              ([4, 4, nan, 1], 0)]
    scores = np.array([p for p, _ in pixels], np.float32).T.reshape(1, 4, 1, len(pixels))
    write_mat(str(tmp_path / "n_blob_0.mat"), scores)
    pred = prediction_from_features(str(tmp_path / "n_blob_0.mat"), 1, len(pixels))
    assert pred.tolist() == [[label for _, label in pixels]]


def test_palette_gt_is_read_as_indices(dataset):
    """As MATLAB's imread (the ImageSegData layer reads the fork's luminance instead)."""
    from caffelite.evaluate import read_label_map
    assert read_label_map(str(dataset["gt"] / "a.png")).tolist() == GT["a"].tolist()


def test_read_list_ids_and_two_column_lines(dataset):
    assert [l.id for l in read_list(str(dataset["root"] / "val_id.txt"))] == ["a", "b"]
    lines = read_list(str(dataset["root"] / "val.txt"))
    assert [(l.id, l.label) for l in lines] == [("a", "/Seg/a.png"), ("b", "/Seg/b.png")]


def _cli(*argv):
    p = argparse.ArgumentParser()
    eval_cli.add_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["eval", *argv])
    return eval_cli.run(args)


def test_cli_json_vis_and_report(dataset, capsys):
    d = dataset
    out_json = d["root"] / "out.json"
    vis = d["root"] / "vis"
    assert _cli("--gt", str(d["gt"]), "--list", str(d["root"] / "val.txt"), "--features",
                str(d["feat"]), "--num-labels", "3", "--json", str(out_json), "--vis",
                str(vis), "--images", str(d["img"])) == 0
    assert "Average accuracy: 63.889%" in capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert data["confusion"] == CONFUSION.tolist()
    assert data["miou_percent"] == pytest.approx(sum(IOU) / 3)
    assert [c["name"] for c in data["classes"]] == ["class_0", "class_1", "class_2"]
    assert EvalResult.from_json(data).report() == \
        evaluate(_items(d), 3, pred_dir=str(d["pred"])).report()
    # coloured predictions are palette PNGs holding the predicted indices
    with Image.open(vis / "a.png") as img:
        assert img.mode == "P" and img.getpalette()[3:6] == [128, 0, 0]
    assert np.asarray(Image.open(vis / "a.png")).tolist() == PRED["a"].tolist()
    assert (vis / "a_overlay.jpg").exists() and (vis / "b_overlay.jpg").exists()
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert (vis / "iou.png").exists() == has_mpl


def test_bar_chart_without_matplotlib_is_a_note(dataset, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import fails
    result = evaluate(_items(dataset), 3, pred_dir=str(dataset["pred"]),
                      vis_dir=str(dataset["root"] / "vis"))
    assert result.chart is None and not (dataset["root"] / "vis" / "iou.png").exists()
    assert plot_iou(result, str(dataset["root"] / "x.png")) is False


def test_bar_chart_with_matplotlib(dataset):
    pytest.importorskip("matplotlib")
    result = evaluate(_items(dataset), 3, pred_dir=str(dataset["pred"]),
                      vis_dir=str(dataset["root"] / "vis"))
    assert result.chart and (dataset["root"] / "vis" / "iou.png").stat().st_size > 0


def test_voc_class_names_for_21_labels(dataset):
    result = evaluate(_items(dataset), 21, pred_dir=str(dataset["pred"]))
    assert result.names[0] == "background" and result.names[20] == "tvmonitor"
    assert "       tvmonitor:  0.000%" in result.report()


# ----------------------------------------------------------------------- bad inputs
def test_missing_features_names_the_file(dataset):
    (dataset["feat"] / "b_blob_0.mat").unlink()
    with pytest.raises(EvalError, match=r"features not found for 'b': .*b_blob_0\.mat"):
        evaluate(_items(dataset), 3, feature_dir=str(dataset["feat"]))


def test_missing_prediction_names_the_file_or_is_skipped(dataset):
    (dataset["pred"] / "a.png").unlink()
    with pytest.raises(EvalError, match=r"prediction not found for 'a': .*a\.png"):
        evaluate(_items(dataset), 3, pred_dir=str(dataset["pred"]))
    r = evaluate(_items(dataset), 3, pred_dir=str(dataset["pred"]), skip_missing=True)
    assert r.missing == ["a"] and r.confusion.sum() == 4
    assert r.report().startswith("WARNING: There are 1 missing results!")


def test_features_smaller_than_the_image(dataset):
    write_mat(str(dataset["feat"] / "a_blob_0.mat"), np.zeros((1, 3, 2, 2), np.float32))
    with pytest.raises(EvalError, match=r"a_blob_0\.mat: features of size 2x2 are smaller "
                                        r"than the image \(2x3\)"):
        evaluate(_items(dataset), 3, feature_dir=str(dataset["feat"]))


def test_wrong_class_count(dataset):
    with pytest.raises(EvalError, match=r"a_blob_0\.mat: features have 3 channels but 21 "
                                        r"labels"):
        evaluate(_items(dataset), 21, feature_dir=str(dataset["feat"]))


def test_prediction_size_mismatch(dataset):
    _write_png(dataset["pred"] / "b.png", np.zeros((3, 3), np.uint8))
    with pytest.raises(EvalError, match=r"b\.png: prediction is 3x3 but the ground truth "
                                        r".*b\.png is 2x2"):
        evaluate(_items(dataset), 3, pred_dir=str(dataset["pred"]))


def test_out_of_range_labels(dataset):
    _write_png(dataset["pred"] / "a.png", np.full((2, 3), 7, np.uint8))
    with pytest.raises(EvalError, match=r"a\.png: predicted label 7 is outside \[0, 3\)"):
        evaluate(_items(dataset), 3, pred_dir=str(dataset["pred"]))
    _write_png(dataset["gt"] / "b.png", np.full((2, 2), 9, np.uint8))
    with pytest.raises(EvalError, match=r"ground-truth label 9 is outside"):
        evaluate(_items(dataset, ["b"]), 3, feature_dir=str(dataset["feat"]))


def test_prediction_range_is_checked_where_the_gt_is_ignored_too(dataset):
    """MyVOCevalseg takes the prediction's maximum over the whole image before it drops
    the ground truth's 255 pixels."""
    pred = PRED["a"].copy()
    pred[1, 2] = 255                    # where the ground truth is 255
    _write_png(dataset["pred"] / "a.png", pred)
    with pytest.raises(EvalError, match=r"a\.png: predicted label 255 is outside \[0, 3\)"):
        evaluate(_items(dataset, ["a"]), 3, pred_dir=str(dataset["pred"]))


# A 2-class set whose ignore label is 254 (eval --ignore 254), not the default 255.
IGNORE_254_GT = np.array([[0, 1, 254], [1, 254, 0]], np.uint8)
IGNORE_254_PRED = np.array([[0, 0, 1], [1, 1, 0]], np.uint8)


def _ignore_254_expected():
    """The confusion counted here: pixels whose ground truth is 254 are left out; IoU
    and mean IoU by MyVOCevalseg's formulas (100 TP / (GT + pred - TP), over all
    classes)."""
    keep = IGNORE_254_GT != 254
    confusion = np.zeros((2, 2), np.int64)
    np.add.at(confusion, (IGNORE_254_GT[keep], IGNORE_254_PRED[keep]), 1)
    assert confusion.tolist() == [[2, 0], [1, 1]]
    tp = np.diag(confusion)
    iou = 100.0 * tp / (confusion.sum(1) + confusion.sum(0) - tp)
    return confusion, iou, iou.mean()


def test_a_non_255_ignore_label_is_left_out(tmp_path):
    """MyVOCevalseg's ignore label, given as evaluate(ignore_label=...): its pixels are
    dropped; 255 is then an ordinary (out-of-range) label."""
    from caffelite.evaluate import accumulate_confusion
    confusion, iou, miou = _ignore_254_expected()
    got = accumulate_confusion(np.zeros((2, 2), np.int64), IGNORE_254_GT, IGNORE_254_PRED,
                               ignore_label=254)
    np.testing.assert_array_equal(got, confusion)
    for d in ("gt", "pred"):
        (tmp_path / d).mkdir()
    _write_png(tmp_path / "gt" / "a.png", IGNORE_254_GT)
    _write_png(tmp_path / "pred" / "a.png", IGNORE_254_PRED)
    items = [EvalItem("a", str(tmp_path / "gt" / "a.png"), None)]
    result = evaluate(items, 2, pred_dir=str(tmp_path / "pred"), ignore_label=254)
    np.testing.assert_array_equal(result.confusion, confusion)
    np.testing.assert_allclose(result.scores["iou_percent"], iou, rtol=1e-15)
    assert result.scores["miou_percent"] == pytest.approx(miou, rel=1e-15)
    with pytest.raises(EvalError, match=r"ground-truth label 254 is outside \[0, 2\) and is "
                                        r"not the ignore label 255"):
        evaluate(items, 2, pred_dir=str(tmp_path / "pred"))


def test_16_bit_gt_labels_of_256_and_more_are_an_error(tmp_path):
    """The module's documented difference from MyVOCevalseg: MATLAB's ``gtim < 255``
    mask silently skips the labels of 256 and more that a 16-bit PNG can hold;
    caffelite refuses them as any other label outside [0, N) but the ignore label."""
    gt = np.array([[0, 1, 300], [1, 0, 255]])
    for d in ("gt", "pred"):
        (tmp_path / d).mkdir()
    Image.fromarray(gt.astype(np.int32), "I").convert("I;16").save(tmp_path / "gt" / "a.png")
    with Image.open(tmp_path / "gt" / "a.png") as img:       # PIL reads the 16-bit values
        assert img.mode.startswith("I;16") and np.asarray(img).tolist() == gt.tolist()
    _write_png(tmp_path / "pred" / "a.png", np.array([[0, 1, 1], [1, 0, 0]], np.uint8))
    items = [EvalItem("a", str(tmp_path / "gt" / "a.png"), None)]
    with pytest.raises(EvalError, match=r"a\.png: ground-truth label 300 is outside \[0, 2\) "
                                        r"and is not the ignore label 255"):
        evaluate(items, 2, pred_dir=str(tmp_path / "pred"))


def _gray_png(path, bits, rows):
    """A gray PNG with ``bits`` (1, 2 or 4) per sample, written by hand (Pillow writes 8)."""
    import struct
    import zlib
    raw = b""
    for row in rows:
        text = "".join(format(v, f"0{bits}b") for v in row)
        text += "0" * (-len(text) % 8)
        raw += b"\x00" + int(text, 2).to_bytes(len(text) // 8, "big")

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data +
                struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", len(rows[0]), len(rows), bits, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) +
                     chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("bits, rows", [(1, [[0, 1, 1], [1, 0, 1]]),
                                        (2, [[0, 1, 2], [3, 2, 0]]),
                                        (4, [[0, 9, 15], [1, 2, 3]])])
def test_low_bit_depth_gray_pngs_give_their_sample_values(tmp_path, bits, rows):
    """MATLAB's imread returns a 1-bit PNG as logical 0/1 and 2-/4-bit ones as their
    sample values; Pillow (like cv::imread, which the data layers follow) widens them
    to 0..255, which would turn class 1 of a binary ground truth into the ignore label."""
    from caffelite.evaluate import read_label_map
    path = tmp_path / "gt.png"
    _gray_png(path, bits, rows)
    assert read_label_map(str(path)).tolist() == rows
    if bits == 1:
        assert read_label(str(path)).tolist() == [[255 * v for v in r] for r in rows]


def test_rgb_prediction_is_rejected(dataset):
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(dataset["pred"] / "a.png")
    with pytest.raises(EvalError, match=r"a\.png: a RGB image is not a label map"):
        evaluate(_items(dataset), 3, pred_dir=str(dataset["pred"]))


def test_missing_gt_and_bad_dirs(dataset):
    (dataset["gt"] / "a.png").unlink()
    with pytest.raises(EvalError, match=r"ground truth not found for 'a': .*a\.png"):
        evaluate(_items(dataset), 3, pred_dir=str(dataset["pred"]))
    with pytest.raises(EvalError, match=r"--pred: '.*nowhere' is not a directory"):
        _cli("--gt", str(dataset["gt"]), "--list", str(dataset["root"] / "val_id.txt"),
             "--pred", str(dataset["root"] / "nowhere"))
    with pytest.raises(EvalError, match=r"cannot read the list '.*nolist.txt'"):
        _cli("--gt", str(dataset["gt"]), "--list", str(dataset["root"] / "nolist.txt"),
             "--pred", str(dataset["pred"]))


def test_cli_main_one_line_errors(dataset, capsys):
    from caffelite import cli
    if "eval" not in cli.build_parser()._subparsers._group_actions[0].choices:
        pytest.skip("the eval verb is not wired into caffelite.cli yet")
    (dataset["feat"] / "b_blob_0.mat").unlink()
    code = cli.main(["eval", "--gt", str(dataset["gt"]), "--list",
                     str(dataset["root"] / "val_id.txt"), "--features", str(dataset["feat"]),
                     "--num-labels", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("caffelite eval: error: features not found for 'b': ")


def test_coco_void_classes_are_left_out_of_the_rows_and_means():
    """MyVOCevalseg with GetCocoCategories: ids without a category are 'void'; their
    rows are not printed and the means divide by the 81 other classes (their values,
    normally 0, stay in the sums); a void class whose union is over 1 pixel warns."""
    from caffelite.evaluate import class_names
    names = class_names(91)
    assert names[:4] == ["background", "person", "bicycle", "car"]
    assert names[90] == "toothbrush"
    void = [i for i, n in enumerate(names) if n == "void"]
    assert void == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    confusion = np.diag([100] * 91)
    confusion[void, void] = 0
    result = EvalResult(confusion, names)
    lines = result.report().splitlines()
    assert "Mean Class Accuracy: 100.000%" in lines and lines[-1] == "Average accuracy: 100.000%"
    assert len(lines) == 2 + 81 + 3 + 81 + 2
    assert "            void" not in result.report()
    confusion[12, 12] = 5                      # pixels labelled with a void id
    confusion[12, 0] = 1
    lines = EvalResult(confusion, names).report().splitlines()
    warning = lines.index("WARNING: this void class has denom = 6")
    assert lines[warning - 1] == "    fire hydrant: 100.000%"    # id 11; 12 is void
    assert lines[warning + 1] == "       stop sign: 100.000%"
    with pytest.raises(EvalError, match="the voc classes are 21 labels, not 91"):
        class_names(91, "voc")


def test_features_that_are_labels_already(dataset, capsys):
    """EvalSegResults' is_argmax: a one-channel label map, uint8() as MATLAB rounds it,
    no -1 and no argmax."""
    from caffelite.evaluate import matlab_uint8
    assert matlab_uint8([[-3.0, 0.5, 1.49, 2.5, np.nan, 300.0]]).tolist() == \
        [[0, 1, 1, 3, 0, 255]]
    d = dataset
    labels = d["root"] / "labels"
    labels.mkdir()
    for name in GT:
        h, w = PRED[name].shape
        canvas = np.full((1, 1, h + 2, w + 1), 2.0, np.float32)
        canvas[0, 0, :h, :w] = PRED[name] + np.float32(0.3)
        write_mat(str(labels / f"{name}_blob_0.mat"), canvas)
    assert _cli("--gt", str(d["gt"]), "--list", str(d["root"] / "val.txt"), "--features",
                str(labels), "--num-labels", "3", "--argmax-features") == 0
    assert "Average accuracy: 63.889%" in capsys.readouterr().out
    with pytest.raises(EvalError, match="one channel, not 3"):
        evaluate(_items(d), 3, feature_dir=str(d["feat"]), argmax_done=True)
