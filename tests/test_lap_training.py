"""Knowledge injection: the knowledge's validation, the losses against hand computations and finite
differences, the functional CAM core, fit_lap's effect on a tiny model trained for seconds (attention
moves into boxes, out of forbidden regions), resume, save/load, the frozen-backbone option, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xcnn
from xcnn.data.synthetic import Shapes
from xcnn.explain import cam_maps
from xcnn.hooks import Tap
from xcnn.interpretable import insert_lap, lap_layers
from xcnn.models import Classifier
from xcnn.nets import ShapesNet
from xcnn.training.benchmark import InMemory
from xcnn.training.knowledge import Knowledge, WithKnowledge, attention_losses, cam_guidance_loss, rrr_loss
from xcnn.training.lap import fit_lap, reinitialise

from .conftest import raw_maps


def small_shapesnet(seed: int = 0, **extra) -> Classifier:
    torch.manual_seed(seed)
    arch = {"num_classes": 6, "widths": [8, 16, 16, 32], "strides": [1, 1, 2, 2, 1], **extra}
    return Classifier(
        ShapesNet(**arch), name="shapesnet", input_size=(32, 32), spec={"arch": "shapesnet", "kwargs": arch}
    )


@pytest.fixture(scope="module")
def shapes32():
    return InMemory(Shapes("train", 192, size=32, seed=3)), InMemory(Shapes("val", 64, size=32, seed=3))


def attention_share(model: Classifier, data: dict, key: str) -> float:
    """Mean share of the last LAP layer's (upsampled) attention inside ``data[key]`` masks."""
    name = lap_layers(model.backbone)[-1]
    with torch.no_grad(), Tap(model.backbone, [f"{name}.attention"]) as tap:
        model.eval()(data["image"])
    a = F.interpolate(
        tap.get(f"{name}.attention").mean(1, keepdim=True), size=data["image"].shape[-2:], mode="bilinear"
    )[:, 0]
    return float(((a * data[key].float()).sum((1, 2)) / a.sum((1, 2))).mean())


# ---- knowledge ---------------------------------------------------------------------------------------------


def test_regions_become_masks_and_bad_regions_are_refused():
    k = Knowledge((8, 10), look={0: (1, 2, 3, 4), 2: [[0, 0, 1, 1], [8, 6, 9, 7]]}, forbid={1: torch.eye(8, 10)})
    assert k.look[0].sum() == 3 * 3 and bool(k.look[0][2:5, 1:4].all())
    assert k.look[2].sum() == 8 and bool(k.look[2][7, 9])
    assert k.indices == [0, 1, 2]
    with pytest.raises(ValueError, match="outside the 10x8 image"):
        Knowledge((8, 10), look={0: (0, 0, 10, 3)})
    with pytest.raises(ValueError, match="x1 > x0"):
        Knowledge((8, 10), look={0: (4, 0, 4, 3)})
    with pytest.raises(ValueError, match="x1 > x0"):
        Knowledge((8, 10), look={0: (5, 0, 2, 3)})
    with pytest.raises(ValueError, match=r"shape \(8, 8\) for 8x10"):
        Knowledge((8, 10), forbid={0: torch.ones(8, 8, dtype=torch.bool)})
    with pytest.raises(ValueError, match="empty region"):
        Knowledge((8, 10), forbid={0: torch.zeros(8, 10, dtype=torch.bool)})
    with pytest.raises(ValueError, match="image indices"):
        Knowledge((8, 10), look={-1: (0, 0, 2, 2)})


def test_knowledge_for_images_not_in_the_data_is_refused(shapes32, tmp_path):
    train, _ = shapes32
    with pytest.raises(ValueError, match="not in the data"):
        WithKnowledge(train, Knowledge((32, 32), look={500: (0, 0, 3, 3)}))
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"look": {"cat.png": [[0, 0, 3, 3]]}}))
    with pytest.raises(ValueError, match=r"'cat\.png' is not an image of the data"):
        Knowledge.load(path, (32, 32), names=["dog.png"])
    path.write_text(json.dumps({"forbid": {"dog.png": [[0, 0, 3, 3]], "1": [[2, 2, 5, 5]]}}))
    k = Knowledge.load(path, (32, 32), names=["dog.png", "b.png"])
    assert k.forbid[0].sum() == 16 and k.forbid[1].sum() == 16
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the knowledge file"):
        Knowledge.load(path, (32, 32))


