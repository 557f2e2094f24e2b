"""Metrics against hand-computed cases, per-image vs batched, and bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import xcnn
from xcnn.metrics import (
    average_drop_increase,
    boxes_to_masks,
    consistency,
    energy_in_box,
    insertion_deletion,
    iou,
    pointing_game,
    shortcut_energy,
)

S = 16


def object_masks(b: int = 3) -> torch.Tensor:
    masks = torch.zeros(b, S, S, dtype=torch.bool)
    for i in range(b):
        masks[i, 2 + i : 8 + i, 4 : 10 + i] = True
    return masks


class Constant(nn.Module):
    """p(class 0) = 0.3 whatever the input."""

    def forward(self, x):
        logits = torch.log(torch.tensor([0.3, 0.7], device=x.device))
        return logits.expand(len(x), 2) + 0 * x.sum((1, 2, 3))[:, None]


class LooksAtRegion(nn.Module):
    """Class 1's logit is 20 * (mean brightness inside a fixed region - 0.25): the region is everything."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.register_buffer("region", region.float())

    def forward(self, x):
        inside = (x.mean(1) * self.region).sum((1, 2)) / self.region.sum()
        z = 20 * (inside - 0.25)
        return torch.stack([-z, z], 1)


def test_pointing_tolerance_beyond_the_image_covers_it_all():
    masks = torch.zeros(1, S, S, dtype=torch.bool)
    masks[0, 0, 0] = True
    maps = torch.zeros(1, S, S)
    maps[0, S - 1, S - 1] = 1.0  # the far corner: 15 * sqrt(2) ~ 21.2 pixels away
    assert pointing_game(maps, masks, tolerance=21) == 0.0 and pointing_game(maps, masks, tolerance=22) == 1.0
    assert pointing_game(maps, masks, tolerance=10**9) == 1.0  # no 2e9-wide disk is built


def test_a_map_equal_to_the_mask_is_perfect_and_its_inverse_scores_zero():
    masks = object_masks()
    maps = masks.float()
    assert pointing_game(maps, masks) == 1.0
    assert energy_in_box(maps, masks) == pytest.approx(100.0)
    assert iou(maps, masks) == pytest.approx(1.0)
    inverse = 1.0 - maps
    assert pointing_game(inverse, masks) == 0.0
    assert energy_in_box(inverse, masks) == pytest.approx(0.0)
    assert iou(inverse, masks) == pytest.approx(0.0)


def test_pointing_tolerance_and_empty_masks():
    masks = torch.zeros(2, S, S, dtype=torch.bool)
    masks[0, 5, 5] = True
    maps = torch.zeros(2, S, S)
    maps[0, 5, 8] = 1.0  # 3 pixels from the object
    maps[1, 0, 0] = 1.0
    with pytest.warns(UserWarning, match="1 of 2 images have an empty mask"):
        assert pointing_game(maps, masks) == 0.0
        assert pointing_game(maps, masks, tolerance=3) == 0.5
        assert pointing_game(maps, masks, tolerance=2) == 0.0


def test_an_integer_mask_is_the_object_where_it_is_not_zero():
    """A uint8 0/255 mask (``read_image`` of a PNG mask, non-zero = object as xcnn's loader reads mask files) gives
    the numbers of its boolean mask: the top half of a 4x4 image, hand-computed as in the test below."""
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :2] = True
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, 0], maps[0, 3, 3] = 3.0, 1.0
    for given in (masks.to(torch.uint8) * 255, masks.long() * 7, masks.float()):
        assert energy_in_box(maps, given) == pytest.approx(75.0)
        assert iou(maps, given, threshold=0.5) == pytest.approx(1 / 9)
        assert pointing_game(maps, given) == 1.0
        assert shortcut_energy(maps, given) == pytest.approx(75.0)


