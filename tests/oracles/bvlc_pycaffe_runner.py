"""Run cases through the real BVLC pycaffe (Python 3.9, numpy 1.19): the oracle side of
tests/test_bvlc_oracle.py.  Usage: pycaffe39 bvlc_pycaffe_runner.py CASE_DIR [CASE_DIR ...]
runs the cases in turn; a failed CHECK in Caffe aborts the process and leaves the cases
after it without results.

A case folder holds net.prototxt, weights.caffemodel (written by caffelite), and
inputs.npz: ``data/<blob>`` arrays to feed, ``diff/<blob>`` top gradients to set before
the backward, ``phase`` (0 TRAIN, 1 TEST), ``seed`` (Caffe's, when not negative) and
``backward`` (0: forward only; absent: 1).  The runner writes result.npz beside them:
``data/<blob>`` and ``diff/<blob>`` for every blob after forward and backward,
``param/<layer>/<i>`` data and ``pdiff/<layer>/<i>`` gradients, or error.txt with the
error Caffe raised.  ``net_arrays`` is shared with the caffelite side, which imports
this file without running it (``caffe`` is imported only when it runs).
"""
import os
import sys

import numpy as np


def net_arrays(net):
    """Every blob's data and diff and every parameter's data and diff, by key."""
    out = {}
    for name, blob in net.blobs.items():
        out["data/" + name] = blob.data.copy()
        out["diff/" + name] = blob.diff.copy()
    for name, blobs in net.params.items():
        for i, blob in enumerate(blobs):
            out["param/%s/%d" % (name, i)] = blob.data.copy()
            out["pdiff/%s/%d" % (name, i)] = blob.diff.copy()
    return out


def run_case(folder):
    import caffe
    inputs = np.load(os.path.join(folder, "inputs.npz"))
    if int(inputs["seed"]) >= 0:
        caffe.set_random_seed(int(inputs["seed"]))
    phase = caffe.TRAIN if int(inputs["phase"]) == 0 else caffe.TEST
    weights = os.path.join(folder, "weights.caffemodel")
    net = caffe.Net(os.path.join(folder, "net.prototxt"), phase,
                    **({"weights": weights} if os.path.exists(weights) else {}))
    for key in inputs.files:
        if key.startswith("data/"):
            blob = net.blobs[key[5:]]
            blob.reshape(*inputs[key].shape)
            blob.data[...] = inputs[key]
    net.reshape()
    net.clear_param_diffs()
    net.forward()
    if "backward" not in inputs.files or int(inputs["backward"]):
        for key in inputs.files:
            if key.startswith("diff/"):
                net.blobs[key[5:]].diff[...] = inputs[key]
        net.backward()
    np.savez(os.path.join(folder, "result.npz"), **net_arrays(net))


def main():
    import caffe
    caffe.set_mode_cpu()
    for folder in sys.argv[1:]:
        try:
            run_case(folder)
        except Exception as error:  # Caffe's CHECK failures abort instead
            with open(os.path.join(folder, "error.txt"), "w") as f:
                f.write("%s: %s" % (type(error).__name__, error))


if __name__ == "__main__":
    main()
