"""Layer types of the SSD Caffe fork (weiliu89/caffe, branch ssd) that released
detection models use: Permute, Normalize, PriorBox and DetectionOutput.

Semantics follow the fork's ``permute_layer``, ``normalize_layer``,
``prior_box_layer``, ``detection_output_layer`` and ``util/bbox_util``:
PriorBox boxes are normalised by the image size, ordered per cell as
[min_size, sqrt(min_size*max_size), other aspect ratios] for each min_size;
DetectionOutput decodes, runs greedy NMS per class and keeps the ``keep_top_k``
best, emitting one row ``[image, label, score, xmin, ymin, xmax, ymax]`` per kept
box (top shape 1×1×kept×7; when nothing is kept, one row of -1 per image with the
image index).
"""
import logging

import numpy as np

from ..backend import get_array_module
from ..filler import FillerError, fill
from ..layer import TRAIN, Layer, register
from ..proto import caffe_pb2

logger = logging.getLogger("caffelite")


@register("Permute")
class PermuteLayer(Layer):
    """Transposes the axes: ``top = bottom.transpose(order)``; axes not named in
    ``permute_param.order`` follow in their original order."""
    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        n = bottom[0].num_axes
        order = [int(o) for o in self.layer_param.permute_param.order]
        for o in order:
            if o >= n:
                raise self.error(f"permute_param.order {o} is not an axis of the "
                                 f"{n}-axis bottom (shape {bottom[0].shape})")
        if len(set(order)) != len(order):
            raise self.error(f"permute_param.order {order} repeats an axis")
        self.order = tuple(order + [i for i in range(n) if i not in order])
        self.inverse = tuple(int(i) for i in np.argsort(self.order))

    def reshape(self, bottom, top):
        if top[0] is bottom[0]:
            raise self.error("Permute cannot run in place (top == bottom)")
        if len(self.order) != bottom[0].num_axes:
            raise self.error(f"the bottom now has {bottom[0].num_axes} axes, "
                             f"the order was set up for {len(self.order)}")
        top[0].reshape(tuple(bottom[0].shape[i] for i in self.order))

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        top[0].data[...] = xp.transpose(bottom[0].data, self.order)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            xp = get_array_module(top[0].diff)
            bottom[0].diff[...] = xp.transpose(top[0].diff, self.inverse)


