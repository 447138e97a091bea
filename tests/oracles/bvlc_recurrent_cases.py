"""RNN, LSTM and LSTMUnit cases that tests/test_bvlc_oracle.py runs through caffelite and
the real BVLC Caffe 1.0, written with the helpers of bvlc_layer_cases.py (plain numpy, as
there).  Bottoms: x (timesteps T, streams N, features), cont (T, N), the optional static
input (N, features) and, with expose_hidden, the initial states (1, N, hidden).

Every LSTM and LSTMUnit case compares within the tolerance, never ``exact``: BVLC's
LSTMUnit rounds its float sigmoid's exp to float (expf) before the division, caffelite
evaluates it in double, and about one element in eight differs by an ulp.  The checks a
setup makes are RecurrentLayer's for both types on both sides, so the refused cases are
all LSTM's, and RNN's only where the type matters (its own num_output check, one hidden
state, two tops, its own fillers).

Left out as known differences:
  RNN or LSTM layers sharing their parameters by name, in the TRAIN phase (BVLC points
  the unrolled net's copies for timesteps 2..T at the shared blobs again only in TEST,
  "hacky fix for test time", so the second layer's later timesteps keep their own
  filler values; caffelite shares them);
  RNN of 12 timesteps with weights of std 0.5 over two passes (chaotic: a 1-ulp change
  of x in the first pass moves y in the second by 1e-3; the same sizes with std 0.1 are
  here).
"""
from bvlc_layer_cases import LayerCase, TRAIN, constant, layer, normal, ones

CASES = []


def case(name, inputs, layers, **options):
    CASES.append(LayerCase(name, inputs, layers, **options))


def refused(name, inputs, layers, **options):
    case(name, inputs, layers, refused=True, **options)


def rp(num_output, extra=""):
    return "recurrent_param { num_output: %d %s }" % (num_output, extra)


def cont(*values):
    """Continuation indicators (T, N) row by row: 0 starts a sequence."""
    return constant(values)


def some_starts(shape, rng):
    return rng.random(shape) > 0.2


CONT = ("cont", (4, 3), cont(0, 0, 1, 1, 1, 0, 1, 0, 1, 1, 1, 1))
SMALL = [("x", (3, 2, 4)), ("cont", (3, 2), ones)]
LOSS = layer("EuclideanLoss", "loss", ["y", "t"], "loss")
FILLERS = [("gaussian_uniform", "gaussian' std: 0.7", "uniform' min: -0.4 max: 0.9"),
           ("xavier_constant", "xavier'", "constant' value: 0.3"),
           ("msra_unitball", "msra'", "positive_unitball'")]

