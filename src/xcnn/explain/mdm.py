"""MDM, Multiple Dynamic Masks (Peng et al. 2022, docs/methods.md#mdm): learned per-image masks at several
scales, stacked into one map. It needs only the model's output, so CNNs and token models work alike.

Per batch of images (the model frozen, in eval mode), for each scale ``s`` (coarse to fine):

* mask logits ``m_s`` ``[B,1,s,s]``; ``M_s = sigmoid(m_s)``, upsampled bilinearly to the image;
* preserved ``x_p = x*M + b*(1-M)`` and deleted ``x_d = x*(1-M) + b*M`` with baseline ``b`` = a Gaussian
  blur of ``x`` (``baseline="blur"``) or black (``"zero"``); both go through the model in one pass;
* loss per image (summed over the batch, so every image's mask follows only its own gradient):
  ``-log p(c|x_p) - log(1 - p(c|x_d))`` + ``area_weight * mean(M_s)`` + ``binary_weight * mean(M_s (1-M_s))``
  + ``tv_weight * TV(M_s)`` [+ ``consistency_weight * |phi(x_p) - phi(x)|^2 / |phi(x)|^2``, ``phi`` = the
  spatially pooled output of ``consistency_layer``, the paper's activation consistency, normalised so that
  the weight does not depend on the layer's scale];
* ``steps`` Adam iterations at ``lr``; with ``coarse_to_fine`` each finer mask starts from the coarser
  mask's logits, upsampled (the HDM refinement); otherwise every scale starts at 0.5.

The map is the weighted sum of the upsampled ``M_s`` (equal weights by default), min-max normalised.
Cost: ``len(scales) * steps`` forward+backward passes of ``2 x images`` rows, plus a forward on the clean
images for the top-1 class when no targets are given, and one more with ``consistency_layer``.

Design choices where the paper is silent (ours, all options):

* The deletion term is ``-log(1 - p(c|x_d))`` rather than ``+log p(c|x_d)``: both push the
  deleted image's probability down, but ``log p`` keeps rewarding a class that is already gone (its
  gradient with respect to the logit never vanishes), which makes the mask grow against the area term
  forever; the binary cross-entropy form stops pushing once the decision is lost. It is computed as
  ``logsumexp(other logits) - logsumexp(all logits)``, exact for any logit margin (a clamped probability
  would give no gradient for a confident model).
* Regularisers are computed on ``M_s`` at its own resolution (``s x s``): the same area and binariness as
  the upsampled mask, at a fraction of the cost; TV is the mean squared difference of neighbouring cells.
* No randomness: the same images give the same map (there is no seed to set). Images that equal their
  baseline (an all-constant image under the blur baseline, a black image under zero) cannot be perturbed,
  so their map is all zeros ("nothing found") rather than noise.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hooks import Tap, named_layer
from .base import Explainer, check_positive, register

__all__ = ["DEFAULT_SCALES", "MDM", "gaussian_blur"]

#: the default mask sides (7x7 to 56x56 cells)
DEFAULT_SCALES = (7, 14, 28, 56)

#: an image whose largest difference from its baseline is at most this (far below one 8-bit grey level)
#: cannot be perturbed: its map is all zeros
INERT = 1e-6


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``[B,C,H,W]`` with standard deviation ``sigma`` pixels (kernel radius
    ``ceil(3 sigma)``); borders are extended by replication, so any sigma works on any image size."""
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def total_variation(masks: Tensor) -> Tensor:
    """Mean squared difference of vertically and horizontally neighbouring cells, per mask ``[B,1,h,w]`` -> ``[B]``."""
    terms = []
    if masks.shape[-2] > 1:
        terms.append((masks[..., 1:, :] - masks[..., :-1, :]).pow(2).flatten(1).mean(1))
    if masks.shape[-1] > 1:
        terms.append((masks[..., 1:] - masks[..., :-1]).pow(2).flatten(1).mean(1))
    return sum(terms) if terms else masks.new_zeros(masks.shape[0])


def pooled(features: Tensor) -> Tensor:
    """A layer's output as one vector per image: spatial mean of ``[B,C,h,w]``, token mean of ``[B,N,D]``."""
    if features.dim() == 4:
        return features.float().mean(dim=(2, 3))
    if features.dim() == 3:
        return features.float().mean(dim=1)
    return features.float().flatten(1)


