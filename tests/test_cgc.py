"""CGC: the transforms that move images and maps alike (exact alignment, no flip mix-up), the loss against
its definition, its minimum and finite differences, float16 inner-gradient scaling, training that lowers
the consistency loss on a tiny benchmark model, unlabelled-only batches, resume, bad input, the CLI, DDP."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xcnn
from xcnn.data.synthetic import Shapes
from xcnn.explain import cam_maps
from xcnn.metrics.consistency import CropFlip, apply_each, random_crop_flips
from xcnn.models import Classifier, default_layer
from xcnn.training.benchmark import InMemory
from xcnn.training.cgc import CGCData, CGCTraining, cgc_loss, fit_cgc, split_labeled

from .test_lap_training import SmoothNet, Stop, _stop_after_first, directional_check, small_shapesnet


@pytest.fixture(scope="module")
def shapes32():
    return InMemory(Shapes("train", 192, size=32, seed=3)), InMemory(Shapes("val", 64, size=32, seed=3))


class PointwiseNet(nn.Module):
    """1x1 convolutions with positive weights, global mean, linear head: its Grad-CAM at ``features`` is a
    fixed positive linear combination of the pixel's channels, so CAM(T(x)) = T(CAM(x)) for every resized
    crop and flip T (both are linear, per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 1, bias=False)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.features.weight.uniform_(0.1, 1.0)
            self.fc.weight.uniform_(0.1, 1.0)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def pointwise_model() -> Classifier:
    torch.manual_seed(0)
    return Classifier(PointwiseNet(), input_size=(24, 24), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


# ---- transforms --------------------------------------------------------------------------------------------


def test_the_positive_pair_is_exactly_aligned_and_a_flip_mix_up_would_show():
    model = pointwise_model().eval()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 24, 24, generator=gen)
    transforms = random_crop_flips(6, (24, 24), gen, scale=(0.08, 1.0))
    transforms[0] = CropFlip(2, 3, 10, 14, True)  # some flipped, some not, whatever the draw
    transforms[1] = CropFlip(0, 0, 24, 24, False)
    moved = cam_maps(model, apply_each(transforms, images), 1, "features")
    expected = apply_each(transforms, cam_maps(model, images, 1, "features"))
    torch.testing.assert_close(moved, expected, rtol=1e-5, atol=1e-6)
    # the same check catches a map left unflipped while its image was flipped (the authors' bug)
    wrong = list(transforms)
    wrong[0] = CropFlip(2, 3, 10, 14, False)
    assert not torch.allclose(moved[0], apply_each(wrong, cam_maps(model, images, 1, "features"))[0], atol=1e-3)


