"""conv_igemm.cu, the implicit-GEMM tensor-core convolution forward, compiled for the host
(its blocks run as fibers, mma.sync emulated from the PTX ISA's fragment layouts) and
checked against a float64 convolution computed here from the definition.

* The double instantiation (plain double products summed in k order, the same tiles and
  indexing) must match within (K + 1) * eps * sum|terms|.
* The float instantiation rounds both operands to TF32 as cvt.rna does (to nearest, ties
  away from zero); it must match the convolution of the rounded operands within the
  float32 summation bound, and be much closer to it than to the convolution of the
  unrounded operands (so the test notices operands that are not rounded).

Outputs start poisoned (NaN) inside a larger buffer whose margins must stay untouched.
test_conv_igemm_gpu.py runs the same comparisons on a device, where the tensor cores'
summation order is unspecified (a bound twice as wide).
"""
import numpy as np
import pytest

import caffelite
from caffelite import backend
from caffelite.layers import implicit_gemm
from caffelite.layers.implicit_gemm import (CHANNEL_ALIGN, NARROW, TILES, WGRAD,
                                            WGRAD_QUAD, WIDE, padded_channels, pixel_runs)
from caffelite.layers.im2col import ConvGeometry
from gpu_modes import DeviceKernels, gpu_mode, host_kernels_for  # noqa: F401  (a fixture)

MODULE = "conv_igemm"
SENTINEL = 7.0
MARGIN = 37

# (num, channels, height, width, out_channels, kernel, stride, pad, dilation)
CASES = [
    (2, 5, 9, 11, 70, (3, 3), (1, 2), (2, 1), (2, 1)),     # one partial channel tile
    (1, 3, 7, 6, 130, (3, 3), (1, 1), (1, 1), (1, 1)),     # two channel tiles
    (3, 17, 13, 10, 64, (3, 3), (1, 1), (12, 12), (12, 12)),   # taps mostly padding
    (1, 4, 5, 5, 8, (2, 3), (2, 1), (0, 2), (1, 3)),       # uneven kernel, stride 2
    (2, 33, 6, 7, 21, (3, 3), (1, 1), (1, 1), (1, 1)),     # K = 297: a partial k tile
    (2, 6, 17, 19, 40, (3, 3), (1, 1), (1, 1), (1, 1)),    # several pixel tiles
    (1, 2, 3, 3, 5, (3, 3), (1, 1), (0, 0), (1, 1)),       # a 1x1 output
    (1, 16, 40, 40, 70, (3, 3), (1, 1), (24, 24), (24, 24)),   # ASPP: whole slices skipped
]


@pytest.fixture(scope="session")
def host_igemm(tmp_path_factory):
    return host_kernels_for(tmp_path_factory, [MODULE], "igemm")


@pytest.fixture
def kern(host_igemm):
    return host_igemm


def round_tf32(a):
    """float32 -> TF32 as cvt.rna.tf32.f32: 10 mantissa bits, nearest, ties away."""
    a = np.ascontiguousarray(a, np.float32)
    bits = a.view(np.uint32)
    finite = (bits & 0x7F800000) != 0x7F800000
    rounded = np.where(finite, (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000), bits)
    return rounded.astype(np.uint32).view(np.float32)


def output_shape(height, width, kernel, stride, pad, dilation):
    return tuple((size + 2 * p - (d * (k - 1) + 1)) // s + 1
                 for size, k, s, p, d in zip((height, width), kernel, stride, pad, dilation))


