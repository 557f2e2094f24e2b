"""Interpretable layers: modules that explain themselves from the forward pass."""

from .lap import LocalAttentionPooling, insert_lap, lap_layers

__all__ = ["LocalAttentionPooling", "insert_lap", "lap_layers"]
