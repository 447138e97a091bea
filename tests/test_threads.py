"""Nets in several threads at once, as a pycaffe service or a train-while-testing script
runs them: Caffe's layers own their buffers and Caffe::Get() (the random generator) is
per thread, so concurrent nets must give the bits of the same nets run one at a time."""
import threading

import numpy as np

import caffelite
from caffelite import backend
from caffelite.caffe_rng import CaffeRNG
from caffelite.layers import im2col

NET = """
input: "data" input_shape { dim: 2 dim: 8 dim: 24 dim: 24 }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
  convolution_param { num_output: 16 kernel_size: 3 pad: 1
    weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }
layer { name: "c2" type: "Convolution" bottom: "c1" top: "c2"
  convolution_param { num_output: 16 kernel_size: 3 pad: 2 dilation: 2
    weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "p" type: "Pooling" bottom: "c2" top: "p"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "c3" type: "Convolution" bottom: "p" top: "c3"
  convolution_param { num_output: 4 kernel_size: 3 pad: 6 dilation: 6
    weight_filler { type: "gaussian" std: 0.1 } } }
"""


def in_threads(count, work):
    results, errors = [None] * count, []

    def run(k):
        try:
            results[k] = work(k)
        except BaseException as e:      # noqa: BLE001  (reported below)
            errors.append(e)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_each_thread_has_its_own_column_workspace():
    def buffer(_):
        im2col._scratch(1000, np.float32, np)
        return im2col.workspace_buffers()["numpy"]
    first, second = in_threads(2, buffer)
    assert first is not second and not np.shares_memory(first, second)


def test_concurrent_forwards_give_the_serial_bits(tmp_path):
    (tmp_path / "net.prototxt").write_text(NET)
    caffelite.set_random_seed(3)
    weights = caffelite.Net(str(tmp_path / "net.prototxt"), caffelite.TEST)
    weights.save(str(tmp_path / "net.caffemodel"))
    inputs = [np.random.default_rng(k).normal(size=(2, 8, 24, 24)).astype(np.float32)
              for k in range(12)]

    def forwards(k):
        net = caffelite.Net(str(tmp_path / "net.prototxt"), caffelite.TEST,
                            weights=str(tmp_path / "net.caffemodel"))
        out = []
        for x in inputs[k::3] * 4:
            net.blobs["data"].data[...] = x
            out.append(net.forward()["c3"].copy())
        return out
    serial = [forwards(k) for k in range(3)]
    for concurrent, alone in zip(in_threads(3, forwards), serial):
        for a, b in zip(concurrent, alone):
            np.testing.assert_array_equal(a, b)


def test_each_thread_has_its_own_random_generator():
    """Caffe::Get() per thread: a thread's set_random_seed reseeds its own generator
    only, and a thread that set none draws from its own (entropy-seeded) one."""
    caffelite.set_random_seed(7)
    main = backend.rng()
    expected = CaffeRNG(11).words(5).tolist()

    def seeded(_):
        fresh = backend.rng()
        unseeded = not backend.seeded() and fresh is not main
        caffelite.set_random_seed(11)
        return unseeded, backend.rng().words(5).tolist()
    (unseeded, words), = in_threads(1, seeded)
    assert unseeded and words == expected
    assert backend.rng() is main and backend.seeded()
    assert main.words(5).tolist() == CaffeRNG(7).words(5).tolist()
