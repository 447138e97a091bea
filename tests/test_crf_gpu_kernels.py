"""The dense CRF's CUDA kernels (caffelite/kernels/permutohedral.cu) and its device path
(caffelite.crf.device), compiled for the host with g++ (caffelite.kernels.host), against
the numpy lattice (caffelite.crf.permutohedral: its sparse splat/blur/slice operators,
PairwiseMessages, softmax_rows, the CPU dense_crf) and Krähenbühl's code (pydensecrf2).

Like test_kernels_host.py: every kernel comparison runs with the launch a GPU would get
and with a 2 x 3-thread grid; outputs start poisoned (NaN) unless the kernel accumulates
(the atomic splat adds onto a known base); bit-for-bit where the kernel does the numpy
reference's float operations in the same order (gather splat, blur, slice, slice
weights), bounds where the order differs (the atomic splat, softmax's expf and sum),
and exact results on dyadic data whatever the order. test_crf_gpu_device.py imports
these tests and runs them on a GPU.
"""
import argparse
import sys
import types

import numpy as np
import pytest

from caffelite import kernels
from caffelite.crf import (PUBLISHED_PARAMS, PairwiseMessages, PermutohedralLattice, PottsKernel,
                           bilateral_features, crf_labels, dense_crf, mean_field,
                           position_features, softmax_rows, unary_from_scores)
from caffelite.crf import cli as crf_cli
from caffelite.crf import device as crf_device_module
from caffelite.crf import permutohedral
from caffelite.crf.densecrf import crf_kernels
from caffelite.crf.device import CrfDevice, DeviceLatticeFilter, LatticeTables
from caffelite.crf.permutohedral import LatticeFilter
from caffelite.kernels.host import compiler, nvrtc_compile, nvrtc_library
from gpu_modes import host_kernels_for
from test_kernels_host import eps, poisoned
from test_crf import (assert_same_labels, assert_same_marginals, photo_scores, photos,
                      pydensecrf_q, synthetic_scene, _write_case)

FLOATS = [np.float32, np.float64]
MODULE = "permutohedral"
HEIGHT, WIDTH = 13, 17                 # odd sizes: N = 221 points


@pytest.fixture(scope="session")
def host_kernels(tmp_path_factory):
    return host_kernels_for(tmp_path_factory, [MODULE], "crf_kernels")


@pytest.fixture
def kern(host_kernels):
    """Runs a kernel: kern.run(module, kernel, dtype, *numpy args, grid=, block=)."""
    return host_kernels


@pytest.fixture
def crf_device(kern):
    """The device path on numpy arrays with the host-compiled kernels."""
    return CrfDevice(np, kern.run, name="host kernels")


