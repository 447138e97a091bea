"""Fully connected CRF with Gaussian edge potentials (Krähenbühl & Koltun, NIPS 2011)
as DeepLab post-processes with it: mean-field inference, Potts compatibility, one
positional ("Gaussian") and one bilateral (position + colour) kernel, message passing
by permutohedral-lattice filtering with per-pixel normalisation.

Energy over labels x, with unary ``U`` (label x pixel)::

    E(x) = sum_i U_i(x_i)
         + sum_{i<j} [x_i != x_j] * ( pos_w * exp(-|p_i - p_j|^2 / (2 pos_xy_std^2))
                                    + bi_w  * exp(-|p_i - p_j|^2 / (2 bi_xy_std^2)
                                                  -|I_i - I_j|^2 / (2 bi_rgb_std^2)) )

Mean field (``relax = 1``), as ``DenseCRF::inference`` with ``NORMALIZE_AFTER``::

    Q = softmax(-U)
    repeat max_iter times:
        Q = softmax(-U + sum_k w_k * norm_k * (K_k Q))     norm_k = 1 / (K_k 1 + 1e-20)

where ``K_k Q`` is the lattice-filtered field (the sum runs over every pixel, the pixel
itself included) and ``norm_k`` is computed once per image by filtering ones.  The
output is the marginal Q; labels are its argmax (first maximum on ties).

**Unaries.**  The refine program of the kit (``prog_refine_pascal_v4``) uses
``U = -score`` with the raw DCNN logits (so Q0 = softmax(logits)); its ``.bin`` twin
uses ``U = -log(prob)``, which differs from -logit by a per-pixel constant and so gives
the same Q.  ``unary_from_scores`` / ``unary_from_probabilities`` make either.

**Features.**  Positions are (column/x std, row/y std); the standalone program reads RGB
from PPMs, so colours are (R/R std, G/G std, B/B std) (``bilateral_features(rgb, ...)``;
the y, G and B stds default to the x and R ones, see ``CRFParams``); the Caffe
``DenseCRF`` layer uses the network's mean-subtracted BGR input instead (image 0's for
every image of a batch, as the fork's layer does).  Changing the colour order or offset
changes the lattice approximation (≈1 % of the labels), so each caller passes the
channels its original used.

**Parameters** (names of ``run_densecrf.sh``; defaults = ``prog_refine_pascal_v4``'s):

====================================================  ====  =========  ==========  =====  ==========
model / source                                        bi_w  bi_xy_std  bi_rgb_std  pos_w  pos_xy_std
====================================================  ====  =========  ==========  =====  ==========
``prog_refine_pascal_v4`` defaults (``CRFParams()``)  5     70         5           3      3
DeepLab-LargeFOV, ``run_densecrf.sh`` example         4     49         5           3      3
DeepLab (v1, vgg128_noup), SetupEnv.m                 5     50         10          3      3
DeepLab-MSc (vgg128_ms_pool3), SetupEnv.m             3     95         3           3      3
DeepLab-COCO (vgg128_noup_pool3_cocomix), SetupEnv.m  5     67         3           3      3
Bbox-Seg erode_gt, SetupEnv.m                         41    33         4           3      3
Bbox-Seg bboxErode20, SetupEnv.m                      45    37         3           15     3
SetupEnv.m defaults                                   5     50         3           3      3
DenseCRF layer, ResNet-101 MSC test prototxt          5     21         3           4      1
====================================================  ====  =========  ==========  =====  ==========

``max_iter`` is 10 everywhere (paper protocol: 10 iterations, pos_w = pos_xy_std = 3
fixed, the bilateral ones cross-validated on 100 val images).  ``PUBLISHED_PARAMS``
holds these rows.  ``prog_refine_pascal`` (the .bin-input variant) defaults to
bi_w 10, bi_xy_std 60, bi_rgb_std 20.
"""
import math
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from .permutohedral import (LatticeFilter, PermutohedralLattice, _add_product, _host,
                            check_features)

_F32 = np.float32


