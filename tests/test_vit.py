"""A small timm ViT trained on the benchmark, saved, reloaded, and explained by MDM, extremal perturbation
and the CAM family (through the token-grid reshape)."""

from __future__ import annotations

import pytest
import torch

import xcnn
from xcnn.training.benchmark import fit_benchmark


@pytest.fixture(scope="module")
def vit32(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit32")
    model, results = fit_benchmark(
        out, arch="vit", size=32, n_train=600, n_val=100, n_test=100, epochs=2, lr=1e-3, progress=False
    )
    return model, results, out


def test_benchmark_vit_trains_saves_and_reloads(vit32):
    model, results, out = vit32
    assert results["architecture"] == "vit" and 0 <= results["test_acc"] <= 1
    assert xcnn.default_layer(model) == "blocks.3.norm1"  # 4 blocks
    loaded = xcnn.load_model(out)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


@pytest.mark.parametrize(
    "name, options",
    [
        ("gradcam", {}),
        ("gradcam++", {}),
        ("layercam", {}),
        ("scorecam", {}),
        ("mdm", {"scales": (4, 8, 16), "steps": 10}),
        ("extremal", {"steps": 20}),
    ],
)
def test_vit_is_explained_through_its_output_or_token_grid(vit32, name, options):
    model = vit32[0]
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    maps = xcnn.explainer(name, model, **options)(x)
    assert maps.shape == (3, 32, 32) and torch.isfinite(maps).all()
    assert all(m.max() == 1 for m in maps)
    assert not torch.allclose(maps[0], maps[1])  # each image gets its own map


@pytest.mark.parametrize("stem", ["conv", "patch"])
def test_shapes_vit_stems_give_the_same_token_grid(stem):
    from xcnn.nets import shapes_vit

    vit = shapes_vit(img_size=32, stem=stem).eval()
    assert vit.patch_embed(torch.rand(2, 3, 32, 32)).shape == (2, 16, 96)  # 4x4 tokens of width 96
    assert vit(torch.rand(2, 3, 32, 32)).shape == (2, 6)


def test_shapes_vit_bad_settings_are_named():
    from xcnn.nets import shapes_vit

    with pytest.raises(ValueError, match="stem must be 'conv' or 'patch', got 'cnn'"):
        shapes_vit(stem="cnn")
    with pytest.raises(ValueError, match="patch_size must be a power of 2, got 6"):
        shapes_vit(img_size=36, patch_size=6)


def test_wrong_benchmark_architecture_or_size_is_named(tmp_path):
    with pytest.raises(ValueError, match="arch must be one of"):
        fit_benchmark(tmp_path / "x", arch="resnet")
    with pytest.raises(ValueError, match="size must be a multiple of 8, got 36"):
        fit_benchmark(tmp_path / "x", arch="vit", size=36)


@pytest.mark.parametrize("size", [32, 40, 48, 64, 224])
def test_vit_default_layer_at_any_size(size):
    """Attention tensors [B,heads,N,d] are 4-D but not feature maps: the default stays the last norm1."""
    from xcnn.models import Classifier, _build_arch
    from xcnn.training.benchmark import VIT

    backbone, mean, std, _ = _build_arch("timm:vit_tiny_patch16_224", {"num_classes": 6, "img_size": size, **VIT})
    vit = Classifier(backbone, mean, std, input_size=(size, size))
    assert xcnn.default_layer(vit) == "blocks.3.norm1"
