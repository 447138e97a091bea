"""The backends GPU-mode tests run on: the CPU emulator everywhere, CuPy where a GPU is.

    from gpu_modes import gpu_mode  # noqa: F401  (the fixture)

    def test_x(gpu_mode):
        ...                   # CPU mode
        gpu_mode.on()         # GPU mode on this test's backend
        ...
        gpu_mode.off()        # CPU mode again (also done after every test)
"""
import pytest

from caffelite import backend

BACKENDS = ["emulated", pytest.param("cuda", marks=pytest.mark.gpu)]


def cuda_available():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:       # no CuPy, no driver, no device
        return False


def cupy_or_skip_module(reason):
    """At a -m gpu module's top: the cupy module, or skip the whole module (no CuPy,
    no driver or no device)."""
    cupy = pytest.importorskip("cupy", reason=reason)
    try:
        devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:   # no driver / no device
        pytest.skip(f"no CUDA device: {e}", allow_module_level=True)
    if devices < 1:
        pytest.skip("no CUDA device", allow_module_level=True)
    return cupy


def host_kernels_for(tmp_path_factory, names, folder):
    """HostKernels building ``names`` (compiling in parallel) into a new temporary
    ``folder``, or skip the test without a C++ compiler."""
    from caffelite.kernels.host import HostKernels, compiler
    if compiler() is None:
        pytest.skip("no C++ compiler (g++ or $CXX): the host-compiled kernel tests need one")
    built = HostKernels(tmp_path_factory.mktemp(folder))
    built.start(names)
    return built


class DeviceKernels:
    """kernels.host.HostKernels' interface on the GPU: numpy arrays in, every kernel
    output copied back into them (so host kernel tests run unchanged on a device)."""

    def run(self, module, kernel, dtype, *args, grid=None, block=256):
        import numpy as np
        import cupy
        from caffelite import kernels
        params = kernels.module_signatures(module)[kernel]
        device = [cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
        kernels.launch(module, kernel, dtype, *device, grid=grid, block=block)
        for p, host, dev in zip(params, args, device):
            if p.pointer and not p.const:
                host[...] = cupy.asnumpy(dev)


class GpuMode:
    def __init__(self, name):
        self.name = name
        self.emulated = name == "emulated"

    def on(self):
        backend.set_mode_gpu(emulate=self.emulated)
        return backend.device_module()

    @staticmethod
    def off():
        backend.set_mode_cpu()


@pytest.fixture(params=BACKENDS)
def gpu_mode(request):
    if request.param == "cuda" and not cuda_available():
        pytest.skip("no CuPy with a CUDA device")
    try:
        yield GpuMode(request.param)
    finally:
        backend.set_mode_cpu()
