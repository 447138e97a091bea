"""Pinned behaviours of the Caffe verbs (``test``, ``time``, ``train``) and pycaffe helpers
that mutation testing found unguarded.  The expected values come from the real BVLC
Caffe 1.0 ``caffe`` binary (the oracle's env.sh puts it on PATH; those cases skip
without it) or from the input files and tools/caffe.cpp's own arithmetic:

* ``caffe test``: "Running for N iterations." (N defaults to 50), one "Batch i, name =
  v" line per output element with i from 0, "Loss: " the mean, then each output's mean
  with its loss weight;
* ``caffe time``: the net in phase TRAIN unless -phase says otherwise, "Iteration: j"
  with j from 1, the per-layer lines ``std::setw(10) << name << "\\tforward: "``, and
  "Average Forward pass" / "Average Backward pass" = the per-layer sums divided by the
  iterations (forward_time / 1000 / FLAGS_iterations; each layer's line is its own
  time / 1000 / FLAGS_iterations, so the pass is the sum of the layer lines);
* ``caffe train -weights a,b``: caffe.cpp's CopyLayers splits the list at ',' and copies
  every file's layers into the net (the later file wins for a layer both hold);
* run_pascal.sh's test #2 model choice, prog_refine_pascal_v4's flags, atoi/atof and
  PPM images (spec deeplab_v2_semantics.md sections 17 and 20);
* pycaffe's Transformer.deprocess undoing preprocess (io.py's argsort of the swap).
"""
import os
import re

import numpy as np
import pytest

from test_bvlc_tools_oracle import ENV_SH, bvlc, caffelite
needs_bvlc = pytest.mark.skipif(
    not ENV_SH or not os.path.isfile(ENV_SH),
    reason="set CAFFELITE_BVLC_PYCAFFE (scripts/bvlc_caffe_oracle.py); its env.sh puts "
           "BVLC's caffe binary on PATH")

# message of a glog line from caffe.cpp (BVLC) or cli.py (caffelite)
VERB_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ (?:caffe\.cpp|cli\.py):\d+\] (.*)$", re.M)

NET = '''name: "n"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 2 dim: 3 dim: 2 dim: 2 } shape { dim: 2 }
    data_filler { type: "constant" value: 0.5 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "constant" value: 0.1 }
    bias_filler { type: "constant" value: 0.2 } } }
layer { name: "drop" type: "Dropout" bottom: "ip" top: "ip" include { phase: TRAIN } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss"
  loss_weight: 2 }
layer { name: "pw" type: "Power" bottom: "ip" top: "pw" power_param { shift: 0.25 } }
'''


def _verb_messages(log, first):
    """caffe.cpp's (cli.py's) messages from the first one starting with ``first``."""
    messages = VERB_LINE.findall(log)
    starts = [i for i, m in enumerate(messages) if m.startswith(first)]
    assert starts, log[-2000:]
    return messages[starts[0]:]


def _empty_caffemodel(path):
    from caffelite.proto import caffe_pb2
    model = caffe_pb2.NetParameter(name="none")
    model.layer.add(name="unrelated")
    path.write_bytes(model.SerializeToString())
    return path


@needs_bvlc
def test_caffe_test_default_iterations_and_log_lines_match_bvlc(tmp_path):
    """No -iterations: 50 batches, "Batch 0" .. "Batch 49" per output element, the loss mean and
    the output means with the loss weight, as BVLC's caffe test logs them."""
    (tmp_path / "net.prototxt").write_text(NET)
    weights = _empty_caffemodel(tmp_path / "w.caffemodel")
    args = ("test", "-model", "net.prototxt", "-weights", weights.name)
    theirs_rc, theirs = bvlc("caffe", *args, cwd=tmp_path)
    ours_rc, ours = caffelite(*args, cwd=tmp_path)
    assert theirs_rc == 0, theirs[-2000:]
    assert ours_rc == 0, ours[-2000:]
    expected = _verb_messages(theirs, "Running for")
    assert expected[0] == "Running for 50 iterations."
    assert "Batch 49, pw = 1.05" in expected and not any(
        m.startswith("Batch 50,") for m in expected)
    assert _verb_messages(ours, "Running for") == expected


