"""The host's element-wise work shared out over threads (caffelite.host_threads): the
same bits as one thread, whatever the split; errors and numpy's error settings travel."""
import numpy as np
import pytest

import caffelite as caffe
from caffelite import host_threads

NET = """
input: "data" input_shape { dim: 3 dim: 5 dim: 17 dim: 15 }
input: "label" input_shape { dim: 3 dim: 1 dim: 1 dim: 1 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 3 pad: 2 dilation: 2
    weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.2 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1"
  batch_norm_param { use_global_stats: true } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1"
  scale_param { bias_term: true filler { type: "gaussian" std: 1 }
                bias_filler { type: "gaussian" std: 1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1
    weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "leaky" type: "ReLU" bottom: "conv2" top: "leaky"
  relu_param { negative_slope: 0.1 } }
layer { name: "sum" type: "Eltwise" bottom: "pool1" bottom: "leaky" bottom: "conv2"
  top: "sum" }
layer { name: "pool2" type: "Pooling" bottom: "sum" top: "pool2"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "bnp" type: "BN" bottom: "pool2" top: "pool2"
  bn_param { slope_filler { type: "constant" value: 1.5 } frozen: true } }
layer { name: "ip" type: "InnerProduct" bottom: "pool2" top: "ip"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


@pytest.fixture
def every_split(monkeypatch):
    """Split even tiny arrays (one element per task is enough)."""
    monkeypatch.setattr(host_threads, "MIN_TASK_ELEMENTS", 1)
    yield
    host_threads.set_threads(None)


def _run(tmp_path, threads, phase, data):
    host_threads.set_threads(threads)
    proto = tmp_path / "net.prototxt"
    proto.write_text(NET)
    caffe.set_random_seed(7)
    net = caffe.Net(str(proto), phase)
    rng = np.random.default_rng(3)
    for name in ("bn1",):
        mean, var, factor = net.params[name]
        mean.data[...] = rng.normal(0, 0.5, mean.shape)
        var.data[...] = rng.uniform(0.5, 2, var.shape)
        factor.data[...] = 1
    net.blobs["data"].data[...] = data
    net.blobs["label"].data[...] = [[[[0]]], [[[3]]], [[[1]]]]
    net.forward()
    net.backward()
    blobs = {f"{k}.data": v.data.copy() for k, v in net.blobs.items()}
    blobs.update({f"{k}.diff": v.diff.copy() for k, v in net.blobs.items()})
    for name, params in net.params.items():
        blobs.update({f"{name}[{i}].diff": p.diff.copy() for i, p in enumerate(params)})
    return blobs


@pytest.fixture
def pool_use(monkeypatch):
    """How many times work was handed to the pool."""
    calls = []
    real = host_threads._submit

    def counting(workers, tasks):
        calls.append(workers)
        return real(workers, tasks)
    monkeypatch.setattr(host_threads, "_submit", counting)
    return calls


@pytest.mark.parametrize("phase", [caffe.TRAIN, caffe.TEST])
def test_a_net_gives_the_same_bits_with_any_number_of_threads(tmp_path, every_split,
                                                              pool_use, phase):
    data = np.random.default_rng(1).normal(0, 1, (3, 5, 17, 15)).astype(np.float32)
    one = _run(tmp_path, 1, phase, data)
    assert not pool_use
    assert all(np.isfinite(v).all() for v in one.values())
    for threads in (2, 3, 7):
        other = _run(tmp_path, threads, phase, data)
        assert len(pool_use) >= 10          # im2col, pooling, ReLU ... were split
        pool_use.clear()
        assert one.keys() == other.keys()
        for key in one:
            assert np.array_equal(one[key], other[key]), (threads, key)


def test_relu_decides_its_formula_part_by_part_with_the_same_bits(every_split):
    from layer_testing import TRAIN, make_layer, setup_layer
    x = np.random.default_rng(2).normal(0, 1, (2, 3, 50)).astype(np.float32)
    x[0, 0, :4] = [-np.inf, np.inf, -0.0, np.nan]       # in the first part only
    results = []
    for threads in (1, 3):
        host_threads.set_threads(threads)
        for slope in (0.0, 0.25):
            layer = make_layer(f'type: "ReLU" relu_param {{ negative_slope: {slope} }}',
                               TRAIN, np.float32)
            bottom, top = setup_layer(layer, [x], dtype=np.float32)
            layer.forward(bottom, top)
            top[0].diff[...] = np.linspace(-1, 1, x.size).reshape(x.shape)
            layer.backward(top, [True], bottom)
            results.append((top[0].data.copy(), bottom[0].diff.copy()))
    for a, b in zip(results[:2], results[2:]):
        for u, v in zip(a, b):
            assert np.array_equal(u, v, equal_nan=True)
            assert np.array_equal(np.signbit(u), np.signbit(v))


def test_ranges_cover_the_items_once(monkeypatch):
    monkeypatch.setattr(host_threads, "MIN_TASK_ELEMENTS", 10)
    host_threads.set_threads(4)
    try:
        assert host_threads.ranges(0) == []
        assert host_threads.ranges(5, 1) == [(0, 5)]               # too little work
        assert host_threads.ranges(5, 4) == [(0, 2), (2, 5)]       # 20 elements: 2 parts
        parts = host_threads.ranges(10, 100)
        assert parts == [(0, 2), (2, 5), (5, 7), (7, 10)]
        seen = []
        host_threads.for_ranges(lambda lo, hi: seen.append(
            (lo, hi, host_threads.ranges(10, 100))), 10, 100)
        assert sorted(s[:2] for s in seen) == parts
        # inside a worker no further split (the pool would wait on itself)
        assert sorted(s[2] == [(0, 10)] for s in seen) == [False, True, True, True]
    finally:
        host_threads.set_threads(None)


def test_errors_and_numpy_error_settings_reach_the_caller(every_split):
    host_threads.set_threads(3)
    x = np.zeros(300, np.float32)

    def divide(lo, hi):
        np.divide(np.float32(1), x[lo:hi])

    with np.errstate(divide="raise"):
        with pytest.raises(FloatingPointError):
            host_threads.for_ranges(divide, 300)
    done = []

    def fail_in_the_last(lo, hi):
        done.append(lo)
        if hi == 300:
            raise KeyError("last part")
    with pytest.raises(KeyError, match="last part"):
        host_threads.for_ranges(fail_in_the_last, 300)
    assert sorted(done) == [0, 100, 200]         # every part ran before the error came


def test_numpy_error_callbacks_reach_the_workers(every_split):
    host_threads.set_threads(3)
    seen = []
    x = np.zeros(300)
    with np.errstate(divide="call", call=lambda kind, flag: seen.append(kind)):
        host_threads.for_ranges(lambda lo, hi: np.divide(1.0, x[lo:hi]), 300)
    assert seen == ["divide by zero"] * 3


def test_changing_the_thread_count_while_another_thread_splits(every_split):
    import threading
    stop = threading.Event()
    errors = []

    def split_work():
        out = np.zeros(1000)
        try:
            while not stop.is_set():
                host_threads.for_ranges(lambda lo, hi: out.__setitem__(slice(lo, hi), 1),
                                        1000)
        except Exception as e:          # noqa: BLE001  (reported below)
            errors.append(e)
    worker = threading.Thread(target=split_work)
    worker.start()
    try:
        for k in range(300):
            host_threads.set_threads(1 + k % 4)
    finally:
        stop.set()
        worker.join()
    assert not errors


def test_flat_map_leaves_non_contiguous_and_device_like_arrays_whole(every_split):
    host_threads.set_threads(3)
    calls = []
    a = np.arange(24.0).reshape(4, 6)
    host_threads.flat_map(lambda x: calls.append(x.shape), a[:, ::2])
    assert calls == [(4, 3)]

    class Device(np.ndarray):
        pass
    calls.clear()
    host_threads.flat_map(lambda x: calls.append(x.shape), a.view(Device))
    assert calls == [(4, 6)]


def test_thread_count_settings(monkeypatch):
    for name in ("CAFFELITE_HOST_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                 "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    try:
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
        monkeypatch.setattr(host_threads._blas_env, "blas_threads_sleep_soon", lambda: False)
        host_threads.set_threads(None)
        assert host_threads.threads() == 1          # spinning BLAS threads: stay off
        monkeypatch.setattr(host_threads._blas_env, "blas_threads_sleep_soon", lambda: True)
        host_threads.set_threads(None)
        assert host_threads.threads() == 3
        monkeypatch.setenv("CAFFELITE_HOST_THREADS", "5")
        host_threads.set_threads(None)
        assert host_threads.threads() == 5
        monkeypatch.setenv("CAFFELITE_HOST_THREADS", "0")
        host_threads.set_threads(None)
        with pytest.raises(host_threads.HostThreadsError, match="CAFFELITE_HOST_THREADS='0'"):
            host_threads.threads()
        with pytest.raises(host_threads.HostThreadsError, match="positive integer"):
            host_threads.set_threads(0)
    finally:
        monkeypatch.delenv("CAFFELITE_HOST_THREADS", raising=False)
        host_threads.set_threads(None)


def _in_a_fresh_python(code, **env):
    import os
    import subprocess
    import sys
    environ = {k: v for k, v in os.environ.items()
               if k not in ("OPENBLAS_THREAD_TIMEOUT", "CAFFELITE_HOST_THREADS")}
    environ.update(env)
    done = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_importing_caffelite_first_lets_blas_threads_sleep_soon():
    show = ("import os; from caffelite import host_threads as h; "
            "print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'), "
            "h._blas_env.blas_threads_sleep_soon())")
    assert _in_a_fresh_python("import caffelite; " + show) == ["20", "True"]
    assert _in_a_fresh_python("import numpy, caffelite; " + show) == ["None", "False"]
    assert _in_a_fresh_python("import caffelite; " + show,
                              OPENBLAS_THREAD_TIMEOUT="28") == ["28", "False"]
