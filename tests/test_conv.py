"""Convolution and Deconvolution: OpenCV (Caffe importer) forward parity, a direct-sum
reference written from the spec formula, torch as a second oracle, Caffe's gradient
checker, band chunking of the column buffer, and Caffe's parameter checks."""
import tracemalloc

import numpy as np
import pytest

import caffelite.layers.im2col as im2col_mod
from caffelite.layer import LayerError
from layer_testing import (blobs_from, check_gradient, make_layer, opencv_forward,
                           run_forward, setup_layer)

F32 = np.float32


# ------------------------------------------------------------------- references
def ref_conv(x, w, b, stride, pad, dil, group):
    """y[n,o,i,j] = b[o] + sum_{c in group(o),u,v} W[o,c',u,v] x[n,c,i*s-p+u*d, j*s-p+v*d]
    with zero padding (spec section 7), summed tap by tap in float64."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dil
    ho = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    wo = (wd + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    xp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw))
    xp[:, :, ph:ph + h, pw:pw + wd] = x
    y = np.zeros((n, o, ho, wo))
    og = o // group
    for g in range(group):
        for u in range(kh):
            for v in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg,
                           u * dh:u * dh + (ho - 1) * sh + 1:sh,
                           v * dw:v * dw + (wo - 1) * sw + 1:sw]
                y[:, g * og:(g + 1) * og] += np.einsum(
                    "oc,nchw->nohw", w[g * og:(g + 1) * og, :, u, v], patch)
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y


def ref_deconv(x, w, b, stride, pad, dil, group):
    """Transposed convolution by scattering: every input pixel (i, j) adds
    x * W[c, o', u, v] at output (i*s - p + u*d, j*s - p + v*d); weights (C, O/g, kh, kw)."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    n, c, h, wd = x.shape
    _, og, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dil
    ho = sh * (h - 1) + dh * (kh - 1) + 1 - 2 * ph
    wo = sw * (wd - 1) + dw * (kw - 1) + 1 - 2 * pw
    full = np.zeros((n, og * group, sh * (h - 1) + dh * (kh - 1) + 1,
                     sw * (wd - 1) + dw * (kw - 1) + 1))
    cg = c // group
    for g in range(group):
        for u in range(kh):
            for v in range(kw):
                contrib = np.einsum("co,nchw->nohw",
                                    w[g * cg:(g + 1) * cg, :, u, v], x[:, g * cg:(g + 1) * cg])
                full[:, g * og:(g + 1) * og,
                     u * dh:u * dh + (h - 1) * sh + 1:sh,
                     v * dw:v * dw + (wd - 1) * sw + 1:sw] += contrib
    y = full[:, :, ph:ph + ho, pw:pw + wo]
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1)
    return y


def conv_layer(kind, param, dtype=np.float64):
    return make_layer(f'type: "{kind}" convolution_param {{ {param} }}', dtype=dtype)


def randomize(layer, rng):
    for blob in layer.blobs:
        blob.data[...] = rng.standard_normal(blob.shape)


def opencv_single(kind, param, x, weights):
    dims = " ".join(f"input_dim: {d}" for d in x.shape)
    net = (f'name: "t"\ninput: "data" {dims}\n'
           f'layer {{ name: "out" type: "{kind}" bottom: "data" top: "out" '
           f'convolution_param {{ {param} }} }}\n')
    return opencv_forward(net, [("out", kind, weights)], {"data": x}, ["out"])[0]


def assert_close_f32(ours, ref):
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(ref).max()))


