"""Prototype networks (ProtoPNet): the layer's formula, the last layer's initialisation, push, training,
save/load, the prototype view and explainer, the CLI, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import xcnn
from xcnn.data.synthetic import Shapes
from xcnn.hooks import Tap
from xcnn.interpretable import PrototypeLayer, protopnet, prototype_evidence, prototype_view
from xcnn.interpretable.protopnet import find_prototype_layer
from xcnn.models import load_model, save_model
from xcnn.nets import ShapesNet
from xcnn.training.benchmark import InMemory
from xcnn.training.protopnet import fit_protopnet, protopnet_costs, push_prototypes

from .conftest import TinyCNN

SMALL = {"widths": [8, 8, 16, 16], "strides": [1, 2, 2, 1, 1]}


def small_net(classes: int = 6, size: int = 32) -> xcnn.Classifier:
    """A small ShapesNet (8x8 last map at 32x32), random weights (seeded), saveable by name."""
    torch.manual_seed(0)
    net = ShapesNet(classes, **SMALL)
    return xcnn.Classifier(
        net, input_size=(size, size), spec={"arch": "shapesnet", "kwargs": {"num_classes": classes, **SMALL}}
    )


@pytest.fixture(scope="module")
def shapes32():
    return InMemory(Shapes("train", 192, size=32, seed=0))


def brute_distances(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``[B,m,h,w]`` squared distances, one position at a time, in float64."""
    z, p = z.double(), p.double()
    out = torch.empty(z.shape[0], p.shape[0], *z.shape[-2:], dtype=torch.float64)
    for y in range(z.shape[2]):
        for x in range(z.shape[3]):
            out[:, :, y, x] = ((z[:, None, :, y, x] - p[None]) ** 2).sum(-1)
    return out


def test_similarity_follows_the_formula_on_hand_made_latents():
    layer = PrototypeLayer(4, num_classes=2, prototypes_per_class=2, dim=3, flatten=True).double()
    z = torch.rand(2, 3, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        layer.prototypes.copy_(
            torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.2, 0.9], z[1, :, 2, 3].tolist()])
        )
    d = layer.distance(z, layer.prototypes).detach()
    expected = brute_distances(z, layer.prototypes.detach())
    torch.testing.assert_close(d, expected, rtol=0, atol=1e-12)
    assert float(d[1, 3, 2, 3]) == pytest.approx(0.0, abs=1e-12)  # a prototype equal to a patch is at distance 0
    sim = layer.similarity(d)
    torch.testing.assert_close(sim, torch.log((expected + 1) / (expected + 1e-4)), rtol=0, atol=1e-10)
    # the layer's output: the largest similarity over positions = the similarity of the nearest patch
    features = torch.rand(2, 4, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        latent = layer.latent(features)
        want = torch.log(
            (brute_distances(latent, layer.prototypes).flatten(2).amin(2) + 1)
            / (brute_distances(latent, layer.prototypes).flatten(2).amin(2) + 1e-4)
        )
        torch.testing.assert_close(layer(features), want, rtol=0, atol=1e-10)
    assert float(sim[1, 3, 2, 3]) == pytest.approx(math.log(1e4), rel=1e-9)


def test_last_layer_initialisation_and_the_model_built_on_a_backbone():
    model = small_net()
    net = protopnet(model, prototypes_per_class=3, dim=16)
    name, layer, last = find_prototype_layer(net)
    assert name == "pool" and isinstance(net.backbone.fc, nn.Linear) and last is net.backbone.fc
    assert last.bias is None and tuple(last.weight.shape) == (6, 18)
    own = torch.arange(6)[:, None] == torch.arange(18)[None, :] // 3
    assert torch.equal(last.weight[own], torch.ones(18))
    assert torch.equal(last.weight[~own], torch.full((90,), -0.5))
    assert layer.prototype_class.tolist() == [c for c in range(6) for _ in range(3)]
    # the backbone keeps its trained weights; the caller's model is untouched
    assert torch.equal(net.backbone.layer4.conv1.weight, model.backbone.layer4.conv1.weight)
    assert isinstance(model.backbone.pool, nn.AdaptiveAvgPool2d)
    x = torch.rand(2, 3, 32, 32)
    assert net(x).shape == (2, 6)
    # dropout between pool and classifier is switched off (it would drop similarity scores)
    tiny = protopnet(load_model(TinyCNN(), raw_pixels=True, input_size=(32, 32)), 2)
    assert isinstance(tiny.backbone.drop, nn.Identity)


def test_the_prototype_view_outputs_the_similarity_scores_and_shares_parameters():
    net = protopnet(small_net(), 2, dim=8).eval()
    view = prototype_view(net)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), Tap(net.backbone, ["pool"]) as tap:
        net(x)
    with torch.no_grad():
        scores = view(x)
    assert scores.shape == (3, 12)
    assert torch.equal(scores, tap.get("pool").flatten(1))
    # the logits are the last layer applied to the scores, and the view follows the model's parameters
    torch.testing.assert_close(net.backbone.fc(scores), net(x).detach())
    with torch.no_grad():
        net.backbone.pool.prototypes.add_(0.1)
        assert torch.equal(view(x), prototype_view(net)(x))
        assert not torch.equal(view(x), scores)
    assert view.class_names[3] == "prototype 3 (class 1)"
    assert isinstance(net.backbone.fc, nn.Linear)  # the view did not replace the model's last layer


