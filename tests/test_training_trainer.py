"""The shared training loop: learning, checkpoints, identical resume, bad input, DDP."""

from __future__ import annotations

import math
import random
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from xcnn.training import fit, load_checkpoint
from xcnn.training.trainer import Callback, TrainerContext


class Blobs(Dataset):
    """Class = the colour of a bright blob (red, green, blue, white); learnable in a few steps."""

    def __init__(self, n: int = 256, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        self.images = torch.rand(n, 3, 16, 16, generator=g) * 0.3
        colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 1.0]]) * 0.6
        for i, y in enumerate(self.labels.tolist()):
            r, c = torch.randint(0, 10, (2,), generator=g).tolist()
            self.images[i, :, r : r + 6, c : c + 6] += colours[y].view(3, 1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


def small_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


SCHEDULE = {
    "optimizer": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "scheduler": lambda opt, total: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=total),
    "batch_size": 32,
    "progress": False,
}


def test_a_diverging_loss_is_a_clear_settings_error_at_its_step(tmp_path):
    from xcnn.training.trainer import TrainingDivergedError

    def step(model, batch):
        weight = 1e39 if len(calls) >= 2 else 1.0  # overflows float32 from the third step on
        calls.append(1)
        return nn.functional.cross_entropy(model(batch["image"]), batch["label"]) * weight, {}

    calls: list[int] = []
    with pytest.raises(TrainingDivergedError, match="loss became inf at epoch 0, step 2: the training diverged"):
        fit(small_net(), Blobs(), epochs=1, step=step, out_dir=tmp_path, **SCHEDULE)
    assert issubclass(TrainingDivergedError, ValueError) and issubclass(TrainingDivergedError, FloatingPointError)
    assert not (tmp_path / "checkpoint.pt").exists()  # nothing of the diverged epoch is kept


