"""Caffe's random numbers (caffelite/caffe_rng.py) against things we did not write:
published mt19937 outputs, the C library's own rand() (through ctypes), boost itself
(tests/oracles/caffe_rng_oracle.cpp, compiled with g++ where boost's headers are
installed: apt install libboost-dev), and mpmath for the ziggurat tables."""
import ctypes
import ctypes.util
import os
import subprocess

import numpy as np
import pytest

import caffelite as caffe
from caffelite import backend, caffe_rng
from caffelite.caffe_rng import (CaffeRNG, GlibcRand, rng_bernoulli, rng_gaussian,
                                 rng_uniform, shuffle)
from caffelite.io import prototxt
from caffelite.proto import caffe_pb2
from conftest import compile_oracle
from layer_testing import TRAIN, make_layer, run_forward, setup_layer

HERE = os.path.dirname(os.path.abspath(__file__))
BOOST_RANDOM = "/usr/include/boost/random"


@pytest.fixture(autouse=True)
def default_normal_algorithm():
    yield
    caffe_rng.set_normal_algorithm(None)


# ------------------------------------------------------------------ engines
def test_mt19937_matches_the_published_outputs():
    # C++11 [rand.predef]: the 10000th output of a default-constructed mt19937
    # (seed 5489) is 4123659995; its first is 3499211612.
    words = CaffeRNG(5489).words(10000)
    assert words[0] == 3499211612 and words[-1] == 4123659995


def test_peeked_words_stay_pending_and_the_state_round_trips():
    a, b = CaffeRNG(7), CaffeRNG(7)
    ahead = a.peek(10).copy()
    assert a.tell() == 0 and np.array_equal(a.words(3), ahead[:3]) and a.tell() == 3
    saved = a.get_state()
    rest = a.words(20)
    c = CaffeRNG(0)
    c.set_state(saved)
    assert np.array_equal(c.words(20), rest)
    assert np.array_equal(b.words(23)[3:], rest)
    with pytest.raises(caffe_rng.RandomSettingError):
        c.set_state({"bit_generator": "PCG64"})


@pytest.mark.parametrize("seed", [1, 0, 12345, 2 ** 31 + 5])
def test_glibc_rand_matches_the_c_library(seed):
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.srand(ctypes.c_uint(seed))
    expected = [libc.rand() for _ in range(1000)]
    ours = GlibcRand(seed)
    assert [ours.rand() for _ in range(1000)] == expected


def test_random_shuffle_is_libstdcxx_form():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.srand(1)
    expected = list(range(9))
    for i in range(1, 9):
        j = libc.rand() % (i + 1)
        expected[i], expected[j] = expected[j], expected[i]
    assert caffe_rng.random_shuffle(GlibcRand(1), list(range(9))) == expected


def test_glibc_rand_state_round_trips():
    g = GlibcRand(3)
    g.rand()
    h = GlibcRand(99)
    h.set_state(g.get_state())
    assert [g.rand() for _ in range(5)] == [h.rand() for _ in range(5)]
    with pytest.raises(caffe_rng.RandomSettingError):
        h.set_state({"engine": "mt19937"})


# ------------------------------------------------------------------ boost oracle
def _installed_boost_normal():
    """Which of boost's normal generators the installed headers hold."""
    with open(os.path.join(BOOST_RANDOM, "exponential_distribution.hpp")) as f:
        if "unit_exponential_distribution" in f.read():
            return "ziggurat-2016"
    with open(os.path.join(BOOST_RANDOM, "normal_distribution.hpp")) as f:
        return "ziggurat-2014" if "normal_table" in f.read() else "box-muller"


@pytest.fixture(scope="module")
def boost_oracle(tmp_path_factory):
    if not os.path.isdir(BOOST_RANDOM):
        pytest.skip("boost's headers (apt install libboost-dev) are needed for the boost "
                    "oracle")
    exe = compile_oracle(tmp_path_factory, "caffe_rng_oracle", why="the boost oracle")

    def run(seed, op, count, *args, dtype):
        out = subprocess.run([exe, str(seed), op, str(count), *map(repr, args)],
                             check=True, capture_output=True).stdout
        return np.frombuffer(out[:-4], dtype=dtype), int(np.frombuffer(out[-4:], np.uint32)[0])
    run.normal = _installed_boost_normal()
    return run


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
        a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("seed", [1, 42, 4000000000])