def test_explainers_on_the_view_search_one_prototype_and_the_index_is_checked():
    net = protopnet(small_net(), 2, dim=8).eval()
    view = prototype_view(net)
    x = torch.rand(2, 3, 32, 32)
    maps = xcnn.explainer("gradcam", view)(x, targets=5)
    assert maps.shape == (2, 32, 32)
    with pytest.raises(ValueError, match=r"out of range: model has 12 classes"):
        xcnn.explainer("gradcam", view)(x, targets=12)
    with pytest.raises(ValueError, match="out of range"):
        xcnn.explainer("rise", view, masks=8)(x, targets=[0, 40])


def test_prototype_explainer_weights_similarity_maps_by_their_contribution():
    torch.manual_seed(1)
    net = protopnet(small_net(), 3, dim=8).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    every = prototype_evidence(net, x, targets=[1, 4], top=18)
    with torch.no_grad():
        logits = net(x)
    # contributions of all prototypes add up to the target's logit
    torch.testing.assert_close(every.contribution.sum(1), logits[[0, 1], [1, 4]], rtol=1e-5, atol=1e-5)
    # the similarities are the prototype view's scores
    with torch.no_grad():
        view = prototype_view(net)(x)
    torch.testing.assert_close(every.similarity, view.gather(1, every.prototypes))
    ev = prototype_evidence(net, x, targets=[1, 4], top=2)
    assert torch.equal(ev.prototypes, every.prototypes[:, :2])
    raw = (ev.contribution[:, :, None, None] * ev.maps).sum(1)
    from xcnn.explain import normalize_maps

    torch.testing.assert_close(xcnn.explainer("prototype", net, top=2)(x, [1, 4]), normalize_maps(raw, (32, 32)))
    with pytest.raises(ValueError, match="no prototype layer"):
        xcnn.explainer("prototype", small_net())
    with pytest.raises(ValueError, match="top must be"):
        xcnn.explainer("prototype", net, top=0)


