"""BVLC Caffe's recurrent layers: RNN and LSTM (``RecurrentLayer``) and LSTMUnit.

BVLC builds an unrolled Net inside each RNN/LSTM layer (one InnerProduct, Scale,
Eltwise and LSTMUnit/TanH layer per timestep). Here the same computation runs as a
loop over the T timesteps, with the unrolled net's operations in its order: the input
projection of all timesteps as one GEMM (as BVLC's x_transform), then per step the
recurrent GEMM, the sums, the cell (RNN: the tanh, the output GEMM and tanh); backward
runs the steps last to first, adding each step's weight gradients as BVLC's shared
parameters receive them. With float data the layers give the bits of that unrolled net
built from caffelite's own InnerProduct/Scale/Eltwise/LSTMUnit/TanH layers (tested).
T is fixed at setup (BVLC's "input number of timesteps changed"); N may change.

Bottoms and tops (``recurrent_param``: num_output H, weight_filler, bias_filler,
expose_hidden; S = 1 for RNN, 2 for LSTM):

* x (T x N x ...): T timesteps of N interleaved streams; the axes from 2 on are the
  features (I values per step and stream; at least 3 axes, as the unrolled net's
  InnerProduct on axis 2 needs);
* cont (T x N): sequence continuation indicators. The state entering step t is
  multiplied by cont_t (0 starts a new sequence);
* x_static (N x ...), optional: a per-stream input added at every timestep; it is
  there when the layer has more bottoms than 2 (+ S with expose_hidden);
* with expose_hidden, the initial states: RNN h_0, LSTM h_0 then c_0 (1 x N x H);
* tops: the output (T x N x H), and with expose_hidden the final states (RNN h_T,
  LSTM h_T then c_T; 1 x N x H).

Without expose_hidden the layer starts each forward pass from the states its previous
pass ended with (zeros at first), as BVLC copies h_T/c_T into h_0/c_0: an old state
only survives where cont_1 is not 0. BVLC's state blobs keep their memory when N
shrinks (the first N streams' states carry on) and start from zeros when N grows past
what they held; the same holds here.

Parameter blobs, in BVLC's order (the order of the unrolled net's owners):

* LSTM: W_xc (4H x I), b_c (4H), [W_xc_static (4H x I_static)], W_hc (4H x H); the 4H
  axis holds the gates in the order i, f, o, g;
* RNN: W_xh (H x I), b_h (H), [W_xh_static (H x I_static)], W_hh (H x H),
  W_ho (H x H), b_o (H).

Weights take weight_filler and biases bias_filler. BVLC's unrolled net runs the
fillers of every timestep's copy of the recurrent weights (W_hc; W_hh, W_ho, b_o) and
then shares the first step's; the draws of the later copies are made and dropped here
as well, so a seeded net gets BVLC's initial weights in every layer (constant fillers
draw nothing and are skipped). That costs (T - 1) fills of those blobs; without a
random seed (whose stream differs from run to run anyway) they are not made.

Formulas. LSTM step t: gates = (W_hc (cont_t h_{t-1}) + (W_xc x_t + b_c)) [+ W_xc_static
x_static], then the LSTMUnit below; h_t is the output. RNN step t:
h_t = tanh(W_hh (cont_t h_{t-1}) + (W_xh x_t + b_h) [+ W_xh_static x_static]),
o_t = tanh(W_ho h_t + b_o); o is the output.

LSTMUnit (bottoms c_prev (1 x N x H), gates (1 x N x 4H), cont (1 x N); tops c, h;
no parameters): the gate inputs are the blocks i, f, o, g; i, f, o = sigmoid(.),
g = tanh(.), with BVLC's sigmoid 1 / (1 + exp(-x)) and tanh 2 sigmoid(2x) - 1;
f' = cont f; c = f' c_prev + i g; h = o tanh(c). On the host as BVLC's CPU code
(f' = 0 where cont is 0; for float data both functions evaluated in C's double and
rounded once, as a GCC of the fork's era (< 6) builds the CPU code's unqualified exp;
Debian's GCC 10 build of BVLC 1.0 takes expf for the sigmoid, one ulp apart at times);
on the device as its GPU kernels (all in the data's type). Backward: the CPU code's formulas on the host, its
GPU kernels' on the device: they differ only when cont is neither 0 nor 1, where the
CPU code's forget gate gradient is c_term c_prev f' (1 - f') with the scaled gate f'
(the kernels' is the derivative, cont c_term c_prev f (1 - f)).

Gradients, as BVLC's unrolled net gives them: to x, x_static and every parameter,
whenever the layer runs backward at all (BVLC ignores propagate_down and lr_mult 0
there); never to cont (an error, as in BVLC); the recurrent weight gradients add up
over the timesteps. LSTMUnit likewise writes both of its diffs when either is asked. BVLC's RecurrentLayer shares only the DATA of the exposed hidden-state
blobs, so no gradient reaches the h_0/c_0 bottoms (their diffs are zeroed here, BVLC
leaves them as they are) and the diffs of the h_T/c_T tops are not read.
``exposed_hidden_gradients = True`` on a layer (not a BVLC option) makes it
back-propagate through them instead: h_T/c_T diffs in, true h_0/c_0 gradients out.

Not reproduced: two RNN/LSTM layers sharing their parameters by name give BVLC's TRAIN
nets different results (its RecurrentLayer re-shares the unrolled net's per-timestep
weight copies only in TEST, "Hacky fix for test time"); here both use the shared values
in either phase, as BVLC's TEST nets do. BVLC's unrolled net ignores parameter blobs written into the layer's
LayerParameter (it always fills, drawing from the generator); here they are used and
nothing is drawn, as for every caffelite layer (a caffemodel's weights load as in
BVLC). recurrent_param.debug_info (the unrolled net's
per-layer log) logs nothing. The GEMMs' and sums' last bits are BLAS's/cuBLAS's, as
everywhere in caffelite.
"""
import math

