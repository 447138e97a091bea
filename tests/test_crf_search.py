"""``caffelite crf_search``: the CRF's parameters cross-validated on a set. Each
combination's confusion must be exactly what ``caffelite crf`` followed by ``caffelite
eval`` gives for it, although the search builds the lattices once for all weights."""
import argparse
import json

import numpy as np
import pytest

from caffelite.crf import CRFParams, cli as crf_cli, crf_labels, search
from caffelite.evaluate import evaluate, items_from_dirs, write_label_png
from caffelite.io.image import read_image
from caffelite.io.matfile import write_mat

from test_crf import noisy_scores, synthetic_scene

IGNORE = 255


def _write_set(tmp_path, ids, num_labels=5, pad=(56, 60), sizes=None):
    """Images, MatWrite features on a padded canvas and ground-truth PNGs (with a
    border of the ignore label), as a DeepLab val folder has them."""
    from PIL import Image
    feats, imgs, gts = (tmp_path / d for d in ("features", "images", "gt"))
    for d in (feats, imgs, gts):
        d.mkdir()
    sizes = sizes or {}
    for n, ident in enumerate(ids):
        height, width = sizes.get(ident, (36 + 3 * n, 44 - 2 * n))
        rgb, gt = synthetic_scene(height, width, 10 + n, num_labels)
        Image.fromarray(rgb).save(imgs / f"{ident}.jpg", quality=95)
        canvas = np.random.default_rng(n).normal(0, 1, (1, num_labels) + pad)
        h, w = min(height, pad[0]), min(width, pad[1])
        canvas[0, :, :h, :w] = noisy_scores(gt, num_labels, n, strength=1.5)[:, :h, :w]
        write_mat(str(feats / f"{ident}_blob_0.mat"), canvas.astype(np.float32))
        gt = gt.astype(np.uint8)
        gt[:2, :] = IGNORE
        write_label_png(str(gts / f"{ident}.png"), gt)
    listing = tmp_path / "val.txt"
    listing.write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n"
                               for i in ids))
    return feats, imgs, gts, listing


def _run(verb_module, verb, argv):
    parser = argparse.ArgumentParser()
    verb_module.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([verb] + argv)
    return args.func(args)


def _confusion_of_crf_then_eval(tmp_path, feats, imgs, gts, listing, ids, params, name):
    """The two-command way: ``caffelite crf`` with ``params``, then the evaluation of
    its PNGs."""
    out = tmp_path / name
    flags = [f"--{n}={getattr(params, n):g}" for n in crf_cli.PARAM_NAMES]
    assert _run(crf_cli, "crf", ["--features", str(feats), "--images", str(imgs),
                                 "--list", str(listing), "--out", str(out)] + flags) == 0
    result = evaluate(items_from_dirs(ids, str(gts)), 5, pred_dir=str(out),
                      ignore_label=IGNORE)
    return result.confusion


def test_matlab_ranges_and_lists():
    assert search.parse_values("3:6", "bi_w") == [3, 4, 5, 6]
    assert search.parse_values("30:10:100", "bi_xy_std") == [30, 40, 50, 60, 70, 80, 90, 100]
    # MATLAB's colon: up from the start, then down from the end (which it hits exactly)
    assert search.parse_values("0.1:0.1:0.5", "bi_rgb_std") == pytest.approx(
        [0.1, 0.2, 0.3, 0.4, 0.5], rel=1e-15)
    assert search.parse_values("0:0.1:0.3", "bi_rgb_std")[-1] == 0.3
    assert search.parse_values("0:1:0.9999999999", "bi_w") == [0]     # floor, no rounding
    assert search.parse_values("1e-13:1e-13:3e-13", "bi_rgb_std") == pytest.approx(
        [1e-13, 2e-13, 3e-13], rel=1e-15)
    assert search.parse_values("3:2:8", "bi_w") == [3, 5, 7]        # stops below the end
    assert search.parse_values("3,4, 5", "bi_w") == [3, 4, 5]
    assert search.parse_values("3 4 10:10:20", "bi_w") == [3, 4, 10, 20]
    assert search.parse_values("4", "pos_w") == [4]
    assert search.parse_values("5:5:10", "max_iter") == [5, 10]
    assert all(isinstance(v, int) for v in search.parse_values("5:5:10", "max_iter"))
    bad = {"3:0:6": "positive step", "6:3": "empty", "a": "not a number",
           "1:2:3:4": "not a range", "4,4": "twice", "nan": "finite", "": "no value",
           "0:1e-320:1": "more than 10000 values"}
    for text, words in bad.items():
        with pytest.raises(search.CrfError, match=f"--bi_w: .*{words}|--bi_w: {words}"):
            search.parse_values(text, "bi_w")
    with pytest.raises(search.CrfError, match="--max_iter: 2.5 is not an integer"):
        search.parse_values("2.5", "max_iter")


