"""The shapes benchmark: deterministic, exact ground truth, the planted shortcut."""

from __future__ import annotations

import pytest
import torch

from xcnn.data.synthetic import CLASSES, SHORTCUT_COLOURS, Shapes


def test_samples_are_deterministic_and_well_formed():
    ds = Shapes("train", 20, size=48, seed=3)
    a, b = ds[7], Shapes("train", 20, size=48, seed=3)[7]
    for key in a:
        assert torch.equal(a[key], b[key])
    assert a["image"].shape == (3, 48, 48) and a["image"].dtype == torch.float32
    assert 0 <= a["image"].min() and a["image"].max() <= 1
    assert a["mask"].dtype == torch.bool and a["mask"].shape == (48, 48)
    assert 0 <= int(a["label"]) < len(CLASSES) == 6
    assert not torch.equal(ds[7]["image"], ds[8]["image"])
    assert not torch.equal(ds[7]["image"], Shapes("test", 20, size=48, seed=3)[7]["image"])
    assert not torch.equal(ds[7]["image"], Shapes("train", 20, size=48, seed=4)[7]["image"])


def test_boxes_bound_the_masks_and_objects_have_a_plausible_size():
    ds = Shapes("val", 60, size=64)
    for i in range(len(ds)):
        s = ds[i]
        rows, cols = torch.nonzero(s["mask"], as_tuple=True)
        assert s["box"].tolist() == [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]
        width = int(s["box"][2] - s["box"][0]) + 1
        assert 0.08 * 64 <= width <= 0.42 * 64  # diameters of 15-40 % of the image, rotated
    labels = torch.stack([ds[i]["label"] for i in range(len(ds))])
    assert len(labels.unique()) == 6


def test_the_object_differs_from_its_surroundings():
    ds = Shapes("train", 30, size=64)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    for i in range(len(ds)):
        s = ds[i]
        y = (s["image"] * luma).sum(0)
        ring = torch.nn.functional.max_pool2d(s["mask"][None, None].float(), 5, 1, 2)[0, 0].bool() & ~s["mask"]
        assert (y[s["mask"]].mean() - y[ring].mean()).abs() > 0.1


def test_planted_shortcut_encodes_the_label_in_train_and_lies_in_test():
    p = 0.9
    train = Shapes("train", 200, size=64, shortcut_prob=p)
    test = Shapes("test", 200, size=64, shortcut_prob=p)
    with_patch, truthful = 0, 0
    for i in range(len(train)):
        s = train[i]
        if s["shortcut_mask"].any():
            with_patch += 1
            colour = s["image"][:, s["shortcut_mask"]].mean(1)
            assert torch.allclose(colour, torch.from_numpy(SHORTCUT_COLOURS[int(s["label"])]), atol=1e-6)
            assert not (s["mask"] & s["shortcut_mask"]).any()  # the patch never hides the object
    assert 0.8 * 200 < with_patch < 0.98 * 200
    for i in range(len(test)):
        s = test[i]
        if s["shortcut_mask"].any():
            colour = s["image"][:, s["shortcut_mask"]].mean(1)
            truthful += int(torch.allclose(colour, torch.from_numpy(SHORTCUT_COLOURS[int(s["label"])]), atol=1e-6))
    assert truthful < 0.35 * 200  # random colours: right about 1 time in 6
    clean = Shapes("test", 200, size=64)
    assert not any(clean[i]["shortcut_mask"].any() for i in range(0, 200, 10))
    # the shortcut option changes nothing but the patch
    a, b = clean[5], test[5]
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["label"], b["label"])
    assert torch.equal(a["image"][:, ~b["shortcut_mask"]], b["image"][:, ~b["shortcut_mask"]])


def test_absent_patch_option():
    ds = Shapes("test", 50, shortcut_prob=1.0, shortcut_test="absent")
    assert not any(ds[i]["shortcut_mask"].any() for i in range(50))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"split": "dev"}, "split must be one of"),
        ({"size": 16}, "size must be in 32..224"),
        ({"shortcut_prob": 1.5}, "shortcut_prob must be in"),
        ({"n": 0}, "n must be positive"),
        ({"shortcut_test": "maybe"}, "shortcut_test"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Shapes(**kwargs)


def test_index_out_of_range():
    with pytest.raises(IndexError):
        Shapes("train", 5)[5]
