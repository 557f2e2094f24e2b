"""Layer-wise inspection end to end: inspect_model's numbers on a trained model, xcnn inspect (JSON, CSV,
HTML report checked in headless Chromium), --monitor training read back with --history, folders, bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import xcnn
from xcnn.cli import main
from xcnn.data.synthetic import CLASSES
from xcnn.inspection import filter_importance, inspect_model
from xcnn.pipelines import benchmark_data

from .test_viz_report import screenshot


@pytest.fixture(scope="module")
def inspected(bench32):
    model, _, _ = bench32
    return model, inspect_model(model, benchmark_data(160, 32, seed=4), images=160, top=5, draws=3, progress=False)


def test_inspection_of_a_trained_model(inspected):
    _, ins = inspected
    assert ins.layers == ["layer1", "layer2", "layer3", "layer4"] and ins.importance_layer == "layer4"
    assert ins.same_task and ins.targets == "label" and ins.n_fit == ins.n_eval == 80
    assert set(ins.probe_accuracy) == set(ins.layers)
    assert ins.model_accuracy is not None and ins.model_accuracy > 0.3  # the bench32 model learned something
    assert ins.probe_accuracy["layer4"] > 1 / 6 + 0.1  # its deepest stage encodes the classes
    assert len(ins.taylor) == 128 and len(ins.ablation) == 64  # ablation: the top 32 by Taylor and 32 random
    top32 = sorted(range(128), key=lambda k: -ins.taylor[k])[:32]
    assert set(top32) <= set(ins.ablation)
    assert -1 <= ins.taylor_ablation_spearman <= 1
    effect = ins.top_vs_random
    assert effect["filters"] == 5 and len(effect["random"]) == 3
    assert effect["top"]["accuracy"] == pytest.approx(ins.model_accuracy)
    assert ins.similarity.shape == (4, 4) and torch.allclose(
        ins.similarity.diagonal(), torch.ones(4, dtype=torch.float64)
    )
    assert ins.correlation_matrix.shape == (128, 128)
    maps = ins.samples["maps"]
    assert set(maps) == set(ins.layers) and maps["layer2"].shape == (4, 32, 32)
    assert len(ins.samples["top"]["layer1"][0]) == 5
    json.dumps(ins.to_json(), allow_nan=False)  # plain numbers only


def test_ablation_of_a_subset_of_channels_equals_the_full_ablation_there(bench32):
    model, _, _ = bench32
    data = benchmark_data(24, 32)
    full = filter_importance(model, data, "layer3", "ablation")
    part = filter_importance(model, data, "layer3", "ablation", channels=[3, 40, 7])
    assert torch.equal(part[[3, 40, 7]], full[[3, 40, 7]])
    assert int(torch.isnan(part).sum()) == len(part) - 3
    with pytest.raises(ValueError, match="out of range"):
        filter_importance(model, data, "layer3", "ablation", channels=[999])


class LinearAfterAct(torch.nn.Module):
    """A 1x1 conv of the image (``features``), its softplus (``act``), mean-pooled and read by a linear head:
    after ``act`` the network is linear, so every number inspect_model reports has a closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Conv2d(3, 4, 1)
        self.act = torch.nn.Softplus()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.features(x))).flatten(1))


class Samples(torch.utils.data.Dataset):
    """The same images as a map-style dataset of dict samples (what an image folder gives)."""

    def __init__(self, data: dict) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["label"])

    def __getitem__(self, i: int) -> dict:
        return {"image": self.data["image"][i], "label": self.data["label"][i]}


