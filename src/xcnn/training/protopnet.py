"""Training a prototype network (ProtoPNet) on the shared loop (docs/methods.md#protopnet-prototype-networks-prototype).

``fit_protopnet(model, data)`` builds the prototype network on ``model``'s backbone (unless ``model`` is
one already) and runs the paper's stages: (1) warm-up: add-on layers and prototypes only, backbone frozen;
then ``cycles`` times (2) joint: everything but the last layer, (3) push: each prototype becomes the
nearest latent patch of a training image of its class (:func:`push_prototypes` records which image and
where), (4) last layer: cross-entropy + L1 on the wrong-class weights, everything else frozen. The loss of
(1) and (2) is ``CE + 0.8 Clst - 0.08 Sep + 1e-4 L1``.

Every stage is one :func:`~xcnn.training.trainer.fit` call with its own folder (``stages/NN-name``) and
checkpoint; the model after each finished stage and the list of finished stages are kept in the run
folder, so ``resume=True`` skips what is done and continues the stage that was cut off.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .._io import atomic_write, prepare_out_dir, remove_temporaries, write_json
from .._validate import check_number, check_positive, check_seed
from ..explain.base import check_images
from ..hooks import Tap, frozen
from ..interpretable.protopnet import (
    PrototypeLayer,
    find_prototype_layer,
    has_prototypes,
    protopnet,
    prototype_view,
)
from ..models import TRAINED_BY_XCNN, Classifier, as_classifier, save_model
from .trainer import (
    accuracy_eval,
    check_dataset,
    check_labels,
    fit,
    settings_record,
    to_device,
    torch_seed,
    training_device,
)

__all__ = ["ProtoPNetLoss", "fit_protopnet", "protopnet_costs", "push_prototypes", "stage_plan"]

SETTINGS = "protopnet_training.json"
PROGRESS = "stages.json"
STATE = "stage_state.safetensors"
PUSH = "prototypes.json"


def protopnet_costs(min_distances: Tensor, labels: Tensor, prototype_class: Tensor) -> tuple[Tensor, Tensor]:
    """``(Clst, Sep)`` from each image's minimum squared distance to each prototype ``[B, m]``: Clst is the
    mean over images of the smallest distance to a prototype of the image's class, Sep the mean of the
    smallest distance to a prototype of another class (the loss subtracts it: other classes pushed away)."""
    own = labels[:, None] == prototype_class[None, :].to(labels.device)
    inf = torch.finfo(min_distances.dtype).max
    clst = min_distances.masked_fill(~own, inf).amin(1)
    sep = min_distances.masked_fill(own, inf).amin(1)
    return clst.mean(), sep.mean()


def wrong_class_l1(last: nn.Linear, prototype_class: Tensor) -> Tensor:
    """L1 norm of the last layer's weights from prototypes to classes other than their own."""
    own = (
        prototype_class[None, :].to(last.weight.device)
        == torch.arange(last.out_features, device=last.weight.device)[:, None]
    )
    return last.weight.masked_fill(own, 0).abs().sum()


class ProtoPNetLoss(nn.Module):
    """What the trainer optimises in the warm-up and joint stages: ``forward(image, label)`` returns
    ``CE + clst * Clst - sep * Sep + l1 * L1`` and each term (and the logits)."""

    def __init__(self, model: Classifier, clst: float = 0.8, sep: float = 0.08, l1: float = 1e-4) -> None:
        super().__init__()
        self.model = model
        name, layer, last = find_prototype_layer(model)
        self.name, self._parts = name, (layer, last)  # a tuple: not registered twice as submodules
        self.weights = {"clst": clst, "sep": sep, "l1": l1}

    def forward(self, image: Tensor, label: Tensor) -> dict[str, Tensor]:
        with Tap(self.model.backbone, [f"{self.name}.distance"], differentiable=True) as tap:
            logits = self.model(image)
        layer, last = self._parts
        d = tap.get(f"{self.name}.distance").flatten(2).amin(2)  # [B, m]
        clst, sep = protopnet_costs(d, label, layer.prototype_class)
        l1 = wrong_class_l1(last, layer.prototype_class)
        ce = F.cross_entropy(logits.float(), label)
        w = self.weights
        loss = ce + w["clst"] * clst - w["sep"] * sep + w["l1"] * l1
        return {"loss": loss, "ce": ce, "clst": clst, "sep": sep, "l1": l1, "logits": logits}


