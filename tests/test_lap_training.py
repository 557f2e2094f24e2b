"""Knowledge injection: the knowledge's validation, the losses against hand computations and finite
differences, the functional CAM core, fit_lap's effect on a tiny model trained for seconds (attention
moves into boxes, out of forbidden regions), resume, save/load, the frozen-backbone option, the CLI."""

from __future__ import annotations

import json
import math

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
from xcnn.training.lap import KnowledgeTraining, fit_lap, reinitialise
from xcnn.training.trainer import Callback

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


def test_regions_can_be_set_and_deleted_through_the_compaction(shapes32):
    """``k.look[i] = region`` is validated and kept compact as at construction; the masks read back are the
    regions given (a disc stays a disc, a box its inclusive pixels), ``del`` removes one, and a dataset wrapped
    with the knowledge sees the change."""
    k = Knowledge((32, 32))
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    disc = (yy - 16) ** 2 + (xx - 12) ** 2 <= 6**2
    k.look[5] = disc
    k.look[7] = (2, 3, 10, 4)  # x0, y0, x1, y1: 9 x 2 pixels
    k.forbid[5] = [[0, 0, 1, 1]]
    assert torch.equal(k.look[5], disc) and int(k.look[7].sum()) == 18 and bool(k.look[7][3:5, 2:11].all())
    assert k.indices == [5, 7] and int(k.forbid[5].sum()) == 4
    k.look[5] = disc.long()  # a 0/1 mask replaces the entry
    assert torch.equal(k.look[5], disc)
    for index, region, message in [
        (-1, (0, 0, 2, 2), r"knowledge: look keys must be image indices \(int >= 0\), got -1"),
        (True, (0, 0, 2, 2), "look keys must be image indices"),
        (3, (0, 0, 40, 2), r"knowledge look\[3\]: box .* lies outside the 32x32 image"),
        (3, torch.zeros(32, 32, dtype=torch.bool), r"knowledge look\[3\] is an empty region"),
        (3, torch.ones(16, 16, dtype=torch.bool), r"a mask of shape \(16, 16\) for 32x32 images"),
        (3, disc.float() * 0.5, "a mask must be boolean or 0/1"),
    ]:
        with pytest.raises(ValueError, match=message):
            k.look[index] = region
    assert 3 not in k.look  # nothing was kept of a refused region
    train, _ = shapes32
    wrapped = WithKnowledge(train, k)
    assert bool(wrapped[7]["has_look"]) and torch.equal(wrapped[7]["look"], k.look[7])
    del k.look[7]
    assert 7 not in k.look and k.indices == [5] and not bool(wrapped[7]["has_look"])
    with pytest.raises(KeyError):
        del k.look[7]


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
    boxes = Knowledge.from_samples(train, 0.5, look="box", forbid=None)
    corner = torch.zeros(32, 32, dtype=torch.bool)
    corner[:8, :8] = True
    others = [i for i in range(len(train)) if i not in boxes.look]
    # a half with a box, a quarter forbidden, a quarter without knowledge
    knowledge = Knowledge((32, 32), look=boxes.look, forbid=dict.fromkeys(others[::2], corner))
    # each step's loss is ce + weight * its terms, so the epoch means obey the same sum (every step logs every term)
    terms = {"rrr": {"rrr": 3.0}, "gradcam": {"cam_look": 2.0, "cam_forbid": 2.0}, "none": {},
             "lap": {"look": 0.5, "forbid": 0.7, "area": 0.3}}  # fmt: skip
    weights = {"rrr_weight": 3.0, "cam_weight": 2.0, "beta_look": 0.5, "beta_forbid": 0.7, "beta_area": 0.3}
    for injection, extra in terms.items():
        trained, history = fit_lap(small_shapesnet(), train, epochs=1, knowledge=knowledge, injection=injection,
                                   batch_size=64, progress=False, **weights)  # fmt: skip
        h = history[0]
        logged = {k.removeprefix("train/") for k in h if k.startswith("train/")}
        assert logged == {"loss", "ce", "acc"} | set(extra) and bool(lap_layers(trained.backbone)) == (
            injection == "lap"
        )
        expected = h["train/ce"] + sum(w * h[f"train/{k}"] for k, w in extra.items())
        assert h["train/loss"] == pytest.approx(expected, rel=1e-5), injection
        assert all(h[f"train/{k}"] > 0 for k in extra), h  # each penalty is active, so the sum tests its weight
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
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
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
    # the accuracies are the saved model's on the documented test images (clean, then random-colour patches)
    saved = xcnn.load_model(out).eval()
    for key, shortcut in (("test_acc", 0.0), ("test_acc_random_patch", 0.9)):
        test = InMemory(Shapes("test", 64, size=32, seed=0, shortcut_prob=shortcut))
        with torch.no_grad():
            right = (saved(test.tensors["image"]).argmax(1) == test.tensors["label"]).sum().item()
        assert results[key] == pytest.approx(right / 64, abs=1e-12), key
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
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_fit_lap_under_torchrun_keeps_replicas_identical(tmp_path):
    from .conftest import torchrun

    torchrun(DDP_SCRIPT.format(out=str(tmp_path)), tmp_path)
    for injection in ("lap", "rrr", "gradcam"):  # each rank's own file (printed lines would interleave)
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


