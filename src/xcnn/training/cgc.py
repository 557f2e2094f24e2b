"""CGC: training a classifier whose Grad-CAM is consistent under image transforms (contrastive Grad-CAM
consistency, Pillai et al. 2022), from labelled and unlabelled images, on the shared loop
(docs/methods.md#cgc-contrastive-grad-cam-consistency).

Each step draws one random resized crop + flip ``T_b`` per image (parameters kept), so the same transform
moves an image and a map. With ``g = CAM(x)`` (differentiable, target = the model's top-1 on ``x``) and
``g' = CAM(T(x))`` for the same class, both upsampled to the image size::

    loss = CE(x) + CE(T(x))  [labelled images only]  +  lam * L_CGC(g', T(g))

``L_CGC`` (:func:`cgc_loss`) is InfoNCE over the L2-normalised flattened maps: the positive of ``g'_b`` is
``T_b(g_b)``, its negatives are the other images' ``g'_j`` (gathered from every process under DDP), with
temperature ``tau``; ``consistency="l2"`` is the paper's non-contrastive ablation. Unlabelled images
contribute only ``L_CGC``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .._io import atomic_write
from .._validate import check_memory, check_number, check_seed
from ..explain.cam import CAM_COMBINE, cam_maps
from ..hooks import frozen
from ..metrics.consistency import apply_each, random_crop_flips
from ..models import TRAINED_BY_XCNN, Classifier, as_classifier, default_layer, save_model
from .trainer import (
    Callback,
    accuracy_eval,
    check_dataset,
    check_labels,
    check_loop_settings,
    check_sample,
    fit,
    one_cycle,
    settings_record,
    training_device,
)

__all__ = ["CONSISTENCY", "CGCData", "CGCTraining", "cgc_loss", "fit_cgc"]

#: the consistency terms: the paper's InfoNCE, and its L2 ablation
CONSISTENCY = ("contrastive", "l2")
#: the run's settings, beside the checkpoint: a resumed run must have the same
SETTINGS = "cgc_training.json"
#: CGC's transform: ImageNet's random resized crop (area share, aspect ratio) + a horizontal flip
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def _wide(t: Tensor) -> Tensor:
    """Half-precision tensors as float32; float32/float64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _unit(maps: Tensor) -> Tensor:
    """Flattened, L2-normalised maps ``[B,D]``, at least float32 (an all-zero map stays zero)."""
    return F.normalize(_wide(maps.flatten(1)), dim=1, eps=1e-8)


#: the largest temperature accepted: similarities lie in [-1, 1], so beyond it every logit is within 1e-6 of 0
#: and the loss is flat (log N); past float32's range (3.4e38) the division even gives NaN
MAX_TAU = 1e6


def cgc_loss(
    maps_aug: Tensor,
    maps_ref: Tensor,
    *,
    tau: float = 0.5,
    consistency: str = "contrastive",
    gather: bool | None = None,
) -> Tensor:
    """The consistency loss between ``maps_aug`` = CAM(T(x)) and ``maps_ref`` = T(CAM(x)) (``[B,H,W]`` or
    ``[B,D]``, the same shape; image ``b`` of one is the positive of image ``b`` of the other).

    ``"contrastive"``: InfoNCE. With ``z`` the flattened L2-normalised maps, image ``b``'s logits are
    ``[<z'_b, z_b>, <z'_b, z'_j> for every other image j] / tau`` and the loss is their cross-entropy
    with the positive as the class, averaged over ``b``. Its minimum for non-negative maps,
    ``log(1 + (N - 1) exp(-1/tau))``, is reached when every positive pair is identical and the negatives
    orthogonal. ``"l2"``: ``mean_b ||z'_b - z_b||^2`` (= 2 - 2 cos; no negatives).

    ``gather``: take the negatives from every process of the default process group (differentiably), so
    the loss of the same maps is the same on any number of processes (every process must pass the same
    batch size); default: when one with more than one process is initialised. Computed in float32 (or
    float64) whatever the autocast state.
    """
    if consistency not in CONSISTENCY:
        raise ValueError(f"consistency must be one of {CONSISTENCY}, got {consistency!r}")
    tau = check_number("tau", tau, low=0, low_open=True, high=MAX_TAU)
    if gather is not None and not isinstance(gather, bool):
        raise TypeError(f"gather must be True, False or None, got {gather!r}")
    for name, maps in (("maps_aug", maps_aug), ("maps_ref", maps_ref)):
        if not isinstance(maps, Tensor) or not maps.is_floating_point() or maps.dim() < 2:
            got = (
                f"a {maps.dtype} tensor of shape {list(maps.shape)}"
                if isinstance(maps, Tensor)
                else type(maps).__name__
            )
            raise ValueError(f"cgc_loss: {name} must be float maps [B,H,W] or [B,D], got {got}")
    if maps_aug.shape != maps_ref.shape:
        raise ValueError(f"cgc_loss: maps of different shapes {list(maps_aug.shape)} and {list(maps_ref.shape)}")
    for name, maps in (("maps_aug", maps_aug), ("maps_ref", maps_ref)):
        if not bool(torch.isfinite(maps).all()):  # user input: a NaN would silently make the loss NaN
            raise ValueError(f"cgc_loss: {name} holds NaN or infinite values")
    return _consistency(maps_aug, maps_ref, tau, consistency, gather)


