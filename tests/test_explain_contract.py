"""The explainer contract, checked for every registered explainer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xcnn
from xcnn.explain import explainer_class

from .conftest import TinyCNN, assert_equal_up_to_rounding, prepared_model, raw_maps, required_options

# small settings so the whole matrix runs in seconds; defaults are exercised elsewhere
FAST = {
    "rise": {"masks": 64}, "smoothgrad": {"samples": 4}, "integrated_gradients": {"steps": 8},
    "mdm": {"scales": (4, 8), "steps": 5, "progress": False}, "extremal": {"steps": 10, "progress": False},
}  # fmt: skip
STOCHASTIC = {"rise", "smoothgrad", "random"}
ALL = xcnn.list_explainers()


def make(name, model, **extra):
    model = prepared_model(name, model)
    return xcnn.explainer(name, model, **{**required_options(name, model), **FAST.get(name, {}), **extra})


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_registry_lists_every_documented_method():
    expected = {
        "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "scorecam",
        "saliency", "integrated_gradients", "smoothgrad", "occlusion", "rise", "random", "tame", "mdm", "extremal",
        "lap", "probe_cam", "prototype",
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
def test_same_seed_same_map_and_batch_independent(name, sharp, images32):
    """A map depends only on the image, the seed and the options: the same call gives the same maps, and a
    batch equals its images explained one at a time on one thread, up to float rounding (conftest's rule)."""
    # MDM's 5 fast steps barely move the masks off their uniform start: a flat map, which the rounding check
    # refuses; 20 steps give it a span of 2-3 % of its values
    options = {"steps": 20} if name == "mdm" else {}
    first = make(name, sharp, **options)(images32)
    torch.testing.assert_close(make(name, sharp, **options)(images32), first, rtol=0, atol=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        singles = torch.cat([make(name, sharp, **options)(images32[i : i + 1]) for i in range(len(images32))])
    finally:
        torch.set_num_threads(threads)
    assert_equal_up_to_rounding(name, make(name, sharp, **options), images32, first, singles)
    reordered = make(name, sharp, **options)(images32.flip(0)).flip(0)
    assert_equal_up_to_rounding(name, make(name, sharp, **options), images32, first, reordered)


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_another_seed_another_map(name, tiny, images32):
    a = make(name, tiny, seed=0)(images32)
    b = make(name, tiny, seed=1)(images32)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_seeds_are_torchs_and_anything_else_is_refused(name, tiny, images32):
    """Every seed torch takes ([-2**63, 2**64), read modulo 2**64: -1 and 2**64 - 1 are one generator) gives the
    map of the seed torch reads (the random map's hash key of a negative seed is unchanged); a float, a string or
    a seed beyond that range is refused when the explainer is built (RISE and SmoothGrad used to truncate 1.5)."""
    images = images32[:2]
    top, below = make(name, tiny, seed=2**64 - 1)(images), make(name, tiny, seed=-1)(images)
    torch.testing.assert_close(top, below, rtol=0, atol=0)
    make(name, tiny, seed=2**63)(images)  # beyond a signed 64-bit integer, within torch's range
    for seed, error, message in [
        (1.5, TypeError, "seed must be an integer, got float 1.5"),
        ("0", TypeError, "seed must be an integer"),
        (True, TypeError, "seed must be an integer"),
        (2**64, ValueError, r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
        (-(2**63) - 1, ValueError, r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
    ]:
        with pytest.raises(error, match=message):
            make(name, tiny, seed=seed)


@pytest.mark.parametrize("name", ALL)
def test_model_state_restored_and_no_hooks_left(name, tiny, images32):
    model = prepared_model(name, tiny)  # tiny itself, except for `lap` (a LAP copy of it)
    model.train()
    frozen_param = model.backbone.features[0].bias
    frozen_param.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expl = make(name, model)  # construction is checked too: it must not change the model's state
    assert expl.model is model
    expl(images32)
    assert all(m.training for m in model.modules())
    assert frozen_param.requires_grad is False
    assert all(p.requires_grad for n, p in model.named_parameters() if p is not frozen_param)
    assert all(p.grad is None for p in model.parameters())
    assert hook_count(model) == 0
    for k, v in model.state_dict().items():  # BatchNorm statistics untouched (eval mode during the call)
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
    model = expl.model  # the model the explainer holds (for `lap`, a LAP copy of the one above)
    model.train()
    model.backbone.fire = True
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
    model = prepared_model(name, tiny)  # the top-1 of the model explained (a LAP or prototype copy for those)
    with torch.no_grad():
        top1 = model.eval()(images32).argmax(1)
    torch.testing.assert_close(make(name, model)(images32), make(name, model)(images32, top1))


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


@pytest.mark.parametrize("name", ["gradcam", "saliency", "integrated_gradients", "mdm"])
def test_explainers_work_under_an_outer_no_grad(name, tiny, images32):
    """Gradient-based methods switch autograd back on for themselves: the maps equal those computed outside."""
    expected = make(name, tiny)(images32)
    with torch.no_grad():
        inside = make(name, tiny)(images32)
    torch.testing.assert_close(inside, expected, rtol=0, atol=0)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("name", ALL)
def test_inputs_made_in_inference_mode_are_accepted(name, tiny, images32):
    model = prepared_model(name, tiny)
    with torch.inference_mode():
        images = images32.clone()
        targets = model.eval()(images).argmax(1)
    torch.testing.assert_close(make(name, model)(images, targets), make(name, model)(images32))


@pytest.mark.parametrize("weighting", ["probability", "channel_softmax"])
def test_scorecam_weightings_follow_their_definitions(weighting, sharp, images32):
    """Score-CAM computed by hand, one masked image per channel: each channel upsampled (bilinear, corners
    aligned), min-max normalised, multiplied with the image; alpha = the target's probability for that image
    ("probability") or the softmax over channels of the target's logit ("channel_softmax")."""
    from xcnn.hooks import Tap

    layer = "features.4"
    with torch.no_grad(), Tap(sharp.backbone, [layer]) as tap:
        targets = sharp.eval()(images32).argmax(1)
        acts = tap.get(layer)
        expected = []
        for x, a, t in zip(images32, acts, targets, strict=True):
            up = F.interpolate(a[:, None], size=x.shape[-2:], mode="bilinear", align_corners=True)[:, 0]
            low, high = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
            masks = torch.where(high > low, (up - low) / (high - low).clamp_min(1e-12), torch.zeros_like(up))
            logits = sharp(x[None] * masks[:, None])[:, t]
            alpha = (
                logits.softmax(0)
                if weighting == "channel_softmax"
                else sharp(x[None] * masks[:, None]).softmax(1)[:, t]
            )
            expected.append((alpha[:, None, None] * a).sum(0).relu())
    flat = acts.flatten(2)
    assert bool((flat.amax(2) == flat.amin(2)).any())  # the premise: constant channels (they mask to black)
    expl = make("scorecam", sharp, layer=layer, weighting=weighting)
    # the raw maps too: normalisation hides a common factor (the channel softmax's sum, over black images too)
    torch.testing.assert_close(raw_maps(expl, images32), torch.stack(expected), rtol=1e-4, atol=1e-5)
    raw = F.interpolate(torch.stack(expected)[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    low = raw.amin(dim=(1, 2), keepdim=True)
    reference = (raw - low) / (raw.amax(dim=(1, 2), keepdim=True) - low)
    maps = expl(images32)
    torch.testing.assert_close(maps, reference, rtol=0, atol=1e-4)  # batch sizes differ: rounding only
    other = "probability" if weighting == "channel_softmax" else "channel_softmax"  # far above that rounding
    assert (make("scorecam", sharp, layer=layer, weighting=other)(images32) - maps).abs().amax() > 1e-3


def test_repr_names_model_and_layers(tiny):
    assert "features.4" in repr(make("gradcam", tiny, layer="features.4"))
