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

import math
import numbers
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .._validate import check_number, check_positive, check_seed, read_json
from .trainer import check_dataset, check_labels, check_sample

__all__ = ["Knowledge", "WithKnowledge", "attention_losses", "cam_guidance_loss", "rrr_loss"]

Region = Tensor | Sequence[Sequence[float]] | Sequence[float]


def _finite(value: object) -> bool:
    """A finite real number (not a bool); an int too large for a float is not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _box_list(region: Region, what: str) -> list[list[float]]:
    """The boxes of a box region (one box or a list of boxes), as lists of four numbers."""
    boxes = region.tolist() if isinstance(region, Tensor) else region
    if isinstance(boxes, (str, bytes)) or not isinstance(boxes, Sequence):
        raise ValueError(f"{what}: a region is a [H,W] mask, a box (x0, y0, x1, y1) or a list of boxes, got {region!r}")
    boxes = list(boxes)
    if boxes and not isinstance(boxes[0], (list, tuple, Tensor)):
        boxes = [boxes]
    if not boxes:
        raise ValueError(f"{what}: no boxes given")
    for box in boxes:
        box = box.tolist() if isinstance(box, Tensor) else box
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise ValueError(f"{what}: a box is (x0, y0, x1, y1), got {box!r}")
        if not all(_finite(v) for v in box):
            raise ValueError(f"{what}: a box's corners must be finite numbers, got {box!r}")
    return [[float(v) for v in (b.tolist() if isinstance(b, Tensor) else b)] for b in boxes]


#: a region as :func:`_compact` keeps it: its boxes (x0, y0, x1, y1, inclusive pixels), and, for a mask that
#: is not one filled rectangle, that mask inside its one bounding box, bit-packed
Compact = tuple[tuple[tuple[int, int, int, int], ...], bytes | None]


def _compact(region: Region, size: tuple[int, int], what: str) -> Compact:
    """A validated region kept small, in plain Python objects: many small tensors kept alongside a
    dataset's large temporary buffers fragment the allocator (4000 tiny tensors: ~200 MiB of resident
    memory), bytes do not. A filled rectangle, such as a box file's mask, is kept as its box."""
    h, w = size
    if isinstance(region, Tensor) and region.dim() == 2:
        if tuple(region.shape) != (h, w):
            raise ValueError(f"{what}: a mask of shape {tuple(region.shape)} for {h}x{w} images")
        if region.dtype != torch.bool and not bool(((region == 0) | (region == 1)).all()):
            raise ValueError(f"{what}: a mask must be boolean or 0/1")
        mask = region.detach().bool().cpu()
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        if len(rows) == 0:
            raise ValueError(f"{what} is an empty region")
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
        crop = mask[y0 : y1 + 1, x0 : x1 + 1]
        packed = None if bool(crop.all()) else np.packbits(crop.numpy()).tobytes()
        return ((x0, y0, x1, y1),), packed
    out = []
    for box in _box_list(region, what):
        x0, y0, x1, y1 = box
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"{what}: box {box} needs x1 > x0 and y1 > y0")
        if x0 < 0 or y0 < 0 or x1 > w - 1 or y1 > h - 1:
            raise ValueError(f"{what}: box {box} lies outside the {w}x{h} image (pixels 0..{w - 1}, 0..{h - 1})")
        out.append((int(x0), int(y0), int(x1), int(y1)))  # the pixels the box touches (corners >= 0: floor)
    return tuple(out), None


def _paint(compact: Compact, size: tuple[int, int]) -> Tensor:
    """The bool ``[H,W]`` mask of a region kept by :func:`_compact`."""
    boxes, packed = compact
    mask = torch.zeros(size, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        if packed is None:
            mask[y0 : y1 + 1, x0 : x1 + 1] = True
        else:
            shape = (y1 - y0 + 1, x1 - x0 + 1)
            bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=shape[0] * shape[1])
            mask[y0 : y1 + 1, x0 : x1 + 1] = torch.from_numpy(bits.reshape(shape).astype(bool))
    return mask


