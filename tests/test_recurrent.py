"""RNN, LSTM and LSTMUnit (BVLC's recurrent layers).

Oracles: PyTorch's LSTMCell/RNNCell (BVLC's gate order i, f, o, g mapped to torch's
i, f, g, o; cont applied by scaling the states entering a step) for forward values and
autograd gradients; BVLC's unrolled net itself, built here from caffelite's primitive
layers (InnerProduct, Scale, Eltwise, LSTMUnit, TanH, Slice, Concat), which the layers
must match bit for bit in float; Caffe's finite-difference gradient checker.
"""
import re

import numpy as np
import pytest
from google.protobuf import text_format

import caffelite as caffe
from caffelite import backend
from caffelite.blob import Blob
from caffelite.filler import fill
from caffelite.io import prototxt
from caffelite.io.caffemodel import read_caffemodel
from caffelite.layer import LayerError, create_layer
from caffelite.proto import caffe_pb2
from layer_testing import (TRAIN, blobs_from, check_gradient, make_layer, net_build_error,
                           run_forward, setup_layer)

F32, F64 = np.float32, np.float64
STATES = {"LSTM": ("h", "c"), "RNN": ("h",)}


def recurrent_layer(kind, hidden, dtype=F64, expose=False, extra=""):
    text = (f'type: "{kind}" recurrent_param {{ num_output: {hidden} '
            f'expose_hidden: {str(expose).lower()} '
            f'weight_filler {{ type: "uniform" min: -0.6 max: 0.6 }} '
            f'bias_filler {{ type: "uniform" min: -0.3 max: 0.3 }} {extra} }}')
    return make_layer(text, TRAIN, dtype)


def sequences(rng, T, N, I, static=0, states=0, hidden=0, first=0.0):
    """x (T, N, I); cont (T, N) with ``first`` at t = 0 and new sequences mid-way in
    every other stream; [x_static (N, static)]; [``states`` of (1, N, hidden)]."""
    cont = np.ones((T, N))
    cont[0] = first
    cont[T // 2, ::2] = 0
    out = [rng.standard_normal((T, N, I)), cont]
    if static:
        out.append(rng.standard_normal((N, static)))
    return out + [rng.standard_normal((1, N, hidden)) for _ in range(states)]


def build(kind, hidden, arrays, dtype=F64, expose=False):
    layer = recurrent_layer(kind, hidden, dtype, expose)
    num_top = 1 + (len(STATES[kind]) if expose else 0)
    bottom, top = setup_layer(layer, arrays, num_top=num_top, dtype=dtype)
    return layer, bottom, top


def backward(layer, bottom, top, top_diffs, propagate):
    for t, d in zip(top, top_diffs):
        t.diff[...] = d
    for b in layer.blobs:
        b.diff[...] = 0
    for b in bottom:
        b.diff[...] = np.nan
    layer.backward(top, propagate, bottom)


# ------------------------------------------------------------------ parameters
@pytest.mark.parametrize("kind,static,shapes", [
    ("LSTM", 0, [(20, 6), (20,), (20, 5)]),
    ("LSTM", 3, [(20, 6), (20,), (20, 3), (20, 5)]),
    ("RNN", 0, [(5, 6), (5,), (5, 5), (5, 5), (5,)]),
    ("RNN", 3, [(5, 6), (5,), (5, 3), (5, 5), (5, 5), (5,)]),
])
def test_parameter_blobs_are_bvlcs(kind, static, shapes):
    # x (T, N, 2, 3): the input weights take the 6 values from axis 2 on.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 2, 3))
    arrays = [x, np.ones((3, 2))] + ([rng.standard_normal((2, static))] if static else [])
    layer, bottom, top = build(kind, 5, arrays)
    assert [b.shape for b in layer.blobs] == shapes
    assert top[0].shape == (3, 2, 5)
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(1)


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_fillers_draw_as_bvlcs_unrolled_net(kind):
    """Every timestep's copy of the recurrent weights is filled (and dropped) as in
    BVLC's unrolled net: the kept blobs and the generator's position after them."""
    T, N, I, S, H = 3, 2, 4, 2, 3
    extra = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "uniform" ' \
        'min: -1 max: 1 }'
    text = f'type: "{kind}" recurrent_param {{ num_output: {H} {extra} }}'
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((T, N, I)), np.ones((T, N)), rng.standard_normal((N, S))]
    backend.set_random_seed(77)
    layer = make_layer(text, TRAIN, F32)
    setup_layer(layer, arrays, dtype=F32)
    after = _draw(caffe_pb2.FillerParameter(type="uniform"), (4,))
    rows = 4 * H if kind == "LSTM" else H
    step = [((rows, H), "w")] if kind == "LSTM" else [((H, H), "w"), ((H, H), "w"),
                                                       ((H,), "b")]
    plan = [((rows, I), "w"), ((rows,), "b"), ((rows, S), "w")] + step * T
    p = caffe_pb2.LayerParameter()
    text_format.Parse(text, p)
    fillers = {"w": p.recurrent_param.weight_filler, "b": p.recurrent_param.bias_filler}
    backend.set_random_seed(77)
    drawn = [_draw(fillers[k], shape) for shape, k in plan]
    kept = drawn[:3 + len(step)]
    assert len(layer.blobs) == len(kept)
    for blob, want in zip(layer.blobs, kept):
        np.testing.assert_array_equal(blob.data, want)
    np.testing.assert_array_equal(_draw(caffe_pb2.FillerParameter(type="uniform"), (4,)),
                                  after)


