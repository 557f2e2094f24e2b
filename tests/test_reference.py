"""Numerical agreement with the reference libraries (grad-cam, captum) on the same model and layer."""

from __future__ import annotations

import copy

import captum.attr as captum_attr
import numpy as np
import pytest
import pytorch_grad_cam as gradcam_lib
import torch
import torch.nn.functional as F
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import xcnn

from .conftest import pearson, raw_maps

# captum's Saliency warns that it switched on requires_grad for the plain images we hand it (as a user
# would): a note about the anchor's own input handling, silenced here so that the suite's warnings stay ours.
CAPTUM_SETS_GRAD = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients:UserWarning")

GRADIENT_CAMS = {
    "gradcam": gradcam_lib.GradCAM,
    "gradcam++": gradcam_lib.GradCAMPlusPlus,
    "xgradcam": gradcam_lib.XGradCAM,
    "layercam": gradcam_lib.LayerCAM,
    "hirescam": gradcam_lib.HiResCAM,
}


def reference_cam(cls, model, layer_module, images, targets, **kwargs):
    with cls(model=model, target_layers=[layer_module], **kwargs) as cam:
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets])


def assert_agree(ours, ref, threshold=0.99):
    values = [pearson(ours[i], ref[i]) for i in range(len(ours))]
    assert min(values) >= threshold, values


@pytest.fixture(scope="module")
def small_photos(photos):
    return F.interpolate(photos, size=(112, 112), mode="bilinear", antialias=True).clamp(0, 1)


@pytest.fixture(scope="module")
def resnet_targets(resnet18, small_photos):
    with torch.no_grad():
        return resnet18(small_photos).argmax(1)


@pytest.mark.parametrize("name", list(GRADIENT_CAMS))
def test_gradient_cams_match_gradcam_on_resnet18(name, resnet18, small_photos, resnet_targets):
    ours = xcnn.explainer(name, resnet18, layer="layer4")(small_photos, resnet_targets).numpy()
    ref = reference_cam(GRADIENT_CAMS[name], resnet18, resnet18.backbone.layer4, small_photos, resnet_targets)
    assert_agree(ours, ref)


@pytest.mark.parametrize("name", list(GRADIENT_CAMS))
def test_gradient_cams_match_gradcam_on_bundled_model(name, lite0, photos):
    targets = torch.tensor([285, 967])
    ours = xcnn.explainer(name, lite0, layer="bn2")(photos, targets).numpy()
    ref = reference_cam(GRADIENT_CAMS[name], lite0, lite0.backbone.bn2, photos, targets)
    assert_agree(ours, ref)


def reference_raw_cam(cls, model, layer_module, images, targets) -> np.ndarray:
    """grad-cam's map at the layer's resolution before its min-max scaling: its ``get_cam_image`` on the
    activations and gradients it recorded, then the ReLU its ``compute_cam_per_layer`` applies."""
    with cls(model=model, target_layers=[layer_module]) as cam:
        wanted = [ClassifierOutputTarget(int(t)) for t in targets]
        cam(input_tensor=images, targets=wanted)
        acts = cam.activations_and_grads.activations[0].cpu().numpy()
        grads = cam.activations_and_grads.gradients[0].cpu().numpy()
        return np.maximum(cam.get_cam_image(images, layer_module, wanted, acts, grads, False), 0)


