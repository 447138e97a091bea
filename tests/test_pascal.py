"""``caffelite pascal``: run_pascal.sh + CRF + evaluation on the synthetic example end to
end, the kit's file layout and model choice, step skipping, and clear errors."""
import argparse
import contextlib
import glob
import io
import json
import logging
import os
import re
import shutil
import sys
import time

import numpy as np
import pytest

from caffelite import pascal
from caffelite.demo import CONFIG_DIR, prepare_experiment
from caffelite.evaluate import EvalItem, evaluate, read_list
from caffelite.io.image import read_label
from caffelite.io.prototxt import PrototxtError
from caffelite.log import logger
from caffelite.pascal import Pipeline, PipelineError, choose_model, comm_3

NET = "aspp_slim"
GLOG_LINE = r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] "


def _crf_available():
    try:
        pascal.crf_function()
        return True
    except PipelineError:
        return False


def _make_experiment(root):
    """The demo's experiment folder plus solver2 and a trainval list, under ``root``."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        exp, data_root, config, _ = prepare_experiment(n_train=6, n_val=3, max_iter=3,
                                                       batch_size=2)
        shutil.copy(os.path.join(CONFIG_DIR, "solver2.prototxt"), config)
        lists = os.path.join(exp, "list")
        with open(os.path.join(lists, "trainval.txt"), "w") as f:
            for name in ("train", "val"):
                f.write(open(os.path.join(lists, f"{name}.txt")).read())
    finally:
        os.chdir(cwd)
    return root / exp, root / data_root


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def records():
    handler = _Records()
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(old)


def _parse(argv):
    p = argparse.ArgumentParser()
    pascal.add_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["pascal", *argv])


def _argv(exp, data, *extra):
    steps = ",".join(s for s in pascal.DEFAULT_STEPS if s != "crf" or _crf_available())
    return [str(exp), "--net", NET, "--data-root", str(data), "--train-set-suffix=",
            "--test2-sets", "val", "--steps", steps, "-D", "MAX_ITER=3", "-D",
            "BATCH_SIZE=2", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One full run from a working directory that is not the experiment's parent."""
    root = tmp_path_factory.mktemp("pascal")
    exp, data = _make_experiment(root)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        data_rel = os.path.relpath(data)          # --data-root relative to the caller
        t0 = time.perf_counter()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert pascal.run(_parse(_argv(exp, data_rel, "--vis"))) == 0
        seconds = time.perf_counter() - t0
    finally:
        os.chdir(cwd)
    return {"exp": exp, "data": data, "stdout": out.getvalue(), "seconds": seconds}


def _ids(exp):
    return [line.id for line in read_list(str(exp / "list" / "val.txt"))]


def test_end_to_end_layout(finished):
    exp, data = finished["exp"], finished["data"]
    assert finished["seconds"] < 60
    config = exp / "config" / NET
    # expanded prototxts next to the templates, named like the kit's
    for name in ("train_train", "solver_train", "test_val", "train_trainval",
                 "solver2_trainval"):
        assert (config / f"{name}.prototxt").is_file(), name
    train = (config / "train_train.prototxt").read_text()
    assert f'root_folder: "{data}"' in train
    assert 'source: "voc_synth/list/train.txt"' in train and "batch_size: 2" in train
    assert 'source: "voc_synth/list/trainval.txt"' in \
        (config / "train_trainval.prototxt").read_text()
    # test #2 re-expands test_val.prototxt (as the kit does) with FEATURE_DIR = features2
    assert 'prefix: "voc_synth/features2/aspp_slim/val/fc8/"' in \
        (config / "test_val.prototxt").read_text()
    assert 'snapshot_prefix: "voc_synth/model/aspp_slim/train2"' in \
        (config / "solver2_trainval.prototxt").read_text()
    model = exp / "model" / NET
    assert (model / "train_iter_3.caffemodel").is_file()
    assert (model / "train2_iter_3.caffemodel").is_file()
    ids = _ids(exp)
    for kind in ("features", "features2"):
        mats = sorted(glob.glob(str(exp / kind / NET / "val" / "fc8" / "*_blob_0.mat")))
        assert [os.path.basename(m)[:-len("_blob_0.mat")] for m in mats] == sorted(ids)
    assert (exp / "features2" / NET / "val" / "crf").is_dir()
    logs = os.listdir(exp / "log" / NET)
    for step in ("train.", "test_val.", "train2.", "test2_val.", "eval_features_post_none",
                 "eval_features2_post_none"):
        assert any(name.startswith(step) for name in logs), (step, logs)
    train_log = next(n for n in logs if n.startswith("train."))
    lines = (exp / "log" / NET / train_log).read_text().splitlines()
    assert re.match(GLOG_LINE, lines[0]) and re.match(GLOG_LINE, lines[-1])
    assert sum(bool(re.match(GLOG_LINE, l)) for l in lines) >= 5
    assert any("Iteration 0, loss = " in l for l in lines)
    assert any("Snapshotting to binary proto file voc_synth/model/aspp_slim/train_iter_3"
               in l for l in lines)
    # the test step logs as `caffe test` (a DeepLab test net has no outputs: Loss 0) into
    # the folders the kit makes
    test_log = next(n for n in logs if n.startswith("test_val."))
    text = (exp / "log" / NET / test_log).read_text()
    assert f"Running for {len(ids)} iterations." in text and "] Loss: 0\n" in text
    for sub in ("fc8", "fc9", "seg_score"):
        assert (exp / "features" / NET / "val" / sub).is_dir()


