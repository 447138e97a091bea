"""Where the fork's CUDA kernels compute differently from its CPU code, on non-finite or
signed-zero values, device arrays follow the kernels and host arrays the CPU code. The
expected values are written from the fork's expressions (CUDA's max/min on floats are
fmax/fmin, which give the other operand for a NaN; std::max/min keep it), on the
emulator everywhere and on a real device under -m gpu."""
import numpy as np
import pytest

from caffelite import backend
from caffelite.blob import Blob
from caffelite.backend import TRAIN
from layer_testing import blobs_from, make_layer
from test_gpu_layers import POISON, _start

F32 = np.float32
FLT_MIN = np.finfo(F32).tiny
MODES = ["cpu", "emulated", pytest.param("cuda", marks=pytest.mark.gpu)]
# Outputs start at a poison so that unwritten elements are caught: NaN, or the finite
# POISON in the tests that expect NaN somewhere (a NaN poison would pass there unwritten).


def run(text, bottoms, top_diffs, mode, dtype=F32, num_top=1, poison=np.nan):
    """Forward and backward of one layer in ``mode``: (tops' data, bottoms' diffs)."""
    gpu = mode != "cpu"
    if gpu:
        _start(mode)
    try:
        backend.set_random_seed(5)
        layer = make_layer(text, TRAIN, dtype)
        bottom = blobs_from(bottoms, dtype)
        top = [Blob((), dtype) for _ in range(num_top)]
        layer.check_blob_counts(bottom, top)
        layer.setup(bottom, top)
        layer.reshape(bottom, top)
        with backend.device_access(gpu):
            for t in top:
                t.data[...] = poison
            layer.forward(bottom, top)
        data = [t.host_data.copy() for t in top]
        for t, d in zip(top, top_diffs):
            t.host_diff[...] = d
        for b in bottom:
            b.host_diff[...] = poison
        with backend.device_access(gpu):
            layer.backward(top, [True] + [False] * (len(bottom) - 1), bottom)
        return data, [b.host_diff.copy() for b in bottom], layer
    finally:
        backend.set_mode_cpu()