def assert_within(actual, expected, bound, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.all(np.isfinite(actual)), f"{what}: NaN/inf in the kernel's output"
    err = np.abs(actual - expected)
    worst = np.argmax(err - bound)
    assert np.all(err <= bound), (f"{what}: error {err.flat[worst]:.3g} above bound "
                                  f"{np.broadcast_to(bound, err.shape).flat[worst]:.3g}")


# ------------------------------------------------------------------ test lattices
def lattices():
    """Three fused lattices over the same 221 points: 2-D positions, random 3-D
    features and 5-D bilateral features (so directions j > d_k are plain copies)."""
    rgb, _ = synthetic_scene(HEIGHT, WIDTH, 3)
    rng = np.random.default_rng(4)
    return [PermutohedralLattice(position_features(HEIGHT, WIDTH, 1.7)),
            PermutohedralLattice(rng.normal(0, 2.0, (HEIGHT * WIDTH, 3)).astype(np.float32)),
            PermutohedralLattice(bilateral_features(rgb, 4.0, 12.0))]


@pytest.fixture(scope="module")
def tables():
    lats = lattices()
    return lats, LatticeTables(lats)


def splat_reference(tables, values, weights=None):
    """Numpy splat, entries added one at a time in ascending point order (np.add.at is
    sequential), in the values' dtype: the CPU operator's order."""
    weights = tables.weights if weights is None else weights
    dtype = values.dtype
    products = weights.astype(dtype)[:, :, None] * values[:, None, :]        # N x P x M
    out = np.zeros((tables.num_vertices, values.shape[1]), dtype)
    np.add.at(out, tables.offsets.ravel(), products.reshape(-1, values.shape[1]))
    return out


def blur_reference(tables, vertex, direction):
    """One blur pass as numpy ops: + neighbour then - neighbour, each times 0.5."""
    out = vertex.copy()
    for side in (0, 1):
        idx = tables.neighbours[direction, side]
        found = idx >= 0
        out[found] += vertex.dtype.type(0.5) * vertex[idx[found]]
    return out


def slice_reference(tables, vertex, slice_weights, base):
    out = base.copy()
    for p in range(tables.slots):
        out += slice_weights[:, p, None] * vertex[tables.offsets[:, p]]
    return out


# ---------------------------------------------------------------- the host tables
def test_every_kernel_has_a_test_here():
    assert set(kernels.kernel_signatures(kernels.source(MODULE))) == {
        "lattice_splat", "lattice_splat_gather", "lattice_blur", "lattice_slice",
        "lattice_slice_weights", "crf_softmax"}


def test_tables_are_the_cpu_filters_sparse_operators(tables):
    """LatticeTables (what the kernels read) hold exactly the CPU LatticeFilter's splat,
    blur and slice matrices: offsets/weights = the splat's columns, neighbours = the
    non-zeros of each blur matrix (+ side first), the transposed splat = its CSR form."""
    lats, t = tables
    cpu = LatticeFilter(lats)
    n, p = t.num_points, t.slots
    assert (n, p, t.num_vertices) == (HEIGHT * WIDTH, 3 + 4 + 6, cpu.num_vertices)
    np.testing.assert_array_equal(cpu.splat.indices.reshape(n, p), t.offsets)
    np.testing.assert_array_equal(cpu.splat.data.reshape(n, p), t.weights)
    assert t.directions == len(cpu.blurs) == 6
    for j, blur in enumerate(cpu.blurs):
        present = t.neighbours[j] >= 0
        np.testing.assert_array_equal(np.diff(blur.indptr), present.sum(axis=0))
        np.testing.assert_array_equal(blur.indices, t.neighbours[j].T[present.T])
        assert np.all(blur.data == 0.5)
    rows = cpu.splat.tocsr()
    rows.sort_indices()
    start, points, weights = t.splat_transposed()
    np.testing.assert_array_equal(start, rows.indptr)
    np.testing.assert_array_equal(points, rows.indices)
    np.testing.assert_array_equal(weights, rows.data)
    np.testing.assert_array_equal(t.slot_start, [0, 3, 7, 13])
    np.testing.assert_array_equal(t.alphas, [lat.alpha for lat in lats])


# -------------------------------------------------------------------- the splat
@pytest.mark.parametrize("dtype", FLOATS)
def test_atomic_splat_adds_onto_the_vertex_values(kern, launch, tables, dtype):
    """lattice_splat (atomicAdd scatter, accumulates): within 2 (count + 1) eps sum|terms|
    of the numpy splat in point order (any atomic order), and exact on dyadic weights
    with integer values, where every order gives the same sum."""
    _, t = tables
    rng = np.random.default_rng(1)
    labels = 5
    count = np.bincount(t.offsets.ravel(), minlength=t.num_vertices)[:, None]
    for dyadic in (False, True):
        if dyadic:
            weights = (rng.integers(0, 9, t.weights.shape) / 8).astype(dtype)
            values = rng.integers(-20, 20, (t.num_points, labels)).astype(dtype)
        else:
            weights = t.weights.astype(dtype)
            values = rng.standard_normal((t.num_points, labels)).astype(dtype)
        base = rng.integers(-5, 5, (t.num_vertices, labels)).astype(dtype)
        vertex = base.copy()
        kern.run(MODULE, "lattice_splat", dtype, values.size, values, t.offsets, weights,
                 t.slots, labels, vertex, **launch)
        expected = splat_reference(t, values, weights)
        if dyadic:
            np.testing.assert_array_equal(vertex - base, expected)
        else:
            magnitude = splat_reference(t, np.abs(values), weights) + np.abs(base)
            assert_within(vertex, base + expected, 2 * (count + 1) * eps(dtype) * magnitude,
                          "atomic splat")


@pytest.mark.parametrize("dtype", FLOATS)
def test_gather_splat_matches_numpy_exactly(kern, launch, tables, dtype):
    """lattice_splat_gather: every vertex written (poisoned output), the entries summed
    in ascending point order, so bit-for-bit the sequential numpy splat; and within
    (count + 2) eps sum|terms| of the CPU LatticeFilter's sparse splat (float32)."""
    lats, t = tables
    rng = np.random.default_rng(2)
    labels = 7
    values = rng.standard_normal((t.num_points, labels)).astype(dtype)
    start, points, weights = t.splat_transposed()
    vertex = poisoned((t.num_vertices, labels), dtype)
    kern.run(MODULE, "lattice_splat_gather", dtype, vertex.size, values, start, points,
             weights.astype(dtype), labels, vertex, **launch)
    np.testing.assert_array_equal(vertex, splat_reference(t, values))
    if dtype == np.float32:
        count = np.diff(start)[:, None]
        magnitude = splat_reference(t, np.abs(values))
        assert_within(vertex, LatticeFilter(lats).splat @ values,
                      (count + 2) * eps(dtype) * magnitude, "gather splat vs CPU")


# --------------------------------------------------------------------- the blur
@pytest.mark.parametrize("dtype", FLOATS)
def test_blur_matches_numpy_exactly(kern, launch, tables, dtype):
    """lattice_blur, every direction: in + 0.5 in[+] + 0.5 in[-] with absent neighbours
    (and directions past a lattice's d + 1) skipped, bit-for-bit; the whole pass chain
    bit-for-bit the CPU's copy-plus-sparse-product passes on the same splat (float32)."""
    lats, t = tables
    rng = np.random.default_rng(3)
    labels = 4
    vertex = rng.standard_normal((t.num_vertices, labels)).astype(dtype)
    for j in range(t.directions):
        out = poisoned(vertex.shape, dtype)
        kern.run(MODULE, "lattice_blur", dtype, vertex.size, vertex, t.neighbours,
                 t.num_vertices, j, labels, out, **launch)
        np.testing.assert_array_equal(out, blur_reference(t, vertex, j))
    if dtype == np.float32:
        cpu = LatticeFilter(lats)
        values = rng.standard_normal((t.num_points, labels)).astype(dtype)
        current = splat_reference(t, values)
        np.testing.assert_array_equal(current, cpu.splat @ values)
        for j in range(t.directions):
            out = poisoned(current.shape, dtype)
            kern.run(MODULE, "lattice_blur", dtype, current.size, current, t.neighbours,
                     t.num_vertices, j, labels, out, **launch)
            current = out
        np.testing.assert_array_equal(current, cpu.blurred(values))


# -------------------------------------------------------------------- the slice
@pytest.mark.parametrize("dtype", FLOATS)
def test_slice_matches_numpy_exactly(kern, launch, tables, dtype):
    """lattice_slice: base + sum over the slots in order, bit-for-bit; also in place
    (out is base), as mean field runs it."""
    _, t = tables
    rng = np.random.default_rng(4)
    labels = 6
    vertex = rng.standard_normal((t.num_vertices, labels)).astype(dtype)
    slice_weights = rng.random((t.num_points, t.slots)).astype(dtype)
    base = rng.standard_normal((t.num_points, labels)).astype(dtype)
    expected = slice_reference(t, vertex, slice_weights, base)
    out = poisoned(base.shape, dtype)
    args = (vertex, t.offsets, slice_weights, t.slots, labels)
    kern.run(MODULE, "lattice_slice", dtype, out.size, *args, base, out, **launch)
    np.testing.assert_array_equal(out, expected)
    kern.run(MODULE, "lattice_slice", dtype, base.size, *args, base, base, **launch)
    np.testing.assert_array_equal(base, expected)


@pytest.mark.parametrize("dtype", FLOATS)
def test_slice_weights_are_pairwise_messages_normalisation(kern, launch, tables, dtype):
    """lattice_slice_weights: weights * alpha_k * (norm_k * w_k) with
    norm_k = 1 / (alpha_k K_k 1 + 1e-20), bit-for-bit a numpy evaluation in the same
    order, and (float32) bit-for-bit the CPU PairwiseMessages' slice matrix."""
    lats, t = tables
    kernel_weights = np.array([3.0, 0.5, 5.0])
    cpu_ones = LatticeFilter(lats).blurred(np.ones((t.num_points, 1), np.float32))
    ones = cpu_ones.astype(dtype)
    weights, alphas = t.weights.astype(dtype), t.alphas.astype(dtype)
    expected = np.empty(t.weights.shape, dtype)
    for k in range(3):
        lo, hi = t.slot_start[k], t.slot_start[k + 1]
        mass = np.zeros(t.num_points, dtype)
        for p in range(lo, hi):
            mass += weights[:, p] * ones[t.offsets[:, p], 0]
        norm = dtype(1) / (mass * alphas[k] + dtype(1e-20))
        scale = norm * dtype(np.float32(kernel_weights[k]))
        expected[:, lo:hi] = weights[:, lo:hi] * alphas[k] * scale[:, None]
    out = poisoned(t.weights.shape, dtype)
    kern.run(MODULE, "lattice_slice_weights", dtype, t.num_points * 3, ones, t.offsets,
             weights, t.slot_start, alphas, kernel_weights.astype(np.float32).astype(dtype),
             3, t.slots, out, **launch)
    np.testing.assert_array_equal(out, expected)
    if dtype == np.float32:
        potts = [types.SimpleNamespace(lattice=lat, weight=w)          # PottsKernel's fields
                 for lat, w in zip(lats, kernel_weights)]
        messages = PairwiseMessages(potts)
        np.testing.assert_array_equal(out, messages.filter.slice.data.reshape(out.shape))


# ------------------------------------------------------------------- the softmax
@pytest.mark.parametrize("dtype", FLOATS)
def test_softmax_matches_densecrf_softmax_rows(kern, launch, dtype):
    """crf_softmax, in place over M labels per pixel: without shift (rows whose max is
    0), with the row-max shift, and with the fast_exp cut-off (entries more than 20
    below the row max exactly 0, the same ones as numpy): within (2M + 8) eps relative
    of densecrf.softmax_rows (expf and the sum order differ)."""
    rng = np.random.default_rng(5)
    n, m = 37, 21
    energy = rng.normal(0, 8, (n, m)).astype(dtype)
    energy[3, :] = energy[3, 0]                                   # a tied row
    shifted = energy - energy.max(axis=1, keepdims=True)
    for x, shift, cutoff in ((shifted, False, None), (energy + 30, True, None),
                             (energy * 2, True, 20.0)):
        expected = softmax_rows(x.astype(np.float64), shift=shift, exp_cutoff=cutoff)
        out = x.copy()
        kern.run(MODULE, "crf_softmax", dtype, n, out, m, int(shift), int(cutoff is not None),
                 cutoff or 0.0, **launch)
        if cutoff is not None:
            np.testing.assert_array_equal(out == 0, expected == 0)
            assert np.any(expected == 0)
        assert_within(out, expected, (2 * m + 8) * eps(dtype) * expected, "softmax")
        if dtype == np.float32:
            reference = softmax_rows(x.copy(), shift=shift, exp_cutoff=cutoff)
            assert_within(out, reference, (2 * m + 8) * eps(dtype) * reference, "softmax f32")


# --------------------------------------------------- the device filter, assembled
@pytest.mark.parametrize("splat", ["atomic", "gather"])
def test_device_filter_matches_cpu_lattice_filter(kern, tables, splat):
    """DeviceLatticeFilter.filter (splat, blur passes, slice) against the CPU
    LatticeFilter on the same lattices, fused with weights: within
    (max count + 4 J + P + 4) eps of the filtered |values| (only the order of the
    splat's sums may differ, and every step adds non-negative multiples)."""
    lats, t = tables
    for launch_shape in ({}, {"grid": 2, "block": 3}):
        device = CrfDevice(np, kern.run, **launch_shape)
        values = np.random.default_rng(6).standard_normal((t.num_points, 3)).astype(np.float32)
        device_filter = DeviceLatticeFilter(device, t, np.float32, splat)
        out = device_filter.filter(values, [2.0, 1.0, 0.5])
        scales = [np.full(t.num_points, s, np.float32) for s in (2.0, 1.0, 0.5)]
        cpu = LatticeFilter(lats, scales)
        magnitude = cpu(np.abs(values))
        depth = np.bincount(t.offsets.ravel()).max() + 4 * t.directions + t.slots + 4
        assert_within(out, cpu(values), depth * eps(np.float32) * magnitude, splat)


# ------------------------------------------------------------- the whole CRF
@pytest.mark.parametrize("params", [PUBLISHED_PARAMS["refine_pascal_v4"],
                                    PUBLISHED_PARAMS["deeplab-largefov"]],
                         ids=["refine_v4_defaults", "largefov"])
def test_device_crf_agrees_with_cpu_and_pydensecrf(crf_device, params):
    """The host-run kernels' mean field on photos (scikit-image's if installed):
    Q within 2e-5 of the CPU dense_crf's (measured <= 1.3e-6: the softmax's expf) and
    within 1e-5 of pydensecrf2's (Krähenbühl's code; measured 3.2e-6), with their labels
    wherever the best leads by more than twice that."""
    for n, rgb in enumerate(photos((250, 188))):
        scores = photo_scores(rgb, 21, n)
        cpu = dense_crf(unary_from_scores(scores), rgb, params)
        q = dense_crf(unary_from_scores(scores), rgb, params, device=crf_device)
        assert q.shape == scores.shape and q.dtype == np.float32
        assert_same_labels(q.argmax(0), cpu)
        assert np.abs(q - cpu).max() < 2e-5
        try:
            import pydensecrf.densecrf  # noqa: F401
        except ImportError:
            continue
        assert_same_marginals(q, pydensecrf_q(scores, rgb, params))


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 1)])
def test_device_crf_on_tiny_images_equals_the_cpu(crf_device, shape):
    rng = np.random.default_rng(sum(shape))
    rgb = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    scores = rng.normal(size=(3,) + shape).astype(np.float32)
    params = PUBLISHED_PARAMS["bbox-seg-erode-gt"]
    cpu = dense_crf(-scores, rgb, params)
    q = dense_crf(-scores, rgb, params, device=crf_device)
    assert np.isfinite(cpu).all() and np.abs(np.asarray(q) - cpu).max() < 2e-5