import numpy as np

from .. import backend
from ..backend import get_array_module
from ..blob import Blob
from ..filler import FillerError, fill
from ..kernels.cublas import gemm
from ..layer import TEST, Layer, register
from ._cpu_math import double
from ._device import on_device
from .im2col import view


# ------------------------------------------------------------------ the LSTM cell
def _sigmoid(xp, x):
    """BVLC LSTMUnit's sigmoid, 1 / (1 + exp(-x)), in x's dtype (host float: in double)."""
    with np.errstate(over="ignore"):
        return (1 / (1 + xp.exp(-double(xp, x)))).astype(x.dtype, copy=False)


def _cell_tanh(xp, x):
    """BVLC LSTMUnit's tanh, 2 sigmoid(2x) - 1 (the CPU code's runs in double)."""
    with np.errstate(over="ignore"):
        return (2 / (1 + xp.exp(-2 * double(xp, x))) - 1).astype(x.dtype, copy=False)


def _gates(acts, hidden):
    return [acts[:, k * hidden:(k + 1) * hidden] for k in range(4)]


def _scaled_forget(xp, cont, forget):
    """cont * f, and 0 where cont is 0 on the host (BVLC's CPU code)."""
    scaled = cont[:, None] * forget
    if on_device(xp):
        return scaled
    return np.where(cont[:, None] == 0, forget.dtype.type(0), scaled)


def _unit_forward(xp, c_prev, gates, cont, acts, c, h):
    """One LSTMUnit step on (N, H) / (N, 4H) / (N,) arrays: writes the activated gates
    into ``acts``, the cell into ``c``, the hidden state into ``h``; returns tanh(c)."""
    hidden = c_prev.shape[1]
    acts[:, :3 * hidden] = _sigmoid(xp, gates[:, :3 * hidden])
    acts[:, 3 * hidden:] = _cell_tanh(xp, gates[:, 3 * hidden:])
    i, f, o, g = _gates(acts, hidden)
    c[...] = _scaled_forget(xp, cont, f) * c_prev + i * g
    tanh_c = _cell_tanh(xp, c)
    h[...] = o * tanh_c
    return tanh_c


