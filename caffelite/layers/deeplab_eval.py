"""DeepLab's evaluation outputs: MatWrite (features to .mat) and SegAccuracy."""
import os

import numpy as np

from ..io.matfile import write_mat
from ..layer import Layer, register


def read_id_list(path, strip, layer):
    """First token of each line of a list file, minus ``strip`` trailing characters."""
    try:
        with open(path, encoding="utf-8") as f:
            tokens = [line.split()[0] for line in f if line.strip()]
    except OSError as e:
        raise layer.error(f"cannot read source list '{path}': {e.strerror}") from None
    names = []
    for lineno, tok in enumerate(tokens, 1):
        if len(tok) <= strip:
            raise layer.error(f"{path}:{lineno}: '{tok}' is not longer than strip={strip}")
        names.append(tok[:len(tok) - strip] if strip else tok)
    return names


@register("MatWrite")
class MatWriteLayer(Layer):
    """Writes each bottom to ``prefix + id + "_blob_" + i + ".mat"`` every ``period`` forwards."""
    min_bottom = 1
    exact_num_top = 0

    def setup(self, bottom, top):
        p = self.layer_param.mat_write_param
        if p.period <= 0:
            raise self.error("mat_write_param.period must be positive")
        self.prefix, self.period = p.prefix, p.period
        self.names = read_id_list(p.source, p.strip, self) if p.source else None
        self.iter = 0
        directory = os.path.dirname(self.prefix)
        if directory and not os.path.isdir(directory):
            raise self.error(f"output directory '{directory}' (from prefix '{self.prefix}') "
                             f"does not exist")

    def reshape(self, bottom, top):
        """No tops."""

    def forward(self, bottom, top):
        if self.iter % self.period == 0:
            if self.names is not None:
                if self.iter >= len(self.names):
                    raise self.error("test has run for more iterations than the source list "
                                     f"has lines ({len(self.names)})")
                stem = self.prefix + self.names[self.iter]
            else:
                stem = f"{self.prefix}iter_{self.iter}"
            for i, b in enumerate(bottom):
                write_mat(f"{stem}_blob_{i}.mat", b.data)
        self.iter += 1


def argmax_ties_highest(scores, axis=1):
    """Argmax that gives ties to the highest index (Caffe's partial-sort order)."""
    flipped = np.flip(scores, axis=axis)
    return scores.shape[axis] - 1 - np.argmax(flipped, axis=axis)


@register("SegAccuracy")
class SegAccuracyLayer(Layer):
    """Confusion-matrix accuracy: [pixel accuracy, mean class recall, mean IoU]."""
    exact_num_bottom = 2
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.seg_accuracy_param
        self.ignore = set(int(i) for i in p.ignore_label)
        self.reset = p.reset
        self.num_classes = bottom[0].shape[1]
        self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)

    def reshape(self, bottom, top):
        s, l = bottom[0].shape, bottom[1].shape
        if len(l) != 4 or l[1] != 1 or (s[0], s[2], s[3]) != (l[0], l[2], l[3]):
            raise self.error(f"labels must be N x 1 x H x W matching scores {s}, got {l}")
        top[0].reshape((1, 1, 1, 3))

    def forward(self, bottom, top):
        if self.reset:
            self.confusion[...] = 0
        pred = argmax_ties_highest(bottom[0].data).reshape(-1)
        gt = bottom[1].data.reshape(-1).astype(np.int64)   # truncation like int()
        keep = ~np.isin(gt, list(self.ignore)) if self.ignore else np.ones(gt.shape, bool)
        gt, pred = gt[keep], pred[keep]
        bad = (gt < 0) | (gt >= self.num_classes)
        if bad.any():
            raise self.error(f"unexpected label {int(gt[bad][0])} (num classes "
                             f"{self.num_classes}, ignore labels {sorted(self.ignore)})")
        self.confusion += np.bincount(gt * self.num_classes + pred,
                                      minlength=self.num_classes ** 2).reshape(
                                          self.num_classes, self.num_classes)
        top[0].data[...] = np.array(confusion_scores(self.confusion)).reshape(1, 1, 1, 3)


def confusion_scores(m):
    """(pixel accuracy, mean recall over present classes, mean IoU over all classes)."""
    m = m.astype(np.float64)
    total = m.sum()
    diag = np.diag(m)
    rows, cols = m.sum(axis=1), m.sum(axis=0)
    accuracy = diag.sum() / total if total else 0.0
    present = rows > 0
    recall = float(np.mean(diag[present] / rows[present])) if present.any() else 0.0
    union = rows + cols - diag
    iou = np.where(union > 0, diag / np.where(union > 0, union, 1), 1.0)
    return accuracy, recall, float(iou.mean())
