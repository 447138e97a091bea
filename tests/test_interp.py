"""Interp (DeepLab bilinear resize) and DeepLab v1 Padding.

Oracles: OpenCV's Caffe importer implements "Interp" only for zoom_factor and
height+width (it ignores shrink_factor and pad_beg/pad_end: shrink 2 gives an empty
output, shrink 4 + zoom 3 on 9x9 gives 25x25 instead of Caffe's 7x7, pads leave the
size uncropped), so it is used for those two rules only; torch
``F.interpolate(mode="bilinear", align_corners=True)`` on the cropped map covers every
rule; the DeepLab cases of the spec are checked exactly by hand.
"""
import numpy as np
import pytest

from caffelite.layer import LayerError
from caffelite.proto import caffe_pb2
from layer_testing import make_layer, setup_layer, run_forward, check_gradient, opencv_forward


def interp_text(body):
    return f'type: "Interp" interp_param {{ {body} }}'


def ours(body, arrays, dtype=np.float32):
    layer = make_layer(interp_text(body), dtype=dtype)
    bottom, top = setup_layer(layer, arrays, dtype=dtype)
    return run_forward(layer, bottom, top)[0]


def ramp(h, w, n=1, c=2):
    """x[n, c, r, q] = 1000*c + 10*r + q/8: bilinear reproduces it exactly."""
    r = np.arange(h).reshape(-1, 1) * 10.0
    q = np.arange(w).reshape(1, -1) / 8.0
    plane = r + q
    return np.stack([np.stack([plane + 1000 * k for k in range(c)])] * n).astype(np.float32)


def torch_resize(x, size):
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(np.ascontiguousarray(x))
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear",
                                           align_corners=True).numpy()


# ------------------------------------------------------------------ output sizes / rules
@pytest.mark.parametrize("body,h_in,h_out", [
    ("shrink_factor: 8", 321, 41),                    # label_shrink
    ("shrink_factor: 8", 513, 65),
    ("shrink_factor: 16", 321, 21),                   # label_shrink16
    ("shrink_factor: 2", 321, 161),                   # data_res05
    ("shrink_factor: 2", 513, 257),
    ("shrink_factor: 4 zoom_factor: 3", 321, 241),    # data_res075: 321 -> 81 -> 241
    ("shrink_factor: 4 zoom_factor: 3", 513, 385),
    ("zoom_factor: 4 shrink_factor: 3", 31, 41),      # fc1_res075_interp: 31 -> 11 -> 41
    ("zoom_factor: 4 shrink_factor: 3", 49, 65),
    ("zoom_factor: 2", 21, 41),
    ("zoom_factor: 2", 33, 65),
    ("zoom_factor: 8", 41, 321),
    ("zoom_factor: 8", 65, 513),
    ("shrink_factor: 8 pad_beg: -1", 306, 39),        # V1 label_shrink
    ("height: 7 width: 7", 50, 7),
    ("zoom_factor: 1", 9, 9),                         # written factor 1 counts
    ("shrink_factor: 3 height: 5 width: 5", 10, 4),   # rule 1 beats height/width
    ("shrink_factor: 3 zoom_factor: 2 height: 5 width: 5", 10, 5),  # rule 3 beats 4
    ("zoom_factor: 1 pad_beg: -7 pad_end: -8", 20, 5),
])
def test_output_size_rules(body, h_in, h_out):
    layer = make_layer(interp_text(body))
    _, top = setup_layer(layer, [np.zeros((1, 1, h_in, h_in))])
    assert top[0].shape == (1, 1, h_out, h_out)


def test_both_pads_apply_to_both_axes():
    layer = make_layer(interp_text("zoom_factor: 2 pad_beg: -1 pad_end: -2"))
    _, top = setup_layer(layer, [np.zeros((2, 3, 10, 7))])
    assert top[0].shape == (2, 3, 13, 7)      # H_eff 7 -> 13, W_eff 4 -> 7