def test_each_set_of_stds_builds_its_lattices_once(tmp_path, monkeypatch):
    """The weights vary fastest in the grid, so the combinations sharing their stds
    follow each other and one lattice filter serves them all."""
    feats, imgs, gts, listing = _write_set(tmp_path, ["a"])
    scores, image = crf_cli.load_crf_inputs(str(feats / "a_blob_0.mat"),
                                            str(imgs / "a.jpg"))
    grid = search.parameter_grid(CRFParams(max_iter=1), {
        "bi_w": [2, 5], "bi_xy_std": [10, 20, 30], "bi_rgb_std": [3, 4]})
    builds = []
    real = search.PairwiseMessages
    monkeypatch.setattr(search, "PairwiseMessages",
                        lambda kernels: (builds.append(1), real(kernels))[1])
    labels = list(search._grid_labels(scores, image, grid, "score", None))
    assert len(labels) == 12 and len(builds) == 6
    assert [p.bi_w for p in grid[:2]] == [2, 5]


def test_grid_is_every_combination_and_refuses_bad_values():
    grid = search.parameter_grid(CRFParams(), {"bi_w": [3, 4], "bi_xy_std": [30, 40, 50]})
    assert len(grid) == 6
    assert {(p.bi_w, p.bi_xy_std) for p in grid} == {(w, s) for w in (3, 4)
                                                     for s in (30, 40, 50)}
    assert all(p.bi_rgb_std == CRFParams().bi_rgb_std for p in grid)
    with pytest.raises(search.CrfError, match="bi_xy_std must be positive"):
        search.parameter_grid(CRFParams(), {"bi_xy_std": [0, 10]})


