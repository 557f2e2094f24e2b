"""Visualisation: overlays and grids (the HTML report arrives with the evaluation harness)."""

from .overlay import overlay, save_grid, save_overlay

__all__ = ["overlay", "save_grid", "save_overlay"]
