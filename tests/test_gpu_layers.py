"""Every device layer type in GPU mode against CPU mode, forward and backward.

Each case builds one layer twice from the same random inputs, parameters, parameter
diffs and top diffs: once in CPU mode (numpy) and once in GPU mode, where the layer
runs under ``backend.device_access()`` as the Net runs it, on the emulator (always) or
on CuPy (``-m gpu``). Tops and bottom diffs start poisoned with NaN on both sides, so
an element the device path forgets to write shows up as a mismatch; and the CPU side's
tops and propagated bottom diffs must hold no NaN (unless the case feeds NaN in), so an
element that array code shared by both sides forgets to write is caught too; and the
emulator's ``empty``/``empty_like`` give NaN-filled memory (as reused device memory holds
garbage), so a device scratch array read before it is written shows as well.

Exactness. On the emulator the array code is numpy's on both sides, so every layer is
compared BIT FOR BIT except where a CUDA kernel does the sum in another order or uses
the C library's expf/logf (documented in docs/gpu.md, bounds in units of eps):
  * col2im (Convolution's bottom diff, Deconvolution's forward): the kernel adds each
    pixel's taps last to first, numpy first to last:  (taps + 2) eps sum|terms|,
    sum|terms| from the same CPU layer run on absolute values;
  * Softmax forward: (2C + 8) eps relative (expf); SoftmaxWithLoss: its probabilities
    the same, the loss (2C + 12) eps per counted position plus 6 eps relative (logf),
    the gradient the probabilities' bound times the scale;
  * where the host follows the fork's CPU code into C's double exp/log/tanh (ELU,
    Sigmoid, TanH, BNLL, Exp, Log, SigmoidCrossEntropyLoss, DeepLab v1's softmax loss)
    and the device path stays in float as the fork's kernels do: the CUDA bounds.
On a real GPU (``cuda``) CuPy's reductions, cuBLAS GEMMs and CUDA's transcendental
functions add their own last-bit differences: the ``cuda`` bounds below are the
same kind of worst-case sums (terms x eps x sum|terms|, or k eps relative for
element-wise maths); only copies, comparisons and single IEEE operations stay exact.
"""
import dataclasses
import math
from typing import Callable, Optional

import numpy as np
import pytest

import caffelite
from caffelite import backend, kernels
from caffelite.blob import Blob
from caffelite.layer import LAYER_REGISTRY, LayerError
from caffelite.layers import im2col as im2col_module
from layer_testing import TEST, TRAIN, blobs_from, make_layer, spy_calls

F32, F64 = np.float32, np.float64


# ------------------------------------------------------------------- backends
def _start(kind):
    if kind == "emulated":
        from caffelite.kernels.host import compiler
        if compiler() is None:
            pytest.skip("the GPU emulator runs the kernels host-compiled: no C++ compiler")
        backend.set_mode_gpu(emulate=True)
    else:
        try:
            backend.set_mode_gpu(emulate=False)
        except kernels.GPUUnavailableError as e:
            pytest.skip(str(e))


@pytest.fixture(autouse=True)
def _device_memory_poisoned(poisoned_device_memory):
    """Every test here runs with the emulator's fresh device memory poisoned (conftest's
    ``poisoned_device_memory``): scratch matrices a path must fill, padding columns it
    must zero."""