for kind in ("LSTM", "RNN"):
    lo = kind.lower()
    states = ["h0", "c0"][:1 if kind == "RNN" else 2]
    finals = ["hT", "cT"][:len(states)]
    names = (["W_xc", "b_c", "W_hc"] if kind == "LSTM" else
             ["W_xh", "b_h", "W_hh", "W_ho", "b_o"])

    def rnn(bottoms, tops, params, name="r"):
        return layer(kind, name, bottoms, tops, params)

    # one pass; cont = 0 starts sequences in the middle of the batch
    case(lo + "_basic", [("x", (4, 3, 5)), CONT], rnn(["x", "cont"], "y", rp(6)))
    case(lo + "_x_4d", [("x", (3, 2, 2, 3)), ("cont", (3, 2), cont(0, 0, 1, 1, 0, 1))],
         rnn(["x", "cont"], "y", rp(4)))
    case(lo + "_cont_not_binary_debug_info", [("x", (3, 2, 3)),
                                             ("cont", (3, 2), cont(0.5, 2, 1, -1, 0.25, 0))],
         rnn(["x", "cont"], "y", rp(4, "debug_info: true")))
    case(lo + "_static_4d", [("x", (2, 3, 2)), ("cont", (2, 3), cont(0, 1, 0, 1, 1, 0)),
                             ("xs", (3, 2, 1, 2))], rnn(["x", "cont", "xs"], "y", rp(3)))
    case(lo + "_saturated", [("x", (3, 2, 4), normal(40)), ("cont", (3, 2), ones)],
         rnn(["x", "cont"], "y", rp(3)))
    # the state a layer carries from one forward to the next (no expose_hidden)
    case(lo + "_one_timestep_two_passes", [("x", (1, 4, 3)), ("cont", (1, 4), cont(0, 1, 0, 1))],
         rnn(["x", "cont"], "y", rp(3)), passes=2)
    case(lo + "_carried_three_passes", [("x", (4, 3, 5)), CONT],
         rnn(["x", "cont"], "y", rp(6)), phase=TRAIN,
         passes=[{}, {"cont": ones}, {"cont": cont(1, 0, 1, 1, 1, 1)}])
    # N shrinks and grows: the first streams keep their state, new ones start from 0
    case(lo + "_streams_shrink_grow", [("x", (3, 3, 2)), ("cont", (3, 3), ones)],
         rnn(["x", "cont"], "y", rp(4)),
         passes=[{"x": ((3, n, 2), None), "cont": ((3, n), ones)} for n in (3, 2, 3, 4)])
    case(lo + "_static_streams_change", [("x", (2, 3, 4)), ("cont", (2, 3), ones),
                                         ("xs", (3, 2))],
         rnn(["x", "cont", "xs"], "y", rp(3)),
         passes=[{"x": ((2, n, 4), None), "cont": ((2, n), ones), "xs": ((n, 2), None)}
                 for n in (3, 1, 4)])
    case(lo + "_accumulate_two_passes", [("x", (3, 2, 4)), ("cont", (3, 2), cont(0, 1, 1, 1, 1, 0))],
         rnn(["x", "cont"], "y", rp(3)), passes=[{}, {"cont": ones}], accumulate=True)
    # expose_hidden: h0 (c0) bottoms and hT (cT) tops, whose gradients BVLC leaves alone
    case(lo + "_expose_hidden_static",
         [("x", (3, 2, 4)), ("cont", (3, 2), cont(1, 0, 1, 1, 0, 1)), ("xs", (2, 3))]
         + [(s, (1, 2, 5)) for s in states],
         rnn(["x", "cont", "xs"] + states, ["y"] + finals, rp(5, "expose_hidden: true")),
         passes=2)
    case(lo + "_expose_hidden_chained", SMALL + [(s, (1, 2, 5)) for s in states],
         rnn(["x", "cont"] + states, ["y1"] + [f + "1" for f in finals],
             rp(5, "expose_hidden: true"), "r1")
         + rnn(["x", "cont"] + [f + "1" for f in finals], ["y2"] + [f + "2" for f in finals],
               rp(5, "expose_hidden: true"), "r2"), diffs=("y1", "y2"))
    case(lo + "_expose_hidden_losses",
         [("x", (3, 2, 4)), ("cont", (3, 2), cont(1, 1, 1, 0, 1, 1)), ("t", (3, 2, 5)),
          ("tT", (1, 2, 5))] + [(s + "_in", (1, 2, 5)) for s in states],
         "".join(layer("Scale", "s_" + s, s + "_in", s, "scale_param { axis: 2 }")
                 for s in states)
         + rnn(["x", "cont"] + states, ["y"] + finals, rp(5, "expose_hidden: true"))
         + LOSS + layer("EuclideanLoss", "loss_T", ["hT", "tT"], "loss_T"),
         force_backward=False)
    # the fillers of every unrolled copy, drawn with a seed; and the default ones
    for fillers, weights, biases in FILLERS:
        case("%s_fillers_%s" % (lo, fillers), SMALL + [("xs", (2, 3))],
             rnn(["x", "cont", "xs"], "y", "recurrent_param { num_output: 3 weight_filler { "
                 "type: '%s } bias_filler { type: '%s } }" % (weights, biases)),
             seed=1234, fillers=True)
    case(lo + "_fillers_default", SMALL, rnn(["x", "cont"], "y", rp(3)), fillers=True)
    # which gradients the backward computes
    case(lo + "_lr_mult_0", SMALL, rnn(["x", "cont"], "y", "param { lr_mult: 0 } "
                                       * len(names) + rp(3)),
         force_backward=False, diffs=("y",))
    case(lo + "_x_learned_with_loss", [("x", (4, 3, 5)), CONT, ("t", (4, 3, 6))],
         layer("Scale", "sc", "x", "xs", "scale_param { axis: 2 }")
         + rnn(["xs", "cont"], "y", rp(6)) + LOSS, force_backward=False)
    case(lo + "_x_input_with_loss", SMALL + [("xs", (2, 3)), ("t", (3, 2, 3))],
         rnn(["x", "cont", "xs"], "y", rp(3)) + LOSS, force_backward=False)
    case(lo + "_propagate_down_false", SMALL + [("t", (3, 2, 3))],
         layer("Scale", "sc", "x", "xs", "scale_param { axis: 2 }")
         + rnn(["xs", "cont"], "y", "propagate_down: false propagate_down: false " + rp(3))
         + LOSS, force_backward=False)
    case(lo + "_x_split", SMALL, rnn(["x", "cont"], "y", rp(3)) + layer("TanH", "t", "x", "z"))
    case(lo + "_loss_weight", SMALL, rnn(["x", "cont"], "y", "loss_weight: 0.5 " + rp(3)),
         force_backward=False, diffs=())
    case(lo + "_shared_params_test", [("x", (3, 2, 4)), ("cont", (3, 2), cont(0, 1, 1, 1, 1, 0))],
         "".join(rnn(["x", "cont"], "y" + i, " ".join("param { name: '%s' }" % n for n in names)
                     + " " + rp(3), "r" + i) for i in "12"))

