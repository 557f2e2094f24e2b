"""The one training loop every trained method reuses.

``fit(model, train_data, epochs=..., step=..., ...)`` runs epochs with a tqdm bar, optional mixed
precision on CUDA, validation, TensorBoard scalars, and an atomic checkpoint after every epoch (model,
optimiser, scheduler, AMP scaler, epoch, history and every RNG state). ``resume=True`` continues at the
next epoch and gives the same weights as an uninterrupted run. Under ``torchrun --nproc_per_node N`` the
same call trains with DistributedDataParallel (gloo on CPU, NCCL on CUDA), a DistributedSampler, and
logging/checkpointing on rank 0 only.

A method plugs in through ``step(model, batch) -> (loss, {name: float})`` (the loss to minimise and
scalars to log) and ``evaluate(model, loader, device) -> {name: float}``. Anything that watches or
reacts to training is a :class:`Callback`: it gets a :class:`TrainerContext` after every epoch (the
unwrapped model, the output folder, rank, the TensorBoard writer, the epoch's metrics) and its own state
is saved in the checkpoint and restored on resume.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .._io import atomic_write, prepare_out_dir, remove_temporaries
from .._validate import check_number, check_positive, check_seed, read_json

__all__ = [
    "CHECKPOINT",
    "Callback",
    "SettingsRecord",
    "TrainerContext",
    "TrainingDivergedError",
    "accuracy_eval",
    "check_dataset",
    "check_labels",
    "check_loop_settings",
    "check_sample",
    "classification_step",
    "fit",
    "load_checkpoint",
    "one_cycle",
    "settings_record",
    "to_device",
    "torch_seed",
]

CHECKPOINT = "checkpoint.pt"

Batch = dict[str, Tensor]
Step = Callable[[nn.Module, Batch], tuple[Tensor, dict[str, float]]]
Evaluate = Callable[[nn.Module, DataLoader, torch.device], dict[str, float]]


class TrainingDivergedError(FloatingPointError, ValueError):
    """The loss became NaN or infinite: the settings (learning rate, loss weights) make training diverge. A
    ``ValueError`` too, so that callers and the command line treat it as the settings' fault, in one line."""


@dataclass
class TrainerContext:
    """What a :class:`Callback` sees at the end of an epoch.

    ``model``: the model being trained (never the DistributedDataParallel wrapper; for a method whose
    training module wraps a classifier, that module); ``out_dir``: the run's folder (None without one);
    ``rank`` / ``world_size``: this process under torchrun (0 / 1 otherwise; only rank 0 writes files);
    ``writer``: the TensorBoard ``SummaryWriter`` (rank 0 with an ``out_dir``, else None); ``metrics``:
    this epoch's ``train/*`` and ``val/*`` values; scalars a callback adds to it are logged to TensorBoard
    and kept in ``history.json`` like the trainer's own.
    """

    model: nn.Module
    out_dir: Path | None
    rank: int
    world_size: int
    device: torch.device
    writer: object | None
    epoch: int
    epochs: int
    metrics: dict = field(default_factory=dict)


