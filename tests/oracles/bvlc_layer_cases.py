"""Small cases, most of them a single layer, that tests/test_bvlc_oracle.py runs through
caffelite and the real BVLC Caffe 1.0.  Plain numpy, no caffelite: the inputs are drawn on
caffelite's side and shipped to the oracle in inputs.npz, so the oracle never imports this
module (it would still load under its Python 3.9 and numpy 1.19).

Each case is one net: Input layers for its bottoms, then the layer(s) under test.  A case
is ``exact`` only when no layer in it sums, accumulates or calls a transcendental function,
so the two implementations cannot round differently.  The ``refused`` cases are
configurations Caffe aborts on with a failed CHECK (at setup, at a forward, or at the
backward for a bottom it cannot differentiate); caffelite must refuse them too.  The
``raises`` cases are those where pycaffe raises a Python exception instead (its
``set_input_arrays`` checks, a Python layer's own exception); caffelite must raise one of
the same class.  tests/oracles/bvlc_recurrent_cases.py holds the RNN, LSTM and LSTMUnit
cases, written with the helpers here.

Left out on purpose, because BVLC changed after the DeepLab fork that caffelite follows:
  Accuracy with tied scores (the fork's partial_sort ranks the higher class index first;
  BVLC 1.0 counts only the strictly greater scores) and with every label ignored (the fork's
  0/0 is NaN, BVLC 1.0 gives 0); SigmoidCrossEntropyLoss with ignore_label or a
  normalization (BVLC 2017 additions; the fork always divides the full sum by num);
  InfogainLoss fed probabilities (BVLC 2017 puts a softmax inside the layer); BatchNorm
  with param specs (BVLC's upgrade_proto rewrites them; caffelite follows the fork, and
  applies that upgrade only to nets the fork would refuse).
Left out as known differences: Slice with a slice_point at the end of the axis, giving
an empty top (Caffe aborts allocating it; caffelite gives the empty blob); Embed with an
index outside [0, input_dim) (BVLC's release build checks it only in debug builds and
reads past its table; caffelite refuses it); a Python layer whose module is missing
(pycaffe's Boost.Python raises a SystemError without a message, caffelite a LayerError
naming the module).  The values a Parameter layer's top holds before the first forward
(BVLC shares the parameter into it only at the forward) are never compared: the
comparison starts after a forward.
"""
import numpy as np

TRAIN, TEST = 0, 1


class LayerCase:
    """A net text, its inputs as (blob, shape, generator), and how to run and compare it.

    diffs: the tops given random gradients; None gives every output that no loss layer
    writes (loss tops keep their loss_weight).  params: (layer, index) -> generator for
    parameters that need particular values.  nans: NaN is an expected output value.
    seed: when not negative, Caffe's random seed, set on both sides just before the net
    is built (so Dropout in TRAIN draws the same masks).  fillers: the parameters keep
    what the (seeded) fillers drew: no random values, no caffemodel.

    Several forward/backward passes on one net (state a layer carries over, a batch size
    that changes, data layers that refill): passes, a number of passes or a list of one
    dict per pass, {blob: generator or (shape, generator)}, which draws that pass's value
    of the blob another way (another shape, a blob no Input holds such as a DummyData top,
    whose value a forward may or may not overwrite); every other input is drawn anew for
    each pass.  accumulate: the parameter gradients are cleared before the first pass
    only.  arrays: ((shape, generator), (shape, generator)) for the data and labels that
    set_input_arrays hands a MemoryData layer before the first pass.

    files: {name: text, or {dataset: array} for an HDF5 file} written into the folder the
    case runs in (its working directory, first on sys.path: HDF5Data sources, a Python
    layer's module).  outputs: HDF5 files the net writes there, compared dataset by
    dataset (dtype, shape, every value).  raises: the class name of the Python exception
    pycaffe raises (and caffelite must too).
    """

    def __init__(self, name, inputs, layers, exact=False, phase=TEST, backward=True,
                 force_backward=True, diffs=None, params=None, nans=False, refused=False,
                 seed=-1, fillers=False, passes=None, accumulate=False, arrays=None,
                 files=None, outputs=(), raises=None):
        self.name, self.exact, self.phase, self.nans = name, exact, phase, nans
        self.backward, self.refused, self.seed = backward, refused, seed
        self.inputs = [(blob, tuple(shape), gen or normal()) for blob, shape, gen in
                       (spec + (None,) if len(spec) == 2 else spec for spec in inputs)]
        self.diffs = () if not backward else diffs
        self.params = params or {}
        self.text = net_text(self.inputs, layers, force_backward)
        self.fillers, self.accumulate, self.arrays = fillers, accumulate, arrays
        self.passes = [{}] * passes if isinstance(passes, int) else passes
        self.files, self.outputs, self.raises = files or {}, tuple(outputs), raises

    def input_values(self, rng):
        return {blob: np.asarray(gen(shape, rng), dtype=np.float32)
                for blob, shape, gen in self.inputs}

    def pass_values(self, rng):
        """The values of each pass (one pass where the case has no passes)."""
        values = []
        for changes in self.passes or [{}]:
            specs = {blob: (shape, gen) for blob, shape, gen in self.inputs}
            for blob, change in changes.items():
                shape, gen = change if isinstance(change, tuple) else (specs[blob][0], change)
                specs[blob] = (tuple(shape), gen or normal())
            values.append({blob: np.asarray(gen(shape, rng), dtype=np.float32)
                           for blob, (shape, gen) in specs.items()})
        return values

    def array_values(self, rng):
        """The data and labels for set_input_arrays, or None."""
        return self.arrays and tuple(np.asarray(gen(shape, rng), dtype=np.float32)
                                     for shape, gen in self.arrays)


def net_text(inputs, layers, force_backward):
    lines = ["force_backward: %s" % ("true" if force_backward else "false")]
    for blob, shape, _ in inputs:
        dims = " ".join("dim: %d" % d for d in shape)
        lines.append('layer { name: "in_%s" type: "Input" top: "%s" '
                     'input_param { shape { %s } } }' % (blob, blob, dims))
    return "\n".join(lines + [layers])


def layer(kind, name, bottoms, tops, params=""):
    """One layer's prototxt; bottoms and tops are a blob name or a list of them."""
    bottoms = [bottoms] if isinstance(bottoms, str) else bottoms
    tops = [tops] if isinstance(tops, str) else tops
    blobs = ['bottom: "%s"' % b for b in bottoms] + ['top: "%s"' % t for t in tops]
    return 'layer { name: "%s" type: "%s" %s %s }\n' % (name, kind, " ".join(blobs), params)


# ------------------------------------------------------------------ input generators
# Each takes (shape, rng), rng a numpy Generator.

def normal(scale=1.0, shift=0.0):
    return lambda shape, rng: rng.standard_normal(shape) * scale + shift


def uniform(low=0.1, high=3.0):
    return lambda shape, rng: rng.uniform(low, high, shape)


def integers(low, high):
    """Whole numbers in [low, high): many ties."""
    return lambda shape, rng: rng.integers(low, high, shape)


def labels(classes, ignore=None, ignored_fraction=0.2):
    def draw(shape, rng):
        values = rng.integers(0, classes, shape).astype(np.float32)
        if ignore is not None:
            values[rng.random(shape) < ignored_fraction] = ignore
        return values
    return draw


def probabilities(shape, rng):
    """Positive along axis 1, summing to 1 there."""
    values = rng.uniform(0.05, 1.0, shape)
    return values / values.sum(axis=1, keepdims=True)


def constant(values):
    """The values in order, repeated to fill the shape."""
    return lambda shape, rng: np.resize(np.asarray(values, dtype=np.float32), shape)


def with_inf_and_nan(shape, rng):
    values = rng.standard_normal(shape).reshape(-1)
    for special, fraction in ((-np.inf, 0.15), (np.nan, 0.1), (np.inf, 0.05)):
        values[rng.random(values.size) < fraction] = special
    return values.reshape(shape)


def corner_windows_not_numbers(shape, rng):
    """Whole 2x2 windows of -inf, and NaN in a corner of channel 0."""
    values = rng.standard_normal(shape)
    values[:, :, :2, :2] = -np.inf
    values[:, 0, 4:, 4:] = np.nan
    return values


def whole_planes_not_numbers(shape, rng):
    """Per image, channel 0 as with_inf_and_nan; channel 1 of image 0 all -FLT_MAX (no
    value above the -FLT_MAX that Caffe's MAX starts from: mask -1), of the other images
    finite values after a NaN (skipped: ``>`` is false for NaN)."""
    values = with_inf_and_nan(shape, rng)
    values[0, 1] = -np.finfo(np.float32).max
    values[1:, 1] = rng.standard_normal(values[1:, 1].shape)
    values[1:, 1].reshape(-1, values[0, 1].size)[:, 0] = np.nan
    return values


def ones(shape, rng):
    return np.ones(shape)


def zeros(shape, rng):
    return np.zeros(shape)


# ------------------------------------------------------------------ the cases
CASES = []


def case(name, inputs, layers, **options):
    CASES.append(LayerCase(name, inputs, layers, **options))


def single(name, kind, shape, text="", tops=("out",), gen=None, **options):
    """One layer "l" on one bottom "data"; text: its settings."""
    case(name, [("data", shape, gen)], layer(kind, "l", "data", list(tops), text), **options)


