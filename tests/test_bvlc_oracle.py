"""caffelite against the real BVLC Caffe 1.0, run through its own pycaffe.

Set CAFFELITE_BVLC_PYCAFFE to the launcher that scripts/bvlc_caffe_oracle.py writes
(Debian bullseye's CPU build of BVLC Caffe, git 99bd997 of 2018-08-21, Python 3.9);
without it these tests skip.  Every case builds a small net in caffelite, gives its
parameters random values, writes them as a caffemodel and feeds random inputs and top
gradients; tests/oracles/bvlc_pycaffe_runner.py runs the same files through Caffe.  The
forward values, every blob's gradient and every parameter gradient are compared; in a
deep net, a ReLU input within rounding of 0 may go different ways on the two sides
(a kink), and then the gradients the backward computes after it are not compared.

BVLC of 2018 is not the DeepLab fork (BVLC of early 2016 plus its own layers), so the
cases hold layers whose semantics did not change between the two.  Besides the few nets
here, tests/oracles/bvlc_layer_cases.py holds some 250 single-layer cases; the oracle
runs every case it should accept in one process (and falls back to one process per case
when a failed CHECK ends it), and each case it should refuse in a process of its own.
"""
import importlib.util
import os
import re
import subprocess
import zlib

import numpy as np
import pytest

import caffelite as caffe
from caffelite import caffe_rng
from caffelite.layer import LayerError
from caffelite.net import NetError

HERE = os.path.dirname(os.path.abspath(__file__))
PYCAFFE = os.environ.get("CAFFELITE_BVLC_PYCAFFE")
pytestmark = pytest.mark.skipif(
    not PYCAFFE, reason="set CAFFELITE_BVLC_PYCAFFE (scripts/bvlc_caffe_oracle.py)")

TRAIN, TEST = 0, 1