class _LastLayer(nn.Module):
    """The last-layer stage: logits from fixed similarity scores, ``CE + l1 * L1``."""

    def __init__(self, last: nn.Linear, prototype_class: Tensor, l1: float) -> None:
        super().__init__()
        self.last, self.l1 = last, l1
        self.register_buffer("prototype_class", prototype_class.clone(), persistent=False)

    def forward(self, scores: Tensor, label: Tensor) -> dict[str, Tensor]:
        logits = self.last(scores)
        ce = F.cross_entropy(logits.float(), label)
        l1 = wrong_class_l1(self.last, self.prototype_class)
        return {"loss": ce + self.l1 * l1, "ce": ce, "l1": l1, "logits": logits}


def _step(net: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    out = net(batch["image"], batch["label"])
    logs = {k: float(v.detach()) for k, v in out.items() if k != "logits"}
    logs["acc"] = (out["logits"].argmax(1) == batch["label"]).float().mean().item()
    return out["loss"], logs


def _evaluate(net: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    return accuracy_eval(net.model, loader, device)


def stage_plan(warm_epochs: int, joint_epochs: int, last_epochs: int, cycles: int) -> list[tuple[str, str, int]]:
    """``[(id, kind, epochs)]``: warm-up (when ``warm_epochs`` > 0), then ``cycles`` x (joint, push, last)."""
    kinds = [("warmup", warm_epochs)] if warm_epochs > 0 else []
    for _ in range(cycles):
        kinds += [("joint", joint_epochs), ("push", 0)] + ([("last", last_epochs)] if last_epochs > 0 else [])
    return [(f"{i + 1:02d}-{kind}", kind, epochs) for i, (kind, epochs) in enumerate(kinds)]


# ---- push ----------------------------------------------------------------------------------------------


def _sample(data: Dataset, index: int) -> tuple[Tensor, int]:
    sample = data[index]
    if isinstance(sample, dict):
        return sample["image"], int(sample["label"])
    return sample[0], int(sample[1])


def _device(device: object) -> torch.device:
    """``device`` parsed (a clear error for a name torch does not know)."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, (str, int)) or isinstance(device, bool):
        raise TypeError(f"device must be a torch.device, a name such as 'cpu' or 'cuda:0', or None; got {device!r}")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device: {device!r} is not a device torch knows ({err})") from None


def _check_data(data: object, what: str, num_classes: int, batch_size: int | None = None) -> tuple[int, Tensor | None]:
    """``(len(data), every label or None)`` after checking, before any work, that ``data`` is a dataset of
    labelled samples: every label a class index in ``[0, num_classes)`` (all of them when the dataset exposes
    them, else the first sample's) and the first sample's image a float ``[3,H,W]`` tensor in [0,1] (sample 0
    read once: :func:`~xcnn.training.trainer.check_labels`)."""
    n = check_dataset(data, what, batch_size=batch_size)
    _, labels = check_labels(data, num_classes, what)
    return n, labels


def _check_pixels(images: Tensor, what: str) -> None:
    """:func:`~xcnn.explain.base.check_images` with ``what`` (which samples) in its message."""
    try:
        check_images(images)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{what}: {err}") from None


@torch.no_grad()
def push_prototypes(
    model: nn.Module,
    data: Dataset,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    percentile: float = 95.0,
    num_workers: int = 0,
) -> list[dict]:
    """Replace each prototype (in place) by the nearest latent patch ``z[:, y, x]`` of a training image of
    its class, in one pass over ``data`` in eval mode (distances reduced batch by batch; no latent map is
    kept). Returns one record per prototype: ``prototype``, ``class``, ``index`` (the image's index in
    ``data``), ``position`` ``[y, x]`` in the latent grid, ``distance`` (from the prototype before the push),
    ``grid`` ``[h, w]`` and ``box`` ``[top, left, bottom, right]`` (pixels, bottom/right exclusive): the box
    around the pixels of the source image where the pushed prototype's upsampled similarity map is at or
    above its ``percentile``-th percentile (the paper's 95). A class with no image in ``data`` is an error
    naming the prototypes that could not be pushed."""
    clf = as_classifier(model)
    _, layer, _ = find_prototype_layer(clf)
    check_positive("push: batch_size", batch_size)
    percentile = check_number("push: percentile", percentile, low=0, high=100, low_open=True, high_open=True)
    check_number("push: num_workers", num_workers, integer=True, low=0)
    dev = _device(device) if device is not None else layer.prototypes.device
    _check_data(data, "push: data", layer.num_classes)
    return _push(clf, data, batch_size, dev, percentile, num_workers)


@torch.no_grad()
def _push(
    clf: Classifier, data: Dataset, batch_size: int, dev: torch.device, percentile: float, num_workers: int
) -> list[dict]:
    """:func:`push_prototypes` on checked arguments (fit_protopnet checked its data once, before any stage)."""
    name, layer, _ = find_prototype_layer(clf)
    m = layer.num_prototypes
    pclass = layer.prototype_class.to(dev)
    best = torch.full((m,), float("inf"), device=dev, dtype=torch.float64)
    where = torch.full((m, 3), -1, device=dev, dtype=torch.long)  # image index, y, x
    patches = torch.zeros(m, layer.dim, device=dev, dtype=layer.prototypes.dtype)
    grid = None
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    offset = 0
    home = layer.prototypes.device
    with frozen(clf):
        clf.to(dev)  # moved back below: the caller's model stays where it was
        for batch in loader:
            # each batch checked on the host as it is read (a NaN image would silently never be nearest)
            _check_pixels(batch["image"] if isinstance(batch, dict) else batch[0], f"push: data (samples {offset} on)")
            batch = to_device(batch, dev)
            images, labels = batch["image"], batch["label"]
            with Tap(clf.backbone, [f"{name}.add_on"]) as tap:
                clf(images)
            z = tap.get(f"{name}.add_on")  # [B, D, h, w]
            b, _, h, w = z.shape
            grid = (h, w)
            d = layer.distance(z, layer.prototypes).double()  # [B, m, h, w]
            own = labels[:, None] == pclass[None, :]  # [B, m]
            d = d.masked_fill(~own[:, :, None, None], float("inf"))
            value, flat = d.permute(1, 0, 2, 3).reshape(m, -1).min(1)  # over images and positions
            better = value < best
            if bool(better.any()):
                j = better.nonzero()[:, 0]
                i, pos = flat[j] // (h * w), flat[j] % (h * w)
                y, x = pos // w, pos % w
                best[j] = value[j]
                where[j] = torch.stack([offset + i, y, x], 1)
                patches[j] = z[i, :, y, x].to(patches.dtype)
            offset += b
    missing = (where[:, 0] < 0).nonzero()[:, 0].tolist()
    if missing:
        clf.to(home)
        classes = sorted({int(layer.prototype_class[j]) for j in missing})
        raise ValueError(
            f"push: the data has no image of class(es) {classes}, so prototypes {missing} could not be pushed "
            "(push needs images of every class)"
        )
    layer.prototypes.data.copy_(patches.to(layer.prototypes.device))
    clf.to(home)
    records = [
        {"prototype": j, "class": int(layer.prototype_class[j]), "index": int(where[j, 0]),
         "position": [int(where[j, 1]), int(where[j, 2])], "distance": float(best[j]), "grid": list(grid)}
        for j in range(m)
    ]  # fmt: skip
    _source_boxes(clf, name, layer, data, records, home, percentile, batch_size)
    return records


def _source_boxes(
    clf: Classifier, name: str, layer: PrototypeLayer, data: Dataset, records: list[dict], dev: torch.device,
    percentile: float, batch_size: int,
) -> None:  # fmt: skip
    """Add each record's ``box``: the region of its source image where the pushed prototype is most similar."""
    sources = sorted({r["index"] for r in records})
    by_source: dict[int, list[dict]] = {}
    for r in records:
        by_source.setdefault(r["index"], []).append(r)
    with frozen(clf):
        for start in range(0, len(sources), batch_size):
            chunk = sources[start : start + batch_size]
            images = torch.stack([_sample(data, i)[0] for i in chunk]).to(dev)
            with Tap(clf.backbone, [f"{name}.distance"]) as tap:
                clf(images)
            sim = layer.similarity(tap.get(f"{name}.distance").float())  # [b, m, h, w]
            for row, index in enumerate(chunk):
                js = [r["prototype"] for r in by_source[index]]
                up = F.interpolate(sim[row, js][None], size=images.shape[-2:], mode="bilinear", align_corners=False)[0]
                for r, amap in zip(by_source[index], up, strict=True):
                    keep = amap >= torch.quantile(amap.flatten(), percentile / 100)
                    ys, xs = keep.any(1).nonzero()[:, 0], keep.any(0).nonzero()[:, 0]
                    r["box"] = [int(ys[0]), int(xs[0]), int(ys[-1]) + 1, int(xs[-1]) + 1]


def _save_sources(out: Path, data: Dataset, records: list[dict], names: Sequence[str] | None) -> None:
    """Each distinct source image as ``prototypes/source-INDEX.png`` (and its file, for a folder)."""
    from PIL import Image

    folder = prepare_out_dir(out / "prototypes")
    for index in sorted({r["index"] for r in records}):
        image = _sample(data, index)[0]
        pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        path = folder / f"source-{index:06d}.png"
        atomic_write(path, lambda tmp, p=pixels: Image.fromarray(np.ascontiguousarray(p)).save(tmp, format="PNG"))
    for r in records:
        r["image"] = f"prototypes/source-{r['index']:06d}.png"
        if names is not None:
            r["file"] = str(names[r["index"]])


# ---- the stages ------------------------------------------------------------------------------------------


def _scores(model: Classifier, data: Dataset, batch_size: int, device: torch.device) -> TensorDataset:
    """The similarity scores and labels of every image (frozen model): the last layer's training set."""
    view = prototype_view(model)
    _, _, last = find_prototype_layer(model)
    scores, labels = [], []
    with frozen(model), torch.no_grad():
        for i, batch in enumerate(DataLoader(data, batch_size=batch_size, shuffle=False)):
            batch = to_device(batch, device)
            s = view(batch["image"]).float()
            if i == 0:  # the last layer must read the scores directly (nothing in between)
                again, logits = last(s.to(last.weight.dtype)).float(), model(batch["image"]).float()
                if float((again - logits).abs().amax()) > 1e-4 * (float(logits.abs().amax()) + 1):
                    raise ValueError("protopnet: the logits are not the last layer applied to the similarity scores")
            scores.append(s.cpu())
            labels.append(batch["label"].cpu())
    return TensorDataset(torch.cat(scores), torch.cat(labels))


def _check_classes(model: Classifier, labels: Tensor | None) -> None:
    """Push needs images of every class: refuse data whose ``labels`` (None: not exposed) lack some before
    anything is trained."""
    if labels is None:
        return  # push checks it in any case
    k = model.num_classes
    missing = sorted(set(range(k)) - set(labels.unique().tolist()))
    if missing:
        shown = missing[:20] + (["..."] if len(missing) > 20 else [])
        raise ValueError(
            f"the training data has no image of {len(missing)} of the model's {k} classes ({shown}); push gives "
            "every prototype a patch of a training image of its class, so every class needs images (build the "
            "network on a model with the data's classes)"
        )


def _param_groups(model: Classifier, kind: str, lrs: dict[str, float], weight_decay: float) -> list[dict]:
    _, layer, last = find_prototype_layer(model)
    head = {id(p) for p in layer.parameters()} | {id(p) for p in last.parameters()}
    groups = [
        {"params": list(layer.add_on.parameters()), "lr": lrs["add_on"], "weight_decay": weight_decay},
        {"params": [layer.prototypes], "lr": lrs["prototypes"], "weight_decay": 0.0},
    ]
    if kind == "joint":
        features = [p for p in model.parameters() if id(p) not in head]
        groups.insert(0, {"params": features, "lr": lrs["features"], "weight_decay": weight_decay})
    return groups


def _check_fit_settings(**settings: object) -> None:
    """Clear errors for :func:`fit_protopnet`'s numbers and flags, before any work."""
    for what in ("prototypes_per_class", "dim", "joint_epochs", "cycles", "joint_lr_step", "batch_size"):
        check_positive(what, settings[what])
    for what in ("warm_epochs", "last_epochs", "num_workers"):
        check_number(what, settings[what], integer=True, low=0)
    check_seed(settings["seed"])
    for what in ("clst", "sep", "l1", "weight_decay"):
        check_number(what, settings[what], low=0)
    for what in ("features_lr", "add_on_lr", "prototypes_lr", "last_lr"):
        check_positive(what, settings[what], integer=False)
    for what in ("resume", "amp"):
        if not isinstance(settings[what], bool):
            raise TypeError(f"{what} must be True or False, got {settings[what]!r}")
    if settings["progress"] is not None and not isinstance(settings["progress"], bool):
        raise TypeError(f"progress must be True, False or None, got {settings['progress']!r}")


def fit_protopnet(
    model: nn.Module,
    data: Dataset,
    *,
    prototypes_per_class: int = 10,
    dim: int = 128,
    warm_epochs: int = 5,
    joint_epochs: int = 10,
    last_epochs: int = 20,
    cycles: int = 1,
    clst: float = 0.8,
    sep: float = 0.08,
    l1: float = 1e-4,
    features_lr: float = 1e-4,
    add_on_lr: float = 3e-3,
    prototypes_lr: float = 3e-3,
    last_lr: float = 1e-4,
    joint_lr_step: int = 5,
    weight_decay: float = 1e-3,
    batch_size: int = 64,
    val_data: Dataset | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    amp: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    num_workers: int = 0,
    names: Sequence[str] | None = None,
) -> tuple[Classifier, list[dict], list[dict]]:
    """Train a prototype network on ``data`` (labelled samples); return ``(model, history, prototypes)``:
    the trained network (eval mode), one metrics dict per epoch (with its ``stage``), and the last push's
    records (see :func:`push_prototypes`). ``model`` is a CNN (its backbone, trained weights kept, gets a
    prototype layer with ``prototypes_per_class`` x ``dim``) or a prototype network (trained further).

    Defaults are the paper's: Adam; warm-up at ``add_on_lr``/``prototypes_lr`` (3e-3); joint with the
    backbone at ``features_lr`` (1e-4), all three rates x0.1 every ``joint_lr_step`` joint epochs (counted
    across cycles); weight decay 1e-3 on the backbone and add-on layers; the last layer at ``last_lr``
    (1e-4) on similarity scores computed once per last-layer stage (nothing else moves then). Frozen parts
    stay in eval mode (batch-norm statistics kept). ``names``: the images' file names, kept in the push
    records. With ``out_dir``: ``model.safetensors`` + ``model.json``, ``prototypes.json`` and
    ``prototypes/source-*.png`` (each prototype's source image), ``results.json``, ``history.json`` and the
    stages' folders (checkpoints, TensorBoard).
    """
    clf = as_classifier(model)
    _check_fit_settings(
        prototypes_per_class=prototypes_per_class, dim=dim, warm_epochs=warm_epochs, joint_epochs=joint_epochs,
        last_epochs=last_epochs, cycles=cycles, clst=clst, sep=sep, l1=l1, features_lr=features_lr,
        add_on_lr=add_on_lr, prototypes_lr=prototypes_lr, last_lr=last_lr, joint_lr_step=joint_lr_step,
        weight_decay=weight_decay, batch_size=batch_size, resume=resume, amp=amp, seed=seed, progress=progress,
        num_workers=num_workers,
    )  # fmt: skip
    if out_dir is not None and not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a folder path or None, got {type(out_dir).__name__} {out_dir!r}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (the run folder to resume)")
    if device is not None:
        _device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("fit_protopnet runs in one process (its push and last-layer stages are not distributed)")
    if out_dir is not None and clf.spec is None:
        raise ValueError(
            "fit_protopnet: out_dir saves the model by architecture name, and this model has none (load it with "
            "xcnn.load_model by name or from a saved folder, or train without out_dir)"
        )
    classes = find_prototype_layer(clf)[1].num_classes if has_prototypes(clf.backbone) else clf.num_classes
    n, labels = _check_data(data, "data", classes, batch_size)
    if val_data is not None:
        _check_data(val_data, "val_data", classes)
    _check_classes(clf, labels)
    if names is not None:
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
            raise TypeError(
                f"names must be a sequence of file names (one per image) or None, got {type(names).__name__}"
            )
        if len(names) != n:
            raise ValueError(f"names has {len(names)} file names for the {n} images of data; give one per image")
        bad = next((x for x in names if not isinstance(x, (str, os.PathLike))), None)
        if bad is not None:
            raise TypeError(f"names must hold file names (str or paths), got {type(bad).__name__} {bad!r}")
    fresh = not has_prototypes(clf.backbone)
    clf = protopnet(clf, prototypes_per_class, dim=dim, seed=seed) if fresh else protopnet_copy(clf)
    _, layer, last = find_prototype_layer(clf)
    plan = stage_plan(warm_epochs, joint_epochs, last_epochs, cycles)
    settings = {
        "prototypes_per_class": layer.prototypes_per_class, "dim": layer.dim, "prototypes": layer.num_prototypes,
        "new_prototype_layer": fresh, "warm_epochs": warm_epochs, "joint_epochs": joint_epochs,
        "last_epochs": last_epochs, "cycles": cycles, "clst": clst, "sep": sep, "l1": l1, "features_lr": features_lr,
        "add_on_lr": add_on_lr, "prototypes_lr": prototypes_lr, "last_lr": last_lr, "joint_lr_step": joint_lr_step,
        "weight_decay": weight_decay, "batch_size": batch_size, "images": len(data), "seed": seed,
        "stages": [s for s, _, _ in plan],
    }  # fmt: skip
    main = int(os.environ.get("RANK", "0")) == 0
    # the run's progress is the stage state and the stages' checkpoints (none in the run folder itself)
    write_settings = settings_record(out_dir, SETTINGS, settings, resume, progress=(STATE, "stages/*/checkpoint.pt"))
    out = prepare_out_dir(out_dir) if out_dir is not None and main else None
    if out is not None and not resume:  # an earlier run's progress must not be picked up by a later resume
        for stale in (out / PROGRESS, out / STATE):
            stale.unlink(missing_ok=True)
        for folder in (out / "stages", out / "prototypes"):
            shutil.rmtree(folder, ignore_errors=True)
    if out is not None and resume:
        # what a run killed between writing and renaming left where no stage's fit cleans up: the run folder,
        # the prototypes' source images and the finished stages' folders (a resumed stage's fit cleans its own)
        stages = sorted(p for p in (out / "stages").glob("*") if p.is_dir())
        for folder in (out, out / "prototypes", *stages):
            remove_temporaries(folder)
    if out is not None:
        write_settings(0, {})
    dev = training_device(device)
    clf.to(dev)
    done: list[str] = []
    history: list[dict] = []
    records: list[dict] = []
    if resume and out is not None and (out / STATE).is_file():
        # the weights and the list of finished stages live in one file, written in one rename: a run cut
        # between two writes cannot resume with weights and progress that disagree
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(out / STATE), "pt") as fh:
            progress_state = json.loads(fh.metadata()["progress"])
        done, history, records = progress_state["done"], progress_state["history"], progress_state["prototypes"]
        clf.backbone.load_state_dict(load_file(str(out / STATE), device=str(dev)))
    trainable = {id(p): p.requires_grad for p in clf.parameters()}
    joint_seen = 0  # joint epochs before this stage, for the step decay
    for index, (stage, kind, epochs) in enumerate(plan):
        if stage in done:
            joint_seen += epochs if kind == "joint" else 0
            continue
        folder = out / "stages" / stage if out is not None else None
        if kind == "push":
            records = _push(clf, data, batch_size, dev, 95.0, num_workers)  # the data were checked above
            if out is not None:
                _save_sources(out, data, records, names)
            stage_history = [{"pushed": len(records)}]
        elif kind == "last":
            scores = _scores(clf, data, batch_size, dev)
            val_scores = _scores(clf, val_data, batch_size, dev) if val_data is not None else None
            net = _LastLayer(last, layer.prototype_class, l1)
            stage_history = fit(
                net, _Pairs(scores), epochs=epochs, step=_step, val_data=None if val_scores is None else _Pairs(val_scores),
                evaluate=_evaluate_last, batch_size=batch_size, out_dir=folder, resume=resume, seed=torch_seed(seed, index),
                device=dev, progress=progress,
                optimizer=lambda ps: torch.optim.Adam(ps, lr=last_lr),
            )  # fmt: skip
        else:
            lrs = {"features": features_lr, "add_on": add_on_lr, "prototypes": prototypes_lr}
            groups = _param_groups(clf, kind, lrs, weight_decay)
            keep = {id(p) for g in groups for p in g["params"]}
            for p in clf.parameters():
                p.requires_grad_(id(p) in keep)
            net = ProtoPNetLoss(clf, clst, sep, l1)
            offset = joint_seen

            def scheduler(opt, total, epochs=epochs, offset=offset, kind=kind):
                if kind != "joint":
                    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
                per_epoch = max(total // epochs, 1)
                return torch.optim.lr_scheduler.LambdaLR(
                    opt, lambda s: 0.1 ** ((offset + s // per_epoch) // joint_lr_step)
                )

            def train_mode(m: nn.Module, kind=kind) -> None:
                if kind == "joint":
                    m.train()
                else:  # warm-up: the backbone is frozen, batch norm keeps its statistics
                    m.eval()
                    layer.train()

            stage_history = fit(
                net, data, epochs=epochs, step=_step, val_data=val_data, evaluate=_evaluate, batch_size=batch_size,
                out_dir=folder, resume=resume, amp=amp, seed=torch_seed(seed, index), device=dev, progress=progress,
                num_workers=num_workers, train_mode=train_mode, scheduler=scheduler,
                optimizer=lambda ps, groups=groups: torch.optim.Adam(groups),
            )  # fmt: skip
            for p in clf.parameters():
                p.requires_grad_(trainable[id(p)])
            joint_seen += epochs if kind == "joint" else 0
        history += [{"stage": stage, **h} for h in stage_history]
        done.append(stage)
        if out is not None:
            from safetensors.torch import save_file

            state = {k: v.detach().cpu().contiguous() for k, v in clf.backbone.state_dict().items()}
            progress_state = {"done": done, "history": history, "prototypes": records}
            meta = {"progress": json.dumps(progress_state)}
            # durable: a resumed run trusts this file's list of finished stages
            atomic_write(out / STATE, lambda tmp, s=state, m=meta: save_file(s, str(tmp), metadata=m), durable=True)
            write_json(out / PROGRESS, progress_state)  # a readable copy; resume reads the state file
            ckpt = folder / "checkpoint.pt" if folder is not None else None
            if ckpt is not None and ckpt.is_file():
                ckpt.unlink()  # the stage is done: its weights are in the state file
    for p in clf.parameters():
        p.requires_grad_(trainable[id(p)])
    clf.eval()
    clf.weights = TRAINED_BY_XCNN
    if out is not None:
        summary = dict(settings)
        save_model(clf.cpu(), out, training=summary)
        clf.to(dev)
        write_json(out / PUSH, records)
        write_json(out / "history.json", history)
        final = next((h for h in reversed(history) if "val/acc" in h), history[-1])
        write_json(out / "results.json", {"training": summary, "final": final})
    return clf, history, records


class _Pairs(torch.utils.data.Dataset):
    """``(scores, label)`` pairs as the trainer's batches (``image`` holds the scores)."""

    def __init__(self, tensors: TensorDataset) -> None:
        self.scores, self.labels = tensors.tensors

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": self.scores[i], "label": self.labels[i]}


def _evaluate_last(net: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    return accuracy_eval(net.last, loader, device)


def protopnet_copy(model: Classifier) -> Classifier:
    """A deep copy of a prototype network (training never changes the caller's model)."""
    out = copy.deepcopy(model)
    out.training = model.training
    return out
