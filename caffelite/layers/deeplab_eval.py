"""DeepLab's feature files and evaluation: MatWrite (blobs to .mat), MatRead (.mat to
a top) and SegAccuracy (confusion-matrix scores), spec sections 4 and 5."""
import logging
import os

import numpy as np

from ..backend import get_array_module
from ..blob import legacy_shape
from ..io.matfile import MatFileError, read_mat, write_mat
from ..layer import Layer, register
from ._device import contiguous, launch, on_device
from .argmax import argmax_ties_highest
from .image_data import C_TOKEN, getlines, read_list_text
from .softmax import label_text, truncated_labels

logger = logging.getLogger("caffelite")


def _to_numpy(array):
    get = getattr(array, "get", None)       # CuPy arrays copy to the host with .get()
    return get() if get is not None else np.asarray(array)


def read_id_list(path, strip, layer):
    """First token of each line of ``path`` minus ``strip`` trailing characters.

    Blank lines are skipped (the fork stops with "Too much stripping" on them).
    """
    return [name for _, name in numbered_id_list(path, strip, layer)]


def numbered_id_list(path, strip, layer):
    """``read_id_list`` as (line number, id) pairs."""
    if strip < 0:
        raise layer.error(f"strip cannot be negative (got {strip})")
    # raw bytes, std::getline lines and ``>>``'s first token, as the fork reads them
    lines = getlines(read_list_text(path, layer))
    names = []
    for lineno, line in enumerate(lines, 1):
        first = C_TOKEN.search(line)
        if first is None:
            continue
        tok = os.fsencode(first.group())        # strip counts bytes, as substr does
        if len(tok) <= strip:
            raise layer.error(f"{path}:{lineno}: '{first.group()}' is not longer than "
                              f"strip={strip} bytes (too much stripping)")
        names.append((lineno, os.fsdecode(tok[:len(tok) - strip] if strip else tok)))
    return names


def image_path_hint(source, numbered):
    """A hint when a MatWrite source lists image paths (the kit's ``val.txt``) where
    ids belong (``val_id.txt``); None when no id looks like one."""
    from ..evaluate import IMAGE_EXTENSIONS
    for lineno, name in numbered:
        if name.lower().endswith(IMAGE_EXTENSIONS):
            return (f"{source}:{lineno}: '{name}' looks like an image path, not an id: "
                    f"mat_write_param.source lists ids, one per line (the kit's "
                    f"${{TEST_SET}}_id.txt, not the image list ${{TEST_SET}}.txt); the "
                    f"files are named prefix + id + '_blob_N.mat'")
    return None


@register("MatWrite")
class MatWriteLayer(Layer):
    """Writes each bottom to ``prefix + id + "_blob_" + i + ".mat"`` every ``period``
    forwards (``prefix + "iter_" + iter`` without a source list); the whole blob, all
    N images, goes into one file (matio layout, see ``caffelite.io.matfile``)."""
    runs_on_device = False
    writes_files = True
    min_bottom = 1
    exact_num_top = 0

    def setup(self, bottom, top):
        p = self.layer_param.mat_write_param
        if p.period <= 0:
            raise self.error(f"mat_write_param.period must be positive (got {p.period})")
        self.prefix, self.period = p.prefix, p.period
        self.names, self.hint = None, None
        if p.HasField("source"):
            numbered = numbered_id_list(p.source, p.strip, self)
            self.names = [name for _, name in numbered]
            self.hint = image_path_hint(p.source, numbered)
            if self.hint:
                logger.warning("layer '%s': %s", self.name, self.hint)
        self.iter = 0
        directory = os.path.dirname(self.prefix)
        if directory and not os.path.isdir(directory):
            logger.warning("layer '%s': output directory '%s' (from prefix '%s') does not "
                           "exist yet; writing will fail unless it is created", self.name,
                           directory, self.prefix)

    def reshape(self, bottom, top):
        """No tops."""

    def forward(self, bottom, top):
        if self.iter % self.period == 0:
            if self.names is not None:
                if self.iter >= len(self.names):
                    raise self.error(
                        f"test has run for more iterations than it was supposed to: "
                        f"forward #{self.iter + 1} but the source list "
                        f"'{self.layer_param.mat_write_param.source}' has "
                        f"{len(self.names)} names (run {len(self.names)} iterations)")
                stem = self.prefix + self.names[self.iter]
            else:
                stem = f"{self.prefix}iter_{self.iter}"
            for i, b in enumerate(bottom):
                try:
                    write_mat(f"{stem}_blob_{i}.mat", _to_numpy(b.data))
                except MatFileError as e:
                    raise self.error(f"{e}; {self.hint}" if self.hint else str(e)
                                     ) from None
        self.iter += 1