def _confusion_from_features(mat_dir, ids, gt_paths, classes=21):
    """The kit's EvalSegResults without caffelite: each <id>_blob_0.mat holds the scores
    as MatWrite's [W, H, C(, N)] array; permuted to H x W, cut to the image, argmax over
    the classes, counted against the GT's labelled pixels (confusion[gt, predicted])."""
    from PIL import Image
    from scipy.io import loadmat
    confusion = np.zeros((classes, classes), np.int64)
    for i, gt_path in zip(ids, gt_paths):
        gt = np.asarray(Image.open(gt_path)).astype(np.int64)
        scores = loadmat(os.path.join(mat_dir, f"{i}_blob_0.mat"))["data"]
        scores = scores.reshape(scores.shape[:3]).transpose(1, 0, 2)
        predicted = scores[:gt.shape[0], :gt.shape[1]].argmax(axis=2)
        keep = gt != 255
        confusion += np.bincount(gt[keep] * classes + predicted[keep],
                                 minlength=classes * classes).reshape(classes, classes)
    return confusion


def test_end_to_end_scores_match_an_independent_evaluation(finished):
    exp, data = finished["exp"], finished["data"]
    ids = _ids(exp)
    gt_paths = [str(data / "SegmentationClassAug" / f"{i}.png") for i in ids]
    for kind in ("features", "features2"):
        res = exp / "res" / kind / NET / "val" / "fc8" / "post_none"
        stored = json.loads((res / "results.json").read_text())
        # every labelled GT pixel of the val images is counted exactly once
        labelled = sum(int((read_label(p) != 255).sum()) for p in gt_paths)
        assert np.sum(stored["confusion"]) == labelled
        mats = exp / kind / NET / "val" / "fc8"
        assert stored["confusion"] == _confusion_from_features(mats, ids, gt_paths).tolist()
        # the palette PNGs written next to it give the same numbers as the features
        items = [EvalItem(i, p) for i, p in zip(ids, gt_paths)]
        again = evaluate(items, 21, pred_dir=str(res))
        assert again.confusion.tolist() == stored["confusion"]
        assert stored["miou_percent"] == pytest.approx(again.scores["miou_percent"])
        assert (res / "results.txt").read_text().strip() == again.report()
        assert (res / "vis" / f"{ids[0]}_overlay.jpg").is_file()
    assert "Average accuracy:" in finished["stdout"]
    assert "mean IoU (over all classes" in finished["stdout"]


@pytest.mark.skipif(not _crf_available(), reason="caffelite.crf not available")
def test_end_to_end_crf_outputs_are_evaluated(finished):
    exp = finished["exp"]
    crf = exp / "res" / "features2" / NET / "val" / "fc8" / \
        "post_densecrf_W4_XStd49_RStd5_PosW3_PosXStd3"
    assert sorted(p.name for p in crf.glob("*.png")) == sorted(f"{i}.png" for i in _ids(exp))
    assert (crf / "results.json").is_file()
    assert str(crf.relative_to(exp.parent)) in finished["stdout"]