@register("Normalize")
class NormalizeLayer(Layer):
    """L2 normalisation with a learnt scale (ParseNet / SSD).

    across_spatial: ``y = x / sqrt(sum_{c,h,w} x^2 + eps)`` per sample; otherwise per
    pixel over channels ``y = x / sqrt(sum_c x^2 + eps)``; then ``y *= scale`` (one
    value if channel_shared, else one per channel; default filler constant 1)."""
    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.norm_param
        if bottom[0].num_axes < 2:
            raise self.error(f"needs a bottom with a channel axis, got shape {bottom[0].shape}")
        self.across_spatial = p.across_spatial
        self.channel_shared = p.channel_shared
        self.eps = p.eps
        if self.eps < 0:
            raise self.error(f"norm_param.eps must not be negative, got {self.eps}")
        if top[0] is bottom[0] and self.phase == TRAIN:
            logger.warning("layer '%s' (Normalize) runs in place: as in SSD's Caffe, its "
                           "backward then overwrites its own top diff, and the bottom gets "
                           "a zero gradient; give the top its own name to train through it",
                           self.name)
        # SSD: a 0-axis scale blob when channel_shared
        shape = () if self.channel_shared else (bottom[0].shape[1],)
        if self.blobs_loaded():
            expected = int(np.prod(shape, dtype=np.int64))
            if self.blobs[0].count != expected:
                raise self.error(f"scale blob has {self.blobs[0].count} values, expected "
                                 f"{expected} (channel_shared: {self.channel_shared})")
            return
        filler = caffe_pb2.FillerParameter(type="constant", value=1.0)
        if p.HasField("scale_filler"):
            filler = p.scale_filler
        try:
            fill(self.new_param_blob(shape), filler)
        except FillerError as e:
            raise self.error(f"scale_filler: {e}") from None

    def reshape(self, bottom, top):
        if not self.channel_shared and bottom[0].shape[1] != self.blobs[0].count:
            raise self.error(f"bottom has {bottom[0].shape[1]} channels, the scale "
                             f"{self.blobs[0].count}")
        top[0].reshape(bottom[0].shape)

    def _norm(self, x, xp):
        """sqrt(sum x^2 + eps), broadcastable against x (N,C,...)."""
        axes = tuple(range(1, x.ndim)) if self.across_spatial else (1,)
        sq = xp.sum(x * x, axis=axes, keepdims=True)
        return xp.sqrt(sq + x.dtype.type(self.eps))

    def _scale(self, x):
        s = self.blobs[0].data
        return s.reshape((1, -1) + (1,) * (x.ndim - 2))

    @staticmethod
    def _reciprocal(norm):
        """SSD's ``Dtype(1.0 / norm)``: the reciprocal in double, rounded."""
        return (1.0 / norm.astype(np.float64)).astype(norm.dtype)

    def forward(self, bottom, top):
        x = bottom[0].data
        xp = get_array_module(x)
        norm = self._norm(x, xp)
        self._norm_cache = norm       # SSD's norm_: the backward uses the forward's
        # across_spatial scales by the reciprocal (caffe_cpu_scale), per pixel divides.
        normalized = x * self._reciprocal(norm) if self.across_spatial else x / norm
        top[0].data[...] = normalized * self._scale(x)

    def backward(self, top, propagate_down, bottom):
        """SSD's Backward_cpu step by step. It is the true gradient only where every
        scale is equal: the scale multiplies the projected gradient afterwards. The
        scale diff is (top data * top diff) / scale. In place, the bottom's data is the
        top's and the diffs are one array, so the steps read what earlier ones wrote,
        as SSD's do (its bottom diff then comes out zero)."""
        x, y, dy = bottom[0].data, top[0].data, top[0].diff
        xp = get_array_module(x)
        norm = getattr(self, "_norm_cache", None)
        if norm is None or norm.shape[0] != x.shape[0]:
            raise self.error("backward needs a forward of the same batch first")
        scale = self.blobs[0].data
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.param_propagate_down[0]:
                self._scale_diff(xp, y, dy, scale)
            if propagate_down[0]:
                self._bottom_diff(xp, x, dy, norm, bottom[0].diff)

    def _scale_diff(self, xp, y, dy, scale):
        product = y * dy
        if self.channel_shared:
            self.blobs[0].diff[...] += xp.sum(product) / scale
            return
        per_image = xp.sum(product, axis=tuple(range(2, y.ndim))) / scale.reshape(1, -1)
        for n in range(per_image.shape[0]):     # one image at a time, as SSD adds
            self.blobs[0].diff[...] += per_image[n]

    def _bottom_diff(self, xp, x, dy, norm, diff):
        axes = tuple(range(1, x.ndim)) if self.across_spatial else (1,)
        dot = xp.sum(x * dy, axis=axes, keepdims=True)
        if self.across_spatial:
            xp.multiply(x, dot / norm / norm, out=diff)
            xp.subtract(dy, diff, out=diff)
            xp.multiply(diff, self._reciprocal(norm), out=diff)
        else:
            xp.multiply(x, dot, out=diff)
            xp.divide(diff, norm * norm, out=diff)
            xp.subtract(dy, diff, out=diff)
            xp.divide(diff, norm, out=diff)
        xp.multiply(diff, self._scale(x), out=diff)