def test_push_makes_each_prototype_a_latent_patch_of_its_class_and_records_where(shapes32):
    torch.manual_seed(0)
    net = protopnet(small_net(), 2, dim=8)
    _, layer, _ = find_prototype_layer(net)
    old = layer.prototypes.detach().clone()
    records = push_prototypes(net, shapes32, batch_size=64)
    labels = shapes32.tensors["label"]
    latents = []
    with torch.no_grad(), xcnn.hooks.frozen(net):
        for batch in DataLoader(shapes32, batch_size=64):
            with Tap(net.backbone, ["pool.add_on"]) as tap:
                net(batch["image"])
            latents.append(tap.get("pool.add_on"))
    z = torch.cat(latents)
    for r in records:
        j, i, (y, x) = r["prototype"], r["index"], r["position"]
        assert r["class"] == int(labels[i]) == int(layer.prototype_class[j])
        assert torch.equal(layer.prototypes[j], z[i, :, y, x])  # exactly the patch
        # it was the nearest patch of an image of its class to the prototype before the push
        own = labels == r["class"]
        d = brute_distances(z[own], old[j : j + 1])
        assert r["distance"] == pytest.approx(float(d.min()), rel=1e-5, abs=1e-6)
        top, left, bottom, right = r["box"]
        assert 0 <= top < bottom <= 32 and 0 <= left < right <= 32
    # the box marks where the pushed prototype is most similar on its source image: it meets the prototype's
    # own cell (8x8 grid of a 32x32 image: 4 pixels per cell) unless other cells tie with it (flat background)
    meets = [
        r["box"][0] < 4 * r["position"][0] + 4 and 4 * r["position"][0] < r["box"][2]
        and r["box"][1] < 4 * r["position"][1] + 4 and 4 * r["position"][1] < r["box"][3]
        for r in records
    ]  # fmt: skip
    assert sum(meets) >= 0.9 * len(records)
    # one image of a single class: pushing the other classes' prototypes is an error naming them
    one = InMemory(Shapes("train", 64, size=32, seed=0))
    keep = one.tensors["label"] == 0
    one.tensors = {k: v[keep] for k, v in one.tensors.items()}
    one.n = int(keep.sum())
    with pytest.raises(ValueError, match=r"no image of class\(es\) \[1, 2, 3, 4, 5\], so prototypes \[2, 3, "):
        push_prototypes(net, one)


def test_a_short_training_lowers_the_loss_and_pulls_prototypes_to_their_class(bench32, shapes32, tmp_path):
    base = bench32[0]  # the benchmark CNN trained on 32x32 shapes: features that tell the classes apart
    net = protopnet(base, 2, dim=8)

    def gaps(model):
        """Mean over prototypes of (distance to other classes' patches - distance to own class's patches)."""
        _, layer, _ = find_prototype_layer(model)
        with torch.no_grad(), xcnn.hooks.frozen(model), Tap(model.backbone, ["pool.distance"]) as tap:
            model(shapes32.tensors["image"])
        d = tap.get("pool.distance").flatten(2).amin(2)  # [N, m]
        own = shapes32.tensors["label"][:, None] == layer.prototype_class[None]
        return float(((d * ~own).sum(0) / (~own).sum(0) - (d * own).sum(0) / own.sum(0)).mean())

    before = gaps(net)
    trained, history, records = fit_protopnet(
        net, shapes32, warm_epochs=2, joint_epochs=4, last_epochs=2, cycles=1, batch_size=32, progress=False,
        device="cpu", out_dir=tmp_path / "run",
    )  # fmt: skip
    joint = [h for h in history if h["stage"].endswith("joint")]
    warm = [h for h in history if h["stage"].endswith("warmup")]
    assert joint[-1]["train/loss"] < warm[0]["train/loss"]
    assert joint[-1]["train/clst"] < warm[0]["train/clst"]
    assert gaps(trained) > before + 0.05
    assert [h["stage"] for h in history] == ["01-warmup"] * 2 + ["02-joint"] * 4 + ["03-push"] + ["04-last"] * 2
    assert len(records) == 12
    # the caller's network is untouched
    assert torch.equal(
        find_prototype_layer(net)[1].prototypes, find_prototype_layer(protopnet(base, 2, dim=8))[1].prototypes
    )
    # save/load: the same model, without code
    loaded = load_model(tmp_path / "run")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained.cpu()(x))
    assert torch.equal(find_prototype_layer(loaded)[1].prototypes, find_prototype_layer(trained)[1].prototypes)
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["edits"][0]["op"] == "protopnet" and meta["training"]["prototypes"] == 12
    saved = json.loads((tmp_path / "run" / "prototypes.json").read_text())
    assert saved == json.loads(json.dumps(records)) and (tmp_path / "run" / saved[0]["image"]).is_file()