def test_search_matches_crf_then_eval_for_every_combination(tmp_path, capsys):
    ids = ["2007_000033", "2007_000042", "2007_000061"]
    feats, imgs, gts, listing = _write_set(tmp_path, ids)
    report = tmp_path / "search.json"
    assert _run(search, "crf_search", [
        "--features", str(feats), "--images", str(imgs), "--gt", str(gts),
        "--list", str(listing), "--bi_w", "2,5", "--bi_xy_std", "10:20:30",
        "--bi_rgb_std", "4", "--pos_w", "1,3", "--max_iter", "3",
        "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["images"] == ids and len(data["results"]) == 8
    # Without the CRF: the features' own argmax, as ``caffelite eval --features``.
    plain = evaluate(items_from_dirs(ids, str(gts)), 5, feature_dir=str(feats),
                     ignore_label=IGNORE)
    assert np.array_equal(data["without_crf"]["confusion"], plain.confusion)
    assert data["without_crf"]["miou_percent"] == pytest.approx(plain.scores["miou_percent"])
    for k, entry in enumerate(data["results"]):
        params = CRFParams().with_(**entry["params"])
        want = _confusion_of_crf_then_eval(tmp_path, feats, imgs, gts, listing, ids,
                                           params, f"crf{k}")
        assert np.array_equal(entry["confusion"], want), entry["params"]
    mious = [entry["miou_percent"] for entry in data["results"]]
    assert data["best"] == int(np.argmax(mious))
    assert data["best_params"] == data["results"][data["best"]]["params"]
    assert max(mious) > data["without_crf"]["miou_percent"]    # the CRF helps here
    out = capsys.readouterr().out
    best = data["results"][data["best"]]["params"]
    assert f"{max(mious):8.2f}" in out.splitlines()[1] and f"bi_w={best['bi_w']:g}" in out
    assert "without the CRF" in out


def test_selection_first_and_every(tmp_path):
    ids = [f"im{i}" for i in range(7)]
    listing = tmp_path / "ids.txt"
    listing.write_text("\n".join(ids) + "\n")
    take = search.selected_lines
    assert [line.id for line in take(str(listing), first=3)] == ids[:3]
    assert [line.id for line in take(str(listing), every=3)] == ["im0", "im3", "im6"]
    assert [line.id for line in take(str(listing), first=2, every=3)] == ["im0", "im3"]
    for kwargs, flag in (({"first": 0}, "--first"), ({"every": 0}, "--every")):
        with pytest.raises(search.CrfError, match=flag):
            take(str(listing), **kwargs)


def test_parallel_jobs_give_the_serial_confusions(tmp_path):
    ids = ["a", "b", "c"]
    feats, imgs, gts, listing = _write_set(tmp_path, ids)
    lines = search.selected_lines(str(listing))
    grid = search.parameter_grid(CRFParams(max_iter=2), {"bi_w": [3, 6]})
    tasks = search.search_tasks(str(feats), str(imgs), str(gts), lines, grid)
    assert np.array_equal(search.run_search(tasks, jobs=1), search.run_search(tasks, jobs=2))


def test_device_path_shares_its_lattice_tables(tmp_path, monkeypatch):
    """On the (emulated) GPU, the labels of every combination equal ``crf_labels`` on
    that device with the combination's own kernels and tables."""
    monkeypatch.setenv("CAFFELITE_GPU_EMULATOR", "1")
    feats, imgs, gts, listing = _write_set(tmp_path, ["a"], sizes={"a": (14, 17)})
    scores, image = crf_cli.load_crf_inputs(str(feats / "a_blob_0.mat"),
                                            str(imgs / "a.jpg"))
    grid = search.parameter_grid(CRFParams(max_iter=2),
                                 {"bi_w": [2, 6], "bi_rgb_std": [3, 9]})
    got = list(search._grid_labels(scores, image, grid, "score", 0))
    for params, labels in zip(grid, got):
        assert np.array_equal(labels, crf_labels(scores, image, params, device=0)), params
    host = list(search._grid_labels(scores, image, grid, "score", None))
    for params, labels in zip(grid, host):
        assert np.array_equal(labels, crf_labels(scores, image, params)), params


def test_probability_unaries_and_zero_iterations(tmp_path):
    feats, imgs, gts, listing = _write_set(tmp_path, ["a"])
    scores, image = crf_cli.load_crf_inputs(str(feats / "a_blob_0.mat"),
                                            str(imgs / "a.jpg"))
    prob = np.exp(scores - scores.max(axis=0))
    prob /= prob.sum(axis=0)
    grid = search.parameter_grid(CRFParams(), {"max_iter": [0, 2], "bi_w": [1, 4]})
    for unary, values in (("score", scores), ("prob", prob)):
        got = list(search._grid_labels(values, image, grid, unary, None))
        for params, labels in zip(grid, got):
            assert np.array_equal(labels, crf_labels(values, image, params, unary=unary))


def test_errors_name_the_file(tmp_path):
    ids = ["a", "b"]
    feats, imgs, gts, listing = _write_set(tmp_path, ids)
    base = ["--features", str(feats), "--images", str(imgs), "--gt", str(gts),
            "--list", str(listing), "--max_iter", "1"]
    (gts / "b.png").unlink()
    with pytest.raises(search.CrfError, match=r"ground truth '.*b\.png' not found for 'b'"):
        _run(search, "crf_search", base)
    write_label_png(str(gts / "b.png"), np.zeros((5, 6), np.uint8))
    with pytest.raises(search.CrfError, match=r"b\.png' is 5x6 but the image .*b\.jpg"):
        _run(search, "crf_search", base)
    write_label_png(str(gts / "b.png"),
                    np.full(read_image(str(imgs / "b.jpg")).shape[:2], 9, np.uint8))
    with pytest.raises(search.CrfError, match=r"b\.png: ground-truth label 9 is outside"):
        _run(search, "crf_search", base)
    with pytest.raises(search.CrfError, match="--bi_w: the range '6:3' is empty"):
        _run(search, "crf_search", base + ["--bi_w", "6:3"])
    with pytest.raises(search.CrfError, match="features have 5 channels but 4"):
        _run(search, "crf_search", base + ["--num-labels", "4"])
    with pytest.raises(search.CrfError, match="--json: .* is the --list input"):
        _run(search, "crf_search", base + ["--json", str(listing)])


def test_command_line_reports_errors_in_one_line(tmp_path, capsys):
    from caffelite import cli
    feats, imgs, gts, listing = _write_set(tmp_path, ["a"])
    argv = ["crf_search", "--features", str(feats), "--images", str(imgs), "--gt", str(gts),
            "--list", str(listing), "--max_iter", "1"]
    assert cli.main(argv + ["--bi_xy_std", "30:-10:0"]) == 1
    err = capsys.readouterr().err
    assert "--bi_xy_std: the range '30:-10:0' needs a positive step" in err
    assert "Traceback" not in err
    assert cli.main(argv + ["--bi_w", "2,4"]) == 0
    out = capsys.readouterr().out
    assert "without the CRF" in out and len(out.strip().splitlines()) == 4