# ------------------------------------------------------- forward vs OpenCV (float32)
# (param text, bottom shape, stride, pad, dilation, group, bias)
CONV_CASES = [
    ("num_output: 5 kernel_size: 3 pad: 1", (2, 3, 9, 8), (1, 1), (1, 1), (1, 1), 1, True),
    ("num_output: 4 kernel_size: 3 pad: 2 dilation: 2",
     (1, 3, 11, 10), (1, 1), (2, 2), (2, 2), 1, True),
    ("num_output: 4 kernel_size: 3 pad: 4 dilation: 4",
     (2, 2, 13, 12), (1, 1), (4, 4), (4, 4), 1, True),
    ("num_output: 4 kernel_size: 3 pad: 1 dilation: 4",
     (1, 2, 13, 14), (1, 1), (1, 1), (4, 4), 1, True),
    ("num_output: 6 kernel_size: 3 pad: 1 stride: 2",
     (2, 4, 11, 8), (2, 2), (1, 1), (1, 1), 1, True),
    ("num_output: 6 kernel_size: 3 pad: 1 group: 2", (1, 4, 7, 9), (1, 1), (1, 1), (1, 1), 2, True),
    ("num_output: 6 kernel_size: 3 pad: 1 group: 6", (2, 6, 8, 7), (1, 1), (1, 1), (1, 1), 6, True),
    ("num_output: 5 kernel_size: 3 bias_term: false",
     (1, 3, 8, 8), (1, 1), (0, 0), (1, 1), 1, False),
    ("num_output: 4 kernel_h: 3 kernel_w: 5 pad_h: 1 pad_w: 2",
     (1, 3, 9, 11), (1, 1), (1, 2), (1, 1), 1, True),
    ("num_output: 4 kernel_h: 2 kernel_w: 3 pad_h: 0 pad_w: 3 stride_h: 2 stride_w: 3",
     (2, 2, 9, 10), (2, 3), (0, 3), (1, 1), 1, True),
    ("num_output: 4 kernel_size: 3 kernel_size: 2 pad: 3 pad: 1 dilation: 3 dilation: 2",
     (1, 2, 10, 9), (1, 1), (3, 1), (3, 2), 1, True),
    ("num_output: 7 kernel_size: 1", (2, 5, 6, 7), (1, 1), (0, 0), (1, 1), 1, True),
    ("num_output: 6 kernel_size: 1 group: 3", (1, 6, 5, 4), (1, 1), (0, 0), (1, 1), 3, True),
    ("num_output: 3 kernel_size: 1 stride: 2 pad: 1",
     (1, 4, 7, 6), (2, 2), (1, 1), (1, 1), 1, True),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_convolution_forward_matches_opencv(case):
    param, shape, stride, pad, dil, group, bias = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(F32)
    layer = conv_layer("Convolution", param, F32)
    bottom, top = setup_layer(layer, [x], dtype=F32)
    randomize(layer, rng)
    ours = run_forward(layer, bottom, top)[0]
    assert ours.dtype == F32
    w = layer.blobs[0].data
    b = layer.blobs[1].data if bias else None
    np.testing.assert_allclose(ours, ref_conv(x, w, b, stride, pad, dil, group),
                               rtol=1e-5, atol=1e-4)
    weights = [w] + ([b] if bias else [])
    assert_close_f32(ours, opencv_single("Convolution", param, x, weights))


# (param text, bottom shape, stride, pad, dilation, group)
DECONV_CASES = [
    ("num_output: 4 kernel_size: 2 stride: 2", (2, 3, 5, 6), (2, 2), (0, 0), (1, 1), 1),
    ("num_output: 1 kernel_size: 9 stride: 3 pad: 4", (1, 3, 6, 5), (3, 3), (4, 4), (1, 1), 1),
    ("num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2",
     (2, 4, 5, 7), (2, 2), (1, 1), (1, 1), 2),
    ("num_output: 4 kernel_size: 4 stride: 2 pad: 1 group: 4",
     (1, 4, 6, 5), (2, 2), (1, 1), (1, 1), 4),
    ("num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 0",
     (1, 2, 5, 6), (1, 2), (1, 0), (1, 1), 1),
    ("num_output: 5 kernel_size: 1", (2, 3, 4, 5), (1, 1), (0, 0), (1, 1), 1),
]


@pytest.mark.parametrize("case", DECONV_CASES, ids=[c[0] for c in DECONV_CASES])
def test_deconvolution_forward_matches_opencv(case):
    param, shape, stride, pad, dil, group = case
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(F32)
    layer = conv_layer("Deconvolution", param, F32)
    bottom, top = setup_layer(layer, [x], dtype=F32)
    assert layer.blobs[0].shape[:2] == (shape[1], layer.num_output // group)
    randomize(layer, rng)
    ours = run_forward(layer, bottom, top)[0]
    w, b = layer.blobs[0].data, layer.blobs[1].data
    np.testing.assert_allclose(ours, ref_deconv(x, w, b, stride, pad, dil, group),
                               rtol=1e-5, atol=1e-4)
    assert_close_f32(ours, opencv_single("Deconvolution", param, x, [w, b]))


def test_deconvolution_with_dilation_matches_reference():
    # OpenCV's importer ignores dilation for Deconvolution, so only the scatter reference
    # (and torch below) are oracles here.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 5, 4)).astype(F32)
    layer = conv_layer("Deconvolution",
                       "num_output: 6 kernel_size: 3 stride: 2 pad: 1 dilation: 2 group: 2", F32)
    bottom, top = setup_layer(layer, [x], dtype=F32)
    randomize(layer, rng)
    ours = run_forward(layer, bottom, top)[0]
    assert ours.shape == (2, 6, 2 * 4 + 5 - 2, 2 * 3 + 5 - 2)
    ref = ref_deconv(x, layer.blobs[0].data, layer.blobs[1].data, (2, 2), (1, 1), (2, 2), 2)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)


def test_output_shapes_follow_caffe_formulas():
    x = np.zeros((1, 2, 41, 40))
    for param, expected in [
        ("num_output: 3 kernel_size: 3 pad: 12 dilation: 12", (41, 40)),
        ("num_output: 3 kernel_size: 4 pad: 6 dilation: 4", (41 + 12 - 13 + 1, 40 + 12 - 13 + 1)),
        ("num_output: 3 kernel_size: 3 stride: 2", ((41 - 3) // 2 + 1, (40 - 3) // 2 + 1)),
        ("num_output: 3 kernel_size: 7 stride: 2 pad: 3", (21, 20)),
    ]:
        layer = conv_layer("Convolution", param)
        _, top = setup_layer(layer, [x])
        assert top[0].shape == (1, 3) + expected, param
    layer = conv_layer("Deconvolution", "num_output: 3 kernel_size: 16 stride: 8 pad: 4")
    _, top = setup_layer(layer, [x])
    assert top[0].shape == (1, 3, 8 * 40 + 16 - 8, 8 * 39 + 16 - 8)


def test_output_size_truncates_a_negative_numerator_toward_zero():
    # base_conv_layer.cpp's compute_output_shape is C int division: (2 + 0 - 3) / 2 + 1
    # = 0 + 1 = 1 (Python's floor would give 0). The single window starts at (0, 0) and
    # its out-of-image taps read zeros (im2col), so y = sum of the 2x2 input.
    layer = conv_layer("Convolution", "num_output: 1 kernel_size: 3 stride: 2 "
                       'weight_filler { type: "constant" value: 1 }')
    x = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    bottom, top = setup_layer(layer, [x])
    assert top[0].shape == (1, 1, 1, 1)
    assert run_forward(layer, bottom, top)[0].item() == 10.0
    top[0].diff[...] = 1.0
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, np.ones((1, 1, 2, 2)))
    np.testing.assert_array_equal(layer.blobs[0].diff[0, 0],
                                  [[1, 2, 0], [3, 4, 0], [0, 0, 0]])


def test_bilinear_deconvolution_upsamples_constant_map():
    # DeepLab/FCN-style x2 upsampling: k4 s2 p1, group = C, bilinear filler. Away from the
    # border every output pixel gets weights summing to 1, so a constant map stays constant.
    layer = conv_layer("Deconvolution", "num_output: 3 group: 3 kernel_size: 4 stride: 2 pad: 1 "
                       'bias_term: false weight_filler { type: "bilinear" }', F32)
    x = np.full((1, 3, 6, 6), 2.5, F32)
    bottom, top = setup_layer(layer, [x], dtype=F32)
    y = run_forward(layer, bottom, top)[0]
    assert y.shape == (1, 3, 12, 12)
    np.testing.assert_allclose(y[:, :, 1:-1, 1:-1], 2.5, rtol=1e-6)
    np.testing.assert_allclose(y[:, :, 0, 1:-1], 2.5 * 0.75, rtol=1e-6)


def test_multiple_bottoms_share_weights():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 1, 3, 6, 5))
    layer = make_layer('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 '
                       'pad: 1 }')
    bottom, top = setup_layer(layer, [a, b], num_top=2)
    randomize(layer, rng)
    ya, yb = run_forward(layer, bottom, top)
    w, bias = layer.blobs[0].data, layer.blobs[1].data
    np.testing.assert_allclose(ya, ref_conv(a, w, bias, (1, 1), (1, 1), (1, 1), 1), atol=1e-12)
    np.testing.assert_allclose(yb, ref_conv(b, w, bias, (1, 1), (1, 1), (1, 1), 1), atol=1e-12)