# ---- trust under bad input, kills and mutation ----------------------------------------------------------


def test_the_attention_terms_squash_the_attention_logits_once():
    """With the attention net's output fixed at z = 2 everywhere, a = sigmoid(2) at every pixel: the terms
    have closed forms (a double sigmoid would give sigmoid(sigmoid(2)) instead)."""
    model = insert_lap(small_shapesnet())
    with torch.no_grad():
        model.backbone.pool.attention[2].weight.zero_()
        model.backbone.pool.attention[2].bias.fill_(2.0)
    weights = {"beta_look": 1.0, "beta_forbid": 1.0, "beta_area": 1.0, "rrr_weight": 0.0, "cam_weight": 0.0}
    net = KnowledgeTraining(model.eval(), "lap", weights, None)
    look, forbid = torch.zeros(3, 32, 32, dtype=torch.bool), torch.zeros(3, 32, 32, dtype=torch.bool)
    look[0, 4:12, 4:20] = True
    forbid[1, :8, :8] = True
    out = net(torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2]), look, forbid, torch.tensor([True, False, False]),
              torch.tensor([False, True, False]))  # fmt: skip
    out = {k: float(v.detach()) for k, v in out.items() if k != "logits"}
    a = 1 / (1 + math.exp(-2.0))
    assert out["area"] == pytest.approx(a, rel=1e-6)  # image 2: no knowledge
    assert out["forbid"] == pytest.approx(a, rel=1e-6)  # image 1: mean of a over its corner
    assert out["look"] == pytest.approx(-math.log(a) + a, rel=1e-6)  # image 0: -log a inside, a outside
    assert out["loss"] == pytest.approx(out["ce"] - math.log(a) + 3 * a, rel=1e-6)


def test_gradcam_supervision_by_hand_divides_each_map_by_its_maximum():
    cams = torch.tensor([[[0.0, 2.0], [1.0, 4.0]], [[3.0, 0.0], [0.0, 1.0]]])
    look = torch.tensor([[[False, True], [False, True]], [[False, False], [False, False]]])
    forbid = torch.tensor([[[False, False], [False, False]], [[True, False], [False, False]]])
    has_look, has_forbid = torch.tensor([True, False]), torch.tensor([False, True])
    look_term, forbid_term = cam_guidance_loss(cams, look, forbid, has_look, has_forbid)
    # image 0 / 4 = [[0, .5], [.25, 1]] against [[0, 1], [0, 1]]; image 1 / 3 is 1 in its forbidden corner
    assert float(look_term) == pytest.approx((0.5**2 + 0.25**2) / 4, rel=1e-5)
    assert float(forbid_term) == pytest.approx(1.0, rel=1e-5)
    scaled = cam_guidance_loss(cams * 50, look, forbid, has_look, has_forbid)  # a map's scale does not matter
    assert float(scaled[0]) == pytest.approx(float(look_term), rel=1e-5)


class SettingsOnDisk(Callback):
    """Notes, at the end of epoch 0 (before its checkpoint is written), what the run's folder holds."""

    name = "settings_on_disk"

    def __init__(self) -> None:
        self.seen: dict = {}

    def on_epoch_end(self, ctx) -> None:
        if ctx.epoch == 0:
            self.seen = {n: (ctx.out_dir / n).is_file() for n in ("lap_training.json", "checkpoint.pt")}


def test_the_settings_are_written_before_the_first_checkpoint_and_a_checkpoint_without_them_is_refused(
    shapes32, tmp_path
):
    train, _ = shapes32
    options = {"batch_size": 64, "progress": False, "out_dir": tmp_path / "run"}
    watch = SettingsOnDisk()
    with pytest.raises(Stop):
        fit_lap(small_shapesnet(), train, epochs=2, callbacks=[watch, _stop_after_first], **options)
    assert watch.seen == {"lap_training.json": True, "checkpoint.pt": False}
    (tmp_path / "run" / "lap_training.json").unlink()  # as a kill between the two writes used to leave it
    with pytest.raises(ValueError, match=r"has no settings record lap_training\.json beside it"):
        fit_lap(small_shapesnet(), train, epochs=2, resume=True, lr=5e-3, **options)


