"""The DenseCRF layer (spec 16): bottoms scores / data_dim / mean-subtracted BGR data,
per-image crop, Q or log Q; against the standalone CRF and pydensecrf2 (optional)."""
import numpy as np
import pytest
from layer_testing import make_layer, run_forward, setup_layer

from caffelite.crf import PottsKernel, bilateral_features, mean_field, position_features
from caffelite.layers.dense_crf import DenseCRFLayer
from test_crf import assert_same_marginals, noisy_scores, pydensecrf_q, synthetic_scene

MEAN = np.array([104.008, 116.669, 122.675])


def crf_text(pos=((3, 3),), bi=((5, 50, 10),), max_iter=10, output_probability=None):
    parts = [f"max_iter: {max_iter}"]
    parts += [f"pos_w: {w} pos_xy_std: {s}" for w, s in pos]
    parts += [f"bi_w: {w} bi_xy_std: {xy} bi_rgb_std: {rgb}" for w, xy, rgb in bi]
    if output_probability is not None:
        parts.append(f"output_probability: {str(output_probability).lower()}")
    return 'type: "DenseCRF" dense_crf_param { ' + " ".join(parts) + " }"


def batch(sizes, canvas, labels=6, seed=0, mean=MEAN):
    """Scores, data_dim and mean-subtracted BGR data of images padded to ``canvas``."""
    rng = np.random.default_rng(seed)
    n = len(sizes)
    scores = rng.normal(0, 1, (n, labels) + canvas).astype(np.float32)
    data = np.zeros((n, 3) + canvas, np.float32)
    dims = np.zeros((n, 1, 1, 2), np.float32)
    rgbs = []
    for i, (h, w) in enumerate(sizes):
        rgb, gt = synthetic_scene(h, w, seed + i, labels)
        hh, ww = min(h, canvas[0]), min(w, canvas[1])
        scores[i, :, :hh, :ww] = noisy_scores(gt, labels, seed + i)[:, :hh, :ww]
        bgr = rgb[:, :, ::-1].astype(np.float32) - np.asarray(mean, np.float32)
        data[i, :, :hh, :ww] = bgr.transpose(2, 0, 1)[:, :hh, :ww]
        dims[i, 0, 0] = h, w
        rgbs.append(rgb)
    return scores, dims, data, rgbs


def standalone(scores, data, pos, bi, max_iter):
    """The same CRF through caffelite.crf directly: BGR features of the data blob."""
    height, width = scores.shape[1:]
    bgr = data.transpose(1, 2, 0)
    kernels = [PottsKernel(position_features(height, width, s), w) for w, s in pos]
    kernels += [PottsKernel(bilateral_features(bgr, xy, rgb), w) for w, xy, rgb in bi]
    return mean_field(-scores, kernels, max_iter, exp_cutoff=20.0)


def test_layer_registered():
    assert isinstance(make_layer(crf_text()), DenseCRFLayer)


def test_forward_crops_each_image_and_matches_the_standalone_crf():
    pos, bi = ((3, 3),), ((5, 50, 10),)
    sizes = [(30, 40), (26, 33), (36, 45)]        # last one: larger than the canvas
    scores, dims, data, _ = batch(sizes, (32, 42))
    layer = make_layer(crf_text(pos, bi), dtype=np.float32)
    bottom, top = setup_layer(layer, [scores, dims, data], dtype=np.float32)
    out = run_forward(layer, bottom, top)[0]
    assert out.shape == scores.shape and out.dtype == np.float32
    for i, (h, w) in enumerate(sizes):
        h, w = min(h, 32), min(w, 42)
        # The fork reads the colours of image 0 for every image (no per-image offset).
        want = standalone(scores[i, :, :h, :w], data[0, :, :h, :w], pos, bi, 10)
        assert np.array_equal(out[i, :, :h, :w], want)
        assert np.all(out[i, :, h:, :] == 0) and np.all(out[i, :, :, w:] == 0)
        assert np.allclose(out[i, :, :h, :w].sum(0), 1, atol=1e-5)


def fork_loops(scores, dims, data, pos, bi, max_iter):
    """densecrf_layer.cpp's index arithmetic written as its loops over flat buffers
    (SetupUnaryEnergy, SetupPairwiseFunctions, ComputeMap), with the mean field of
    the standalone CRF in between."""
    num, labels, blob_h, blob_w = scores.shape
    flat_scores, flat_data = scores.reshape(-1), data.reshape(-1)
    top = np.full(scores.size, np.nan, np.float32)
    plane = blob_h * blob_w
    for n in range(num):
        real_h, real_w = int(dims[n, 0, 0, 0]), int(dims[n, 0, 0, 1])
        if blob_h <= real_h and blob_w <= real_w:
            h_, w_ = blob_h, blob_w
        else:
            h_, w_ = real_h, real_w
        unary = np.empty((labels, h_, w_), np.float32)
        bgr = np.empty((3, h_, w_), np.float32)
        for c in range(labels):
            for h in range(h_):
                for w in range(w_):
                    unary[c, h, w] = flat_scores[n * labels * plane
                                                 + (c * blob_h + h) * blob_w + w]
        for h in range(h_):
            for w in range(w_):
                for k in range(3):          # image 0: the fork adds no offset
                    bgr[k, h, w] = flat_data[h * blob_w + w + k * plane]
        q = standalone(unary, bgr, pos, bi, max_iter)
        top[n * labels * plane:(n + 1) * labels * plane] = 0          # the memset
        for h in range(h_):
            for w in range(w_):
                for c in range(labels):
                    top[n * labels * plane + (c * blob_h + h) * blob_w + w] = q[c, h, w]
    return top.reshape(scores.shape)


