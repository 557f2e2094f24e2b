"""Layer-wise inspection: filter importance (Taylor against finite differences and exact ablation on a
model that is linear after the layer), batched ablation against one channel at a time, the intervention
hook's removal on errors, bad input; layer-wise probes (perfect on separable features, the backbone
untouched, scikit-learn's logistic regression, ridge's closed form, probe-CAM's mean = the probe logit)."""

from __future__ import annotations

import pytest
import torch

import xcnn
from xcnn.hooks import Tap, intervene, scale_channels
from xcnn.inspection import (
    ablation_effect,
    class_association,
    feature_correlation,
    filter_importance,
    fit_linear,
    layer_probes,
    layer_similarity,
    linear_cka,
    pooled_features,
    redundant_pairs,
)
from xcnn.models import Classifier
from xcnn.pipelines import benchmark_data

from .test_lap_training import SmoothNet


def smooth_model() -> Classifier:
    torch.manual_seed(0)
    model = Classifier(SmoothNet().double(), input_size=(8, 8)).eval()
    with torch.no_grad():
        model.backbone.fc.weight[:, 2] = 0  # channel 2 of `features` feeds nothing
    return model


def data(n: int = 6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"image": torch.rand(n, 3, 8, 8, generator=gen, dtype=torch.float64), "label": torch.arange(n) % 3}


@pytest.mark.parametrize("layer", ["features", "features.0"])
def test_taylor_importance_is_the_first_order_change_of_the_logit(layer):
    """Against finite differences (scaling one channel by 1 - eps): at the last layer, before a linear head, and
    at the first convolution, whose A * dy/dA changes sign across positions (the absolute value is taken of the
    sum over positions, the channel's first-order effect, not per position)."""
    model, d = smooth_model(), data()
    taylor = filter_importance(model, d, layer, "taylor")
    channels = 5 if layer == "features" else 4
    assert taylor.shape == (channels,) and taylor.dtype == torch.float64
    eps = 1e-6
    y = d["label"]
    with torch.no_grad():
        clean = model(d["image"]).gather(1, y[:, None])[:, 0]
        for k in range(channels):
            factors = torch.ones(channels, dtype=torch.float64)
            factors[k] = 1 - eps
            with scale_channels(model.backbone, layer, factors):
                moved = model(d["image"]).gather(1, y[:, None])[:, 0]
            numeric = ((clean - moved) / eps).abs().mean()
            assert float(taylor[k]) == pytest.approx(float(numeric), rel=1e-5, abs=1e-12), k
    if layer == "features":
        assert float(taylor[2]) == 0.0


def test_ablation_is_exact_where_the_network_is_linear_after_the_layer_and_batching_changes_nothing():
    model, d = smooth_model(), data()
    ablation = filter_importance(model, d, "features", "ablation")
    one_at_a_time = filter_importance(model, d, "features", "ablation", batch_size=6)  # one channel per forward
    many = filter_importance(model, d, "features", "ablation", batch_size=64)  # all five in one forward
    torch.testing.assert_close(one_at_a_time, many, rtol=1e-12, atol=1e-12)
    assert float(ablation[2]) == 0.0  # a channel that feeds nothing changes nothing
    # mean pooling then a linear head: zeroing channel k lowers the logit by exactly W[y,k] * mean(A_k)
    feats = model.backbone.features(d["image"]).mean((2, 3))
    expected = (model.backbone.fc.weight[d["label"]] * feats).mean(0).detach()
    torch.testing.assert_close(ablation, expected, rtol=1e-10, atol=1e-12)
    effect = ablation_effect(model, d, "features", [2])
    assert effect["logit_drop"] == 0.0 and effect["accuracy"] == effect["ablated_accuracy"]
    both = ablation_effect(model, d, "features", [0, 1])
    assert both["logit_drop"] == pytest.approx(float(expected[0] + expected[1]), rel=1e-10)
    assert set(ablation_effect(model, {"image": d["image"]}, "features", [0], targets="predicted")) == {"logit_drop"}