class Counted(torch.utils.data.Dataset):
    """``data``'s samples, counting how often each is read."""

    def __init__(self, data):
        self.data, self.reads = data, {}

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.reads[i] = self.reads.get(i, 0) + 1
        return self.data[i]


class ReadsAtStart(Callback):
    """Notes how often sample 0 had been read when training begins."""

    name = "reads_at_start"

    def __init__(self, data: Counted) -> None:
        self.data, self.reads = data, None

    def on_train_begin(self, ctx) -> None:
        self.reads = self.data.reads.get(0, 0)


@pytest.mark.parametrize("injection", ["lap", "gradcam"])
def test_fit_lap_reads_the_first_sample_once_before_training(shapes32, injection):
    """Its checks (image in [0, 1], label), the knowledge's image size and, for Grad-CAM supervision, the CAM
    layer's check all come from one read of sample 0 (each read of an image folder decodes a file)."""
    train, _ = shapes32
    data = Counted(torch.utils.data.TensorDataset(train.tensors["image"][:64], train.tensors["label"][:64]))
    watch = ReadsAtStart(data)
    fit_lap(small_shapesnet(), data, epochs=1, batch_size=64, injection=injection, callbacks=[watch], progress=False)
    assert watch.reads == 1


class EmptyData(torch.utils.data.Dataset):
    def __len__(self):
        return 0

    def __getitem__(self, i):
        raise IndexError(i)


