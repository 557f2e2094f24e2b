"""'This looks like that': one figure per image with, for each of its top prototypes, the prototype's
similarity map on the image (native upsampling and a search such as MDM on the prototype view, side by
side) and the prototype's source patch boxed on its training image."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from .._io import atomic_write
from .overlay import _image_array, overlay, plain_text

__all__ = ["prototype_figure", "save_prototype_figure"]


def prototype_figure(
    image: Tensor | np.ndarray,
    rows: Sequence[dict],
    *,
    title: str | None = None,
    search_name: str = "MDM",
    alpha: float = 0.5,
) -> Figure:
    """Rows of three panels: ``native`` map (``[H,W]`` in [0,1]) over the image, ``search`` map (or an empty
    panel when None) over the image, and ``source`` (the training image ``[3,h,w]``, or None) with ``box``
    ``[top, left, bottom, right]`` drawn; ``caption`` heads the row."""
    n = max(len(rows), 1)
    cell, band, gap = 2.2, 0.5, 0.1
    top = (0.4 if title else 0.05) + 0.2  # the title, then the column headings
    width = 3 * cell + 4 * gap
    height = top + n * (cell + band) + gap
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    headings = ["similarity map (native)", f"similarity map ({plain_text(search_name)})", "prototype's source patch"]
    for r, row in enumerate(rows):
        bottom = height - top - (r + 1) * (cell + band) + gap
        panels = [
            overlay(image, row["native"], alpha=alpha),
            overlay(image, row["search"], alpha=alpha) if row.get("search") is not None else None,
            np.round(255 * _image_array(row["source"])).astype(np.uint8) if row.get("source") is not None else None,
        ]
        for c, panel in enumerate(panels):
            ax = fig.add_axes(((gap + c * (cell + gap)) / width, bottom / height, cell / width, cell / height))
            ax.axis("off")
            if panel is None:
                ax.text(0.5, 0.5, "not available", ha="center", va="center", fontsize=8, color="grey")
                continue
            ax.imshow(panel)
            if c == 2 and row.get("box") is not None:
                t, left, b, right = row["box"]
                ax.add_patch(Rectangle((left - 0.5, t - 0.5), right - left, b - t, fill=False, color="yellow", lw=2))
        fig.text(
            0.5, (bottom + cell + 0.04) / height, plain_text(textwrap.fill(row.get("caption", ""), 90)),
            ha="center", va="bottom", fontsize=8,
        )  # fmt: skip
    for c, heading in enumerate(headings):
        fig.text(
            (gap + c * (cell + gap) + cell / 2) / width, (height - top + 0.2) / height, heading,
            ha="center", va="top", fontsize=8, weight="bold",
        )  # fmt: skip
    if title:
        fig.text(0.5, 1 - 0.08 / height, plain_text(title), ha="center", va="top", fontsize=10)
    return fig


def save_prototype_figure(path: str | Path, image: Tensor | np.ndarray, rows: Sequence[dict], **kwargs) -> Path:
    """Write :func:`prototype_figure` as a PNG (atomically)."""
    fig = prototype_figure(image, rows, **kwargs)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
