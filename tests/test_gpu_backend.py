"""GPU mode plumbing: synced blob memory, device access, the emulator's CuPy rules,
mode selection errors. Runs on the emulator everywhere and on CuPy where a GPU is."""
import sys

import numpy as np
import pytest

import caffelite as caffe
from caffelite import backend, kernels
from caffelite.blob import HEAD_AT_DEVICE, HEAD_AT_HOST, SYNCED, Blob, SyncedMemory
from gpu_modes import BACKENDS, cuda_available


@pytest.fixture(params=BACKENDS)
def gpu(request):
    if request.param == "cuda" and not cuda_available():
        pytest.skip("no CuPy with a CUDA device")
    backend.set_mode_gpu(emulate=request.param == "emulated")
    try:
        yield backend.device_module()
    finally:
        backend.set_mode_cpu()


def test_python_writes_reach_the_device_and_device_writes_come_back(gpu):
    blob = Blob((2, 3))
    blob.data[...] = np.arange(6).reshape(2, 3)           # host write (pycaffe style)
    with backend.device_access():
        d = blob.data
        assert isinstance(d, gpu.ndarray)
        np.testing.assert_array_equal(backend.to_host(d), np.arange(6).reshape(2, 3))
        d *= 2                                              # device write
    host = blob.data
    assert type(host) is np.ndarray
    np.testing.assert_array_equal(host, 2 * np.arange(6).reshape(2, 3))
    host[0, 0] = -1                                         # host write again
    np.testing.assert_array_equal(backend.to_host(blob.device_data)[0], [-1, 2, 4])


def test_memory_is_allocated_on_first_use_on_the_side_that_asks(gpu):
    mem = SyncedMemory(5, np.float32)
    d = mem.device_array()
    assert mem.host is None and mem.head == HEAD_AT_DEVICE
    np.testing.assert_array_equal(backend.to_host(d), np.zeros(5))
    assert mem.host_array().tolist() == [0] * 5 and mem.head == HEAD_AT_HOST


def test_device_mirror_is_not_recopied_while_it_is_the_head(gpu):
    mem = SyncedMemory(4, np.float32)
    mem.host_array()[...] = 7
    first = mem.device_array()
    first[...] = 3                  # if the host were copied again this would be lost
    second = mem.device_array()
    assert second is first
    np.testing.assert_array_equal(backend.to_host(second), [3] * 4)


def test_shared_and_reshaped_blobs_keep_sharing_memory_on_both_sides(gpu):
    a, b = Blob((2, 6)), Blob((3, 4))
    b.share_data(a)
    with backend.device_access():
        a.data[...] = gpu.arange(12, dtype=gpu.float32).reshape(2, 6)
        assert b.data.shape == (3, 4)
    np.testing.assert_array_equal(b.data.reshape(-1), np.arange(12))
    a.reshape(4, 3)                 # same count: same memory
    assert a.shares_data_with(b)
    a.reshape(2, 2)                 # fewer: same memory, its first elements (Caffe's
    assert a.shares_data_with(b)    # Blob::Reshape keeps its capacity)
    np.testing.assert_array_equal(a.data, [[0, 1], [2, 3]])
    with backend.device_access():
        assert a.data.shape == (2, 2)
        a.data[...] = -1
    np.testing.assert_array_equal(b.data.reshape(-1), [-1] * 4 + list(range(4, 12)))
    a.reshape(3, 4)                 # back within the capacity: the values are still there
    np.testing.assert_array_equal(a.data.reshape(-1), [-1] * 4 + list(range(4, 12)))
    a.reshape(5, 3)                 # larger: new memory, the share ends (as in Caffe)
    assert not a.shares_data_with(b)
    np.testing.assert_array_equal(a.data, np.zeros((5, 3)))


def test_set_data_array_accepts_device_arrays(gpu):
    blob = Blob((1,))
    blob.set_data_array(gpu.ones((2, 2), dtype=gpu.float32))
    assert blob.shape == (2, 2)
    np.testing.assert_array_equal(blob.data, np.ones((2, 2)))


