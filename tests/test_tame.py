"""TAME: the head's shapes on several backbones, training (loss falls, backbone untouched, resume, DDP),
saved heads, class-specific maps, and bad input."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

import xcnn
from xcnn.data.synthetic import Shapes
from xcnn.explain.tame import TAMEHead, load_tame_head, save_tame_head, tame_head, tame_layers
from xcnn.training.benchmark import InMemory
from xcnn.training.tame import TAMELoss, fit_tame, folder_data, tv_loss

SMALL = {"epochs": 2, "batch_size": 16, "progress": False}


def small_shapesnet(**kwargs) -> xcnn.Classifier:
    """An untrained benchmark CNN at 32x32 (seeded): enough to exercise the training mechanics."""
    torch.manual_seed(0)
    from xcnn.models import Classifier
    from xcnn.nets import ShapesNet

    arch = {"num_classes": 6, "widths": [8, 16, 16, 32], "strides": [1, 1, 2, 2, 1], **kwargs}
    return Classifier(
        ShapesNet(**arch), name="shapesnet", input_size=(32, 32), spec={"arch": "shapesnet", "kwargs": arch}
    ).eval()


@pytest.fixture(scope="module")
def shapes32():
    return InMemory(Shapes("train", 64, size=32, seed=3))


@pytest.mark.parametrize(
    "name,size,layers,grid",
    [
        ("resnet18", 64, ["layer2", "layer3", "layer4"], (8, 8)),
        ("vgg11", 64, ["features.10", "features.15", "features.20"], (8, 8)),
        ("mobilenet_v2", 64, ["features.6", "features.13", "features"], (8, 8)),
        ("shapesnet", 64, ["layer2", "layer3", "layer4"], (16, 16)),
        ("resnet18", 448, ["layer2", "layer3", "layer4"], (56, 56)),  # layer2 is 56x56 here
        ("resnet18", 512, ["layer2", "layer3", "layer4"], (56, 56)),  # 64x64, capped at 56
    ],
)
def test_layers_and_map_shapes_on_several_backbones(name, size, layers, grid):
    torch.manual_seed(0)
    model = xcnn.load_model(name, pretrained=False, input_size=(size, size))
    assert tame_layers(model) == layers
    head = tame_head(model)
    expl = xcnn.explainer("tame", model, head=head)
    images = torch.rand(2, 3, size, size)
    _logits, maps = expl._class_maps(images)
    assert maps.shape == (2, model.num_classes, *grid)
    out = expl(images)
    assert out.shape == (2, size, size) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1


def test_layers_of_the_bundled_efficientnet(lite0):
    assert tame_layers(lite0) == ["blocks.2", "blocks.4", "bn2"]
    head = tame_head(lite0)
    assert head.channels == [40, 112, 1280] and head.num_classes == 1000


def test_head_size_is_the_largest_map_capped_at_56():
    a, b = torch.zeros(1, 4, 112, 112), torch.zeros(1, 4, 14, 14)
    assert TAMEHead.output_size([b, a]) == (56, 56)
    assert TAMEHead.output_size([torch.zeros(1, 4, 120, 60)]) == (56, 28)
    assert TAMEHead.output_size([torch.zeros(1, 4, 28, 28), b]) == (28, 28)


def test_tv_loss_by_hand():
    m = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    # neighbour differences: (1-0)^2 across, (0-1)^2 down = 2; every pixel is on the border: 0.3 * (1 + 1) = 0.6
    assert tv_loss(m).item() == pytest.approx((2 + 0.6) / 2)


def test_loss_terms_and_weights():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1])
    att = torch.full((2, 4, 4), 0.5)
    total, logs = TAMELoss()(logits, att, labels)
    ce = torch.nn.functional.cross_entropy(logits, labels).item()
    area = (0.5 + 0.0005) ** 0.3
    assert logs["ce"] == pytest.approx(ce) and logs["area"] == pytest.approx(area)
    assert total.item() == pytest.approx(1.5 * ce + 2 * area + 0.01 * logs["tv"])


@pytest.mark.slow
def test_head_learns_on_a_trained_model_and_the_backbone_is_bit_identical(bench32, tmp_path):
    model = bench32[0].cpu()
    model.train()  # the caller's mode must come back
    model.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = InMemory(Shapes("train", 512, size=32, seed=5))
    head, history = fit_tame(model, data, epochs=4, batch_size=32, lr=1e-3, out_dir=tmp_path, progress=False)
    assert history[-1]["train/loss"] < history[0]["train/loss"] - 0.02, [h["train/loss"] for h in history]
    for k, v in model.state_dict().items():  # weights and BatchNorm statistics (eval mode throughout)
        assert torch.equal(v, before[k]), k
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    model.eval()

    images = InMemory(Shapes("test", 8, size=32, seed=9)).tensors["image"]
    expl = xcnn.explainer("tame", model, head=tmp_path)  # reloaded from disk
    direct = xcnn.explainer("tame", model, head=head)
    torch.testing.assert_close(expl(images), direct(images), rtol=0, atol=0)
    # the target class's map is not the other classes' map, and explain_all holds every class
    every = direct.explain_all(images)
    assert every.shape == (8, 6, 32, 32)
    top1 = model(images).argmax(1)
    torch.testing.assert_close(every[torch.arange(8), top1], direct(images))
    other = (top1 + 3) % 6
    assert (every[torch.arange(8), top1] - every[torch.arange(8), other]).abs().mean() > 0.05
    logged = json.loads((tmp_path / "history.json").read_text())
    assert {"train/ce", "train/area", "train/tv"} <= set(logged[0])
    assert any((tmp_path / "tensorboard").iterdir())


def test_resume_continues_at_the_next_epoch_with_identical_weights(tmp_path, shapes32):
    whole, _ = fit_tame(small_shapesnet(), shapes32, out_dir=tmp_path / "whole", **SMALL)

    def stop(epoch, metrics):
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_tame(small_shapesnet(), shapes32, out_dir=tmp_path / "cut", callbacks=[stop], **SMALL)
    seen = []
    resumed, history = fit_tame(
        small_shapesnet(),
        shapes32,
        out_dir=tmp_path / "cut",
        resume=True,
        callbacks=[lambda e, m: seen.append(e)],
        **SMALL,
    )
    assert seen == [1] and [h["epoch"] for h in history] == [0, 1]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert (tmp_path / "cut" / "tame.safetensors").is_file() and (tmp_path / "cut" / "tame.json").is_file()


def test_saved_head_round_trip_and_json_contents(tmp_path):
    model = small_shapesnet()
    head = tame_head(model, skip=False)
    save_tame_head(head, tmp_path)
    meta = json.loads((tmp_path / "tame.json").read_text())
    assert meta["layers"] == ["layer2", "layer3", "layer4"] and meta["channels"] == [16, 16, 32]
    assert meta["num_classes"] == 6 and meta["skip"] is False and meta["arch"] == "shapesnet"
    again = load_tame_head(tmp_path / "tame.json", model)
    assert again.skip is False
    for a, b in zip(head.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_the_skip_ablation_changes_the_branches():
    model = small_shapesnet()
    feats = [torch.randn(1, c, 8, 8) for c in (16, 16, 32)]
    with_skip, without = tame_head(model).eval(), tame_head(model, skip=False).eval()
    assert not torch.allclose(with_skip(feats), without(feats))


# ---- bad input ---------------------------------------------------------------------------------------


def test_a_head_for_another_backbone_is_refused(tmp_path):
    save_tame_head(tame_head(small_shapesnet()), tmp_path)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="trained for the backbone 'shapesnet', not 'resnet18'"):
        xcnn.explainer("tame", xcnn.load_model("resnet18", pretrained=False, input_size=(32, 32)), head=tmp_path)
    with pytest.raises(ValueError, match=r"\[16, 16, 32\] channels; the model's have \[16, 32, 64\]"):
        xcnn.explainer("tame", small_shapesnet(widths=[8, 16, 32, 64]), head=tmp_path)
    meta = json.loads((tmp_path / "tame.json").read_text())
    (tmp_path / "tame.json").write_text(json.dumps({**meta, "layers": ["layer2", "layer3", "head.conv"]}))
    with pytest.raises(ValueError, match=r"\['head.conv'\] are not in the model"):
        xcnn.explainer("tame", small_shapesnet(), head=tmp_path)


def test_a_head_for_other_weights_warns(tmp_path):
    save_tame_head(tame_head(small_shapesnet()), tmp_path)
    other = small_shapesnet()
    with torch.no_grad():
        other.backbone.fc.weight.add_(1.0)
    with pytest.warns(UserWarning, match="other weights"):
        xcnn.explainer("tame", other, head=tmp_path)


def test_missing_or_corrupt_head(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no TAME head.*xcnn train tame"):
        xcnn.explainer("tame", small_shapesnet(), head=tmp_path / "nothing")
    with pytest.raises(ValueError, match="needs head="):
        xcnn.explainer("tame", small_shapesnet())
    save_tame_head(tame_head(small_shapesnet()), tmp_path)
    (tmp_path / "tame.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot load TAME head weights"):
        xcnn.explainer("tame", small_shapesnet(), head=tmp_path)
    (tmp_path / "tame.json").write_text("{broken")
    with pytest.raises(ValueError, match="cannot read"):
        xcnn.explainer("tame", small_shapesnet(), head=tmp_path)


def test_class_index_beyond_the_heads_classes():
    model = small_shapesnet()
    expl = xcnn.explainer("tame", model, head=tame_head(model))
    with pytest.raises(ValueError, match="out of range"):
        expl(torch.rand(2, 3, 32, 32), torch.tensor([0, 6]))


class EmptyData(torch.utils.data.Dataset):
    def __len__(self):
        return 0

    def __getitem__(self, i):
        raise IndexError(i)


def test_bad_settings_and_data_are_refused_before_anything_is_written(tmp_path, shapes32):
    out = tmp_path / "never"
    cases = [
        ({"lr": 0.0}, ValueError, "lr must be in"),
        ({"lr": float("inf")}, ValueError, "lr must be finite"),
        ({"momentum": 1.0}, ValueError, r"momentum must be in \[0, 1\)"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay must be in"),
        ({"ce_weight": float("nan")}, ValueError, "ce_weight must be finite"),
        ({"area_weight": -2.0}, ValueError, "area_weight must be in"),
        ({"area_power": 0.0}, ValueError, "area_power must be in"),
        ({"tv_weight": "0.01"}, TypeError, "tv_weight must be a number"),
        ({"epochs": 0}, ValueError, "epochs must be a positive integer"),
        ({"batch_size": 2.0}, ValueError, "batch_size must be a positive integer"),
        ({"seed": None}, TypeError, "seed must be an integer"),
        ({"seed": 2**64}, ValueError, r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
        ({"skip": "no"}, TypeError, "skip must be True or False"),
        (
            {"val_data": torch.utils.data.TensorDataset(shapes32.tensors["image"] * 2)},
            ValueError,
            r"val_data's sample 0: image values must be in \[0, 1\]",
        ),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            fit_tame(small_shapesnet(), shapes32, out_dir=out, **{**SMALL, **options})
    for data, error, message in ((EmptyData(), ValueError, "data is empty"),
                                 ({"image": torch.rand(32, 3, 32, 32)}, TypeError, "data must be a dataset"),
                                 (torch.utils.data.TensorDataset(torch.rand(32, 32, 32)), ValueError,
                                  r"the image must be a float \[3,H,W\] tensor")):  # fmt: skip
        with pytest.raises(error, match=message):
            fit_tame(small_shapesnet(), data, out_dir=out, **SMALL)
    assert not out.exists()
    for seed, error in ((2**64, ValueError), (1.5, TypeError)):  # torch's own overflow error before
        with pytest.raises(error, match="seed must be an integer"):
            tame_head(small_shapesnet(), seed=seed)


def test_a_folder_with_fewer_images_than_a_batch(tmp_path):
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 60, 20, 90)).save(tmp_path / f"img{i}.png")
    data = folder_data(tmp_path, (32, 32))
    assert data[0]["image"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="3 images, fewer than one batch \\(16\\)"):
        fit_tame(small_shapesnet(), data, **SMALL)


# ---- DDP ---------------------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    from test_tame import small_shapesnet, SMALL
    from xcnn.data.synthetic import Shapes
    from xcnn.training.benchmark import InMemory
    from xcnn.training.tame import fit_tame
    head, history = fit_tame(small_shapesnet(), InMemory(Shapes("train", 64, size=32, seed=3)), out_dir={out!r}, **SMALL)
    torch.save(torch.cat([p.detach().flatten() for p in head.parameters()]), os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
    """
)


