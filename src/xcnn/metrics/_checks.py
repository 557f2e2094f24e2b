"""Input checks shared by the metrics (the same standards as the explainers' boundary)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validate import check_positive, check_seed
from ..explain.base import check_images, check_targets
from ..models import Classifier, as_classifier

__all__ = ["check_maps", "check_masks", "check_positive", "check_seed", "prepare", "resolve", "target_probs"]


def check_maps(maps: object, shape: tuple[int, ...] | None = None, unit: bool = False) -> Tensor:
    """Maps ``[B,H,W]``, finite, float; ``shape`` = the expected ``(B,H,W)``; ``unit``: values must lie in
    [0,1] (where a metric multiplies the image by the map)."""
    if not isinstance(maps, Tensor):
        raise TypeError(f"maps must be a torch.Tensor [B,H,W], got {type(maps).__name__}")
    if maps.dim() != 3:
        raise ValueError(f"maps must have shape [B,H,W], got {list(maps.shape)}")
    if shape is not None and tuple(maps.shape) != tuple(shape):
        raise ValueError(
            f"maps have shape {list(maps.shape)} but the images need {list(shape)} (one [H,W] map per image)"
        )
    if maps.shape[0] == 0:
        raise ValueError("maps is an empty batch")
    if not maps.is_floating_point():
        maps = maps.float()
    if not bool(torch.isfinite(maps).all()):
        raise ValueError("maps contain NaN or Inf")
    if unit:
        low, high = torch.aminmax(maps.detach())
        if low.item() < 0 or high.item() > 1:
            raise ValueError(
                f"maps must be in [0,1] here (the image is multiplied by them), got values in "
                f"[{low.item():.3g}, {high.item():.3g}]"
            )
    return maps.detach().float()


def check_masks(masks: object, shape: tuple[int, ...], name: str = "masks") -> Tensor:
    """Ground-truth masks ``[B,H,W]`` of the maps' shape, as bool: boolean masks as they are, integer masks
    non-zero = object (a uint8 0/255 mask as ``read_image`` gives a PNG, as xcnn's own loader reads mask
    files), floating masks exactly 0/1 (0.5 is no answer to "is this pixel the object?")."""
    if not isinstance(masks, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B,H,W] of bool, got {type(masks).__name__}")
    if tuple(masks.shape) != tuple(shape):
        raise ValueError(f"{name} have shape {list(masks.shape)} but the maps have {list(shape)}")
    if masks.is_complex():
        raise TypeError(f"{name} must be boolean, integer (non-zero = object) or 0/1 floats, got {masks.dtype}")
    if masks.is_floating_point() and not bool(((masks == 0) | (masks == 1)).all()):
        raise ValueError(f"{name} of floats must be 0/1, got values outside {{0, 1}} (or pass bool masks)")
    return masks if masks.dtype == torch.bool else masks != 0


def prepare(
    model: nn.Module, images: Tensor, maps: Tensor, targets, unit: bool = False
) -> tuple[Classifier, Tensor, Tensor, Tensor | None]:
    """Validated ``(classifier, images, maps, targets)``; targets stay None for "top-1" (see ``resolve``);
    ``unit``: the maps must be in [0,1]."""
    clf = as_classifier(model)
    images = check_images(images)
    maps = check_maps(maps, (images.shape[0], *images.shape[-2:]), unit).to(images.device)
    return clf, images, maps, check_targets(targets, images.shape[0], images.device)


def target_probs(clf: Classifier, inputs: Tensor, targets: Tensor, batch_size: int) -> Tensor:
    """``p(target | input)`` for each row, in forward passes of ``batch_size`` (call under no_grad/frozen)."""
    return torch.cat(
        [
            clf(x).float().softmax(1).gather(1, t[:, None])[:, 0]
            for x, t in zip(inputs.split(batch_size), targets.split(batch_size), strict=True)
        ]
    )


def resolve(clf: Classifier, images: Tensor, targets: Tensor | None, batch_size: int) -> tuple[Tensor, Tensor]:
    """``(targets, p(target | image))`` on the clean images; top-1 where ``targets`` is None."""
    probs = torch.cat([clf(x).float().softmax(1) for x in images.split(batch_size)])
    if targets is None:
        targets = probs.argmax(1)
    elif bool((targets >= probs.shape[1]).any()):
        raise ValueError(f"target class index out of range: model has {probs.shape[1]} classes, got {targets.tolist()}")
    return targets, probs.gather(1, targets[:, None])[:, 0]