# ------------------------------------------------------------- torch as second oracle
def test_torch_parity_conv2d_and_conv_transpose2d():
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 6, 13, 11))
    conv = conv_layer("Convolution", "num_output: 4 kernel_size: 3 stride: 2 pad: 3 dilation: 3 "
                      "group: 2")
    bottom, top = setup_layer(conv, [x])
    randomize(conv, rng)
    y = run_forward(conv, bottom, top)[0]
    ref = tf.conv2d(torch.tensor(x), torch.tensor(conv.blobs[0].data),
                    torch.tensor(conv.blobs[1].data), stride=2, padding=3, dilation=3, groups=2)
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-10, atol=1e-10)

    deconv = conv_layer("Deconvolution", "num_output: 4 kernel_h: 3 kernel_w: 4 stride_h: 2 "
                        "stride_w: 3 pad_h: 1 pad_w: 2 dilation: 2 group: 2")
    bottom, top = setup_layer(deconv, [x])
    randomize(deconv, rng)
    y = run_forward(deconv, bottom, top)[0]
    ref = tf.conv_transpose2d(torch.tensor(x), torch.tensor(deconv.blobs[0].data),
                              torch.tensor(deconv.blobs[1].data), stride=(2, 3),
                              padding=(1, 2), dilation=2, groups=2)
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-10, atol=1e-10)


