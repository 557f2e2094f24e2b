"""Sanity check (Adebayo et al. 2018, cascading model randomisation).

Re-initialise the model's layers from the logits downwards, one more at each depth, and compare the
explanation of the randomised model with the original one (Spearman rank correlation and SSIM). A method
that depends on what the model learned drifts far from 1; one that only sees the image (an edge
detector) stays near 1. A constant (dead) map has no ranking and shows nothing, so an image whose map is
constant on either side is excluded (NaN) and counted, not scored as a pass. The caller's model is never
touched: the randomisation happens on a copy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..explain.base import check_images, check_targets
from ..hooks import frozen, named_layer
from ..models import as_classifier
from ._checks import check_maps, check_seed

__all__ = ["cascade_layers", "constant_maps", "randomization_sanity", "spearman", "ssim"]


def average_ranks(x: Tensor) -> Tensor:
    """Ranks along dim 1 (0-based), tied values sharing their mean rank: ``[B,N]`` float."""
    b, n = x.shape
    values, order = torch.sort(x, dim=1, stable=True)
    new_group = torch.ones_like(values, dtype=torch.long)
    new_group[:, 1:] = (values[:, 1:] != values[:, :-1]).long()
    group = new_group.cumsum(1) - 1 + torch.arange(b, device=x.device)[:, None] * n  # ids unique across rows
    position = torch.arange(n, device=x.device, dtype=torch.float32).expand(b, n).reshape(-1)
    mean_rank = torch.zeros(b * n, device=x.device).scatter_reduce(
        0, group.reshape(-1), position, reduce="mean", include_self=False
    )
    ranks = torch.empty(b, n, device=x.device)
    ranks.scatter_(1, order, mean_rank[group.reshape(-1)].view(b, n))
    return ranks


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation per image of maps ``[B,H,W]`` (ties averaged); 0 when a map is constant."""
    ra, rb = average_ranks(a.flatten(1).float()), average_ranks(b.flatten(1).float())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    denom = ra.norm(dim=1) * rb.norm(dim=1)
    return torch.where(denom > 0, (ra * rb).sum(1) / denom.clamp_min(1e-30), torch.zeros_like(denom)).clamp(-1, 1)


def _check_ssim_size(shape: Sequence[int], window: int, what: str = "maps") -> None:
    if min(shape[-2:]) <= window // 2:  # reflect padding needs more pixels than the half window
        raise ValueError(
            f"ssim (window {window}): {what} must be larger than {window // 2} pixels per side, got {list(shape)}"
        )


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean structural similarity (Wang et al. 2004, Gaussian window) per image of [0,1] maps ``[B,H,W]``."""
    _check_ssim_size(a.shape, window)
    coords = torch.arange(window, dtype=torch.float32, device=a.device) - window // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum())[:, None] * (g / g.sum())[None, :]
    kernel = g[None, None]
    x, y = a[:, None].float(), b[:, None].float()

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(F.pad(t, [window // 2] * 4, mode="reflect"), kernel)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def cascade_layers(model: nn.Module) -> list[str]:
    """The backbone's top-level parameterised children, from the logits down (registration order reversed)."""
    backbone = as_classifier(model).backbone
    names = [name for name, child in backbone.named_children() if any(True for _ in child.parameters())]
    if not names:
        raise ValueError(f"{type(backbone).__name__} has no parameterised layers to randomise")
    return names[::-1]


def _reinitialise(module: nn.Module) -> None:
    for sub in module.modules():
        if hasattr(sub, "reset_parameters") and callable(sub.reset_parameters):
            sub.reset_parameters()


def constant_maps(maps: Tensor) -> Tensor:
    """Whether each map ``[B,H,W]`` is constant (all its pixels equal): ``[B]`` bool."""
    flat = maps.flatten(1)
    return flat.amax(1) == flat.amin(1)


def randomization_sanity(
    explainer_factory: Callable[[nn.Module], Callable[..., Tensor]],
    model: nn.Module,
    images: Tensor,
    targets=None,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    per_image: bool = False,
) -> dict:
    """Cascading randomisation: for depth k = 1..len(layers), re-initialise ``layers[:k]`` (default:
    :func:`cascade_layers`, logits first) of a copy of ``model`` and compare ``explainer_factory(copy)``'s
    maps with the original model's. The explained class is the original model's top-1 (or ``targets``).

    An image whose original or randomised map is constant (a dead Grad-CAM, say) has no rank correlation
    and its SSIM measures only the blank: both are NaN there and the image is counted in ``"excluded"``.
    Returns ``{"layers": [...], "spearman": [per depth], "ssim": [per depth], "excluded": [per depth]}``
    (means over the images not excluded, NaN where every image is; ``excluded`` counts them); with
    ``per_image`` tensors ``[depth, B]`` (``excluded`` bool).
    """
    clf = as_classifier(model)
    images = check_images(images)
    _check_ssim_size(images.shape, 11, "images")  # before any explainer runs
    targets = check_targets(targets, images.shape[0], images.device)
    seed = check_seed(seed)
    if isinstance(layers, str):  # one layer name, not its characters
        layers = [layers]
    layers = list(layers) if layers is not None else cascade_layers(clf)
    if not layers:
        raise ValueError("layers is empty: name at least one backbone layer to randomise")
    for name in layers:
        named_layer(clf.backbone, name)
    if targets is None:
        with frozen(clf), torch.no_grad():
            targets = clf(images).argmax(1)
    shape = (images.shape[0], *images.shape[-2:])
    original = check_maps(explainer_factory(clf)(images, targets), shape)
    dead = constant_maps(original)
    randomised = copy.deepcopy(clf)
    rho, sim, excluded = [], [], []
    with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for name in layers:
            _reinitialise(named_layer(randomised.backbone, name))
            maps = check_maps(explainer_factory(randomised)(images, targets), shape)
            out = dead | constant_maps(maps)
            nan = torch.full(out.shape, float("nan"), device=out.device)
            rho.append(torch.where(out, nan, spearman(original, maps)))
            sim.append(torch.where(out, nan, ssim(original, maps)))
            excluded.append(out)
    rho_t, sim_t, out_t = torch.stack(rho), torch.stack(sim), torch.stack(excluded)
    if per_image:
        return {"layers": layers, "spearman": rho_t.cpu(), "ssim": sim_t.cpu(), "excluded": out_t.cpu()}
    means = {"spearman": rho_t.nanmean(1).tolist(), "ssim": sim_t.nanmean(1).tolist()}  # NaN where all excluded
    return {"layers": layers, **means, "excluded": out_t.sum(1).tolist()}
