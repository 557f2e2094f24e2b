"""The harness: rows for every method x metric, written as CSV, JSON and Markdown."""

from __future__ import annotations

import csv
import json

import pytest
import torch

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
    assert all(r["n"] == 2 for r in ev.rows if r["metric"].startswith(("consistency", "sanity")))
    assert all(r["seconds"] >= 0 and "images_per_second" in r for r in ev.rows)
    assert ev.value("random", "sanity_spearman") == pytest.approx(1.0, abs=1e-4)  # a model-blind map: unchanged
    assert len(ev.curves["gradcam"]["insertion"]) == 29
    assert ev.samples["image"].shape == (3, 3, 32, 32) and ev.sample_maps["rise"].shape == (3, 32, 32)
    paths = ev.save(tmp_path)
    with open(paths["csv"]) as fh:
        assert len(list(csv.DictReader(fh))) == len(ev.rows)
    assert json.loads(paths["json"].read_text())["rows"] == ev.rows
    table = paths["md"].read_text()
    assert table.startswith("| method |") and "| gradcam |" in table


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