@pytest.fixture
def copied(finished, tmp_path):
    """A copy of the finished experiment (mtimes kept) to re-run steps on."""
    root = tmp_path / "copy"
    shutil.copytree(finished["exp"].parent, root, symlinks=True)
    return root / "voc_synth", finished["data"]


def _mtimes(exp):
    return {p: os.path.getmtime(p) for p in glob.glob(str(exp / "**" / "*"), recursive=True)
            if os.path.isfile(p) and "/log/" not in p and "/config/" not in p}


def test_rerun_skips_finished_steps(copied, records, capsys):
    exp, data = copied
    before = _mtimes(exp)
    assert pascal.run(_parse(_argv(exp, data))) == 0
    assert _mtimes(exp) == before
    skipped = [m for m in records if "skipped (--force re-runs it)" in m]
    for step in ("train", "test", "train2", "test2", "eval"):
        assert any(m.startswith(f"Step {step}:") for m in skipped), (step, skipped)
    assert not any("init.caffemodel not found" in m for m in records)   # not training
    assert "Average accuracy:" in capsys.readouterr().out      # table printed again


def test_eval_of_varied_scores_matches_an_independent_count(copied):
    """Three training iterations predict the background everywhere, so the end-to-end
    confusion above hardly tests the reading of the features: here every score map is
    replaced by random scores (MatWrite's layout kept) and the eval step is run again."""
    from scipy.io import loadmat, savemat
    exp, data = copied
    ids = _ids(exp)
    mats = exp / "features" / NET / "val" / "fc8"
    rng = np.random.default_rng(11)
    for i in ids:
        path = mats / f"{i}_blob_0.mat"
        shape = loadmat(path)["data"].shape
        savemat(path, {"data": rng.standard_normal(shape).astype(np.float32)})
    assert pascal.run(_parse(_argv(exp, data) + ["--steps", "eval", "--force"])) == 0
    res = exp / "res" / "features" / NET / "val" / "fc8" / "post_none" / "results.json"
    stored = np.array(json.loads(res.read_text())["confusion"])
    gt_paths = [str(data / "SegmentationClassAug" / f"{i}.png") for i in ids]
    assert (stored.sum(axis=0) > 0).sum() == 21             # every class predicted
    np.testing.assert_array_equal(stored, _confusion_from_features(mats, ids, gt_paths))


def test_missing_feature_reruns_test_and_eval_only(copied, records, capsys):
    exp, data = copied
    model = exp / "model" / NET / "train_iter_3.caffemodel"
    model_time = os.path.getmtime(model)
    victim = exp / "features" / NET / "val" / "fc8" / f"{_ids(exp)[0]}_blob_0.mat"
    victim.unlink()
    assert pascal.run(_parse(_argv(exp, data))) == 0
    assert victim.is_file() and os.path.getmtime(model) == model_time
    assert any(m.startswith("Step train:") and "skipped" in m for m in records)
    assert not any(m.startswith("Step test:") and "skipped" in m for m in records)
    assert any(m.startswith("Step test2:") and "skipped" in m for m in records)
    res = exp / "res" / "features" / NET / "val" / "fc8" / "post_none" / "results.json"
    assert os.path.getmtime(res) >= os.path.getmtime(victim)


def _append(path, text):
    with open(path, "a") as f:
        f.write(text)


def test_an_edited_test_template_makes_the_features_stale(copied, records, monkeypatch):
    """run_pascal.sh always runs every step; caffelite skips finished ones, but not
    features made with another test net (a comment is no change). While the test runs,
    its record says so (an interrupted run leaves the features stale)."""
    exp, data = copied
    features = glob.glob(str(exp / "features" / NET / "val" / "fc8" / "*.mat"))
    before = {p: os.path.getmtime(p) for p in features}
    template = exp / "config" / NET / "test.prototxt"
    _append(template, "# a comment is no change\n")
    assert pascal.run(_parse(_argv(exp, data) + ["--steps", "test"])) == 0
    assert any(m.startswith("Step test:") and "skipped" in m for m in records)
    assert {p: os.path.getmtime(p) for p in features} == before
    time.sleep(0.01)
    _append(template, "force_backward: false\n")
    record = exp / "features" / NET / "val" / "test_configs.json"
    seen = []
    run_test_net = pascal.run_test_net
    monkeypatch.setattr(pascal, "run_test_net", lambda *args: (
        seen.append(json.loads(record.read_text())), run_test_net(*args)))
    records.clear()
    assert pascal.run(_parse(_argv(exp, data) + ["--steps", "train,test"])) == 0
    assert any(m.startswith("Step train:") and "skipped" in m for m in records)
    assert any(m.startswith("Step test:") and "were made with another" in m for m in records)
    assert all(os.path.getmtime(p) > t for p, t in before.items())
    assert list(seen[0]) == ["running"]
    assert json.loads(record.read_text()) == seen[0]["running"]


