"""Dense CRF post-processing (Krähenbühl & Koltun's fully connected CRF, as DeepLab's
refine programs and DenseCRF layer run it): the permutohedral-lattice filter, mean-field
inference and the ``caffelite crf`` verb (``caffelite.crf.cli``)."""
from .densecrf import (PUBLISHED_PARAMS, CRFParams, PairwiseMessages, PottsKernel,
                       bilateral_features, crf_kernels, crf_labels, dense_crf, mean_field,
                       position_features, softmax_rows, unary_from_probabilities,
                       unary_from_scores)
from .permutohedral import LatticeFilter, PermutohedralLattice, exact_gaussian_filter

__all__ = ["PUBLISHED_PARAMS", "CRFParams", "LatticeFilter", "PairwiseMessages",
           "PermutohedralLattice", "PottsKernel", "bilateral_features", "crf_kernels",
           "crf_labels", "dense_crf", "exact_gaussian_filter", "mean_field",
           "position_features", "softmax_rows", "unary_from_probabilities",
           "unary_from_scores"]
