"""Metrics against hand-computed cases, per-image vs batched, and bad input."""

from __future__ import annotations

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


def test_insertion_and_deletion_of_a_constant_classifier_equal_the_constant():
    model = xcnn.load_model(Constant(), raw_pixels=True, input_size=(S, S))
    images, maps = torch.rand(3, 3, S, S), torch.rand(3, S, S)
    out = insertion_deletion(model, images, maps, targets=0, steps=8)
    assert out["insertion"] == pytest.approx(0.3, abs=1e-5) and out["deletion"] == pytest.approx(0.3, abs=1e-5)
    assert out["curves"]["deletion"].shape == (3, 9)


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
        (lambda m, x: pointing_game(torch.rand(3, S, S), torch.full((3, S, S), 0.5)), ValueError, "boolean"),
        (
            lambda m, x: iou(torch.rand(3, S, S), torch.ones(3, S, S, dtype=torch.bool), threshold=2),
            ValueError,
            "threshold",
        ),
        (lambda m, x: energy_in_box(torch.rand(S, S), torch.ones(S, S, dtype=torch.bool)), ValueError, "\\[B,H,W\\]"),
    ],
)
def test_bad_metric_input(call, error, message):
    model = xcnn.load_model(Constant(), raw_pixels=True, input_size=(S, S))
    with pytest.raises(error, match=message):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call(model, torch.rand(3, 3, S, S))
