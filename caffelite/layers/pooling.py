"""Pooling (Caffe ``pooling_layer.cpp``): MAX, AVE and STOCHASTIC over 2-D windows.

Output size uses ceil, ``ceil((in + 2p - k) / s) + 1`` (or floor under BVLC's later
``round_mode: FLOOR``); when any pad is non-zero the last window must start inside the
image or its top/left padding, otherwise it is dropped. MAX keeps the first maximum in
row-major window order (strictly-greater test from -FLT_MAX, so padding, NaN and
-inf never win) and routes the gradient to it; AVE divides the sum over the in-image
part of a window by the window area clipped to ``[-p, in + p)``.  STOCHASTIC (no
padding; Caffe runs it on the GPU only) samples an element in proportion to its value
at TRAIN and takes the value-weighted mean at TEST; it is array code on both sides.

The maths loops over the kernel taps only: each tap is one strided view of a padded
copy of the input, so every pass is a whole-array operation.  On the device the
``pooling.cu`` kernels do the same sums and comparisons (bit-identical results); MAX
keeps Caffe's int32 mask there (flat h*W + w of the winner, -1 for none) instead of
the tap index.
"""
import numpy as np

from .. import host_threads
from ..backend import TRAIN, get_array_module, rng
from ..caffe_rng import rng_uniform_01
from ..layer import Layer, register
from ..proto import caffe_pb2
from ._device import contiguous, launch, on_device, reused

_P = caffe_pb2.PoolingParameter
# Caffe starts MAX at -FLT_MAX for float and double alike.
_NEG_FLT_MAX = -float(np.finfo(np.float32).max)
# STOCHASTIC's test-time denominator starts at FLT_MIN.
_FLT_MIN = float(np.finfo(np.float32).tiny)
# Above this many taps a global pooling reduces over a reshaped plane instead.
_MAX_TAPS_LOOP = 256


def _has_negative_zero(array):
    """Whether ``array`` (float32 or float64) holds a -0."""
    bits = np.dtype(f"i{array.dtype.itemsize}")
    return bool((np.ascontiguousarray(array).view(bits) == np.iinfo(bits).min).any())