def _time_skeleton(log):
    """The benchmark's messages with the timings (which differ run to run) masked."""
    messages = _verb_messages(log, "*** Benchmark begins ***")
    return [re.sub(r"-?\d[\d.e+-]* ms\.", "# ms.", m) for m in messages]


@needs_bvlc
@pytest.mark.parametrize("phase", [None, "TEST"])
def test_caffe_time_lines_and_phase_match_bvlc(tmp_path, phase):
    """The benchmark's lines as BVLC's: the default phase is TRAIN (the Dropout layer is
    timed), iterations numbered from 1, each layer's name right-aligned to 10 columns."""
    (tmp_path / "net.prototxt").write_text(NET)
    args = ("time", "-model", "net.prototxt", "-iterations", "3") + (
        ("-phase", phase) if phase else ())
    theirs_rc, theirs = bvlc("caffe", *args, cwd=tmp_path)
    ours_rc, ours = caffelite(*args, cwd=tmp_path)
    assert theirs_rc == 0, theirs[-2000:]
    assert ours_rc == 0, ours[-2000:]
    expected = _time_skeleton(theirs)
    assert ("      drop\tforward: # ms." in expected) == (phase is None)
    assert "Iteration: 3 forward-backward time: # ms." in expected
    assert _time_skeleton(ours) == expected


@needs_bvlc
def test_caffe_time_lower_case_phase_is_the_upper_case_one(tmp_path):
    """caffelite takes -phase train/test as TRAIN/TEST (caffe.cpp only the upper case):
    the layers timed are those BVLC times for -phase TRAIN."""
    (tmp_path / "net.prototxt").write_text(NET)
    _, theirs = bvlc("caffe", "time", "-model", "net.prototxt", "-iterations", "1",
                     "-phase", "TRAIN", cwd=tmp_path)
    rc, ours = caffelite("time", "-model", "net.prototxt", "-iterations", "1",
                         "-phase", "train", cwd=tmp_path)
    assert rc == 0, ours[-2000:]
    assert _time_skeleton(ours) == _time_skeleton(theirs)


def test_caffe_time_averages_are_the_layer_sums_over_the_iterations(tmp_path):
    """caffe.cpp: forward_time (the sum of every layer's forward timer) / 1000 /
    iterations; each layer's line is its timer / 1000 / iterations: so the average pass
    is the sum of the per-layer lines (to the %g digits)."""
    (tmp_path / "net.prototxt").write_text(NET)
    rc, ours = caffelite("time", "-model", "net.prototxt", "-iterations", "4",
                         cwd=tmp_path)
    assert rc == 0, ours[-2000:]
    for kind, average in (("forward", "Forward"), ("backward", "Backward")):
        layers = [float(v) for v in re.findall(
            rf"\] +\S+\t{kind}: ([\d.e+-]+) ms\.$", ours, re.M)]
        assert len(layers) >= 5, ours[-2000:]
        total = float(re.search(rf"\] Average {average} pass: ([\d.e+-]+) ms\.$", ours,
                                re.M).group(1))
        assert total == pytest.approx(sum(layers), rel=1e-4, abs=1e-5 * len(layers))


TWO_LAYERS = '''name: "two"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 1 dim: 2 } shape { dim: 1 }
    data_filler { type: "constant" value: 1 } data_filler { type: "constant" value: 0 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 2 weight_filler { type: "constant" value: 7 } } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 2 weight_filler { type: "constant" value: 7 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
'''


def _caffemodel(path, layer, weight, bias):
    from caffelite.proto import caffe_pb2
    model = caffe_pb2.NetParameter(name="part")
    lp = model.layer.add(name=layer, type="InnerProduct")
    for values in (weight, bias):
        blob = lp.blobs.add()
        blob.shape.dim.extend(np.shape(values))
        blob.data.extend(np.asarray(values, dtype=np.float32).ravel().tolist())
    path.write_bytes(model.SerializeToString())