class LateBadLabel(torch.utils.data.Dataset):
    """Labels the dataset does not expose up front, one of them outside the model's 6 classes."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"image": self.data[i]["image"], "label": 9 if i == 100 else int(self.data[i]["label"])}


def test_bad_data_and_settings_are_refused_before_anything_is_written(shapes32, tmp_path):
    train, _ = shapes32
    out = tmp_path / "never"
    images, labels = train.tensors["image"], train.tensors["label"]
    cases = [
        ({"beta_area": math.inf}, ValueError, "beta_area must be finite"),
        ({"beta_look": -1.0}, ValueError, "beta_look must be in"),
        ({"beta_forbid": math.nan}, ValueError, "beta_forbid must be finite"),
        ({"lr": 0.0}, ValueError, "lr must be in"),
        ({"weight_decay": -1e-4}, ValueError, "weight_decay must be in"),
        ({"injection": "rrr", "rrr_weight": -1.0}, ValueError, "rrr_weight must be in"),
        ({"injection": "gradcam", "cam_weight": "1"}, TypeError, "cam_weight must be a number"),
        ({"heads": 0}, ValueError, "heads must be a positive integer"),
        ({"seed": "a"}, TypeError, "seed must be an integer"),
        ({"seed": 2**64}, ValueError, r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
        ({"epochs": 1.5}, ValueError, "epochs must be a positive integer"),
        ({"scratch": "yes"}, TypeError, "scratch must be True or False"),
        ({"knowledge": {"look": {}}}, TypeError, "knowledge must be a Knowledge"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            fit_lap(small_shapesnet(), train, out_dir=out, **{"epochs": 1, **options})
    bad_data = [
        (EmptyData(), ValueError, "data is empty"),
        ({"image": images, "label": labels}, TypeError, "data must be a dataset"),
        (torch.utils.data.TensorDataset(images, labels.float()), ValueError, "labels must be integer class indices"),
        (torch.utils.data.TensorDataset(images, labels + 6), ValueError, r"labels are class indices \[0, 6\)"),
        (torch.utils.data.TensorDataset(images[:, :1], labels), ValueError, r"float \[3,H,W\] tensor"),
    ]
    for data, error, message in bad_data:
        with pytest.raises(error, match=message):
            fit_lap(small_shapesnet(), data, epochs=1, out_dir=out)
    # validation data out of range would give a silently wrong validation accuracy
    for val, error, message in [
        (EmptyData(), ValueError, "val_data is empty"),
        (torch.utils.data.TensorDataset(images * 4 - 2, labels), ValueError,
         r"val_data's sample 0: image values must be in \[0, 1\]"),
        (torch.utils.data.TensorDataset(images, labels + 6), ValueError,
         r"val_data has the label 11; labels are class indices \[0, 6\)"),
    ]:  # fmt: skip
        with pytest.raises(error, match=message):
            fit_lap(small_shapesnet(), train, val_data=val, epochs=1, out_dir=out)
    assert not out.exists()
    # labels the data does not expose are checked as each sample is loaded
    with pytest.raises(ValueError, match=r"training sample 100 has the label 9; labels are class indices \[0, 6\)"):
        fit_lap(small_shapesnet(), LateBadLabel(train), epochs=1, batch_size=64, progress=False)


def test_knowledge_settings_and_files_are_checked():
    with pytest.raises(ValueError, match=r"size must be the images' \(H, W\)"):
        Knowledge((32,))
    with pytest.raises(ValueError, match="size"):
        Knowledge((32, 0))
    with pytest.raises(TypeError, match="look must map image indices to regions"):
        Knowledge((8, 8), look=[(0, 0, 2, 2)])
    for box in ((0, 0, math.nan, 3), (0, 0, "3", 3), (0, 0, 10**400, 3), (0, 0, True, 3), "0 0 3 3"):
        with pytest.raises(ValueError, match="knowledge look"):
            Knowledge((8, 8), look={0: box})
    data = InMemory(Shapes("train", 8, size=32, seed=0))
    with pytest.raises(ValueError, match="knowledge: data is empty"):
        Knowledge.from_samples(EmptyData(), 0.5)
    with pytest.raises(TypeError, match="knowledge: seed must be an integer"):
        Knowledge.from_samples(data, 0.5, seed="a")
    with pytest.raises(ValueError, match=r"knowledge: seed must be an integer in \[-2\*\*63, 2\*\*64\)"):
        Knowledge.from_samples(data, 0.5, seed=2**64)  # torch's own overflow error before
    for fraction in (0.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="knowledge fraction must be"):
            Knowledge.from_samples(data, fraction)
    with pytest.raises(ValueError, match="the samples must be dicts"):
        Knowledge.from_samples(torch.utils.data.TensorDataset(torch.rand(4, 3, 8, 8)), 0.5)


def test_a_hostile_knowledge_file_is_a_clear_error(tmp_path):
    path = tmp_path / "k.json"
    for text, message in (('{"look": ' * 100_000 + "{}" + "}" * 100_000, "nested too deeply"),
                          ('{"look": {"0": "0 0 3 3"}}', "must be a list of boxes"),
                          ('{"look": {"\u0663": [[0, 0, 3, 3]]}}', "is not an image of the data"),
                          ('{"look": {"0": [[0, 0, 1e400, 3]]}}', "finite numbers")):  # fmt: skip
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            Knowledge.load(path, (32, 32))
    with pytest.raises(ValueError, match="does not exist"):
        Knowledge.load(tmp_path / "none.json", (32, 32))


def test_boxes_are_kept_as_boxes_and_masks_as_their_bounding_box():
    """A box costs a few bytes, not an H x W mask per image (1000 boxes at 128 px: 16 MB as masks)."""
    rect = torch.zeros(128, 128, dtype=torch.bool)
    rect[10:20, 30:70] = True  # a box file's mask: one filled rectangle
    disc = torch.zeros(128, 128, dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    disc[(yy - 60) ** 2 + (xx - 40) ** 2 <= 15**2] = True
    k = Knowledge((128, 128), look={**dict.fromkeys(range(1000), (1, 2, 30, 40)), 1000: rect, 1001: disc})
    kept = k.look._compact
    assert kept[0] == (((1, 2, 30, 40),), None) and kept[1000] == (((30, 10, 69, 19),), None)
    boxes, packed = kept[1001]
    assert boxes == ((25, 45, 55, 75),) and len(packed) == math.ceil(31 * 31 / 8)  # bits of its bounding box
    held = sum(len(p or b"") + 32 * sum(map(len, b)) for b, p in kept.values())
    assert held < 200_000  # versus 1002 * 16 KiB = 16 MiB as masks
    box = torch.zeros(128, 128, dtype=torch.bool)
    box[2:41, 1:31] = True  # inclusive corners
    assert torch.equal(k.look[0], box) and torch.equal(k.look[1000], rect) and torch.equal(k.look[1001], disc)
    assert len(k.look) == 1002 and 1001 in k.look and 1002 not in k.look and k.look.get(1002) is None


def train_lap(out: str, resume: bool = False) -> None:
    """The run the kill tests cut: fit_lap on 64 shapes, 2 epochs."""
    data = InMemory(Shapes("train", 64, size=32, seed=1))
    fit_lap(small_shapesnet(), data, epochs=2, batch_size=32, out_dir=out, resume=resume, progress=False)


@pytest.mark.slow
def test_a_run_killed_while_saving_its_model_resumes_and_leaves_a_clean_folder(tmp_path):
    from .test_training_trainer import killed_run, temporaries

    out = tmp_path / "run"
    killed_run(tmp_path, "tests.test_lap_training", f"train_lap({str(out)!r})", "safetensors.torch.save_file", 1)
    assert [n for n in temporaries(out) if n.startswith(".model.safetensors.")], temporaries(out)
    train_lap(str(out), resume=True)
    assert temporaries(out) == []
    loaded = xcnn.load_model(out)
    assert lap_layers(loaded.backbone) == ["pool"]