@pytest.mark.slow
def test_tame_trains_under_torchrun_with_two_gloo_processes(tmp_path):
    from .conftest import torchrun  # here, not at the top: the script imports this file as a plain module

    torchrun(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)), tmp_path)
    # each rank's own file (the ranks' printed lines would interleave)
    assert torch.equal(torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt"))
    assert json.loads((tmp_path / "tame.json").read_text())["layers"] == ["layer2", "layer3", "layer4"]


def test_one_class_maps_equal_the_full_fusion():
    model = small_shapesnet()
    head = tame_head(model).eval()
    feats = [torch.randn(3, c, s, s) for c, s in ((16, 16), (16, 8), (32, 8))]
    classes = torch.tensor([0, 5, 2])
    torch.testing.assert_close(
        head.class_maps(feats, classes), head(feats)[torch.arange(3), classes], atol=1e-5, rtol=1e-5
    )


# ---- CLI ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_trains_a_head_and_explains_and_evaluates_with_it(tmp_path, capsys):
    from xcnn.cli import main
    from xcnn.models import save_model

    save_model(small_shapesnet(), tmp_path / "model")
    head_dir = tmp_path / "head"
    assert (
        main(
            [
                "train",
                "tame",
                "--model",
                str(tmp_path / "model"),
                "--out",
                str(head_dir),
                "--epochs",
                "1",
                "--n-train",
                "64",
                "--batch-size",
                "16",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    # the folder records the run that was asked for: 64 images, batches of 16, one epoch, all checkpointed
    training = json.loads((head_dir / "tame.json").read_text())["training"]
    assert (training["images"], training["batch_size"], training["epochs"]) == (64, 16, 1)
    state = xcnn.training.load_checkpoint(head_dir / "checkpoint.pt")
    assert (state["epoch"], state["epochs"], len(state["history"])) == (0, 1, 1)
    img = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(img)
    out = tmp_path / "explained"
    assert (
        main(
            [
                "explain",
                str(img),
                "--model",
                str(tmp_path / "model"),
                "--method",
                "tame,gradcam",
                "--tame-head",
                str(head_dir),
                "--out",
                str(out),
                "--save-maps",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (out / "img_tame.png").is_file() and (out / "img_tame.npy").is_file()
    ev = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tmp_path / "model"),
                "--data",
                "synthetic",
                "--n",
                "8",
                "--methods",
                "tame,random",
                "--metrics",
                "pointing,adic",
                "--tame-head",
                str(head_dir),
                "--out",
                str(ev),
                "--no-report",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "| tame |" in (ev / "metrics.md").read_text()
    capsys.readouterr()
    assert (
        main(
            [
                "explain",
                str(img),
                "--model",
                str(tmp_path / "model"),
                "--method",
                "tame",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "needs head=" in capsys.readouterr().err
