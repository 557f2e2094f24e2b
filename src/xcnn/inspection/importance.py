"""Which filters of a layer carry the decision: first-order (Taylor) importance for every filter from one
forward and backward pass per batch, and the reference it estimates, the real drop when a channel is
zeroed (ablation), both averaged over a data set.

For image ``i`` with target logit ``y_i`` and the layer's output ``A`` (``[B,C,h,w]``), zeroing channel
``k`` changes ``y_i`` by ``-Σ_{h,w} A_k ∂y_i/∂A_k`` to first order (Molchanov et al. 2017). Taylor
importance = mean over images of ``|Σ_{h,w} A_k ∂y_i/∂A_k|``; ablation importance = mean over images of
``y_i - y_i(A_k = 0)``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .._validate import check_positive
from ..data import batches
from ..explain.base import check_images
from ..hooks import Tap, frozen, named_layer, scale_channels
from ..models import Classifier, as_classifier

__all__ = ["IMPORTANCE_METHODS", "ablation_effect", "filter_importance"]

IMPORTANCE_METHODS = ("taylor", "ablation")
Data = Dataset | Mapping[str, Tensor]


class _CheckedData(Dataset):
    """A dataset whose every batch a first pass has checked: :func:`_batches` does not check it again."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> object:
        return self.data[index]


class _CheckedTensors(dict):
    """Stacked tensors (a dict) whose every batch a first pass has checked."""


def _checked(data: Data) -> Data:
    """``data`` marked as checked batch by batch already: :func:`inspect_model`'s passes after its first read
    the same (deterministic) images, which that pass checked."""
    return _CheckedTensors(data) if isinstance(data, Mapping) else _CheckedData(data)


def _batches(data: Data, batch_size: int) -> Iterable[tuple[Tensor, Tensor | None]]:
    """``(images, labels or None)`` batches of a dataset (dict, tuple or bare-image samples) or a dict of
    stacked tensors, in order (the harness's batching). Each batch is checked as it comes (the data are
    streamed): images finite float ``[B,3,H,W]`` in [0,1], labels integer class indices >= 0 (unless a
    first pass checked them: :func:`_checked`)."""
    check_positive("batch_size", batch_size)
    if isinstance(data, Mapping):
        if not isinstance(data.get("image"), Tensor):
            raise ValueError(f"data given as a dict needs an 'image' tensor [N,3,H,W]; it has the keys {sorted(data)}")
    elif isinstance(data, (str, bytes, Tensor)) or not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        hint = " (wrap images in a dict {'image': ..., 'label': ...})" if isinstance(data, Tensor) else ""
        raise TypeError(f"data must be a dataset or a dict of stacked tensors, got {type(data).__name__}{hint}")
    start = 0
    check = not isinstance(data, (_CheckedData, _CheckedTensors))
    for batch in batches(data, batch_size):
        if isinstance(batch, Mapping):
            images, labels = batch["image"], batch.get("label")
        elif isinstance(batch, (tuple, list)):
            images, labels = batch[0], batch[1] if len(batch) > 1 else None
        else:
            images, labels = batch, None
        if check:
            _check_batch(images, labels, start)
        yield images, labels
        start += len(images)


def _check_batch(images: object, labels: object, start: int) -> None:
    """A clear error naming the samples of a bad batch (NaN or out-of-range pixels, labels that are no class
    indices) before any of it is used."""
    where = f"data (samples {start} onwards)"
    try:
        check_images(images)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: {err}") from None
    if labels is None:
        return
    if (
        not isinstance(labels, Tensor)
        or labels.dtype == torch.bool
        or labels.is_floating_point()
        or labels.is_complex()
    ):
        got = f"{labels.dtype} tensor" if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"{where}: labels must be integer class indices, got {got}")
    if labels.shape != (len(images),):
        raise ValueError(f"{where}: {len(images)} images but labels of shape {list(labels.shape)}")
    if bool((labels < 0).any()):
        raise ValueError(f"{where}: labels must be class indices >= 0, got {int(labels.min())}")


