"""A small timm ViT trained on the benchmark, saved, reloaded, and explained by MDM, extremal perturbation
and the CAM family (through the token-grid reshape)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import xcnn
from xcnn.training.benchmark import fit_benchmark


@pytest.fixture(scope="module")
def vit32(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit32")
    model, results = fit_benchmark(
        out, arch="vit", size=32, n_train=600, n_val=100, n_test=100, epochs=4, lr=1e-3, progress=False
    )
    return model, results, out


def test_benchmark_vit_trains_saves_and_reloads(vit32):
    model, results, out = vit32
    assert results["architecture"] == "vit"
    # it learns: 4 epochs on 600 images take the training loss from 1.815 to 1.772, below chance's log 6 = 1.792
    losses = [epoch["train/loss"] for epoch in json.loads((out / "history.json").read_text())]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.02 and losses[-1] < math.log(6)
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


class OneToken(torch.nn.Module):
    """timm's own patch embedding (its token order), a norm to tap, and a head that reads only token
    ``row * 4 + col`` of the 4x4 grid: the only evidence is one patch of the image."""

    def __init__(self, row: int, col: int) -> None:
        super().__init__()
        from timm.layers import PatchEmbed

        self.patch_embed = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16)
        self.norm1 = torch.nn.LayerNorm(16)
        self.token = row * 4 + col
        self.head = torch.nn.Linear(16, 2)

    def forward(self, x):
        tokens = self.norm1(self.patch_embed(x))  # [B,16,16]: 16 tokens of width 16
        return self.head(tokens[:, self.token])


@pytest.mark.parametrize("name", ["layercam", "hirescam"])
def test_token_grid_keeps_the_image_orientation(name):
    """A head that sees only the patch at row 1, column 3 is explained there by the CAMs that weight each
    position by its own gradient (a transposed or flipped token grid would put the map at row 3, column 1 or
    elsewhere). Grad-CAM averages the gradient over the grid, so its map is not tied to that token."""
    torch.manual_seed(0)
    model = xcnn.load_model(OneToken(1, 3), input_size=(32, 32), raw_pixels=True)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    maps = xcnn.explainer(name, model, layer="norm1")(x, targets=0)
    for m in maps:
        patch = m.reshape(4, 8, 4, 8).mean((1, 3))  # mean of each 8x8 patch
        assert divmod(int(patch.argmax()), 4) == (1, 3), patch
