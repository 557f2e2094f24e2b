"""One self-contained HTML report: model summaries, overlays per image x method, insertion/deletion
curves, metric tables. Images are written beside the page (``report_files/``); every string that comes
from the user (file names, class names, titles) is escaped by Jinja2's autoescaping. Each method keeps one
line style (:mod:`xcnn.viz.style`) in every plot and section; each metric column shows one precision and
marks its best value by the direction the metric definitions give (:func:`xcnn.metrics.harness.metric_direction`)."""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup, escape
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .._io import atomic_write, prepare_out_dir
from ..metrics.harness import SPEED_COLUMN, Evaluation, MetricTable, metric_direction, metric_table
from .overlay import overlay, plain_text
from .style import LineStyle, display_percentile, is_baseline, method_styles

__all__ = ["ReportSection", "curves_figure", "write_report"]


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


def _breakable(text: str) -> Markup:
    """Escaped ``text`` that may wrap after "_" (long method and metric names in narrow cells)."""
    return Markup(str(escape(text)).replace("_", "_<wbr>"))


def _png(path: Path, rgb) -> str:
    atomic_write(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))
    return f"{path.parent.name}/{path.name}"


def _figure_png(path: Path, fig: Figure) -> str:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return f"{path.parent.name}/{path.name}"


def curves_figure(curves: Mapping[str, Mapping[str, Sequence[float]]], styles: Mapping[str, LineStyle]) -> Figure:
    """Mean insertion and deletion curves side by side (``curves[method][kind]``), each method in its style."""
    fig = Figure(figsize=(12, 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    entries: dict[str, object] = {}  # one legend entry per method
    for ax, kind in zip(axes, ("insertion", "deletion"), strict=True):
        for method, by_kind in curves.items():
            ys = by_kind.get(kind)
            if ys:
                xs = [j / max(len(ys) - 1, 1) for j in range(len(ys))]
                (line,) = ax.plot(xs, ys, label=plain_text(method), **styles[method].plot_kwargs())
                entries.setdefault(method, line)
        ax.set_title(f"{kind} (mean over images)")
        ax.set_xlabel("fraction of pixels " + ("revealed" if kind == "insertion" else "removed"))
        ax.set_ylabel("p(target)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    if entries:  # labels handed over explicitly: legend() alone drops those starting with "_" ("_orig_mod.x")
        lines = list(entries.values())
        fig.legend(lines, [ln.get_label() for ln in lines], loc="outside right upper", fontsize=8, frameon=False)
    return fig


_ARROWS = {1: ("\u2191", "higher is better"), -1: ("\u2193", "lower is better"), 0: ("", "not ranked")}


def _table(table: MetricTable, names: Mapping[str, str], styles: Mapping[str, LineStyle]) -> dict:
    """The metrics table as the template draws it: headers with direction arrows, cells with their marks."""
    baselines = {m for m in table.methods if is_baseline(m, names)}
    best = table.best(exclude=baselines)
    tops = {}  # the best shown value (times the direction) of each marked metric column
    for j, column in enumerate(table.columns):
        if column == SPEED_COLUMN:
            continue  # a baseline that ignores the model is fast by nature: no comparison there
        marked = [table.rounded(i, j) for i in range(len(table.methods)) if best[i][j]]
        if marked:
            tops[j] = metric_direction(column) * marked[0]
    rows = []
    for i, method in enumerate(table.methods):
        cells = []
        for j, text in enumerate(table.text[i]):
            v, sign = table.rounded(i, j), metric_direction(table.columns[j])
            if best[i][j]:
                cls, note = "best", "best in this column"
            elif method in baselines and v is not None and j in tops and sign * v >= tops[j]:
                cls, note = "baseline-match", "the random baseline is as good as the best method here"
            else:
                cls, note = "", ""
            cells.append({"text": text, "cls": cls, "title": note})
        rows.append({"method": method, "swatch": styles[method].css_border, "cells": cells})
    headers = [
        {
            "name": _breakable(c),
            "arrow": _ARROWS[metric_direction(c)][0],
            "title": f"{c}: {_ARROWS[metric_direction(c)][1]}",
        }
        for c in table.columns
    ]
    return {"headers": headers, "rows": rows}


def write_report(
    path: str | Path, sections: Sequence[ReportSection], *, title: str = "xcnn report", intro: str = ""
) -> Path:
    """Write ``path`` (an .html file) and its images in ``<stem>_files/`` beside it."""
    from .. import __version__

    path = Path(path)
    prepare_out_dir(path.parent)
    assets = prepare_out_dir(path.parent / f"{path.stem}_files")
    names = {k: v for section in sections for k, v in section.evaluation.names.items()}
    labels = [
        label
        for section in sections
        for label in [*section.evaluation.sample_maps, *section.evaluation.curves]
        + [r["method"] for r in section.evaluation.rows]
    ]
    styles = method_styles(labels, names)  # once for the whole report: a method looks the same in every section
    rendered = []
    for s_index, section in enumerate(sections):
        ev = section.evaluation
        slug = f"{s_index}-{_slug(section.title)}"
        methods = list(ev.sample_maps)
        percentiles = {m: display_percentile(m, names) for m in methods}
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
                _png(
                    assets / f"{slug}-img{i}-{_slug(m)}.png",
                    overlay(images[i], ev.sample_maps[m][i], percentile=percentiles[m]),
                )
                for m in methods
            ]
            grid.append(row)
        clipped = sorted({p for p in percentiles.values() if p is not None})
        curves = _figure_png(assets / f"{slug}-curves.png", curves_figure(ev.curves, styles)) if ev.curves else None
        rendered.append({
            "title": section.title, "summary": dict(section.summary), "note": section.note, "grid": grid,
            "methods": [{"name": _breakable(m), "swatch": styles[m].css_border, "clipped": percentiles[m] is not None} for m in methods],
            "clip_note": " / ".join(f"{p:g}th" for p in clipped), "curves": curves,
            "table": _table(metric_table(ev.rows), names, styles) if ev.rows else None,
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