def test_from_samples_draws_the_same_images_for_every_kind(shapes32):
    train, _ = shapes32
    boxes = Knowledge.from_samples(train, 0.25, look="box", seed=1)
    masks = Knowledge.from_samples(train, 0.25, look="mask", seed=1)
    assert len(boxes.look) == len(masks.look) == 48 and boxes.look.keys() == masks.look.keys()
    i = boxes.indices[0]
    assert bool(boxes.look[i][masks.look[i]].all())  # the box covers the mask
    sample = WithKnowledge(train, boxes)[i]
    assert bool(sample["has_look"]) and not bool(sample["has_forbid"]) and bool(sample["look"].any())
    other = next(j for j in range(len(train)) if j not in boxes.look)
    assert not bool(WithKnowledge(train, boxes)[other]["has_look"])


# ---- losses ------------------------------------------------------------------------------------------------


def test_attention_losses_by_hand():
    z = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]], [[[1.0, 1.0], [1.0, -2.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    look = torch.tensor([[[True, False], [False, False]], [[False] * 2] * 2, [[False] * 2] * 2])
    forbid = torch.tensor([[[False] * 2] * 2, [[False, False], [True, True]], [[False] * 2] * 2])
    has_look, has_forbid = torch.tensor([True, False, False]), torch.tensor([False, True, False])
    terms = attention_losses(z, look, forbid, has_look, has_forbid)
    a = torch.sigmoid(z)[:, 0]
    assert terms["look"].item() == pytest.approx(float(-torch.log(a[0, 0, 0]) + a[0].flatten()[1:].mean()), abs=1e-6)
    assert terms["forbid"].item() == pytest.approx(float(a[1, 1].mean()), abs=1e-6)
    assert terms["area"].item() == pytest.approx(float(a[2].mean()), abs=1e-6)
    # two heads: the look term is on the heads' mean attention, -log mean_h a_h (not the mean of -log a_h)
    z2 = torch.stack([z[:, 0], z[:, 0] - 3.0], dim=1)
    a2 = torch.sigmoid(z2).mean(1)
    two = attention_losses(z2, look, forbid, has_look, has_forbid)
    assert two["look"].item() == pytest.approx(float(-torch.log(a2[0, 0, 0]) + a2[0].flatten()[1:].mean()), abs=1e-6)
    zd = z.double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: sum(attention_losses(t, look, forbid, has_look, has_forbid).values()), (zd,)
    )


class SmoothNet(nn.Module):
    """Twice-differentiable everywhere (softplus): finite differences see no kinks."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.Conv2d(4, 5, 3, 2, 1), nn.Softplus()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def directional_check(loss_fn, model: nn.Module, seed: int = 0) -> None:
    """The analytic gradient of ``loss_fn()`` along a random parameter direction equals the central
    difference (float64)."""
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    model.zero_grad()
    loss_fn().backward()
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, direction, strict=True) if p.grad is not None)
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction, strict=True):
            p.add_(eps * d)
        plus = float(loss_fn())
        for p, d in zip(params, direction, strict=True):
            p.sub_(2 * eps * d)
        minus = float(loss_fn())
        for p, d in zip(params, direction, strict=True):
            p.add_(eps * d)
    numeric = (plus - minus) / (2 * eps)
    assert analytic != 0.0
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_rrr_loss_matches_its_definition_and_finite_differences():
    torch.manual_seed(0)
    model = Classifier(SmoothNet().double(), input_size=(8, 8))
    images = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    look = torch.zeros(3, 8, 8, dtype=torch.bool)
    look[0, 2:6, 2:6] = True
    forbid = torch.zeros(3, 8, 8, dtype=torch.bool)
    forbid[1, :3, :3] = True
    has_look = torch.tensor([True, False, False])

    def loss():
        with torch.enable_grad():
            x = images.clone().requires_grad_(True)
            return rrr_loss(model(x), x, look, forbid, has_look)

    # the definition, image by image: (A * d/dx sum_k log p_k)^2 summed, A = forbidden or outside the box
    total = 0.0
    for i in range(3):
        x = images[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.log_softmax(model(x), 1).sum(), x)
        region = forbid[i] | (~look[i] if has_look[i] else torch.zeros_like(look[i]))
        total += float((g[0] * region).pow(2).sum())
    assert float(loss().detach()) == pytest.approx(total / 3, rel=1e-10)
    directional_check(loss, model)


def test_gradcam_supervision_matches_finite_differences():
    torch.manual_seed(3)  # a draw whose top-1 Grad-CAMs are not all clipped to zero by the ReLU
    model = Classifier(SmoothNet().double(), input_size=(8, 8))
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        labels = model(images).argmax(1)
    assert bool((cam_maps(model, images, labels, "features").flatten(1).amax(1) > 0).all())
    look = torch.zeros(2, 8, 8, dtype=torch.bool)
    look[0, 1:5, 2:7] = True
    forbid = torch.zeros(2, 8, 8, dtype=torch.bool)
    forbid[1, 4:, 4:] = True
    has_look, has_forbid = torch.tensor([True, False]), torch.tensor([False, True])

    def loss():
        cams = cam_maps(model, images, labels, "features", create_graph=True)
        a, b = cam_guidance_loss(cams, look, forbid, has_look, has_forbid)
        return a + b

    directional_check(loss, model)


def test_cam_maps_by_hand_in_float64_and_on_a_token_layer():
    torch.manual_seed(0)
    model = Classifier(SmoothNet().double(), input_size=(8, 8))
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    targets = torch.tensor([1, 2])
    feats = model.backbone.features(images)  # [B,5,4,4]; the head is a mean over positions, then fc
    grads = model.backbone.fc.weight[targets][:, :, None, None].expand_as(feats) / 16
    by_hand = {
        "gradcam": (grads.mean((2, 3), keepdim=True) * feats).sum(1).relu(),
        "layercam": (grads.relu() * feats).sum(1).relu(),
        "hirescam": (grads * feats).sum(1).relu(),
    }
    for method, expected in by_hand.items():
        maps = cam_maps(model, images, targets, "features", method)
        assert maps.dtype == torch.float64
        torch.testing.assert_close(maps, expected.detach(), rtol=1e-10, atol=1e-12)
    from xcnn.nets import shapes_vit

    vit = Classifier(shapes_vit(img_size=32, depth=2), input_size=(32, 32)).eval()
    x = torch.rand(2, 3, 32, 32)
    maps = cam_maps(vit, x, None, "blocks.1.norm1")
    assert maps.shape == (2, 4, 4)
    assert torch.equal(maps, raw_maps(xcnn.explainer("gradcam", vit, layer="blocks.1.norm1"), x))


def test_cam_maps_is_the_gradcam_explainer_and_can_be_differentiated(sharp, images32):
    layer = "features"
    targets = torch.tensor([1, 4, 7])
    for method in ("gradcam", "gradcam++", "layercam"):
        maps = cam_maps(sharp, images32, targets, layer, method)
        expected = raw_maps(xcnn.explainer(method, sharp, layer=layer), images32, targets)
        assert torch.equal(maps, expected)
        assert not maps.requires_grad
    sharp.eval()
    maps, logits = cam_maps(sharp, images32, targets, layer, create_graph=True, return_logits=True)
    assert logits.shape == (3, 10) and maps.requires_grad
    (grad,) = torch.autograd.grad(maps.sum(), sharp.backbone.fc.weight)
    assert grad.abs().sum() > 0
    with pytest.raises(ValueError, match="method must be one of"):
        cam_maps(sharp, images32, targets, layer, "scorecam")


# ---- training ----------------------------------------------------------------------------------------------


def test_box_knowledge_moves_the_attention_into_the_boxes(shapes32, bench32):
    train, val = shapes32
    model, _, _ = bench32  # trained features: where the object is can be read from them
    knowledge = Knowledge.from_samples(train, 1.0, look="box")
    val_boxes = Knowledge.from_samples(val, 1.0, look="box")
    data = {"image": val.tensors["image"], "box": torch.stack([val_boxes.look[i] for i in range(len(val))])}
    before = attention_share(insert_lap(model), data, "box")
    trained, history = fit_lap(model, train, epochs=4, knowledge=knowledge, lr=1e-2, batch_size=32, train="attention",
                               progress=False, val_data=val)  # fmt: skip
    after = attention_share(trained, data, "box")
    assert history[-1]["train/look"] < history[0]["train/look"]
    assert after > 1.5 * before, (before, after)
    assert history[-1]["val/attention_in_mask"] > history[0]["val/attention_in_mask"]
    assert not lap_layers(model.backbone)  # the caller's model is untouched


def test_forbidden_regions_push_the_attention_out(shapes32, bench32):
    train, val = shapes32
    model, _, _ = bench32
    corner = torch.zeros(32, 32, dtype=torch.bool)
    corner[:12, :12] = True
    knowledge = Knowledge((32, 32), forbid=dict.fromkeys(range(0, len(train), 2), corner))  # half the images
    data = {"image": val.tensors["image"], "corner": corner.expand(len(val), 32, 32)}
    before = attention_share(insert_lap(model), data, "corner")  # constant attention: the corner's area share
    assert before == pytest.approx(144 / 1024, rel=1e-5)
    trained, history = fit_lap(model, train, epochs=4, knowledge=knowledge, lr=1e-2, batch_size=32, train="attention",
                               beta_area=0.0, progress=False)  # fmt: skip
    assert history[-1]["train/forbid"] < history[0]["train/forbid"]
    assert attention_share(trained, data, "corner") < 0.5 * before


def test_resume_gives_the_uninterrupted_run_and_the_saved_model_reloads(shapes32, tmp_path):
    train, val = shapes32
    knowledge = Knowledge.from_samples(train, 0.5, look="box")
    options = {"knowledge": knowledge, "batch_size": 64, "progress": False, "seed": 4}
    full, _ = fit_lap(small_shapesnet(), train, epochs=2, out_dir=tmp_path / "full", **options)
    with pytest.raises(Stop):
        fit_lap(small_shapesnet(), train, epochs=2, out_dir=tmp_path / "cut", **options, callbacks=[_stop_after_first])
    resumed, history = fit_lap(small_shapesnet(), train, epochs=2, out_dir=tmp_path / "cut", resume=True, **options)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    loaded = xcnn.load_model(tmp_path / "full")
    x = val.tensors["image"][:8]
    with torch.no_grad():
        assert torch.equal(loaded(x), full(x))
    assert torch.equal(xcnn.explainer("lap", loaded)(x), xcnn.explainer("lap", full)(x))
    saved = json.loads((tmp_path / "full" / "model.json").read_text())
    assert saved["edits"][0]["op"] == "lap" and saved["training"]["knowledge"] == {"look": 96, "forbid": 0}
    assert len(history) == 2


class Stop(Exception):
    """The run is cut after its first epoch's checkpoint."""


def _stop_after_first(epoch: int, metrics: dict) -> None:
    if epoch == 0:
        raise Stop


def test_attention_only_training_leaves_the_backbone_and_its_statistics_alone(shapes32):
    train, _ = shapes32
    model = small_shapesnet()
    trained, _ = fit_lap(model, train, epochs=1, train="attention", lr=1e-2, batch_size=64, progress=False)
    before, after = model.state_dict(), trained.state_dict()
    changed = [n for n in after if n in before and not torch.equal(before[n], after[n])]
    assert changed == ["backbone.fc.weight", "backbone.fc.bias"]
    assert any(not torch.equal(p, torch.zeros_like(p)) for p in trained.backbone.pool.attention[2].parameters())
    with pytest.raises(ValueError, match="no LAP layer"):
        fit_lap(model, train, epochs=1, train="attention", injection="none", progress=False)


def test_baselines_train_and_bad_options_are_refused(shapes32):
    train, _ = shapes32
    knowledge = Knowledge.from_samples(train, 0.5, look="box", forbid=None)
    terms = {"rrr": {"rrr"}, "gradcam": {"cam_look", "cam_forbid"}, "none": set()}
    for injection, extra in terms.items():
        trained, history = fit_lap(small_shapesnet(), train, epochs=1, knowledge=knowledge, injection=injection,
                                   batch_size=64, progress=False)  # fmt: skip
        logged = {k.removeprefix("train/") for k in history[0] if k.startswith("train/")}
        assert logged == {"loss", "ce", "acc"} | extra and not lap_layers(trained.backbone)
        if injection != "none":  # the penalty is in the loss: loss = ce + weight * terms
            assert history[0]["train/loss"] > history[0]["train/ce"]
    with pytest.raises(ValueError, match="injection must be one of"):
        fit_lap(small_shapesnet(), train, epochs=1, injection="gain")
    with pytest.raises(ValueError, match="does not use them"):
        fit_lap(small_shapesnet(), train, epochs=1, injection="rrr", where="pool")
    with pytest.raises(ValueError, match="does not use it"):
        fit_lap(small_shapesnet(), train, epochs=1, injection="lap", cam_layer="layer4")
    with pytest.raises(ValueError, match="none is inserted"):
        fit_lap(small_shapesnet(), train, epochs=1, injection="rrr", heads=2)


def test_bad_training_input_fails_before_anything_is_written(shapes32, tmp_path):
    train, _ = shapes32
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="is not in the model"):
        fit_lap(small_shapesnet(), train, epochs=1, injection="gradcam", cam_layer="layer9", out_dir=out)
    with pytest.raises(ValueError, match="fewer than one batch"):
        fit_lap(small_shapesnet(), train, epochs=1, batch_size=500, out_dir=out)
    with pytest.raises(ValueError, match="epochs must be positive"):
        fit_lap(small_shapesnet(), train, epochs=0, out_dir=out)
    assert not out.exists()
    fit_lap(small_shapesnet(), train, epochs=1, batch_size=64, out_dir=out, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(beta_area\)"):
        fit_lap(small_shapesnet(), train, epochs=1, batch_size=64, out_dir=out, resume=True, beta_area=0.5)


def test_reinitialise_and_an_early_lap_layer():
    model = small_shapesnet(stem_pool=True)
    lap = insert_lap(model, ["stem_pool", "pool"])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), lap.eval()(x))
    old = lap.backbone.layer1.conv1.weight.clone()
    reinitialise(lap.backbone, seed=1)
    assert not torch.equal(old, lap.backbone.layer1.conv1.weight)
    assert all(
        float(p.detach().abs().sum()) == 0
        for n in lap_layers(lap.backbone)
        for p in lap.backbone.get_submodule(n).attention[2].parameters()
    )


