"""Layer-wise inspection of a CNN: which filters carry the decision, how a layer's features correlate,
how similar layers' representations are (this module grows with the layer-wise probes and the training
monitor of the hybrid CNN-interpreter).

Named ``inspection`` rather than ``inspect``: a subpackage called ``inspect`` shadows the standard
library's module for tools that put the package directory on ``sys.path``.
"""

from .features import (
    class_association,
    feature_correlation,
    layer_similarity,
    linear_cka,
    pooled_features,
    redundant_pairs,
)
from .importance import IMPORTANCE_METHODS, ablation_effect, filter_importance

__all__ = [
    "IMPORTANCE_METHODS",
    "ablation_effect",
    "class_association",
    "feature_correlation",
    "filter_importance",
    "layer_similarity",
    "linear_cka",
    "pooled_features",
    "redundant_pairs",
]