def test_device_crf_gather_splat_small_grid_and_labels(kern):
    """The deterministic gather splat and a 2 x 3-thread grid give the CPU's labels;
    crf_labels(device=...) takes the argmax on the device (first maximum)."""
    rgb = photos((80, 60))[1]
    scores = photo_scores(rgb, 21, 1)
    params = PUBLISHED_PARAMS["deeplab-largefov"]
    cpu = dense_crf(-scores, rgb, params)
    for splat in ("gather", "atomic"):
        device = CrfDevice(np, kern.run, grid=2, block=3)
        q = crf_device_module.mean_field_on_device(-scores, crf_kernels(rgb, params),
                                                   params.max_iter, device, splat=splat)
        assert_same_labels(q.argmax(0), cpu)
        assert np.abs(q - cpu).max() < 2e-5
    labels = crf_labels(scores, rgb, params, device=CrfDevice(np, kern.run))
    assert labels.shape == rgb.shape[:2] and labels.dtype == np.int64
    assert_same_labels(labels, cpu)


def test_device_mean_field_cutoff_large_weights_and_zero_iterations(crf_device):
    """The DenseCRF layer's fast_exp cut-off (shift every step), weights large enough
    to need the per-step shift, and max_iter 0 (the softmax of -U) against the CPU."""
    rgb, _ = synthetic_scene(30, 41, 7, num_labels=6)
    scores = np.random.default_rng(7).normal(0, 6, (6, 30, 41)).astype(np.float32)
    kernels_ = [PottsKernel(position_features(30, 41, 3), 3.0),
                PottsKernel(bilateral_features(rgb, 20, 5), 5.0)]
    heavy = [PottsKernel(position_features(30, 41, 3), 50.0),
             PottsKernel(bilateral_features(rgb, 20, 5), 100.0)]
    for potts, cutoff, iterations in ((kernels_, 20.0, 5), (heavy, None, 5),
                                      (kernels_, None, 0)):
        cpu = mean_field(-scores, potts, iterations, exp_cutoff=cutoff)
        q = mean_field(-scores, potts, iterations, exp_cutoff=cutoff, device=crf_device)
        assert_same_labels(q.argmax(0), cpu)
        assert np.abs(q - cpu).max() < 2e-5
        if cutoff is not None:
            assert np.any(cpu == 0)
            np.testing.assert_array_equal(q == 0, cpu == 0)