def region_mask(region: Region, size: tuple[int, int], what: str = "region") -> Tensor:
    """A bool ``[H,W]`` mask from a mask (bool or 0/1, exactly ``size``), one box ``(x0, y0, x1, y1)`` or a
    list of boxes. Boxes are in the image's pixels, inclusive bounds (as the shapes benchmark's ``box``);
    each must lie inside the image with ``x1 > x0`` and ``y1 > y0``. An empty mask is an error."""
    return _paint(_compact(region, size, what), size)


def _image_index(index: object, kind: str) -> int:
    if not isinstance(index, numbers.Integral) or isinstance(index, bool) or index < 0:
        raise ValueError(f"knowledge: {kind} keys must be image indices (int >= 0), got {index!r}")
    return int(index)


class Regions(MutableMapping):
    """``{image index: bool [H,W] mask}``, kept as boxes (or a mask inside its bounding box, bit-packed) and
    rasterised when an entry is read: a box costs a few bytes however large the images are. An entry is set
    as :func:`region_mask` takes a region (``regions[5] = mask``, a box or a list of boxes: validated and
    kept compact) and removed with ``del regions[5]``."""

    def __init__(self, size: tuple[int, int], kind: str = "region") -> None:
        self.size, self.kind = size, kind
        self._compact: dict[int, Compact] = {}

    def __getitem__(self, index: int) -> Tensor:
        return _paint(self._compact[index], self.size)

    def __setitem__(self, index: int, region: Region) -> None:
        index = _image_index(index, self.kind)
        self._compact[index] = _compact(region, self.size, f"knowledge {self.kind}[{index}]")

    def __delitem__(self, index: int) -> None:
        del self._compact[index]

    def __iter__(self):
        return iter(self._compact)

    def __len__(self) -> int:
        return len(self._compact)

    def __contains__(self, index: object) -> bool:
        return index in self._compact


def _check_size(size: object) -> tuple[int, int]:
    if isinstance(size, (str, bytes)) or not isinstance(size, Sequence) or len(size) != 2:
        raise ValueError(f"knowledge: size must be the images' (H, W), two positive integers, got {size!r}")
    for value in size:
        check_positive("knowledge: size (H, W)", value)
    return int(size[0]), int(size[1])