def test_an_edited_solver_warns_and_trains_again_when_forced(copied, records, monkeypatch):
    exp, data = copied
    final = exp / "model" / NET / "train_iter_3.caffemodel"
    before = os.path.getmtime(final)
    _append(exp / "config" / NET / "solver.prototxt", "debug_info: false\n")
    assert pascal.run(_parse(_argv(exp, data) + ["--steps", "train"])) == 0
    assert any(m.startswith("Step train:") and "was trained with other configs" in m
               and "--force trains again" in m for m in records)
    assert any(m.startswith("Step train:") and "skipped" in m for m in records)
    assert os.path.getmtime(final) == before
    record = exp / "model" / NET / "train_configs.json"
    seen = []
    from caffelite.solver import Solver
    solve = Solver.solve
    monkeypatch.setattr(Solver, "solve", lambda self, *args: (
        seen.append(json.loads(record.read_text())), solve(self, *args)))
    time.sleep(0.01)
    assert pascal.run(_parse(_argv(exp, data, "--force") + ["--steps", "train"])) == 0
    assert os.path.getmtime(final) > before
    assert list(seen[0]) == ["running"]
    assert json.loads(record.read_text()) == seen[0]["running"] == {
        name: pascal._config_digests(
            **{kind: str(exp / "config" / NET / name)})[name]
        for kind, name in (("net", "train_train.prototxt"),
                           ("solver", "solver_train.prototxt"))}


def test_outputs_without_a_record_of_their_configs_stay_finished(copied, records):
    """Snapshots and features from the kit's own scripts (or from before the records)
    have no record of their configs: nothing says they are stale, so they are kept."""
    exp, data = copied
    for record in (glob.glob(str(exp / "model" / NET / "*_configs.json")) +
                   glob.glob(str(exp / "features" / NET / "*" / "test_configs.json"))):
        os.remove(record)
    _append(exp / "config" / NET / "test.prototxt", "force_backward: false\n")
    _append(exp / "config" / NET / "solver.prototxt", "debug_info: false\n")
    before = _mtimes(exp)
    assert pascal.run(_parse(_argv(exp, data) + ["--steps", "train,test"])) == 0
    assert _mtimes(exp) == before
    for step in ("train", "test"):
        assert any(m.startswith(f"Step {step}:") and "skipped" in m for m in records), step


def test_force_reruns(copied):
    exp, data = copied
    features = glob.glob(str(exp / "features" / NET / "val" / "fc8" / "*.mat"))
    before = {p: os.path.getmtime(p) for p in features}
    time.sleep(0.01)
    assert pascal.run(_parse(_argv(exp, data, "--force") + ["--steps", "test"])) == 0
    assert all(os.path.getmtime(p) > t for p, t in before.items())


def test_training_without_an_init_model_is_a_warning(copied, records):
    """run_pascal.sh trains from the fillers when model/<NET>/init.caffemodel is missing;
    so does caffelite, but it says so."""
    exp, data = copied
    assert not (exp / "model" / NET / "init.caffemodel").exists()
    assert pascal.run(_parse(_argv(exp, data, "--force") + ["--steps", "train"])) == 0
    assert any(m.endswith(f"init.caffemodel not found: training {NET} from its fillers "
                          f"(as run_pascal.sh does)") for m in records), records


