"""Pins for behaviours of the common layers that no other test held (each found by a
mutation that every existing test let through).

Expected values come from Caffe's C++ source semantics, written out here as hand
formulas, from the fork's LRN loops (tests/oracles/lrn_oracle.cpp), and, where
CAFFELITE_BVLC_PYCAFFE is set, from the real BVLC Caffe 1.0 through the oracle machinery
of tests/test_bvlc_oracle.py (cases of their own, below).

* BNLL's backward clips at kBNLL_THRESHOLD = 50 before the exp (bnll_layer.cpp), so a
  float input above log(FLT_MAX) ~ 88.7 gets a gradient of about dy, not inf/inf = NaN.
* InnerProduct with ``transpose: true`` accumulates its weight gradient (caffe_cpu_gemm
  with beta 1), as without transpose.
* Concat's ``concat_dim`` and Slice's ``slice_dim`` equal to the number of axes are
  refused (CHECK_LT(concat_axis_, num_axes) "concat_dim out of range"; the same for
  slice_dim), as a layer error naming the parameter.
* LRN ACROSS_CHANNELS backward: ``cache_ratio = 2. * alpha_ * beta_ / size_`` in double,
  stored as Dtype (a float32 evaluation differs in the last bit for some alpha, beta).
* Reduction MEAN: ``coeff_ /= dim_`` in Dtype, dim_ converted to float (so beyond 2^24
  elements the divisor is float(dim), not dim).
* Reduction SUMSQ backward: ``caffe_cpu_scale(dim_, 2 * bottom_coeff, x, diff)``: the
  factor 2 * top_diff * coeff is rounded (overflowing to inf) before it meets x.
* ELU (CPU) ``max(x, 0) + alpha * (exp(min(x, 0)) - 1)``: with alpha < 0 an input of +0
  gives +0 (what a where(x > 0, ...) form would get wrong) and -0 gives -0 (which
  caffelite got wrong until this test: numpy's maximum(x, 0) returns +0 on that tie).
* Concat writes no diff into a bottom without propagate_down.
"""
import os
import zlib

import numpy as np
import pytest

from caffelite.layer import LayerError
from layer_testing import make_layer, run_forward, setup_layer
from test_lrn import fork_lrn  # noqa: F401  (the fork's LRN loops, compiled)

f32 = np.float32
PYCAFFE = os.environ.get("CAFFELITE_BVLC_PYCAFFE")