def test_torch_parity_3d_convolution():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 2, 5, 6, 7))
    layer = conv_layer("Convolution", "num_output: 3 kernel_size: 3 kernel_size: 2 kernel_size: 3 "
                       "stride: 1 stride: 2 stride: 1 pad: 1 pad: 0 pad: 2 dilation: 1 "
                       "dilation: 1 dilation: 2")
    bottom, top = setup_layer(layer, [x])
    randomize(layer, rng)
    y = run_forward(layer, bottom, top)[0]
    ref = torch.nn.functional.conv3d(torch.tensor(x), torch.tensor(layer.blobs[0].data),
                                     torch.tensor(layer.blobs[1].data), stride=(1, 2, 1),
                                     padding=(1, 0, 2), dilation=(1, 1, 2))
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-10, atol=1e-10)


def test_axis_param_moves_the_channel_axis():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 4, 7, 6))            # outer axes (2, 3), channels 4
    layer = conv_layer("Convolution", "num_output: 5 kernel_size: 3 pad: 1 axis: 2")
    bottom, top = setup_layer(layer, [x])
    randomize(layer, rng)
    y = run_forward(layer, bottom, top)[0]
    assert y.shape == (2, 3, 5, 7, 6)
    ref = ref_conv(x.reshape(6, 4, 7, 6), layer.blobs[0].data, layer.blobs[1].data,
                   (1, 1), (1, 1), (1, 1), 1)
    np.testing.assert_allclose(y.reshape(6, 5, 7, 6), ref, atol=1e-12)