def test_raw_uniform_bernoulli_and_shuffle_match_boost(boost_oracle, seed):
    g = CaffeRNG(seed)
    words, after = boost_oracle(seed, "raw", 2000, dtype=np.uint32)
    assert np.array_equal(g.words(2000), words) and g.rand() == after
    for a, b in ((-0.3, 0.7), (0.0, 1.0), (-1e-3, 1e-3), (5.0, 5.0)):
        g = CaffeRNG(seed)
        values, after = boost_oracle(seed, "uniform", 50000, a, b, dtype=np.float32)
        assert _same_bits(rng_uniform(g, 50000, a, b), values) and g.rand() == after
    g = CaffeRNG(seed)
    values, after = boost_oracle(seed, "uniform_double", 5000, -2.0, 3.0, dtype=np.float64)
    assert _same_bits(rng_uniform(g, 5000, -2.0, 3.0, np.float64), values)
    assert g.rand() == after
    for p in (0.5, 0.1, 0.0, 1.0, 1 - float(np.float32(0.3))):
        g = CaffeRNG(seed)
        kept, after = boost_oracle(seed, "bernoulli_double", 20000, p, dtype=np.uint8)
        assert np.array_equal(rng_bernoulli(g, 20000, p), kept.astype(bool))
        assert g.rand() == after
    g = CaffeRNG(seed)
    kept, after = boost_oracle(seed, "bernoulli_float", 20000, 0.3, dtype=np.uint8)
    assert np.array_equal(rng_bernoulli(g, 20000, 0.3, np.float32), kept.astype(bool))
    assert g.rand() == after
    for n in (1, 2, 3, 1464):
        g = CaffeRNG(seed)
        order, after = boost_oracle(seed, "shuffle", n, dtype=np.int32)
        assert shuffle(g, list(range(n))) == order.tolist() and g.rand() == after


@pytest.mark.parametrize("seed, count, mean, std", [(1, 1, 0.0, 1.0), (42, 7, 0.0, 0.01),
                                                    (7, 300000, 0.5, 2.0),
                                                    (4000000000, 100000, -1.0, 0.1)])