def reference(x, w, bias, stride, pad, dilation, absolute=False):
    """float64 convolution (or, with ``absolute``, the sum of |terms| per output), from
    the definition: out[o, y, x] = sum of w[o, c, u, v] * x[c, y*s - p + u*d, ...] over
    the taps inside the image (any padding, negative included)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    if absolute:
        x, w = np.abs(x), np.abs(w)
    num, channels, height, width = x.shape
    kh, kw = w.shape[2:]
    oh, ow = output_shape(height, width, (kh, kw), stride, pad, dilation)
    out = np.zeros((num, w.shape[0], oh, ow))
    for u in range(kh):
        iy = np.arange(oh) * stride[0] - pad[0] + u * dilation[0]
        for v in range(kw):
            ix = np.arange(ow) * stride[1] - pad[1] + v * dilation[1]
            inside = ((iy >= 0) & (iy < height))[:, None] & ((ix >= 0) & (ix < width))
            patch = x[:, :, np.clip(iy, 0, height - 1)][..., np.clip(ix, 0, width - 1)]
            out += np.einsum("oc,nchw->nohw", w[:, :, u, v], patch * inside)
    if bias is not None:
        b = np.asarray(bias, np.float64)
        out += (np.abs(b) if absolute else b).reshape(1, -1, 1, 1)
    return out


def prepare(kern, w, transposed=False):
    """conv_igemm_weights: [out][taps][channels padded to 16], TF32-rounded (float)."""
    n_out, channels = w.shape[:2]
    if transposed:
        n_out, channels = channels, n_out
    taps = w.shape[2] * w.shape[3]
    c_pad = padded_channels(channels)
    prepared = np.full((n_out, taps, c_pad), np.nan, w.dtype)
    kern.run(MODULE, "conv_igemm_weights", w.dtype, prepared.size, np.ascontiguousarray(w),
             n_out, channels, taps, c_pad, int(transposed), prepared)
    return prepared


def run_igemm(kern, x, w, bias, stride, pad, dilation, kernel_name=None):
    """The kernel's top inside a poisoned buffer; returns (top, buffer margins)."""
    num, channels, height, width = x.shape
    n_out, _, kh, kw = w.shape
    oh, ow = output_shape(height, width, (kh, kw), stride, pad, dilation)
    dtype = x.dtype
    size = num * n_out * oh * ow
    buffer = np.full(size + 2 * MARGIN, SENTINEL, dtype)
    top = buffer[MARGIN:MARGIN + size].reshape(num, n_out, oh, ow)
    top[...] = np.nan
    tile = TILES.get(kernel_name, NARROW if n_out <= NARROW.m else WIDE)
    n = num * oh * ow
    grid = -(-n_out // tile.m) * -(-n // tile.n)
    prepared = prepare(kern, w)
    kern.run(MODULE, tile.kernel, dtype, n, x, prepared, prepared if bias is None else bias,
             channels, height, width, kh, kw, dilation[0], dilation[1], prepared.shape[2],
             n_out, ow, oh * ow, stride[0], stride[1], pad[0], pad[1], int(bias is not None),
             top, grid=grid, block=tile.threads)
    return top, np.concatenate([buffer[:MARGIN], buffer[-MARGIN:]])


def reference_weight_grad(x, g, kernel, stride, pad, dilation, absolute=False):
    """float64 dW[o, c, u, v] = sum over n, y, x of g[n, o, y, x] * x[n, c, y*s - p + u*d,
    ...] (taps outside the image contribute nothing); or the sum of |terms|."""
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    if absolute:
        x, g = np.abs(x), np.abs(g)
    height, width = x.shape[2:]
    oh, ow = g.shape[2:]
    dw = np.zeros((g.shape[1], x.shape[1]) + tuple(kernel))
    for u in range(kernel[0]):
        iy = np.arange(oh) * stride[0] - pad[0] + u * dilation[0]
        for v in range(kernel[1]):
            ix = np.arange(ow) * stride[1] - pad[1] + v * dilation[1]
            inside = ((iy >= 0) & (iy < height))[:, None] & ((ix >= 0) & (ix < width))
            patch = x[:, :, np.clip(iy, 0, height - 1)][..., np.clip(ix, 0, width - 1)]
            dw[:, :, u, v] = np.einsum("nohw,nchw->oc", g, patch * inside)
    return dw


WGRAD_TILES = {"wide": WGRAD, "quad": WGRAD_QUAD}


def run_wgrad(kern, x, g, kernel, stride, pad, dilation, splits, base, tile="wide"):
    """conv_igemm_wgrad (or _quad) + conv_igemm_wgrad_sum: base + the weight gradient
    (partial sums poisoned first: every one the sum reads must be written)."""
    tile = WGRAD_TILES[tile]
    num, channels, height, width = x.shape
    n_out, (oh, ow) = g.shape[1], g.shape[2:]
    taps = kernel[0] * kernel[1]
    c_pad = padded_channels(channels)
    chunk, splits = pixel_runs(num * oh * ow, splits)
    tiles = -(-n_out // tile.m) * -(-(taps * c_pad) // tile.n)
    out = base.copy()
    direct = splits == 1
    partial = out if direct else np.full((splits, n_out, taps * c_pad), np.nan, x.dtype)
    kern.run(MODULE, tile.kernel, x.dtype, partial.size, x, g, num, channels, height,
             width, kernel[0], kernel[1], dilation[0], dilation[1], c_pad, n_out, ow,
             oh * ow, stride[0], stride[1], pad[0], pad[1], chunk, int(direct), partial,
             grid=tiles * splits, block=tile.threads)
    if not direct:
        kern.run(MODULE, "conv_igemm_wgrad_sum", x.dtype, out.size, partial, splits,
                 channels, taps, c_pad, out)
    return out


def random_case(case, dtype, seed, with_bias=True):
    num, channels, height, width, n_out, kernel, stride, pad, dilation = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num, channels, height, width)).astype(dtype)
    w = rng.standard_normal((n_out, channels) + kernel).astype(dtype)
    bias = rng.standard_normal(n_out).astype(dtype) if with_bias else None
    return x, w, bias, stride, pad, dilation