def _unit_backward(xp, c_prev, acts, cont, tanh_c, dc, dh, dc_prev, dgates):
    """LSTMUnit's backward for one step: from the cell and hidden diffs ``dc``, ``dh``
    into ``dc_prev`` (N, H) and the gate diffs ``dgates`` (N, 4H)."""
    hidden = c_prev.shape[1]
    i, f, o, g = _gates(acts, hidden)
    di, df, do, dg = _gates(dgates, hidden)
    c_term = dc + dh * o * (1 - tanh_c * tanh_c)
    if on_device(xp):            # the GPU kernels: cont scales the cell diff
        scaled = cont[:, None] * c_term
        dc_prev[...] = scaled * f
        df[...] = scaled * c_prev * f * (1 - f)
    else:                        # the CPU code: the scaled gate f' throughout
        f = _scaled_forget(xp, cont, f)
        dc_prev[...] = c_term * f
        df[...] = c_term * c_prev * f * (1 - f)
    di[...] = c_term * g * i * (1 - i)
    do[...] = dh * tanh_c * o * (1 - o)
    dg[...] = c_term * i * (1 - g * g)


def _neuron_tanh(xp, x):
    """The TanH layer's tanh (host float: C's double tanh, rounded once)."""
    return xp.tanh(double(xp, x)).astype(x.dtype, copy=False)


@register("LSTMUnit")
class LSTMUnitLayer(Layer):
    """BVLC's LSTMUnit: one step of the LSTM cell (see the module docstring)."""
    exact_num_bottom = 3
    exact_num_top = 2

    def allow_force_backward(self, bottom_index):
        return bottom_index != 2

    def reshape(self, bottom, top):
        num = bottom[0].shape[1] if bottom[0].num_axes > 1 else None
        for i, (blob, what) in enumerate(zip(bottom, ("c_prev", "gate input", "cont"))):
            axes = 2 if i == 2 else 3
            if blob.num_axes != axes or blob.shape[0] != 1 or blob.shape[1] != num:
                want = "(1, N)" if i == 2 else ("(1, N, H)" if i == 0 else "(1, N, 4H)")
                raise self.error(f"bottom {i} ({what}) must have the shape {want} with N "
                                 f"from bottom 0 {bottom[0].shape}, got {blob.shape}")
        self.hidden = bottom[0].shape[2]
        if bottom[1].shape[2] != 4 * self.hidden:
            raise self.error(f"bottom 1 (gate input) must have 4 x {self.hidden} = "
                             f"{4 * self.hidden} values per stream (4 x bottom 0's), got "
                             f"shape {bottom[1].shape}")
        top[0].reshape(bottom[0].shape)
        top[1].reshape(bottom[0].shape)

    def _views(self, bottom):
        num, hidden = bottom[0].shape[1], self.hidden
        return (view(bottom[0].data, (num, hidden)), view(bottom[1].data, (num, 4 * hidden)),
                view(bottom[2].data, (num,)))

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        c_prev, gates, cont = self._views(bottom)
        acts = xp.empty_like(gates)
        _unit_forward(xp, c_prev, gates, cont, acts, view(top[0].data, c_prev.shape),
                      view(top[1].data, c_prev.shape))

    def backward(self, top, propagate_down, bottom):
        if propagate_down[2]:
            raise self.error("cannot backpropagate to the sequence continuation indicators "
                             "(bottom 2)")
        if not (propagate_down[0] or propagate_down[1]):
            return
        xp = get_array_module(top[0].diff)
        c_prev, gates, cont = self._views(bottom)
        hidden = self.hidden
        # As BVLC's backward: the gates again from the bottom, tanh(c) from the top.
        acts = xp.empty_like(gates)
        acts[:, :3 * hidden] = _sigmoid(xp, gates[:, :3 * hidden])
        acts[:, 3 * hidden:] = _cell_tanh(xp, gates[:, 3 * hidden:])
        tanh_c = _cell_tanh(xp, view(top[0].data, c_prev.shape))
        dc_prev = xp.empty_like(c_prev)
        dgates = xp.empty_like(gates)
        _unit_backward(xp, c_prev, acts, cont, tanh_c, view(top[0].diff, c_prev.shape),
                       view(top[1].diff, c_prev.shape), dc_prev, dgates)
        # BVLC writes both diffs whenever either is asked for.
        view(bottom[0].diff, c_prev.shape)[...] = dc_prev
        view(bottom[1].diff, gates.shape)[...] = dgates