def test_the_trainer_builds_aligned_pairs_every_step():
    """Through CGCTraining's own transform sampling and upsampling: the positive cosine is 1 on the
    equivariant model, for a batch that has flipped and unflipped images."""
    model = pointwise_model().eval()
    net = CGCTraining(model, lam=0.5, tau=0.5, consistency="contrastive", cam="gradcam", layer="features")
    images = torch.rand(16, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    out = net(images, torch.full((16,), -1))
    assert float(out["cam_cosine"]) == pytest.approx(1.0, abs=1e-6)
    net.steps.zero_()  # the same draw again: both flip states occurred in it
    first = net.draw(16, (24, 24))
    assert any(t.flip for t in first) and not all(t.flip for t in first)
    assert net.draw(16, (24, 24)) != first and int(net.steps) == 2  # each step draws anew
    net.steps.zero_()
    assert net.draw(16, (24, 24)) == first  # from the step count (checkpointed), not a global generator


def test_random_crop_flips_cover_cgc_scales_and_refuse_bad_ranges():
    transforms = random_crop_flips(400, (64, 64), torch.Generator().manual_seed(0), scale=(0.08, 1.0))
    areas = torch.tensor([t.height * t.width / 64**2 for t in transforms])
    assert 0.06 < float(areas.min()) < 0.15 and float(areas.max()) > 0.9
    assert 0.4 < sum(t.flip for t in transforms) / 400 < 0.6
    for t in transforms:
        assert 0 <= t.top and t.top + t.height <= 64 and 0 <= t.left and t.left + t.width <= 64
    with pytest.raises(ValueError, match="scale"):
        random_crop_flips(1, (8, 8), torch.Generator(), scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="transforms for a batch"):
        apply_each(transforms[:2], torch.rand(3, 8, 8))


# ---- the loss ----------------------------------------------------------------------------------------------


def test_info_nce_by_hand():
    gen = torch.Generator().manual_seed(0)
    aug, ref = torch.rand(5, 7, 6, generator=gen), torch.rand(5, 7, 6, generator=gen)
    z, r = F.normalize(aug.flatten(1), dim=1), F.normalize(ref.flatten(1), dim=1)
    total = 0.0
    for b in range(5):
        logits = [float(z[b] @ r[b]) / 0.3] + [float(z[b] @ z[j]) / 0.3 for j in range(5) if j != b]
        total += -logits[0] + math.log(sum(math.exp(v) for v in logits))
    assert float(cgc_loss(aug, ref, tau=0.3)) == pytest.approx(total / 5, rel=1e-5)
    l2 = sum(float((z[b] - r[b]).pow(2).sum()) for b in range(5)) / 5
    assert float(cgc_loss(aug, ref, consistency="l2")) == pytest.approx(l2, rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's autocast does not reach the similarities
        inside = cgc_loss(aug, ref, tau=0.3)
    assert inside.dtype == torch.float32 and torch.equal(inside, cgc_loss(aug, ref, tau=0.3))


def test_info_nce_minimum_identical_positives_orthogonal_negatives():
    n, tau = 6, 0.5
    best = torch.zeros(n, n * 4)
    for b in range(n):  # disjoint supports: orthogonal, non-negative maps
        best[b, 4 * b : 4 * b + 4] = torch.rand(4) + 0.1
    floor = math.log(1 + (n - 1) * math.exp(-1 / tau))
    assert float(cgc_loss(best, best.clone(), tau=tau)) == pytest.approx(floor, rel=1e-6)
    assert float(cgc_loss(best, best.clone(), consistency="l2")) == pytest.approx(0.0, abs=1e-12)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):  # any other non-negative maps do worse
        a, r = best + 0.2 * torch.rand(best.shape, generator=gen), best + 0.2 * torch.rand(best.shape, generator=gen)
        assert float(cgc_loss(a, r, tau=tau)) > floor
    # the positive pair only: orthogonal positives cost 2 in L2 whatever the scale
    assert float(cgc_loss(best, best.roll(1, 0) * 3, consistency="l2")) == pytest.approx(2.0, rel=1e-6)


def test_the_whole_cgc_loss_matches_finite_differences():
    torch.manual_seed(3)
    model = Classifier(SmoothNet().double(), input_size=(8, 8)).eval()
    images = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, -1, -1])
    for consistency in ("contrastive", "l2"):
        net = CGCTraining(model, lam=0.7, tau=0.5, consistency=consistency, cam="gradcam", layer="features")

        def loss(net=net):
            net.steps.zero_()  # the same transforms every call
            return net(images, labels)["loss"]

        directional_check(loss, model)


def test_bad_loss_input():
    x = torch.rand(3, 4, 4)
    with pytest.raises(ValueError, match=r"tau must be in \(0, 1e\+06\]"):
        cgc_loss(x, x, tau=0.0)
    with pytest.raises(ValueError, match=r"tau must be in \(0, 1e\+06\]"):  # float32 would turn 1e39 into inf: NaN
        cgc_loss(x, x, tau=1e39)
    assert torch.isfinite(cgc_loss(x, x.flip(0), tau=1e6))
    with pytest.raises(ValueError, match="tau must be finite"):
        cgc_loss(x, x, tau=math.inf)
    with pytest.raises(TypeError, match="tau must be a number"):
        cgc_loss(x, x, tau="0.5")
    with pytest.raises(ValueError, match=r"maps_aug must be float maps \[B,H,W\] or \[B,D\], got a torch.int64"):
        cgc_loss((x * 10).long(), x)
    with pytest.raises(ValueError, match=r"maps_ref must be float maps .* of shape \[3\]"):
        cgc_loss(x, x[:, 0, 0])
    with pytest.raises(ValueError, match=r"maps_aug must be float maps .* got list"):
        cgc_loss([[0.0, 1.0]], x)
    for bad in (math.nan, math.inf):
        y = x.clone()
        y[1, 2, 3] = bad
        with pytest.raises(ValueError, match="maps_ref holds NaN or infinite values"):
            cgc_loss(x, y)
    with pytest.raises(TypeError, match="gather must be True, False or None"):
        cgc_loss(x, x, gather="yes")
    with pytest.raises(ValueError, match="consistency must be one of"):
        cgc_loss(x, x, consistency="cosine")
    with pytest.raises(ValueError, match="different shapes"):
        cgc_loss(x, x[:, :2])
    with pytest.raises(ValueError, match="at least 2 images"):
        cgc_loss(x[:1], x[:1])


