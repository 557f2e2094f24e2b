"""Faithfulness: does removing (or keeping) what the map calls important change the model's belief?

* :func:`average_drop_increase` — AD / IC at keep fractions 100/50/15 % (Grad-CAM++ protocol, as TAME
  and L-CAM report them), in percent.
* :func:`insertion_deletion` — RISE's insertion and deletion AUCs with their curves.

All perturbations happen in pixel space ("removed" = 0) and go through the model in batches of
``batch_size``; the model is in eval mode during the call and restored afterwards.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.transforms.functional import gaussian_blur

from ..hooks import frozen
from ._checks import check_positive, prepare, resolve, target_probs

__all__ = ["average_drop_increase", "insertion_deletion", "pixel_ranks"]


def pixel_ranks(maps: Tensor) -> Tensor:
    """Rank of every pixel in its map, 0 = most important; ties keep raster order. ``[B,H,W]`` long."""
    flat = maps.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=maps.device).expand_as(order))
    return ranks.view_as(maps)


def average_drop_increase(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets=None,
    keep: Sequence[float] = (1.0, 0.5, 0.15),
    batch_size: int = 64,
    per_image: bool = False,
) -> dict:
    """Average Drop (lower is better) and Increase in Confidence (higher is better), in percent.

    For each keep fraction q the image is multiplied by the map with only its top q of pixels kept (soft
    values; the rest 0): ``O = p(c | x * E_q)``, ``Y = p(c | x)``. ``AD = 100 * mean(max(0, Y - O) / Y)``,
    ``IC = 100 * mean(O > Y)``. Keys ``"AD@100"``, ``"IC@100"``, ``"AD@50"``, ... With ``per_image=True``
    the values are tensors ``[B]`` (their means are the batch values). The maps must be in [0,1] (as the
    explainers return them): they scale the pixels.
    """
    if isinstance(keep, (str, bytes)) or not isinstance(keep, Sequence):
        raise TypeError(f"keep must be a sequence of fractions in (0, 1], got {type(keep).__name__} {keep!r}")
    if any(isinstance(q, bool) or not isinstance(q, numbers.Real) for q in keep):
        raise TypeError(f"keep fractions must be numbers in (0, 1], got {list(keep)}")
    if not keep or any(not 0 < q <= 1 for q in keep):
        raise ValueError(f"keep fractions must be in (0, 1], got {list(keep)}")
    check_positive("batch_size", batch_size)
    clf, images, maps, targets = prepare(model, images, maps, targets, unit=True)
    n_pixels = maps[0].numel()
    ranks = pixel_ranks(maps)
    out: dict = {}
    with frozen(clf), torch.inference_mode():
        targets, clean = resolve(clf, images, targets, batch_size)
        for q in keep:
            kept = maps * (ranks < max(1, round(q * n_pixels)))
            masked = target_probs(clf, images * kept[:, None], targets, batch_size)
            drop = 100 * (clean - masked).clamp_min(0) / clean.clamp_min(1e-12)
            rise = 100 * (masked > clean).float()
            name = f"{100 * q:g}"
            out[f"AD@{name}"] = drop.cpu() if per_image else float(drop.mean())
            out[f"IC@{name}"] = rise.cpu() if per_image else float(rise.mean())
    return out


def insertion_deletion(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets=None,
    steps: int = 28,
    batch_size: int = 64,
    per_image: bool = False,
) -> dict:
    """Insertion and deletion AUC (RISE protocol) and their curves.

    Pixels are taken in the map's order: point ``k`` (of ``steps + 1``, both ends included) has the first
    ``n_k = round(k * H*W / steps)`` pixels changed (half up), so the last point is the whole image for any
    ``steps``. Deletion starts from the image and sets them to 0; insertion starts from a blurred copy
    (Gaussian, kernel 11, sigma 5) and reveals them. Each curve holds ``p(c | .)`` at those points; AUC =
    trapezoid over the fractions ``n_k / (H*W)`` actually changed. Returns ``{"insertion", "deletion",
    "curves": {"insertion": [B, steps+1], "deletion": ...}, "fractions": [steps+1]}`` (AUCs averaged over
    images, or tensors ``[B]`` with ``per_image=True``).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    check_positive("batch_size", batch_size)
    clf, images, maps, targets = prepare(model, images, maps, targets)
    b, _, h, w = images.shape
    if steps > h * w:
        raise ValueError(f"steps must be at most the number of pixels ({h}x{w} = {h * w}), got {steps}")
    # pixel counts rounded per point, not a fixed ceil(H*W/steps) per step: that reaches the whole image
    # before the last point when steps does not divide H*W, and an AUC over k/steps is then biased (deletion
    # low, insertion high); the trapezoid runs over the fractions actually changed
    counts = (2 * torch.arange(steps + 1, device=images.device) * (h * w) + steps) // (2 * steps)
    fractions = counts.double() / (h * w)
    ranks = pixel_ranks(maps)
    blurred = gaussian_blur(images, kernel_size=[11, 11], sigma=[5.0, 5.0])
    # rows ordered (image, step): row r is image r // (steps+1) after r % (steps+1) steps
    rows = torch.arange(b * (steps + 1), device=images.device)
    curves = {}
    with frozen(clf), torch.inference_mode():
        targets, _ = resolve(clf, images, targets, batch_size)
        for kind, start, finish in (("deletion", images, torch.zeros_like(images)), ("insertion", blurred, images)):
            probs = []
            for chunk in rows.split(batch_size):
                img, k = chunk // (steps + 1), chunk % (steps + 1)
                changed = (ranks[img] < counts[k][:, None, None])[:, None]  # the first n_k pixels
                probs.append(target_probs(clf, torch.where(changed, finish[img], start[img]), targets[img], batch_size))
            curves[kind] = torch.cat(probs).view(b, steps + 1)
    out: dict = {"curves": {k: v.cpu() for k, v in curves.items()}, "fractions": fractions.float().cpu()}
    for kind, curve in curves.items():
        auc = torch.trapezoid(curve.double(), fractions, dim=1).float()
        out[kind] = auc.cpu() if per_image else float(auc.mean())
    return out