def test_host_only_layer_reads_leave_the_memory_synced(gpu):
    # A host-only layer (Accuracy) reading device-made scores must not force a copy back.
    proto = caffe.proto.caffe_pb2.NetParameter()
    from google.protobuf import text_format
    text_format.Merge("""
      input: "x" input_shape { dim: 4 dim: 3 }
      input: "label" input_shape { dim: 4 }
      layer { name: "s" type: "Softmax" bottom: "x" top: "s" }
      layer { name: "acc" type: "Accuracy" bottom: "s" bottom: "label" top: "acc" }
    """, proto)
    net = caffe.Net(param=proto, phase=caffe.TEST)
    net.blobs["x"].data[...] = [[3, 0, 0], [0, 3, 0], [0, 0, 3], [0, 3, 0]]
    net.blobs["label"].data[...] = [0, 1, 2, 0]
    net.forward()
    assert net.layer_dict["acc"].runs_on_device is False
    scores_mem = net.blobs["s"].memories()[0]
    assert scores_mem.head == SYNCED
    assert float(net.blobs["acc"].data) == pytest.approx(0.75)


def test_emulated_arrays_refuse_to_mix_with_host_arrays():
    from caffelite.kernels import emulator
    d = emulator.zeros((3,), np.float32)
    with pytest.raises(TypeError, match="host numpy array mixed with device arrays"):
        d + np.ones(3, np.float32)
    with pytest.raises(TypeError, match="host numpy array mixed with device arrays"):
        np.ones(3, np.float32) * d
    with pytest.raises(TypeError, match="host numpy array mixed with device arrays"):
        emulator.concatenate([d, np.ones(3, np.float32)])
    assert isinstance(d.sum(), emulator.ndarray) and d.sum().ndim == 0   # as CuPy
    assert isinstance(d + np.float32(1), emulator.ndarray)               # scalars are fine
    assert type(emulator.asnumpy(d)) is np.ndarray


def test_kernel_launch_refuses_host_arrays_next_to_device_arrays():
    from caffelite.kernels import emulator
    x = emulator.zeros(4, np.float32)
    with pytest.raises(TypeError, match="argument 'mask' must be a caffelite.kernels.emulator"):
        kernels.launch("eltwise", "eltwise_max_backward", np.float32, 4, x,
                       np.zeros(4, np.int32), 0, x)


def test_kernel_launch_on_emulated_arrays_runs_the_cu_source():
    # max_pool_forward on one 2x2 plane with a 2x2 window: the max and its index.
    from caffelite.kernels import emulator, host
    if host.compiler() is None:
        pytest.skip("no C++ compiler for the host-compiled kernels")
    bottom = emulator.asarray(np.array([1, 5, 3, 2], np.float32))
    top = emulator.asarray(np.full(1, np.nan, np.float32))
    mask = emulator.asarray(np.full(1, -7, np.int32))
    kernels.launch("pooling", "max_pool_forward", np.float32,
                   1, bottom, 2, 2, 1, 1, 2, 2, 1, 1, 0, 0, top, mask)
    assert backend.to_host(top).tolist() == [5.0] and backend.to_host(mask).tolist() == [1]


