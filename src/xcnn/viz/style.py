"""How methods look wherever they are drawn: one line style per method label, the same in every plot and
section of a report, and the display rule for sparse maps. What a method *is* (sparse, a baseline) is read
from its explainer class (``display_percentile``, ``baseline``), never from a list of names here."""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from matplotlib.colors import to_hex, to_rgb

from ..explain import explainer_class, list_explainers

__all__ = ["BASELINE_COLOR", "LineStyle", "base_method", "display_percentile", "is_baseline", "method_styles"]

BASELINE_COLOR = "#7f7f7f"
_BASELINE_DASH = "--"  # reserved: no other method is drawn dashed

# one fixed colour per registered method; the line style groups the families (solid: CAM family,
# dash-dot: input gradients, dotted: perturbation, dash-dot-dot: learned masks)
_DASH_DOT_DOT = (0, (5, 1.5, 1, 1.5, 1, 1.5))
_FIXED: dict[str, tuple[str, object]] = {
    "gradcam": ("#1f77b4", "-"),
    "gradcam++": ("#ff7f0e", "-"),
    "xgradcam": ("#2ca02c", "-"),
    "layercam": ("#d62728", "-"),
    "hirescam": ("#9467bd", "-"),
    "scorecam": ("#8c564b", "-"),
    "tame": ("#01665e", "-"),
    "lap": ("#7f3b08", "-"),
    "saliency": ("#e377c2", "-."),
    "integrated_gradients": ("#17becf", "-."),
    "smoothgrad": ("#bcbd22", "-."),
    "occlusion": ("#000000", ":"),
    "rise": ("#e6ab02", ":"),
    "mdm": ("#08306b", _DASH_DOT_DOT),
    "extremal": ("#c51b7d", _DASH_DOT_DOT),
}
# methods registered elsewhere (plugins, tests): a colour picked by a hash of the name, densely dotted
_EXTRA_COLORS = ("#a6761d", "#66a61e", "#e7298a", "#7570b3", "#1b9e77", "#d95f02", "#4d4d4d", "#3690c0")
_EXTRA_DASH = (0, (1, 1))
# variants of one method ("mdm, 1 scale (7)"): the method's colour, shaded, with a marker each
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")
_SHADES = (-0.35, 0.35, -0.6, 0.55, -0.15, 0.2, -0.75, 0.7)

_NAME_CHARS = re.compile(r"[A-Za-z0-9_+]")


@dataclass(frozen=True)
class LineStyle:
    """Colour, dash pattern and marker of one method's lines."""

    color: str
    linestyle: object = "-"
    marker: str | None = None
    linewidth: float = 1.6
    zorder: float = 2.0

    def plot_kwargs(self) -> dict:
        """Keyword arguments for ``Axes.plot``."""
        extra = {"marker": self.marker, "markevery": 0.1, "markersize": 4} if self.marker else {}
        return {
            "color": self.color,
            "linestyle": self.linestyle,
            "linewidth": self.linewidth,
            "zorder": self.zorder,
            **extra,
        }

    @property
    def css_border(self) -> str:
        """The style as a CSS border (a swatch next to the method's name in HTML tables)."""
        kind = "solid" if self.linestyle == "-" else "dashed" if self.linestyle == "--" else "dotted"
        return f"3px {kind} {self.color}"


def base_method(label: str, names: Mapping[str, str] | None = None) -> str:
    """The registered explainer a method label stands for: ``names[label]`` if given (the harness records
    it), else the longest registered name the label starts with ("tame, no skip" -> "tame"), else the label."""
    if names and label in names:
        return names[label]
    registered = list_explainers()
    if label in registered:
        return label
    for name in sorted(registered, key=len, reverse=True):
        if label.startswith(name) and not _NAME_CHARS.match(label[len(name) : len(name) + 1] or " "):
            return name
    return label


def _explainer_attr(name: str, attr: str, default):
    try:
        return getattr(explainer_class(name), attr, default)
    except ValueError:  # a label that names no registered explainer
        return default


def is_baseline(label: str, names: Mapping[str, str] | None = None) -> bool:
    """Whether the label's explainer is a model-independent baseline (``Explainer.baseline``)."""
    return bool(_explainer_attr(base_method(label, names), "baseline", False))


def display_percentile(label: str, names: Mapping[str, str] | None = None) -> float | None:
    """The percentile at which displays clip this method's maps (``Explainer.display_percentile``), or None."""
    return _explainer_attr(base_method(label, names), "display_percentile", None)


def _shade(color: str, amount: float) -> str:
    """Mix towards white (amount > 0) or black (amount < 0)."""
    rgb = to_rgb(color)
    target = 1.0 if amount > 0 else 0.0
    return to_hex(tuple(c + abs(amount) * (target - c) for c in rgb))


def method_styles(labels: Iterable[str], names: Mapping[str, str] | None = None) -> dict[str, LineStyle]:
    """One distinct :class:`LineStyle` per label. A registered method always gets its own fixed colour and dash
    pattern, a baseline grey and dashed; a variant of a method (a label that extends it, or that ``names`` maps
    to it) gets the method's colour, shaded, and a marker, assigned in sorted order of the variants present.
    Pass every label of a report at once so each method looks the same in all of its plots and sections."""
    labels = list(dict.fromkeys(labels))
    bases = {label: base_method(label, names) for label in labels}
    colors: dict[str, tuple[str, object]] = {}
    used: set[str] = set()
    baselines = {base for base in bases.values() if _explainer_attr(base, "baseline", False)}
    for base in sorted(set(bases.values())):
        if base in baselines:
            colors[base] = (BASELINE_COLOR, _BASELINE_DASH)
        elif base in _FIXED:
            colors[base] = _FIXED[base]
    for base in sorted(b for b in set(bases.values()) if b not in colors):
        start = zlib.crc32(base.encode())
        free = [
            c for k in range(len(_EXTRA_COLORS)) if (c := _EXTRA_COLORS[(start + k) % len(_EXTRA_COLORS)]) not in used
        ]
        color = free[0] if free else _EXTRA_COLORS[start % len(_EXTRA_COLORS)]
        used.add(color)
        colors[base] = (color, _EXTRA_DASH)
    styles: dict[str, LineStyle] = {}
    for base in sorted(set(bases.values())):
        color, dash = colors[base]
        variants = sorted(label for label, b in bases.items() if b == base and label != base)
        zorder = 1.5 if base in baselines else 2.0  # baselines under the methods
        if base in bases:
            styles[base] = LineStyle(color, dash, zorder=zorder)
        for k, label in enumerate(variants):
            marker = _MARKERS[k % len(_MARKERS)]
            shade = _SHADES[k % len(_SHADES)] * (1 if k < len(_SHADES) else 0.5)
            styles[label] = LineStyle(_shade(color, shade), dash, marker, zorder=zorder)
    return {label: styles[label] for label in labels}
