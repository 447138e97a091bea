"""Shared test helpers: build one layer from prototxt text, Caffe's gradient checker,
and OpenCV's Caffe importer as an independent forward oracle."""
import os
import tempfile

import numpy as np
from google.protobuf import text_format

from caffelite.blob import Blob
from caffelite.layer import create_layer
from caffelite.backend import TRAIN, TEST  # noqa: F401
from caffelite.proto import caffe_pb2


def make_layer(text, phase=TEST, dtype=np.float64):
    """``make_layer('type: "ReLU" relu_param { negative_slope: 0.1 }')`` -> Layer."""
    param = caffe_pb2.LayerParameter()
    text_format.Parse(text, param)
    if not param.name:
        param.name = "under_test"
    return create_layer(param, phase, dtype)


def blobs_from(arrays, dtype=np.float64):
    out = []
    for a in arrays:
        b = Blob(np.shape(a), dtype)
        b.data[...] = a
        out.append(b)
    return out


def setup_layer(layer, bottom_arrays, num_top=1, dtype=np.float64):
    """Create bottoms from arrays and ``num_top`` empty tops; run setup+reshape."""
    bottom = blobs_from(bottom_arrays, dtype)
    top = [Blob((), dtype) for _ in range(num_top)]
    layer.check_blob_counts(bottom, top)
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    return bottom, top


def run_forward(layer, bottom, top):
    """Reshape and forward with tops poisoned by NaN so unwritten elements show up."""
    layer.reshape(bottom, top)
    for t in top:
        if not any(np.shares_memory(t.data, b.data) for b in bottom):
            t.data[...] = np.nan
    layer.forward(bottom, top)
    return [t.data.copy() for t in top]


def check_gradient(layer, bottom, top, check_bottom=None, step=1e-3, threshold=None,
                   kink=None, kink_range=-1.0, seed=1701, top_id=None, top_data_id=None,
                   poison=np.nan):
    """Caffe's GradientChecker (exhaustive): compare analytic and numeric gradients.

    The objective is ``0.5 * sum(top^2)`` over every top (or only ``top_id``), so the
    top diff equals the top data; each bottom (and parameter) element is nudged by
    +-step and the central difference compared with the analytic diff, with Caffe's
    relative threshold ``threshold * max(|a|, |n|, 1)`` (by default Caffe's 1e-3 for
    float32 data, 1e-6 for float64, where the central difference's error at step 1e-3
    is far below it). Elements within
    ``kink_range`` of ``kink`` (non-smooth points) are skipped, as Caffe does.

    The checked bottom diffs start as ``poison``: NaN, so every element must be written
    (a NaN fails). A layer that leaves some elements as they were by design (v1's loss
    at ignored pixels) passes 0 and tests those elements itself.
    """
    check_bottom = range(len(bottom)) if check_bottom is None else check_bottom
    if threshold is None:
        threshold = 1e-6 if all(b.data.dtype == np.float64 for b in bottom) else 1e-3
    # Parameters the layer does not differentiate (BatchNorm statistics) are skipped.
    targets = [bottom[i] for i in check_bottom] + [
        b for b, down in zip(layer.blobs, layer.param_propagate_down) if down]

    def objective():
        layer.reshape(bottom, top)
        layer.forward(bottom, top)
        tops = top if top_id is None else [top[top_id]]
        loss = 0.0
        for t in tops:
            if top_data_id is None:
                loss += 0.5 * float(np.sum(t.data.astype(np.float64) ** 2))
            else:
                loss += float(t.data.flat[top_data_id])
        return loss

    def analytic():
        objective()
        for i, b in enumerate(bottom):      # a checked gradient must be written whole
            b.diff[...] = poison if i in check_bottom else 0
        for t in top:
            t.diff[...] = 0
        tops = top if top_id is None else [top[top_id]]
        for t in tops:
            if top_data_id is None:
                t.diff[...] = t.data
            else:
                t.diff.flat[top_data_id] = 1
        for b in layer.blobs:
            b.diff[...] = 0
        propagate = [i in check_bottom for i in range(len(bottom))]
        layer.backward(top, propagate, bottom)
        return [t.diff.copy() for t in targets]

    # Some layers (Dropout) draw randomness each forward: reseed so runs agree.
    _reseed(seed)
    computed = analytic()
    for ti, grad in enumerate(computed):    # NaN compares false: a NaN must fail here
        assert np.all(np.isfinite(grad)), f"target {ti}: gradient not finite (unwritten?)"
    failures = []
    for ti, target in enumerate(targets):
        flat = target.data.reshape(-1)
        for i in range(flat.size):
            x = flat[i]
            if kink is not None and abs(x - kink) <= kink_range:
                continue
            flat[i] = x + step
            _reseed(seed)
            plus = objective()
            flat[i] = x - step
            _reseed(seed)
            minus = objective()
            flat[i] = x
            numeric = (plus - minus) / (2 * step)
            a = computed[ti].reshape(-1)[i]
            scale = max(abs(a), abs(numeric), 1.0)
            if not abs(a - numeric) <= threshold * scale:
                failures.append((ti, i, a, numeric))
    assert not failures, (
        f"{len(failures)} gradient mismatches (target, index, analytic, numeric): {failures[:8]}")