def test_the_host_kernel_cache_must_be_the_users_alone(tmp_path, monkeypatch):
    """The emulator loads the libraries it finds in its cache folder: a folder of
    another user's is refused before anything is loaded, and a folder of the user's that
    others may write is closed and its libraries (perhaps planted) dropped."""
    import os
    from caffelite.kernels import emulator
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "relu-0123456789abcdef.so").write_bytes(b"planted")
    (shared / "relu-0123456789abcdef.cpp").write_text("// a driver")
    shared.chmod(0o777)
    emulator._check_private_folder(str(shared))
    assert shared.stat().st_mode & 0o777 == 0o700
    assert sorted(os.listdir(shared)) == ["relu-0123456789abcdef.cpp"]
    link = tmp_path / "link"
    link.symlink_to(shared)
    emulator._check_private_folder(str(link))          # the folder it names counts
    if os.getuid() == 0:        # root can give a folder to another user
        other = tmp_path / "other"
        other.mkdir(mode=0o755)
        os.chown(other, 65534, 65534)
        monkeypatch.setattr(emulator, "_host_kernels", [])
        monkeypatch.setenv("CAFFELITE_KERNEL_CACHE", str(other))
        with pytest.raises(RuntimeError, match=r"is not this user's \(owner uid 65534, "
                                               r"mode drwxr-xr-x\).*CAFFELITE_KERNEL_CACHE"):
            emulator.host_kernels()
        assert emulator._host_kernels == []
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.raises(RuntimeError, match=r"cannot create the host-kernel cache folder "
                                           r".*a_file/cache"):
        emulator._check_private_folder(str(blocked / "cache"))
    fresh = tmp_path / "fresh" / "cache"
    emulator._check_private_folder(str(fresh))
    assert fresh.stat().st_mode & 0o777 == 0o700


def test_set_mode_gpu_without_cupy_is_one_clear_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)      # import cupy -> ImportError
    monkeypatch.setattr(kernels, "_cupy_checked", [])
    monkeypatch.delenv("CAFFELITE_GPU_EMULATOR", raising=False)
    with pytest.raises(kernels.GPUUnavailableError, match=r"GPU mode needs CuPy.*caffelite\[cuda12\]"):
        caffe.set_mode_gpu()
    assert backend.mode() == "cpu"


@pytest.mark.parametrize("count", [RuntimeError("cudaErrorNoDevice"), 0])
def test_set_mode_gpu_without_a_device_says_how_to_run_on_the_cpu(monkeypatch, count):
    import types

    def device_count():
        if isinstance(count, Exception):
            raise count
        return count
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=device_count)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(kernels, "_cupy_checked", [])
    monkeypatch.delenv("CAFFELITE_GPU_EMULATOR", raising=False)
    with pytest.raises(kernels.GPUUnavailableError,
                       match=r"^GPU mode needs an NVIDIA GPU, but CUDA reports none.*; run on "
                             r"the CPU instead \(without --gpu; set_mode_cpu\(\) in Python\)$"):
        caffe.set_mode_gpu()
    assert backend.mode() == "cpu"


def test_emulator_environment_variable_selects_the_emulator(monkeypatch):
    monkeypatch.setenv("CAFFELITE_GPU_EMULATOR", "1")
    try:
        caffe.set_mode_gpu()
        assert backend.device_module().__name__ == "caffelite.kernels.emulator"
    finally:
        caffe.set_mode_cpu()


def test_a_backward_in_the_other_mode_than_its_forward_is_refused_in_words(gpu, tmp_path):
    """Layers keep their forward's results as arrays of that mode (Caffe keeps them in
    Blobs, which copy across): a backward after switching modes says so, and a forward
    in the new mode makes the backward work again."""
    path = tmp_path / "net.prototxt"
    path.write_text("""force_backward: true
    input: "x" input_shape { dim: 1 dim: 1 dim: 2 dim: 2 }
    layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" }
    layer { name: "loss" type: "Power" bottom: "y" top: "loss" loss_weight: 1 }""")
    from caffelite.net import NetError

    def set_mode(mode):
        if mode == "cpu":
            backend.set_mode_cpu()
        else:
            backend.set_mode_gpu(emulate=gpu.__name__.endswith("emulator"))
    set_mode("cpu")
    net = caffe.Net(str(path), caffe.TEST)
    net.params["bn"][2].data[...] = 1
    net.params["bn"][1].data[...] = 1
    net.blobs["x"].data[...] = np.arange(4).reshape(1, 1, 2, 2)
    net.forward()
    net.backward()
    cpu = net.blobs["x"].diff.copy()
    for forward_mode, backward_mode in (("gpu", "cpu"), ("cpu", "gpu")):
        set_mode(forward_mode)
        net.forward()
        set_mode(backward_mode)
        with pytest.raises(NetError, match=f"backward in {backward_mode.upper()} mode "
                           f"after a forward in {forward_mode.upper()} mode; run the forward "
                           f"again after switching modes"):
            net.backward()
        net.forward()
        net.backward()
        np.testing.assert_allclose(net.blobs["x"].diff, cpu, rtol=1e-6)


