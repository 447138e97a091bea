"""The comparisons of test_conv_igemm.py on a real GPU through the loader (NVRTC, real
mma.sync). The tensor cores' summation order inside an mma is unspecified, so the
float comparisons (forward, weight gradient) take twice the host's bound. Select with
``pytest -m gpu``."""
import numpy as np
import pytest

pytestmark = pytest.mark.gpu

from gpu_modes import DeviceKernels, cupy_or_skip_module  # noqa: E402

cupy = cupy_or_skip_module("the GPU kernel tests need CuPy")

import test_conv_igemm as host_tests  # noqa: E402
from test_conv_igemm import *  # noqa: E402,F401,F403  (the comparisons themselves)

del test_registers_and_shared_memory_on_hopper      # noqa: F821  (host-only)


@pytest.fixture
def kern():   # noqa: F811  (replaces the host runner for every imported test)
    return DeviceKernels()


@pytest.mark.parametrize("tile", sorted(host_tests.TILES))
@pytest.mark.parametrize("case", host_tests.CASES[:3] + host_tests.CASES[4:6] +
                         host_tests.CASES[7:], ids=[f"case{i}" for i in (0, 1, 2, 4, 5, 7)])
def test_float_is_tf32_products_with_float_sums(kern, case, tile):   # noqa: F811
    host_tests.test_float_is_tf32_products_with_float_sums(kern, case, tile, widen=2.0)


@pytest.mark.parametrize("tile", sorted(host_tests.WGRAD_TILES))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("case", [host_tests.CASES[i] for i in (0, 1, 3, 4, 6, 7)],
                         ids=[f"case{i}" for i in (0, 1, 3, 4, 6, 7)])
def test_weight_gradient(kern, case, splits, dtype, tile):   # noqa: F811
    host_tests.test_weight_gradient(kern, case, splits, dtype, tile,
                                    widen=2.0 if dtype == np.float32 else 1.0)