# ------------------------------------------------------------------ exact DeepLab cases
def test_label_shrink_is_exact_subsampling():
    labels = np.random.default_rng(0).choice([0, 15, 255], size=(2, 1, 321, 321))
    got = ours("shrink_factor: 8", [labels.astype(np.float32)])
    np.testing.assert_array_equal(got, labels[:, :, ::8, ::8])      # rows 0, 8, ..., 320


def test_v1_label_shrink_with_pad_beg():
    labels = np.random.default_rng(1).choice([0, 7, 255], size=(1, 1, 306, 306))
    got = ours("shrink_factor: 8 pad_beg: -1", [labels.astype(np.float32)])
    assert got.shape == (1, 1, 39, 39)
    np.testing.assert_array_equal(got, labels[:, :, 1:306:8, 1:306:8])   # rows 1, 9, ..., 305


def test_label_shrink_blends_when_crop_is_not_8k_plus_1():
    labels = np.zeros((1, 1, 320, 320), np.float32)
    labels[:, :, 1::2, :] = 15
    got = ours("shrink_factor: 8", [labels])       # 320 -> 40 rows, rh = 319/39
    assert got.shape == (1, 1, 40, 40)
    assert np.any((got > 0) & (got < 15))          # labels mixed: the spec's gotcha 2


def test_zoom4_shrink3_is_one_resample_with_ratio_three_quarters():
    x = ramp(31, 31)
    got = ours("zoom_factor: 4 shrink_factor: 3", [x])
    i = np.arange(41) * 0.75                       # rh = 30/40
    plane = 10 * i[:, None] + i[None, :] / 8
    want = np.stack([plane, plane + 1000])[None]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)
    # output row 1 = 0.25 * row 0 + 0.75 * row 1 (not a two-step shrink-then-zoom)
    rng = np.random.default_rng(2)
    y = rng.standard_normal((1, 1, 31, 31)).astype(np.float32)
    got = ours("zoom_factor: 4 shrink_factor: 3", [y])
    np.testing.assert_allclose(got[0, 0, 1, 0], 0.25 * y[0, 0, 0, 0] + 0.75 * y[0, 0, 1, 0],
                               rtol=1e-6)


def test_shrink4_zoom3_321_to_241():
    x = ramp(321, 321, c=1)
    got = ours("shrink_factor: 4 zoom_factor: 3", [x])
    pos = np.arange(241) * (320 / 240)
    want = 10 * pos[:, None] + pos[None, :] / 8
    np.testing.assert_allclose(got[0, 0], want, rtol=0, atol=2e-3)
    # every third output row lands on input row 4k
    np.testing.assert_allclose(got[0, 0, ::3, ::3], x[0, 0, ::4, ::4], rtol=0, atol=2e-3)


def test_zoom8_65_to_513_hits_input_rows():
    x = np.random.default_rng(3).standard_normal((1, 3, 65, 65)).astype(np.float32)
    got = ours("zoom_factor: 8", [x])
    assert got.shape == (1, 3, 513, 513)
    np.testing.assert_array_equal(got[:, :, ::8, ::8], x)     # rh = 64/512 = 1/8 exactly
    mid = 0.5 * (x[:, :, 3, 5] + x[:, :, 4, 5])
    np.testing.assert_allclose(got[:, :, 28, 40], mid, rtol=1e-6, atol=1e-7)


def test_coordinates_are_float32_as_in_caffe():
    # 2 rows -> 42: rh = 1/41 in float32, y(41) = rh*41 = 0.99999994 < 1, so the last
    # output row is (1-dy)*row0 + dy*row1 with dy = 0.99999994, not row 1 exactly.
    x = np.zeros((1, 1, 2, 2), np.float32)
    x[:, :, 1, :] = 255
    dy = np.float32(np.float32(1) / np.float32(41)) * np.float32(41)
    assert dy < 1
    for dtype in (np.float32, np.float64):
        got = ours("height: 42 width: 2", [x], dtype=dtype)
        assert got[0, 0, -1, 0] == dtype(dy) * dtype(255)
        assert got[0, 0, -1, 0] < 255


