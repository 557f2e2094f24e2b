"""Input-gradient explainers: saliency, Integrated Gradients, SmoothGrad (docs/methods.md#input-gradients).

Gradients are taken with ``torch.autograd.grad`` with respect to the input only; the model's
parameters do not require gradients during the call, so no weight gradients are formed or stored.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validate import check_seed
from .base import Explainer, check_positive, register

__all__ = ["IntegratedGradients", "Saliency", "SmoothGrad"]


class _InputGradient(Explainer):
    display_percentile = 99.0  # a few pixels carry most of the gradient: shown clipped, as captum does

    def __init__(self, model: nn.Module, *, batch_size: int | None = None) -> None:
        super().__init__(model)
        self._set_batch_size(batch_size)

    def _input_grad(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """``d logit_target / d input`` for ``inputs [n,3,H,W]``, one target per row."""
        with torch.enable_grad():
            x = inputs.detach().requires_grad_(True)
            score = self.model(x).gather(1, targets[:, None]).sum()
            (grad,) = torch.autograd.grad(score, x)
        return grad

    def _step_groups(self, n: int, images: Tensor) -> list[Tensor]:
        """Indices ``0..n-1`` in groups sized so that each forward pass sees about ``batch_size`` rows."""
        return list(torch.arange(n).split(max(1, self._rows(images) // images.shape[0])))


@register("saliency")
class Saliency(Explainer):
    """Saliency (Simonyan et al.): max over colour channels of |d y_c / d x|; one forward and one backward
    pass for the whole batch."""

    display_percentile = 99.0

    def _explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            logits = self.model(x)
            targets = self._resolve_targets(logits, targets)
            (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), x)
        return grad.abs().amax(1)


@register("integrated_gradients")
class IntegratedGradients(_InputGradient):
    """Integrated Gradients with a black baseline: (x - 0) * trapezoid mean of gradients along the path,
    then sum of |.| over colour channels. ``steps`` points including both ends; all (image, step) pairs
    are pooled into forward passes of about ``batch_size`` rows."""

    def __init__(self, model: nn.Module, *, steps: int = 32, batch_size: int | None = None) -> None:
        super().__init__(model, batch_size=batch_size)
        check_positive("steps", steps)
        if steps < 2:
            raise ValueError(f"steps must be at least 2 (the path's two ends), got {steps}")
        self.steps = steps

    def _explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        targets = self._targets(images, targets)
        n = self.steps
        alphas = torch.linspace(0, 1, n, device=images.device)
        weights = torch.full((n,), 1.0 / (n - 1), device=images.device)
        weights[0] = weights[-1] = 0.5 / (n - 1)
        total = torch.zeros_like(images)
        for steps in self._step_groups(n, images):
            path = alphas[steps].view(-1, 1, 1, 1, 1) * images  # [s,B,3,H,W], built one group at a time
            grads = self._input_grad(path.flatten(0, 1), targets.repeat(len(steps)))
            total += (weights[steps].view(-1, 1, 1, 1, 1) * grads.view(path.shape)).sum(0)
        return (images * total).abs().sum(1)


@register("smoothgrad")
class SmoothGrad(_InputGradient):
    """SmoothGrad: mean of saliency maps over ``samples`` noisy copies, noise sigma = ``noise`` * (max - min)
    of each image. The ``samples`` noise images are drawn once per call from ``seed`` on the CPU and shared
    by every image of the batch (each scaled by its own sigma), so an image's map depends only on the image,
    the seed and the options: not on its batch, the batch size or the device."""

    def __init__(
        self, model: nn.Module, *, samples: int = 25, noise: float = 0.15, batch_size: int | None = None, seed: int = 0
    ) -> None:
        super().__init__(model, batch_size=batch_size)
        check_positive("samples", samples)
        check_positive("noise", noise, integer=False)
        self.samples, self.noise, self.seed = samples, float(noise), check_seed(seed)

    def _explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        targets = self._targets(images, targets)
        gen = torch.Generator().manual_seed(self.seed)
        span = images.amax(dim=(1, 2, 3)) - images.amin(dim=(1, 2, 3))
        sigma = (self.noise * span).view(-1, 1, 1, 1)
        total = torch.zeros_like(images[:, 0])
        for samples in self._step_groups(self.samples, images):
            # one [3,H,W] draw per sample, in order: the noise does not depend on batch_size either
            noise = torch.stack([torch.randn(images.shape[1:], generator=gen) for _ in samples]).to(images.device)
            noisy = images[None] + sigma[None] * noise[:, None]  # [s,B,3,H,W]
            grads = self._input_grad(noisy.flatten(0, 1), targets.repeat(len(samples)))
            total += grads.abs().amax(1).view(len(samples), *total.shape).sum(0)
        return total / self.samples
