"""caffelite against the real BVLC Caffe 1.0, run through its own pycaffe.

Set CAFFELITE_BVLC_PYCAFFE to the launcher that scripts/bvlc_caffe_oracle.py writes
(Debian bullseye's CPU build of BVLC Caffe, git 99bd997 of 2018-08-21, Python 3.9);
without it these tests skip.  Every case builds a small net in caffelite, gives its
parameters random values (unless seeded fillers are under test), writes them as a
caffemodel and feeds random inputs and top gradients, for one forward and backward or
for several; tests/oracles/bvlc_pycaffe_runner.py runs the same files through Caffe.  The
forward values, every blob's gradient and every parameter gradient are compared after
each pass, and so is every dataset of an HDF5 file the net writes, and the net's
structure as pycaffe shows it after the last pass (blobs, parameters, inputs, outputs,
layers with their types, bottoms and tops, loss weights); in a deep net, a
ReLU input within rounding of 0 may go different ways on the two sides (a kink), and
then the gradients the backward computes after it are not compared.

BVLC of 2018 is not the DeepLab fork (BVLC of early 2016 plus its own layers), so the
cases hold layers whose semantics did not change between the two.  Besides the three
corpus nets here, tests/oracles/bvlc_layer_cases.py and bvlc_recurrent_cases.py hold some
430 small cases (most of them a single layer); the oracle runs every case it should
accept in one process (and falls back to one process per case when a failed CHECK ends
it), and each case it should refuse in a process of its own.  The cases that read or
write HDF5 files skip without h5py.
"""
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
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
HAVE_H5PY = importlib.util.find_spec("h5py") is not None


