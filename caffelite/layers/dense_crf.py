"""DenseCRF: the DeepLab fork's fully connected CRF as a layer (``densecrf_layer.cpp``),
inference only, with the mean field of ``caffelite.crf``."""
import numpy as np

from .. import backend
from ..backend import get_array_module
from ..crf.densecrf import PottsKernel, bilateral_features, mean_field, position_features
from ..layer import Layer, register

# The fork's fast_exp returns 0 for arguments below -20 (after the max is subtracted).
FAST_EXP_CUTOFF = 20.0


@register("DenseCRF")
class DenseCRFLayer(Layer):
    """Bottoms: [0] scores N x M x H x W (the DCNN output after Interp), [1] data_dim
    N x 1 x 1 x 2 (image height, width), [2] the data blob (mean-subtracted BGR,
    N x 3 x H x W).  Top: N x M x H x W marginals Q (``output_probability``, default)
    or ``log(max(Q, FLT_MIN))``.

    Per image the CRF runs on the whole blob when it is not larger than the image in
    either axis, else on the image's h x w (top left); outputs outside it are 0.  An
    image larger than the blob in one axis only makes the fork's loops wrap rows; that
    is followed too (``_forward_wrapped``).  Unary = -score (logits, no softmax); one positional
    kernel per (pos_w, pos_xy_std) with features (x, y) / pos_xy_std, then one
    bilateral kernel per (bi_w, bi_xy_std, bi_rgb_std) with features (x/xy, y/xy,
    B/rgb, G/rgb, R/rgb) of the mean-subtracted data -- always image 0's, for every
    image of the batch, as in the fork (which never offsets its image pointer by n;
    test nets run one image per batch); Potts, NORMALIZE_AFTER,
    ``max_iter`` mean-field steps, labels more than 20 below a pixel's best at Q = 0
    (the fork's ``fast_exp``).  No backward (the fork's is empty).
    """
    runs_on_device = False
    min_bottom = 2
    max_bottom = 3
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.layer_param.dense_crf_param
        self.max_iter = max(int(p.max_iter), 0)
        self.pos = list(zip(p.pos_w, p.pos_xy_std))
        self.bi = list(zip(p.bi_w, p.bi_xy_std, p.bi_rgb_std))
        self.output_probability = p.output_probability
        self._unary_element = self._map_element = 0
        if len(p.pos_w) != len(p.pos_xy_std):
            raise self.error(f"dense_crf_param has {len(p.pos_w)} pos_w but "
                             f"{len(p.pos_xy_std)} pos_xy_std; give one of each per "
                             f"positional kernel")
        if not len(p.bi_w) == len(p.bi_xy_std) == len(p.bi_rgb_std):
            raise self.error(f"dense_crf_param has {len(p.bi_w)} bi_w, {len(p.bi_xy_std)} "
                             f"bi_xy_std and {len(p.bi_rgb_std)} bi_rgb_std; give one of "
                             f"each per bilateral kernel")
        for name in ("pos_xy_std", "bi_xy_std", "bi_rgb_std"):
            bad = [v for v in getattr(p, name) if not v > 0]
            if bad:
                raise self.error(f"dense_crf_param.{name} must be positive, got {bad[0]:g}")
        if len(bottom) < 3:
            raise self.error("needs three bottoms: scores, data_dim and the image (the "
                             "fork's Reshape reads the image blob even without bilateral "
                             "kernels)")
        if not self.bi:
            raise self.error("has the image as a bottom but no bilateral kernel "
                             "(dense_crf_param.bi_w / bi_xy_std / bi_rgb_std)")
        if bottom[2].num_axes != 4 or bottom[2].shape[1] != 3:
            raise self.error(f"the image bottom '{self._bottom_name(2)}' must be "
                             f"N x 3 x H x W (colour), got shape {bottom[2].shape}")

    def _bottom_name(self, i):
        names = list(self.layer_param.bottom)
        return names[i] if i < len(names) else f"bottom[{i}]"

    def reshape(self, bottom, top):
        scores, dims, image = bottom[0], bottom[1], bottom[2]
        if scores.num_axes != 4:
            raise self.error(f"scores '{self._bottom_name(0)}' must be N x M x H x W, got "
                             f"shape {scores.shape}")
        num = scores.shape[0]
        if dims.shape[0] != num or image.shape[0] != num:
            raise self.error(f"scores, data_dim and image hold {num}, {dims.shape[0]} and "
                             f"{image.shape[0]} images; they must agree")
        if dims.count // max(num, 1) < 2:
            raise self.error(f"data_dim '{self._bottom_name(1)}' must hold (height, width) "
                             f"per image, got shape {dims.shape}")
        if tuple(image.shape[2:]) != tuple(scores.shape[2:]):
            raise self.error(f"scores are {scores.shape[2]}x{scores.shape[3]} but the image "
                             f"'{self._bottom_name(2)}' is {image.shape[2]}x{image.shape[3]}"
                             f"; upsample the scores to the input size (Interp) first")
        top[0].reshape(scores.shape)
        # Densecrf_layer.cpp's map_element_: the pixel count of the blob that had the
        # most scores so far (its buffers only grow).
        pixels = scores.shape[2] * scores.shape[3]
        if pixels * scores.shape[1] > self._unary_element:
            self._unary_element = pixels * scores.shape[1]
            self._map_element = pixels

    def forward(self, bottom, top):
        xp = get_array_module(bottom[0].data)
        to_host = (lambda a: np.asarray(a)) if xp is np else (lambda a: xp.asnumpy(a))
        scores = to_host(bottom[0].data)
        dims = to_host(bottom[1].data).reshape(scores.shape[0], -1)
        image = to_host(bottom[2].data)
        num, _, blob_h, blob_w = scores.shape
        out = np.zeros(scores.shape, top[0].dtype)
        for n in range(num):
            height, width = self._region_size(dims[n], blob_h, blob_w)
            if height <= 0 or width <= 0:
                continue
            if height > blob_h or width > blob_w:
                self._forward_wrapped(n, height, width, scores, image, out)
                continue
            # The fork's bilateral features read bottom[2] without the offset of image
            # n, so every image of a batch sees image 0's colours (densecrf_layer.cpp).
            q = self._probability_or_log(
                self.infer(scores[n, :, :height, :width], image[0, :, :height, :width]))
            out[n, :, :height, :width] = q
        top[0].data[...] = xp.asarray(out)

    def _region_size(self, dims, blob_h, blob_w):
        """The fork's H_ x W_: the whole blob when it is not larger than the image in
        either axis, else the image's own size -- in both axes, even when the image is
        larger than the blob in one of them."""
        real_h, real_w = int(dims[0]), int(dims[1])
        if blob_h <= real_h and blob_w <= real_w:
            return blob_h, blob_w
        return real_h, real_w

    def _probability_or_log(self, q):
        if self.output_probability:
            return q
        return np.log(np.maximum(q, np.finfo(np.float32).tiny).astype(np.float64))

    def _forward_wrapped(self, n, height, width, scores, image, out):
        """An image larger than the blob in one axis only: the fork's loops index the
        blob as (c * H + h) * W + w with h < height and w < width, so rows wrap into the
        next row (and a channel into the next channel, an image into the next one)."""
        num, channels, blob_h, blob_w = scores.shape
        plane = blob_h * blob_w
        if height * width > self._map_element:
            raise self.error(f"image {n}'s data_dim {height} x {width} has more pixels than "
                             f"the {blob_h} x {blob_w} blob (the fork stops here: 'The "
                             f"pre-allocated memory is not enough!')")
        offsets = (np.arange(height)[:, None] * blob_w + np.arange(width)).reshape(-1)
        score_index = (n * channels + np.arange(channels))[:, None] * plane + offsets
        colour_index = np.arange(3)[:, None] * plane + offsets
        if score_index.max() >= scores.size or colour_index.max() >= image.size:
            raise self.error(f"image {n}'s data_dim {height} x {width} makes the fork's "
                             f"loops read past the {blob_h} x {blob_w} blobs")
        region = (channels, height, width)
        q = self._probability_or_log(self.infer(
            scores.reshape(-1)[score_index].reshape(region),
            image.reshape(-1)[colour_index].reshape((3, height, width))))
        # Written in the fork's order (pixel by pixel, channels innermost): where two
        # pixels land on one element, the later one stays.
        targets = (np.arange(channels)[None, :] * plane + offsets[:, None]).reshape(-1)
        values = q.reshape(channels, -1).T.reshape(-1)
        last = targets.size - 1 - np.unique(targets[::-1], return_index=True)[1]
        # What spills into the next image's part is cleared when that image is done
        # (the last image cannot spill: its reads were checked above).
        inside = targets[last] < channels * plane
        out[n].reshape(-1)[targets[last][inside]] = values[last][inside]

    def infer(self, scores, bgr):
        """Q (M x h x w, float32) for one image: scores M x h x w, bgr 3 x h x w."""
        height, width = scores.shape[1:]
        pixels = np.ascontiguousarray(np.asarray(bgr, np.float32).transpose(1, 2, 0))
        kernels = [PottsKernel(position_features(height, width, std), w)
                   for w, std in self.pos]
        kernels += [PottsKernel(bilateral_features(pixels, xy, rgb), w)
                    for w, xy, rgb in self.bi]
        return mean_field(-np.asarray(scores, np.float32), kernels, self.max_iter,
                          exp_cutoff=FAST_EXP_CUTOFF, device=self._crf_device())

    @staticmethod
    def _crf_device():
        """In GPU mode the mean field runs on the device (caffelite.crf.device): the
        emulator's when GPU mode is emulated, else the selected GPU."""
        if not backend.is_gpu():
            return None
        from ..crf import device
        return device.resolve(backend._state["device"])