@pytest.mark.parametrize("sizes", [
    [(4, 11)],                 # wider than the blob only: each row runs into the next
    [(7, 6), (6, 8)],          # taller only: channels run into the next one, and image
])                             # 0's spill into image 1 is cleared by image 1's pass
def test_image_larger_in_one_axis_wraps_as_the_forks_loops(sizes):
    pos, bi = ((3, 1),), ((5, 4, 10),)
    scores, dims, data, _ = batch(sizes, (6, 8), labels=3)
    layer = make_layer(crf_text(pos, bi, max_iter=3), dtype=np.float32)
    out = run_forward(layer, *setup_layer(layer, [scores, dims, data],
                                          dtype=np.float32))[0]
    want = fork_loops(scores, dims, data, pos, bi, 3)
    assert not np.isnan(want).any()
    assert np.array_equal(out, want)


@pytest.mark.parametrize("sizes,message", [
    ([(5, 20)], "more pixels than the 6 x 8 blob"),
    ([(6, 8), (7, 6)], "read past the 6 x 8 blobs"),
])
def test_image_larger_in_one_axis_beyond_the_forks_buffers(sizes, message):
    scores, dims, data, _ = batch(sizes, (6, 8), labels=3)
    layer = make_layer(crf_text(), dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        run_forward(layer, *setup_layer(layer, [scores, dims, data], dtype=np.float32))


def test_matches_pydensecrf_fed_the_same_colours():
    """With no mean subtracted the layer's bilateral features are pydensecrf's with the
    BGR bytes passed as its 'RGB' image: same lattice, so the same marginals (up to the
    fork's fast_exp cutoff, which zeroes probabilities below e^-20)."""
    pytest.importorskip("pydensecrf.densecrf")
    from caffelite.crf import CRFParams
    for seed in (0, 3):
        scores, dims, data, rgbs = batch([(60, 80)], (60, 80), labels=21, seed=seed,
                                         mean=(0, 0, 0))
        layer = make_layer(crf_text(((3, 3),), ((4, 49, 5),)), dtype=np.float32)
        bottom, top = setup_layer(layer, [scores, dims, data], dtype=np.float32)
        q = run_forward(layer, bottom, top)[0][0]
        bgr = np.ascontiguousarray(rgbs[0][:, :, ::-1])
        assert_same_marginals(q, pydensecrf_q(scores[0], bgr, CRFParams(4, 49, 5, 3, 3, 10)))


def test_every_image_uses_the_colours_of_image_0_as_the_fork_does():
    """densecrf_layer.cpp builds the bilateral features from ``bottom[2]->cpu_data()``
    with no offset for image n (a fork bug): image 1's CRF sees the top-left
    h1 x w1 colours of image 0.  Oracle: Krähenbühl's code (pydensecrf2) fed those
    colours; image 1's own colours give a clearly different result."""
    pytest.importorskip("pydensecrf.densecrf")
    from caffelite.crf import CRFParams
    scores, dims, data, rgbs = batch([(60, 80), (50, 70)], (60, 80), labels=21, seed=5,
                                     mean=(0, 0, 0))
    layer = make_layer(crf_text(((3, 3),), ((4, 49, 5),)), dtype=np.float32)
    bottom, top = setup_layer(layer, [scores, dims, data], dtype=np.float32)
    q = run_forward(layer, bottom, top)[0][1, :, :50, :70]
    params = CRFParams(4, 49, 5, 3, 3, 10)
    image0 = np.ascontiguousarray(rgbs[0][:50, :70, ::-1])           # BGR bytes
    own = np.ascontiguousarray(rgbs[1][:, :, ::-1])
    assert_same_marginals(q, pydensecrf_q(scores[1, :, :50, :70], image0, params))
    other = pydensecrf_q(scores[1, :, :50, :70], own, params)
    assert np.mean(q.argmax(0) != other.argmax(0)) > 0.01


def test_log_probability_output_and_fast_exp_cutoff():
    scores, dims, data, _ = batch([(20, 24)], (20, 24), labels=4)
    scores[0, 3] = -40.0                           # 40 below the rest: fast_exp gives 0
    prob = make_layer(crf_text(max_iter=2), dtype=np.float32)
    logp = make_layer(crf_text(max_iter=2, output_probability=False), dtype=np.float32)
    q = run_forward(prob, *setup_layer(prob, [scores, dims, data], dtype=np.float32))[0]
    lq = run_forward(logp, *setup_layer(logp, [scores, dims, data], dtype=np.float32))[0]
    assert np.all(q[0, 3] == 0)
    assert np.allclose(lq[0, 3], np.log(np.finfo(np.float32).tiny))
    # C's log(max(Q, FLT_MIN)) in double, stored as float (tests/test_cpu_math.py checks
    # that this is what the compiled C gives).
    c_log = np.log(q[0, :3].astype(np.float64)).astype(np.float32)
    assert np.array_equal(lq[0, :3], c_log)


def test_several_kernels_and_float64_blobs():
    pos, bi = ((3, 3), (1, 1)), ((5, 50, 10), (2, 20, 3))
    scores, dims, data, _ = batch([(18, 22)], (18, 22))
    layer = make_layer(crf_text(pos, bi, max_iter=3))           # float64 blobs
    bottom, top = setup_layer(layer, [scores, dims, data])
    out = run_forward(layer, bottom, top)[0]
    assert out.dtype == np.float64
    want = standalone(scores[0], data[0], pos, bi, 3)
    assert np.allclose(out[0], want, atol=1e-6)


def test_zero_data_dim_leaves_zeros():
    scores, dims, data, _ = batch([(10, 12)], (10, 12))
    dims[...] = 0
    layer = make_layer(crf_text(), dtype=np.float32)
    out = run_forward(layer, *setup_layer(layer, [scores, dims, data], dtype=np.float32))[0]
    assert np.all(out == 0)


@pytest.mark.parametrize("text,arrays,message", [
    ('type: "DenseCRF" dense_crf_param { pos_w: 3 bi_w: 5 bi_xy_std: 50 bi_rgb_std: 3 }',
     None, "1 pos_w but 0 pos_xy_std"),
    ('type: "DenseCRF" dense_crf_param { pos_w: 3 pos_xy_std: 3 bi_w: 5 bi_xy_std: 50 }',
     None, "1 bi_w, 1 bi_xy_std and 0 bi_rgb_std"),
    ('type: "DenseCRF" dense_crf_param { pos_w: 3 pos_xy_std: 3 }', None,
     "no bilateral kernel"),
    ('type: "DenseCRF" dense_crf_param { pos_w: 3 pos_xy_std: 0 bi_w: 5 bi_xy_std: 50 '
     'bi_rgb_std: 3 }', None, "pos_xy_std must be positive"),
    (crf_text(), "two_bottoms", "needs three bottoms"),
    (crf_text(), "gray", "must be N x 3 x H x W"),
    (crf_text(), "size", "scores are 8x9 but the image 'bottom\\[2\\]' is 8x10"),
    (crf_text(), "num", "hold 1, 2 and 1 images"),
])
def test_bad_definitions(text, arrays, message):
    scores = np.zeros((1, 3, 8, 9), np.float32)
    dims = np.full((1, 1, 1, 2), 8, np.float32)
    data = np.zeros((1, 3, 8, 9), np.float32)
    bottoms = {None: [scores, dims, data], "two_bottoms": [scores, dims],
               "gray": [scores, dims, data[:, :1]],
               "size": [scores, dims, np.zeros((1, 3, 8, 10), np.float32)],
               "num": [scores, np.zeros((2, 1, 1, 2), np.float32), data]}[arrays]
    layer = make_layer(text, dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        setup_layer(layer, bottoms, dtype=np.float32)


def test_gpu_mode_runs_the_mean_field_on_the_device_with_the_same_result():
    # Emulated GPU mode: lattices and iterations in the device code path (crf.device);
    # Q must match the CPU layer (the device path's own exactness is tested in
    # test_crf_gpu_kernels.py), and the CPU mode must come back unchanged.
    from caffelite import backend
    from caffelite.kernels import host
    if host.compiler() is None:
        pytest.skip("the emulated GPU mode runs host-compiled kernels: no C++ compiler")
    pos, bi = ((3, 3),), ((5, 50, 10),)
    scores, dims, data, _ = batch([(30, 40), (24, 31)], (30, 40))
    layer = make_layer(crf_text(pos, bi), dtype=np.float32)
    bottom, top = setup_layer(layer, [scores, dims, data], dtype=np.float32)
    cpu = run_forward(layer, bottom, top)[0].copy()
    calls = []
    from caffelite.crf import device as crf_device
    original = crf_device.mean_field_on_device

    def spy(*args, **kwargs):
        calls.append(args[3])
        return original(*args, **kwargs)

    backend.set_mode_gpu(emulate=True)
    try:
        crf_device.mean_field_on_device = spy
        top[0].data[...] = np.nan
        gpu = run_forward(layer, bottom, top)[0]
    finally:
        crf_device.mean_field_on_device = original
        backend.set_mode_cpu()
    assert len(calls) == 2 and all(isinstance(c, crf_device.CrfDevice) for c in calls)
    # Device softmax uses expf (within 2 ulp of numpy exp) for 10 iterations.
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=2e-6)
    assert np.array_equal(gpu.argmax(1), cpu.argmax(1))
