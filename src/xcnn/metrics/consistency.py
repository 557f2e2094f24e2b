"""Consistency (CGC's property): does the explanation move with the image?

For random transforms T (resized crop + horizontal flip, parameters recorded so T applies to maps too),
compare E(T(x)) with T(E(x)) by cosine similarity and Pearson correlation. Higher is better.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms.functional import hflip, resized_crop

from ..explain.base import check_images, check_targets
from ._checks import check_seed

__all__ = ["CropFlip", "apply_each", "consistency", "random_crop_flips"]


@dataclass(frozen=True)
class CropFlip:
    """A resized crop (top, left, height, width, back to the full size) followed by an optional flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool

    def __call__(self, x: Tensor) -> Tensor:
        """Apply to ``[...,H,W]`` (images ``[B,3,H,W]`` or maps ``[B,H,W]``), bilinear, same size out."""
        size = list(x.shape[-2:])
        squeeze = x.dim() == 3
        out = resized_crop(
            x[:, None] if squeeze else x, self.top, self.left, self.height, self.width, size, antialias=True
        )
        out = hflip(out) if self.flip else out
        return out[:, 0] if squeeze else out


def apply_each(transforms: Sequence[CropFlip], x: Tensor) -> Tensor:
    """Transform ``i`` applied to item ``i`` of ``x`` (images ``[B,3,H,W]`` or maps ``[B,H,W]``): one
    sampled transform per image, the same code for an image and its map (differentiable)."""
    if len(transforms) != x.shape[0]:
        raise ValueError(f"apply_each: {len(transforms)} transforms for a batch of {x.shape[0]}")
    return torch.cat([t(x[i : i + 1]) for i, t in enumerate(transforms)])


def random_crop_flips(
    n: int, size: tuple[int, int], generator: torch.Generator, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)
) -> list[CropFlip]:
    """``n`` random CropFlips: area fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio``,
    flip with probability 1/2. The consistency metric uses ``scale=(0.5, 1)``; CGC training uses
    ``(0.08, 1)`` (the random resized crop of ImageNet training)."""
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    h, w = size
    out = []
    for _ in range(n):
        area = h * w * float(torch.empty(1).uniform_(*scale, generator=generator))
        aspect = math.exp(float(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)))
        ch = min(h, max(1, round(math.sqrt(area / aspect))))
        cw = min(w, max(1, round(math.sqrt(area * aspect))))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
        out.append(CropFlip(top, left, ch, cw, bool(torch.rand(1, generator=generator) < 0.5)))
    return out


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.flatten(1), b.flatten(1)
    denom = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(denom > 0, (a * b).sum(1) / denom.clamp_min(1e-30), torch.zeros_like(denom))


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.flatten(1), b.flatten(1)
    return _cosine(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True))


def consistency(
    explainer: Callable[..., Tensor],
    images: Tensor,
    n_transforms: int = 4,
    seed: int = 0,
    targets=None,
    per_image: bool = False,
) -> dict:
    """Mean cosine and Pearson between ``E(T(x))`` and ``T(E(x))`` over images and ``n_transforms``
    random resized-crop + flip transforms (deterministic for ``seed``). The explained class is the same on
    the original and the transformed image: ``targets``, or the model's top-1 on the original.
    Returns ``{"cosine", "pearson"}`` (tensors ``[B]``, averaged over transforms, with ``per_image``).
    """
    if isinstance(n_transforms, bool) or not isinstance(n_transforms, int) or n_transforms < 1:
        raise ValueError(f"n_transforms must be a positive integer, got {n_transforms!r}")
    seed = check_seed(seed)
    images = check_images(images)
    targets = check_targets(targets, images.shape[0], images.device)
    if targets is None:
        model = getattr(explainer, "model", None)
        if model is None:
            raise ValueError("pass targets= (the explainer has no .model to take the top-1 class from)")
        with torch.no_grad():
            targets = model(images).argmax(1)
    original = explainer(images, targets)
    gen = torch.Generator().manual_seed(seed)
    cos, pear = [], []
    for transform in random_crop_flips(n_transforms, tuple(images.shape[-2:]), gen):
        moved = explainer(transform(images).clamp(0, 1), targets)
        expected = transform(original)
        cos.append(_cosine(moved, expected))
        pear.append(_pearson(moved, expected))
    cosine, pearson = torch.stack(cos).mean(0), torch.stack(pear).mean(0)
    if per_image:
        return {"cosine": cosine.cpu(), "pearson": pearson.cpu()}
    return {"cosine": float(cosine.mean()), "pearson": float(pearson.mean())}