def _draw(filler, shape):
    blob = Blob(shape, F32)
    fill(blob, filler)
    return blob.data.copy()


# ------------------------------------------------------------------ torch oracle
def torch_run(kind, weights, arrays, static, expose, grads):
    """The layer's tops and, for the loss sum(top * grad) over the given top grads,
    the gradients of x, [x_static], [h_0, c_0] and the weights, in torch (float64)."""
    torch = pytest.importorskip("torch")
    t64 = lambda a: torch.tensor(np.asarray(a, F64), requires_grad=True)  # noqa: E731
    w = [t64(a) for a in weights]
    x, cont = t64(arrays[0]), torch.tensor(np.asarray(arrays[1], F64))
    rest = [t64(a) for a in arrays[2:]]
    xs = rest.pop(0) if static else None
    T, N = cont.shape
    H = w[-1].shape[1] if kind == "LSTM" else w[-3].shape[0]
    states = [s[0] for s in rest] if expose else \
        [torch.zeros(N, H, dtype=torch.float64) for _ in STATES[kind]]
    w_in = torch.cat([w[0], w[2]], dim=1) if static else w[0]
    if kind == "LSTM":
        # BVLC's gate blocks i, f, o, g -> torch's i, f, g, o.
        perm = np.r_[0:H, H:2 * H, 3 * H:4 * H, 2 * H:3 * H]
        cell = torch.nn.LSTMCell(w_in.shape[1], H, dtype=torch.float64)
        params = {"weight_ih": w_in[perm], "weight_hh": w[-1][perm], "bias_ih": w[1][perm],
                  "bias_hh": torch.zeros(4 * H, dtype=torch.float64)}
    else:
        cell = torch.nn.RNNCell(w_in.shape[1], H, nonlinearity="tanh", dtype=torch.float64)
        params = {"weight_ih": w_in, "weight_hh": w[-3], "bias_ih": w[1],
                  "bias_hh": torch.zeros(H, dtype=torch.float64)}
    outs, state = [], states
    for t in range(T):
        keep = cont[t][:, None]
        inp = torch.cat([x[t].reshape(N, -1), xs.reshape(N, -1)], dim=1) if static \
            else x[t].reshape(N, -1)
        if kind == "LSTM":
            h, c = torch.func.functional_call(cell, params, (inp, (keep * state[0],
                                                                   keep * state[1])))
            state = [h, c]
            outs.append(h)
        else:
            h = torch.func.functional_call(cell, params, (inp, keep * state[0]))
            state = [h]
            outs.append(torch.tanh(torch.nn.functional.linear(h, w[-2], w[-1])))
    tops = [torch.stack(outs)] + ([s[None] for s in state] if expose else [])
    loss = sum((a * torch.tensor(g)).sum() for a, g in zip(tops, grads))
    wrt = [x] + ([xs] if static else []) + (rest if expose else []) + w
    return [a.detach().numpy() for a in tops], \
        [g.numpy() for g in torch.autograd.grad(loss, wrt)]


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
@pytest.mark.parametrize("static,expose", [(0, False), (3, False), (0, True), (2, True)])
def test_matches_torch(kind, static, expose):
    rng = np.random.default_rng(2)
    T, N, I, H = 5, 3, 4, 3
    states = len(STATES[kind]) if expose else 0
    arrays = sequences(rng, T, N, I, static, states, H, first=1.0 if expose else 0.0)
    first_state = 2 + int(bool(static))
    # Float64: the values and, for the exposed states, the true gradients (not BVLC's).
    layer, bottom, top = build(kind, H, arrays, F64, expose)
    layer.exposed_hidden_gradients = True
    for b in layer.blobs:
        b.data[...] = rng.uniform(-0.8, 0.8, b.shape)
    weights = [b.data.copy() for b in layer.blobs]
    grads = [rng.standard_normal(t.shape) for t in top]
    got = run_forward(layer, bottom, top)
    propagate = [True, False] + [True] * (len(bottom) - 2)
    backward(layer, bottom, top, grads, propagate)
    want, want_grads = torch_run(kind, weights, arrays, static, expose, grads)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-13)
    diffs = [bottom[0].diff] + [bottom[i].diff for i in range(2, len(bottom))] + \
        [b.diff for b in layer.blobs]
    for g, w in zip(diffs, want_grads):
        np.testing.assert_allclose(g, w.reshape(g.shape), rtol=1e-10, atol=1e-12)
    # BVLC's own rule: no gradient to h_0/c_0, the h_T/c_T top diffs are not read.
    if expose:
        layer.exposed_hidden_gradients = False
        backward(layer, bottom, top, grads, propagate)
        for i in range(first_state, len(bottom)):
            assert not bottom[i].diff.any()
        without = [bottom[0].diff.copy()] + [b.diff.copy() for b in layer.blobs]
        backward(layer, bottom, top, [grads[0]] + [g * 0 for g in grads[1:]], propagate)
        for a, b in zip(without, [bottom[0].diff] + [b.diff for b in layer.blobs]):
            np.testing.assert_array_equal(a, b)
    # Float32 against torch's float64: the float data's rounding only.
    layer32, bottom32, top32 = build(kind, H, arrays, F32, expose)
    for b, w in zip(layer32.blobs, weights):
        b.data[...] = w
    got32 = run_forward(layer32, bottom32, top32)
    for g, w in zip(got32, want):
        assert np.abs(g - w).max() < 2e-6


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
@pytest.mark.parametrize("static,expose", [(0, False), (2, False), (2, True)])
def test_gradient(kind, static, expose):
    rng = np.random.default_rng(3)
    T, N, I, H = 4, 2, 3, 2
    states = len(STATES[kind]) if expose else 0
    arrays = sequences(rng, T, N, I, static, states, H, first=1.0 if expose else 0.0)
    layer, bottom, top = build(kind, H, arrays, F64, expose)
    # Exposed states: the true gradients (through h_0/c_0 and from the h_T/c_T tops).
    layer.exposed_hidden_gradients = expose
    check = [i for i in range(len(bottom)) if i != 1]
    check_gradient(layer, bottom, top, check_bottom=check, step=1e-4, threshold=1e-4)


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_gradient_with_bvlcs_exposed_states(kind):
    """BVLC's rule: only the output top's gradient flows, to x and the parameters."""
    rng = np.random.default_rng(4)
    states = len(STATES[kind])
    arrays = sequences(rng, 3, 2, 2, 0, states, 2, first=1.0)
    layer, bottom, top = build(kind, 2, arrays, F64, expose=True)
    check_gradient(layer, bottom, top, check_bottom=[0], step=1e-4, threshold=1e-4,
                   top_id=0)