def _load_oracle_module(name):
    """A module of tests/oracles (a folder of files, not a package), in sys.modules under
    its name, so that the recurrent cases import the helpers of the layer cases."""
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(HERE, "oracles", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _load_layer_cases():
    return (_load_oracle_module("bvlc_layer_cases").CASES
            + _load_oracle_module("bvlc_recurrent_cases").CASES)


# the runner's net_arrays and net_structure, loaded once (the runner imports caffe only
# when it runs)
_runner = _load_oracle_module("bvlc_pycaffe_runner")
_net_arrays, _net_structure = _runner.net_arrays, _runner.net_structure


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


def _net(case, folder, text):
    """caffelite's net of the text, written to the folder as the runner reads it."""
    path = os.path.join(folder, "net.prototxt")
    with open(path, "w") as f:
        f.write(text)
    _seed(case.seed)
    return caffe.Net(path, case.phase)


class LayerCase:
    """A case of tests/oracles/bvlc_layer_cases.py: its net, inputs and options (which
    tops get gradients, whether to run the backward, whether the two must agree bit for
    bit, ...)."""

    def __init__(self, spec):
        self.spec, self.name, self.text = spec, spec.name, spec.text
        for option in ("phase", "exact", "diffs", "refused", "backward", "nans", "params",
                       "seed", "fillers", "passes", "accumulate", "files", "outputs",
                       "raises"):
            setattr(self, option, getattr(spec, option))

    def draw(self, rng):
        """The values of each pass, and the arrays for set_input_arrays (or None)."""
        return self.spec.pass_values(rng), self.spec.array_values(rng)

    def build(self, folder, rng):
        """caffelite's net with random parameters (unless the fillers' are under test),
        the values of each pass and the arrays for set_input_arrays."""
        net = _net(self, folder, self.text)
        if not self.fillers:
            _randomize_params(net, rng, self.params)
        return (net,) + self.draw(rng)


class CorpusCase:
    """A DeepLab net of the corpus, cut down to the layers BVLC Caffe has: ImageSegData
    becomes an Input, each fork-only layer's top becomes an Input holding what
    caffelite's full net computed there (e.g. the shrunk label), and layers that only
    report (SegAccuracy, MatWrite, Silence, ArgMax) are dropped."""

    REPORTING = ("SegAccuracy", "MatWrite", "Silence", "ArgMax")
    FORK_ONLY = ("Interp",)
    refused, backward, nans, exact = False, True, False, False
    raises, fillers, passes, accumulate, files, outputs = None, False, None, False, {}, ()
    # A gradient after some 20 layers of sums in another order: their errors compound
    # (observed: 4e-5 of the array's largest magnitude, conv5_3 of LargeFOV).
    depth_margin = 10

    def __init__(self, name, config, phase, crop, diffs=(), seed=-1):
        self.name, self.config, self.phase, self.crop = name, config, phase, crop
        self.diffs, self.seed = diffs, seed

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
        net = _net(self, folder, net_to_text(cut))
        for name, blobs in net.params.items():
            for mine, source in zip(blobs, full.params[name]):
                mine.data[...] = source.data
        return net, [feeds], None


CASES = [
    CorpusCase("deeplabv2_aspp_vgg_train", "deeplabv2_vgg16_aspp_l/train.prototxt", TRAIN,
               65, seed=31),
    CorpusCase("deeplabv2_resnet101_deploy", "deeplabv2_resnet101_deploy/deploy.prototxt",
               TEST, 65, diffs=["fc1_voc12"]),
    CorpusCase("deeplab_v1_largefov_train", "deeplab_v1_largefov/train.prototxt", TRAIN,
               65, seed=7),
] + [LayerCase(spec) for spec in _load_layer_cases()]
assert len({case.name for case in CASES}) == len(CASES)


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
    feed = {"phase": np.int64(case.phase), "seed": np.int64(case.seed),
            "backward": np.int64(case.backward)}
    if case.passes:
        feed.update(passes=np.int64(len(case.passes)), accumulate=np.int64(case.accumulate))
    return feed


def _needs_h5py(case):
    return bool(case.outputs) or any(not isinstance(content, str)
                                     for content in case.files.values())


def _write_files(folder, files):
    for name, content in files.items():
        if isinstance(content, str):
            with open(os.path.join(folder, name), "w") as f:
                f.write(content)
        else:
            import h5py
            with h5py.File(os.path.join(folder, name), "w") as f:
                for dataset, values in content.items():
                    f.create_dataset(dataset, data=values)


def _read_outputs(folder, names):
    """Every dataset of the HDF5 files a net wrote, as file/<name>/<dataset>."""
    import h5py
    out = {}
    for name in names:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with h5py.File(path, "r") as f:
                out.update((f"file/{name}/{dataset}", f[dataset][()]) for dataset in f)
    return out


def _is_caffe(name):
    return name == "caffe" or name.startswith("caffe.")


@contextlib.contextmanager
def _in_folder(case, folder):
    """Run the case as the runner does: its files written into its folder, that folder
    the working directory and first on sys.path; afterwards, forget the modules imported
    from there and the ``caffe`` alias a Python layer's ``import caffe`` installs."""
    _write_files(folder, case.files)
    cwd, path, meta_path = os.getcwd(), list(sys.path), list(sys.meta_path)
    aliases = {name for name in sys.modules if _is_caffe(name)}
    os.chdir(folder)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        os.chdir(cwd)
        sys.path[:], sys.meta_path[:] = path, meta_path
        for name, module in list(sys.modules.items()):
            if (_is_caffe(name) and name not in aliases) or os.path.dirname(
                    getattr(module, "__file__", None) or "") == folder:
                del sys.modules[name]


def _tops_given_gradients(case, net):
    if case.diffs is not None:
        return case.diffs
    losses = {top for name, layer in zip(net._layer_names, net.layers)
              if layer.type.endswith("Loss") for top in net.top_names[name]}
    return [blob for blob in net.outputs if blob not in losses]


def _run_passes(case, net, passes, arrays, rng, feed):
    """Each pass as the runner runs it (random top gradients drawn after its forward,
    except where Caffe refuses the case); every array after each pass."""
    if arrays is not None:
        feed["arrays/data"], feed["arrays/labels"] = arrays
        net.set_input_arrays(*arrays)
    out = {}
    for k, values in enumerate(passes):
        prefix = f"pass{k}/" if case.passes else ""
        for blob, value in values.items():
            feed[prefix + "data/" + blob] = value
            if net.blobs[blob].shape != value.shape:
                net.blobs[blob].reshape(*value.shape)
            net.blobs[blob].data[...] = value
        if k == 0 or not case.accumulate:
            net.clear_param_diffs()
        net.forward()
        if case.backward:
            if not (case.refused or case.raises):
                for blob in _tops_given_gradients(case, net):
                    feed[prefix + "diff/" + blob] = rng.standard_normal(
                        net.blobs[blob].shape).astype(np.float32)
                    net.blobs[blob].diff[...] = feed[prefix + "diff/" + blob]
            net.backward()
        out.update(_net_arrays(net, prefix))
    return out


def _run_refused(case, folder, rng):
    """The error caffelite raised (for a ``raises`` case, as "Class: message"), or None."""
    passes, arrays = case.draw(rng)     # before the net, which may not build
    feed = _feed(case)
    try:
        with _in_folder(case, folder):
            _run_passes(case, _net(case, folder, case.text), passes, arrays, rng, feed)
    except Exception as error:
        if case.raises:
            return f"{type(error).__name__}: {error}"
        if not isinstance(error, (LayerError, NetError)):
            raise
        return str(error)
    finally:
        np.savez(os.path.join(folder, "inputs.npz"), **feed)
    return None


def _run_caffelite(case, folder, rng):
    """The arrays (or the error), each layer's name, type and tops, and the structure."""
    if case.refused or case.raises:
        return _run_refused(case, folder, rng), [], None
    feed = _feed(case)
    with _in_folder(case, folder):
        net, passes, arrays = case.build(folder, rng)
        if not case.fillers:
            net.save(os.path.join(folder, "weights.caffemodel"))
        out = _run_passes(case, net, passes, arrays, rng, feed)
        out.update(_read_outputs(folder, case.outputs))
        for name in case.outputs:   # the oracle writes its own
            os.remove(os.path.join(folder, name))
    np.savez(os.path.join(folder, "inputs.npz"), **feed)
    layers = [(name, layer.type, list(net.top_names[name]))
              for name, layer in zip(net._layer_names, net.layers)]
    return out, layers, _net_structure(net)


def _oracle(root, names, timeout=600):
    """Run the named cases in one oracle process."""
    runner = os.path.join(HERE, "oracles", "bvlc_pycaffe_runner.py")
    return subprocess.run([PYCAFFE, runner] + [str(root / name) for name in names],
                          capture_output=True, text=True, timeout=timeout)


def _finished(folder):
    return (folder / "result.npz").exists() or (folder / "error.txt").exists()


def _oracle_results(root, cases):
    """Each refused case in a process of its own (Caffe aborts); all the others in one
    process, then one process per case for those a failed CHECK left unfinished.  The
    arrays (or the error) of each case, and the structure of each that ran."""
    theirs = {case.name: _oracle(root, [case.name]) for case in cases if case.refused}
    accepted = [case for case in cases if not case.refused]
    done = dict.fromkeys([case.name for case in accepted],
                         _oracle(root, [case.name for case in accepted], timeout=1800))
    for name in done:
        if not _finished(root / name):
            done[name] = _oracle(root, [name])
    structures = {}
    for case in accepted:
        result, error = root / case.name / "result.npz", root / case.name / "error.txt"
        if result.exists():
            structures[case.name] = json.loads((root / case.name / "structure.json")
                                               .read_text())
            theirs[case.name] = dict(np.load(result))
            theirs[case.name].update(_read_outputs(str(root / case.name), case.outputs))
        else:
            theirs[case.name] = (error.read_text() if error.exists() else
                                 f"no result (rc {done[case.name].returncode}): "
                                 f"{done[case.name].stderr[-2000:]}")
    return theirs, structures


def _runs_here(case):
    return HAVE_H5PY or not _needs_h5py(case)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Both sides' arrays for every case, caffelite's layers, and both sides' structures.
    Each case draws from a generator of its own, so that adding or removing cases leaves
    the others' numbers alone."""
    root = tmp_path_factory.mktemp("bvlc_cases")
    ours, layers, structures = {}, {}, {}
    cases = [case for case in CASES if _runs_here(case)]
    for case in cases:
        folder = root / case.name
        folder.mkdir()
        rng = np.random.default_rng([20261206, zlib.crc32(case.name.encode())])
        with np.errstate(invalid="ignore" if case.nans else "warn"):
            ours[case.name], layers[case.name], structures[case.name] = _run_caffelite(
                case, str(folder), rng)
    theirs, their_structures = _oracle_results(root, cases)
    return ours, theirs, layers, (structures, their_structures)


def _split(key):
    """A result key's pass prefix ("" for a case of one pass), kind and blob or layer."""
    prefix = key[:key.index("/") + 1] if key.startswith("pass") else ""
    kind, name = key[len(prefix):].split("/")[:2]
    return prefix, kind, name


def _kinks(ours, theirs, layers):
    """Indices of the ReLU layers whose input lay within rounding of 0 (in any pass), so
    the two sides sent one element different ways (one passes it, one zeroes it)."""
    prefixes = {_split(key)[0] for key in theirs}
    return [i for i, (_, kind, tops) in enumerate(layers) if kind == "ReLU" and any(
        np.any((ours[p + "data/" + tops[0]] > 0) != (theirs[p + "data/" + tops[0]] > 0))
        for p in prefixes)]


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
        _, kind, name = _split(key)
        index = first_writer.get(name) if kind == "diff" else owner.get(name)
        if kind in ("diff", "pdiff") and index is not None and index > last_kink:
            clean.add(key)
    return clean


def _agree(ours, theirs, key, exact, nans=False, depth_margin=1):
    assert ours.shape == theirs.shape, key
    if nans:    # where the inputs hold NaN or leave a function's domain: the same places
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs), err_msg=key)
    else:
        assert not np.isnan(ours).any() and not np.isnan(theirs).any(), key
    if exact:
        np.testing.assert_array_equal(ours, theirs, err_msg=key)
        if ours.dtype.kind == "f":      # == takes -0 for +0: the sign of zero as well
            zeros = (ours == 0) & (theirs == 0)
            np.testing.assert_array_equal(np.signbit(ours[zeros]), np.signbit(theirs[zeros]),
                                          err_msg=f"{key}: the sign of zero")
    else:
        # float32 sums of up to K = 4608 terms (512 x 3 x 3) taken in another order:
        # about sqrt(K) ulp of the largest magnitude, 4e-6, and a margin
        finite = np.abs(theirs[np.isfinite(theirs)])
        scale = float(finite.max(initial=0.0)) * depth_margin
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * scale, err_msg=key)