def test_device_crf_double_precision_close_to_float(crf_device):
    rgb, _ = synthetic_scene(20, 23, 8, num_labels=4)
    scores = np.random.default_rng(8).normal(0, 2, (4, 20, 23)).astype(np.float32)
    potts = crf_kernels(rgb, PUBLISHED_PARAMS["deeplab-largefov"])
    single = crf_device_module.mean_field_on_device(-scores, potts, 10, crf_device)
    double = crf_device_module.mean_field_on_device(-scores, potts, 10, crf_device,
                                                    dtype=np.float64)
    assert np.abs(single - double).max() < 2e-5


def test_device_path_errors(crf_device):
    rgb, _ = synthetic_scene(10, 12, 0)
    bad = np.zeros((3, 10, 12), np.float32)
    bad[1, 4, 5] = np.nan
    with pytest.raises(ValueError, match="unary contains NaN"):
        dense_crf(bad, rgb, device=crf_device)
    with pytest.raises(ValueError, match="features for 120 pixels but the unary has 99"):
        mean_field(np.zeros((2, 99), np.float32),
                   [PottsKernel(position_features(10, 12, 3), 1)], 1, device=crf_device)
    good = np.zeros_like(bad)
    with pytest.raises(ValueError, match="splat must be one of atomic, gather"):
        crf_device_module.mean_field_on_device(good, crf_kernels(rgb, PUBLISHED_PARAMS[
            "deeplab"]), 1, crf_device, splat="scatter")
    with pytest.raises(TypeError, match="GPU id or a CrfDevice"):
        dense_crf(good, rgb, device="cuda")