# ------------------------------------------------------------------ BVLC's unrolled net
def unrolled_net(kind, T, N, I, H, S):
    """BVLC's unrolled net of an LSTM/RNN layer with a static input and the initial
    states as inputs, from caffelite's primitive layers."""
    rows = 4 * H if kind == "LSTM" else H
    states = STATES[kind]
    shapes = {"x": (T, N, I), "cont": (T, N), "x_static": (N, S)}
    shapes.update({f"{s}_0": (1, N, H) for s in states})
    lines = ["force_backward: true"]
    for name, shape in shapes.items():
        dims = " ".join(f"dim: {d}" for d in shape)
        lines.append(f'input: "{name}" input_shape {{ {dims} }}')

    def layer(name, kind_, bottoms, tops, body=""):
        b = " ".join(f'bottom: "{x}"' for x in bottoms)
        t = " ".join(f'top: "{x}"' for x in tops)
        lines.append(f'layer {{ name: "{name}" type: "{kind_}" {b} {t} {body} }}')

    def ip(name, bottom, top, num, axis, params, bias):
        body = "".join(f'param {{ name: "{p}" }} ' for p in params)
        body += (f"inner_product_param {{ num_output: {num} axis: {axis} "
                 f"bias_term: {str(bias).lower()} }}")
        layer(name, "InnerProduct", [bottom], [top], body)

    steps = range(1, T + 1)
    layer("cont_slice", "Slice", ["cont"], [f"cont_{t}" for t in steps],
          "slice_param { axis: 0 }")
    ip("x_transform", "x", "Wx", rows, 2, ["W_x", "b_x"], True)
    ip("static_transform", "x_static", "Ws_flat", rows, 1, ["W_static"], False)
    layer("static_reshape", "Reshape", ["Ws_flat"], ["Ws"],
          f"reshape_param {{ shape {{ dim: 1 dim: -1 dim: {rows} }} }}")
    layer("x_slice", "Slice", ["Wx"], [f"Wx_{t}" for t in steps], "slice_param { axis: 0 }")
    for t in steps:
        layer(f"conted_{t}", "Scale", [f"h_{t - 1}", f"cont_{t}"], [f"hc_{t - 1}"],
              "scale_param { axis: 0 }")
        ip(f"transform_{t}", f"hc_{t - 1}", f"Wh_{t}", rows, 2, ["W_h"], False)
        layer(f"sum_{t}", "Eltwise", [f"Wh_{t}", f"Wx_{t}", "Ws"], [f"in_{t}"],
              "eltwise_param { operation: SUM }")
        if kind == "LSTM":
            layer(f"unit_{t}", "LSTMUnit", [f"c_{t - 1}", f"in_{t}", f"cont_{t}"],
                  [f"c_{t}", f"h_{t}"])
        else:
            layer(f"h_neuron_{t}", "TanH", [f"in_{t}"], [f"h_{t}"])
            ip(f"output_{t}", f"h_{t}", f"Wo_{t}", H, 2, ["W_o", "b_o"], True)
            layer(f"o_neuron_{t}", "TanH", [f"Wo_{t}"], [f"o_{t}"])
    outs = [f"h_{t}" if kind == "LSTM" else f"o_{t}" for t in steps]
    layer("concat", "Concat", outs, ["out"], "concat_param { axis: 0 }")
    param = text_format.Parse("\n".join(lines), caffe_pb2.NetParameter())
    net = caffe.Net(param=param, phase=TRAIN)
    owners = ["x_transform", "x_transform", "static_transform", "transform_1"]
    index = [0, 1, 0, 0]
    if kind == "RNN":
        owners += ["output_1", "output_1"]
        index += [0, 1]
    return net, [net.params[o][i] for o, i in zip(owners, index)]


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_matches_bvlcs_unrolled_net_bit_for_bit(kind):
    T, N, I, H, S = 5, 3, 4, 3, 2
    rng = np.random.default_rng(5)
    states = STATES[kind]
    arrays = sequences(rng, T, N, I, S, len(states), H, first=1.0)
    arrays = [a.astype(F32) for a in arrays]
    net, net_params = unrolled_net(kind, T, N, I, H, S)
    layer, bottom, top = build(kind, H, arrays, F32, expose=True)
    layer.exposed_hidden_gradients = True     # the unrolled net's h_0/c_0 gradients
    for b, p in zip(layer.blobs, net_params):
        b.data[...] = rng.uniform(-0.8, 0.8, b.shape)
        p.data[...] = b.data
    names = ["x", "cont", "x_static"] + [f"{s}_0" for s in states]
    for name, a in zip(names, arrays):
        net.blobs[name].data[...] = a
    net.forward()
    got = run_forward(layer, bottom, top)
    finals = [net.blobs[f"{s}_{T}"].data for s in states]
    for g, w in zip(got, [net.blobs["out"].data] + finals):
        np.testing.assert_array_equal(g, w)
    grad = rng.standard_normal(top[0].shape).astype(F32)
    net.blobs["out"].diff[...] = grad
    net.backward()
    backward(layer, bottom, top, [grad] + [0 * g for g in got[1:]],
             [True, False] + [True] * (len(bottom) - 2))
    for name, b in zip(names, bottom):
        if name != "cont":
            np.testing.assert_array_equal(b.diff, net.blobs[name].diff, err_msg=name)
    for i, (b, p) in enumerate(zip(layer.blobs, net_params)):
        np.testing.assert_array_equal(b.diff, p.diff, err_msg=f"param {i}")


