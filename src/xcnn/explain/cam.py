"""The CAM family: Grad-CAM, Grad-CAM++, XGrad-CAM, Layer-CAM, HiResCAM (one gradient at the layer) and
Score-CAM (forward passes only). Formulas: docs/methods.md#the-cam-family.

Notation: ``A`` activations ``[B,K,h,w]`` of the tapped layer, ``G = d y_c / d A`` (``y_c`` = target
logit). The gradient CAMs run the model once per batch and back-propagate only from the logits down to
the tapped layer: nothing below the layer keeps an autograd graph, no weight gradients are formed. The
same core, :func:`cam_maps`, serves training losses with ``create_graph=True``: then the maps are
differentiable with respect to the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hooks import Tap
from ..models import token_grid
from .base import Explainer, register

__all__ = ["CAM_COMBINE", "GradCAM", "GradCAMPlusPlus", "HiResCAM", "LayerCAM", "ScoreCAM", "XGradCAM", "cam_maps"]

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
        """Activations or gradients as float32 ``[B,C,h,w]``: token outputs ``[B,N,D]`` become a grid."""
        return _as_grid(t, self.model.backbone, self.reshape).float()


def _as_grid(t: Tensor, backbone: nn.Module, reshape: Reshape | None = None) -> Tensor:
    """A layer's output (or its gradient) as ``[B,C,h,w]``: ``reshape`` if given, token outputs ``[B,N,D]``
    as their grid (prefix tokens dropped), feature maps as they are."""
    if reshape is not None:
        t = reshape(t)
    elif t.dim() == 3:
        prefix, h, w = token_grid(t.shape[1], getattr(backbone, "num_prefix_tokens", None))
        t = t[:, prefix:].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)
    if t.dim() != 4:
        raise ValueError(
            f"layer output has shape {list(t.shape)}; CAMs need [B,C,h,w] or tokens [B,N,D] "
            "(pass reshape= for other layouts)"
        )
    return t


# ---- the functional core: explainers and training losses call the same code ------------------------------


def _gradcam(acts: Tensor, grads: Tensor) -> Tensor:
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    return (alpha * acts).sum(1).relu()


def _gradcampp(acts: Tensor, grads: Tensor) -> Tensor:
    g2 = grads.pow(2)
    denom = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g2 * grads
    w = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    alpha = (w * grads.relu()).sum(dim=(2, 3), keepdim=True)
    return (alpha * acts).sum(1).relu()


def _xgradcam(acts: Tensor, grads: Tensor) -> Tensor:
    total = acts.sum(dim=(2, 3), keepdim=True)
    share = torch.where(
        total != 0, acts / torch.where(total != 0, total, torch.ones_like(total)), torch.zeros_like(acts)
    )
    alpha = (share * grads).sum(dim=(2, 3), keepdim=True)
    return (alpha * acts).sum(1).relu()


def _layercam(acts: Tensor, grads: Tensor) -> Tensor:
    return (grads.relu() * acts).sum(1).relu()


def _hirescam(acts: Tensor, grads: Tensor) -> Tensor:
    return (grads * acts).sum(1).relu()


#: ``[B,K,h,w]`` activations and gradients -> raw map ``[B,h,w]``, per gradient CAM (docs/methods.md#the-cam-family)
CAM_COMBINE: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "gradcam": _gradcam, "gradcam++": _gradcampp, "xgradcam": _xgradcam, "layercam": _layercam, "hirescam": _hirescam,
}  # fmt: skip


def _gradient_cams(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | None,
    layers: Sequence[str],
    combine: Callable[[Tensor, Tensor], Tensor],
    *,
    grid: Callable[[Tensor], Tensor],
    create_graph: bool,
    resolve: Callable[[Tensor, Tensor | None], Tensor],
    autocast: contextlib.AbstractContextManager | None = None,
    logits_out: list[Tensor] | None = None,
    grad_scale: float = 1.0,
) -> list[Tensor]:
    """One forward with ``layers`` tapped, one gradient of the summed target logits at the layers, then
    ``combine``. Without ``create_graph`` nothing is kept for a later backward (the explainers' path); with
    it the maps stay differentiable with respect to the model's parameters (the training losses' path)."""
    with torch.enable_grad(), Tap(model.backbone, layers, differentiable=True) as tap:
        with autocast or contextlib.nullcontext():
            logits = model(images)
        if logits_out is not None:
            logits_out.append(logits)
        targets = resolve(logits, targets)
        score = logits.gather(1, targets[:, None]).sum()
        acts = [tap.get(name) for name in layers]
        if grad_scale != 1.0:
            score = score.float() * grad_scale  # only the gradient matters, not this value
        grads = torch.autograd.grad(score, acts, create_graph=create_graph, allow_unused=True)
    for name, g in zip(layers, grads, strict=True):
        if g is None:
            raise ValueError(
                f"layer {name!r}: no gradient reaches it from the target logits (its output does not feed the "
                "classifier); choose a layer on the path to the logits"
            )
    if not create_graph:
        acts = [a.detach() for a in acts]
    if grad_scale != 1.0:  # unscaled after the cast to float32, where the small values survive
        return [combine(grid(a), grid(g) / grad_scale) for a, g in zip(acts, grads, strict=True)]
    return [combine(grid(a), grid(g)) for a, g in zip(acts, grads, strict=True)]


def cam_maps(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | int | None,
    layer: str | None = None,
    method: str = "gradcam",
    create_graph: bool = False,
    return_logits: bool = False,
    grad_scale: float = 1.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Raw gradient-CAM maps ``[B,h,w]`` (non-negative, not normalised, at ``layer``'s resolution) of the
    ``targets`` classes (None: each image's top-1). ``method``: one of :data:`CAM_COMBINE`.

    With ``create_graph=True`` the maps are differentiable with respect to the model's parameters (a CAM
    inside a training loss); the model's mode is left as it is. The explainers of this module compute the
    same maps with ``create_graph=False``. ``return_logits=True`` also returns the logits of the forward
    pass it ran (a training step computes its cross-entropy on them: one forward for both).
    ``grad_scale``: the target score is multiplied by it before the gradient at the layer, and the gradient
    divided by it once in float32 (under float16 autocast a small inner gradient would otherwise flush to
    zero; a power of two keeps the maps bit-identical in float32).
    """
    if not (grad_scale > 0 and grad_scale < float("inf")):
        raise ValueError(f"cam_maps: grad_scale must be positive and finite, got {grad_scale}")
    from ..models import as_classifier, default_layer

    if method not in CAM_COMBINE:
        raise ValueError(f"cam_maps: method must be one of {sorted(CAM_COMBINE)}, got {method!r}")
    clf = as_classifier(model)
    layer = layer or default_layer(clf)
    if isinstance(targets, int):
        targets = torch.full((len(images),), targets, dtype=torch.long, device=images.device)

    def resolve(logits: Tensor, t: Tensor | None) -> Tensor:
        if t is None:
            return logits.detach().argmax(1)
        if bool((t < 0).any()) or bool((t >= logits.shape[1]).any()):
            raise ValueError(f"cam_maps: target out of range for {logits.shape[1]} classes: {t.tolist()}")
        return t.to(logits.device)

    def grid(t: Tensor) -> Tensor:
        t = _as_grid(t, clf.backbone)  # the explainers' reshaping (token grids included)
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t  # float64 stays float64

    logits: list[Tensor] = []
    maps = _gradient_cams(
        clf, images, targets, [layer], CAM_COMBINE[method], grid=grid, create_graph=create_graph, resolve=resolve,
        logits_out=logits, grad_scale=grad_scale,
    )[0]  # fmt: skip
    return (maps, logits[0]) if return_logits else maps


