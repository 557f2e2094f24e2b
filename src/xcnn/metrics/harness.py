"""The evaluation harness: methods x metrics x dataset -> rows ``{method, metric, value, n, seconds}``.

Each method's maps are computed once per batch and fed to every map-based metric; consistency and the
sanity check (which call the explainer themselves) run on the first ``slow_images`` images. Every row
carries the method's explanation time (``seconds`` for its ``n`` images, and ``images_per_second``) so
speed is read next to quality. Results are written as CSV, JSON and a Markdown table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .._io import atomic_write, prepare_out_dir
from .._validate import check_positive
from ..data import batches
from ..explain import explainer as make_explainer
from ..explain import explainer_class
from ..models import Classifier, as_classifier
from .consistency import consistency
from .faithfulness import average_drop_increase, insertion_deletion
from .localization import energy_in_box, iou, pointing_game, shortcut_energy
from .sanity import randomization_sanity

__all__ = [
    "METRICS",
    "METRIC_DIRECTIONS",
    "SPEED_COLUMN",
    "Evaluation",
    "MetricTable",
    "column_decimals",
    "evaluate",
    "metric_direction",
    "metric_table",
]

#: metric groups the harness knows; each produces one or more rows
METRICS = ("adic", "insertion_deletion", "pointing", "energy", "iou", "shortcut", "consistency", "sanity")
_NEEDS_MASK = {"pointing", "energy", "iou"}
_SLOW = {"consistency", "sanity"}
#: the explanation-time column that tables add after the metrics
SPEED_COLUMN = "s / image"
#: which way each row metric is better: +1 higher, -1 lower, 0 not ranked. A key ending in "@" or "_" is a
#: prefix (AD@100, consistency_pearson). Sanity is Spearman/SSIM between the trained and the randomised
#: model's maps: lower = the map depends more on what the model learned. The shortcut energy is not ranked:
#: a high share is right for a model that uses the planted shortcut and wrong for one that does not. The two
#: notes (the share of images with an empty mask, or with a constant map in the sanity check) are not ranked.
METRIC_DIRECTIONS: dict[str, int] = {
    "AD@": -1, "IC@": 1, "insertion": 1, "deletion": -1, "pointing": 1, "pointing: empty masks": 0,
    "energy_in_mask": 1, "iou@": 1, "shortcut_energy": 0, "consistency_": 1, "sanity_": -1,
    "sanity: constant maps": 0, SPEED_COLUMN: -1,
}  # fmt: skip
#: notes rows that are left out when no image needed them
_NOTES = ("pointing: empty masks", "sanity: constant maps")


def metric_direction(metric: str) -> int:
    """+1 if higher values of the row metric (or table column) ``metric`` are better, -1 if lower, 0 if unranked."""
    if metric in METRIC_DIRECTIONS:
        return METRIC_DIRECTIONS[metric]
    prefix = next((k for k in METRIC_DIRECTIONS if k.endswith(("@", "_")) and metric.startswith(k)), None)
    return 0 if prefix is None else METRIC_DIRECTIONS[prefix]


def column_decimals(values: Iterable[float | None], *, relative: bool = False) -> int:
    """Decimals for one table column: 4 significant digits of its largest magnitude (at most 3 decimals); with
    ``relative`` (timings, which span orders of magnitude) 2 significant digits of its smallest non-zero one
    (at most 4)."""
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    if relative:
        smallest = min((v for v in finite if v > 0), default=1.0)
        return max(0, min(4, 1 - math.floor(math.log10(smallest))))
    largest = max(finite, default=0.0)
    return 3 if largest == 0 else max(0, min(3, 3 - math.floor(math.log10(largest))))


@dataclass
class MetricTable:
    """Rows as a table: one line per method, one column per metric then :data:`SPEED_COLUMN`; ``text`` holds
    the values at one precision per column ("" where not measured, "nan" where no image had a finite value)."""

    methods: list[str]
    columns: list[str]
    values: list[list[float | None]]
    text: list[list[str]]
    decimals: list[int]

    def rounded(self, i: int, j: int) -> float | None:
        """The value at method ``i``, column ``j`` as the table shows it (None if missing or NaN)."""
        v = self.values[i][j]
        return None if v is None or not math.isfinite(v) else round(v, self.decimals[j])

    def best(self, exclude: Collection[str] = ()) -> list[list[bool]]:
        """``[method][column]``: whether the cell holds its column's best shown value by :func:`metric_direction`
        among the methods not in ``exclude`` (baselines). Ties are all marked; a column where every method shows
        the same value (or only one method has a value), and an unranked column, has no mark."""
        marks = [[False] * len(self.columns) for _ in self.methods]
        for j, column in enumerate(self.columns):
            sign = metric_direction(column)
            shown = {i: self.rounded(i, j) for i, m in enumerate(self.methods) if m not in exclude}
            shown = {i: v for i, v in shown.items() if v is not None}
            if sign == 0 or len(set(shown.values())) < 2:
                continue
            top = max(sign * v for v in shown.values())
            for i, v in shown.items():
                marks[i][j] = sign * v == top
        return marks


def metric_table(rows: Sequence[Mapping]) -> MetricTable:
    """Harness rows -> :class:`MetricTable` (methods and metrics in first-seen order)."""
    columns = list(dict.fromkeys(r["metric"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["metric"]): r["value"] for r in rows}
    values = [[cell.get((m, k)) for k in columns] for m in methods]
    for i, m in enumerate(methods):
        first = next(r for r in rows if r["method"] == m)
        values[i].append(first["seconds"] / max(first["n"], 1))
    columns.append(SPEED_COLUMN)
    decimals = [
        column_decimals((row[j] for row in values), relative=column == SPEED_COLUMN) for j, column in enumerate(columns)
    ]
    text = [
        [
            "" if v is None else "nan" if not math.isfinite(v) else f"{v:.{d}f}"
            for v, d in zip(row, decimals, strict=True)
        ]
        for row in values
    ]
    return MetricTable(methods, columns, values, text, decimals)


@dataclass
class Evaluation:
    """What :func:`evaluate` measured: table rows, mean insertion/deletion curves, sample maps."""

    rows: list[dict] = field(default_factory=list)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    #: the first images' pixels, labels, targets and each method's maps (for reports)
    samples: dict[str, Tensor] = field(default_factory=dict)
    sample_maps: dict[str, Tensor] = field(default_factory=dict)
    #: each method label's registered explainer name (``"ig, 8 steps"`` -> ``"integrated_gradients"``)
    names: dict[str, str] = field(default_factory=dict)

    def value(self, method: str, metric: str) -> float:
        return next(r["value"] for r in self.rows if r["method"] == method and r["metric"] == metric)

    def markdown(self) -> str:
        """Methods as rows, metrics as columns, plus the explanation speed; one precision per column."""
        table = metric_table(self.rows)
        lines = ["| method | " + " | ".join(table.columns) + " |", "|---" * (len(table.columns) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(text) + " |" for m, text in zip(table.methods, table.text, strict=True)]
        return "\n".join(lines)

    def save(self, folder: str | Path, stem: str = "metrics") -> dict[str, Path]:
        """Write ``stem.csv``, ``stem.json`` (rows and curves) and ``stem.md`` into ``folder`` atomically; all
        three are made before the first is written, so a value that cannot be written leaves none behind."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["method", "metric", "value", "n", "seconds", "images_per_second"])
        writer.writeheader()
        writer.writerows(self.rows)
        # strict JSON: a value no image had (NaN, e.g. a sanity row whose maps were all constant, or a curve of
        # a model whose outputs were NaN) becomes null
        rows = [{k: _finite_or_none(v) for k, v in r.items()} for r in self.rows]
        curves = {
            method: {kind: [_finite_or_none(v) for v in values] for kind, values in kinds.items()}
            for method, kinds in self.curves.items()
        }
        texts = {
            "csv": buf.getvalue(),
            "json": json.dumps({"rows": rows, "curves": curves}, indent=2, allow_nan=False) + "\n",
            "md": self.markdown() + "\n",
        }
        folder = prepare_out_dir(folder)
        paths = {kind: folder / f"{stem}.{kind}" for kind in texts}
        for kind, text in texts.items():
            atomic_write(paths[kind], lambda tmp, text=text: tmp.write_text(text))
        return paths