def test_energy_and_iou_by_hand():
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :2] = True  # top half
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, 0], maps[0, 3, 3] = 3.0, 1.0
    assert energy_in_box(maps, masks) == pytest.approx(75.0)
    assert iou(maps, masks, threshold=0.5) == pytest.approx(1 / 9)  # 2 pixels found, 1 in the 8-pixel half
    assert energy_in_box(torch.zeros(1, 4, 4), masks) == pytest.approx(50.0)  # no preference = uniform
    boxes = torch.tensor([[0, 0, 3, 1]])
    assert torch.equal(boxes_to_masks(boxes, (4, 4)), masks)


def test_energy_ignores_the_negative_part_and_a_constant_map_selects_nothing():
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :2] = True
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, 0], maps[0, 3, 3], maps[0, 3, 0] = 1.0, 1.0, -2.0  # the negative pixel carries no energy
    assert energy_in_box(maps, masks) == pytest.approx(50.0)
    flat = torch.full((1, 4, 4), 0.5)  # every pixel equals the mean (and 0.5): none strictly above
    assert iou(flat, masks) == 0.0 and iou(flat, masks, threshold=0.5) == 0.0


def test_shortcut_energy_counts_only_images_with_a_patch():
    patch = torch.zeros(2, S, S, dtype=torch.bool)
    patch[0, :3, :3] = True
    maps = torch.zeros(2, S, S)
    maps[:, :3, :3] = 1.0
    assert shortcut_energy(maps, patch) == pytest.approx(100.0)
    per = shortcut_energy(maps, patch, per_image=True)
    assert per[0] == pytest.approx(100.0) and torch.isnan(per[1])
    with pytest.raises(ValueError, match="no image has a shortcut patch"):
        shortcut_energy(maps, torch.zeros_like(patch))


def test_average_drop_of_an_all_ones_map_is_zero():
    torch.manual_seed(0)
    model = xcnn.load_model(LooksAtRegion(object_masks(1)[0]), raw_pixels=True, input_size=(S, S))
    images = torch.rand(4, 3, S, S)
    out = average_drop_increase(model, images, torch.ones(4, S, S))
    assert out["AD@100"] == pytest.approx(0.0, abs=1e-4) and out["IC@100"] == 0.0
    assert set(out) == {"AD@100", "IC@100", "AD@50", "IC@50", "AD@15", "IC@15"}


