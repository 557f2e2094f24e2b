"""Heatmaps on images: one overlay as a PNG, or a side-by-side grid of several methods. Sparse maps (input
gradients) can be displayed clipped at a percentile of their values; the maps themselves are never changed."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from .._io import atomic_write

__all__ = ["display_map", "grid_figure", "overlay", "plain_text", "save_grid", "save_overlay"]


def plain_text(text: object) -> str:
    """``text`` as matplotlib draws it literally: every ``$`` escaped, so that a class name, file label or
    method label such as ``"$\\frac{a}$"`` is shown as written instead of being parsed as mathtext (which
    fails on malformed formulas and would stop a figure from being written). Use it on every string that
    comes from user data; matplotlib turns each ``\\$`` back into ``$``."""
    return str(text).replace("$", r"\$")


def _image_array(image: Tensor | np.ndarray) -> np.ndarray:
    """``[3,H,W]`` tensor or ``[H,W,3]`` array in [0,1] -> float ``[H,W,3]``."""
    arr = image.detach().float().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image must be [3,H,W] or [H,W,3], got shape {list(arr.shape)}")
    return np.clip(arr, 0.0, 1.0)


def _map_array(saliency: Tensor | np.ndarray, shape: tuple[int, int] | None) -> np.ndarray:
    arr = (
        saliency.detach().float().cpu().numpy()
        if isinstance(saliency, Tensor)
        else np.asarray(saliency, dtype=np.float32)
    )
    if arr.ndim != 2:
        raise ValueError(f"a map must be [H,W], got shape {list(arr.shape)}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"map shape {list(arr.shape)} does not match the image's {list(shape)}")
    if not np.isfinite(arr).all():
        raise ValueError("map contains NaN or Inf")
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise ValueError(f"map values must be in [0,1], got [{arr.min():.3g}, {arr.max():.3g}]")
    return arr


def display_map(saliency: Tensor | np.ndarray, percentile: float | None = None) -> np.ndarray:
    """A [0,1] map ``[H,W]`` as displayed: with ``percentile``, values above that percentile of the map's values
    are clipped to it and the result rescaled to [0,1] (as captum's visualisation does for sparse attributions);
    without, the map as it is. Returns a new float array."""
    arr = _map_array(saliency, None)
    if percentile is None:
        return arr.copy()
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    top = float(np.percentile(arr, percentile)) if arr.size else 0.0
    if top <= 0:  # more than (100 - percentile) % of the map is zero: clip at its largest value instead
        top = float(arr.max()) if arr.size else 0.0
    return np.clip(arr / top, 0.0, 1.0) if top > 0 else np.zeros_like(arr)


def overlay(
    image: Tensor | np.ndarray,
    saliency: Tensor | np.ndarray,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    percentile: float | None = None,
) -> np.ndarray:
    """Blend a [0,1] map (coloured with ``cmap``; clipped at ``percentile`` as in :func:`display_map`) over the
    image: uint8 ``[H,W,3]``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0,1], got {alpha}")
    if cmap not in colormaps:
        raise ValueError(f"unknown colour map {cmap!r} (any matplotlib colormap name, e.g. 'jet', 'viridis')")
    img = _image_array(image)
    heat = colormaps[cmap](display_map(_map_array(saliency, img.shape[:2]), percentile))[..., :3]
    return np.round(255 * ((1 - alpha) * img + alpha * heat)).astype(np.uint8)


def save_overlay(path: str | Path, image: Tensor | np.ndarray, saliency: Tensor | np.ndarray, **kwargs) -> Path:
    """Write :func:`overlay` as a PNG (atomically)."""
    rgb = overlay(image, saliency, **kwargs)
    return atomic_write(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))


# grid geometry, inches: every band has room for its text, so no title can reach the row above
_CELL = 2.4
_GAP = 0.12
_MARGIN = 0.1
_LINE = 0.19  # one line of a 10 pt panel title
_TITLE_CHARS = 30


def _percentile_note(percentiles: Mapping[str, float], width: float) -> str:
    which = " / ".join(f"{p:g}th" for p in sorted(set(percentiles.values())))
    note = f"* sparse map: displayed clipped at its {which} percentile (the map itself is not changed)"
    return textwrap.fill(note, max(20, int(width * 14)))  # about 14 characters of 8 pt text per inch


def grid_figure(
    image: Tensor | np.ndarray,
    maps: Mapping[str, Tensor | np.ndarray],
    *,
    title: str | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    columns: int | None = None,
    percentiles: Mapping[str, float | None] | None = None,
) -> Figure:
    """The figure :func:`save_grid` writes: the image, then one overlay per method in ``columns`` columns
    (default: up to 5). ``percentiles[name]`` displays that map clipped (:func:`display_map`); its title gets
    a ``*`` and the figure a footnote."""
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    percentiles = {k: v for k, v in (percentiles or {}).items() if k in maps and v is not None}
    panels = [("image", np.round(255 * _image_array(image)).astype(np.uint8))]
    panels += [
        (
            f"{name} *" if name in percentiles else name,
            overlay(image, m, alpha=alpha, cmap=cmap, percentile=percentiles.get(name)),
        )
        for name, m in maps.items()
    ]
    cols = min(columns or 5, len(panels))
    rows = -(-len(panels) // cols)
    height, width = panels[0][1].shape[:2]
    cell_h = _CELL * height / width
    titles = [plain_text(textwrap.fill(name, _TITLE_CHARS)) for name, _ in panels]  # escaped after wrapping
    band = _LINE * max(t.count("\n") + 1 for t in titles) + 0.12
    top = 0.35 if title else 0.0
    fig_w = 2 * _MARGIN + cols * _CELL + (cols - 1) * _GAP
    note = _percentile_note(percentiles, fig_w - 2 * _MARGIN) if percentiles else ""
    foot = 0.1 + 0.15 * (note.count("\n") + 1) if note else 0.0
    fig_h = 2 * _MARGIN + top + foot + rows * (band + cell_h) + (rows - 1) * _GAP
    fig = Figure(figsize=(fig_w, fig_h), dpi=100)
    FigureCanvasAgg(fig)
    for i, ((_, rgb), text) in enumerate(zip(panels, titles, strict=True)):
        r, c = divmod(i, cols)
        left = _MARGIN + c * (_CELL + _GAP)
        bottom = fig_h - _MARGIN - top - (r + 1) * (band + cell_h) - r * _GAP
        ax = fig.add_axes((left / fig_w, bottom / fig_h, _CELL / fig_w, cell_h / fig_h))
        ax.imshow(rgb, aspect="auto")
        ax.set_title(text, fontsize=10, pad=4)
        ax.axis("off")
    if title:
        fig.text(0.5, 1 - (_MARGIN + 0.05) / fig_h, plain_text(title), ha="center", va="top", fontsize=11)
    if note:
        fig.text(_MARGIN / fig_w, _MARGIN / fig_h, note, ha="left", va="bottom", fontsize=8)
    return fig


def save_grid(
    path: str | Path,
    image: Tensor | np.ndarray,
    maps: Mapping[str, Tensor | np.ndarray],
    *,
    title: str | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    columns: int | None = None,
    percentiles: Mapping[str, float | None] | None = None,
) -> Path:
    """One PNG: the image, then one overlay per method (titled with the method's name); see :func:`grid_figure`."""
    fig = grid_figure(image, maps, title=title, alpha=alpha, cmap=cmap, columns=columns, percentiles=percentiles)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
