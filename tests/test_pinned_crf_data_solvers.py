"""Pinned behaviours found unguarded by mutation testing of the dense CRF, the data
transformer, blobs and the adaptive solvers.  Every expected value comes from an
independent oracle: Krähenbühl's code (pydensecrf2), the DeepLab fork's C++ source
semantics written out as a formula here, or the real BVLC Caffe 1.0."""
import numpy as np
import pytest
from layer_testing import make_layer, run_forward, setup_layer

from caffelite.crf import PermutohedralLattice, unary_from_probabilities

FLT_MIN = np.finfo(np.float32).tiny


# --------------------------------------------------------------- permutohedral lattice
@pytest.mark.parametrize("dim", [1, 2, 5])
def test_lattice_filter_scale_matches_kraehenbuehl_without_normalisation(dim):
    """``PermutohedralLattice.filter`` is the reference's ``Permutohedral::compute``,
    whose slice multiplies by alpha = 1 / (1 + 2^-d).  Under NORMALIZE_AFTER alpha
    cancels, so only an unnormalised kernel shows it: pydensecrf2's NO_NORMALIZATION
    kernel adds ``w * compute(Q)`` unscaled, so one mean-field step of it is
    softmax(-U + w * filter(Q0))."""
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    rng = np.random.default_rng(dim)
    n, labels, weight = 37, 3, 2.0
    features = (rng.random((n, dim)) * 3).astype(np.float32)
    unary = rng.normal(size=(labels, n)).astype(np.float32)
    crf = dcrf.DenseCRF(n, labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseEnergy(np.ascontiguousarray(features.T), compat=weight,
                          kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NO_NORMALIZATION)
    oracle = np.array(crf.inference(1), np.float32)
    q0 = np.exp(-unary - (-unary).max(axis=0))
    q0 /= q0.sum(axis=0)
    energy = -unary + weight * PermutohedralLattice(features).filter(q0.T).T
    q1 = np.exp(energy - energy.max(axis=0))
    q1 /= q1.sum(axis=0)
    assert np.abs(q1 - oracle).max() < 5e-6


# ----------------------------------------------------------------------- CRF unary
def test_probability_unary_is_minus_log_prob_down_to_flt_min():
    """prog_refine_pascal's unary is -log(prob) (spec section 20); only values below
    FLT_MIN (which -log cannot take as a float) are clamped."""
    prob = np.array([1.0, 0.5, 1e-12, 1e-20, 1e-30, FLT_MIN], np.float32)
    expected = -np.log(prob.astype(np.float64))
    np.testing.assert_allclose(unary_from_probabilities(prob), expected, rtol=1e-6)


# ------------------------------------------------------------- DenseCRF layer fast_exp
def _crf_layer_log_q(scores):
    """The DenseCRF layer with zero-weight kernels (messages 0) and one step, log Q."""
    labels, height, width = scores.shape
    text = ('type: "DenseCRF" dense_crf_param { max_iter: 1 pos_w: 0 pos_xy_std: 3 '
            'bi_w: 0 bi_xy_std: 50 bi_rgb_std: 10 output_probability: false }')
    layer = make_layer(text, dtype=np.float32)
    dims = np.array([height, width], np.float32).reshape(1, 1, 1, 2)
    data = np.zeros((1, 3, height, width), np.float32)
    bottom, top = setup_layer(layer, [scores[None], dims, data], dtype=np.float32)
    return run_forward(layer, bottom, top)[0][0]


def test_dense_crf_layer_fast_exp_cutoff_is_strictly_below_minus_20():
    """The fork's ``fast_exp`` (util/densecrf_util.hpp): ``x = -x; if (x > 20) return
    0;`` after the row maximum is subtracted, so a label exactly 20 below the best keeps
    e^-20 and one just below that, or 25 below, gets Q = 0 (log output
    log(FLT_MIN))."""
    just_below = np.nextafter(np.float32(-20), np.float32(-21))
    column = np.array([0.0, -20.0, just_below, -25.0], np.float32)
    scores = np.repeat(column[:, None, None], 2, axis=1).repeat(2, axis=2)
    log_q = _crf_layer_log_q(scores)
    total = 1.0 + np.exp(-20.0)
    expected = [-np.log(total), -20.0 - np.log(total), np.log(FLT_MIN), np.log(FLT_MIN)]
    for label, value in enumerate(expected):
        np.testing.assert_allclose(log_q[label], value, rtol=0, atol=1e-4)


# ------------------------------------------------------------------ data transformer
def _image_data_net(tmp_path, image_param="", transform=""):
    import caffelite
    from caffelite.io.prototxt import parse_text
    from caffelite.proto import caffe_pb2
    text = f'''layer {{ name: "data" type: "ImageData" top: "data" top: "label"
      image_data_param {{ source: "{tmp_path / 'list.txt'}" root_folder: "{tmp_path}/"
                         batch_size: 1 {image_param} }}
      transform_param {{ {transform} }} }}'''
    return caffelite.Net(param=parse_text(text, caffe_pb2.NetParameter()),
                         phase=caffelite.TEST)


def _write_colour_png(tmp_path, height=9, width=11, seed=0):
    from PIL import Image
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text("a.png 3\n")
    return str(tmp_path / "a.png")


def test_mean_value_is_subtracted_before_scaling_in_float32(tmp_path):
    """DataTransformer::Transform: ``(pixel - mean_values_[c]) * scale_`` in Dtype
    (float): the difference is rounded before the product, so a scale that is not a
    power of two gives other bits than ``pixel * scale - mean * scale``."""
    cv2 = pytest.importorskip("cv2")
    path = _write_colour_png(tmp_path)
    means = (104.008, 116.669, 122.675)
    net = _image_data_net(tmp_path, transform="scale: 0.017 " + " ".join(
        f"mean_value: {m}" for m in means))
    net.forward()
    pixels = cv2.imread(path, cv2.IMREAD_COLOR).transpose(2, 0, 1).astype(np.float32)
    expected = ((pixels - np.array(means, np.float32)[:, None, None])
                * np.float32(0.017)).astype(np.float32)
    np.testing.assert_array_equal(net.blobs["data"].data[0], expected)


def test_image_data_is_color_false_reads_the_image_as_gray(tmp_path):
    """ImageDataLayer reads with ReadImageToCVMat(..., is_color): is_color false is
    cv::imread(IMREAD_GRAYSCALE), one channel (OpenCV as the oracle)."""
    cv2 = pytest.importorskip("cv2")
    path = _write_colour_png(tmp_path, seed=1)
    net = _image_data_net(tmp_path, image_param="is_color: false")
    net.forward()
    gray = cv2.imread(path, cv2.IMREAD_GRAYSCALE).astype(np.float32)
    assert net.blobs["data"].shape == (1, 1) + gray.shape
    np.testing.assert_array_equal(net.blobs["data"].data[0, 0], gray)


# ----------------------------------------------------------------------------- blobs
def test_legacy_accessors_count_missing_trailing_axes_as_one():
    """Blob::LegacyShape(i) is 1 for i >= num_axes(): a 2 x 3 blob has num 2, channels 3,
    height = width = 1; a blob of shape (5,) has num 5.  (BVLC pycaffe 1.0 prints
    2 3 1 1 and 5 1 1 1 for these Input tops.)"""
    import caffelite
    from caffelite.io.prototxt import parse_text
    from caffelite.proto import caffe_pb2
    text = ('layer { name: "x" type: "Input" top: "x" top: "y" input_param { '
            'shape { dim: 2 dim: 3 } shape { dim: 5 } } }')
    net = caffelite.Net(param=parse_text(text, caffe_pb2.NetParameter()),
                        phase=caffelite.TEST)
    x, y = net.blobs["x"], net.blobs["y"]
    assert (x.num, x.channels, x.height, x.width) == (2, 3, 1, 1)
    assert (y.num, y.channels, y.height, y.width) == (5, 1, 1, 1)


def test_blob_size_check_allows_exactly_int_max_per_axis_product():
    """Blob::Reshape: ``CHECK_LE(shape[i], INT_MAX / count_)``, so an axis may bring the
    product up to INT_MAX itself.  BVLC Caffe 1.0 builds an Input of shape
    (2147483647, 0) (count 0) and refuses (46341, 46341, 0)."""
    from caffelite.blob import Blob, BlobShapeError, checked_shape
    int_max = 2 ** 31 - 1
    blob = Blob((int_max, 0))
    assert blob.shape == (int_max, 0) and blob.count == 0
    assert checked_shape((int_max,)) == ((int_max,), int_max)
    assert checked_shape((1, int_max)) == ((1, int_max), int_max)
    with pytest.raises(BlobShapeError):
        Blob((46341, 46341, 0))


def test_blobs_take_at_most_32_axes():
    """Blob::Reshape: ``CHECK_LE(shape.size(), kMaxBlobAxes)`` with kMaxBlobAxes = 32
    (BVLC Caffe 1.0 builds an Input of 32 axes and stops at 33)."""
    from caffelite.blob import Blob, BlobShapeError
    assert Blob((1,) * 32).num_axes == 32
    with pytest.raises(BlobShapeError):
        Blob((1,) * 33)
    with pytest.raises(BlobShapeError):
        Blob((1,) * 32).reshape((1,) * 33)


def test_share_data_and_diff_need_equal_counts():
    """Blob::ShareData / ShareDiff: ``CHECK_EQ(count_, other.count())``; a blob of
    another shape with the same count may be shared (Flatten, Reshape do so)."""
    from caffelite.blob import Blob
    a, same_count, other = Blob((2, 3)), Blob((6,)), Blob((7,))
    a.share_data(same_count)
    a.share_diff(same_count)
    assert a.shares_data_with(same_count)
    with pytest.raises(ValueError):
        a.share_data(other)
    with pytest.raises(ValueError):
        a.share_diff(other)


# ------------------------------------------------------------------------ solverstate
def _history():
    return [np.arange(6, dtype=np.float32).reshape(2, 3) / 7, np.array([1.5, -2.25], np.float32)]


@pytest.mark.parametrize("field", ["iter", "current_step"])
def test_solverstate_int32_fields_take_int32_max_and_refuse_one_more(field):
    """SolverState.iter and current_step are int32: 2^31 - 1 is written (and the
    protobuf runtime reads it back), 2^31 would read back negative and is refused."""
    from caffelite.io.solverstate import SolverStateError, solverstate_bytes
    from caffelite.proto import caffe_pb2
    values = {"iter": 7, "current_step": 1}
    values[field] = 2 ** 31 - 1
    parsed = caffe_pb2.SolverState.FromString(
        solverstate_bytes(values["iter"], "w.caffemodel", _history(), values["current_step"]))
    assert getattr(parsed, field) == 2 ** 31 - 1
    values[field] = 2 ** 31
    with pytest.raises(SolverStateError):
        solverstate_bytes(values["iter"], "w.caffemodel", _history(), values["current_step"])


def test_hdf5_solverstate_keeps_double_history(tmp_path):
    """A double solver's HDF5 state holds float64 history datasets, which
    RestoreSolverStateFromHDF5 loads into Dtype = double blobs unrounded (file written
    with h5py in Caffe's layout)."""
    h5py = pytest.importorskip("h5py")
    from caffelite.io.solverstate import read_solverstate_hdf5
    values = np.array([[1 / 3, 2 / 3, 1e-300]], np.float64)
    path = tmp_path / "s.solverstate.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("iter", data=np.array([3], np.int32))
        f.create_dataset("current_step", data=np.array([0], np.int32))
        f.create_group("history").create_dataset("0", data=values)
    state = read_solverstate_hdf5(str(path))
    data = np.asarray(state.history[0].data)
    assert data.dtype == np.float64
    np.testing.assert_array_equal(data.reshape(values.shape), values)


# --------------------------------------------------------------------------- solvers
def _axpy_unfused(a, x, y):
    """y + a x with the product rounded to float32 first (a reference BLAS saxpy)."""
    return y + a * x


def _axpy_fused(a, x, y):
    """y + a x rounded once (an FMA saxpy kernel, as OpenBLAS's x86-64 ones are; the
    float32 product is exact in double)."""
    return (np.float64(a) * x.astype(np.float64) + y.astype(np.float64)).astype(np.float32)


def _caffe_rule(kind, g, hist, lr, it, hp, axpy):
    """One ComputeUpdateValue of BVLC's CPU solvers in float32, call by call:
    caffe_cpu_axpby(a, x, b, y) = scal(b, y) then axpy(a, x, y) (``axpy`` fused or
    not, as the BLAS does it), powx(x, 2) = x * x, powx(x, 0.5) = sqrt, caffe_add /
    caffe_div / caffe_mul / caffe_add_scalar elementwise; returns the update (the new
    diff) and the new histories."""
    f = np.float32
    if kind == "Nesterov":
        m = f(hp["momentum"])
        (h,) = hist
        update = h * (-m)
        h = axpy(lr, g, h * m)
        update = axpy(f(f(1) + m), h, update)
        return update, [h]
    if kind == "AdaGrad":
        (h,) = hist
        h = g * g + h
        update = np.sqrt(h) + f(hp["delta"])
        return axpy(lr, g / update, np.zeros_like(g)), [h]
    if kind == "RMSProp":
        d = f(hp["rms_decay"])
        (h,) = hist
        h = axpy(f(f(1) - d), g * g, h * d)
        update = np.sqrt(h) + f(hp["delta"])
        return axpy(lr, g / update, np.zeros_like(g)), [h]
    if kind == "AdaDelta":
        m, delta = f(hp["momentum"]), f(hp["delta"])
        h, u = hist
        h = axpy(f(f(1) - m), g * g, h * m)
        g = g * np.sqrt((delta + u) / (delta + h))
        u = axpy(f(f(1) - m), g * g, u * m)
        return lr * g, [h, u]
    if kind == "Adam":
        b1, b2 = f(hp["momentum"]), f(hp["momentum2"])
        m, v = hist
        t = it + 1      # correction in double (pow(float, int) is double), then Dtype
        correction = f(np.sqrt(1.0 - float(b2) ** t) / (1.0 - float(b1) ** t))
        m = axpy(f(f(1) - b1), g, m * b1)
        v = axpy(f(f(1) - b2), g * g, v * b2)
        update = np.sqrt(v) + f(hp["delta"])
        return f(lr * correction) * (m / update), [m, v]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, hp", [
    ("Nesterov", dict(momentum=0.9)),
    ("AdaGrad", dict(delta=1e-6)),
    ("RMSProp", dict(rms_decay=0.95, delta=1e-6)),
    ("AdaDelta", dict(momentum=0.95, delta=1e-6)),
    ("Adam", dict(momentum=0.9, momentum2=0.999, delta=1e-8)),
])
def test_adaptive_solvers_follow_caffes_float32_operation_order(tmp_path, kind, hp):
    """Three updates bit for bit as BVLC's CPU ComputeUpdateValue computes them (the
    order of its caffe_* calls, each rounded to float32; local_rate = rate * lr_mult
    rounded to float32; Net::Update's data -= diff), with the BLAS axpy either unfused
    or fused: caffelite must reproduce one of the two readings throughout.  (BVLC Caffe
    1.0 with OpenBLAS on x86-64 gives the fused one bit for bit; caffelite, like its
    SGD, the unfused one.)"""
    from test_solver import ip_net, make_solver, solver_text
    s = make_solver(tmp_path, solver_text(kind, dict(hp, policy="fixed", base_lr=0.01)),
                    ip_net(w_lr=10, w_decay=0, b_lr=20, b_decay=0))
    f = np.float32
    params = s.net.learnable_params
    per = len(params)
    rng = np.random.default_rng(21)
    models = {axpy: ([p.blob.data.copy() for p in params], [h.copy() for h in s.history])
              for axpy in (_axpy_unfused, _axpy_fused)}
    matches = dict.fromkeys(models, True)
    for step in range(3):
        grads = [rng.normal(size=p.blob.shape).astype(np.float32) for p in params]
        for p, g in zip(params, grads):
            p.blob.diff[...] = g
        it = s.iter
        s.apply_update()
        for axpy, (weights, hist) in models.items():
            new_hist = list(hist)
            for i, (g, lr_mult) in enumerate(zip(grads, (10, 20))):
                update, rule_hist = _caffe_rule(kind, g, hist[i::per],
                                                f(f(0.01) * f(lr_mult)), it, hp, axpy)
                assert update.dtype == np.float32
                weights[i] = weights[i] - update
                new_hist[i::per] = rule_hist
                matches[axpy] &= np.array_equal(params[i].blob.data, weights[i])
                matches[axpy] &= all(np.array_equal(got, want) for got, want
                                     in zip(s.history[i::per], rule_hist))
            hist[:] = new_hist
    assert any(matches.values()), f"{kind}: neither the unfused nor the fused reading"