# ---- mixed precision: the inner gradient -------------------------------------------------------------------


def test_a_scaled_inner_gradient_survives_float16():
    """The gradient at the layer is ~1e-9 here: float16 flushes it to zero unless the score is scaled
    first; scaled, the maps match the same (float16-rounded) weights computed in float32."""
    import copy

    model = pointwise_model().eval()
    with torch.no_grad():
        model.backbone.fc.weight.mul_(1e-5)
    half = copy.deepcopy(model).half()
    exact_model = copy.deepcopy(half).float()  # the float16 weights, exactly, in float32
    images = torch.rand(3, 3, 24, 24).half()
    exact = cam_maps(exact_model, images.float(), 1, "features")
    assert float(exact.amin()) > 0
    assert float(cam_maps(half, images, 1, "features").abs().amax()) == 0.0  # underflow
    scaled = cam_maps(half, images, 1, "features", grad_scale=2.0**15)
    torch.testing.assert_close(scaled, exact, rtol=1e-2, atol=0.0)
    assert torch.equal(cam_maps(exact_model, images.float(), 1, "features", grad_scale=2.0**10), exact)
    with pytest.raises(ValueError, match="grad_scale"):
        cam_maps(model, images.float(), 1, "features", grad_scale=0.0)


# ---- training ----------------------------------------------------------------------------------------------


def consistency_loss(model: Classifier, images: torch.Tensor, seed: int = 123) -> float:
    net = CGCTraining(
        model.eval(), lam=1.0, tau=0.5, consistency="contrastive", cam="gradcam", layer=default_layer(model)
    )
    torch.manual_seed(seed)
    return float(net(images, torch.full((len(images),), -1))["cgc"].detach())


def test_a_few_cgc_steps_lower_the_consistency_loss(shapes32, bench32):
    train, val = shapes32
    model, _, _ = bench32
    images = val.tensors["image"][:32]
    before = consistency_loss(model, images)
    trained, history = fit_cgc(model, train, epochs=3, lam=1.0, lr=3e-3, batch_size=32, device="cpu",
                               progress=False)  # fmt: skip
    after = consistency_loss(trained, images)
    assert after < before - 0.05, (before, after)
    assert history[-1]["train/cgc"] < history[0]["train/cgc"]
    assert {"train/ce", "train/cgc", "train/cam_cosine", "train/acc"} <= set(history[-1])


def test_every_gradient_cam_can_be_the_loss_cam(shapes32):
    train, _ = shapes32
    images, labels = train.tensors["image"][:8], train.tensors["label"][:8]
    for cam in ("gradcam", "gradcam++", "layercam", "xgradcam", "hirescam"):
        model = small_shapesnet()
        net = CGCTraining(model.train(), lam=0.5, tau=0.5, consistency="contrastive", cam=cam, layer="layer4")
        torch.manual_seed(0)
        out = net(images, labels)
        out["loss"].backward()
        assert math.isfinite(float(out["cgc"].detach())), cam
        grad = model.backbone.layer3.conv1.weight.grad  # below the layer: reached through the activations
        assert grad is not None and float(grad.abs().sum()) > 0, cam


