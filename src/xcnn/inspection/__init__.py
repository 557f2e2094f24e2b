"""Layer-wise inspection of a CNN (the hybrid CNN-interpreter): what each layer would predict (linear
probes and their class maps), which filters carry the decision (Taylor importance and ablation), how a
layer's features correlate, how similar layers' representations are (linear CKA), and all of it watched
over a training run (:mod:`xcnn.inspection.monitor`).

Named ``inspection`` rather than ``inspect``: a subpackage called ``inspect`` shadows the standard
library's module for tools that put the package directory on ``sys.path``.
"""

from .features import (
    class_association,
    correlation_summary,
    feature_correlation,
    layer_similarity,
    linear_cka,
    pooled_features,
    redundant_pairs,
    stack_data,
)
from .importance import IMPORTANCE_METHODS, ablation_effect, filter_importance
from .monitor import MONITOR_FILE, Monitor, load_history
from .probes import PROBE_METHODS, ProbeCAM, Probes, fit_linear, layer_probes
from .summary import Inspection, inspect_model

__all__ = [
    "IMPORTANCE_METHODS",
    "MONITOR_FILE",
    "PROBE_METHODS",
    "Inspection",
    "Monitor",
    "ProbeCAM",
    "Probes",
    "ablation_effect",
    "class_association",
    "correlation_summary",
    "feature_correlation",
    "filter_importance",
    "fit_linear",
    "inspect_model",
    "layer_probes",
    "layer_similarity",
    "linear_cka",
    "load_history",
    "pooled_features",
    "redundant_pairs",
    "stack_data",
]
