"""The CAM family: Grad-CAM, Grad-CAM++, XGrad-CAM, Layer-CAM, HiResCAM (one gradient at the layer) and
Score-CAM (forward passes only). Formulas: docs/methods.md#the-cam-family.

Notation: ``A`` activations ``[B,K,h,w]`` of the tapped layer, ``G = d y_c / d A`` (``y_c`` = target
logit). The gradient CAMs run the model once per batch and back-propagate only from the logits down to
the tapped layer: nothing below the layer keeps an autograd graph, no weight gradients are formed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hooks import Tap
from ..models import token_grid
from .base import Explainer, register

__all__ = ["GradCAM", "GradCAMPlusPlus", "HiResCAM", "LayerCAM", "ScoreCAM", "XGradCAM"]

Reshape = Callable[[Tensor], Tensor]


class _LayerExplainer(Explainer):
    """Shared by the CAM family: feature-grid reshaping for token models; ``amp`` = bf16 autocast on CUDA."""

    uses_layer = True

    def __init__(
        self,
        model: nn.Module,
        layer: str | Sequence[str] | None = None,
        *,
        reshape: Reshape | None = None,
        amp: bool = False,
    ) -> None:
        super().__init__(model, layer)
        self.reshape = reshape
        self.amp = amp

    def _grid(self, t: Tensor) -> Tensor:
        """Activations or gradients as ``[B,C,h,w]``: token outputs ``[B,N,D]`` become a grid."""
        if self.reshape is not None:
            t = self.reshape(t)
        elif t.dim() == 3:
            prefix, h, w = token_grid(t.shape[1], getattr(self.model.backbone, "num_prefix_tokens", None))
            t = t[:, prefix:].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)
        if t.dim() != 4:
            raise ValueError(
                f"layer output has shape {list(t.shape)}; CAMs need [B,C,h,w] or tokens [B,N,D] "
                "(pass reshape= for other layouts)"
            )
        return t.float()


class _GradientCAM(_LayerExplainer):
    """One forward with the layer tapped, one gradient at the layer, then :meth:`_combine`."""

    def _explain(self, images: Tensor, targets: Tensor | None) -> list[Tensor]:
        with torch.enable_grad(), Tap(self.model.backbone, self.layers, differentiable=True) as tap:
            with self._autocast(images):
                logits = self.model(images)
            targets = self._resolve_targets(logits, targets)
            score = logits.gather(1, targets[:, None]).sum()
            acts = [tap.get(name) for name in self.layers]
            grads = torch.autograd.grad(score, acts)
        return [self._combine(self._grid(a.detach()), self._grid(g)) for a, g in zip(acts, grads, strict=True)]

    def _combine(self, acts: Tensor, grads: Tensor) -> Tensor:
        """``[B,K,h,w]`` activations and gradients -> raw map ``[B,h,w]``."""
        raise NotImplementedError


@register("gradcam")
class GradCAM(_GradientCAM):
    """Grad-CAM: ReLU(sum_k alpha_k A_k), alpha_k = spatial mean of G_k."""

    def _combine(self, acts: Tensor, grads: Tensor) -> Tensor:
        alpha = grads.mean(dim=(2, 3), keepdim=True)
        return (alpha * acts).sum(1).relu()


@register("gradcam++")
class GradCAMPlusPlus(_GradientCAM):
    """Grad-CAM++: alpha_k = sum_ij w_kij ReLU(G_kij), w = G^2 / (2 G^2 + sum_ij(A) G^3) (0 where undefined)."""

    def _combine(self, acts: Tensor, grads: Tensor) -> Tensor:
        g2 = grads.pow(2)
        denom = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g2 * grads
        w = torch.where(
            denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(denom)
        )
        alpha = (w * grads.relu()).sum(dim=(2, 3), keepdim=True)
        return (alpha * acts).sum(1).relu()


@register("xgradcam")
class XGradCAM(_GradientCAM):
    """XGrad-CAM: alpha_k = sum_ij (A_kij / sum_ij A_k) G_kij."""

    def _combine(self, acts: Tensor, grads: Tensor) -> Tensor:
        total = acts.sum(dim=(2, 3), keepdim=True)
        share = torch.where(
            total != 0, acts / torch.where(total != 0, total, torch.ones_like(total)), torch.zeros_like(acts)
        )
        alpha = (share * grads).sum(dim=(2, 3), keepdim=True)
        return (alpha * acts).sum(1).relu()


@register("layercam")
class LayerCAM(_GradientCAM):
    """Layer-CAM: ReLU(sum_k ReLU(G_k) * A_k), pixel-wise weights."""

    def _combine(self, acts: Tensor, grads: Tensor) -> Tensor:
        return (grads.relu() * acts).sum(1).relu()


@register("hirescam")
class HiResCAM(_GradientCAM):
    """HiResCAM: ReLU(sum_k G_k * A_k), the element-wise product instead of averaged gradients."""

    def _combine(self, acts: Tensor, grads: Tensor) -> Tensor:
        return (grads * acts).sum(1).relu()


@register("scorecam")
class ScoreCAM(_LayerExplainer):
    """Score-CAM: weight each channel by the class score of the image masked with that channel.

    ``H_k`` = channel ``k`` upsampled to the input and min-max normalised; ``s_k`` = score of the target on
    ``x * H_k``. ``weighting="probability"`` (default, the paper): ``alpha_k`` = softmax probability of
    the target. ``weighting="channel_softmax"`` (grad-cam's ``ScoreCAM``): ``alpha = softmax_k`` of the
    target logits. Map = ReLU(sum_k alpha_k A_k). Masks are upsampled with ``align_corners=True`` as in
    grad-cam (the paper's code uses False; with channel-softmax weights that convention alone moves
    Pearson with grad-cam on a random ResNet-18 from 1.0 to 0.95). All (image, channel) pairs are pooled into batches of
    ``batch_size``; channels that are constant mask the whole image to black and share one forward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | Sequence[str] | None = None,
        *,
        batch_size: int | None = None,
        weighting: Literal["probability", "channel_softmax"] = "probability",
        reshape: Reshape | None = None,
        amp: bool = False,
    ) -> None:
        super().__init__(model, layer, reshape=reshape, amp=amp)
        self._set_batch_size(batch_size)
        if weighting not in ("probability", "channel_softmax"):
            raise ValueError(f"weighting must be 'probability' or 'channel_softmax', got {weighting!r}")
        self.weighting = weighting

    def _score(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.float()
        if self.weighting == "probability":
            return logits.softmax(1).gather(1, targets[:, None])[:, 0]
        return logits.gather(1, targets[:, None])[:, 0]

    def _explain(self, images: Tensor, targets: Tensor | None) -> list[Tensor]:
        with torch.inference_mode():
            with Tap(self.model.backbone, self.layers) as tap, self._autocast(images):
                logits = self.model(images)
            targets = self._resolve_targets(logits, targets)
            maps = []
            for name in self.layers:
                acts = self._grid(tap.get(name))
                scores = self._channel_scores(images, acts, targets)
                alpha = scores.softmax(1) if self.weighting == "channel_softmax" else scores
                maps.append((alpha[:, :, None, None] * acts).sum(1).relu())
        return maps

    def _channel_scores(self, images: Tensor, acts: Tensor, targets: Tensor) -> Tensor:
        """``[B,K]`` target scores of the images masked by each of their K normalised channels."""
        size = images.shape[-2:]
        flat = acts.flatten(2)
        live = flat.amax(2) > flat.amin(2)  # constant channels normalise to 0: a black image
        with self._autocast(images):
            black = self._score(self.model(torch.zeros_like(images[:1])).expand(len(images), -1), targets)
        scores = black[:, None].expand(acts.shape[:2]).clone()
        pairs = live.nonzero()
        for chunk in pairs.split(self._rows(images)):
            b, k = chunk[:, 0], chunk[:, 1]
            masks = F.interpolate(acts[b, k][:, None], size=size, mode="bilinear", align_corners=True)
            low = masks.amin(dim=(2, 3), keepdim=True)
            span = masks.amax(dim=(2, 3), keepdim=True) - low
            masks = torch.where(span > 0, (masks - low) / span.clamp_min(1e-12), torch.zeros_like(masks))
            with self._autocast(images):
                logits = self.model(images[b] * masks)
            scores[b, k] = self._score(logits, targets[b])
        return scores
