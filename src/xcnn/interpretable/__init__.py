"""Interpretable layers and models: modules that explain themselves from the forward pass."""

from .lap import LocalAttentionPooling, insert_lap, lap_layers
from .protopnet import PrototypeLayer, protopnet, prototype_evidence, prototype_view

__all__ = [
    "LocalAttentionPooling",
    "PrototypeLayer",
    "insert_lap",
    "lap_layers",
    "protopnet",
    "prototype_evidence",
    "prototype_view",
]