# ------------------------------------------------------------------ RNN and LSTM
class _RecurrentLayer(Layer):
    """BVLC's RecurrentLayer: bottoms, tops, checks, parameters and the carried state;
    the subclasses give the per-step computation."""
    num_states = 1             # recurrent state blobs (h; LSTM: h, c)
    gate_factor = 1            # rows of the input weights per output (LSTM: 4 gates)
    state_names = ("h",)
    # Not a BVLC option: back-propagate through exposed h_0/c_0 and h_T/c_T.
    exposed_hidden_gradients = False

    def __init__(self, layer_param, phase=TEST, dtype=np.float32):
        super().__init__(layer_param, phase, dtype)
        exposed = self.num_states if layer_param.recurrent_param.expose_hidden else 0
        self.min_bottom = 2 + exposed
        self.max_bottom = 3 + exposed
        self.exact_num_top = 1 + exposed

    def allow_force_backward(self, bottom_index):
        return bottom_index != 1

    # ---- setup ----------------------------------------------------------------
    def setup(self, bottom, top):
        p = self.layer_param.recurrent_param
        x = bottom[0]
        if x.num_axes < 3:
            raise self.error(f"bottom 0 (x) needs a feature axis after (timesteps, streams) "
                             f"(the input InnerProduct works on axis 2), got shape {x.shape}")
        self.T, self.N = x.shape[0], x.shape[1]
        self._check_cont(bottom)
        self.expose_hidden = p.expose_hidden
        self.static_input = len(bottom) > 2 + self.num_states * int(self.expose_hidden)
        if self.static_input:
            xs = bottom[2]
            if xs.num_axes < 1 or xs.shape[0] != self.N:
                raise self.error(f"bottom 2 (x_static) must have the {self.N} streams of "
                                 f"bottom 0 {x.shape} on its first axis, got shape "
                                 f"{xs.shape}")
        self.num_output = p.num_output
        if self.num_output <= 0:
            raise self.error("recurrent_param.num_output must be given and positive")
        self.k = math.prod(x.shape[2:])
        if self.static_input:
            if bottom[2].num_axes < 2:
                raise self.error(f"bottom 2 (x_static) needs a feature axis after the "
                                 f"streams (its InnerProduct works on axis 1), got shape "
                                 f"{bottom[2].shape}")
            self.k_static = math.prod(bottom[2].shape[1:])
        plan = self._fill_plan()
        kept = [(shape, kind) for shape, kind, keep in plan if keep]
        if self.blobs_loaded():
            if len(self.blobs) != len(kept):
                raise self.error(f"expected {len(kept)} parameter blobs, got "
                                 f"{len(self.blobs)}")
            for i, ((shape, _), blob) in enumerate(zip(kept, self.blobs)):
                if tuple(blob.shape) != shape:
                    raise self.error(f"parameter blob {i} ({self.blob_names()[i]}) must "
                                     f"have the shape {shape}, got {tuple(blob.shape)}")
        else:
            for shape, kind, keep in plan:
                filler = p.weight_filler if kind == "weight" else p.bias_filler
                if keep:
                    self._fill(self.new_param_blob(shape), filler, kind)
                elif filler.type != "constant" and backend.seeded():
                    # An unrolled copy BVLC fills, then replaces by the shared blob
                    # (only a seeded run can tell: an unseeded stream is random anyway,
                    # and a gaussian fill of 4000 x 1000 takes seconds).
                    self._fill(Blob(shape, self.dtype), filler, kind)
        # The states carried from one forward to the next (BVLC's h_T/c_T blobs).
        self._carried = [] if self.expose_hidden else [
            Blob((1, self.N, self.num_output), self.dtype) for _ in range(self.num_states)]
        self._cache = None

    def _fill(self, blob, filler_param, kind):
        try:
            fill(blob, filler_param)
        except FillerError as e:
            raise self.error(f"recurrent_param.{kind}_filler: {e}") from None

    def _first_state_bottom(self):
        """The index of the h_0 bottom (expose_hidden): after x, cont and x_static."""
        return 2 + int(self.static_input)

    def _check_cont(self, bottom):
        cont = bottom[1]
        if cont.num_axes != 2 or cont.shape != (self.T, self.N):
            raise self.error(f"bottom 1 (cont) must have the shape (timesteps, streams) = "
                             f"({self.T}, {self.N}) of bottom 0 {bottom[0].shape}, got "
                             f"{cont.shape}")

    def _fill_plan(self):
        """[(shape, "weight" or "bias", kept)] in the order BVLC's unrolled net fills."""
        rows = self.gate_factor * self.num_output
        plan = [((rows, self.k), "weight", True), ((rows,), "bias", True)]
        if self.static_input:
            plan.append(((rows, self.k_static), "weight", True))
        for t in range(self.T):
            plan.extend((shape, kind, t == 0) for shape, kind in self._step_params())
        return plan

    # ---- reshape ----------------------------------------------------------------
    def reshape(self, bottom, top):
        x = bottom[0]
        if x.num_axes < 3:
            raise self.error(f"bottom 0 (x) must have the axes (timesteps, streams, "
                             f"features...), got shape {x.shape}")
        if x.shape[0] != self.T:
            raise self.error(f"the number of timesteps of bottom 0 changed: {self.T} at "
                             f"setup, now shape {x.shape}")
        self.N = x.shape[1]
        self._check_cont(bottom)
        if math.prod(x.shape[2:]) != self.k:
            raise self.error(f"bottom 0 {x.shape} has {math.prod(x.shape[2:])} features per "
                             f"step and stream, the input weights expect {self.k}")
        if self.static_input:
            xs = bottom[2]
            if xs.num_axes < 2 or xs.shape[0] != self.N or \
                    math.prod(xs.shape[1:]) != self.k_static:
                raise self.error(f"bottom 2 (x_static) must have the shape ({self.N}, ...) "
                                 f"with {self.k_static} features per stream, got "
                                 f"{xs.shape}")
        state_shape = (1, self.N, self.num_output)
        if self.expose_hidden:
            first = self._first_state_bottom()
            for j, name in enumerate(self.state_names):
                if bottom[first + j].shape != state_shape:
                    raise self.error(f"bottom {first + j} ({name}_0) must have the hidden "
                                     f"state's shape {state_shape}, got "
                                     f"{bottom[first + j].shape}")
            for j in range(self.num_states):
                top[1 + j].reshape(state_shape)
        for state in self._carried:
            state.reshape(state_shape)       # keeps its memory unless it grows
        top[0].reshape((self.T, self.N, self.num_output))

    def reset(self):
        """BVLC's Reset(): zero the states carried to the next forward pass."""
        for state in self._carried:
            state.data[...] = 0

    # ---- shared pieces of forward and backward ----------------------------------
    def _input_projection(self, xp, bottom, rows):
        """(W x + b) for every timestep, (T, N, rows); the static part (N, rows)."""
        T, N = self.T, self.N
        pre = xp.empty((T, N, rows), self.dtype)
        gemm(xp, view(bottom[0].data, (T * N, self.k)), self.blobs[0].data.T,
             view(pre, (T * N, rows)))
        pre += self.blobs[1].data
        static = None
        if self.static_input:
            static = xp.empty((N, rows), self.dtype)
            gemm(xp, view(bottom[2].data, (N, self.k_static)), self.blobs[2].data.T, static)
        return pre, static

    def _initial_states(self, xp, bottom):
        shape = (self.N, self.num_output)
        if self.expose_hidden:
            first = self._first_state_bottom()
            return [view(bottom[first + j].data, shape) for j in range(self.num_states)]
        return [view(state.data, shape) for state in self._carried]

    def _finish_forward(self, top, finals):
        shape = (self.N, self.num_output)
        if self.expose_hidden:
            for j, final in enumerate(finals):
                view(top[1 + j].data, shape)[...] = final
        else:
            for state, final in zip(self._carried, finals):
                view(state.data, shape)[...] = final

    def _input_backward(self, xp, bottom, dpre):
        """Backward through the input projections from the per-step diffs (T, N, rows).

        As BVLC's unrolled net, unconditionally: every parameter gets its gradient
        (lr_mult 0 included) and x and x_static their diffs, whatever propagate_down
        says (a Split feeding them elsewhere then adds them up as in BVLC)."""
        T, N = self.T, self.N
        rows = dpre.shape[2]
        flat = view(dpre, (T * N, rows))
        gemm(xp, flat.T, view(bottom[0].data, (T * N, self.k)), self.blobs[0].diff,
             accumulate=True)
        self.blobs[1].diff[...] += flat.sum(axis=0)
        gemm(xp, flat, self.blobs[0].data, view(bottom[0].diff, (T * N, self.k)))
        if not self.static_input:
            return
        # The unrolled net's Split sums the T steps' diffs in step order.
        dstatic = dpre[0].copy()
        for t in range(1, T):
            dstatic += dpre[t]
        gemm(xp, dstatic.T, view(bottom[2].data, (N, self.k_static)),
             self.blobs[2].diff, accumulate=True)
        gemm(xp, dstatic, self.blobs[2].data, view(bottom[2].diff, (N, self.k_static)))

    def _check_backward(self, propagate_down):
        if propagate_down[1]:
            raise self.error("cannot backpropagate to the sequence continuation indicators "
                             "(bottom 1)")

    def _exposed_top_diffs(self, xp, top):
        """The h_T/c_T top diffs when back-propagating through them, else None."""
        if not (self.expose_hidden and self.exposed_hidden_gradients):
            return None
        shape = (self.N, self.num_output)
        return [view(top[1 + j].diff, shape) for j in range(self.num_states)]

    def _initial_state_diffs(self, propagate_down, bottom, diffs):
        """The h_0/c_0 bottom diffs: ``diffs`` (exposed_hidden_gradients), else zeros."""
        if not self.expose_hidden:
            return
        first = self._first_state_bottom()
        for j in range(self.num_states):
            if propagate_down[first + j]:
                target = bottom[first + j].diff
                if self.exposed_hidden_gradients:
                    view(target, diffs[j].shape)[...] = diffs[j]
                else:
                    target[...] = 0

    def _through_recurrence(self, xp, dpre, cont, h_prev, weight, need_dh):
        """The recurrent GEMM's part of a step's backward: the gradient of its weight
        (its input was cont h_{t-1}; added whatever lr_mult, as in BVLC) and, if
        ``need_dh``, the gradient sent on to h_{t-1} (through the cont scaling), else
        None."""
        cont = cont[:, None]
        gemm(xp, dpre.T, cont * h_prev, weight.diff, accumulate=True)
        if not need_dh:
            return None
        dh = xp.empty((dpre.shape[0], weight.shape[1]), self.dtype)
        gemm(xp, dpre, weight.data, dh)
        return dh * cont

    def _needs_initial_state_diffs(self, propagate_down):
        if not (self.expose_hidden and self.exposed_hidden_gradients):
            return False
        first = self._first_state_bottom()
        return any(propagate_down[first:first + self.num_states])