def test_cli_train_lap_then_explain_and_evaluate_with_lap(tmp_path, bench32):
    from xcnn.cli import main

    _, _, folder = bench32
    out = tmp_path / "lap"
    code = main(["train", "lap", "--model", str(folder), "--out", str(out), "--epochs", "1", "--n-train", "128",
                 "--n-test", "64", "--shortcut", "0.9", "--boxes-fraction", "0.2", "--device", "cpu"])  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["training"]["knowledge"] == {"look": 26, "forbid": 0}
    assert 0 <= results["test_acc"] <= 1 and "test_acc_random_patch" in results
    assert (
        main(
            ["explain", "sample:chelsea", "--model", str(out), "--method", "lap,gradcam", "--out", str(tmp_path / "e")]
        )
        == 0
    )
    assert main(["evaluate", "--model", str(out), "--methods", "lap", "--metrics", "pointing", "--n", "8",
                 "--out", str(tmp_path / "v"), "--no-report"]) == 0  # fmt: skip
    # bad input: a clear error, and nothing written
    assert (
        main(
            [
                "train",
                "lap",
                "--model",
                str(folder),
                "--out",
                str(tmp_path / "bad"),
                "--where",
                "layer4",
                "--n-train",
                "64",
            ]
        )
        == 2
    )
    knowledge = tmp_path / "k.json"
    knowledge.write_text(json.dumps({"look": {"7": [[0, 0, 40, 3]]}}))
    assert (
        main(["train", "lap", "--model", str(folder), "--out", str(tmp_path / "bad"), "--knowledge", str(knowledge)])
        == 2
    )
    assert main(["train", "lap", "--model", str(folder), "--out", str(tmp_path / "bad"), "--forbid-shortcut"]) == 2
    assert not (tmp_path / "bad").exists()