# --------------------------------------------------------- GPU availability, CLI
def _run_verb(argv):
    parser = argparse.ArgumentParser()
    crf_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["crf"] + argv)
    return args.func(args)


def test_gpu_flag_without_cupy_fails_in_one_sentence(tmp_path, monkeypatch, capsys):
    """Without CuPy, --gpu stops before any work with the loader's one sentence (and
    the caffelite entry point prints it as one error line, no traceback)."""
    from caffelite import cli
    monkeypatch.delenv(crf_device_module.EMULATOR_VARIABLE, raising=False)
    monkeypatch.setitem(sys.modules, "cupy", None)          # `import cupy` fails
    monkeypatch.setattr(kernels, "_cupy_checked", [])       # forget a found CuPy
    feats, imgs, _ = _write_case(tmp_path, ["a"])
    (tmp_path / "ids.txt").write_text("a\n")
    argv = ["crf", "--features", str(feats), "--images", str(imgs), "--list",
            str(tmp_path / "ids.txt"), "--out", str(tmp_path / "out"), "--gpu", "0"]
    with pytest.raises(kernels.GPUUnavailableError, match=r"^GPU mode needs CuPy"):
        _run_verb(argv[1:])
    assert not (tmp_path / "out" / "a.png").exists()
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("caffelite crf: error: GPU mode needs CuPy")
    with pytest.raises(kernels.GPUUnavailableError, match="needs CuPy"):
        dense_crf(np.zeros((2, 3, 4), np.float32), np.zeros((3, 4, 3), np.uint8), device=0)


def test_gpu_flag_takes_one_id(tmp_path):
    with pytest.raises(crf_cli.CrfError, match=r"--gpu expects one GPU id .* got '0,1'"):
        _run_verb(["--features", str(tmp_path), "--images", str(tmp_path), "--list",
                   str(tmp_path / "ids.txt"), "--out", str(tmp_path / "out"), "--gpu", "0,1"])