def _skip_without_h5py(case):
    if not _runs_here(case):
        pytest.skip("reads or writes HDF5 files: needs h5py")


@pytest.mark.parametrize("case", [c for c in CASES if c.refused],
                         ids=lambda c: c.name)
def test_refused_as_by_bvlc_caffe(results, case):
    _skip_without_h5py(case)
    ours, theirs = results[0][case.name], results[1][case.name]
    assert theirs.returncode != 0 and re.search(r"^F\d{4} ", theirs.stderr,
                                                re.M), theirs.stderr[-2000:]
    assert ours, "caffelite ran a net that Caffe refuses"


@pytest.mark.parametrize("case", [c for c in CASES if c.raises], ids=lambda c: c.name)
def test_raises_as_pycaffe_does(results, case):
    ours, theirs = results[0][case.name], results[1][case.name]
    assert isinstance(theirs, str) and theirs.startswith(case.raises + ": "), theirs
    assert ours and ours.startswith(case.raises + ": "), ours


@pytest.mark.parametrize("case", [c for c in CASES if not (c.refused or c.raises)],
                         ids=lambda c: c.name)
def test_matches_bvlc_caffe(results, case):
    _skip_without_h5py(case)
    ours, theirs, layers = (r[case.name] for r in results[:3])
    assert isinstance(theirs, dict), f"Caffe failed on {case.name}: {theirs}"
    assert sorted(ours) == sorted(theirs)
    # Every forward value is compared, so a kink is a ReLU input within the tolerance
    # of 0; how many there are depends on the BLAS kernels the host's CPU gets (a
    # deep net's gradients are then compared above the last one, its head at least).
    kinks = _kinks(ours, theirs, layers)
    compared = {k for k in theirs if _split(k)[1] in ("data", "param")}
    compared |= _gradients_to_compare(theirs, layers, max(kinks, default=-1))
    assert any(_split(k)[1] in ("diff", "pdiff") for k in compared) or not case.backward
    for key in sorted(compared):
        _agree(ours[key], theirs[key], key, case.exact, case.nans,
               getattr(case, "depth_margin", 1))
    for key in sorted(k for k in theirs if k.startswith("file/")):   # written files
        assert ours[key].dtype == theirs[key].dtype, key
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def _without_upgraded_input(ours, theirs):
    """BVLC's structure less the Input layer "input" that its upgrade (2016, after the
    fork) makes of a net's ``input:`` fields, where caffelite, as the fork, has none."""
    names, types = theirs["layer_names"], theirs["layer_types"]
    if (names[:1] != ["input"] or types[:1] != ["Input"] or "input" in ours["layer_names"]
            or theirs["top_names"][0] != ["input", ours["inputs"]]):
        return theirs
    return dict(theirs, layer_names=names[1:], layer_types=types[1:],
                bottom_names=theirs["bottom_names"][1:], top_names=theirs["top_names"][1:],
                layers=theirs["layers"] - 1)


@pytest.mark.parametrize("case", [c for c in CASES if not (c.refused or c.raises)],
                         ids=lambda c: c.name)
def test_structure_matches_bvlc_caffe(results, case):
    """The net as pycaffe shows it after the last pass: net.blobs and net.params in
    order with their shapes, inputs, outputs, _layer_names with each layer's type,
    bottom_names, top_names, blob_loss_weights and the number of layers."""
    _skip_without_h5py(case)
    ours, theirs = (r.get(case.name) for r in results[3])
    assert theirs is not None, f"Caffe failed on {case.name}: {results[1][case.name]}"
    theirs = _without_upgraded_input(ours, theirs)
    both = set(ours) & set(theirs)     # blob_loss_weights where both sides have it
    assert set(ours) ^ set(theirs) <= {"blob_loss_weights"}
    for key in sorted(both):
        assert ours[key] == theirs[key], key