def _load_oracle_module(name):
    """A module of tests/oracles (a folder of files, not a package)."""
    path = os.path.join(HERE, "oracles", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_layer_cases():
    return _load_oracle_module("bvlc_layer_cases").CASES


# the runner's net_arrays, loaded once (the runner imports caffe only when it runs)
_net_arrays = _load_oracle_module("bvlc_pycaffe_runner").net_arrays


def _input(name, *shape):
    dims = " ".join(f"dim: {d}" for d in shape)
    return (f'layer {{ name: "{name}" type: "Input" top: "{name}" '
            f'input_param {{ shape {{ {dims} }} }} }}\n')


def _layer(name, kind, bottoms, tops, params=""):
    b = " ".join(f'bottom: "{x}"' for x in bottoms)
    t = " ".join(f'top: "{x}"' for x in tops)
    return f'layer {{ name: "{name}" type: "{kind}" {b} {t} {params} }}\n'


def _normal(shape):
    return ("normal", shape)


def _labels(shape, classes, ignore=None):
    return ("labels", shape, classes, ignore)


def _seed(seed):
    """Seed Caffe's generator as the runner does just before it builds the net, so the
    fillers and then Dropout draw the same numbers on both sides."""
    if seed >= 0:
        caffe.set_random_seed(seed)


@pytest.fixture(autouse=True, scope="module")
def _boost_of_the_oracle():
    """The oracle's Caffe links Boost 1.74, whose normal generator is the 2016 ziggurat;
    it draws a different number of words than the fork era's, which moves every later
    draw (Dropout masks) of the same seed."""
    caffe_rng.set_normal_algorithm("ziggurat-2016")
    yield
    caffe_rng.set_normal_algorithm(None)


class Case:
    """A net, how to fill its inputs, which tops get gradients (None: every output no loss
    layer writes), whether to run the backward, and whether the two must agree bit for
    bit (no reductions whose order may differ)."""

    refused, backward, nans, params = False, True, False, {}

    def __init__(self, name, layers, inputs, diffs=(), phase=TRAIN, exact=False, seed=-1,
                 force_backward=True):
        self.name, self.inputs, self.diffs = name, inputs, diffs
        self.phase, self.exact, self.seed = phase, exact, seed
        self.text = f"force_backward: {str(force_backward).lower()}\n" + "".join(
            _input(blob, *spec[1]) for blob, spec in inputs.items()) + "".join(layers)

    def input_values(self, rng):
        return _fill_inputs(self, rng)

    def build(self, folder, rng):
        """caffelite's net with random parameters, and the input values."""
        path = os.path.join(folder, "net.prototxt")
        with open(path, "w") as f:
            f.write(self.text)
        _seed(self.seed)
        net = caffe.Net(path, self.phase)
        _randomize_params(net, rng, self.params)
        return net, self.input_values(rng)


class RefusedCase(Case):
    """A configuration Caffe refuses with a failed CHECK (the process aborts): caffelite
    must refuse it too, with its own error naming the layer or net."""

    refused = True


class LayerCase(Case):
    """A case of tests/oracles/bvlc_layer_cases.py (its own inputs and options)."""

    def __init__(self, spec):
        self.spec, self.name, self.text, self.seed = spec, spec.name, spec.text, -1
        for option in ("phase", "exact", "diffs", "refused", "backward", "nans", "params"):
            setattr(self, option, getattr(spec, option))

    def input_values(self, rng):
        return self.spec.input_values(rng)


class CorpusCase(Case):
    """A DeepLab net of the corpus, cut down to the layers BVLC Caffe has: ImageSegData
    becomes an Input, each fork-only layer's top becomes an Input holding what
    caffelite's full net computed there (e.g. the shrunk label), and layers that only
    report (SegAccuracy, MatWrite, Silence, ArgMax) are dropped."""

    REPORTING = ("SegAccuracy", "MatWrite", "Silence", "ArgMax")
    FORK_ONLY = ("Interp",)

    def __init__(self, name, config, phase, crop, diffs=(), seed=-1):
        super().__init__(name, [], {}, diffs, phase, seed=seed)
        self.config, self.crop = config, crop

    def build(self, folder, rng):
        import pathlib
        import test_corpus_nets as corpus
        from caffelite.io.prototxt import net_to_text
        tmp = pathlib.Path(folder)
        full, param = corpus.build(self.config, self.phase, self.crop, tmp, random_bn=True)
        full.forward()
        cut = type(param)()
        cut.CopyFrom(param)
        cut.ClearField("layer")
        cut.force_backward = True
        feeds = {}
        for layer in corpus.filter_net(param, corpus.caffe_pb2.NetState(phase=self.phase)).layer:
            if layer.type in self.REPORTING:
                continue
            new = cut.layer.add()
            new.CopyFrom(layer)
            if layer.HasField("softmaxloss_param"):     # DeepLab v1's spelling
                (ignore,) = layer.softmaxloss_param.ignore_label
                new.loss_param.ignore_label = ignore
                new.ClearField("softmaxloss_param")
            if layer.type in self.FORK_ONLY or layer.type == "Input":
                new.ClearField("bottom")
                new.ClearField(layer.type.lower() + "_param")
                new.type = "Input"
                new.ClearField("input_param")
                for top in layer.top:
                    new.input_param.shape.add().dim.extend(full.blobs[top].shape)
                    feeds[top] = full.blobs[top].data.copy()
        with open(os.path.join(folder, "net.prototxt"), "w") as f:
            f.write(net_to_text(cut))
        _seed(self.seed)
        net = caffe.Net(os.path.join(folder, "net.prototxt"), self.phase)
        for name, blobs in net.params.items():
            for mine, source in zip(blobs, full.params[name]):
                mine.data[...] = source.data
        return net, feeds


CONV = "convolution_param {{ {} weight_filler {{ type: 'gaussian' std: 0.1 }} " \
       "bias_filler {{ type: 'gaussian' std: 0.1 }} }}"

CASES = [
    Case("conv_dilated", [_layer("c", "Convolution", ["x"], ["y"], CONV.format(
        "num_output: 5 kernel_size: 3 dilation: 2 pad: 2"))],
        {"x": _normal((2, 3, 9, 8))}, ["y"]),
    Case("conv_strided_grouped", [_layer("c", "Convolution", ["x"], ["y"], CONV.format(
        "num_output: 4 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 "
        "pad_w: 0 group: 2"))], {"x": _normal((2, 4, 7, 6))}, ["y"]),
    Case("deconv", [_layer("d", "Deconvolution", ["x"], ["y"], CONV.format(
        "num_output: 3 kernel_size: 4 stride: 2 pad: 1"))],
        {"x": _normal((2, 2, 5, 4))}, ["y"]),
    Case("pool_max_ceil", [_layer("p", "Pooling", ["x"], ["y", "m"],
                                  "pooling_param { pool: MAX kernel_size: 3 stride: 2 }")],
         {"x": _normal((2, 3, 8, 7))}, ["y"], exact=True),
    Case("pool_max_padded", [_layer("p", "Pooling", ["x"], ["y"],
                                    "pooling_param { pool: MAX kernel_size: 3 stride: 2 "
                                    "pad: 1 }")],
         {"x": _normal((1, 2, 9, 6))}, ["y"], exact=True),
    Case("pool_ave_padded", [_layer("p", "Pooling", ["x"], ["y"],
                                    "pooling_param { pool: AVE kernel_size: 3 stride: 2 "
                                    "pad: 1 }")],
         {"x": _normal((2, 2, 7, 8))}, ["y"]),
    Case("pool_global", [_layer("p", "Pooling", ["x"], ["y"],
                                "pooling_param { pool: AVE global_pooling: true }")],
         {"x": _normal((2, 3, 5, 4))}, ["y"]),
    Case("lrn_across", [_layer("n", "LRN", ["x"], ["y"],
                               "lrn_param { local_size: 5 alpha: 0.3 beta: 0.75 k: 2 }")],
         {"x": _normal((2, 7, 4, 3))}, ["y"]),
    Case("relu_leaky_softmax", [
        _layer("r", "ReLU", ["x"], ["x"], "relu_param { negative_slope: 0.1 }"),
        _layer("s", "Softmax", ["x"], ["y"])], {"x": _normal((2, 5, 3, 4))}, ["y"]),
    Case("softmax_loss_ignore", [_layer("l", "SoftmaxWithLoss", ["x", "t"], ["loss"],
                                        "loss_param { ignore_label: 255 }")],
         {"x": _normal((2, 4, 5, 3)), "t": _labels((2, 1, 5, 3), 4, 255)}),
    Case("softmax_loss_batch_norm", [_layer(
        "l", "SoftmaxWithLoss", ["x", "t"], ["loss"],
        "loss_weight: 2 loss_param { ignore_label: 1 normalization: BATCH_SIZE }")],
         {"x": _normal((3, 4, 2, 2)), "t": _labels((3, 1, 2, 2), 4)}),
    Case("batchnorm_scale_train", [
        _layer("bn", "BatchNorm", ["x"], ["x"], "batch_norm_param { eps: 1e-4 }"),
        _layer("sc", "Scale", ["x"], ["y"], "scale_param { bias_term: true }")],
         {"x": _normal((3, 4, 3, 2))}, ["y"]),
    Case("batchnorm_global", [
        _layer("bn", "BatchNorm", ["x"], ["y"], "batch_norm_param { use_global_stats: true }")],
         {"x": _normal((2, 4, 3, 3))}, ["y"], phase=TEST),
    Case("eltwise_concat_slice", [
        _layer("e", "Eltwise", ["a", "b"], ["s"], "eltwise_param { operation: SUM "
               "coeff: 0.5 coeff: -2 }"),
        _layer("m", "Eltwise", ["a", "b"], ["mx"], "eltwise_param { operation: MAX }"),
        _layer("p", "Eltwise", ["a", "b"], ["pr"], "eltwise_param { operation: PROD }"),
        _layer("c", "Concat", ["s", "mx", "pr"], ["cat"]),
        _layer("sl", "Slice", ["cat"], ["u", "v"], "slice_param { axis: 1 slice_point: 4 }")],
         {"a": _normal((2, 3, 4, 3)), "b": _normal((2, 3, 4, 3))}, ["u", "v"]),
    Case("inner_product_dropout_test", [
        _layer("ip", "InnerProduct", ["x"], ["h"], "inner_product_param { num_output: 6 "
               "weight_filler { type: 'xavier' } bias_filler { type: 'constant' value: 0.1 } }"),
        _layer("d", "Dropout", ["h"], ["h"], "dropout_param { dropout_ratio: 0.3 }"),
        _layer("t", "TanH", ["h"], ["y"])],
         {"x": _normal((4, 3, 2, 2))}, ["y"], phase=TEST),
    Case("dropout_train_seeded", [
        _layer("d", "Dropout", ["x"], ["y"], "dropout_param { dropout_ratio: 0.4 }")],
         {"x": _normal((3, 5, 4, 4))}, ["y"], exact=True, seed=1701),
    Case("neurons", [
        _layer("a", "AbsVal", ["x"], ["a"]),
        _layer("p", "Power", ["a"], ["p"], "power_param { power: 1.5 scale: 0.7 shift: 0.2 }"),
        _layer("s", "Sigmoid", ["x"], ["s"]),
        _layer("e", "ELU", ["x"], ["e"], "elu_param { alpha: 0.6 }"),
        _layer("b", "BNLL", ["x"], ["b"]),
        _layer("pr", "PReLU", ["x"], ["pr"])],
         {"x": _normal((2, 3, 3, 3))}, ["p", "s", "e", "b", "pr"]),
    Case("crop_reshape_flatten", [
        _layer("c", "Crop", ["a", "b"], ["c"], "crop_param { axis: 2 offset: 1 offset: 2 }"),
        _layer("r", "Reshape", ["c"], ["r"], "reshape_param { shape { dim: 0 dim: -1 } }"),
        _layer("f", "Flatten", ["a"], ["f"])],
         {"a": _normal((2, 3, 6, 7)), "b": _normal((2, 1, 4, 3))}, ["r", "f"], exact=True),
    Case("argmax_accuracy", [
        _layer("am", "ArgMax", ["x"], ["am"], "argmax_param { top_k: 2 out_max_val: true }"),
        _layer("acc", "Accuracy", ["x", "t"], ["acc"], "accuracy_param { top_k: 2 }")],
         {"x": _normal((5, 6, 1, 1)), "t": _labels((5,), 6)}, phase=TEST,
         force_backward=False),
    RefusedCase("softmax_loss_two_tops", [_layer("l", "SoftmaxWithLoss", ["x", "t"],
                                                 ["loss", "prob"])],
                {"x": _normal((2, 3, 2, 2)), "t": _labels((2, 1, 2, 2), 3)}),
    RefusedCase("infogain_forced_to_its_matrix", [_layer("l", "InfogainLoss", ["p", "t", "h"],
                                                         ["loss"])],
                {"p": _normal((4, 3, 1, 1)), "t": _labels((4,), 3), "h": _normal((1, 1, 3, 3))}),
    RefusedCase("pool_pad_not_below_kernel", [_layer("p", "Pooling", ["x"], ["y"],
                                                     "pooling_param { pool: MAX kernel_size: 2 "
                                                     "pad: 2 }")], {"x": _normal((1, 1, 5, 5))}),
    RefusedCase("eltwise_coeff_count", [_layer("e", "Eltwise", ["a", "b"], ["y"],
                                               "eltwise_param { coeff: 1 }")],
                {"a": _normal((1, 2, 2, 2)), "b": _normal((1, 2, 2, 2))}),
    RefusedCase("concat_shapes", [_layer("c", "Concat", ["a", "b"], ["y"])],
                {"a": _normal((1, 2, 2, 2)), "b": _normal((1, 2, 3, 2))}),
    CorpusCase("deeplabv2_aspp_vgg_train", "deeplabv2_vgg16_aspp_l/train.prototxt", TRAIN,
               65, seed=31),
    CorpusCase("deeplabv2_resnet101_deploy", "deeplabv2_resnet101_deploy/deploy.prototxt",
               TEST, 65, diffs=["fc1_voc12"]),
    CorpusCase("deeplab_v1_largefov_train", "deeplab_v1_largefov/train.prototxt", TRAIN,
               65, seed=7),
] + [LayerCase(spec) for spec in _load_layer_cases()]
assert len({case.name for case in CASES}) == len(CASES)


def _fill_inputs(case, rng):
    values = {}
    for blob, spec in case.inputs.items():
        if spec[0] == "normal":
            values[blob] = rng.standard_normal(spec[1]).astype(np.float32)
        else:
            _, shape, classes, ignore = spec
            labels = rng.integers(0, classes, size=shape).astype(np.float32)
            if ignore is not None:
                labels[rng.random(shape) < 0.25] = ignore
            values[blob] = labels
    return values


def _randomize_params(net, rng, chosen=None):
    """Random parameters; ``chosen`` maps (layer, index) to a generator for set values."""
    for name, blobs in net.params.items():
        kind = net.layer_dict[name].type
        for i, blob in enumerate(blobs):
            if (name, i) in (chosen or {}):
                blob.data[...] = chosen[name, i](blob.shape, rng)
            elif kind == "BatchNorm":
                blob.data[...] = ([rng.standard_normal(blob.shape),
                                   rng.uniform(0.5, 2.0, blob.shape), 0.8][i])
            else:
                blob.data[...] = rng.standard_normal(blob.shape) * 0.5


def _feed(case):
    return {"phase": np.int64(case.phase), "seed": np.int64(case.seed),
            "backward": np.int64(case.backward)}


def _run_refused(case, folder, rng):
    with open(os.path.join(folder, "net.prototxt"), "w") as f:
        f.write(case.text)
    values = case.input_values(rng)
    feed = _feed(case)
    feed.update(("data/" + b, v) for b, v in values.items())
    np.savez(os.path.join(folder, "inputs.npz"), **feed)
    try:
        net = caffe.Net(os.path.join(folder, "net.prototxt"), case.phase)
        for blob, value in values.items():
            net.blobs[blob].data[...] = value
        net.forward()
        if case.backward:
            net.backward()
    except (LayerError, NetError) as error:
        return str(error)
    return None


def _tops_given_gradients(case, net):
    if case.diffs is not None:
        return case.diffs
    losses = {top for name, layer in zip(net._layer_names, net.layers)
              if layer.type.endswith("Loss") for top in net.top_names[name]}
    return [blob for blob in net.outputs if blob not in losses]


def _run_caffelite(case, folder, rng):
    if case.refused:
        return _run_refused(case, folder, rng), []
    net, values = case.build(folder, rng)
    net.save(os.path.join(folder, "weights.caffemodel"))
    feed = _feed(case)
    for blob, value in values.items():
        net.blobs[blob].data[...] = value
        feed["data/" + blob] = value
    net.clear_param_diffs()
    net.forward()
    if case.backward:
        for blob in _tops_given_gradients(case, net):
            feed["diff/" + blob] = rng.standard_normal(net.blobs[blob].shape).astype(
                np.float32)
            net.blobs[blob].diff[...] = feed["diff/" + blob]
        net.backward()
    np.savez(os.path.join(folder, "inputs.npz"), **feed)
    out = _net_arrays(net)
    layers = [(name, layer.type, list(net.top_names[name]))
              for name, layer in zip(net._layer_names, net.layers)]
    return out, layers


def _oracle(root, names, timeout=600):
    """Run the named cases in one oracle process."""
    runner = os.path.join(HERE, "oracles", "bvlc_pycaffe_runner.py")
    return subprocess.run([PYCAFFE, runner] + [str(root / name) for name in names],
                          capture_output=True, text=True, timeout=timeout)


def _finished(folder):
    return (folder / "result.npz").exists() or (folder / "error.txt").exists()


def _oracle_results(root, cases):
    """Each refused case in a process of its own (Caffe aborts); all the others in one
    process, then one process per case for those a failed CHECK left unfinished."""
    theirs = {case.name: _oracle(root, [case.name]) for case in cases if case.refused}
    accepted = [case.name for case in cases if not case.refused]
    done = dict.fromkeys(accepted, _oracle(root, accepted, timeout=1800))
    for name in accepted:
        if not _finished(root / name):
            done[name] = _oracle(root, [name])
    for name in accepted:
        result, error = root / name / "result.npz", root / name / "error.txt"
        if result.exists():
            theirs[name] = dict(np.load(result))
        else:
            theirs[name] = (error.read_text() if error.exists() else
                            f"no result (rc {done[name].returncode}): "
                            f"{done[name].stderr[-2000:]}")
    return theirs


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Both sides' arrays for every case.  Each case draws from a generator of its own,
    so that adding or removing cases leaves the others' numbers alone."""
    root = tmp_path_factory.mktemp("bvlc_cases")
    ours, layers = {}, {}
    for case in CASES:
        folder = root / case.name
        folder.mkdir()
        rng = np.random.default_rng([20261206, zlib.crc32(case.name.encode())])
        with np.errstate(invalid="ignore" if case.nans else "warn"):
            ours[case.name], layers[case.name] = _run_caffelite(case, str(folder), rng)
    return ours, _oracle_results(root, CASES), layers


def _kinks(ours, theirs, layers):
    """Indices of the ReLU layers whose input lay within rounding of 0, so the two sides
    sent one element different ways (one passes it, one zeroes it)."""
    return [i for i, (_, kind, tops) in enumerate(layers) if kind == "ReLU"
            and np.any((ours["data/" + tops[0]] > 0) != (theirs["data/" + tops[0]] > 0))]


def _gradients_to_compare(keys, layers, last_kink):
    """Gradient keys the backward computes before it reaches the last kink: such an
    element's gradient passes on one side and not on the other, which changes every
    gradient below it by up to its own size."""
    first_writer = {}
    for i, (name, _, tops) in enumerate(layers):
        for top in tops:
            first_writer.setdefault(top, i)
    owner = {name: i for i, (name, _, _) in enumerate(layers)}
    clean = set()
    for key in keys:
        kind, name = key.split("/")[:2]
        index = first_writer.get(name) if kind == "diff" else owner.get(name)
        if kind in ("diff", "pdiff") and index is not None and index > last_kink:
            clean.add(key)
    return clean


def _agree(ours, theirs, key, exact, nans=False):
    assert ours.shape == theirs.shape, key
    if nans:    # where the inputs hold NaN or leave a function's domain: the same places
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs), err_msg=key)
    else:
        assert not np.isnan(ours).any() and not np.isnan(theirs).any(), key
    if exact:
        np.testing.assert_array_equal(ours, theirs, err_msg=key)
    else:
        # float32 sums of up to K = 4608 terms (512 x 3 x 3) taken in another order:
        # about sqrt(K) ulp of the largest magnitude, 4e-6, and a margin
        finite = np.abs(theirs[np.isfinite(theirs)])
        scale = max(1.0, float(finite.max(initial=0.0)))
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * scale, err_msg=key)