@register("MatRead")
class MatReadLayer(Layer):
    """Reads ``prefix + name + "_blob_0.mat"`` (variable ``data``, one image per file)
    into sample n of the top, one file per sample, wrapping around the name list.

    Without ``source`` it reads ``prefix + "iter_" + k + "_blob_0.mat"`` for k = 0, 1, ...
    (the files MatWrite writes without a source); the fork crashes there instead.
    An optional ``diff`` variable is checked like the fork does but, as in the fork,
    not copied into the top.  ``state_dict()``/``load_state_dict()`` save the file
    position for a bit-identical resume.
    """
    runs_on_device = False
    exact_num_bottom = 0
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.mat_read_param
        if p.batch_size <= 0:
            raise self.error(f"mat_read_param.batch_size must be positive (got {p.batch_size})")
        self.prefix, self.batch_size = p.prefix, p.batch_size
        self.names = None
        if p.HasField("source"):
            self.names = read_id_list(p.source, p.strip, self)
            if not self.names:
                raise self.error(f"source list '{p.source}' has no names")
        self.iter = 0
        for i, t in enumerate(top):
            data = self._read(self._path(0, i))
            t.reshape((self.batch_size,) + data.shape[1:])

    def _path(self, index, top_index):
        name = self.names[index] if self.names is not None else f"iter_{index}"
        return f"{self.prefix}{name}_blob_{top_index}.mat"

    def _read(self, path):
        try:
            data, _ = read_mat(path, self.dtype)
        except MatFileError as e:
            raise self.error(str(e)) from None
        if data.shape[0] != 1:
            raise self.error(f"'{path}' holds {data.shape[0]} images (dims [W,H,C,N] = "
                             f"{list(data.shape[::-1])}); MatRead needs N = 1 per file")
        return data

    def reshape(self, bottom, top):
        """Shapes are fixed at setup (the fork's Reshape is a no-op)."""

    def forward(self, bottom, top):
        for n in range(self.batch_size):
            if self.names is not None and self.iter >= len(self.names):
                self.iter = 0
            for i, t in enumerate(top):
                path = self._path(self.iter, i)
                data = self._read(path)
                if data.shape[1:] != t.shape[1:]:
                    raise self.error(f"'{path}' holds a C x H x W = {data.shape[1:]} blob, "
                                     f"but the top is {t.shape[1:]} (from the first file)")
                t.data[n] = data[0]
            self.iter += 1

    def state_dict(self):
        return {"iter": self.iter}

    def load_state_dict(self, state):
        self.iter = int(state["iter"])