class Callback:
    """A trainer callback: override :meth:`on_epoch_end`, and :meth:`state_dict` / :meth:`load_state_dict`
    for state that must survive a resume (tensors and plain containers only: checkpoints load with
    ``weights_only=True``). ``name`` keys that state in the checkpoint (unique among a run's callbacks).

    ``on_train_begin`` runs once before the first epoch of this call (after a resume has restored the
    state; ``ctx.epoch`` is the first epoch to run, ``ctx.metrics`` empty): the place to check settings
    before any training. ``on_epoch_end`` runs on every process after validation and before the
    checkpoint. Every RNG (torch, NumPy, Python) is restored after both, so a callback cannot change the training. Plain
    functions ``callback(epoch, metrics)`` are accepted too; they run after the checkpoint is written.
    """

    name: str = "callback"

    def on_train_begin(self, ctx: TrainerContext) -> None:
        pass

    def on_epoch_end(self, ctx: TrainerContext) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def to_device(batch: object, device: torch.device) -> Batch:
    """A batch as a dict of tensors on ``device``; ``(image, label)`` tuples become ``{"image", "label"}``."""
    if isinstance(batch, (tuple, list)):
        batch = dict(zip(("image", "label"), batch, strict=False))
    if not isinstance(batch, dict):
        raise TypeError(f"a batch must be a dict or an (image, label) tuple, got {type(batch).__name__}")
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def classification_step(model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on ``batch["image"]`` / ``batch["label"]``; logs loss and batch accuracy."""
    logits = model(batch["image"])
    loss = F.cross_entropy(logits, batch["label"])
    acc = (logits.argmax(1) == batch["label"]).float().mean()
    return loss, {"loss": loss.item(), "acc": acc.item()}


@torch.no_grad()
def accuracy_eval(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy over a loader."""
    total, correct, loss = 0, 0, 0.0
    for batch in loader:
        batch = to_device(batch, device)
        logits = model(batch["image"])
        loss += F.cross_entropy(logits, batch["label"], reduction="sum").item()
        correct += int((logits.argmax(1) == batch["label"]).sum())
        total += len(batch["label"])
    return {"loss": loss / total, "acc": correct / total}


def one_cycle(max_lr: float, pct_start: float = 0.2):
    """A ``scheduler`` for :func:`fit`: one-cycle (warm-up to ``max_lr`` over ``pct_start`` of the steps,
    then cosine annealing). Runs of fewer than 10 steps warm up over 2 steps (torch's OneCycleLR divides by
    zero when ``pct_start * total_steps`` is 1); runs of fewer than 4 steps keep the optimiser's rate."""

    def build(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LRScheduler:
        if total < 4:
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        pct = max(pct_start, 2 / total)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total, pct_start=pct)

    return build


class SettingsRecord(Callback):
    """A trainer's settings kept beside its checkpoint as ``out_dir/name`` (JSON), written (rank 0) before
    the first epoch trains, so a checkpoint never exists without it. Made by :func:`settings_record`."""

    def __init__(self, record: Path | None, settings: dict) -> None:
        self.record, self.settings = record, settings
        self.name = f"settings:{record.name if record is not None else ''}"

    def write(self) -> None:
        if self.record is not None:
            text = json.dumps(self.settings, indent=2) + "\n"
            atomic_write(self.record, lambda tmp: tmp.write_text(text), durable=True)

    def on_train_begin(self, ctx: TrainerContext) -> None:
        if ctx.rank == 0:
            self.write()

    def __call__(self, epoch: int, metrics: dict) -> None:
        """The older form, ``callback(epoch, metrics)``: writes the file at epoch 0 (rank 0)."""
        if epoch == 0 and int(os.environ.get("RANK", "0")) == 0:
            self.write()


def settings_record(
    out_dir: str | Path | None, name: str, settings: dict, resume: bool, *, progress: Sequence[str] = (CHECKPOINT,)
) -> SettingsRecord:
    """A trainer's settings kept beside its checkpoint as ``out_dir/name`` (JSON). With ``resume``, a file
    written by a run with other settings is an error, raised now (before anything is trained or written), and
    so is a run's progress in ``out_dir`` without the file (its settings cannot be checked). ``progress``: the
    files (glob patterns relative to ``out_dir``) that hold a run's progress; default the trainer's checkpoint
    (a recipe that keeps its progress elsewhere, as ProtoPNet's stage state and stage checkpoints, names
    its own). Returns the :class:`Callback` for :func:`fit` that writes the file before the first epoch
    (rank 0 only)."""
    if isinstance(progress, (str, bytes)) or not all(isinstance(p, str) for p in progress):
        raise TypeError(f"progress must be a list of glob patterns (str), got {progress!r}")
    record = Path(out_dir) / name if out_dir is not None else None
    if resume and record is not None:
        if record.is_file():
            saved = read_json(record, "settings record")
            if not isinstance(saved, dict):
                raise ValueError(f"resume: {record} is not a settings record (a JSON object)")
            changed = sorted(key for key in set(saved) | set(settings) if saved.get(key) != settings.get(key))
            if changed:
                raise ValueError(f"resume: {record} was written by a run with other settings ({', '.join(changed)})")
        elif found := sorted(p for pattern in progress for p in record.parent.glob(pattern) if p.is_file()):
            raise ValueError(
                f"resume: {found[0]} has no settings record {name} beside it (in {record.parent}), so the settings "
                "it was trained with cannot be checked; restore the file or train afresh (resume=False)"
            )
    return SettingsRecord(record, settings)


# ---- argument checks shared by the recipes -------------------------------------------------------------


def check_loop_settings(
    *, epochs: object, batch_size: object, seed: object = 0, num_workers: object = 0, log_every: object = 1
) -> None:
    """Clear errors for the loop's counts: positive ``epochs``, ``batch_size``, ``log_every``; ``seed`` an
    integer torch takes (:func:`~xcnn._validate.check_seed`: [-2**63, 2**64)), ``num_workers >= 0``.
    :func:`fit` and every recipe call it before any work."""
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("log_every", log_every)):
        check_positive(name, value)
    check_seed(seed)
    check_number("num_workers", num_workers, integer=True, low=0)