@dataclass(frozen=True)
class CRFParams:
    """The refine program's parameters, with ``prog_refine_pascal_v4``'s defaults.

    The program takes the x and y stds (``-px -py``, ``-bx -by``) and the R, G, B stds
    (``-br -bg -bb``) separately; ``pos_xy_std``, ``bi_xy_std`` and ``bi_rgb_std`` are
    the x and R ones, and ``pos_y_std``, ``bi_y_std``, ``bi_g_std``, ``bi_b_std``
    default (None) to them, as the kit's scripts always pass equal values."""
    bi_w: float = 5.0
    bi_xy_std: float = 70.0
    bi_rgb_std: float = 5.0
    pos_w: float = 3.0
    pos_xy_std: float = 3.0
    max_iter: int = 10
    pos_y_std: Optional[float] = None
    bi_y_std: Optional[float] = None
    bi_g_std: Optional[float] = None
    bi_b_std: Optional[float] = None

    def __post_init__(self):
        for name in ("bi_w", "pos_w"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"CRF parameter {name} must be a finite number, got "
                                 f"{getattr(self, name)}")
        for name in ("bi_xy_std", "bi_rgb_std", "pos_xy_std", "pos_y_std", "bi_y_std",
                     "bi_g_std", "bi_b_std"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ValueError(f"CRF parameter {name} must be positive and finite, got "
                                 f"{value}")
        if int(self.max_iter) != self.max_iter or self.max_iter < 0:
            raise ValueError(f"CRF parameter max_iter must be a non-negative integer, "
                             f"got {self.max_iter}")

    def with_(self, **changes):
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def pos_stds(self):
        """(x, y) stds of the positional kernel."""
        return (self.pos_xy_std, _or(self.pos_y_std, self.pos_xy_std))

    @property
    def bi_xy_stds(self):
        """(x, y) stds of the bilateral kernel."""
        return (self.bi_xy_std, _or(self.bi_y_std, self.bi_xy_std))

    @property
    def bi_rgb_stds(self):
        """Colour stds of the bilateral kernel, in the image's channel order (R, G, B
        for the refine program's PPMs)."""
        return (self.bi_rgb_std, _or(self.bi_g_std, self.bi_rgb_std),
                _or(self.bi_b_std, self.bi_rgb_std))


def _or(value, default):
    return default if value is None else value


PUBLISHED_PARAMS = {
    "refine_pascal_v4": CRFParams(),
    "deeplab-largefov": CRFParams(4, 49, 5, 3, 3),
    "deeplab": CRFParams(5, 50, 10, 3, 3),
    "deeplab-msc": CRFParams(3, 95, 3, 3, 3),
    "deeplab-coco": CRFParams(5, 67, 3, 3, 3),
    "bbox-seg-erode-gt": CRFParams(41, 33, 4, 3, 3),
    "bbox-seg-erode20": CRFParams(45, 37, 3, 15, 3),
    "setupenv": CRFParams(5, 50, 3, 3, 3),
    "resnet101-msc-layer": CRFParams(5, 21, 3, 4, 1),
}


# ------------------------------------------------------------------- features / unary
def _stds(std, count, name):
    """A std given once or per axis, as ``count`` float32 values."""
    values = np.atleast_1d(np.asarray(std, np.float64))
    if values.ndim != 1 or len(values) not in (1, count):
        raise ValueError(f"{name} must be one value or {count}, got {std!r}")
    return [_F32(v) for v in np.broadcast_to(values, (count,))]


def position_features(height, width, xy_std, xp=np):
    """(H*W) x 2 float32 features (column / x_std, row / y_std), pixels row-major, on
    array module ``xp``; ``xy_std`` is one std or an (x, y) pair."""
    x_std, y_std = _stds(xy_std, 2, "xy_std")
    out = xp.empty((height, width, 2), _F32)
    out[:, :, 0] = xp.arange(width, dtype=_F32)[None, :] / x_std
    out[:, :, 1] = xp.arange(height, dtype=_F32)[:, None] / y_std
    return out.reshape(height * width, 2)


def bilateral_features(image, xy_std, rgb_std, xp=np):
    """(H*W) x 5 float32 features (column, row, c0, c1, c2) with positions divided by
    ``xy_std`` (one std or an (x, y) pair) and the image's three channels, in the order
    given, by ``rgb_std`` (one std or one per channel); on array module ``xp`` (a host
    image is uploaded as it is)."""
    image = xp.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"the bilateral kernel needs an H x W x 3 colour image, "
                         f"got shape {image.shape}")
    height, width = image.shape[:2]
    colour = image.reshape(-1, 3).astype(_F32)
    for channel, std in enumerate(_stds(rgb_std, 3, "rgb_std")):
        colour[:, channel] /= std
    return xp.concatenate([position_features(height, width, xy_std, xp), colour], axis=1)


def unary_from_scores(scores):
    """U = -score (the refine program's convention for DCNN logits)."""
    return -np.asarray(scores, _F32)


def unary_from_probabilities(prob):
    """U = -log(prob) (``prog_refine_pascal``'s convention), clipped at FLT_MIN."""
    prob = np.asarray(prob, _F32)
    return -np.log(np.maximum(prob, np.finfo(_F32).tiny))