@pytest.mark.parametrize("where", ["push", "joint"])
def test_resume_skips_finished_stages_and_gives_the_uninterrupted_result(where, shapes32, tmp_path, monkeypatch):
    """Cut at the second push (finished stages skipped), or inside the second joint stage after its first
    epoch (that stage resumes from its checkpoint, its learning rates decayed by the joint epochs before it:
    joint_lr_step=1 makes every joint epoch's rate different, so a wrong offset changes the weights)."""
    import xcnn.training.protopnet as tp

    settings = {"warm_epochs": 1, "joint_epochs": 2, "last_epochs": 1, "cycles": 2, "batch_size": 64,
                "joint_lr_step": 1, "progress": False, "device": "cpu"}  # fmt: skip
    full, full_history, full_records = fit_protopnet(small_net(), shapes32, out_dir=tmp_path / "full", **settings)
    real_push, real_fit = tp.push_prototypes, tp.fit
    pushes = []

    def cut_push(*args, **kwargs):
        pushes.append(1)
        if len(pushes) == 2:  # after warm-up, joint, push, last and the second joint
            raise KeyboardInterrupt
        return real_push(*args, **kwargs)

    def stop(epoch, metrics):
        raise KeyboardInterrupt

    def cut_fit(*args, **kwargs):
        if kwargs["out_dir"].name == "05-joint":  # after its first epoch's checkpoint
            kwargs["callbacks"] = [stop]
        return real_fit(*args, **kwargs)

    if where == "push":
        monkeypatch.setattr(tp, "push_prototypes", cut_push)
    else:
        monkeypatch.setattr(tp, "fit", cut_fit)
    with pytest.raises(KeyboardInterrupt):
        fit_protopnet(small_net(), shapes32, out_dir=tmp_path / "cut", **settings)
    done = json.loads((tmp_path / "cut" / "stages.json").read_text())["done"]
    assert done == ["01-warmup", "02-joint", "03-push", "04-last"] + (["05-joint"] if where == "push" else [])
    monkeypatch.setattr(tp, "push_prototypes", real_push)
    monkeypatch.setattr(tp, "fit", real_fit)
    resumed, history, records = fit_protopnet(small_net(), shapes32, out_dir=tmp_path / "cut", resume=True, **settings)
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert records == full_records
    assert history == full_history
    assert [h["stage"] for h in history][-2:] == ["06-push", "07-last"]
    # a fresh (not resumed) run in the same folder starts over: no earlier progress is left to pick up
    fit_protopnet(small_net(), shapes32, out_dir=tmp_path / "cut", **{**settings, "cycles": 1})
    assert json.loads((tmp_path / "cut" / "stages.json").read_text())["done"][-1] == "04-last"
    assert not (tmp_path / "cut" / "stages" / "05-joint").exists()