DDP_SCRIPT = """
import os, sys, torch
from xcnn.data.synthetic import Shapes
from xcnn.models import Classifier
from xcnn.nets import ShapesNet
from xcnn.training.benchmark import InMemory
from xcnn.training.knowledge import Knowledge
from xcnn.training.lap import fit_lap
arch = {{"num_classes": 6, "widths": [8, 16, 16, 32], "strides": [1, 1, 2, 2, 1]}}
model = Classifier(ShapesNet(**arch), name="shapesnet", input_size=(32, 32), spec={{"arch": "shapesnet", "kwargs": arch}})
data = InMemory(Shapes("train", 64, size=32, seed=1))
knowledge = Knowledge.from_samples(data, 0.5, look="box")
torch.distributed.init_process_group("gloo")  # the script owns the group: fit_lap joins it, leaves it open
for injection in ("lap", "rrr", "gradcam"):
    out = os.path.join({out!r}, injection)
    trained, history = fit_lap(model, data, epochs=2, knowledge=knowledge, injection=injection, batch_size=16,
                               out_dir=out, progress=False, device="cpu")
    flat = torch.cat([p.detach().flatten() for p in trained.parameters()])
    torch.save(flat, os.path.join(out, f"rank{{os.environ['RANK']}}.pt"))
    print("rank", os.environ["RANK"], injection, history[-1]["train/loss"])
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_fit_lap_under_torchrun_keeps_replicas_identical(tmp_path):
    from .conftest import torchrun

    result = torchrun(DDP_SCRIPT.format(out=str(tmp_path)), tmp_path)
    for injection in ("lap", "rrr", "gradcam"):
        assert f"rank 0 {injection}" in result.stdout and f"rank 1 {injection}" in result.stdout
        w0, w1 = torch.load(tmp_path / injection / "rank0.pt"), torch.load(tmp_path / injection / "rank1.pt")
        assert torch.equal(w0, w1)
        loaded = xcnn.load_model(tmp_path / injection)  # saved once, by rank 0
        assert torch.equal(torch.cat([p.flatten() for p in loaded.parameters()]), w0)


def test_cli_train_lap_on_a_folder_takes_its_box_files_as_knowledge(tmp_path):
    import numpy as np
    from PIL import Image

    from xcnn.cli import main

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    (root / "a" / "0.box.json").write_text(json.dumps({"boxes": [[4, 4, 20, 20]]}))
    (root / "b" / "1.box.json").write_text(json.dumps({"boxes": [[10, 0, 39, 39]]}))
    torch.manual_seed(0)
    arch = {"num_classes": 2, "widths": [8, 8, 8, 8], "strides": [2, 1, 2, 2, 1]}
    model = Classifier(
        ShapesNet(**arch), name="shapesnet", input_size=(32, 32), spec={"arch": "shapesnet", "kwargs": arch}
    )
    xcnn.models.save_model(model, tmp_path / "m")
    out = tmp_path / "lap"
    argv = ["train", "lap", "--model", str(tmp_path / "m"), "--data", str(root), "--out", str(out), "--epochs", "1",
            "--batch-size", "4", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text())["training"]["knowledge"] == {"look": 2, "forbid": 0}
    assert main([*argv[:-2], "--shortcut", "0.5", "--device", "cpu"]) == 2  # a planted patch needs synthetic data