def _cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA in its HSIC form (Kornblith et al. 2019, eq. 3 with linear kernels)."""
    h = np.eye(len(x)) - 1 / len(x)
    k, m = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float(np.trace(k @ m) / np.sqrt(np.trace(k @ k) * np.trace(m @ m)))


@pytest.mark.parametrize("form", ["dict", "dataset"])
def test_inspect_model_streams_the_data_and_every_number_is_the_closed_form(form):
    """inspect_model on the first 24 of 26 images (even positions fit, odd measure), streamed from stacked tensors
    or from a dataset, against the numbers computed here: pooled activations by hand, probes by scikit-learn,
    Taylor and ablation in closed form (linear after ``act``: zeroing channel k lowers logit y by W[y,k] a_k),
    the top filter ranked on the probe half, correlation, class means and CKA (HSIC form) on the measuring half."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    torch.manual_seed(0)
    model = xcnn.Classifier(LinearAfterAct(), mean=[0.0] * 3, std=[1.0] * 3, input_size=(6, 6)).eval()
    with torch.no_grad():
        model.backbone.features.weight.copy_(
            torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.3, 0.3, 0.3]])[:, :, None, None]
        )
        model.backbone.features.bias.zero_()
        model.backbone.fc.weight.copy_(
            torch.tensor([[2.0, 1.5, 0.5, 0.2], [-1.5, 2.0, 0.3, 0.1], [1.0, -2.0, 1.0, 0.3]])
        )
        model.backbone.fc.bias.copy_(torch.tensor([0.1, -0.2, 0.0]))
    gen = torch.Generator().manual_seed(3)
    labels = (torch.arange(26) // 2) % 3  # every class in both halves
    images = 0.1 + 0.2 * torch.rand(26, 3, 6, 6, generator=gen, dtype=torch.float64)
    images[0::2, 0] += 0.6 * torch.rand(13, 1, 1, generator=gen, dtype=torch.float64)  # red at even positions
    images[1::2, 1] += 0.6 * torch.rand(13, 1, 1, generator=gen, dtype=torch.float64)  # green at odd ones
    images[:, 2] += 0.15 * labels[:, None, None]  # blue tells the class
    data = {"image": images.float(), "label": labels}  # a float32 model on float32 pixels: the usual case
    ins = inspect_model(
        model, data if form == "dict" else Samples(data), layers=["features", "act"], images=24, top=1, draws=2,
        samples=2, l2=0.01, batch_size=5, progress=False,
    )  # fmt: skip

    x, y = data["image"][:24].double(), labels[:24]  # the expected numbers in float64
    feat = x.mean((2, 3))  # the 1x1 conv is the identity on colours plus their mean: its pooled output
    feat = torch.cat([feat, 0.3 * feat.sum(1, keepdim=True)], 1)
    act = torch.nn.functional.softplus(torch.cat([x, 0.3 * x.sum(1, keepdim=True)], 1)).mean((2, 3))
    w, b = model.backbone.fc.weight.detach().double(), model.backbone.fc.bias.detach().double()
    fit, ev = slice(0, None, 2), slice(1, None, 2)
    assert ins.n_fit == ins.n_eval == 12 and ins.same_task and ins.targets == "label"
    for name, f in {"features": feat, "act": act}.items():
        scaler = StandardScaler().fit(f[fit].numpy())
        ref = LogisticRegression(C=1 / (0.01 * 12), tol=1e-12, max_iter=10_000).fit(
            scaler.transform(f[fit].numpy()), y[fit]
        )
        want = float((ref.predict(scaler.transform(f[ev].numpy())) == y[ev].numpy()).mean())
        assert ins.probe_accuracy[name] == pytest.approx(want, abs=1e-12), name
    logits = act @ w.T + b
    assert ins.model_accuracy == pytest.approx(float((logits[ev].argmax(1) == y[ev]).double().mean()))
    contribution = w[y] * act  # [24, 4]: what zeroing each channel takes from the label's logit
    tol = {"rtol": 1e-5, "atol": 1e-7}  # float32 activations
    torch.testing.assert_close(torch.tensor(ins.taylor, dtype=torch.float64), contribution[ev].abs().mean(0), **tol)
    assert sorted(ins.ablation) == [0, 1, 2, 3]  # 4 channels: 2 by Taylor + 2 drawn, all of them
    for k, value in ins.ablation.items():
        assert value == pytest.approx(float(contribution[ev, k].mean()), rel=1e-5)
    # the filter to zero is the top one by Taylor on the probe half, which differs from the measuring half's
    top_fit, top_eval = int(contribution[fit].abs().mean(0).argmax()), int(contribution[ev].abs().mean(0).argmax())
    assert top_fit != top_eval
    assert ins.top_vs_random["top_filters"] == [top_fit]
    zeroed = act.clone()
    zeroed[:, top_fit] = 0
    effect = ins.top_vs_random["top"]
    assert effect["logit_drop"] == pytest.approx(float(contribution[ev, top_fit].mean()), rel=1e-5)
    assert effect["ablated_accuracy"] == pytest.approx(
        float(((zeroed @ w.T + b)[ev].argmax(1) == y[ev]).double().mean())
    )
    torch.testing.assert_close(ins.correlation_matrix, torch.corrcoef(act[ev].T), **tol)
    torch.testing.assert_close(ins.association, torch.stack([act[ev][y[ev] == c].mean(0) for c in range(3)]), **tol)
    assert float(ins.similarity[0, 1]) == pytest.approx(_cka(feat[ev].numpy(), act[ev].numpy()), rel=1e-5)
    assert ins.samples["labels"] == [str(int(c)) for c in y[ev][:2]] and ins.samples["maps"]["act"].shape == (2, 6, 6)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["dict", "dataset"])