def test_average_drop_by_hand():
    """Keeping 50 % of the pixels at value 1 leaves the region's brightness halved or kept, exactly."""
    region = torch.zeros(S, S, dtype=torch.bool)
    region[:, : S // 2] = True  # left half
    model = xcnn.load_model(LooksAtRegion(region), raw_pixels=True, input_size=(S, S))
    images = torch.full((2, 3, S, S), 0.5)
    good = region.float().expand(2, S, S)  # keeps exactly the left half
    bad = (~region).float().expand(2, S, S)  # keeps exactly the right half: the region goes black
    y = torch.sigmoid(torch.tensor(2 * 20 * 0.25)).item()
    o_bad = torch.sigmoid(torch.tensor(2 * 20 * (0 - 0.25))).item()
    assert average_drop_increase(model, images, good, 1, keep=(0.5,))["AD@50"] == pytest.approx(0.0, abs=1e-4)
    assert average_drop_increase(model, images, bad, 1, keep=(0.5,))["AD@50"] == pytest.approx(
        100 * (y - o_bad) / y, rel=1e-4
    )


def test_average_drop_keeps_the_top_pixels_with_their_values_by_hand():
    """A map with distinct values 1 - i/512 in raster order i, on a constant image of 0.3: keeping the top q
    keeps pixels 0..round(q*256)-1 with those values, so the region's brightness, O and AD follow by hand;
    p(class 1) = 0.88 on the clean image, so the division by Y shows. For class 0 every mask raises the
    probability: AD 0 (the drop is clipped at 0) and IC 100."""
    region = torch.ones(S, S, dtype=torch.bool)  # the whole image is the evidence
    model = xcnn.load_model(LooksAtRegion(region), raw_pixels=True, input_size=(S, S))
    images = torch.full((1, 3, S, S), 0.3)
    values = 1 - torch.arange(S * S, dtype=torch.float64) / 512
    maps = values.float().view(1, S, S)
    out = average_drop_increase(model, images, maps, 1)
    y = torch.sigmoid(torch.tensor(2 * 20 * (0.3 - 0.25), dtype=torch.float64)).item()
    for q in (1.0, 0.5, 0.15):
        kept = math.floor(q * S * S + 0.5)
        inside = 0.3 * values[:kept].sum().item() / (S * S)
        o = torch.sigmoid(torch.tensor(2 * 20 * (inside - 0.25), dtype=torch.float64)).item()
        assert out[f"AD@{100 * q:g}"] == pytest.approx(100 * max(0.0, y - o) / y, rel=1e-4), q
        assert out[f"IC@{100 * q:g}"] == (100.0 if o > y else 0.0)
    rises = average_drop_increase(model, images, maps, 0)
    assert all(rises[f"AD@{k}"] == 0.0 and rises[f"IC@{k}"] == 100.0 for k in (100, 50, 15))


def test_insertion_and_deletion_of_a_constant_classifier_equal_the_constant():
    model = xcnn.load_model(Constant(), raw_pixels=True, input_size=(S, S))
    images, maps = torch.rand(3, 3, S, S), torch.rand(3, S, S)
    out = insertion_deletion(model, images, maps, targets=0, steps=8)
    assert out["insertion"] == pytest.approx(0.3, abs=1e-5) and out["deletion"] == pytest.approx(0.3, abs=1e-5)
    assert out["curves"]["deletion"].shape == (3, 9)


class Intact(nn.Module):
    """p(class 0) = (share of pixels still as in the original image) ** power, for images made by
    :func:`intact_images`: channel 0 is 1 (deletion sets it to 0) and channel 1 a 0/1 checkerboard (the
    insertion's blur turns it to ~0.5), so a pixel is "intact" exactly when it has not been deleted or has
    been revealed. The curves are then known in closed form whatever the map."""

    def __init__(self, power: int = 1):
        super().__init__()
        self.power = power

    def forward(self, x):
        intact = ((x[:, 0] > 0.5) & ((x[:, 1] - 0.5).abs() > 0.25)).float().mean((1, 2))
        p = intact**self.power
        return torch.stack([p.clamp_min(1e-30).log(), (1 - p).clamp_min(1e-30).log()], 1)


def intact_images(b: int, h: int, w: int) -> torch.Tensor:
    x = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(0))
    x[:, 0] = 1.0
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    x[:, 1] = ((yy + xx) % 2).float()
    return x


def changed_fractions(steps: int, n: int) -> list[float]:
    """The documented pixel counts: point k changes round(k * n / steps) pixels (half up), as fractions."""
    return [math.floor(k * n / steps + 0.5) / n for k in range(steps + 1)]


def trapezoid(xs, ys) -> float:
    return sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:], strict=True))