# ------------------------------------------------------------------- gradients (float64)
GRAD_CASES = [
    ("Convolution", "num_output: 3 kernel_size: 3 pad: 1", (2, 2, 5, 4)),
    ("Convolution", "num_output: 2 kernel_size: 3 pad: 2 dilation: 2", (1, 3, 6, 5)),
    ("Convolution", "num_output: 2 kernel_size: 3 pad: 1 dilation: 4", (1, 2, 9, 8)),
    ("Convolution", "num_output: 3 kernel_size: 3 stride: 2 pad: 1", (2, 2, 7, 6)),
    ("Convolution", "num_output: 4 kernel_size: 2 group: 2 stride: 2", (1, 4, 5, 6)),
    ("Convolution", "num_output: 3 kernel_size: 3 group: 3 pad: 1", (1, 3, 4, 5)),
    ("Convolution",
     "num_output: 2 kernel_h: 3 kernel_w: 2 pad_h: 2 pad_w: 1 stride_h: 2 stride_w: 1",
     (1, 2, 6, 5)),
    ("Convolution", "num_output: 3 kernel_size: 1 bias_term: false", (2, 4, 3, 3)),
    ("Convolution", "num_output: 4 kernel_size: 1 group: 2 stride: 2 pad: 1", (1, 4, 4, 3)),
    ("Convolution", "num_output: 2 kernel_size: 2 kernel_size: 3 kernel_size: 2 pad: 1",
     (1, 2, 3, 4, 3)),
    ("Deconvolution", "num_output: 3 kernel_size: 3 stride: 2 pad: 1", (2, 2, 3, 4)),
    ("Deconvolution", "num_output: 2 kernel_size: 2 stride: 2", (1, 3, 3, 3)),
    ("Deconvolution", "num_output: 4 kernel_size: 3 stride: 2 dilation: 2 pad: 2 group: 2",
     (1, 2, 3, 4)),
    ("Deconvolution",
     "num_output: 2 kernel_h: 3 kernel_w: 1 stride_h: 1 stride_w: 2 pad_h: 1 bias_term: false",
     (1, 2, 4, 3)),
    ("Deconvolution", "num_output: 3 kernel_size: 1", (2, 2, 3, 3)),
]


@pytest.mark.parametrize("kind,param,shape", GRAD_CASES, ids=[f"{k}-{p}" for k, p, _ in GRAD_CASES])
def test_gradient(kind, param, shape):
    rng = np.random.default_rng(7)
    layer = conv_layer(kind, param)
    bottom, top = setup_layer(layer, [rng.standard_normal(shape)])
    randomize(layer, rng)
    check_gradient(layer, bottom, top, step=1e-3)


def test_gradient_with_two_bottoms_accumulates_shared_weights():
    rng = np.random.default_rng(8)
    layer = conv_layer("Convolution", "num_output: 2 kernel_size: 3 pad: 1 stride: 2")
    bottom, top = setup_layer(layer, list(rng.standard_normal((2, 1, 2, 5, 4))), num_top=2)
    randomize(layer, rng)
    check_gradient(layer, bottom, top)


def test_param_diffs_accumulate_and_bottom_diff_is_overwritten():
    rng = np.random.default_rng(9)
    layer = conv_layer("Convolution", "num_output: 2 kernel_size: 3 pad: 1")
    bottom, top = setup_layer(layer, [rng.standard_normal((1, 2, 4, 4))])
    randomize(layer, rng)
    run_forward(layer, bottom, top)
    top[0].diff[...] = rng.standard_normal(top[0].shape)
    bottom[0].diff[...] = 123.0
    for blob in layer.blobs:
        blob.diff[...] = 0
    layer.backward(top, [True], bottom)
    once = [b.diff.copy() for b in layer.blobs]
    first_bottom = bottom[0].diff.copy()
    layer.backward(top, [True], bottom)
    for blob, g in zip(layer.blobs, once):
        np.testing.assert_allclose(blob.diff, 2 * g)
    np.testing.assert_allclose(bottom[0].diff, first_bottom)
    # propagate_down False leaves the bottom diff alone.
    bottom[0].diff[...] = 7.0
    layer.backward(top, [False], bottom)
    assert np.all(bottom[0].diff == 7.0)


# ----------------------------------------------------------- chunked column buffer
def both_passes(layer, bottom, top, dy, param_diffs):
    """Forward (top poisoned) and backward of ``dy`` (bottom diff poisoned, parameter
    diffs starting from ``param_diffs``): [top, bottom diff, parameter diffs...]."""
    y = run_forward(layer, bottom, top)[0]
    top[0].diff[...] = dy
    bottom[0].diff[...] = np.nan
    for blob, d in zip(layer.blobs, param_diffs):
        blob.diff[...] = d
    layer.backward(top, [True], bottom)
    return [y, bottom[0].diff.copy()] + [b.diff.copy() for b in layer.blobs]