# bigger: 12 timesteps, 6 streams, 40 features, 64 hidden, and a static input
BIG = [("x", (12, 6, 40)), ("cont", (12, 6), some_starts), ("xs", (6, 7))]
case("lstm_big", BIG, layer("LSTM", "r", ["x", "cont", "xs"], "y", rp(64)),
     passes=[{}, {"cont": ones}])
case("rnn_big_small_weights", BIG, layer("RNN", "r", ["x", "cont", "xs"], "y", rp(64)),
     passes=[{}, {"cont": ones}], params={("r", i): normal(0.1) for i in range(6)})

# refused: RecurrentLayer's checks (LSTM), and those where the type matters (both)
X = ("x", (3, 2, 4))
for kind in ("LSTM", "RNN"):
    lo = kind.lower()
    states = [("h0", (1, 2, 4)), ("c0", (1, 2, 4))][:1 if kind == "RNN" else 2]
    bottoms = ["x", "cont"] + [s for s, _ in states]
    refused(lo + "_no_num_output", SMALL, layer(kind, "r", ["x", "cont"], "y"))
    refused(lo + "_expose_hidden_wrong_h0", SMALL + states,
            layer(kind, "r", bottoms, ["y", "hT", "cT"][:1 + len(states)],
                  rp(3, "expose_hidden: true")))
    refused(lo + "_expose_hidden_one_top", SMALL + states,
            layer(kind, "r", bottoms, "y", rp(4, "expose_hidden: true")))
    refused(lo + "_unknown_filler", SMALL, layer(kind, "r", ["x", "cont"], "y",
                                                  "recurrent_param { num_output: 3 "
                                                  "weight_filler { type: 'nosuch' } }"))


def lstm(bottoms):
    return layer("LSTM", "r", bottoms, "y", rp(3))


for name, inputs in [("cont_3_axes", [X, ("cont", (3, 2, 1))]),
                     ("cont_wrong_timesteps", [X, ("cont", (2, 2))]),
                     ("cont_wrong_streams", [X, ("cont", (3, 3))]),
                     ("x_2_axes", [("x", (3, 2)), ("cont", (3, 2))])]:
    refused("lstm_" + name, inputs, lstm(["x", "cont"]))