@register("LSTM")
class LSTMLayer(_RecurrentLayer):
    """BVLC's LSTM (see the module docstring)."""
    num_states = 2
    gate_factor = 4
    state_names = ("h", "c")

    def blob_names(self):
        return ["W_xc", "b_c"] + (["W_xc_static"] if self.static_input else []) + ["W_hc"]

    def _step_params(self):
        return [((4 * self.num_output, self.num_output), "weight")]

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        T, N, H = self.T, self.N, self.num_output
        pre, static = self._input_projection(xp, bottom, 4 * H)
        w_hc = self.blobs[-1].data
        cont = bottom[1].data
        h0, c0 = self._initial_states(xp, bottom)
        hs = xp.empty((T + 1, N, H), self.dtype)
        cs = xp.empty((T + 1, N, H), self.dtype)
        hs[0] = h0
        cs[0] = c0
        acts = xp.empty((T, N, 4 * H), self.dtype)
        tanh_c = xp.empty((T, N, H), self.dtype)
        gates = xp.empty((N, 4 * H), self.dtype)
        for t in range(T):
            gemm(xp, cont[t][:, None] * hs[t], w_hc.T, gates)     # W_hc (cont_t h_{t-1})
            gates += pre[t]
            if static is not None:
                gates += static
            tanh_c[t] = _unit_forward(xp, cs[t], gates, cont[t], acts[t], cs[t + 1],
                                      hs[t + 1])
        top[0].data[...] = hs[1:]
        self._finish_forward(top, (hs[T], cs[T]))
        self._cache = (hs, cs, acts, tanh_c)

    def backward(self, top, propagate_down, bottom):
        self._check_backward(propagate_down)
        xp = get_array_module(top[0].diff)
        T, N, H = self.T, self.N, self.num_output
        hs, cs, acts, tanh_c = self._cache
        cont = bottom[1].data
        w_hc = self.blobs[-1]
        dtop = top[0].diff
        exposed = self._exposed_top_diffs(xp, top)
        dh_next, dc = (None, xp.zeros((N, H), self.dtype)) if exposed is None else \
            (exposed[0], exposed[1].copy())
        need_first = self._needs_initial_state_diffs(propagate_down)
        dgates = xp.empty((T, N, 4 * H), self.dtype)
        dc_prev = xp.empty((N, H), self.dtype)
        for t in range(T - 1, -1, -1):
            dh = dtop[t] if dh_next is None else dh_next + dtop[t]
            _unit_backward(xp, cs[t], acts[t], cont[t], tanh_c[t], dc, dh, dc_prev,
                           dgates[t])
            dc, dc_prev = dc_prev, dc
            dh_next = self._through_recurrence(xp, dgates[t], cont[t], hs[t], w_hc,
                                               t > 0 or need_first)
        self._input_backward(xp, bottom, dgates)
        self._initial_state_diffs(propagate_down, bottom, (dh_next, dc))