@pytest.mark.parametrize("h,w", [(32, 32), (15, 17)])
@pytest.mark.parametrize("steps", [7, 16, 28, 100])
def test_insertion_and_deletion_auc_of_a_linear_model_is_one_half(h, steps, w):
    """p = share of pixels intact: the deletion curve falls linearly from 1 to 0 and the insertion curve
    rises from 0 to 1, so both AUCs are exactly 1/2, for steps that do not divide H*W too (a fixed
    ceil(H*W/steps) pixels per step gave 0.4943 at 28 steps and 0.4655 at 100 on 32x32)."""
    model = xcnn.load_model(Intact(), raw_pixels=True, input_size=(h, w))
    maps = torch.rand(2, h, w, generator=torch.Generator().manual_seed(1))
    out = insertion_deletion(model, intact_images(2, h, w), maps, targets=0, steps=steps)
    assert out["insertion"] == pytest.approx(0.5, abs=1e-6) and out["deletion"] == pytest.approx(0.5, abs=1e-6)
    fractions = torch.tensor(changed_fractions(steps, h * w))
    torch.testing.assert_close(out["fractions"], fractions)
    for curve in out["curves"]["deletion"]:  # the share left after each point, down to the empty image
        torch.testing.assert_close(curve, 1 - fractions, atol=1e-6, rtol=0)
    for curve in out["curves"]["insertion"]:
        torch.testing.assert_close(curve, fractions, atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps", [4, 28])
def test_insertion_and_deletion_auc_is_the_trapezoid_over_the_changed_fractions(steps):
    """p = (share intact)^2, a curve that is not symmetric: the AUC is the trapezoid rule over the points
    (1/3 + 1/(6 steps^2) for evenly spaced ones), not their plain mean (1/3 + 1/(6 steps))."""
    h = w = 15
    model = xcnn.load_model(Intact(power=2), raw_pixels=True, input_size=(h, w))
    out = insertion_deletion(model, intact_images(1, h, w), torch.rand(1, h, w), targets=0, steps=steps)
    xs = changed_fractions(steps, h * w)
    assert out["insertion"] == pytest.approx(trapezoid(xs, [x**2 for x in xs]), abs=1e-6)
    assert out["deletion"] == pytest.approx(trapezoid(xs, [(1 - x) ** 2 for x in xs]), abs=1e-6)
    assert abs(out["insertion"] - 1 / 3) < 1 / (6 * steps**2) + 1e-3  # the closed form, up to the rounding


class CentrePixel(nn.Module):
    """p(class 0) = the red value of the centre pixel."""

    def forward(self, x):
        p = x[:, 0, x.shape[2] // 2, x.shape[3] // 2]
        return torch.stack([p.clamp_min(1e-30).log(), (1 - p).clamp_min(1e-30).log()], 1)


def test_insertion_starts_from_the_gaussian_blur_and_deletion_from_the_image():
    """One white pixel on black: the blurred start (kernel 11, sigma 5) keeps g(0)^2 of it at the centre,
    with g the normalised 1-D Gaussian kernel (a black start would give 0); revealing it (the map's top
    pixel) gives 1. Deletion starts at 1 and removes it first."""
    size = 21
    images = torch.zeros(1, 3, size, size)
    images[0, :, size // 2, size // 2] = 1.0
    maps = torch.rand(1, size, size) * 0.5
    maps[0, size // 2, size // 2] = 1.0
    model = xcnn.load_model(CentrePixel(), raw_pixels=True, input_size=(size, size))
    out = insertion_deletion(model, images, maps, targets=0, steps=size * size)
    centre = 1 / sum(math.exp(-(k**2) / (2 * 5.0**2)) for k in range(-5, 6))
    insertion, deletion = out["curves"]["insertion"][0], out["curves"]["deletion"][0]
    assert insertion[0].item() == pytest.approx(centre**2, rel=1e-5)
    assert insertion[1:].tolist() == pytest.approx([1.0] * size * size, abs=1e-6)
    assert deletion[0].item() == pytest.approx(1.0, abs=1e-6) and deletion[1:].max() < 1e-6


def test_insertion_of_a_constant_image_is_flat():
    """The blur of a constant image is the image: inserting changes nothing and the curve stays at p(x)."""
    model = xcnn.load_model(LooksAtRegion(object_masks(1)[0]), raw_pixels=True, input_size=(S, S))
    images = torch.full((1, 3, S, S), 0.3)
    with torch.no_grad():
        p = model(images).softmax(1)[0, 1].item()
    out = insertion_deletion(model, images, torch.rand(1, S, S), targets=1, steps=10)
    assert out["curves"]["insertion"][0].tolist() == pytest.approx([p] * 11, abs=1e-6)
    assert out["insertion"] == pytest.approx(p, abs=1e-6)


def test_deletion_of_a_perfect_map_falls_fast():
    region = object_masks(1)[0]
    model = xcnn.load_model(LooksAtRegion(region), raw_pixels=True, input_size=(S, S))
    images = torch.rand(4, 3, S, S, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.5
    perfect = region.float().expand(4, S, S) + 0.01 * torch.rand(4, S, S)
    random = torch.rand(4, S, S, generator=torch.Generator().manual_seed(1))
    good = insertion_deletion(model, images, perfect, targets=1, steps=16)
    bad = insertion_deletion(model, images, random, targets=1, steps=16)
    assert good["deletion"] < 0.25 < bad["deletion"]
    assert good["curves"]["deletion"][:, 4].max() < 0.05  # the region (14 % of pixels) is gone after 4/16 steps


def test_batched_values_equal_each_image_run_alone():
    """Every metric's per-image values from one batched call equal the values of each image scored alone,
    and the batch value is their mean. Model outputs are probabilities, equal across batch sizes up to
    float rounding (conftest.ROUNDING = 1e-5 of their scale 1): AD = 100 (Y - O) / Y with Y > 0.9 here is
    allowed 100 * 1e-5 / 0.9 ~ 1e-3 %; the AUCs (means of probabilities) 1e-5; map-only metrics are exact."""
    torch.manual_seed(0)
    model = xcnn.load_model(LooksAtRegion(object_masks(1)[0]), input_size=(S, S), raw_pixels=True)
    images, maps, masks = torch.rand(3, 3, S, S) * 0.5 + 0.5, torch.rand(3, S, S), object_masks()
    with torch.no_grad():
        assert model(images).softmax(1)[:, 1].min() > 0.9
    alone = [slice(i, i + 1) for i in range(3)]
    per = average_drop_increase(model, images, maps, per_image=True)
    singles = [average_drop_increase(model, images[i], maps[i]) for i in alone]
    batched = average_drop_increase(model, images, maps)
    for key in batched:
        tol = 1e-3 if key.startswith("AD") else 0  # IC counts O > Y: no tie within rounding here
        assert per[key].shape == (3,)
        assert per[key].tolist() == pytest.approx([one[key] for one in singles], abs=tol), key
        assert batched[key] == pytest.approx(per[key].mean().item(), abs=1e-9), key
    curves = insertion_deletion(model, images, maps, per_image=True)
    singles = [insertion_deletion(model, images[i], maps[i]) for i in alone]
    for key in ("insertion", "deletion"):
        assert curves[key].tolist() == pytest.approx([one[key] for one in singles], abs=1e-5), key
        assert insertion_deletion(model, images, maps)[key] == pytest.approx(curves[key].mean().item(), abs=1e-9)
    for fn in (pointing_game, energy_in_box, iou):
        values = fn(maps, masks, per_image=True)
        assert values.tolist() == pytest.approx([fn(maps[i], masks[i]) for i in alone], rel=1e-6, abs=1e-9)
        assert fn(maps, masks) == pytest.approx(values.mean().item(), rel=1e-6)


def test_consistency_of_an_equivariant_and_a_fixed_explainer():
    images = torch.rand(3, 3, S, S, generator=torch.Generator().manual_seed(0))

    def brightness(x, targets=None):  # a pixel-wise function of the image: moves with it exactly
        return x.mean(1)

    def centre(x, targets=None):  # always the same blob, wherever the object went
        yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
        blob = torch.exp(-((yy - 4.0) ** 2 + (xx - 4.0) ** 2) / 8)
        return blob.expand(len(x), S, S)

    eq = consistency(brightness, images, targets=0, n_transforms=6)
    fixed = consistency(centre, images, targets=0, n_transforms=6)
    assert eq["cosine"] > 0.97 and eq["pearson"] > 0.9
    assert fixed["pearson"] < eq["pearson"] - 0.3
    with pytest.raises(ValueError, match="pass targets="):
        consistency(brightness, images)


class BrighterSide(nn.Module):
    """Class 0 when the left half is brighter than the right, class 1 otherwise: a flip swaps the class."""

    def forward(self, x):
        w = x.shape[-1]
        s = 10 * (x[..., : w // 2].mean((1, 2, 3)) - x[..., w // 2 :].mean((1, 2, 3)))
        return torch.stack([s, -s], 1)


class BrightnessFor:
    """Class 0's map is the brightness, class 1's its complement: pixel-wise in the image, so each class's
    map moves exactly with a crop and a flip, while the two classes' maps are anti-correlated."""

    def __init__(self, model):
        self.model = model

    def __call__(self, images, targets=None):
        if targets is None:
            targets = self.model(images).argmax(1)
        b = images.mean(1)
        return torch.where(torch.as_tensor(targets).view(-1, 1, 1) == 0, b, 1 - b)


def test_consistency_explains_the_original_class_on_the_transformed_image():
    """A flip makes the right half brighter, so the transformed image's own top-1 is the other class and its
    map the complement (Pearson -1): explained for the original class, the map moves with the image."""
    from xcnn.metrics.consistency import random_crop_flips

    model = xcnn.load_model(BrighterSide(), raw_pixels=True, input_size=(S, S))
    images = torch.rand(3, 3, S, S, generator=torch.Generator().manual_seed(0)) * 0.4
    images[..., : S // 2] += 0.6  # the left half brighter: class 0
    transforms = random_crop_flips(6, (S, S), torch.Generator().manual_seed(0))
    assert any(t.flip for t in transforms)  # the premise: a transform that changes the top-1
    with torch.no_grad():
        assert bool((model(images).argmax(1) == 0).all()) and bool((model(images.flip(-1)).argmax(1) == 1).all())
    out = consistency(BrightnessFor(model), images, n_transforms=6, per_image=True)
    assert out["pearson"].min() > 0.999 and out["cosine"].min() > 0.999


def test_random_crop_flips_follow_their_distribution():
    """Area fraction in the scale range and aspect ratio (width / height) in the ratio range, up to the
    rounding to whole pixels; both orientations and both flip states occur."""
    from xcnn.metrics.consistency import random_crop_flips

    size = 64
    crops = random_crop_flips(200, (size, size), torch.Generator().manual_seed(0), scale=(0.5, 1.0))
    for c in crops:
        assert 0 <= c.top <= size - c.height and 0 <= c.left <= size - c.width
        assert 0.5 - 2 / size <= c.height * c.width / size**2 <= 1.0
        assert 3 / 4 - 0.05 <= c.width / c.height <= 4 / 3 + 0.05 or size in (c.width, c.height)  # clipped at the edge
    assert any(c.width > c.height for c in crops) and any(c.width < c.height for c in crops)
    assert 60 < sum(c.flip for c in crops) < 140


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    from xcnn.metrics.sanity import spearman

    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 6, 7), generator=gen).float()  # many ties
    b = a + torch.randint(0, 3, (3, 6, 7), generator=gen).float()
    ours = spearman(a, b)
    for i in range(3):
        assert ours[i].item() == pytest.approx(spearmanr(a[i].flatten(), b[i].flatten()).statistic, abs=1e-5)


def test_cascade_goes_from_the_logits_down():
    from xcnn.metrics.sanity import cascade_layers
    from xcnn.nets import ShapesNet

    model = xcnn.load_model(ShapesNet(widths=(4, 4, 4, 4)), raw_pixels=True, input_size=(32, 32))
    assert cascade_layers(model) == ["fc", "layer4", "layer3", "layer2", "layer1", "stem"]


@pytest.mark.parametrize(
    "call,error,message",
    [
        (
            lambda m, x: average_drop_increase(m, x, torch.rand(2, S, S)),
            ValueError,
            "maps have shape \\[2, 16, 16\\] but the images need \\[3, 16, 16\\]",
        ),
        (lambda m, x: average_drop_increase(m, x, torch.full((3, S, S), float("nan"))), ValueError, "NaN"),
        (lambda m, x: insertion_deletion(m, x, torch.rand(3, S, 8)), ValueError, "maps have shape"),
        (lambda m, x: insertion_deletion(m, x, torch.rand(3, S, S), steps=0), ValueError, "steps must be"),
        (lambda m, x: average_drop_increase(m, x, torch.rand(3, S, S), keep=(0.0,)), ValueError, "keep fractions"),
        (lambda m, x: average_drop_increase(m, x * 3, torch.rand(3, S, S)), ValueError, "\\[0,1\\]"),
        (lambda m, x: average_drop_increase(m, x, torch.rand(3, S, S), targets=5), ValueError, "out of range"),
        (
            lambda m, x: pointing_game(torch.rand(3, S, S), torch.ones(3, 8, 8, dtype=torch.bool)),
            ValueError,
            "masks have shape",
        ),
        (
            lambda m, x: pointing_game(torch.rand(3, S, S), torch.full((3, S, S), 0.5)),
            ValueError,
            "masks of floats must be 0/1",
        ),
        (
            lambda m, x: iou(torch.rand(3, S, S), torch.ones(3, S, S, dtype=torch.bool), threshold=2),
            ValueError,
            "threshold",
        ),
        (lambda m, x: energy_in_box(torch.rand(S, S), torch.ones(S, S, dtype=torch.bool)), ValueError, "\\[B,H,W\\]"),
        (
            lambda m, x: energy_in_box(torch.rand(3, S, S), torch.full((3, S, S), 0.3)),
            ValueError,
            "masks of floats must be 0/1",
        ),
        (
            lambda m, x: iou(torch.rand(3, S, S), torch.ones(3, S, S, dtype=torch.complex64)),
            TypeError,
            "masks must be boolean, integer",
        ),
        (lambda m, x: average_drop_increase(m, x, 5 * torch.rand(3, S, S)), ValueError, "maps must be in \\[0,1\\]"),
        (lambda m, x: average_drop_increase(m, x, torch.rand(3, S, S), keep=0.5), TypeError, "keep must be a seq"),
        (lambda m, x: average_drop_increase(m, x, torch.rand(3, S, S), keep=("a",)), TypeError, "keep fractions"),
        (lambda m, x: average_drop_increase(m, x, torch.rand(3, S, S), batch_size=0), ValueError, "batch_size must"),
        (lambda m, x: insertion_deletion(m, x, torch.rand(3, S, S), batch_size=-1), ValueError, "batch_size must"),
        (lambda m, x: insertion_deletion(m, x, torch.rand(3, S, S), steps=10**12), ValueError, "at most the number"),
        (lambda m, x: consistency(lambda i, t: i.mean(1), x, targets=0, seed="a"), TypeError, "seed must be an int"),
        (lambda m, x: boxes_to_masks(torch.tensor([[0, 0, 3, 3]]), (-4, 4)), ValueError, "size\\[0\\] \\(H\\)"),
    ],
)
def test_bad_metric_input(call, error, message):
    model = xcnn.load_model(Constant(), raw_pixels=True, input_size=(S, S))
    with pytest.raises(error, match=message):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call(model, torch.rand(3, 3, S, S))


class Gate(nn.Module):
    """A threshold the explainer below subtracts; its "re-initialisation" raises it to 0.5 (deterministic)."""

    def __init__(self):
        super().__init__()
        self.t = nn.Parameter(torch.zeros(()))

    def reset_parameters(self):
        with torch.no_grad():
            self.t.fill_(0.5)


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x.mean((2, 3))) + 0 * self.gate.t


def gated_explainer(net):
    """ReLU(brightness - t): the brightness while t = 0; after the gate's reset, dark images (all below 0.5)
    get an all-zero (dead) map."""
    return lambda images, targets=None: (images.mean(1) - net.backbone.gate.t).clamp_min(0)


def test_sanity_excludes_and_counts_constant_maps():
    """Depth 1 (fc) leaves the maps as they were: Spearman and SSIM 1. Depth 2 (the gate) kills the dark
    images' maps: NaN there, counted, and the means are over the bright images only (Spearman as scipy's).
    A constant image has a constant map on the trained model already: excluded at every depth."""
    from scipy.stats import spearmanr

    from xcnn.metrics import randomization_sanity

    model = xcnn.load_model(Gated(), raw_pixels=True, input_size=(S, S))
    gen = torch.Generator().manual_seed(0)
    bright = torch.rand(2, 3, S, S, generator=gen)
    dark = torch.rand(2, 3, S, S, generator=gen) * 0.45
    images = torch.cat([bright, dark, torch.full((1, 3, S, S), 0.7)])
    per = randomization_sanity(gated_explainer, model, images, targets=0, per_image=True)
    assert per["layers"] == ["fc", "gate"]
    excluded = torch.tensor([[False, False, False, False, True], [False, False, True, True, True]])
    assert torch.equal(per["excluded"], excluded)
    assert torch.equal(per["spearman"].isnan(), excluded) and torch.equal(per["ssim"].isnan(), excluded)
    assert per["spearman"][0, :4].tolist() == pytest.approx([1.0] * 4, abs=1e-6)
    assert per["ssim"][0, :4].tolist() == pytest.approx([1.0] * 4, abs=1e-4)
    b = bright.mean(1)
    expected = [spearmanr(b[i].flatten(), (b[i] - 0.5).clamp_min(0).flatten()).statistic for i in range(2)]
    assert per["spearman"][1, :2].tolist() == pytest.approx(expected, abs=1e-5)
    mean = randomization_sanity(gated_explainer, model, images, targets=0)
    assert mean["excluded"] == [1, 3]
    assert mean["spearman"][1] == pytest.approx(sum(expected) / 2, abs=1e-5)
    # only dead maps at the last depth: the summary is NaN, not 0 (a "strong pass")
    only_dark = randomization_sanity(gated_explainer, model, dark, targets=0)
    assert math.isnan(only_dark["spearman"][1]) and math.isnan(only_dark["ssim"][1])
    assert only_dark["excluded"] == [0, 2]


def test_bad_sanity_input_is_named():
    from xcnn.metrics import randomization_sanity

    model = xcnn.load_model(Gated(), raw_pixels=True, input_size=(S, S))
    images = torch.rand(2, 3, S, S)
    with pytest.raises(ValueError, match="layers is empty"):
        randomization_sanity(gated_explainer, model, images, layers=[])
    with pytest.raises(ValueError, match="maps have shape \\[2, 8, 8\\] but the images need \\[2, 16, 16\\]"):
        randomization_sanity(lambda net: lambda x, t=None: torch.rand(2, 8, 8), model, images)
    with pytest.raises(TypeError, match="maps must be a torch\\.Tensor"):
        randomization_sanity(lambda net: lambda x, t=None: x.mean(1).numpy(), model, images)
    with pytest.raises(TypeError, match="seed must be an integer"):
        randomization_sanity(gated_explainer, model, images, seed="a")
    with pytest.raises(ValueError, match="images must be larger than 5 pixels"):
        tiny = xcnn.load_model(Gated(), raw_pixels=True, input_size=(4, 4))
        randomization_sanity(gated_explainer, tiny, torch.rand(1, 3, 4, 4))
    assert randomization_sanity(gated_explainer, model, images, layers="gate")["layers"] == ["gate"]  # one name
