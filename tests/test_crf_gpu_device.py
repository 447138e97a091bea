"""The dense-CRF kernel comparisons of test_crf_gpu_kernels.py run on a real GPU: the
kernels through the loader (caffelite.kernels: NVRTC-compiled permutohedral.cu), the
lattice built with CuPy (SortedLattice; tables equal to the CPU lattice's), the whole
CRF through caffelite.crf.device.gpu(0) (CuPy arrays).

Skipped without CuPy or a CUDA device; select with ``pytest -m gpu``. The assertions
are the host ones: bit-for-bit where the float operations are the same (--fmad=false),
bounds where sums are reordered. atomicAdd order varies between runs on a GPU, which
the atomic splat tests allow for (a bound on random data, exact sums on dyadic data).
"""
import numpy as np
import pytest

pytestmark = pytest.mark.gpu

from gpu_modes import DeviceKernels, cupy_or_skip_module  # noqa: E402

cupy = cupy_or_skip_module("the GPU CRF tests need CuPy")

from caffelite import kernels  # noqa: E402
from caffelite.crf import device as crf_device_module  # noqa: E402
from test_crf_gpu_kernels import *  # noqa: E402,F401,F403  (the comparisons themselves)

# Host-only checks stay in test_crf_gpu_kernels.py.
del test_nvrtc_compiles_the_crf_kernels               # noqa: F821
del test_gpu_flag_without_cupy_fails_in_one_sentence  # noqa: F821


@pytest.fixture
def kern():   # noqa: F811  (replaces the host runner for every imported test)
    return DeviceKernels()


@pytest.fixture
def crf_device():   # noqa: F811  (the whole-CRF tests run on GPU 0 through CuPy)
    return crf_device_module.gpu(0)


@pytest.fixture
def lattice_xp():   # noqa: F811  (SortedLattice builds with CuPy)
    with cupy.cuda.Device(0):
        yield cupy


def test_gpu_lattice_build_at_full_size_equals_the_host_build():
    """Both lattices of a 500 x 375 image built on GPU 0 (from the image uploaded as
    uint8) and fused: every table equal to the CPU build's, the transposed splat
    included; and crf_labels(device=0), the whole per-image path, gives the CPU's
    labels on >= 99.9 % of the pixels."""
    from caffelite.crf import PUBLISHED_PARAMS, crf_labels
    from caffelite.crf.densecrf import crf_kernels
    from test_crf import photo_scores, photos
    rgb = photos((500, 375))[0]
    params = PUBLISHED_PARAMS["deeplab-largefov"]
    device = crf_device_module.gpu(0)
    with device.activate():
        host = crf_device_module.LatticeTables(
            [k.lattice for k in crf_kernels(rgb, params)], cupy)
        potts = crf_device_module.image_kernels(rgb, params, device)
        built = crf_device_module.LatticeTables(
            crf_device_module.build_lattices(potts, device), cupy)
        pairs = [(built.offsets, host.offsets), (built.weights, host.weights),
                 (built.neighbours, host.neighbours)]
        pairs += list(zip(built.splat_transposed(), host.splat_transposed()))
        for mine, theirs in pairs:
            assert mine.dtype == theirs.dtype
            np.testing.assert_array_equal(cupy.asnumpy(mine), cupy.asnumpy(theirs))
    scores = photo_scores(rgb, 21, 7)
    cpu = crf_labels(scores, rgb, params)
    assert np.mean(crf_labels(scores, rgb, params, device=0) == cpu) >= 0.999


def test_gpu_crf_labels_match_the_cpu_at_full_size():
    """One 500 x 375 image, 21 labels, 10 iterations on GPU 0 (both splats) against the
    CPU path; the atomic splat twice (its order may differ between runs; the labels
    may not)."""
    from caffelite.crf import PUBLISHED_PARAMS, dense_crf
    from caffelite.crf.densecrf import crf_kernels
    from test_crf import photo_scores, photos
    rgb = photos((500, 375))[0]
    scores = photo_scores(rgb, 21, 7)
    params = PUBLISHED_PARAMS["deeplab-largefov"]
    cpu = dense_crf(-scores, rgb, params)
    potts = crf_kernels(rgb, params)
    for splat in ("atomic", "gather", "atomic"):
        q = crf_device_module.mean_field_on_device(-scores, potts, params.max_iter,
                                                   crf_device_module.gpu(0), splat=splat)
        assert np.mean(q.argmax(0) == cpu.argmax(0)) >= 0.999
        assert np.abs(q - cpu).max() < 2e-5