# ------------------------------------------------------------------ the carried state
@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_state_carries_over_to_the_next_forward(kind):
    rng = np.random.default_rng(6)
    T, N, I, H = 3, 3, 2, 3
    x = rng.standard_normal((2 * T, N, I))
    cont = np.ones((2 * T, N))
    cont[0] = 0
    cont[T + 1, 1] = 0
    whole, wb, wt = build(kind, H, [x, cont])
    half, hb, ht = build(kind, H, [x[:T], cont[:T]])
    for a, b in zip(half.blobs, whole.blobs):
        a.data[...] = b.data
    want = run_forward(whole, wb, wt)[0]
    first = run_forward(half, hb, ht)[0]
    hb[0].data[...], hb[1].data[...] = x[T:], cont[T:]
    second = run_forward(half, hb, ht)[0]
    np.testing.assert_allclose(np.concatenate([first, second]), want, rtol=1e-13,
                               atol=1e-14)

    # The state blobs keep their memory when N shrinks (the first streams go on) and
    # start from zeros when N grows past it, as BVLC's blobs; reset() zeroes them.
    exposed, eb, et = build(kind, H, [x[:T]] + [np.ones((T, N))] +
                            [np.zeros((1, N, H))] * len(STATES[kind]), expose=True)
    for a, b in zip(exposed.blobs, whole.blobs):
        a.data[...] = b.data
    finals = [s.data.copy() for s in half._carried]

    def run_both(n, start):
        xs, conts = rng.standard_normal((T, n, I)), np.ones((T, n))
        small = blobs_from([xs, conts])
        out = run_forward(half, small, ht)[0]
        states = [blobs_from([s])[0] for s in start]
        ref = run_forward(exposed, small + states, et)[0]
        np.testing.assert_array_equal(out, ref)

    run_both(2, [f[:, :2] for f in finals])
    run_both(4, [np.zeros((1, 4, H))] * len(STATES[kind]))
    half.reset()
    run_both(4, [np.zeros((1, 4, H))] * len(STATES[kind]))