def convolution(name, shape, params, kind="Convolution"):
    single(name, kind, shape, "convolution_param { %s }" % params)


def pooling(name, shape, params, **options):
    single(name, "Pooling", shape, "pooling_param { %s }" % params, **options)


def loss(name, kind, inputs, params="", **options):
    case(name, inputs, layer(kind, "loss", [spec[0] for spec in inputs], "loss", params),
         **options)


def refused(name, inputs, layers, **options):
    case(name, inputs, layers, refused=True, **options)


# Convolution and Deconvolution: sums everywhere
convolution("conv_basic", (2, 3, 7, 9), "num_output: 4 kernel_size: 3 stride: 2 pad: 1")
convolution("conv_hw", (2, 3, 8, 7), "num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 2 "
            "stride_w: 1 pad_h: 0 pad_w: 2")
convolution("conv_dilation2_pad2", (1, 2, 11, 10), "num_output: 3 kernel_size: 3 dilation: 2 "
            "pad: 2")
convolution("conv_per_axis", (2, 2, 11, 10), "num_output: 3 kernel_size: 3 dilation: 1 "
            "dilation: 3 pad: 1 pad: 3 stride: 1 stride: 2")
convolution("conv_group_no_bias", (2, 4, 6, 5), "num_output: 6 kernel_size: 3 group: 2 "
            "bias_term: false")
convolution("conv_1x1", (3, 5, 4, 3), "num_output: 2 kernel_size: 1")
convolution("conv_1x1_stride2", (2, 5, 5, 5), "num_output: 2 kernel_size: 1 stride: 2")
convolution("conv_1x1_pad1", (2, 3, 4, 5), "num_output: 2 kernel_size: 1 pad: 1")
convolution("conv_pad_beyond_kernel", (1, 2, 4, 5), "num_output: 2 kernel_size: 3 pad: 4 "
            "stride: 3")
convolution("conv_to_1x1", (2, 3, 3, 3), "num_output: 4 kernel_size: 3")
convolution("conv_3d", (1, 2, 5, 6, 4), "num_output: 3 kernel_size: 3 kernel_size: 2 "
            "kernel_size: 3 pad: 1 stride: 2 stride: 1 stride: 1")
convolution("conv_1d", (2, 3, 9), "num_output: 2 kernel_size: 3 stride: 2 pad: 1")
convolution("conv_axis2", (2, 3, 4, 6, 5), "num_output: 2 kernel_size: 3 axis: 2")
convolution("conv_depthwise_dilated", (2, 4, 6, 6), "num_output: 4 kernel_size: 3 group: 4 "
            "pad: 1 dilation: 2")
convolution("conv_k2_stride3", (3, 2, 8, 7), "num_output: 2 kernel_size: 2 stride: 3 pad: 1")
convolution("conv_force_nd_im2col", (2, 3, 6, 5), "num_output: 4 kernel_size: 3 stride: 2 "
            "pad: 1 dilation: 2 force_nd_im2col: true group: 1")
convolution("conv_kernel_over_padded_1x1", (1, 1, 1, 1), "num_output: 1 kernel_size: 5 pad: 2")
convolution("deconv_basic", (2, 3, 4, 5), "num_output: 2 kernel_size: 4 stride: 2 pad: 1",
            "Deconvolution")
convolution("deconv_group", (1, 4, 3, 3), "num_output: 6 kernel_size: 3 stride: 3 group: 2 "
            "bias_term: false", "Deconvolution")
convolution("deconv_hw", (2, 2, 4, 3), "num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 2 "
            "stride_w: 3 pad_h: 1 pad_w: 0", "Deconvolution")
convolution("deconv_dilated", (1, 2, 4, 4), "num_output: 2 kernel_size: 3 dilation: 2 "
            "stride: 2 pad: 1", "Deconvolution")
convolution("deconv_3d", (1, 2, 3, 2, 3), "num_output: 2 kernel_size: 2 stride: 2 pad: 0",
            "Deconvolution")
FILLED = ("convolution_param { %s weight_filler { type: 'gaussian' std: 0.1 } "
          "bias_filler { type: 'gaussian' std: 0.1 } }")
case("conv_dilated", [("x", (2, 3, 9, 8))], layer(
    "Convolution", "c", "x", "y", FILLED % "num_output: 5 kernel_size: 3 dilation: 2 pad: 2"),
     phase=TRAIN, diffs=("y",))
case("conv_strided_grouped", [("x", (2, 4, 7, 6))], layer(
    "Convolution", "c", "x", "y", FILLED % "num_output: 4 kernel_h: 3 kernel_w: 2 stride_h: 2 "
    "stride_w: 1 pad_h: 1 pad_w: 0 group: 2"), phase=TRAIN, diffs=("y",))
# propagate_down: false (without force_backward, which would override it; a loss, without
# which nothing runs backward): no gradient to the bottom, the parameters' gradients still
case("conv_bottom_not_propagated", [("x", (2, 3, 6, 5)), ("t", (2, 3, 6, 5))], layer(
    "Convolution", "c", "x", "y", "propagate_down: false convolution_param { num_output: 3 "
    "kernel_size: 3 pad: 1 }") + layer("EuclideanLoss", "loss", ["y", "t"], "loss"),
     phase=TRAIN, force_backward=False, diffs=())
case("deconv", [("x", (2, 2, 5, 4))], layer(
    "Deconvolution", "d", "x", "y", FILLED % "num_output: 3 kernel_size: 4 stride: 2 pad: 1"),
     phase=TRAIN, diffs=("y",))

# Pooling: MAX is exact where the windows do not overlap (no gradient accumulates)
pooling("pool_max_overlapping", (2, 3, 7, 7), "pool: MAX kernel_size: 3 stride: 2 pad: 1")
pooling("pool_ave_k3_stride2_pad1", (2, 3, 7, 7), "pool: AVE kernel_size: 3 stride: 2 pad: 1")
pooling("pool_max_ceil_overlapping", (1, 2, 8, 6), "pool: MAX kernel_size: 3 stride: 2")
pooling("pool_ave_ceil", (1, 2, 8, 6), "pool: AVE kernel_size: 3 stride: 2")
pooling("pool_max_clipped", (1, 2, 5, 5), "pool: MAX kernel_size: 2 stride: 2 pad: 1",
        exact=True)
pooling("pool_ave_clipped", (1, 2, 5, 5), "pool: AVE kernel_size: 2 stride: 2 pad: 1")
pooling("pool_ave_wide_pad", (2, 2, 5, 6), "pool: AVE kernel_size: 3 stride: 2 pad: 2")
pooling("pool_max_wide_pad", (2, 2, 5, 6), "pool: MAX kernel_size: 3 stride: 2 pad: 2")
pooling("pool_ave_hw", (2, 2, 7, 9), "pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 2 "
        "stride_w: 3 pad_h: 1 pad_w: 1")
pooling("pool_max_hw", (2, 2, 7, 9), "pool: MAX kernel_h: 2 kernel_w: 4 stride_h: 1 "
        "stride_w: 3 pad_h: 1 pad_w: 2")
pooling("pool_global_max", (2, 3, 5, 4), "pool: MAX global_pooling: true", exact=True)
pooling("pool_global_ave", (2, 3, 5, 4), "pool: AVE global_pooling: true")
pooling("pool_max_ties", (2, 2, 6, 7), "pool: MAX kernel_size: 3 stride: 2 pad: 1",
        gen=integers(0, 3))
pooling("pool_max_ties_mask", (2, 2, 6, 7), "pool: MAX kernel_size: 3 stride: 2 pad: 1",
        gen=integers(0, 3), tops=("out", "mask"))
pooling("pool_max_mask_ceil", (1, 2, 7, 8), "pool: MAX kernel_size: 2 stride: 2",
        tops=("out", "mask"), exact=True)
pooling("pool_max_inf_nan", (2, 2, 6, 6), "pool: MAX kernel_size: 2 stride: 2",
        gen=with_inf_and_nan, tops=("out", "mask"), backward=False, exact=True, nans=True)
# global MAX over a whole plane of 380 taps (caffelite's argmax path, not its tap loop)
pooling("pool_global_max_whole_plane_inf_nan", (2, 2, 20, 19), "pool: MAX global_pooling: true",
        gen=whole_planes_not_numbers, tops=("out", "mask"), backward=False, exact=True,
        nans=True)
pooling("pool_max_windows_of_minus_inf", (1, 2, 6, 6), "pool: MAX kernel_size: 2 stride: 2",
        gen=corner_windows_not_numbers, tops=("out", "mask"), backward=False, exact=True,
        nans=True)
pooling("pool_ave_inf_nan", (1, 2, 6, 6), "pool: AVE kernel_size: 3 stride: 2 pad: 1",
        gen=with_inf_and_nan, backward=False, nans=True)
pooling("pool_ave_k2_stride3", (2, 2, 8, 7), "pool: AVE kernel_size: 2 stride: 3 pad: 1")
pooling("pool_max_k2_stride3", (2, 2, 8, 7), "pool: MAX kernel_size: 2 stride: 3 pad: 1",
        tops=("out", "mask"), exact=True)
pooling("pool_max_to_1x1", (2, 2, 3, 3), "pool: MAX kernel_size: 3 stride: 2", exact=True)
pooling("pool_k1_stride3", (1, 4, 5, 5), "kernel_size: 1 stride: 3", backward=False,
        exact=True)
