"""The harness: rows for every method x metric, written as CSV, JSON and Markdown."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch import nn

import xcnn
from xcnn.data.synthetic import Shapes
from xcnn.metrics.harness import evaluate
from xcnn.nets import ShapesNet


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    return xcnn.load_model(ShapesNet(widths=(8, 8, 16, 16)), raw_pixels=True, input_size=(32, 32))


def test_rows_files_and_samples(untrained, tmp_path):
    data = Shapes("test", 6, size=32, shortcut_prob=1.0)
    ev = evaluate(
        untrained, data, ["gradcam", ("rise", {"masks": 50}), "random"],
        metrics=["adic", "insertion_deletion", "pointing", "energy", "iou", "shortcut", "consistency", "sanity"],
        batch_size=4, slow_images=2, keep_samples=3, progress=False,
    )  # fmt: skip
    methods = {r["method"] for r in ev.rows}
    metrics = {r["metric"] for r in ev.rows}
    assert methods == {"gradcam", "rise", "random"}
    assert {"AD@100", "IC@15", "insertion", "deletion", "pointing", "energy_in_mask", "iou@mean", "iou@0.5"} <= metrics
    assert {"shortcut_energy", "consistency_cosine", "sanity_spearman", "sanity_ssim"} <= metrics
    assert all(r["n"] == 6 for r in ev.rows if r["metric"] == "pointing")
    assert all(r["n"] == 2 for r in ev.rows if r["metric"].startswith("consistency"))
    for method in methods:  # each of the 2 sanity images is scored or counted as excluded (a constant map)
        excluded = next(
            (r["value"] for r in ev.rows if r["method"] == method and r["metric"] == "sanity: constant maps"), 0
        )
        scored = next(r["n"] for r in ev.rows if r["method"] == method and r["metric"] == "sanity_spearman")
        assert scored + round(2 * excluded / 100) == 2, method
    assert all(r["seconds"] >= 0 and "images_per_second" in r for r in ev.rows)
    assert ev.value("random", "sanity_spearman") == pytest.approx(1.0, abs=1e-4)  # a model-blind map: unchanged
    assert len(ev.curves["gradcam"]["insertion"]) == 29
    assert ev.samples["image"].shape == (3, 3, 32, 32) and ev.sample_maps["rise"].shape == (3, 32, 32)
    paths = ev.save(tmp_path)
    with open(paths["csv"]) as fh:
        assert len(list(csv.DictReader(fh))) == len(ev.rows)
    nan_as_null = [{**r, "value": None if math.isnan(r["value"]) else r["value"]} for r in ev.rows]
    assert json.loads(paths["json"].read_text())["rows"] == nan_as_null
    table = paths["md"].read_text()
    assert table.startswith("| method |") and "| gradcam |" in table


class DeadOnReset(nn.Conv2d):
    """A convolution whose re-initialisation zeroes it (a deterministic "randomisation" that kills every map)."""

    def reset_parameters(self):
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class DiesWhenRandomised(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(DeadOnReset(3, 4, 3, padding=1), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.normal_(generator=torch.Generator().manual_seed(0))
            self.features[0].bias.fill_(0.1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_sanity_rows_over_only_constant_maps_are_nan_and_say_how_many(tmp_path):
    """Grad-CAM of the fully randomised model (its convolution zeroed) is all zeros for every image: the
    sanity rows are NaN over 0 images, not a perfect pass, and a note row says 100 % were excluded. After
    the first depth (fc only) the maps still live: the row must be the last depth's."""
    from xcnn.metrics import randomization_sanity

    torch.manual_seed(0)
    model = xcnn.load_model(DiesWhenRandomised(), raw_pixels=True, input_size=(32, 32))
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    depths = randomization_sanity(lambda net: xcnn.explainer("gradcam", net, layer="features"), model, images)
    assert depths["excluded"][0] == 0 and depths["excluded"][-1] == 4  # the premise: alive, then dead
    data = {"image": images, "label": torch.zeros(4, dtype=torch.long)}
    ev = evaluate(model, data, ["gradcam"], metrics=["sanity"], layer="features", slow_images=4, progress=False)
    rows = {r["metric"]: r for r in ev.rows}
    assert math.isnan(rows["sanity_spearman"]["value"]) and rows["sanity_spearman"]["n"] == 0
    assert math.isnan(rows["sanity_ssim"]["value"]) and rows["sanity_ssim"]["n"] == 0
    assert rows["sanity: constant maps"]["value"] == 100.0 and rows["sanity: constant maps"]["n"] == 4
    assert "| gradcam | nan | nan | 100.0 |" in ev.markdown()
    saved = json.loads(ev.save(tmp_path)["json"].read_text())["rows"]  # strict JSON: null, not NaN
    assert [r["value"] for r in saved if r["metric"].startswith("sanity_")] == [None, None]


