"""Models: the Classifier wrapper, load_model, the bundled ImageNet model, default_layer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import xcnn
from xcnn.data.images import SAMPLES, load_image
from xcnn.models import LITE_MEAN, LITE_STD, Classifier, default_layer, imagenet_classes, load_model


def test_bundled_model_recognises_the_bundled_photos(lite0, photos):
    with torch.no_grad():
        probs = lite0(photos).softmax(1)
    assert probs.argmax(1).tolist() == [285, 967]  # Egyptian cat, espresso
    assert lite0.class_name(285) == "Egyptian cat" and lite0.class_name(967) == "espresso"
    assert probs.max(1).values.min() > 0.4
    assert not lite0.training and lite0.name == "efficientnet_lite0" and lite0.weights == "bundled"


def test_bundled_normalisation_matches_its_batchnorm_statistics(lite0):
    """TF-Lite preprocessing reproduces the stored running variance of the first BatchNorm; ImageNet's
    mean/std would inflate it several-fold (this is how the normalisation was chosen)."""
    net = lite0.backbone
    photos = torch.stack([load_image(f"sample:{name}", 224) for name in SAMPLES])

    def log_var_ratio(mean, std):
        x = (photos - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            y = net.conv_stem(x)
        keep = net.bn1.running_var > 1e-3
        return (y.var((0, 2, 3))[keep] / net.bn1.running_var[keep]).log().median().abs().item()

    assert log_var_ratio(LITE_MEAN, LITE_STD) < 0.3
    assert log_var_ratio((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) > 1.0


def test_classifier_normalises_inside():
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.mean((2, 3))

    clf = Classifier(Probe(), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=(4, 4))
    clf(torch.ones(1, 3, 4, 4))
    torch.testing.assert_close(seen["x"], torch.full((1, 3, 4, 4), 2.0))
    assert clf.num_classes == 3


def test_load_model_wraps_modules_names_and_timm():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    clf = load_model(net, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5), input_size=(16, 16))
    assert clf.backbone is net and clf.num_classes == 5
    assert load_model(clf) is clf
    tv = load_model("resnet18", pretrained=False)
    assert type(tv.backbone).__module__.startswith("torchvision") and tv.class_names == list(imagenet_classes())
    tm = load_model("timm:resnet18", pretrained=False, num_classes=7)
    assert type(tm.backbone).__module__.startswith("timm") and tm.num_classes == 7 and tm.class_names is None
    assert load_model("mobilenetv3_small_050", pretrained=False).input_size == (224, 224)  # a timm-only name


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_files_round_trip(suffix, tmp_path):
    torch.manual_seed(1)
    src = load_model("resnet18", pretrained=False)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in src.backbone.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # DDP-style nesting
    torch.manual_seed(2)
    dst = load_model("resnet18", weights=path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))
    assert dst.weights == f"file:{path}" and src.weights is None


@pytest.mark.parametrize(
    "name,layer",
    [
        ("resnet18", "layer4"),
        ("vgg11", "features.19"),
        ("densenet121", "features"),
        ("mobilenet_v2", "features"),
        ("efficientnet_b0", "features"),
        ("timm:resnet18", "layer4"),
        ("efficientnet_lite0", "bn2"),
        ("timm:efficientnet_b0", "bn2"),
        ("timm:mobilenetv3_small_050", "blocks"),
        ("vit_tiny_patch16_224", "blocks.11.norm1"),
    ],
)
def test_default_layer_is_the_last_spatial_map(name, layer):
    model = load_model(name, pretrained=name == "efficientnet_lite0")  # the bundled model has offline weights
    assert default_layer(model) == layer
    # and the CAM family runs there
    maps = xcnn.explainer("gradcam", model)(torch.rand(1, 3, *model.input_size))
    assert maps.shape == (1, *model.input_size)


def test_default_layer_of_a_plain_sequential():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip
    # "3" (the in-place ReLU) returns the conv's tensor: the later, post-ReLU name wins; pools are skipped
    assert default_layer(load_model(net, raw_pixels=True, input_size=(32, 32))) == "3"


def test_default_layer_does_not_touch_batchnorm_statistics():
    model = load_model("resnet18", pretrained=False)
    model.train()
    before = model.backbone.bn1.running_mean.clone()
    default_layer(model)
    torch.testing.assert_close(model.backbone.bn1.running_mean, before, rtol=0, atol=0)
    assert model.training


def test_save_model_round_trip(tmp_path):
    from xcnn.models import save_model

    torch.manual_seed(3)
    model = load_model("shapesnet", pretrained=False, num_classes=6, class_names=list("abcdef"), input_size=(48, 48))
    save_model(model, tmp_path / "m", note="hello")
    again = load_model(tmp_path / "m")
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    assert again.class_names == list("abcdef") and again.input_size == (48, 48) and again.name == "shapesnet"
    for path in (tmp_path / "m" / "model.safetensors", tmp_path / "m" / "model.json"):
        assert load_model(path).input_size == (48, 48)
    assert json.loads((tmp_path / "m" / "model.json").read_text())["note"] == "hello"
    with pytest.raises(ValueError, match="built by name"):
        save_model(load_model(nn.Linear(2, 2), raw_pixels=True), tmp_path / "x")


@pytest.mark.parametrize(
    "name,stages",
    [
        ("shapesnet", ["layer1", "layer2", "layer3", "layer4"]),
        ("vgg11_bn", ["features.3", "features.7", "features.14", "features.21", "features.28"]),
        ("mobilenet_v2", ["features.1", "features.3", "features.6", "features.13", "features"]),
    ],
)
def test_stage_layers_and_one_survey_for_all_layer_facts(name, stages):
    from xcnn.hooks import Tap
    from xcnn.models import stage_layers, survey_layers

    model = load_model(name, pretrained=False, input_size=(64, 64))
    calls = []
    handle = model.backbone.register_forward_hook(lambda *_: calls.append(1))
    survey = survey_layers(model)
    handle.remove()
    assert len(calls) == 1  # one dummy forward answers the default layer, the stages and the shapes
    assert list(survey.stages) == stages == stage_layers(model)
    assert survey.stages[-1] == survey.default or name == "vgg11_bn"  # VGG's last stage is its last pool
    assert stage_layers(model, 2) == stages[-2:]
    with pytest.raises(ValueError, match="fewer than 9 spatial stages"):
        stage_layers(model, 9)
    with torch.no_grad(), Tap(model.backbone, stages) as tap:
        model(torch.rand(2, 3, 64, 64))
        for layer in stages:
            assert survey.shapes[layer] == tuple(tap.get(layer).shape[1:])


def test_stage_layers_of_the_bundled_model_and_a_token_model(lite0):
    from xcnn.models import stage_layers

    assert stage_layers(lite0) == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "bn2"]
    vit = load_model("vit_tiny_patch16_224", pretrained=False)
    with pytest.raises(ValueError, match="no spatial stages"):
        stage_layers(vit)


def test_a_path_that_holds_no_saved_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no saved xcnn model at .*missing"):
        xcnn.load_model(tmp_path / "missing")