pooling("pool_ave_pad_k2_stride1", (1, 4, 5, 5), "pool: AVE kernel_size: 2 pad: 1 stride: 1",
        backward=False)
for name, shape, tops, params, exact in [
        ("pool_max_ceil", (2, 3, 8, 7), ["y", "m"], "pool: MAX kernel_size: 3 stride: 2", True),
        ("pool_max_padded", (1, 2, 9, 6), "y", "pool: MAX kernel_size: 3 stride: 2 pad: 1", True),
        ("pool_ave_padded", (2, 2, 7, 8), "y", "pool: AVE kernel_size: 3 stride: 2 pad: 1", False),
        ("pool_global", (2, 3, 5, 4), "y", "pool: AVE global_pooling: true", False)]:
    case(name, [("x", shape)], layer("Pooling", "p", "x", tops, "pooling_param { %s }" % params),
         phase=TRAIN, diffs=("y",), exact=exact)

# LRN
for name, shape, params in [
        ("lrn_across5", (2, 7, 3, 4), "local_size: 5 alpha: 0.1 beta: 0.75 k: 2"),
        ("lrn_across3", (2, 4, 3, 3), "local_size: 3 alpha: 1.5 beta: 0.6"),
        ("lrn_within3", (2, 3, 5, 6), "local_size: 3 alpha: 0.5 beta: 0.75 "
         "norm_region: WITHIN_CHANNEL"),
        ("lrn_within5", (1, 2, 4, 7), "local_size: 5 alpha: 2 beta: 0.5 "
         "norm_region: WITHIN_CHANNEL")]:
    single(name, "LRN", shape, "lrn_param { %s }" % params)
case("lrn_across", [("x", (2, 7, 4, 3))], layer(
    "LRN", "n", "x", "y", "lrn_param { local_size: 5 alpha: 0.3 beta: 0.75 k: 2 }"),
     phase=TRAIN, diffs=("y",))

# Neurons, Softmax
S = (2, 3, 4, 5)
single("relu", "ReLU", S, exact=True)
single("relu_leaky", "ReLU", S, "relu_param { negative_slope: 0.1 }", exact=True)
case("relu_in_place_after_conv", [("data", S)],
     layer("Convolution", "c", "data", "c", "convolution_param { num_output: 2 kernel_size: 1 }")
     + layer("ReLU", "r", "c", "c", "relu_param { negative_slope: -0.3 }"))
single("prelu", "PReLU", S)
single("prelu_shared", "PReLU", S, "prelu_param { channel_shared: true }")
single("prelu_2d", "PReLU", (3, 4))
single("prelu_shared_3d", "PReLU", (2, 3, 2), "prelu_param { channel_shared: true }",
       backward=False)
single("elu", "ELU", S, "elu_param { alpha: 0.5 }")
single("elu_default", "ELU", S)
single("sigmoid", "Sigmoid", S, gen=normal(4))
single("tanh", "TanH", S, gen=normal(3))
single("power_2", "Power", S, "power_param { power: 2 scale: 0.5 shift: 1 }")
single("power_half", "Power", S, "power_param { power: 0.5 scale: 2 shift: 0.1 }",
       gen=uniform())
single("power_0", "Power", S, "power_param { power: 0 scale: 2 shift: 0.1 }")
single("power_1", "Power", S, "power_param { power: 1 scale: -2 shift: 0.3 }")
single("power_scale_0", "Power", S, "power_param { power: 3 scale: 0 shift: 0.3 }")
single("power_negative", "Power", S, "power_param { power: -1.5 scale: 1 shift: 0 }",
       gen=uniform())
single("power_root_of_negatives", "Power", (2, 3), "power_param { power: 0.5 }",
       backward=False, nans=True)
single("exp", "Exp", S)
single("exp_base2", "Exp", S, "exp_param { base: 2 scale: 0.5 shift: 0.3 }")
single("log", "Log", S, gen=uniform())
single("log_base10", "Log", S, "log_param { base: 10 scale: 2 shift: 0.5 }", gen=uniform())
single("log_of_negatives", "Log", (2, 3), backward=False, nans=True)
single("absval", "AbsVal", S, exact=True)
single("bnll", "BNLL", S, gen=normal(20))
single("threshold", "Threshold", S, "threshold_param { threshold: 0.3 }", backward=False,
       exact=True)
single("dropout_test_phase", "Dropout", S, "dropout_param { dropout_ratio: 0.3 }", exact=True)
single("dropout_ratio_1_test_phase", "Dropout", (2, 3), "dropout_param { dropout_ratio: 1.0 }",
       backward=False, exact=True)
single("dropout_ratio_above_1_test_phase", "Dropout", (2, 3),
       "dropout_param { dropout_ratio: 1.5 }", backward=False, exact=True)
case("dropout_train_seeded", [("x", (3, 5, 4, 4))],
     layer("Dropout", "d", "x", "y", "dropout_param { dropout_ratio: 0.4 }"),
     phase=TRAIN, diffs=("y",), exact=True, seed=1701)
case("inner_product_dropout_test", [("x", (4, 3, 2, 2))], layer(
    "InnerProduct", "ip", "x", "h", "inner_product_param { num_output: 6 weight_filler "
    "{ type: 'xavier' } bias_filler { type: 'constant' value: 0.1 } }")
     + layer("Dropout", "d", "h", "h", "dropout_param { dropout_ratio: 0.3 }")
     + layer("TanH", "t", "h", "y"), phase=TEST, diffs=("y",))
case("neurons", [("x", (2, 3, 3, 3))],
     layer("AbsVal", "a", "x", "a")
     + layer("Power", "p", "a", "p", "power_param { power: 1.5 scale: 0.7 shift: 0.2 }")
     + layer("Sigmoid", "s", "x", "s") + layer("ELU", "e", "x", "e", "elu_param { alpha: 0.6 }")
     + layer("BNLL", "b", "x", "b") + layer("PReLU", "pr", "x", "pr"),
     phase=TRAIN, diffs=("p", "s", "e", "b", "pr"))
single("clip", "Clip", S, "clip_param { min: -0.5 max: 0.7 }", exact=True)
single("swish", "Swish", S, "swish_param { beta: 1.5 }")
single("softmax", "Softmax", S)
single("softmax_axis2", "Softmax", S, "softmax_param { axis: 2 }")
single("softmax_last_axis", "Softmax", S, "softmax_param { axis: -1 }", gen=normal(10))
single("softmax_2d", "Softmax", (4, 7))
single("softmax_1d", "Softmax", (5,), "softmax_param { axis: 0 }")
case("relu_leaky_softmax", [("x", (2, 5, 3, 4))],
     layer("ReLU", "r", "x", "x", "relu_param { negative_slope: 0.1 }")
     + layer("Softmax", "s", "x", "y"), phase=TRAIN, diffs=("y",))

# Losses; "loss" keeps its loss_weight as gradient unless diffs names it
SCORES, LABELS = ("data", (2, 5, 3, 4), normal(2)), ("label", (2, 1, 3, 4), labels(5, 255))
for mode in ("FULL", "VALID", "BATCH_SIZE", "NONE"):
    loss("softmax_loss_" + mode.lower(), "SoftmaxWithLoss", [SCORES, LABELS],
         "loss_param { ignore_label: 255 normalization: %s }" % mode)
SCORES = ("data", (2, 5, 3, 4))
loss("softmax_loss_no_ignore", "SoftmaxWithLoss", [SCORES, ("label", (2, 1, 3, 4), labels(5))])
loss("softmax_loss_normalize_false", "SoftmaxWithLoss",
     [SCORES, ("label", (2, 1, 3, 4), labels(5, 3))],
     "loss_param { ignore_label: 3 normalize: false }")
loss("softmax_loss_normalize_true_top_diff", "SoftmaxWithLoss",
     [SCORES, ("label", (2, 1, 3, 4), labels(5, 3))],
     "loss_param { ignore_label: 3 normalize: true }", diffs=("loss",))
loss("softmax_loss_axis2", "SoftmaxWithLoss", [("data", (2, 3, 4, 2)),
                                               ("label", (2, 3, 2), labels(4, 1))],
     "softmax_param { axis: 2 } loss_param { ignore_label: 1 }")
loss("softmax_loss_all_ignored", "SoftmaxWithLoss", [("data", (1, 3, 2, 2)),
                                                     ("label", (1, 1, 2, 2), constant(7))],
     "loss_param { ignore_label: 7 }")
loss("softmax_loss_2d", "SoftmaxWithLoss", [("data", (6, 4)), ("label", (6,), labels(4))])
loss("sigmoid_cross_entropy", "SigmoidCrossEntropyLoss",
     [("data", (3, 4, 2, 2), normal(3)), ("target", (3, 4, 2, 2), uniform(0, 1))])
loss("sigmoid_cross_entropy_weighted", "SigmoidCrossEntropyLoss",
     [("data", (3, 4), normal(30)), ("target", (3, 4), labels(2))], "loss_weight: 0.7",
     diffs=("loss",))
loss("euclidean", "EuclideanLoss", [("a", (3, 4, 2)), ("b", (3, 4, 2))], diffs=("loss",))
loss("euclidean_weighted", "EuclideanLoss", [("a", (3, 5)), ("b", (3, 5))], "loss_weight: 3")
loss("hinge_l1", "HingeLoss", [("data", (4, 5)), ("label", (4,), labels(5))])
loss("hinge_l2", "HingeLoss", [("data", (4, 5, 1, 1), normal(2)),
                               ("label", (4, 1, 1, 1), labels(5))],
     "hinge_loss_param { norm: L2 }", diffs=("loss",))
