"""Fillers against Caffe's filler.hpp rules: statistics of the random fillers, the
fan-in/fan-out rules of xavier/msra, exact bilinear kernels, sparse gaussian, errors."""
import numpy as np
import pytest

from caffelite import backend
from caffelite.blob import Blob
from caffelite.filler import FillerError, fill
from caffelite.proto import caffe_pb2
from google.protobuf import text_format


def filled(shape, text, dtype=np.float64, seed=1234):
    backend.set_random_seed(seed)
    param = text_format.Parse(text, caffe_pb2.FillerParameter())
    blob = Blob(shape, dtype)
    blob.data[...] = np.nan
    fill(blob, param)
    assert blob.data.dtype == np.dtype(dtype)
    return blob.data


def test_constant_default_and_value():
    np.testing.assert_array_equal(filled((3, 4), ""), 0.0)
    data = filled((2, 3, 2), 'type: "constant" value: 2.5', np.float32)
    np.testing.assert_array_equal(data, np.float32(2.5))


def test_uniform_range_and_moments():
    data = filled((400, 500), 'type: "uniform" min: -2 max: 3')
    assert data.min() >= -2 and data.max() <= 3
    n = data.size
    assert abs(data.mean() - 0.5) < 5 * np.sqrt(25 / 12 / n)
    assert abs(data.var() / (25 / 12) - 1) < 0.02
    default = filled((1000,), 'type: "uniform"')
    assert default.min() >= 0 and default.max() <= 1


def test_gaussian_moments():
    data = filled((500, 400), 'type: "gaussian" mean: 1 std: 2')
    assert abs(data.mean() - 1) < 5 * 2 / np.sqrt(data.size)
    assert abs(data.std() / 2 - 1) < 0.02


def test_sparse_gaussian_keeps_sparse_over_num_outputs():
    # Caffe: each weight is kept with probability sparse / shape(0).
    data = filled((50, 4000), 'type: "gaussian" std: 1 sparse: 10')
    kept = data != 0
    p = 10 / 50
    assert abs(kept.mean() - p) < 5 * np.sqrt(p * (1 - p) / data.size)
    assert abs(data[kept].std() - 1) < 0.03
    none = filled((20, 30), 'type: "gaussian" sparse: 0')
    assert not none.any()


def fan_case(shape):
    count = int(np.prod(shape))
    fan_in = count // shape[0]
    fan_out = count // (shape[1] if len(shape) > 1 else 1)
    return fan_in, fan_out


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (300, 120), (40000,)])
@pytest.mark.parametrize("norm", ["FAN_IN", "FAN_OUT", "AVERAGE"])
def test_xavier_scale_follows_fan_rules(shape, norm):
    fan_in, fan_out = fan_case(shape)      # Caffe: count/num and count/channels
    n = {"FAN_IN": fan_in, "FAN_OUT": fan_out, "AVERAGE": (fan_in + fan_out) / 2}[norm]
    data = filled(shape, f'type: "xavier" variance_norm: {norm}')
    scale = np.sqrt(3 / n)
    assert np.abs(data).max() <= scale
    assert abs(data.var() * n - 1) < 0.05          # U(-a, a) has variance a^2/3 = 1/n
    assert np.abs(data).max() > 0.98 * scale


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (300, 120)])
@pytest.mark.parametrize("norm", ["FAN_IN", "FAN_OUT", "AVERAGE"])
def test_msra_std_follows_fan_rules(shape, norm):
    fan_in, fan_out = fan_case(shape)
    n = {"FAN_IN": fan_in, "FAN_OUT": fan_out, "AVERAGE": (fan_in + fan_out) / 2}[norm]
    data = filled(shape, f'type: "msra" variance_norm: {norm}')
    assert abs(data.mean()) < 5 * np.sqrt(2 / n / data.size)
    assert abs(data.var() * n / 2 - 1) < 0.06


def test_xavier_conv_weight_uses_per_output_fan_in():
    # (num_output, C, kh, kw) = (16, 8, 5, 5): fan_in = 8*5*5 = 200 -> a = sqrt(3/200)
    data = filled((16, 8, 5, 5), 'type: "xavier"')
    assert np.abs(data).max() <= np.sqrt(3 / 200)
    assert np.abs(data).max() > 0.97 * np.sqrt(3 / 200)


def test_positive_unitball_rows_sum_to_one():
    data = filled((6, 4, 3), 'type: "positive_unitball"')
    assert data.min() >= 0 and data.max() <= 1
    np.testing.assert_allclose(data.reshape(6, -1).sum(axis=1), 1.0, rtol=1e-12)
    vec = filled((5,), 'type: "positive_unitball"')        # num = 5 rows of one value
    np.testing.assert_allclose(vec, 1.0)