# ---------------------------------------------------------------------- inference
class PottsKernel:
    """One Gaussian kernel with Potts compatibility: its weight, its N x d float32
    ``features`` (on array module ``xp``: the GPU path builds its lattice from them on
    the device) and ``lattice``, the CPU's ``PermutohedralLattice``, built when first
    used."""

    def __init__(self, features, weight, xp=np):
        self.weight = float(weight)
        self.features = check_features(xp.asarray(features, _F32), xp)
        self._lattice = None

    @property
    def num_points(self):
        return self.features.shape[0]

    def reweighted(self, weight):
        """The same kernel with ``weight``, sharing the features and, once built, the
        lattice (build it first, e.g. by ``PairwiseMessages``, to share it)."""
        kernel = PottsKernel.__new__(PottsKernel)
        kernel.weight, kernel.features = float(weight), self.features
        kernel._lattice = self._lattice
        return kernel

    @property
    def lattice(self):
        if self._lattice is None:
            self._lattice = PermutohedralLattice(_host(self.features))
        return self._lattice


class PairwiseMessages:
    """``sum_k w_k * norm_k * (K_k Q)`` for kernels over the same N pixels, with the
    per-pixel normalisation ``norm_k = 1 / (K_k 1 + 1e-20)`` of NORMALIZE_AFTER
    (computed once by filtering ones); all kernels in one fused lattice filter."""

    def __init__(self, kernels):
        n = kernels[0].lattice.num_points
        self.lattices = [k.lattice for k in kernels]
        self.filter = LatticeFilter(self.lattices)
        raw = self.filter.filter_each(np.ones((n, 1), _F32))
        self.norms = [_F32(1.0) / (r[:, 0] + _F32(1e-20)) for r in raw]
        self.set_weights(kernels)

    def set_weights(self, kernels):
        """Take the weights of ``kernels``, which must have this filter's lattices (a
        grid search reuses one filter for every weight)."""
        if [k.lattice for k in kernels] != self.lattices:
            raise ValueError("these CRF kernels do not have the messages' lattices")
        self.filter.set_row_scales([norm * _F32(k.weight)
                                    for norm, k in zip(self.norms, kernels)])

    def add_to(self, q, out):
        """``out += messages(q)``; q, out N x M float32."""
        return self.filter.add_to(q, out)

    def __call__(self, q):
        return self.filter(q)


def softmax_rows(energy, shift=True, exp_cutoff=None):
    """Row-wise softmax of an N x M float32 array, in place.  ``shift=False`` skips
    subtracting the row maximum (the caller guarantees exp cannot overflow and some
    entry of each row is >= 0, so the sum cannot underflow).  ``exp_cutoff`` (needs
    ``shift``): entries more than this below their row maximum get probability 0, as
    the fork's ``fast_exp`` returns 0 beyond |x| > 20."""
    if shift:
        energy -= energy.max(axis=1, keepdims=True)
    below = energy < -_F32(exp_cutoff) if exp_cutoff is not None else None
    np.exp(energy, out=energy)
    if below is not None:
        energy[below] = 0
    total = np.einsum("ij->i", energy)
    energy *= (_F32(1.0) / total)[:, None]
    return energy


# exp(x) is finite for float32 x < 88.7; messages add at most sum(|w|) to a shifted row.
_SAFE_WEIGHT_SUM = 60.0


def check_kernels(kernels, num_pixels, exp_cutoff):
    """Every kernel must cover the unary's pixels; returns whether the softmax must
    subtract the row maximum every step (a cut-off, or weights large enough to
    overflow exp)."""
    for kernel in kernels:
        if kernel.num_points != num_pixels:
            raise ValueError(f"a CRF kernel has features for {kernel.num_points} "
                             f"pixels but the unary has {num_pixels}")
    return exp_cutoff is not None or sum(abs(k.weight) for k in kernels) > _SAFE_WEIGHT_SUM