def _channel_list(channels: object, what: str = "channels") -> list[int]:
    """``channels`` (a sequence or 1-D integer tensor of channel indices, at least one) as a list of ints."""
    if isinstance(channels, Tensor):
        if channels.dim() != 1 or channels.dtype == torch.bool or channels.is_floating_point() or channels.is_complex():
            raise TypeError(
                f"{what} must be channel indices (a list or a 1-D integer tensor), got a {channels.dtype} tensor "
                f"of shape {list(channels.shape)}"
            )
        channels = channels.tolist()
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
        raise TypeError(f"{what} must be a list of channel indices, got {type(channels).__name__} {channels!r}")
    bad = [k for k in channels if isinstance(k, bool) or not isinstance(k, numbers.Integral)]
    if bad:
        raise TypeError(f"{what} must be integer channel indices, got {bad!r}")
    if not channels:
        raise ValueError(f"{what} is empty: name at least one channel")
    return [int(k) for k in channels]


def _check_progress(progress: object) -> None:
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")


def progress_bar(iterable: Iterable, desc: str, progress: bool | None) -> Iterable:
    """``iterable`` under a tqdm bar (``progress`` None: only on a terminal; False: never)."""
    if progress is False:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False, disable=None if progress is None else not progress)


def _targets(kind: str, logits: Tensor, labels: Tensor | None) -> Tensor:
    if kind == "predicted":
        return logits.detach().argmax(1)
    if labels is None:
        raise ValueError("targets='label' needs labelled data (samples with a 'label'); or pass targets='predicted'")
    # the data's labels as loaded: on the CPU from a dataset (no device sync), a host sync per batch for a
    # dict of CUDA tensors
    high = int(labels.max())
    if high >= logits.shape[1]:
        raise ValueError(
            f"the data have the label {high}, but the model has {logits.shape[1]} classes; labels of another task "
            "than the model's need targets='predicted'"
        )
    return labels.to(logits.device).long()


def _check_layer(clf: Classifier, layer: object, what: str = "layer") -> str:
    """``layer`` checked to be the name of one of the model's modules."""
    if not isinstance(layer, str):
        raise TypeError(f"{what} must be a module name (str), got {type(layer).__name__} {layer!r}")
    named_layer(clf.backbone, layer)
    return layer


def _check(model: nn.Module, layer: str, targets: str) -> Classifier:
    if targets not in ("label", "predicted"):
        raise ValueError(f"targets must be 'label' or 'predicted', got {targets!r}")
    clf = as_classifier(model)
    _check_layer(clf, layer)
    return clf


def _spatial(a: Tensor, layer: str) -> Tensor:
    if a.dim() != 4:
        raise ValueError(
            f"layer {layer!r} has output shape {list(a.shape)}; filter importance needs a feature map [B,C,h,w]"
        )
    return a


def filter_importance(
    model: nn.Module,
    data: Data,
    layer: str,
    method: str = "taylor",
    *,
    targets: str = "label",
    batch_size: int = 64,
    channels: Sequence[int] | None = None,
    progress: bool | None = None,
) -> Tensor:
    """Importance of every channel of ``layer`` (``[C]``, float64 on the CPU), averaged over ``data``.

    ``method="taylor"``: mean over images of ``|Σ_{h,w} A ⊙ ∂y/∂A|`` (one forward and one backward per
    batch, no weight gradients); ``"ablation"``: mean drop of the target logit when the channel is zeroed
    (one forward per channel and image, several channels per forward pass). ``targets``: the true class
    (``"label"``, the default) or the model's top-1 (``"predicted"``). ``channels``: ablate only these
    (the others are NaN in the result; Taylor always covers every channel). The model's mode and weights
    are left as they were.
    """
    if method not in IMPORTANCE_METHODS:
        raise ValueError(f"unknown importance method {method!r}; available: {', '.join(IMPORTANCE_METHODS)}")
    check_positive("batch_size", batch_size)
    _check_progress(progress)
    clf = _check(model, layer, targets)
    if channels is not None:
        channels = _channel_list(channels)
    device = next(clf.parameters()).device
    total: Tensor | None = None
    n = 0
    with frozen(clf):
        for images, labels in progress_bar(_batches(data, batch_size), f"{method} importance", progress):
            images = images.to(device)
            if method == "taylor":
                with torch.enable_grad(), Tap(clf.backbone, [layer], differentiable=True) as tap:
                    logits = clf(images)
                    t = _targets(targets, logits, labels)
                    a = _spatial(tap.get(layer), layer)
                    (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), a)
                part = (a.detach() * g).flatten(2).sum(2).abs().double().sum(0)
            else:
                part = _ablation_sums(clf, images, labels, layer, targets, batch_size, channels)
            total = part.cpu() if total is None else total + part.cpu()
            n += len(images)
    if total is None:
        raise ValueError("the data set is empty")
    return total / n