@register("SegAccuracy")
class SegAccuracyLayer(Layer):
    """Confusion-matrix scores [pixel accuracy, mean class recall, mean IoU].

    The C x C matrix (C = channels of the scores at setup) is cleared at every forward
    when ``reset`` (the default) and accumulates over the net's lifetime otherwise.
    Prediction = argmax over channels with ties to the highest class; the label is
    truncated to int; ignore labels are skipped; any other label outside [0, C) is an
    error.  On the device the ``seg_confusion`` kernel counts into a uint64 matrix kept
    on the device; only that C x C matrix (and the first bad pixel) come back to the
    host, where the scores are computed.
    """
    exact_num_bottom = 2
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.seg_accuracy_param
        self.ignore = sorted(set(int(i) for i in p.ignore_label))
        self.reset = p.reset
        if len(bottom[0].shape) < 2 or bottom[0].shape[1] < 1:
            raise self.error(f"scores must be N x C x H x W with C >= 1, got {bottom[0].shape}")
        self.num_classes = bottom[0].shape[1]
        self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)

    def reshape(self, bottom, top):
        # The fork checks the legacy num/channels/height/width, which are 1 for missing
        # axes: (N, C, H) scores with (N, 1, H) labels work too.
        s, l = _legacy_shape(bottom[0].shape), _legacy_shape(bottom[1].shape)
        if s is None or l is None or l[1] != 1 or (s[0], s[2], s[3]) != (l[0], l[2], l[3]):
            raise self.error(f"labels must be N x 1 x H x W matching the scores N x C x H x W;"
                             f" got scores {bottom[0].shape} and labels {bottom[1].shape}")
        if s[1] != self.num_classes:
            raise self.error(f"the scores have {s[1]} channels, but the confusion matrix was "
                             f"set up for {self.num_classes} classes")
        top[0].reshape((1, 1, 1, 3))

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        if on_device(xp):
            self._forward_device(xp, bottom, top)
            return
        if get_array_module(self.confusion) is not np:      # accumulated on the device
            self.confusion = _to_numpy(self.confusion).astype(np.int64)
        if self.reset:
            self.confusion[...] = 0
        c = self.num_classes
        pred = argmax_ties_highest(np, _to_numpy(bottom[0].data), axis=1).reshape(-1)
        labels = _to_numpy(bottom[1].data).reshape(-1)
        gt, integer = truncated_labels(np, labels)
        keep = ~np.isin(gt, self.ignore) | ~integer     # no int value: a bad label
        bad = keep & ((gt < 0) | (gt >= c))
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            self._bad_label(labels[first], first, bottom[1].shape)
        self.confusion += np.bincount(gt[keep] * c + pred[keep],
                                      minlength=c * c).reshape(c, c)
        top[0].data[...] = np.array(confusion_scores(self.confusion)).reshape(1, 1, 1, 3)

    def _forward_device(self, xp, bottom, top):
        c = self.num_classes
        if get_array_module(self.confusion) is not xp:
            self.confusion = xp.asarray(np.asarray(_to_numpy(self.confusion), np.uint64))
        if self.reset:
            self.confusion[...] = 0
        scores, labels = contiguous(xp, bottom[0].data), contiguous(xp, bottom[1].data)
        n = labels.size
        first_bad = xp.full((1,), n, np.int32)
        launch("seg_confusion", "seg_confusion", scores.dtype, n, scores, labels, c,
               n // max(bottom[0].shape[0], 1), self._device_ignore(xp), len(self.ignore),
               self.confusion, first_bad)
        # the matrix and the first bad label's index in one device-to-host copy
        packed = _to_numpy(xp.concatenate([self.confusion.reshape(-1),
                                           first_bad.astype(np.uint64)]))
        bad = int(packed[-1])
        if bad < n:
            self._bad_label(_to_numpy(labels.reshape(-1)[bad:bad + 1])[0], bad,
                            bottom[1].shape)
        host = packed[:-1].reshape(c, c).astype(np.int64)
        top[0].data[...] = xp.asarray(np.array(confusion_scores(host), top[0].data.dtype)
                                      .reshape(1, 1, 1, 3))

    def _device_ignore(self, xp):
        """The ignore labels as a device int32 array, uploaded once. The kernel reads
        ignore[0] only when num_ignore > 0; it gets one element anyway."""
        cached = getattr(self, "_ignore_on_device", None)
        if cached is None or get_array_module(cached) is not xp:
            cached = self._ignore_on_device = xp.asarray(
                np.asarray(self.ignore or [0], np.int32))
        return cached

    def _bad_label(self, label, index, label_shape):
        """Report the label value as stored (NaN, inf and fractions included)."""
        legacy = _legacy_shape(label_shape)
        n, h, w = np.unravel_index(index, legacy[:1] + legacy[2:])
        error = self.error(f"unexpected label {label_text(label)} at num {n}, row {h}, col "
                           f"{w} (labels must be in [0, {self.num_classes}) or one of the "
                           f"ignore labels {self.ignore})")
        error.batch_item = int(n)           # the Net names the list line it came from
        raise error


def _legacy_shape(shape):
    """Caffe's (num, channels, height, width) of a blob of 2 to 4 axes, else None."""
    return legacy_shape(shape) if len(shape) >= 2 else None


def confusion_scores(m):
    """(pixel accuracy, mean recall over present classes, mean IoU over all classes),
    summed class by class in double like the fork's ConfusionMatrix."""
    m = np.asarray(m)
    total = float(m.sum())
    diag = [float(m[i, i]) for i in range(len(m))]
    rows = [float(r) for r in m.sum(axis=1)]
    cols = [float(c) for c in m.sum(axis=0)]
    accuracy = sum(diag) / total if total else 0.0
    recall_sum, present = 0.0, 0
    for d, r in zip(diag, rows):
        if r > 0:
            recall_sum += d / r
            present += 1
    recall = recall_sum / present if present else 0.0
    iou_sum = 0.0
    for d, r, c in zip(diag, rows, cols):
        union = r + c - d
        iou_sum += 1.0 if d == union else d / union    # absent class: 0/0 counts as 1
    return accuracy, recall, iou_sum / len(m) if len(m) else 0.0