@pytest.mark.parametrize("mode", MODES)
def test_softmax_loss_of_a_nan_probability(mode):
    # GPU: -log(fmax(NaN, FLT_MIN)) = 87.3365, the "loss = 87.3365" of diverged GPU runs;
    # CPU: std::max(NaN, FLT_MIN) is NaN
    scores = np.array([[np.nan, 1, 2], [0.5, 1, 2]], F32)
    labels = np.array([1, 2], F32)
    text = 'type: "SoftmaxWithLoss" loss_param { normalization: FULL }'
    (loss,), _, _ = run(text, [scores, labels], [np.ones(1, F32)], mode, poison=POISON)
    if mode == "cpu":
        assert np.isnan(loss).all()
        return
    e = np.exp(np.array([0.5, 1, 2], np.float64) - 2)
    p = F32(e[2] / e.sum())
    expected = (-np.log(FLT_MIN, dtype=F32) + -np.log(p, dtype=F32)) / F32(2)
    assert -np.log(FLT_MIN, dtype=F32) == pytest.approx(87.3365, abs=1e-4)
    np.testing.assert_allclose(loss.reshape(()), expected, rtol=2e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("weight", [-1.0, np.inf])
def test_softmax_loss_ignored_positions_are_scaled_zeros(mode, weight):
    # both sides set an ignored position's diff to 0 and then scale the whole diff by
    # loss_weight / normalizer: -0 for a negative weight, NaN for an infinite one
    scores = np.array([[0.1, 0.2, 0.3], [1, -1, 0.5]], F32).reshape(2, 3, 1, 1)
    labels = np.array([1, 255], F32).reshape(2, 1, 1, 1)
    text = 'type: "SoftmaxWithLoss" loss_param { ignore_label: 255 }'
    _, (diff, _), _ = run(text, [scores, labels], [np.full(1, weight, F32)], mode,
                          poison=POISON)
    ignored = diff[1].ravel()
    if weight < 0:
        assert (ignored == 0).all() and np.signbit(ignored).all()
        assert (diff[0].ravel() != 0).all()
    else:
        assert np.isnan(ignored).all()


@pytest.mark.parametrize("mode", MODES)
def test_bnll_gradient_at_nan(mode):
    # GPU: exp(fmin(NaN, 50)) = e^50, so dx = dy * e^50 / (e^50 + 1) = dy in float
    x = np.array([np.nan, 1, -1], F32)
    _, (dx,), _ = run('type: "BNLL"', [x], [np.full(3, 2, F32)], mode, poison=POISON)
    s = 1 / (1 + np.exp(-np.array([1.0, -1.0])))
    np.testing.assert_allclose(dx[1:], 2 * s, rtol=1e-6)
    if mode == "cpu":
        assert np.isnan(dx[0])
    else:
        assert dx[0] == 2


@pytest.mark.parametrize("mode", MODES)
def test_elu_forward_and_backward_formulas(mode):
    # forward, alpha 0: CPU max(x, 0) + 0 * (exp(min(x, 0)) - 1) = +0 at x < 0; GPU
    # 0 * (exp(x) - 1) = -0.  Backward at x = +inf: CPU dy * (1 + (alpha + inf) * 0)
    # = NaN; GPU x > 0 ? dy : ... = dy
    x = np.array([-1, 2, np.inf], F32)
    (y,), (dx,), _ = run('type: "ELU" elu_param { alpha: 0 }', [x], [np.ones(3, F32)],
                         mode, poison=POISON)
    assert y[0] == 0 and np.signbit(y[0]) == (mode != "cpu")
    assert y[1] == 2 and y[2] == np.inf
    assert dx[0] == 0 and dx[1] == 1
    assert np.isnan(dx[2]) if mode == "cpu" else dx[2] == 1


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("mode", MODES)
def test_dropout_backward_order_and_float_scale(mode):
    # GPU backward: (dy * scale) * mask, so a dropped unit whose dy * scale overflows is
    # inf * 0 = NaN; CPU: (dy * mask) * scale = 0 there
    x = np.ones(64, F32)
    dy = np.full(64, 3e38, F32)
    text = 'type: "Dropout" dropout_param { dropout_ratio: 0.5 }'
    (y,), (dx,), layer = run(text, [x], [dy], mode, poison=POISON)
    kept = y != 0
    assert kept.any() and not kept.all()
    assert (y[kept] == 2).all()                     # scale 1 / (1 - 0.5)
    assert (dx[kept] == np.inf).all()
    if mode == "cpu":
        assert (dx[~kept] == 0).all()
    else:
        assert np.isnan(dx[~kept]).all()


@pytest.mark.parametrize("mode", MODES)
def test_dropout_scale_of_a_double_net(mode):
    # the fork's CUDA kernels take the scale as a float parameter even for double nets
    x = np.linspace(1, 2, 64)
    text = 'type: "Dropout" dropout_param { dropout_ratio: 0.3 }'
    (y,), (dx,), _ = run(text, [x], [np.ones(64)], mode, dtype=np.float64)
    kept = y != 0
    scale = 1 / (1 - np.float64(F32(0.3)))
    if mode != "cpu":
        scale = np.float64(F32(scale))
    np.testing.assert_array_equal(y[kept], x[kept] * scale)
    np.testing.assert_array_equal(dx[kept], scale)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("mode", MODES)
def test_lrn_running_sums_turn_nan_after_an_overflow(mode):
    # the fork's CPU loops and GPU kernel both keep one running window sum: once a
    # square overflows, every later channel's scale is inf - inf = NaN
    x = np.ones((1, 8, 2, 1), F32)
    x[0, 1] = 2e19
    text = 'type: "LRN" lrn_param { local_size: 3 alpha: 1 beta: 0.75 }'
    (y,), (dx,), _ = run(text, [x], [np.ones(x.shape, F32)], mode, poison=POISON)
    assert (y[0, :3] == 0).all() and np.isnan(y[0, 3:]).all()
    assert np.isnan(dx[0, 3:]).all()