def summation_bound(x, w, bias, stride, pad, dilation, dtype, widen=1.0):
    k = x.shape[1] * w.shape[2] * w.shape[3]
    terms = reference(x, w, bias, stride, pad, dilation, absolute=True)
    return widen * (k + 2) * float(np.finfo(dtype).eps) * terms


def check_written(top, margins):
    assert not np.isnan(top).any(), "elements of the top were not written"
    assert np.all(margins == SENTINEL), "the kernel wrote outside the top"


@pytest.mark.parametrize("tile", sorted(TILES))
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_double_matches_the_definition(kern, case, tile):
    x, w, bias, stride, pad, dilation = random_case(case, np.float64, 1)
    top, margins = run_igemm(kern, x, w, bias, stride, pad, dilation, tile)
    check_written(top, margins)
    expected = reference(x, w, bias, stride, pad, dilation)
    bound = summation_bound(x, w, bias, stride, pad, dilation, np.float64)
    assert np.all(np.abs(top - expected) <= bound)


@pytest.mark.parametrize("tile", sorted(TILES))
@pytest.mark.parametrize("case", CASES[:3] + CASES[4:6] + CASES[7:],
                         ids=[f"case{i}" for i in (0, 1, 2, 4, 5, 7)])
def test_float_is_tf32_products_with_float_sums(kern, case, tile, widen=1.0):
    x, w, bias, stride, pad, dilation = random_case(case, np.float32, 2)
    top, margins = run_igemm(kern, x, w, bias, stride, pad, dilation, tile)
    check_written(top, margins)
    xr, wr = round_tf32(x), round_tf32(w)
    expected = reference(xr, wr, bias, stride, pad, dilation)
    bound = summation_bound(xr, wr, bias, stride, pad, dilation, np.float32, widen)
    err = np.abs(top - expected)
    assert np.all(err <= bound), float((err - bound).max())
    # Float summation errors are far below what TF32 rounding changes: the top is much
    # closer to the rounded operands' convolution than to the unrounded one.
    unrounded = np.abs(top - reference(x, w, bias, stride, pad, dilation))
    assert 20 * err.mean() < unrounded.mean()


@pytest.mark.parametrize("tile", sorted(WGRAD_TILES))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("case", [CASES[i] for i in (0, 1, 3, 4, 6, 7)],
                         ids=[f"case{i}" for i in (0, 1, 3, 4, 6, 7)])
def test_weight_gradient(kern, case, splits, dtype, tile, widen=1.0):
    """The weight gradient added to a non-zero base: float64 within the summation bound
    of the definition; float32 within the float32 bound of the TF32-rounded operands'
    gradient; one run of pixels (added into the diff directly) or several (summed in
    order by the second kernel)."""
    x, w, _, stride, pad, dilation = random_case(case, dtype, 10, with_bias=False)
    rng = np.random.default_rng(11)
    oh, ow = output_shape(x.shape[2], x.shape[3], w.shape[2:], stride, pad, dilation)
    g = rng.standard_normal((x.shape[0], w.shape[0], oh, ow)).astype(dtype)
    base = rng.standard_normal(w.shape).astype(dtype)
    got = run_wgrad(kern, x, g, w.shape[2:], stride, pad, dilation, splits, base, tile)
    xr, gr = (round_tf32(x), round_tf32(g)) if dtype == np.float32 else (x, g)
    expected = base + reference_weight_grad(xr, gr, w.shape[2:], stride, pad, dilation)
    terms = np.abs(base) + reference_weight_grad(xr, gr, w.shape[2:], stride, pad, dilation,
                                                 absolute=True)
    pixels = x.shape[0] * oh * ow
    bound = widen * (pixels + 3) * float(np.finfo(dtype).eps) * terms
    assert np.all(np.abs(got - expected) <= bound)