# ------------------------------------------------------------------ LSTMUnit
def lstm_unit_reference(c_prev, gates, cont):
    H = c_prev.shape[-1]
    sig = lambda v: 1 / (1 + np.exp(-v))    # noqa: E731
    i, f, o = (sig(gates[..., k * H:(k + 1) * H]) for k in range(3))
    g = np.tanh(gates[..., 3 * H:])
    c = cont[..., None] * f * c_prev + i * g
    return c, o * np.tanh(c)


def test_lstm_unit_forward_and_gradient():
    rng = np.random.default_rng(7)
    c_prev, gates = rng.standard_normal((1, 4, 3)), 2 * rng.standard_normal((1, 4, 12))
    cont = np.array([[1.0, 0.0, 1.0, 0.0]])
    layer = make_layer('type: "LSTMUnit"')
    bottom, top = setup_layer(layer, [c_prev, gates, cont], num_top=2)
    assert top[0].shape == top[1].shape == (1, 4, 3)
    got = run_forward(layer, bottom, top)
    for g, w in zip(got, lstm_unit_reference(c_prev, gates, cont)):
        np.testing.assert_allclose(g, w, rtol=1e-14, atol=1e-15)
    check_gradient(layer, bottom, top, check_bottom=[0, 1], step=1e-4, threshold=1e-4)
    with pytest.raises(LayerError, match="sequence continuation"):
        layer.backward(top, [True, True, True], bottom)
    assert not layer.allow_force_backward(2)


