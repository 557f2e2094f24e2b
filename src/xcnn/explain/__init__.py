"""Post-hoc explainers. Importing this package registers every method."""

from ..interpretable import lap as _lap  # noqa: F401  (registers the `lap` explainer)
from ..interpretable import protopnet as _protopnet  # noqa: F401  (registers `prototype`)
from . import cam, extremal, gradients, mdm, perturbation, tame  # noqa: F401  (registration side effect)
from .base import Explainer, explainer, explainer_class, explainer_options, list_explainers, normalize_maps, register
from .cam import cam_maps

# isort: off
# after the names above: layer-wise inspection (which registers `probe_cam`) uses the explainers and metrics
from ..inspection import probes as _probes  # noqa: F401
# isort: on

__all__ = [
    "Explainer",
    "cam_maps",
    "explainer",
    "explainer_class",
    "explainer_options",
    "list_explainers",
    "normalize_maps",
    "register",
]