def test_gaussian_matches_boost(boost_oracle, seed, count, mean, std):
    """300 000 values go through about 9 000 wedge tests and 170 tail draws."""
    caffe_rng.set_normal_algorithm(boost_oracle.normal)
    g = CaffeRNG(seed)
    values, after = boost_oracle(seed, "gaussian", count, mean, std, dtype=np.float32)
    assert _same_bits(rng_gaussian(g, count, mean, std), values) and g.rand() == after
    g = CaffeRNG(seed)
    n = max(count // 10, 1)
    values, after = boost_oracle(seed, "gaussian_double", n, mean, std, dtype=np.float64)
    assert _same_bits(rng_gaussian(g, n, mean, std, np.float64), values)
    assert g.rand() == after


@pytest.mark.parametrize("chunk", [1, 37, 1000])
def test_gaussian_matches_boost_across_chunks(boost_oracle, monkeypatch, chunk):
    """Tries are looked at in chunks; a wedge or tail draw that reads past a chunk's end
    is done again from the next chunk's words."""
    caffe_rng.set_normal_algorithm(boost_oracle.normal)
    monkeypatch.setattr(caffe_rng, "_NORMAL_CHUNK", chunk)
    for dtype, op, count in ((np.float32, "gaussian", 20000),
                             (np.float64, "gaussian_double", 5000)):
        g = CaffeRNG(11)
        values, after = boost_oracle(11, op, count, 0.0, 1.0, dtype=dtype)
        assert _same_bits(rng_gaussian(g, count, 0.0, 1.0, dtype), values)
        assert g.rand() == after


class _CraftedWords:
    """An engine whose first words are given, then the mt19937 words of seed 5."""

    def __init__(self, head):
        self.words = np.concatenate([np.array(head, np.uint32), CaffeRNG(5).words(4096)])
        self.at = 0

    def random_raw(self, count):
        self.at += count
        return self.words[self.at - count:self.at].astype(np.uint64)


@pytest.mark.parametrize("name", ["ziggurat-2014", "ziggurat-2016"])
def test_a_tail_draw_longer_than_the_look_ahead_is_read_to_its_end(monkeypatch, name):
    """A first try in layer 0 beyond x_1 (a tail draw), then 300 all-ones words, which
    boost's uniform_01<float> redraws (they round to 1): the draw reads past the words
    looked at, and is done again with more of them."""
    caffe_rng.set_normal_algorithm(name)
    head = [0xFFFFFF01] + [0xFFFFFFFF] * 300
    expected_rng = CaffeRNG(1)
    expected_rng._engine = _CraftedWords(head)
    expected = rng_gaussian(expected_rng, 3, 0.0, 1.0)
    assert expected_rng.tell() > 300
    monkeypatch.setattr(caffe_rng, "_NORMAL_CHUNK", 1)
    g = CaffeRNG(1)
    g._engine = _CraftedWords(head)
    assert _same_bits(rng_gaussian(g, 3, 0.0, 1.0), expected)
    assert g.tell() == expected_rng.tell()


# ------------------------------------------------------------------ the other Boosts
def test_ziggurat_variants_differ_only_from_the_first_tail_value():
    """The 2014 and 2016 ziggurats decide wedges alike (the 2016 bounds only skip
    exp()); they part at the first value from the tail (|x| > x_1 = 3.4426...)."""
    caffe_rng.set_normal_algorithm("ziggurat-2016")
    new = rng_gaussian(CaffeRNG(3), 20000, 0.0, 1.0)
    caffe_rng.set_normal_algorithm("ziggurat-2014")
    old = rng_gaussian(CaffeRNG(3), 20000, 0.0, 1.0)
    first_tail = int(np.flatnonzero(np.abs(new) > 3.4426198558966523)[0])
    assert first_tail > 100
    assert np.array_equal(old[:first_tail], new[:first_tail])
    assert abs(old[first_tail]) > 3.4426198558966523


@pytest.mark.parametrize("name", caffe_rng.NORMAL_ALGORITHMS)
def test_every_normal_algorithm_is_standard_normal(name):
    caffe_rng.set_normal_algorithm(name)
    x = rng_gaussian(CaffeRNG(11), 400001, 0.0, 1.0).astype(np.float64)
    assert x.dtype == np.float64 and x.size == 400001
    assert abs(x.mean()) < 6e-3 and abs(x.std() - 1) < 6e-3
    assert abs((np.abs(x) > 2).mean() - 0.0455) < 2e-3      # two-sided tail mass


def test_box_muller_pairs_share_two_uniforms():
    """Box-Muller: values 2k and 2k+1 come from the (k)th pair of uniform_01 draws,
    rho*cos then rho*sin; an odd count still uses the whole last pair."""
    caffe_rng.set_normal_algorithm("box-muller")
    g = CaffeRNG(5)
    x = rng_gaussian(g, 3, 0.0, 1.0)
    assert g.tell() == 4
    u = CaffeRNG(5).words(4).astype(np.float32) * np.float32(2.0 ** -32)
    rho = np.sqrt(np.float32(-2) * np.float32(np.log(np.float64(np.float32(1) - u[1]))))
    angle = np.float64(np.float32(2) * np.float32(np.pi) * u[0])
    assert x[0] == rho * np.float32(np.cos(angle)) and x[1] == rho * np.float32(np.sin(angle))


def test_unknown_algorithm_is_a_clear_error(monkeypatch):
    with pytest.raises(caffe_rng.RandomSettingError, match="box-muller"):
        caffe_rng.set_normal_algorithm("marsaglia")
    monkeypatch.setenv("CAFFELITE_BOOST_NORMAL", "polar")
    with pytest.raises(caffe_rng.RandomSettingError, match="CAFFELITE_BOOST_NORMAL"):
        rng_gaussian(CaffeRNG(1), 3, 0.0, 1.0)


def test_ziggurat_tables_are_the_definition():
    mp = pytest.importorskip("mpmath")
    assert mp
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "ziggurat_tables", os.path.join(HERE, "..", "scripts", "ziggurat_tables.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with open(caffe_rng.__file__.replace("caffe_rng.py", "_ziggurat_tables.py")) as f:
        assert f.read() == script.module_text()


# ------------------------------------------------------------------ Caffe's call sites
def test_seeded_fillers_draw_caffes_values(boost_oracle):
    caffe_rng.set_normal_algorithm(boost_oracle.normal)
    net_text = '''layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3
                     dim: 5 dim: 5 } } }
        layer { name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param {
                num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.01 }
                bias_filler { type: "xavier" } } }'''
    caffe.set_random_seed(1701)
    net = _net(net_text, caffe.TEST)
    weights, _ = boost_oracle(1701, "gaussian", 4 * 3 * 9, 0.0, 0.01, dtype=np.float32)
    assert _same_bits(net.params["c"][0].data.ravel(), weights)
    # The bias's xavier draw follows the weights' on the same stream (fan_in = 4/4).
    g = CaffeRNG(1701)
    rng_gaussian(g, 108, 0.0, 0.01)
    scale = np.sqrt(np.float32(3) / np.float32(1))
    assert _same_bits(net.params["c"][1].data, rng_uniform(g, 4, -scale, scale))


def test_cpu_dropout_draws_caffes_mask(boost_oracle):
    layer = make_layer('name: "d" type: "Dropout" dropout_param { dropout_ratio: 0.3 }',
                       TRAIN, np.float32)
    x = np.arange(1, 2 * 3 * 4 * 5 + 1, dtype=np.float32).reshape(2, 3, 4, 5)
    caffe.set_random_seed(99)
    bottom, top = setup_layer(layer, [x], 1, np.float32)
    (y,) = run_forward(layer, bottom, top)
    p = 1.0 - float(np.float32(0.3))          # 1. - threshold_, a double
    kept, _ = boost_oracle(99, "bernoulli_double", x.size, p, dtype=np.uint8)
    scale = np.float32(1.0 / (1.0 - float(np.float32(0.3))))
    assert np.array_equal(y.ravel(), x.ravel() * kept.astype(np.float32) * scale)


def test_image_seg_data_draws_its_seeds_in_the_forks_order(tmp_path):
    """ImageDimPrefetchingDataLayer::LayerSetUp: InitRand, the shuffle seed, InitRand
    again (the seed used), the thread seed -- four words of the global stream."""
    from PIL import Image
    lines = []
    ramp = np.add.outer(10 * np.arange(6), np.arange(7))
    for i in range(5):
        pixels = np.repeat((ramp + 40 * i)[:, :, None], 3, axis=2).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"i{i}.png")
        Image.fromarray(np.full((6, 7), i, np.uint8)).save(tmp_path / f"l{i}.png")
        lines.append(f"/i{i}.png /l{i}.png")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    text = f'''layer {{ name: "data" type: "ImageSegData" top: "data" top: "label"
        top: "dim" image_data_param {{ root_folder: "{tmp_path}"
        source: "{tmp_path / 'list.txt'}" batch_size: 2 shuffle: true label_type: PIXEL }}
        transform_param {{ mirror: true crop_size: 4 mean_value: 1 mean_value: 2
        mean_value: 3 }} }}'''
    caffe.set_random_seed(2024)
    net = _net(text, caffe.TRAIN)
    layer = net.layer_dict["data"]
    first, shuffle_seed, transform_seed, thread_seed = CaffeRNG(2024).words(4)
    assert backend.rng().tell() == 4 and first != transform_seed and thread_seed >= 0
    assert layer.transform_rng.seed == transform_seed
    # Three batches of two: the first epoch in caffe::shuffle's order, then the
    # cumulative reshuffle at the wrap; each sample's words are mirror, h_off, w_off
    # (Rand(n) = word % n) from the transformer's own stream.
    g = CaffeRNG(shuffle_seed)
    first_epoch = shuffle(g, list(range(5)))
    entries = first_epoch + shuffle(g, list(first_epoch))
    words = CaffeRNG(transform_seed).words(18).reshape(6, 3)
    for b in range(3):
        net.forward()
        for n in range(2):
            entry = entries[2 * b + n]
            mirror, h_word, w_word = words[2 * b + n]
            assert np.all(net.blobs["label"].data[n, 0] == entry)
            h_off, w_off = h_word % (6 - 4 + 1), w_word % (7 - 4 + 1)
            image = (ramp + 40.0 * entry)[h_off:h_off + 4, w_off:w_off + 4]
            if mirror % 2:
                image = image[:, ::-1]
            assert np.array_equal(net.blobs["data"].data[n, 0], image - 1.0)


def _net(text, phase):
    return caffe.Net(param=prototxt.parse_text(text, caffe_pb2.NetParameter()), phase=phase)


def test_dummy_data_draws_only_in_forward():
    """DummyDataLayer::LayerSetUp's forward runs with refill_ inverted: constant tops are
    filled there, random ones draw nothing until the first real forward."""
    text = '''layer { name: "d" type: "DummyData" top: "a" top: "b" dummy_data_param {
              shape { dim: 2 dim: 3 } data_filler { type: "constant" value: 4 }
              data_filler { type: "gaussian" std: 0.5 } } }'''
    caffe.set_random_seed(31)
    net = _net(text, caffe.TRAIN)
    assert backend.rng().tell() == 0 and np.all(net.blobs["a"].data == 4)
    net.forward()
    expected = rng_gaussian(CaffeRNG(31), 6, 0.0, 0.5).reshape(2, 3)
    assert _same_bits(net.blobs["b"].data, expected) and backend.rng().tell() > 0


def test_a_seeded_net_draws_fillers_at_setup_then_dropout_in_forward():
    """Caffe's order on the global stream: every filler while the layers are set up,
    in layer order, then each TRAIN forward's Dropout mask."""
    text = '''layer { name: "d" type: "DummyData" top: "x" dummy_data_param {
                shape { dim: 2 dim: 5 } data_filler { type: "constant" value: 1.5 } } }
              layer { name: "ip" type: "InnerProduct" bottom: "x" top: "h"
                inner_product_param { num_output: 6
                  weight_filler { type: "gaussian" std: 0.2 }
                  bias_filler { type: "uniform" min: -0.1 max: 0.1 } } }
              layer { name: "drop" type: "Dropout" bottom: "h" top: "h"
                dropout_param { dropout_ratio: 0.5 } }'''
    caffe.set_random_seed(8)
    net = _net(text, caffe.TRAIN)
    g = CaffeRNG(8)
    weights = rng_gaussian(g, 30, 0.0, 0.2).reshape(6, 5)
    bias = rng_uniform(g, 6, -0.1, 0.1)
    assert _same_bits(net.params["ip"][0].data, weights)
    assert _same_bits(net.params["ip"][1].data, bias)
    for _ in range(2):
        net.forward()
        kept = rng_bernoulli(g, 12, 0.5).reshape(2, 6)
        h = (np.float32(1.5) * weights).sum(axis=1, dtype=np.float32) + bias
        np.testing.assert_allclose(net.blobs["h"].data, h * kept * np.float32(2),
                                   rtol=1e-6, atol=0)
        assert np.array_equal(net.blobs["h"].data != 0, kept)


@pytest.mark.parametrize("transform, words", [("", 0), ("transform_param { mirror: true }", 1),
                                              ("transform_param { crop_size: 2 }", 1)])
def test_memory_data_draws_initrands_word(transform, words):
    """BaseDataLayer::LayerSetUp seeds a transformer RNG (one word) when InitRand's
    condition holds, even though MemoryData never uses it."""
    caffe.set_random_seed(4)
    _net(f'''layer {{ name: "m" type: "MemoryData" top: "x" top: "y" {transform}
             memory_data_param {{ batch_size: 1 channels: 1 height: 3 width: 3 }} }}''',
         caffe.TRAIN)
    assert backend.rng().tell() == words