def test_same_size_is_plain_copy_of_crop():
    x = np.random.default_rng(4).standard_normal((2, 2, 20, 20)).astype(np.float32)
    got = ours("zoom_factor: 1 pad_beg: -7 pad_end: -8", [x])
    np.testing.assert_array_equal(got, x[:, :, 7:12, 7:12])
    got = ours("height: 20 width: 20", [x])
    np.testing.assert_array_equal(got, x)


def test_two_bottom_mode_takes_size_from_bottom1():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 2, 9, 11)).astype(np.float32)
    ref = np.zeros((1, 5, 17, 6), np.float32)
    got = ours("", [x, ref])
    assert got.shape == (1, 2, 17, 6)
    # explicit rules still win over the second bottom
    assert ours("zoom_factor: 2", [x, ref]).shape == (1, 2, 17, 21)
    np.testing.assert_allclose(got, torch_resize(x, (17, 6)), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ oracles
@pytest.mark.parametrize("body,shape", [
    ("zoom_factor: 3", (2, 3, 9, 10)),
    ("zoom_factor: 8", (1, 4, 11, 7)),
    ("height: 9 width: 4", (2, 3, 9, 10)),
    ("height: 4 width: 13", (2, 3, 9, 10)),
    ("height: 1 width: 5", (1, 2, 6, 6)),
])
def test_forward_matches_opencv(body, shape):
    x = (np.random.default_rng(6).standard_normal(shape) * 3).astype(np.float32)
    net = ('input: "data"\n' + "".join(f"input_dim: {d}\n" for d in shape) +
           f'layer {{ name: "out" bottom: "data" top: "out" {interp_text(body)} }}\n')
    want = opencv_forward(net, [], {"data": x}, ["out"])[0]
    got = ours(body, [x])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(x).max())


@pytest.mark.parametrize("body,shape,crop", [
    ("shrink_factor: 2", (2, 3, 17, 12), (0, 0)),
    ("shrink_factor: 3", (1, 2, 20, 14), (0, 0)),
    ("shrink_factor: 4 zoom_factor: 3", (1, 2, 33, 25), (0, 0)),
    ("zoom_factor: 4 shrink_factor: 3", (1, 2, 31, 16), (0, 0)),
    ("zoom_factor: 5", (1, 2, 7, 8), (0, 0)),
    ("height: 13 width: 5", (1, 2, 8, 9), (0, 0)),
    ("shrink_factor: 8 pad_beg: -1", (1, 2, 34, 42), (-1, 0)),
    ("zoom_factor: 3 pad_beg: -2 pad_end: -1", (1, 2, 10, 12), (-2, -1)),
    ("height: 6 width: 9 pad_end: -3", (1, 2, 11, 10), (0, -3)),
])
def test_forward_matches_torch_on_cropped_map(body, shape, crop):
    x = (np.random.default_rng(7).standard_normal(shape) * 3).astype(np.float32)
    got = ours(body, [x])
    b, e = crop
    cropped = x[:, :, -b:shape[2] + e, -b:shape[3] + e]
    want = torch_resize(cropped, got.shape[2:])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(x).max())


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("body,shape", [
    ("zoom_factor: 3", (1, 2, 4, 5)),
    ("shrink_factor: 2", (1, 2, 9, 8)),
    ("shrink_factor: 3", (2, 1, 8, 10)),            # (H-1) not divisible: blending
    ("shrink_factor: 2 zoom_factor: 3", (1, 2, 7, 6)),
    ("zoom_factor: 4 shrink_factor: 3", (1, 1, 10, 7)),
    ("height: 7 width: 3", (1, 2, 5, 6)),
    ("height: 1 width: 1", (1, 2, 4, 3)),
    ("zoom_factor: 2 pad_beg: -1 pad_end: -2", (1, 2, 7, 8)),
    ("shrink_factor: 2 pad_beg: -1", (1, 1, 10, 9)),
    ("zoom_factor: 1 pad_beg: -2 pad_end: -1", (1, 2, 7, 7)),
])
def test_gradient(body, shape):
    x = np.random.default_rng(8).standard_normal(shape)
    layer = make_layer(interp_text(body))
    bottom, top = setup_layer(layer, [x])
    check_gradient(layer, bottom, top)


