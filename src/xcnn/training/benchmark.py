"""The reference recipe: train :class:`~xcnn.nets.ShapesNet` (or a small ViT) on the shapes benchmark.

``fit_benchmark(out_dir)`` trains with the shared loop (AdamW + one-cycle schedule), measures the clean
test accuracy (and, with a planted shortcut, the accuracy on test images whose patch colour is random),
and saves the model with :func:`xcnn.models.save_model` so that every ``--model`` option accepts the
folder.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .._io import atomic_write, prepare_out_dir
from .._validate import check_number, check_positive
from ..data.synthetic import CLASSES, Shapes
from ..models import TRAINED_BY_XCNN, Classifier, _build_arch, save_model
from ..nets import ShapesNet
from .trainer import Callback, accuracy_eval, check_loop_settings, fit, one_cycle

__all__ = ["ARCHITECTURES", "InMemory", "fit_benchmark"]

#: ``arch`` choices of :func:`fit_benchmark`: ``"vit"`` is a timm ViT, ``vit_tiny_patch16_224`` made smaller
#: for 64x64 shapes (8x8 patches -> an 8x8 token grid, 4 blocks of width 96, 3 heads), with a convolutional
#: stem; ``"vit_patch"`` is the same ViT with the plain patchify stem (see :func:`xcnn.nets.shapes_vit`)
ARCHITECTURES = ("shapesnet", "vit", "vit_patch")
VIT = {"patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}


class InMemory(Dataset):
    """Every sample of ``source`` generated once and kept as stacked tensors (fast epochs)."""

    def __init__(self, source: Dataset, batch_size: int = 256) -> None:
        parts: dict[str, list[Tensor]] = {}
        for batch in DataLoader(source, batch_size=batch_size, shuffle=False):
            for key, value in batch.items():
                parts.setdefault(key, []).append(value)
        self.tensors = {key: torch.cat(values) for key, values in parts.items()}
        self.n = len(source)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}


def fit_benchmark(
    out_dir: str | Path,
    *,
    size: int = 64,
    n_train: int = 6000,
    n_val: int = 1000,
    n_test: int = 1000,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 2e-3,
    widths: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (2, 1, 2, 2, 1),
    shortcut_prob: float = 0.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    resume: bool = False,
    progress: bool | None = None,
    callbacks: Sequence[Callback | Callable[[int, dict], None]] = (),
    arch: str = "shapesnet",
    monitor_every: int | None = None,
    monitor_images: int = 512,
) -> tuple[Classifier, dict]:
    """Train the benchmark model; return it and a results dict (also written to ``out_dir/results.json``).

    ``arch``: ``"shapesnet"`` (the CNN; ``widths``/``strides`` shape it), ``"vit"`` or ``"vit_patch"`` (see
    :data:`ARCHITECTURES`, :data:`VIT`; ``widths``/``strides`` do not apply; ``size`` must be a multiple of the
    patch size, 8). ``monitor_every``: watch the layers every that many epochs on the first
    ``monitor_images`` validation images (:class:`xcnn.inspection.Monitor`: ``out_dir/monitor.json``).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    check_loop_settings(epochs=epochs, batch_size=batch_size, seed=seed)
    # the images are drawn by NumPy, whose seeds are non-negative (a negative one failed inside NumPy)
    check_number("seed", seed, integer=True, low=0)
    for name, value in (("size", size), ("n_train", n_train), ("n_val", n_val), ("n_test", n_test),
                        ("monitor_images", monitor_images)):  # fmt: skip
        check_positive(name, value)
    if monitor_every is not None:
        check_positive("monitor_every", monitor_every)
    check_number("lr", lr, low=0, low_open=True)
    check_number("shortcut_prob", shortcut_prob, low=0, high=1)
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}")
    if n_train < batch_size:
        raise ValueError(f"n_train={n_train} training images are fewer than one batch ({batch_size})")
    if arch.startswith("vit") and size % VIT["patch_size"]:
        raise ValueError(
            f"the benchmark ViT cuts {VIT['patch_size']}x{VIT['patch_size']} patches: size must be a multiple of {VIT['patch_size']}, got {size}"
        )
    data = {"size": size, "seed": seed, "shortcut_prob": shortcut_prob}
    sources = Shapes("train", n_train, **data), Shapes("val", n_val, **data)  # they check their own settings
    torch.manual_seed(seed)
    if arch.startswith("vit"):
        kwargs = {
            "num_classes": len(CLASSES),
            "img_size": size,
            **VIT,
            "stem": "patch" if arch == "vit_patch" else "conv",
        }
        backbone, mean, std, _ = _build_arch("shapes_vit", kwargs)
        model = Classifier(
            backbone,
            mean,
            std,
            name=arch,
            input_size=(size, size),
            class_names=CLASSES,
            spec={"arch": "shapes_vit", "kwargs": kwargs},
        )
    else:
        net = ShapesNet(len(CLASSES), widths=widths, strides=strides)
        kwargs = {"num_classes": len(CLASSES), "widths": list(net.widths), "strides": list(net.strides)}
        model = Classifier(
            net,
            name="shapesnet",
            input_size=(size, size),
            class_names=CLASSES,
            spec={"arch": "shapesnet", "kwargs": kwargs},
        )
    # the model (which checks widths and strides) before the images are drawn and anything is written
    out = prepare_out_dir(out_dir)
    train, val = InMemory(sources[0]), InMemory(sources[1])
    if monitor_every is not None:
        from ..inspection.monitor import Monitor

        callbacks = [*callbacks, Monitor(val, every=monitor_every, images=monitor_images, progress=progress)]
    start = time.perf_counter()
    history = fit(
        model, train, epochs=epochs, val_data=val, batch_size=batch_size, out_dir=out, resume=resume, seed=seed,
        device=device, progress=progress, callbacks=callbacks,
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=1e-4),
        scheduler=one_cycle(lr),
    )  # fmt: skip
    train_seconds = time.perf_counter() - start
    model.eval()
    model.weights = TRAINED_BY_XCNN
    dev = next(model.parameters()).device
    clean = Shapes("test", n_test, size=size, seed=seed)
    results = {
        "architecture": arch,
        "data": {**data, "n_train": n_train, "n_val": n_val, "n_test": n_test},
        "epochs": epochs,
        "val_acc": history[-1].get("val/acc"),
        "test_acc": accuracy_eval(model, DataLoader(clean, batch_size=256), dev)["acc"],
        # wall time of this call's epochs (a resumed run counts only the epochs it ran) and the process's
        # peak resident memory so far, as the OS reports it
        "train_seconds": round(train_seconds, 1),
        "peak_rss_mib": round(_peak_rss_mib()),
    }
    if shortcut_prob > 0:  # the same test images, with patches in random (misleading) colours
        shortcut = Shapes("test", n_test, size=size, seed=seed, shortcut_prob=shortcut_prob, shortcut_test="random")
        results["test_acc_random_patch"] = accuracy_eval(model, DataLoader(shortcut, batch_size=256), dev)["acc"]
    save_model(model.cpu(), out, **results)
    atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n"))
    return model, results


def _peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    import resource  # Unix only: imported where it is used, so the module still imports elsewhere

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