# ------------------------------------------------------------------ unit behaviour
def test_model_choice_is_the_newest_file_like_ls_t(tmp_path, records):
    # run_pascal.sh: MODEL=`ls -t .../train_iter_*.caffemodel | head -n 1`
    now = time.time()
    for name, age in (("train_iter_2", 10), ("train_iter_10", 100), ("train_iter_9", 50),
                      ("train_iter_x", 500)):
        p = tmp_path / f"{name}.caffemodel"
        p.write_bytes(b"")
        os.utime(p, (now - age, now - age))
    (tmp_path / "train2_iter_99.caffemodel").write_bytes(b"")
    chosen = choose_model(str(tmp_path), "test.caffemodel", "train")
    assert chosen == str(tmp_path / "train_iter_2.caffemodel")
    assert any("newest file and is used" in m and "train_iter_10" in m for m in records)
    for name in ("train_iter_3", "train_iter_20"):        # equal times: the first name
        p = tmp_path / f"{name}.caffemodel"
        p.write_bytes(b"")
        os.utime(p, (now, now))
    assert choose_model(str(tmp_path), "test.caffemodel", "train") == \
        str(tmp_path / "train_iter_20.caffemodel")
    assert choose_model(str(tmp_path), "test2.caffemodel", "train2").endswith(
        "train2_iter_99.caffemodel")
    (tmp_path / "test.caffemodel").write_bytes(b"")
    assert choose_model(str(tmp_path), "test.caffemodel", "train") == \
        str(tmp_path / "test.caffemodel")
    assert choose_model(str(tmp_path), "init2.caffemodel", "nothing") is None


def test_test_iterations_are_wc_l(tmp_path):
    # TEST_ITER=`cat list | wc -l`: newline characters, blank lines included, a last
    # line without one not
    for text, count in (("a\nb\n", 2), ("a\nb", 1), ("a\n\nb\n\n", 4), ("", 0)):
        (tmp_path / "l.txt").write_bytes(text.encode())
        assert pascal._count_lines(str(tmp_path / "l.txt")) == count


def test_comm_3_like_coreutils():
    a = ["a", "b", "d", "f"]
    b = ["b", "c", "f", "g"]
    assert comm_3(a, b) == ["a", "\tc", "d", "\tg"]
    assert comm_3(a, []) == a


def test_sub_sed_variables_and_defines(tmp_path):
    exp, data = _make_experiment(tmp_path)
    p = Pipeline(str(exp), NET, data_root=str(data), defines={"BATCH_SIZE": 4, "NEW": "x"})
    v = p.variables(TEST_SET="val")
    assert set(pascal.SUB_SED_VARIABLES) <= set(v)
    assert v["EXP"] == "voc_synth" and v["NET_ID"] == NET and v["NUM_LABELS"] == "21"
    assert v["DATA_ROOT"] == str(data) and v["TEST_SET"] == "val"
    assert v["BATCH_SIZE"] == "4" and v["NEW"] == "x"
    assert v["FG_BIAS"] == "" and v["TRAIN_SET_STRONG"] == ""
    assert v["TRAIN_SET"] == "" and v["FEATURE_DIR"] == ""
    # run_pascal.sh's shell variables stay set for later sections
    v = p.variables(after="train", TEST_SET="val")
    assert v["TRAIN_SET"] == "train_aug" and v["TRAIN_SET_WEAK"] == "train_aug_diff_"
    v = p.variables(after="test", TRAIN_SET="trainval_aug")
    assert v["TEST_SET"] == "val" and v["FEATURE_DIR"] == "voc_synth/features/aspp_slim"
    assert p.variables(after="train2")["TRAIN_SET"] == "trainval_aug"


def test_ground_truth_is_where_the_matlab_evaluation_reads_it(tmp_path, monkeypatch):
    """GetVOCopts reads DATA_ROOT/SegmentationClass/<id>.png: that file when it exists,
    else the list's second column (the kit's SegmentationClassAug), --gt over both."""
    exp, data = _make_experiment(tmp_path)
    monkeypatch.chdir(exp.parent)           # where the steps run (the lists are relative)
    p = Pipeline(str(exp), NET, data_root=str(data))
    items = p.items("val")
    assert items and all(i.gt.endswith(f"/SegmentationClassAug/{i.id}.png") for i in items)
    official = data / "SegmentationClass"
    official.mkdir()
    (official / f"{items[0].id}.png").write_bytes(b"")
    gts = [i.gt for i in p.items("val")]
    assert gts[0] == str(official / f"{items[0].id}.png")
    assert gts[1:] == [i.gt for i in items[1:]]
    other = Pipeline(str(exp), NET, data_root=str(data), gt_dir=str(tmp_path / "gt"))
    assert [i.gt for i in other.items("val")] == [str(tmp_path / "gt" / f"{i.id}.png")
                                                  for i in items]