def torch_seed(seed: int, offset: int = 0) -> int:
    """``seed + offset`` as torch reads a seed (modulo 2**64, negative seeds included), written as a signed
    64-bit integer: a seed derived from one near the top of torch's range (an epoch's, a stage's) stays in
    range, and every seed torch accepted gives the generator it gave."""
    return (seed + offset + 2**63) % 2**64 - 2**63


def check_dataset(data: object, name: str = "data", *, batch_size: int | None = None) -> int:
    """``len(data)`` after checking that ``data`` is a map-style dataset (``len()`` and ``data[i]``) with
    at least one sample (``batch_size`` samples when given)."""
    if isinstance(data, (Mapping, str, bytes, Tensor)) or not (
        hasattr(data, "__len__") and hasattr(data, "__getitem__")
    ):
        hint = " (wrap tensors in torch.utils.data.TensorDataset)" if isinstance(data, (Tensor, Mapping)) else ""
        raise TypeError(f"{name} must be a dataset (len() and data[i]), got {type(data).__name__}{hint}")
    n = len(data)
    if n == 0:
        raise ValueError(f"{name} is empty: training needs samples")
    if batch_size is not None and n < batch_size:
        raise ValueError(f"the training data has {n} samples, fewer than one batch ({batch_size})")
    return n