def loud(model, head: str, gain: float = 1000.0):
    """A copy of ``model`` with its classifier ``head`` scaled by ``gain`` (so every gradient is): grad-cam adds
    1e-7 to Grad-CAM++'s denominator 2 G^2 + sum(A) G^3, as large as G^2 itself for the ~3e-4 gradients of a
    random ResNet-18's inner layer; with gradients 1000x larger that epsilon is negligible."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for param in model.backbone.get_submodule(head).parameters():
            param.mul_(gain)
    return model


@pytest.fixture(scope="module")
def loud_models(resnet18, lite0):
    """``model name -> (loud copy, inner layer, targets)``; the targets are not the top-1 classes."""
    return {
        "resnet18": (loud(resnet18, "fc"), "layer3", torch.tensor([3, 3])),
        "lite0": (loud(lite0, "classifier"), "blocks.5", torch.tensor([285, 967])),
    }


@pytest.mark.parametrize("name", list(GRADIENT_CAMS))
@pytest.mark.parametrize("model_name", ["resnet18", "lite0"])
def test_raw_gradient_cams_equal_gradcam_at_an_inner_layer(name, model_name, loud_models, small_photos):
    """The unnormalised maps, value for value, at a layer that global pooling does not follow (there
    XGrad-CAM's and HiResCAM's weights differ from Grad-CAM's), for a class that is not the top-1 (part of
    its map is negative evidence, which the final ReLU must clip to exactly 0). Tolerance: 1e-3 of the
    map's maximum (grad-cam adds 1e-7 to XGrad-CAM's activation sums; float32 rounding is ~1e-6)."""
    model, layer, targets = loud_models[model_name]
    ours = raw_maps(xcnn.explainer(name, model, layer=layer), small_photos, targets)
    ref = torch.from_numpy(reference_raw_cam(GRADIENT_CAMS[name], model, model.backbone.get_submodule(layer),
                                             small_photos, targets))  # fmt: skip
    assert ours.shape == ref.shape
    # the premise: part of the map is clipped, except where it cannot be: Grad-CAM++ and Layer-CAM weigh by
    # ReLU(G) (weights >= 0), and ResNet's layer3 is a ReLU output (A >= 0); Lite0's block outputs are signed
    if not (model_name == "resnet18" and name in ("gradcam++", "layercam")):
        assert bool((ref == 0).any()) and bool((ref > 0).any())
    scale = ref.abs().amax(dim=(1, 2), keepdim=True)
    assert bool(((ours - ref).abs() <= 1e-3 * scale).all()), ((ours - ref).abs() / scale).amax(dim=(1, 2)).tolist()


@pytest.mark.slow
def test_scorecam_matches_gradcam_on_resnet18(resnet18, small_photos, resnet_targets):
    image, target = small_photos[:1], resnet_targets[:1]
    ours = xcnn.explainer("scorecam", resnet18, layer="layer4", weighting="channel_softmax")(image, target)
    ref = reference_cam(gradcam_lib.ScoreCAM, resnet18, resnet18.backbone.layer4, image, target)
    assert_agree(ours.numpy(), ref)


@pytest.mark.slow
def test_scorecam_matches_gradcam_on_bundled_model(lite0, photos):
    image, target = photos[:1], torch.tensor([285])
    ours = xcnn.explainer("scorecam", lite0, layer="blocks.5", weighting="channel_softmax")(image, target)
    ref = reference_cam(gradcam_lib.ScoreCAM, lite0, lite0.backbone.blocks[5], image, target)
    assert_agree(ours.numpy(), ref)


def test_gradcam_matches_gradcam_on_vit_tokens():
    torch.manual_seed(0)
    vit = xcnn.load_model("vit_tiny_patch16_224", pretrained=False)
    assert xcnn.default_layer(vit) == "blocks.11.norm1"
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        targets = vit(images).argmax(1)

    def grid(t):  # the reshape grad-cam's documentation prescribes for ViT
        return t[:, 1:, :].reshape(t.shape[0], 14, 14, t.shape[2]).permute(0, 3, 1, 2)

    ours = xcnn.explainer("gradcam", vit)(images, targets).numpy()
    ref = reference_cam(
        gradcam_lib.GradCAM, vit, vit.backbone.blocks[-1].norm1, images, targets, reshape_transform=grid
    )
    assert_agree(ours, ref)


def _captum_cases(model, images, targets, patch):
    forward_prob = lambda x: model(x).softmax(1)  # noqa: E731  occlusion measures the drop in p(c)
    yield "saliency", {}, captum_attr.Saliency(model).attribute(images, target=targets, abs=True).amax(1)
    yield (
        "integrated_gradients",
        {"steps": 16},
        captum_attr.IntegratedGradients(model)
        .attribute(images, target=targets, n_steps=16, method="riemann_trapezoid", baselines=0.0)
        .abs()
        .sum(1),
    )
    yield (
        "occlusion",
        {"patch": patch, "stride": patch // 2},
        captum_attr.Occlusion(forward_prob).attribute(
            images,
            target=targets,
            sliding_window_shapes=(3, patch, patch),
            strides=(3, patch // 2, patch // 2),
            baselines=0.0,
        )[:, 0],
    )


@pytest.mark.slow
@CAPTUM_SETS_GRAD
@pytest.mark.parametrize("model_name", ["resnet18", "lite0"])
def test_gradient_and_occlusion_match_captum(model_name, request, small_photos, photos):
    model = request.getfixturevalue(model_name)
    images, patch = (small_photos, 24) if model_name == "resnet18" else (photos[:1], 32)
    with torch.no_grad():
        targets = model(images).argmax(1)
    for name, options, ref in _captum_cases(model, images, targets, patch):
        ours = xcnn.explainer(name, model, **options)(images, targets)
        assert_agree(ours.numpy(), ref.detach().numpy())


def test_smoothgrad_without_noise_is_saliency(tiny, images32):
    """Averaging many identical (noise-free) saliency maps gives the saliency map: the mean is a mean."""
    sg = xcnn.explainer("smoothgrad", tiny, samples=5, noise=1e-9)(images32)
    torch.testing.assert_close(sg, xcnn.explainer("saliency", tiny)(images32), atol=1e-4, rtol=1e-4)


@CAPTUM_SETS_GRAD
def test_smoothgrad_is_the_mean_of_noisy_saliency_maps(sharp, images32):
    """SmoothGrad with k samples equals the mean of k captum Saliency maps of the same noisy images: the k
    noise images are drawn in order from the seed's CPU generator and shared by the batch (scaled by each
    image's noise * (max - min))."""
    k = 4
    sg = xcnn.explainer("smoothgrad", sharp, samples=k, noise=0.15, seed=3)(images32)
    gen = torch.Generator().manual_seed(3)
    sigma = 0.15 * (images32.amax(dim=(1, 2, 3)) - images32.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)
    noise = [torch.randn(images32.shape[1:], generator=gen) for _ in range(k)]
    with torch.no_grad():
        targets = sharp(images32).argmax(1)
    saliency = captum_attr.Saliency(sharp)
    ref = torch.stack([saliency.attribute(images32 + sigma * n, target=targets, abs=True).amax(1) for n in noise]).mean(
        0
    )
    low = ref.amin(dim=(1, 2), keepdim=True)  # captum's batches differ from ours: rounding only (~1e-6 here)
    torch.testing.assert_close(sg, (ref - low) / (ref.amax(dim=(1, 2), keepdim=True) - low), atol=1e-4, rtol=0)
    # and the samples are not all alike: one sample's map is far from the mean of four
    one = xcnn.explainer("smoothgrad", sharp, samples=1, noise=0.15, seed=3)(images32)
    assert (one - sg).abs().amax() > 0.1
