"""LRN, local response normalisation (Caffe ``lrn_layer.cpp``).

ACROSS_CHANNELS: ``top = x * (k + alpha/n * sum of x^2 over the n channels centred on
c)^-beta`` (zero-padded at the channel ends). On the CPU in the fork's order: channel 0's
scale is k plus the window's ``alpha/n * x^2`` terms one by one, each later channel's is
the previous one plus the entering term minus the leaving one, and the backward keeps
its window of ratios as a running sum too (float rounding at every step, as the axpy
loops round). The device runs the fork's GPU kernels (``kernels/lrn.cu``): one running
sum per pixel, multiplied by alpha/n after the sum, and pow in the array's type. Both
keep the running sums' behaviour once a square overflows: Inf - Inf = NaN for every
later channel.

WITHIN_CHANNEL: Caffe builds it from layers (split, Power(2), AVE Pooling with kernel n,
pad (n-1)/2, stride 1, Power(power=-beta, scale=alpha, shift=1), Eltwise PROD), so
``top = x * (1 + alpha * avgpool(x^2))^-beta`` where the average always divides by n*n
(zero padding counts) and ``k`` is NOT used. The backward follows the same chain.
"""

import numpy as np

from ..backend import get_array_module
from ..layer import Layer, register
from ..proto import caffe_pb2
from ._cpu_math import caffe_powx
from ._device import contiguous, launch, on_device

_P = caffe_pb2.LRNParameter