def check_sample(
    sample: object,
    name: str = "a training sample",
    *,
    need_label: bool = True,
    num_classes: int | None = None,
    values: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``(image, label)`` of one sample (a dict with ``"image"``/``"label"``, an ``(image, label)`` tuple or,
    with ``need_label=False``, a bare image), checked: the image a float ``[3,H,W]`` tensor (with ``values``,
    also finite and in [0, 1]: a pass over its pixels, for the first sample at the boundary), the label an
    integer class index (a Python int or an integer tensor of one element) in ``[0, num_classes)``, returned
    as a 0-d int64 tensor. ``need_label=False``: the label is ignored (None is returned)."""
    if isinstance(sample, Mapping):
        image, label = sample.get("image"), sample.get("label")
    elif isinstance(sample, (tuple, list)):
        image, label = (sample[0] if sample else None), (sample[1] if len(sample) > 1 else None)
    else:
        image, label = sample, None
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
        got = (
            f"{image.dtype} tensor of shape {list(image.shape)}" if isinstance(image, Tensor) else type(image).__name__
        )
        raise ValueError(f"{name}: the image must be a float [3,H,W] tensor, got {got}")
    if values and not bool(((image >= 0) & (image <= 1)).all()):  # NaN fails both comparisons
        low, high = float(image.min()), float(image.max())
        raise ValueError(
            f"{name}: image values must be in [0, 1] (xcnn normalises inside the model), got values in "
            f"[{low:.3g}, {high:.3g}]{' and NaN' if bool(image.isnan().any()) else ''}"
        )
    if not need_label:
        return image, None
    if label is None:
        raise ValueError(f"{name} has no label")
    return image, _class_index(label, name, num_classes)


def _class_index(label: object, name: str, num_classes: int | None) -> Tensor:
    if isinstance(label, Tensor):
        if label.numel() != 1 or label.dtype == torch.bool or label.is_floating_point() or label.is_complex():
            raise ValueError(
                f"{name}: a label must be an integer class index, got a {label.dtype} tensor of shape {list(label.shape)}"
            )
        label = label.reshape(()).long()
    elif isinstance(label, numbers.Integral) and not isinstance(label, bool):
        label = torch.tensor(int(label))
    else:
        raise ValueError(f"{name}: a label must be an integer class index, got {type(label).__name__} {label!r}")
    value = int(label)
    if value < 0 or (num_classes is not None and value >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise ValueError(f"{name} has the label {value}; labels are class indices {bound}")
    return label


def _relabels(data: object) -> bool:
    """Whether ``data[i]`` may give another label than the one ``data`` keeps: a ``target_transform``, or a
    joint ``transforms`` other than torchvision's wrapper of ``transform`` alone (``StandardTransform``)."""
    if getattr(data, "target_transform", None) is not None:
        return True
    joint = getattr(data, "transforms", None)
    if joint is None:
        return False
    return type(joint).__name__ != "StandardTransform" or getattr(joint, "target_transform", None) is not None


def dataset_labels(data: object) -> Tensor | None:
    """Every label of ``data`` when it exposes them without loading images (in-memory tensors, a
    ``TensorDataset``, an image folder's samples, a ``Subset`` of one); None otherwise, and for a dataset
    whose samples are relabelled as they load (a ``target_transform``): its labels are then checked sample
    by sample."""
    from torch.utils.data import Subset

    if isinstance(data, Subset):
        inner = dataset_labels(data.dataset)
        return None if inner is None else inner[torch.as_tensor(list(data.indices), dtype=torch.long)]
    if _relabels(data):
        return None
    tensors = getattr(data, "tensors", None)
    if isinstance(tensors, Mapping) and isinstance(tensors.get("label"), Tensor):
        return tensors["label"]
    if isinstance(tensors, (tuple, list)) and len(tensors) > 1 and isinstance(tensors[1], Tensor):
        return tensors[1]
    samples = getattr(data, "samples", None)
    if isinstance(samples, list) and samples and isinstance(samples[0], tuple) and len(samples[0]) > 1:
        try:
            return torch.tensor([s[1] for s in samples])
        except (TypeError, ValueError, RuntimeError):
            return None
    return None


def check_labels(
    data: Dataset, num_classes: int | None, name: str = "the training data"
) -> tuple[Tensor, Tensor | None]:
    """Clear error unless ``data``'s labels are integer class indices in ``[0, num_classes)``: all of them
    when the dataset exposes them (:func:`dataset_labels`), else its first sample's (a recipe's dataset
    wrapper checks each sample as it is loaded); the first sample's image is checked too (float [3,H,W],
    values in [0, 1]). Returns ``(sample 0's image, every label or None)`` (:func:`dataset_labels`), so
    that a caller reads neither again. ``data`` must be a non-empty dataset (:func:`check_dataset`)."""
    labels = dataset_labels(data)
    exposed = labels is not None and labels.numel() > 0
    image, _ = check_sample(data[0], f"{name}'s sample 0", num_classes=num_classes, values=True, need_label=not exposed)
    if not exposed:
        return image, None
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name}: labels must be integer class indices, got {labels.dtype} labels")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        bad = low if low < 0 else high
        raise ValueError(f"{name} has the label {bad}; labels are class indices {bound} (the model's classes)")
    return image, labels


# ---- RNG and checkpoint state (tensors and plain numbers only, so weights_only loading works) ------------


def _rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _kept_rng():
    """Every RNG the trainer checkpoints (torch CPU and CUDA, NumPy, Python) restored on exit: what a
    callback draws does not change the training that follows."""
    state = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(state)


