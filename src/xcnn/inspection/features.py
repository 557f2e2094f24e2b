"""How a layer's features relate: channel correlation, channel-class association, and the similarity of
layers' representations (linear CKA, Kornblith et al. 2019), all from globally pooled activations that
are reduced batch by batch (no activation map outlives its batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .._validate import check_number, check_positive, check_seed
from ..hooks import Tap, frozen
from ..models import Classifier, as_classifier
from .importance import Data, _batches, _check_layer, _check_progress, progress_bar

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


def _check_layers(clf: Classifier, layers: object, what: str = "layers") -> list[str]:
    """``layers`` (one module name, or a sequence of them) as a list, checked: at least one, each a module of
    the model, none named twice (its features would be stacked twice)."""
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, Sequence):
        raise TypeError(f"{what} must be a list of module names, got {type(layers).__name__} {layers!r}")
    if not layers:
        raise ValueError(f"{what} is empty: name at least one layer (e.g. {what}=['layer4'])")
    for name in layers:
        _check_layer(clf, name, f"{what} entry")
    twice = sorted({name for name in layers if list(layers).count(name) > 1})
    if twice:
        raise ValueError(f"{what} names {twice} more than once; name each layer once")
    return list(layers)


@torch.no_grad()
def pooled_features(
    model: nn.Module, data: Data, layers: Sequence[str], *, batch_size: int = 64, progress: bool | None = None
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Each layer's output averaged over its spatial positions, per image: ``({layer: [N,C]}, labels [N]
    or None)``, float64 on the CPU; one forward per batch with every layer tapped. ``progress``: a tqdm
    bar (None: only on a terminal)."""
    clf = as_classifier(model)
    layers = _check_layers(clf, layers)
    _check_progress(progress)
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
    if images is not None:
        check_positive("images", images)
    if seed is not None:
        check_seed(seed)
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
    _check_layer(as_classifier(model), layer)
    feats, _ = pooled_features(model, data, [layer], batch_size=batch_size)
    if len(feats[layer]) < 2:
        raise ValueError("a correlation needs at least 2 images")
    return _pearson_matrix(feats[layer])


def correlation_summary(corr: Tensor, top: int = 3, threshold: float = 0.9) -> dict:
    """A correlation matrix ``[C,C]`` in a few numbers: ``{"channels", "mean_abs"`` (mean ``|r|`` between
    distinct filters), ``"redundant_pairs"`` (pairs with ``|r| > threshold``), ``"top_pairs"`` (the ``top``
    most correlated ``[i, j, r]``)``}``."""
    _check_correlation(corr)
    check_number("top", top, integer=True, low=0)
    check_number("threshold", threshold, low=0, high=1)
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
    _check_correlation(corr)
    check_number("top", top, integer=True, low=0)
    c = corr.shape[0]
    i, j = torch.triu_indices(c, c, offset=1)
    r = corr[i, j]
    order = r.abs().argsort(descending=True)[:top]
    return [(int(i[k]), int(j[k]), float(r[k])) for k in order]


def _check_correlation(corr: object) -> None:
    if not isinstance(corr, Tensor) or corr.dim() != 2 or corr.shape[0] != corr.shape[1]:
        got = f"shape {list(corr.shape)}" if isinstance(corr, Tensor) else type(corr).__name__
        raise ValueError(f"corr must be a square correlation matrix [C,C] (a tensor), got {got}")


def class_association(model: nn.Module, data: Data, layer: str, *, batch_size: int = 64) -> Tensor:
    """Mean pooled activation of each channel per class, ``[K,C]`` (rows of classes absent from ``data``
    are NaN); needs labelled data."""
    _check_layer(as_classifier(model), layer)
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
    """Linear CKA between two representations of the same ``N`` examples (``[N,C1]``, ``[N,C2]`` tensors or
    arrays): ``||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` with column-centred ``X_c``, ``Y_c``.
    1 for representations equal up to an orthogonal transform and isotropic scaling; 0 for unrelated ones."""
    x, y = _representation(x, "x"), _representation(y, "y")
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs [N,C] matrices of the same N, got {list(x.shape)} and {list(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"linear_cka needs at least 2 examples, got {x.shape[0]}")
    x, y = _centred(x, "x"), _centred(y, "y")
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def _representation(value: object, name: str) -> Tensor:
    if isinstance(value, np.ndarray):
        if not (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)):
            raise TypeError(f"linear_cka: {name} must hold real numbers, got a numpy {value.dtype} array")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, Tensor):
        raise TypeError(f"linear_cka: {name} must be a [N,C] tensor or numpy array, got {type(value).__name__}")
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"linear_cka: {name} must hold real numbers, got dtype {value.dtype}")
    value = value.detach().cpu().double()
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"linear_cka: {name} contains NaN or Inf values")
    return value


def _centred(x: Tensor, name: str) -> Tensor:
    """``x`` scaled to a largest magnitude of 1, then its columns centred: CKA does not change under an
    isotropic scaling, and sums and squares of values near 1e200 would overflow float64 (near 1e-200,
    underflow)."""
    top = x.abs().amax()
    x = x / top if float(top) > 0 else x
    x = x - x.mean(0, keepdim=True)
    if float(x.abs().amax()) == 0.0:
        raise ValueError(f"linear_cka: the representation {name} is constant over the examples")
    return x


def layer_similarity(model: nn.Module, data: Data, layers: Sequence[str], *, batch_size: int = 64) -> Tensor:
    """Linear CKA ``[L,L]`` between the pooled features of ``layers`` over ``data``."""
    layers = _check_layers(as_classifier(model), layers)
    feats, _ = pooled_features(model, data, layers, batch_size=batch_size)
    out = torch.ones(len(layers), len(layers), dtype=torch.float64)
    for a in range(len(layers)):
        for b in range(a + 1, len(layers)):
            out[a, b] = out[b, a] = linear_cka(feats[layers[a]], feats[layers[b]])
    return out