def pooled_size(size, kernel, pad, stride, any_pad, ceil_mode=True):
    """Caffe's pooled output length along one axis (``any_pad``: pad_h or pad_w != 0)."""
    span = size + 2 * pad - kernel
    steps = -(-span // stride) if ceil_mode else span // stride
    out = steps + 1
    if any_pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def window_sizes(out, size, kernel, pad, stride):
    """Per-output AVE divisor along one axis: window length clipped to [-pad, size+pad)."""
    start = np.arange(out) * stride - pad
    return np.minimum(start + kernel, size + pad) - start


@register("Pooling")
class PoolingLayer(Layer):
    exact_num_bottom = 1
    min_top = 1
    max_top = 2

    @property
    def graph_safe(self):
        return self.pool != _P.STOCHASTIC     # random windows in TRAIN

    def setup(self, bottom, top):
        p = self.layer_param.pooling_param
        self.pool = p.pool
        if self.pool not in (_P.MAX, _P.AVE, _P.STOCHASTIC):
            raise self.error(f"unknown pool method {self.pool}")
        if len(top) > 1 and self.pool != _P.MAX:
            raise self.error("a second top (the argmax mask) is only produced by pool: MAX")
        self.global_pooling = p.global_pooling
        has_hw = p.HasField("kernel_h") and p.HasField("kernel_w")
        if self.global_pooling:
            if p.HasField("kernel_size") or p.HasField("kernel_h") or p.HasField("kernel_w"):
                raise self.error("with global_pooling: true the kernel size cannot be given "
                                 "(it is the bottom's height and width)")
        else:
            # Caffe's check (!kernel_size != !(kernel_h && kernel_w)) lets kernel_size
            # with one of kernel_h/kernel_w through, and kernel_size wins.
            if p.HasField("kernel_size") and has_hw:
                raise self.error("give the kernel as kernel_size OR kernel_h and kernel_w, "
                                 "not both")
            if not (p.HasField("kernel_size") or has_hw):
                raise self.error("kernel size missing: give kernel_size, or both kernel_h "
                                 "and kernel_w for a non-square kernel")
        if p.HasField("pad_h") != p.HasField("pad_w") or (
                p.HasField("pad") and p.HasField("pad_h")):
            raise self.error("give the padding as pad OR both pad_h and pad_w")
        if p.HasField("stride_h") != p.HasField("stride_w") or (
                p.HasField("stride") and p.HasField("stride_h")):
            raise self.error("give the stride as stride OR both stride_h and stride_w")
        if self.global_pooling:
            self.kernel_h = self.kernel_w = None   # set from the bottom in reshape
        elif p.HasField("kernel_size"):
            self.kernel_h = self.kernel_w = p.kernel_size
        else:
            self.kernel_h, self.kernel_w = p.kernel_h, p.kernel_w
        if not self.global_pooling and (self.kernel_h <= 0 or self.kernel_w <= 0):
            raise self.error(f"kernel dimensions must be positive, got "
                             f"{self.kernel_h}x{self.kernel_w}")
        if p.HasField("pad_h"):
            self.pad_h, self.pad_w = p.pad_h, p.pad_w
        else:
            self.pad_h = self.pad_w = p.pad
        if p.HasField("stride_h"):
            self.stride_h, self.stride_w = p.stride_h, p.stride_w
        else:
            self.stride_h = self.stride_w = p.stride
        if self.stride_h <= 0 or self.stride_w <= 0:
            raise self.error(f"stride must be positive, got {self.stride_h}x{self.stride_w}")
        if self.global_pooling and (self.pad_h or self.pad_w or
                                    self.stride_h != 1 or self.stride_w != 1):
            raise self.error("with global_pooling: true only pad 0 and stride 1 are allowed")
        if self.pool == _P.STOCHASTIC and (self.pad_h or self.pad_w):
            raise self.error("padding is implemented only for MAX and AVE pooling, not "
                             "STOCHASTIC")
        if not self.global_pooling and (self.pad_h >= self.kernel_h or
                                        self.pad_w >= self.kernel_w):
            raise self.error(f"pad ({self.pad_h}, {self.pad_w}) must be smaller than the "
                             f"kernel ({self.kernel_h}, {self.kernel_w})")
        self.ceil_mode = (not p.HasField("round_mode")) or p.round_mode == _P.CEIL
        self.mask = None        # the device MAX mask (int32), reused between forwards
        self._argmax = None     # the host MAX argmax, see ``argmax``
        self._argmax_source = None
        self.sampled = None     # STOCHASTIC: tap taken per output at the last TRAIN forward

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.error(f"bottom must have 4 axes (num, channels, height, width), "
                             f"got shape {shape}")
        n, c, h, w = shape
        if self.global_pooling:
            self.kernel_h, self.kernel_w = h, w
        any_pad = self.pad_h != 0 or self.pad_w != 0
        self.pooled_h = pooled_size(h, self.kernel_h, self.pad_h, self.stride_h, any_pad,
                                    self.ceil_mode)
        self.pooled_w = pooled_size(w, self.kernel_w, self.pad_w, self.stride_w, any_pad,
                                    self.ceil_mode)
        if self.pooled_h <= 0 or self.pooled_w <= 0:
            raise self.error(f"a {h}x{w} bottom gives an empty {self.pooled_h}x"
                             f"{self.pooled_w} output with kernel {self.kernel_h}x"
                             f"{self.kernel_w}, stride {self.stride_h}x{self.stride_w}")
        out = (n, c, self.pooled_h, self.pooled_w)
        top[0].reshape(out)
        if len(top) > 1:
            top[1].reshape(out)

    # --- geometry -------------------------------------------------------------------
    def _padded_extent(self):
        """Rows/cols of the padded canvas that covers every window (incl. ceil overhang)."""
        return ((self.pooled_h - 1) * self.stride_h + self.kernel_h,
                (self.pooled_w - 1) * self.stride_w + self.kernel_w)

    def _padded(self, xp, x, fill):
        n, c, h, w = x.shape
        ph, pw = self._padded_extent()
        if self.pad_h == 0 and self.pad_w == 0 and ph <= h and pw <= w:
            return x
        canvas = self._work_array("canvas", xp, (n, c, ph, pw), x.dtype)
        top, left = self.pad_h, self.pad_w
        rows, cols = min(h, ph - top), min(w, pw - left)

        def fill_channels(lo, hi):
            part = canvas[:, lo:hi]
            part[:, :, :top] = fill
            part[:, :, top + rows:] = fill
            part[:, :, top:top + rows, :left] = fill
            part[:, :, top:top + rows, left + cols:] = fill
            part[:, :, top:top + rows, left:left + cols] = x[:, lo:hi, :rows, :cols]
        host_threads.for_axis(fill_channels, canvas)
        return canvas

    def _work_array(self, name, xp, shape, dtype):
        """An uninitialised work array. A TEST net keeps it from one forward to the next
        (a fresh large array costs a page fault per page, and its MAX argmax keeps the
        canvas anyway); a TRAIN net frees it, so that it holds no more memory between
        iterations than its blobs."""
        if self.phase == TRAIN:
            return xp.empty(shape, dtype)
        buffers = self.__dict__.setdefault("_work_arrays", {})
        buffers[name] = reused(buffers.get(name), xp, shape, dtype)
        return buffers[name]

    def _pooled_shape(self, canvas):
        return (canvas.shape[0], canvas.shape[1], self.pooled_h, self.pooled_w)

    def _tap(self, canvas, i, j):
        """Strided view of ``canvas`` seen by kernel tap (i, j) of every window."""
        return canvas[:, :, i:i + (self.pooled_h - 1) * self.stride_h + 1:self.stride_h,
                      j:j + (self.pooled_w - 1) * self.stride_w + 1:self.stride_w]

    def _taps(self):
        return [(i, j) for i in range(self.kernel_h) for j in range(self.kernel_w)]

    def _whole_plane(self):
        """Global pooling with more taps than a tap loop handles well."""
        return self.global_pooling and self.kernel_h * self.kernel_w > _MAX_TAPS_LOOP

    def _arg_dtype(self):
        return np.int16 if self.kernel_h * self.kernel_w <= np.iinfo(np.int16).max else np.int32

    def _pool_size(self, xp, h, w, dtype):
        rows = window_sizes(self.pooled_h, h, self.kernel_h, self.pad_h, self.stride_h)
        cols = window_sizes(self.pooled_w, w, self.kernel_w, self.pad_w, self.stride_w)
        return xp.asarray(np.outer(rows, cols).astype(dtype))

    # --- forward --------------------------------------------------------------------
    def forward(self, bottom, top):
        x = bottom[0].data
        xp = get_array_module(x)
        if self.pool == _P.STOCHASTIC:
            top[0].data[...] = self._stochastic_forward(xp, x)
            return
        if on_device(xp):
            self._forward_device(xp, contiguous(xp, x), bottom, top)
            return
        if self.pool == _P.MAX:
            # A TEST net rarely runs backward: its argmax is found only when asked for.
            top[0].data[...] = self._max_forward(
                xp, x, lazy_argmax=self.phase != TRAIN and len(top) == 1)
            if len(top) > 1:
                top[1].data[...] = self._mask_indices(xp, self.argmax, x.shape)
        else:
            top[0].data[...] = self._ave_forward(xp, x)

    @property
    def argmax(self):
        """Per output, the flat tap index in its window that won the MAX forward, or -1
        (nothing above -FLT_MAX)."""
        if self._argmax is None and self._argmax_source is not None:
            self._argmax = self._first_tap_reaching(*self._argmax_source)
            self._argmax_source = None
        return self._argmax

    def _max_forward(self, xp, x, lazy_argmax=False):
        """The MAX value of every window; sets its argmax (see ``argmax``)."""
        dtype = x.dtype
        floor = dtype.type(_NEG_FLT_MAX)
        self._argmax = self._argmax_source = None
        if self._whole_plane():
            n, c, h, w = x.shape
            flat = x.reshape(n, c, h * w)
            if xp.isnan(flat).any():
                flat = xp.where(xp.isnan(flat), dtype.type(-np.inf), flat)
            idx = xp.argmax(flat, axis=2)
            best = xp.take_along_axis(flat, idx[..., None], axis=2)[..., 0]
            won = best > floor
            self._argmax = xp.where(won, idx, -1).reshape(n, c, 1, 1)
            return xp.where(won, best, floor).reshape(n, c, 1, 1)
        canvas = self._padded(xp, x, dtype.type(-np.inf))
        best = self._plain_maximum(xp, canvas, floor)
        if best is None:
            best, self._argmax = self._scan_maximum(xp, canvas, floor)
            return best
        if not lazy_argmax:
            self._argmax = self._first_tap_reaching(canvas, best)
        else:
            # The canvas is the bottom itself when nothing pads it: keep a copy, the
            # mask must come from the values this forward saw.
            self._argmax_source = (canvas.copy() if canvas is x else canvas, best)
        return best

    def _plain_maximum(self, xp, canvas, floor):
        """The windows' maxima as one ``maximum`` per tap, or None where that could
        differ from Caffe's scan (keep the first value strictly greater than the best so
        far, from -FLT_MAX): a window with a NaN (Caffe skips it, ``maximum`` keeps it),
        or a zero maximum with a -0 in the input (+0 and -0 are the one pair of equal
        values with different bits; the scan keeps the first of them)."""
        if xp is not np:
            return None
        taps = self._taps()
        best = self._work_array("best", np, self._pooled_shape(canvas), canvas.dtype)

        def maxima(lo, hi):
            part, out = canvas[:, lo:hi], best[:, lo:hi]
            np.maximum(self._tap(part, *taps[0]), floor, out=out)
            for i, j in taps[1:]:
                np.maximum(out, self._tap(part, i, j), out=out)
        host_threads.for_axis(maxima, best, work=len(taps))
        if np.isnan(best).any():
            return None
        if (best == 0).any() and _has_negative_zero(canvas):
            return None
        return best

    def _first_tap_reaching(self, canvas, best):
        """The first tap in scan order whose value equals its window's ``best`` (the
        scan's winner when ``best`` came from ``_plain_maximum``), -1 where ``best`` is
        the -FLT_MAX floor."""
        arg = np.empty(best.shape, dtype=self._arg_dtype())
        taps = self._taps()

        def first_taps(lo, hi):
            part, top, out = canvas[:, lo:hi], best[:, lo:hi], arg[:, lo:hi]
            out[...] = -1
            equal = np.empty(top.shape, dtype=bool)
            step = np.empty(top.shape, dtype=arg.dtype)
            for t in range(len(taps) - 1, -1, -1):
                np.equal(self._tap(part, *taps[t]), top, out=equal)
                # arg = t where equal, as integer arithmetic: arg - (arg - t) * equal (a
                # masked copy branches on every element, several times slower)
                np.subtract(out, arg.dtype.type(t), out=step)
                np.multiply(step, equal, out=step)
                np.subtract(out, step, out=out)
            np.copyto(out, arg.dtype.type(-1), where=top <= top.dtype.type(_NEG_FLT_MAX))
        host_threads.for_axis(first_taps, best, work=3 * len(taps))
        return arg

    def _scan_maximum(self, xp, canvas, floor):
        """Caffe's scan itself: value and argmax."""
        out = self._pooled_shape(canvas)
        best = xp.full(out, floor, dtype=canvas.dtype)
        arg = xp.full(out, -1, dtype=self._arg_dtype())
        better = xp.empty(out, dtype=bool)
        for t, (i, j) in enumerate(self._taps()):
            v = self._tap(canvas, i, j)
            xp.greater(v, best, out=better)   # strict: the first maximum in scan order stays
            xp.copyto(best, v, where=better)
            xp.copyto(arg, arg.dtype.type(t), where=better)
        return best, arg

    def _winner_offsets(self, xp, arg, width, kind=None):
        """Each output's winning tap (row-major in its window) as the flat index h*W + w
        in its plane, for a plane ``width`` wide (in integers of ``kind``, numpy's
        default if None); meaningless where ``arg`` is -1."""
        oh = xp.arange(self.pooled_h, dtype=kind).reshape(-1, 1) * self.stride_h - self.pad_h
        ow = xp.arange(self.pooled_w, dtype=kind).reshape(1, -1) * self.stride_w - self.pad_w
        kw = self.kernel_w
        return (oh + arg // kw) * width + (ow + arg % kw)

    def _mask_indices(self, xp, arg, shape):
        """Caffe's top mask: the winner's flat index h*W + w in its plane, -1 if none."""
        index = arg if self._whole_plane() else self._winner_offsets(xp, arg, shape[3])
        return xp.where(arg >= 0, index, -1).astype(self.dtype)

    def _ave_forward(self, xp, x):
        n, c, h, w = x.shape
        if self._whole_plane():
            # Sequential float sum (Caffe's order), not numpy's pairwise sum.
            total = xp.cumsum(x.reshape(n, c, h * w), axis=2, dtype=x.dtype)[..., -1]
            total = total.reshape(n, c, 1, 1)
        else:
            canvas = self._padded(xp, x, x.dtype.type(0))
            total = xp.zeros((n, c, self.pooled_h, self.pooled_w), dtype=x.dtype)
            taps = self._taps()

            def sums(lo, hi):
                part, out = canvas[:, lo:hi], total[:, lo:hi]
                for i, j in taps:
                    out += self._tap(part, i, j)
            host_threads.for_axis(sums, total, work=len(taps))
        with np.errstate(divide="ignore", invalid="ignore"):
            return total / self._pool_size(xp, h, w, x.dtype)

    def _stochastic_forward(self, xp, x):
        """Caffe's GPU-only STOCHASTIC pooling (its CPU path aborts), as array code on
        either side.  Windows have no padding; the ceil overhang reads zeros, which
        change no running sum.  TEST: sum(x^2) / (FLT_MIN + sum(x)).  TRAIN: with
        u ~ U(0, 1], the first element (row-major) whose running sum reaches the float
        u * sum(window) is taken.  Meant for non-negative inputs: a window where no
        element qualifies (possible only with negative values; Caffe leaves that top
        unwritten) gives 0 and no gradient."""
        dtype = x.dtype.type
        canvas = self._padded(xp, x, dtype(0))
        taps = [self._tap(canvas, i, j) for i, j in self._taps()]
        out = taps[0].shape
        if self.phase != TRAIN:
            self.sampled = None
            total = xp.full(out, _FLT_MIN, dtype=x.dtype)
            squares = xp.zeros(out, dtype=x.dtype)
            for v in taps:
                total += v
                squares += v * v
            return squares / total
        total = xp.zeros(out, dtype=x.dtype)
        for v in taps:
            total += v
        # The threshold is a float in Caffe's kernel whatever the Dtype.
        threshold = (self._uniform(xp, out, x.dtype) * total).astype(np.float32)
        threshold = threshold.astype(x.dtype)
        running = xp.zeros(out, dtype=x.dtype)
        taken = xp.full(out, -1, dtype=self._arg_dtype())
        value = xp.zeros(out, dtype=x.dtype)
        for t, v in enumerate(taps):
            running += v
            hit = (taken < 0) & (running >= threshold)
            taken = xp.where(hit, taken.dtype.type(t), taken)
            value = xp.where(hit, v, value)
        self.sampled = taken
        return value

    @staticmethod
    def _uniform(xp, shape, dtype):
        """U(0, 1] like curand's uniform: from caffelite's generator on the host, the
        device generator on the device."""
        if xp is np:
            count = int(np.prod(shape, dtype=np.int64))
            return (1 - rng_uniform_01(rng(), count)).reshape(shape).astype(dtype)
        return (1 - xp.random.random_sample(shape, dtype=np.float32)).astype(dtype)

    # --- device ---------------------------------------------------------------------
    def _kernel_geometry(self, shape):
        """pooling.cu's arguments from ``height`` to ``pad_w``."""
        return (shape[2], shape[3], self.pooled_h, self.pooled_w, self.kernel_h,
                self.kernel_w, self.stride_h, self.stride_w, self.pad_h, self.pad_w)

    def _forward_device(self, xp, x, bottom, top):
        out_shape = top[0].shape
        count = int(np.prod(out_shape))
        in_place = top[0] is bottom[0]
        out = xp.empty(out_shape, x.dtype) if in_place else top[0].data
        geometry = self._kernel_geometry(x.shape)
        if self.pool == _P.MAX:
            self.mask = reused(self.mask, xp, out_shape, np.int32)
            launch("pooling", "max_pool_forward", x.dtype, count, x, *geometry, out,
                   self.mask)
            if len(top) > 1:
                top[1].data[...] = self.mask.astype(top[1].data.dtype)
        else:
            launch("pooling", "ave_pool_forward", x.dtype, count, x, *geometry, out)
        if in_place:
            top[0].data[...] = out

    def _backward_device(self, xp, g, bottom):
        diff = bottom[0].diff
        geometry = self._kernel_geometry(bottom[0].shape)
        if self.pool == _P.MAX:
            launch("pooling", "max_pool_backward", diff.dtype, diff.size, g, self.mask,
                   *geometry, diff)
        else:
            launch("pooling", "ave_pool_backward", diff.dtype, diff.size, g, *geometry, diff)

    # --- backward -------------------------------------------------------------------
    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        g = top[0].diff
        xp = get_array_module(g)
        if self.pool == _P.STOCHASTIC:
            bottom[0].diff[...] = self._stochastic_backward(xp, g, bottom[0].shape)
            return
        if on_device(xp):
            # In place, the gather would read top diffs it has already overwritten.
            g = g.copy() if top[0] is bottom[0] else contiguous(xp, g)
            self._backward_device(xp, g, bottom)
            return
        n, c, h, w = bottom[0].shape
        if self.pool == _P.MAX:
            diff = bottom[0].diff
            # (in place, zeroing the bottom's diff first would zero the top's)
            result = self._max_backward(xp, g, (n, c, h, w),
                                        into=None if top[0] is bottom[0] else diff)
            if result is not diff:
                diff[...] = result
            return
        with np.errstate(divide="ignore", invalid="ignore"):
            share = g / self._pool_size(xp, h, w, g.dtype)
        if self._whole_plane():
            bottom[0].diff[...] = share     # broadcast (n, c, 1, 1) over the plane
        else:
            bottom[0].diff[...] = self._scatter(xp, lambda t: share, (n, c, h, w), g.dtype)

    def _stochastic_backward(self, xp, g, shape):
        """The top diff goes to the element each window took at the TRAIN forward."""
        taken = self.sampled
        if taken is None or taken.shape != g.shape or get_array_module(taken) is not xp:
            raise self.error("STOCHASTIC pooling has a backward only after a TRAIN-phase "
                             "forward of the same shape (it routes the gradient to the "
                             "sampled elements)")
        g = g.copy()        # in place, the scatter would read diffs it has overwritten
        zero = g.dtype.type(0)
        return self._scatter(xp, lambda t: xp.where(taken == taken.dtype.type(t), g, zero),
                             shape, g.dtype)

    def _max_backward(self, xp, g, shape, into=None):
        """The bottom's gradient; on the host written into ``into`` when given."""
        n, c, h, w = shape
        arg = self.argmax
        if self._whole_plane():
            out = xp.zeros((n, c, h * w), dtype=g.dtype)
            won = arg.reshape(n, c) >= 0
            idx = xp.where(won, arg.reshape(n, c), 0)[..., None]
            xp.put_along_axis(out, idx, xp.where(won, g.reshape(n, c), 0)[..., None], axis=2)
            return out.reshape(shape)
        if xp is np:
            return self._max_backward_host(g, arg, shape, into)
        zero = g.dtype.type(0)
        return self._scatter(xp, lambda t: xp.where(arg == arg.dtype.type(t), g, zero), shape,
                             g.dtype)

    def _max_backward_host(self, g, arg, shape, into=None):
        """Caffe's loop itself: for every output in (n, c, ph, pw) order, its winner's
        bottom diff += its top diff, from zeros (``np.add.at`` adds in index order, one
        element at a time). Winners are always inside the image (padding reads -inf,
        which never wins); outputs without one (-1) add nothing. Indices are int32 where
        the bottom allows (half the memory of the largest temporaries)."""
        n, c, h, w = shape
        kind = np.int32 if n * c * h * w < 2**31 else np.intp
        index = self._winner_offsets(np, arg.astype(kind), w, kind)   # -1: dropped below
        index += np.arange(n * c, dtype=kind).reshape(n, c, 1, 1) * kind(h * w)
        if into is None:
            out = np.zeros(shape, dtype=g.dtype)
        else:
            out = into
            out.fill(0)
        values = g.reshape(-1)
        index = index.reshape(-1)
        if (arg < 0).any():
            won = arg.reshape(-1) >= 0
            index, values = index[won], values[won]
        np.add.at(out.reshape(-1), index, values)
        return out

    def _scatter(self, xp, contribution, shape, dtype):
        """Sum ``contribution(tap)`` of every window back onto the bottom.

        Taps run last to first, so that each bottom cell receives its windows in Caffe's
        (ph, pw) order and float32 sums round as Caffe's do.
        """
        n, c, h, w = shape
        ph, pw = self._padded_extent()
        ph, pw = max(ph, self.pad_h + h), max(pw, self.pad_w + w)
        canvas = xp.zeros((n, c, ph, pw), dtype=dtype)
        taps = self._taps()
        for t in range(len(taps) - 1, -1, -1):
            i, j = taps[t]
            self._tap(canvas, i, j)[...] += contribution(t)
        return canvas[:, :, self.pad_h:self.pad_h + h, self.pad_w:self.pad_w + w]