def test_device_module_in_cpu_mode_is_an_error():
    backend.set_mode_cpu()
    with pytest.raises(RuntimeError, match="CPU mode"):
        backend.device_module()


def test_device_access_is_per_thread(gpu):
    import threading
    blob = Blob((2,))
    seen = []
    with backend.device_access():
        t = threading.Thread(target=lambda: seen.append(type(blob.data)))
        t.start()
        t.join()
        assert isinstance(blob.data, gpu.ndarray)
    assert seen == [np.ndarray]      # a prefetch thread still gets host arrays


def test_switching_back_to_cpu_mode_brings_device_values_home(gpu):
    blob = Blob((3,))
    with backend.device_access():
        blob.data[...] = gpu.asarray(np.array([1, 2, 3], np.float32))
    backend.set_mode_cpu()
    np.testing.assert_array_equal(blob.data, [1, 2, 3])


def test_a_training_iteration_copies_only_the_inputs_in_and_nothing_else(gpu):
    # Caffe's contract: in GPU mode the only copies are at host boundaries. Here the
    # inputs set from Python go in; params, activations and gradients stay on the device.
    from google.protobuf import text_format
    from caffelite import blob as blob_module
    proto = caffe.proto.caffe_pb2.NetParameter()
    text_format.Merge("""
      input: "x" input_shape { dim: 2 dim: 3 dim: 8 dim: 8 }
      input: "label" input_shape { dim: 2 dim: 1 dim: 8 dim: 8 }
      layer { name: "c" type: "Convolution" bottom: "x" top: "c"
              convolution_param { num_output: 4 kernel_size: 3 pad: 1
                                  weight_filler { type: "gaussian" std: 0.1 } } }
      layer { name: "r" type: "ReLU" bottom: "c" top: "c" }
      layer { name: "loss" type: "SoftmaxWithLoss" bottom: "c" bottom: "label" top: "loss" }
    """, proto)
    net = caffe.Net(param=proto, phase=caffe.TRAIN)
    rng = np.random.default_rng(0)
    for it in range(3):
        net.blobs["x"].data[...] = rng.standard_normal((2, 3, 8, 8))
        net.blobs["label"].data[...] = rng.integers(0, 4, (2, 1, 8, 8))
        if it == 2:
            blob_module.reset_transfer_counts()
        net.clear_param_diffs()
        net.forward_backward()
    assert blob_module.transfers == {"to_device": 2, "to_host": 0}


def test_emulated_arrays_refuse_host_index_arrays_and_host_values():
    from caffelite.kernels import emulator
    d = emulator.arange(6, dtype=np.float32)
    with pytest.raises(TypeError, match="indexed by a host numpy array"):
        d[np.array([0, 2])]
    with pytest.raises(TypeError, match="host numpy array assigned into a device array"):
        d[...] = np.ones(6, np.float32)
    d[emulator.asarray(np.array([0, 2]))] = 5                # device index, scalar value
    d[1:3] = emulator.asarray(np.array([7, 8], np.float32))
    assert emulator.asnumpy(d).tolist() == [5, 7, 8, 3, 4, 5]


def test_emulated_arrays_are_no_indices_like_cupy():
    """cupy.ndarray has no __index__: a 0-d device integer cannot be a list index or a
    size; int() (an explicit device-to-host copy) can."""
    from caffelite.kernels import emulator
    count = emulator.asarray(np.array(3))
    with pytest.raises(TypeError, match="no __index__"):
        [0, 1, 2, 3][count]
    with pytest.raises(TypeError, match="no __index__"):
        range(count)
    assert int(count) == 3


