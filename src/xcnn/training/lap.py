"""Fine-tuning (or training from scratch) with knowledge injection, on the shared loop
(docs/methods.md#knowledge-injection).

``fit_lap(model, data, knowledge=..., injection="lap")`` trains a LAP model (inserting a global LAP layer
first when the model has none) with cross-entropy plus the attention terms of
:func:`~xcnn.training.knowledge.attention_losses`::

    CE + beta_look * L_look + beta_forbid * L_forbid + beta_area * L_area

The same call with ``injection="rrr"`` (Right for the Right Reasons: ``CE + rrr_weight * L_RRR``),
``injection="gradcam"`` (Grad-CAM supervision: ``CE + cam_weight * (L_look + L_forbid)``) or
``injection="none"`` (cross-entropy only) gives the baselines on the same images, annotations, schedule and
budget. Each step is one forward pass whose logits serve every term; RRR and Grad-CAM supervision add a
double backward. Every term is logged per step and per epoch (TensorBoard and ``history.json``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .._io import atomic_write
from .._validate import check_number, check_positive, check_seed
from ..explain.cam import cam_maps
from ..hooks import Tap, frozen, named_layer
from ..interpretable.lap import _linear_after, insert_lap, lap_layers
from ..models import TRAINED_BY_XCNN, Classifier, as_classifier, default_layer, save_model
from .knowledge import Knowledge, WithKnowledge, attention_losses, cam_guidance_loss, rrr_loss
from .trainer import (
    Callback,
    check_dataset,
    check_labels,
    check_loop_settings,
    fit,
    one_cycle,
    settings_record,
    to_device,
    training_device,
)

__all__ = ["INJECTIONS", "KnowledgeTraining", "fit_lap", "reinitialise"]

#: how knowledge is injected: LAP's attention terms, the two baselines, or not at all
INJECTIONS = ("lap", "rrr", "gradcam", "none")
#: the run's settings, beside the checkpoint: a resumed run must have the same
SETTINGS = "lap_training.json"


class KnowledgeTraining(nn.Module):
    """What the trainer optimises: the classifier, with the whole loss computed inside ``forward`` (so
    DistributedDataParallel sees one forward and one backward, double backward included).
    ``forward(image, label, look, forbid, has_look, has_forbid)`` returns the total loss, each term and the
    logits."""

    def __init__(self, model: Classifier, injection: str, weights: dict[str, float], cam_layer: str | None) -> None:
        super().__init__()
        self.model = model
        self.injection, self.weights, self.cam_layer = injection, dict(weights), cam_layer
        self.lap_names = lap_layers(model.backbone) if injection == "lap" else []

    def forward(
        self, image: Tensor, label: Tensor, look: Tensor, forbid: Tensor, has_look: Tensor, has_forbid: Tensor
    ) -> dict[str, Tensor]:
        w = self.weights
        terms: dict[str, Tensor] = {}
        if self.injection == "lap":
            taps = [f"{name}.attention.2" for name in self.lap_names]  # the attention logits, before the sigmoid
            with Tap(self.model.backbone, taps, differentiable=True) as tap:
                logits = self.model(image)
            per_layer = []
            for name in taps:
                z = F.interpolate(tap.get(name).float(), size=image.shape[-2:], mode="bilinear", align_corners=False)
                per_layer.append(attention_losses(z, look, forbid, has_look, has_forbid))
            for key in ("look", "forbid", "area"):
                terms[key] = torch.stack([p[key] for p in per_layer]).mean()
            extra = w["beta_look"] * terms["look"] + w["beta_forbid"] * terms["forbid"] + w["beta_area"] * terms["area"]
        elif self.injection == "rrr":
            x = image.detach().float().requires_grad_(True)
            with _full_precision(image):  # the input gradient would underflow in float16
                logits = self.model(x)
            terms["rrr"] = rrr_loss(logits, x, look, forbid, has_look)
            extra = w["rrr_weight"] * terms["rrr"]
        elif self.injection == "gradcam":
            with _full_precision(image):  # the gradient at the layer would underflow in float16
                cams, logits = cam_maps(self.model, image.float(), label, self.cam_layer, create_graph=True,
                                        return_logits=True)  # fmt: skip
            terms["cam_look"], terms["cam_forbid"] = cam_guidance_loss(cams, look, forbid, has_look, has_forbid)
            extra = w["cam_weight"] * (terms["cam_look"] + terms["cam_forbid"])
        else:
            logits = self.model(image)
            extra = logits.sum() * 0.0
        ce = F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, label)
        return {"loss": ce + extra, "ce": ce, **terms, "logits": logits}


def _full_precision(image: Tensor):
    """Autocast off on CUDA: the double-backward penalties take inner gradients that float16 would flush to
    zero (mixed precision then covers the "lap" and "none" injections only)."""
    return torch.autocast("cuda", enabled=False) if image.is_cuda else contextlib.nullcontext()


def _step(net: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    out = net(batch["image"], batch["label"], batch["look"], batch["forbid"], batch["has_look"], batch["has_forbid"])
    logs = {k: float(v.detach()) for k, v in out.items() if k != "logits"}
    logs["acc"] = (out["logits"].argmax(1) == batch["label"]).float().mean().item()
    return out["loss"], logs


def _evaluate(lap_name: str | None) -> Callable[[nn.Module, DataLoader, torch.device], dict[str, float]]:
    """Validation: accuracy and loss; with a LAP layer, the share of its attention (upsampled) inside the
    object mask and inside the shortcut patch, when the validation samples carry them."""

    @torch.no_grad()
    def evaluate(net: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        model: Classifier = net.model
        sums = {"loss": 0.0, "acc": 0.0}
        counts = {"loss": 0, "acc": 0}
        for batch in loader:
            batch = to_device(batch, device)
            images = batch["image"]
            with Tap(model.backbone, [f"{lap_name}.attention"] if lap_name else []) as tap:
                logits = model(images)
            sums["loss"] += F.cross_entropy(logits.float(), batch["label"], reduction="sum").item()
            sums["acc"] += (logits.argmax(1) == batch["label"]).sum().item()
            counts["loss"] += len(images)
            counts["acc"] += len(images)
            if lap_name is None:
                continue
            a = F.interpolate(tap.get(f"{lap_name}.attention").float().mean(1, keepdim=True), size=images.shape[-2:],
                              mode="bilinear", align_corners=False)[:, 0]  # fmt: skip
            total = a.sum((1, 2)).clamp_min(1e-12)
            for key, name in (("mask", "attention_in_mask"), ("shortcut_mask", "attention_in_shortcut")):
                if key in batch:
                    has = batch[key].flatten(1).any(1)
                    share = (a * batch[key].float()).sum((1, 2)) / total
                    sums[name] = sums.get(name, 0.0) + share[has].sum().item()
                    counts[name] = counts.get(name, 0) + int(has.sum())
        return {k: sums[k] / counts[k] for k in sums if counts[k]}

    return evaluate


def reinitialise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh weights in place (every module's ``reset_parameters``, seeded), LAP layers back to constant
    attention: the same architecture, trained from scratch."""
    from ..interpretable.lap import LocalAttentionPooling

    torch.manual_seed(check_seed(seed))
    for module in model.modules():
        if hasattr(module, "reset_parameters") and module is not model:
            module.reset_parameters()
    for module in model.modules():
        if isinstance(module, LocalAttentionPooling):
            module.reset_attention()
    return model