@register("LRN")
class LRNLayer(Layer):
    graph_safe = True
    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.lrn_param
        self.size = p.local_size
        if self.size % 2 != 1:
            raise self.error(f"local_size must be odd, got {self.size}")
        self.pre_pad = (self.size - 1) // 2
        self.region = p.norm_region
        if self.region not in (_P.ACROSS_CHANNELS, _P.WITHIN_CHANNEL):
            raise self.error(f"unknown norm_region {self.region}")
        dt = self.dtype.type
        self.alpha, self.beta, self.k = dt(p.alpha), dt(p.beta), dt(p.k)

    def reshape(self, bottom, top):
        if len(bottom[0].shape) != 4:
            raise self.error(f"bottom must have 4 axes (num, channels, height, width), "
                             f"got shape {bottom[0].shape}")
        if top[0] is bottom[0]:
            raise self.error("LRN cannot run in place (its backward needs the bottom data); "
                             "give the top its own name")
        top[0].reshape(bottom[0].shape)

    # --- window sums --------------------------------------------------------------
    def _padded_channels(self, xp, a):
        """``a`` with pre_pad zero channels before and after (size - 1 in all)."""
        n, c, h, w = a.shape
        padded = xp.zeros((n, c + self.size - 1, h, w), dtype=a.dtype)
        padded[:, self.pre_pad:self.pre_pad + c] = a
        return padded

    def _running_scale(self, x, alpha_over_size):
        """CrossChannelForward_cpu's scale: k, plus the first window's terms one axpy at a
        time; then per channel the previous scale, plus the entering term, minus the
        leaving one."""
        padded = self._padded_channels(np, x * x)
        scale = np.empty_like(x)
        running = np.full(x.shape[:1] + x.shape[2:], self.k, x.dtype)
        for j in range(self.size):
            running = running + alpha_over_size * padded[:, j]
        scale[:, 0] = running
        for c in range(1, x.shape[1]):
            running = running + alpha_over_size * padded[:, c + self.size - 1]
            running = running + -alpha_over_size * padded[:, c - 1]
            scale[:, c] = running
        return scale

    def _running_ratio_terms(self, ratio, x):
        """CrossChannelBackward_cpu's terms: per channel, the running window sum of the
        ratios (entering one added, leaving one subtracted) times the bottom."""
        padded = self._padded_channels(np, ratio)
        terms = np.empty_like(x)
        accum = np.zeros(x.shape[:1] + x.shape[2:], x.dtype)
        for j in range(self.size - 1):
            accum = accum + padded[:, j]
        for c in range(x.shape[1]):
            accum = accum + padded[:, c + self.size - 1]
            terms[:, c] = x[:, c] * accum
            accum = accum - padded[:, c]
        return terms

    def _on_plane_grid(self, a, offset):
        """Host: ``a`` (N, C, H, W) on zeroed (H + 2p) x (W + 2p) planes, its H x W
        corner at row and column ``offset``, as one flat array with room after the last
        plane for the largest tap shift; and the planes' (rows, pitch, element count).
        On that grid tap (i, j) is one contiguous run, shifted by i*pitch + j."""
        n, c, h, w = a.shape
        rows, pitch = h + 2 * self.pre_pad, w + 2 * self.pre_pad
        count = n * c * rows * pitch
        flat = np.zeros(count + (self.size - 1) * (pitch + 1), dtype=a.dtype)
        flat[:count].reshape(n * c, rows, pitch)[:, offset:offset + h, offset:offset + w] = \
            a.reshape(n * c, h, w)
        return flat, (rows, pitch, count)

    def _tap_shifts(self, pitch, last_first=False):
        taps = [i * pitch + j for i in range(self.size) for j in range(self.size)]
        return taps[::-1] if last_first else taps

    def _host_window_sum(self, a):
        """``_spatial_window_sum`` on the host, every tap one contiguous run of the
        padded planes; the H x W corner of each plane is kept. Each kept element gets
        the same additions in the same order (0, then the taps row-major); the other
        positions are dropped."""
        n, c, h, w = a.shape
        padded, (rows, pitch, count) = self._on_plane_grid(a, self.pre_pad)
        total = np.zeros(count, dtype=a.dtype)
        for shift in self._tap_shifts(pitch):
            total += padded[shift:shift + count]
        return total.reshape(n * c, rows, pitch)[:, :h, :w].reshape(n, c, h, w)

    def _host_window_scatter(self, a):
        """``_spatial_window_scatter`` on the host: ``a`` at the corner of zeroed planes,
        added by each tap shifted by i*pitch + j, taps last to first. Every padded element
        gets the terms it gets from the strided views, in the same order, and some +0
        terms besides, which leave its bits as they are (it starts at +0 and so never
        holds -0)."""
        n, c, h, w = a.shape
        p = self.pre_pad
        source, (rows, pitch, count) = self._on_plane_grid(a, 0)
        canvas = np.zeros_like(source)
        for shift in self._tap_shifts(pitch, last_first=True):
            canvas[shift:shift + count] += source[:count]
        planes = canvas[:count].reshape(n * c, rows, pitch)
        return planes[:, p:p + h, p:p + w].reshape(n, c, h, w)

    def _spatial_window_sum(self, xp, a):
        """Caffe's AVE-pooling numerator: n x n window sum, zero padding, row-major taps."""
        if xp is np:
            return self._host_window_sum(a)
        n, c, h, w = a.shape
        p = self.pre_pad
        padded = xp.zeros((n, c, h + 2 * p, w + 2 * p), dtype=a.dtype)
        padded[:, :, p:p + h, p:p + w] = a
        total = xp.zeros_like(a)
        for i in range(self.size):
            for j in range(self.size):
                total += padded[:, :, i:i + h, j:j + w]
        return total

    def _spatial_window_scatter(self, xp, a):
        """Adjoint of ``_spatial_window_sum``, windows added in Caffe's (ph, pw) order."""
        if xp is np:
            return self._host_window_scatter(a)
        n, c, h, w = a.shape
        p = self.pre_pad
        padded = xp.zeros((n, c, h + 2 * p, w + 2 * p), dtype=a.dtype)
        for i in range(self.size - 1, -1, -1):
            for j in range(self.size - 1, -1, -1):
                padded[:, :, i:i + h, j:j + w] += a
        return padded[:, :, p:p + h, p:p + w]

    # --- forward / backward ----------------------------------------------------------
    def forward(self, bottom, top):
        x = bottom[0].data
        xp = get_array_module(x)
        dt = x.dtype.type
        if self.region == _P.ACROSS_CHANNELS:
            alpha_over_size = self.alpha / dt(self.size)
            if not on_device(xp):
                self.scale = self._running_scale(x, alpha_over_size)
                top[0].data[...] = caffe_powx(xp, self.scale, -self.beta) * x
                return
            x = contiguous(xp, x)
            num, channels, height, width = x.shape
            self.scale = xp.empty_like(x)
            launch("lrn", "lrn_fill_scale", x.dtype, num * height * width, x, channels,
                   height * width, self.size, alpha_over_size, self.k, self.scale)
            launch("lrn", "lrn_output", x.dtype, x.size, x, self.scale, -self.beta,
                   top[0].data)
        else:
            pool_size = dt(self.size * self.size)
            self.pooled = self._spatial_window_sum(xp, x * x) / pool_size
            self.power = caffe_powx(xp, self.pooled * self.alpha + dt(1), -self.beta)
            top[0].data[...] = x * self.power

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x, g = bottom[0].data, top[0].diff
        xp = get_array_module(x)
        dt = x.dtype.type
        if self.region == _P.ACROSS_CHANNELS:
            # 2. * alpha_ * beta_ / size_: in double, stored as Dtype.
            cache_ratio = dt(2.0 * float(self.alpha) * float(self.beta) / self.size)
            if on_device(xp):
                num, channels, height, width = x.shape
                launch("lrn", "lrn_diff", x.dtype, num * height * width,
                       contiguous(xp, x), contiguous(xp, top[0].data), self.scale,
                       contiguous(xp, g), channels, height * width, self.size, -self.beta,
                       cache_ratio, bottom[0].diff)
                return
            ratio = g * top[0].data / self.scale
            terms = self._running_ratio_terms(ratio, x)
            bottom[0].diff[...] = (caffe_powx(xp, self.scale, -self.beta) * g
                                   - cache_ratio * terms)
        else:
            # Eltwise PROD -> Power(-beta, alpha, 1) -> AVE pool -> Power(2) -> Split.
            d_power = g * x
            slope = self.power / (self.pooled * self.alpha + dt(1)) * (-self.beta * self.alpha)
            d_pooled = d_power * slope
            d_square = self._spatial_window_scatter(
                xp, d_pooled / dt(self.size * self.size))
            bottom[0].diff[...] = self.power * g + d_square * (dt(2) * x)
