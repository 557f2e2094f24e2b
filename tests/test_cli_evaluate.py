"""`xcnn evaluate`, `xcnn train benchmark` and the demo pipeline, end to end with small settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import xcnn
from xcnn.cli import main
from xcnn.data.images import ImageFolder
from xcnn.models import save_model
from xcnn.nets import ShapesNet


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    torch.manual_seed(0)
    spec = {"num_classes": 6, "widths": [8, 8, 16, 16]}
    model = xcnn.models.Classifier(
        ShapesNet(**spec), name="shapesnet", input_size=(32, 32), spec={"arch": "shapesnet", "kwargs": spec}
    )
    return save_model(model, tmp_path_factory.mktemp("model"))


def test_evaluate_on_the_benchmark_writes_tables_and_report(saved_model, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(saved_model), "--data", "synthetic", "--n", "6", "--methods", "gradcam,random",
            "--metrics", "adic,pointing,shortcut", "--shortcut", "1.0", "--out", str(out), "--opt", "seed=3"]  # fmt: skip
    assert main(args) == 0
    for name in ("metrics.csv", "metrics.json", "metrics.md", "report.html"):
        assert (out / name).is_file()
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert {r["metric"] for r in rows} >= {"AD@100", "pointing", "shortcut_energy"}
    assert "| gradcam |" in capsys.readouterr().out


def make_folder(root):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)).save(root / cls / f"{i}.png")
    mask = np.zeros((40, 50), dtype=np.uint8)
    mask[10:20, 10:30] = 255
    Image.fromarray(mask).save(root / "cats" / "0.mask.png")
    (root / "dogs" / "1.box.json").write_text(json.dumps({"boxes": [[0, 0, 24, 19]]}))
    (root / "dogs" / "broken.jpg").write_bytes(b"not an image")


def test_image_folder_ground_truth_and_unreadable_files(tmp_path):
    make_folder(tmp_path)
    with pytest.warns(UserWarning, match="skipping unreadable image .*broken.jpg"):
        folder = ImageFolder(tmp_path, 20)
    assert folder.classes == ["cats", "dogs"] and len(folder) == 4 and folder.has_ground_truth
    masks = [folder[i]["mask"] for i in range(4)]
    assert masks[0][5:10, 4:12].all() and masks[0].sum() == 5 * 8  # 10x20 of 40x50 pixels, at 20x20
    assert not masks[1].any()  # no ground truth for this one: an empty mask
    assert masks[3][:10, :10].all() and masks[3].sum() == 100  # the box covers the top-left quarter
    assert [int(folder[i]["label"]) for i in range(4)] == [0, 0, 1, 1]


def test_evaluate_on_a_folder(saved_model, tmp_path):
    make_folder(tmp_path / "data")
    out = tmp_path / "eval"
    with pytest.warns(UserWarning, match="broken.jpg"):
        code = main(["evaluate", "--model", str(saved_model), "--data", str(tmp_path / "data"), "--methods", "gradcam",
                     "--metrics", "pointing,energy", "--out", str(out), "--no-report", "--image-batch", "1"])  # fmt: skip
    assert code == 0
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert next(r for r in rows if r["metric"] == "pointing")["n"] == 4
    # 2 of the 4 images have no ground truth: 50 % of the data set (not 100 % of the batches that hold them)
    empty = next(r for r in rows if r["metric"] == "pointing: empty masks")
    assert empty["value"] == 50.0 and empty["n"] == 4
    assert not (out / "report.html").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "nowhere"], "--data must be 'synthetic' or an image folder"),
        (["--metrics", "speed"], "unknown metric"),
        (["--methods", "gradcamm"], "unknown method"),
    ],
)
def test_evaluate_errors(args, message, saved_model, tmp_path, capsys):
    assert main(["evaluate", "--model", str(saved_model), "--out", str(tmp_path / "o"), *args]) == 2
    assert message in capsys.readouterr().err


def test_evaluate_empty_folder_and_file_as_output(saved_model, tmp_path, capsys):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    assert (
        main(["evaluate", "--model", str(saved_model), "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "no readable images" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["evaluate", "--model", str(saved_model), "--n", "2", "--out", str(tmp_path / "file")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_train_benchmark_then_resume_then_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    base = [
        "train",
        "benchmark",
        "--out",
        str(out),
        "--n-train",
        "128",
        "--epochs",
        "2",
        "--size",
        "32",
        "--shortcut",
        "0.5",
    ]
    assert main(base) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"test_acc", "val_acc", "test_acc_random_patch"}
    trained = load_file(out / "model.safetensors")
    checkpoint = (out / "checkpoint.pt").stat().st_mtime_ns, (out / "checkpoint.pt").read_bytes()
    history = (out / "history.json").read_text()
    assert main([*base, "--resume"]) == 0  # already finished: resumes at the end and saves again
    # no epoch ran again (training from scratch would rewrite the checkpoint, even with equal contents)
    assert ((out / "checkpoint.pt").stat().st_mtime_ns, (out / "checkpoint.pt").read_bytes()) == checkpoint
    assert (out / "history.json").read_text() == history
    resumed = json.loads((out / "results.json").read_text())
    timing = {"train_seconds", "peak_rss_mib"}  # of each call: the resumed one trained nothing
    assert {k: v for k, v in resumed.items() if k not in timing} == {
        k: v for k, v in results.items() if k not in timing
    }
    assert resumed["train_seconds"] < 1 and results["peak_rss_mib"] > 100
    again = load_file(out / "model.safetensors")
    assert again.keys() == trained.keys() and all(torch.equal(again[k], trained[k]) for k in trained)
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(out),
                "--n",
                "4",
                "--methods",
                "layercam",
                "--metrics",
                "pointing",
                "--out",
                str(tmp_path / "e"),
                "--no-report",
            ]
        )
        == 0
    )
    assert main(["train", "benchmark", "--out", str(tmp_path / "x"), "--shortcut", "2"]) == 2
    assert "argument --shortcut: expected a finite number in [0, 1], got '2'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_demo_pipeline_with_small_settings(tmp_path):
    from xcnn.pipelines import run_demo

    summary = run_demo(tmp_path, progress=False, benchmark_images=4, epochs=1, n_train=256)
    for name in ("report.html", "photos.md", "benchmark.md", "demo.json", "benchmark-model/model.json"):
        assert (tmp_path / name).is_file()
    page = (tmp_path / "report.html").read_text()
    assert "EfficientNet-Lite0" in page and "Benchmark CNN" in page and "sanity_spearman" in page
    assert set(summary["seconds"]) == {"photos", "training", "benchmark evaluation", "total"}
    # the demo points to TAME with commands that name its own model folder
    assert summary["next"]["tame"].startswith(f"xcnn train tame --model {tmp_path / 'benchmark-model'}")
