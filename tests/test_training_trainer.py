"""The shared training loop: learning, checkpoints, identical resume, bad input, DDP."""

from __future__ import annotations

import textwrap
from pathlib import Path

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
    with pytest.raises(ValueError, match="epochs must be positive"):
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
    print("rank", os.environ["RANK"], "loss", history[-1]["train/loss"])
    """
)


@pytest.mark.slow
def test_runs_unchanged_under_torchrun_with_two_gloo_processes(tmp_path):
    from .conftest import torchrun  # here, not at the top: the script imports this file as a plain module

    result = torchrun(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)), tmp_path)
    assert "rank 0" in result.stdout and "rank 1" in result.stdout
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

    def on_epoch_end(self, ctx: TrainerContext) -> None:
        torch.rand(1000)  # would shift dropout and shuffling if it leaked into training
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
