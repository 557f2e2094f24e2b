"""Everything layer-wise inspection says about one model on one labelled data set, in one call: the
numbers behind ``xcnn inspect`` and its report.

The data are split alternately (even positions fit the probes, odd positions measure everything else),
so no number is measured on the images a probe was fitted on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from .._validate import check_number, check_positive, check_seed
from ..explain import explainer
from ..hooks import frozen
from ..metrics.sanity import spearman
from ..models import Classifier, as_classifier, stage_layers
from .features import (
    _check_layers,
    _pearson_matrix,
    class_means,
    correlation_summary,
    linear_cka,
    pooled_features,
    stack_data,
)
from .importance import Data, _batches, _check_layer, _check_progress, _checked, ablation_effect, filter_importance
from .probes import Probes, _check_labels, _check_names, fit_alternate

__all__ = ["Inspection", "inspect_model"]


@dataclass
class Inspection:
    """The result of :func:`inspect_model` (``to_json()`` for the plain numbers)."""

    model: str
    layers: list[str]
    importance_layer: str
    class_names: list[str]
    same_task: bool
    targets: str
    n_fit: int
    n_eval: int
    probe_accuracy: dict[str, float]
    model_accuracy: float | None
    taylor: list[float]
    ablation: dict[int, float]
    taylor_ablation_spearman: float | None
    top_vs_random: dict
    correlation: dict[str, dict]
    correlation_matrix: Tensor
    similarity: Tensor
    association: Tensor
    samples: dict = field(default_factory=dict)
    probes: Probes | None = None

    def to_json(self) -> dict:
        return {
            "model": self.model, "layers": self.layers, "importance_layer": self.importance_layer,
            "class_names": self.class_names, "same_task": self.same_task, "importance_targets": self.targets,
            "n_fit": self.n_fit, "n_eval": self.n_eval, "probe_accuracy": self.probe_accuracy,
            "model_accuracy": self.model_accuracy,
            "taylor": self.taylor, "ablation": {str(k): v for k, v in self.ablation.items()},
            "taylor_ablation_spearman": self.taylor_ablation_spearman, "top_vs_random": self.top_vs_random,
            "correlation": self.correlation, "layer_similarity": self.similarity.tolist(),
            "class_association": [[None if math.isnan(v) else v for v in row] for row in self.association.tolist()],
            "samples": {
                "top": self.samples.get("top", {}), "explained": self.samples.get("explained", []),
                "labels": self.samples.get("labels", []),
            },
        }  # fmt: skip


@torch.no_grad()
def _predictions(clf: Classifier, data: Data, batch_size: int) -> Tensor:
    """The model's top-1 class of each image of ``data`` (CPU), batch by batch."""
    device = next(clf.parameters()).device
    with frozen(clf):
        return torch.cat([clf(images.to(device)).argmax(1).cpu() for images, _ in _batches(data, batch_size)])


def _first(data: Data, images: int | None) -> Data:
    """The first ``images`` (None: all) samples of ``data``, without reading or copying any: a view of stacked
    tensors, a :class:`~torch.utils.data.Subset` of a dataset (the inspection streams them batch by batch)."""
    if isinstance(data, Mapping):
        if not isinstance(data.get("image"), Tensor):
            raise ValueError(f"data given as a dict needs an 'image' tensor [N,3,H,W]; it has the keys {sorted(data)}")
        n = len(data["image"]) if images is None else min(images, len(data["image"]))
        return {key: value[:n] for key, value in data.items()}
    if isinstance(data, (str, bytes, Tensor)) or not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(f"data must be a dataset or a dict of stacked tensors, got {type(data).__name__}")
    return Subset(data, range(len(data) if images is None else min(images, len(data))))


def _alternate(data: Data, start: int) -> Data:
    """Every other sample of ``data`` from ``start`` (0: the even positions, 1: the odd ones), as a view."""
    if isinstance(data, Mapping):
        return {key: value[start::2] for key, value in data.items()}
    return Subset(data, range(start, len(data), 2))


class _Relabelled(Dataset):
    """``data``'s images with other labels (the model's own top-1, to judge zeroed filters on a transfer task)."""

    def __init__(self, data: Dataset, labels: Tensor) -> None:
        self.data, self.labels = data, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = self.data[index]
        if isinstance(sample, Mapping):
            sample = sample["image"]
        elif isinstance(sample, (tuple, list)):
            sample = sample[0]
        return {"image": sample, "label": self.labels[index]}


