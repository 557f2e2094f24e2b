"""Training a TAME head on a frozen classifier (docs/methods.md#training-xcnn-train-tame), with the shared loop.

Each step: one forward pass of the frozen model with the head's layers tapped gives the model's own
top-1 labels ``y`` and the feature maps; the head turns them into class maps; the attention of each
image's label, ``a_y = sigmoid(c_y)``, is upsampled to the image and masks it in pixel space; the frozen
model classifies the masked image. Loss (paper defaults)::

    ce_weight * CE(f(a_y * x), y) + area_weight * mean((a_y + 0.0005) ** area_power) + tv_weight * TV(a_y)

with ``TV(a) = (sum of squared neighbour differences + 0.3 * sum of squared border values) / (2 B)``.
Area and TV use each image's own-label map (the authors' code mixes every label's map of the batch into
them; see docs/methods.md#tame). Only the head trains; the backbone stays in eval mode with ``requires_grad=False``,
so its weights and BatchNorm statistics are untouched. SGD with Nesterov momentum, weight decay on
weights only, twice the learning rate for biases, one-cycle schedule stepped per iteration.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .._io import atomic_write, prepare_out_dir
from .._validate import check_number
from ..explain.tame import TAMEHead, head_features, save_tame_head, tame_head
from ..hooks import frozen
from ..models import Classifier, as_classifier
from .trainer import Callback, check_dataset, check_loop_settings, check_sample, fit, to_device, training_device

__all__ = ["TAMELoss", "TAMETraining", "fit_tame", "tv_loss"]


def tv_loss(maps: Tensor, border: float = 0.3) -> Tensor:
    """TAME's smoothness term on ``[B,h,w]`` maps: squared neighbour differences plus ``border`` times
    the squared values on the map's edge, divided by ``2 B``."""
    dx = (maps[:, :, 1:] - maps[:, :, :-1]).pow(2).sum()
    dy = (maps[:, 1:, :] - maps[:, :-1, :]).pow(2).sum()
    edge = (
        maps[:, 0, :].pow(2).sum()
        + maps[:, -1, :].pow(2).sum()
        + maps[:, :, 0].pow(2).sum()
        + maps[:, :, -1].pow(2).sum()
    )
    return (dx + dy + border * edge) / (2 * maps.shape[0])


