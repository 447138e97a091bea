"""The weak / semi-supervised training layers of DeepLab (Papandreou et al., ICCV'15):
UniqueLabel, BiasChannel and AdaptiveBiasChannel (EM-Adapt), as in the DeepLab v2
fork (spec deeplab_extra_layers.md section 3).

Label lists are N x L x 1 x 1 blobs padded with -1.  None of these layers has a
gradient for its labels; AdaptiveBiasChannel has no gradient at all (its output only
makes E-step targets).
"""
import numpy as np

from ..caffe_rng import c_rand, random_shuffle
from ..backend import get_array_module
from ..blob import legacy_shape
from ..layer import Layer, register
from .softmax import label_text


def _host(array):
    """A NumPy copy of a (possibly device) array, for the per-sample bookkeeping."""
    return np.asarray(array.get() if hasattr(array, "get") else array)


@register("UniqueLabel")
class UniqueLabelLayer(Layer):
    """Label map N x 1 x H x W -> N x max_labels x 1 x 1: per sample, the distinct
    label values (exact float values, minus the ignore labels, plus every
    force_label) in ascending order, then -1 up to max_labels.  More than max_labels
    distinct values is an error."""
    runs_on_device = False
    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.unique_label_param
        if not p.HasField("max_labels"):
            raise self.error("unique_label_param.max_labels is required")
        self.max_labels = int(p.max_labels)
        self.ignore = sorted({float(v) for v in p.ignore_label})
        self.force = sorted({float(v) for v in p.force_label})
        if self.max_labels <= len(self.force):
            raise self.error(f"unique_label_param.max_labels ({self.max_labels}) must exceed "
                             f"the number of distinct force_label values ({len(self.force)}): "
                             f"at least one label more than the forced ones needs to fit")

    def reshape(self, bottom, top):
        legacy = legacy_shape(bottom[0].shape)     # the fork reads num and channels
        if legacy is None or legacy[1] != 1:
            raise self.error(f"the label map must have one channel (N x 1 x H x W), got "
                             f"{bottom[0].shape}")
        top[0].reshape((bottom[0].shape[0], self.max_labels, 1, 1))

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        labels = _host(bottom[0].data).reshape(bottom[0].shape[0], -1)
        dtype = labels.dtype.type
        out = np.full((labels.shape[0], self.max_labels), -1, labels.dtype)
        for n, row in enumerate(labels):
            keep = ~np.isin(row, np.asarray(self.ignore, labels.dtype))
            values = np.union1d(row[keep], np.asarray(self.force, labels.dtype).astype(dtype))
            if values.size > self.max_labels:
                raise self.error(
                    f"sample {n} has {values.size} distinct labels ({values[:12].tolist()}"
                    f"{' ...' if values.size > 12 else ''}), more than "
                    f"unique_label_param.max_labels {self.max_labels}: too many unique "
                    f"elements, increase max_labels or list ignore labels")
            out[n, :values.size] = values
        top[0].data[...] = xp.asarray(out).reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            raise self.error("cannot back-propagate to the label input")