class _GradientCAM(_LayerExplainer):
    """One forward with the layer tapped, one gradient at the layer, then the method's weighting."""

    combine_name = ""

    def _explain(self, images: Tensor, targets: Tensor | None) -> list[Tensor]:
        return _gradient_cams(
            self.model, images, targets, self.layers, CAM_COMBINE[self.combine_name], grid=self._grid,
            create_graph=False, resolve=self._resolve_targets, autocast=self._autocast(images),
        )  # fmt: skip


@register("gradcam")
class GradCAM(_GradientCAM):
    """Grad-CAM: ReLU(sum_k alpha_k A_k), alpha_k = spatial mean of G_k."""

    combine_name = "gradcam"


@register("gradcam++")
class GradCAMPlusPlus(_GradientCAM):
    """Grad-CAM++: alpha_k = sum_ij w_kij ReLU(G_kij), w = G^2 / (2 G^2 + sum_ij(A) G^3) (0 where undefined)."""

    combine_name = "gradcam++"


@register("xgradcam")
class XGradCAM(_GradientCAM):
    """XGrad-CAM: alpha_k = sum_ij (A_kij / sum_ij A_k) G_kij."""

    combine_name = "xgradcam"


@register("layercam")
class LayerCAM(_GradientCAM):
    """Layer-CAM: ReLU(sum_k ReLU(G_k) * A_k), pixel-wise weights."""

    combine_name = "layercam"


@register("hirescam")
class HiResCAM(_GradientCAM):
    """HiResCAM: ReLU(sum_k G_k * A_k), the element-wise product instead of averaged gradients."""

    combine_name = "hirescam"


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