loss("multinomial_logistic", "MultinomialLogisticLoss",
     [("data", (5, 4, 1, 1), probabilities), ("label", (5,), labels(4))])
for legacy in ("false", "true"):
    loss("contrastive_legacy_" + legacy, "ContrastiveLoss",
         [("a", (6, 3, 1, 1), normal(0.5)), ("b", (6, 3, 1, 1), normal(0.5)),
          ("sim", (6, 1, 1, 1), labels(2))],
         "contrastive_loss_param { margin: 1.2 legacy_version: %s }" % legacy)
loss("softmax_loss_ignore", "SoftmaxWithLoss",
     [("x", (2, 4, 5, 3)), ("t", (2, 1, 5, 3), labels(4, 255, 0.25))],
     "loss_param { ignore_label: 255 }", phase=TRAIN, diffs=())
loss("softmax_loss_batch_norm", "SoftmaxWithLoss",
     [("x", (3, 4, 2, 2)), ("t", (3, 1, 2, 2), labels(4))],
     "loss_weight: 2 loss_param { ignore_label: 1 normalization: BATCH_SIZE }",
     phase=TRAIN, diffs=())


# Accuracy and ArgMax (forward only; normal scores have no ties)
def accuracy(name, inputs, params, tops=("acc",)):
    case(name, inputs, layer("Accuracy", "acc", [spec[0] for spec in inputs], list(tops),
                             "accuracy_param { %s }" % params),
         backward=False, force_backward=False)


accuracy("accuracy_top3", [("data", (6, 5)), ("label", (6,), labels(5))], "top_k: 3")
accuracy("accuracy_ignore_spatial", [("data", (2, 4, 3, 3)),
                                     ("label", (2, 1, 3, 3), labels(4, 2, 0.3))],
         "ignore_label: 2")
accuracy("accuracy_axis2", [("data", (2, 3, 4)), ("label", (2, 3), labels(4))],
         "axis: 2 top_k: 2")
accuracy("accuracy_per_class", [("data", (8, 4)), ("label", (8,), labels(4, 1))],
         "ignore_label: 1", tops=("acc", "per_class"))
for name, shape, params, gen in [
        ("argmax", (3, 4, 2, 2), "", None),
        ("argmax_top2_value", (3, 4, 2, 2), "top_k: 2 out_max_val: true", None),
        ("argmax_axis1_top2", (2, 5, 3, 2), "axis: 1 top_k: 2", None),
        ("argmax_axis1_value", (2, 5, 3, 2), "axis: 1 out_max_val: true", None),
        ("argmax_ties", (2, 6, 2, 2), "axis: 1 top_k: 2", integers(0, 2)),
        ("argmax_ties_flat", (3, 6), "top_k: 3", integers(0, 2)),
        ("argmax_last_axis", (2, 3, 4), "axis: -1 top_k: 2 out_max_val: true", None)]:
    single(name, "ArgMax", shape, "argmax_param { %s }" % params, gen=gen, backward=False,
           force_backward=False, exact=True)
case("argmax_accuracy", [("x", (5, 6, 1, 1)), ("t", (5,), labels(6))],
     layer("ArgMax", "am", "x", "am", "argmax_param { top_k: 2 out_max_val: true }")
     + layer("Accuracy", "acc", ["x", "t"], "acc", "accuracy_param { top_k: 2 }"),
     phase=TEST, force_backward=False, diffs=())

# Eltwise, Concat, Slice, Split, Flatten, Reshape, Crop, Tile, Reduction
T = (2, 3, 4, 3)
case("eltwise_sum_coeff", [("a", T), ("b", T), ("c", T)], layer(
    "Eltwise", "e", ["a", "b", "c"], "out",
    "eltwise_param { operation: SUM coeff: 0.5 coeff: -2 coeff: 1.5 }"))
case("eltwise_prod_stable", [("a", T), ("b", T), ("c", T)], layer(
    "Eltwise", "e", ["a", "b", "c"], "out", "eltwise_param { operation: PROD }"))
case("eltwise_prod_unstable", [("a", T), ("b", T)], layer(
    "Eltwise", "e", ["a", "b"], "out",
    "eltwise_param { operation: PROD stable_prod_grad: false }"))
case("eltwise_max3_ties", [(blob, T, integers(0, 2)) for blob in "abc"], layer(
    "Eltwise", "e", ["a", "b", "c"], "out", "eltwise_param { operation: MAX }"), exact=True)
case("eltwise_max2", [("a", T), ("b", T)], layer(
    "Eltwise", "e", ["a", "b"], "out", "eltwise_param { operation: MAX }"), exact=True)
case("eltwise_concat_slice", [("a", T), ("b", T)],
     layer("Eltwise", "e", ["a", "b"], "s", "eltwise_param { operation: SUM coeff: 0.5 "
           "coeff: -2 }")
     + layer("Eltwise", "m", ["a", "b"], "mx", "eltwise_param { operation: MAX }")
     + layer("Eltwise", "p", ["a", "b"], "pr", "eltwise_param { operation: PROD }")
     + layer("Concat", "c", ["s", "mx", "pr"], "cat")
     + layer("Slice", "sl", "cat", ["u", "v"], "slice_param { axis: 1 slice_point: 4 }"),
     phase=TRAIN, diffs=("u", "v"))
case("concat_axis1", [("a", (2, 3, 2, 2)), ("b", (2, 1, 2, 2)), ("c", (2, 2, 2, 2))],
     layer("Concat", "cc", ["a", "b", "c"], "out"), exact=True)
case("concat_axis0", [("a", (2, 3, 2)), ("b", (1, 3, 2))],
     layer("Concat", "cc", ["a", "b"], "out", "concat_param { axis: 0 }"), exact=True)
case("concat_last_axis", [("a", (2, 3, 2)), ("b", (2, 3, 5))],
     layer("Concat", "cc", ["a", "b"], "out", "concat_param { axis: -1 }"), exact=True)
case("concat_dim", [("a", (2, 3, 2, 2)), ("b", (2, 3, 2, 2))],
     layer("Concat", "cc", ["a", "b"], "out", "concat_param { concat_dim: 2 }"), exact=True)
single("concat_one_bottom", "Concat", (2, 3), backward=False, exact=True)
single("slice_points", "Slice", (2, 7, 2), "slice_param { axis: 1 slice_point: 1 "
       "slice_point: 4 }", tops=("o1", "o2", "o3"), exact=True)
single("slice_equal", "Slice", (6, 2, 2), "slice_param { axis: 0 }",
       tops=("o1", "o2", "o3"), exact=True)
single("slice_dim", "Slice", (2, 2, 4), "slice_param { slice_dim: 2 slice_point: 3 }",
       tops=("o1", "o2"), exact=True)
single("slice_one_top", "Slice", (2, 3), backward=False, exact=True)
single("split_explicit", "Split", (2, 3), tops=("o1", "o2", "o3"))
single("split_one_top", "Split", (2, 3), backward=False)
case("split_inserted", [("a", (2, 3, 2))],
     layer("Power", "p1", "a", "o1", "power_param { scale: 2 }")
     + layer("Power", "p2", "a", "o2", "power_param { scale: 3 power: 2 }")
     + layer("Eltwise", "e", ["o1", "o2", "a"], "out"))
case("relu_in_place_on_split_blob", [("a", (2, 3))],
     layer("ReLU", "r", "a", "a") + layer("TanH", "t", "a", "t")
     + layer("Eltwise", "e", ["a", "t"], "out", "eltwise_param { coeff: 2 coeff: 3 }"))
for name, params in [("flatten", ""), ("flatten_tail", "axis: 2 end_axis: -1"),
                     ("flatten_head", "axis: 0 end_axis: 1")]:
    single(name, "Flatten", S, "flatten_param { %s }" % params, exact=True)
single("flatten_end_before_axis", "Flatten", (2, 3, 4), "flatten_param { axis: 2 end_axis: 1 }",
       backward=False, exact=True)
for name, shape, params in [
        ("reshape_copy_and_infer", S, "shape { dim: 0 dim: -1 dim: 10 }"),
        ("reshape_axes_1_2", S, "shape { dim: 2 dim: -1 } axis: 1 num_axes: 2"),
        ("reshape_insert_at_end", S, "shape { dim: 1 dim: 1 } axis: -1 num_axes: 0")]:
    single(name, "Reshape", shape, "reshape_param { %s }" % params, exact=True)
single("reshape_empty_shape", "Reshape", (2, 3), "reshape_param { shape { } axis: 0 "
       "num_axes: 0 }", backward=False, exact=True)
for name, shapes, params, backward in [
        ("crop_axis2", ((2, 3, 7, 6), (1, 1, 4, 3)), "axis: 2 offset: 2 offset: 1", True),
        ("crop_axis1_one_offset", ((2, 5, 7, 6), (2, 2, 3, 3)), "axis: 1 offset: 2", True),
        ("crop_default", ((2, 3, 5, 5), (2, 3, 2, 3)), "", True),
        ("crop_negative_axis", ((1, 2, 4, 4), (1, 2, 3, 3)), "axis: -2 offset: 1", False)]:
    case(name, [("a", shapes[0]), ("ref", shapes[1])],
         layer("Crop", "c", ["a", "ref"], "out", "crop_param { %s }" % params),
         backward=backward, exact=True)
