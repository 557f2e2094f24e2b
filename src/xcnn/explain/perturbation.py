"""Perturbation explainers (forward passes only): occlusion, RISE, and the seeded random baseline.

All run under ``torch.inference_mode()`` and pool every (perturbation, image) pair into forward passes
of about ``batch_size`` rows. Perturbations happen in pixel space; "removed" means 0 (black).
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_seed
from .base import Explainer, check_positive, register

__all__ = ["RISE", "Occlusion", "RandomMap"]


def _target_probs(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """Softmax probability of ``targets`` (one per row) for ``inputs``."""
    return model(inputs).float().softmax(1).gather(1, targets[:, None])[:, 0]


@register("occlusion")
class Occlusion(Explainer):
    """Occlusion (Zeiler & Fergus): drop in p(c) when a ``patch`` x ``patch`` square is set to 0, averaged
    over the windows that cover each pixel. Windows start every ``stride`` pixels and the last one is
    clipped at the border, so every pixel is covered (as captum's ``Occlusion``). Defaults: patch = 1/14
    of the shorter side (16 px at 224), stride = patch // 2."""

    def __init__(
        self,
        model: nn.Module,
        *,
        patch: int | None = None,
        stride: int | None = None,
        batch_size: int | None = None,
        amp: bool = False,
    ) -> None:
        super().__init__(model)
        self.amp = amp
        for name, value in (("patch", patch), ("stride", stride)):
            if value is not None:
                check_positive(name, value)
        self._set_batch_size(batch_size)
        self.patch, self.stride = patch, stride

    def _explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        b, _, h, w = images.shape
        patch = self.patch or max(2, round(min(h, w) / 14))
        stride = self.stride or max(1, patch // 2)
        if patch > min(h, w):
            raise ValueError(f"occlusion patch {patch} is larger than the image ({h}x{w})")
        if stride > patch:
            raise ValueError(
                f"occlusion stride {stride} is larger than the patch {patch}: some pixels would never be occluded"
            )
        targets, probs = self._top1_or_check(images, targets)
        clean = probs.gather(1, targets[:, None])[:, 0]
        dev = images.device
        ys = torch.arange(math.ceil((h - patch) / stride) + 1, device=dev) * stride
        xs = torch.arange(math.ceil((w - patch) / stride) + 1, device=dev) * stride
        starts = torch.cartesian_prod(ys, xs)  # [n_windows, 2]
        rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
        total = torch.zeros(b, h, w, device=dev)
        count = torch.zeros(h, w, device=dev)
        pairs = torch.cartesian_prod(torch.arange(len(starts), device=dev), torch.arange(b, device=dev))
        with torch.inference_mode():
            for chunk in pairs.split(self._rows(images)):
                win, img = chunk[:, 0], chunk[:, 1]
                y0, x0 = starts[win, 0, None], starts[win, 1, None]
                inside = ((rows >= y0) & (rows < y0 + patch))[:, :, None] & ((cols >= x0) & (cols < x0 + patch))[
                    :, None, :
                ]
                occluded = images[img] * (~inside)[:, None]
                with self._autocast(images):
                    drop = clean[img] - _target_probs(self.model, occluded, targets[img])
                total.index_add_(0, img, drop[:, None, None] * inside)
                count += inside[img == 0].sum(0)  # each window once (the rows of image 0)
        return total / count.clamp_min(1)


@register("rise")
class RISE(Explainer):
    """RISE (Petsiuk et al. 2018): sum_i p(c | x * M_i) M_i / (N * p).

    ``M_i``: a random binary ``grid`` x ``grid`` pattern (cells on with probability ``p``), bilinearly
    upsampled to (grid+1) cells of ceil(H/grid) pixels and cropped at a random shift. The same N masks
    explain every image of the batch; they depend only on ``seed`` (not on batch size or device).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        masks: int = 4000,
        grid: int = 7,
        p: float = 0.5,
        batch_size: int | None = None,
        seed: int = 0,
        amp: bool = False,
    ) -> None:
        super().__init__(model)
        check_positive("masks", masks)
        check_positive("grid", grid)
        self._set_batch_size(batch_size)
        if not 0 < p < 1:
            raise ValueError(f"p (probability a grid cell is kept) must be in (0, 1), got {p}")
        self.n_masks, self.grid, self.p, self.seed, self.amp = masks, grid, float(p), check_seed(seed), amp

    def _explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        b, _, h, w = images.shape
        if self.grid > min(h, w):
            raise ValueError(f"RISE grid {self.grid} is finer than the image ({h}x{w})")
        targets = self._targets(images, targets)
        gen = torch.Generator().manual_seed(self.seed)
        cells = (torch.rand(self.n_masks, 1, self.grid, self.grid, generator=gen) < self.p).float().to(images.device)
        cell_h, cell_w = math.ceil(h / self.grid), math.ceil(w / self.grid)
        shifts_y = torch.randint(0, cell_h, (self.n_masks,), generator=gen).to(images.device)
        shifts_x = torch.randint(0, cell_w, (self.n_masks,), generator=gen).to(images.device)
        rows, cols = torch.arange(h, device=images.device), torch.arange(w, device=images.device)
        saliency = torch.zeros(b, h, w, device=images.device)
        per_pass = max(1, self._rows(images) // b)
        with torch.inference_mode():
            for idx in torch.arange(self.n_masks, device=images.device).split(per_pass):
                up = F.interpolate(
                    cells[idx],
                    size=((self.grid + 1) * cell_h, (self.grid + 1) * cell_w),
                    mode="bilinear",
                    align_corners=False,
                )
                ry = (shifts_y[idx, None] + rows)[:, :, None]
                rx = (shifts_x[idx, None] + cols)[:, None, :]
                masks = up[torch.arange(len(idx), device=images.device)[:, None, None], 0, ry, rx]  # [n,H,W]
                inputs = (masks[:, None, None] * images[None]).flatten(0, 1)  # rows ordered (mask, image)
                with self._autocast(images):
                    probs = _target_probs(self.model, inputs, targets.repeat(len(idx))).view(len(idx), b)
                saliency += torch.einsum("nb,nhw->bhw", probs, masks)
        return saliency / (self.n_masks * self.p)


@register("random")
class RandomMap(Explainer):
    """Baseline that ignores the model: a smooth random map (uniform ``grid`` x ``grid`` noise, upsampled
    bilinearly); every metric table needs this floor. Each image's noise is drawn from a generator seeded
    by ``seed`` and a hash of the image's pixels, so a map depends only on the image, the seed and the
    options (not on the batch, its order or the device), and different images get different maps."""

    baseline = True

    def __init__(self, model: nn.Module, *, grid: int = 7, seed: int = 0) -> None:
        super().__init__(model)
        check_positive("grid", grid)
        self.grid, self.seed = grid, check_seed(seed)

    def _explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        if targets is not None:
            self._targets(images, targets)  # the range check: explaining class 5000 is an error here too
        pixels = images.detach().cpu().contiguous()
        maps = []
        # the seed's 64 bits as torch reads a seed (mod 2**64): a negative seed keeps its two's-complement key
        key = (self.seed % 2**64).to_bytes(8, "little")
        for image in pixels:
            digest = hashlib.blake2b(image.numpy().tobytes(), digest_size=8, key=key)
            gen = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
            maps.append(torch.rand(self.grid, self.grid, generator=gen))
        return torch.stack(maps).to(images.device)
