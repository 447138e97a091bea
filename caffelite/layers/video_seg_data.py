"""VideoSegData: ImageSegData with a background image stacked after the image
channels (the DeepLab v2 fork's "video seg data layer"; spec deeplab_extra_layers.md
section 5)."""
import numpy as np

from ..io.image import INTER_LINEAR, resize
from .image_data import (LABEL_PIXEL, DataError, ImageSegDataLayer, ListEntry,
                         _build_seg_batch, _load, until_exit)
from ..layer import register


@register("VideoSegData")
class VideoSegDataLayer(ImageSegDataLayer):
    """List lines ``<image> <label> <background>`` (label_type PIXEL) or ``<image>
    <background>`` (NONE, and IMAGE, the default), paths prefixed with root_folder; a
    blank line is a sample that fails when reached, as ImageSegData's.

    Tops: data N x 6 x h x w -- channels 0-2 the image through ImageSegData's whole
    pipeline (scale factors, padding, crop, mirror, ``(pixel - mean) * scale``),
    channels 3-5 the background image resized (bilinear) straight to h x w and
    mean-subtracted, with no random scaling, crop, mirror or ``scale``; label and
    data_dim exactly as ImageSegData.  Only 3-channel (colour) images work, as in the
    fork.  With label_type IMAGE the fork reads the background from the second column,
    and the label map is that column's atoi, as ImageSegData's IMAGE label (0 for a
    path; a third column is ignored).
    """

    def setup(self, bottom, top):
        super().setup(bottom, top)
        if self.config.channels != 3:
            self.close()
            raise self.error(f"VideoSegData needs colour (3-channel) images; the first image "
                             f"has {self.config.channels} channel(s) (is_color: false?)")
        n, c, h, w = self.top_shapes[0]
        self.top_shapes[0] = (n, 2 * c, h, w)
        top[0].reshape(self.top_shapes[0])

    def parse_list_line(self, tokens, line, lineno):
        """ImageSegData's two fields and the background path."""
        p = self.layer_param.image_data_param
        column = 2 if p.label_type == LABEL_PIXEL else 1
        if len(tokens) <= column:
            layout = ("'<image> <label> <background>'" if column == 2
                      else "'<image> <background>'")
            raise self.error(f"{p.source}:{lineno}: no background column (expected "
                             f"{layout})")
        return super().parse_list_line(tokens, line, lineno) + (tokens[column],)

    def plan_batch(self):
        fn, (cfg, samples) = super().plan_batch()
        return _build_video_batch, (cfg, samples)


def _build_video_batch(cfg, samples):
    seg_samples = [(ListEntry(entry.lineno, entry.fields and entry.fields[:2]), draws)
                   for entry, draws in samples]   # a blank line (fields None) fails there
    data, label, dims = _build_seg_batch(cfg, seg_samples)
    h, w = cfg.top_size
    dtype = np.dtype(cfg.dtype)
    means = np.asarray(cfg.means or [0.0] * cfg.channels, dtype)
    backgrounds = np.empty((len(samples), cfg.channels, h, w), dtype)
    for i, (entry, _) in enumerate(until_exit(samples)):
        img = _load(cfg.root, entry.fields[2], "background image", entry, cfg.source,
                    cfg.is_color)
        if img.ndim == 2:
            img = img[:, :, None]
        if img.shape[2] != cfg.channels:
            raise DataError(f"{cfg.source}:{entry.lineno}: background '{entry.fields[2]}' "
                            f"has {img.shape[2]} channels, the images {cfg.channels}")
        img = resize(img, (h, w), INTER_LINEAR)
        if img.ndim == 2:
            img = img[:, :, None]
        backgrounds[i] = (img.astype(dtype) - means).transpose(2, 0, 1)
    return np.concatenate([data, backgrounds], axis=1), label, dims
