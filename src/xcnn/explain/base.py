"""The explainer contract, shared input checks and the create-by-name registry.

``explainer(images [B,3,H,W] in [0,1], targets=None) -> maps [B,H,W]`` float32 in [0,1], on the
images' device. A method is a subclass that implements :meth:`Explainer._explain`, returning raw
(unnormalised, non-negative-is-important) maps at any resolution; the base class checks inputs, guards
the model's state, and upsamples, normalises and averages the maps.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_positive
from ..hooks import frozen, named_layer
from ..models import Classifier, as_classifier, default_layer

__all__ = [
    "Explainer",
    "Targets",
    "check_images",
    "check_targets",
    "explainer",
    "explainer_class",
    "explainer_options",
    "list_explainers",
    "normalize_maps",
    "register",
]

Targets = int | Sequence[int] | Tensor | None

_REGISTRY: dict[str, type[Explainer]] = {}


def register(name: str) -> Callable[[type[Explainer]], type[Explainer]]:
    """Class decorator: make an explainer available as ``xcnn.explainer(name, ...)``."""

    def add(cls: type[Explainer]) -> type[Explainer]:
        if name in _REGISTRY:
            raise RuntimeError(f"explainer {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def list_explainers() -> list[str]:
    """Names accepted by :func:`explainer`, in registration order."""
    return list(_REGISTRY)


def explainer_class(name: str) -> type[Explainer]:
    """The class registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown explainer {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def explainer_options(name: str) -> list[str]:
    """The keyword options the explainer ``name`` accepts (besides ``layer``)."""
    return sorted(
        {
            p.name
            for klass in explainer_class(name).__mro__
            if "__init__" in vars(klass)
            for p in inspect.signature(klass.__init__).parameters.values()
            if p.kind is p.KEYWORD_ONLY
        }
    )


def explainer(name: str, model: nn.Module, layer: str | Sequence[str] | None = None, **options) -> Explainer:
    """Create the explainer called ``name`` for ``model`` (see :func:`list_explainers`)."""
    accepted = explainer_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"explainer {name!r} has no option(s) {unknown}; its options: {accepted}")
    cls = explainer_class(name)
    if not cls.uses_layer and layer is not None:
        raise ValueError(f"explainer {name!r} does not use a layer (got layer={layer!r})")
    return cls(model, layer=layer, **options) if cls.uses_layer else cls(model, **options)


def check_images(images: object) -> Tensor:
    """Validate a pixel-space batch: float tensor ``[B,3,H,W]``, B > 0, finite, values in [0,1]."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor [B,3,H,W] in [0,1], got {type(images).__name__}")
    if not images.is_floating_point():
        hint = " (divide uint8 images by 255)" if images.dtype == torch.uint8 else ""
        raise TypeError(f"images must be a float tensor in [0,1], got dtype {images.dtype}{hint}")
    if images.dim() != 4:
        hint = " (add a batch dimension with images[None])" if images.dim() == 3 else ""
        raise ValueError(f"images must have shape [B,3,H,W], got {list(images.shape)}{hint}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (B = 0)")
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 (RGB) channels in dim 1, got shape {list(images.shape)}")
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"images have no pixels: shape {list(images.shape)}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images contain NaN or Inf values")
    low, high = torch.aminmax(images.detach())
    if low.item() < 0.0 or high.item() > 1.0:
        raise ValueError(
            f"images must be pixel values in [0,1] (normalisation happens inside the Classifier); "
            f"got values in [{low.item():.3g}, {high.item():.3g}]"
        )
    images = images.detach().float()
    # tensors made under torch.inference_mode() cannot enter autograd; a copy can
    return images.clone() if images.is_inference() else images


def check_targets(targets: Targets, batch: int, device: torch.device) -> Tensor | None:
    """``None`` (top-1), an int for every image, or one class index per image -> LongTensor ``[B]``."""
    if targets is None:
        return None
    if isinstance(targets, bool) or (isinstance(targets, Tensor) and targets.dtype == torch.bool):
        raise TypeError("targets must be class indices, not booleans")
    t = torch.as_tensor(targets, device=device) if not isinstance(targets, Tensor) else targets.to(device)
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"targets must be integer class indices, got dtype {t.dtype}")
    t = t.long().reshape(1).repeat(batch) if t.dim() == 0 else t.long()  # one index (int, 0-d) for every image
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"targets must hold one class index per image ({batch}), got shape {list(t.shape)}")
    if bool((t < 0).any()):
        raise ValueError(f"target class indices must be >= 0, got {t.tolist()}")
    return t.clone() if t.is_inference() else t


def normalize_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``[B,h,w]`` -> bilinear to ``size`` -> min-max per map to [0,1] (a constant map becomes zeros)."""
    maps = maps.detach().float()
    if maps.shape[-2:] != tuple(size):
        maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    if not bool(torch.isfinite(maps).all()):
        raise RuntimeError("the explanation contains NaN or Inf (does the model output finite logits?)")
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(maps))


