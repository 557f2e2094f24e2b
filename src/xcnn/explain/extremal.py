"""Extremal perturbation (Fong, Patrick & Vedaldi 2019), with the settings of the authors' TorchRay release.

The closest relative of MDM: one smooth mask per image, learned so that the blurred-elsewhere image keeps
(``variant="preserve"``) or the blurred-inside image loses (``"delete"``; ``"dual"``: both) the class
score, at a fixed ``area`` enforced by a rank regulariser. Parameters of the 224x224 release, scaled
with the image's shorter side ``r = min(H, W) / 224`` so that a 64x64 image is searched like a 224x224 one:

* mask parameters ``p`` in [0, 1] on a grid of cells ``step = 7 r`` pixels apart, initialised to 1 and
  clamped to [0, 1] after every step;
* the mask at pixel ``u`` is the smooth maximum (softmax pooling, coldness 20) of ``k(|u - c|) p_c`` over
  the cells ``c`` within ``1 + ceil(sigma / step)`` cells, ``k(d) = exp(-2 max(d / sigma - 1/2, 0)^2)``,
  ``sigma = 21 r``: flat out to ``sigma / 2``, then a Gaussian fall-off -- the mask is smooth by
  construction; it is computed on a canvas with a margin of ``sigma`` pixels around the image;
* the perturbation is a blur pyramid of ``levels = 8`` images from ``max_blur = 20 r`` pixels (mask 0) to
  sharp (mask 1), linearly interpolated between neighbouring levels by the mask value;
* reward: the target's logit (``reward="contrastive"``: the logit minus the largest other logit);
* area: ``area_weight * 1.0035^t * mean((sort(canvas mask) - ref)^2)`` with ``ref`` the sorted ideal
  canvas mask: zeros, then ``area * H * W`` ones, ``area_weight = 300`` (TorchRay counts ``area`` as a
  fraction of the canvas, 1.4x the image at 224 px; we count it in image pixels, as the paper states it);
* SGD, ``lr = 0.01``, momentum 0.9, dampening 0.9, ``steps = 800``; the input is flipped left-right on
  every second step (jitter).

The map is the final mask (inside the image). Cost: ``steps`` forward+backward passes of one row per image
(two for ``dual``), plus one forward on the clean images when no targets are given.

The reward is the raw logit against a fixed-weight regulariser (calibrated on ImageNet networks): on a model
with small logits (+-2) the regulariser wins and the mask follows it rather than the evidence (tests).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import check_positive, register
from .mdm import INERT, MaskSearch, gaussian_blur

__all__ = ["Extremal", "SmoothMaskGenerator", "blur_pyramid"]


class SmoothMaskGenerator(nn.Module):
    """Cell parameters ``[B,1,gh,gw]`` -> ``(image mask [B,1,H,W], canvas mask [B,1,H+2m,W+2m])``.

    Cell ``c`` sits at image pixel ``c * step`` (``gh = ceil(H / step)``). The mask is built on a canvas
    that extends the image by a margin ``m = round(sigma)`` on every side, as in TorchRay: the area
    regulariser sees the whole canvas, so cells at the image border are not favoured over inner ones
    (without the margin, the border pixels shrink slowest and the rank regulariser locks them in).
    """

    def __init__(self, size: tuple[int, int], step: int, sigma: float, coldness: float = 20.0) -> None:
        super().__init__()
        self.size, self.step, self.coldness = size, int(step), float(coldness)
        self.margin = round(sigma)
        self.radius = 1 + math.ceil(sigma / step)
        self.extra = math.ceil(self.margin / step)  # blocks of output pixels beyond the grid, per side
        self.grid = tuple(math.ceil(n / step) for n in size)
        offsets = torch.arange(self.step, dtype=torch.float32)  # pixel position inside its cell
        cells = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32) * self.step
        dy = (cells[None, :] - offsets[:, None])[:, None, :, None]  # [step, 1, K1, 1]
        dx = (cells[None, :] - offsets[:, None])[None, :, None, :]  # [1, step, 1, K1]
        dist = (dy.pow(2) + dx.pow(2)).sqrt()  # [step, step, K1, K1]
        kernel = torch.exp(-2 * (dist / sigma - 0.5).clamp_min(0).pow(2))
        self.register_buffer("kernel", kernel.flatten(2).flatten(0, 1), persistent=False)  # [step^2, K]

    def forward(self, params: Tensor) -> tuple[Tensor, Tensor]:
        b = params.shape[0]
        gh, gw = (n + 2 * self.extra for n in self.grid)  # output blocks, from grid cell -extra on
        pad = self.radius + self.extra
        neighbours = F.unfold(F.pad(params, [pad] * 4), 2 * self.radius + 1)  # [B, K, gh*gw], zero off-grid
        weighted = self.kernel.to(params)[None, :, :, None] * neighbours[:, None]  # [B, step^2, K, L]
        smooth_max = (weighted * (self.coldness * weighted).softmax(dim=2)).sum(2)  # [B, step^2, L]
        full = F.pixel_shuffle(smooth_max.view(b, self.step**2, gh, gw), self.step)  # starts at pixel -extra*step
        m, (h, w) = self.margin, self.size
        top = self.extra * self.step - m
        canvas = full[..., top : top + h + 2 * m, top : top + w + 2 * m].clamp(0, 1)
        return canvas[..., m : m + h, m : m + w], canvas


def blur_pyramid(images: Tensor, levels: int, max_blur: float) -> Tensor:
    """``[L,B,C,H,W]``: level 0 blurred with ``max_blur`` pixels, level ``L-1`` sharp, sigmas evenly spaced."""
    return torch.stack([gaussian_blur(images, max_blur * (1 - k / (levels - 1))) for k in range(levels)])


def perturb(pyramid: Tensor, mask: Tensor) -> Tensor:
    """Per pixel, the pyramid interpolated at level ``mask * (L-1)``: mask 1 -> sharp, 0 -> most blurred."""
    levels = pyramid.shape[0]
    t = mask.clamp(0, 1) * (levels - 1)  # [B,1,H,W]
    low = t.detach().floor().clamp(max=levels - 2).long()
    frac = t - low
    idx = low.expand(-1, pyramid.shape[2], -1, -1)[None]
    lower = pyramid.gather(0, idx)[0]
    upper = pyramid.gather(0, idx + 1)[0]
    return lower + frac * (upper - lower)


@register("extremal")
class Extremal(MaskSearch):
    """Extremal perturbation at a fixed ``area`` (default 0.1), TorchRay's settings scaled to the image
    (module docstring). Options: ``area``, ``steps=800``, ``lr=0.01``, ``variant`` preserve|delete|dual,
    ``reward`` logit|contrastive, ``step``/``sigma``/``max_blur`` in pixels (default 7, 21, 20 times
    ``min(H, W) / 224``), ``levels=8``, ``area_weight=300``, ``jitter=True``, ``batch_size``, ``progress``,
    ``amp``."""

    def __init__(
        self,
        model: nn.Module,
        *,
        area: float = 0.1,
        steps: int = 800,
        lr: float = 0.01,
        variant: Literal["preserve", "delete", "dual"] = "preserve",
        reward: Literal["logit", "contrastive"] = "logit",
        step: int | None = None,
        sigma: float | None = None,
        max_blur: float | None = None,
        levels: int = 8,
        area_weight: float = 300.0,
        jitter: bool = True,
        batch_size: int | None = None,
        progress: bool | None = None,
        amp: bool = False,
    ) -> None:
        super().__init__(model, batch_size=batch_size, progress=progress, amp=amp)
        if isinstance(area, bool) or not isinstance(area, (int, float)) or not 0 < area < 1:
            raise ValueError(f"area (the fraction of the image the mask keeps) must be in (0, 1), got {area!r}")
        check_positive("steps", steps)
        check_positive("lr", lr, integer=False)
        check_positive("area_weight", area_weight, integer=False)
        if variant not in ("preserve", "delete", "dual"):
            raise ValueError(f"variant must be 'preserve', 'delete' or 'dual', got {variant!r}")
        if reward not in ("logit", "contrastive"):
            raise ValueError(f"reward must be 'logit' or 'contrastive', got {reward!r}")
        if step is not None:
            check_positive("step", step)
        for name, value in (("sigma", sigma), ("max_blur", max_blur)):
            if value is not None:
                check_positive(name, value, integer=False)
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise ValueError(f"levels must be an integer >= 2, got {levels!r}")
        self.area, self.steps, self.lr, self.variant, self.reward = float(area), int(steps), float(lr), variant, reward
        self.step, self.sigma, self.max_blur, self.levels = step, sigma, max_blur, levels
        self.area_weight, self.jitter = float(area_weight), bool(jitter)
        self.rows_per_image = 2 if variant == "dual" else 1

    def settings(self, h: int, w: int) -> tuple[int, float, float]:
        """``(step, sigma, max_blur)`` in pixels for an ``h x w`` image."""
        r = min(h, w) / 224
        step = self.step if self.step is not None else max(1, round(7 * r))
        sigma = self.sigma if self.sigma is not None else 21 * r
        max_blur = self.max_blur if self.max_blur is not None else 20 * r
        return step, sigma, max_blur

    def _check_size(self, h: int, w: int) -> None:
        step = self.settings(h, w)[0]
        if step > min(h, w):
            raise ValueError(f"extremal step {step} px is larger than the {h}x{w} image")
        if round(self.area * h * w) < 1:
            raise ValueError(f"area {self.area} of a {h}x{w} image is less than one pixel")

    def _steps_per_chunk(self, h: int, w: int) -> int:
        return self.steps

    def _score(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.float()
        score = logits.gather(1, targets[:, None])[:, 0]
        if self.reward == "contrastive":
            others = logits.scatter(1, targets[:, None], float("-inf"))
            score = score - others.amax(1)
        return score

    def _search(self, images: Tensor, targets: Tensor, bar) -> Tensor:
        b, _, h, w = images.shape
        step, sigma, max_blur = self.settings(h, w)
        generator = SmoothMaskGenerator((h, w), step, sigma).to(images.device)
        pyramid = blur_pyramid(images, self.levels, max_blur)
        n = (h + 2 * generator.margin) * (w + 2 * generator.margin)  # the canvas, margin included
        ref = torch.zeros(n, device=images.device)
        ref[n - round(self.area * h * w) :] = 1  # sorted ideal canvas mask: `area` of the image's pixels are ones
        params = torch.ones(b, 1, *generator.grid, device=images.device, requires_grad=True)
        optimiser = torch.optim.SGD([params], lr=self.lr, momentum=0.9, dampening=0.9)
        for t in range(self.steps):
            with torch.enable_grad():
                mask, canvas = generator(params)
                parts = []
                if self.variant in ("preserve", "dual"):
                    parts.append(perturb(pyramid, mask))
                if self.variant in ("delete", "dual"):
                    parts.append(perturb(pyramid, 1 - mask))
                inputs = torch.cat(parts)
                if self.jitter and t % 2 == 0:
                    inputs = inputs.flip(-1)
                with self._autocast(images):
                    scores = self._score(self.model(inputs), targets.repeat(len(parts))).view(len(parts), b)
                reward = (
                    scores[0]
                    if self.variant == "preserve"
                    else -scores[0]
                    if self.variant == "delete"
                    else scores[0] - scores[1]
                )
                # stable: tied mask values (all 1 at the start) keep their pixel order on every device, so the
                # tie-break, which decides which of them the regulariser pushes down, is the same on CPU and GPU
                regul = (canvas.flatten(1).sort(dim=1, stable=True).values - ref).pow(2).mean(1)
                loss = (-reward + self.area_weight * 1.0035**t * regul).sum()
                (grad,) = torch.autograd.grad(loss, params)
            params.grad = grad
            optimiser.step()
            with torch.no_grad():
                params.clamp_(0, 1)
            if bar is not None:
                bar.update(1)
        with torch.no_grad():
            mask = generator(params)[0][:, 0]
        inert = (images - pyramid[0]).abs().amax(dim=(1, 2, 3)) <= INERT  # equal up to rounding in the blur
        return torch.where(inert[:, None, None], torch.zeros_like(mask), mask)