case("crop_reshape_flatten", [("a", (2, 3, 6, 7)), ("b", (2, 1, 4, 3))],
     layer("Crop", "c", ["a", "b"], "c", "crop_param { axis: 2 offset: 1 offset: 2 }")
     + layer("Reshape", "r", "c", "r", "reshape_param { shape { dim: 0 dim: -1 } }")
     + layer("Flatten", "f", "a", "f"), phase=TRAIN, diffs=("r", "f"), exact=True)
for name, shape, params, backward in [("tile", (2, 3, 2), "axis: 1 tiles: 3", True),
                                      ("tile_last_axis", (2, 3, 2), "axis: -1 tiles: 2", True),
                                      ("tile_axis0", (2, 3), "axis: 0 tiles: 2", False)]:
    single(name, "Tile", shape, "tile_param { %s }" % params, backward=backward)
for operation in ("SUM", "ASUM", "SUMSQ", "MEAN"):
    single("reduction_" + operation.lower(), "Reduction", (2, 3, 4),
           "reduction_param { operation: %s axis: 1 coeff: -1.5 }" % operation)
single("reduction_mean_all", "Reduction", (2, 3, 4), "reduction_param { operation: MEAN "
       "axis: 0 }")
single("reduction_default", "Reduction", (2, 3, 4))
single("reduction_asum_last_axis", "Reduction", (2, 3, 4), "reduction_param { operation: ASUM "
       "axis: -1 }")

# BatchNorm, Scale, Bias
B = (3, 4, 2, 3)
single("batchnorm_train", "BatchNorm", B, "batch_norm_param { moving_average_fraction: 0.9 }",
       gen=normal(2, 1), phase=TRAIN)
single("batchnorm_batch_stats_2d", "BatchNorm", (5, 3),
       "batch_norm_param { use_global_stats: false eps: 0.01 }", gen=normal(2, 1))
single("batchnorm_test", "BatchNorm", B, "batch_norm_param { eps: 0.001 }")
single("batchnorm_test_zero_scale_factor", "BatchNorm", B, params={("l", 2): zeros})
single("batchnorm_train_global_stats", "BatchNorm", B, "batch_norm_param { "
       "use_global_stats: true }", phase=TRAIN)
single("batchnorm_test_batch_stats", "BatchNorm", B, "batch_norm_param { "
       "use_global_stats: false }")
case("batchnorm_in_place_scale", [("a", (2, 3, 2, 2))],
     layer("BatchNorm", "bn", "a", "a") + layer("Scale", "sc", "a", "a",
                                                 "scale_param { bias_term: true }"), phase=TRAIN)
case("batchnorm_twice", [("a", (4, 3, 2, 2))], layer("BatchNorm", "bn", "a", "b1")
     + layer("BatchNorm", "bn2", "b1", "out", "batch_norm_param { moving_average_fraction: 0.5 "
             "eps: 0.1 }"), phase=TRAIN)
case("batchnorm_scale_train", [("x", (3, 4, 3, 2))],
     layer("BatchNorm", "bn", "x", "x", "batch_norm_param { eps: 1e-4 }")
     + layer("Scale", "sc", "x", "y", "scale_param { bias_term: true }"),
     phase=TRAIN, diffs=("y",))
case("batchnorm_global", [("x", (2, 4, 3, 3))],
     layer("BatchNorm", "bn", "x", "y", "batch_norm_param { use_global_stats: true }"),
     phase=TEST, diffs=("y",))
A = (2, 3, 4, 2)
single("scale", "Scale", A)
single("scale_bias_two_axes", "Scale", A, "scale_param { axis: 1 num_axes: 2 bias_term: true }")
single("scale_bias_all_axes", "Scale", (2, 3, 4), "scale_param { axis: 0 num_axes: -1 "
       "bias_term: true }")
single("scale_bias_scalar", "Scale", (2, 3, 4), "scale_param { num_axes: 0 bias_term: true }")
case("scale_by_bottom", [("a", A), ("s", (3, 4))],
     layer("Scale", "s", ["a", "s"], "out", "scale_param { axis: 1 bias_term: true }"))
case("scale_by_bottom_axis0", [("a", (2, 3, 4)), ("s", (2,))],
     layer("Scale", "s", ["a", "s"], "out", "scale_param { axis: 0 }"))
single("bias", "Bias", A, "bias_param { axis: 2 num_axes: 1 }")
case("bias_by_bottom", [("a", A), ("b", (2, 3))],
     layer("Bias", "b", ["a", "b"], "out", "bias_param { axis: 0 }"))

# InnerProduct, Embed, MVN, Filter, BatchReindex, SPP, Parameter, Silence, Im2col
for name, shape, params, backward in [
        ("inner_product", (3, 2, 2, 3), "num_output: 4", True),
        ("inner_product_transpose", (3, 5), "num_output: 4 transpose: true", True),
        ("inner_product_axis2_no_bias", A, "num_output: 3 axis: 2 bias_term: false", True),
        ("inner_product_to_one", (1, 7), "num_output: 1", True),
        ("inner_product_last_axis", (2, 3, 4), "num_output: 2 axis: -1", False),
        ("inner_product_2x3_no_bias", (2, 3), "num_output: 2 bias_term: false", False)]:
    single(name, "InnerProduct", shape, "inner_product_param { %s }" % params,
           backward=backward)
single("embed", "Embed", (2, 3), "embed_param { num_output: 4 input_dim: 5 }",
       gen=integers(0, 5), force_backward=False)
single("embed_no_bias", "Embed", (4,), "embed_param { num_output: 3 input_dim: 6 "
       "bias_term: false }", gen=constant([1, 5, 1, 0]), force_backward=False)
single("embed_last_index", "Embed", (2,), "embed_param { num_output: 2 input_dim: 3 }",
       gen=constant([0, 2]), backward=False, force_backward=False, exact=True)
single("mvn", "MVN", S, gen=normal(2, 1))
single("mvn_across_channels", "MVN", S, "mvn_param { across_channels: true }", gen=normal(2, 1))
single("mvn_mean_only", "MVN", S, "mvn_param { normalize_variance: false }")
single("mvn_eps", "MVN", (2, 3, 1, 2), "mvn_param { eps: 0.5 across_channels: true }")
single("mvn_one_element", "MVN", (2, 3, 1, 1), backward=False)
# The data reach the Filter and BatchReindex through a Scale, so that they need a backward
# without force_backward (which Caffe refuses for the selector and index bottoms).
SCALE_A = layer("Scale", "sc", "a", "as")
case("filter", [("a", (5, 2, 3)), ("sel", (5,), constant([1, 0, 1, 1, 0]))],
     SCALE_A + layer("Filter", "f", ["as", "sel"], "out"), force_backward=False)
case("filter_two_bottoms", [("a", (5, 2, 3)), ("b", (5, 4)),
                            ("sel", (5, 1, 1, 1), constant([0, 0, 1, 0, 1]))],
     SCALE_A + layer("Filter", "f", ["as", "b", "sel"], ["o1", "o2"]), force_backward=False)
case("batch_reindex", [("a", (4, 2, 3)), ("idx", (5,), constant([3, 0, 3, 1, 3]))],
     SCALE_A + layer("BatchReindex", "br", ["as", "idx"], "out"), force_backward=False)
single("spp_max", "SPP", (2, 2, 8, 9), "spp_param { pyramid_height: 3 pool: MAX }")
single("spp_ave", "SPP", (1, 2, 9, 6), "spp_param { pyramid_height: 2 pool: AVE }")
single("spp_one_level", "SPP", (2, 2, 3, 3), "spp_param { pyramid_height: 1 }")
case("parameter", [("a", (2, 3))],
     layer("Parameter", "p", [], "p", "parameter_param { shape { dim: 2 dim: 3 } }")
     + layer("Eltwise", "e", ["a", "p"], "out", "eltwise_param { operation: PROD }"))
case("silence", [("a", (2, 3)), ("b", (2, 2))],
     layer("Silence", "s", "b", []) + layer("TanH", "t", "a", "out"))
single("im2col", "Im2col", (2, 3, 5, 4), "convolution_param { kernel_size: 3 stride: 2 pad: 1 }")
single("im2col_dilated", "Im2col", (1, 2, 6, 6), "convolution_param { kernel_h: 2 kernel_w: 3 "
       "dilation: 2 pad_w: 1 }")