class Explainer:
    """Base class: subclasses set ``uses_layer`` and implement :meth:`_explain`."""

    name: str = "explainer"
    #: whether the method reads a layer's activations (the CAM family) or only the model's output
    uses_layer: bool = False
    #: run the model's forward passes under bf16 autocast when the images are on CUDA
    amp: bool = False
    #: for sparse maps (a few extreme pixels): displays (overlays, grids, reports) clip the map at this
    #: percentile of its values and rescale to [0,1], so the rest is visible; the returned map is unchanged
    display_percentile: float | None = None
    #: a reference that ignores the model (random maps): tables never mark it best, plots draw it grey, dashed
    baseline: bool = False
    #: rows per forward pass in inner loops; None = 64 on CUDA; on CPU 8 at 224x224 up to 64 at 64x64 and
    #: below (large activations make CPU time per image grow with the batch: ResNet-50 at 224x224 takes
    #: 99 ms/image at batch 8, 153 ms at 64, docs/performance.md; small images are bound by per-call
    #: overhead instead)
    batch_size: int | None = None

    def __init__(self, model: nn.Module, layer: str | Sequence[str] | None = None) -> None:
        self.model: Classifier = as_classifier(model)
        self.layers: list[str] = []
        if self.uses_layer:
            if layer is None:
                layer = default_layer(self.model)
            names = [layer] if isinstance(layer, str) else list(layer)
            if not names:
                raise ValueError("layer list is empty")
            for n in names:
                named_layer(self.model.backbone, n)
            self.layers = names

    def __repr__(self) -> str:
        where = f", layers={self.layers}" if self.layers else ""
        return f"{type(self).__name__}(model={self.model.name!r}{where})"

    def __call__(self, images: Tensor, targets: Targets = None) -> Tensor:
        # a caller's torch.inference_mode() would block the gradient methods: explanations run outside it
        with torch.inference_mode(False):
            images = check_images(images)
            targets = check_targets(targets, images.shape[0], images.device)
            param = next(self.model.parameters(), None)
            if param is not None and param.device != images.device:
                raise ValueError(f"images are on {images.device} but the model is on {param.device}; move one of them")
            with frozen(self.model):
                raw = self._explain(images, targets)
        raws = raw if isinstance(raw, list) else [raw]
        size = (images.shape[-2], images.shape[-1])
        maps = [normalize_maps(r, size) for r in raws]
        return maps[0] if len(maps) == 1 else normalize_maps(torch.stack(maps).mean(0), size)

    def _explain(self, images: Tensor, targets: Tensor | None) -> Tensor | list[Tensor]:
        """Raw maps ``[B,h,w]`` (one per layer for layer methods); larger = more important."""
        raise NotImplementedError

    # helpers for subclasses ---------------------------------------------------------------------------

    def _resolve_targets(self, logits: Tensor, targets: Tensor | None) -> Tensor:
        """Top-1 classes when ``targets`` is None; otherwise check them against the number of logits."""
        if targets is None:
            return logits.detach().argmax(dim=1)
        k = logits.shape[1]
        if bool((targets >= k).any()):
            raise ValueError(f"target class index out of range: model has {k} classes, got {targets.tolist()}")
        return targets

    def _autocast(self, images: Tensor) -> contextlib.AbstractContextManager:
        if self.amp and images.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _set_batch_size(self, batch_size: int | None) -> None:
        if batch_size is not None:
            check_positive("batch_size", batch_size)
        self.batch_size = batch_size

    def _rows(self, images: Tensor) -> int:
        """Rows per forward pass for inner loops on the images' device."""
        if self.batch_size:
            return self.batch_size
        if images.device.type == "cuda":
            return 64
        return max(8, min(64, 64 * 64 * 64 // (images.shape[-2] * images.shape[-1])))

    def _targets(self, images: Tensor, targets: Tensor | None) -> Tensor:
        """Checked targets; a forward pass on the clean images only when the top-1 is needed."""
        if targets is None:
            return self._top1_or_check(images, None)[0]
        with torch.no_grad(), self._autocast(images):  # one image tells the number of classes
            return self._resolve_targets(self.model(images[:1]), targets)

    def _top1_or_check(self, images: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(targets, probabilities [B,K])`` of the clean images, computed in batches without gradients."""
        with torch.no_grad(), self._autocast(images):  # no_grad, not inference_mode: targets feed autograd later
            probs = torch.cat([self.model(chunk).float().softmax(1) for chunk in images.split(self._rows(images))])
        return self._resolve_targets(probs, targets), probs