def test_emulated_sorts_are_stable_like_cupy():
    from caffelite.kernels import emulator
    keys = emulator.asarray(np.array([1, 0, 1, 0, 1] * 20, np.float32))
    order = emulator.asnumpy(emulator.argsort(keys))
    assert order.tolist() == sorted(range(100), key=lambda i: (keys[i].item(), i))
    assert emulator.asnumpy(keys.argsort()).tolist() == order.tolist()


def test_batchnorm_global_stats_reads_its_scale_factor_without_a_copy_per_forward(gpu):
    # Caffe reads blobs_[2] through const cpu_data(): once synced, no further copies.
    from google.protobuf import text_format
    from caffelite import blob as blob_module
    proto = caffe.proto.caffe_pb2.NetParameter()
    text_format.Merge("""
      input: "x" input_shape { dim: 2 dim: 3 dim: 4 dim: 4 }
      layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y"
              batch_norm_param { use_global_stats: true } }
    """, proto)
    net = caffe.Net(param=proto, phase=caffe.TEST)
    mean, var, factor = net.params["bn"]
    mean.data[...] = [1, 2, 3]
    var.data[...] = [4, 4, 4]
    factor.data[...] = 2
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    net.blobs["x"].data[...] = x
    net.forward()
    expected = (x - np.array([0.5, 1, 1.5])[:, None, None]) / np.sqrt(2 + 1e-5)
    np.testing.assert_allclose(net.blobs["y"].data, expected, rtol=1e-6)
    net.forward_from_to()           # (net.forward() also hands the output to the host)
    blob_module.reset_transfer_counts()
    from caffelite.kernels import emulator
    host_copies = emulator.copies_to_host[0]
    for _ in range(3):
        net.forward_from_to()
    assert blob_module.transfers == {"to_device": 0, "to_host": 0}
    if gpu is emulator:             # no device->host read of any kind (a sync on a GPU)
        assert emulator.copies_to_host[0] == host_copies


def _solver_reads_per_step(with_batchnorm):
    """Device->host reads of the emulator in one training step (after a warm-up step)."""
    from google.protobuf import text_format
    from caffelite.kernels import emulator
    frozen = 'param { lr_mult: 0 } ' * 3
    bn = (f'layer {{ name: "bn" type: "BatchNorm" bottom: "c" top: "c" {frozen}'
          f'batch_norm_param {{ use_global_stats: true }} }}' if with_batchnorm else "")
    solver_param = caffe.proto.caffe_pb2.SolverParameter()
    text_format.Merge(f"""
      base_lr: 0.01 momentum: 0.9 lr_policy: "fixed" max_iter: 10 display: 0
      net_param {{
        input: "x" input_shape {{ dim: 2 dim: 3 dim: 5 dim: 5 }}
        input: "y" input_shape {{ dim: 2 dim: 4 dim: 5 dim: 5 }}
        layer {{ name: "conv" type: "Convolution" bottom: "x" top: "c"
                convolution_param {{ num_output: 4 kernel_size: 3 pad: 1
                                     weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
        {bn}
        layer {{ name: "loss" type: "EuclideanLoss" bottom: "c" bottom: "y" top: "loss" }}
      }}""", solver_param)
    solver = caffe.get_solver(solver_param)
    if with_batchnorm:
        mean, var, factor = solver.net.params["bn"]
        mean.data[...], var.data[...], factor.data[...] = 0.5, 2.0, 3.0
    solver.step(1)
    before = emulator.copies_to_host[0]
    solver.step(1)
    return emulator.copies_to_host[0] - before


def test_frozen_batchnorm_adds_no_device_to_host_read_per_training_step():
    """The solver's update marks BatchNorm's statistics device-newer every iteration;
    the layer then computes its scale factor on the device instead of reading blobs[2]
    back (Caffe reads cpu_data() there: one sync per BatchNorm per iteration)."""
    backend.set_mode_gpu(emulate=True)
    try:
        with_bn, without_bn = _solver_reads_per_step(True), _solver_reads_per_step(False)
    finally:
        backend.set_mode_cpu()
    assert without_bn > 0          # the loss value is read every step: the count works
    assert with_bn == without_bn