def _finite_or_none(value: object) -> object:
    """``value``, or None for a float that is not finite (strict JSON has no NaN)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _spec(method: str | tuple) -> tuple[str, str, dict]:
    """``(label, name, options)`` from ``name``, ``(name, options)`` or ``(name, options, label)``."""
    if isinstance(method, str):
        return method, method, {}
    if (
        isinstance(method, tuple)
        and len(method) in (2, 3)
        and isinstance(method[0], str)
        and isinstance(method[1], Mapping)
    ):
        return (method[2] if len(method) == 3 else method[0]), method[0], dict(method[1])
    raise TypeError(f"a method is a name, (name, options) or (name, options, label); got {method!r}")


def evaluate(
    model: nn.Module,
    data: Dataset | Mapping[str, Tensor],
    methods: Sequence[str | tuple[str, dict]],
    metrics: Sequence[str] = ("adic", "insertion_deletion", "pointing", "energy", "iou"),
    *,
    targets: str = "predicted",
    layer: str | Sequence[str] | None = None,
    batch_size: int = 32,
    metric_batch_size: int | None = None,
    slow_images: int = 32,
    slow_methods: Sequence[str] | None = None,
    keep_samples: int = 6,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> Evaluation:
    """Explain every image of ``data`` (a dataset of dict samples with ``"image"``, ``"label"`` and
    optionally ``"mask"``/``"shortcut_mask"``, or such a dict of stacked tensors) with every method, and
    score the maps with every metric in ``metrics`` (see :data:`METRICS`).

    ``methods``: names, ``(name, options)`` or ``(name, options, label)`` (variants of one method under
    their own labels, e.g. an ablation). ``slow_methods``: the methods that get the consistency and
    sanity metrics (default: all; they re-run the explainer several times per image). ``targets``: ``"predicted"`` (the model's top-1, as the
    papers) or ``"label"``. Metrics that need masks are skipped, with a note in the rows, when the data
    has none.
    """
    for name, value in (("metrics", metrics), ("methods", methods), ("slow_methods", slow_methods)):
        if isinstance(value, str):  # its characters would be taken as names
            raise TypeError(f"{name} must be a list of names, got the string {value!r}")
    check_positive("batch_size", batch_size)
    if metric_batch_size is not None:
        check_positive("metric_batch_size", metric_batch_size)
    for name, value in (("slow_images", slow_images), ("keep_samples", keep_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {', '.join(METRICS)}")
    if targets not in ("predicted", "label"):
        raise ValueError(f"targets must be 'predicted' or 'label', got {targets!r}")
    clf: Classifier = as_classifier(model)
    if device is not None:
        clf.to(device)
    dev = next(clf.parameters()).device
    specs = [_spec(m) for m in methods]
    if not specs:
        raise ValueError("no methods to evaluate")
    labels = [label for label, _, _ in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(
            f"two methods share a label in {labels}; give variants their own label: (name, options, label)"
        )
    strays = sorted(set(slow_methods or ()) - set(labels))
    if strays:
        raise ValueError(f"slow_methods {strays} are not among the methods' labels {labels}")

    def build(name: str, options: dict, net: nn.Module):
        return make_explainer(name, net, layer=layer if explainer_class(name).uses_layer else None, **options)

    explainers = {label: build(name, options, clf) for label, name, options in specs}
    mbs = metric_batch_size or batch_size
    sums: dict[tuple[str, str], float] = {}
    counts: dict[tuple[str, str], int] = {}
    seconds = dict.fromkeys(explainers, 0.0)
    curve_sums: dict[str, dict[str, Tensor]] = {}
    slow_done = 0
    samples: dict[str, list[Tensor]] = {}
    sample_maps: dict[str, list[Tensor]] = {name: [] for name in explainers}

    def add(method: str, metric: str, values: Tensor) -> None:
        values = values.float()
        finite = values[torch.isfinite(values)]
        sums[(method, metric)] = sums.get((method, metric), 0.0) + float(finite.sum())
        counts[(method, metric)] = counts.get((method, metric), 0) + len(finite)

    from tqdm import tqdm

    total = len(data["image"]) if isinstance(data, Mapping) else len(data)
    bar = tqdm(total=total, desc="evaluating", unit="img", disable=None if progress is None else not progress)
    try:
        for batch in batches(data, batch_size):
            images = batch["image"].to(dev)
            if targets == "label":
                t = batch["label"].to(dev)
            else:
                with torch.no_grad():
                    t = clf.eval()(images).argmax(1)
            mask = batch.get("mask")
            shortcut = batch.get("shortcut_mask")
            if len(samples.get("image", [])) < keep_samples:
                for key in ("image", "label", "mask"):
                    if key in batch:
                        samples.setdefault(key, []).append(batch[key][:keep_samples])
                samples.setdefault("target", []).append(t[:keep_samples].cpu())
            n_slow = max(0, min(len(images), slow_images - slow_done))
            for name, expl in explainers.items():
                start = time.perf_counter()
                maps = expl(images, t)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                seconds[name] += time.perf_counter() - start
                if sum(len(m) for m in sample_maps[name]) < keep_samples:
                    sample_maps[name].append(maps[:keep_samples].cpu())
                _score(name, maps, images, t, mask, shortcut, metrics, clf, mbs, add, curve_sums)
                if n_slow and (slow_methods is None or name in slow_methods):
                    spec = next(sp for sp in specs if sp[0] == name)
                    _score_slow(name, expl, spec[1], spec[2], images[:n_slow], t[:n_slow], metrics, clf, add, build)
            slow_done += n_slow
            bar.update(len(images))
    finally:
        bar.close()

    result = Evaluation()
    for (method, metric), total_value in sums.items():
        if metric in _NOTES and total_value == 0:
            continue  # every image had an object / a map that is not constant: nothing to report
        n = counts[(method, metric)]
        result.rows.append({
            "method": method, "metric": metric, "value": total_value / n if n else float("nan"), "n": n,
            "seconds": round(seconds[method], 4), "images_per_second": round(total / seconds[method], 3) if seconds[method] > 0 else None,
        })  # fmt: skip
    for method, kinds in curve_sums.items():
        result.curves[method] = {k: (v / counts[(method, k)]).tolist() for k, v in kinds.items()}
    result.samples = {k: torch.cat(v)[:keep_samples] for k, v in samples.items()}
    result.sample_maps = {k: torch.cat(v)[:keep_samples] for k, v in sample_maps.items() if v}
    result.names = {label: name for label, name, _ in specs}
    return result


def _score(name, maps, images, t, mask, shortcut, metrics, clf, batch_size, add, curve_sums) -> None:
    """Map-based metrics for one batch, accumulated per image."""
    if "adic" in metrics:
        for key, values in average_drop_increase(clf, images, maps, t, batch_size=batch_size, per_image=True).items():
            add(name, key, values)
    if "insertion_deletion" in metrics:
        result = insertion_deletion(clf, images, maps, t, batch_size=batch_size, per_image=True)
        for kind in ("insertion", "deletion"):
            add(name, kind, result[kind])
            curve_sums.setdefault(name, {})
            curve_sums[name][kind] = curve_sums[name].get(kind, 0) + result["curves"][kind].sum(0)
    if mask is not None:
        mask = mask.to(maps.device)
        if "pointing" in metrics:
            import warnings

            with warnings.catch_warnings():  # empty masks count as misses; their share is its own row
                warnings.simplefilter("ignore")
                add(name, "pointing", pointing_game(maps, mask, per_image=True))
            # over every image (not only the batches that had one), so the share is of the whole data set
            add(name, "pointing: empty masks", (~mask.flatten(1).any(1)).float() * 100)
        if "energy" in metrics:
            add(name, "energy_in_mask", energy_in_box(maps, mask, per_image=True))
        if "iou" in metrics:
            add(name, "iou@mean", iou(maps, mask, "mean", per_image=True))
            add(name, "iou@0.5", iou(maps, mask, 0.5, per_image=True))
    if "shortcut" in metrics and shortcut is not None and bool(shortcut.any()):
        add(name, "shortcut_energy", shortcut_energy(maps, shortcut.to(maps.device), per_image=True))


def _score_slow(label, expl, name, options, images, t, metrics, clf, add, build) -> None:
    if "consistency" in metrics:
        for key, values in consistency(expl, images, targets=t, per_image=True).items():
            add(label, f"consistency_{key}", values)
    if "sanity" in metrics:
        with warnings.catch_warnings():  # a TAME head meeting the randomised copies is the point here
            warnings.filterwarnings("ignore", message=".*trained on .* with other weights")
            result = randomization_sanity(lambda net: build(name, options, net), clf, images, t, per_image=True)
        # the fully randomised model; images with a constant map are NaN there (left out of n) and counted
        add(label, "sanity_spearman", result["spearman"][-1])
        add(label, "sanity_ssim", result["ssim"][-1])
        add(label, "sanity: constant maps", result["excluded"][-1].float() * 100)