def test_lstm_unit_fractional_cont_follows_bvlcs_cpu_and_gpu_code():
    """BVLC's CPU backward uses the scaled gate f' = cont f in f' (1 - f'); its GPU
    kernels take the derivative, cont f (1 - f). Each side here follows its own."""
    from caffelite.kernels.host import compiler
    if compiler() is None:
        pytest.skip("the GPU emulator needs a C++ compiler")
    rng = np.random.default_rng(8)
    c_prev, gates = rng.standard_normal((1, 2, 3)), rng.standard_normal((1, 2, 12))
    cont = np.array([[0.5, 0.25]])
    H = 3
    f = 1 / (1 + np.exp(-gates[0, :, H:2 * H]))
    results = []
    for device in (False, True):
        if device:
            backend.set_mode_gpu(emulate=True)
        try:
            layer = make_layer('type: "LSTMUnit"')
            bottom, top = setup_layer(layer, [c_prev, gates, cont], num_top=2)
            with backend.device_access(device):
                layer.forward(bottom, top)
            top[0].diff[...] = 1.0
            top[1].diff[...] = 0.0
            with backend.device_access(device):
                layer.backward(top, [True, True, False], bottom)
            results.append(bottom[1].diff[0, :, H:2 * H].copy())
        finally:
            backend.set_mode_cpu()
    scaled = cont[0][:, None] * f
    np.testing.assert_allclose(results[0], c_prev[0] * scaled * (1 - scaled), rtol=1e-14)
    np.testing.assert_allclose(results[1], cont[0][:, None] * c_prev[0] * f * (1 - f),
                               rtol=1e-14)


# ------------------------------------------------------------------ nets and caffemodels
NET = '''
input: "x" input_shape { dim: 4 dim: 2 dim: 3 }
input: "cont" input_shape { dim: 4 dim: 2 }
input: "img" input_shape { dim: 2 dim: 5 }
layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" bottom: "img" top: "h"
  recurrent_param { num_output: 3 weight_filler { type: "uniform" min: -0.5 max: 0.5 }
    bias_filler { type: "constant" value: 0.1 } } }
layer { name: "fc" type: "InnerProduct" bottom: "h" top: "y"
  inner_product_param { num_output: 2 axis: 2 weight_filler { type: "xavier" } } }
'''


def _net(text, weights=None):
    param = text_format.Parse(text, caffe_pb2.NetParameter())
    net = caffe.Net(param=param, phase=caffe.TEST)
    if weights:
        net.copy_from(weights)
    return net


def test_caffemodel_round_trip(tmp_path):
    rng = np.random.default_rng(9)
    inputs = {"x": rng.standard_normal((4, 2, 3)), "cont": np.array([[0, 0], [1, 1],
                                                                     [0, 1], [1, 1.0]]),
              "img": rng.standard_normal((2, 5))}
    net = _net(NET)
    out = net.forward(**inputs)["y"].copy()
    path = str(tmp_path / "lstm.caffemodel")
    net.save(path)
    stored = {w.name: [tuple(b.shape) for b in w.blobs] for w in read_caffemodel(path)}
    assert stored["lstm"] == [(12, 3), (12,), (12, 5), (12, 3)]
    again = _net(NET, path)
    for a, b in zip(again.params["lstm"], net.params["lstm"]):
        np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(again.forward(**inputs)["y"], out)


