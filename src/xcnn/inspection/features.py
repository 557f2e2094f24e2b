"""How a layer's features relate: channel correlation, channel-class association, and the similarity of
layers' representations (linear CKA, Kornblith et al. 2019), all from globally pooled activations that
are reduced batch by batch (no activation map outlives its batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..hooks import Tap, frozen, named_layer
from ..models import as_classifier
from .importance import Data, _batches, progress_bar

__all__ = [
    "class_association",
    "class_means",
    "correlation_summary",
    "feature_correlation",
    "layer_similarity",
    "linear_cka",
    "pooled_features",
    "redundant_pairs",
    "stack_data",
]


@torch.no_grad()
def pooled_features(
    model: nn.Module, data: Data, layers: Sequence[str], *, batch_size: int = 64, progress: bool | None = None
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Each layer's output averaged over its spatial positions, per image: ``({layer: [N,C]}, labels [N]
    or None)``, float64 on the CPU; one forward per batch with every layer tapped. ``progress``: a tqdm
    bar (None: only on a terminal)."""
    clf = as_classifier(model)
    if not layers:
        raise ValueError("no layers given")
    for name in layers:
        named_layer(clf.backbone, name)
    device = next(clf.parameters()).device
    parts: dict[str, list[Tensor]] = {name: [] for name in layers}
    labels: list[Tensor] | None = []
    with frozen(clf):
        for images, y in progress_bar(_batches(data, batch_size), "pooled features", progress):
            with Tap(clf.backbone, list(layers)) as tap:
                clf(images.to(device))
            for name in layers:
                a = tap.get(name)
                if a.dim() != 4:
                    raise ValueError(
                        f"layer {name!r} has output shape {list(a.shape)}; pooled features need a feature map [B,C,h,w]"
                    )
                parts[name].append(a.mean((2, 3), dtype=torch.float64).cpu())
            if labels is not None:
                labels = None if y is None else [*labels, y.long().cpu()]
    if not parts[layers[0]]:
        raise ValueError("the data set is empty")
    return {name: torch.cat(p) for name, p in parts.items()}, torch.cat(labels) if labels else None


def stack_data(data: Data, images: int | None, seed: int | None = None) -> dict[str, Tensor]:
    """``images`` (None: all) labelled samples of ``data`` as stacked ``image`` / ``label`` tensors: the
    first ones, or with ``seed`` a seeded random draw (a folder is ordered class by class)."""
    total = len(data["image"]) if isinstance(data, dict) else len(data)
    if seed is not None and images is not None and images < total:
        pick = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:images]
        if isinstance(data, dict):
            data = {k: v[pick] for k, v in data.items()}
        else:
            data = torch.utils.data.Subset(data, pick.tolist())
    parts: dict[str, list[Tensor]] = {"image": [], "label": []}
    n = 0
    for x, y in _batches(data, 256):
        if y is None:
            raise ValueError("layer-wise inspection needs labelled data (samples with a 'label')")
        take = len(x) if images is None else min(len(x), images - n)
        parts["image"].append(x[:take])
        parts["label"].append(torch.as_tensor(y)[:take].long())
        n += take
        if images is not None and n >= images:
            break
    if n == 0:
        raise ValueError("the data set is empty")
    return {k: torch.cat(v) for k, v in parts.items()}


def _pearson_matrix(x: Tensor) -> Tensor:
    """Pearson correlation of the columns of ``x`` ``[N,C]``; a constant column correlates 0 with the
    others (1 with itself)."""
    x = x - x.mean(0, keepdim=True)
    norm = x.norm(dim=0)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    corr = (x.T @ x) / (safe[:, None] * safe[None, :])
    corr = (corr + corr.T) / 2  # exactly symmetric (a matrix product rounds its two triangles differently)
    corr = torch.where((norm[:, None] > 0) & (norm[None, :] > 0), corr, torch.zeros_like(corr))
    corr.fill_diagonal_(1.0)
    return corr.clamp(-1, 1)