def test_the_cli_trains_and_explains_a_prototype_network(tmp_path, capsys):
    from xcnn.cli import main

    base = tmp_path / "base"
    model = small_net()
    model.class_names = ["a", "b", "c", "d", "e", "f"]
    save_model(model, base)
    out = tmp_path / "proto"
    code = main([
        "train", "protopnet", "--model", str(base), "--out", str(out), "--n-train", "128", "--n-val", "64",
        "--n-test", "64", "--warm-epochs", "1", "--joint-epochs", "1", "--last-epochs", "1",
        "--prototypes-per-class", "2", "--dim", "8", "--device", "cpu",
    ])  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["test_acc"] <= 1 and results["training"]["prototypes"] == 12
    image = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray((Shapes("test", 1, size=32, seed=3)[0]["image"].permute(1, 2, 0) * 255).byte().numpy()).save(image)
    code = main([
        "explain", str(image), "--model", str(out), "--method", "prototype,gradcam", "--out", str(tmp_path / "ex"),
        "--opt", "steps=3", "--opt", "scales=4,8", "--device", "cpu",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    pred = json.loads((tmp_path / "ex" / "predictions.json").read_text())
    protos = pred["images"][0]["prototypes"]
    assert len(protos["top"]) == 3 and (tmp_path / "ex" / protos["figure"]).is_file()
    first = protos["top"][0]
    assert first["source"]["image"].startswith("prototypes/") and len(first["source"]["box"]) == 4
    assert first["contribution"] >= protos["top"][1]["contribution"]
    # the prototype options on a model without prototypes: refused before anything is explained
    code = main(["explain", str(image), "--model", str(base), "--prototypes", "3", "--out", str(tmp_path / "no")])
    assert code == 2 and "apply to a prototype network" in capsys.readouterr().err
    assert not (tmp_path / "no" / "img_gradcam.png").exists()


def test_bad_input_is_refused_clearly():
    model = small_net()
    with pytest.raises(ValueError, match="prototypes_per_class must be a positive integer"):
        protopnet(model, 0)
    with pytest.raises(ValueError, match="prototypes_per_class must be a positive integer"):
        protopnet(model, -2)
    # at 4x4 pixels the last feature map is 1x1: nothing to compare prototypes with
    with pytest.raises(ValueError, match=r"prototypes need a spatial map"):
        protopnet(small_net(size=4), 2)
    flat = load_model(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)), raw_pixels=True, input_size=(8, 8))
    with pytest.raises(ValueError, match="no global average-pooling module"):
        protopnet(flat, 2)
    with pytest.raises(ValueError, match="no prototype layer"):
        prototype_view(model)
    net = protopnet(model, 2)
    with pytest.raises(ValueError, match="already has a prototype layer"):
        protopnet(net, 2)
    with pytest.raises(ValueError, match="not a global average pool"):
        protopnet(model, 2, where="layer4")
    with pytest.raises(ValueError, match="cycles must be a positive integer"):
        fit_protopnet(model, InMemory(Shapes("train", 64, size=32, seed=0)), cycles=0)
    # data without some of the model's classes: refused before any training (push would fail at its end)
    some = InMemory(Shapes("train", 96, size=32, seed=0))
    keep = some.tensors["label"] < 4
    some.tensors = {k: v[keep] for k, v in some.tensors.items()}
    some.n = int(keep.sum())
    with pytest.raises(ValueError, match=r"no image of 2 of the model's 6 classes \(\[4, 5\]\)"):
        fit_protopnet(model, some, batch_size=16)
    # a head that is not a linear classifier read directly from the pool
    mlp = xcnn.Classifier(
        nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8), nn.ReLU(),
                      nn.Linear(8, 3)),
        input_size=(16, 16),
    )  # fmt: skip
    with pytest.raises(ValueError, match="is not the classifier read directly"):
        protopnet(mlp, 2)
    with pytest.raises(ValueError, match="no last layer"):
        xcnn.explainer("prototype", prototype_view(net))


def test_costs_pull_own_class_and_push_other_classes():
    d = torch.tensor([[1.0, 4.0, 0.5, 9.0], [2.0, 3.0, 6.0, 0.25]])
    pclass = torch.tensor([0, 0, 1, 1])
    clst, sep = protopnet_costs(d, torch.tensor([0, 1]), pclass)
    assert float(clst) == pytest.approx((1.0 + 0.25) / 2)
    assert float(sep) == pytest.approx((0.5 + 2.0) / 2)