@pytest.mark.parametrize("case", [c for c in CASES if c.refused],
                         ids=lambda c: c.name)
def test_refused_as_by_bvlc_caffe(results, case):
    ours, theirs = results[0][case.name], results[1][case.name]
    assert theirs.returncode != 0 and re.search(r"^F\d{4} ", theirs.stderr,
                                                re.M), theirs.stderr[-2000:]
    assert ours, "caffelite ran a net that Caffe refuses"


@pytest.mark.parametrize("case", [c for c in CASES if not c.refused],
                         ids=lambda c: c.name)
def test_matches_bvlc_caffe(results, case):
    ours, theirs, layers = (r[case.name] for r in results)
    assert isinstance(theirs, dict), f"Caffe failed on {case.name}: {theirs}"
    assert sorted(ours) == sorted(theirs)
    # Every forward value is compared, so a kink is a ReLU input within the tolerance
    # of 0; how many there are depends on the BLAS kernels the host's CPU gets (a
    # deep net's gradients are then compared above the last one, its head at least).
    kinks = _kinks(ours, theirs, layers)
    compared = {k for k in theirs if k.startswith(("data/", "param/"))}
    compared |= _gradients_to_compare(theirs, layers, max(kinks, default=-1))
    assert any(k.startswith(("diff/", "pdiff/")) for k in compared) or not case.diffs
    for key in sorted(compared):
        _agree(ours[key], theirs[key], key, case.exact, case.nans)