def test_no_bias_and_exact_integers(kern):
    """Small integers are exact in TF32 and in any summation order: equal, bias or not."""
    rng = np.random.default_rng(3)
    case = CASES[4]
    num, channels, height, width, n_out, kernel, stride, pad, dilation = case
    x = rng.integers(-3, 4, (num, channels, height, width)).astype(np.float32)
    w = rng.integers(-3, 4, (n_out, channels) + kernel).astype(np.float32)
    for bias in (None, rng.integers(-5, 6, n_out).astype(np.float32)):
        top, margins = run_igemm(kern, x, w, bias, stride, pad, dilation)
        check_written(top, margins)
        assert np.array_equal(top, reference(x, w, bias, stride, pad, dilation))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_layout_forward_and_transposed(kern, dtype):
    """conv_igemm_weights: prepared[o][u*kw+v][c] = w[o][c][u][v], zero for the padding
    channels; transposed: w[c][o][kh-1-u][kw-1-v] (the data gradient's); rounded to
    TF32 for float32, unchanged for float64; every element written."""
    w = np.random.default_rng(7).standard_normal((5, 19, 3, 2)).astype(dtype)
    rounded = round_tf32(w) if dtype == np.float32 else w
    for transposed, expected in ((False, rounded.transpose(0, 2, 3, 1)),
                                 (True, rounded[:, :, ::-1, ::-1].transpose(1, 2, 3, 0))):
        got = prepare(kern, w, transposed)
        rows, taps, c_pad = got.shape
        assert (c_pad % CHANNEL_ALIGN, rows, taps) == (0, expected.shape[0], 6)
        channels = expected.shape[3]
        np.testing.assert_array_equal(got[:, :, :channels],
                                      expected.reshape(rows, taps, channels))
        assert not got[:, :, channels:].any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_slices_of_taps_in_the_padding_are_skipped(kern, dtype):
    """ASPP-like dilation 24 on 40x40: the first 128-pixel tile (output rows 0-3) reads
    nothing through the top-left tap, so its slices are skipped; a NaN in that tap's
    weights therefore stays out of those outputs (as with the tap GEMMs), while tiles
    that need the tap get NaN, as cuBLAS's 0 * NaN gives."""
    x, w, bias, stride, pad, dilation = random_case(CASES[7], dtype, 8)
    w[:, :, 0, 0] = np.nan
    top, margins = run_igemm(kern, x, w, bias, stride, pad, dilation, "wide")
    assert np.all(margins == SENTINEL)
    assert np.isfinite(top[:, :, :3]).all()
    assert np.isnan(top[:, :, 24:]).all()


def test_operands_round_to_nearest_tf32_ties_away(kern):
    """A 1x1 convolution by 1.0 returns TF32(x): ties round away from zero, infinities
    and NaN pass, the largest floats round up to infinity, subnormals keep their bits
    above the 13 dropped ones. -0 comes out +0: the sums start from +0, as a GEMM's."""
    one_ulp = np.float32(2.0 ** -23)
    values = np.array([1 + 2 ** -11, -(1 + 2 ** -11), 1 + 2 ** -11 - one_ulp,
                       1 + 3 * 2 ** -11, np.inf, -np.inf, np.finfo(np.float32).max,
                       1e-40, -2.5, 0.0, -0.0], np.float32)
    x = values.reshape(1, 1, 1, -1)
    w = np.ones((1, 1, 1, 1), np.float32)
    top, margins = run_igemm(kern, x, w, None, (1, 1), (0, 0), (1, 1))
    check_written(top, margins)
    expected = np.array([1 + 2 ** -10, -(1 + 2 ** -10), 1, 1 + 2 ** -9, np.inf, -np.inf,
                         np.inf, round_tf32(np.float32(1e-40))[0], -2.5, 0.0, 0.0],
                        np.float32).reshape(top.shape)
    assert np.array_equal(round_tf32(values[:-1]), expected.ravel()[:-1])
    if isinstance(kern, DeviceKernels) and top.flat[7] == 0:
        # The PTX ISA leaves subnormal operands of a TF32 mma unspecified: the tensor
        # cores (which cuBLAS's TF32 GEMMs use too) may flush them. The rest must hold.
        expected.flat[7] = 0
    assert np.array_equal(top, expected)
    assert np.array_equal(np.signbit(top), np.signbit(expected))
    nan = run_igemm(kern, np.full((1, 1, 1, 2), np.nan, np.float32), w, None, (1, 1),
                    (0, 0), (1, 1))[0]
    assert np.isnan(nan).all()