def _consistency(maps_aug: Tensor, maps_ref: Tensor, tau: float, consistency: str, gather: bool | None) -> Tensor:
    """:func:`cgc_loss` without its argument checks (the training step's own maps: no host sync)."""
    with torch.autocast(maps_aug.device.type, enabled=False):  # similarities in float32 even under AMP
        return _cgc_loss(maps_aug, maps_ref, tau, consistency, gather)


def _cgc_loss(maps_aug: Tensor, maps_ref: Tensor, tau: float, consistency: str, gather: bool | None) -> Tensor:
    z_aug, z_ref = _unit(maps_aug), _unit(maps_ref)
    if consistency == "l2":
        return (z_aug - z_ref).pow(2).sum(1).mean()
    if gather is None:
        gather = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    offset = 0
    negatives = z_aug
    if gather:
        import warnings

        import torch.distributed.nn.functional as dist_fn

        with warnings.catch_warnings():  # deprecated for a private successor; works on gloo and NCCL (tested)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            parts = dist_fn.all_gather(z_aug)  # gradients flow back to each process's own maps
        offset = dist.get_rank() * z_aug.shape[0]
        negatives = torch.cat(parts)
    if negatives.shape[0] < 2:
        raise ValueError("the contrastive CGC loss needs at least 2 images per batch (the negatives)")
    positive = (z_aug * z_ref).sum(1, keepdim=True)
    similar = z_aug @ negatives.T
    rows = torch.arange(z_aug.shape[0], device=z_aug.device)
    own = torch.zeros_like(similar, dtype=torch.bool)
    own[rows, rows + offset] = True  # an image is not its own negative
    similar = similar.masked_fill(own, float("-inf"))
    logits = torch.cat([positive, similar], 1) / tau
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


class CGCData(Dataset):
    """Labelled samples (each ``repeat`` times), then unlabelled ones, as ``{"image", "label"}`` (label -1
    when unlabelled).

    Samples may be dicts with ``"image"``/``"label"`` or ``(image, label)`` tuples; an unlabelled dataset
    may also yield bare image tensors. Everything else a sample carries is dropped.
    """

    def __init__(
        self, labeled: Dataset | None, unlabeled: Dataset | None = None, repeat: int = 1, num_classes: int | None = None
    ) -> None:
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"labeled_repeat must be a positive integer, got {repeat!r}")
        self.labeled, self.unlabeled, self.repeat, self.num_classes = labeled, unlabeled, repeat, num_classes
        self.n_labeled = len(labeled) if labeled is not None else 0
        self.n_unlabeled = len(unlabeled) if unlabeled is not None else 0
        if self.n_labeled + self.n_unlabeled == 0:
            raise ValueError("no training images: the labelled and unlabelled data are both empty")
        # the loader shuffles an epoch with one permutation of int64 indices (len() itself fails past 2**63)
        n = self.n_labeled * repeat + self.n_unlabeled
        check_memory(8 * n, f"an epoch of {n} samples (labeled_repeat={repeat})")

    def __len__(self) -> int:
        return self.n_labeled * self.repeat + self.n_unlabeled

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if index < self.n_labeled * self.repeat:
            i = index % self.n_labeled
            image, label = check_sample(self.labeled[i], f"labelled sample {i}", num_classes=self.num_classes)
            return {"image": image, "label": label}
        i = index - self.n_labeled * self.repeat
        image, _ = check_sample(self.unlabeled[i], f"unlabelled sample {i}", need_label=False)
        return {"image": image, "label": torch.tensor(-1)}


