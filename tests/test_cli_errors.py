"""Bad input on the command line and at the file-level entry points: exit status 1 and
one line naming the file, line or flag (no traceback), and no user file overwritten or
left half-written."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import caffelite
from caffelite import cli, pascal
from caffelite.crf import CRFParams
from caffelite.evaluate import (EvalError, EvalItem, evaluate, read_list, voc_palette,
                                write_label_png)
from caffelite.io import image as image_io
from caffelite.io.caffemodel import CaffemodelError, read_caffemodel
from caffelite.io.matfile import write_mat
from caffelite.log import logger
from test_cli import NET as TEMPLATE_NET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NET = TEMPLATE_NET.replace("${NAME}", "n").lstrip()     # test_cli's net, filled in


@pytest.fixture(autouse=True)
def _restore_logger():
    """cli.main points the caffelite logger at stderr; put it back for other tests."""
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    for h in list(logger.handlers):
        if h not in handlers:
            logger.removeHandler(h)
            h.close()
    for h in handlers:
        if h not in logger.handlers:
            logger.addHandler(h)
    logger.setLevel(level)
    logger.propagate = propagate


def _main(capsys, *argv):
    """(exit status, last stderr line) of ``caffelite argv``, run in this process."""
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err)
    return code, err[-1] if err else ""


def _files(directory):
    return sorted(os.listdir(directory))


@pytest.fixture
def net(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    return path


def test_swapped_files_are_named_for_what_they_are(tmp_path, net, capsys):
    """A net given as weights, a solverstate as weights, weights as the model, a solver
    as the model and a net as the solver: each error says what the file seems to be."""
    import caffelite
    from caffelite import cli
    from caffelite.solver import Solver
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{net}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 1\n'
                      f'snapshot_prefix: "{tmp_path}/s"\n')
    s = Solver(str(solver))
    weights, state = s.snapshot()
    cases = [
        (["test", "--model", str(net), "--weights", str(net)],
         "(this is a text file, a prototxt perhaps, not a binary .caffemodel)"),
        (["test", "--model", str(net), "--weights", state],
         "(this looks like a .solverstate: resume from it with --snapshot)"),
        (["test", "--model", weights, "--weights", weights],
         "s_iter_0.caffemodel: a binary file (a .caffemodel or .solverstate perhaps), not "
         "a text prototxt"),
        (["test", "--model", str(solver), "--weights", weights],
         "(this looks like a solver file; a net prototxt is expected here)"),
        (["train", "--solver", str(net)],
         "(this looks like a net prototxt; a solver file is expected here)"),
    ]
    for argv, hint in cases:
        assert cli.main(argv + ["--iterations", "1"] if argv[0] == "test" else argv) == 1
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.endswith(hint), (argv, last)
    with pytest.raises(ValueError, match="a prototxt perhaps"):
        caffelite.Net(str(net), caffelite.TEST, weights=str(net))


def test_a_weights_list_given_to_test_says_test_takes_one_file(net, capsys):
    code, last = _main(capsys, "test", "--model", str(net), "--weights", "a.caffemodel,",
                       "--iterations", "1")
    assert code == 1 and last.endswith(
        "Could not open file 'a.caffemodel,' (No such file or directory) (one weights file "
        "only: train takes a comma-separated list, test and time do not)")


def test_a_phase_given_as_a_string_is_not_taken_for_a_weights_file_silently(net):
    """pycaffe's Net(file, "test") reads "test" as a weights file too; the error says
    what a phase is."""
    with pytest.raises(ValueError, match=r"Could not open file 'test' .*\(a phase is "
                                         r"caffe.TRAIN or caffe.TEST, not a string"):
        caffelite.Net(str(net), "test")


@pytest.mark.parametrize("verb, example", [("train", "-solver s.prototxt"),
                                           ("test", "-model test.prototxt"),
                                           ("time", "-model train.prototxt")])
def test_each_verbs_help_shows_its_own_gflags_spelling(capsys, verb, example):
    with pytest.raises(SystemExit):
        cli.main([verb, "--help"])
    assert f"gflags spelling works too: {example}, -gpu=0" in capsys.readouterr().out


# ----------------------------------------------------------------- flags and logs
def test_errors_of_imported_modules_are_one_line_under_python_m(tmp_path):
    """`python -m caffelite.cli` runs cli.py as __main__; a CliError raised by a module
    that imported caffelite.cli (pascal's -D parsing) is another class object, and
    escaped the handler with a traceback."""
    (tmp_path / "exp").mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("CAFFELITE_TRACEBACK", None)
    out = subprocess.run([sys.executable, "-m", "caffelite.cli", "pascal",
                          str(tmp_path / "exp"), "--net", "x", "--data-root", str(tmp_path),
                          "-D", "oops"], capture_output=True, text=True, env=env)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == \
        "caffelite pascal: error: -D expects NAME=VALUE, got 'oops'"


@pytest.mark.parametrize("value, traceback", [("0", False), ("off", False), ("1", True)])
def test_caffelite_traceback_is_a_switch_like_the_others(monkeypatch, capsys, value,
                                                          traceback):
    from caffelite import cli
    monkeypatch.setenv("CAFFELITE_TRACEBACK", value)
    argv = ["test", "--model", "/nonexistent/net.prototxt", "--weights", "x"]
    if traceback:
        with pytest.raises(ValueError, match="nonexistent"):
            cli.main(argv)
    else:
        assert cli.main(argv) == 1
        assert "caffelite test: error: " in capsys.readouterr().err


@pytest.mark.parametrize("value, emulated", [("", False), ("0", False), ("off", False),
                                             ("no", False), ("1", True), ("yes", True)])
def test_crf_reads_the_emulator_switch_as_gpu_mode_does(monkeypatch, value, emulated):
    from caffelite.crf.device import emulator_requested
    monkeypatch.setenv("CAFFELITE_GPU_EMULATOR", value)
    assert emulator_requested() is emulated


def test_unwritable_log_file_is_one_line(capsys, net, tmp_path):
    missing = tmp_path / "no" / "x.log"
    code, line = _main(capsys, "test", "--model", str(net), "--iterations", "1",
                       "--log", str(missing))
    assert code == 1
    assert line == (f"caffelite test: error: --log: cannot write the log file '{missing}': "
                    f"No such file or directory")
    code, line = _main(capsys, "test", "--model", str(net), "--iterations", "1",
                       "--log", str(tmp_path))
    assert code == 1 and line.endswith(f"'{tmp_path}': Is a directory")


@pytest.mark.parametrize("verb", ["test", "time"])
@pytest.mark.parametrize("count", ["0", "-3"])
def test_iterations_must_be_positive(capsys, net, untrained, verb, count, tmp_path):
    """Caffe divides the summed outputs by --iterations (0: NaN) and times nothing. The
    net is checked first, as Caffe builds it first: the kit's TEST_ITER is 0 when its
    list file is missing, and that is the error to report."""
    weights = ["--weights", str(untrained)] if verb == "test" else []
    code, line = _main(capsys, verb, "--model", str(net), "--iterations", count, *weights)
    assert code == 1
    assert line == f"caffelite {verb}: error: --iterations must be at least 1 (got {count})"
    missing = tmp_path / "missing.prototxt"
    code, line = _main(capsys, verb, "--model", str(missing), "--iterations", count, *weights)
    assert code == 1 and "missing.prototxt" in line and "must be at least" not in line


def test_define_needs_a_name(capsys, net, untrained):
    code, line = _main(capsys, "test", "--model", str(net), "--weights", untrained,
                       "--iterations", "1", "-D", "=3")
    assert code == 1 and line.endswith("-D expects NAME=VALUE, got '=3' (no name)")


def test_file_in_the_way_of_an_output_folder(capsys, tmp_path):
    blocker = tmp_path / "o"
    blocker.write_text("mine")
    code, line = _main(capsys, "demo", "--out", str(blocker), "--iterations", "1")
    assert code == 1
    assert line == f"caffelite demo: error: '{blocker}' exists and is not a directory"
    assert blocker.read_text() == "mine"


def test_demo_never_writes_into_a_folder_of_other_files(capsys, tmp_path):
    """The demo writes data/ and voc_synth/ into --out: a folder holding files it did not
    make is refused; its own folders (marked, or an earlier version's data/ and
    voc_synth/) and new or empty ones are taken."""
    from caffelite.demo.experiment import MARKER, claim_folder
    mine = tmp_path / "mine"
    (mine / "data" / "JPEGImages").mkdir(parents=True)
    (mine / "data" / "JPEGImages" / "x.jpg").write_text("mine")
    code, line = _main(capsys, "demo", "--out", str(mine), "--iterations", "1")
    assert code == 1
    assert line == (f"caffelite demo: error: '{mine}' already holds files that caffelite "
                    f"demo did not make, which its data/ and voc_synth/ folders could "
                    f"overwrite; give a new or empty --out folder")
    assert _files(mine) == ["data"] and _files(mine / "data" / "JPEGImages") == ["x.jpg"]
    for folder in (tmp_path / "new", tmp_path / "empty"):
        if folder.name == "empty":
            folder.mkdir()
        claim_folder(str(folder))
        assert _files(folder) == [MARKER]
        (folder / "data").mkdir()
        claim_folder(str(folder))                          # a later run of the demo
    (mine / "voc_synth" / "config").mkdir(parents=True)
    claim_folder(str(mine))                                # an unmarked earlier demo
    assert _files(mine) == [MARKER, "data", "voc_synth"]


@pytest.mark.parametrize("verb", ["test", "time", "demo"])
def test_gpu_without_cupy_is_one_sentence(capsys, net, tmp_path, monkeypatch, verb,
                                          untrained):
    """Issue 4: without CuPy, --gpu fails with one sentence saying what is missing."""
    from caffelite import backend, kernels
    monkeypatch.delenv("CAFFELITE_GPU_EMULATOR", raising=False)
    monkeypatch.setitem(sys.modules, "cupy", None)          # `import cupy` fails
    monkeypatch.setattr(kernels, "_cupy_checked", [])       # forget a found CuPy
    model = (["--out", str(tmp_path / "demo")] if verb == "demo" else
             ["--model", str(net), "--weights", untrained])
    try:
        code, line = _main(capsys, verb, *model, "--gpu", "0", "--iterations", "1")
    finally:
        backend.set_mode_cpu()
    assert code == 1
    assert line.startswith(f"caffelite {verb}: error: GPU mode needs CuPy, which is not "
                           f"installed") and "pip install" in line
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_out_of_memory_names_the_layer(capsys, net, monkeypatch, direction, untrained):
    """numpy's MemoryError inside a layer becomes one line naming the layer, the pass
    and what needs less memory."""
    from caffelite.layers.inner_product import InnerProductLayer

    def allocate_too_much(*args):
        np.empty(1 << 60, np.float32)          # 4 EiB: numpy refuses at once
    monkeypatch.setattr(InnerProductLayer, direction, allocate_too_much)
    verb = "test" if direction == "forward" else "time"
    code, line = _main(capsys, verb, "--model", str(net), "--weights", untrained,
                       "--iterations", "1")
    assert code == 1
    assert line.startswith(f"caffelite {verb}: error: layer 'ip' (InnerProduct) "
                           f"{direction} ran out of host memory (Unable to allocate ")
    assert line.endswith("A smaller batch_size or crop_size needs less.")


def test_out_of_memory_outside_a_layer_is_one_line(capsys, net, monkeypatch, untrained):
    """A MemoryError outside a layer's pass (here: building the net) is one line too."""
    from caffelite.net import Net

    def allocate_too_much(*args, **kwargs):
        np.empty(1 << 60, np.float32)
    monkeypatch.setattr(Net, "__init__", allocate_too_much)
    code, line = _main(capsys, "test", "--model", str(net), "--weights", untrained,
                       "--iterations", "1")
    assert code == 1
    assert line.startswith("caffelite test: error: out of host memory: Unable to allocate ")


@pytest.mark.parametrize("value, default, expected", [
    (None, True, True), ("", True, True), ("0", True, False), ("false", True, False),
    ("OFF", True, False), (" no ", True, False), ("1", True, True), ("yes", False, True),
    (None, False, False), ("", False, False), ("on", False, True), ("False", False, False)])
def test_environment_switches(monkeypatch, value, default, expected):
    """CAFFELITE_CUDA_GRAPHS, _FUSE, _TAP_GEMM and _GPU_EMULATOR: unset or empty is the
    default; 0, false, off and no in any case turn a switch off."""
    from caffelite.backend import env_flag
    if value is None:
        monkeypatch.delenv("CAFFELITE_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("CAFFELITE_TEST_SWITCH", value)
    assert env_flag("CAFFELITE_TEST_SWITCH", default) is expected


# ----------------------------------------------------------------- models and weights
def test_empty_model_is_an_error_naming_it(capsys, tmp_path, untrained):
    """Caffe would run a net without layers and report a loss of 0."""
    empty = tmp_path / "empty.prototxt"
    empty.write_text("")
    code, line = _main(capsys, "test", "--model", str(empty), "--weights", untrained,
                       "--iterations", "1")
    assert code == 1 and line.startswith(f"caffelite test: error: {empty}: the net has no "
                                         f"layers")


@pytest.mark.parametrize("weights", [None, ""])
def test_test_needs_weights_as_caffes_test(capsys, tmp_path, weights):
    """tools/caffe.cpp's test() stops before building the net without -weights (an
    empty -weights= is what run_pascal.sh passes when no snapshot exists): scoring the
    fillers' weights would let MatWrite overwrite features with them."""
    features = tmp_path / "features"
    features.mkdir()
    net = tmp_path / "net.prototxt"
    net.write_text(NET + f"""
layer {{ name: "w" type: "MatWrite" bottom: "ip"
  mat_write_param {{ prefix: "{features}/" source: "{tmp_path / 'ids.txt'}" }} }}""")
    (tmp_path / "ids.txt").write_text("a\nb\n")
    flags = [] if weights is None else ["--weights", weights]
    code, line = _main(capsys, "test", "--model", str(net), *flags, "--iterations", "1")
    assert code == 1
    assert line == "caffelite test: error: Need model weights to score (--weights " \
                   "model.caffemodel)."
    assert not list(features.iterdir())


def test_empty_weights_file_is_an_error_naming_it(capsys, net, tmp_path):
    """An interrupted download leaves 0 bytes; Caffe would copy nothing and go on with
    the net's random initial weights."""
    empty = tmp_path / "w.caffemodel"
    empty.write_bytes(b"")
    with pytest.raises(CaffemodelError, match=r"w\.caffemodel: the file is empty"):
        read_caffemodel(str(empty))
    code, line = _main(capsys, "test", "--model", str(net), "--weights", str(empty),
                       "--iterations", "1")
    assert code == 1 and line.endswith(f"{empty}: the file is empty (0 bytes), not a "
                                       f"caffemodel")


def test_upgrade_never_overwrites_its_input(capsys, tmp_path, monkeypatch):
    src = tmp_path / "v1.prototxt"
    text = '# my notes\nname: "v1"\nlayers { name: "r" type: RELU bottom: "x" top: "x" }\n'
    src.write_text(text)
    monkeypatch.chdir(tmp_path)
    code, line = _main(capsys, "upgrade", str(src), "./v1.prototxt")
    assert code == 1 and "'./v1.prototxt' is the input file" in line
    assert src.read_text() == text


def test_upgrade_into_a_directory_is_one_line(capsys, tmp_path):
    src = tmp_path / "v1.prototxt"
    src.write_text('name: "v1"\n')
    (tmp_path / "out").mkdir()
    code, line = _main(capsys, "upgrade", str(src), str(tmp_path / "out"))
    assert code == 1
    assert line == (f"caffelite upgrade: error: cannot write '{tmp_path / 'out'}': it is a "
                    f"directory")
    assert _files(tmp_path) == ["out", "v1.prototxt"]          # no temporary left behind


# ----------------------------------------------------------------- eval
def _png(path, label, mode=None):
    Image.fromarray(label, mode).save(path) if mode else Image.fromarray(label).save(path)


@pytest.fixture
def seg(tmp_path):
    """One 2x3 image 'a' with 3 classes: GT, prediction and features."""
    d = {k: tmp_path / k for k in ("gt", "pred", "feat")}
    for p in d.values():
        p.mkdir()
    gt = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    _png(d["gt"] / "a.png", gt)
    _png(d["pred"] / "a.png", gt)
    scores = np.zeros((1, 3, 2, 3), np.float32)
    for c in range(3):
        scores[0, c][gt == c] = 1
    write_mat(str(d["feat"] / "a_blob_0.mat"), scores)
    (tmp_path / "ids.txt").write_text("a\n")
    d["root"] = tmp_path
    return d


def _item(seg):
    return [EvalItem("a", str(seg["gt"] / "a.png"))]


def test_list_with_bom_crlf_and_blank_lines(tmp_path):
    """Lists edited on Windows: the BOM is not part of the first id."""
    listing = tmp_path / "l.txt"
    listing.write_bytes(b"\xef\xbb\xbfa\r\n\r\n  \r\nb c\r\n")
    assert [line.id for line in read_list(str(listing))] == ["a", "b"]


def test_list_that_is_not_utf8_names_the_line(tmp_path):
    listing = tmp_path / "l.txt"
    listing.write_bytes(b"a\nb\n\xffc\n")
    with pytest.raises(EvalError, match=r"l\.txt:3: the list is not UTF-8 text \(byte 0xff\)"):
        read_list(str(listing))


def test_out_of_range_gt_label_names_the_gt_file(seg):
    gt = np.array([[0, 1, 2], [2, 7, 0]], np.uint8)
    _png(seg["gt"] / "a.png", gt)
    for source in ({"feature_dir": str(seg["feat"])}, {"pred_dir": str(seg["pred"])}):
        with pytest.raises(EvalError, match=rf"^{seg['gt'] / 'a.png'}: ground-truth label 7 "
                                            rf"is outside \[0, 3\)"):
            evaluate(_item(seg), 3, **source)


def test_colour_gt_is_refused(seg):
    """MATLAB's imread gives an H x W x 3 array for a colour PNG, which MyVOCevalseg
    cannot count; its gray luminance is no label map either."""
    gt = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    _png(seg["gt"] / "a.png", np.dstack([gt, gt, gt, np.full_like(gt, 255)]))
    with pytest.raises(EvalError, match=r"a\.png: a RGBA image is not a label map"):
        evaluate(_item(seg), 3, pred_dir=str(seg["pred"]))


def test_16bit_label_maps_are_read_in_full_like_matlab_imread(seg):
    """MATLAB's imread returns a 16-bit PNG's values; cv::imread's high byte would have
    read labels 0..2 as 0 and scored a perfect prediction as wrong."""
    import cv2
    gt = np.array([[0, 1, 2], [2, 1, 0]], np.uint16)
    pred = np.array([[0, 1, 2], [1, 1, 0]], np.uint16)
    _png(seg["gt"] / "a.png", gt)
    _png(seg["pred"] / "a.png", pred)
    stored = cv2.imread(str(seg["gt"] / "a.png"), cv2.IMREAD_UNCHANGED)
    assert stored.dtype == np.uint16 and stored.tolist() == gt.tolist()
    result = evaluate(_item(seg), 3, pred_dir=str(seg["pred"]))
    # rows GT, columns prediction, by hand: (0,0) x2, (1,1) x2, (2,2), (2,1)
    assert result.confusion.tolist() == [[2, 0, 0], [0, 2, 0], [0, 1, 1]]
    _png(seg["gt"] / "a.png", np.full((2, 3), 300, np.uint16))
    with pytest.raises(EvalError, match=r"a\.png: ground-truth label 300 is outside"):
        evaluate(_item(seg), 3, pred_dir=str(seg["pred"]))


def test_more_labels_than_a_png_holds(seg):
    with pytest.raises(EvalError, match=r"300 labels do not fit the 8-bit label PNGs"):
        evaluate(_item(seg), 300, feature_dir=str(seg["feat"]))


def test_eval_output_paths_are_checked_before_any_work(capsys, seg):
    base = ["eval", "--gt", str(seg["gt"]), "--list", str(seg["root"] / "ids.txt"),
            "--features", str(seg["feat"]), "--num-labels", "3"]
    before = _files(seg["root"])
    missing = seg["root"] / "no" / "r.json"
    code, line = _main(capsys, *base, "--json", str(missing))
    assert code == 1 and line.endswith(f"--json: cannot write '{missing}': directory "
                                       f"'{missing.parent}' does not exist")
    code, line = _main(capsys, *base, "--json", str(seg["gt"]))
    assert code == 1 and line.endswith(f"--json: '{seg['gt']}' is a directory")
    code, line = _main(capsys, *base, "--vis", str(seg["root"] / "ids.txt"))
    assert code == 1 and line.endswith("ids.txt' exists and is not a directory")
    assert _files(seg["root"]) == before
    assert _files(seg["gt"]) == ["a.png"]


def test_eval_outputs_never_overwrite_its_inputs(capsys, seg):
    """--vis into the ground-truth (or prediction) folder would replace the ground truth
    with the predictions; --json onto the list or a ground-truth file would replace it."""
    ids = seg["root"] / "ids.txt"
    base = ["eval", "--gt", str(seg["gt"]), "--list", str(ids), "--num-labels", "3"]
    gt_bytes, list_text = (seg["gt"] / "a.png").read_bytes(), ids.read_text()
    for flag, output, source, what in [
            ("--vis", seg["gt"], "--features", "is the --gt input"),
            ("--vis", seg["pred"], "--pred", "is the --pred input"),
            ("--json", ids, "--features", "is the --list input"),
            ("--json", seg["gt"] / "a.png", "--features", "is a file in the --gt folder")]:
        folder = seg["feat"] if source == "--features" else seg["pred"]
        code, line = _main(capsys, *base, source, str(folder), flag, str(output))
        assert code == 1
        assert line == (f"caffelite eval: error: {flag}: '{output}' {what}; write {flag} "
                        f"elsewhere (it would be overwritten)")
    assert (seg["gt"] / "a.png").read_bytes() == gt_bytes and ids.read_text() == list_text
    code, _ = _main(capsys, *base, "--features", str(seg["feat"]), "--json",
                    str(seg["gt"] / "scores.json"))        # a new file there is fine
    assert code == 0


def test_label_png_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails half-way (disk full, ^C) must leave the previous file: a
    truncated PNG newer than its features would make `pascal` skip the CRF step."""
    from PIL import PngImagePlugin
    target = tmp_path / "a.png"
    target.write_bytes(b"previous labels")
    real_save = PngImagePlugin._save

    def failing_save(im, fp, filename, *args, **kwargs):
        real_save(im, fp, filename, *args, **kwargs)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(PngImagePlugin, "_save", failing_save)
    monkeypatch.setitem(Image.SAVE, "PNG", failing_save)
    with pytest.raises(OSError, match="No space left"):
        write_label_png(str(target), np.zeros((4, 5), np.uint8))
    assert target.read_bytes() == b"previous labels"
    assert _files(tmp_path) == ["a.png"]
    monkeypatch.undo()
    write_label_png(str(target), np.array([[1, 2]], np.uint8))
    with Image.open(target) as img:
        assert img.mode == "P" and np.asarray(img).tolist() == [[1, 2]]
        assert img.getpalette()[:9] == voc_palette(3)


# ----------------------------------------------------------------- crf
@pytest.fixture
def crf_case(tmp_path):
    feats, imgs = tmp_path / "feat", tmp_path / "img"
    feats.mkdir()
    imgs.mkdir()
    Image.fromarray(np.full((4, 5, 3), 90, np.uint8)).save(imgs / "a.jpg")
    write_mat(str(feats / "a_blob_0.mat"), np.zeros((1, 3, 6, 6), np.float32))
    (tmp_path / "ids.txt").write_text("a\n")
    return ["crf", "--features", str(feats), "--images", str(imgs), "--list",
            str(tmp_path / "ids.txt"), "--max_iter", "1"], tmp_path


def test_crf_nan_features_name_the_file(capsys, crf_case):
    argv, root = crf_case
    scores = np.zeros((1, 3, 6, 6), np.float32)
    scores[0, 1, 3, 2] = np.nan
    write_mat(str(root / "feat" / "a_blob_0.mat"), scores)
    code, line = _main(capsys, *argv, "--out", str(root / "out"))
    assert code == 1
    assert line == (f"caffelite crf: error: {root / 'feat' / 'a_blob_0.mat'}: the features "
                    f"contain NaN or infinity within the image's 4x5 area")


def test_crf_output_in_the_way(capsys, crf_case):
    argv, root = crf_case
    (root / "out").write_text("mine")
    code, line = _main(capsys, *argv, "--out", str(root / "out"))
    assert code == 1 and line.endswith(f"--out: '{root / 'out'}' exists and is not a "
                                       f"directory")
    assert (root / "out").read_text() == "mine"
    os.remove(root / "out")
    (root / "out" / "a.png").mkdir(parents=True)
    code, line = _main(capsys, *argv, "--out", str(root / "out"))
    assert code == 1
    assert line == (f"caffelite crf: error: 'a' ({root / 'feat' / 'a_blob_0.mat'}): cannot "
                    f"write '{root / 'out' / 'a.png'}': it is a directory")


def test_crf_out_is_never_an_input_folder(capsys, crf_case):
    argv, root = crf_case
    Image.fromarray(np.full((4, 5, 3), 90, np.uint8)).save(root / "img" / "a.png")
    before = (root / "img" / "a.png").read_bytes()
    code, line = _main(capsys, *argv, "--out", str(root / "img"))
    assert code == 1
    assert line == (f"caffelite crf: error: --out: '{root / 'img'}' is the --images input; "
                    f"write --out elsewhere (it would be overwritten)")
    assert (root / "img" / "a.png").read_bytes() == before


def test_log_is_never_one_of_the_commands_input_files(capsys, net, tmp_path, untrained):
    """--log appends: onto the model, weights or list, that would damage them."""
    model_text, weights = net.read_text(), open(untrained, "rb").read()
    for flag, path in (("--model", str(net)), ("--weights", untrained)):
        code, line = _main(capsys, "test", "--model", str(net), "--weights", untrained,
                           "--iterations", "1", "--log", path)
        assert code == 1
        assert line == (f"caffelite test: error: --log: '{path}' is the {flag} input; write "
                        f"the log elsewhere (it would be appended to)")
    assert net.read_text() == model_text and open(untrained, "rb").read() == weights
    log = tmp_path / "test.log"
    log.write_text("an earlier run\n")
    code, _ = _main(capsys, "test", "--model", str(net), "--weights", untrained,
                    "--iterations", "1", "--log", str(log))
    assert code == 0 and log.read_text().startswith("an earlier run\n")


def test_ctrl_c_is_one_line(capsys, net, untrained, monkeypatch):
    """SIGINT outside training (whose solver handles it as Caffe's) stops the command
    with one line and the shell's status for it."""
    from caffelite.net import Net

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(Net, "forward_from_to", interrupted)
    code, line = _main(capsys, "test", "--model", str(net), "--weights", untrained,
                       "--iterations", "1")
    assert (code, line) == (130, "caffelite test: interrupted")


@pytest.mark.parametrize("name, value", [("pos_w", float("nan")), ("bi_w", float("inf")),
                                         ("bi_xy_std", float("inf")),
                                         ("pos_y_std", float("nan"))])
def test_crf_parameters_must_be_finite(name, value):
    with pytest.raises(ValueError, match=rf"CRF parameter {name} must be"):
        CRFParams(**{name: value})


def test_pascal_bad_gpu_flag_names_it(tmp_path):
    (tmp_path / "exp").mkdir()
    with pytest.raises(ValueError, match=r"--gpu expects a device id.*got 'abc'"):
        pascal.Pipeline(tmp_path / "exp", "x", data_root=str(tmp_path), gpu="abc")


def test_pascal_crf_checks_the_class_count(crf_case):
    """The pipeline's CRF step applies `caffelite crf`'s checks: features with another
    class count than --num-labels used to be refined into labels silently."""
    _, root = crf_case
    (root / "out").mkdir()
    items = [EvalItem("a", str(root / "gt.png"), str(root / "img" / "a.jpg"))]
    with pytest.raises(ValueError, match=r"a_blob_0\.mat: features have 3 channels but 21 "
                                         r"labels were expected \(--num-labels\)"):
        pascal.run_crf(str(root / "feat"), items, str(root / "out"), pascal.CRF_DEFAULTS, 21)
    assert _files(root / "out") == []


# ----------------------------------------------------------------- data layers
def test_16bit_training_label_warns_and_reads_the_high_byte(tmp_path):
    """Data layers keep the fork's cv::imread(GRAYSCALE) (high byte) but say so once."""
    import cv2
    values = np.array([[0x0203, 0x00ff], [0xff00, 5]], np.uint16)
    path = tmp_path / "l.png"
    _png(path, values)
    messages = []

    class Records(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())
    handler = Records(logging.WARNING)
    logger.addHandler(handler)
    old = image_io._deep_label_warned[0]
    image_io._deep_label_warned[0] = False
    try:
        got = image_io.read_label(str(path))
        image_io.read_label(str(path))
    finally:
        logger.removeHandler(handler)
        image_io._deep_label_warned[0] = old
    assert got.tolist() == cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).tolist()
    assert got.tolist() == [[2, 0], [255, 0]]
    assert len(messages) == 1 and "16-bit PNG" in messages[0] and str(path) in messages[0]


@pytest.mark.parametrize("argv, unknown", [
    (["train", "-solvr", "s.prototxt"], "-solvr s.prototxt"),      # as typed (gflags)
    (["test", "--weights", "w.caffemodel", "-modle", "m.prototxt"], "-modle m.prototxt"),
    (["test", "--weights", "w.caffemodel", "--iteration=3"], "--iteration=3"),
    (["train", "-shuffle=false", "--solvr", "-solvr"], "-shuffle=false --solvr -solvr"),
    (["eval", "--gt", "gt", "--lisst", "l.txt"], "--lisst l.txt"),
])
def test_a_mistyped_flag_is_reported_before_a_missing_required_one(argv, unknown, capsys):
    """Also as the verb's usage, and whole names only (gflags takes no abbreviation)."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"caffelite {argv[0]}: error: unrecognized arguments: {unknown}" in err
    assert err.startswith(f"usage: caffelite {argv[0]} ")
    assert "are required" not in err


def test_a_missing_required_flag_is_still_named(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--weights", "w.caffemodel"])
    assert e.value.code == 2
    assert "the following arguments are required: --solver" in capsys.readouterr().err


@pytest.mark.parametrize("level, shown", [("2", False), ("1", True), (None, True)])
def test_glog_minloglevel_set_before_import_quiets_a_scripts_warnings(level, shown):
    """pycaffe's idiom: os.environ['GLOG_minloglevel'] = '2' before `import caffe`
    silences warnings, as glog reads the variable when it loads."""
    script = ("import os\n"
              + (f"os.environ['GLOG_minloglevel'] = '{level}'\n" if level else "")
              + "import caffelite as caffe\ncaffe.Timer().ms\n")
    env = {k: v for k, v in os.environ.items() if k != "GLOG_minloglevel"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert ("Timer has never been run before reading time." in run.stderr) == shown


def test_glog_minloglevel_zero_before_import_does_not_open_debug_lines():
    """GLOG_minloglevel=0 is glog's default: caffelite's own DEBUG lines (which Caffe
    does not have) stay out of a script's logging at INFO."""
    script = ("import os, logging\nos.environ['GLOG_minloglevel'] = '0'\n"
              "import caffelite\nprint(logging.getLogger('caffelite').level)\n")
    env = {k: v for k, v in os.environ.items() if k != "GLOG_minloglevel"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) == logging.INFO