def load_checkpoint(path: str | Path) -> dict:
    """Read a training checkpoint safely (``weights_only=True``: tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path} (only weights-only checkpoints are accepted): {err}") from err


# ---- distributed ------------------------------------------------------------------------------------


def _setup_distributed(device: torch.device | None) -> tuple[int, int, torch.device, bool]:
    """``(rank, world_size, device, we_initialised)``; starts a process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = False
    if world > 1 and not dist.is_initialized():
        backend = (
            "nccl" if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda") else "gloo"
        )
        dist.init_process_group(backend=backend)
        started = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, dist.get_world_size() if dist.is_initialized() else 1, training_device(device), started


def training_device(device: str | torch.device | None) -> torch.device:
    """The device this process trains on: ``device``, else CUDA when available; under torchrun with
    several processes an index-less ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        return torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device(f"cuda:{local}")
    return device


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---- the loop -----------------------------------------------------------------------------------------


def fit(
    model: nn.Module,
    train_data: Dataset,
    *,
    epochs: int,
    step: Step = classification_step,
    val_data: Dataset | None = None,
    evaluate: Evaluate = accuracy_eval,
    params: Iterable[nn.Parameter] | None = None,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    scheduler: Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler] | None = None,
    batch_size: int = 64,
    out_dir: str | Path | None = None,
    resume: bool = False,
    amp: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    callbacks: Sequence[Callback | Callable[[int, dict], None]] = (),
    num_workers: int = 0,
    progress: bool | None = None,
    log_every: int = 10,
    train_mode: Callable[[nn.Module], None] | None = None,
) -> list[dict]:
    """Train ``model`` for ``epochs``; return one dict of metrics per epoch (``train/*``: each logged term
    averaged over the steps that logged it; ``val/*``).

    ``params``: what to optimise (default: every parameter that requires grad). ``optimizer(params)``
    and ``scheduler(optimizer, total_steps)`` build them (defaults: AdamW 1e-3, no schedule); the
    scheduler steps once per iteration. ``train_mode(model)`` puts the model in its training mode each
    epoch (default ``model.train()``; a frozen backbone in eval mode passes its own). ``callbacks``:
    :class:`Callback` objects (each epoch before the checkpoint, their state checkpointed) or functions
    ``callback(epoch, metrics)`` (after the checkpoint). With ``out_dir``, checkpoints go to
    ``out_dir/checkpoint.pt`` and TensorBoard scalars to ``out_dir/tensorboard``.
    """
    check_loop_settings(epochs=epochs, batch_size=batch_size, seed=seed, num_workers=num_workers, log_every=log_every)
    check_dataset(train_data, "train_data", batch_size=batch_size)
    if val_data is not None:
        check_dataset(val_data, "val_data")
    for name, flag in (("resume", resume), ("amp", amp)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (where the checkpoint is)")
    seed = torch_seed(seed)  # the same generators; seed + epoch stays in torch's range
    hooks = [c for c in callbacks if isinstance(c, Callback)]
    functions = [c for c in callbacks if not isinstance(c, Callback)]
    bad = [c for c in functions if not callable(c)]
    if bad:
        raise TypeError(f"callbacks must be Callback objects or functions (epoch, metrics), got {bad!r}")
    names = [c.name for c in hooks]
    if len(set(names)) != len(names):
        raise ValueError(f"callback names must be unique (they key the checkpointed state), got {names}")
    rank, world, device, started = _setup_distributed(device)
    main = rank == 0
    out = prepare_out_dir(out_dir) if out_dir is not None and main else (Path(out_dir) if out_dir is not None else None)
    if out is not None and main:  # what a run killed between writing and renaming left, before this one writes
        remove_temporaries(out)
    torch.manual_seed(seed)
    model.to(device)
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    opt = optimizer(params) if optimizer is not None else torch.optim.AdamW(params, lr=1e-3)
    sampler = (
        DistributedSampler(train_data, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        if world > 1
        else None
    )
    loader = DataLoader(
        train_data, batch_size=batch_size // world if world > 1 else batch_size, sampler=sampler,
        shuffle=sampler is None, drop_last=True, num_workers=num_workers, generator=torch.Generator(),
    )  # fmt: skip
    steps_per_epoch = len(loader)
    sched = scheduler(opt, epochs * steps_per_epoch) if scheduler is not None else None
    use_amp = amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    net = (
        nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if world > 1
        else model
    )

    history: list[dict] = []
    start_epoch = 0
    ckpt_path = out / CHECKPOINT if out is not None else None
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        if state.get("epochs") != epochs:
            raise ValueError(
                f"checkpoint {ckpt_path} was made for {state.get('epochs')} epochs, not {epochs}; resume with the same schedule"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state.get("scheduler") is not None:
            sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        history, start_epoch = list(state["history"]), state["epoch"] + 1
        for callback in hooks:
            callback.load_state_dict(state.get("callbacks", {}).get(callback.name, {}))
    writer = _tensorboard(out) if main and out is not None else None

    try:
        if hooks:
            ctx = TrainerContext(_unwrap(net), out, rank, world, device, writer, start_epoch, epochs, {})
            with _kept_rng():
                for callback in hooks:
                    callback.on_train_begin(ctx)
        for epoch in range(start_epoch, epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            loader.generator.manual_seed(seed + epoch)  # the data order depends only on (seed, epoch)
            (train_mode or (lambda m: m.train()))(model)
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}  # a step may leave a term out (e.g. accuracy on a batch without labels)
            bar = _bar(loader, epoch, epochs, main, progress)
            for i, batch in enumerate(bar):
                batch = to_device(batch, device)
                with torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext():
                    loss, logs = step(net, batch)
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(
                        f"loss became {loss.item()} at epoch {epoch}, step {i}: the training diverged (lower the "
                        "learning rate or the loss weights)"
                    )
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                if sched is not None:
                    sched.step()
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
                global_step = epoch * steps_per_epoch + i
                if writer is not None and global_step % log_every == 0:
                    for k, v in logs.items():
                        writer.add_scalar(f"step/{k}", v, global_step)
                    writer.add_scalar("step/lr", opt.param_groups[0]["lr"], global_step)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items()})
            metrics = {"epoch": epoch, **{f"train/{k}": v / counts[k] for k, v in sums.items()}}
            if world > 1:
                dist.barrier()
            if main and val_data is not None:
                model.eval()
                val_loader = DataLoader(val_data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
                metrics.update({f"val/{k}": v for k, v in evaluate(model, val_loader, device).items()})
            if hooks:
                ctx = TrainerContext(_unwrap(net), out, rank, world, device, writer, epoch, epochs, metrics)
                with _kept_rng():
                    for callback in hooks:
                        callback.on_epoch_end(ctx)
            history.append(metrics)
            if main:
                if writer is not None:
                    for k, v in metrics.items():
                        if k != "epoch":
                            writer.add_scalar(k, v, epoch)
                    writer.flush()
                if ckpt_path is not None:
                    state = {
                        "model": _unwrap(net).state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict() if sched is not None else None,
                        "scaler": scaler.state_dict() if use_amp else None, "epoch": epoch, "epochs": epochs,
                        "history": history, "rng": _rng_state(),
                        "callbacks": {c.name: c.state_dict() for c in hooks},
                    }  # fmt: skip
                    atomic_write(ckpt_path, lambda tmp, state=state: torch.save(state, tmp), durable=True)
                    atomic_write(out / "history.json", lambda tmp: tmp.write_text(json.dumps(history, indent=2)))
            if world > 1:
                dist.barrier()
            for function in functions:
                function(epoch, metrics)
    finally:
        if writer is not None:
            writer.close()
        if started:
            dist.destroy_process_group()
    return history


def _bar(loader: DataLoader, epoch: int, epochs: int, main: bool, progress: bool | None):
    if not main or progress is False:
        return loader
    from tqdm import tqdm

    return tqdm(
        loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=None if progress is None else not progress
    )


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; a broken install should not stop training
        import warnings

        warnings.warn("tensorboard is not importable; training scalars are only written to history.json", stacklevel=3)
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))