class TAMELoss:
    """The weighted TAME loss; ``__call__`` returns the total and each term (as floats, for logging)."""

    def __init__(
        self, ce_weight: float = 1.5, area_weight: float = 2.0, area_power: float = 0.3, tv_weight: float = 0.01
    ) -> None:
        self.ce_weight, self.area_weight, self.area_power, self.tv_weight = (
            ce_weight,
            area_weight,
            area_power,
            tv_weight,
        )

    def __call__(self, masked_logits: Tensor, attention: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        ce = F.cross_entropy(masked_logits.float(), labels)
        area = (attention.float() + 0.0005).pow(self.area_power).mean()
        tv = tv_loss(attention.float())
        total = self.ce_weight * ce + self.area_weight * area + self.tv_weight * tv
        return total, {"loss": total.item(), "ce": ce.item(), "area": area.item(), "tv": tv.item()}


class TAMETraining(nn.Module):
    """What the trainer optimises: the head, driven by a frozen classifier.

    The classifier is held outside the module's registered children on purpose: checkpoints then hold
    the head only, ``.train()`` never reaches the backbone, and DDP sees only the head's parameters.
    ``forward(images)`` returns the model's labels, the attention of each image's label and the model's
    logits on the masked images.
    """

    def __init__(self, model: Classifier, head: TAMEHead) -> None:
        super().__init__()
        self.__dict__["classifier"] = model  # not a submodule (see the class docstring)
        self.head = head

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        clf: Classifier = self.__dict__["classifier"]
        with torch.no_grad():
            logits, feats = head_features(clf, self.head, images)
        labels = logits.argmax(1)
        attention = torch.sigmoid(self.head.class_maps(feats, labels))  # only the labels' maps are needed
        mask = F.interpolate(attention[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)
        return {"labels": labels, "attention": attention, "masked_logits": clf(images * mask)}


class _Augmented(Dataset):
    """Random crop (from an image ``scale`` times larger) and horizontal flip, as the paper trains."""

    def __init__(self, source: Dataset, size: tuple[int, int], flip: bool = True) -> None:
        self.source, self.size, self.flip = source, size, flip

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = self.source[index]
        image = sample["image"] if isinstance(sample, dict) else sample[0]
        h, w = image.shape[-2:]
        th, tw = self.size
        if (h, w) != (th, tw):
            top, left = int(torch.randint(0, h - th + 1, ())), int(torch.randint(0, w - tw + 1, ()))
            image = image[:, top : top + th, left : left + tw]
        if self.flip and bool(torch.rand(()) < 0.5):
            image = image.flip(-1)
        return {"image": image}


def folder_data(root: str | Path, size: tuple[int, int], augment: bool = True) -> Dataset:
    """An image folder for TAME training: loaded at ``size * 256/224`` and randomly cropped to ``size``
    with horizontal flips (``augment=False``: loaded at ``size``). Labels are not needed."""
    from ..data.images import ImageFolder

    if not augment:
        return _Augmented(ImageFolder(root, size), size, flip=False)
    big = (round(size[0] * 256 / 224), round(size[1] * 256 / 224))
    return _Augmented(ImageFolder(root, big), size)


def _evaluate(loss: TAMELoss) -> Callable[[nn.Module, DataLoader, torch.device], dict[str, float]]:
    @torch.no_grad()
    def evaluate(net: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        sums: dict[str, float] = {}
        n = 0
        for batch in loader:
            batch = to_device(batch, device)
            out = net(batch["image"])
            _, logs = loss(out["masked_logits"], out["attention"], out["labels"])
            logs["masked_acc"] = (out["masked_logits"].argmax(1) == out["labels"]).float().mean().item()
            logs["mean_attention"] = out["attention"].mean().item()
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v * len(batch["image"])
            n += len(batch["image"])
        return {k: v / n for k, v in sums.items()}

    return evaluate


def fit_tame(
    model: nn.Module,
    data: Dataset,
    *,
    layers: Sequence[str] | None = None,
    epochs: int = 8,
    batch_size: int = 32,
    lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    ce_weight: float = 1.5,
    area_weight: float = 2.0,
    area_power: float = 0.3,
    tv_weight: float = 0.01,
    skip: bool = True,
    val_data: Dataset | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    amp: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    callbacks: Sequence[Callback | Callable[[int, dict], None]] = (),
    num_workers: int = 0,
) -> tuple[TAMEHead, list[dict]]:
    """Train a TAME head for the frozen ``model`` on ``data`` (images; labels are not used: the model's
    own predictions are the targets). Returns the head (eval mode) and the per-epoch history.

    Defaults are the paper's VGG-16 setting (max lr 1e-3, 8 epochs, batch 32); its ResNet-50 setting is
    ``lr=1e-4, epochs=4``. With ``out_dir`` the head is saved there (``tame.safetensors`` + ``tame.json``)
    next to the resumable ``checkpoint.pt``, ``history.json`` and TensorBoard scalars (one per loss term).
    """
    check_loop_settings(epochs=epochs, batch_size=batch_size, seed=seed, num_workers=num_workers)
    check_number("lr", lr, low=0, low_open=True)
    check_number("momentum", momentum, low=0, high=1, high_open=True)
    check_number("area_power", area_power, low=0, low_open=True)
    for name, value in (("weight_decay", weight_decay), ("ce_weight", ce_weight), ("area_weight", area_weight),
                        ("tv_weight", tv_weight)):  # fmt: skip
        check_number(name, value, low=0)
    for name, flag in (("skip", skip), ("resume", resume), ("amp", amp)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    n = check_dataset(data, "data")
    if n < batch_size:
        raise ValueError(
            f"the training data has {n} images, fewer than one batch ({batch_size}); add images or lower the batch size"
        )
    check_sample(data[0], "the training data's sample 0", need_label=False, values=True)  # labels are not used
    if val_data is not None:  # its first image as the training data's: a normalised one would skew val/*
        check_dataset(val_data, "val_data")
        check_sample(val_data[0], "val_data's sample 0", need_label=False, values=True)
    clf = as_classifier(model)
    out = prepare_out_dir(out_dir) if out_dir is not None else None
    # the backbone must sit where the trainer will put the head (cuda:LOCAL_RANK under torchrun)
    dev = training_device(
        device if device is not None else (None if torch.cuda.is_available() else next(clf.parameters()).device)
    )
    clf.to(dev)
    head = tame_head(clf, layers, skip=skip, seed=seed)
    net = TAMETraining(clf, head)
    loss = TAMELoss(ce_weight, area_weight, area_power, tv_weight)

    def step(module: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        result = module(batch["image"])
        return loss(result["masked_logits"], result["attention"], result["labels"])

    def optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        names = {id(p): n for n, p in head.named_parameters()}
        biases = [p for p in params if names[id(p)].endswith("bias")]
        weights = [p for p in params if not names[id(p)].endswith("bias")]
        return torch.optim.SGD(
            [{"params": weights, "lr": lr, "weight_decay": weight_decay}, {"params": biases, "lr": 2 * lr, "weight_decay": 0.0}],
            lr=lr, momentum=momentum, nesterov=True,
        )  # fmt: skip

    def scheduler(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, 2 * lr], total_steps=total)

    with frozen(clf):
        history = fit(
            net, data, epochs=epochs, step=step, val_data=val_data, evaluate=_evaluate(loss), optimizer=optimizer,
            scheduler=scheduler, batch_size=batch_size, out_dir=out, resume=resume, amp=amp, seed=seed, device=dev,
            callbacks=callbacks, num_workers=num_workers, progress=progress,
        )  # fmt: skip
    head.eval()
    if out is not None and _is_main():
        settings = {
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
            "ce_weight": ce_weight, "area_weight": area_weight, "area_power": area_power, "tv_weight": tv_weight,
            "images": len(data), "seed": seed,
        }  # fmt: skip
        save_tame_head(head, out, training=settings)
        atomic_write(
            out / "results.json",
            lambda tmp: tmp.write_text(json.dumps({"training": settings, "final": history[-1]}, indent=2) + "\n"),
        )
    return head, history


def _is_main() -> bool:
    """Rank 0 (or no torchrun): the trainer has already closed its process group when this is asked."""
    return int(os.environ.get("RANK", "0")) == 0
