"""Interp (DeepLab's bilinear resize, ``interp_layer.cpp`` + ``util/interp.cpp``) and
DeepLab v1's PADDING crop/pad layer.

Interp resamples the region ``[-pad_beg, -pad_beg + H_eff)`` of every N*C plane
(``H_eff = H + pad_beg + pad_end``, the same pads on both axes) with align-corners
bilinear weights in ONE step, whatever combination of shrink/zoom set the output size.
Coordinates are float32 exactly as in the C++ (``r = (h1-1)/(h2-1)``, ``y = r*i``,
``y0 = trunc(y)``, no second row at the last input row), so a shrink by s of an
``s*k + 1`` map samples rows 0, s, 2s, ... exactly (DeepLab's ``label_shrink``).

On the device the ``interp.cu`` kernels run instead, with the same bits both ways. The
fork's GPU backward is an atomic scatter, whose sums come in no fixed order; caffelite's
is a gather that adds each input pixel's terms in the fork's CPU order, so a GPU run
is reproducible and equals the CPU's.
"""
import numpy as np

from ..backend import get_array_module
from ..layer import Layer, register
from ._device import contiguous, launch, on_device


def _as_planes(blob):
    """The blob's data as (num, channels, height, width), Caffe's legacy accessors."""
    if blob.num_axes > 4:
        raise ValueError(f"blob of shape {blob.shape} has more than 4 axes")
    return (blob.num, blob.channels, blob.height, blob.width)


def interp_axis(size_in, size_out, dtype):
    """Rows (or columns) and weights of align-corners bilinear resampling along one axis.

    Returns ``(i0, i1, w0, w1)``: output position k reads ``w0[k]*in[i0[k]] +
    w1[k]*in[i1[k]]``. Positions and fractions are float32 as in Caffe's
    ``caffe_cpu_interp2`` even for double nets; ``w0 = 1 - w1`` is taken in ``dtype``.
    """
    f32 = np.float32
    ratio = f32(size_in - 1) / f32(size_out - 1) if size_out > 1 else f32(0)
    pos = ratio * np.arange(size_out, dtype=f32)
    i0 = pos.astype(np.int64)                      # truncation toward zero, pos >= 0
    i1 = np.where(i0 < size_in - 1, i0 + 1, i0)
    w1 = (pos - i0.astype(f32)).astype(dtype)
    w0 = np.asarray(1, dtype) - w1
    return i0, i1, w0, w1


def interp_forward(xp, x, size_out, out=None):
    """Bilinear align-corners resampling of (N, C, h1, w1) ``x`` to ``size_out``
    (``x`` itself when the size is unchanged), into ``out`` when given.

    Evaluated as Caffe does: ``ly0*(lx0*a + lx1*b) + ly1*(lx0*c + lx1*d)``. The bracketed
    sums depend on the input row only, so they are formed once per input row and then
    gathered for the output rows: the same float operations on each value.
    """
    h1, w1 = x.shape[2:]
    h2, w2 = size_out
    if (h1, w1) == (h2, w2):
        if out is None:
            return x
        out[...] = x
        return out
    dtype = x.dtype
    y0, y1, ly0, ly1 = (xp.asarray(a) for a in interp_axis(h1, h2, dtype))
    x0, x1, lx0, lx1 = (xp.asarray(a) for a in interp_axis(w1, w2, dtype))
    rows = lx0 * x[..., x0]
    rows += lx1 * x[..., x1]
    if out is None:
        out = xp.empty(x.shape[:2] + (h2, w2), dtype)
    xp.take(rows, y0, axis=2, out=out)
    out *= ly0[:, None]
    lower = xp.take(rows, y1, axis=2)
    lower *= ly1[:, None]
    out += lower
    return out