class Knowledge:
    """Per-image "look here" and "never here" regions for some images of a training set.

    ``look`` / ``forbid``: ``{index: region}`` with regions as :func:`region_mask` takes them (a mask
    ``[H,W]``, a box, or a list of boxes, in the pixels of the images the dataset yields). ``size`` (H, W)
    validates every region at construction; a region that is empty is an error (it says nothing). The
    attributes ``look`` / ``forbid`` map each index to its bool ``[H,W]`` mask, made when it is read
    (boxes are kept as boxes: see :class:`Regions`); ``k.look[5] = region`` adds or replaces one (validated
    the same way) and ``del k.look[5]`` removes it.
    """

    def __init__(
        self,
        size: tuple[int, int],
        look: Mapping[int, Region] | None = None,
        forbid: Mapping[int, Region] | None = None,
    ) -> None:
        self.size = _check_size(size)
        self.look = Regions(self.size, "look")
        self.forbid = Regions(self.size, "forbid")
        for kind, given, store in (("look", look, self.look), ("forbid", forbid, self.forbid)):
            if given is not None and not isinstance(given, Mapping):
                raise TypeError(f"knowledge: {kind} must map image indices to regions, got {type(given).__name__}")
            for index, region in (given or {}).items():
                store[index] = region

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
        fraction = check_number("knowledge fraction", fraction, low=0, low_open=True, high=1)
        check_seed(seed, "knowledge: seed")
        for what, key in (("look", look), ("forbid", forbid)):
            if key is not None and not isinstance(key, str):
                raise TypeError(f"knowledge: {what} must name a sample key (a string) or be None, got {key!r}")
        if look is None and forbid is None:
            raise ValueError("knowledge: name a sample key for look= or forbid=")
        n = check_dataset(data, "knowledge: data")
        first = data[0]
        if not isinstance(first, Mapping) or not isinstance(first.get("image"), Tensor):
            raise ValueError(
                f"knowledge: the samples must be dicts with an 'image' and the annotation keys, got {type(first).__name__}"
            )
        for key in (look, forbid):
            if key is not None and key not in first:
                raise ValueError(f"knowledge: the samples have no {key!r} (they have {sorted(first)})")
        chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: max(1, round(fraction * n))]
        size = tuple(first["image"].shape[-2:])
        knowledge = cls(size)
        for i in sorted(chosen.tolist()):
            sample = data[i]
            for key, store in ((look, knowledge.look), (forbid, knowledge.forbid)):
                if key is None:
                    continue
                region = sample[key]
                is_mask = isinstance(region, Tensor) and region.dim() == 2
                if is_mask and not bool(region.any()):
                    continue  # this image has none of that kind
                store._compact[i] = _compact(region, knowledge.size, f"knowledge {key} of sample {i}")
        return knowledge

    @classmethod
    def load(cls, path: str | Path, size: tuple[int, int], names: Sequence[str] | None = None) -> Knowledge:
        """Read ``{"look": {KEY: [[x0, y0, x1, y1], ...]}, "forbid": {...}}``. Keys are image indices, or, when
        ``names`` lists the data's image names (file paths relative to a folder root), those names. Boxes are
        in the pixels of the images as the data yields them (``size``)."""
        path = Path(path)
        try:
            spec = read_json(path, "the knowledge file")
        except FileNotFoundError as err:
            raise ValueError(f"cannot read the knowledge file {path}: it does not exist") from err
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
                elif key.isascii() and key.isdigit():
                    i = int(key)
                else:
                    raise ValueError(f"knowledge file {path}: {key!r} is not an image of the data")
                if not isinstance(boxes, list):
                    raise ValueError(f"knowledge file {path}: {kind}[{key!r}] must be a list of boxes, got {boxes!r}")
                parsed[kind][i] = boxes
        knowledge = cls(size, parsed.get("look"), parsed.get("forbid"))
        if names is not None:
            knowledge.check(len(names))
        return knowledge


class WithKnowledge(Dataset):
    """``data``'s samples (dicts or ``(image, label)``) plus ``look``/``forbid`` bool masks ``[H,W]`` (made
    per sample from the kept boxes) and ``has_look``/``has_forbid`` flags; knowledge indices outside the
    data are an error. ``num_classes``: each sample's label is checked to be a class index below it (and,
    when built, every label the data expose and sample 0's image: :func:`~xcnn.training.trainer.check_labels`).
    ``size``: the images' (H, W) for a caller that has run that check itself (sample 0 is then not read)."""

    def __init__(
        self,
        data: Dataset,
        knowledge: Knowledge | None,
        num_classes: int | None = None,
        *,
        size: tuple[int, int] | None = None,
    ) -> None:
        n = check_dataset(data, "data")
        if knowledge is not None and not isinstance(knowledge, Knowledge):
            raise TypeError(f"knowledge must be a Knowledge or None, got {type(knowledge).__name__}")
        self.data, self.num_classes = data, num_classes
        if size is None:
            image, _ = check_labels(data, num_classes)
            size = tuple(image.shape[-2:])
        size = _check_size(size)
        self.knowledge = knowledge or Knowledge(size)
        self.knowledge.check(n)
        if self.knowledge.size != size:
            raise ValueError(f"knowledge is for {self.knowledge.size} images, the data yields {size}")
        self._empty = torch.zeros(size, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image, label = check_sample(self.data[index], f"training sample {index}", num_classes=self.num_classes)
        k = self.knowledge
        has_look, has_forbid = index in k.look, index in k.forbid
        return {
            "image": image, "label": label,
            "look": k.look[index] if has_look else self._empty, "forbid": k.forbid[index] if has_forbid else self._empty,
            "has_look": torch.tensor(has_look), "has_forbid": torch.tensor(has_forbid),
        }  # fmt: skip


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