# ------------------------------------------------------------------ refused by Caffe
D = [("data", (1, 4, 5, 5))]
for name, kind, params in [
        ("pool_global_with_kernel", "Pooling", "global_pooling: true kernel_size: 2"),
        ("pool_global_with_pad", "Pooling", "global_pooling: true pad: 1"),
        ("pool_global_with_stride", "Pooling", "global_pooling: true stride: 2"),
        ("pool_no_kernel", "Pooling", "pool: MAX"),
        ("pool_kernel_over_input", "Pooling", "pool: MAX kernel_size: 7"),
        ("pool_stochastic_padded", "Pooling", "pool: STOCHASTIC kernel_size: 3 pad: 1"),
        ("conv_group_output", "Convolution", "num_output: 3 kernel_size: 1 group: 2"),
        ("conv_group_input", "Convolution", "num_output: 3 kernel_size: 1 group: 3"),
        ("conv_kernel_size_and_h", "Convolution", "num_output: 3 kernel_size: 1 kernel_h: 1 "
         "kernel_w: 1"),
        ("conv_stride_0", "Convolution", "num_output: 3 kernel_size: 1 stride: 0"),
        ("conv_negative_output", "Convolution", "num_output: 3 kernel_size: 7"),
        ("conv_empty_output", "Convolution", "num_output: 3 kernel_size: 6"),
        ("conv_three_kernel_sizes", "Convolution", "num_output: 3 kernel_size: 1 "
         "kernel_size: 2 kernel_size: 3"),
        ("conv_num_output_0", "Convolution", "num_output: 0 kernel_size: 1"),
        ("lrn_even_size", "LRN", "local_size: 4")]:
    section = {"Pooling": "pooling_param", "Convolution": "convolution_param",
               "LRN": "lrn_param"}[kind]
    refused(name, D, layer(kind, "l", "data", "o", "%s { %s }" % (section, params)))
refused("deconv_negative_output", [("data", (1, 2, 1, 1))], layer(
    "Deconvolution", "l", "data", "o", "convolution_param { num_output: 2 kernel_size: 1 "
    "pad: 1 }"))
P = [("a", (2, 3)), ("b", (2, 3))]
refused("eltwise_prod_coeff", P, layer("Eltwise", "e", ["a", "b"], "o",
                                       "eltwise_param { operation: PROD coeff: 1 coeff: 2 }"))
refused("eltwise_shapes", [("a", (2, 3)), ("b", (3, 2))], layer("Eltwise", "e", ["a", "b"], "o"))
refused("eltwise_one_bottom", [("a", (2, 3))], layer("Eltwise", "e", ["a"], "o",
                                                     "eltwise_param { operation: MAX }"))
Q = [("a", (1, 2, 2, 2))]
refused("eltwise_coeff_count", Q + [("b", (1, 2, 2, 2))],
        layer("Eltwise", "e", ["a", "b"], "y", "eltwise_param { coeff: 1 }"), phase=TRAIN)
refused("concat_shapes", Q + [("b", (1, 2, 3, 2))], layer("Concat", "c", ["a", "b"], "y"),
        phase=TRAIN)
refused("pool_pad_not_below_kernel", [("x", (1, 1, 5, 5))], layer(
    "Pooling", "p", "x", "y", "pooling_param { pool: MAX kernel_size: 2 pad: 2 }"), phase=TRAIN)
refused("concat_axis_and_dim", P, layer("Concat", "c", ["a", "b"], "o",
                                        "concat_param { axis: 1 concat_dim: 1 }"))
refused("concat_axis_out_of_range", P, layer("Concat", "c", ["a", "b"], "o",
                                             "concat_param { axis: 2 }"))
for name, shape, tops, params in [
        ("slice_points_decreasing", (2, 6), 3, "slice_point: 4 slice_point: 2"),
        ("slice_too_few_points", (2, 6), 3, "slice_point: 2"),
        ("slice_indivisible", (2, 7), 2, "")]:
    refused(name, [("a", shape)], layer("Slice", "s", "a", ["o%d" % i for i in range(tops)],
                                        "slice_param { %s }" % params))
for name, shape in [("reshape_two_inferred", "dim: -1 dim: -1"),
                    ("reshape_count", "dim: 5 dim: 2"),
                    ("reshape_copy_missing_axis", "dim: 0 dim: 0 dim: 0")]:
    refused(name, [("a", (2, 6))], layer("Reshape", "r", "a", "o",
                                         "reshape_param { shape { %s } }" % shape))
CROP = [("a", (1, 2, 4, 4)), ("r", (1, 2, 3, 3))]
refused("crop_too_big", CROP, layer("Crop", "c", ["a", "r"], "o", "crop_param { offset: 2 }"))
refused("crop_offset_count", CROP, layer("Crop", "c", ["a", "r"], "o",
                                         "crop_param { offset: 0 offset: 1 offset: 1 }"))
for name, kind, shape, params in [
        ("softmax_axis_out_of_range", "Softmax", (2, 3), "softmax_param { axis: 2 }"),
        ("argmax_top_k_over_count", "ArgMax", (2, 3), "argmax_param { top_k: 4 }"),
        ("argmax_top_k_over_axis", "ArgMax", (2, 3, 4), "argmax_param { axis: 1 top_k: 4 }"),
        ("tile_0", "Tile", (2, 3), "tile_param { tiles: 0 }"),
        ("tile_axis_out_of_range", "Tile", (2, 3), "tile_param { axis: 2 tiles: 2 }"),
        ("inner_product_axis_out_of_range", "InnerProduct", (2, 3),
         "inner_product_param { num_output: 2 axis: 3 }"),
        ("reduction_axis_out_of_range", "Reduction", (2, 3), "reduction_param { axis: 3 }"),
        ("pool_3_axes", "Pooling", (2, 3, 4), "pooling_param { kernel_size: 2 }"),
        ("lrn_3_axes", "LRN", (2, 3, 4), "lrn_param { local_size: 3 }"),
        ("spp_height_0", "SPP", (2, 2, 3, 3), "spp_param { pyramid_height: 0 }")]:
    refused(name, [("a", shape)], layer(kind, "l", "a", "o", params))
refused("bias_axis_out_of_range", [("a", (2, 3))], layer("Bias", "b", ["a", "a"], "o",
                                                         "bias_param { axis: 5 }"))
refused("scale_shape", [("a", (2, 3, 4)), ("s", (4,))], layer("Scale", "s", ["a", "s"], "o"))
refused("softmax_loss_label_count", [("a", (2, 3, 2)), ("l", (2, 3))],
        layer("SoftmaxWithLoss", "s", ["a", "l"], "o"))
refused("euclidean_shapes", [("a", (2, 3)), ("b", (2, 4))],
        layer("EuclideanLoss", "e", ["a", "b"], "o"))
refused("hinge_label_count", [("a", (2, 3)), ("l", (3,))],
        layer("HingeLoss", "h", ["a", "l"], "o"))
refused("accuracy_top_k_over_classes", [("a", (2, 3)), ("l", (2,))],
        layer("Accuracy", "a", ["a", "l"], "o", "accuracy_param { top_k: 4 }"),
        force_backward=False)
refused("filter_selector_count", [("a", (3, 2)), ("s", (2,))],
        layer("Filter", "f", ["a", "s"], "o"), force_backward=False)
# FilterNet: "Specify either include rules or exclude rules; not both."
refused("include_and_exclude", [("x", (2, 3))], layer(
    "ReLU", "r", "x", "y", "include { phase: TEST } exclude { phase: TRAIN }"))
# SoftmaxWithLoss with a probability top: LossLayer gives one loss_weight for two tops
SOFTMAX_LOSS = [SCORES, ("label", (2, 1, 3, 4), labels(5, 0))]
for name, weights in [("softmax_loss_two_tops_two_weights", "loss_weight: 2.5 loss_weight: 0.5"),
                      ("softmax_loss_two_tops_one_weight", "loss_weight: 2.5")]:
    refused(name, SOFTMAX_LOSS, layer("SoftmaxWithLoss", "loss", ["data", "label"],
                                      ["loss", "prob"],
                                      weights + " loss_param { ignore_label: 0 }"))
refused("softmax_loss_two_tops", [("x", (2, 3, 2, 2)), ("t", (2, 1, 2, 2), labels(3))],
        layer("SoftmaxWithLoss", "l", ["x", "t"], ["loss", "prob"]), phase=TRAIN)
# backward to a bottom the layer cannot differentiate (forced, or through a learned layer)
for name, kind, params in [("threshold_forced_backward", "Threshold", ""),
                           ("argmax_forced_backward", "ArgMax", ""),
                           ("embed_forced_backward", "Embed",
                            "embed_param { num_output: 2 input_dim: 3 }")]:
    refused(name, [("a", (2,) if kind == "Embed" else (2, 3), integers(0, 3))],
            layer(kind, "t", "a", "out", params))
refused("accuracy_forced_backward", [("a", (2, 3)), ("l", (2,), labels(3))],
        layer("Accuracy", "t", ["a", "l"], "out"))
refused("batch_reindex_forced_backward", [("a", (2, 3)), ("i", (2,), constant([1, 0]))],
        layer("BatchReindex", "t", ["a", "i"], "out"))
refused("softmax_loss_learned_labels", [("a", (2, 3)), ("l", (2,), labels(3))],
        layer("Scale", "s", "l", "ls", "scale_param { axis: 0 }")
        + layer("SoftmaxWithLoss", "t", ["a", "ls"], "out"), params={("s", 0): ones})
refused("infogain_learned_matrix", [("p", (4, 3), probabilities), ("label", (4,), labels(3)),
                                    ("H", (1, 1, 3, 3), uniform(0, 1))],
        layer("Scale", "sc", "H", "Hs", "scale_param { axis: 0 }")
        + layer("InfogainLoss", "loss", ["p", "label", "Hs"], "loss"), force_backward=False)
refused("infogain_forced_to_its_matrix", [("p", (4, 3, 1, 1)), ("t", (4,), labels(3)),
                                          ("h", (1, 1, 3, 3))],
        layer("InfogainLoss", "l", ["p", "t", "h"], "loss"), phase=TRAIN)