def test_displaying_outputs_sends_nothing_back_to_the_device(gpu):
    """The solver logs every output each display iteration; reading them must not make
    the host the newest copy (the next forward would upload the outputs again)."""
    from google.protobuf import text_format
    from caffelite import blob as blob_module
    uploads = []
    for display in (0, 1):
        solver_param = caffe.proto.caffe_pb2.SolverParameter()
        text_format.Merge(f"""
          base_lr: 0.01 lr_policy: "fixed" max_iter: 10 display: {display}
          net_param {{
            input: "x" input_shape {{ dim: 2 dim: 3 }}
            input: "y" input_shape {{ dim: 2 dim: 1 }}
            layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "p"
                    inner_product_param {{ num_output: 1 }} }}
            layer {{ name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "y" top: "loss" }}
          }}""", solver_param)
        solver = caffe.get_solver(solver_param)
        solver.step(1)
        blob_module.reset_transfer_counts()
        solver.step(2)
        uploads.append(blob_module.transfers["to_device"])
    assert uploads[1] == uploads[0]


def test_a_snapshot_in_gpu_mode_does_not_send_the_weights_back_to_the_device(gpu, tmp_path):
    from google.protobuf import text_format
    from caffelite import blob as blob_module
    solver_param = caffe.proto.caffe_pb2.SolverParameter()
    text_format.Merge(f"""
      base_lr: 0.1 lr_policy: "fixed" max_iter: 10 snapshot_prefix: "{tmp_path}/s"
      net_param {{
        input: "x" input_shape {{ dim: 2 dim: 3 }}
        input: "y" input_shape {{ dim: 2 dim: 1 }}
        layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "p"
                inner_product_param {{ num_output: 1 weight_filler {{ type: "gaussian" }} }} }}
        layer {{ name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "y" top: "loss" }}
      }}""", solver_param)
    solver = caffe.get_solver(solver_param)
    solver.net.blobs["x"].data[...] = np.arange(6).reshape(2, 3)
    solver.step(1)
    model, _ = solver.snapshot()
    # step 1's weights, read as Caffe's const cpu_data (no upload follows); read after
    # the snapshot so that a snapshot of a stale host copy cannot look right
    after_step_1 = [p.read_host_data().copy() for p in solver.net.params["ip"]]
    blob_module.reset_transfer_counts()
    solver.step(1)
    assert blob_module.transfers["to_device"] == 0      # weights, history stay put
    saved = caffe.Net(param=solver_param.net_param, phase=caffe.TEST, weights=model)
    for got, want in zip(saved.params["ip"], after_step_1, strict=True):
        np.testing.assert_array_equal(got.data, want)
    assert not np.array_equal(after_step_1[0], solver.net.params["ip"][0].data)


def test_use_gpu_sets_device_tf32_cuda_graphs_and_autotuning(monkeypatch):
    """The one call --gpu/--tf32/--cuda-graphs/--conv-autotune make (train, test, time
    and pascal)."""
    from caffelite import cuda_graphs
    from caffelite.layers import conv_autotune
    monkeypatch.setenv("CAFFELITE_GPU_EMULATOR", "1")
    try:
        backend.use_gpu(0, tf32=True, graphs=False, autotune=True)
        assert backend.is_gpu() and backend.device_module() is not np
        assert backend.tf32_enabled() and not cuda_graphs.enabled()
        assert conv_autotune.enabled()
        backend.use_gpu(0, graphs=None)          # None leaves the two flags alone
        assert not backend.tf32_enabled() and not cuda_graphs.enabled()
        assert conv_autotune.enabled()
        backend.use_gpu(0, autotune=False)
        assert not conv_autotune.enabled()
    finally:
        backend.set_tf32(False)
        backend.set_mode_cpu()
