"""Localisation against ground truth: pointing game, energy in the object, IoU, energy on a shortcut.

Each takes maps ``[B,H,W]`` and boolean masks ``[B,H,W]`` (object pixels, or boxes turned into masks with
:func:`boxes_to_masks`) and returns the mean over images, or a tensor ``[B]`` with ``per_image=True``.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_maps, check_masks, check_positive

__all__ = ["boxes_to_masks", "energy_in_box", "iou", "pointing_game", "shortcut_energy"]


def boxes_to_masks(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Boxes ``[B,4]`` (x0, y0, x1, y1; inclusive pixel bounds) -> boolean masks ``[B,H,W]``."""
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be a tensor [B,4] (x0, y0, x1, y1), got {getattr(boxes, 'shape', type(boxes))}")
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise TypeError(f"size must be (H, W), got {size!r}")
    for name, value in zip(("size[0] (H)", "size[1] (W)"), size, strict=True):
        check_positive(name, value)
    h, w = size
    ys = torch.arange(h, device=boxes.device).view(1, h, 1)
    xs = torch.arange(w, device=boxes.device).view(1, 1, w)
    x0, y0, x1, y1 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    return (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)


def _reduce(values: Tensor, per_image: bool) -> Tensor | float:
    return values.cpu() if per_image else float(values.float().mean())


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 0, per_image: bool = False) -> Tensor | float:
    """Share of images whose map maximum lies in the object (within ``tolerance`` pixels of it).

    The maximum is the first maximal pixel in raster order. Images with an empty mask count as misses,
    and a warning says how many there were.
    """
    maps = check_maps(maps)
    masks = check_masks(masks, maps.shape).to(maps.device)
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"tolerance must be a non-negative integer (pixels), got {tolerance!r}")
    empty = ~masks.flatten(1).any(1)
    if bool(empty.any()):
        warnings.warn(
            f"pointing game: {int(empty.sum())} of {len(masks)} images have an empty mask; counted as misses",
            stacklevel=2,
        )
    # a disk wider than the image's diagonal covers it all: the same hits, without a huge kernel
    tolerance = min(tolerance, math.ceil(math.hypot(*maps.shape[-2:])))
    if tolerance > 0:  # grow the mask by a disk of radius `tolerance`
        r = torch.arange(-tolerance, tolerance + 1, device=maps.device, dtype=torch.float32)
        disk = ((r.view(-1, 1) ** 2 + r.view(1, -1) ** 2) <= tolerance**2).float()[None, None]
        masks = F.conv2d(masks[:, None].float(), disk, padding=tolerance)[:, 0] > 0
    peak = maps.flatten(1).argmax(1)
    hits = masks.flatten(1).gather(1, peak[:, None])[:, 0]
    return _reduce(hits.float(), per_image)


def _distribution(maps: Tensor) -> Tensor:
    """Maps normalised to sum 1 per image; an all-zero map (no preference) becomes uniform."""
    total = maps.clamp_min(0).flatten(1).sum(1).view(-1, 1, 1)
    uniform = torch.full_like(maps, 1.0 / maps[0].numel())
    return torch.where(total > 0, maps.clamp_min(0) / total.clamp_min(1e-30), uniform)


def energy_in_box(maps: Tensor, masks: Tensor, per_image: bool = False) -> Tensor | float:
    """Share of the map's energy inside the ground truth (mask or box-mask), x 100."""
    maps = check_maps(maps)
    masks = check_masks(masks, maps.shape).to(maps.device)
    return _reduce(100 * (_distribution(maps) * masks).flatten(1).sum(1), per_image)


def iou(maps: Tensor, masks: Tensor, threshold: str | float = "mean", per_image: bool = False) -> Tensor | float:
    """Intersection over union of the map binarised at ``threshold`` (``"mean"`` of each map, or a level in
    [0,1]) with the mask. Two empty sets give 1."""
    maps = check_maps(maps)
    masks = check_masks(masks, maps.shape).to(maps.device)
    if threshold == "mean":
        level = maps.flatten(1).mean(1).view(-1, 1, 1)
    elif isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0 <= threshold <= 1:
        level = torch.full((len(maps), 1, 1), float(threshold), device=maps.device)
    else:
        raise ValueError(f"threshold must be 'mean' or a number in [0,1], got {threshold!r}")
    found = maps > level
    inter = (found & masks).flatten(1).sum(1).float()
    union = (found | masks).flatten(1).sum(1).float()
    return _reduce(torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)), per_image)


def shortcut_energy(maps: Tensor, shortcut_masks: Tensor, per_image: bool = False) -> Tensor | float:
    """Share of the map's energy on the planted shortcut patch, x 100, over the images that have one
    (per image: NaN for images without a patch)."""
    maps = check_maps(maps)
    masks = check_masks(shortcut_masks, maps.shape, "shortcut_masks").to(maps.device)
    has_patch = masks.flatten(1).any(1)
    if not bool(has_patch.any()):
        raise ValueError("no image has a shortcut patch (all shortcut masks are empty)")
    energy = 100 * (_distribution(maps) * masks).flatten(1).sum(1)
    if per_image:
        return torch.where(has_patch, energy, torch.full_like(energy, float("nan"))).cpu()
    return float(energy[has_patch].mean())
