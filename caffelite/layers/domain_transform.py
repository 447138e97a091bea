"""DomainTransform and DomainTransformForwardOnly: edge-aware recursive filtering
(Chen et al., CVPR'16 "DT-EdgeNet"; Gastal & Oliveira's recursive-filter domain
transform), as in the DeepLab v2 fork (spec deeplab_extra_layers.md section 1).

Bottoms: [0] X (N x C x H x W) to filter, [1] G (N x 1 x H x W) the reference edge
map, [2] per-sample valid size (the first two values of each item: rows, cols; the
layout of ImageSegData's data_dim works).  Only the top-left rows x cols region is
filtered; outside it the top is the input.

Iteration k = 1..K uses sigma_k = sigma_s * sqrt(3) * 2^(K-k) / sqrt(4^K - 1) and the
weight map a_k = exp(-(sqrt(2)/sigma_k) * (1 + (sigma_s/sigma_r) * G)) (clamped to
[min_weight, 1] by DomainTransform only).  a[h, w] couples (h, w) with its left
neighbour in horizontal passes and its upper neighbour in vertical ones.  Each
iteration runs four in-place first-order recursive passes, in this order:
left->right, right->left, top->bottom, bottom->top.

The recursion is sequential along its scan axis only.  On the host the code loops
over the positions of that axis and updates every sample, channel and row (or column)
at once; weights are zeroed outside each sample's valid region, which turns every
update there into the identity, so samples of different sizes share one loop.  On the
device each pass is one launch of caffelite/kernels/domain_transform.cu (a thread per
scan line, only inside the valid region), with the same arithmetic per element.
"""
import math

import numpy as np

from ..backend import get_array_module
from ..kernels import MAX_ELEMENTS
from ..layer import Layer, register
from ._device import launch, on_device

# Pass numbers as in the fork: (scan axis of NCHW, direction)
_PASSES = ((3, +1), (3, -1), (2, +1), (2, -1))


def sigma_schedule(spatial_sigma, num_iter, dtype):
    """sigma_k for k = 1..K, computed in double and cast to the blob dtype (the fork's
    ``ComputeSigma``); their squares sum to spatial_sigma^2."""
    k = num_iter
    return [dtype.type(spatial_sigma * math.sqrt(3.0) * 2.0 ** (k - (i + 1.0))
                       / math.sqrt(4.0 ** k - 1.0)) for i in range(k)]


def _scan_first(x, axis):
    """Contiguous copy of ``x`` with ``axis`` moved to the front."""
    xp = get_array_module(x)
    return xp.ascontiguousarray(xp.moveaxis(x, axis, 0))


def _scan_back(x, axis):
    xp = get_array_module(x)
    return xp.moveaxis(x, 0, axis)


def _forward_pass(y, a, direction, store, inside=None):
    """One in-place recursive pass along axis 0 of ``y``; ``a`` broadcasts against it.

    direction +1: y[i] += a[i] * (y[i-1] - y[i]) for i = 1..L-1;
    direction -1: y[i] += a[i+1] * (y[i+1] - y[i]) for i = L-2..0.
    ``store`` (or None) receives the differences at i, for backward. ``inside`` (None:
    everywhere) marks the links the fork runs, those whose weight lies in the sample's
    valid region: the others (weight 0) are skipped, so that an Inf or NaN beyond the
    region does not reach it as 0 * Inf."""
    length = y.shape[0]
    order = range(1, length) if direction > 0 else range(length - 2, -1, -1)
    for i in order:
        j = i - direction            # the neighbour already updated in this pass
        w = i if direction > 0 else i + 1
        delta = y[j] - y[i]
        if store is not None:
            store[i] = delta
        with np.errstate(invalid="ignore"):    # 0 * Inf where a link is skipped
            updated = y[i] + a[w] * delta
        y[i] = updated if inside is None else _where(inside[w], updated, y[i])


def _backward_pass(g, a, direction, delta, acc, inside=None):
    """Adjoint of ``_forward_pass``, in place on ``g``; adds the weight gradient of
    each link to ``acc`` (same layout as ``g``) at the position of its weight. Links
    not ``inside`` are skipped, as in ``_forward_pass``."""
    one = g.dtype.type(1)
    length = g.shape[0]
    order = range(length - 1, 0, -1) if direction > 0 else range(0, length - 1)
    for i in order:
        j = i - direction
        w = i if direction > 0 else i + 1
        if inside is None:
            acc[w] += g[i] * delta[i]
            g[j] = g[j] + a[w] * g[i]
            g[i] = (one - a[w]) * g[i]
            continue
        run = inside[w]
        acc[w] = _where(run, acc[w] + g[i] * delta[i], acc[w])
        g[j] = _where(run, g[j] + a[w] * g[i], g[j])
        g[i] = _where(run, (one - a[w]) * g[i], g[i])