class MaskSearch(Explainer):
    """Shared by the mask-optimising explainers: image chunks sized to ``batch_size`` rows per pass, the
    perturbation baseline, a progress bar, and zero maps for images that equal their baseline."""

    #: forward rows per image and optimisation step (MDM: preserved + deleted copy)
    rows_per_image = 1

    def __init__(self, model: nn.Module, *, batch_size: int | None, progress: bool | None, amp: bool) -> None:
        super().__init__(model)
        self._set_batch_size(batch_size)
        self.progress, self.amp = progress, amp

    def _explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        self._check_size(images.shape[-2], images.shape[-1])
        targets = self._targets(images, targets)
        per_chunk = max(1, self._rows(images) // self.rows_per_image)
        chunks = list(torch.arange(images.shape[0], device=images.device).split(per_chunk))
        with self._bar(len(chunks) * self._steps_per_chunk(images.shape[-2], images.shape[-1])) as bar:
            maps = [self._search(images[idx], targets[idx], bar) for idx in chunks]
        return torch.cat(maps)

    def _bar(self, total: int) -> contextlib.AbstractContextManager:
        if self.progress is False:
            return contextlib.nullcontext(None)
        from tqdm import tqdm

        # progress=None: shown on a terminal only (tqdm's disable=None)
        return tqdm(
            total=total, desc=self.name, leave=False, disable=None if self.progress is None else not self.progress
        )

    def _check_size(self, h: int, w: int) -> None:
        """Raise a clear error when the settings do not fit an ``h x w`` image."""

    def _steps_per_chunk(self, h: int, w: int) -> int:
        raise NotImplementedError

    def _search(self, images: Tensor, targets: Tensor, bar) -> Tensor:
        raise NotImplementedError


@register("mdm")
class MDM(MaskSearch):
    """Multiple Dynamic Masks. Options and defaults (see the module docstring for the loss):

    ``scales`` increasing mask sides, each at most the image side (default ``(7, 14, 28, 56)``, less those
    larger than the image); ``steps=100`` Adam iterations per scale at ``lr=0.1``; ``baseline="blur"``
    (Gaussian, ``blur_sigma`` pixels, default 1/20 of the shorter image side, 11 px at 224) or ``"zero"``;
    ``area_weight=1.0``, ``binary_weight=0.5``, ``tv_weight=0.25`` the regulariser weights (chosen on the
    benchmark's validation images, docs/results.md; ``binary_weight`` must stay below ``area_weight``, or a
    saturated cell that the decision does not need is held at 1: the two gradients cancel there); ``consistency_weight=1.0``
    applies only with ``consistency_layer`` (a backbone layer name); ``scale_weights`` (default equal) for
    the stacked map; ``coarse_to_fine=True``; ``batch_size`` forward rows per pass (at least 2: each image
    uses 2); ``progress`` a tqdm bar (None: on a terminal only); ``amp`` bf16 autocast on CUDA.
    """

    rows_per_image = 2

    def __init__(
        self,
        model: nn.Module,
        *,
        scales: Sequence[int] | None = None,
        steps: int = 100,
        lr: float = 0.1,
        baseline: Literal["blur", "zero"] = "blur",
        blur_sigma: float | None = None,
        area_weight: float = 1.0,
        binary_weight: float = 0.5,
        tv_weight: float = 0.25,
        consistency_weight: float = 1.0,
        consistency_layer: str | None = None,
        scale_weights: Sequence[float] | None = None,
        coarse_to_fine: bool = True,
        batch_size: int | None = None,
        progress: bool | None = None,
        amp: bool = False,
    ) -> None:
        super().__init__(model, batch_size=batch_size, progress=progress, amp=amp)
        self.fit_scales = scales is None  # the defaults adapt to small images; scales that were asked for do not
        scales = DEFAULT_SCALES if scales is None else scales
        if isinstance(scales, (int, str)) or not isinstance(scales, Sequence) or len(scales) == 0:
            raise ValueError(f"scales must be a non-empty sequence of mask sides, e.g. (7, 14), got {scales!r}")
        for s in scales:
            check_positive("each scale", s)
        if any(b <= a for a, b in itertools.pairwise(scales)):
            raise ValueError(f"scales must increase (coarse to fine), got {tuple(scales)}")
        check_positive("steps", steps)
        check_positive("lr", lr, integer=False)
        if baseline not in ("blur", "zero"):
            raise ValueError(f"baseline must be 'blur' or 'zero', got {baseline!r}")
        if blur_sigma is not None:
            check_positive("blur_sigma", blur_sigma, integer=False)
        coefficients = {
            "area_weight": area_weight,
            "binary_weight": binary_weight,
            "tv_weight": tv_weight,
            "consistency_weight": consistency_weight,
        }
        for name, value in coefficients.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if consistency_layer is not None:
            named_layer(self.model.backbone, consistency_layer)
        if scale_weights is None:
            weights = [1.0] * len(scales)
        else:
            ok = (
                isinstance(scale_weights, Sequence)
                and not isinstance(scale_weights, str)
                and len(scale_weights) == len(scales)
            )
            ok = ok and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf for v in scale_weights
            )
            if not ok or sum(scale_weights) <= 0:
                raise ValueError(
                    f"scale_weights must be {len(scales)} numbers >= 0 with a positive sum, one per scale, got {scale_weights!r}"
                )
            weights = [float(v) for v in scale_weights]
        if batch_size is not None and batch_size < 2:
            raise ValueError(f"MDM puts 2 rows per image in each pass: batch_size must be at least 2, got {batch_size}")
        self.scales, self.steps, self.lr = [int(s) for s in scales], int(steps), float(lr)
        self.baseline, self.blur_sigma = baseline, blur_sigma
        self.area_weight, self.binary_weight, self.tv_weight = (
            float(area_weight),
            float(binary_weight),
            float(tv_weight),
        )
        self.consistency_weight, self.consistency_layer = float(consistency_weight), consistency_layer
        self.scale_weights, self.coarse_to_fine = weights, bool(coarse_to_fine)

    def active_scales(self, h: int, w: int) -> list[tuple[int, float]]:
        """``(scale, weight)`` pairs used on an ``h x w`` image."""
        pairs = list(zip(self.scales, self.scale_weights, strict=True))
        if self.fit_scales:
            pairs = [(s, wt) for s, wt in pairs if s <= min(h, w)] or [(min(h, w), 1.0)]
        return pairs

    def _check_size(self, h: int, w: int) -> None:
        too_big = [s for s, _ in self.active_scales(h, w) if s > min(h, w)]
        if too_big:
            raise ValueError(
                f"MDM scales {too_big} are finer than the {h}x{w} image; use scales of at most {min(h, w)}"
            )

    def _steps_per_chunk(self, h: int, w: int) -> int:
        return len(self.active_scales(h, w)) * self.steps

    def baseline_images(self, images: Tensor) -> Tensor:
        if self.baseline == "zero":
            return torch.zeros_like(images)
        sigma = self.blur_sigma if self.blur_sigma is not None else min(images.shape[-2:]) / 20
        return gaussian_blur(images, sigma)

    def _search(self, images: Tensor, targets: Tensor, bar) -> Tensor:
        b, _, h, w = images.shape
        base = self.baseline_images(images)
        layer = self.consistency_layer if self.consistency_weight > 0 else None
        clean_features = None
        if layer is not None:
            with torch.no_grad(), Tap(self.model.backbone, [layer]) as tap, self._autocast(images):
                self.model(images)
                clean_features = pooled(tap.get(layer))
        total = torch.zeros(b, h, w, device=images.device)
        logits = None
        for scale, weight in self.active_scales(h, w):
            if logits is None or not self.coarse_to_fine:
                logits = torch.zeros(b, 1, scale, scale, device=images.device)
            else:
                logits = F.interpolate(logits, size=(scale, scale), mode="bilinear", align_corners=False)
            logits = self._optimise(logits, images, base, targets, clean_features, bar)
            total += weight * F.interpolate(logits.sigmoid(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        inert = (images - base).abs().amax(dim=(1, 2, 3)) <= INERT  # equal up to rounding in the blur
        return torch.where(inert[:, None, None], torch.zeros_like(total), total)

    def _optimise(
        self, logits: Tensor, images: Tensor, base: Tensor, targets: Tensor, clean_features: Tensor | None, bar
    ) -> Tensor:
        """``steps`` Adam iterations on the mask logits of one scale; returns them detached."""
        b, _, h, w = images.shape
        logits = logits.detach().clone().requires_grad_(True)
        optimiser = torch.optim.Adam([logits], lr=self.lr)
        layer = self.consistency_layer if clean_features is not None else None
        for _ in range(self.steps):
            with torch.enable_grad():
                masks = logits.sigmoid()
                up = F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)
                inputs = torch.cat([images * up + base * (1 - up), images * (1 - up) + base * up])
                with (
                    Tap(self.model.backbone, [layer], differentiable=True) if layer else contextlib.nullcontext() as tap
                ):
                    with self._autocast(images):
                        out = self.model(inputs)
                out = out.float()
                if out.shape[1] < 2:
                    raise ValueError(
                        f"MDM needs a classifier with at least 2 classes (softmax over {out.shape[1]} logit is always 1)"
                    )
                t2 = targets.repeat(2)[:, None]
                total_lse = out.logsumexp(1)
                keep = out[:b].gather(1, t2[:b])[:, 0] - total_lse[:b]  # log p(c | preserved)
                # log(1 - p(c | deleted)) = logsumexp of the other logits - logsumexp of all: exact for any margin
                gone = out[b:].scatter(1, t2[b:], float("-inf")).logsumexp(1) - total_lse[b:]
                loss = -keep - gone
                loss = (
                    loss
                    + self.area_weight * masks.flatten(1).mean(1)
                    + self.binary_weight * (masks * (1 - masks)).flatten(1).mean(1)
                )
                loss = loss + self.tv_weight * total_variation(masks)
                if layer:
                    kept = pooled(tap.get(layer)[:b])
                    loss = loss + self.consistency_weight * (kept - clean_features).pow(2).sum(1) / clean_features.pow(
                        2
                    ).sum(1).clamp_min(1e-12)
                (grad,) = torch.autograd.grad(loss.sum(), logits)
            logits.grad = grad
            optimiser.step()
            if bar is not None:
                bar.update(1)
        return logits.detach()