# ------------------------------------------------------------ the GPU emulator
def _emulator():
    try:
        from caffelite.kernels import emulator  # noqa: F401
    except ImportError:
        return False
    return compiler() is not None


needs_emulator = pytest.mark.skipif(not _emulator(),
                                    reason="no GPU emulator (caffelite.kernels.emulator) "
                                           "or no C++ compiler")


@needs_emulator
def test_emulated_gpu_crf_end_to_end():
    """The device path through kernels.launch on the emulator's device arrays (which
    refuse to mix with host arrays, as CuPy's do): the CPU's labels and Q."""
    device = crf_device_module.emulated()
    rgb = photos((96, 72))[2]
    scores = photo_scores(rgb, 21, 2)
    params = PUBLISHED_PARAMS["deeplab-largefov"]
    cpu = dense_crf(-scores, rgb, params)
    q = dense_crf(-scores, rgb, params, device=device)
    assert_same_labels(q.argmax(0), cpu)
    assert np.abs(q - cpu).max() < 2e-5
    assert_same_labels(crf_labels(scores, rgb, params, device=device), cpu)


@needs_emulator
def test_backend_gpu_mode_on_the_emulator_sends_gpu_ids_there():
    """In caffelite's emulated GPU mode (backend.set_mode_gpu(emulate=True)) a GPU id
    runs the CRF on that device module; back in CPU mode ids mean CuPy again."""
    from caffelite import backend
    rgb, gt = synthetic_scene(24, 31, 9, num_labels=5)
    scores = np.random.default_rng(9).normal(0, 2, (5, 24, 31)).astype(np.float32)
    params = PUBLISHED_PARAMS["deeplab-largefov"]
    backend.set_mode_gpu(emulate=True)
    try:
        assert crf_device_module.resolve(0).xp is backend.device_module()
        q = dense_crf(-scores, rgb, params, device=0)
    finally:
        backend.set_mode_cpu()
    cpu = dense_crf(-scores, rgb, params)
    assert_same_labels(q.argmax(0), cpu)
    assert np.abs(q - cpu).max() < 2e-5


@needs_emulator
def test_crf_verb_on_the_emulated_gpu_writes_the_cpu_labels(tmp_path, monkeypatch):
    """caffelite crf --gpu 0 with CAFFELITE_GPU_EMULATOR=1 (also with two worker
    processes, started by spawn as CUDA needs): the PNGs of the CPU run."""
    ids = ["a", "b", "c"]
    feats, imgs, _ = _write_case(tmp_path, ids)
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    common = ["--features", str(feats), "--images", str(imgs), "--list",
              str(tmp_path / "ids.txt"), "--preset", "deeplab-largefov", "--max_iter", "4"]
    assert _run_verb(common + ["--out", str(tmp_path / "cpu")]) == 0
    monkeypatch.setenv(crf_device_module.EMULATOR_VARIABLE, "1")
    assert _run_verb(common + ["--out", str(tmp_path / "gpu"), "--gpu", "0"]) == 0
    assert _run_verb(common + ["--out", str(tmp_path / "gpu2"), "--gpu", "0",
                               "--jobs", "2"]) == 0
    from PIL import Image
    for ident in ids:
        with Image.open(tmp_path / "cpu" / f"{ident}.png") as png:
            want = np.asarray(png)
        for out in ("gpu", "gpu2"):
            with Image.open(tmp_path / out / f"{ident}.png") as png:
                assert np.mean(np.asarray(png) == want) >= 0.999, (ident, out)


# ------------------------------------------------------------------ NVRTC (no GPU)
def test_nvrtc_compiles_the_crf_kernels():
    """Where an NVRTC library is installed: permutohedral.cu compiles with the loader's
    options, and every kernel but the softmax (expf) has no contracted multiply-add
    and no approximate division, so the GPU rounds as the host does."""
    lib = nvrtc_library()
    if lib is None:
        pytest.skip("no NVRTC library found (pip install nvidia-cuda-nvrtc-cu12, or set "
                    "CAFFELITE_NVRTC to libnvrtc.so)")
    ptx, lowered = nvrtc_compile(lib, MODULE, kernels.NVRTC_OPTIONS)
    entries = {part.split("(")[0]: part for part in ptx.split(".entry ")[1:]}
    for expression, symbol in lowered.items():
        body = entries[symbol]
        if expression.startswith("lattice_splat<"):
            assert "atom.global.add" in body or "red.global.add" in body, expression
        if not expression.startswith("crf_softmax"):
            assert "fma." not in body and ".approx" not in body, expression


# ------------------------------------------------- the lattice built on the device
@pytest.fixture(params=["numpy", pytest.param("emulated", marks=needs_emulator)])
def lattice_xp(request):
    """The array module SortedLattice builds on (test_crf_gpu_device.py: CuPy)."""
    if request.param == "numpy":
        return np
    from caffelite.kernels import emulator
    return emulator


def _host(array):
    get = getattr(array, "get", None)
    return np.asarray(get() if get is not None else array)


