"""Collapse metrics: pure functions of tensors, plus the signature that reads a router's routing record.

Definitions and the choices made where the paper is ambiguous: docs/metrics.md.
"""
from collapse.concentration import (causal_uniform_share, completion_layer, max_share, max_share_sparse,
                                    max_share_variants,
                                    onset_layer, uniform_max_share, uniform_max_share_sparse)
from collapse.geometry import (canonical_angles, gaussian_null, key_spectrum, norm_cv,
                               ve_at_rank)
from collapse.nulls import shuffle_positions
from collapse.signature import Signature, SignatureAccumulator, signature
from collapse.stats import pearson, spearman

__all__ = [
    "canonical_angles", "causal_uniform_share", "completion_layer", "gaussian_null", "key_spectrum",
    "max_share", "max_share_sparse", "max_share_variants", "norm_cv", "onset_layer", "pearson", "spearman",
    "shuffle_positions", "Signature", "SignatureAccumulator", "signature", "uniform_max_share",
    "uniform_max_share_sparse", "ve_at_rank",
]