class NaNOut(nn.Module):
    """A model whose every output is NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3)) * math.nan


def test_a_model_that_outputs_nan_saves_its_rows_and_curves_as_null(tmp_path):
    """Every value of a NaN model is NaN: the rows and the insertion/deletion curves are saved as strict JSON
    with null for NaN (the curves used to make save raise after the CSV was written), and a value JSON cannot
    hold fails before any file is written."""
    from xcnn.metrics.harness import Evaluation

    model = xcnn.load_model(NaNOut(), raw_pixels=True, input_size=(16, 16))
    data = {"image": torch.rand(3, 3, 16, 16), "label": torch.zeros(3, dtype=torch.long)}
    ev = evaluate(model, data, ["random"], metrics=["insertion_deletion"], progress=False)
    assert all(math.isnan(v) for kind in ("insertion", "deletion") for v in ev.curves["random"][kind])
    paths = ev.save(tmp_path / "run")
    saved = json.loads(paths["json"].read_text())
    assert saved["curves"] == {"random": {"insertion": [None] * 29, "deletion": [None] * 29}}
    assert [r["value"] for r in saved["rows"]] == [None, None] and [r["n"] for r in saved["rows"]] == [0, 0]
    assert paths["csv"].is_file() and "| random | nan | nan |" in paths["md"].read_text()
    bad = Evaluation(rows=[dict(ev.rows[0], value=torch.tensor(1.0))], curves={})
    with pytest.raises(TypeError, match="not JSON serializable"):
        bad.save(tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_sanity_note_is_left_out_when_no_map_is_constant(untrained):
    ev = evaluate(untrained, Shapes("test", 2, size=32), ["random"], metrics=["sanity"], progress=False)
    assert {r["metric"] for r in ev.rows} == {"sanity_spearman", "sanity_ssim"}


def test_plain_tensors_and_labels_as_targets(untrained):
    data = {"image": torch.rand(5, 3, 32, 32), "label": torch.tensor([0, 1, 2, 3, 4])}
    ev = evaluate(untrained, data, ["saliency"], metrics=["adic"], targets="label", batch_size=2, progress=False)
    assert {r["n"] for r in ev.rows} == {5}
    assert "pointing" not in {r["metric"] for r in ev.rows}  # no masks, no localisation rows


def test_bad_harness_arguments(untrained):
    data = Shapes("test", 2, size=32)
    with pytest.raises(ValueError, match="unknown metric\\(s\\) \\['speed'\\]"):
        evaluate(untrained, data, ["gradcam"], metrics=["speed"])
    with pytest.raises(ValueError, match="targets must be"):
        evaluate(untrained, data, ["gradcam"], targets="truth")
    with pytest.raises(ValueError, match="unknown explainer"):
        evaluate(untrained, data, ["gradcamm"])
    with pytest.raises(ValueError, match="no methods"):
        evaluate(untrained, data, [])
    with pytest.raises(TypeError, match="metrics must be a list of names, got the string 'adic'"):
        evaluate(untrained, data, ["gradcam"], metrics="adic")
    with pytest.raises(TypeError, match="methods must be a list"):
        evaluate(untrained, data, "gradcam")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        evaluate(untrained, data, ["gradcam"], batch_size=0)
    with pytest.raises(ValueError, match="metric_batch_size must be a positive integer"):
        evaluate(untrained, data, ["gradcam"], metric_batch_size=-2)
    with pytest.raises(ValueError, match="slow_images must be a non-negative integer"):
        evaluate(untrained, data, ["gradcam"], slow_images=-1)
    with pytest.raises(ValueError, match="slow_methods \\['gradcamm'\\] are not among"):
        evaluate(untrained, data, ["gradcam"], slow_methods=["gradcamm"])
