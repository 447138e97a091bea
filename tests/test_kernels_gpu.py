"""The comparisons of test_kernels_host.py, run on a real GPU through the loader
(caffelite.kernels: NVRTC-compiled CuPy RawModules of im2col.cu, pooling.cu, interp.cu,
softmax_loss.cu, eltwise.cu, sgd_update.cu, seg_confusion.cu, channel.cu, relu.cu and
domain_transform.cu).

Skipped without CuPy or a CUDA device; select with ``pytest -m gpu``. The same
assertions hold on the device: bit-for-bit where the float operations are the same
(NVRTC runs with --fmad=false and IEEE division/sqrt), bounds where sums are reordered;
atomicAdd order varies between runs on a GPU, which is why the exact scatter checks
use integer or dyadic data.
"""
import numpy as np
import pytest

pytestmark = pytest.mark.gpu

from gpu_modes import DeviceKernels, cupy_or_skip_module  # noqa: E402

cupy = cupy_or_skip_module("the GPU kernel tests need CuPy")

from caffelite import kernels  # noqa: E402
from test_kernels_host import *  # noqa: E402,F401,F403  (the comparisons themselves)

# Host-only checks stay in test_kernels_host.py.
del test_every_module_compiles_without_warnings      # noqa: F821
del test_nvrtc_compiles_every_instantiation          # noqa: F821
del test_loader_errors_and_argument_checks           # noqa: F821


@pytest.fixture
def kern():   # noqa: F811  (replaces the host runner for every imported test)
    return DeviceKernels()


def test_modules_compile_once_per_process():
    for name in kernels.module_names():
        first = kernels.load_module(name)
        assert kernels.load_module(name) is first
        for kernel in kernels.module_signatures(name):
            for dtype in kernels.DTYPES:
                assert kernels.get_kernel(first, kernel, dtype) is not None


def test_launch_checks_argument_types():
    x = cupy.zeros(4, cupy.float32)
    with pytest.raises(TypeError, match="argument 'mask' must be a C-contiguous int32"):
        kernels.launch("eltwise", "eltwise_max_backward", cupy.float32, 4, x, x, 0, x)
    with pytest.raises(TypeError, match="must be a cupy array"):
        kernels.launch("eltwise", "eltwise_max_backward", cupy.float32, 4, cupy.asnumpy(x),
                       cupy.zeros(4, cupy.int32), 0, x)
