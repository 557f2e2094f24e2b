"""Layer-wise inspection of a CNN: which filters carry the decision (this module grows with the
layer-wise probes, feature correlation and training monitor of the hybrid CNN-interpreter).

Named ``inspection`` rather than ``inspect``: a subpackage called ``inspect`` shadows the standard
library's module for tools that put the package directory on ``sys.path``.
"""

from .importance import IMPORTANCE_METHODS, ablation_effect, filter_importance

__all__ = ["IMPORTANCE_METHODS", "ablation_effect", "filter_importance"]
