"""`xcnn explain` end to end on the bundled model and photos."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import xcnn
from xcnn.cli import main


def test_explain_writes_overlays_grid_predictions_and_maps(tmp_path, capsys):
    gray = tmp_path / "gray.png"
    Image.fromarray((np.random.default_rng(0).random((40, 60)) * 255).astype(np.uint8), "L").save(gray)
    rgba = tmp_path / "rgba.png"
    Image.fromarray((np.random.default_rng(1).random((50, 50, 4)) * 255).astype(np.uint8), "RGBA").save(rgba)
    out = tmp_path / "out"
    code = main(
        [
            "explain",
            "sample:chelsea",
            str(gray),
            str(rgba),
            "--method",
            "gradcam,gradcam++,saliency",
            "--out",
            str(out),
            "--save-maps",
        ]
    )
    assert code == 0
    pred = json.loads((out / "predictions.json").read_text())
    assert pred["model"] == "efficientnet_lite0" and pred["methods"] == ["gradcam", "gradcam++", "saliency"]
    assert pred["layers"] == ["bn2"]
    chelsea = pred["images"][0]
    assert chelsea["target"] == {"class": 285, "name": "Egyptian cat"}
    assert next(t["class"] for t in chelsea["top5"]) == 285 and len(chelsea["top5"]) == 5
    probs = [t["probability"] for t in chelsea["top5"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    for record in pred["images"]:
        assert (out / record["grid"]).is_file()
        for _method, files in record["maps"].items():
            assert Image.open(out / files["overlay"]).size == (224, 224)
            m = np.load(out / files["map"])
            assert m.dtype == np.float32 and m.shape == (224, 224) and 0 <= m.min() and m.max() == 1
    assert {r["label"] for r in pred["images"]} == {"chelsea", "gray", "rgba"}
    assert "Egyptian cat" in capsys.readouterr().out


def test_explain_with_mdm_and_list_options(tmp_path):
    """``--opt`` reaches each method that has the option: the saved maps are the API's maps with those options
    (MDM: scales 7 and 14 and 2 steps; extremal: 2 steps), not the defaults. MDM's Adam search turns float
    rounding into visible differences (two runs whose logits differ by 3e-6 gave maps 0.003 apart on
    average, 0.28 at worst), so MDM is compared by the mean difference: 0.08 between these options and
    the default scales."""
    from xcnn.data.images import load_image

    out = tmp_path / "o"
    argv = ["explain", "sample:chelsea", "--method", "mdm,extremal", "--opt", "scales=7,14", "--opt", "steps=2"]
    assert main([*argv, "--out", str(out), "--save-maps"]) == 0
    pred = json.loads((out / "predictions.json").read_text())
    assert pred["methods"] == ["mdm", "extremal"]
    saved = {
        method: torch.from_numpy(np.load(out / files["map"])) for method, files in pred["images"][0]["maps"].items()
    }
    for m in saved.values():
        assert m.shape == (224, 224) and 0 <= m.min() and m.max() == 1
    model, image = xcnn.load_model(), load_image("sample:chelsea", 224)[None]
    torch.testing.assert_close(saved["extremal"], xcnn.explainer("extremal", model, steps=2, progress=False)(image)[0])
    asked = xcnn.explainer("mdm", model, scales=(7, 14), steps=2, progress=False)(image)[0]
    default_scales = xcnn.explainer("mdm", model, steps=2, progress=False)(image)[0]
    assert (saved["mdm"] - asked).abs().mean() < 0.02 < 0.05 < (saved["mdm"] - default_scales).abs().mean()


def test_explain_fixed_target_and_duplicate_names(tmp_path):
    out = tmp_path / "o"
    assert (
        main(
            ["explain", "sample:coffee", "sample:coffee", "--target", "285", "--method", "layercam", "--out", str(out)]
        )
        == 0
    )
    pred = json.loads((out / "predictions.json").read_text())
    assert [r["target"]["class"] for r in pred["images"]] == [285, 285]
    assert [r["label"] for r in pred["images"]] == ["coffee", "coffee-2"]
    assert pred["images"][0]["top5"][0]["class"] == 967  # predictions are still the model's own


@pytest.mark.parametrize(
    "args,message",
    [
        (["missing.jpg"], "image file not found: missing.jpg"),
        (["sample:chelsea", "--method", "gradcamm"], "unknown method.*gradcamm"),
        (["sample:chelsea", "--target", "1000"], "out of range: model has 1000 classes"),
        (["sample:chelsea", "--target", "cat"], "--target must be 'auto' or a class index"),
        (["sample:chelsea", "--model", "nosuchnet"], "unknown model 'nosuchnet'"),
        (["sample:chelsea", "--layer", "layer4"], "'layer4' is not in the model"),
        (["sample:chelsea", "--opt", "masks=10"], "--opt masks: none of the methods"),
        (["sample:chelsea", "--opt", "masks"], "NAME=VALUE"),
        (["sample:chelsea", "--device", "foo"], "--device must be auto, cpu, cuda"),
        (["sample:chelsea", "--method", "saliency", "--layer", "bn2"], "none of the methods.*uses a layer"),
    ],
)
def test_explain_errors_name_the_problem(args, message, tmp_path, capsys):
    assert main(["explain", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "xcnn explain: error:" in err
    import re

    assert re.search(message, err), err


@pytest.mark.parametrize("flag", ["--batch-size", "--image-batch"])
def test_non_positive_sizes_are_usage_errors(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "sample:chelsea", flag, "-1", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


def test_labels_never_collide():
    from xcnn.cli import _unique_labels

    assert _unique_labels(["a/cat.png", "b/cat.png", "cat-2.png"]) == ["cat", "cat-2", "cat-2-2"]


def test_output_folder_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["explain", "sample:chelsea", "--out", str(tmp_path / "f")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_console_script_help_lists_every_option():
    result = subprocess.run(
        [sys.executable, "-m", "xcnn.cli", "explain", "--help"], capture_output=True, text=True, check=True
    )
    for option in [
        "--model",
        "--method",
        "--target",
        "--out",
        "--save-maps",
        "--layer",
        "--batch-size",
        "--seed",
        "--opt",
        "sample:NAME",
    ]:
        assert option in result.stdout