def test_unlabelled_only_batches_and_the_labelled_split(shapes32):
    train, _ = shapes32
    model = small_shapesnet()
    net = CGCTraining(model.train(), lam=0.5, tau=0.5, consistency="contrastive", cam="gradcam", layer="layer4")
    out = net(train.tensors["image"][:8], torch.full((8,), -1))
    assert "ce" not in out  # nothing to log: the epoch's mean cross-entropy is over labelled batches
    assert float(out["loss"].detach()) == pytest.approx(0.5 * float(out["cgc"].detach()))
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    images = {"image": train.tensors["image"][:40]}

    class Bare(torch.utils.data.Dataset):  # unlabelled images as bare tensors
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return images["image"][i]

    trained, history = fit_cgc(model, train, unlabeled=Bare(), labeled_fraction=0.05, epochs=1, batch_size=16, device="cpu",
                               progress=False)  # fmt: skip
    assert len(history) == 1 and history[0]["train/cgc"] > 0 and 0 < history[0]["train/cam_cosine"] <= 1
    assert any(
        not torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values(), strict=True)
    )
    keep, rest = split_labeled(train, 0.05, seed=0)
    assert len(keep) == round(0.05 * len(train)) and sorted(keep + rest) == list(range(len(train)))
    data = CGCData(torch.utils.data.Subset(train, keep), Bare())
    assert int(data[0]["label"]) >= 0 and int(data[len(keep)]["label"]) == -1
    repeated = CGCData(torch.utils.data.Subset(train, keep), Bare(), repeat=3)
    assert len(repeated) == 3 * len(keep) + 40 and int(repeated[3 * len(keep)]["label"]) == -1
    assert torch.equal(repeated[len(keep) + 1]["image"], repeated[1]["image"])
    with pytest.raises(ValueError, match="labeled_repeat must be a positive integer"):
        CGCData(train, None, repeat=0)
    assert trained.weights == xcnn.models.TRAINED_BY_XCNN and not trained.training


def test_resume_gives_the_uninterrupted_run_and_the_model_reloads(shapes32, tmp_path):
    train, val = shapes32
    options = {"batch_size": 64, "progress": False, "seed": 4, "labeled_fraction": 0.5, "device": "cpu"}
    full, _ = fit_cgc(small_shapesnet(), train, epochs=2, out_dir=tmp_path / "full", **options)
    with pytest.raises(Stop):
        fit_cgc(small_shapesnet(), train, epochs=2, out_dir=tmp_path / "cut", **options, callbacks=[_stop_after_first])
    resumed, _ = fit_cgc(small_shapesnet(), train, epochs=2, out_dir=tmp_path / "cut", resume=True, **options)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    loaded = xcnn.load_model(tmp_path / "full")
    x = val.tensors["image"][:8]
    assert torch.equal(loaded(x), full.cpu()(x))
    results = json.loads((tmp_path / "full" / "results.json").read_text())
    assert results["training"]["labeled_images"] == 96 and results["training"]["unlabeled_images"] == 96
    assert (tmp_path / "full" / "tensorboard").is_dir()
    with pytest.raises(ValueError, match=r"other settings .*lam"):
        fit_cgc(small_shapesnet(), train, epochs=2, out_dir=tmp_path / "cut", resume=True, lam=0.25, **options)


def test_bad_training_input_fails_before_anything_is_written(shapes32, tmp_path):
    train, _ = shapes32
    out = tmp_path / "never"
    model = small_shapesnet()
    cases = [
        ({"tau": 0.0}, r"tau must be in \(0, 1e\+06\]"),
        ({"tau": math.inf}, "tau must be finite"),
        ({"lam": -0.1}, r"lam must be in \[0, inf\)"),
        ({"lam": math.nan}, "lam must be finite"),
        ({"lr": math.inf}, "lr must be finite"),
        ({"lr": -1e-3}, "lr must be in"),
        ({"weight_decay": -1.0}, "weight_decay must be in"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"seed": 0.5}, "seed must be an integer"),
        ({"scratch": 1}, "scratch must be True or False"),
        ({"labeled_fraction": math.nan}, "labelled fraction must be finite"),
        ({"labeled_fraction": 0.0}, r"labelled fraction must be in \(0, 1\]"),
        ({"labeled_fraction": 1.5}, r"labelled fraction must be in \(0, 1\]"),
        ({"batch_size": 1}, "batch norm needs at least 2"),
        ({"unlabeled": torch.utils.data.TensorDataset(torch.rand(0, 3, 32, 32))}, "unlabeled is empty"),
        # normalised unlabelled images used to train silently (they skipped the [0, 1] check of the labelled ones)
        (
            {"unlabeled": torch.utils.data.TensorDataset(train.tensors["image"] * 4 - 2)},
            r"unlabeled's sample 0: image values must be in \[0, 1\] .*got values in \[-2",
        ),
        (
            {"unlabeled": torch.utils.data.TensorDataset(torch.rand(4, 32, 32))},
            r"unlabeled's sample 0: the image must be a float \[3,H,W\]",
        ),
        (
            {"val_data": torch.utils.data.TensorDataset(train.tensors["image"] * 255, train.tensors["label"])},
            r"val_data's sample 0: image values must be in \[0, 1\]",
        ),
        (
            {"val_data": torch.utils.data.TensorDataset(train.tensors["image"], train.tensors["label"] + 1)},
            r"val_data has the label 6; labels are class indices \[0, 6\)",
        ),
        ({"seed": 2**64}, r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
        ({"labeled_repeat": 10**18}, r"an epoch of \d+ samples \(labeled_repeat=10+\) would need .* GiB"),
        ({"lam": 0.0, "labeled_fraction": 0.5}, "unlabelled images contribute nothing"),
        ({"cam": "scorecam"}, "cam must be one of"),
        ({"consistency": "cosine"}, "consistency must be one of"),
        ({"layer": "nope"}, "nope"),
    ]
    for options, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            fit_cgc(model, train, out_dir=out, progress=False, **{"epochs": 1, **options})
    images, labels = train.tensors["image"], train.tensors["label"]
    bad_data = [
        (EmptyData(), ValueError, "labeled is empty"),
        ({"image": images, "label": labels}, TypeError, "labeled must be a dataset"),
        # float labels used to be truncated (1.7 -> class 1); labels beyond the model's 6 classes failed mid-run
        (torch.utils.data.TensorDataset(images, labels + 0.7), ValueError, "labels must be integer class indices"),
        (torch.utils.data.TensorDataset(images, labels.clamp_max(5) + 1), ValueError,
         r"labeled has the label 6; labels are class indices \[0, 6\)"),
    ]  # fmt: skip
    for data, error, message in bad_data:
        with pytest.raises(error, match=message):
            fit_cgc(model, data, epochs=1, out_dir=out, progress=False)
    assert not out.exists()