def lattice_feature_sets():
    """Feature sets covering the build's cases: d = 1, 2, 3, 5; far from the origin;
    repeated points (many points per simplex, identical points in scattered order);
    one point; integer positions, whose elevated coordinates land on rounding ties."""
    rng = np.random.default_rng(11)
    rgb, _ = synthetic_scene(HEIGHT, WIDTH, 3)
    repeated = rng.normal(0, 0.6, (40, 3)).astype(np.float32)[rng.integers(0, 40, 300)]
    return {
        "d1": rng.normal(0, 4, (150, 1)).astype(np.float32),
        "positions": position_features(HEIGHT, WIDTH, 1.7),
        "integer_positions": position_features(HEIGHT, WIDTH, 1.0),
        "random_3d": rng.normal(0, 2.0, (HEIGHT * WIDTH, 3)).astype(np.float32),
        "far_3d": (rng.normal(0, 30, (200, 3)) - 4000).astype(np.float32),
        "repeated_3d": repeated,
        "bilateral": bilateral_features(rgb, 4.0, 12.0),
        "one_point": np.array([[0.3, -1.2, 7.0, 2.5, 0.0]], np.float32),
    }


def assert_same_lattice(built, host, what):
    """Every table equal, element for element: the vertex numbering (first touch) is
    canonical, so no reordering is needed."""
    assert (built.num_points, built.dim, built.num_vertices) == (
        host.num_points, host.dim, host.num_vertices), what
    assert built.alpha == host.alpha, what
    for name in ("offsets", "weights", "neighbours"):
        mine, theirs = _host(getattr(built, name)), getattr(host, name)
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, (what, name)
        np.testing.assert_array_equal(mine, theirs, err_msg=f"{what}: {name}")


@pytest.mark.parametrize("case", sorted(lattice_feature_sets()))
def test_sorted_lattice_equals_the_cpu_lattice(lattice_xp, case):
    """SortedLattice (array ops on numpy, the emulator or CuPy) against the CPU's
    PermutohedralLattice: offsets, barycentric weights (float32 bits) and neighbour
    tables equal, element for element; also from features already on the device."""
    features = lattice_feature_sets()[case]
    host = PermutohedralLattice(features)
    built = permutohedral.SortedLattice(features, lattice_xp)
    assert not built.host_fallback
    assert isinstance(built.offsets, lattice_xp.ndarray)
    assert_same_lattice(built, host, case)
    on_device = permutohedral.SortedLattice(lattice_xp.asarray(features), lattice_xp)
    assert_same_lattice(on_device, host, case + " (device features)")


def test_sorted_lattice_numbering_is_first_touch_and_neighbours_are_keys(lattice_xp):
    """The properties the equality rests on, from the vertex keys themselves (explicit
    integer coordinates, not the packing): vertices are numbered in order of first
    touch (point-major, vertex r of point i at i (d+1) + r); a + neighbour along j has
    the key ``key + (d+1) e_j - 1``, the - neighbour the reverse, and every present
    key has its neighbour listed."""
    features = lattice_feature_sets()["random_3d"]
    d = features.shape[1]
    built = permutohedral.SortedLattice(features, lattice_xp)
    offsets, neighbours = _host(built.offsets), _host(built.neighbours)
    elevated = permutohedral.elevate(features)
    rem0, rank = permutohedral.enclosing_simplex(elevated)
    r = np.arange(d + 1)[:, None, None]
    keys = rem0[:d].T[None] + np.where(rank[:d].T[None] <= d - r, r, r - (d + 1))
    keys = np.concatenate([keys, -keys.sum(axis=2, keepdims=True)], axis=2).astype(np.int64)
    vertex_key = np.empty((built.num_vertices, d + 1), np.int64)
    vertex_key[offsets.ravel()] = keys.reshape(-1, d + 1)
    touch = offsets.T.ravel()                                   # point-major order
    first = np.full(built.num_vertices, len(touch))
    np.minimum.at(first, touch, np.arange(len(touch)))
    assert np.all(np.diff(first) > 0)                           # numbered by first touch
    lookup = {tuple(k): v for v, k in enumerate(vertex_key)}
    assert len(lookup) == built.num_vertices                    # distinct keys
    for j in range(d + 1):
        step = np.full(d + 1, -1)
        step[j] = d
        for v, key in enumerate(vertex_key):
            assert neighbours[j, 0, v] == lookup.get(tuple(key + step), -1)
            assert neighbours[j, 1, v] == lookup.get(tuple(key - step), -1)


def test_sorted_lattice_falls_back_to_the_host_build_when_keys_overflow(lattice_xp,
                                                                       monkeypatch):
    """Keys too wide for the int64 packing: the CPU build (unpacked keys) runs on the
    downloaded features and its tables are uploaded, equal to the CPU lattice's."""
    features = lattice_feature_sets()["bilateral"]
    monkeypatch.setattr(permutohedral, "_PACK_LIMIT", 1)
    built = permutohedral.SortedLattice(features, lattice_xp)
    assert built.host_fallback
    assert isinstance(built.offsets, lattice_xp.ndarray)
    assert_same_lattice(built, PermutohedralLattice(features), "fallback")