def test_loss_falls_and_history_is_recorded(tmp_path):
    history = fit(small_net(), Blobs(), epochs=6, val_data=Blobs(64, seed=1), out_dir=tmp_path, **SCHEDULE)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4, 5]
    assert history[-1]["train/loss"] < 0.7 * history[0]["train/loss"]
    assert history[-1]["val/acc"] > 0.8, history
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "history.json").is_file()
    assert any((tmp_path / "tensorboard").iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind
    state = load_checkpoint(tmp_path / "checkpoint.pt")  # weights_only load
    assert {"model", "optimizer", "scheduler", "epoch", "epochs", "history", "rng"} <= set(state)
    assert state["epoch"] == 5


class Crash(Exception):
    pass


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    straight = small_net()
    fit(straight, Blobs(), epochs=3, out_dir=tmp_path / "a", seed=5, **SCHEDULE)

    def crash_after_first_epoch(epoch, metrics):
        if epoch == 0:
            raise Crash

    interrupted = small_net()
    with pytest.raises(Crash):
        fit(
            interrupted,
            Blobs(),
            epochs=3,
            out_dir=tmp_path / "b",
            seed=5,
            callbacks=[crash_after_first_epoch],
            **SCHEDULE,
        )
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 0
    torch.manual_seed(123)  # a different global RNG state: the checkpoint must restore it
    resumed = small_net()
    history = fit(resumed, Blobs(), epochs=3, out_dir=tmp_path / "b", seed=5, resume=True, **SCHEDULE)
    assert [h["epoch"] for h in history] == [0, 1, 2]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_resume_refuses_a_different_schedule(tmp_path):
    fit(small_net(), Blobs(), epochs=1, out_dir=tmp_path, **SCHEDULE)
    with pytest.raises(ValueError, match="made for 1 epochs, not 2"):
        fit(small_net(), Blobs(), epochs=2, out_dir=tmp_path, resume=True, **SCHEDULE)


def test_bad_training_input(tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch"):
        fit(small_net(), Blobs(16), epochs=1, batch_size=32)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        fit(small_net(), Blobs(), epochs=0)
    with pytest.raises(ValueError, match="resume=True needs out_dir"):
        fit(small_net(), Blobs(), epochs=1, resume=True)
    frozen = small_net().requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        fit(frozen, Blobs(), epochs=1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        fit(small_net(), Blobs(), epochs=1, out_dir=tmp_path / "file")


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        fit(small_net(), Blobs(), epochs=1, out_dir=tmp_path, resume=True, **SCHEDULE)


DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    from test_training_trainer import Blobs, small_net, SCHEDULE
    from xcnn.training import fit
    net = small_net()
    history = fit(net, Blobs(), epochs=2, out_dir={out!r}, **SCHEDULE)
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])
    torch.save(flat, os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
    """
)


@pytest.mark.slow
def test_runs_unchanged_under_torchrun_with_two_gloo_processes(tmp_path):
    from .conftest import torchrun  # here, not at the top: the script imports this file as a plain module

    torchrun(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)), tmp_path)
    # each rank's own file (the ranks' printed lines would interleave)
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(w0, w1)  # DDP keeps the replicas identical
    state = load_checkpoint(tmp_path / "checkpoint.pt")  # written once, by rank 0
    assert state["epoch"] == 1 and len(state["history"]) == 2


def test_one_cycle_runs_for_any_number_of_steps():
    """torch's OneCycleLR divides by zero when pct_start * total_steps is 1 (5 steps at 0.2): the
    trainers' schedule runs for every length, warming up and annealing when it has room to."""
    from xcnn.training.trainer import one_cycle

    for total in range(1, 13):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = one_cycle(0.1)(opt, total)
        rates = []
        for _ in range(total):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        if total < 4:  # too short to warm up and anneal: the optimiser's rate
            assert rates == [pytest.approx(0.1)] * total
        else:  # the peak falls between steps when the warm-up does not end on one
            assert 0.09 < max(rates) <= 0.1 + 1e-12 and rates[0] < 0.01 and rates[-1] < 0.05, (total, rates)


class Tally(Callback):
    """Counts epochs and the training images' mean in checkpointed state; draws random numbers (which the
    trainer must keep away from training) and adds a scalar to the metrics."""

    name = "tally"

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.contexts: list[tuple] = []

    def on_train_begin(self, ctx: TrainerContext) -> None:
        torch.rand(1000)  # would shift dropout if it leaked into training

    def on_epoch_end(self, ctx: TrainerContext) -> None:
        torch.rand(1000)  # would shift dropout if it leaked into training
        self.seen.append(ctx.epoch)
        self.contexts.append((type(ctx.model).__name__, ctx.out_dir, ctx.rank, ctx.world_size, ctx.epochs))
        ctx.metrics["tally/epochs"] = float(len(self.seen))

    def state_dict(self) -> dict:
        return {"seen": torch.tensor(self.seen)}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"].tolist()


def test_callback_objects_get_the_context_keep_state_across_resume_and_do_not_change_training(tmp_path):
    plain = small_net()
    fit(plain, Blobs(), epochs=3, out_dir=tmp_path / "plain", seed=5, **SCHEDULE)
    watched, tally = small_net(), Tally()
    history = fit(watched, Blobs(), epochs=3, out_dir=tmp_path / "a", seed=5, callbacks=[tally], **SCHEDULE)
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the callback's random draws did not reach training
    assert tally.seen == [0, 1, 2] and [h["tally/epochs"] for h in history] == [1.0, 2.0, 3.0]
    assert tally.contexts[0] == ("Sequential", tmp_path / "a", 0, 1, 3)

    def crash(epoch, metrics):  # a plain function runs after the checkpoint
        if epoch == 0:
            raise Crash

    with pytest.raises(Crash):
        fit(small_net(), Blobs(), epochs=3, out_dir=tmp_path / "b", seed=5, callbacks=[Tally(), crash], **SCHEDULE)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["callbacks"]["tally"]["seen"].tolist() == [0]
    resumed = Tally()
    fit(small_net(), Blobs(), epochs=3, out_dir=tmp_path / "b", seed=5, resume=True, callbacks=[resumed], **SCHEDULE)
    assert resumed.seen == [0, 1, 2]
    with pytest.raises(ValueError, match="callback names must be unique"):
        fit(small_net(), Blobs(), epochs=1, callbacks=[Tally(), Tally()], **SCHEDULE)
    with pytest.raises(TypeError, match="Callback objects or functions"):
        fit(small_net(), Blobs(), epochs=1, callbacks=[3], **SCHEDULE)


class Noisy(Callback):
    """Draws from NumPy's and Python's global generators (as a monitor sampling images might)."""

    name = "noisy"

    def on_train_begin(self, ctx: TrainerContext) -> None:
        np.random.rand(7)
        random.random()

    def on_epoch_end(self, ctx: TrainerContext) -> None:
        np.random.rand(7)
        random.random()


def noisy_step(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Cross-entropy with a loss weight drawn from NumPy and Python: the training depends on both generators."""
    loss = nn.functional.cross_entropy(model(batch["image"]), batch["label"])
    weight = 1.0 + float(np.random.rand()) + random.random()
    return weight * loss, {"loss": loss.item()}


def test_callbacks_drawing_from_numpy_and_python_do_not_change_training_and_resume_restores_them(tmp_path):
    options = {**SCHEDULE, "optimizer": lambda p: torch.optim.SGD(p, lr=0.05), "step": noisy_step, "seed": 3}
    np.random.seed(0)
    random.seed(0)
    plain = small_net()
    fit(plain, Blobs(), epochs=3, **options)
    np.random.seed(0)
    random.seed(0)
    watched = small_net()
    fit(watched, Blobs(), epochs=3, callbacks=[Noisy()], **options)
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # cut after the first epoch, then resumed from other NumPy/Python states: the checkpoint restores them
    np.random.seed(0)
    random.seed(0)
    with pytest.raises(Crash):
        fit(small_net(), Blobs(), epochs=3, out_dir=tmp_path, callbacks=[_crash_at_0], **options)
    np.random.seed(99)
    random.seed(99)
    resumed = small_net()
    fit(resumed, Blobs(), epochs=3, out_dir=tmp_path, resume=True, **options)
    for (name, a), b in zip(plain.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def _crash_at_0(epoch: int, metrics: dict) -> None:
    if epoch == 0:
        raise Crash


class EmptyData(Dataset):
    def __len__(self):
        return 0

    def __getitem__(self, i):
        raise IndexError(i)


def test_settings_and_data_are_checked_before_anything_is_written(tmp_path):
    out = tmp_path / "never"
    cases = [
        ({"epochs": 2.5}, ValueError, "epochs must be a positive integer"),
        ({"batch_size": "32"}, ValueError, "batch_size must be a positive integer"),
        ({"seed": "a"}, TypeError, "seed must be an integer"),
        ({"seed": 1.5}, TypeError, "seed must be an integer"),
        # torch's range: 2**64 used to end in torch's own "Overflow when unpacking long long"
        ({"seed": 2**64}, ValueError, r"seed must be an integer in \[-2\*\*63, 2\*\*64\), got 18446744073709551616"),
        ({"seed": -(2**63) - 1}, ValueError, r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
        ({"num_workers": -1}, ValueError, "num_workers must be in"),
        ({"log_every": 0}, ValueError, "log_every must be a positive integer"),
        ({"resume": "yes"}, TypeError, "resume must be True or False"),
        ({"amp": 1}, TypeError, "amp must be True or False"),
        ({"val_data": EmptyData()}, ValueError, "val_data is empty"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            fit(small_net(), Blobs(), out_dir=out, **{"epochs": 1, **SCHEDULE, **options})
    with pytest.raises(ValueError, match="train_data is empty"):
        fit(small_net(), EmptyData(), epochs=1, out_dir=out)
    for data in ({"image": torch.rand(64, 3, 16, 16)}, torch.rand(64, 3, 16, 16), "images/"):
        with pytest.raises(TypeError, match="train_data must be a dataset"):
            fit(small_net(), data, epochs=1, out_dir=out)
    assert not out.exists()


def test_samples_and_labels_are_checked_with_clear_errors():
    from torch.utils.data import Subset, TensorDataset

    from xcnn.training.trainer import check_labels, check_sample

    image = torch.rand(3, 8, 8)
    assert check_sample({"image": image, "label": torch.tensor([2])}, num_classes=3)[1].dtype == torch.int64
    assert int(check_sample((image, 2), num_classes=3)[1]) == 2
    assert check_sample(image, need_label=False)[1] is None
    bad = [
        ((image, 1.7), "a label must be an integer class index, got float 1.7"),
        ((image, torch.tensor(1.0)), "got a torch.float32 tensor"),
        ((image, torch.tensor(True)), "got a torch.bool tensor"),
        ((image, torch.tensor([1, 2])), r"of shape \[2\]"),
        ((image, 3), r"has the label 3; labels are class indices \[0, 3\)"),
        ((image, -1), "has the label -1"),
        ((torch.rand(8, 8), 0), r"the image must be a float \[3,H,W\] tensor, got torch.float32 tensor of shape \[8, 8\]"),
        (((image * 255).byte(), 0), "got torch.uint8 tensor"),
        (({"image": image}, None), "has no label"),
    ]  # fmt: skip
    for sample, message in bad:
        sample = sample[0] if sample[1] is None else sample
        with pytest.raises(ValueError, match=message):
            check_sample(sample, num_classes=3)
    # at the boundary, the pixel values too: normalised images would be normalised again inside the model
    for pixels, shown in (
        (image * 4 - 2, r"got values in \[-2"),
        (image.masked_fill(image > 0.5, math.nan), "and NaN"),
    ):
        with pytest.raises(ValueError, match=r"image values must be in \[0, 1\] .*" + shown):
            check_sample((pixels, 0), values=True)
        check_sample((pixels, 0))  # per sample as it loads: no pass over the pixels
    images = torch.rand(6, 3, 8, 8)
    with pytest.raises(ValueError, match=r"sample 0: image values must be in \[0, 1\]"):
        check_labels(TensorDataset(images * 255, torch.tensor([0, 1, 2, 0, 1, 2])), 3)
    check_labels(TensorDataset(images, torch.tensor([0, 1, 2, 0, 1, 2])), 3)
    with pytest.raises(ValueError, match=r"has the label 5; labels are class indices \[0, 3\)"):
        check_labels(TensorDataset(images, torch.tensor([0, 1, 5, 0, 1, 2])), 3)  # all labels, not only the first
    with pytest.raises(ValueError, match=r"labels must be integer class indices, got torch\.float32"):
        check_labels(TensorDataset(images, torch.tensor([0.0, 1, 2, 0, 1, 2])), 3)
    check_labels(Subset(TensorDataset(images, torch.tensor([0, 1, 5, 0, 1, 2])), [0, 1]), 3)  # 5 is not in it
    with pytest.raises(ValueError, match="has the label 4"):  # labels not exposed: the first sample's
        check_labels([(image, 4)], 3)


def test_a_seed_at_the_top_of_torchs_range_trains_as_torch_reads_it():
    """torch reads a seed modulo 2**64 (-1 and 2**64 - 1 seed the same generator): a run seeded 2**64 - 1 trains
    bit for bit like one seeded -1, its second epoch's data order (seed + epoch) included."""
    g = torch.Generator().manual_seed(2**64 - 1)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(-1)))
    top, low = small_net(), small_net()
    fit(top, Blobs(64), epochs=2, seed=2**64 - 1, **SCHEDULE)
    fit(low, Blobs(64), epochs=2, seed=-1, **SCHEDULE)
    for (name, a), b in zip(top.state_dict().items(), low.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def colour_folder(root: Path) -> Path:
    """A folder of 3 class folders (a, b, c), two 8x8 PNGs each, for a real torchvision ImageFolder."""
    from PIL import Image

    for c, name in enumerate("abc"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (80 * c, 40 * i, 0)).save(root / name / f"{i}.png")
    return root


def test_labels_a_target_transform_changes_are_checked_as_each_sample_gives_them(tmp_path):
    """An ImageFolder's ``samples`` hold the labels before ``target_transform``: with one, the labels the samples
    give (here class % 2, in [0, 2)) are the ones checked, sample by sample, not the folder indices 0..2."""
    from torch.utils.data import Subset
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import ToTensor

    from xcnn.training.trainer import check_labels, dataset_labels

    root = colour_folder(tmp_path / "folder")
    plain = ImageFolder(str(root), transform=ToTensor())
    assert dataset_labels(plain).tolist() == [0, 0, 1, 1, 2, 2]  # no target_transform: read without loading images
    with pytest.raises(ValueError, match=r"has the label 2; labels are class indices \[0, 2\)"):
        check_labels(plain, 2)
    halved = ImageFolder(str(root), transform=ToTensor(), target_transform=lambda t: t % 2)
    assert [halved[i][1] for i in range(6)] == [0, 0, 1, 1, 0, 0]
    for data in (halved, Subset(halved, [4, 5, 2])):
        assert dataset_labels(data) is None
        image, labels = check_labels(data, 2)  # what the samples give is in range
        assert labels is None and image.shape == (3, 8, 8)
    shifted = ImageFolder(str(root), transform=ToTensor(), target_transform=lambda t: t + 5)
    with pytest.raises(ValueError, match=r"sample 0 has the label 5; labels are class indices \[0, 3\)"):
        check_labels(shifted, 3)  # the first sample's own label, as it loads


def test_a_checkpoint_is_flushed_to_disk_before_it_replaces_the_last(tmp_path, monkeypatch):
    """``durable=True``: the temporary checkpoint is fsynced before its rename, the folder after it."""
    import os

    import xcnn._io

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name an fsynced descriptor")
    synced, real = [], os.fsync

    def recording_fsync(fd: int) -> None:  # the real fsync, recording what it flushed
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(xcnn._io.os, "fsync", recording_fsync)
    fit(small_net(), Blobs(64), epochs=1, out_dir=tmp_path, **SCHEDULE)
    names = [Path(p).name for p in synced]
    assert any(n.startswith(".checkpoint.pt.") and n.endswith(".tmp.pt") for n in names), names
    assert str(tmp_path) in synced  # the folder, after the rename


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path[:0] = [{tests!r}, os.path.dirname({tests!r})]
    import {module} as recipe
    import importlib
    target, after = {target!r}, {after!r}
    parts = target.split(".")
    owner = importlib.import_module(parts[0])
    for part in parts[1:-1]:  # submodules, then a class ("pathlib.Path.write_text")
        owner = getattr(owner, part) if hasattr(owner, part) else importlib.import_module(owner.__name__ + "." + part)
    attr = parts[-1]
    real, calls = getattr(owner, attr), []

    def write_then_die(*args, **kwargs):  # the real write, then a real SIGKILL before atomic_write renames it
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, attr, write_then_die)
    recipe.{call}
    """
)


def killed_run(tmp_path: Path, module: str, call: str, target: str, after: int) -> None:
    """Run ``module.call`` in a subprocess that SIGKILLs itself right after the ``after``-th call of the
    writer ``target`` (``"torch.save"``, ...), between the temporary file's write and its rename."""
    import os
    import subprocess
    import sys

    script = tmp_path / "killed.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent), module=module, call=call, target=target,
                                         after=after))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == -9, result.stderr[-3000:]  # killed, not finished or failed