# ------------------------------------------------------------------ data layers
# DummyData, over three passes: the fillers that refill every forward (seeded), and the
# constant ones that fill once (what the user writes into such a top stays)
def dummy(name, params, tops, more="", passes=3, **options):
    options.setdefault("backward", False)
    case(name, [], layer("DummyData", "d", [], tops, "dummy_data_param { %s }" % params)
         + more, passes=passes, seed=7, fillers=True, force_backward=False, **options)


dummy("dummy_gaussian_refilled", "shape { dim: 2 dim: 3 dim: 2 } "
      "data_filler { type: 'gaussian' std: 2 mean: 1 }", "a", exact=True)
dummy("dummy_one_shape_one_filler", "shape { dim: 3 dim: 2 } "
      "data_filler { type: 'uniform' min: -1 max: 3 }", ["a", "b", "c"], exact=True)
dummy("dummy_fillers_per_top", "shape { dim: 2 dim: 3 } data_filler { type: 'gaussian' } "
      "data_filler { type: 'constant' value: -2 } data_filler { type: 'uniform' }",
      ["a", "b", "c"], exact=True)
dummy("dummy_legacy_dims", "num: 2 channels: 3 channels: 1 height: 2 width: 4 width: 1 "
      "data_filler { type: 'gaussian' std: 0.5 }", ["a", "b"], exact=True)
dummy("dummy_xavier_msra", "shape { dim: 4 dim: 3 dim: 2 } shape { dim: 3 dim: 5 } "
      "data_filler { type: 'xavier' } data_filler { type: 'msra' variance_norm: FAN_OUT }",
      ["a", "b"])
dummy("dummy_unitball_bilinear_sparse", "shape { dim: 3 dim: 4 dim: 2 } "
      "shape { dim: 2 dim: 1 dim: 4 dim: 4 } shape { dim: 5 dim: 6 } "
      "data_filler { type: 'positive_unitball' } data_filler { type: 'bilinear' } "
      "data_filler { type: 'gaussian' sparse: 2 }", ["a", "b", "c"])
dummy("dummy_then_filled_inner_product", "shape { dim: 2 dim: 3 } "
      "data_filler { type: 'gaussian' }", "a", layer(
          "InnerProduct", "ip", "a", "b", "inner_product_param { num_output: 2 "
          "weight_filler { type: 'gaussian' } bias_filler { type: 'uniform' } }"))
WRITTEN = {"a": ((2, 3), constant(range(6)))}
dummy("dummy_constant_not_refilled", "shape { dim: 2 dim: 3 } data_filler { type: 'constant' "
      "value: 1 } data_filler { type: 'gaussian' }", ["a", "b"], passes=[WRITTEN, {}],
      exact=True)
dummy("dummy_default_not_refilled", "shape { dim: 2 dim: 3 }", "a", passes=[WRITTEN, {}],
      exact=True)
for name, params, tops in [
        ("dummy_shape_and_legacy", "shape { dim: 2 } num: 2 channels: 1 height: 1 width: 1",
         "a"),
        ("dummy_filler_count", "shape { dim: 2 } data_filler { type: 'constant' } "
         "data_filler { type: 'constant' }", ["a", "b", "c"]),
        ("dummy_shape_count", "shape { dim: 2 } shape { dim: 3 }", ["a", "b", "c"]),
        ("dummy_legacy_count", "num: 1 num: 2 channels: 1 height: 1 width: 1", ["a", "b", "c"]),
        ("dummy_bilinear_not_square", "shape { dim: 1 dim: 1 dim: 3 dim: 4 } "
         "data_filler { type: 'bilinear' }", "a"),
        ("dummy_no_shape", "data_filler { type: 'constant' }", "a")]:
    refused(name, [], layer("DummyData", "d", [], tops, "dummy_data_param { %s }" % params),
            backward=False)


# MemoryData fed by set_input_arrays: batch after batch, wrapping around
def memory_data(batch_size, transform=""):
    return layer("MemoryData", "m", [], ["data", "label"], "memory_data_param { batch_size: %d "
                 "channels: 2 height: 3 width: 1 } %s" % (batch_size, transform))


def arrays(n, label_shape=None, data_shape=(2, 3, 1)):
    return (((n,) + data_shape, normal()),
            (label_shape or (n,), lambda shape, rng: np.arange(np.prod(shape)).reshape(shape) * 1.5))


IP = layer("InnerProduct", "ip", "data", "out", "inner_product_param { num_output: 2 }")
case("memory_data_batches_wrap", [], memory_data(2) + IP, arrays=arrays(6), passes=5,
     force_backward=False, diffs=("out",))
case("memory_data_labels_4d", [], memory_data(3) + IP, arrays=arrays(6, (6, 1, 1, 1)),
     passes=3, force_backward=False, diffs=("out",))
case("memory_data_transform_ignored", [], memory_data(2, "transform_param { scale: 0.5 "
                                                       "mean_value: 1 }") + IP,
     arrays=arrays(4), passes=2, diffs=("out",))
refused("memory_data_no_arrays", [], memory_data(2) + IP, backward=False)
for name, inputs, batch_size, given in [
        ("memory_data_not_multiple_of_batch", [], 4, arrays(6)),
        ("memory_data_wrong_channels", [], 2, arrays(2, data_shape=(3, 3, 1))),
        ("memory_data_label_count", [], 2, (((4, 2, 3, 1), normal()), ((2,), zeros))),
        ("memory_data_not_first_layer", [("x", (2, 2))], 2, arrays(2))]:
    case(name, inputs, memory_data(batch_size) + IP, arrays=given, backward=False,
         raises="RuntimeError")


# HDF5Data: batches across the files of a list (relative to the working directory)
def rows(n, start, *shape):
    """n rows numbered from start: which rows a batch holds shows in its values."""
    return np.arange(n * int(np.prod(shape)), dtype=np.float32).reshape((n,) + shape) + start


def hdf5_data(name, tops, batch_size, files, listing="a.h5\nb.h5\n", params="", more="",
              passes=4, **options):
    options.setdefault("backward", False)
    case(name, [], layer("HDF5Data", "h", [], tops, "hdf5_data_param { source: 'list.txt' "
                         "batch_size: %d %s }" % (batch_size, params)) + more,
         files=dict(files, **{"list.txt": listing}), passes=passes, force_backward=False,
         **options)


H1, H2 = ({"data": rows(3, 0, 2, 2), "label": rows(3, 100)},
          {"data": rows(4, 1000, 2, 2), "label": rows(4, 200)})
DATA_LABEL = ["data", "label"]
hdf5_data("hdf5_data_across_files", DATA_LABEL, 5, {"a.h5": H1, "b.h5": H2}, exact=True)
hdf5_data("hdf5_data_batch_over_all_rows", DATA_LABEL, 9, {"a.h5": H1, "b.h5": H2}, passes=2,
          exact=True)
hdf5_data("hdf5_data_list_on_one_line", "data", 4, {"a.h5": H1, "b.h5": H2},
          listing="  a.h5   b.h5  \n\n", exact=True)
hdf5_data("hdf5_data_dtypes_and_axes", ["data", "label", "v", "w"], 2, {"a.h5": {
    "data": rows(3, 0.25, 3).astype(np.float64), "label": np.arange(3, dtype=np.int32),
    "v": rows(3, 0), "w": rows(3, 7, 1, 2, 1, 2)}}, listing="a.h5\n", passes=3, exact=True)
hdf5_data("hdf5_data_shuffle_seeded", DATA_LABEL, 3, {"a.h5": H1, "b.h5": H2},
          params="shuffle: true", passes=5, seed=11, exact=True)
hdf5_data("hdf5_data_wraps_into_inner_product", DATA_LABEL, 2, {"a.h5": H1}, listing="a.h5\n",
          more=IP, passes=3, backward=True, diffs=("out",))
for name, tops, files, listing in [
        ("hdf5_data_missing_dataset", ["data", "nosuch"], {"a.h5": H1}, "a.h5\n"),
        ("hdf5_data_rows_differ", DATA_LABEL,
         {"a.h5": {"data": rows(3, 0, 2), "label": rows(2, 0)}}, "a.h5\n"),
        ("hdf5_data_empty_list", "data", {"a.h5": H1}, "\n"),
        ("hdf5_data_missing_file", "data", {"a.h5": H1}, "a.h5\nnosuch.h5\n"),
        ("hdf5_data_scalar_dataset", "s", {"a.h5": {"s": np.float32(3)}}, "a.h5\n")]:
    hdf5_data(name, tops, 2, files, listing, passes=3, refused=True)

# HDF5Output: one forward writes the datasets "data" and "label"; a second one aborts
OUT = layer("HDF5Output", "o", ["a", "b"], [], "hdf5_output_param { file_name: 'out.h5' }")
case("hdf5_output", [("a", (2, 3, 2)), ("b", (2,))], OUT + layer("TanH", "t", "a", "t"),
     diffs=("t",), outputs=["out.h5"])
refused("hdf5_output_two_forwards", [("a", (2, 3)), ("b", (2,))], OUT, passes=2,
        backward=False, outputs=["out.h5"])
refused("hdf5_output_one_bottom", [("a", (2, 3))], layer(
    "HDF5Output", "o", "a", [], "hdf5_output_param { file_name: 'out.h5' }"), backward=False,
        outputs=["out.h5"])

