"""Prototype networks (ProtoPNet): the layer's formula, the last layer's initialisation, push, training,
save/load, the prototype view and explainer, the CLI, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import xcnn
from xcnn.data.synthetic import Shapes
from xcnn.hooks import Tap
from xcnn.interpretable import PrototypeLayer, protopnet, prototype_evidence, prototype_view
from xcnn.interpretable.protopnet import find_prototype_layer
from xcnn.models import load_model, save_model
from xcnn.nets import ShapesNet
from xcnn.training.benchmark import InMemory
from xcnn.training.protopnet import ProtoPNetLoss, _LastLayer, fit_protopnet, protopnet_costs, push_prototypes

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


def test_prototype_explainer_ranks_prototypes_by_contribution_and_weights_their_maps():
    """Evidence and explainer against a brute-force computation from the latents: similarity maps
    log((d+1)/(d+eps)) of every prototype, contribution = last-layer weight x max similarity, the top ones by
    contribution (not by similarity: the last layer's weights are signed at random, so the orders differ)."""
    torch.manual_seed(1)
    net = protopnet(small_net(), 3, dim=8).eval()
    with torch.no_grad():
        net.backbone.fc.weight.copy_(torch.randn(6, 18, generator=torch.Generator().manual_seed(3)))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([1, 4])
    with torch.no_grad(), Tap(net.backbone, ["pool.add_on"]) as tap:
        logits = net(x)
    d = brute_distances(tap.get("pool.add_on"), net.backbone.pool.prototypes.detach())  # [2, 18, 8, 8]
    sim = torch.log((d + 1) / (d + 1e-4))
    scores = sim.flatten(2).amax(2)
    contribution = net.backbone.fc.weight.detach().double()[targets] * scores  # [2, 18]
    by_contribution = contribution.argsort(1, descending=True)[:, :2]
    by_similarity = scores.argsort(1, descending=True)[:, :2]
    assert not torch.equal(by_contribution.sort(1).values, by_similarity.sort(1).values)  # the test can tell them apart

    every = prototype_evidence(net, x, targets=targets, top=18)
    torch.testing.assert_close(
        every.contribution.sum(1).double(), logits[[0, 1], [1, 4]].double(), rtol=1e-5, atol=1e-5
    )
    ev = prototype_evidence(net, x, targets=targets, top=2)
    assert torch.equal(ev.prototypes, by_contribution)
    torch.testing.assert_close(ev.contribution.double(), contribution.gather(1, by_contribution), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ev.similarity.double(), scores.gather(1, by_contribution), rtol=1e-5, atol=1e-5)
    # the explainer's map: the contribution-weighted sum of those two maps, bilinear to the image, min-max to [0,1]
    raw = (contribution.gather(1, by_contribution)[:, :, None, None] * sim.gather(
        1, by_contribution[:, :, None, None].expand(-1, -1, 8, 8))).sum(1)  # fmt: skip
    up = torch.nn.functional.interpolate(raw[:, None].float(), size=(32, 32), mode="bilinear", align_corners=False)[
        :, 0
    ]
    low, high = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
    torch.testing.assert_close(
        xcnn.explainer("prototype", net, top=2)(x, targets), (up - low) / (high - low), atol=1e-3, rtol=0
    )  # float32 distances
    with pytest.raises(ValueError, match="no prototype layer"):
        xcnn.explainer("prototype", small_net())
    with pytest.raises(ValueError, match="top must be"):
        xcnn.explainer("prototype", net, top=0)


def toy_prototype_network() -> xcnn.Classifier:
    """A 2x2 stride-2 conv on 8x12 pixels (a 4x6 latent grid: not square, so a transposed position shows),
    3 classes x 2 prototypes of dim 3, in float64."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 4, 2, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    net = protopnet(load_model(body.double(), raw_pixels=True, input_size=(8, 12)), 2, dim=3)
    with torch.no_grad():  # no add-on unit dead anywhere: every patch gets its own latent (no exact ties)
        net.backbone[1].add_on[0].bias.fill_(1.0)
    return net


def test_push_finds_the_nearest_patch_that_a_brute_force_search_finds_on_a_non_square_grid():
    net = toy_prototype_network().eval()
    layer = net.backbone[1]
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 8, 12, generator=gen, dtype=torch.float64)
    labels = torch.arange(12) % 3
    with torch.no_grad():
        z = layer.add_on(net.backbone[0](images))  # the latents, computed directly: [12, 3, 4, 6]
    assert z.shape == (12, 3, 4, 6)
    # the known answer: prototype j is planted next to one patch of an image of its class, at positions off the
    # diagonal and in images of every batch (batch_size=5: images 0-4, 5-9, 10-11)
    planted = {0: (9, 1, 5), 1: (3, 3, 0), 2: (4, 0, 4), 3: (10, 2, 5), 4: (11, 3, 1), 5: (5, 1, 4)}
    with torch.no_grad():
        for j, (i, y, x) in planted.items():
            assert labels[i] == j // 2
            layer.prototypes[j] = z[i, :, y, x] + 1e-5 * torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    old = layer.prototypes.detach().clone()
    records = push_prototypes(net, TensorDataset(images, labels), batch_size=5)
    for r in records:
        j = r["prototype"]
        # brute force: every patch of every image of the prototype's class
        best = min(
            (float(((z[i, :, y, x] - old[j]) ** 2).sum()), i, y, x)
            for i in range(12) if labels[i] == j // 2 for y in range(4) for x in range(6)
        )  # fmt: skip
        assert (best[1], best[2], best[3]) == planted[j]
        assert (r["index"], r["position"], r["class"], r["grid"]) == (
            planted[j][0],
            list(planted[j][1:]),
            j // 2,
            [4, 6],
        )
        assert r["distance"] == pytest.approx(best[0], rel=1e-9)
        assert torch.equal(layer.prototypes[j].detach(), z[r["index"], :, r["position"][0], r["position"][1]])
        # the box around the pushed prototype's most similar pixels meets its own 2x2 cell
        top, left, bottom, right = r["box"]
        y, x = r["position"]
        assert top < 2 * y + 2 and 2 * y < bottom and left < 2 * x + 2 and 2 * x < right


def test_the_losses_are_the_papers_terms_computed_by_hand():
    """CE + clst Clst - sep Sep + l1 L1 on a tiny float64 network with fixed weights, against the terms
    written out: add-on layers, squared distances, min over positions, per-class min over prototypes."""
    net = toy_prototype_network()
    layer, last = net.backbone[1], net.backbone[3]
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in [*net.parameters()]:
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64))
        layer.prototypes.copy_(torch.rand(6, 3, generator=gen, dtype=torch.float64))
    images = torch.rand(4, 3, 8, 12, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2])
    conv, c1, c2 = net.backbone[0], layer.add_on[0], layer.add_on[2]
    with torch.no_grad():
        f = torch.nn.functional.conv2d(images, conv.weight, conv.bias, stride=2)
        hidden = torch.relu(torch.einsum("oc,bchw->bohw", c1.weight[:, :, 0, 0], f) + c1.bias[None, :, None, None])
        z = torch.sigmoid(torch.einsum("oc,bchw->bohw", c2.weight[:, :, 0, 0], hidden) + c2.bias[None, :, None, None])
        d = ((z[:, None] - layer.prototypes[None, :, :, None, None]) ** 2).sum(2).flatten(2).amin(2)  # [4, 6]
        pclass = torch.tensor([0, 0, 1, 1, 2, 2])
        clst = torch.stack([d[b, pclass == labels[b]].min() for b in range(4)]).mean()
        sep = torch.stack([d[b, pclass != labels[b]].min() for b in range(4)]).mean()
        logits = torch.log((d + 1) / (d + 1e-4)) @ last.weight.T
        ce = (torch.logsumexp(logits, 1) - logits[torch.arange(4), labels]).mean()
        l1 = sum(abs(float(last.weight[c, j])) for c in range(3) for j in range(6) if pclass[j] != c)
    terms = ProtoPNetLoss(net, clst=0.7, sep=0.3, l1=0.05)(images, labels)
    out = {k: float(v.detach()) for k, v in terms.items() if k != "logits"}
    # the cross-entropy is taken in float32 (as under autocast), the rest in the model's float64
    assert out["ce"] == pytest.approx(float(ce), rel=1e-6)
    for key, want in {"clst": clst, "sep": sep, "l1": l1}.items():
        assert out[key] == pytest.approx(float(want), rel=1e-10), key
    assert out["loss"] == pytest.approx(float(ce + 0.7 * clst - 0.3 * sep + 0.05 * l1), rel=1e-6)
    # the last-layer stage: cross-entropy of the fixed scores + l1 x the wrong-class weights' L1
    scores = torch.log((d + 1) / (d + 1e-4))
    stage = _LastLayer(last, layer.prototype_class, 0.05)(scores, labels)
    assert float(stage["loss"].detach()) == pytest.approx(float(ce + 0.05 * l1), rel=1e-6)


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
    real_push, real_fit = tp._push, tp.fit  # the push of a stage (push_prototypes checks its arguments first)
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
        monkeypatch.setattr(tp, "_push", cut_push)
    else:
        monkeypatch.setattr(tp, "fit", cut_fit)
    with pytest.raises(KeyboardInterrupt):
        fit_protopnet(small_net(), shapes32, out_dir=tmp_path / "cut", **settings)
    done = json.loads((tmp_path / "cut" / "stages.json").read_text())["done"]
    assert done == ["01-warmup", "02-joint", "03-push", "04-last"] + (["05-joint"] if where == "push" else [])
    monkeypatch.setattr(tp, "_push", real_push)
    monkeypatch.setattr(tp, "fit", real_fit)
    # what a kill between an atomic write and its rename leaves, in the run folder, the prototypes' folder and a
    # finished stage's folder (where no stage's fit runs again to clean up)
    cut = tmp_path / "cut"
    leftovers = [
        cut / ".stage_state.safetensors.k3j5h7g9.tmp.safetensors",
        cut / "prototypes" / ".source-000007.png.a1b2c3d4.tmp.png",
        cut / "stages" / "02-joint" / ".history.json.zz99yy88.tmp.json",
    ]
    for path in leftovers:
        path.write_bytes(b"partial")
    resumed, history, records = fit_protopnet(small_net(), shapes32, out_dir=cut, resume=True, **settings)
    assert not [path for path in leftovers if path.exists()]
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert records == full_records
    assert history == full_history
    assert [h["stage"] for h in history][-2:] == ["06-push", "07-last"]
    # a fresh (not resumed) run in the same folder starts over: no earlier progress is left to pick up
    fit_protopnet(small_net(), shapes32, out_dir=tmp_path / "cut", **{**settings, "cycles": 1})
    assert json.loads((tmp_path / "cut" / "stages.json").read_text())["done"][-1] == "04-last"
    assert not (tmp_path / "cut" / "stages" / "05-joint").exists()


def test_each_stage_trains_what_the_paper_says_at_its_learning_rates(tmp_path, monkeypatch):
    """The optimiser of every stage, read at each of its steps: warm-up trains the add-on layers and the
    prototypes at their rates; joint adds the backbone, every rate x0.1 per joint epoch (joint_lr_step=1)
    counted across cycles; the last-layer stages train the last layer at last_lr; no weight decay on the
    prototypes. The push records keep each source image's file name."""
    made = []

    class Recorded(torch.optim.Adam):  # the real Adam, which notes its groups' rates at every step
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.rates = []
            made.append(self)

        def step(self, closure=None):
            self.rates.append([group["lr"] for group in self.param_groups])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", Recorded)
    data = InMemory(Shapes("train", 64, size=32, seed=0))
    names = [f"img-{i:03d}.png" for i in range(64)]
    lr = {"features_lr": 1e-4, "add_on_lr": 2e-3, "prototypes_lr": 5e-3, "last_lr": 7e-4}
    net, _, records = fit_protopnet(
        small_net(), data, prototypes_per_class=1, dim=8, warm_epochs=1, joint_epochs=2, last_epochs=1, cycles=2,
        joint_lr_step=1, weight_decay=1e-3, batch_size=32, progress=False, device="cpu", out_dir=tmp_path / "run",
        names=names, **lr,
    )  # fmt: skip
    assert len(made) == 5  # warm-up, joint, last, joint, last (the pushes use no optimiser)
    warm, joint1, last1, joint2, last2 = made
    head = [lr["add_on_lr"], lr["prototypes_lr"]]
    assert warm.rates == [head] * 2  # 64 images / 32 per batch: 2 steps per epoch
    every = [lr["features_lr"], *head]
    decayed = lambda epochs: [[r * 0.1**epochs for r in every]] * 2  # noqa: E731  (2 steps of one joint epoch)
    torch.testing.assert_close(
        torch.tensor(joint1.rates, dtype=torch.float64),
        torch.tensor(decayed(0) + decayed(1), dtype=torch.float64),
        rtol=1e-12,
        atol=0,
    )
    torch.testing.assert_close(
        torch.tensor(joint2.rates, dtype=torch.float64),
        torch.tensor(decayed(2) + decayed(3), dtype=torch.float64),
        rtol=1e-12,
        atol=0,
    )
    assert last1.rates == last2.rates == [[lr["last_lr"]]] * 2
    _, layer, last = find_prototype_layer(net)
    ids = lambda opt: [{id(p) for p in group["params"]} for group in opt.param_groups]  # noqa: E731
    head_ids = [{id(p) for p in layer.add_on.parameters()}, {id(layer.prototypes)}]
    assert ids(warm) == head_ids
    backbone = {id(p) for p in net.parameters()} - head_ids[0] - head_ids[1] - {id(last.weight)}
    assert ids(joint1) == [backbone, *head_ids]
    assert ids(last1) == [{id(last.weight)}]
    assert [g["weight_decay"] for g in warm.param_groups] == [1e-3, 0.0]
    assert [g["weight_decay"] for g in joint1.param_groups] == [1e-3, 1e-3, 0.0]
    assert all(r["file"] == names[r["index"]] for r in records) and len({r["file"] for r in records}) > 1


def test_the_warm_up_moves_only_the_add_on_layers_and_prototypes_and_the_stage_state_is_durable(tmp_path, monkeypatch):
    """After the warm-up (cut as the joint stage starts) every backbone weight and batch-norm statistic and the
    last layer are bit-identical to the network's start; the stage state file is flushed to disk (fsync)."""
    import xcnn._io
    import xcnn.training.protopnet as tp

    real_fit, real_fsync = tp.fit, xcnn._io._fsync
    calls, synced = [], []

    def cut(*args, **kwargs):
        calls.append(kwargs["out_dir"].name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_fit(*args, **kwargs)

    def fsync(path):
        synced.append(Path(path).name)
        real_fsync(path)

    monkeypatch.setattr(tp, "fit", cut)
    monkeypatch.setattr(xcnn._io, "_fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        fit_protopnet(
            small_net(), InMemory(Shapes("train", 64, size=32, seed=0)), prototypes_per_class=1, dim=8, warm_epochs=1,
            batch_size=32, progress=False, device="cpu", out_dir=tmp_path / "run",
        )  # fmt: skip
    assert calls == ["01-warmup", "02-joint"]
    assert any(name.startswith(".stage_state.safetensors.") for name in synced)
    from safetensors.torch import load_file

    after = load_file(str(tmp_path / "run" / "stage_state.safetensors"))
    before = protopnet(small_net(), 1, dim=8, seed=0).backbone.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"pool.add_on.0.weight", "pool.add_on.0.bias", "pool.add_on.2.weight", "pool.add_on.2.bias",
                     "pool.prototypes"}  # fmt: skip


def test_bad_training_arguments_are_refused_before_any_work(tmp_path):
    data = InMemory(Shapes("train", 64, size=32, seed=0))
    model, out = small_net(), tmp_path / "run"
    cases = [
        ({"names": ["a.png"] * 63}, ValueError, "names has 63 file names for the 64 images"),
        ({"names": "a.png"}, TypeError, "names must be a sequence"),
        ({"names": [1] * 64}, TypeError, "names must hold file names"),
        ({"resume": True, "out_dir": None}, ValueError, "resume=True needs out_dir"),
        ({"resume": "yes"}, TypeError, "resume must be True or False"),
        ({"sep": -0.1}, ValueError, r"sep must be in \[0, inf\)"),
        ({"clst": math.nan}, ValueError, "clst must be finite"),
        ({"features_lr": 0.0}, ValueError, "features_lr must be a positive number"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive integer"),
        ({"batch_size": 65}, ValueError, "fewer than one batch"),
        ({"warm_epochs": -1}, ValueError, r"warm_epochs must be in \[0, inf\)"),
        ({"seed": 1.5}, TypeError, "seed must be an integer"),
        ({"seed": 2**64}, ValueError, r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
        ({"dim": 0}, ValueError, "dim must be a positive integer"),
        ({"device": "nope"}, ValueError, "device: 'nope' is not a device"),
        ({"val_data": torch.rand(4, 3, 32, 32)}, TypeError, "val_data must be a dataset"),
        ({"dim": 10**6}, ValueError, "would need"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            fit_protopnet(model, data, **{"out_dir": out, **kwargs})
    bad = InMemory(Shapes("train", 64, size=32, seed=0))
    bad.tensors["image"][0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"data's sample 0: image values must be in \[0, 1\] .* and NaN"):
        fit_protopnet(model, bad, out_dir=out)
    with pytest.raises(ValueError, match=r"val_data's sample 0: image values must be in \[0, 1\] .* and NaN"):
        fit_protopnet(model, data, val_data=bad, out_dir=out)
    wrong = InMemory(Shapes("train", 64, size=32, seed=0))
    wrong.tensors["label"][5] = 9
    with pytest.raises(ValueError, match="label 9; labels are class indices \\[0, 6\\)"):
        fit_protopnet(model, wrong, out_dir=out)
    assert not out.exists()  # nothing was written
    net = protopnet(model, 1, dim=8)
    for kwargs, message in [
        ({"percentile": 100}, r"percentile must be in \(0, 100\)"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"num_workers": -1}, r"num_workers must be in \[0, inf\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            push_prototypes(net, data, **kwargs)
    late = InMemory(Shapes("train", 64, size=32, seed=0))
    late.tensors["image"][37, 1] = math.inf  # not the first sample: found as its batch is read
    with pytest.raises(ValueError, match=r"push: data \(samples 32 on\): images contain NaN or Inf"):
        push_prototypes(net, late, batch_size=16)
    with pytest.raises(ValueError, match="push: data is empty"):
        push_prototypes(net, TensorDataset(torch.rand(0, 3, 32, 32), torch.zeros(0, dtype=torch.long)))


def test_a_prototype_layer_too_large_for_memory_is_refused_before_it_is_allocated(monkeypatch):
    """dim=10**6 would be a 10**12-weight add-on convolution (4 TB in float32, x4 to train it). First, on a machine
    said to have 32 MiB: dim=2000 (a 4-million-weight add-on layer: 66 MB to train, 16 MB to build) is refused
    before any of it is built, which holds whatever the allocator would do with the request (overcommit)."""
    import importlib

    import xcnn._validate

    ip = importlib.import_module("xcnn.interpretable.protopnet")  # the package exports a function of that name

    built = []

    class Noted(ip.PrototypeLayer):  # the real layer, noting that it was made
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(xcnn._validate, "physical_memory", lambda: 32 * 2**20)
        patch.setattr(ip, "PrototypeLayer", Noted)
        # 4 bytes x (4 x 4 060 072 weights + 8 x 8 positions x (3 x 2000 + 3 x 12)) = 66 506 368 bytes
        with pytest.raises(
            ValueError, match=r"of dim=2000 on 16 channels would need 0\.0619 GiB, more than this machine's 0\.0312 GiB"
        ):
            protopnet(small_net(), 2, dim=2000)
        assert not built  # refused before the layer was made
        protopnet(small_net(), 2, dim=64)  # a layer that fits is built
        assert built
    with pytest.raises(
        ValueError, match=r"protopnet: a prototype layer of 12 prototypes .* of dim=1000000 .* would need"
    ):
        protopnet(small_net(), 2, dim=10**6)
    with pytest.raises(ValueError, match="would need"):
        protopnet(small_net(), 10**12, dim=8)
    for kwargs, error, message in [
        ({"eps": 0}, ValueError, r"eps must be in \(0, 1\)"),
        ({"eps": 1.0}, ValueError, r"eps must be in \(0, 1\)"),
        ({"where": 3}, TypeError, "where must be a module name"),
        ({"seed": "0"}, TypeError, "seed must be an integer"),
    ]:
        with pytest.raises(error, match=message):
            protopnet(small_net(), 2, **kwargs)


def test_protopnet_on_mobilenet_v3_small_takes_the_heads_pool_not_a_squeeze_excitation_pool():
    """mobilenet_v3_small's SE blocks hold global average pools too, and its head is Linear-Hardswish-
    Dropout-Linear: the prototype layer replaces the pool before the head, the last layer the whole head."""
    base = load_model("mobilenet_v3_small", pretrained=False)
    pools = [n for n, m in base.backbone.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    assert len(pools) > 1 and pools[-1] == "avgpool"
    with pytest.warns(UserWarning, match="took 'avgpool'"):
        net = protopnet(base, 1, dim=8)
    name, layer, last = find_prototype_layer(net)
    assert name == "avgpool" and layer.in_channels == 576 and layer.num_prototypes == 1000
    assert [n for n, m in net.backbone.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)] == pools[:-1]
    assert net.backbone.classifier is last and (last.in_features, last.out_features) == (1000, 1000)
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), Tap(net.backbone, ["avgpool"]) as tap:
        logits = net.eval()(x)
    torch.testing.assert_close(logits, last(tap.get("avgpool").flatten(1)))


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


def test_a_resume_whose_progress_has_no_settings_record_is_refused(tmp_path, monkeypatch):
    """ProtoPNet keeps its progress in the stage state and the stages' checkpoints, not in the run folder's
    checkpoint.pt: a resume of a run whose protopnet_training.json is gone (here with another clst, which would
    have been trained on silently) is refused, whether it was cut inside its first stage (a stage checkpoint
    only) or after it (the stage state); with the record, other settings are refused too."""
    import xcnn.training.protopnet as tp

    data = InMemory(Shapes("train", 64, size=32, seed=0))
    settings = {"prototypes_per_class": 1, "dim": 8, "warm_epochs": 2, "joint_epochs": 1, "last_epochs": 0,
                "batch_size": 32, "progress": False, "device": "cpu"}  # fmt: skip
    real_fit = tp.fit

    def stop(epoch, metrics):
        raise KeyboardInterrupt

    def cut_inside_warm_up(*args, **kwargs):  # after the warm-up's first epoch and its checkpoint
        return real_fit(*args, **{**kwargs, "callbacks": [stop]})

    def cut_after_warm_up(*args, **kwargs):
        if kwargs["out_dir"].name != "01-warmup":
            raise KeyboardInterrupt
        return real_fit(*args, **kwargs)

    for cut, left in (
        (cut_inside_warm_up, "stages/01-warmup/checkpoint.pt"),
        (cut_after_warm_up, "stage_state.safetensors"),
    ):
        out = tmp_path / cut.__name__
        monkeypatch.setattr(tp, "fit", cut)
        with pytest.raises(KeyboardInterrupt):
            fit_protopnet(small_net(), data, out_dir=out, **settings)
        monkeypatch.setattr(tp, "fit", real_fit)
        assert (out / left).is_file()
        with pytest.raises(ValueError, match=r"other settings \(clst\)"):
            fit_protopnet(small_net(), data, out_dir=out, resume=True, clst=0.5, **settings)
        (out / "protopnet_training.json").unlink()
        with pytest.raises(ValueError, match=r"has no settings record protopnet_training\.json beside it"):
            fit_protopnet(small_net(), data, out_dir=out, resume=True, clst=0.5, **settings)


def test_the_data_are_checked_once_not_again_at_every_push(monkeypatch):
    """Sample 0 is read once by the checks before training, and the data's checks (every exposed label, the
    first image) run once for a run of two cycles (two pushes), not again at each push."""
    import xcnn.training.protopnet as tp

    class Counted(torch.utils.data.Dataset):
        def __init__(self, data):
            self.data, self.reads = data, 0

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            self.reads += i == 0
            return self.data[i]

    data = Counted(InMemory(Shapes("train", 64, size=32, seed=0)))
    real_fit, real_check = tp.fit, tp.check_labels
    reads_before_training, checks = [], []

    def first_fit(*args, **kwargs):
        reads_before_training.append(data.reads)
        return real_fit(*args, **kwargs)

    def check_labels(*args, **kwargs):
        checks.append(args[0])
        return real_check(*args, **kwargs)

    monkeypatch.setattr(tp, "fit", first_fit)
    monkeypatch.setattr(tp, "check_labels", check_labels)
    fit_protopnet(small_net(), data, prototypes_per_class=1, dim=8, warm_epochs=0, joint_epochs=1, last_epochs=0,
                  cycles=2, batch_size=32, progress=False, device="cpu")  # fmt: skip
    assert reads_before_training[0] == 1
    assert checks == [data]


def test_a_bfloat16_network_becomes_a_bfloat16_prototype_network(resnet18):
    """protopnet() on a bfloat16 resnet18 (it raised torch's dtype error in its head check): the network and its
    prototype view run on bfloat16 images, and the logits are the last layer applied to the scores."""
    import copy

    base = copy.deepcopy(resnet18).to(torch.bfloat16)
    net = protopnet(base, 1, dim=8)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    name, _, last = find_prototype_layer(net)
    with torch.no_grad(), Tap(net.backbone, [name]) as tap:
        logits = net.eval()(x)
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, 1000) and net.mean.dtype == torch.bfloat16
    assert torch.equal(logits, last(tap.get(name).flatten(1)))
    with torch.no_grad():
        scores = prototype_view(net).eval()(x)
    assert scores.dtype == torch.bfloat16 and torch.equal(scores, tap.get(name).flatten(1))


def test_costs_pull_own_class_and_push_other_classes():
    d = torch.tensor([[1.0, 4.0, 0.5, 9.0], [2.0, 3.0, 6.0, 0.25]])
    pclass = torch.tensor([0, 0, 1, 1])
    clst, sep = protopnet_costs(d, torch.tensor([0, 1]), pclass)
    assert float(clst) == pytest.approx((1.0 + 0.25) / 2)
    assert float(sep) == pytest.approx((0.5 + 2.0) / 2)