for name, shape in [("static_wrong_streams", (3, 2)), ("static_1_axis", (2,))]:
    refused("lstm_" + name, SMALL + [("xs", shape)], lstm(["x", "cont", "xs"]))
refused("lstm_four_bottoms", SMALL + [("a", (2, 2)), ("b", (2, 2))],
        lstm(["x", "cont", "a", "b"]))
refused("lstm_backward_to_cont", SMALL + [("t", (3, 2, 3))],
        layer("Scale", "sc", "cont", "cs", "scale_param { axis: 0 num_axes: 0 }")
        + lstm(["x", "cs"]) + LOSS)
refused("lstm_timesteps_change", SMALL, lstm(["x", "cont"]),
        passes=[{}, {"x": ((4, 2, 4), None), "cont": ((4, 2), ones)}])


# LSTMUnit on its own: bottoms c_prev (1, N, H), x (1, N, 4H), cont (1, N); tops c, h
def unit(name, n, hidden, conts, scale=1.0, layers=None, **options):
    inputs = [("c_prev", (1, n, hidden), normal(scale)), ("x", (1, n, 4 * hidden), normal(scale)),
              ("cont", (1, n), cont(*conts))]
    case(name, inputs, layers or layer("LSTMUnit", "u", ["c_prev", "x", "cont"], ["c", "h"]),
         **options)


unit("lstm_unit", 4, 3, [0, 1, 1, 0])
unit("lstm_unit_cont_not_binary", 4, 3, [0.5, 2, -1, 0.25])
unit("lstm_unit_saturated", 3, 5, [1, 0, 1], scale=30)
unit("lstm_unit_gradient_of_c", 3, 2, [1, 0, 1], diffs=("c",))
unit("lstm_unit_gradient_of_h", 3, 2, [1, 0, 1], diffs=("h",))
unit("lstm_unit_x_learned", 3, 2, [1, 1, 0], force_backward=False, diffs=("c", "h"),
     layers=layer("Scale", "sc", "x", "xs", "scale_param { axis: 2 }")
     + layer("LSTMUnit", "u", ["c_prev", "xs", "cont"], ["c", "h"]))
unit("lstm_unit_c_prev_learned", 3, 2, [1, 1, 0], force_backward=False, diffs=("c", "h"),
     layers=layer("Scale", "sc", "c_prev", "cs", "scale_param { axis: 2 }")
     + layer("LSTMUnit", "u", ["cs", "x", "cont"], ["c", "h"]))
UNIT = layer("LSTMUnit", "u", ["c_prev", "x", "cont"], ["c", "h"])
for name, shapes in [("cont_3_axes", [(1, 2, 3), (1, 2, 12), (1, 2, 1)]),
                     ("x_not_4_hidden", [(1, 2, 3), (1, 2, 10), (1, 2)]),
                     ("first_axis_2", [(2, 2, 3), (2, 2, 12), (2, 2)]),
                     ("streams_differ", [(1, 2, 3), (1, 3, 12), (1, 2)]),
                     ("c_prev_2_axes", [(2, 3), (1, 2, 12), (1, 2)])]:
    refused("lstm_unit_" + name, list(zip(["c_prev", "x", "cont"], shapes)), UNIT)
U = [("c_prev", (1, 2, 3)), ("x", (1, 2, 12)), ("cont", (1, 2), ones)]
refused("lstm_unit_two_bottoms", U[:2], layer("LSTMUnit", "u", ["c_prev", "x"], ["c", "h"]))
refused("lstm_unit_one_top", U, layer("LSTMUnit", "u", ["c_prev", "x", "cont"], "c"))
refused("lstm_unit_backward_to_cont", U + [("t", (1, 2, 3))],
        layer("Scale", "sc", "cont", "cs", "scale_param { axis: 0 num_axes: 0 }")
        + layer("LSTMUnit", "u", ["c_prev", "x", "cs"], ["c", "h"])
        + layer("EuclideanLoss", "loss", ["h", "t"], "loss"))

assert len({c.name for c in CASES}) == len(CASES)
