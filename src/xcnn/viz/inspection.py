"""The layer-wise inspection report (``xcnn inspect``): probe accuracy by depth (and by epoch when a
monitored run is given), layer-wise top-5 with probe-CAM maps for a few images, filter importance (Taylor
next to ablation), the feature correlation matrix and the layer CKA matrix. Same page machinery as the
evaluation report (:mod:`xcnn.viz.report`): one HTML file, images beside it, user strings escaped."""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from .._io import atomic_write, prepare_out_dir
from .overlay import overlay, plain_text
from .report import _figure_png, _png

__all__ = [
    "association_figure",
    "depth_figure",
    "history_figure",
    "importance_figure",
    "matrix_figure",
    "write_inspection_report",
]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def depth_figure(layers: Sequence[str], accuracy: Mapping[str, float], model_accuracy: float | None) -> Figure:
    """Probe accuracy per layer, shallow to deep, with the model's own accuracy as a line."""
    fig = _figure(6, 3.4)
    ax = fig.subplots()
    ax.plot(range(len(layers)), [accuracy[name] for name in layers], marker="o", color="#1f77b4", label="probe")
    if model_accuracy is not None:
        ax.axhline(model_accuracy, color="#555", linestyle="--", label="model output")
    ax.set_xticks(range(len(layers)), [plain_text(name) for name in layers], rotation=20, fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy (held-out)")
    ax.set_title("where the decision forms: probe accuracy by depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return fig


def history_figure(history: Mapping) -> Figure:
    """Monitored run: probe accuracy as an epoch x layer heatmap, and each layer's CKA to the previous check."""
    layers, records = history["layers"], history["records"]
    epochs = [r["epoch"] + 1 for r in records]
    grid = [[r["probe_accuracy"].get(name, math.nan) for r in records] for name in layers]
    fig = _figure(12, 3.6)
    left, right = fig.subplots(1, 2)
    image = left.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", origin="lower")
    left.set_yticks(range(len(layers)), [plain_text(name) for name in layers], fontsize=8)
    step = max(1, len(epochs) // 12)
    left.set_xticks(range(0, len(epochs), step), [str(e) for e in epochs[::step]], fontsize=8)
    left.set_xlabel("epoch")
    left.set_title("probe accuracy (epoch x depth)")
    fig.colorbar(image, ax=left, fraction=0.05)
    lines = []
    for name in layers:
        xs = [e for e, r in zip(epochs, records, strict=True) if r.get("cka_to_previous", {}).get(name) is not None]
        ys = [r["cka_to_previous"][name] for r in records if r.get("cka_to_previous", {}).get(name) is not None]
        if xs:
            lines += right.plot(xs, ys, marker=".", label=plain_text(name))
    right.set_ylim(0, 1.02)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("epoch")
    right.set_ylabel("linear CKA to the previous check")
    right.set_title("how much each layer still changes")
    right.grid(alpha=0.3)
    if lines:  # labels handed over explicitly: legend() alone drops those starting with "_" ("_orig_mod.layer3")
        right.legend(lines, [ln.get_label() for ln in lines], fontsize=8, frameon=False)
    return fig


def importance_figure(taylor: Sequence[float], ablation: Mapping[int, float], top: int = 20) -> Figure:
    """The ``top`` filters by Taylor importance, their ablation effect beside them (where measured)."""
    order = sorted(range(len(taylor)), key=lambda k: -taylor[k])[:top]
    fig = _figure(max(6, 0.35 * len(order) + 2), 3.4)
    ax = fig.subplots()
    xs = range(len(order))
    ax.bar([x - 0.2 for x in xs], [taylor[k] for k in order], width=0.4, color="#1f77b4", label="Taylor |A·∂y/∂A|")
    measured = [(x, ablation[k]) for x, k in zip(xs, order, strict=True) if k in ablation]
    if measured:
        ax.bar(
            [x + 0.2 for x, _ in measured],
            [v for _, v in measured],
            width=0.4,
            color="#ff7f0e",
            label="ablation Δ logit",
        )
    ax.set_xticks(list(xs), [str(k) for k in order], fontsize=7, rotation=90)
    ax.set_xlabel("filter (channel index), most important first")
    ax.set_ylabel("target logit")
    ax.axhline(0, color="#999", linewidth=0.8)
    ax.set_title("filter importance")
    ax.legend(fontsize=8, frameon=False)
    return fig


def matrix_figure(matrix: Tensor, title: str, labels: Sequence[str] | None = None, vmin: float = -1) -> Figure:
    """A square matrix as a heatmap (correlation: -1..1; CKA: 0..1)."""
    n = matrix.shape[0]
    fig = _figure(5.2, 4.4)
    ax = fig.subplots()
    image = ax.imshow(matrix.float().numpy(), vmin=vmin, vmax=1, cmap="coolwarm" if vmin < 0 else "viridis")
    if labels is not None:
        ax.set_xticks(range(n), [plain_text(label) for label in labels], rotation=30, fontsize=8)
        ax.set_yticks(range(n), [plain_text(label) for label in labels], fontsize=8)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{float(matrix[i, j]):.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_title(plain_text(title))
    fig.colorbar(image, ax=ax, fraction=0.05)
    return fig


def association_figure(
    association: Tensor, taylor: Sequence[float], class_names: Sequence[str], top: int = 20
) -> Figure:
    """Mean pooled activation per class of the ``top`` filters by Taylor importance, each filter's column
    standardised over the classes (which classes a filter responds to, not how strongly it fires)."""
    import torch

    order = sorted(range(len(taylor)), key=lambda k: -taylor[k])[:top]
    a = association[:, order].float()
    centred = a - a.nanmean(0, keepdim=True)  # classes absent from the data are NaN rows
    a = centred / (centred**2).nanmean(0, keepdim=True).sqrt().clamp_min(1e-12)
    fig = _figure(max(6, 0.3 * len(order) + 2.5), max(2.6, 0.3 * len(class_names) + 1.2))
    ax = fig.subplots()
    image = ax.imshow(torch.nan_to_num(a).numpy(), aspect="auto", cmap="coolwarm", vmin=-2, vmax=2)
    ax.set_xticks(range(len(order)), [str(k) for k in order], fontsize=7, rotation=90)
    ax.set_yticks(range(len(class_names)), [plain_text(name) for name in class_names], fontsize=8)
    ax.set_xlabel("filter (most important first)")
    ax.set_title("filter-class association (mean activation per class, standardised per filter)")
    fig.colorbar(image, ax=ax, fraction=0.04)
    return fig


def _rgb(image: Tensor):
    return (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8")


def write_inspection_report(
    path: str | Path,
    inspection,
    *,
    history: Mapping | None = None,
    summary: Mapping[str, object] | None = None,
    title: str = "xcnn layer-wise inspection",
) -> Path:
    """Write ``path`` (an .html file) for an :class:`xcnn.inspection.Inspection` (and a monitored run's
    ``history``, :func:`xcnn.inspection.load_history`); images go to ``<stem>_files/`` beside it."""
    from .. import __version__

    path = Path(path)
    prepare_out_dir(path.parent)
    assets = prepare_out_dir(path.parent / f"{path.stem}_files")
    ins = inspection
    figures = {
        "depth": _figure_png(assets / "depth.png", depth_figure(ins.layers, ins.probe_accuracy, ins.model_accuracy)),
        "importance": _figure_png(assets / "importance.png", importance_figure(ins.taylor, ins.ablation)),
        "correlation": _figure_png(
            assets / "correlation.png",
            matrix_figure(ins.correlation_matrix, f"feature correlation of {ins.importance_layer} (Pearson)"),
        ),
        "similarity": _figure_png(
            assets / "similarity.png",
            matrix_figure(ins.similarity, "layer similarity (linear CKA)", ins.layers, vmin=0),
        ),
        "history": _figure_png(assets / "history.png", history_figure(history)) if history else None,
        "association": _figure_png(
            assets / "association.png", association_figure(ins.association, ins.taylor, ins.class_names)
        )
        if len(ins.class_names) <= 50
        else None,
    }
    rows = []
    images = ins.samples.get("images")
    for i in range(0 if images is None or "maps" not in ins.samples else len(images)):
        cells = []
        for name in ins.layers:
            top = ins.samples["top"][name][i]
            cells.append({
                "map": _png(assets / f"img{i}-{name.replace('.', '_')}.png", overlay(images[i], ins.samples["maps"][name][i])),
                "top": [f"{label} {p:.0%}" for label, p in top],
            })  # fmt: skip
        rows.append({
            "image": _png(assets / f"img{i}.png", _rgb(images[i])),
            "caption": f"true: {ins.samples['labels'][i]}; map of: {ins.samples['explained'][i]}",
            "cells": cells,
        })  # fmt: skip
    effect = ins.top_vs_random
    random_acc = [r.get("ablated_accuracy") for r in effect["random"]]
    random_drop = [r["logit_drop"] for r in effect["random"]]
    measured = sorted(ins.ablation, key=lambda k: -ins.taylor[k])
    env = Environment(loader=PackageLoader("xcnn.viz", "templates"), autoescape=select_autoescape(["html", "j2"]))
    html = env.get_template("inspection.html.j2").render(
        title=title, intro="", version=__version__, created=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        summary=dict(summary or {}), ins=ins, figures=figures, rows=rows, history=history,
        effect=effect, random_acc=[a for a in random_acc if a is not None], random_drop=random_drop,
        measured=[{"channel": k, "taylor": ins.taylor[k], "ablation": ins.ablation[k]} for k in measured[:20]],
    )  # fmt: skip
    return atomic_write(path, lambda tmp: tmp.write_text(html, encoding="utf-8"))