# ------------------------------------------------------------------ errors
def _net_with(layer_text, shapes):
    inputs = "".join(f'input: "{n}" input_shape {{ {" ".join(f"dim: {d}" for d in s)} }}\n'
                     for n, s in shapes.items())
    bottoms = " ".join(f'bottom: "{n}"' for n in shapes)
    return text_format.Parse(inputs + f'layer {{ name: "rec" {bottoms} {layer_text} }}',
                             caffe_pb2.NetParameter())


@pytest.mark.parametrize("layer_text,shapes,message", [
    ('type: "LSTM" top: "h" recurrent_param { num_output: 3 }',
     {"x": (4, 2, 3), "cont": (4, 3)}, r"bottom 1 \(cont\) must have the shape"),
    ('type: "RNN" top: "h" recurrent_param { num_output: 3 }',
     {"x": (4, 2, 3), "cont": (2, 4)}, r"bottom 1 \(cont\) must have the shape"),
    ('type: "LSTM" top: "h" recurrent_param { num_output: 3 }',
     {"x": (4, 2, 3), "cont": (4, 2), "xs": (3, 5)}, r"bottom 2 \(x_static\) must have"),
    ('type: "RNN" top: "h" recurrent_param { }',
     {"x": (4, 2, 3), "cont": (4, 2)}, "num_output must be given"),
    ('type: "LSTM" top: "h" recurrent_param { num_output: 2 }',
     {"x": (4, 2), "cont": (4, 2)}, "feature axis"),
    ('type: "LSTM" top: "h" top: "hT" top: "cT" recurrent_param { num_output: 2 '
     'expose_hidden: true }', {"x": (4, 2, 3), "cont": (4, 2), "h0": (1, 2, 2),
                               "c0": (1, 3, 2)}, r"bottom 3 \(c_0\) must have"),
    ('type: "LSTM" top: "h" top: "hT" recurrent_param { num_output: 2 expose_hidden: true }',
     {"x": (4, 2, 3), "cont": (4, 2), "h0": (1, 2, 2), "c0": (1, 2, 2)}, "exactly 3 top"),
    ('type: "LSTMUnit" top: "c" top: "h"', {"c0": (1, 2, 3), "g": (1, 2, 11),
                                             "cont": (1, 2)}, "4 x 3 = 12"),
])
def test_errors_name_the_layer(layer_text, shapes, message):
    text = net_build_error(_net_with(layer_text, shapes), caffe.TEST)
    assert "'rec'" in text
    assert re.search(message, text), text


def test_errors_of_a_built_layer():
    rng = np.random.default_rng(11)
    arrays = sequences(rng, 3, 2, 4)
    layer, bottom, top = build("LSTM", 2, arrays)
    run_forward(layer, bottom, top)
    with pytest.raises(LayerError, match="sequence continuation"):
        layer.backward(top, [True, True], bottom)
    with pytest.raises(LayerError, match="number of timesteps"):
        layer.reshape(blobs_from([np.zeros((4, 2, 4)), np.ones((4, 2))]), top)
    with pytest.raises(LayerError, match="features per step"):
        layer.reshape(blobs_from([np.zeros((3, 2, 5)), np.ones((3, 2))]), top)
    loaded = caffe_pb2.LayerParameter()
    text_format.Parse('name: "rec" type: "LSTM" recurrent_param { num_output: 2 }', loaded)
    for shape in [(8, 4), (8,), (8, 3)]:       # W_hc should be (8, 2)
        blob = loaded.blobs.add()
        blob.shape.dim.extend(shape)
        blob.data.extend([0.0] * int(np.prod(shape)))
    with pytest.raises(LayerError, match=r"parameter blob 2 \(W_hc\) must have the shape"):
        setup_layer(create_layer(loaded, TRAIN, F64), arrays)


