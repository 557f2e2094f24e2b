"""Small reference architectures that xcnn trains itself (the benchmark CNN)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import Tensor, nn

from ._validate import check_memory, check_number, check_numbers

__all__ = ["ARCHITECTURES", "ShapesNet", "shapes_vit"]


class _Block(nn.Module):
    """Basic residual block: two 3x3 convs with BatchNorm, projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ShapesNet(nn.Module):
    """ResNet-style CNN for the shapes benchmark: a stem, four stages ``layer1``..``layer4``, global
    average pooling and a linear classifier. Default strides (stem, layer1..4) = 2/1/2/2/1: a 64x64 image
    gives an 8x8 ``layer4`` map while the costly early stages run at 32x32. ``stem_pool=True`` adds a 2x2
    average pool (``stem_pool``) after the stem: with a stride-1 stem the grids are the default's, and the
    network has an early pooling layer that :func:`xcnn.interpretable.insert_lap` can replace. ``widths``: 4
    positive channel counts (stem and layer1, layer2, layer3, layer4); ``strides``: 5 positive strides."""

    def __init__(
        self,
        num_classes: int = 6,
        widths: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 1, 2, 2, 1),
        stem_pool: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(stem_pool, bool):
            raise TypeError(f"ShapesNet: stem_pool must be True or False, got {stem_pool!r}")
        num_classes = check_number("ShapesNet: num_classes", num_classes, integer=True, low=1)
        widths = check_numbers("ShapesNet: widths", widths, 4, integer=True, low=1, expected="4 positive integers")
        strides = check_numbers("ShapesNet: strides", strides, 5, integer=True, low=1, expected="5 positive integers")
        # the weights (3x3 convolutions, 1x1 shortcuts, the classifier) in float32, refused before they are
        # allocated when they cannot fit this machine (a mistyped width of 10**6 asks for terabytes)
        blocks = itertools.pairwise((widths[0], *widths))  # (cin, cout) of layer1..layer4
        weights = 27 * widths[0] + sum(9 * a * b + 9 * b * b + a * b for a, b in blocks) + widths[3] * num_classes
        check_memory(4 * weights, f"ShapesNet(widths={list(widths)}, num_classes={num_classes})")
        self.num_classes, self.widths, self.strides = num_classes, widths, strides
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, strides[0], 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        self.stem_pool = nn.AvgPool2d(2) if stem_pool else None
        self.layer1 = _Block(widths[0], widths[0], strides[1])
        self.layer2 = _Block(widths[0], widths[1], strides[2])
        self.layer3 = _Block(widths[1], widths[2], strides[3])
        self.layer4 = _Block(widths[2], widths[3], strides[4])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        if self.stem_pool is not None:
            x = self.stem_pool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x).flatten(1))


def shapes_vit(
    num_classes: int = 6,
    img_size: int = 64,
    patch_size: int = 8,
    embed_dim: int = 96,
    depth: int = 4,
    num_heads: int = 3,
    stem: str = "conv",
) -> nn.Module:
    """A small timm ``VisionTransformer`` for the shapes benchmark (class token, learned positions).

    ``stem="patch"`` is ViT's patchify embedding: one ``patch_size`` x ``patch_size`` stride-``patch_size``
    convolution. ``stem="conv"`` replaces it by a convolutional stem (Xiao et al. 2021, "Early convolutions
    help transformers see better"): log2(``patch_size``) 3x3 stride-2 convolutions with BatchNorm and ReLU,
    widening to ``embed_dim``, then a 1x1 projection. The token grid is the same (``img_size / patch_size``
    per side), and so is everything after it. Why the default is ``"conv"``: on the 6000 benchmark images
    the patchify ViT stays at chance (see docs/results.md), the convolutional stem trains.
    """
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    if stem not in ("conv", "patch"):
        raise ValueError(f"stem must be 'conv' or 'patch', got {stem!r}")
    sizes = {"num_classes": num_classes, "img_size": img_size, "patch_size": patch_size, "embed_dim": embed_dim,
             "depth": depth, "num_heads": num_heads}  # fmt: skip
    for name, value in sizes.items():
        check_number(f"shapes_vit: {name}", value, integer=True, low=1)
    n_convs = patch_size.bit_length() - 1
    if stem == "conv" and (patch_size < 2 or 2**n_convs != patch_size):
        raise ValueError(
            f"a convolutional stem halves the image per convolution: patch_size must be a power of 2, got {patch_size}"
        )
    if img_size % patch_size:
        raise ValueError(f"shapes_vit: img_size must be a multiple of patch_size {patch_size}, got {img_size}")
    if embed_dim % num_heads:
        raise ValueError(f"shapes_vit: embed_dim must be a multiple of num_heads {num_heads}, got {embed_dim}")
    if stem == "conv" and embed_dim < 2 ** (n_convs - 1):
        raise ValueError(
            f"shapes_vit: the convolutional stem halves the width per convolution back from embed_dim: embed_dim "
            f"must be at least {2 ** (n_convs - 1)} for patch_size {patch_size}, got {embed_dim}"
        )
    # per block about 12 d^2 weights (attention 4 d^2, MLP 8 d^2), plus the position embedding and the head
    tokens = (img_size // patch_size) ** 2 + 1
    weights = depth * 12 * embed_dim**2 + tokens * embed_dim + embed_dim * num_classes + 3 * patch_size**2 * embed_dim
    check_memory(4 * weights, f"shapes_vit({', '.join(f'{k}={v}' for k, v in sizes.items())})")

    class ConvStem(PatchEmbed):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            widths = [3] + [embed_dim // 2 ** (n_convs - 1 - i) for i in range(n_convs)]
            layers: list[nn.Module] = []
            for cin, cout in itertools.pairwise(widths):
                layers += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            self.proj = nn.Sequential(*layers, nn.Conv2d(widths[-1], embed_dim, 1))

    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, num_classes=num_classes, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, embed_layer=ConvStem if stem == "conv" else PatchEmbed,
    )  # fmt: skip


#: architectures xcnn can rebuild from a saved model's JSON (``{"arch": name, "arch_kwargs": {...}}``)
ARCHITECTURES = {"shapesnet": ShapesNet, "shapes_vit": shapes_vit}
