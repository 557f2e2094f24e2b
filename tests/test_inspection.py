"""Layer-wise inspection: filter importance (Taylor against finite differences and exact ablation on a
model that is linear after the layer), batched ablation against one channel at a time, the intervention
hook's removal on errors, bad input."""

from __future__ import annotations

import pytest
import torch

from xcnn.hooks import intervene, scale_channels
from xcnn.inspection import (
    ablation_effect,
    class_association,
    feature_correlation,
    filter_importance,
    layer_similarity,
    linear_cka,
    pooled_features,
    redundant_pairs,
)
from xcnn.models import Classifier

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


def test_taylor_importance_is_the_first_order_change_of_the_logit():
    model, d = smooth_model(), data()
    taylor = filter_importance(model, d, "features", "taylor")
    assert taylor.shape == (5,) and taylor.dtype == torch.float64
    eps = 1e-6
    y = d["label"]
    with torch.no_grad():
        clean = model(d["image"]).gather(1, y[:, None])[:, 0]
        for k in range(5):
            factors = torch.ones(5, dtype=torch.float64)
            factors[k] = 1 - eps
            with scale_channels(model.backbone, "features", factors):
                moved = model(d["image"]).gather(1, y[:, None])[:, 0]
            numeric = ((clean - moved) / eps).abs().mean()
            assert float(taylor[k]) == pytest.approx(float(numeric), rel=1e-5, abs=1e-12), k
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
    corr = feature_correlation(model, d, "features")
    expected = torch.corrcoef(feats["features"].T)
    torch.testing.assert_close(corr, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(corr, corr.T) and bool((corr.diagonal() == 1).all())
    pairs = redundant_pairs(corr, top=3)
    assert len(pairs) == 3 and all(i < j for i, j, _ in pairs)
    assert abs(pairs[0][2]) == float(corr.triu(1).abs().max())
    assoc = class_association(model, d, "features")
    torch.testing.assert_close(assoc[1], feats["features"][d["label"] == 1].mean(0))
    sim = layer_similarity(model, d, ["features.0", "features.1", "features"])
    assert sim.shape == (3, 3) and torch.equal(sim, sim.T) and bool((sim.diagonal() == 1).all())
    # features.1 is the softplus of features.0: a monotone map of it, similar but not identical
    assert 0.5 < float(sim[0, 1]) < 1.0
    with pytest.raises(ValueError, match="needs labelled data"):
        class_association(model, {"image": d["image"]}, "features")
    with pytest.raises(ValueError, match="feature map"):
        pooled_features(model, d, ["fc"])
