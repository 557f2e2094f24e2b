"""The explainer contract, checked for every registered explainer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import xcnn
from xcnn.explain import explainer_class

from .conftest import TinyCNN, required_options

# small settings so the whole matrix runs in seconds; defaults are exercised elsewhere
FAST = {
    "rise": {"masks": 64}, "smoothgrad": {"samples": 4}, "integrated_gradients": {"steps": 8},
    "mdm": {"scales": (4, 8), "steps": 5, "progress": False}, "extremal": {"steps": 10, "progress": False},
}  # fmt: skip
STOCHASTIC = {"rise", "smoothgrad", "random"}
ALL = xcnn.list_explainers()


def make(name, model, **extra):
    return xcnn.explainer(name, model, **{**required_options(name, model), **FAST.get(name, {}), **extra})


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_registry_lists_every_documented_method():
    expected = {
        "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "scorecam",
        "saliency", "integrated_gradients", "smoothgrad", "occlusion", "rise", "random", "tame", "mdm", "extremal",
    }  # fmt: skip
    assert expected <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_shape_range_dtype_device(name, tiny, images32):
    maps = make(name, tiny)(images32)
    assert maps.shape == (3, 32, 32)
    assert maps.dtype == torch.float32
    assert maps.device == images32.device
    assert torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1
    # every map is min-max normalised: it spans [0,1] unless it is constant (all zeros)
    for m in maps:
        assert m.max() == 1.0 or m.max() == 0.0
    assert maps.amax(dim=(1, 2)).gt(0).any(), f"{name} produced only empty maps"


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_map_and_batch_independent(name, tiny, images32):
    first = make(name, tiny)(images32)
    again = make(name, tiny)(images32)
    torch.testing.assert_close(first, again)
    if name not in STOCHASTIC:  # deterministic methods: a batch equals its images one by one
        singles = torch.cat([make(name, tiny)(images32[i : i + 1]) for i in range(len(images32))])
        # MDM's Adam steps are sign-like at first (update = lr * g / |g|), so float rounding differences
        # between batch sizes in the model's convolutions move a near-zero-gradient cell by a full step
        atol = 1e-2 if name == "mdm" else 1e-5
        torch.testing.assert_close(first, singles, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_another_seed_another_map(name, tiny, images32):
    a = make(name, tiny, seed=0)(images32)
    b = make(name, tiny, seed=1)(images32)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", ALL)
def test_model_state_restored_and_no_hooks_left(name, tiny, images32):
    tiny.train()
    frozen_param = tiny.backbone.features[0].bias
    frozen_param.requires_grad_(False)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    make(name, tiny)(images32)
    assert all(m.training for m in tiny.modules())
    assert frozen_param.requires_grad is False
    assert all(p.requires_grad for n, p in tiny.named_parameters() if p is not frozen_param)
    assert all(p.grad is None for p in tiny.parameters())
    assert hook_count(tiny) == 0
    for k, v in tiny.state_dict().items():  # BatchNorm statistics untouched (eval mode during the call)
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


class Explodes(nn.Module):
    """Raises inside the forward pass, after the hooked layer."""

    def __init__(self):
        super().__init__()
        self.net = TinyCNN()
        self.fire = False

    def forward(self, x):
        out = self.net(x)
        if self.fire:
            raise RuntimeError("boom")
        return out


@pytest.mark.parametrize("name", ALL)
def test_hooks_removed_and_state_restored_when_the_model_raises(name, images32):
    inner = Explodes()
    model = xcnn.load_model(inner, raw_pixels=True, input_size=(32, 32))
    options = {"layer": "net.features"} if explainer_class(name).uses_layer else {}
    expl = make(name, model, **options)
    model.train()
    inner.fire = True
    if name == "random":  # ignores the model: nothing can raise
        expl(images32)
    else:
        with pytest.raises(RuntimeError, match="boom"):
            expl(images32)
    assert hook_count(model) == 0
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ALL)
def test_explicit_targets_equal_top1_when_they_are_the_top1(name, tiny, images32):
    with torch.no_grad():
        top1 = tiny.eval()(images32).argmax(1)
    torch.testing.assert_close(make(name, tiny)(images32), make(name, tiny)(images32, top1))


@pytest.mark.parametrize("name", [n for n in ALL if n != "random"])
def test_the_target_class_matters(name, tiny, images32):
    a = make(name, tiny)(images32, torch.tensor([0, 0, 0]))
    b = make(name, tiny)(images32, torch.tensor([5, 5, 5]))
    assert not torch.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("name", [n for n in ALL if explainer_class(n).uses_layer])
def test_several_layers_average_the_normalised_maps(name, tiny, images32):
    layers = ["features.2", "features.4"]
    both = make(name, tiny, layer=layers)(images32)
    single = [make(name, tiny, layer=layer)(images32) for layer in layers]
    mean = torch.stack(single).mean(0)
    low = mean.amin(dim=(1, 2), keepdim=True)
    span = mean.amax(dim=(1, 2), keepdim=True) - low
    torch.testing.assert_close(both, (mean - low) / span, atol=1e-5, rtol=1e-4)


def test_gradient_at_the_tap_equals_the_full_backward_gradient(tiny, images32):
    """The explainers' path (frozen model, input without grad, the tapped output becomes a leaf) gives the
    same d(score)/d(activation) as an ordinary backward pass through the whole unfrozen network."""
    from xcnn.hooks import Tap, frozen

    tiny.eval()
    with frozen(tiny), Tap(tiny.backbone, ["features.4"], differentiable=True) as tap:
        score = tiny(images32)[:, 3].sum()
    leaf = tap.get("features.4")
    assert leaf.is_leaf and leaf.requires_grad  # nothing below the layer is in the graph
    (g_tap,) = torch.autograd.grad(score, leaf)

    x = images32.clone().requires_grad_(True)  # reference: an unfrozen net, graph all the way to the input
    feats = tiny.backbone.features(x)
    head = tiny.backbone.fc(tiny.backbone.drop(tiny.backbone.pool(feats).flatten(1)))
    (g_full,) = torch.autograd.grad(head[:, 3].sum(), feats)
    torch.testing.assert_close(g_tap, g_full)
    assert all(p.requires_grad for p in tiny.parameters())


@pytest.mark.parametrize("name", ALL)
def test_explainers_work_inside_inference_mode(name, tiny, images32):
    expected = make(name, tiny)(images32)
    with torch.inference_mode():
        inside = make(name, tiny)(images32)
    torch.testing.assert_close(inside, expected)


def test_explainers_work_under_an_outer_no_grad(tiny, images32):
    with torch.no_grad():
        maps = make("gradcam", tiny)(images32)
        sal = make("saliency", tiny)(images32)
    assert maps.amax() == 1 and sal.amax() == 1


@pytest.mark.parametrize("name", ALL)
def test_inputs_made_in_inference_mode_are_accepted(name, tiny, images32):
    with torch.inference_mode():
        images = images32.clone()
        targets = tiny.eval()(images).argmax(1)
    torch.testing.assert_close(make(name, tiny)(images, targets), make(name, tiny)(images32))


def test_scorecam_weightings_differ_and_both_are_valid(tiny, images32):
    p = make("scorecam", tiny, weighting="probability")(images32)
    s = make("scorecam", tiny, weighting="channel_softmax")(images32)
    assert p.shape == s.shape and not torch.allclose(p, s)


def test_repr_names_model_and_layers(tiny):
    assert "features.4" in repr(make("gradcam", tiny, layer="features.4"))
