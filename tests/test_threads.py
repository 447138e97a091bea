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


def test_a_thread_that_seeds_gets_a_generator_of_its_own():
    """The process's generator (seeded from the main thread) serves every thread, as
    before threads; a thread that calls set_random_seed gets its own (Caffe::Get() is
    per thread), which reseeds no other thread's draws, on the host or the device."""
    caffelite.set_random_seed(7)
    main, main_device = backend.rng(), backend.device_seed()
    expected = CaffeRNG(11).words(5).tolist()

    def seeded(_):
        shared = backend.rng() is main and backend.seeded()
        caffelite.set_random_seed(11)
        return shared, backend.rng().words(5).tolist(), backend.device_seed()
    (shared, words, device), = in_threads(1, seeded)
    assert shared and words == expected and device[0] == 11
    assert backend.rng() is main and backend.device_seed() == main_device
    assert main.words(5).tolist() == CaffeRNG(7).words(5).tolist()


def test_threads_drawing_from_the_process_generator_get_whole_draws():
    """Draws from the shared generator do not interleave (numpy lets go of the GIL
    inside them): each thread's masks are runs of the one stream, whatever the order."""
    from caffelite.caffe_rng import rng_bernoulli
    caffelite.set_random_seed(5)
    sizes = [50_000 + 1000 * k for k in range(4)]

    def masks(k):
        return [rng_bernoulli(backend.rng(), sizes[k], 0.5) for _ in range(20)]
    drawn = in_threads(4, masks)
    assert all(m.size == sizes[k] for k in range(4) for m in drawn[k])
    stream = CaffeRNG(5).words(20 * sum(sizes)) <= np.float64(0.5) * np.float64(4294967295)
    stream = stream.astype(np.uint8).tobytes()
    starts = {}
    for k in range(4):
        for m in drawn[k]:
            at = stream.find(m.astype(np.uint8).tobytes())
            assert at >= 0
            starts[at] = m.size
    at = 0
    while at in starts:             # the runs tile the stream without gaps
        at += starts[at]
    assert at == len(stream)
