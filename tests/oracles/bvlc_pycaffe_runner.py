"""Run cases through the real BVLC pycaffe (Python 3.9, numpy 1.19): the oracle side of
tests/test_bvlc_oracle.py.  Usage: pycaffe39 bvlc_pycaffe_runner.py CASE_DIR [CASE_DIR ...]
runs the cases in turn; a failed CHECK in Caffe aborts the process and leaves the cases
after it without results.

A case folder holds net.prototxt, weights.caffemodel (written by caffelite; absent where
the case keeps what the fillers drew), any files the net reads (HDF5 sources, a Python
layer's module), and inputs.npz: ``data/<blob>`` arrays to feed, ``diff/<blob>`` top
gradients to set before the backward, ``phase`` (0 TRAIN, 1 TEST), ``seed`` (Caffe's, when
not negative) and ``backward`` (0: forward only; absent: 1).  A case of several passes
has ``passes`` (their number) and each pass's arrays as ``pass<k>/data/<blob>`` and
``pass<k>/diff/<blob>``; ``accumulate`` (1: the parameter gradients are cleared before the
first pass only) and ``arrays/data``, ``arrays/labels`` (handed to ``set_input_arrays``
before the first pass) are optional.  The case runs with the folder as the working
directory and first on sys.path.

The runner writes result.npz beside them: ``data/<blob>`` and ``diff/<blob>`` for every
blob after forward and backward, ``param/<layer>/<i>`` data and ``pdiff/<layer>/<i>``
gradients (each under ``pass<k>/`` for a case of several passes), or error.txt with the
error Caffe raised; and structure.json, the net's structure after the last pass
(``net_structure``).  ``net_arrays`` and ``net_structure`` are shared with the caffelite
side, which imports this file without running it (``caffe`` is imported only when it
runs).
"""
import json
import os
import sys

import numpy as np


def net_arrays(net, prefix=""):
    """Every blob's data and diff and every parameter's data and diff, by key."""
    out = {}
    for name, blob in net.blobs.items():
        out[prefix + "data/" + name] = blob.data.copy()
        out[prefix + "diff/" + name] = blob.diff.copy()
    for name, blobs in net.params.items():
        for i, blob in enumerate(blobs):
            out[prefix + "param/%s/%d" % (name, i)] = blob.data.copy()
            out[prefix + "pdiff/%s/%d" % (name, i)] = blob.diff.copy()
    return out


def net_structure(net):
    """The net's structure as pycaffe shows it, in JSON's lists: every blob with its
    shape and every layer's parameter blobs with theirs (in the nets' order), the inputs
    and outputs, each layer's name and type, its bottom and top names, each blob's loss
    weight (where the net has blob_loss_weights) and the number of layers."""
    def shape(blob):
        return [int(d) for d in blob.shape]

    structure = {
        "blobs": [[name, shape(blob)] for name, blob in net.blobs.items()],
        "params": [[name, [shape(blob) for blob in blobs]]
                   for name, blobs in net.params.items()],
        "inputs": [str(name) for name in net.inputs],
        "outputs": [str(name) for name in net.outputs],
        "layer_names": [str(name) for name in net._layer_names],
        "layer_types": [str(layer.type) for layer in net.layers],
        "bottom_names": [[name, list(names)] for name, names in net.bottom_names.items()],
        "top_names": [[name, list(names)] for name, names in net.top_names.items()],
        "layers": len(net.layers),
    }
    weights = getattr(net, "blob_loss_weights", None)
    if weights is not None:
        structure["blob_loss_weights"] = [[name, float(weight)]
                                          for name, weight in weights.items()]
    return structure


def run_passes(net, inputs):
    """Feed, forward and backward each pass as inputs.npz says; every array after each."""
    passes = int(inputs["passes"]) if "passes" in inputs.files else 0
    accumulate = "accumulate" in inputs.files and int(inputs["accumulate"])
    backward = "backward" not in inputs.files or int(inputs["backward"])
    if "arrays/data" in inputs.files:
        net.set_input_arrays(inputs["arrays/data"], inputs["arrays/labels"])
    out = {}
    for k in range(max(passes, 1)):
        prefix = "pass%d/" % k if passes else ""
        for key in inputs.files:
            if key.startswith(prefix + "data/"):
                blob = net.blobs[key[len(prefix) + 5:]]
                blob.reshape(*inputs[key].shape)
                blob.data[...] = inputs[key]
        net.reshape()
        if k == 0 or not accumulate:
            net.clear_param_diffs()
        net.forward()
        if backward:
            for key in inputs.files:
                if key.startswith(prefix + "diff/"):
                    net.blobs[key[len(prefix) + 5:]].diff[...] = inputs[key]
            net.backward()
        out.update(net_arrays(net, prefix))
    return out


def run_case(folder):
    import caffe
    inputs = np.load(os.path.join(folder, "inputs.npz"))
    if int(inputs["seed"]) >= 0:
        caffe.set_random_seed(int(inputs["seed"]))
    phase = caffe.TRAIN if int(inputs["phase"]) == 0 else caffe.TEST
    weights = os.path.join(folder, "weights.caffemodel")
    cwd = os.getcwd()
    os.chdir(folder)
    sys.path.insert(0, folder)
    try:
        net = caffe.Net(os.path.join(folder, "net.prototxt"), phase,
                        **({"weights": weights} if os.path.exists(weights) else {}))
        out = run_passes(net, inputs)
        structure = net_structure(net)
        del net     # closes what the net writes (HDF5Output)
    finally:
        os.chdir(cwd)
        sys.path.remove(folder)
        for name, module in list(sys.modules.items()):    # a Python layer's module
            if os.path.dirname(getattr(module, "__file__", None) or "") == folder:
                del sys.modules[name]
    with open(os.path.join(folder, "structure.json"), "w") as f:
        json.dump(structure, f)
    np.savez(os.path.join(folder, "result.npz"), **out)


def main():
    import caffe
    caffe.set_mode_cpu()
    for folder in sys.argv[1:]:
        try:
            run_case(os.path.abspath(folder))
        except Exception as error:  # Caffe's CHECK failures abort instead
            with open(os.path.join(folder, "error.txt"), "w") as f:
                f.write("%s: %s" % (type(error).__name__, error))


if __name__ == "__main__":
    main()