@torch.no_grad()
def _ablation_sums(
    clf: Classifier,
    images: Tensor,
    labels: Tensor | None,
    layer: str,
    targets: str,
    rows: int,
    subset: Sequence[int] | None = None,
) -> Tensor:
    """Per channel, the summed drop of the target logit over ``images`` when that channel alone is zeroed
    (NaN for channels outside ``subset``); ``rows`` bounds the rows of one forward pass (several
    channels' ablations share it)."""
    with Tap(clf.backbone, [layer]) as tap:
        logits = clf(images)
    channels = _spatial(tap.get(layer), layer).shape[1]
    todo = list(range(channels)) if subset is None else [int(k) for k in subset]
    bad = [k for k in todo if not 0 <= k < channels]
    if bad:
        raise ValueError(f"channels {bad} are out of range for layer {layer!r} with {channels} channels")
    t = _targets(targets, logits, labels)
    clean = logits.gather(1, t[:, None])[:, 0].double()
    b = len(images)
    per_forward = max(1, rows // b)
    sums = torch.full((channels,), float("nan"), dtype=torch.float64, device=images.device)
    for start in range(0, len(todo), per_forward):
        chunk = todo[start : start + per_forward]
        factors = torch.ones(len(chunk) * b, channels, device=images.device)
        for j, k in enumerate(chunk):
            factors[j * b : (j + 1) * b, k] = 0
        with scale_channels(clf.backbone, layer, factors):
            out = clf(images.repeat(len(chunk), 1, 1, 1))
        ablated = out.gather(1, t.repeat(len(chunk))[:, None])[:, 0].double().view(len(chunk), b)
        sums[chunk] = (clean[None] - ablated).sum(1)
    return sums


@torch.no_grad()
def ablation_effect(
    model: nn.Module,
    data: Data,
    layer: str,
    channels: Sequence[int],
    *,
    targets: str = "label",
    batch_size: int = 64,
) -> dict[str, float]:
    """Zero ``channels`` of ``layer`` together: the mean drop of the target logit, and with labelled
    ``data`` the accuracy before and after: ``{"logit_drop", "accuracy", "ablated_accuracy"}``."""
    channels = _channel_list(channels)
    check_positive("batch_size", batch_size)
    clf = _check(model, layer, targets)
    device = next(clf.parameters()).device
    drop = correct = correct_ablated = 0.0
    n = 0
    labelled = True
    with frozen(clf):
        for images, labels in _batches(data, batch_size):
            images = images.to(device)
            with Tap(clf.backbone, [layer]) as tap:
                logits = clf(images)
            c = _spatial(tap.get(layer), layer).shape[1]
            bad = [k for k in channels if not 0 <= int(k) < c]
            if bad:
                raise ValueError(f"channels {bad} are out of range for layer {layer!r} with {c} channels")
            factors = torch.ones(c, device=device)
            factors[list(channels)] = 0
            with scale_channels(clf.backbone, layer, factors):
                ablated = clf(images)
            t = _targets(targets, logits, labels)
            drop += float((logits.gather(1, t[:, None]) - ablated.gather(1, t[:, None])).double().sum())
            labelled = labelled and labels is not None
            if labels is not None:
                y = labels.to(device)
                correct += int((logits.argmax(1) == y).sum())
                correct_ablated += int((ablated.argmax(1) == y).sum())
            n += len(images)
    if n == 0:
        raise ValueError("the data set is empty")
    out = {"logit_drop": drop / n}
    if labelled:
        out |= {"accuracy": correct / n, "ablated_accuracy": correct_ablated / n}
    return out
