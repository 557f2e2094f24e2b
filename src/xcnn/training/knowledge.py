"""Knowledge for training: where the evidence for a label lies ("look here") or must not lie ("never here"),
given for some training images only, and the losses that inject it (docs/methods.md#knowledge-injection).

* :class:`Knowledge` holds, per training-image index, a "look" region (object boxes or a mask) and/or a
  "forbid" region, validated against the images' size; :meth:`Knowledge.from_samples` draws a fraction of
  a dataset's own annotations, :meth:`Knowledge.load` reads a JSON file.
* :class:`WithKnowledge` wraps a dataset so every sample carries ``look``/``forbid`` masks and the flags
  ``has_look``/``has_forbid`` (empty masks and False for images without knowledge).
* Losses: :func:`attention_losses` (LAP's attention, Modegh et al. 2022, our formulas), :func:`rrr_loss`
  ("Right for the Right Reasons", Ross et al. 2017) and :func:`cam_guidance_loss` (Grad-CAM supervised
  towards the annotation, as GAIN's external supervision, Li et al. 2018).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["Knowledge", "WithKnowledge", "attention_losses", "cam_guidance_loss", "rrr_loss"]

Region = Tensor | Sequence[Sequence[float]] | Sequence[float]


def region_mask(region: Region, size: tuple[int, int], what: str = "region") -> Tensor:
    """A bool ``[H,W]`` mask from a mask (bool or 0/1, exactly ``size``), one box ``(x0, y0, x1, y1)`` or a
    list of boxes. Boxes are in the image's pixels, inclusive bounds (as the shapes benchmark's ``box``);
    each must lie inside the image with ``x1 > x0`` and ``y1 > y0``."""
    h, w = size
    if isinstance(region, Tensor) and region.dim() == 2:
        if tuple(region.shape) != (h, w):
            raise ValueError(f"{what}: a mask of shape {tuple(region.shape)} for {h}x{w} images")
        if region.dtype != torch.bool and not bool(((region == 0) | (region == 1)).all()):
            raise ValueError(f"{what}: a mask must be boolean or 0/1")
        return region.bool().cpu()
    boxes = region.tolist() if isinstance(region, Tensor) else list(region)
    if boxes and not isinstance(boxes[0], (list, tuple)):
        boxes = [boxes]
    if not boxes:
        raise ValueError(f"{what}: no boxes given")
    mask = torch.zeros(h, w, dtype=torch.bool)
    for box in boxes:
        if len(box) != 4:
            raise ValueError(f"{what}: a box is (x0, y0, x1, y1), got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"{what}: box {box} needs x1 > x0 and y1 > y0")
        if x0 < 0 or y0 < 0 or x1 > w - 1 or y1 > h - 1:
            raise ValueError(f"{what}: box {box} lies outside the {w}x{h} image (pixels 0..{w - 1}, 0..{h - 1})")
        mask[int(y0) : int(y1) + 1, int(x0) : int(x1) + 1] = True
    return mask


class Knowledge:
    """Per-image "look here" and "never here" regions for some images of a training set.

    ``look`` / ``forbid``: ``{index: region}`` with regions as :func:`region_mask` takes them (a mask
    ``[H,W]``, a box, or a list of boxes, in the pixels of the images the dataset yields). ``size`` (H, W)
    validates every region at construction; a region that is empty is an error (it says nothing).
    """

    def __init__(
        self,
        size: tuple[int, int],
        look: Mapping[int, Region] | None = None,
        forbid: Mapping[int, Region] | None = None,
    ) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.look: dict[int, Tensor] = {}
        self.forbid: dict[int, Tensor] = {}
        for kind, given, store in (("look", look, self.look), ("forbid", forbid, self.forbid)):
            for index, region in (given or {}).items():
                if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                    raise ValueError(f"knowledge: {kind} keys must be image indices (int >= 0), got {index!r}")
                mask = region_mask(region, self.size, f"knowledge {kind}[{index}]")
                if not bool(mask.any()):
                    raise ValueError(f"knowledge: {kind}[{index}] is an empty region")
                store[index] = mask

    def __repr__(self) -> str:
        return f"Knowledge(size={self.size}, look on {len(self.look)} images, forbid on {len(self.forbid)} images)"

    @property
    def indices(self) -> list[int]:
        """Indices of the images that carry any knowledge."""
        return sorted(set(self.look) | set(self.forbid))

    def check(self, n: int) -> None:
        """Clear error when knowledge names images that are not among the dataset's ``n``."""
        outside = [i for i in self.indices if i >= n]
        if outside:
            raise ValueError(
                f"knowledge for images that are not in the data: indices {outside[:5]}{' ...' if len(outside) > 5 else ''}"
                f" (the data has {n} images)"
            )

    @classmethod
    def from_samples(
        cls,
        data: Dataset,
        fraction: float,
        *,
        look: str | None = "box",
        forbid: str | None = None,
        seed: int = 0,
    ) -> Knowledge:
        """Knowledge drawn from the dataset's own annotations on a random ``fraction`` of its images (the
        same images for a given seed, whatever kinds are asked): ``look`` names the sample key giving the
        "look here" region (``"box"`` or ``"mask"``), ``forbid`` the key giving the forbidden one (e.g. the
        shapes benchmark's ``"shortcut_mask"``). Images whose region is empty get none of that kind."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"knowledge fraction must be in (0, 1], got {fraction}")
        if look is None and forbid is None:
            raise ValueError("knowledge: name a sample key for look= or forbid=")
        n = len(data)
        chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: max(1, round(fraction * n))]
        first = data[0]
        size = tuple(first["image"].shape[-2:])
        for key in (look, forbid):
            if key is not None and key not in first:
                raise ValueError(f"knowledge: the samples have no {key!r} (they have {sorted(first)})")
        looks, forbids = {}, {}
        for i in sorted(chosen.tolist()):
            sample = data[i]
            for key, store in ((look, looks), (forbid, forbids)):
                if key is None:
                    continue
                region = sample[key]
                if key == "box" or (isinstance(region, Tensor) and region.dim() == 1):
                    store[i] = region
                elif bool(region.any()):
                    store[i] = region
        return cls(size, looks, forbids)

    @classmethod
    def load(cls, path: str | Path, size: tuple[int, int], names: Sequence[str] | None = None) -> Knowledge:
        """Read ``{"look": {KEY: [[x0, y0, x1, y1], ...]}, "forbid": {...}}``. Keys are image indices, or, when
        ``names`` lists the data's image names (file paths relative to a folder root), those names. Boxes are
        in the pixels of the images as the data yields them (``size``)."""
        path = Path(path)
        try:
            spec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read the knowledge file {path}: {err}") from err
        if not isinstance(spec, dict) or not set(spec) <= {"look", "forbid"} or not spec:
            raise ValueError(f"knowledge file {path}: expected an object with 'look' and/or 'forbid'")
        index = {name: i for i, name in enumerate(names)} if names is not None else None
        parsed: dict[str, dict[int, Region]] = {}
        for kind, entries in spec.items():
            if not isinstance(entries, dict):
                raise ValueError(f"knowledge file {path}: {kind!r} must map image keys to boxes")
            parsed[kind] = {}
            for key, boxes in entries.items():
                if index is not None and key in index:
                    i = index[key]
                elif key.isdigit():
                    i = int(key)
                else:
                    raise ValueError(f"knowledge file {path}: {key!r} is not an image of the data")
                parsed[kind][i] = boxes
        knowledge = cls(size, parsed.get("look"), parsed.get("forbid"))
        if names is not None:
            knowledge.check(len(names))
        return knowledge


class WithKnowledge(Dataset):
    """``data``'s samples (dicts or ``(image, label)``) plus ``look``/``forbid`` bool masks ``[H,W]`` and
    ``has_look``/``has_forbid`` flags; knowledge indices outside the data are an error."""

    def __init__(self, data: Dataset, knowledge: Knowledge | None) -> None:
        self.data = data
        self.knowledge = knowledge or Knowledge(_image_size(data))
        self.knowledge.check(len(data))
        size = _image_size(data)
        if self.knowledge.size != size:
            raise ValueError(f"knowledge is for {self.knowledge.size} images, the data yields {size}")
        self._empty = torch.zeros(size, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = self.data[index]
        if not isinstance(sample, dict):
            sample = dict(zip(("image", "label"), sample, strict=False))
        look, forbid = self.knowledge.look.get(index), self.knowledge.forbid.get(index)
        return {
            "image": sample["image"], "label": sample["label"],
            "look": self._empty if look is None else look, "forbid": self._empty if forbid is None else forbid,
            "has_look": torch.tensor(look is not None), "has_forbid": torch.tensor(forbid is not None),
        }  # fmt: skip


def _image_size(data: Dataset) -> tuple[int, int]:
    first = data[0]
    image = first["image"] if isinstance(first, dict) else first[0]
    return int(image.shape[-2]), int(image.shape[-1])


# ---- losses ----------------------------------------------------------------------------------------------


def _wide(t: Tensor) -> Tensor:
    """Half precision (autocast) widened to float32; float32 and float64 kept as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values [B,H,W]`` over ``mask`` per image -> ``[B]`` (0 where the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum((1, 2)) / mask.sum((1, 2)).clamp_min(1.0)


def attention_losses(
    logits: Tensor, look: Tensor, forbid: Tensor, has_look: Tensor, has_forbid: Tensor
) -> dict[str, Tensor]:
    """LAP's knowledge terms from attention *logits* ``z`` ``[B,heads,H,W]`` already at image size
    (attention ``a = sigmoid(z)``, heads averaged):

    * ``look`` (images with a "look here" region M): ``-mean_M log a + mean_{not M} a``;
    * ``forbid`` (images with a forbidden region F): ``mean_F a``;
    * ``area`` (images without any knowledge): ``mean a`` (a weak prior: look at little).

    Each term is the mean over the images it applies to (0 when none does)."""
    a = torch.sigmoid(logits).mean(1)
    # -log of the heads' mean attention, stable for very negative z: log mean_h sigmoid(z_h)
    neg_log_a = math.log(logits.shape[1]) - torch.logsumexp(F.logsigmoid(logits), dim=1)
    zero = a.sum() * 0.0

    def over(per_image: Tensor, which: Tensor) -> Tensor:
        return per_image[which].mean() if bool(which.any()) else zero

    look_term = _masked_mean(neg_log_a, look) + _masked_mean(a, ~look)
    forbid_term = _masked_mean(a, forbid)
    plain = ~(has_look | has_forbid)
    return {
        "look": over(look_term, has_look),
        "forbid": over(forbid_term, has_forbid),
        "area": over(a.mean((1, 2)), plain),
    }


def _forbidden(look: Tensor, forbid: Tensor, has_look: Tensor) -> Tensor:
    """Where the evidence must not be: the forbidden region, and outside the "look here" region of images
    that have one (the form both baselines take knowledge in)."""
    outside = ~look & has_look[:, None, None]
    return forbid | outside


def rrr_loss(logits: Tensor, inputs: Tensor, look: Tensor, forbid: Tensor, has_look: Tensor) -> Tensor:
    """Right for the Right Reasons (Ross et al. 2017): ``sum over pixels and channels of (A * d/dx sum_k log
    p_k(x))^2``, averaged over the batch, with ``A`` = where the evidence must not be (the forbidden region,
    and outside the "look here" region). ``logits`` must come from ``inputs`` (which require grad): the
    step's one forward pass serves the cross-entropy and this penalty. The input gradient is taken with
    ``create_graph=True``, so the penalty trains the parameters (a double backward)."""
    region = _forbidden(look, forbid, has_look)
    if not bool(region.any()):
        return logits.sum() * 0.0
    log_p = F.log_softmax(_wide(logits), dim=1)
    (grad,) = torch.autograd.grad(log_p.sum(), inputs, create_graph=True)
    return (grad * region[:, None].to(grad.dtype)).pow(2).sum() / len(inputs)


def cam_guidance_loss(
    cams: Tensor, look: Tensor, forbid: Tensor, has_look: Tensor, has_forbid: Tensor
) -> tuple[Tensor, Tensor]:
    """Grad-CAM supervision (GAIN's external supervision, Li et al. 2018) on differentiable raw CAMs
    ``[B,h,w]`` (:func:`xcnn.explain.cam_maps` with ``create_graph=True``): each map, upsampled to the image
    and divided by its maximum, is pulled towards the "look here" mask by mean squared error, and its mean
    inside a forbidden region is penalised. Returns ``(look term, forbid term)``, each the mean over the
    images it applies to (0 when none does)."""
    size = look.shape[-2:]
    cams = F.interpolate(_wide(cams)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    cams = cams / (cams.flatten(1).amax(1)[:, None, None] + 1e-6)
    zero = cams.sum() * 0.0
    look_term = (cams - look.to(cams.dtype)).pow(2).mean((1, 2))
    forbid_term = _masked_mean(cams, forbid)
    return (
        look_term[has_look].mean() if bool(has_look.any()) else zero,
        forbid_term[has_forbid].mean() if bool(has_forbid.any()) else zero,
    )