def test_against_torch_conv2d(kern):
    """An oracle we did not write: torch's float64 convolution (test-only extra)."""
    torch = pytest.importorskip("torch")
    x, w, bias, stride, pad, dilation = random_case(CASES[0], np.float64, 4)
    top, _ = run_igemm(kern, x, w, bias, stride, pad, dilation)
    expected = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w),
                                          torch.from_numpy(bias), stride, pad,
                                          dilation).numpy()
    np.testing.assert_allclose(top, expected, rtol=1e-12, atol=1e-12)


def test_registers_and_shared_memory_on_hopper():
    """Where NVRTC and ptxas are installed (the nvrtc extra; no GPU needed): the float
    kernels keep their accumulators and fragments in registers (no stack frame, no
    spills: a spill would cost the tensor cores their operands) and use few enough
    registers that two blocks fit an SM (at most 128 for 256 threads, 255 for the
    quad tile's 128); every instantiation stays within 48 KiB of static shared memory
    (more fails to launch)."""
    from caffelite import kernels
    from caffelite.kernels.host import nvrtc_compile, nvrtc_library, ptxas_path, ptxas_usage
    lib, ptxas = nvrtc_library(), ptxas_path()
    if lib is None or ptxas is None:
        pytest.skip("needs NVRTC and ptxas (pip install -e '.[nvrtc]')")
    ptx, lowered = nvrtc_compile(lib, MODULE, kernels.NVRTC_OPTIONS)
    usage = ptxas_usage(ptxas, ptx, "sm_90")
    for expression, symbol in lowered.items():
        use = usage[symbol]
        assert use["smem_bytes"] <= 48 * 1024, (expression, use)
        if expression.endswith("<float>"):
            assert use["stack_bytes"] == use["spill_stores"] == use["spill_loads"] == 0, \
                (expression, use)
            threads = next((t.threads for t in (*TILES.values(), *WGRAD_TILES.values())
                            if expression.startswith(t.kernel + "<")), 256)
            assert use["registers"] <= min(255, 65536 // (2 * threads)), (expression, use)


# ------------------------------------------------------------------ in a net, GPU mode

CONV_NET = """
force_backward: true
input: "data" input_shape { dim: 2 dim: 3 dim: 9 dim: 10 }
layer { name: "wide" type: "Convolution" bottom: "data" top: "a"
  convolution_param { num_output: 70 kernel_size: 3 pad: 1
    weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "mid" type: "Convolution" bottom: "a" top: "b"
  convolution_param { num_output: 5 kernel_size: 3 pad: 2 dilation: 2
    bias_term: false weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "strided" type: "Convolution" bottom: "b" top: "c"
  convolution_param { num_output: 4 kernel_h: 3 kernel_w: 2 stride: 2 pad: 1
    weight_filler { type: "gaussian" std: 0.5 } } }
"""
# (layer, bottom, top, stride, pad, dilation)
CONV_LAYERS = (("wide", "data", "a", (1, 1), (1, 1), (1, 1)),
               ("mid", "a", "b", (1, 1), (2, 2), (2, 2)),
               ("strided", "b", "c", (2, 2), (1, 1), (1, 1)))


@pytest.fixture
def implicit_on(monkeypatch):
    """implicit_gemm.ENABLED with TF32 on; the list collects each implicit forward's
    output shape."""
    calls = []
    forward = implicit_gemm.forward

    def spy(xp, image, weight, out, geom, bias=None, transposed=False, tile=None):
        calls.append(tuple(out.shape))
        forward(xp, image, weight, out, geom, bias, transposed, tile)

    monkeypatch.setattr(implicit_gemm, "ENABLED", True)
    monkeypatch.setattr(implicit_gemm, "MIN_TILES_PER_SM", 0)   # small layers, any GPU
    monkeypatch.setattr(implicit_gemm, "forward", spy)
    backend.set_tf32(True)
    try:
        yield calls
    finally:
        backend.set_tf32(False)


def conv_net_pass(tmp_path, gpu_mode, seed=5):
    """One forward and backward of CONV_NET in GPU mode (a fixed gradient on the last
    top): {blob: (data, diff)}, {layer: [(data, diff) per parameter]}."""
    path = tmp_path / "conv.prototxt"
    path.write_text(CONV_NET)
    gpu_mode.on()
    try:
        caffelite.set_random_seed(seed)
        net = caffelite.Net(str(path), caffelite.TEST)
        rng = np.random.default_rng(seed)
        net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].shape)
        net.forward()
        net.blobs["c"].diff[...] = rng.standard_normal(net.blobs["c"].shape)
        net.backward()
        blobs = {n: (b.read_host_data().copy(), b.host_diff.copy())
                 for n, b in net.blobs.items()}
        params = {n: [(p.read_host_data().copy(), p.host_diff.copy()) for p in ps]
                  for n, ps in net.params.items()}
        return blobs, params
    finally:
        gpu_mode.off()