@pytest.mark.parametrize("kind,param,shape", [
    ("Convolution", "num_output: 3 kernel_size: 3 pad: 2 dilation: 2 stride: 2 group: 1",
     (2, 2, 9, 7)),
    ("Convolution", "num_output: 4 kernel_size: 3 pad: 1 group: 2", (1, 4, 7, 5)),
    ("Deconvolution", "num_output: 2 kernel_size: 4 stride: 2 pad: 1", (1, 3, 5, 4)),
])
def test_row_bands_agree_with_one_band(kind, param, shape, monkeypatch):
    rng = np.random.default_rng(10)
    x = rng.standard_normal(shape)
    layer = conv_layer(kind, param)
    bottom, top = setup_layer(layer, [x])
    randomize(layer, rng)
    dy = rng.standard_normal(top[0].shape)
    zeros = [np.zeros(b.shape) for b in layer.blobs]

    whole = both_passes(layer, bottom, top, dy, zeros)
    monkeypatch.setattr(im2col_mod, "COL_BUFFER_BYTES", 1)     # one grid row per band
    banded = both_passes(layer, bottom, top, dy, zeros)
    for a, b in zip(whole, banded):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, equal_nan=False)
    check_gradient(layer, bottom, top)


IMAGE_RUN_CASES = [
    ("Convolution", "num_output: 5 kernel_size: 5", (7, 1, 12, 11)),
    ("Convolution", "num_output: 3 kernel_size: 3 pad: 2 dilation: 2 stride: 2", (5, 2, 9, 7)),
    ("Convolution", "num_output: 4 kernel_size: 3 pad: 1 group: 2", (6, 4, 7, 5)),
    ("Convolution", "num_output: 3 kernel_size: 1 stride: 2 pad: 1", (4, 3, 5, 6)),
    ("Convolution", "num_output: 2 kernel_size: 2 kernel_size: 3 kernel_size: 2 pad: 1",
     (3, 2, 3, 4, 3)),
    ("Deconvolution", "num_output: 2 kernel_size: 4 stride: 2 pad: 1", (5, 3, 5, 4)),
    ("Deconvolution", "num_output: 4 kernel_size: 3 stride: 2 group: 2", (3, 2, 3, 4)),
]


@pytest.mark.parametrize("dtype", [np.float64, F32])
@pytest.mark.parametrize("kind,param,shape", IMAGE_RUN_CASES,
                         ids=[f"{k}-{p}" for k, p, _ in IMAGE_RUN_CASES])