def test_the_intervention_hook_is_removed_even_when_the_forward_fails():
    model, d = smooth_model(), data()
    layer = model.backbone.features
    with pytest.raises(RuntimeError, match="boom"), intervene(model.backbone, "features", lambda out: out * 0):
        assert len(layer._forward_hooks) == 1
        raise RuntimeError("boom")
    assert not layer._forward_hooks

    def broken(out):
        raise ValueError("bad intervention")

    with pytest.raises(ValueError, match="bad intervention"), intervene(model.backbone, "features", broken):
        model(d["image"])
    assert not layer._forward_hooks
    with pytest.raises(ValueError, match="factors of shape"), scale_channels(model.backbone, "features", torch.ones(3)):
        model(d["image"])
    assert not layer._forward_hooks


def test_bad_inspection_input():
    model, d = smooth_model(), data()
    with pytest.raises(ValueError, match="unknown importance method 'gradient'"):
        filter_importance(model, d, "features", "gradient")
    with pytest.raises(ValueError, match="needs a feature map"):
        filter_importance(model, d, "fc", "taylor")
    with pytest.raises(ValueError, match="needs labelled data"):
        filter_importance(model, {"image": d["image"]}, "features")
    with pytest.raises(ValueError, match="not in the model"):
        filter_importance(model, d, "nope")
    with pytest.raises(ValueError, match="out of range"):
        ablation_effect(model, d, "features", [7])


def test_linear_cka_properties():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(40, 9, generator=gen, dtype=torch.float64)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), rel=1e-12)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    assert linear_cka(x, 3.7 * x @ q) == pytest.approx(1.0, abs=1e-12)  # orthogonal + isotropic scaling
    assert linear_cka(x @ q + 5.0, y) == pytest.approx(linear_cka(x, y), rel=1e-10)  # and a shift
    assert 0 < linear_cka(x, y) < 0.5
    stretch = torch.diag(torch.tensor([1.0, 1, 1, 1, 1, 20], dtype=torch.float64))
    assert linear_cka(x, x @ stretch) < 0.9  # not invariant to anisotropic scaling
    with pytest.raises(ValueError, match="constant"):
        linear_cka(torch.ones(5, 2), x[:5])
    with pytest.raises(ValueError, match="same N"):
        linear_cka(x, y[:10])