def _snapshot_blobs(path):
    from caffelite.proto import caffe_pb2
    model = caffe_pb2.NetParameter()
    model.ParseFromString(path.read_bytes())
    return {lp.name: [np.array(b.data, dtype=np.float32) for b in lp.blobs]
            for lp in model.layer}


def test_train_weights_list_copies_every_file(tmp_path):
    """caffe train -weights a,b: each file's layers are copied (caffe.cpp CopyLayers,
    boost::split at ','); with base_lr 0 the final snapshot holds them unchanged."""
    (tmp_path / "net.prototxt").write_text(TWO_LAYERS)
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt"\nbase_lr: 0\nlr_policy: "fixed"\nmax_iter: 1\n'
        'snapshot_prefix: "snap"\nsolver_mode: CPU\n')
    w1, b1 = [[1, 2], [3, 4]], [0.5, -0.5]
    w2, b2 = [[-1, 5], [6, -2]], [0.25, 0.75]
    _caffemodel(tmp_path / "a.caffemodel", "ip1", w1, b1)
    _caffemodel(tmp_path / "b.caffemodel", "ip2", w2, b2)
    rc, log = caffelite("train", "-solver", "solver.prototxt",
                        "-weights", "a.caffemodel,b.caffemodel", cwd=tmp_path)
    assert rc == 0, log[-2000:]
    blobs = _snapshot_blobs(tmp_path / "snap_iter_1.caffemodel")
    np.testing.assert_array_equal(blobs["ip1"][0], np.ravel(w1))
    np.testing.assert_array_equal(blobs["ip1"][1], b1)
    np.testing.assert_array_equal(blobs["ip2"][0], np.ravel(w2))
    np.testing.assert_array_equal(blobs["ip2"][1], b2)


def test_pascal_test2_takes_the_newest_train2_snapshot_not_train(tmp_path):
    """run_pascal.sh's test #2: MODEL = test2.caffemodel, else the newest
    ``train2_iter_*.caffemodel`` (``ls -t``): a train #1 snapshot is never used, however
    new (spec deeplab_v2_semantics.md section 17, Test #2)."""
    from caffelite import pascal
    from test_pascal import NET as PASCAL_NET, _argv, _make_experiment, _parse
    exp, data = _make_experiment(tmp_path)
    models = exp / "model" / PASCAL_NET
    models.mkdir(parents=True, exist_ok=True)
    (models / "train_iter_5.caffemodel").write_bytes(b"")
    with pytest.raises(pascal.PipelineError,
                       match=r"test2 on 'val': no model: neither \S*test2\.caffemodel nor "
                             r"a train2_iter_\*"):
        pascal.run(_parse(_argv(exp, data) + ["--steps", "test2"]))


@pytest.mark.parametrize("order", ["as_run_densecrf", "reversed"])
def test_refine_pascal_v4_maps_every_flag_to_its_own_parameter(order):
    """prog_refine_pascal_v4's flags (spec deeplab_v2_semantics.md section 20): -i
    iterations, -px/-py positional x/y std, -pw positional weight, -bx/-by bilateral x/y
    std, -br/-bg/-bb bilateral R/G/B std, -bw bilateral weight.  Every value distinct
    (and none a default), so no flag can stand in for another; in either order."""
    from caffelite.crf import refine_cli
    from caffelite.crf.densecrf import CRFParams
    pairs = [("-i", "7"), ("-px", "1.5"), ("-py", "2.5"), ("-pw", "6"), ("-bx", "41"),
             ("-by", "43"), ("-br", "11"), ("-bg", "12"), ("-bb", "13"), ("-bw", "9")]
    if order == "reversed":
        pairs.reverse()
    words = ["-id", "i", "-fd", "f", "-sd", "s"] + [w for pair in pairs for w in pair]
    dirs, params = refine_cli.parse_words(words)
    assert dirs == {"images": "i", "features": "f", "out": "s"}
    assert params == CRFParams(bi_w=9, bi_xy_std=41, bi_rgb_std=11, pos_w=6, pos_xy_std=1.5,
                               max_iter=7, pos_y_std=2.5, bi_y_std=43, bi_g_std=12,
                               bi_b_std=13)