def test_data_root_keeps_its_trailing_slash(tmp_path):
    """sed substitutes DATA_ROOT's text as the script sets it (the kit's example ends
    in '/'): templates writing ``${DATA_ROOT}JPEGImages`` rely on it.  Only a relative
    path is made absolute (the steps run in the experiment's parent folder)."""
    exp, data = _make_experiment(tmp_path)
    p = Pipeline(str(exp), NET, data_root=str(data) + "/")
    assert p.variables()["DATA_ROOT"] == str(data) + "/"
    cwd = os.getcwd()
    os.chdir(data.parent)
    try:
        p = Pipeline(str(exp), NET, data_root=data.name + "/")
    finally:
        os.chdir(cwd)
    assert p.variables()["DATA_ROOT"] == str(data) + "/"
    assert Pipeline(str(exp), NET, data_root=str(data)).variables()["DATA_ROOT"] == str(data)


def test_weak_list_like_run_pascal(tmp_path):
    exp, data = _make_experiment(tmp_path)
    lists = exp / "list"
    (lists / "strong.txt").write_text("".join(
        l + "\n" for l in (lists / "train.txt").read_text().splitlines()[:2]))
    p = Pipeline(str(exp), NET, data_root=str(data),
                 defines={"TRAIN_SET_STRONG": "strong", "TRAIN_SET_WEAK_LEN": "3"})
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert p._weak_list("train") == "train_diff_strong_head3"
    finally:
        os.chdir(cwd)
    train = (lists / "train.txt").read_text().splitlines()
    assert (lists / "train_diff_strong_head3.txt").read_text().splitlines() == train[2:5]
    p.defines = {}
    assert p._weak_list("train") == "train_diff_"     # the kit's value when STRONG is unset
    p.defines = {"TRAIN_SET_STRONG": "strong", "TRAIN_SET_WEAK_LEN": "ten"}
    os.chdir(tmp_path)
    try:
        with pytest.raises(pascal.PipelineError, match=r"-D TRAIN_SET_WEAK_LEN=ten: must be "
                                                       r"a whole number of lines"):
            p._weak_list("train")
    finally:
        os.chdir(cwd)


# ------------------------------------------------------------------ errors
def test_unfilled_template_variable_names_it(tmp_path):
    exp, data = _make_experiment(tmp_path)
    argv = [a for a in _argv(exp, data) if a != "MAX_ITER=3"]
    argv.remove("-D")
    with pytest.raises(PrototxtError, match=r"solver\.prototxt: unfilled template "
                                            r"placeholder\(s\): MAX_ITER"):
        pascal.run(_parse(argv + ["--steps", "train"]))


def test_missing_list_is_reported_before_any_work(tmp_path):
    exp, data = _make_experiment(tmp_path)
    argv = _argv(exp, data)
    argv[argv.index("--test2-sets") + 1] = "val,test"
    with pytest.raises(PipelineError, match=r"voc_synth/list/test\.txt not found"):
        pascal.run(_parse(argv))
    assert not glob.glob(str(exp / "model" / NET / "*.caffemodel"))


def test_missing_template_and_data_root(tmp_path):
    exp, data = _make_experiment(tmp_path)
    (exp / "config" / NET / "solver2.prototxt").unlink()
    with pytest.raises(PipelineError, match=r"missing template\(s\).*config/aspp_slim/"
                                            r"solver2\.prototxt"):
        pascal.run(_parse(_argv(exp, data)))
    with pytest.raises(PipelineError, match=r"DATA_ROOT '.*nowhere' is not a directory"):
        pascal.run(_parse(_argv(exp, tmp_path / "nowhere") + ["--steps", "test"]))
    with pytest.raises(PipelineError, match="give --data-root"):
        Pipeline(str(exp), NET)
    with pytest.raises(PipelineError, match=r"unknown step\(s\) trian"):
        Pipeline(str(exp), NET, data_root=str(data), steps=["trian"])
    with pytest.raises(PipelineError, match=r"experiment folder '.*nope' does not exist"):
        Pipeline(str(tmp_path / "nope"), NET, data_root=str(data))