def test_sorted_lattice_bad_features(lattice_xp):
    with pytest.raises(ValueError, match="non-empty N x d"):
        permutohedral.SortedLattice(np.zeros((0, 2), np.float32), lattice_xp)
    with pytest.raises(ValueError, match="NaN or infinity"):
        permutohedral.SortedLattice(np.array([[0, np.inf]], np.float32), lattice_xp)
    with pytest.raises(ValueError, match="NaN or infinity"):
        PottsKernel(lattice_xp.asarray(np.array([[np.nan, 0]], np.float32)), 1.0, lattice_xp)


def test_device_built_tables_equal_the_host_built_tables(lattice_xp):
    """LatticeTables fused from device-built lattices: the same offsets, weights,
    neighbours and transposed splat (a stable sort on the device) as from the CPU
    lattices, and those are the CPU LatticeFilter's sparse operators."""
    feature_sets = lattice_feature_sets()
    features = [feature_sets[k] for k in ("positions", "random_3d", "bilateral")]
    host_lattices = [PermutohedralLattice(f) for f in features]
    host = LatticeTables(host_lattices)
    built = LatticeTables([permutohedral.SortedLattice(f, lattice_xp) for f in features],
                          lattice_xp)
    for name in ("offsets", "weights", "neighbours"):
        np.testing.assert_array_equal(_host(getattr(built, name)), getattr(host, name))
    for mine, theirs in zip(built.splat_transposed(), host.splat_transposed()):
        assert isinstance(mine, lattice_xp.ndarray)
        np.testing.assert_array_equal(_host(mine), _host(theirs))
    np.testing.assert_array_equal(built.slot_start, host.slot_start)
    np.testing.assert_array_equal(built.alphas, host.alphas)
    rows = LatticeFilter(host_lattices).splat.tocsr()
    rows.sort_indices()
    start, points, weights = (_host(a) for a in built.splat_transposed())
    np.testing.assert_array_equal(start, rows.indptr)
    np.testing.assert_array_equal(points, rows.indices)
    np.testing.assert_array_equal(weights, rows.data)


def test_features_on_the_device_equal_the_host_features(lattice_xp):
    """position_features / bilateral_features computed on the device: the host's bits
    (and the hand-computed positions of a 2 x 3 image)."""
    np.testing.assert_array_equal(
        _host(position_features(2, 3, 2.0, lattice_xp)),
        np.array([[0, 0], [0.5, 0], [1, 0], [0, 0.5], [0.5, 0.5], [1, 0.5]], np.float32))
    rgb, _ = synthetic_scene(HEIGHT, WIDTH, 5)
    np.testing.assert_array_equal(
        _host(position_features(2, 3, (2.0, 4.0), lattice_xp)),
        np.array([[0, 0], [0.5, 0], [1, 0], [0, 0.25], [0.5, 0.25], [1, 0.25]], np.float32))
    for xy, colour in ((3.0, 13.0), (49.0, 5.0), (0.7, 0.3), ((3.0, 7.0), (2.0, 5.0, 9.0))):
        host = bilateral_features(rgb, xy, colour)
        device = bilateral_features(lattice_xp.asarray(rgb), xy, colour, lattice_xp)
        assert device.dtype == np.float32
        np.testing.assert_array_equal(_host(device), host)
        np.testing.assert_array_equal(_host(position_features(HEIGHT, WIDTH, xy, lattice_xp)),
                                      position_features(HEIGHT, WIDTH, xy))


def test_device_built_lattices_give_the_host_built_mean_field(crf_device):
    """The whole CRF with the lattices built on the device against the same CRF with
    the CPU-built lattices uploaded: Q bit-for-bit with the deterministic gather
    splat (the tables are equal); and crf_labels(device=...) from scores (negated on
    the device) and from probabilities against the CPU's labels (wherever its best
    label leads clearly)."""
    rgb = photos((80, 60))[0]
    scores = photo_scores(rgb, 21, 3)
    params = PUBLISHED_PARAMS["deeplab-largefov"]
    potts = crf_kernels(rgb, params)
    q = {build: crf_device_module.mean_field_on_device(-scores, potts, params.max_iter,
                                                       crf_device, splat="gather",
                                                       build=build)
         for build in crf_device_module.BUILDS}
    np.testing.assert_array_equal(q["device"], q["host"])
    cpu = dense_crf(-scores, rgb, params)
    assert np.abs(q["device"] - cpu).max() < 2e-5
    prob = np.exp(scores) / np.exp(scores).sum(axis=0)
    for given, unary in ((scores, "score"), (prob, "prob")):
        labels = crf_labels(given, rgb, params, unary=unary, device=crf_device)
        assert_same_labels(labels, cpu)
    with pytest.raises(ValueError, match="build must be one of device, host"):
        crf_device_module.mean_field_on_device(-scores, potts, 1, crf_device, build="gpu")
