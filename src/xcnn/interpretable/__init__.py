"""Interpretable layers and models: modules that explain themselves from the forward pass.

``protopnet`` here is the function that builds a prototype network; its module is
``xcnn.interpretable.protopnet`` for imports (``from xcnn.interpretable.protopnet import PrototypeLayer``).
"""

from .lap import LocalAttentionPooling, insert_lap, lap_layers
from .protopnet import (
    PrototypeLayer,
    find_prototype_layer,
    has_prototypes,
    protopnet,
    prototype_evidence,
    prototype_view,
)

__all__ = [
    "LocalAttentionPooling",
    "PrototypeLayer",
    "find_prototype_layer",
    "has_prototypes",
    "insert_lap",
    "lap_layers",
    "protopnet",
    "prototype_evidence",
    "prototype_view",
]
