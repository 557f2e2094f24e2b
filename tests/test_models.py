"""Models: the Classifier wrapper, load_model, the bundled ImageNet model, default_layer."""

from __future__ import annotations

import json
import math

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


# ---- arguments are checked at the boundary -------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"mean": (math.nan, 0, 0)}, ValueError, r"mean\[0\] must be finite, got nan"),
        ({"mean": (0, 0)}, ValueError, r"mean must be 3 numbers \(one per RGB channel\), got \(0, 0\)"),
        ({"mean": "abc"}, TypeError, r"mean must be 3 numbers \(one per RGB channel\), got str 'abc'"),
        ({"mean": torch.tensor(0.5)}, TypeError, r"mean must be 3 numbers .*, got Tensor"),
        ({"mean": [torch.tensor([0.5, 0.5]), 0, 0]}, TypeError, r"mean\[0\] must be a number, got Tensor"),
        ({"mean": (10**400, 0, 0)}, ValueError, r"mean\[0\] must be finite, got 1000"),  # not an OverflowError
        ({"std": (1, math.inf, 1)}, ValueError, r"std\[1\] must be finite, got inf"),
        ({"std": (1e-40, 1, 1)}, ValueError, r"std\[0\] = 1e-40 is too small for mean\[0\] = 0: .*reach 1e\+40"),
        ({"mean": (1e6, 0, 0)}, ValueError, r"std\[0\] = 1 is too small for mean\[0\] = 1e\+06"),
        ({"std": (-1, 1, 1)}, ValueError, r"std must be positive"),
        ({"input_size": "32"}, TypeError, r"input_size must be \(height, width\), two positive integers, got str '32'"),
        ({"input_size": (32,)}, ValueError, r"input_size must be \(height, width\)"),
        ({"input_size": (32.5, 32)}, TypeError, r"input_size\[0\] must be an integer, got float 32.5"),
        ({"input_size": (True, 32)}, TypeError, r"input_size\[0\] must be an integer, got bool"),
        ({"input_size": (32, 16385)}, ValueError, r"input_size\[1\] must be in \[1, 16384\], got 16385"),
        ({"class_names": "abcdef"}, TypeError, r"class_names must be a list of strings \(one per class\), got str"),
        ({"class_names": b"ab"}, TypeError, r"class_names must be a list of strings \(one per class\), got bytes"),
        ({"class_names": 5}, TypeError, r"class_names must be a list of strings \(one per class\), got int"),
        ({"class_names": {"a": 1}.values()}, TypeError, r"class_names must be strings, got int 1 at position 0"),
        ({"class_names": []}, ValueError, r"class_names must name at least one class"),
        ({"class_names": ["a", None]}, TypeError, r"class_names must be strings, got NoneType None at position 1"),
        ({"name": 5}, TypeError, r"name must be a string, got int 5"),
    ],
)
def test_classifier_arguments_are_checked(kwargs, error, message):
    with pytest.raises(error, match=message):
        Classifier(nn.Conv2d(3, 3, 1), **kwargs)


def test_arguments_may_be_any_iterable_of_the_right_values():
    """class names from a numpy array or dict.keys(), sizes as numpy arrays or integer-valued floats, mean and
    std as 0-d tensors, numpy scalars or a [1,3,1,1] tensor: taken as the plain values they hold."""
    import numpy as np

    clf = Classifier(
        nn.Identity(), mean=[torch.tensor(0.5)] * 3, std=np.array([0.25, 0.5, 1.0]), input_size=np.array([32, 48]),
        class_names=np.array(["cat", "dog"]),
    )  # fmt: skip
    assert clf.input_size == (32, 48) and all(type(v) is int for v in clf.input_size)
    assert clf.class_names == ["cat", "dog"] and all(type(c) is str for c in clf.class_names)
    assert clf.mean.flatten().tolist() == [0.5] * 3 and clf.std.flatten().tolist() == [0.25, 0.5, 1.0]
    clf = Classifier(nn.Identity(), mean=clf.mean, std=(np.float32(1), 1, 1), input_size=(32.0, 32.0),
                     class_names={"a": 0, "b": 1}.keys())  # fmt: skip
    assert clf.input_size == (32, 32) and clf.class_names == ["a", "b"] and clf.mean.flatten().tolist() == [0.5] * 3
    net = load_model("shapesnet", pretrained=False, class_names=np.array(list("abcdef")), input_size=(32.0, 32.0))
    assert net.num_classes == 6 and net.input_size == (32, 32) and net.class_names == list("abcdef")
    from xcnn.nets import ShapesNet

    shapes = ShapesNet(widths=np.array([4, 4, 8, 8]), strides=(2.0, 1, 2, 2, 1))
    assert shapes.widths == (4, 4, 8, 8) and shapes.strides == (2, 1, 2, 2, 1)
    assert all(type(v) is int for v in (*shapes.widths, *shapes.strides))