@pytest.mark.parametrize("size,expected_1d", [
    # Caffe: f = ceil(K/2), c = (2f - 1 - f%2) / (2f), w(x) = 1 - |x/f - c|
    (2, [1, 0]),                           # f=1, c=0: factor 1 is the identity
    (3, [0.25, 0.75, 0.75]),               # f=2, c=0.75
    (4, [0.25, 0.75, 0.75, 0.25]),         # factor-2 upsampling kernel
    (5, [1 / 3, 2 / 3, 1, 2 / 3, 1 / 3]),  # f=3, c=2/3: factor-3 kernel
    (6, [1 / 3, 2 / 3, 1, 2 / 3, 1 / 3, 0]),  # f=3 as for K=5, one zero tap more
])
def test_bilinear_kernel_values(size, expected_1d):
    expected = np.outer(expected_1d, expected_1d)
    data = filled((3, 2, size, size), 'type: "bilinear"', np.float32)
    for o in range(3):
        for i in range(2):
            np.testing.assert_allclose(data[o, i], expected, rtol=2e-7, atol=1e-7)


@pytest.fixture(scope="module")
def cpu_math_oracle(tmp_path_factory):
    import subprocess
    from conftest import compile_oracle
    exe = compile_oracle(tmp_path_factory, "cpu_math_oracle", "-std=gnu++98",
                         why="the CPU math oracle")

    def run(op, a, b, param):
        data = np.float32(a).tobytes() + np.float32(b).tobytes()
        out = subprocess.run([exe, op, str(len(a)), repr(float(param))], input=data,
                             check=True, capture_output=True).stdout
        return np.frombuffer(out, np.float32)
    return run


@pytest.mark.parametrize("size", [2, 3, 4, 5, 6, 9, 10, 13, 16])
def test_bilinear_is_the_forks_arithmetic(cpu_math_oracle, size):
    """BilinearFiller's expression compiled with g++ as the fork's era did: x / f - c in
    float, the unqualified fabs on double, so 1 - fabs and the product are double and
    rounded once (kernel sizes 4k+1 and 4k+2 differ from an all-float evaluation)."""
    data = filled((2, 1, size, size), 'type: "bilinear"', np.float32)
    f = int(np.ceil(size / 2.0))
    y, x = np.divmod(np.arange(size * size), size)
    want = cpu_math_oracle("bilinear", x, y, f).reshape(size, size)
    for o in range(2):
        assert np.array_equal(data[o, 0].view(np.uint32), want.view(np.uint32))


def test_bilinear_for_double_blobs_keeps_the_double_product():
    """A double blob stores the double expression without a float rounding."""
    data = filled((1, 1, 5, 5), 'type: "bilinear"', np.float64)
    f, c = 3, np.float32((2 * 3 - 1 - 3 % 2) / 6.0)
    w = 1.0 - np.abs((np.arange(5, dtype=np.float32) / np.float32(f) - c).astype(np.float64))
    np.testing.assert_array_equal(data[0, 0], np.outer(w, w))


def test_seed_makes_random_fills_reproducible():
    a = filled((10, 10), 'type: "gaussian"', seed=5)
    b = filled((10, 10), 'type: "gaussian"', seed=5)
    c = filled((10, 10), 'type: "gaussian"', seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("shape,text,needle", [
    ((2, 2), 'type: "nonsense"', "unknown filler type"),
    ((2, 2), 'type: "constant" sparse: 3', "sparsity"),
    ((2, 2), 'type: "xavier" sparse: 1', "sparsity"),
    ((2, 2), 'type: "uniform" min: 2 max: 1', "min"),
    ((2, 2), 'type: "gaussian" std: 0', "std"),
    ((2, 2), 'type: "gaussian" sparse: 3', "is no probability"),
    ((2, 2), 'type: "gaussian" sparse: -2', "sparse"),
    ((2, 3, 4), 'type: "bilinear"', "4-D"),
    ((1, 1, 3, 4), 'type: "bilinear"', "square"),
    ((0, 3), 'type: "constant"', "empty blob"),           # the fillers' CHECK(count)
    ((2, 0), 'type: "gaussian"', "empty blob"),
    ((2, 3, 1, 1, 2), 'type: "xavier"', "legacy num/channels"),
    ((2, 3, 1, 1, 2), 'type: "positive_unitball"', "at most 4 axes"),
])
def test_bad_filler_params_raise(shape, text, needle):
    with pytest.raises(FillerError, match=needle):
        filled(shape, text)


def test_a_bernoulli_probability_outside_zero_one_is_refused():
    from caffelite.caffe_rng import CaffeRNG, RandomSettingError, rng_bernoulli
    for p in (-0.1, 1.5, float("nan")):
        for real in (np.float32, np.float64):
            with pytest.raises(RandomSettingError, match="must be in \\[0, 1\\]"):
                rng_bernoulli(CaffeRNG(1), 10, p, real)