def flipped(w):
    """The weights of the data gradient as a convolution: channel axes swapped,
    kernel rotated by 180 degrees."""
    return np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])


def test_convolutions_take_the_implicit_gemm_with_tf32(tmp_path, gpu_mode, implicit_on):
    """The 3x3 convolutions' forwards run conv_igemm (the wide and the narrow tile) and
    give the convolution of their TF32-rounded operands; so does the data gradient of
    the stride-1 layer (a convolution of the top gradient with the flipped weights);
    the strided layer's data gradient keeps col2im."""
    blobs, params = conv_net_pass(tmp_path, gpu_mode)
    # forwards of wide, mid and strided; data gradients of mid and wide (force_backward)
    assert implicit_on == [(2, 70, 9, 10), (2, 5, 9, 10), (2, 4, 5, 6), (2, 70, 9, 10),
                           (2, 3, 9, 10)]
    widen = 1.0 if gpu_mode.emulated else 2.0
    for layer, bottom, top, stride, pad, dilation in CONV_LAYERS:
        w = params[layer][0][0]
        bias = params[layer][1][0] if len(params[layer]) > 1 else None
        xr, wr = round_tf32(blobs[bottom][0]), round_tf32(w)
        expected = reference(xr, wr, bias, stride, pad, dilation)
        bound = summation_bound(xr, wr, bias, stride, pad, dilation, np.float32, widen)
        assert np.all(np.abs(blobs[top][0] - expected) <= bound), layer
    # The stride-1 layers' data gradients: the top gradient convolved with the flipped
    # weights, padded by (kernel - 1) * dilation - pad.
    for layer, bottom, top, _, pad, dilation in CONV_LAYERS[:2]:
        gr, wr = round_tf32(blobs[top][1]), round_tf32(flipped(params[layer][0][0]))
        pad = tuple(2 * d - p for d, p in zip(dilation, pad))
        expected = reference(gr, wr, None, (1, 1), pad, dilation)
        bound = summation_bound(gr, wr, None, (1, 1), pad, dilation, np.float32, widen)
        assert np.all(np.abs(blobs[bottom][1] - expected) <= bound), layer

    # Every layer's weight gradient (the strided one's too), from the TF32-rounded data
    # and top gradient.
    for layer, bottom, top, stride, pad, dilation in CONV_LAYERS:
        xr, gr = round_tf32(blobs[bottom][0]), round_tf32(blobs[top][1])
        kernel = params[layer][0][0].shape[2:]
        expected = reference_weight_grad(xr, gr, kernel, stride, pad, dilation)
        terms = reference_weight_grad(xr, gr, kernel, stride, pad, dilation, absolute=True)
        bound = widen * (gr.size + 2) * float(np.finfo(np.float32).eps) * terms
        assert np.all(np.abs(params[layer][0][1] - expected) <= bound), layer

    implicit_gemm.ENABLED = False
    conv_net_pass(tmp_path, gpu_mode)
    assert len(implicit_on) == 5                      # no implicit GEMM this time
    implicit_gemm.ENABLED = True