def test_refine_pascal_v4_reads_the_ppm_when_other_formats_are_beside_it(tmp_path):
    """The program reads only ``<-id>/<name>.ppm`` (spec section 20, "PPM only"): where
    run_densecrf.sh's SaveJpgToPPM.m left the PPM beside the JPEG, the PPM is the one."""
    from caffelite.crf import refine_cli
    from caffelite.crf.densecrf import CRFParams
    feats, imgs = tmp_path / "f", tmp_path / "i"
    feats.mkdir()
    imgs.mkdir()
    (feats / "2007_000033_blob_0.mat").write_bytes(b"")   # only its name is read here
    for ext in (".jpg", ".png", ".ppm"):
        (imgs / f"2007_000033{ext}").write_bytes(b"")
    tasks = refine_cli.refine_tasks(str(feats), str(imgs), str(tmp_path / "s"), CRFParams())
    assert [t[0] for t in tasks] == ["2007_000033"]
    assert tasks[0][2] == str(imgs / "2007_000033.ppm")
    assert tasks[0][4] == str(tmp_path / "s" / "2007_000033.bin")


def test_refine_pascal_v4_numbers_are_read_as_atoi_and_atof(tmp_path):
    """atoi/atof (strtol/strtod) skip leading white space and stop at the first
    character that cannot continue the number (C standard 7.22.1)."""
    from caffelite.crf import refine_cli
    words = ["-id", "i", "-fd", "f", "-sd", "s", "-i", " \t8", "-bx", "\n 49.5",
             "-pw", " 2e1x", "-bw", "+3.", "-br", " .5"]
    params = refine_cli.parse_words(words)[1]
    assert (params.max_iter, params.bi_xy_std, params.pos_w, params.bi_w,
            params.bi_rgb_std) == (8, 49.5, 20.0, 3.0, 0.5)


def test_transformer_deprocess_inverts_a_channel_swap_that_is_not_its_own_inverse():
    """pycaffe's deprocess undoes preprocess (io.py: input_scale, mean, raw_scale, then
    ``decaf_in[np.argsort(channel_swap)]`` and the inverse transpose): a round trip
    gives the image back.  The swap (1, 2, 0) is not its own inverse, as (2, 1, 0) is."""
    from caffelite import io as cio
    rs = np.random.RandomState(5)
    image = rs.rand(4, 5, 3).astype(np.float32)
    t = cio.Transformer({"data": (1, 3, 4, 5)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (1, 2, 0))
    t.set_raw_scale("data", 255.0)
    t.set_mean("data", np.array([10.0, 20.0, 30.0], dtype=np.float32))
    t.set_input_scale("data", 0.5)
    x = t.preprocess("data", image)
    # by hand: channel c of x is image channel swap[c], scaled, mean-subtracted, scaled
    for c, source in enumerate((1, 2, 0)):
        np.testing.assert_allclose(x[c], (image[:, :, source] * 255 - (10, 20, 30)[c]) * 0.5,
                                   rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(t.deprocess("data", x), image, rtol=1e-5, atol=1e-5)


def test_caffe_test_loss_line_sums_the_batch_losses_in_float(tmp_path):
    """tools/caffe.cpp test(): ``float loss = 0; loss += iter_loss; ... loss /=
    FLAGS_iterations``: 1000 batch losses of 0.7f summed in float mean 0.700007 (in
    double they would mean 0.7)."""
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "d" type: "DummyData" top: "c" dummy_data_param {\n'
        '  shape { dim: 1 } data_filler { type: "constant" value: 0.7 } } }\n'
        'layer { name: "w" type: "Power" bottom: "c" top: "w" loss_weight: 1 }\n')
    weights = _empty_caffemodel(tmp_path / "w.caffemodel")
    total = np.float32(0)
    for _ in range(1000):
        total = np.float32(total + np.float32(0.7))
    expected = "%g" % (total / np.float32(1000))
    assert expected == "0.700007"
    rc, log = caffelite("test", "-model", "net.prototxt", "-weights", weights.name,
                        "-iterations", "1000", cwd=tmp_path)
    assert rc == 0, log[-2000:]
    assert _verb_messages(log, "Loss: ")[0] == "Loss: " + expected
