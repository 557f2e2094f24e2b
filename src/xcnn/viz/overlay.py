"""Heatmaps on images: one overlay as a PNG, or a side-by-side grid of several methods."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from .._io import atomic_write

__all__ = ["overlay", "save_grid", "save_overlay"]


def _image_array(image: Tensor | np.ndarray) -> np.ndarray:
    """``[3,H,W]`` tensor or ``[H,W,3]`` array in [0,1] -> float ``[H,W,3]``."""
    arr = image.detach().float().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image must be [3,H,W] or [H,W,3], got shape {list(arr.shape)}")
    return np.clip(arr, 0.0, 1.0)


def _map_array(saliency: Tensor | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    arr = (
        saliency.detach().float().cpu().numpy()
        if isinstance(saliency, Tensor)
        else np.asarray(saliency, dtype=np.float32)
    )
    if arr.shape != shape:
        raise ValueError(f"map shape {list(arr.shape)} does not match the image's {list(shape)}")
    if not np.isfinite(arr).all():
        raise ValueError("map contains NaN or Inf")
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise ValueError(f"map values must be in [0,1], got [{arr.min():.3g}, {arr.max():.3g}]")
    return arr


def overlay(
    image: Tensor | np.ndarray, saliency: Tensor | np.ndarray, *, alpha: float = 0.5, cmap: str = "jet"
) -> np.ndarray:
    """Blend a [0,1] map (coloured with ``cmap``) over the image: uint8 ``[H,W,3]``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0,1], got {alpha}")
    if cmap not in colormaps:
        raise ValueError(f"unknown colour map {cmap!r} (any matplotlib colormap name, e.g. 'jet', 'viridis')")
    img = _image_array(image)
    heat = colormaps[cmap](_map_array(saliency, img.shape[:2]))[..., :3]
    return np.round(255 * ((1 - alpha) * img + alpha * heat)).astype(np.uint8)


def save_overlay(path: str | Path, image: Tensor | np.ndarray, saliency: Tensor | np.ndarray, **kwargs) -> Path:
    """Write :func:`overlay` as a PNG (atomically)."""
    rgb = overlay(image, saliency, **kwargs)
    return atomic_write(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))


def save_grid(
    path: str | Path,
    image: Tensor | np.ndarray,
    maps: Mapping[str, Tensor | np.ndarray],
    *,
    title: str | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    columns: int = 4,
) -> Path:
    """One PNG: the image, then one overlay per method (titled with the method's name)."""
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    panels = [("image", np.round(255 * _image_array(image)).astype(np.uint8))]
    panels += [(name, overlay(image, m, alpha=alpha, cmap=cmap)) for name, m in maps.items()]
    cols = min(columns, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(2.6 * cols, 2.6 * rows + (0.4 if title else 0)), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, rgb) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(rgb)
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