class EmptyData(torch.utils.data.Dataset):
    def __len__(self):
        return 0

    def __getitem__(self, i):
        raise IndexError(i)


def test_labels_are_checked_as_samples_load():
    image = torch.rand(3, 8, 8)
    data = CGCData([(image, 2), (image, 1.7), (image, 6)], None, num_classes=6)
    assert int(data[0]["label"]) == 2
    with pytest.raises(ValueError, match=r"labelled sample 1: a label must be an integer class index, got float 1\.7"):
        data[1]
    with pytest.raises(ValueError, match=r"labelled sample 2 has the label 6; labels are class indices \[0, 6\)"):
        data[2]


class SideBranch(nn.Module):
    """A layer whose output never reaches the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3, padding=1)
        self.side = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = self.features(x)
        self.side(a)
        return self.fc(a.mean((2, 3)))


def test_a_layer_without_gradients_is_refused(shapes32):
    shapes, _ = shapes32
    # the model has 3 classes: labels beyond them are refused before the layer is even looked at
    train = torch.utils.data.TensorDataset(shapes.tensors["image"], shapes.tensors["label"] % 3)
    model = Classifier(SideBranch(), input_size=(32, 32))
    with pytest.raises(ValueError, match=r"labeled has the label 5; labels are class indices \[0, 3\)"):
        fit_cgc(model, shapes, epochs=1, layer="side", progress=False)
    with pytest.raises(ValueError, match="no gradient reaches it"):
        fit_cgc(model, train, epochs=1, layer="side", progress=False)
    side_only = Classifier(SideBranch(), input_size=(32, 32))  # only the branch that never reaches the logits
    for name, p in side_only.backbone.named_parameters():
        p.requires_grad_(name.startswith("side"))
    with pytest.raises(ValueError, match="depend on no trainable parameter"):
        fit_cgc(side_only, train, epochs=1, layer="features", progress=False)
    for p in side_only.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        fit_cgc(side_only, train, epochs=1, lam=0.0, progress=False)


def test_cli_train_cgc_then_explain_and_evaluate(tmp_path, bench32):
    from xcnn.cli import main

    _, _, folder = bench32
    out = tmp_path / "cgc"
    code = main(["train", "cgc", "--model", str(folder), "--out", str(out), "--epochs", "1", "--n-train", "96",
                 "--labeled-fraction", "0.5", "--labeled-repeat", "2", "--unlabeled", "synthetic:32", "--n-test", "64", "--n-val", "32", "--batch-size", "32",
                 "--device", "cpu"])  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["training"]["labeled_images"] == 48 and results["training"]["unlabeled_images"] == 48 + 32
    assert results["training"]["labeled_repeat"] == 2
    assert set(results["consistency"]) == {"cosine", "pearson"}
    saved = xcnn.load_model(out).eval()  # the accuracy is the saved model's on the documented test images
    test = InMemory(Shapes("test", 64, size=32, seed=0))
    with torch.no_grad():
        right = (saved(test.tensors["image"]).argmax(1) == test.tensors["label"]).sum().item()
    assert results["test_acc"] == pytest.approx(right / 64, abs=1e-12)
    assert main(["explain", "sample:chelsea", "--model", str(out), "--method", "gradcam",
                 "--out", str(tmp_path / "e")]) == 0  # fmt: skip
    assert main(["evaluate", "--model", str(out), "--methods", "gradcam", "--metrics", "pointing", "--n", "8",
                 "--out", str(tmp_path / "v"), "--no-report"]) == 0  # fmt: skip
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad in (["--unlabeled", str(empty)], ["--unlabeled", "synthetic:0"], ["--labeled-fraction", "0"],
                ["--tau", "-1"], ["--lam", "-1"], ["--unlabeled", "nowhere"]):  # fmt: skip
        assert main(["train", "cgc", "--model", str(folder), "--out", str(tmp_path / "bad"), *bad]) == 2, bad
    assert not (tmp_path / "bad").exists()


DDP_SCRIPT = """
import os, torch
import torch.distributed as dist
from xcnn.data.synthetic import Shapes
from xcnn.models import Classifier, default_layer
from xcnn.nets import ShapesNet
from xcnn.training.benchmark import InMemory
from xcnn.training.cgc import cgc_loss, fit_cgc
dist.init_process_group("gloo")  # the script owns the group: fit_cgc joins it, leaves it open
rank = dist.get_rank()
# the loss with negatives gathered from both processes is the single-process loss of the whole batch
gen = torch.Generator().manual_seed(0)
aug, ref = torch.rand(8, 5, 5, generator=gen), torch.rand(8, 5, 5, generator=gen)
whole = cgc_loss(aug, ref, gather=False)
mine = slice(4 * rank, 4 * rank + 4)
a = aug[mine].clone().requires_grad_(True)
local = cgc_loss(a, ref[mine])
parts = [torch.zeros(()) for _ in range(2)]
dist.all_gather(parts, local.detach())
(local / 2).backward()  # the mean over processes, as DDP averages
a_full = aug.clone().requires_grad_(True)
cgc_loss(a_full, ref, gather=False).backward()
same_grad = torch.allclose(a.grad, a_full.grad[mine], atol=1e-6)
same_loss = abs(float(sum(parts) / 2) - float(whole)) < 1e-6
with open(os.path.join({out!r}, f"check{{rank}}.txt"), "w") as fh:  # not stdout: the ranks' lines interleave
    fh.write(f"loss {{same_loss}} grad {{same_grad}}")