def fork_axis(size_eff, size_out, dtype):
    """Per output index along one axis, as the fork's loops compute it: the input index,
    the step to the next one (0 at the last input), and the two lambdas (float32
    position, lambdas in Dtype)."""
    f32, t = np.float32, np.dtype(dtype).type
    ratio = f32(size_eff - 1) / f32(size_out - 1) if size_out > 1 else f32(0)
    out = []
    for i in range(size_out):
        pos = ratio * f32(i)
        k = int(pos)
        lambda1 = t(pos - f32(k))
        out.append((k, 1 if k < size_eff - 1 else 0, t(1) - lambda1, lambda1))
    return out


def caffe_cpu_backward_by_hand(g, in_shape, h_eff, w_eff, off, dtype):
    """The fork's caffe_cpu_interp2_backward written out element by element: per plane
    the sequential ``+=`` of ``(h_lambda * w_lambda) * g`` for outputs in row-major
    order, four taps each."""
    n, c, h, w = in_shape
    _, _, h2, w2 = g.shape
    diff = np.zeros(in_shape, dtype)
    rows, cols = fork_axis(h_eff, h2, dtype), fork_axis(w_eff, w2, dtype)
    for p in range(n * c):
        d, gp = diff.reshape(n * c, h, w)[p], g.reshape(n * c, h2, w2)[p]
        for i, (y, yp, ly0, ly1) in enumerate(rows):
            for j, (x, xp, lx0, lx1) in enumerate(cols):
                r, q, v = off + y, off + x, gp[i, j]
                d[r, q] += ly0 * lx0 * v
                d[r, q + xp] += ly0 * lx1 * v
                d[r + yp, q] += ly1 * lx0 * v
                d[r + yp, q + xp] += ly1 * lx1 * v
    return diff


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("body,shape,crop", [
    ("zoom_factor: 4 shrink_factor: 3", (1, 2, 10, 13), (0, 0)),   # ratio 0.75, 3 -> 4
    ("shrink_factor: 3", (2, 1, 11, 9), (0, 0)),                    # blending shrink
    ("height: 7 width: 5", (1, 2, 6, 11), (0, 0)),                  # ratios 5/6, 10/4
    ("height: 1 width: 4", (1, 1, 5, 3), (0, 0)),
    ("zoom_factor: 3 pad_beg: -1 pad_end: -2", (1, 2, 9, 8), (-1, -2)),
])
def test_cpu_backward_is_bit_exact_with_the_fork_order(body, shape, crop, dtype):
    rng = np.random.default_rng(12)
    layer = make_layer(interp_text(body), dtype=dtype)
    bottom, top = setup_layer(layer, [rng.standard_normal(shape)], dtype=dtype)
    run_forward(layer, bottom, top)
    top[0].diff[...] = rng.standard_normal(top[0].shape)
    bottom[0].diff[...] = np.nan
    layer.backward(top, [True], bottom)
    beg, end = crop
    want = caffe_cpu_backward_by_hand(top[0].diff.copy(), shape, shape[2] + beg + end,
                                      shape[3] + beg + end, -beg, dtype)
    assert bottom[0].diff.dtype == dtype
    assert np.array_equal(bottom[0].diff, want)