def test_correlation_association_and_layer_similarity_on_a_model():
    model, d = smooth_model(), data(12)
    feats, labels = pooled_features(model, d, ["features", "features.1"])
    assert feats["features"].shape == (12, 5) and torch.equal(labels, d["label"])
    # pooled features are each channel's mean over the positions (computed here by running the modules directly)
    with torch.no_grad():
        direct = model.backbone.features(d["image"]).mean((2, 3))
        torch.testing.assert_close(feats["features"], direct, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(feats["features.1"], model.backbone.features[:2](d["image"]).mean((2, 3)))
    corr = feature_correlation(model, d, "features")
    expected = torch.corrcoef(direct.T)
    torch.testing.assert_close(corr, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(corr, corr.T) and bool((corr.diagonal() == 1).all())
    pairs = redundant_pairs(corr, top=3)
    assert len(pairs) == 3 and all(i < j for i, j, _ in pairs)
    assert abs(pairs[0][2]) == float(corr.triu(1).abs().max())
    assoc = class_association(model, d, "features")
    torch.testing.assert_close(assoc[1], direct[d["label"] == 1].mean(0))
    sim = layer_similarity(model, d, ["features.0", "features.1", "features"])
    assert sim.shape == (3, 3) and torch.equal(sim, sim.T) and bool((sim.diagonal() == 1).all())
    # features.1 is the softplus of features.0: a monotone map of it, similar but not identical
    assert 0.5 < float(sim[0, 1]) < 1.0
    with pytest.raises(ValueError, match="needs labelled data"):
        class_association(model, {"image": d["image"]}, "features")
    with pytest.raises(ValueError, match="feature map"):
        pooled_features(model, d, ["fc"])


# ---- layer-wise probes ------------------------------------------------------------------------------


class ColourNet(torch.nn.Module):
    """A BatchNorm'd 1x1 conv of the image (``feat``), then a smooth conv (``deep``), pooled, linear. The
    pooled ``feat`` is an affine map of the image's mean colour: colour-coded classes are linearly
    separable there by construction."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
        self.deep = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, 2, 1), torch.nn.Softplus())
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.pool(self.deep(self.feat(x))).flatten(1))


def colour_data(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Class k: channel k brighter (0.6-0.9) than the others (0.1-0.4), plus pixel noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    level = 0.1 + 0.3 * torch.rand(n, 3, 1, 1, generator=gen)
    level[torch.arange(n), labels] += 0.5
    images = (level + 0.05 * torch.rand(n, 3, 8, 8, generator=gen)).clamp(0, 1)
    return {"image": images, "label": labels}


def colour_model() -> Classifier:
    torch.manual_seed(0)
    return Classifier(ColourNet(), input_size=(8, 8))


@pytest.mark.parametrize("method", ["logistic", "ridge"])
def test_a_probe_on_linearly_separable_features_is_perfect_and_the_backbone_is_untouched(method):
    model = colour_model().train()  # a model left in training mode: BatchNorm would update if run in it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probes = layer_probes(model, colour_data(60, 0), ["feat"], method=method, progress=False)
    assert probes.accuracy(colour_data(60, 1), progress=False) == {"feat": 1.0}
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # weights and BN statistics bit-identical
    assert probes.weights["feat"].shape == (3, 4) and probes.biases["feat"].shape == (3,)


def test_logistic_probe_equals_scikit_learn():
    """Mean cross-entropy + l2/2 ||W||^2 on standardised features is scikit-learn's multinomial
    LogisticRegression with C = 1/(N l2): its objective C Σ CE + ||W||²/2 is then ours divided by l2."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(90, 5, generator=gen, dtype=torch.float64) * torch.tensor([1, 2, 0.5, 3, 1.0]) + 2
    y = (x[:, 0] + x[:, 1] - x[:, 3] + torch.randn(90, generator=gen, dtype=torch.float64)).gt(0).long()
    y = y + (x[:, 2] > 2.2).long()  # 3 classes, not separable
    l2 = 0.05
    w, b = fit_linear(x, y, 3, l2=l2)
    scaler = StandardScaler().fit(x.numpy())
    ref = LogisticRegression(C=1 / (l2 * len(x)), tol=1e-12, max_iter=10_000).fit(
        scaler.transform(x.numpy()), y.numpy()
    )
    ours = (x @ w.T + b).softmax(1)
    theirs = torch.from_numpy(ref.predict_proba(scaler.transform(x.numpy())))
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)  # L-BFGS at torch's default tolerances


def test_ridge_probe_is_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    y = torch.arange(50) % 3
    l2 = 0.1
    w, b = fit_linear(x, y, 3, method="ridge", l2=l2)
    z = (x - x.mean(0)) / x.std(0, correction=0)
    t = torch.nn.functional.one_hot(y, 3).double()
    # minimiser of ||z W' + 1 c - T||^2 + l2 N ||W'||^2, by a generic least-squares solve of the augmented system
    a = torch.cat(
        [
            torch.cat([z, torch.ones(50, 1, dtype=torch.float64)], 1),
            (l2 * 50) ** 0.5 * torch.cat([torch.eye(4), torch.zeros(4, 1)], 1).double(),
        ]
    )
    rhs = torch.cat([t, torch.zeros(4, 3, dtype=torch.float64)])
    sol = torch.linalg.lstsq(a, rhs).solution
    expected = torch.cat([z, torch.ones(50, 1, dtype=torch.float64)], 1) @ sol
    torch.testing.assert_close(x @ w.T + b, expected, atol=1e-10, rtol=0)


def test_predict_top_and_probe_cam_whose_mean_is_the_probe_logit():
    model = colour_model().eval()
    d = colour_data(30, 0)
    probes = layer_probes(model, d, ["feat", "deep"], progress=False)
    images = colour_data(4, 2)["image"]
    probs = probes.predict(images)
    assert set(probs) == {"feat", "deep"}
    for p in probs.values():
        assert p.shape == (4, 3)
        torch.testing.assert_close(p.sum(1), torch.ones(4))
    top = probes.top(images, k=2)
    assert len(top["feat"]) == 4 and len(top["feat"][0]) == 2
    assert top["feat"][0][0][1] >= top["feat"][0][1][1]
    # the probe-CAM averages to the probe's logit (pooling is a mean and the probe is linear)
    logits = probes.logits(images)
    with torch.no_grad(), Tap(model.backbone, ["deep"]) as tap:
        model(images)
    classes = torch.tensor([0, 1, 2, 1])
    maps = probes.class_maps(tap.get("deep"), "deep", classes)
    assert maps.shape == (4, 4, 4)
    torch.testing.assert_close(maps.mean((1, 2)).double(), logits["deep"][torch.arange(4), classes], atol=1e-5, rtol=0)
    # under the explainer contract, with every metric's input: [B,H,W] in [0,1]
    expl = xcnn.explainer("probe_cam", model, probes=probes)
    assert expl.layers == ["deep"]
    out = expl(images, targets=classes)
    assert out.shape == (4, 8, 8) and out.min() >= 0 and out.max() <= 1
    # the explainer returns exactly these maps, upsampled and min-max normalised
    torch.testing.assert_close(out, xcnn.explain.normalize_maps(maps, (8, 8)), atol=1e-5, rtol=0)


def test_transfer_probes_and_bad_probe_input():
    model = colour_model().eval()
    d = colour_data(30, 0)
    # another task than the model's: 2 classes (is the red channel brightest?)
    two = {"image": d["image"], "label": (d["label"] == 0).long()}
    probes = layer_probes(model, two, ["feat"], class_names=["other", "red"], progress=False)
    assert probes.num_classes == 2 and probes.class_names == ["other", "red"]
    assert not probes.model_task and layer_probes(model, d, ["feat"], progress=False).model_task
    # as many classes as the model, but declared another task: targets=None is the probe's own top-1
    other = layer_probes(model, d, ["feat"], num_classes=3, progress=False)
    assert not other.model_task
    maps = xcnn.explainer("probe_cam", model, probes=probes)(d["image"][:3])  # None: the probe's own top-1
    assert maps.shape == (3, 8, 8)
    with pytest.raises(ValueError, match="only one class"):
        layer_probes(model, {"image": d["image"], "label": torch.zeros(30, dtype=torch.long)}, ["feat"])
    with pytest.raises(ValueError, match="2 images, fewer than the 3 classes"):
        layer_probes(model, {"image": d["image"][:2], "label": torch.tensor([0, 2])}, ["feat"])
    with pytest.raises(ValueError, match="labelled data"):
        layer_probes(model, {"image": d["image"]}, ["feat"])
    with pytest.raises(ValueError, match="unknown probe method 'svm'"):
        layer_probes(model, d, ["feat"], method="svm")
    with pytest.raises(ValueError, match="pooled features need a feature map"):
        layer_probes(model, d, ["fc"])
    with pytest.raises(ValueError, match="no probe for layer"):
        xcnn.explainer("probe_cam", model, layer="deep", probes=probes)
    with pytest.raises(TypeError, match="Probes object"):
        xcnn.explainer("probe_cam", model, probes={"feat": 1})


def test_default_probe_layers_are_the_stages(bench32):
    model, _, _ = bench32
    probes = layer_probes(model, benchmark_data(60, 32), progress=False)
    assert probes.layers == ["layer1", "layer2", "layer3", "layer4"]
    assert probes.class_names == model.class_names


# ---- monitoring through training --------------------------------------------------------------------


def test_monitored_training_records_every_epoch_survives_resume_and_trains_like_an_unmonitored_run(tmp_path):
    from xcnn.data.synthetic import Shapes
    from xcnn.inspection import Monitor, load_history
    from xcnn.training import fit
    from xcnn.training.benchmark import InMemory

    from .test_lap_training import small_shapesnet

    train, val = InMemory(Shapes("train", 192, size=32, seed=3)), InMemory(Shapes("val", 64, size=32, seed=3))
    settings = {"epochs": 3, "val_data": val, "batch_size": 32, "seed": 1, "device": "cpu", "progress": False}
    plain = small_shapesnet()
    fit(plain, train, out_dir=tmp_path / "plain", **settings)
    watched = small_shapesnet()
    history = fit(watched, train, out_dir=tmp_path / "a", callbacks=[Monitor(val, images=64, top=5)], **settings)
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # monitoring changes nothing in training, BN statistics included
    records = load_history(tmp_path / "a")
    assert records["layers"] == ["layer1", "layer2", "layer3", "layer4"] and records["images"] == 64
    assert [r["epoch"] for r in records["records"]] == [0, 1, 2]
    first, last = records["records"][0], records["records"][-1]
    assert set(first["probe_accuracy"]) == set(records["layers"])
    assert all(0 <= a <= 1 for a in last["probe_accuracy"].values())
    assert first["cka_to_previous"] == {} and set(last["cka_to_previous"]) == set(records["layers"])
    assert all(0 < v <= 1 + 1e-9 for v in last["cka_to_previous"].values())
    assert last["importance"]["layer"] == "layer4" and len(last["importance"]["top"]) == 5
    values = [v for _, v in last["importance"]["top"]]
    assert values == sorted(values, reverse=True)
    assert last["val_acc"] == history[-1]["val/acc"]
    assert history[-1]["monitor/probe_acc/layer4"] == last["probe_accuracy"]["layer4"]
    assert "monitor/cka_previous/layer1" in history[-1] and "monitor/cka_previous/layer1" not in history[0]

    # cut after the first epoch's checkpoint, resumed: the same history as the uninterrupted run
    def crash(epoch, metrics):
        if epoch == 0:
            raise RuntimeError("cut")

    with pytest.raises(RuntimeError, match="cut"):
        fit(
            small_shapesnet(),
            train,
            out_dir=tmp_path / "b",
            callbacks=[Monitor(val, images=64, top=5), crash],
            **settings,
        )
    assert len(load_history(tmp_path / "b")["records"]) == 1
    fit(
        small_shapesnet(),
        train,
        out_dir=tmp_path / "b",
        resume=True,
        callbacks=[Monitor(val, images=64, top=5)],
        **settings,
    )
    assert load_history(tmp_path / "b") == records

    with pytest.raises(ValueError, match="no monitor records"):
        load_history(tmp_path / "plain")
    with pytest.raises(ValueError, match="labelled data"):
        Monitor({"image": val.images[:8]} if hasattr(val, "images") else {"image": torch.rand(8, 3, 32, 32)}).check(
            plain, 0
        )
    with pytest.raises(ValueError, match="every must be a positive"):
        Monitor(val, every=0)
    with pytest.raises(ValueError, match="layer 'fc' outputs \\[6\\] per image"):  # before any training
        fit(small_shapesnet(), train, out_dir=tmp_path / "c", callbacks=[Monitor(val, layers=["fc"])], **settings)
    assert not (tmp_path / "c" / "checkpoint.pt").exists()


MONITOR_DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from test_training_trainer import Blobs, small_net
from xcnn.inspection import Monitor
from xcnn.models import Classifier
from xcnn.training import fit
net = Classifier(small_net(), input_size=(16, 16))
fit(net, Blobs(), epochs=2, out_dir={out!r}, batch_size=32, progress=False, callbacks=[Monitor(Blobs(64, seed=1))])
flat = torch.cat([p.detach().flatten() for p in net.parameters()])
torch.save(flat, os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
"""


@pytest.mark.slow
def test_the_monitor_under_torchrun_records_on_rank_0_and_the_replicas_stay_identical(tmp_path):
    from pathlib import Path

    from xcnn.inspection import load_history

    from .conftest import torchrun

    torchrun(MONITOR_DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)), tmp_path)
    assert torch.equal(torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt"))
    history = load_history(tmp_path)
    assert [r["epoch"] for r in history["records"]] == [0, 1] and history["images"] == 64


def test_taylor_importance_equals_captum_gradient_x_activation_summed_per_channel():
    """captum's LayerGradientXActivation gives A ⊙ ∂y/∂A at a layer: its spatial sum per channel, in
    absolute value and averaged over images, is the Taylor importance."""
    from captum.attr import LayerGradientXActivation

    model, d = smooth_model(), data(8)
    ours = filter_importance(model, d, "features", "taylor", batch_size=3)  # batches of 3: 3 + 3 + 2 images
    attr = LayerGradientXActivation(model, model.backbone.features).attribute(d["image"], target=d["label"])
    torch.testing.assert_close(ours, attr.sum((2, 3)).abs().mean(0), rtol=1e-10, atol=1e-12)


def test_linear_cka_on_arrays_and_extreme_magnitudes_and_refusals():
    """CKA is invariant to scaling each representation: values near 1e200 (whose squares overflow float64)
    or 1e-200 (whose squares underflow) give the CKA of the unscaled ones; numpy arrays are accepted."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(30, 7, generator=gen, dtype=torch.float64) + x[:, :1]
    reference = linear_cka(x, y)
    assert 0.05 < reference < 0.95
    assert linear_cka(x * 1e200, y) == pytest.approx(reference, rel=1e-12)
    assert linear_cka(x * 1e-200, y * 1e250 + 3e250) == pytest.approx(reference, rel=1e-12)
    assert linear_cka(x.numpy(), y.float().numpy()) == pytest.approx(linear_cka(x, y.float()), rel=1e-12)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        linear_cka(bad, y)
    with pytest.raises(ValueError, match="y contains NaN or Inf"):
        linear_cka(x, torch.full((30, 2), float("inf")))
    with pytest.raises(TypeError, match="must be a \\[N,C\\] tensor or numpy array, got list"):
        linear_cka(x.tolist(), y)
    with pytest.raises(TypeError, match="real numbers"):
        linear_cka(x > 0, y)
    with pytest.raises(ValueError, match="at least 2 examples"):
        linear_cka(x[:1], y[:1])


def test_fit_alternate_fits_the_even_positions_and_measures_the_odd_ones():
    """A known answer: at even positions class 1 has the larger feature, at odd positions the smaller one. A
    probe fitted on the even rows is wrong on every odd row (accuracy 0); fitted on the rows it is measured on, it
    would be perfect."""
    from xcnn.inspection.probes import fit_alternate

    gen = torch.Generator().manual_seed(0)
    labels = (torch.arange(40) // 2) % 2  # both classes in both halves
    sign = torch.where(torch.arange(40) % 2 == 0, 1.0, -1.0).double()
    x = (sign * (2.0 * labels - 1) * (1 + torch.rand(40, generator=gen, dtype=torch.float64)))[:, None]
    weights, _, accuracy = fit_alternate({"f": x}, labels, ["f"], 2, 1e-3)
    assert accuracy == {"f": 0.0}
    assert float(weights["f"][1, 0] - weights["f"][0, 0]) > 0  # the even rows' rule: larger feature, class 1


def test_monitor_compares_each_check_with_the_previous_one_on_the_same_images_and_checks_when_due():
    """The CKA to the previous check is taken on the same (measuring) images: 1 for a model that did not change;
    with every=2 over 5 epochs the checks are at epochs 1, 3 and the last, 4."""
    from xcnn.inspection import Monitor
    from xcnn.training.trainer import TrainerContext

    model = colour_model().eval()
    monitor = Monitor(colour_data(30, 0), layers=["feat", "deep"], images=30, every=2, top=2)
    for epoch in range(5):
        monitor.on_epoch_end(TrainerContext(model, None, 0, 1, torch.device("cpu"), None, epoch, 5, {}))
    assert [r["epoch"] for r in monitor.records] == [1, 3, 4]
    assert monitor.records[0]["cka_to_previous"] == {}
    for record in monitor.records[1:]:
        assert record["cka_to_previous"] == pytest.approx({"feat": 1.0, "deep": 1.0}, abs=1e-12)


def test_images_that_are_not_pixels_in_0_1_are_refused_with_the_samples_named():
    from xcnn.inspection import Monitor

    model, d = smooth_model(), data(8)
    nan = {"image": d["image"].clone(), "label": d["label"]}
    nan["image"][5, 1, 2, 3] = float("nan")
    for call in [
        lambda: filter_importance(model, nan, "features", batch_size=4),
        lambda: filter_importance(model, nan, "features", "ablation", batch_size=4),
        lambda: pooled_features(model, nan, ["features"], batch_size=4),
        lambda: class_association(model, nan, "features", batch_size=4),
        lambda: ablation_effect(model, nan, "features", [0], batch_size=4),
        lambda: layer_similarity(model, nan, ["features.0", "features"], batch_size=4),
    ]:
        with pytest.raises(ValueError, match=r"data \(samples 4 onwards\): images contain NaN or Inf"):
            call()
    bright = {"image": d["image"] * 2, "label": d["label"]}
    with pytest.raises(ValueError, match=r"pixel values in \[0,1\]"):
        pooled_features(model, bright, ["features"])
    # the monitor checks its images when it is built: before any training starts or any file is written
    val = colour_data(16, 0)
    val["image"][9, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="images contain NaN"):
        Monitor(val, images=16)
    from torch.utils.data import TensorDataset

    with pytest.raises(ValueError, match="images contain NaN"):
        Monitor(TensorDataset(val["image"], val["label"]), images=16)


def test_bad_arguments_get_clear_errors():
    from xcnn.inspection import Monitor, inspect_model

    model, d = smooth_model(), data(12)
    # channels as an integer tensor are the list of its values
    assert ablation_effect(model, d, "features", torch.tensor([0, 1])) == ablation_effect(model, d, "features", [0, 1])
    for channels, error, message in [
        ([True], TypeError, "integer channel indices"),
        (torch.tensor([True, False]), TypeError, "channel indices"),
        ([0.5], TypeError, "integer channel indices"),
        ([], ValueError, "channels is empty"),
        (3, TypeError, "list of channel indices"),
    ]:
        with pytest.raises(error, match=message):
            ablation_effect(model, d, "features", channels)
    with pytest.raises(TypeError, match="integer channel indices"):
        filter_importance(model, d, "features", "ablation", channels=[False])
    # labels of another task than the model's (3 classes)
    with pytest.raises(ValueError, match="the data have the label 5, but the model has 3 classes"):
        filter_importance(model, {"image": d["image"], "label": torch.arange(12) % 6}, "features")
    with pytest.raises(TypeError, match="labels must be integer class indices"):
        filter_importance(model, {"image": d["image"], "label": d["label"].double()}, "features")
    with pytest.raises(ValueError, match="layers is empty"):
        inspect_model(model, d, layers=[])
    with pytest.raises(ValueError, match=r"layers names \['features'\] more than once"):
        layer_similarity(model, d, ["features", "features"])
    with pytest.raises(ValueError, match=r"layers names \['features'\] more than once"):
        pooled_features(model, d, ["features", "features.0", "features"])
    assert list(pooled_features(model, d, "features")[0]) == ["features"]  # one name is one layer
    with pytest.raises(TypeError, match="layers entry must be a module name"):
        pooled_features(model, d, [3])
    with pytest.raises(ValueError, match="images must be a positive integer, got -5"):
        inspect_model(model, d, layers=["features"], images=-5)
    with pytest.raises(ValueError, match="not in the model"):
        inspect_model(model, d, layers=["features"], importance_layer="nope")
    for kwargs, error, message in [
        ({"top": 0}, ValueError, "top must be a positive integer"),
        ({"draws": -1}, ValueError, r"draws must be in \[0, inf\)"),
        ({"l2": float("inf")}, ValueError, "l2 must be finite"),
        ({"samples": 1.5}, TypeError, "samples must be an integer"),
        ({"class_names": "abc"}, TypeError, "class_names must be a list"),
        ({"class_names": ["a", "b"]}, ValueError, "class_names has 2 names, but the data have labels up to 2"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive integer"),
        ({"progress": "yes"}, TypeError, "progress must be True, False or None"),
        ({"seed": 2**64}, ValueError, r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
        ({"seed": 0.5}, TypeError, "seed must be an integer"),
    ]:
        with pytest.raises(error, match=message):
            inspect_model(model, d, layers=["features"], **kwargs)
    with pytest.raises(ValueError, match="l2 must be finite"):
        Monitor(d, l2=float("inf"))
    with pytest.raises(ValueError, match=r"images must be in \[4, inf\)"):
        Monitor(d, images=2)
    with pytest.raises(ValueError, match="l2 must be finite"):
        fit_linear(torch.randn(10, 2, dtype=torch.float64), torch.arange(10) % 2, 2, l2=float("inf"))
    with pytest.raises(ValueError, match="features x contain NaN"):
        fit_linear(torch.full((10, 2), float("nan"), dtype=torch.float64), torch.arange(10) % 2, 2)
    with pytest.raises(ValueError, match="l2 must be in"):
        layer_probes(model, d, ["features"], l2=-1.0)


def test_a_corrupt_monitor_file_is_a_clear_error(tmp_path):
    from xcnn.inspection import load_history

    (tmp_path / "monitor.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read monitor records"):
        load_history(tmp_path)
    (tmp_path / "monitor.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds no monitor records"):
        load_history(tmp_path)