@register("RNN")
class RNNLayer(_RecurrentLayer):
    """BVLC's RNN (see the module docstring)."""

    def blob_names(self):
        return ["W_xh", "b_h"] + (["W_xh_static"] if self.static_input else []) + \
            ["W_hh", "W_ho", "b_o"]

    def _step_params(self):
        H = self.num_output
        return [((H, H), "weight"), ((H, H), "weight"), ((H,), "bias")]

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        T, N, H = self.T, self.N, self.num_output
        pre, static = self._input_projection(xp, bottom, H)
        w_hh, w_ho, b_o = (b.data for b in self.blobs[-3:])
        cont = bottom[1].data
        (h0,) = self._initial_states(xp, bottom)
        hs = xp.empty((T + 1, N, H), self.dtype)
        hs[0] = h0
        out = xp.empty((T, N, H), self.dtype)
        total = xp.empty((N, H), self.dtype)
        for t in range(T):
            gemm(xp, cont[t][:, None] * hs[t], w_hh.T, total)    # W_hh (cont_t h_{t-1})
            total += pre[t]
            if static is not None:
                total += static
            hs[t + 1] = _neuron_tanh(xp, total)
            gemm(xp, hs[t + 1], w_ho.T, total)                   # W_ho h_t + b_o
            total += b_o
            out[t] = _neuron_tanh(xp, total)
        top[0].data[...] = out
        self._finish_forward(top, (hs[T],))
        self._cache = (hs, out)

    def backward(self, top, propagate_down, bottom):
        self._check_backward(propagate_down)
        xp = get_array_module(top[0].diff)
        T, N, H = self.T, self.N, self.num_output
        hs, out = self._cache
        cont = bottom[1].data
        w_hh, w_ho, b_o = self.blobs[-3:]
        dtop = top[0].diff
        exposed = self._exposed_top_diffs(xp, top)
        dh_next = None if exposed is None else exposed[0]
        need_first = self._needs_initial_state_diffs(propagate_down)
        dpre = xp.empty((T, N, H), self.dtype)
        dh = xp.empty((N, H), self.dtype)
        for t in range(T - 1, -1, -1):
            # The output TanH and InnerProduct of step t, then the hidden TanH.
            dout = dtop[t] * (1 - out[t] * out[t])
            gemm(xp, dout.T, hs[t + 1], w_ho.diff, accumulate=True)
            b_o.diff[...] += dout.sum(axis=0)
            gemm(xp, dout, w_ho.data, dh)
            if dh_next is not None:
                dh += dh_next
            dpre[t] = dh * (1 - hs[t + 1] * hs[t + 1])
            dh_next = self._through_recurrence(xp, dpre[t], cont[t], hs[t], w_hh,
                                               t > 0 or need_first)
        self._input_backward(xp, bottom, dpre)
        self._initial_state_diffs(propagate_down, bottom, (dh_next,))