def test_inspect_model_checks_each_batch_once_on_its_first_pass(form, monkeypatch):
    """The data are read once per measurement; the first pass (all 24 images, batches of 5: 5 batches) checks
    every batch, the later ones (the same images) are not checked again: on CUDA data each check is a host
    sync. A bad image is still found by that first pass, naming its batch."""
    import xcnn.inspection.importance as importance

    model = xcnn.Classifier(LinearAfterAct(), mean=[0.0] * 3, std=[1.0] * 3, input_size=(6, 6)).eval()
    labels = torch.arange(26) % 3
    images = torch.rand(26, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    data = {"image": images, "label": labels}
    checked, real = [], importance.check_images
    monkeypatch.setattr(importance, "check_images", lambda x: checked.append(len(x)) or real(x))
    options = {"layers": ["features", "act"], "images": 24, "top": 1, "draws": 2, "samples": 2, "batch_size": 5,
               "progress": False}  # fmt: skip
    inspect_model(model, data if form == "dict" else Samples(data), **options)
    assert checked == [5, 5, 5, 5, 4]
    images[13, 0, 1, 1] = float("nan")  # a measured (odd) image
    with pytest.raises(ValueError, match=r"data \(samples 10 onwards\): images contain NaN"):
        inspect_model(model, data if form == "dict" else Samples(data), **options)


def test_monitored_cli_training_then_inspect_with_history(tmp_path):
    run, out = tmp_path / "run", tmp_path / "inspect"
    argv = ["train", "benchmark", "--out", str(run), "--epochs", "2", "--n-train", "256", "--size", "32"]
    assert main([*argv, "--monitor", "--monitor-images", "32", "--device", "cpu"]) == 0
    history = json.loads((run / "monitor.json").read_text())
    assert [r["epoch"] for r in history["records"]] == [0, 1]
    hist = json.loads((run / "history.json").read_text())
    assert "monitor/probe_acc/layer4" in hist[-1]
    assert (
        main(["inspect", "--model", str(run), "--out", str(out), "--n", "48", "--history", str(run), "--device", "cpu"])
        == 0
    )
    result = json.loads((out / "inspection.json").read_text())
    assert result["history"]["records"] == history["records"]
    for name in [
        "probe_accuracy.csv",
        "filter_importance.csv",
        "layer_similarity.csv",
        "feature_correlation.csv",
        "monitor_history.csv",
    ]:
        assert (out / name).is_file(), name
    with open(out / "monitor_history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 4 and rows[0]["cka_to_previous"] == "" and rows[-1]["cka_to_previous"] != ""
    page = (out / "report.html").read_text()
    for src in [part.split('"')[0] for part in page.split('src="')[1:]]:
        assert (out / src).is_file(), src
    assert "Over training" in page and "What each layer would say" in page
    # a run without monitor records
    assert main(["inspect", "--model", str(run), "--out", str(tmp_path / "x"), "--history", str(out)]) == 2
    assert not (tmp_path / "x").exists()


def test_inspect_a_folder_of_class_folders_with_hostile_names(bench32, tmp_path):
    _, _, folder = bench32
    data = benchmark_data(36, 32, seed=9)
    root = tmp_path / "images"
    for i, (image, label) in enumerate(zip(data["image"], data["label"], strict=True)):
        d = root / CLASSES[int(label)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(d / f"{i}.png")
    evil = root / "<img src=x onerror=alert(1)>"  # a seventh class: the data's classes are no longer the model's
    evil.mkdir()
    for i in range(4):
        Image.fromarray((data["image"][i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            evil / f"{i}.png"
        )
    out = tmp_path / "out"
    assert (
        main(
            [
                "inspect",
                "--model",
                str(folder),
                "--data",
                str(root),
                "--out",
                str(out),
                "--samples",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    result = json.loads((out / "inspection.json").read_text())
    assert not result["same_task"] and result["importance_targets"] == "predicted" and result["model_accuracy"] is None
    assert result["top_vs_random"]["top"]["accuracy"] == 1.0  # judged by the model's own top-1 surviving
    assert "<img src=x onerror=alert(1)>" in result["class_names"]
    page = (out / "report.html").read_text()
    assert "<img src=x" not in page and "&lt;img src=x" in page


@pytest.mark.slow
def test_inspection_report_renders_in_headless_chromium(inspected, tmp_path):
    from xcnn.viz.inspection import write_inspection_report

    _, ins = inspected
    page = write_inspection_report(tmp_path / "report.html", ins, summary={"model": "bench32"})
    pixels = screenshot(page, tmp_path, height=2400)
    assert pixels.std() > 20
    assert 0.01 < (pixels < 128).mean() < 0.9


def test_bad_inspect_input(bench32, tmp_path):
    model, _, folder = bench32
    assert (
        main(["inspect", "--model", str(folder), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    )
    assert (
        main(["inspect", "--model", str(folder), "--history", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert main(["inspect", "--model", str(folder), "--layers", "fc", "--n", "12", "--out", str(tmp_path / "o")]) == 2
    one_class = {"image": benchmark_data(12, 32)["image"], "label": torch.zeros(12, dtype=torch.long)}
    with pytest.raises(ValueError, match="only one class"):
        inspect_model(model, one_class, progress=False)
    with pytest.raises(ValueError, match="fewer than the 6 classes"):
        inspect_model(model, {k: v[:8] for k, v in benchmark_data(8, 32).items()}, progress=False)
    assert (
        main(
            ["train", "lap", "--model", str(folder), "--data", str(tmp_path), "--out", str(tmp_path / "l"), "--monitor"]
        )
        == 2
    )