def test_host_image_runs_give_the_per_image_bits(kind, param, shape, dtype, monkeypatch):
    """Several small images per column buffer (one tap slice for all of them) must give
    exactly what one image at a time gives: the same columns and the same per-image
    GEMMs, in order. Runs of every length, a remainder included, and one image at a
    time are compared; outputs and bottom diffs start poisoned, param diffs nonzero."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal(shape).astype(dtype)
    layer = conv_layer(kind, param, dtype)
    bottom, top = setup_layer(layer, [x], dtype=dtype)
    randomize(layer, rng)
    dy = rng.standard_normal(top[0].shape).astype(dtype)
    start_diffs = [rng.standard_normal(b.shape).astype(dtype) for b in layer.blobs]
    # The columns: image channels x taps x grid positions (Deconvolution swaps roles).
    image, grid = (bottom[0], top[0]) if kind == "Convolution" else (top[0], bottom[0])
    col_bytes = (image.shape[1] * layer.geom.taps * int(np.prod(grid.shape[2:]))
                 * np.dtype(dtype).itemsize)

    def run():
        return both_passes(layer, bottom, top, dy, start_diffs)

    monkeypatch.setattr(im2col_mod, "HOST_IMAGE_RUNS", False)
    one_at_a_time = run()
    monkeypatch.setattr(im2col_mod, "HOST_IMAGE_RUNS", True)
    runs_seen = set()
    real_runs = im2col_mod._host_image_runs

    def noting_runs(*args):
        runs = real_runs(*args)
        runs_seen.add(tuple(runs) if runs else None)
        return runs

    monkeypatch.setattr(im2col_mod, "_host_image_runs", noting_runs)
    for images_per_run in (2, 3, shape[0]):
        monkeypatch.setattr(im2col_mod, "COL_BUFFER_BYTES", images_per_run * col_bytes)
        for a, b in zip(one_at_a_time, run()):
            assert not np.isnan(b).any()
            np.testing.assert_array_equal(a, b)
    assert len([r for r in runs_seen if r]) >= 2, runs_seen


def test_513_float32_conv_stays_within_column_budget():
    # A full-size DeepLab map: the unbanded column matrix would be 16*9*513*513*4 = 152 MB;
    # banding keeps the extra memory near COL_BUFFER_BYTES.
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1, 16, 513, 513), dtype=F32)
    layer = conv_layer("Convolution", "num_output: 16 kernel_size: 3 pad: 2 dilation: 2", F32)
    bottom, top = setup_layer(layer, [x], dtype=F32)
    randomize(layer, rng)
    geom, grid = layer.geom, top[0].shape[2:]
    assert im2col_mod.rows_per_chunk(16, geom, grid, 4) < 513 // 2   # several bands
    im2col_mod.release_workspace()
    for blob in (top[0], bottom[0]):   # blob memory is allocated on first use: not workspace
        blob.data, blob.diff
    tracemalloc.start()
    layer.forward(bottom, top)
    top[0].diff[...] = top[0].data
    layer.backward(top, [True], bottom)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2 * im2col_mod.COL_BUFFER_BYTES + (8 << 20), peak
    y = top[0].data
    assert y.dtype == F32 and bottom[0].diff.dtype == F32
    # A crop computed on its own (one band) must match the banded full-size result.
    crop = x[:, :, 200:240, 100:150]
    small = conv_layer("Convolution", "num_output: 16 kernel_size: 3 pad: 0 dilation: 2", F32)
    sb, st = setup_layer(small, [crop], dtype=F32)
    small.blobs[0].data[...] = layer.blobs[0].data
    small.blobs[1].data[...] = layer.blobs[1].data
    ys = run_forward(small, sb, st)[0]
    np.testing.assert_allclose(y[:, :, 202:238, 102:148], ys, rtol=1e-5, atol=1e-4)
    ref = ref_conv(x[:, :, :40, :30], layer.blobs[0].data, layer.blobs[1].data,
                   (1, 1), (2, 2), (2, 2), 1)
    np.testing.assert_allclose(y[:, :, :36, :26], ref[:, :, :36, :26], rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kind,param,shape,needle", [
    ("Convolution", "num_output: 2", (1, 2, 5, 5), "kernel_size must be specified"),
    ("Convolution", "num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 2, 5, 5),
     "either kernel_size or kernel_h"),
    ("Convolution", "num_output: 2 kernel_h: 3", (1, 2, 5, 5), "nonzero"),
    ("Convolution", "num_output: 2 kernel_size: 0", (1, 2, 5, 5), "nonzero"),
    ("Convolution", "num_output: 2 kernel_size: 3 stride: 0", (1, 2, 5, 5), "stride"),
    ("Convolution", "num_output: 2 kernel_size: 3 stride_h: 0 stride_w: 1", (1, 2, 5, 5), "stride"),
    ("Convolution", "num_output: 2 kernel_size: 3 stride_h: 2", (1, 2, 5, 5), "stride_w"),
    ("Convolution", "num_output: 2 kernel_size: 3 pad: 1 pad: 1 pad: 1", (1, 2, 5, 5),
     "pad must be specified once"),
    ("Convolution", "num_output: 2 kernel_size: 3 pad: 1 pad_h: 1", (1, 2, 5, 5),
     "either pad or pad_h"),
    ("Convolution", "num_output: 2 kernel_size: 3 dilation: 1 dilation: 2 dilation: 3",
     (1, 2, 5, 5), "dilation must be specified once"),
    ("Convolution", "num_output: 2 kernel_size: 3 dilation: 0", (1, 2, 5, 5), "dilation"),
    ("Convolution", "kernel_size: 3", (1, 2, 5, 5), "num_output"),
    ("Convolution", "num_output: 2 kernel_size: 3 group: 2", (1, 3, 5, 5), "divisible by group"),
    ("Convolution", "num_output: 3 kernel_size: 3 group: 2", (1, 4, 5, 5), "multiple of group"),
    ("Convolution", "num_output: 2 kernel_size: 7", (1, 2, 5, 5), "output spatial shape"),
    ("Convolution", "num_output: 2 kernel_size: 3 dilation: 3",
     (1, 2, 6, 6), "output spatial shape"),
    ("Convolution", "num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 2, 5, 5, 5),
     "2-D"),
    ("Convolution", "num_output: 2 kernel_size: 3 axis: 4", (1, 2, 5, 5), "axis"),
    ("Convolution", "num_output: 2 kernel_size: 3 dilation: 2 engine: CUDNN", (1, 2, 9, 9),
     "CUDNN"),
    ("Convolution", 'num_output: 2 kernel_size: 3 weight_filler { type: "nonsense" }',
     (1, 2, 5, 5), "unknown filler"),
    ("Deconvolution", "num_output: 2 kernel_size: 3 pad: 3", (1, 2, 2, 2), "output spatial shape"),
    ("Deconvolution", "num_output: 3 kernel_size: 2 group: 2", (1, 4, 3, 3), "multiple of group"),
])
def test_bad_params_raise_clear_errors(kind, param, shape, needle):
    layer = conv_layer(kind, param)
    with pytest.raises(LayerError, match=f"(?i){needle}"):
        setup_layer(layer, [np.zeros(shape)])


def test_reshape_rejects_channel_change_and_loaded_weights_of_wrong_shape():
    layer = conv_layer("Convolution", "num_output: 2 kernel_size: 3")
    bottom, top = setup_layer(layer, [np.zeros((1, 3, 5, 5))])
    with pytest.raises(LayerError, match="channels"):
        layer.reshape(blobs_from([np.zeros((1, 4, 5, 5))]), top)
    with pytest.raises(LayerError, match="same shape"):
        other = conv_layer("Convolution", "num_output: 2 kernel_size: 3")
        setup_layer(other, [np.zeros((1, 3, 5, 5)), np.zeros((1, 3, 6, 5))], num_top=2)

    shared = conv_layer("Convolution", "num_output: 2 kernel_size: 3")
    shared.new_param_blob((2, 3, 3, 3))
    shared.new_param_blob((3,))
    with pytest.raises(LayerError, match="incorrect bias shape"):
        setup_layer(shared, [np.zeros((1, 3, 5, 5))])
    deconv = conv_layer("Deconvolution", "num_output: 2 kernel_size: 3 bias_term: false")
    deconv.new_param_blob((2, 3, 3, 3))        # conv layout; deconv wants (C, O, k, k)
    with pytest.raises(LayerError, match="incorrect weight shape"):
        setup_layer(deconv, [np.zeros((1, 3, 5, 5))])


def test_default_fillers_are_constant_zero_and_blob_order_is_weight_then_bias():
    layer = conv_layer("Convolution", "num_output: 4 kernel_size: 3 group: 2", F32)
    setup_layer(layer, [np.ones((1, 6, 5, 5), F32)], dtype=F32)
    assert [b.shape for b in layer.blobs] == [(4, 3, 3, 3), (4,)]
    assert all(b.dtype == F32 and not b.data.any() for b in layer.blobs)
    layer = conv_layer("Deconvolution", "num_output: 4 kernel_size: 3 group: 2 bias_term: false")
    setup_layer(layer, [np.ones((1, 6, 5, 5))])
    assert [b.shape for b in layer.blobs] == [(6, 2, 3, 3)]


def test_dilated_deconvolution_ignores_engine_cudnn():
    # The fork's layer factory refuses CUDNN with dilation for Convolution only;
    # Deconvolution is registered without engines, so engine: CUDNN changes nothing.
    geometry = "num_output: 3 kernel_size: 3 pad: 1 stride: 2 dilation: 2"
    rng = np.random.default_rng(41)
    x = rng.standard_normal((2, 2, 5, 4))
    dy = None
    results = []
    for engine in ("CAFFE", "CUDNN"):
        layer = conv_layer("Deconvolution", f"{geometry} engine: {engine}")
        bottom, top = setup_layer(layer, [x])
        randomize(layer, np.random.default_rng(42))
        y = run_forward(layer, bottom, top)[0]
        if dy is None:
            dy = rng.standard_normal(y.shape)
        top[0].diff[...] = dy
        for blob in layer.blobs:
            blob.diff[...] = 0
        layer.backward(top, [True], bottom)
        results.append([y, bottom[0].diff.copy()] + [b.diff.copy() for b in layer.blobs])
    for caffe, cudnn in zip(*results):
        np.testing.assert_array_equal(cudnn, caffe)
    with pytest.raises(LayerError, match="CUDNN"):
        setup_layer(conv_layer("Convolution", f"{geometry} engine: CUDNN"), [x])