def test_test_without_a_model_names_the_model_folder(tmp_path):
    exp, data = _make_experiment(tmp_path)
    with pytest.raises(PipelineError, match=r"test on 'val': no model: neither "
                                            r"voc_synth/model/aspp_slim/test\.caffemodel nor "
                                            r"a train_iter_\*"):
        pascal.run(_parse(_argv(exp, data) + ["--steps", "test"]))
    with pytest.raises(PipelineError, match=r"train2 needs weights"):
        pascal.run(_parse(_argv(exp, data) + ["--steps", "train2"]))
    with pytest.raises(PipelineError, match=r"eval: no features of 'val'"):
        pascal.run(_parse(_argv(exp, data) + ["--steps", "eval"]))


def test_test_list_without_a_complete_line_is_an_error(tmp_path):
    exp, data = _make_experiment(tmp_path)
    (exp / "model" / NET).mkdir(parents=True, exist_ok=True)
    (exp / "model" / NET / "test.caffemodel").write_bytes(b"")
    first = (exp / "list" / "val.txt").read_text().splitlines()[0]
    (exp / "list" / "val.txt").write_text(first)            # no newline: wc -l is 0
    with pytest.raises(PipelineError, match=r"val\.txt has no complete line"):
        pascal.run(_parse(_argv(exp, data) + ["--steps", "test"]))


def test_crf_step_unavailable_is_a_clear_error(tmp_path, monkeypatch):
    exp, data = _make_experiment(tmp_path)
    monkeypatch.setitem(sys.modules, "caffelite.crf", None)
    with pytest.raises(PipelineError, match="crf step is not available yet"):
        pascal.run(_parse(_argv(exp, data) + ["--steps", "train,crf"]))
    assert not glob.glob(str(exp / "model" / NET / "*.caffemodel"))


def test_cli_passes_the_gpu_flags_to_the_pipeline(tmp_path, monkeypatch):
    """`caffelite pascal --gpu 0 --tf32 --no-cuda-graphs --conv-autotune` runs every step
    with them."""
    from caffelite import cli
    seen = {}
    monkeypatch.setattr(Pipeline, "run", lambda self: seen.update(
        gpu=self.gpu, tf32=self.tf32, graphs=self.cuda_graphs,
        autotune=self.autotune) or {})
    (tmp_path / "voc12").mkdir()
    args = cli.build_parser().parse_args(
        ["pascal", str(tmp_path / "voc12"), "--net", "x", "--data-root", str(tmp_path),
         "--gpu", "0", "--tf32", "--no-cuda-graphs", "--conv-autotune"])
    assert args.func(args) == 0
    assert seen == {"gpu": 0, "tf32": True, "graphs": False, "autotune": True}


def test_gpu_only_flags_on_the_cpu_are_a_warning(tmp_path, caplog):
    exp, data = _make_experiment(tmp_path)
    pipeline = Pipeline(str(exp), NET, data_root=str(data), steps=[], tf32=True)
    with caplog.at_level(logging.WARNING, logger="caffelite"):
        pipeline.run()
    assert "--tf32, --cuda-graphs and --conv-autotune apply to GPU mode only" in caplog.text


@pytest.mark.skipif(not _crf_available(), reason="caffelite.crf not available")
def test_crf_search_step_gives_the_crf_and_eval_steps_its_best(copied, records):
    exp, data = copied
    search = ["--search-bi-w", "3,6", "--search-bi-xy-std", "20", "--search-bi-rgb-std",
              "3,5", "--search-images", "2", "--crf-max-iter", "2"]
    argv = _argv(exp, data) + search + ["--steps", "crf_search,crf,eval"]
    assert pascal.run(_parse(argv)) == 0
    res = exp / "res" / "features2" / NET / "val" / "fc8"
    found = json.loads((res / "crf_search.json").read_text())
    assert found["images"] == _ids(exp)[:2] and len(found["results"]) == 4
    best = found["best_params"]
    assert best == found["results"][found["best"]]["params"]
    assert (best["bi_xy_std"], best["pos_w"], best["max_iter"]) == (20, 3, 2)
    folder = res / pascal.crf_folder(best)
    assert sorted(p.name for p in folder.glob("*.png")) == \
        sorted(f"{i}.png" for i in _ids(exp))
    assert (folder / "results.json").is_file()
    # again: the search is done; a flag given on the command line wins over its best
    records.clear()
    other = 3 if best["bi_w"] == 6 else 6
    assert pascal.run(_parse(argv + ["--crf-bi-w", str(other)])) == 0
    assert any(m.startswith("Step crf_search:") and "skipped" in m for m in records)
    assert (res / pascal.crf_folder(dict(best, bi_w=other)) / "results.json").is_file()
    # another grid is another search
    records.clear()
    assert pascal.run(_parse(argv[:-2] + ["--steps", "crf_search", "--search-bi-w", "4"])) == 0
    assert not any(m.startswith("Step crf_search:") and "skipped" in m for m in records)
    assert json.loads((res / "crf_search.json").read_text())["best_params"]["bi_w"] == 4