def _same_task(clf: Classifier, k: int, class_names: Sequence[str] | None) -> bool:
    if class_names is not None and clf.class_names is not None:
        return list(class_names) == list(clf.class_names)
    return k == clf.num_classes


def inspect_model(
    model: nn.Module,
    data: Data,
    *,
    layers: Sequence[str] | None = None,
    importance_layer: str | None = None,
    images: int | None = 512,
    class_names: Sequence[str] | None = None,
    top: int = 10,
    draws: int = 5,
    agreement_channels: int = 64,
    samples: int = 4,
    l2: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool | None = None,
) -> Inspection:
    """Inspect ``model`` on the first ``images`` labelled images of ``data``.

    Probes per layer (``layers``, default the stage outputs) fitted on the even-position images, their
    accuracy on the odd ones; on the odd ones also: the model's own accuracy (when the data's classes are
    the model's), Taylor importance of every filter of ``importance_layer`` (default the deepest layer),
    ablation of ``agreement_channels`` filters (half the top ones by Taylor, half drawn at random;
    ``taylor_ablation_spearman`` over them), accuracy with the ``top`` filters by Taylor (ranked on the
    probe-fitting half) zeroed against ``top`` random filters (``draws`` draws), each layer's feature correlation, the importance layer's
    filter-class association (mean pooled activation per class) and the linear CKA between layers; probe-CAM maps and layer-wise top-5 for ``samples`` images. When the data's classes are not
    the model's (a transfer task), importance targets the model's top-1 instead of the label. The images are
    streamed batch by batch (one pass per measurement; only the ``samples`` shown are held together), so
    ``data`` must give the same images at every pass (no random transforms); each batch of the first pass is
    checked (finite pixels in [0,1], integer labels >= 0).
    """
    clf = as_classifier(model)
    layers = _check_layers(clf, layers if layers is not None else stage_layers(clf))
    importance_layer = (
        layers[-1] if importance_layer is None else _check_layer(clf, importance_layer, "importance_layer")
    )
    if images is not None:
        check_positive("images", images)
    class_names = _check_names(class_names)
    for what, value in (("top", top), ("batch_size", batch_size)):
        check_positive(what, value)
    for what, value in (("draws", draws), ("agreement_channels", agreement_channels), ("samples", samples)):
        check_number(what, value, integer=True, low=0)
    l2 = check_number("l2", l2, low=0)  # an infinite penalty would leave every probe at chance, silently
    check_seed(seed)
    _check_progress(progress)

    # the data are streamed: one pass per measurement, no copy of the images is kept (views of stacked tensors
    # or subsets of a dataset). The first pass checks each batch as it is read; the later ones read the same
    # images (the data must be deterministic) and are not checked again (on CUDA data a check is a host sync)
    subset = _first(data, images)
    tapped = list(dict.fromkeys([*layers, importance_layer]))
    feats, labels = pooled_features(clf, subset, tapped, batch_size=batch_size, progress=progress)
    fit_part, evaluation = _checked(_alternate(subset, 0)), _checked(_alternate(subset, 1))
    if labels is None:
        raise ValueError("layer-wise inspection needs labelled data (samples with a 'label')")
    k = int(labels.max()) + 1
    if class_names is not None and len(class_names) < k:
        raise ValueError(f"class_names has {len(class_names)} names, but the data have labels up to {k - 1}")
    if class_names is None and clf.class_names is not None and len(clf.class_names) == k:
        class_names = clf.class_names
    names = list(class_names) if class_names is not None else [str(c) for c in range(k)]
    same = _same_task(clf, k, class_names)
    targets = "label" if same else "predicted"
    fit_labels, eval_labels = labels[0::2], labels[1::2]
    _check_labels(fit_labels, k)
    eval_feats = {name: f[1::2] for name, f in feats.items()}
    weights, biases, accuracy = fit_alternate(feats, labels, layers, k, l2)
    probes = Probes(clf, weights, biases, class_names=names, model_task=same)

    device = next(clf.parameters()).device
    predicted = _predictions(clf, evaluation, batch_size)
    model_accuracy = float((predicted == eval_labels).double().mean()) if same else None
    # zeroing filters is judged by accuracy against the labels, or on another task than the model's by
    # how often the model's own top-1 survives
    if same:
        judged = evaluation
    elif isinstance(evaluation, Mapping):
        judged = _checked({"image": evaluation["image"], "label": predicted})
    else:
        judged = _checked(_Relabelled(evaluation, predicted))

    taylor = filter_importance(
        clf, evaluation, importance_layer, "taylor", targets=targets, batch_size=batch_size, progress=progress
    )
    c = len(taylor)
    gen = torch.Generator().manual_seed(seed)
    order = taylor.argsort(descending=True)
    half = min(c, agreement_channels) // 2
    rest = order[half:]
    chosen = torch.cat(
        [order[:half], rest[torch.randperm(len(rest), generator=gen)[: min(c, agreement_channels) - half]]]
    )
    ablation_all = torch.full((c,), math.nan, dtype=torch.float64)  # agreement_channels=0: none ablated
    if len(chosen):
        ablation_all = filter_importance(
            clf, evaluation, importance_layer, "ablation", targets=targets, batch_size=batch_size,
            channels=chosen.tolist(), progress=progress,
        )  # fmt: skip
    ablation = {int(ch): float(ablation_all[ch]) for ch in chosen}
    rho = None
    if len(chosen) > 2:
        rho = float(spearman(taylor[chosen].view(1, 1, -1), ablation_all[chosen].view(1, 1, -1))[0])

    # the filters to zero are ranked on the other half of the images, so that the accuracy they are judged
    # by is not measured on the images that selected them
    n_top = min(top, c)
    ranking = filter_importance(
        clf, fit_part, importance_layer, "taylor", targets=targets, batch_size=batch_size, progress=progress
    )
    top_filters = ranking.argsort(descending=True)[:n_top].tolist()
    effect_top = ablation_effect(clf, judged, importance_layer, top_filters, targets=targets, batch_size=batch_size)
    random_effects = [
        ablation_effect(
            clf,
            judged,
            importance_layer,
            torch.randperm(c, generator=gen)[:n_top].tolist(),
            targets=targets,
            batch_size=batch_size,
        )
        for _ in range(draws)
    ]
    top_vs_random = {"filters": n_top, "top_filters": top_filters, "top": effect_top, "random": random_effects}

    correlation = {
        name: correlation_summary(_pearson_matrix(eval_feats[name]), top=10)
        for name in dict.fromkeys([*layers, importance_layer])
    }
    correlation_matrix = _pearson_matrix(eval_feats[importance_layer])
    association = class_means(eval_feats[importance_layer], eval_labels, k)
    similarity = torch.ones(len(layers), len(layers), dtype=torch.float64)
    for a in range(len(layers)):
        for b in range(a + 1, len(layers)):
            try:
                similarity[a, b] = similarity[b, a] = linear_cka(eval_feats[layers[a]], eval_feats[layers[b]])
            except ValueError:
                similarity[a, b] = similarity[b, a] = math.nan

    sample_info: dict = {"images": None, "labels": []}
    if samples > 0:
        shown = stack_data(evaluation, samples)  # only the few images shown are loaded together
        sample_info = {"images": shown["image"], "labels": [names[int(y)] for y in shown["label"]]}
        top5 = probes.top(shown["image"].to(device), k=5)
        sample_info["top"] = top5
        if same:  # the shown images are the first measured ones: their top-1 is already known
            explained = predicted[:samples]
        else:  # each image's class by the deepest probe
            explained = probes.logits(shown["image"].to(device))[layers[-1]].argmax(1)
        sample_info["explained"] = [names[int(t)] for t in explained]
        sample_info["maps"] = {
            name: explainer("probe_cam", clf, layer=name, probes=probes)(
                shown["image"].to(device), explained.to(device)
            ).cpu()
            for name in layers
        }
    return Inspection(
        model=clf.name, layers=layers, importance_layer=importance_layer, class_names=names, same_task=same,
        targets=targets, n_fit=len(fit_labels), n_eval=len(eval_labels), probe_accuracy=accuracy,
        model_accuracy=model_accuracy, taylor=taylor.tolist(), ablation=ablation, taylor_ablation_spearman=rho,
        top_vs_random=top_vs_random, correlation=correlation, correlation_matrix=correlation_matrix,
        similarity=similarity, association=association, samples=sample_info, probes=probes,
    )  # fmt: skip