arch = {{"num_classes": 6, "widths": [8, 16, 16, 32], "strides": [1, 1, 2, 2, 1]}}
torch.manual_seed(0)
model = Classifier(ShapesNet(**arch), name="shapesnet", input_size=(32, 32), spec={{"arch": "shapesnet", "kwargs": arch}})
data = InMemory(Shapes("train", 64, size=32, seed=1))
out = {out!r}
trained, history = fit_cgc(model, data, epochs=2, labeled_fraction=0.5, batch_size=16, out_dir=out, progress=False,
                           device="cpu")
torch.save(torch.cat([p.detach().flatten() for p in trained.parameters()]), os.path.join(out, f"rank{{rank}}.pt"))
with open(os.path.join(out, f"trained{{rank}}.txt"), "w") as fh:
    fh.write(str(history[-1]["train/cgc"]))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fit_cgc_under_torchrun_gathers_negatives_and_keeps_replicas_identical(tmp_path):
    from .conftest import torchrun

    result = torchrun(DDP_SCRIPT.format(out=str(tmp_path)), tmp_path)
    assert "FutureWarning" not in result.stderr
    for rank in (0, 1):
        assert (tmp_path / f"check{rank}.txt").read_text() == "loss True grad True"
        assert float((tmp_path / f"trained{rank}.txt").read_text()) > 0
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(w0, w1)
    loaded = xcnn.load_model(tmp_path)
    assert torch.equal(torch.cat([p.flatten() for p in loaded.parameters()]), w0)