def caffe_cpu_forward_by_hand(x, out_hw, h_eff, w_eff, off, dtype):
    """The fork's caffe_cpu_interp2 written out element by element:
    ``h0*(w0*a + w1*b) + h1*(w0*c + w1*d)``."""
    n, c = x.shape[:2]
    h2, w2 = out_hw
    out = np.empty((n, c, h2, w2), dtype)
    rows, cols = fork_axis(h_eff, h2, dtype), fork_axis(w_eff, w2, dtype)
    for p in range(n * c):
        o, plane = out.reshape(n * c, h2, w2)[p], x.reshape(n * c, *x.shape[2:])[p]
        for i, (y, yp, ly0, ly1) in enumerate(rows):
            for j, (q, qp, lx0, lx1) in enumerate(cols):
                r, q = off + y, off + q
                o[i, j] = (ly0 * (lx0 * plane[r, q] + lx1 * plane[r, q + qp]) +
                           ly1 * (lx0 * plane[r + yp, q] + lx1 * plane[r + yp, q + qp]))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("body,shape,crop", [
    ("zoom_factor: 4 shrink_factor: 3", (1, 2, 10, 13), (0, 0)),
    ("shrink_factor: 3", (2, 1, 11, 9), (0, 0)),
    ("zoom_factor: 8", (1, 2, 5, 4), (0, 0)),
    ("height: 7 width: 5", (1, 2, 6, 11), (0, 0)),
    ("height: 1 width: 4", (1, 1, 5, 3), (0, 0)),
    ("zoom_factor: 3 pad_beg: -1 pad_end: -2", (1, 2, 9, 8), (-1, -2)),
])
def test_cpu_forward_is_bit_exact_with_the_fork_loops(body, shape, crop, dtype):
    x = np.random.default_rng(13).standard_normal(shape).astype(dtype)
    got = ours(body, [x], dtype=dtype)
    beg, end = crop
    want = caffe_cpu_forward_by_hand(x, got.shape[2:], shape[2] + beg + end,
                                     shape[3] + beg + end, -beg, dtype)
    assert got.dtype == dtype
    assert np.array_equal(got, want)


def test_cropped_away_inputs_get_zero_gradient():
    layer = make_layer(interp_text("zoom_factor: 2 pad_beg: -2 pad_end: -1"))
    bottom, top = setup_layer(layer, [np.random.default_rng(9).standard_normal((1, 1, 8, 8))])
    run_forward(layer, bottom, top)
    top[0].diff[...] = 1
    bottom[0].diff[...] = np.nan
    layer.backward(top, [True], bottom)
    d = bottom[0].diff[0, 0]
    assert np.all(d[:2, :] == 0) and np.all(d[:, :2] == 0)
    assert np.all(d[7:, :] == 0) and np.all(d[:, 7:] == 0)
    np.testing.assert_allclose(d[2:7, 2:7].sum(), top[0].count)     # weights sum to 1


def test_same_size_backward_adds_into_zeros_as_the_fork():
    """The fork's same-size backward is ``pos1[0] += pos2[0]`` into a zeroed diff, so a
    -0 gradient arrives as +0 (a plain copy would keep the sign)."""
    layer = make_layer(interp_text("height: 4 width: 5"))
    bottom, top = setup_layer(layer, [np.ones((1, 2, 4, 5), np.float32)])
    run_forward(layer, bottom, top)
    g = np.random.default_rng(11).standard_normal(top[0].shape).astype(np.float32)
    g[0, 0, 1:3] = -0.0
    top[0].diff[...] = g
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, g)
    assert not np.signbit(bottom[0].diff[0, 0, 1:3]).any()


def test_two_bottom_gradient():
    rng = np.random.default_rng(10)
    layer = make_layer(interp_text(""))
    bottom, top = setup_layer(layer, [rng.standard_normal((1, 2, 5, 4)),
                                      rng.standard_normal((1, 1, 7, 6))])
    check_gradient(layer, bottom, top, check_bottom=[0])
    bottom[1].diff[...] = 5
    layer.backward(top, [True, True], bottom)
    assert np.all(bottom[1].diff == 0)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("body,bottoms,words", [
    ("zoom_factor: 2 pad_beg: 1", 1, "only crops"),
    ("shrink_factor: 2 pad_end: 2", 1, "only crops"),
    ("", 1, "no output size"),
    ("height: 5", 1, "no output size"),
    ("pad_beg: -1 pad_end: -1", 1, "no output size"),
    ("", 3, "no output size"),
    ("shrink_factor: 0", 1, "shrink_factor must be >= 1"),
    ("zoom_factor: 0", 1, "zoom_factor must be >= 1"),
    ("zoom_factor: 2 shrink_factor: -1", 1, "shrink_factor must be >= 1"),
    ("zoom_factor: 2 pad_beg: -4 pad_end: -4", 1, "to nothing"),
    ("height: 0 width: 4", 1, "must be positive"),
])
def test_bad_params(body, bottoms, words):
    layer = make_layer(interp_text(body))
    with pytest.raises(LayerError, match=words):
        setup_layer(layer, [np.zeros((1, 1, 8, 8))] * bottoms)