@register("PriorBox")
class PriorBoxLayer(Layer):
    """Default boxes of one feature map: top 1×2×(H·W·num_priors·4), row 0 the boxes
    (xmin, ymin, xmax, ymax normalised by the image size), row 1 their variances.
    Bottoms: the feature map and the image (for its size)."""
    runs_on_device = False
    exact_num_bottom = 2
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.prior_box_param
        self.min_sizes = [float(s) for s in p.min_size]
        if not self.min_sizes:
            raise self.error("prior_box_param needs at least one min_size")
        if any(s <= 0 for s in self.min_sizes):
            raise self.error(f"min_size must be positive, got {self.min_sizes}")
        self.max_sizes = [float(s) for s in p.max_size]
        if self.max_sizes:
            if len(self.max_sizes) != len(self.min_sizes):
                raise self.error(f"{len(self.max_sizes)} max_size values for "
                                 f"{len(self.min_sizes)} min_size values; give one per min_size")
            for lo, hi in zip(self.min_sizes, self.max_sizes):
                if hi <= lo:
                    raise self.error(f"max_size {hi} must be greater than min_size {lo}")
        ratios = [1.0]
        for ar in p.aspect_ratio:
            if not ar > 0:
                raise self.error(f"aspect_ratio must be positive, got {ar:g}")
            if any(abs(ar - r) < 1e-6 for r in ratios):
                continue
            ratios.append(float(ar))
            if p.flip:
                ratios.append(1.0 / float(ar))
        self.aspect_ratios = ratios
        self.num_priors = len(ratios) * len(self.min_sizes) + len(self.max_sizes)
        self.clip = p.clip
        variance = [float(v) for v in p.variance]
        if len(variance) > 1 and len(variance) != 4:
            raise self.error(f"give 1 or 4 variance values, got {len(variance)}")
        if any(v <= 0 for v in variance):
            raise self.error(f"variance values must be positive, got {variance}")
        self.variance = variance or [0.1]
        self.img_h, self.img_w = self._pair(p, "img_size", "img_h", "img_w", int)
        self.step_h, self.step_w = self._pair(p, "step", "step_h", "step_w", float)
        self.offset = p.offset

    def _pair(self, p, both, h, w, cast):
        if p.HasField(both):
            if p.HasField(h) or p.HasField(w):
                raise self.error(f"give either {both} or {h} and {w}, not both")
            value = cast(getattr(p, both))
            if value <= 0:
                raise self.error(f"{both} must be positive, got {value}")
            return value, value
        if p.HasField(h) or p.HasField(w):
            if not (p.HasField(h) and p.HasField(w)):
                raise self.error(f"give both {h} and {w}")
            hv, wv = cast(getattr(p, h)), cast(getattr(p, w))
            if hv <= 0 or wv <= 0:
                raise self.error(f"{h} and {w} must be positive, got {hv} and {wv}")
            return hv, wv
        return 0, 0

    def reshape(self, bottom, top):
        h, w = bottom[0].height, bottom[0].width          # legacy: 1 past the last axis
        top[0].reshape((1, 2, h * w * self.num_priors * 4))

    def _box_sizes(self):
        """(width, height) of each prior of one cell, in the fork's order."""
        sizes = []
        for i, s in enumerate(self.min_sizes):
            sizes.append((s, s))
            if self.max_sizes:
                m = np.sqrt(s * self.max_sizes[i])
                sizes.append((m, m))
            for ar in self.aspect_ratios:
                if abs(ar - 1.0) < 1e-6:
                    continue
                sizes.append((s * np.sqrt(ar), s / np.sqrt(ar)))
        return np.array(sizes, np.float64)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        layer_h, layer_w = bottom[0].height, bottom[0].width
        img_h = self.img_h or bottom[1].height
        img_w = self.img_w or bottom[1].width
        # float32 steps and centres as in the fork; box corners in double
        step_h = np.float32(self.step_h or np.float32(img_h) / np.float32(layer_h))
        step_w = np.float32(self.step_w or np.float32(img_w) / np.float32(layer_w))
        off = np.float32(self.offset)
        cy = ((np.arange(layer_h, dtype=np.float32) + off) * step_h).astype(np.float64)
        cx = ((np.arange(layer_w, dtype=np.float32) + off) * step_w).astype(np.float64)
        sizes = self._box_sizes().astype(np.float32).astype(np.float64)   # float in the fork
        bw, bh = sizes[:, 0], sizes[:, 1]
        cy, cx = cy[:, None, None], cx[None, :, None]
        boxes = np.stack(np.broadcast_arrays(
            (cx - bw / 2.0) / img_w, (cy - bh / 2.0) / img_h,
            (cx + bw / 2.0) / img_w, (cy + bh / 2.0) / img_h), axis=-1)
        if self.clip:
            boxes = np.clip(boxes, 0.0, 1.0)
        out = np.empty((2, boxes.size), np.float64)
        out[0] = boxes.reshape(-1)
        out[1] = np.tile(np.asarray(self.variance, np.float64),
                         boxes.size // len(self.variance))
        top[0].data[...] = xp.asarray(out.reshape(1, 2, -1), dtype=top[0].dtype)


@register("DetectionOutput")
class DetectionOutputLayer(Layer):
    """Decodes location predictions against the priors, per-class greedy NMS, keeps
    the keep_top_k best: one row [image, label, score, xmin, ymin, xmax, ymax] per
    box.  Bottoms: loc (N, priors·L·4), conf (N, priors·classes), priors (1, 2,
    priors·4); L = 1 with share_location, else num_classes."""
    runs_on_device = False
    min_bottom = 3
    max_bottom = 4     # the fork accepts the image as an optional 4th bottom
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.detection_output_param
        if not p.HasField("num_classes") or p.num_classes < 1:
            raise self.error("detection_output_param.num_classes must be given")
        self.num_classes = p.num_classes
        self.share_location = p.share_location
        self.num_loc_classes = 1 if p.share_location else p.num_classes
        self.background = p.background_label_id
        self.code_type = p.code_type
        self.variance_in_target = p.variance_encoded_in_target
        self.keep_top_k = p.keep_top_k
        self.conf_threshold = p.confidence_threshold if p.HasField("confidence_threshold") \
            else -np.inf
        nms = p.nms_param
        self.nms_threshold = nms.nms_threshold
        if self.nms_threshold < 0:
            raise self.error(f"nms_param.nms_threshold must not be negative, got "
                             f"{self.nms_threshold}")
        self.top_k = nms.top_k if nms.HasField("top_k") else -1
        self.eta = nms.eta
        if not 0 < self.eta <= 1:
            raise self.error(f"nms_param.eta must be in (0, 1], got {self.eta}")
        if p.visualize or (p.HasField("save_output_param")
                           and p.save_output_param.output_directory):
            raise self.error("visualize and save_output_param are not supported")

    def reshape(self, bottom, top):
        num_priors = bottom[2].height // 4
        if bottom[0].shape[0] != bottom[1].shape[0]:
            raise self.error(f"loc and conf bottoms have different nums: "
                             f"{bottom[0].shape[0]} vs {bottom[1].shape[0]}")
        if bottom[0].count_range(1) != num_priors * self.num_loc_classes * 4:
            raise self.error(f"loc bottom has {bottom[0].count_range(1)} values per image, "
                             f"expected {num_priors} priors x {self.num_loc_classes} x 4")
        if bottom[1].count_range(1) != num_priors * self.num_classes:
            raise self.error(f"conf bottom has {bottom[1].count_range(1)} values per image, "
                             f"expected {num_priors} priors x {self.num_classes} classes")
        top[0].reshape((1, 1, 1, 7))     # the real size is known after the forward

    def _decode(self, loc, prior, var):
        """loc (P, 4) against prior boxes (P, 4) and variances (P, 4) -> (P, 4)."""
        CT = caffe_pb2.PriorBoxParameter
        v = np.ones_like(var) if self.variance_in_target else var
        pw, ph = prior[:, 2] - prior[:, 0], prior[:, 3] - prior[:, 1]
        if self.code_type == CT.CORNER:
            return prior + v * loc
        if self.code_type == CT.CORNER_SIZE:
            return prior + v * loc * np.stack([pw, ph, pw, ph], axis=1)
        if self.code_type != CT.CENTER_SIZE:
            raise self.error(f"unknown code_type {self.code_type}")
        pcx, pcy = (prior[:, 0] + prior[:, 2]) / 2, (prior[:, 1] + prior[:, 3]) / 2
        cx = v[:, 0] * loc[:, 0] * pw + pcx
        cy = v[:, 1] * loc[:, 1] * ph + pcy
        w = np.exp(v[:, 2] * loc[:, 2]) * pw
        h = np.exp(v[:, 3] * loc[:, 3]) * ph
        return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)

    def _nms(self, boxes, scores):
        """The fork's ApplyNMSFast: indices kept, best first."""
        cand = np.nonzero(scores > self.conf_threshold)[0]
        cand = cand[np.argsort(-scores[cand], kind="stable")]
        if self.top_k > -1:
            cand = cand[:self.top_k]
        iou = jaccard(boxes[cand], boxes[cand])
        kept, threshold = [], self.nms_threshold
        for i in range(len(cand)):          # greedy: one pass over the candidates
            keep = not kept or bool(np.all(iou[i, kept] <= threshold))
            if keep:
                kept.append(i)
                if self.eta < 1 and threshold > 0.5:
                    threshold *= self.eta
        return cand[kept]

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        num = bottom[0].shape[0]
        num_priors = bottom[2].height // 4
        to_host = (lambda a: a.get()) if xp is not np else np.asarray
        loc = to_host(bottom[0].data).astype(np.float64).reshape(
            num, num_priors, self.num_loc_classes, 4)
        conf = to_host(bottom[1].data).astype(np.float64).reshape(
            num, num_priors, self.num_classes)
        priors = to_host(bottom[2].data).astype(np.float64).reshape(2, num_priors, 4)
        rows = []
        for n in range(num):                                   # images
            dets = []
            for c in range(self.num_classes):                  # classes
                if c == self.background:
                    continue
                boxes = self._decode(loc[n, :, 0 if self.share_location else c],
                                     priors[0], priors[1])
                for i in self._nms(boxes, conf[n, :, c]):
                    dets.append((conf[n, i, c], c, boxes[i]))
            if self.keep_top_k > -1 and len(dets) > self.keep_top_k:
                order = sorted(range(len(dets)), key=lambda k: -dets[k][0])   # stable
                chosen = set(order[:self.keep_top_k])
                dets = [d for k, d in enumerate(dets) if k in chosen]
            for score, c, box in dets:
                rows.append([n, c, score, *box])
        if not rows:
            out = np.full((num, 7), -1.0)
            out[:, 0] = np.arange(num)
        else:
            out = np.array(rows, np.float64)
        top[0].reshape((1, 1, out.shape[0], 7))
        top[0].data[...] = xp.asarray(out.reshape(1, 1, -1, 7), dtype=top[0].dtype)

    def allow_force_backward(self, bottom_index):
        return False


def jaccard(a, b):
    """IoU of boxes a (M, 4) and b (K, 4), normalised coordinates (no +1), as the
    fork's JaccardOverlap: boxes with xmax < xmin or ymax < ymin have size 0."""
    ix = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    iy = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.where((ix > 0) & (iy > 0), ix * iy, 0.0)

    def size(x):
        w, h = x[:, 2] - x[:, 0], x[:, 3] - x[:, 1]
        return np.where((w < 0) | (h < 0), 0.0, w * h)
    union = size(a)[:, None] + size(b)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(inter > 0, inter / union, 0.0)