def interp_backward(g, size_in):
    """Adjoint of ``interp_forward`` on the host: (N, C, h2, w2) gradient -> (N, C, h1, w1).

    Accumulated exactly as the fork's ``caffe_cpu_interp2_backward``: into a zeroed
    map, for every output in row-major order, the four taps' ``+= (ly*lx) * g`` in
    turn, so the result is bit-identical to the fork's CPU backward, border taps that
    hit the same pixel twice included. Each input pixel's terms keep that order; the
    k-th terms of all pixels are added together (one array operation per k).
    """
    h2, w2 = g.shape[2:]
    h1, w1 = size_in
    if (h1, w1) == (h2, w2):
        return g + 0        # the fork adds into a zeroed map: a -0 gradient gives +0
    dtype = g.dtype
    planes = g.shape[0] * g.shape[1]
    y0, y1, ly0, ly1 = interp_axis(h1, h2, dtype)
    x0, x1, lx0, lx1 = interp_axis(w1, w2, dtype)
    # Taps in the C++ order: (y0, x0), (y0, x1), (y1, x0), (y1, x1).
    tap_rows = np.stack([y0, y0, y1, y1], axis=-1)[:, None, :]
    tap_cols = np.stack([x0, x1, x0, x1], axis=-1)[None, :, :]
    tap_weights = (np.stack([ly0, ly0, ly1, ly1], axis=-1)[:, None, :]
                   * np.stack([lx0, lx1, lx0, lx1], axis=-1)[None, :, :])
    target = (tap_rows * w1 + tap_cols).reshape(-1)       # tap t of output t // 4
    weight = np.broadcast_to(tap_weights, (h2, w2, 4)).reshape(-1)
    by_target = np.argsort(target, kind="stable")         # each pixel's terms in order
    counts = np.bincount(target, minlength=h1 * w1)
    first = np.cumsum(counts) - counts
    rank = np.empty_like(target)
    rank[by_target] = np.arange(target.size) - first[target[by_target]]
    by_rank = np.argsort(rank, kind="stable")
    bounds = np.searchsorted(rank[by_rank], np.arange(int(counts.max()) + 1))
    g2 = g.reshape(planes, h2 * w2)
    diff = np.zeros((planes, h1 * w1), dtype)
    for k in range(len(bounds) - 1):
        taps = by_rank[bounds[k]:bounds[k + 1]]            # the k-th term of each pixel
        diff[:, target[taps]] += weight[taps] * g2[:, taps // 4]
    return diff.reshape(g.shape[:2] + (h1, w1))


@register("Interp")
class InterpLayer(Layer):
    graph_safe = True
    # The fork accepts any number of bottoms; a second one can give the output size.
    min_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.interp_param
        self.pad_beg, self.pad_end = p.pad_beg, p.pad_end
        if self.pad_beg > 0 or self.pad_end > 0:
            raise self.error(f"pad_beg ({self.pad_beg}) and pad_end ({self.pad_end}) must be "
                             "<= 0: Interp only crops (negative pads)")
        shrink, zoom = p.HasField("shrink_factor"), p.HasField("zoom_factor")
        # Caffe's rule order; factors count when written, even as 1.
        if shrink and not zoom:
            self.rule = "shrink"
        elif zoom and not shrink:
            self.rule = "zoom"
        elif p.HasField("height") and p.HasField("width"):
            self.rule = "size"
        elif shrink and zoom:
            self.rule = "shrink_zoom"
        elif len(bottom) == 2:
            self.rule = "bottom1"
        else:
            raise self.error(
                "no output size: give shrink_factor, zoom_factor (or both), height AND width "
                "(one alone does not count), or a second bottom whose height and width "
                "the top should take")
        if self.rule in ("shrink", "shrink_zoom") and p.shrink_factor < 1:
            raise self.error(f"shrink_factor must be >= 1, got {p.shrink_factor}")
        if self.rule in ("zoom", "shrink_zoom") and p.zoom_factor < 1:
            raise self.error(f"zoom_factor must be >= 1, got {p.zoom_factor}")
        self.shrink, self.zoom = p.shrink_factor, p.zoom_factor
        self.height, self.width = p.height, p.width

    def output_size(self, h_eff, w_eff, bottom):
        def shrunk(n):
            return (n - 1) // self.shrink + 1     # n >= 1 here, so // truncates like C

        def zoomed(n):
            return n + (n - 1) * (self.zoom - 1)

        if self.rule == "shrink":
            return shrunk(h_eff), shrunk(w_eff)
        if self.rule == "zoom":
            return zoomed(h_eff), zoomed(w_eff)
        if self.rule == "size":
            return self.height, self.width
        if self.rule == "shrink_zoom":
            return zoomed(shrunk(h_eff)), zoomed(shrunk(w_eff))
        return bottom[1].height, bottom[1].width

    def reshape(self, bottom, top):
        try:
            n, c, h, w = _as_planes(bottom[0])
        except ValueError as e:
            raise self.error(str(e)) from None
        self.in_shape = (n, c, h, w)
        self.h_eff = h + self.pad_beg + self.pad_end
        self.w_eff = w + self.pad_beg + self.pad_end
        if self.h_eff <= 0 or self.w_eff <= 0:
            raise self.error(f"pad_beg {self.pad_beg} and pad_end {self.pad_end} crop the "
                             f"{h}x{w} bottom '{self.bottom_name(0)}' to nothing")
        self.h_out, self.w_out = self.output_size(self.h_eff, self.w_eff, bottom)
        if self.h_out <= 0 or self.w_out <= 0:
            raise self.error(f"output size {self.h_out}x{self.w_out} must be positive")
        top[0].reshape((n, c, self.h_out, self.w_out))

    def bottom_name(self, i):
        names = self.layer_param.bottom
        return names[i] if i < len(names) else f"bottom[{i}]"

    def _crop(self, a):
        o = -self.pad_beg
        return a.reshape(self.in_shape)[:, :, o:o + self.h_eff, o:o + self.w_eff]

    def _kernel_args(self):
        """interp.cu's arguments from ``y_offset`` to ``width_in``."""
        o = -self.pad_beg
        return (o, o, self.h_eff, self.w_eff, self.in_shape[2], self.in_shape[3])

    def _out_count(self):
        return self.in_shape[0] * self.in_shape[1] * self.h_out * self.w_out

    def forward(self, bottom, top):
        x = bottom[0].data
        xp = get_array_module(x)
        if on_device(xp):
            in_place = top[0] is bottom[0]
            out = xp.empty(top[0].shape, x.dtype) if in_place else top[0].data
            launch("interp", "interp_forward", x.dtype, self._out_count(),
                   contiguous(xp, x), *self._kernel_args(), out, self.h_out, self.w_out)
            if in_place:
                top[0].data[...] = out
            return
        if top[0] is bottom[0]:
            top[0].data[...] = interp_forward(xp, self._crop(x), (self.h_out, self.w_out))
        else:
            interp_forward(xp, self._crop(x), (self.h_out, self.w_out), out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        g = top[0].diff
        xp = get_array_module(g)
        if propagate_down[0] and on_device(xp):
            g = g.copy() if top[0] is bottom[0] else contiguous(xp, g)
            diff = bottom[0].diff
            launch("interp", "interp_backward", diff.dtype, diff.size, diff,
                   *self._kernel_args(), g, self.h_out, self.w_out)
        elif propagate_down[0]:
            diff = xp.zeros(self.in_shape, dtype=bottom[0].diff.dtype)
            o = -self.pad_beg
            diff[:, :, o:o + self.h_eff, o:o + self.w_eff] = \
                interp_backward(g, (self.h_eff, self.w_eff))
            bottom[0].diff[...] = diff.reshape(bottom[0].shape)
        for i in range(1, len(bottom)):
            if propagate_down[i]:      # only bottom[1]'s shape is used: zero gradient
                bottom[i].diff[...] = 0


@register("Padding")
class PaddingLayer(Layer):
    """DeepLab v1 PADDING: ``top[h, w] = bottom[h - pad_beg, w - pad_beg]`` where defined.

    Both pads <= 0 crop (the same as Interp with those pads at unchanged size); both
    >= 0 zero-pad; the output is ``H + pad_beg + pad_end`` (same pads on both axes).
    """
    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.padding_param
        self.pad_beg, self.pad_end = p.pad_beg, p.pad_end
        if not ((self.pad_beg >= 0 and self.pad_end >= 0) or
                (self.pad_beg <= 0 and self.pad_end <= 0)):
            raise self.error(f"pad_beg ({self.pad_beg}) and pad_end ({self.pad_end}) must "
                             "both be >= 0 (zero-pad) or both <= 0 (crop)")

    def reshape(self, bottom, top):
        try:
            n, c, h, w = _as_planes(bottom[0])
        except ValueError as e:
            raise self.error(str(e)) from None
        self.in_shape = (n, c, h, w)
        grow = self.pad_beg + self.pad_end
        if h + grow <= 0 or w + grow <= 0:
            raise self.error(f"pads {self.pad_beg}, {self.pad_end} leave nothing of the "
                             f"{h}x{w} bottom")
        self.out_shape = (n, c, h + grow, w + grow)
        top[0].reshape(self.out_shape)

    def _regions(self):
        """(bottom slice, top slice) of the part the two blobs share."""
        _, _, h, w = self.in_shape
        _, _, ho, wo = self.out_shape
        b = abs(self.pad_beg)
        if self.pad_beg >= 0 and self.pad_end >= 0:
            return (slice(None), slice(None)), (slice(b, b + h), slice(b, b + w))
        return (slice(b, b + ho), slice(b, b + wo)), (slice(None), slice(None))

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.in_shape)
        xp = get_array_module(x)
        (bh, bw), (th, tw) = self._regions()
        out = xp.zeros(self.out_shape, dtype=top[0].data.dtype)
        out[:, :, th, tw] = x[:, :, bh, bw]
        top[0].data[...] = out

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        g = top[0].diff
        xp = get_array_module(g)
        (bh, bw), (th, tw) = self._regions()
        diff = xp.zeros(self.in_shape, dtype=bottom[0].diff.dtype)
        # The fork zeroes the bottom's diff and adds the top's (axpy): -0 becomes +0.
        diff[:, :, bh, bw] += g[:, :, th, tw]
        bottom[0].diff[...] = diff.reshape(bottom[0].shape)