def _reseed(seed):
    from caffelite import backend
    backend.set_random_seed(seed)


# ------------------------------------------------------------------ OpenCV oracle
def opencv_forward(net_text, weights, inputs, outputs):
    """Run OpenCV's Caffe importer on ``net_text`` with ``weights``.

    weights: [(layer_name, layer_type, [arrays])] written with caffelite's writer;
    inputs: {blob: array}; outputs: OpenCV output names, i.e. LAYER names (a layer's
    first top). Returns a list of arrays.
    """
    import cv2
    from caffelite.io.caffemodel import write_caffemodel
    with tempfile.TemporaryDirectory() as d:
        proto = os.path.join(d, "net.prototxt")
        model = os.path.join(d, "net.caffemodel")
        with open(proto, "w") as f:
            f.write(net_text)
        write_caffemodel(model, weights)
        net = cv2.dnn.readNetFromCaffe(proto, model)
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        for name, array in inputs.items():
            net.setInput(np.ascontiguousarray(array, dtype=np.float32), name)
        return [np.array(o) for o in net.forward(outputs)]


def opencv_layer(layer_text, inputs, tops=("y",), weights=None):
    """One-layer net through OpenCV's Caffe importer; each top is read through an
    identity Dropout layer: OpenCV addresses outputs by layer name (not top name), and
    an identity Power layer would be wrongly fused with a Power layer under test."""
    param = caffe_pb2.LayerParameter()
    text_format.Parse(layer_text, param)
    lines = []
    for name, a in inputs.items():
        dims = " ".join(f"dim: {d}" for d in a.shape)
        lines.append(f'input: "{name}" input_shape {{ {dims} }}')
    bottoms = " ".join(f'bottom: "{n}"' for n in inputs)
    top_txt = " ".join(f'top: "{t}"' for t in tops)
    lines.append(f'layer {{ name: "under_test" {layer_text} {bottoms} {top_txt} }}')
    for t in tops:
        lines.append(f'layer {{ name: "out_{t}" type: "Dropout" bottom: "{t}" top: "out_{t}" }}')
    layers = [("under_test", param.type, list(weights))] if weights else []
    return opencv_forward("\n".join(lines), layers, inputs, [f"out_{t}" for t in tops])


def assert_same_bits(actual, expected):
    """Equal bit for bit (signed zeros included), NaN where NaN."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    uint = np.uint32 if actual.dtype == np.float32 else np.uint64
    np.testing.assert_array_equal(actual[~nan].view(uint), expected[~nan].view(uint))


def spy_calls(monkeypatch, module, names):
    """The names of ``module``'s functions ``names`` called from now on, in order (each
    still runs)."""
    calls = []
    for name in names:
        real = getattr(module, name)

        def spy(*args, real=real, name=name):
            calls.append(name)
            return real(*args)
        monkeypatch.setattr(module, name, spy)
    return calls


def net_build_error(param, phase):
    """The message of the NetError that building the net raises."""
    import pytest
    import caffelite as caffe
    from caffelite.net import NetError
    with pytest.raises(NetError) as e:
        caffe.Net(param=param, phase=phase)
    return str(e.value)


def assert_data_position_resumes(param, phase, forwards):
    """A data layer's state_dict() taken after one forward, loaded into a second net,
    gives the first net's next ``forwards`` batches."""
    import caffelite as caffe
    net = caffe.Net(param=param, phase=phase)
    net.forward()
    state = net.layers[0].state_dict()
    follow = []
    for _ in range(forwards):
        net.forward()
        follow.append(net.blobs["data"].data.copy())
    other = caffe.Net(param=param, phase=phase)
    other.layers[0].load_state_dict(state)
    for want in follow:
        other.forward()
        np.testing.assert_array_equal(other.blobs["data"].data, want)