def test_normalisation_at_the_float16_bound_is_accepted():
    """(x - mean) / std for x in [0, 1] reaches max(|mean|, |1 - mean|) / std: 65504 exactly is float16's largest."""
    clf = Classifier(nn.Identity(), mean=(1.0, 0.0, 0.5), std=(1 / 65504, 1 / 65504, 0.5 / 65504))
    with torch.no_grad():
        out = clf(torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)).half()
    assert torch.isfinite(out).all() and out.abs().max() == 65504
    with pytest.raises(ValueError, match="too small"):
        Classifier(nn.Identity(), std=(1 / 65505, 1, 1))


def test_load_model_checks_its_arguments_before_building():
    with pytest.raises(ValueError, match=r"num_classes must be in \[1, inf\), got -1"):
        load_model("resnet18", pretrained=False, num_classes=-1)
    with pytest.raises(ValueError, match="class_names has 2 names but num_classes is 3"):
        load_model("resnet18", pretrained=False, num_classes=3, class_names=["a", "b"])
    with pytest.raises(TypeError, match="class_names must be a list of strings"):
        load_model("resnet18", pretrained=False, class_names="abc")
    with pytest.raises(ValueError, match=r"input_size must be \(height, width\)"):
        load_model("resnet18", pretrained=False, input_size=(32,))
    with pytest.raises(TypeError, match="an architecture name must be a non-empty string"):
        xcnn.models._build_arch(5, {})


def test_class_names_must_fit_the_head_of_a_named_model():
    """Without num_classes, the architecture's own head decides: resnet18 has 1000 outputs, shapesnet 6. They
    are counted on the meta device: no real forward pass runs (vit_b_16 would take seconds)."""
    seen: set[str] = set()

    def record(module, args):
        if args and isinstance(args[0], torch.Tensor):
            seen.add(args[0].device.type)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        with pytest.raises(ValueError, match="class_names has 2 names but resnet18 has 1000 outputs"):
            load_model("resnet18", pretrained=False, class_names=["a", "b"])
        net = load_model("shapesnet", pretrained=False, class_names=list("abcdef"), input_size=(32, 32))
        load_model("resnet18", pretrained=False, class_names=[str(k) for k in range(1000)])
    finally:
        handle.remove()
    assert seen == {"meta"}
    assert net.num_classes == 6


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"num_classes": -1}, ValueError, r"ShapesNet: num_classes must be in \[1, inf\), got -1"),
        ({"num_classes": 2.5}, TypeError, r"ShapesNet: num_classes must be an integer, got float 2.5"),
        ({"widths": [16]}, ValueError, r"ShapesNet: widths must be 4 positive integers, got \[16\]"),
        ({"widths": [16, 32, -1, 8]}, ValueError, r"ShapesNet: widths\[2\] must be in \[1, inf\), got -1"),
        ({"widths": "abcd"}, TypeError, r"ShapesNet: widths must be 4 positive integers, got str 'abcd'"),
        ({"widths": [16, 32, 64.5, 8]}, TypeError, r"ShapesNet: widths\[2\] must be an integer, got float 64.5"),
        ({"strides": [2, 1, 2, 2, 0]}, ValueError, r"ShapesNet: strides\[4\] must be in \[1, inf\), got 0"),
        ({"stem_pool": "yes"}, TypeError, r"ShapesNet: stem_pool must be True or False"),
        ({"widths": [10**6] * 4}, ValueError, r"ShapesNet\(widths=\[1000000, .*would need 2.8\de\+05 GiB"),
    ],
)
def test_shapesnet_arguments_are_checked(kwargs, error, message):
    from xcnn.nets import ShapesNet

    with pytest.raises(error, match=message):
        ShapesNet(**kwargs)


def test_shapesnet_memory_check_counts_its_weights(monkeypatch):
    """The size ShapesNet refuses before allocating is its float32 weights: on a machine with 1 KiB of memory
    the message gives the bytes of the conv and linear weights it would have had (BatchNorm's few aside)."""
    import re

    from xcnn.nets import ShapesNet

    net = ShapesNet(num_classes=5, widths=(3, 6, 12, 24))
    weights = sum(m.weight.numel() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    monkeypatch.setattr(xcnn._validate, "physical_memory", lambda: 1024)
    with pytest.raises(ValueError, match="would need") as info:
        ShapesNet(num_classes=5, widths=(3, 6, 12, 24))
    gib = float(re.search(r"would need ([0-9.e+-]+) GiB", str(info.value)).group(1))
    assert gib == pytest.approx(4 * weights / 2**30, rel=5e-3)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"depth": 0}, r"shapes_vit: depth must be in \[1, inf\), got 0"),
        ({"img_size": 60}, r"shapes_vit: img_size must be a multiple of patch_size 8, got 60"),
        ({"num_heads": 5}, r"shapes_vit: embed_dim must be a multiple of num_heads 5, got 96"),
        ({"embed_dim": 3, "num_heads": 1}, r"embed_dim must be at least 4 for patch_size 8, got 3"),
        ({"embed_dim": 3 * 10**6}, r"shapes_vit\(.*would need .* GiB"),
    ],
)
def test_shapes_vit_arguments_are_checked(kwargs, message):
    from xcnn.nets import shapes_vit

    with pytest.raises(ValueError, match=message):
        shapes_vit(**kwargs)