def test_lrcn_style_net_trains():
    """Embed -> LSTM -> InnerProduct on axis 2 -> SoftmaxWithLoss / Accuracy on axis 2
    with ignore_label, as LRCN's captioning nets stack them: the solver learns a fixed
    sequence (cont resets in the middle of one stream)."""
    from caffelite.proto import caffe_pb2
    from caffelite.solver import get_solver
    T, N, V = 6, 3, 12
    uniform = 'weight_filler { type: "uniform" min: -0.08 max: 0.08 }'
    param, _ = prototxt.parse_net(f'''
        layer {{ name: "in" type: "Input" top: "words" top: "cont" top: "target"
          input_param {{ shape {{ dim: {T} dim: {N} }} shape {{ dim: {T} dim: {N} }}
                        shape {{ dim: {T} dim: {N} }} }} }}
        layer {{ name: "embed" type: "Embed" bottom: "words" top: "emb"
          embed_param {{ input_dim: {V} num_output: 8 bias_term: false {uniform} }} }}
        layer {{ name: "lstm" type: "LSTM" bottom: "emb" bottom: "cont" top: "h"
          recurrent_param {{ num_output: 10 {uniform} }} }}
        layer {{ name: "pred" type: "InnerProduct" bottom: "h" top: "pred"
          inner_product_param {{ num_output: {V} axis: 2 {uniform} }} }}
        layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "pred" bottom: "target"
          top: "loss" loss_param {{ ignore_label: -1 }} softmax_param {{ axis: 2 }} }}
        layer {{ name: "acc" type: "Accuracy" bottom: "pred" bottom: "target" top: "acc"
          accuracy_param {{ axis: 2 ignore_label: -1 }} }}''')
    sp = caffe_pb2.SolverParameter(base_lr=0.5, lr_policy="fixed", momentum=0.9,
                                   max_iter=100, display=0, random_seed=3)
    sp.train_net_param.CopyFrom(param)
    solver = get_solver(sp)
    net = solver.net
    seq = np.random.default_rng(0).integers(0, V, (T + 1, N))
    cont = np.ones((T, N))
    cont[0] = 0
    cont[3, 1] = 0
    target = seq[1:].astype(float)
    target[5, 2] = -1
    net.blobs["words"].data[...] = seq[:-1]
    net.blobs["cont"].data[...] = cont
    net.blobs["target"].data[...] = target
    solver.step(1)
    first = float(net.blobs["loss"].data)
    assert abs(first - np.log(V)) < 0.05         # small weights: a uniform prediction
    solver.step(59)
    assert float(net.blobs["loss"].data) < 0.7 * first


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_backward_is_unconditional_as_bvlcs_unrolled_net(kind):
    """BVLC's unrolled net gives every parameter its gradient (lr_mult 0 too) and x and
    x_static their diffs whatever propagate_down says: a Split feeding them elsewhere
    then adds them up, and clip_gradients counts the frozen diffs."""
    rng = np.random.default_rng(3)
    arrays = sequences(rng, 4, 2, 3, static=2)
    layer, bottom, top = build(kind, 3, arrays)
    layer.forward(bottom, top)
    layer.param_propagate_down = [False] * len(layer.blobs)
    backward(layer, bottom, top, [rng.standard_normal(top[0].shape)], [False, False, False])
    for blob in layer.blobs:
        assert np.abs(blob.diff).max() > 0
    for b in (bottom[0], bottom[2]):
        assert np.all(np.isfinite(b.diff)) and np.abs(b.diff).max() > 0


def test_lstm_unit_writes_both_diffs_when_either_is_asked():
    rng = np.random.default_rng(4)
    layer = make_layer('type: "LSTMUnit"', TRAIN, F64)
    arrays = [rng.standard_normal((1, 2, 3)), rng.standard_normal((1, 2, 12)),
              np.ones((1, 2))]
    bottom, top = setup_layer(layer, arrays, num_top=2, dtype=F64)
    layer.forward(bottom, top)
    for t in top:
        t.diff[...] = rng.standard_normal(t.shape)

    def diffs(propagate_down):
        bottom[0].diff[...] = np.nan
        bottom[1].diff[...] = np.nan
        layer.backward(top, propagate_down, bottom)
        return bottom[0].diff.copy(), bottom[1].diff.copy()

    both = diffs([True, True, False])
    assert all(np.all(np.isfinite(d)) for d in both)
    for asked in ([False, True, False], [True, False, False]):
        for got, want in zip(diffs(asked), both):
            np.testing.assert_array_equal(got, want)