# ------------------------------------------------------------------ BNLL
def test_bnll_gradient_beyond_float_exp_overflow_is_clipped_at_50():
    """bnll_layer.cpp: expval = exp(std::min(x, Dtype(kBNLL_THRESHOLD))) (kBNLL_THRESHOLD
    = 50), bottom_diff = top_diff * expval / (expval + 1.): top_diff * expval in float,
    the division in double, stored as float."""
    x = np.array([[100.0, 89.0, 88.5, 60.0, 51.0, 50.0, -100.0, 0.5]], f32)
    dy = np.array([[1.0, -2.0, 0.5, 3.0, -1.0, 1.5, 1.0, 2.0]], f32)
    layer = make_layer('type: "BNLL"', dtype=np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    run_forward(layer, bottom, top)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    e = np.exp(np.minimum(x, f32(50)).astype(np.float64)).astype(f32)
    want = ((dy * e).astype(np.float64) / (e.astype(np.float64) + 1.0)).astype(f32)
    assert not np.isnan(bottom[0].diff).any()
    np.testing.assert_array_equal(bottom[0].diff, want)
    np.testing.assert_array_equal(bottom[0].diff[0, :6], dy[0, :6])   # e / (e + 1) = 1


# ------------------------------------------------------------------ InnerProduct
def test_inner_product_transpose_accumulates_the_weight_gradient():
    """inner_product_layer.cpp, transpose_: caffe_cpu_gemm(CblasTrans, CblasNoTrans, K_, N_,
    M_, 1., bottom_data, top_diff, (Dtype)1., weight_diff): the (K, N) weight diff adds
    x^T dy to what it holds; the bias diff adds the column sums of dy."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 5))
    layer = make_layer('type: "InnerProduct" inner_product_param { num_output: 4 '
                       'transpose: true }')
    bottom, top = setup_layer(layer, [x])
    assert layer.blobs[0].shape == (5, 4)
    for blob in layer.blobs:
        blob.data[...] = rng.standard_normal(blob.shape)
    run_forward(layer, bottom, top)
    np.testing.assert_allclose(top[0].data, x @ layer.blobs[0].data + layer.blobs[1].data)
    dy = rng.standard_normal(top[0].shape)
    top[0].diff[...] = dy
    held_w, held_b = rng.standard_normal((5, 4)), rng.standard_normal(4)
    layer.blobs[0].diff[...] = held_w
    layer.blobs[1].diff[...] = held_b
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, held_w + x.T @ dy)
    np.testing.assert_allclose(layer.blobs[1].diff, held_b + dy.sum(axis=0))
    np.testing.assert_allclose(bottom[0].diff, dy @ layer.blobs[0].data.T)
    layer.backward(top, [False], bottom)        # a second pass adds again
    np.testing.assert_allclose(layer.blobs[0].diff, held_w + 2 * (x.T @ dy))


# ------------------------------------------------------------------ Concat / Slice
@pytest.mark.parametrize("text,tops,word", [
    ('type: "Concat" concat_param { concat_dim: 2 }', 1, "concat_dim"),
    ('type: "Concat" concat_param { concat_dim: 3 }', 1, "concat_dim"),
    ('type: "Slice" slice_param { slice_dim: 2 }', 2, "slice_dim"),
    ('type: "Slice" slice_param { slice_dim: 2 slice_point: 1 }', 2, "slice_dim"),
])
def test_legacy_dim_at_or_beyond_the_number_of_axes_is_a_layer_error(text, tops, word):
    """concat_layer.cpp / slice_layer.cpp: CHECK_LT(axis, num_axes) "concat_dim (slice_dim)
    out of range" for the legacy field; 2 axes here, so dim 2 is already out."""
    layer = make_layer(text)
    bottoms = [np.zeros((2, 4))] * (2 if "Concat" in text else 1)
    with pytest.raises(LayerError, match=word):
        setup_layer(layer, bottoms, num_top=tops)


# ------------------------------------------------------------------ LRN
@pytest.mark.parametrize("size,alpha,beta", [(3, 0.45, 0.75), (7, 0.7, 0.95),
                                             (3, 0.95, 0.6)])
def test_lrn_across_channels_cache_ratio_is_computed_in_double(fork_lrn, size, alpha, beta):
    """Parameters where 2 * alpha * beta / size rounds differently in float32 than in
    double stored as float: the backward must be the fork's, bit for bit."""
    a, b = f32(alpha), f32(beta)
    assert f32(2.0 * float(a) * float(b) / size) != f32(2) * a * b / f32(size)
    rng = np.random.default_rng(size)
    shape = (2, 9, 3, 4)
    x = (rng.standard_normal(shape) * 3).astype(f32)
    dy = rng.standard_normal(shape).astype(f32)
    layer = make_layer(f'type: "LRN" lrn_param {{ local_size: {size} alpha: {alpha} '
                       f'beta: {beta} k: 2 }}', dtype=np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    y = run_forward(layer, bottom, top)[0]
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    want_y, want_dx = fork_lrn(x, dy, size, alpha, beta, 2.0)
    assert np.array_equal(y.view(np.uint32), want_y.view(np.uint32))
    assert np.array_equal(bottom[0].diff.view(np.uint32), want_dx.view(np.uint32))


# ------------------------------------------------------------------ Reduction
def test_reduction_mean_divides_by_dim_converted_to_float():
    """reduction_layer.cpp: ``coeff_ /= dim_`` with coeff_ a float and dim_ an int, so
    the int converts to float first: for dim = 2^24 + 1 the divisor is 2^24 and the
    backward writes top_diff * coeff_ = 2^-24 exactly (BVLC Caffe 1.0 gives
    0x1p-24), not the float nearest 1 / (2^24 + 1)."""
    dim = 2 ** 24 + 1
    layer = make_layer('type: "Reduction" reduction_param { operation: MEAN axis: 1 }',
                       dtype=np.float32)
    bottom, top = setup_layer(layer, [np.zeros((1, dim), f32)], dtype=np.float32)
    run_forward(layer, bottom, top)
    top[0].diff[...] = 1
    layer.backward(top, [True], bottom)
    diff = bottom[0].diff
    assert diff.min() == diff.max() == f32(2.0 ** -24)
    assert f32(2.0 ** -24) != f32(1.0 / dim)      # what a double division would give


def test_reduction_sumsq_backward_rounds_two_times_the_factor_first():
    """reduction_layer.cpp: bottom_coeff = top_diff * coeff_;
    caffe_cpu_scale(dim_, 2 * bottom_coeff, bottom_data, bottom_diff): 2 * 3e38
    overflows to inf before it meets x (BVLC Caffe 1.0: [inf, nan, -inf, inf])."""
    x = np.array([[0.25, 0.0, -1e-30, 1.0]], f32)
    layer = make_layer('type: "Reduction" reduction_param { operation: SUMSQ axis: 1 }',
                       dtype=np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    run_forward(layer, bottom, top)
    top[0].diff[...] = 3e38
    with np.errstate(over="ignore", invalid="ignore"):
        layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, [[np.inf, np.nan, -np.inf, np.inf]])


# ------------------------------------------------------------------ ELU
def _elu_forward(x, alpha):
    layer = make_layer(f'type: "ELU" elu_param {{ alpha: {alpha} }}', dtype=np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    return run_forward(layer, bottom, top)[0]


def test_elu_negative_alpha_gives_plus_zero_for_plus_zero():
    """elu_layer.cpp (CPU): std::max(x, 0) + alpha * (exp(std::min(x, 0)) - 1): with
    alpha = -0.5 an input of +0 gives +0 + (-0.5 * 0 = -0) = +0 (BVLC Caffe 1.0 too),
    where the GPU form x > 0 ? x : alpha * (exp(x) - 1) gives -0."""
    y = _elu_forward(np.zeros((1, 3), f32), -0.5)
    np.testing.assert_array_equal(y, 0)
    assert not np.signbit(y).any()


def test_elu_negative_alpha_gives_minus_zero_for_minus_zero():
    """The same formula at x = -0: std::max(-0, 0) is -0 ((a < b) ? b : a), and
    -0 + -0 = -0 (BVLC Caffe 1.0 gives -0: case pin_elu_negative_alpha_minus_zero)."""
    y = _elu_forward(np.full((1, 3), -0.0, f32), -0.5)
    np.testing.assert_array_equal(y, 0)
    assert np.signbit(y).all()


# ------------------------------------------------------------------ Concat
def test_concat_backward_leaves_the_diff_of_a_bottom_without_propagate_down():
    """concat_layer.cpp Backward_cpu: each bottom's diff is written only
    ``if (propagate_down[i])``; the others keep what they hold."""
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((2, 3, 2)), rng.standard_normal((2, 1, 2))
    layer = make_layer('type: "Concat"')
    bottom, top = setup_layer(layer, [a, b])
    run_forward(layer, bottom, top)
    dy = rng.standard_normal(top[0].shape)
    top[0].diff[...] = dy
    for blob in bottom:
        blob.diff[...] = 7.0
    layer.backward(top, [False, True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 7.0)
    np.testing.assert_array_equal(bottom[1].diff, dy[:, 3:])


# ------------------------------------------------------------------ the BVLC oracle
def _oracle_module():
    import test_bvlc_oracle
    return test_bvlc_oracle


def _specs():
    cases = _oracle_module()._load_oracle_module("bvlc_layer_cases")
    LayerCase, layer, constant = cases.LayerCase, cases.layer, cases.constant
    out = [
        LayerCase("pin_bnll_beyond_exp_overflow", [("data", (2, 4), constant(
            [100, 89, 88.5, 60, 51, 50, -100, 0.5]))],
            layer("BNLL", "l", "data", "out")),
        LayerCase("pin_inner_product_transpose_accumulates", [("data", (3, 5))],
                  layer("InnerProduct", "ip", "data", "out",
                        "inner_product_param { num_output: 4 transpose: true }"),
                  passes=2, accumulate=True),
        LayerCase("pin_elu_negative_alpha_plus_zero", [("data", (2, 3), constant([0.0]))],
                  layer("ELU", "l", "data", "out", "elu_param { alpha: -0.5 }"), exact=True),
        LayerCase("pin_elu_negative_alpha_minus_zero", [("data", (2, 3), constant([-0.0]))],
                  layer("ELU", "l", "data", "out", "elu_param { alpha: -0.5 }"), exact=True),
        # force_backward off, the Concat's top a loss (loss_weight 2): "bs" needs a
        # gradient (the Scale learns), the Input "a" none, and Caffe leaves its diff at 0
        LayerCase("pin_concat_no_backward_to_an_input",
                  [("a", (2, 3, 2)), ("b", (2, 1, 2))],
                  layer("Scale", "s", "b", "bs", "scale_param { axis: 0 num_axes: 0 }")
                  + layer("Concat", "c", ["a", "bs"], "out", "loss_weight: 2"),
                  force_backward=False, diffs=()),
        LayerCase("pin_reduction_sumsq_overflowing_factor",
                  [("data", (8, 4), constant([0.25, 0.0, -1e-30, 1.0]))],
                  layer("Reduction", "l", "data", "out",
                        "reduction_param { operation: SUMSQ axis: 1 coeff: 1.5e38 }"),
                  nans=True),
    ]
    for name, kind, params, tops in [
            ("pin_concat_dim_at_num_axes", "Concat", "concat_param { concat_dim: 2 }", 1),
            ("pin_slice_dim_at_num_axes", "Slice", "slice_param { slice_dim: 2 }", 2)]:
        bottoms = ["a", "b"] if kind == "Concat" else ["a"]
        out.append(LayerCase(name, [(b, (2, 4)) for b in bottoms],
                             layer(kind, "l", bottoms, ["o%d" % i for i in range(tops)],
                                   params), refused=True))
    return out


SPEC_NAMES = ["pin_bnll_beyond_exp_overflow", "pin_inner_product_transpose_accumulates",
              "pin_elu_negative_alpha_plus_zero", "pin_reduction_sumsq_overflowing_factor",
              "pin_concat_no_backward_to_an_input",
              "pin_elu_negative_alpha_minus_zero"]
REFUSED_NAMES = ["pin_concat_dim_at_num_axes", "pin_slice_dim_at_num_axes"]


@pytest.fixture(scope="module")
def bvlc_results(tmp_path_factory):
    if not PYCAFFE:
        pytest.skip("set CAFFELITE_BVLC_PYCAFFE (scripts/bvlc_caffe_oracle.py)")
    oracle = _oracle_module()
    cases = [oracle.LayerCase(spec) for spec in _specs()]
    root = tmp_path_factory.mktemp("pinned_bvlc")
    ours = {}
    for case in cases:
        folder = root / case.name
        folder.mkdir()
        rng = np.random.default_rng([20261207, zlib.crc32(case.name.encode())])
        try:
            with np.errstate(invalid="ignore", over="ignore"):
                ours[case.name] = oracle._run_caffelite(case, str(folder), rng)[0]
        except Exception as error:      # kept for the case's own test to report
            ours[case.name] = error
    theirs, _ = oracle._oracle_results(root, cases)
    return ours, theirs, {case.name: case for case in cases}


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_pinned_case_matches_bvlc_caffe(bvlc_results, name):
    ours, theirs, cases = (r[name] for r in bvlc_results)
    assert not isinstance(ours, Exception), f"caffelite failed: {ours!r}"
    assert isinstance(theirs, dict), f"Caffe failed on {name}: {theirs}"
    assert sorted(ours) == sorted(theirs)
    assert any(key.split("/")[-2] in ("diff", "pdiff") for key in theirs)
    for key in sorted(theirs):
        _oracle_module()._agree(ours[key], theirs[key], key, cases.exact, cases.nans)


@pytest.mark.parametrize("name", REFUSED_NAMES)
def test_pinned_case_refused_as_by_bvlc_caffe(bvlc_results, name):
    ours, theirs, _ = (r[name] for r in bvlc_results)
    assert theirs.returncode != 0 and "out of range" in theirs.stderr, theirs.stderr[-2000:]
    assert isinstance(ours, str) and ours, f"caffelite did not refuse it as a layer: {ours!r}"