# ------------------------------------------------------------------ Python layers
PYTHON_LAYERS = {"oracle_python_layers.py": '''"""Python layers of the oracle's cases."""
import json

import caffe


class Affine(caffe.Layer):
    """y = w x + x^2, w one learned value per channel (its gradient accumulates); a
    second top holds the phase and the length of param_str."""

    def setup(self, bottom, top):
        self.blobs.add_blob(bottom[0].data.shape[1])
        self.blobs[0].data[...] = json.loads(self.param_str or "{}").get("w", 0.5)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)
        if len(top) > 1:
            top[1].reshape(2)

    def forward(self, bottom, top):
        w = self.blobs[0].data.reshape((1, -1) + (1,) * (bottom[0].data.ndim - 2))
        top[0].data[...] = w * bottom[0].data + bottom[0].data ** 2
        if len(top) > 1:
            top[1].data[...] = [self.phase, len(self.param_str)]

    def backward(self, top, propagate_down, bottom):
        x = bottom[0].data
        w = self.blobs[0].data.reshape((1, -1) + (1,) * (x.ndim - 2))
        self.blobs[0].diff[...] += (top[0].diff * x).sum(axis=(0,) + tuple(range(2, x.ndim)))
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff * (w + 2 * x)


class Loss(caffe.Layer):
    """0.5 sum((a - b)^2) / num."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.d = bottom[0].data - bottom[1].data
        top[0].data[0] = 0.5 * (self.d ** 2).sum() / bottom[0].data.shape[0]

    def backward(self, top, propagate_down, bottom):
        for i, sign in ((0, 1), (1, -1)):
            if propagate_down[i]:
                bottom[i].diff[...] = sign * self.d * top[0].diff[0] / bottom[0].data.shape[0]


class Refuses(caffe.Layer):
    def setup(self, bottom, top):
        raise Exception("setup refuses")
'''}


def python(name, bottoms, tops, kind, param_str="", more=""):
    return layer("Python", name, bottoms, tops, "python_param { module: 'oracle_python_layers' "
                 "layer: '%s' param_str: '%s' } %s" % (kind, param_str, more))


case("python_layer_params_two_passes", [("x", (2, 3, 2))],
     python("p", "x", ["y", "info"], "Affine", '{"w": 0.25}'), phase=TRAIN, passes=2,
     diffs=("y",), files=PYTHON_LAYERS)
case("python_layer_loss", [("x", (3, 4)), ("t", (3, 4))],
     layer("Scale", "s", "x", "xs", "scale_param { axis: 1 }")
     + python("l", ["xs", "t"], "loss", "Loss", more="loss_weight: 2"),
     force_backward=False, diffs=(), files=PYTHON_LAYERS)
case("python_layer_split_in_place", [("x", (2, 3))],
     python("p", "x", "y", "Affine") + layer("TanH", "t", "x", "z")
     + layer("ReLU", "r", "y", "y"), diffs=("y", "z"), files=PYTHON_LAYERS)
case("python_layer_setup_raises", [("x", (2, 3))], python("p", "x", "y", "Refuses"),
     files=PYTHON_LAYERS, raises="Exception")

# ------------------------------------------------------------------ more boundaries
case("filter_empty_then_not", [("a", (4, 2)), ("sel", (4,), zeros)],
     SCALE_A + layer("Filter", "f", ["as", "sel"], "out"), force_backward=False,
     passes=[{}, {"sel": constant([0, 1, 0, 1])}])
case("filter_selector_not_binary", [("a", (4, 2)), ("sel", (4,), constant([0.5, -1, 0, 2]))],
     SCALE_A + layer("Filter", "f", ["as", "sel"], "out"), force_backward=False)
single("embed_fractional_repeated", "Embed", (2, 3), "embed_param { num_output: 3 "
       "input_dim: 4 }", gen=constant([0.9, 3.99, 1.5, 2.2, 0, -0.5]), force_backward=False)
single("spp_height_4", "SPP", (1, 1, 8, 8), "spp_param { pyramid_height: 4 }")
for name, shape in [("spp_too_tall_for_3x3", (1, 2, 3, 3)), ("spp_too_tall_for_4x5", (1, 1, 4, 5))]:
    refused(name, [("a", shape)], layer("SPP", "s", "a", "out", "spp_param { pyramid_height: 3 }"))
case("split_loss_weighted_top_consumed", [("a", (2, 3))],
     layer("Scale", "s", "a", "as", "scale_param { axis: 1 }")
     + layer("TanH", "t", "as", "t", "loss_weight: 2")
     + layer("Power", "p", "t", "p", "power_param { power: 2 } loss_weight: 0.5"),
     force_backward=False, diffs=())
case("split_explicit_loss_weights", [("a", (2, 3))],
     layer("Split", "sp", "a", ["s1", "s2"], "loss_weight: 1 loss_weight: 3"), diffs=())
case("split_of_in_place_chain", [("a", (2, 3))],
     layer("ReLU", "r", "a", "a") + layer("Scale", "s", "a", "a", "scale_param { axis: 1 }")
     + layer("TanH", "t1", "a", "o1") + layer("Sigmoid", "t2", "a", "o2")
     + layer("Eltwise", "e", ["a", "o1", "o2"], "out"))
case("split_input_used_three_times", [("a", (2, 3)), ("b", (2, 3))],
     layer("Scale", "s", "a", "as", "scale_param { axis: 1 }")
     + layer("EuclideanLoss", "l1", ["as", "b"], "l1")
     + layer("EuclideanLoss", "l2", ["as", "b"], "l2", "loss_weight: 0")
     + layer("TanH", "t", "as", "t"), force_backward=False, diffs=())
# values exactly on a bound or kink
single("clip_at_bounds", "Clip", (3, 4), "clip_param { min: -1 max: 1 }", gen=integers(-2, 3),
       exact=True)
single("threshold_at_threshold", "Threshold", (3, 4), "threshold_param { threshold: 1 }",
       gen=integers(-1, 3), backward=False, exact=True)
single("relu_slope_at_0", "ReLU", (3, 4), "relu_param { negative_slope: 0.5 }",
       gen=integers(-1, 2), exact=True)
single("tile_4d_axis2", "Tile", (2, 3, 2, 2), "tile_param { axis: 2 tiles: 3 }")
for operation, axis in [("SUM", 0), ("ASUM", -1), ("SUMSQ", 0), ("MEAN", -1)]:
    single("reduction_%s_axis%d" % (operation.lower(), axis), "Reduction", (2, 3, 4),
           "reduction_param { operation: %s axis: %d coeff: 0.7 }" % (operation, axis))
single("reduction_asum_of_zeros", "Reduction", (2, 3), "reduction_param { operation: ASUM "
       "axis: 1 }", gen=integers(-1, 2))
single("bias_all_axes", "Bias", (2, 3, 4), "bias_param { axis: 1 num_axes: -1 }")
case("bias_by_bottom_last_axis", [("a", (2, 3, 4)), ("b", (4,))],
     layer("Bias", "b", ["a", "b"], "out", "bias_param { axis: -1 }"))
single("bias_filler_seeded", "Bias", (2, 3), "bias_param { filler { type: 'gaussian' std: 3 } }",
       seed=5, fillers=True)
refused("bias_by_bottom_shape", [("a", (2, 3)), ("b", (1,))],
        layer("Bias", "b", ["a", "b"], "out", "bias_param { axis: 0 }"))
single("log_base2_scale_shift", "Log", (2, 3), "log_param { base: 2 scale: -1 shift: 3 }",
       gen=uniform(-1, 2))
single("mvn_across_channels_mean_only", "MVN", (2, 3, 2, 2), "mvn_param { "
       "across_channels: true normalize_variance: false }")
single("mvn_2d", "MVN", (3, 4))
single("swish_default", "Swish", (2, 3))
single("im2col_1x1_padded", "Im2col", (1, 2, 1, 1), "convolution_param { kernel_size: 3 pad: 1 }",
       exact=True)
single("im2col_stride_dilation", "Im2col", (2, 1, 7, 6), "convolution_param { kernel_size: 2 "
       "stride: 3 dilation: 2 pad: 1 }")
case("parameter_4d", [], layer("Parameter", "p", [], "p", "parameter_param { shape { dim: 2 "
                                "dim: 1 dim: 2 dim: 3 } }"), diffs=("p",))
refused("batch_reindex_index_out_of_range", [("a", (3, 2)), ("i", (2,), constant([0, 3]))],
        layer("BatchReindex", "b", ["a", "i"], "out"), backward=False)
loss("contrastive_all_dissimilar", "ContrastiveLoss", [("a", (4, 3)), ("b", (4, 3)),
                                                      ("y", (4,), zeros)])
loss("multinomial_logistic_probability_0", "MultinomialLogisticLoss",
     [("p", (3, 4), constant([0, 1, 0, 0, 0.5, 0.5, 0, 0, 0, 0, 0, 1])),
      ("l", (3,), constant([0, 2, 3]))])
loss("euclidean_1d_weighted", "EuclideanLoss", [("a", (5,)), ("b", (5,))], "loss_weight: 0.5")
loss("hinge_l2_weighted", "HingeLoss", [("a", (4, 3)), ("l", (4,), integers(0, 3))],
     "loss_weight: 2 hinge_loss_param { norm: L2 }")

assert len({c.name for c in CASES}) == len(CASES)