def test_weight_grad_is_the_adjoint_in_the_weights():
    """<conv(x, w), g> = <w, dW(x, g)> in float64 (double instantiation, emulated device
    arrays, several runs of pixels), strided and dilated."""
    from caffelite.kernels import emulator
    rng = np.random.default_rng(12)
    implicit_gemm.SPLITS, saved = 2, implicit_gemm.SPLITS
    try:
        for kernel, stride, pad, dilation in (((3, 3), (1, 1), (2, 2), (2, 2)),
                                              ((3, 2), (2, 1), (1, 0), (1, 3))):
            geom = ConvGeometry(kernel, stride, pad, dilation)
            x = rng.standard_normal((2, 5, 9, 8))
            w = rng.standard_normal((7, 5) + kernel)
            out = reference(x, w, None, stride, pad, dilation)
            g = rng.standard_normal(out.shape)
            dw = emulator.zeros(w.shape, np.float64)
            implicit_gemm.weight_grad(emulator, emulator.asarray(x), emulator.asarray(g), dw,
                                      geom)
            dw = emulator.asnumpy(dw)
            assert np.isclose(np.vdot(out, g), np.vdot(w, dw), rtol=1e-12, atol=0)
    finally:
        implicit_gemm.SPLITS = saved


def test_transposed_is_the_adjoint_of_the_convolution():
    """<conv(x), g> = <x, transposed(g)> in float64 (the double instantiation, emulated
    device arrays), for stride-1 geometries with and without 'same' padding."""
    from caffelite.kernels import emulator
    rng = np.random.default_rng(6)
    for kernel, pad, dilation in (((3, 3), (2, 2), (2, 2)), ((3, 2), (0, 1), (1, 3)),
                                  ((2, 3), (3, 0), (2, 1))):
        geom = ConvGeometry(kernel, (1, 1), pad, dilation)
        x = rng.standard_normal((2, 4, 8, 9))
        w = rng.standard_normal((6, 4) + kernel)
        out = reference(x, w, None, (1, 1), pad, dilation)
        g = rng.standard_normal(out.shape)
        dx = emulator.zeros(x.shape, np.float64)
        implicit_gemm.transposed(emulator, emulator.asarray(g), emulator.asarray(w), dx,
                                 geom)
        dx = emulator.asnumpy(dx)
        assert np.isclose(np.vdot(out, g), np.vdot(x, dx), rtol=1e-12, atol=0)
        # and element by element, against the definition of the gradient
        expected = reference(g, flipped(w), None, (1, 1),
                             tuple((k - 1) * d - p for k, d, p in zip(kernel, dilation, pad)),
                             dilation)
        np.testing.assert_allclose(dx, expected, rtol=1e-12, atol=1e-12)


def test_small_products_keep_im2col_on_a_large_gpu(tmp_path, gpu_mode, implicit_on,
                                                   monkeypatch):
    """Forwards and data gradients with fewer output tiles than multiprocessors keep
    im2col + cuBLAS; the weight gradients (split into pixel runs) stay implicit."""
    wgrads = []
    weight_grad = implicit_gemm.weight_grad
    monkeypatch.setattr(implicit_gemm, "MIN_TILES_PER_SM", 1.0)
    monkeypatch.setattr(implicit_gemm, "_multiprocessors", lambda xp: 132)
    monkeypatch.setattr(implicit_gemm, "weight_grad",
                        lambda *a: (wgrads.append(a[3].shape), weight_grad(*a)))
    conv_net_pass(tmp_path, gpu_mode)
    assert implicit_on == []
    assert wgrads == [(4, 5, 3, 2), (5, 70, 3, 3), (70, 3, 3, 3)]
    assert implicit_gemm.fills_gpu(None, (10, 512, 41, 41))      # ASPP-VGG conv4, batch 10
    assert not implicit_gemm.fills_gpu(None, (1, 256, 41, 41))   # ResNet res4, batch 1


def test_fp32_and_float64_keep_im2col(tmp_path, gpu_mode, implicit_on):
    backend.set_tf32(False)
    conv_net_pass(tmp_path, gpu_mode)
    assert implicit_on == []


def test_training_with_cuda_graphs_gives_the_eager_bits(tmp_path, gpu_mode, implicit_on):
    """The graph tests' training net with its 3x3 convolutions on conv_igemm: recorded
    passes (the tap tables exist before the recording) repeat the eager bits."""
    import test_cuda_graphs as graphs_test
    body = """layer { name: "c" type: "Convolution" bottom: "x" top: "c"
        convolution_param { num_output: 16 kernel_size: 3 dilation: 2 pad: 2
        weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 }
        } }
        layer { name: "r" type: "ReLU" bottom: "c" top: "c" }
        layer { name: "c2" type: "Convolution" bottom: "c" top: "y"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1
        weight_filler { type: "gaussian" std: 0.3 } } }"""
    text = graphs_test.HEAD + body + graphs_test.TAIL
    eager, _ = graphs_test.train(gpu_mode, text, tmp_path, graphs=False, steps=3)
    calls = len(implicit_on)
    assert calls > 0
    graphed, solver = graphs_test.train(gpu_mode, text, tmp_path, graphs=True, steps=3)
    graphs_test.compare_runs(eager, graphed)
    assert graphs_test.launches(solver.net) >= 2