def mean_field(unary, kernels, max_iter, exp_cutoff=None, device=None, messages=None):
    """Q after ``max_iter`` mean-field steps.  ``unary`` is M x H x W (or M x N),
    ``kernels`` a list of ``PottsKernel`` over the same N pixels; returns the marginals
    in the unary's shape, float32.  ``exp_cutoff=20`` reproduces the fork's
    ``fast_exp`` (labels more than 20 below a pixel's best get Q = 0 exactly);
    the default None is pydensecrf's exact softmax.  ``device`` (a GPU id or a
    ``device.CrfDevice``) runs the iterations there (``caffelite.crf.device``).
    ``messages``: ``PairwiseMessages`` built over these kernels' lattices, to reuse
    (host only; given the kernels' weights first).

    Each step is ``Q = softmax(-U + sum_k w_k norm_k (K_k Q))``.  Every message lies in
    [min(w_k, 0), max(w_k, 0)] (``norm_k K_k`` averages Q over a non-negative kernel),
    so the rows are shifted once by max(-U) instead of by their maximum each step when
    the weights are moderate; the softmax is unchanged up to float rounding.
    """
    if device is not None:
        from .device import mean_field_on_device
        return mean_field_on_device(unary, kernels, max_iter, device, exp_cutoff)
    unary = np.asarray(unary, _F32)
    labels = unary.shape[0]
    flat = unary.reshape(labels, -1)
    shift = flat.min(axis=0)                 # max(-U) per pixel, on the M x N layout
    base = np.ascontiguousarray(flat.T)                                # N x M
    np.subtract(shift[:, None], base, out=base)                        # -U - max(-U)
    if not np.isfinite(shift).all():
        raise ValueError("the CRF unary contains NaN or infinity")
    shift_each_step = check_kernels(kernels, base.shape[0], exp_cutoff)
    q = softmax_rows(base.copy(), shift=exp_cutoff is not None, exp_cutoff=exp_cutoff)
    if kernels and max_iter > 0:
        if messages is None:
            messages = PairwiseMessages(kernels)
        else:
            messages.set_weights(kernels)
        for _ in range(int(max_iter)):
            vertex = messages.filter.blurred(q)
            energy = q                        # q is spent: its buffer takes the energy
            np.copyto(energy, base)
            _add_product(messages.filter.slice, vertex, energy)
            q = softmax_rows(energy, shift=shift_each_step, exp_cutoff=exp_cutoff)
    return np.ascontiguousarray(q.T).reshape(unary.shape)


def _check_image(unary, image):
    image = np.asarray(image)
    if unary.ndim != 3:
        raise ValueError(f"the unary must be labels x height x width, got shape "
                         f"{unary.shape}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"the CRF image must be height x width x 3, got shape "
                         f"{image.shape}")
    if image.shape[:2] != unary.shape[1:]:
        raise ValueError(f"the image is {image.shape[0]}x{image.shape[1]} but the "
                         f"scores are {unary.shape[1]}x{unary.shape[2]}")
    return image


def crf_kernels(image, params, xp=np):
    """The refine program's two kernels: positional first, then bilateral on ``image``
    (H x W x 3, channels in the order the features should use); features on ``xp``."""
    height, width = image.shape[:2]
    return [PottsKernel(position_features(height, width, params.pos_stds, xp),
                        params.pos_w, xp),
            PottsKernel(bilateral_features(image, params.bi_xy_stds, params.bi_rgb_stds, xp),
                        params.bi_w, xp)]


def dense_crf(unary, image, params=None, device=None, **overrides):
    """Marginals Q (M x H x W float32) of the refine program's CRF.

    ``unary``: M x H x W energies (``unary_from_scores(logits)``); ``image``: H x W x 3
    (RGB uint8 for the standalone program's behaviour); ``params``: ``CRFParams``
    (defaults of ``prog_refine_pascal_v4``), fields overridable by keyword;
    ``device``: None (CPU), a GPU id or a ``device.CrfDevice`` (features, lattices and
    mean field on the device).
    """
    params = (params or CRFParams()).with_(**overrides)
    unary = np.asarray(unary, _F32)
    image = _check_image(unary, image)
    if device is None:
        return mean_field(unary, crf_kernels(image, params), params.max_iter)
    from .device import image_kernels, mean_field_on_device, resolve
    device = resolve(device)
    return mean_field_on_device(unary, image_kernels(image, params, device),
                                params.max_iter, device)


def crf_labels(scores, image, params=None, unary="score", device=None, **overrides):
    """Per-pixel labels (H x W, int64; first maximum of Q) for M x H x W ``scores``:
    logits (``unary="score"``, the refine program's input) or probabilities
    (``unary="prob"``); ``device`` as in ``dense_crf`` (there the scores and the image
    are uploaded, everything else runs on the device and only the labels come back)."""
    if unary not in ("score", "prob"):
        raise ValueError(f"unary must be 'score' or 'prob', got '{unary}'")
    if device is None:
        energies = (unary_from_scores(scores) if unary == "score"
                    else unary_from_probabilities(scores))
        return dense_crf(energies, image, params, **overrides).argmax(axis=0)
    from .device import image_kernels, labels_on_device, resolve
    params = (params or CRFParams()).with_(**overrides)
    device = resolve(device)
    if unary == "score":                    # -U = the scores: negated on the device
        given, negated = np.asarray(scores, _F32), True
    else:
        given, negated = unary_from_probabilities(scores), False
    image = _check_image(given, image)
    return labels_on_device(given, image_kernels(image, params, device), params.max_iter,
                            device, negated=negated)