def _where(condition, x, y):
    return get_array_module(x).where(condition, x, y)


def _partly_valid(valid):
    """The valid-region mask if some sample's region is smaller than the scanned one
    (its links outside must be skipped), else None."""
    return None if bool(valid.all()) else valid


def _channel_running_sum(xp, terms):
    """The fork's weight_diff: one running sum per pixel over the channels, each
    channel's passes in the order they ran (``terms``: per pass, N x C x H x W)."""
    total = xp.zeros(terms[0].shape[:1] + (1,) + terms[0].shape[2:], terms[0].dtype)
    for c in range(terms[0].shape[1]):
        for term in terms:
            total += term[:, c:c + 1]
    return total


@register("DomainTransform")
class DomainTransformLayer(Layer):
    """Recursive-filter domain transform with an exact backward to X and G.

    Backward (both bottom diffs are written when either is requested) runs the
    adjoint passes in reverse iteration and pass order; the weight gradient is summed
    over channels and passes and mapped to G through da/dG = -(sqrt(2)/sigma_k)
    (sigma_s/sigma_r) a, applied with the clamped a even where the clamp is active
    (as the fork does).  Outside the valid region dX = dY and dG = 0.
    """
    exact_num_bottom = 3
    exact_num_top = 1
    clamp = True

    def setup(self, bottom, top):
        p = self.layer_param.domain_transform_param
        self.spatial_sigma = float(p.spatial_sigma)
        self.range_sigma = float(p.range_sigma)
        self.num_iter = int(p.num_iter)
        self.min_weight = float(p.min_weight)
        if not self.spatial_sigma > 0:
            raise self.error(f"domain_transform_param.spatial_sigma must be positive, "
                             f"got {self.spatial_sigma}")
        if not self.range_sigma > 0:
            raise self.error(f"domain_transform_param.range_sigma must be positive, "
                             f"got {self.range_sigma}")
        if not self.min_weight >= 0:
            raise self.error(f"domain_transform_param.min_weight must be non-negative, "
                             f"got {self.min_weight}")
        if self.num_iter <= 0:
            raise self.error(f"domain_transform_param.num_iter must be positive, "
                             f"got {self.num_iter}")

    def reshape(self, bottom, top):
        x, g = bottom[0], bottom[1]
        if x.num_axes != 4 or g.num_axes != 4:
            raise self.error(f"bottoms 0 and 1 must be 4-D (N x C x H x W and N x 1 x H x W), "
                             f"got {x.shape} and {g.shape}")
        n, _, h, w = x.shape
        if g.shape[0] != n or g.shape[1] != 1 or g.shape[2:] != (h, w):
            raise self.error(f"the reference edge map (bottom 1) must be N x 1 x H x W = "
                             f"{n} x 1 x {h} x {w} to match bottom 0 {x.shape}; got {g.shape}")
        if bottom[2].shape[0] != n or bottom[2].count < 2 * n:
            raise self.error(f"bottom 2 must hold (rows, cols) for each of the {n} samples "
                             f"(e.g. ImageSegData's data_dim, N x 1 x 1 x 2); got "
                             f"{bottom[2].shape}")
        top[0].reshape(x.shape)

    # ---------------------------------------------------------------- helpers
    def _valid_sizes(self, bottom):
        """Per-sample (rows, cols), truncated like C's static_cast<int>."""
        dims = bottom[2].data.reshape(bottom[2].shape[0], -1)[:, :2]
        dims = np.asarray(dims.get() if hasattr(dims, "get") else dims, np.float64)
        sizes = np.trunc(dims).astype(np.int64)
        _, _, h, w = bottom[0].shape
        if np.any(sizes[:, 0] > h) or np.any(sizes[:, 1] > w):
            bad = int(np.argmax((sizes[:, 0] > h) | (sizes[:, 1] > w)))
            raise self.error(
                f"sample {bad}: the valid size {tuple(int(v) for v in sizes[bad])} from "
                f"bottom 2 exceeds the {h} x {w} maps; it must be given at the resolution "
                f"of bottom 0 (no rescaling is done)")
        return sizes

    def _weight_map(self, xp, g, sigma):
        """a_k = exp(mult1 * (1 + G * mult2)) in the blob dtype (exp evaluated in double
        and cast, as the fork's exp(float) then static_cast), clamped to
        [min_weight, 1] by DomainTransform."""
        dtype = g.dtype.type
        mult1 = dtype(-math.sqrt(2.0) / float(sigma))
        mult2 = dtype(self.spatial_sigma) / dtype(self.range_sigma)
        arg = mult1 * (dtype(1) + g * mult2)
        a = xp.exp(arg.astype(np.float64)).astype(g.dtype)
        if self.clamp:
            a = xp.minimum(xp.maximum(a, dtype(self.min_weight)), dtype(1))
        return a

    @staticmethod
    def _valid_mask(xp, sizes, shape):
        """N x 1 x H x W mask of each sample's top-left rows x cols region."""
        n, _, h, w = shape
        rows = xp.arange(h)[None, :, None] < xp.asarray(sizes[:, 0])[:, None, None]
        cols = xp.arange(w)[None, None, :] < xp.asarray(sizes[:, 1])[:, None, None]
        return (rows & cols)[:, None]

    # ---------------------------------------------------------------- forward
    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        sizes = self._valid_sizes(bottom)
        keep = self.clamp            # DomainTransformForwardOnly keeps nothing
        self._deltas = [] if keep else None
        y = bottom[0].data.copy()
        hmax, wmax = int(sizes[:, 0].max(initial=0)), int(sizes[:, 1].max(initial=0))
        if hmax > 0 and wmax > 0:
            filter_in_place = self._filter_device if on_device(xp) else self._filter_host
            filter_in_place(xp, sizes, y, bottom[1].data, keep)
        top[0].data[...] = y

    def _filter_host(self, xp, sizes, y, g, keep):
        hmax, wmax = int(sizes[:, 0].max()), int(sizes[:, 1].max())
        region = (slice(None), slice(None), slice(0, hmax), slice(0, wmax))
        valid = self._valid_mask(xp, sizes, g.shape)
        inside = _partly_valid(valid[region])
        zero = y.dtype.type(0)
        for sigma in sigma_schedule(self.spatial_sigma, self.num_iter, y.dtype):
            a = xp.where(valid, self._weight_map(xp, g, sigma), zero)[region]
            yr = y[region]
            for axis, direction in _PASSES:
                ys, as_ = _scan_first(yr, axis), _scan_first(a, axis)
                store = xp.empty_like(ys) if keep else None
                _forward_pass(ys, as_, direction, store,
                              None if inside is None else _scan_first(inside, axis))
                yr = _scan_back(ys, axis)
                if keep:
                    self._deltas.append(store)
            y[region] = yr

    def _filter_device(self, xp, sizes, y, g, keep):
        """The passes as kernel launches on the whole maps (the kernels stay inside each
        sample's valid region); the stored differences are N x C x H x W arrays."""
        sizes_dev = self._device_sizes(xp, sizes, y)
        for sigma in sigma_schedule(self.spatial_sigma, self.num_iter, y.dtype):
            a = self._weight_map(xp, g, sigma)
            for axis, direction in _PASSES:
                store = xp.empty_like(y) if keep else None
                launch("domain_transform", "dt_forward_pass", y.dtype,
                       *_line_args(y.shape, axis, sizes_dev), direction, a, y,
                       int(keep), y if store is None else store)
                if keep:
                    self._deltas.append(store)

    # ---------------------------------------------------------------- backward
    def backward(self, top, propagate_down, bottom):
        if len(propagate_down) > 2 and propagate_down[2]:
            raise self.error("cannot back-propagate to the image dimensions (bottom 2)")
        if not (propagate_down[0] or propagate_down[1]):
            return
        xp = get_array_module(top[0].diff)
        sizes = self._valid_sizes(bottom)
        dx = top[0].diff.copy()
        dg = xp.zeros(bottom[1].shape, dx.dtype)
        hmax, wmax = int(sizes[:, 0].max(initial=0)), int(sizes[:, 1].max(initial=0))
        if hmax > 0 and wmax > 0:
            adjoint = self._backward_device if on_device(xp) else self._backward_region
            adjoint(xp, bottom, sizes, dx, dg)
        bottom[0].diff[...] = dx
        bottom[1].diff[...] = dg

    def _backward_region(self, xp, bottom, sizes, dx, dg):
        hmax, wmax = int(sizes[:, 0].max()), int(sizes[:, 1].max())
        region = (slice(None), slice(None), slice(0, hmax), slice(0, wmax))
        g_ref = bottom[1].data
        sigmas = sigma_schedule(self.spatial_sigma, self.num_iter, dx.dtype)
        valid = self._valid_mask(xp, sizes, g_ref.shape)
        inside = _partly_valid(valid[region])
        gr = dx[region]
        for k in range(self.num_iter - 1, -1, -1):
            a_clamped = self._weight_map(xp, g_ref, sigmas[k])
            a = xp.where(valid, a_clamped, dx.dtype.type(0))[region]
            terms = []                   # per pass: each channel's weight-gradient term
            for p in range(3, -1, -1):
                axis, direction = _PASSES[p]
                gs, as_ = _scan_first(gr, axis), _scan_first(a, axis)
                accs = xp.zeros_like(gs)
                _backward_pass(gs, as_, direction, self._deltas[4 * k + p], accs,
                               None if inside is None else _scan_first(inside, axis))
                gr = _scan_back(gs, axis)
                terms.append(_scan_back(accs, axis))
            dg[region] += self._guide_diff(xp, _channel_running_sum(xp, terms),
                                           a_clamped[region], valid[region], sigmas[k])
        dx[region] = gr

    def _guide_diff(self, xp, weight_diff, a, valid, sigma):
        """One iteration's gradient for the guide: the weight gradient (N x 1 x H x W)
        times d a / d g = a * (-sqrt(2) / sigma) * (spatial / range sigma), zero
        outside the valid region."""
        dtype = weight_diff.dtype.type
        mult1 = dtype(-math.sqrt(2.0) / float(sigma))
        mult2 = dtype(self.spatial_sigma) / dtype(self.range_sigma)
        return xp.where(valid, mult1 * mult2 * weight_diff * a, dtype(0))

    def _device_sizes(self, xp, sizes, maps):
        """Per-sample (rows, cols) as a device int32 array for the kernels, after
        checking that the maps fit their int indexing."""
        if maps.size > MAX_ELEMENTS:
            raise self.error(f"on the GPU the maps may hold at most {MAX_ELEMENTS} "
                             f"elements (the kernels index with int); got {maps.shape}")
        return xp.asarray(np.ascontiguousarray(sizes, np.int32).reshape(-1))

    def _backward_device(self, xp, bottom, sizes, dx, dg):
        """The adjoint passes as kernel launches, in place on dx; the same arithmetic
        per element as _backward_region."""
        g_ref = bottom[1].data
        sigmas = sigma_schedule(self.spatial_sigma, self.num_iter, dx.dtype)
        valid = self._valid_mask(xp, sizes, g_ref.shape)
        sizes_dev = self._device_sizes(xp, sizes, dx)
        for k in range(self.num_iter - 1, -1, -1):
            a = self._weight_map(xp, g_ref, sigmas[k])
            acc = xp.zeros(dx.shape, dx.dtype)       # per channel; summed below
            for p in range(3, -1, -1):
                axis, direction = _PASSES[p]
                launch("domain_transform", "dt_backward_pass", dx.dtype,
                       *_line_args(dx.shape, axis, sizes_dev), direction, a,
                       self._deltas[4 * k + p], dx, acc)
            dg += self._guide_diff(xp, acc.sum(axis=1, keepdims=True), a, valid, sigmas[k])


def _line_args(shape, axis, sizes_dev):
    """The kernels' leading arguments for a pass along ``axis`` (3: rows, 2: columns):
    number of scan lines, C, H, W, sizes, vertical."""
    n, c, h, w = shape
    vertical = axis == 2
    return n * c * (w if vertical else h), c, h, w, sizes_dev, int(vertical)


@register("DomainTransformForwardOnly")
class DomainTransformForwardOnlyLayer(DomainTransformLayer):
    """The same filter without the clamp (min_weight is checked but unused) and with
    an empty backward: bottom diffs are left untouched, even for bottom 2 ("mainly
    used for timing the forward pass", says the fork)."""
    clamp = False

    def backward(self, top, propagate_down, bottom):
        pass