@register("BiasChannel")
class BiasChannelLayer(Layer):
    """Adds fixed biases to the scores of the labelled classes (EM-Fixed).

    IMAGE labels (N x L x 1 x 1 list): for each listed label l (truncated to int;
    -1 and the ignore labels skipped), bg_bias is added to all of channel l if l == 0
    (background is channel 0 here, whatever background_label says), else fg_bias;
    duplicates add twice.  PIXEL labels (N x 1 x H x W): at each pixel with label l,
    if a background label b is defined (``background_label`` or ``bg_bias`` written in
    the prototxt): l == b adds bg_bias to channel b, other l in [0, C) add bg_bias to
    channel b and fg_bias to channel l; without one, fg_bias is added to channel l.
    Labels outside [0, C) that are not ignored are an error.  Backward copies the top
    diff to the scores; the labels get none.
    """
    exact_num_bottom = 2
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.bias_channel_param
        self.bg_bias, self.fg_bias = float(p.bg_bias), float(p.fg_bias)
        if self.bg_bias < 0 or self.fg_bias < 0:
            raise self.error(f"bias_channel_param: bg_bias and fg_bias must be non-negative, "
                             f"got {self.bg_bias} and {self.fg_bias}")
        self.ignore = {-1} | {int(v) for v in p.ignore_label}
        self.has_background = p.HasField("background_label") or p.HasField("bg_bias")
        self.background = int(p.background_label)
        self.pixel = p.label_type == p.PIXEL

    def reshape(self, bottom, top):
        scores, labels = bottom[0], bottom[1]
        lab = legacy_shape(labels.shape)         # the fork reads num/channels/height/width
        if scores.num_axes != 4 or lab is None:
            raise self.error(f"the scores must be 4-D and the labels at most 4-D, got "
                             f"{scores.shape} and {labels.shape}")
        if lab[0] != scores.shape[0]:
            raise self.error(f"scores {scores.shape} and labels {labels.shape} must have the "
                             f"same num")
        if lab[1] < 1:
            raise self.error(f"the label blob {labels.shape} is empty")
        if self.pixel:
            if lab[1] != 1 or lab[2:] != scores.shape[2:]:
                raise self.error(f"label_type PIXEL needs an N x 1 x H x W label map matching "
                                 f"the scores {scores.shape}; got {labels.shape}")
        elif lab[2:] != (1, 1):
            raise self.error(f"label_type IMAGE needs an N x L x 1 x 1 label list; got "
                             f"{labels.shape}")
        top[0].reshape(scores.shape)

    def _check(self, lab, ok, channels):
        bad = ~ok & ~np.isin(lab, list(self.ignore))
        if bad.any():
            raise self.error(f"unexpected label {int(lab[bad][0])}: labels must be in "
                             f"[0, {channels}), -1 or an ignore label {sorted(self.ignore)}")

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        out = bottom[0].data.copy()
        dtype = out.dtype.type
        n, channels = out.shape[:2]
        raw = _host(bottom[1].data)
        if not np.isfinite(raw).all():
            raise self.error(f"unexpected label {label_text(raw[~np.isfinite(raw)][0])}: "
                             f"labels must be finite numbers")
        lab = np.trunc(raw).astype(np.int64)
        if not self.pixel:
            lab = lab.reshape(n, -1)
            used = ~np.isin(lab, list(self.ignore))
            self._check(lab, ~used | ((lab >= 0) & (lab < channels)), channels)
            for j in range(lab.shape[1]):          # in list order: duplicates add again
                rows = np.nonzero(used[:, j])[0]
                if rows.size:
                    cls = lab[rows, j]
                    bias = np.where(cls == 0, self.bg_bias, self.fg_bias).astype(out.dtype)
                    out[xp.asarray(rows), xp.asarray(cls)] += xp.asarray(bias)[:, None, None]
        else:
            self._forward_pixel(xp, out, lab[:, 0], channels, dtype)
        top[0].data[...] = out

    def _forward_pixel(self, xp, out, lab, channels, dtype):
        used = ~np.isin(lab, list(self.ignore))
        in_range = (lab >= 0) & (lab < channels)
        if self.has_background:
            b = self.background
            is_bg = used & (lab == b)
            is_fg = used & ~is_bg & in_range
            self._check(lab, ~used | is_bg | in_range, channels)
            if (is_bg.any() or is_fg.any()) and not 0 <= b < channels:
                raise self.error(f"bias_channel_param.background_label {b} is not a channel "
                                 f"of the {channels}-channel scores")
            if is_bg.any() or is_fg.any():
                # Only the biased entries change (an untouched -0.0 keeps its sign).
                mask = xp.asarray(is_bg | is_fg)
                out[:, b] = xp.where(mask, out[:, b] + dtype(self.bg_bias), out[:, b])
        else:
            is_fg = used & in_range
            self._check(lab, ~used | in_range, channels)
        if is_fg.any():
            onehot = xp.arange(channels)[None, :, None, None] == xp.asarray(lab)[:, None]
            onehot &= xp.asarray(is_fg)[:, None]
            out[...] = xp.where(onehot, out + dtype(self.fg_bias), out)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[1]:
            raise self.error("cannot back-propagate to the label input (bottom 1)")
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff


@register("AdaptiveBiasChannel")
class AdaptiveBiasChannelLayer(Layer):
    """EM-Adapt's E-step biases (no gradient; the output makes targets via ArgMax).

    Per sample n, with the present labels from the N x L x 1 x 1 list (-1 skipped,
    others outside [0, C) an error; sorted, duplicates kept), P = H*W pixels:
    1. suppress_others: absent-class scores above m = min over present classes are set
       to m - margin_others;
    2. M = max over present classes; mu0 = mean(M) (summed in double);
    3. num_iter rounds: shuffle the labels after the background (label 0 stays
       first; the order carries over between rounds); for each label l: beta = the
       0-based nth smallest value of M - score_l (std::nth_element), nth =
       int(portion_l * P) with bg_portion for l == 0 and fg_portion otherwise
       (a portion of 1 gives nth = P, which the fork reads one past its buffer; here
       it is P - 1, the largest value); score_l += beta; M = max(M, score_l);
    4. every channel += mu0 - mean(M).
    The shuffles are std::random_shuffle over the C library's rand(), which nobody
    seeds: caffelite replays glibc's rand() stream from seed 1 per process
    (caffelite.caffe_rng.c_rand), so a run shuffles as the fork's does.
    """
    exact_num_bottom = 2
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.adaptive_bias_channel_param
        self.num_iter = int(p.num_iter)
        self.bg_portion, self.fg_portion = float(p.bg_portion), float(p.fg_portion)
        self.suppress_others = bool(p.suppress_others)
        self.margin_others = float(p.margin_others)
        if self.num_iter <= 0:
            raise self.error(f"adaptive_bias_channel_param.num_iter must be positive, "
                             f"got {self.num_iter}")
        if self.margin_others < 0:
            raise self.error(f"adaptive_bias_channel_param.margin_others must be "
                             f"non-negative, got {self.margin_others}")
        for name, value in (("bg_portion", self.bg_portion), ("fg_portion", self.fg_portion)):
            if not 0 <= value <= 1:
                raise self.error(f"adaptive_bias_channel_param.{name} must be in [0, 1], "
                                 f"got {value}")
        self.c_rand = c_rand()

    def reshape(self, bottom, top):
        scores, labels = bottom[0], bottom[1]
        if scores.num_axes != 4:
            raise self.error(f"the scores must be N x C x H x W, got {scores.shape}")
        if scores.shape[1] <= 1:
            raise self.error(f"the scores need more than one channel, got {scores.shape}")
        lab = legacy_shape(labels.shape)         # an N x L list works as N x L x 1 x 1
        if lab is None or lab[0] != scores.shape[0] or lab[1] < 1 or lab[2:] != (1, 1):
            raise self.error(f"the label list must be N x L x 1 x 1 with the scores' N "
                             f"({scores.shape[0]}) and L >= 1; got {labels.shape}")
        top[0].reshape(scores.shape)

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        out = bottom[0].data.copy()
        n, channels = out.shape[:2]
        lists = np.trunc(_host(bottom[1].data).reshape(n, -1)).astype(np.int64)
        for i in range(n):
            row = lists[i][lists[i] != -1]
            bad = (row < 0) | (row >= channels)
            if bad.any():
                raise self.error(f"sample {i}: unexpected label {int(row[bad][0])} in the "
                                 f"label list; labels must be in [0, {channels}) or -1 "
                                 f"(there are no ignore labels here)")
            if row.size:
                self._bias_sample(xp, out[i].reshape(channels, -1), np.sort(row))
        top[0].data[...] = out

    def _bias_sample(self, xp, scores, labels):
        """In place on one sample's C x P scores."""
        dtype = scores.dtype.type
        size = scores.shape[1]
        present = np.zeros(scores.shape[0], bool)
        present[labels] = True
        if self.suppress_others:
            floor = scores[xp.asarray(np.nonzero(present)[0])].min(axis=0)
            absent = scores[xp.asarray(np.nonzero(~present)[0])]
            scores[xp.asarray(np.nonzero(~present)[0])] = xp.where(
                absent > floor, floor - dtype(self.margin_others), absent)
        running_max = scores[xp.asarray(labels)].max(axis=0)
        mean0 = self._mean(xp, running_max)
        labels = labels.copy()
        start = int(labels[0] == 0)          # the background stays first
        for _ in range(self.num_iter):
            self._shuffle(labels[start:])
            for label in labels:
                portion = self.bg_portion if label == 0 else self.fg_portion
                nth = min(int(dtype(portion) * dtype(size)), size - 1)
                gap = running_max - scores[label]
                beta = xp.partition(gap, nth)[nth]
                scores[label] += beta
                running_max = xp.maximum(running_max, scores[label])
        mean1 = self._mean(xp, running_max)
        scores += dtype(mean0 - mean1)

    @staticmethod
    def _mean(xp, values):
        """Sequential double-precision sum / count (the fork's accumulation order)."""
        return float(xp.cumsum(values.astype(np.float64))[-1]) / values.size

    def _shuffle(self, items):
        """std::random_shuffle(items) with rand()."""
        random_shuffle(self.c_rand, items)

    def backward(self, top, propagate_down, bottom):
        """No gradient (the fork's backward is empty): bottom diffs stay untouched."""