class CGCTraining(nn.Module):
    """What the trainer optimises: the classifier, with the whole CGC loss computed inside ``forward``
    (DistributedDataParallel sees one forward and one backward, double backward included).
    ``forward(image, label)`` (label -1 = unlabelled) returns the total loss, each term and the logits of
    the untransformed view."""

    def __init__(
        self,
        model: Classifier,
        *,
        lam: float,
        tau: float,
        consistency: str,
        cam: str,
        layer: str,
        scale: tuple[float, float] = CROP_SCALE,
        ratio: tuple[float, float] = CROP_RATIO,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.lam, self.tau, self.consistency, self.cam, self.layer = lam, tau, consistency, cam, layer
        self.scale, self.ratio, self.seed = scale, ratio, check_seed(seed)
        # steps taken: with the seed and the rank it draws each step's crops, and it is checkpointed with the
        # wrapper, so a resumed run (one process or several) draws the crops the uninterrupted run drew
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        # float16 autocast only: the CAM's inner gradient is taken of score * this; lowered on overflow,
        # doubled after 200 CAMs (100 steps) without one (not checkpointed: a resumed run starts again at 2^10)
        self.inner_scale, self._good_steps = 2.0**10, 0

    def forward(self, image: Tensor, label: Tensor) -> dict[str, Tensor]:
        b, _, h, w = image.shape
        transforms = self.draw(b, (h, w))
        aug = apply_each(transforms, image).clamp(0, 1)
        labeled = label >= 0
        terms: dict[str, Tensor] = {}
        if self.lam == 0:  # the cross-entropy baseline: the same two views, no CAM
            logits, logits_aug = self.model(image), self.model(aug)
        else:
            maps, logits = self._cams(image, None)
            target = logits.detach().argmax(1)
            maps_aug, logits_aug = self._cams(aug, target)
            up = lambda m: F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]  # noqa: E731
            maps_aug, maps_ref = up(maps_aug), apply_each(transforms, up(maps))
            terms["cgc"] = _consistency(maps_aug, maps_ref, self.tau, self.consistency, None)
            with torch.no_grad():
                terms["cam_cosine"] = (_unit(maps_aug) * _unit(maps_ref)).sum(1).mean()
        if bool(labeled.any()):
            terms["ce"] = _ce(logits[labeled], label[labeled]) + _ce(logits_aug[labeled], label[labeled])
            loss = terms["ce"]
        else:  # an unlabelled-only batch: the consistency term alone (no "ce" logged for it)
            loss = logits.sum() * 0.0
        loss = loss + (self.lam * terms["cgc"] if "cgc" in terms else 0.0)
        return {"loss": loss, **terms, "logits": logits}

    def draw(self, n: int, size: tuple[int, int]) -> list:
        """This step's ``n`` transforms (from the seed, the step count and the rank), and one step on."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        draw = torch.Generator().manual_seed(((self.seed * 1_000_003 + int(self.steps)) * 4096 + rank) % 2**63)
        self.steps += 1
        return random_crop_flips(n, size, draw, self.scale, self.ratio)

    def _cams(self, images: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
        """Differentiable maps and logits. Under float16 autocast the inner gradient is scaled (and unscaled
        in float32) so it does not flush to zero; a scale that overflows is lowered and the maps redone."""
        device = images.device.type
        half = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
        while True:
            scale = self.inner_scale if half else 1.0
            maps, logits = cam_maps(
                self.model, images, target, self.layer, self.cam, create_graph=True, return_logits=True,
                grad_scale=scale,
            )  # fmt: skip
            if not half:
                return maps, logits
            if bool(torch.isfinite(maps).all()) or self.inner_scale <= 1.0:
                self._good_steps += 1
                if self._good_steps >= 200 and self.inner_scale < 2.0**16:
                    self.inner_scale, self._good_steps = self.inner_scale * 2.0, 0
                return maps, logits
            # an overflow: a lower scale and the forward again (batch norm sees this batch twice)
            self.inner_scale, self._good_steps = max(1.0, self.inner_scale / 2.0**4), 0


def _ce(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(_wide(logits), labels)


def _step(net: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    out = net(batch["image"], batch["label"])
    logs = {k: float(v.detach()) for k, v in out.items() if k not in ("logits", "loss")}
    logs = {"loss": float(out["loss"].detach()), **logs}
    labeled = batch["label"] >= 0
    if bool(labeled.any()):
        logs["acc"] = (out["logits"].argmax(1)[labeled] == batch["label"][labeled]).float().mean().item()
    return out["loss"], logs


def _evaluate(net: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    return accuracy_eval(net.model, loader, device)


def _has_batch_statistics(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def split_labeled(data: Dataset, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """A seeded random split of ``range(len(data))`` into (labelled, unlabelled) indices, sorted; the
    labelled share is ``fraction`` (at least one image)."""
    check_number("the labelled fraction", fraction, low=0, low_open=True, high=1)
    seed = check_seed(seed)
    n = len(data)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, round(fraction * n))
    return sorted(order[:k]), sorted(order[k:])


def fit_cgc(
    model: nn.Module,
    labeled: Dataset,
    *,
    epochs: int = 5,
    unlabeled: Dataset | None = None,
    labeled_fraction: float = 1.0,
    labeled_repeat: int = 1,
    lam: float = 0.5,
    tau: float = 0.5,
    consistency: str = "contrastive",
    layer: str | None = None,
    cam: str = "gradcam",
    scratch: bool = False,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
    val_data: Dataset | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    amp: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    callbacks: Sequence[Callback | Callable[[int, dict], None]] = (),
    num_workers: int = 0,
) -> tuple[Classifier, list[dict]]:
    """Train a copy of ``model`` with cross-entropy on the labelled images and ``lam`` times the CGC loss
    on every image; return the trained copy (eval mode) and the per-epoch history. The caller's model is
    untouched.

    ``labeled``: samples with labels. ``labeled_fraction`` < 1 keeps a seeded random share of them labelled
    and treats the rest as unlabelled (the few-labels setting). ``unlabeled``: more images, labels ignored.
    Each batch mixes labelled and unlabelled images in proportion; ``labeled_repeat=k`` shows every labelled
    image k times per epoch (with few labels, so that a batch carries enough of them). ``lam=0`` is the cross-entropy baseline
    on the same two views. ``cam``: the CAM inside the loss (one of :data:`~xcnn.explain.cam.CAM_COMBINE`),
    at ``layer`` (default: the model's default layer). ``scratch=True`` re-initialises every weight first.
    Optimiser: AdamW with a one-cycle schedule peaking at ``lr``. With ``amp`` on CUDA the forward passes run
    in float16 and the CAM's inner gradient is scaled so it does not underflow. With ``out_dir``:
    ``model.safetensors`` + ``model.json`` (``--model DIR`` everywhere), ``results.json``, the resumable
    ``checkpoint.pt``, ``history.json`` and TensorBoard scalars (one per loss term).
    """
    check_loop_settings(epochs=epochs, batch_size=batch_size, seed=seed, num_workers=num_workers)
    lam = check_number("lam", lam, low=0)
    tau = check_number("tau", tau, low=0, low_open=True, high=MAX_TAU)
    check_number("lr", lr, low=0, low_open=True)
    check_number("weight_decay", weight_decay, low=0)
    for name, flag in (("scratch", scratch), ("resume", resume), ("amp", amp)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if consistency not in CONSISTENCY:
        raise ValueError(f"consistency must be one of {CONSISTENCY}, got {consistency!r}")
    if cam not in CAM_COMBINE:
        raise ValueError(f"cam must be one of {sorted(CAM_COMBINE)}, got {cam!r}")
    check_dataset(labeled, "labeled")
    if unlabeled is not None:
        check_dataset(unlabeled, "unlabeled")
        # the first unlabelled image, as the labelled one below: a float [3,H,W] in [0, 1] (each later sample's
        # shape is checked as it loads)
        check_sample(unlabeled[0], "unlabeled's sample 0", need_label=False, values=True)
    if val_data is not None:
        check_dataset(val_data, "val_data")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: no parameter of the model requires grad")
    keep, rest = split_labeled(labeled, labeled_fraction, seed)
    n_extra = len(unlabeled) if unlabeled is not None else 0
    if lam == 0 and (rest or n_extra):
        raise ValueError("with lam=0 unlabelled images contribute nothing; give lam > 0 or labelled images only")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_process = batch_size // world if world > 1 else batch_size
    clf = copy.deepcopy(as_classifier(model))
    classes = clf.num_classes
    check_labels(labeled, classes, "labeled")  # every label when the data exposes them, before any work
    if val_data is not None:  # out-of-range images or labels would give a silently wrong val accuracy
        check_labels(val_data, classes, "val_data")
    if per_process < 2 and _has_batch_statistics(clf):
        raise ValueError(
            f"a batch of {per_process} image per process: the model's batch norm needs at least 2 in train mode"
        )
    if consistency == "contrastive" and lam > 0 and batch_size < 2:
        raise ValueError("the contrastive loss needs a batch of at least 2 images (the negatives)")
    if scratch:
        from .lap import reinitialise

        reinitialise(clf.backbone, seed)
    from torch.utils.data import ConcatDataset, Subset

    pool = [Subset(labeled, rest)] if rest else []
    pool += [unlabeled] if unlabeled is not None else []
    data = CGCData(
        Subset(labeled, keep) if labeled_fraction < 1 else labeled,
        (ConcatDataset(pool) if len(pool) > 1 else pool[0]) if pool else None,
        repeat=labeled_repeat,
        num_classes=classes,  # each labelled sample's label checked as it is loaded
    )
    layer = layer or default_layer(clf)
    _check_layer(clf, data, layer, cam, lam)  # before anything is written
    settings = {
        "lam": lam, "tau": tau, "consistency": consistency, "cam": cam, "layer": layer, "scratch": scratch,
        "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed,
        "labeled_fraction": labeled_fraction, "labeled_images": data.n_labeled, "unlabeled_images": data.n_unlabeled,
        "labeled_repeat": labeled_repeat,
        "crop_scale": list(CROP_SCALE), "crop_ratio": [round(r, 6) for r in CROP_RATIO],
    }  # fmt: skip
    main = int(os.environ.get("RANK", "0")) == 0
    write_settings = settings_record(out_dir, SETTINGS, settings, resume)

    net = CGCTraining(clf, lam=lam, tau=tau, consistency=consistency, cam=cam, layer=layer, seed=seed)
    dev = training_device(device)
    history = fit(  # fit checks its own arguments before it creates out_dir
        net, data, epochs=epochs, step=_step, val_data=val_data, evaluate=_evaluate, batch_size=batch_size,
        out_dir=out_dir, resume=resume, amp=amp, seed=seed, device=dev, progress=progress,
        callbacks=[write_settings, *callbacks], num_workers=num_workers,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=weight_decay),
        scheduler=one_cycle(lr),
    )  # fmt: skip
    clf.eval()
    clf.weights = TRAINED_BY_XCNN
    if out_dir is not None and main:
        out = Path(out_dir)
        save_model(clf.cpu(), out, training=settings)
        clf.to(dev)
        atomic_write(
            out / "results.json",
            lambda tmp: tmp.write_text(json.dumps({"training": settings, "final": history[-1]}, indent=2) + "\n"),
        )
    return clf, history


def _check_layer(clf: Classifier, data: CGCData, layer: str, cam: str, lam: float) -> None:
    """The CAM at ``layer`` works and, when the loss uses it, its maps depend on a trainable parameter."""
    images = torch.stack([data[i]["image"] for i in range(min(2, len(data)))])
    device = next(clf.parameters()).device
    images = images.to(device)
    if lam == 0:
        with frozen(clf):
            cam_maps(clf, images, None, layer, cam)
        return
    was_training = clf.training
    clf.eval()
    try:
        maps = cam_maps(clf, images, None, layer, cam, create_graph=True)
        params = [p for p in clf.parameters() if p.requires_grad]
        grads = torch.autograd.grad(maps.sum(), params, allow_unused=True) if params else [None]
    finally:
        clf.train(was_training)
    if all(g is None for g in grads):
        raise ValueError(
            f"the {cam} maps at layer {layer!r} depend on no trainable parameter: the CGC loss would not train "
            "anything; choose a layer with trainable layers above or below it"
        )