def temporaries(folder: Path) -> list[str]:
    """What interrupted atomic writes leave: ``.NAME.XXXXXXXX.tmp.EXT``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and ".tmp" in p.name)


def train_blobs(out: str, resume: bool = False) -> None:
    fit(small_net(), Blobs(), epochs=3, out_dir=out, seed=5, resume=resume, **SCHEDULE)


@pytest.mark.slow
@pytest.mark.parametrize(("target", "after", "left"), [("torch.save", 2, ".checkpoint.pt."),
                                                       ("pathlib.Path.write_text", 2, ".history.json.")])  # fmt: skip
def test_a_run_killed_mid_write_resumes_and_removes_what_the_kill_left(tmp_path, target, after, left):
    out = tmp_path / "run"
    killed_run(tmp_path, "test_training_trainer", f"train_blobs({str(out)!r})", target, after)
    assert [n for n in temporaries(out) if n.startswith(left)], temporaries(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed subprocess: CPU kernels may round differently with more threads
    try:
        straight = small_net()
        fit(straight, Blobs(), epochs=3, out_dir=tmp_path / "straight", seed=5, **SCHEDULE)
        resumed = small_net()
        history = fit(resumed, Blobs(), epochs=3, out_dir=out, seed=5, resume=True, **SCHEDULE)
    finally:
        torch.set_num_threads(threads)
    assert temporaries(out) == [] and [h["epoch"] for h in history] == [0, 1, 2]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_the_benchmark_recipe_checks_its_settings_before_drawing_or_writing(tmp_path):
    from xcnn.training.benchmark import fit_benchmark

    out = tmp_path / "never"
    cases = [
        ({"lr": float("inf")}, ValueError, "lr must be finite"),
        ({"lr": 0}, ValueError, "lr must be in"),
        ({"shortcut_prob": 1.5}, ValueError, r"shortcut_prob must be in \[0, 1\]"),
        ({"n_train": 0}, ValueError, "n_train must be a positive integer"),
        ({"n_train": 10, "batch_size": 64}, ValueError, "fewer than one batch"),
        ({"n_test": -5}, ValueError, "n_test must be a positive integer"),
        ({"epochs": 0}, ValueError, "epochs must be a positive integer"),
        ({"seed": "0"}, TypeError, "seed must be an integer"),
        ({"seed": -1}, ValueError, r"seed must be in \[0, inf\), got -1"),
        ({"seed": 2**64}, ValueError, r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
        ({"monitor_every": 0}, ValueError, "monitor_every must be a positive integer"),
        ({"widths": (8, 8, 8)}, ValueError, "widths must be 4 positive integers"),
        ({"strides": (1, 1, 2, 2, 0)}, ValueError, r"strides\[4\] must be in"),
        ({"size": 20}, ValueError, "size must be in 32..224"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            fit_benchmark(out, progress=False, **options)
    assert not out.exists()