def fit_lap(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int = 10,
    knowledge: Knowledge | None = None,
    injection: str = "lap",
    where: str | Sequence[str] | None = None,
    heads: int = 1,
    train: str = "all",
    scratch: bool = False,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
    beta_look: float = 1.0,
    beta_forbid: float = 1.0,
    beta_area: float = 0.1,
    rrr_weight: float = 10.0,
    cam_weight: float = 1.0,
    cam_layer: str | None = None,
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
    """Train a copy of ``model`` on ``data`` (labelled samples) with ``knowledge`` injected; return the
    trained copy (eval mode) and the per-epoch history. The caller's model is untouched.

    ``injection``: ``"lap"`` (a global LAP layer is inserted when the model has none, or LAP layers at
    ``where`` with ``heads``), ``"rrr"``, ``"gradcam"`` (``cam_layer``: default the model's default layer) or
    ``"none"``. ``train="attention"`` trains only the LAP attention nets and the linear classifier after a
    global LAP layer (the rest frozen, batch norm in eval mode); ``"all"`` trains everything.
    ``scratch=True`` re-initialises every weight first (same architecture, from scratch). Optimiser: AdamW
    with a one-cycle schedule peaking at ``lr``. With ``out_dir``: ``model.safetensors`` + ``model.json``
    (``--model DIR`` everywhere), ``results.json``, the resumable ``checkpoint.pt``, ``history.json`` and
    TensorBoard scalars (one per loss term).
    """
    if injection not in INJECTIONS:
        raise ValueError(f"injection must be one of {INJECTIONS}, got {injection!r}")
    if train not in ("all", "attention"):
        raise ValueError(f"train must be 'all' or 'attention', got {train!r}")
    check_loop_settings(epochs=epochs, batch_size=batch_size, seed=seed, num_workers=num_workers)
    check_positive("heads", heads)
    check_number("lr", lr, low=0, low_open=True)
    for name, value in (("weight_decay", weight_decay), ("beta_look", beta_look), ("beta_forbid", beta_forbid),
                        ("beta_area", beta_area), ("rrr_weight", rrr_weight), ("cam_weight", cam_weight)):  # fmt: skip
        check_number(name, value, low=0)
    for name, flag in (("scratch", scratch), ("resume", resume), ("amp", amp)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if knowledge is not None and not isinstance(knowledge, Knowledge):
        raise TypeError(f"knowledge must be a Knowledge or None, got {type(knowledge).__name__}")
    check_dataset(data, "data", batch_size=batch_size)
    clf = as_classifier(model)
    classes = clf.num_classes
    # sample 0 (its image in [0, 1]) and every label when the data exposes them, before any work; sample 0 is
    # read this once (WithKnowledge takes its size, the CAM layer check its image)
    first, _ = check_labels(data, classes)
    if val_data is not None:
        check_dataset(val_data, "val_data")
        check_labels(val_data, classes, "val_data")
    if where is not None and injection != "lap":
        raise ValueError(f"where= places LAP layers; injection={injection!r} does not use them")
    if cam_layer is not None and injection != "gradcam":
        raise ValueError(f"cam_layer= is the layer of Grad-CAM supervision; injection={injection!r} does not use it")
    inserting = injection == "lap" and (where is not None or not lap_layers(clf.backbone))
    if heads != 1 and not inserting:
        raise ValueError("heads= shapes new LAP layers, and none is inserted here (the model has its own, or no LAP)")
    size = (int(first.shape[-2]), int(first.shape[-1]))
    torch.manual_seed(seed)  # the new attention nets' first convolutions
    clf = insert_lap(clf, where, heads=heads) if inserting else copy.deepcopy(clf)
    if scratch:
        reinitialise(clf.backbone, seed)
    data = WithKnowledge(data, knowledge, classes, size=size)  # checks each sample's label as it is loaded
    names = lap_layers(clf.backbone)
    params = None
    train_mode = None
    trainable = {id(p): p.requires_grad for p in clf.parameters()}  # restored after training
    if train == "attention":
        if not names:
            raise ValueError("train='attention' trains LAP attention nets, and the model has no LAP layer")
        keep = [p for n in names for p in named_layer(clf.backbone, n).attention.parameters()]
        for n in names:
            layer = named_layer(clf.backbone, n)
            if layer.global_pool:
                try:
                    keep += list(_linear_after(clf.backbone, n, layer.in_channels).parameters())
                except ValueError:
                    raise ValueError(
                        f"train='attention' also trains the classifier after the global LAP layer {n!r}, and no "
                        f"nn.Linear with {layer.in_channels} inputs follows it; use train='all'"
                    ) from None
        ids = {id(p) for p in keep}
        for p in clf.parameters():
            p.requires_grad_(id(p) in ids)
        params = keep

        def train_mode(net: nn.Module) -> None:
            net.eval()  # batch norm keeps its statistics; the attention nets have none

    layer = cam_layer or (default_layer(clf) if injection == "gradcam" else None)
    if layer is not None:  # a wrong layer fails here, before anything is written
        where = next(clf.parameters()).device  # the model may already be on the GPU, the data is not
        with frozen(clf):
            cam_maps(clf, first[None].to(where), None, layer)
    weights = {"beta_look": beta_look, "beta_forbid": beta_forbid, "beta_area": beta_area,
               "rrr_weight": rrr_weight, "cam_weight": cam_weight}  # fmt: skip
    k = data.knowledge
    settings = {
        "injection": injection, "train": train, "scratch": scratch, "epochs": epochs, "lr": lr,
        "weight_decay": weight_decay, "batch_size": batch_size, **weights, "cam_layer": layer,
        "lap_layers": names, "images": len(data), "knowledge": {"look": len(k.look), "forbid": len(k.forbid)},
        "knowledge_images": k.indices, "seed": seed,
    }  # fmt: skip
    main = int(os.environ.get("RANK", "0")) == 0
    write_settings = settings_record(out_dir, SETTINGS, settings, resume)

    net = KnowledgeTraining(clf, injection, weights, layer)
    dev = training_device(device)
    history = fit(  # fit checks its own arguments before it creates out_dir
        net, data, epochs=epochs, step=_step, val_data=val_data, evaluate=_evaluate(names[-1] if names else None),
        params=params, batch_size=batch_size, out_dir=out_dir, resume=resume, amp=amp, seed=seed, device=dev,
        progress=progress, callbacks=[write_settings, *callbacks], num_workers=num_workers, train_mode=train_mode,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=weight_decay),
        scheduler=one_cycle(lr),
    )  # fmt: skip
    for p in clf.parameters():
        p.requires_grad_(trainable[id(p)])
    clf.eval()
    clf.weights = TRAINED_BY_XCNN
    if out_dir is not None and main:
        out = Path(out_dir)
        summary = {k: v for k, v in settings.items() if k != "knowledge_images"}
        save_model(clf.cpu(), out, training=summary)
        clf.to(dev)
        atomic_write(
            out / "results.json",
            lambda tmp: tmp.write_text(json.dumps({"training": summary, "final": history[-1]}, indent=2) + "\n"),
        )
    return clf, history