@pytest.fixture(params=["emulated", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """The GPU backend under test; CPU mode again afterwards (tests share the process)."""
    try:
        _start(request.param)
        backend.set_mode_cpu()
        yield request.param
    finally:
        backend.set_mode_cpu()


def eps(dtype):
    return float(np.finfo(dtype).eps)


# ------------------------------------------------------------------- bounds
@dataclasses.dataclass(frozen=True)
class Bound:
    """|gpu - cpu| <= k * eps * R element-wise, R by ``ref``:
    "exact": k ignored, bit-for-bit (NaN where NaN);
    "value": |cpu| (relative); "scale": |cpu| + max|cpu| (relative to the array's
    magnitude, for sums that may cancel); "abs": the same CPU layer run on absolute
    inputs, parameters and top diffs (sum|terms| of a linear layer). Under every bound
    NaN and infinities must match exactly, and "value" / "scale" use finite |cpu| only."""
    k: float = 0
    ref: str = "exact"


EXACT = Bound()


def _as_bound(b, case):
    return b(case) if callable(b) else b


@dataclasses.dataclass
class Case:
    id: str
    text: str
    bottoms: Callable            # rng -> list of arrays
    num_top: int = 1
    phase: int = TRAIN
    dtype: type = F32
    propagate: Optional[list] = None
    backward: bool = True
    in_place: bool = False
    params: Optional[Callable] = None       # (rng, [shapes]) -> list of arrays
    poison_tops: bool = True
    bottom_diff_poison: bool = True         # False: random start (layers that keep it)
    cpu_top_for_backward: bool = False      # backward reads the top data: share it
    nan_outputs: bool = False               # fed NaN: NaN in the CPU outputs is expected
    fwd: object = EXACT                     # emulated bounds (Bound or case -> Bound)
    bwd: object = EXACT
    cuda_fwd: object = EXACT                # real-GPU bounds
    cuda_bwd: object = EXACT
    seed: int = 0
    cpu_tops: Optional[list] = None         # set by compare (cpu_top_for_backward)

    @property
    def type_name(self):
        return self.text.split('"')[1]


def normal(*shape):
    return lambda rng: rng.standard_normal(shape)


def away_from_zero(*shape):
    """Normal values with |x| >= 0.05 (kinks at 0 stay out of the comparison)."""
    def make(rng):
        x = rng.standard_normal(shape)
        return np.where(np.abs(x) < 0.05, np.sign(x) * 0.05 + x, x)
    return make


def integers(lo, hi, *shape):
    return lambda rng: rng.integers(lo, hi, shape).astype(np.float64)


def with_specials(maker):
    """``maker``'s values with -inf, inf, NaN, -0 and 0 first."""
    def make(rng):
        x = maker(rng)
        x.flat[:5] = [-np.inf, np.inf, np.nan, -0.0, 0.0]
        return x
    return make


def several(*makers):
    return lambda rng: [m(rng) for m in makers]


def labels_with_ignore(classes, shape, ignore=255, fraction=0.2):
    def make(rng):
        lab = rng.integers(0, classes, shape).astype(np.float64)
        lab[rng.random(shape) < fraction] = ignore
        return lab
    return make


# ------------------------------------------------------------------- running
class Run:
    """Outputs of one run: tops and parameters after forward, diffs after backward."""

    def __init__(self):
        self.forward = []
        self.backward = []
        self.num_bottom = 0         # backward: the bottoms' diffs, then the parameters'


def _random_like(rng, shape):
    return rng.standard_normal(shape)


def _shares(a, b, which):
    return a.memories()[which] is b.memories()[which]


def run_case(case, mode, absolute=False):
    """Run ``case`` in ``mode`` ("cpu", "emulated", "cuda"); ``absolute`` takes |x| of
    every input (for the "abs" bounds). Returns (Run of host arrays, the layer)."""
    fix = np.abs if absolute else (lambda a: a)
    rng = np.random.default_rng(case.seed)
    gpu = mode != "cpu"
    if gpu:
        _start(mode)
    try:
        backend.set_random_seed(1234)
        bottom_arrays = [fix(np.asarray(a, np.float64)) for a in case.bottoms(rng)]
        layer = make_layer(case.text, case.phase, case.dtype)
        bottom = blobs_from(bottom_arrays, case.dtype)
        top = [bottom[0]] if case.in_place else [Blob((), case.dtype)
                                                 for _ in range(case.num_top)]
        layer.check_blob_counts(bottom, top)
        layer.setup(bottom, top)
        shapes = [b.shape for b in layer.blobs]
        values = case.params(rng, shapes) if case.params else \
            [rng.standard_normal(s) for s in shapes]
        for blob, v in zip(layer.blobs, values):
            blob.host_data[...] = fix(np.asarray(v))
            blob.host_diff[...] = fix(rng.standard_normal(blob.shape))
        layer.reshape(bottom, top)                    # as the Net does it, host access
        if not case.poison_tops:
            for t in top:
                t.host_data[...] = rng.standard_normal(t.shape)
        out = Run()
        out.num_bottom = len(bottom)
        with backend.device_access(gpu):
            layer.reshape(bottom, top)
            for t in top:
                # Tops that ARE a bottom's memory (in place, Split, Flatten...) keep it.
                if case.poison_tops and not any(_shares(t, b, 0) for b in bottom):
                    t.data[...] = np.nan
            layer.forward(bottom, top)
        out.forward = [t.host_data.copy() for t in top] + \
            [b.host_data.copy() for b in layer.blobs]
        if not case.backward:
            return out, layer
        for t in top:
            t.host_diff[...] = fix(rng.standard_normal(t.shape))
        if case.cpu_tops is not None:
            for t, v in zip(top, case.cpu_tops):
                t.host_data[...] = v
        for b in bottom:
            if not any(_shares(t, b, 1) for t in top):
                b.host_diff[...] = np.nan if case.bottom_diff_poison else \
                    rng.standard_normal(b.shape)
        propagate = case.propagate if case.propagate is not None else [True] * len(bottom)
        with backend.device_access(gpu):
            layer.backward(top, propagate, bottom)
        out.backward = [b.host_diff.copy() for b in bottom] + \
            [b.host_diff.copy() for b in layer.blobs]
        return out, layer
    finally:
        backend.set_mode_cpu()


def assert_bounded(actual, expected, bound, dtype, what, reference=None):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    if bound.ref == "exact":
        same = (actual == expected) | (np.isnan(actual) & np.isnan(expected))
        if not same.all():
            i = np.flatnonzero(~same)[0]
            pytest.fail(f"{what}: {(~same).sum()} of {same.size} elements differ, first at "
                        f"{np.unravel_index(i, same.shape)}: gpu {actual.flat[i]!r} vs cpu "
                        f"{expected.flat[i]!r}")
        return
    # NaN and infinities match exactly; the bounds are over the finite values only (an
    # infinite |cpu| would make them infinite).
    finite = np.isfinite(expected)
    special = ~finite | ~np.isfinite(actual)
    same = (actual == expected) | (np.isnan(actual) & np.isnan(expected))
    if not same[special].all():
        i = np.flatnonzero(special & ~same)[0]
        pytest.fail(f"{what}: non-finite values differ, first at "
                    f"{np.unravel_index(i, same.shape)}: gpu {actual.flat[i]!r} vs cpu "
                    f"{expected.flat[i]!r}")
    magnitude = np.where(finite, np.abs(expected), 0)
    if bound.ref == "value":
        ref = magnitude
    elif bound.ref == "scale":
        ref = magnitude + magnitude.max(initial=0)
    else:
        ref = np.asarray(reference, np.float64)
    limit = bound.k * eps(dtype) * ref
    err = np.zeros_like(expected)
    err[finite] = np.abs(actual[finite] - expected[finite])
    over = err > limit
    if over.any():
        i = np.argmax(np.where(over, err - limit, -np.inf))
        pytest.fail(f"{what}: {over.sum()} elements above {bound}; worst "
                    f"{np.unravel_index(i, err.shape)}: gpu {actual.flat[i]!r} vs cpu "
                    f"{expected.flat[i]!r} (bound {limit.flat[i]:.3g})")


def assert_written(case, cpu):
    """The CPU run's tops and propagated bottom diffs hold no NaN: an element still at
    its poison was written by neither side when both run the same array code."""
    propagate = case.propagate or [True] * cpu.num_bottom
    outputs = [("forward output", i, a) for i, a in enumerate(cpu.forward[:case.num_top])]
    outputs += [("backward diff", i, a) for i, a in enumerate(cpu.backward[:cpu.num_bottom])
                if propagate[i]]
    for what, i, a in outputs:
        assert not np.isnan(a).any(), f"{case.id} CPU {what} {i}: NaN (left unwritten?)"


def compare(case, device):
    case.cpu_tops = None
    cpu, _ = run_case(case, "cpu")
    if case.cpu_top_for_backward:
        case.cpu_tops = cpu.forward[:case.num_top]
    if not case.nan_outputs:
        assert_written(case, cpu)
    gpu, layer = run_case(case, device)
    fwd = _as_bound(case.fwd if device == "emulated" else case.cuda_fwd, case)
    bwd = _as_bound(case.bwd if device == "emulated" else case.cuda_bwd, case)
    absolute = None
    if "abs" in (fwd.ref, bwd.ref):
        case.cpu_tops = None
        absolute, _ = run_case(case, "cpu", absolute=True)
    assert len(gpu.forward) == len(cpu.forward)
    for i, (g, c) in enumerate(zip(gpu.forward, cpu.forward)):
        ref = absolute.forward[i] if absolute else None
        assert_bounded(g, c, fwd, case.dtype, f"{case.id} forward output {i}", ref)
    for i, (g, c) in enumerate(zip(gpu.backward, cpu.backward)):
        ref = absolute.backward[i] if absolute else None
        assert_bounded(g, c, bwd, case.dtype, f"{case.id} backward diff {i}", ref)
    return cpu, gpu, layer


# ------------------------------------------------------------------- the cases
def conv_text(kind="Convolution", bias=True, **p):
    body = " ".join(f"{k}: {v}" for k, v in p.items())
    return (f'type: "{kind}" convolution_param {{ {body} bias_term: {str(bias).lower()} '
            f'weight_filler {{ type: "gaussian" std: 0.1 }} }}')


def taps_bound(taps):
    return Bound(taps + 2, "abs")


def gemm_bound(k):
    """cuBLAS vs numpy's BLAS: the dot products in any order, plus a fused rounding."""
    return Bound(k + 2, "abs")


def conv_cases():
    out = []
    specs = [
        # id, params, input shape, output channels
        ("3x3_pad1", dict(num_output=4, kernel_size=3, pad=1), (2, 3, 7, 9)),
        ("3x3_stride2_odd", dict(num_output=5, kernel_size=3, stride=2), (2, 3, 9, 7)),
        ("dilated", dict(num_output=3, kernel_size=3, pad=2, dilation=2), (1, 2, 9, 8)),
        ("rect_hw", dict(num_output=4, kernel_h=3, kernel_w=2, stride_h=2, stride_w=1,
                         pad_h=1, pad_w=0), (2, 2, 8, 7)),
        ("group2", dict(num_output=4, kernel_size=3, pad=1, group=2), (2, 4, 5, 6)),
        ("1x1", dict(num_output=3, kernel_size=1), (2, 5, 4, 3)),
        ("big_pad_borders", dict(num_output=2, kernel_size=5, pad=3, stride=3), (1, 2, 7, 5)),
        # (2 - 3) / 2 + 1 = 1 row in C: the one window reads zeros below the image
        ("c_division_size", dict(num_output=2, kernel_size=3, stride=2), (1, 2, 2, 4)),
    ]
    # 2-D convolutions other than 1x1 make one GEMM per group of whole images on the
    # device (the emulator's too), the host one per image: other GEMM shapes, so BLAS
    # may sum in other orders and the emulated bounds are the GEMM bounds as well.
    for name, params, shape in specs:
        taps = params.get("kernel_size", 0) ** 2 or params["kernel_h"] * params["kernel_w"]
        cin = shape[1] // params.get("group", 1)
        cout = params["num_output"] // params.get("group", 1)
        positions = shape[0] * shape[2] * shape[3]
        one_by_one = params.get("kernel_size") == 1
        for dtype in (F32, F64):
            fwd, bwd = gemm_bound(cin * taps), gemm_bound(positions + cout + taps)
            out.append(Case(
                f"Convolution_{name}_{np.dtype(dtype).name}", conv_text(**params),
                several(normal(*shape)), dtype=dtype,
                fwd=EXACT if one_by_one else fwd, bwd=Bound(0) if one_by_one else bwd,
                cuda_fwd=fwd, cuda_bwd=bwd))
            fwd, bwd = gemm_bound(cout + taps), gemm_bound(positions * taps + cin * taps)
            out.append(Case(
                f"Deconvolution_{name}_{np.dtype(dtype).name}",
                conv_text("Deconvolution", **params), several(normal(*shape)), dtype=dtype,
                fwd=Bound(0) if one_by_one else fwd, bwd=EXACT if one_by_one else bwd,
                cuda_fwd=fwd, cuda_bwd=bwd))
    out.append(Case("Convolution_two_bottoms_no_bias",
                    conv_text(bias=False, num_output=3, kernel_size=3, pad=1),
                    several(normal(2, 2, 5, 5), normal(2, 2, 5, 5)), num_top=2,
                    fwd=gemm_bound(18), bwd=gemm_bound(80),
                    cuda_fwd=gemm_bound(18), cuda_bwd=gemm_bound(80)))
    out.append(Case("Convolution_3d_slices",
                    conv_text(num_output=2, kernel_size=3, pad=1),
                    several(normal(1, 2, 4, 5, 3)), cuda_fwd=gemm_bound(54),
                    cuda_bwd=gemm_bound(60 + 27)))
    return out


def pooling_text(**p):
    body = " ".join(f"{k}: {v}" for k, v in p.items())
    return f'type: "Pooling" pooling_param {{ {body} }}'


def pooling_cases():
    specs = [
        ("max_ceil_overhang", dict(pool="MAX", kernel_size=3, stride=2), (2, 3, 8, 9), 2),
        ("max_pad", dict(pool="MAX", kernel_size=3, stride=2, pad=1), (1, 2, 7, 6), 2),
        ("max_rect", dict(pool="MAX", kernel_h=2, kernel_w=3, stride_h=2, stride_w=1),
         (2, 2, 5, 7), 1),
        ("max_global", dict(pool="MAX", global_pooling="true"), (2, 3, 5, 4), 2),
        ("max_global_whole_plane", dict(pool="MAX", global_pooling="true"),
         (1, 2, 17, 19), 2),
        ("max_floor", dict(pool="MAX", kernel_size=2, stride=2, round_mode="FLOOR"),
         (1, 2, 7, 7), 1),
        ("ave_ceil_overhang", dict(pool="AVE", kernel_size=3, stride=2), (2, 3, 8, 9), 1),
        ("ave_pad", dict(pool="AVE", kernel_size=3, stride=2, pad=1), (1, 2, 7, 6), 1),
        ("ave_global", dict(pool="AVE", global_pooling="true"), (2, 3, 5, 4), 1),
        ("ave_global_whole_plane", dict(pool="AVE", global_pooling="true"),
         (1, 2, 17, 19), 1),
    ]
    out = []
    for name, params, shape, tops in specs:
        for dtype in (F32, F64):
            out.append(Case(f"Pooling_{name}_{np.dtype(dtype).name}", pooling_text(**params),
                            several(normal(*shape)), num_top=tops, dtype=dtype,
                            propagate=[True]))
    # Ties and -inf / NaN: integer data, the first maximum must win on both sides.
    def ties(rng):
        x = rng.integers(-2, 2, (1, 2, 6, 7)).astype(np.float64)
        x[0, 0, 1, 1] = -np.inf
        x[0, 1, 2, 3] = np.nan
        return [x]
    out.append(Case("Pooling_max_ties_nan_inf", pooling_text(pool="MAX", kernel_size=3,
                                                             stride=2, pad=1),
                    ties, num_top=2))
    # STOCHASTIC at TEST is deterministic (its TRAIN draws differ between the sides).
    out.append(Case("Pooling_stochastic_test", pooling_text(pool="STOCHASTIC", kernel_size=3,
                                                            stride=2),
                    lambda rng: [rng.uniform(0, 2, (2, 3, 8, 9))], phase=TEST,
                    backward=False, cuda_fwd=Bound(2 * 9 + 4, "value")))
    return out


def interp_text(**p):
    body = " ".join(f"{k}: {v}" for k, v in p.items())
    return f'type: "Interp" interp_param {{ {body} }}'


def interp_cases():
    specs = [
        # id, params, input shape, output (h, w)
        ("zoom", dict(zoom_factor=3), (2, 3, 4, 5), (10, 13)),
        ("shrink", dict(shrink_factor=4), (1, 2, 13, 9), (4, 3)),
        ("shrink_zoom", dict(shrink_factor=2, zoom_factor=3), (1, 2, 7, 8), (10, 10)),
        ("size_odd", dict(height=7, width=3), (2, 2, 5, 6), (7, 3)),
        ("pads", dict(zoom_factor=2, pad_beg=-1, pad_end=-2), (1, 2, 8, 9), (9, 11)),
        ("same_size_crop", dict(height=5, width=6, pad_beg=-1, pad_end=-1), (1, 2, 7, 8),
         (5, 6)),
        ("to_one", dict(height=1, width=1), (1, 2, 4, 5), (1, 1)),
    ]
    out = []
    for name, params, shape, _output in specs:
        for dtype in (F32, F64):
            # Exact both ways: the device backward gathers in the fork's CPU order.
            out.append(Case(f"Interp_{name}_{np.dtype(dtype).name}", interp_text(**params),
                            several(normal(*shape)), dtype=dtype))
    out.append(Case("Interp_second_bottom", interp_text(),
                    several(normal(2, 2, 5, 6), normal(2, 1, 9, 4))))
    return out


def softmax_bound(channels):
    return Bound(2 * channels + 8, "value")


def softmax_cases():
    out = []
    for name, axis, shape in (("axis1", 1, (2, 5, 3, 4)), ("axis_last", -1, (3, 4, 6)),
                              ("axis0", 0, (4, 3, 2))):
        channels = shape[axis]
        for dtype in (F32, F64):
            exact_backward = axis != -1
            # With the CPU's top data fed to both, the backward is the kernel's per
            # position loop; numpy sums a last axis pairwise (in another order).
            bwd = EXACT if exact_backward else Bound(channels + 2, "scale")
            out.append(Case(f"Softmax_{name}_{np.dtype(dtype).name}",
                            f'type: "Softmax" softmax_param {{ axis: {axis} }}',
                            several(normal(*shape)), dtype=dtype,
                            cpu_top_for_backward=True, fwd=softmax_bound(channels),
                            bwd=bwd, cuda_fwd=softmax_bound(channels),
                            cuda_bwd=Bound(channels + 2, "scale")))
    out.append(Case("Softmax_in_place", 'type: "Softmax"', several(normal(2, 4, 3)),
                    in_place=True, cpu_top_for_backward=True, fwd=softmax_bound(4),
                    cuda_fwd=softmax_bound(4), cuda_bwd=Bound(4 + 2, "scale")))
    return out


def loss_forward_bound(channels):
    """Loss: (2C + 12) eps per position through -log, plus 6 eps relative; here as
    a bound relative to the scale (the loss is a positive scalar, >= 1/C-ish)."""
    return Bound(2 * channels + 18, "scale")


def swl_cases():
    def text(extra="", loss=""):
        return f'type: "SoftmaxWithLoss" {extra} loss_param {{ {loss} }}'
    out = []
    for dtype in (F32, F64):
        dt = np.dtype(dtype).name
        out.append(Case(f"SoftmaxWithLoss_ignore_valid_{dt}", text(loss="ignore_label: 255"),
                        several(normal(2, 5, 3, 4), labels_with_ignore(5, (2, 1, 3, 4))),
                        dtype=dtype, propagate=[True, False],
                        fwd=loss_forward_bound(5), bwd=Bound(2 * 5 + 10, "scale"),
                        cuda_fwd=Bound(2 * 5 + 18 + 24, "scale"),
                        cuda_bwd=Bound(2 * 5 + 10, "scale")))
    for mode in ("FULL", "BATCH_SIZE", "NONE"):
        out.append(Case(f"SoftmaxWithLoss_{mode}",
                        text(loss=f"ignore_label: 3 normalization: {mode}"),
                        several(normal(3, 4, 5), integers(0, 4, 3, 5)),
                        propagate=[True, False], fwd=loss_forward_bound(4),
                        bwd=Bound(2 * 4 + 10, "scale"),
                        cuda_fwd=Bound(2 * 4 + 18 + 15, "scale"),
                        cuda_bwd=Bound(2 * 4 + 10, "scale")))
    out.append(Case("SoftmaxWithLoss_axis2_no_ignore",
                    'type: "SoftmaxWithLoss" softmax_param { axis: 2 }',
                    several(normal(2, 3, 6), integers(0, 6, 2, 3)), propagate=[True, False],
                    fwd=loss_forward_bound(6), bwd=Bound(2 * 6 + 10, "scale"),
                    cuda_fwd=Bound(2 * 6 + 18 + 6, "scale"),
                    cuda_bwd=Bound(2 * 6 + 10, "scale")))
    out.append(Case("SoftmaxWithLoss_all_ignored",
                    text(loss="ignore_label: 255"),
                    several(normal(1, 3, 2, 2), lambda rng: np.full((1, 1, 2, 2), 255.0)),
                    propagate=[True, False]))
    # DeepLab v1's loss stays array code (xp); its host softmax takes C's double exp.
    out.append(Case("SoftmaxWithLoss_v1",
                    'type: "SoftmaxWithLoss" softmaxloss_param { ignore_label: 255 }',
                    several(normal(2, 4, 3, 3), labels_with_ignore(4, (2, 1, 3, 3))),
                    num_top=2, propagate=[True, False], bottom_diff_poison=False,
                    fwd=Bound(40, "scale"), bwd=Bound(40, "scale"),
                    cuda_fwd=Bound(40, "scale"), cuda_bwd=Bound(40, "scale")))
    return out


def neuron_cases():
    x = away_from_zero(2, 3, 4, 5)
    pos = lambda rng: [np.abs(rng.standard_normal((2, 3, 4))) + 0.1]   # noqa: E731
    ulp = Bound(8, "value")
    ulp_scale = Bound(8, "scale")
    out = [
        Case("ReLU", 'type: "ReLU"', several(x)),
        Case("ReLU_leaky_in_place", 'type: "ReLU" relu_param { negative_slope: 0.1 }',
             several(x), in_place=True),
        # -inf: NaN on both (the fork's 0 * -inf on the CPU, -inf * 0 on the GPU); a
        # negative x: +0 on the CPU, -0 on the GPU (equal); NaN x: dy * 0 backward.
        Case("ReLU_specials", 'type: "ReLU"', several(with_specials(x)), nan_outputs=True),
        Case("ReLU_leaky_specials_in_place", 'type: "ReLU" relu_param { negative_slope: '
             '0.1 }', several(with_specials(x)), in_place=True, nan_outputs=True),
        # The slope diff: the host adds term by term as the fork's CPU loop, the device
        # sums (the fork's GPU code a dot product).
        Case("PReLU", 'type: "PReLU"', several(x), bwd=Bound(128, "scale"),
             cuda_bwd=Bound(128, "scale")),
        Case("PReLU_shared_in_place", 'type: "PReLU" prelu_param { channel_shared: true }',
             several(x), in_place=True, bwd=Bound(128, "scale"),
             cuda_bwd=Bound(128, "scale")),
        # exp(x) - 1 and 1 - y^2 cancel: their last-bit differences scale with the array.
        Case("ELU", 'type: "ELU" elu_param { alpha: 0.7 }', several(x),
             fwd=ulp_scale, bwd=ulp, cuda_fwd=ulp_scale, cuda_bwd=ulp),
        Case("Sigmoid", 'type: "Sigmoid"', several(x), fwd=ulp, bwd=ulp,
             cuda_fwd=ulp, cuda_bwd=ulp),
        Case("TanH_in_place", 'type: "TanH"', several(x), in_place=True,
             fwd=ulp, bwd=ulp_scale, cuda_fwd=ulp, cuda_bwd=ulp_scale),
        Case("AbsVal", 'type: "AbsVal"', several(x)),
        Case("AbsVal_specials", 'type: "AbsVal"', several(with_specials(x)),
             nan_outputs=True),
        Case("BNLL", 'type: "BNLL"', several(x), fwd=ulp, bwd=ulp,
             cuda_fwd=ulp, cuda_bwd=ulp),
        Case("Exp", 'type: "Exp" exp_param { base: 2 scale: 0.5 shift: 0.3 }', several(x),
             fwd=ulp, bwd=ulp, cuda_fwd=ulp, cuda_bwd=ulp),
        Case("Log", 'type: "Log" log_param { scale: 2 shift: 0.5 base: 10 }', pos,
             fwd=ulp, bwd=ulp, cuda_fwd=ulp, cuda_bwd=ulp),
        Case("Power_square_in_place", 'type: "Power" power_param { power: 2 scale: 1.5 '
             'shift: 0.5 }', several(x), in_place=True, cuda_fwd=ulp, cuda_bwd=ulp),
        # The device raises float to a float power (powf; CuPy's power on float32), the
        # CPU in double as the fork's vsPowx does: equal only where powf is correctly
        # rounded, which numpy >= 2.4's float32 power (the emulator's) is not always.
        Case("Power_general", 'type: "Power" power_param { power: 1.7 scale: 0.5 '
             'shift: 0 }', pos, fwd=ulp, bwd=ulp, cuda_fwd=ulp, cuda_bwd=ulp),
        Case("Power_shift", 'type: "Power" power_param { power: -0.5 scale: 2 shift: 1 }',
             pos, fwd=ulp, bwd=ulp, cuda_fwd=ulp, cuda_bwd=ulp),
        Case("Threshold", 'type: "Threshold" threshold_param { threshold: 0.2 }',
             several(x), backward=False),
        # A NaN clips to min on the host (std::min/std::max) but to max on the device
        # (fminf/fmaxf), as in BVLC's Clip: no NaN here, infinities are alike.
        Case("Clip", 'type: "Clip" clip_param { min: -0.5 max: 0.6 }', several(x)),
        Case("Clip_in_place", 'type: "Clip" clip_param { min: -1 max: 0 }', several(x),
             in_place=True),
        Case("Swish", 'type: "Swish" swish_param { beta: 1.3 }', several(x), fwd=ulp,
             bwd=ulp, cuda_fwd=ulp, cuda_bwd=ulp),
        Case("Dropout_test_phase", 'type: "Dropout" dropout_param { dropout_ratio: 0.4 }',
             several(x), phase=TEST),
    ]
    return out


def norm_params_bn(rng, shapes):
    c = shapes[0]
    return [rng.standard_normal(c), np.abs(rng.standard_normal(c)) + 0.5, np.array([2.5])]


def norm_params_pspnet_bn(rng, shapes):
    slope, bias, mean, var = (rng.standard_normal(s) for s in shapes)
    return [slope, bias, mean, np.abs(var) + 0.5]


def normalization_cases():
    red = Bound(64, "scale")
    pow_bound = Bound(8, "scale")
    return [
        # The host's pow is C's double pow rounded to float (caffe_powx), the device's
        # powf, as in the fork's bn_layer.cpp and bn_layer.cu: last bits differ.
        Case("BN_train", 'type: "BN" bn_param { momentum: 0.9 }', several(normal(3, 4, 2, 3)),
             params=norm_params_pspnet_bn, fwd=pow_bound, bwd=pow_bound, cuda_fwd=red,
             cuda_bwd=red),
        Case("BN_test_phase", 'type: "BN"', several(normal(2, 3, 4)), phase=TEST,
             params=norm_params_pspnet_bn, fwd=pow_bound, bwd=pow_bound, cuda_fwd=red,
             cuda_bwd=red),
        Case("BN_frozen_in_place", 'type: "BN" bn_param { frozen: true }',
             several(normal(2, 3, 4, 5)), in_place=True, params=norm_params_pspnet_bn,
             fwd=pow_bound, bwd=pow_bound, cuda_fwd=red, cuda_bwd=red),
        Case("BatchNorm_train", 'type: "BatchNorm" batch_norm_param { use_global_stats: false'
             ' moving_average_fraction: 0.9 }', several(normal(3, 4, 2, 3)),
             params=norm_params_bn, cuda_fwd=red, cuda_bwd=red),
        Case("BatchNorm_global_in_place", 'type: "BatchNorm"', several(normal(2, 3, 4)),
             phase=TEST, in_place=True, params=norm_params_bn, cuda_fwd=red, cuda_bwd=red),
        Case("BatchNorm_zero_factor", 'type: "BatchNorm"', several(normal(2, 3, 4)),
             phase=TEST, params=lambda rng, s: [rng.standard_normal(s[0]),
                                                np.ones(s[1]), np.zeros(1)]),
        Case("Scale_learned_bias", 'type: "Scale" scale_param { bias_term: true }',
             several(normal(2, 3, 4, 5)), cuda_bwd=red),
        Case("Scale_in_place_axis2", 'type: "Scale" scale_param { axis: 2 num_axes: 1 }',
             several(normal(2, 3, 4, 5)), in_place=True, cuda_bwd=red),
        Case("Scale_two_bottoms", 'type: "Scale" scale_param { axis: 0 }',
             several(normal(2, 3, 4), normal(2, 3)), cuda_bwd=red),
        Case("Bias_learned", 'type: "Bias"', several(normal(2, 3, 4, 5)), cuda_bwd=red),
        Case("Bias_two_bottoms", 'type: "Bias" bias_param { axis: 1 }',
             several(normal(2, 3, 4), normal(3, 4)), cuda_bwd=red),
        Case("MVN", 'type: "MVN"', several(normal(2, 3, 4, 5)), cuda_fwd=red, cuda_bwd=red),
        Case("MVN_across_no_variance", 'type: "MVN" mvn_param { across_channels: true '
             'normalize_variance: false }', several(normal(2, 3, 4, 5)),
             cuda_fwd=red, cuda_bwd=red),
        # The CPU keeps the fork's running window sums; the device sums each window.
        Case("LRN_across", 'type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 '
             'k: 2 }', several(normal(2, 5, 3, 4)), fwd=Bound(16, "value"), bwd=red,
             cuda_fwd=Bound(16, "value"), cuda_bwd=red),
        Case("LRN_within", 'type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 '
             'norm_region: WITHIN_CHANNEL }', several(normal(2, 3, 5, 4)),
             fwd=Bound(8, "value"), bwd=red, cuda_fwd=Bound(16, "value"),
             cuda_bwd=red),                    # powf: see Power_general
        Case("Normalize", 'type: "Normalize" norm_param { across_spatial: false }',
             several(normal(2, 3, 4, 5)), cuda_fwd=red, cuda_bwd=red),
        Case("Normalize_across_shared", 'type: "Normalize" norm_param { across_spatial: true'
             ' channel_shared: true }', several(normal(2, 3, 4, 5)),
             cuda_fwd=red, cuda_bwd=Bound(256, "scale")),
    ]


def structure_cases():
    return [
        Case("Concat_axis1", 'type: "Concat"', several(normal(2, 2, 3), normal(2, 3, 3),
                                                       normal(2, 1, 3))),
        Case("Concat_axis0", 'type: "Concat" concat_param { axis: 0 }',
             several(normal(1, 2, 3), normal(2, 2, 3))),
        Case("Concat_single", 'type: "Concat"', several(normal(2, 2, 3))),
        Case("Slice_points", 'type: "Slice" slice_param { axis: 1 slice_point: 1 '
             'slice_point: 4 }', several(normal(2, 5, 3)), num_top=3),
        Case("Slice_equal", 'type: "Slice" slice_param { axis: 0 }', several(normal(4, 3)),
             num_top=2),
        Case("Split", 'type: "Split"', several(normal(2, 3, 4)), num_top=3,
             cuda_bwd=EXACT),
        Case("Flatten", 'type: "Flatten"', several(normal(2, 3, 4, 5))),
        Case("Reshape", 'type: "Reshape" reshape_param { shape { dim: 0 dim: -1 dim: 2 } }',
             several(normal(2, 3, 4))),
        Case("Crop", 'type: "Crop" crop_param { axis: 2 offset: 1 offset: 2 }',
             several(normal(2, 3, 6, 7), normal(2, 3, 4, 3)), propagate=[True, False]),
        Case("Tile", 'type: "Tile" tile_param { axis: 1 tiles: 3 }', several(normal(2, 3, 4))),
        Case("Silence", 'type: "Silence"', several(normal(2, 3), normal(4)), num_top=0),
        Case("Permute", 'type: "Permute" permute_param { order: 0 order: 2 order: 3 '
             'order: 1 }', several(normal(2, 3, 4, 5))),
        Case("Padding_grow", 'type: "Padding" padding_param { pad_beg: 2 pad_end: 1 }',
             several(normal(2, 3, 4, 5))),
        Case("Padding_crop", 'type: "Padding" padding_param { pad_beg: -1 pad_end: -2 }',
             several(normal(2, 3, 6, 7))),
        Case("Input", 'type: "Input" input_param { shape { dim: 2 dim: 3 } }',
             lambda rng: [], poison_tops=False, backward=False),
        Case("Parameter", 'type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }',
             lambda rng: [], params=lambda rng, shapes: [rng.standard_normal(shapes[0])],
             poison_tops=False),
    ]


def eltwise_cases():
    ints = lambda *s: integers(-2, 3, *s)    # noqa: E731  (ties everywhere)
    return [
        Case("Eltwise_sum_coeff", 'type: "Eltwise" eltwise_param { operation: SUM '
             'coeff: 1 coeff: -0.5 coeff: 2 }', several(normal(2, 3, 4), normal(2, 3, 4),
                                                         normal(2, 3, 4))),
        Case("Eltwise_prod", 'type: "Eltwise" eltwise_param { operation: PROD }',
             several(away_from_zero(2, 3, 4), away_from_zero(2, 3, 4))),
        Case("Eltwise_prod_stable", 'type: "Eltwise" eltwise_param { operation: PROD '
             'stable_prod_grad: true }', several(normal(2, 3), normal(2, 3), normal(2, 3))),
        Case("Eltwise_max_two", 'type: "Eltwise" eltwise_param { operation: MAX }',
             several(normal(2, 3, 4, 5), normal(2, 3, 4, 5))),
        Case("Eltwise_max_three_ties", 'type: "Eltwise" eltwise_param { operation: MAX }',
             several(ints(2, 3, 4, 5), ints(2, 3, 4, 5), ints(2, 3, 4, 5))),
        Case("Eltwise_max_four_float64", 'type: "Eltwise" eltwise_param { operation: MAX }',
             several(*[normal(3, 7) for _ in range(4)]), dtype=F64),
        Case("Eltwise_max_in_place", 'type: "Eltwise" eltwise_param { operation: MAX }',
             several(ints(2, 9), ints(2, 9), ints(2, 9)), in_place=True),
    ]


def recurrent_bottoms(T, N, I, static=0, states=0, hidden=0):
    """RNN/LSTM bottoms: x (T, N, I), cont (T, N) starting sequences at t = 0 and, in
    every other stream, mid-way, [x_static (N, static)], [``states`` of (1, N, hidden)]."""
    def make(rng):
        cont = np.ones((T, N))
        cont[0] = 0
        cont[T // 2, ::2] = 0
        out = [rng.standard_normal((T, N, I)), cont]
        if static:
            out.append(rng.standard_normal((N, static)))
        return out + [rng.standard_normal((1, N, hidden)) for _ in range(states)]
    return make


def lstm_unit_bottoms(rng):
    return [rng.standard_normal((1, 3, 4)), rng.standard_normal((1, 3, 16)),
            np.array([[1.0, 0.0, 1.0]])]


def misc_cases():
    dt_params = "spatial_sigma: 3 range_sigma: 0.5 num_iter: 2 min_weight: 0.2"

    def dt_bottoms(rng):
        return [rng.standard_normal((2, 2, 5, 6)), np.abs(rng.standard_normal((2, 1, 5, 6))),
                np.array([[5, 6], [3, 4]], float).reshape(2, 1, 1, 2)]

    def label_list(rng):
        lab = np.full((2, 3, 1, 1), -1.0)
        lab[0, :2, 0, 0] = [0, 2]
        lab[1, :3, 0, 0] = [3, 1, 3]
        return lab

    red = Bound(64, "scale")
    return [
        Case("InnerProduct", 'type: "InnerProduct" inner_product_param { num_output: 4 }',
             several(normal(3, 2, 3, 2)), cuda_fwd=gemm_bound(12), cuda_bwd=gemm_bound(12)),
        Case("InnerProduct_transpose_axis2", 'type: "InnerProduct" inner_product_param { '
             'num_output: 3 axis: 2 transpose: true bias_term: false }',
             several(normal(2, 3, 4, 2)), cuda_fwd=gemm_bound(8), cuda_bwd=gemm_bound(8)),
        # The host evaluates the cell's sigmoid/tanh (and RNN's tanh) in double as BVLC's
        # CPU code, the device in float as its kernels: the last bits then go through
        # the recurrence (float64: exact on the emulator). cont is 0 or 1, where the
        # CPU and GPU formulas agree; h_0/c_0 get no gradient (zeros) as in BVLC.
        Case("LSTM_static_input", 'type: "LSTM" recurrent_param { num_output: 4 }',
             recurrent_bottoms(5, 3, 3, static=2), propagate=[True, False, True],
             fwd=Bound(16, "scale"), bwd=Bound(16, "scale"), cuda_fwd=Bound(128, "scale"),
             cuda_bwd=Bound(128, "scale")),
        Case("LSTM_expose_hidden", 'type: "LSTM" recurrent_param { num_output: 3 '
             'expose_hidden: true }', recurrent_bottoms(4, 2, 3, states=2, hidden=3),
             num_top=3, propagate=[True, False, True, True], fwd=Bound(16, "scale"),
             bwd=Bound(16, "scale"), cuda_fwd=Bound(128, "scale"),
             cuda_bwd=Bound(128, "scale")),
        Case("LSTM_float64", 'type: "LSTM" recurrent_param { num_output: 3 }',
             recurrent_bottoms(4, 3, 2), dtype=F64, propagate=[True, False],
             cuda_fwd=Bound(128, "scale"), cuda_bwd=Bound(128, "scale")),
        Case("RNN_static_input", 'type: "RNN" recurrent_param { num_output: 4 }',
             recurrent_bottoms(5, 3, 3, static=2), propagate=[True, False, True],
             fwd=Bound(16, "scale"), bwd=Bound(16, "scale"), cuda_fwd=Bound(128, "scale"),
             cuda_bwd=Bound(128, "scale")),
        Case("RNN_expose_hidden_float64", 'type: "RNN" recurrent_param { num_output: 3 '
             'expose_hidden: true }', recurrent_bottoms(4, 2, 3, states=1, hidden=3),
             num_top=2, dtype=F64, propagate=[True, False, True],
             cuda_fwd=Bound(128, "scale"), cuda_bwd=Bound(128, "scale")),
        Case("LSTMUnit", 'type: "LSTMUnit"', lstm_unit_bottoms, num_top=2,
             propagate=[True, True, False], fwd=Bound(8, "scale"), bwd=Bound(8, "scale"),
             cuda_fwd=Bound(16, "scale"), cuda_bwd=Bound(16, "scale")),
        Case("ArgMax_flat", 'type: "ArgMax"', several(integers(0, 3, 2, 3, 2, 2)),
             backward=False),
        Case("ArgMax_axis_topk_values", 'type: "ArgMax" argmax_param { axis: 1 top_k: 2 '
             'out_max_val: true }', several(integers(0, 4, 2, 5, 3)), backward=False),
        Case("ArgMax_flat_topk_values", 'type: "ArgMax" argmax_param { top_k: 3 '
             'out_max_val: true }', several(integers(0, 4, 2, 3, 4)), backward=False),
        Case("ArgMaxV1", 'type: "ArgMaxV1" argmax_param { top_k: 2 out_max_val: true }',
             several(integers(0, 3, 2, 4, 3, 2)), bottom_diff_poison=False),
        Case("SigmoidCrossEntropyLoss_ignore", 'type: "SigmoidCrossEntropyLoss" loss_param {'
             ' ignore_label: -1 normalization: VALID }',
             several(normal(2, 3, 4), lambda rng: rng.integers(-1, 2, (2, 3, 4)).astype(float)),
             propagate=[True, False], fwd=Bound(64, "scale"), bwd=Bound(8, "scale"),
             cuda_fwd=Bound(64, "scale"), cuda_bwd=Bound(8, "scale")),
        Case("SigmoidCrossEntropyLoss", 'type: "SigmoidCrossEntropyLoss"',
             several(normal(2, 5), lambda rng: rng.random((2, 5))), propagate=[True, False],
             fwd=Bound(32, "scale"), bwd=Bound(8, "scale"),
             cuda_fwd=Bound(32, "scale"), cuda_bwd=Bound(8, "scale")),
        Case("EuclideanLoss", 'type: "EuclideanLoss"', several(normal(3, 4), normal(3, 2, 2)),
             cuda_fwd=Bound(16, "scale")),
        Case("SpatialProduct", 'type: "SpatialProduct"',
             several(normal(2, 3, 4, 5), normal(2, 1, 4, 5)), cuda_bwd=Bound(8, "scale")),
        # The host sums the guide's gradient in the fork's CPU order (one running sum
        # over channels and passes), the device per channel, then over channels.
        Case("DomainTransform", f'type: "DomainTransform" domain_transform_param '
             f'{{ {dt_params} }}', dt_bottoms, propagate=[True, True, False], bwd=red,
             cuda_fwd=red, cuda_bwd=Bound(256, "scale")),
        Case("DomainTransformForwardOnly", f'type: "DomainTransformForwardOnly" '
             f'domain_transform_param {{ {dt_params} }}', dt_bottoms,
             propagate=[True, True, False], bottom_diff_poison=False, cuda_fwd=red),
        Case("BiasChannel_image", 'type: "BiasChannel" bias_channel_param { bg_bias: 2 '
             'fg_bias: 3 }', lambda rng: [rng.standard_normal((2, 4, 3, 2)), label_list(rng)],
             propagate=[True, False]),
        Case("BiasChannel_pixel", 'type: "BiasChannel" bias_channel_param { bg_bias: 2 '
             'fg_bias: 3 label_type: PIXEL ignore_label: 255 background_label: 0 }',
             several(normal(2, 4, 3, 2), labels_with_ignore(4, (2, 1, 3, 2))),
             propagate=[True, False]),
        Case("AdaptiveBiasChannel", 'type: "AdaptiveBiasChannel" '
             'adaptive_bias_channel_param { num_iter: 3 bg_portion: 0.4 fg_portion: 0.2 '
             'suppress_others: true margin_others: 0.5 }',
             lambda rng: [rng.standard_normal((2, 4, 5, 6)), label_list(rng)],
             propagate=[False, False], bottom_diff_poison=False,
             cuda_fwd=Bound(4, "scale")),
        Case("SegAccuracy", 'type: "SegAccuracy" seg_accuracy_param { ignore_label: 255 '
             'ignore_label: 254 }',
             several(integers(0, 3, 2, 4, 5, 6), labels_with_ignore(4, (2, 1, 5, 6))),
             backward=False),
        Case("SegAccuracy_no_ignore_float64", 'type: "SegAccuracy"',
             several(normal(1, 3, 4, 7), integers(0, 3, 1, 1, 4, 7)), dtype=F64,
             backward=False),
    ]


def index_cases():
    """SPP, Im2col, Reduction, BatchReindex, Filter, Embed."""
    def reindex_bottoms(rng):
        return [rng.standard_normal((4, 2, 3)), np.array([3.0, 0.0, 3.0, 1.0, 3.0])]

    def filter_bottoms(rng):
        return [rng.standard_normal((5, 2, 3)), rng.standard_normal((5, 4)),
                np.array([0.0, 1.0, 0.0, -2.0, 1.0]).reshape(5, 1)]
    return [
        Case("SPP_max", 'type: "SPP" spp_param { pyramid_height: 3 pool: MAX }',
             several(normal(2, 3, 7, 6))),
        Case("SPP_ave_float64", 'type: "SPP" spp_param { pyramid_height: 2 pool: AVE }',
             several(normal(2, 3, 5, 7)), dtype=F64),
        Case("SPP_single_level", 'type: "SPP" spp_param { pyramid_height: 1 pool: MAX }',
             several(normal(2, 3, 5, 4))),
        Case("Im2col_dilated_pad_stride", 'type: "Im2col" convolution_param { kernel_h: 3 '
             'kernel_w: 2 pad: 2 stride: 2 dilation: 2 }', several(normal(2, 3, 9, 8)),
             bwd=taps_bound(6), cuda_bwd=taps_bound(6)),
        Case("Im2col_3d_axis2", 'type: "Im2col" convolution_param { axis: 2 kernel_size: 2 '
             'pad: 1 stride: 2 }', several(normal(2, 2, 3, 4, 5, 3))),
        Case("Reduction_sum_all", 'type: "Reduction" reduction_param { coeff: 0.5 }',
             several(normal(2, 3, 4)), cuda_fwd=Bound(26, "abs")),
        Case("Reduction_asum_axis1", 'type: "Reduction" reduction_param { operation: ASUM '
             'axis: 1 }', several(normal(2, 3, 4)), cuda_fwd=Bound(14, "abs")),
        Case("Reduction_sumsq_axis_last_float64", 'type: "Reduction" reduction_param { '
             'operation: SUMSQ axis: -1 coeff: -2 }', several(normal(2, 3, 4)), dtype=F64,
             cuda_fwd=Bound(6, "abs")),
        Case("Reduction_mean_axis2", 'type: "Reduction" reduction_param { operation: MEAN '
             'axis: 2 coeff: 3 }', several(normal(2, 3, 4, 5)), cuda_fwd=Bound(22, "abs")),
        Case("BatchReindex_repeats", 'type: "BatchReindex"', reindex_bottoms,
             propagate=[True, False]),
        Case("Filter_two_bottoms", 'type: "Filter"', filter_bottoms, num_top=2,
             propagate=[True, True, False]),
        Case("Embed", 'type: "Embed" embed_param { num_output: 3 input_dim: 4 }',
             several(integers(0, 4, 2, 3)), propagate=[False], cuda_bwd=Bound(8, "abs")),
        Case("Embed_no_bias_float64", 'type: "Embed" embed_param { num_output: 2 '
             'input_dim: 5 bias_term: false }', several(integers(0, 5, 7)), dtype=F64,
             propagate=[False]),
        # static_cast<int> truncates toward zero: -0.99 reads row 0, 3.99 row 3.
        Case("Embed_fractional_indices", 'type: "Embed" embed_param { num_output: 3 '
             'input_dim: 4 }', several(lambda rng: rng.uniform(-0.99, 3.99, (2, 5))),
             propagate=[False], cuda_bwd=Bound(8, "abs")),
    ]


def classic_loss_cases():
    """HingeLoss, MultinomialLogisticLoss, InfogainLoss, ContrastiveLoss."""
    def probs(*shape):
        def make(rng):
            p = rng.random(shape) + 0.05
            return p / p.sum(axis=1, keepdims=True)
        return make

    def pairs(rng):
        return [rng.standard_normal((5, 3, 1, 1)), rng.standard_normal((5, 3, 1, 1)),
                np.array([1, 0, 1, 0, 0], float).reshape(5, 1, 1, 1)]
    return [
        Case("HingeLoss_L1", 'type: "HingeLoss"', several(normal(3, 5), integers(0, 5, 3)),
             propagate=[True, False], cuda_fwd=Bound(16, "scale")),
        Case("HingeLoss_L2", 'type: "HingeLoss" hinge_loss_param { norm: L2 }',
             several(normal(3, 2, 2, 2), integers(0, 8, 3, 1, 1, 1)),
             propagate=[True, False], cuda_fwd=Bound(16, "scale")),
        Case("MultinomialLogisticLoss", 'type: "MultinomialLogisticLoss"',
             several(probs(4, 5), integers(0, 5, 4)), propagate=[True, False],
             fwd=Bound(32, "scale"), cuda_fwd=Bound(32, "scale")),
        Case("InfogainLoss_bottom_matrix", 'type: "InfogainLoss"',
             lambda rng: [probs(4, 3)(rng), integers(0, 3, 4)(rng),
                          rng.random((1, 1, 3, 3))],
             propagate=[True, False, False], fwd=Bound(32, "scale"),
             cuda_fwd=Bound(32, "scale")),
        Case("ContrastiveLoss", 'type: "ContrastiveLoss" contrastive_loss_param '
             '{ margin: 2 }', pairs, propagate=[True, True, False], fwd=Bound(32, "scale"),
             cuda_fwd=Bound(32, "scale"), cuda_bwd=Bound(16, "scale")),
        Case("ContrastiveLoss_legacy", 'type: "ContrastiveLoss" contrastive_loss_param '
             '{ margin: 4 legacy_version: true }', pairs, propagate=[True, True, False],
             cuda_fwd=Bound(32, "scale"), cuda_bwd=Bound(16, "scale")),
    ]


CASES = (conv_cases() + pooling_cases() + interp_cases() + softmax_cases() + swl_cases() +
         neuron_cases() + normalization_cases() + structure_cases() + eltwise_cases() +
         misc_cases() + index_cases() + classic_loss_cases())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_layer_gpu_matches_cpu(case, device):
    compare(case, device)


# ------------------------------------------------------------------- special cases
@pytest.mark.parametrize("dtype", [F32, F64])
def test_convolution_in_bands_accumulates(monkeypatch, device, dtype):
    """A tiny column budget: one grid row per band, so col2im's accumulate flag and the
    im2col band offsets are exercised (Convolution backward, Deconvolution forward)."""
    monkeypatch.setattr(im2col_module, "COL_BUFFER_BYTES", 1)
    monkeypatch.setattr(im2col_module, "DEVICE_COL_BUFFER_BYTES", 1)
    for kind in ("Convolution", "Deconvolution"):
        case = Case(f"{kind}_bands", conv_text(kind, num_output=3, kernel_size=3, pad=1,
                                               stride=2, dilation=2),
                    several(normal(2, 2, 9, 8)), dtype=dtype,
                    fwd=EXACT if kind == "Convolution" else taps_bound(9),
                    bwd=taps_bound(9) if kind == "Convolution" else EXACT,
                    cuda_fwd=gemm_bound(30), cuda_bwd=gemm_bound(200))
        compare(case, device)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("grouped,align", [(True, 1), (True, 4), (False, 1)],
                         ids=["image_groups", "padded_columns", "one_per_gemm"])
def test_convolution_over_groups_of_whole_images(monkeypatch, device, dtype, grouped,
                                                 align):
    """Five images, a column budget for two of them (padded leading dimension included):
    groups of 2, 2 and 1 images per GEMM, grouped convolution too, with the column count
    padded to a multiple of 4 (as under TF32) or not; with GROUP_IMAGES off one image per
    GEMM on unpadded columns (Caffe's way, the band path)."""
    monkeypatch.setattr(im2col_module, "GROUP_IMAGES", grouped)
    monkeypatch.setattr(im2col_module, "column_align", lambda dtype: align)
    bottom = (5, 4, 7, 9)
    geom = im2col_module.ConvGeometry((3, 3), (1, 1), (2, 2), (2, 2))
    rows, plane = 4 * geom.taps, 7 * 9
    budget = rows * im2col_module._aligned(2 * plane, align) * np.dtype(dtype).itemsize
    monkeypatch.setattr(im2col_module, "DEVICE_COL_BUFFER_BYTES", budget)
    groups = im2col_module.image_groups(5, 4, geom, (7, 9), dtype)
    assert groups == ([(0, 2), (2, 4), (4, 5)] if grouped else None)
    for kind in ("Convolution", "Deconvolution"):
        for group in (1, 2):
            text = conv_text(kind, num_output=6, kernel_size=3, pad=2, dilation=2,
                             group=group)
            fwd, bwd = gemm_bound(4 * 9), gemm_bound(5 * 7 * 9 * 9 + 4 * 9)
            case = Case(f"{kind}_image_groups_{group}", text, several(normal(*bottom)),
                        dtype=dtype, fwd=fwd, bwd=bwd, cuda_fwd=fwd, cuda_bwd=bwd)
            compare(case, device)


@pytest.mark.parametrize("kind", ["Convolution", "Deconvolution"])
@pytest.mark.parametrize("align", [1, 4])
@pytest.mark.parametrize("group", [1, 2])
def test_backward_gemms_share_one_gathering_with_the_bits_of_two_calls(monkeypatch, device,
                                                                      align, group, kind):
    """Over groups of whole images (2, 2, 1), weight_and_backward_gemm equals
    weight_gemm then backward_gemm (a Convolution's backward), and
    weight_and_forward_gemm equals weight_gemm then forward_gemm (a Deconvolution's),
    bit for bit: the weight gradient accumulated into a non-zero diff, the data
    gradient written over a NaN-poisoned one."""
    monkeypatch.setattr(im2col_module, "column_align", lambda dtype: align)
    geom = im2col_module.ConvGeometry((3, 3), (1, 1), (2, 2), (2, 2))
    rows, plane = 4 * geom.taps, 7 * 9
    budget = rows * im2col_module._aligned(2 * plane, align) * 4
    rng = np.random.default_rng(11)
    image = rng.standard_normal((5, 4, 7, 9)).astype(F32)
    grid = rng.standard_normal((5, 6, 7, 9)).astype(F32)
    weight = rng.standard_normal((6, 4 // group, 3, 3)).astype(F32)
    start = rng.standard_normal(weight.shape).astype(F32)
    _start(device)
    xp = backend.device_module()
    try:
        assert im2col_module.image_groups(5, 4, geom, (7, 9), F32, budget) == \
            [(0, 2), (2, 4), (4, 5)]
        results = []
        for combined in (False, True):
            dw = xp.asarray(start)
            dx = xp.full(image.shape if kind == "Convolution" else grid.shape, np.nan, F32)
            args = xp.asarray(image), xp.asarray(grid), xp.asarray(weight)
            if combined and kind == "Convolution":
                im2col_module.weight_and_backward_gemm(*args, dw, dx, geom, group, budget)
            elif combined:
                im2col_module.weight_and_forward_gemm(*args, dw, dx, geom, group, budget)
            else:
                im2col_module.weight_gemm(args[0], args[1], dw, geom, group, budget)
                if kind == "Convolution":
                    im2col_module.backward_gemm(args[1], args[2], dx, geom, group, budget)
                else:
                    im2col_module.forward_gemm(args[0], args[2], dx, geom, group, budget)
            results.append((backend.to_host(dw), backend.to_host(dx)))
    finally:
        backend.set_mode_cpu()
    for a, b in zip(*results):
        assert np.isfinite(b).all()
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("align", [1, 4])
@pytest.mark.parametrize("group", [1, 2])
def test_forward_adds_the_bias_in_its_copy_with_the_bits_of_adding_it_after(
        monkeypatch, device, align, group):
    """Over groups of whole images (2, 2, 1, and 1 per group, where one-image groups
    on unpadded columns write the blob in place), forward_gemm with ``bias`` equals
    forward_gemm then ``out += bias``, bit for bit, over a NaN-poisoned output; the
    paths that do not copy (1x1 here) leave the bias to the caller."""
    monkeypatch.setattr(im2col_module, "column_align", lambda dtype: align)
    geom = im2col_module.ConvGeometry((3, 3), (1, 1), (2, 2), (2, 2))
    rng = np.random.default_rng(12)
    image = rng.standard_normal((5, 4, 7, 9)).astype(F32)
    weight = rng.standard_normal((6, 4 // group, 3, 3)).astype(F32)
    bias = rng.standard_normal(6).astype(F32)
    plane = 7 * 9
    _start(device)
    xp = backend.device_module()
    try:
        results = []
        for images in (2, 1):
            budget = 4 * geom.taps * im2col_module._aligned(images * plane, align) * 4
            for fused in (False, True):
                out = xp.full((5, 6, 7, 9), np.nan, F32)
                added = im2col_module.forward_gemm(
                    xp.asarray(image), xp.asarray(weight), out, geom, group, budget,
                    bias=xp.asarray(bias) if fused else None)
                assert added is fused
                if not fused:
                    out += xp.asarray(bias).reshape(1, 6, 1, 1)
                results.append(backend.to_host(out))
        one_by_one = im2col_module.ConvGeometry((1, 1), (1, 1), (0, 0), (1, 1))
        out = xp.zeros((5, 6, 7, 9), F32)
        w1 = xp.asarray(rng.standard_normal((6, 4, 1, 1)).astype(F32))
        assert im2col_module.forward_gemm(xp.asarray(image), w1, out, one_by_one, 1,
                                          bias=xp.asarray(bias)) is False
    finally:
        backend.set_mode_cpu()
    for after, fused in zip(results[::2], results[1::2]):
        assert np.isfinite(fused).all()
        np.testing.assert_array_equal(after, fused)


def test_large_1x1_convolutions_on_odd_grids_are_padded_image_groups_under_tf32(monkeypatch):
    """A 1x1's GEMMs use the blobs in place, but under TF32 an odd grid is an odd leading
    dimension (off cuBLAS's fast tensor-core kernels), so products of PADDED_1X1_FLOP and
    more run as padded image groups; FP32, aligned grids, small products and the host
    keep the blobs."""
    one = im2col_module.ConvGeometry((1, 1), (1, 1), (0, 0), (1, 1))
    fake_device = object()

    def direct(num, channels, n_out, grid, xp=fake_device, geom=one):
        return im2col_module._direct_1x1(xp, geom, (num, channels), n_out, grid, F32, None)

    aspp_fc7, bottleneck = (10, 1024, 1024, (41, 41)), (1, 1024, 256, (41, 41))
    assert direct(*aspp_fc7) and direct(*bottleneck)           # FP32: the blobs
    backend.set_tf32(True)
    try:
        assert not direct(*aspp_fc7)
        assert direct(*bottleneck)                              # 0.9 GFLOP
        assert direct(1, 1024, 1024, (41, 41))                  # 3.5 GFLOP
        assert not direct(1, 1024, 2048, (41, 41))              # ResNet's res5a shortcut
        assert direct(10, 1024, 1024, (40, 40))                 # aligned already
        assert direct(*aspp_fc7, xp=np)                         # the host
        three = im2col_module.ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1))
        assert not direct(*aspp_fc7, geom=three)                # not a 1x1
        monkeypatch.setattr(im2col_module, "DEVICE_COL_BUFFER_BYTES", 1 << 20)
        assert direct(*aspp_fc7)                                # one image is over budget
    finally:
        backend.set_tf32(False)


@pytest.mark.parametrize("group", [1, 2])
def test_padded_1x1_image_groups_give_the_bits_of_the_blob_gemms(monkeypatch, device,
                                                                  group):
    """On integer data (exact sums, whatever the order), a 1x1 Convolution and
    Deconvolution over padded groups of whole images (2, 2, 1) give the in-place GEMMs'
    results: forward (its bias added in the copy), the accumulated weight gradient and
    the data gradient over NaN-poisoned outputs, through the padded path's im2col."""
    monkeypatch.setattr(im2col_module, "column_align", lambda dtype: 4)
    one = im2col_module.ConvGeometry((1, 1), (1, 1), (0, 0), (1, 1))
    plane = 7 * 9
    budget = 4 * im2col_module._aligned(2 * plane, 4) * 4
    rng = np.random.default_rng(13)
    ints = lambda *shape: rng.integers(-8, 9, shape).astype(F32)  # noqa: E731
    image, grid = ints(5, 4, 7, 9), ints(5, 6, 7, 9)
    weight, bias, start = ints(6, 4 // group, 1, 1), ints(6), ints(6, 4 // group, 1, 1)
    _start(device)
    xp = backend.device_module()
    calls = spy_calls(monkeypatch, im2col_module, ["_group_im2col"])
    try:
        results = []
        for threshold in (np.inf, 0):
            monkeypatch.setattr(im2col_module, "PADDED_1X1_FLOP", threshold)
            del calls[:]
            args = xp.asarray(image), xp.asarray(grid), xp.asarray(weight)
            out = xp.full(grid.shape, np.nan, F32)
            added = im2col_module.forward_gemm(args[0], args[2], out, one, group, budget,
                                               bias=xp.asarray(bias))
            if not added:
                out += xp.asarray(bias).reshape(1, 6, 1, 1)
            dw, dx = xp.asarray(start), xp.full(image.shape, np.nan, F32)
            im2col_module.weight_and_backward_gemm(*args, dw, dx, one, group, budget)
            dw2, dy = xp.asarray(start), xp.full(grid.shape, np.nan, F32)
            im2col_module.weight_and_forward_gemm(*args, dw2, dy, one, group, budget)
            dx2 = xp.full(image.shape, np.nan, F32)
            im2col_module.backward_gemm(args[1], args[2], dx2, one, group, budget)
            assert added is (threshold == 0)
            assert len(calls) == (0 if threshold else 3 * 3)     # 3 groups x 3 calls
            results.append([backend.to_host(a) for a in (out, dw, dx, dw2, dy, dx2)])
    finally:
        backend.set_mode_cpu()
    for blobs, padded in zip(*results):
        assert np.isfinite(padded).all()
        np.testing.assert_array_equal(blobs, padded)


def test_group_columns_are_padded_only_for_tf32_gemms():
    # Measured on an H200 (BENCHMARKS.md): padding helps TF32 GEMMs and costs FP32 ones
    # a copy where a one-image group could use the blobs in place.
    assert im2col_module.column_align(np.float32) == 1
    backend.set_tf32(True)
    try:
        assert im2col_module.column_align(np.float32) == im2col_module.COLUMN_ALIGN == 4
        assert im2col_module.column_align(np.float64) == 1
    finally:
        backend.set_tf32(False)


def test_max_pooling_device_mask_is_int32_and_top_mask_matches(device):
    case = pooling_cases()[0]
    cpu, gpu, layer = compare(case, device)
    assert layer.mask.dtype == np.int32
    mask = backend.to_host(layer.mask)
    np.testing.assert_array_equal(mask.astype(np.float32), gpu.forward[1])
    # Every index points at the winning value inside its plane.
    x = np.random.default_rng(case.seed).standard_normal((2, 3, 8, 9)).astype(np.float32)
    planes = x.reshape(6, -1)
    picked = np.take_along_axis(planes, mask.reshape(6, -1), axis=1).reshape(mask.shape)
    np.testing.assert_array_equal(picked, gpu.forward[0])


def test_stochastic_pooling_samples_and_routes_gradients_on_the_device(device):
    """TRAIN STOCHASTIC pooling on the device: every top is an element of its window
    (zeros never taken), and the gradient goes to the taken element only."""
    rng = np.random.default_rng(4)
    x = rng.integers(0, 3, (2, 3, 7, 6)).astype(F32)
    _start(device)
    try:
        layer = make_layer('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 2 '
                           'stride: 2 }', TRAIN, F32)
        bottom, top = blobs_from([x], F32), [Blob((), F32)]
        layer.setup(bottom, top)
        with backend.device_access(True):
            layer.reshape(bottom, top)
            layer.forward(bottom, top)
        y = top[0].host_data.copy()
        top[0].host_diff[...] = 1
        with backend.device_access(True):
            layer.backward(top, [True], bottom)
        dx = bottom[0].host_diff.copy()
    finally:
        backend.set_mode_cpu()
    assert y.shape == (2, 3, 4, 3)
    for i in range(4):
        for j in range(3):
            win = x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(2, 3, -1)
            g = dx[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(2, 3, -1)
            empty = win.sum(axis=2) == 0
            np.testing.assert_array_equal(g.sum(axis=2), 1)     # one element per window
            taken = np.argmax(g, axis=2)
            np.testing.assert_array_equal(np.take_along_axis(win, taken[..., None], 2)[..., 0],
                                          y[:, :, i, j])
            assert np.all((np.take_along_axis(win, taken[..., None], 2) > 0) | empty[..., None])


def test_eltwise_max_tie_rule_is_the_cpu_rule(device):
    """Three equal bottoms: Caffe's CPU rule (what both sides use) gives the gradient to
    bottom 1 (ties between bottoms 0 and 1 go to 1, later bottoms need to be strictly
    greater); Caffe's GPU rule would give it to bottom 2."""
    x = np.ones((1, 4))
    case = Case("Eltwise_max_all_tied", 'type: "Eltwise" eltwise_param { operation: MAX }',
                lambda rng: [x, x, x])
    cpu, gpu, layer = compare(case, device)
    dx0, dx1, dx2 = gpu.backward
    assert not dx0.any() and not dx2.any() and dx1.all()


@pytest.mark.parametrize("bad, shown", [(7, "7"), (np.nan, "nan"), (-np.inf, "-inf")])
def test_softmax_with_loss_reports_a_bad_label_on_the_device(device, bad, shown):
    """NaN and infinite labels are bad labels too (the kernel must not cast them to int;
    a GPU would turn NaN into class 0), named the same way on both sides."""
    scores = np.zeros((1, 3, 2, 2))
    labels = np.array([0, 1, bad, 2], float).reshape(1, 1, 2, 2)
    messages = []
    for mode in ("cpu", device):
        if mode != "cpu":
            _start(mode)
        try:
            layer = make_layer('type: "SoftmaxWithLoss" loss_param { ignore_label: 255 }',
                               TRAIN, F32)
            bottom = blobs_from([scores, labels], F32)
            top = [Blob((), F32)]
            layer.setup(bottom, top)
            with backend.device_access(mode != "cpu"), pytest.raises(LayerError) as e:
                layer.reshape(bottom, top)
                layer.forward(bottom, top)
            messages.append(str(e.value))
        finally:
            backend.set_mode_cpu()
    assert f"label value {shown} is out of range" in messages[0]
    assert messages[1] == messages[0]


def test_seg_accuracy_accumulates_without_reset_and_reports_bad_labels(device):
    rng = np.random.default_rng(3)
    scores = [rng.standard_normal((2, 3, 4, 5)) for _ in range(2)]
    labels = [rng.integers(0, 3, (2, 1, 4, 5)).astype(float) for _ in range(2)]
    results = {}
    for mode in ("cpu", device):
        if mode != "cpu":
            _start(mode)
        try:
            layer = make_layer('type: "SegAccuracy" seg_accuracy_param { reset: false }',
                               TEST, F32)
            bottom = blobs_from([scores[0], labels[0]], F32)
            top = [Blob((), F32)]
            layer.setup(bottom, top)
            outs = []
            for s, l in zip(scores, labels):
                bottom[0].host_data[...] = s
                bottom[1].host_data[...] = l
                with backend.device_access(mode != "cpu"):
                    layer.reshape(bottom, top)
                    layer.forward(bottom, top)
                outs.append(top[0].host_data.copy())
            confusion = backend.to_host(layer.confusion).astype(np.int64)
            bad = labels[0].copy()
            bad[1, 0, 2, 3] = 9
            bottom[1].host_data[...] = bad
            with backend.device_access(mode != "cpu"), pytest.raises(LayerError) as e:
                layer.forward(bottom, top)
            bad[1, 0, 2, 3], bad[0, 0, 1, 1] = 1, np.nan      # NaN: a bad label too
            bottom[1].host_data[...] = bad
            with backend.device_access(mode != "cpu"), pytest.raises(LayerError) as e_nan:
                layer.forward(bottom, top)
            results[mode] = (outs, confusion, str(e.value), str(e_nan.value))
        finally:
            backend.set_mode_cpu()
    cpu, gpu = results["cpu"], results[device]
    assert cpu[1].sum() == 2 * 2 * 4 * 5          # both batches counted
    np.testing.assert_array_equal(gpu[1], cpu[1])
    for a, b in zip(gpu[0], cpu[0]):
        np.testing.assert_array_equal(a, b)
    assert "unexpected label 9 at num 1, row 2, col 3" in cpu[2]
    assert gpu[2] == cpu[2]
    assert "unexpected label nan at num 0, row 1, col 1" in cpu[3]
    assert gpu[3] == cpu[3]


def test_seg_accuracy_runs_on_the_device():
    assert LAYER_REGISTRY["SegAccuracy"].runs_on_device


# ------------------------------------------------------------------- Dropout
# A finite poison: the expected value at dropped units is 0 (which a zero start would
# hide) or, at ratio 1, NaN (which a NaN poison would hide).
POISON = 1234.5


def _dropout(mode, x, ratio, phase=TRAIN, in_place=False, seed=5):
    if mode != "cpu":
        _start(mode)
    try:
        backend.set_random_seed(seed)
        layer = make_layer(f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}',
                           phase, F32)
        bottom = blobs_from([x], F32)
        top = [bottom[0]] if in_place else [Blob((), F32)]
        layer.setup(bottom, top)
        dy = np.random.default_rng(1).standard_normal(x.shape)
        with backend.device_access(mode != "cpu"):
            layer.reshape(bottom, top)
            if not in_place:
                top[0].data[...] = POISON
            layer.forward(bottom, top)
        y = top[0].host_data.copy()
        top[0].host_diff[...] = dy
        if not in_place:
            bottom[0].host_diff[...] = POISON
        with backend.device_access(mode != "cpu"):
            layer.backward(top, [True], bottom)
        return y, bottom[0].host_diff.copy(), layer
    finally:
        backend.set_mode_cpu()


def test_dropout_device_mask_statistics(device):
    """The device draws its own mask: kept fraction within 5 sigma of 1 - ratio, kept
    values scaled by exactly 1 / (1 - ratio), and the backward uses the forward's mask.
    The same seed gives the same mask, another seed another one."""
    ratio = 0.3
    x = np.ones((4, 5, 100, 100), np.float32)
    y, dx, layer = _dropout(device, x, ratio)
    kept = y != 0
    n = kept.size
    sigma = math.sqrt(n * ratio * (1 - ratio))
    assert abs(kept.sum() - n * (1 - ratio)) < 5 * sigma
    scale = np.float32(1.0 / (1.0 - np.float32(ratio)))
    assert np.all(y[kept] == scale)
    dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    np.testing.assert_array_equal(dx, np.where(kept, dy * np.float32(1) * scale, 0))
    y2, _, _ = _dropout(device, x, ratio)
    y3, _, _ = _dropout(device, x, ratio, seed=6)
    np.testing.assert_array_equal(y2, y)
    assert not np.array_equal(y3, y)


def test_dropout_device_mask_is_philox_keyed_by_seed_and_name(device):
    """The device mask of the first forward after set_random_seed(s) is numpy's Philox
    under key s | crc32(layer name) << 64 from counter 0 (dropout.cu's rule, Caffe's
    threshold); a second forward goes on with the next counters; re-seeding restarts."""
    import zlib
    x = np.random.default_rng(3).standard_normal((2, 3, 5, 7)).astype(np.float32)
    _start(device)
    try:
        backend.set_random_seed(12)
        layer = make_layer('name: "drop7" type: "Dropout" dropout_param { dropout_ratio: 0.4 }',
                           TRAIN, F32)
        bottom, top = blobs_from([x], F32), [Blob((), F32)]
        layer.setup(bottom, top)
        masks = []
        for seed in (None, None, 12):
            if seed is not None:
                backend.set_random_seed(seed)
            with backend.device_access(True):
                layer.reshape(bottom, top)
                layer.forward(bottom, top)
            masks.append(backend.to_host(layer.mask).reshape(-1))
    finally:
        backend.set_mode_cpu()
    blocks = -(-x.size // 4)
    philox = np.random.Philox(counter=0, key=12 | zlib.crc32(b"drop7") << 64)
    words = philox.random_raw(8 * blocks).reshape(2, 4 * blocks)[:, :x.size]
    want = (words >> np.uint64(32)) > np.uint64(layer.threshold)
    np.testing.assert_array_equal(masks[0], want[0])
    np.testing.assert_array_equal(masks[1], want[1])
    np.testing.assert_array_equal(masks[2], want[0])


def test_dropout_device_arithmetic_matches_cpu_on_its_mask(device):
    """With the device's own mask, y = (x * mask) * scale and dx = (dy * mask) * scale,
    bit for bit the CPU layer's arithmetic (in place too)."""
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 5)).astype(np.float32)
    x.flat[:3] = [-0.0, np.inf, -1e-30]
    dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    for in_place in (False, True):
        y, dx, layer = _dropout(device, x, 0.4, in_place=in_place)
        mask = backend.to_host(layer.mask)
        assert set(np.unique(mask)) == {0, 1}
        np.testing.assert_array_equal(y, (x * mask) * layer.scale)
        np.testing.assert_array_equal(dx, (dy * mask) * layer.scale)


def test_dropout_ratio_one_is_nan_on_the_device_as_on_the_cpu(device):
    """Ratio 1: no unit kept (the device threshold is UINT_MAX, the CPU's bernoulli(0)
    draws nothing) and scale 1 / 0 = inf, so output and gradient are NaN everywhere,
    0 * inf, on both sides."""
    x = np.random.default_rng(4).standard_normal((2, 3, 4, 5)).astype(np.float32)
    x.flat[:3] = [0.0, np.inf, -np.inf]
    for mode in ("cpu", device):
        y, dx, layer = _dropout(mode, x, 1)
        assert layer.threshold == np.iinfo(np.uint32).max
        assert np.isnan(y).all() and np.isnan(dx).all()
        assert not backend.to_host(layer.mask).any()


# ------------------------------------------------------------------- workspace
NET = """
name: "workspace"
input: "data" input_shape { dim: 2 dim: 3 dim: 11 dim: 9 }
input: "label" input_shape { dim: 2 dim: 1 dim: 11 dim: 9 }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param {
  num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }
layer { name: "c2" type: "Convolution" bottom: "c1" top: "c2" convolution_param {
  num_output: 6 kernel_size: 3 pad: 2 dilation: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "d1" type: "Deconvolution" bottom: "c2" top: "d1" convolution_param {
  num_output: 3 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "d1" bottom: "label" top: "loss" }
"""


def test_conv_workspace_is_stable_across_iterations(device, tmp_path):
    """Repeated forward/backward reuse ONE column buffer per array module (Caffe's shared
    col_buffer): the same buffer object, the same size, after every iteration."""
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    im2col_module.release_workspace()
    _start(device)
    try:
        caffelite.set_random_seed(3)
        net = caffelite.Net(str(path), TRAIN)
        rng = np.random.default_rng(0)
        net.blobs["data"].data[...] = rng.standard_normal((2, 3, 11, 9))
        net.blobs["label"].data[...] = rng.integers(0, 3, (2, 1, 11, 9))
        seen = []
        for _ in range(4):
            net.forward()
            net.backward()
            buffers = im2col_module.workspace_buffers()
            device_name = backend.device_module().__name__
            assert set(buffers) == {device_name}
            seen.append((id(buffers[device_name]), buffers[device_name].size))
        assert len(set(seen)) == 1, seen
    finally:
        backend.set_mode_cpu()
        im2col_module.release_workspace()


# ------------------------------------------------------------------- coverage
# Host-only layer types (runs_on_device = False): data and file layers, Python layers,
# the dense CRF, SSD's box layers, Accuracy and UniqueLabel.
HOST_ONLY = {"Accuracy", "Data", "DenseCRF", "DetectionOutput", "DummyData", "HDF5Data",
             "HDF5Output", "ImageData", "ImageSegData", "MatRead", "MatWrite", "MemoryData", "PriorBox",
             "Python", "UniqueLabel", "VideoSegData", "WindowData"}
# Device layer types covered by a dedicated test above rather than by CASES.
SPECIAL = {"Dropout"}


def test_every_device_layer_type_has_a_gpu_test():
    # caffelite's own types (other test modules register throw-away layer types).
    types = [t for t in caffelite.layer_type_list()
             if LAYER_REGISTRY[t].__module__.startswith("caffelite.")]
    device_types = {t for t in types if LAYER_REGISTRY[t].runs_on_device}
    host_types = set(types) - device_types
    assert host_types == HOST_ONLY, (
        f"host-only layer types changed: new {sorted(host_types - HOST_ONLY)}, no longer "
        f"host-only {sorted(HOST_ONLY - host_types)}")
    covered = {c.type_name for c in CASES} | SPECIAL
    missing = sorted(device_types - covered)
    assert not missing, f"device layer types without a GPU-vs-CPU test: {missing}"


def test_device_column_bands_are_whole_images_for_deeplab_layers():
    # conv1_2 of ASPP-VGG at a 321x321 crop: 64 channels x 9 taps x 321 x 321 floats
    # (237 MB) is one band on the device; on the host 22-row bands (16 MiB), 15 of them.
    import types
    from caffelite.kernels import emulator
    geom = types.SimpleNamespace(taps=9)
    assert im2col_module.rows_per_chunk(64, geom, (321, 321), 4, xp=emulator) == 321
    assert im2col_module.rows_per_chunk(64, geom, (321, 321), 4) == 22


def test_device_workspace_size_comes_from_the_environment(monkeypatch):
    geom = im2col_module.ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1))
    monkeypatch.setenv("CAFFELITE_DEVICE_WORKSPACE_MB", "1")
    # 64 channels x 9 taps x 41 x 41 floats = 3.9 MB: bands, not whole images.
    assert im2col_module.image_groups(2, 64, geom, (41, 41), np.float32) is None
    monkeypatch.setenv("CAFFELITE_DEVICE_WORKSPACE_MB", "8")
    assert im2col_module.image_groups(3, 64, geom, (41, 41), np.float32) == [(0, 2), (2, 3)]
    monkeypatch.setenv("CAFFELITE_DEVICE_WORKSPACE_MB", "lots")
    with pytest.raises(ValueError, match="CAFFELITE_DEVICE_WORKSPACE_MB must be a whole"):
        im2col_module.image_groups(3, 64, geom, (41, 41), np.float32)


def test_fresh_device_memory_is_poisoned_here():
    """The autouse poison reaches what ``empty``/``empty_like`` give (the column workspace
    is such a byte buffer: NaN once viewed as floats), and nothing else; off, they are
    numpy's."""
    from caffelite.kernels import emulator
    assert emulator.poison_empty_active()
    assert np.isnan(emulator.asnumpy(emulator.empty((2, 3), F32))).all()
    assert np.isnan(emulator.asnumpy(emulator.empty_like(emulator.zeros(4, F64)))).all()
    assert (emulator.asnumpy(emulator.empty(3, np.int32)) == -1).all()
    assert np.isnan(emulator.asnumpy(emulator.empty(8, np.uint8)).view(F32)).all()
    assert (emulator.asnumpy(emulator.zeros(3, F32)) == 0).all()
    assert emulator.set_poison_empty(False)
    try:
        assert not emulator.poison_empty_active()
        assert emulator.empty(3, F32).shape == (3,)
    finally:
        emulator.set_poison_empty(True)