def feature_correlation(model: nn.Module, data: Data, layer: str, *, batch_size: int = 64) -> Tensor:
    """Pearson correlation ``[C,C]`` of ``layer``'s pooled channel activations over ``data``."""
    feats, _ = pooled_features(model, data, [layer], batch_size=batch_size)
    if len(feats[layer]) < 2:
        raise ValueError("a correlation needs at least 2 images")
    return _pearson_matrix(feats[layer])


def correlation_summary(corr: Tensor, top: int = 3, threshold: float = 0.9) -> dict:
    """A correlation matrix ``[C,C]`` in a few numbers: ``{"channels", "mean_abs"`` (mean ``|r|`` between
    distinct filters), ``"redundant_pairs"`` (pairs with ``|r| > threshold``), ``"top_pairs"`` (the ``top``
    most correlated ``[i, j, r]``)``}``."""
    c = corr.shape[0]
    if c < 2:
        return {"channels": c, "mean_abs": 0.0, "redundant_pairs": 0, "top_pairs": []}
    off = corr[~torch.eye(c, dtype=torch.bool)].abs()
    return {
        "channels": c,
        "mean_abs": float(off.mean()),
        "redundant_pairs": int((off > threshold).sum()) // 2,
        "top_pairs": [[i, j, round(r, 4)] for i, j, r in redundant_pairs(corr, top)],
    }


def redundant_pairs(corr: Tensor, top: int = 10) -> list[tuple[int, int, float]]:
    """The ``top`` channel pairs ``(i, j, r)`` with ``i < j`` and the largest ``|r|`` (the most redundant
    filters: one nearly determines the other), most correlated first."""
    c = corr.shape[0]
    i, j = torch.triu_indices(c, c, offset=1)
    r = corr[i, j]
    order = r.abs().argsort(descending=True)[:top]
    return [(int(i[k]), int(j[k]), float(r[k])) for k in order]


def class_association(model: nn.Module, data: Data, layer: str, *, batch_size: int = 64) -> Tensor:
    """Mean pooled activation of each channel per class, ``[K,C]`` (rows of classes absent from ``data``
    are NaN); needs labelled data."""
    feats, labels = pooled_features(model, data, [layer], batch_size=batch_size)
    if labels is None:
        raise ValueError("class association needs labelled data (samples with a 'label')")
    return class_means(feats[layer], labels, as_classifier(model).num_classes)


def class_means(x: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Mean of the rows of ``x`` ``[N,C]`` per class, ``[K,C]`` (NaN rows for absent classes)."""
    out = torch.full((num_classes, x.shape[1]), float("nan"), dtype=torch.float64)
    for c in range(num_classes):
        mine = labels == c
        if bool(mine.any()):
            out[c] = x[mine].double().mean(0)
    return out


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA between two representations of the same ``N`` examples (``[N,C1]``, ``[N,C2]``):
    ``||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` with column-centred ``X_c``, ``Y_c``. 1 for
    representations equal up to an orthogonal transform and isotropic scaling; 0 for unrelated ones."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs [N,C] matrices of the same N, got {list(x.shape)} and {list(y.shape)}")
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    denom = (x.T @ x).norm() * (y.T @ y).norm()
    if float(denom) == 0.0:
        raise ValueError("linear_cka: a representation is constant over the examples")
    return float((y.T @ x).norm() ** 2 / denom)


def layer_similarity(model: nn.Module, data: Data, layers: Sequence[str], *, batch_size: int = 64) -> Tensor:
    """Linear CKA ``[L,L]`` between the pooled features of ``layers`` over ``data``."""
    feats, _ = pooled_features(model, data, layers, batch_size=batch_size)
    out = torch.ones(len(layers), len(layers), dtype=torch.float64)
    for a in range(len(layers)):
        for b in range(a + 1, len(layers)):
            out[a, b] = out[b, a] = linear_cka(feats[layers[a]], feats[layers[b]])
    return out