def test_cli_train_cgc_on_folders_of_labelled_and_unlabelled_images(tmp_path):
    import numpy as np
    from PIL import Image

    from xcnn.cli import main
    from xcnn.nets import ShapesNet

    rng = np.random.default_rng(0)
    root, loose = tmp_path / "data", tmp_path / "loose"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    loose.mkdir()
    for i in range(6):  # a flat folder: no classes
        Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(loose / f"{i}.jpg")
    torch.manual_seed(0)
    arch = {"num_classes": 2, "widths": [8, 8, 8, 8], "strides": [2, 1, 2, 2, 1]}
    model = Classifier(
        ShapesNet(**arch), name="shapesnet", input_size=(32, 32), spec={"arch": "shapesnet", "kwargs": arch}
    )
    xcnn.models.save_model(model, tmp_path / "m")
    out = tmp_path / "cgc"
    argv = ["train", "cgc", "--model", str(tmp_path / "m"), "--data", str(root), "--unlabeled", str(loose),
            "--out", str(out), "--epochs", "2", "--batch-size", "4", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["training"]["labeled_images"] == 8 and results["training"]["unlabeled_images"] == 6
    assert len(json.loads((out / "history.json").read_text())) == 2
    assert xcnn.load_model(out).num_classes == 2
    bad = ["train", "cgc", "--model", str(tmp_path / "m"), "--data", str(root), "--unlabeled", "synthetic:10",
           "--out", str(tmp_path / "bad")]  # fmt: skip
    assert main(bad) == 2  # benchmark images do not go with a folder's classes
    assert not (tmp_path / "bad").exists()


class ColourNet(nn.Module):
    """A known-answer model: identity 1x1 "features", global mean, identity head. Its logits are the view's
    mean colour, and its Grad-CAM at ``features`` for class c is channel c of the view (divided by H*W), so
    the CGC term of a batch can be written down from the transformed images alone."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 3, 1, bias=False)
        self.fc = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(3)[:, :, None, None])
            self.fc.weight.copy_(torch.eye(3))

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def red_left_green_right(n: int = 12, size: int = 24) -> torch.Tensor:
    """Red over the left 60 %, green over the rest, with faint noise: the top-1 is red, but a crop of the
    right part is mostly green."""
    images = 0.05 * torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    split = round(0.6 * size)
    images[:, 0, :, :split] += 0.9
    images[:, 1, :, split:] += 0.9
    return images


def test_the_cgc_step_by_hand_on_a_model_whose_cam_is_a_colour_channel():
    """The whole step against its definition on :class:`ColourNet`: the positives are identical (both views
    explain the original image's top-1, even where the crop's own top-1 differs), the InfoNCE uses ``tau``,
    and the cross-entropy covers both views of the labelled images."""
    model = Classifier(ColourNet(), input_size=(24, 24), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    images = red_left_green_right()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, -1, -1, -1, -1, -1, -1])
    for tau in (0.1, 0.5, 2.0):
        net = CGCTraining(model, lam=0.7, tau=tau, consistency="contrastive", cam="gradcam", layer="features")
        transforms = net.draw(len(images), (24, 24))
        net.steps.zero_()  # the forward draws the same transforms
        out = {k: v.detach() for k, v in net(images, labels).items()}
        aug = apply_each(transforms, images).clamp(0, 1)
        with torch.no_grad():
            top1, own = model(images).argmax(1), model(aug).argmax(1)
        assert bool((top1 == 0).all()) and bool((own != top1).any())  # some crops' own top-1 is green
        g = aug[torch.arange(len(images)), top1].flatten(1).double()  # CAM_top1(T(x)) = T(CAM_top1(x))
        z = g / g.norm(dim=1, keepdim=True)
        sim = (z @ z.T) / tau
        expected = sum(-sim[b, b] + torch.logsumexp(sim[b], 0) for b in range(len(z))) / len(z)  # own row: positive
        assert float(out["cam_cosine"]) == pytest.approx(1.0, abs=1e-5)
        assert float(out["cgc"]) == pytest.approx(float(expected), rel=1e-5), tau
        lab = labels >= 0
        with torch.no_grad():
            ce = F.cross_entropy(model(images)[lab], labels[lab]) + F.cross_entropy(model(aug)[lab], labels[lab])
        assert float(out["ce"]) == pytest.approx(float(ce), rel=1e-5)
        assert float(out["loss"]) == pytest.approx(float(ce) + 0.7 * float(expected), rel=1e-5)
