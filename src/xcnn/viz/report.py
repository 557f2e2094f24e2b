"""One self-contained HTML report: model summaries, overlays per image x method, insertion/deletion
curves, metric tables. Images are written beside the page (``report_files/``); every string that comes
from the user (file names, class names, titles) is escaped by Jinja2's autoescaping."""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .._io import atomic_write, prepare_out_dir
from ..metrics.harness import Evaluation, _fmt
from .overlay import overlay

__all__ = ["ReportSection", "write_report"]


@dataclass
class ReportSection:
    """One evaluated model/dataset: its summary lines, the harness result, captions for the sample images."""

    title: str
    evaluation: Evaluation
    summary: Mapping[str, object] = field(default_factory=dict)
    captions: Sequence[str] = ()
    note: str = ""


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower() or "section"


def _png(path: Path, rgb) -> str:
    atomic_write(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))
    return f"{path.parent.name}/{path.name}"


def _curves_png(path: Path, curves: Mapping[str, Mapping[str, Sequence[float]]]) -> str:
    fig = Figure(figsize=(10, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    for i, kind in enumerate(("insertion", "deletion")):
        ax = fig.add_subplot(1, 2, i + 1)
        for method, by_kind in curves.items():
            ys = by_kind.get(kind)
            if ys:
                xs = [j / (len(ys) - 1) for j in range(len(ys))]
                ax.plot(xs, ys, label=method)
        ax.set_title(f"{kind} (mean over images)")
        ax.set_xlabel("fraction of pixels " + ("revealed" if kind == "insertion" else "removed"))
        ax.set_ylabel("p(target)")
        ax.set_ylim(0, 1)
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return f"{path.parent.name}/{path.name}"


def write_report(
    path: str | Path, sections: Sequence[ReportSection], *, title: str = "xcnn report", intro: str = ""
) -> Path:
    """Write ``path`` (an .html file) and its images in ``<stem>_files/`` beside it."""
    from .. import __version__

    path = Path(path)
    prepare_out_dir(path.parent)
    assets = prepare_out_dir(path.parent / f"{path.stem}_files")
    rendered = []
    for s_index, section in enumerate(sections):
        ev = section.evaluation
        slug = f"{s_index}-{_slug(section.title)}"
        methods = list(ev.sample_maps)
        images = ev.samples.get("image")
        grid = []
        for i in range(0 if images is None else len(images)):
            row = {
                "image": _png(
                    assets / f"{slug}-img{i}.png",
                    (images[i].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8"),
                )
            }
            row["caption"] = section.captions[i] if i < len(section.captions) else f"image {i}"
            row["maps"] = [
                _png(assets / f"{slug}-img{i}-{_slug(m)}.png", overlay(images[i], ev.sample_maps[m][i]))
                for m in methods
            ]
            grid.append(row)
        metrics = list(dict.fromkeys(r["metric"] for r in ev.rows))
        cell = {(r["method"], r["metric"]): r for r in ev.rows}
        table = []
        for m in dict.fromkeys(r["method"] for r in ev.rows):
            first = next(r for r in ev.rows if r["method"] == m)
            table.append({
                "method": m, "cells": [_fmt(cell[(m, k)]["value"]) if (m, k) in cell else "" for k in metrics],
                "speed": f"{first['seconds'] / max(first['n'], 1):.4f}",
            })  # fmt: skip
        curves = _curves_png(assets / f"{slug}-curves.png", ev.curves) if ev.curves else None
        rendered.append({
            "title": section.title, "summary": dict(section.summary), "note": section.note, "methods": methods,
            "grid": grid, "curves": curves, "metrics": metrics, "table": table,
        })  # fmt: skip
    env = Environment(loader=PackageLoader("xcnn.viz", "templates"), autoescape=select_autoescape(["html", "j2"]))
    html = env.get_template("report.html.j2").render(
        title=title,
        intro=intro,
        sections=rendered,
        version=__version__,
        created=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
    )
    return atomic_write(path, lambda tmp: tmp.write_text(html, encoding="utf-8"))