def test_reverse_thread_order_gives_the_same_results(kern, monkeypatch):
    """The fibers of a block run last to first between barriers
    (CAFFELITE_HOST_FIBER_ORDER=reverse): a race hidden by one order would show."""
    monkeypatch.setenv("CAFFELITE_HOST_FIBER_ORDER", "reverse")
    for tile in TILES:
        x, w, bias, stride, pad, dilation = random_case(CASES[4], np.float64, 9)
        top, margins = run_igemm(kern, x, w, bias, stride, pad, dilation, tile)
        check_written(top, margins)
        bound = summation_bound(x, w, bias, stride, pad, dilation, np.float64)
        assert np.all(np.abs(top - reference(x, w, bias, stride, pad, dilation)) <= bound)
        xf, wf, bf = (a.astype(np.float32) for a in (x, w, bias))
        monkeypatch.delenv("CAFFELITE_HOST_FIBER_ORDER")
        forward_order = run_igemm(kern, xf, wf, bf, stride, pad, dilation, tile)[0]
        monkeypatch.setenv("CAFFELITE_HOST_FIBER_ORDER", "reverse")
        np.testing.assert_array_equal(run_igemm(kern, xf, wf, bf, stride, pad, dilation,
                                                tile)[0], forward_order)
    # the weight gradient too (three runs of pixels)
    x, w, _, stride, pad, dilation = random_case(CASES[0], np.float32, 13, with_bias=False)
    g = np.random.default_rng(14).standard_normal(run_igemm(
        kern, x, w, None, stride, pad, dilation)[0].shape).astype(np.float32)
    base = np.zeros(w.shape, np.float32)
    for tile in WGRAD_TILES:
        monkeypatch.setenv("CAFFELITE_HOST_FIBER_ORDER", "reverse")
        reverse = run_wgrad(kern, x, g, w.shape[2:], stride, pad, dilation, 3, base, tile)
        monkeypatch.delenv("CAFFELITE_HOST_FIBER_ORDER")
        np.testing.assert_array_equal(
            reverse, run_wgrad(kern, x, g, w.shape[2:], stride, pad, dilation, 3, base, tile))


BROKEN_BLOCKS = r"""
__global__ void divergent(int* out) {
  if (threadIdx.x < 5) __syncthreads();
  else __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void exited_lanes(float* out) {
  if (threadIdx.x == 3) return;
  float a[4] = {1, 1, 1, 1}, b[2] = {1, 1}, d[4] = {0, 0, 0, 0};
  caffelite_host::mma_m16n8k8_tf32(d, a, b, d);
  out[threadIdx.x] = d[0];
}
static void divergent_thread(void* p) { divergent(static_cast<int*>(p)); }
static void exited_thread(void* p) { exited_lanes(static_cast<float*>(p)); }
extern "C" void run(int which) {
  static int ints[64];
  static float floats[64];
  blockDim.x = 64;
  if (which == 0) caffelite_host::run_block(divergent_thread, ints);
  else caffelite_host::run_block(exited_thread, floats);
}
"""


@pytest.mark.parametrize("which, message", [(0, "threads at different __syncthreads"),
                                            (1, "a warp-level operation with exited lanes")])
def test_host_fibers_stop_on_undefined_barriers(tmp_path, which, message):
    """Barriers that are undefined on a GPU abort the host run with a message instead
    of passing: threads at different __syncthreads, an mma with exited lanes."""
    import subprocess
    import sys
    from caffelite.kernels.host import CXX_FLAGS, SHIM, compiler
    if compiler() is None:
        pytest.skip("no C++ compiler")
    source, library = tmp_path / "broken.cpp", tmp_path / "broken.so"
    source.write_text(BROKEN_BLOCKS)
    subprocess.run([compiler(), *CXX_FLAGS, "-include", SHIM, "-x", "c++", str(source),
                    "-o", str(library)], check=True, capture_output=True)
    run = subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(library)!r})"
                          f".run({which})"], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert message in run.stderr