# ------------------------------------------------------------------ v1 PADDING
def padding_layer(pad_beg, pad_end, dtype=np.float64):
    """A "Padding" layer; the pads sit in padding_param where the V2 schema has it,
    otherwise in interp_param (where the V1 upgrade puts them)."""
    param = caffe_pb2.LayerParameter(name="pad", type="Padding")
    if "padding_param" in param.DESCRIPTOR.fields_by_name:
        holder = param.padding_param
    else:
        holder = param.interp_param
    holder.pad_beg, holder.pad_end = pad_beg, pad_end
    from caffelite.layer import create_layer
    return create_layer(param, dtype=dtype)


def test_padding_crop_equals_interp_with_same_pads():
    x = np.random.default_rng(11).standard_normal((2, 3, 40, 40)).astype(np.float32)
    layer = padding_layer(-7, -8, np.float32)
    bottom, top = setup_layer(layer, [x], dtype=np.float32)
    got = run_forward(layer, bottom, top)[0]
    np.testing.assert_array_equal(got, x[:, :, 7:32, 7:32])
    np.testing.assert_array_equal(got, ours("zoom_factor: 1 pad_beg: -7 pad_end: -8", [x]))


def test_padding_positive_pads_zero_fill():
    x = np.arange(12, dtype=np.float64).reshape(1, 1, 3, 4) + 1
    layer = padding_layer(2, 1)
    bottom, top = setup_layer(layer, [x])
    got = run_forward(layer, bottom, top)[0]
    want = np.zeros((1, 1, 6, 7))
    want[:, :, 2:5, 2:6] = x
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("pads", [(-3, -4), (2, 1), (0, -3)])
def test_padding_gradient(pads):
    layer = padding_layer(*pads)
    bottom, top = setup_layer(layer, [np.random.default_rng(12).standard_normal((1, 2, 12, 11))])
    check_gradient(layer, bottom, top)


@pytest.mark.parametrize("pads", [(-1, -1), (1, 2), (0, 0)])
def test_padding_backward_adds_into_zeros_as_the_fork(pads):
    """The fork's backward zeroes the bottom diff and axpys the top's into it, so a -0
    gradient arrives as +0 (a plain copy would keep the sign)."""
    layer = padding_layer(*pads, np.float32)
    bottom, top = setup_layer(layer, [np.ones((1, 2, 5, 5), np.float32)], dtype=np.float32)
    run_forward(layer, bottom, top)
    g = np.random.default_rng(13).standard_normal(top[0].shape).astype(np.float32)
    g[0, 0] = -0.0
    top[0].diff[...] = g
    bottom[0].diff[...] = np.nan
    layer.backward(top, [True], bottom)
    beg, end = pads
    if beg >= 0:
        want = g[:, :, beg:g.shape[2] - end, beg:g.shape[3] - end]
    else:                               # the cropped-away border gets +0
        want = np.zeros((1, 2, 5, 5), np.float32)
        want[:, :, -beg:5 + end, -beg:5 + end] = g
    np.testing.assert_array_equal(bottom[0].diff, want)
    assert not np.signbit(bottom[0].diff[want == 0]).any()   # channel 0 and the border


def test_padding_mixed_signs_rejected():
    layer = padding_layer(-1, 2)
    with pytest.raises(LayerError, match="both"):
        setup_layer(layer, [np.zeros((1, 1, 8, 8))])