def test_crf_search_flags_are_checked_before_any_work(tmp_path):
    exp, data = _make_experiment(tmp_path)
    argv = _argv(exp, data) + ["--steps", "crf_search", "--search-bi-w", "6:3"]
    with pytest.raises(PipelineError, match="--search-bi-w: the range '6:3' is empty"):
        pascal.run(_parse(argv))
    with pytest.raises(PipelineError, match="--search-images must be at least 1"):
        pascal.run(_parse(_argv(exp, data) + ["--steps", "crf_search",
                                              "--search-images", "0"]))


def test_a_pipeline_runs_crf_search_only_when_asked(tmp_path):
    exp, data = _make_experiment(tmp_path)
    assert "crf_search" not in pascal.Pipeline(exp, NET, data_root=str(data)).steps


@pytest.mark.skipif(not _crf_available(), reason="caffelite.crf not available")
def test_crf_labels_are_made_again_when_max_iter_changes(copied, records):
    """The kit's folder name leaves out max_iter; the parameters recorded beside the
    labels do not."""
    exp, data = copied
    argv = _argv(exp, data) + ["--steps", "crf"]          # (the last --steps counts)
    assert pascal.run(_parse(argv + ["--crf-max-iter", "1"])) == 0
    folder = exp / "res" / "features2" / NET / "val" / "fc8" / \
        "post_densecrf_W4_XStd49_RStd5_PosW3_PosXStd3"
    assert json.loads((folder / pascal.CRF_RECORD).read_text())["max_iter"] == 1
    records.clear()
    assert pascal.run(_parse(argv + ["--crf-max-iter", "1"])) == 0
    assert any(m.startswith("Step crf:") and "skipped" in m for m in records)
    records.clear()
    assert pascal.run(_parse(argv)) == 0
    assert not any(m.startswith("Step crf:") and "skipped" in m for m in records)
    assert json.loads((folder / pascal.CRF_RECORD).read_text())["max_iter"] == 10


def test_crf_search_problems_are_found_before_any_work(tmp_path):
    exp, data = _make_experiment(tmp_path)
    argv = _argv(exp, data)
    with pytest.raises(PipelineError, match="--search-bi-xy-std: CRF parameter bi_xy_std "
                                            "must be positive"):
        pascal.run(_parse(argv + ["--steps", "test,crf_search", "--search-bi-xy-std",
                                  "0:10:100"]))
    with pytest.raises(PipelineError, match="--eval-set 'val', which the test step of "
                                            "this run does not test"):
        pascal.run(_parse(argv + ["--steps", "test2,crf_search", "--test2-sets",
                                  "trainval"]))
    res = exp / "res" / "features" / NET / "val" / "fc8"
    res.mkdir(parents=True)
    (res / "crf_search.json").write_text('{"best_params": {"bi_w": null}}')
    with pytest.raises(PipelineError, match="crf_search.json: not a crf_search result"):
        pascal.run(_parse(argv + ["--steps", "train,crf"]))
    # every --crf-* flag given: the broken file is not read (the run gets as far as
    # the missing features)
    given = ["--crf-max-iter", "2", "--crf-bi-w", "4", "--crf-bi-xy-std", "49",
             "--crf-bi-rgb-std", "5", "--crf-pos-w", "3", "--crf-pos-xy-std", "3"]
    with pytest.raises(PipelineError, match="crf on 'val': features not found"):
        pascal.run(_parse(argv + ["--steps", "crf"] + given))
