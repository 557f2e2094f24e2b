"""`xcnn explain` end to end on the bundled model and photos."""

from __future__ import annotations

import json
import re
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
    assert main(["explain", "sample:chelsea", flag, "-1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"xcnn explain: error: argument {flag}: expected a positive integer, got '-1'" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


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


# ---- numeric flags, the error policy of main() ----------------------------------------------------------


@pytest.mark.parametrize(
    "argv,message",
    [
        (["explain", "sample:chelsea", "--alpha", "2"], "argument --alpha: expected a finite number in [0, 1], got '2'"),
        (["explain", "sample:chelsea", "--alpha", "nan"], "argument --alpha: expected a finite number in [0, 1]"),
        (["explain", "sample:chelsea", "--seed", "-1"], "argument --seed: expected an integer in [0, 4294967295], got '-1'"),
        (["explain", "sample:chelsea", "--seed", str(2**40)], "argument --seed: expected an integer in [0, 4294967295]"),
        (["evaluate", "--shortcut", "2"], "argument --shortcut: expected a finite number in [0, 1], got '2'"),
        (["evaluate", "--slow-images", "-1"], "argument --slow-images: expected an integer >= 0, got '-1'"),
        (["train", "benchmark", "--out", "o", "--size", "16"], "argument --size: expected an integer in [32, 224], got '16'"),
        (["train", "tame", "--model", "m", "--out", "o", "--lr", "inf"], "argument --lr: expected a positive number, got 'inf'"),
        (["train", "lap", "--model", "m", "--out", "o", "--beta-area", "inf"], "argument --beta-area: expected a finite number in [0, inf), got 'inf'"),
        (["train", "lap", "--model", "m", "--out", "o", "--rrr-weight", "-1"], "argument --rrr-weight: expected a finite number in [0, inf)"),
        (["train", "lap", "--model", "m", "--out", "o", "--boxes-fraction", "1.5"], "argument --boxes-fraction: expected a finite number in [0, 1]"),
        (["train", "cgc", "--model", "m", "--out", "o", "--tau", "inf"], "argument --tau: expected a finite number in (0, inf), got 'inf'"),
        (["train", "cgc", "--model", "m", "--out", "o", "--lam", "nan"], "argument --lam: expected a finite number in [0, inf), got 'nan'"),
        (["train", "cgc", "--model", "m", "--out", "o", "--labeled-fraction", "0"], "argument --labeled-fraction: expected a finite number in (0, 1], got '0'"),
        (["train", "protopnet", "--model", "m", "--out", "o", "--dim", "0"], "argument --dim: expected a positive integer, got '0'"),
        (["train", "protopnet", "--model", "m", "--out", "o", "--shortcut", "-0.5"], "argument --shortcut: expected a finite number in [0, 1]"),
        (["inspect", "--model", "m", "--seed", "x"], "argument --seed: expected an integer in [0, 4294967295], got 'x'"),
    ],
)  # fmt: skip
def test_numeric_flags_are_checked_while_parsing(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("xcnn") and not (tmp_path / "o").exists()


def test_a_target_beyond_the_classes_is_refused_before_any_work(tmp_path, capsys):
    assert main(["explain", "sample:chelsea", "--target", str(10**20), "--out", str(tmp_path / "o")]) == 2
    assert f"--target {10**20} is out of range: model has 1000 classes" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["explain", "sample:chelsea", "--target", "-1", "--out", str(tmp_path / "o")]) == 2
    assert "--target must be 'auto' or a class index (an integer >= 0), got '-1'" in capsys.readouterr().err


@pytest.mark.parametrize("digits", ["\u00b2", "\u0663"])  # superscript two, Arabic-Indic three: isdigit(), not ASCII
def test_digits_other_than_ascii_are_refused_naming_their_flag(digits, tmp_path, capsys):
    assert main(["explain", "sample:chelsea", "--target", digits, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"--target must be 'auto' or a class index (an integer >= 0), got '{digits}'" in err
    argv = ["train", "cgc", "--model", "shapesnet", "--random-weights", "--out", str(tmp_path / "c"),
            "--unlabeled", f"synthetic:{digits}", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--unlabeled synthetic:N needs a positive image count N, got 'synthetic:{digits}'" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "raised,code,shown",
    [
        (ValueError("bad value\nsecond line"), 2, "xcnn demo: error: bad value second line"),
        (
            PermissionError(13, "Permission denied", "/x/out"),
            2,
            "xcnn demo: error: [Errno 13] Permission denied: '/x/out'",
        ),
        (MemoryError("no room"), 1, "xcnn demo: error: out of memory (no room)"),
        (KeyboardInterrupt(), 130, "xcnn demo: interrupted"),
    ],
)
def test_main_reports_what_a_user_can_cause_in_one_line(raised, code, shown, monkeypatch, capsys):
    def command(args):
        raise raised

    monkeypatch.setattr("xcnn.cli.cmd_demo", command)
    assert main(["demo"]) == code
    err = capsys.readouterr().err
    assert err.strip() == shown or err.strip().startswith(shown)
    assert len(err.strip().splitlines()) == 1


def test_cpu_out_of_memory_is_one_line(monkeypatch, capsys):
    """PyTorch's CPU allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory"), not
    torch.OutOfMemoryError: a command whose allocation cannot be met (2 EiB here) reports it in one line."""

    def command(args):
        torch.empty(2**61, dtype=torch.uint8)  # a real allocation, refused by the allocator at once
        return 0

    monkeypatch.setattr("xcnn.cli.cmd_demo", command)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("xcnn demo: error: out of memory (") and "can't allocate memory" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "message", ["CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"]
)
def test_cuda_allocator_failures_outside_out_of_memory_error_are_one_line(message, monkeypatch, capsys):
    def command(args):
        raise RuntimeError(message)

    monkeypatch.setattr("xcnn.cli.cmd_demo", command)
    assert main(["demo"]) == 1
    assert capsys.readouterr().err.strip().startswith("xcnn demo: error: out of memory (")


@pytest.mark.parametrize("bug", [RuntimeError("a bug"), KeyError("k"), IndexError(3), AttributeError("x")])
def test_main_does_not_hide_bugs(bug, monkeypatch):
    """Errors no user input should cause keep their traceback (they would be bugs in xcnn or a library)."""

    def command(args):
        raise bug

    monkeypatch.setattr("xcnn.cli.cmd_demo", command)
    with pytest.raises(type(bug)):
        main(["demo"])


def test_an_impossible_prototype_size_is_one_line(tmp_path, capsys):
    """--dim 100000 on a 8-channel backbone asks for ~40 GB of add-on layers: refused, in one line."""
    from xcnn.models import Classifier, save_model
    from xcnn.nets import ShapesNet

    arch = {"num_classes": 6, "widths": [4, 4, 8, 8]}
    save_model(
        Classifier(ShapesNet(**arch), input_size=(32, 32), spec={"arch": "shapesnet", "kwargs": arch}), tmp_path / "m"
    )
    argv = ["train", "protopnet", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "p"), "--dim", "100000",
            "--n-train", "60", "--n-val", "6", "--n-test", "6", "--batch-size", "4", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("xcnn train protopnet: error: ") and "dim" in err and len(err.strip().splitlines()) == 1


# ---- a saved prototype network's prototypes.json -------------------------------------------------------


@pytest.fixture
def prototype_folder(tmp_path):
    """A saved prototype network (ShapesNet, 1 prototype of 4 channels per class) with a prototypes.json whose
    records point at source images inside the folder, and an image ``secret.png`` outside it."""
    from xcnn.interpretable import protopnet
    from xcnn.models import Classifier, save_model
    from xcnn.nets import ShapesNet

    torch.manual_seed(0)
    arch = {"num_classes": 6, "widths": [4, 4, 8, 8]}
    base = Classifier(ShapesNet(**arch), input_size=(32, 32), spec={"arch": "shapesnet", "kwargs": arch})
    folder = save_model(protopnet(base, 1, dim=4), tmp_path / "proto")
    (folder / "prototypes").mkdir()
    rng = np.random.default_rng(0)
    for j in range(6):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(folder / "prototypes" / f"s{j}.png")
    records = [{"prototype": j, "class": j, "index": 10 + j, "box": [0, 0, 8, 8], "image": f"prototypes/s{j}.png"}
               for j in range(6)]  # fmt: skip
    (folder / "prototypes.json").write_text(json.dumps(records))
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(tmp_path / "secret.png")
    image = tmp_path / "query.png"
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(image)
    return folder, image


def explain_prototypes(folder, image, out) -> int:
    return main(["explain", str(image), "--model", str(folder), "--method", "gradcam", "--prototypes", "6",
                 "--prototype-search", "none", "--out", str(out), "--device", "cpu"])  # fmt: skip


def test_prototype_sources_inside_the_folder_are_shown(prototype_folder, tmp_path):
    folder, image = prototype_folder
    assert explain_prototypes(folder, image, tmp_path / "o") == 0
    top = json.loads((tmp_path / "o" / "predictions.json").read_text())["images"][0]["prototypes"]["top"]
    assert sorted(r["source"]["index"] for r in top) == list(range(10, 16))
    assert all(r["source"]["image"] == f"prototypes/s{r['prototype']}.png" for r in top)
    assert (tmp_path / "o" / "query_prototypes.png").is_file()


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda r: r.update(image="../secret.png"), r"record 0: 'image' '\.\./secret\.png' leads outside"),
        (lambda r: r.update(image="/etc/passwd"), r"record 0: 'image' '/etc/passwd' is an absolute path"),
        (lambda r: r.update(image="link.png"), r"record 0: 'image' 'link\.png' leads outside .*symlink"),
        (lambda r: r.update(image=5), r"record 0: 'image' must be a path relative to .* \(a string\), got int"),
        (lambda r: r.pop("prototype"), r"record 0: 'prototype' must be an integer, got NoneType None"),
        (lambda r: r.pop("index"), r"record 0: 'index' must be an integer, got NoneType None"),
        (lambda r: r.update(prototype=6), r"record 0: 'prototype' must be in \[0, 5\], got 6"),
        (lambda r: r.update(prototype=1), r"record 1: prototype 1 has a record already"),
        (lambda r: r.update(box=[0, 0, 8]), r"record 0: 'box' must be \[top, left, bottom, right\], got \[0, 0, 8\]"),
        (lambda r: r.update(box=[8, 0, 0, 8]), r"record 0: 'box' must be .* with top <= bottom"),
        (lambda r: r.update(box=[0, 0, 8, float("inf")]), r"record 0: 'box' must be finite"),
        (lambda r: r.update(box=[0, 0, 8, 10**400]), r"record 0: 'box' must be finite, got 1000"),  # not an overflow
        (lambda r: r.update(file=["x"]), r"record 0: 'file' must be a string, got list"),
    ],
)
def test_prototype_records_are_checked_and_confined_to_the_folder(change, message, prototype_folder, tmp_path, capsys):
    folder, image = prototype_folder
    (folder / "link.png").symlink_to(tmp_path / "secret.png")
    records = json.loads((folder / "prototypes.json").read_text())
    change(records[0])
    (folder / "prototypes.json").write_text(json.dumps(records))
    assert explain_prototypes(folder, image, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()  # refused before any work


def test_a_prototype_source_outside_the_folder_is_never_read(prototype_folder, tmp_path, capsys):
    """A non-image file named by an escaping path: the message names neither its content nor a read error."""
    folder, image = prototype_folder
    (tmp_path / "private.txt").write_text("root:x:0:0:secret")
    records = json.loads((folder / "prototypes.json").read_text())
    records[2]["image"] = str(tmp_path / "private.txt")
    (folder / "prototypes.json").write_text(json.dumps(records))
    assert explain_prototypes(folder, image, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "record 2: 'image'" in err and "absolute path" in err and "secret" not in err.replace(str(tmp_path), "")
    assert "cannot read image" not in err


def test_a_mathtext_class_name_is_drawn_as_plain_text(tmp_path):
    """A class name matplotlib would parse as a (malformed) formula: explain still writes every output."""
    from xcnn.models import Classifier, save_model
    from xcnn.nets import ShapesNet

    arch = {"num_classes": 2, "widths": [4, 4, 8, 8]}
    names = [r"$\frac{a}$", "$x"]
    model = Classifier(
        ShapesNet(**arch), input_size=(32, 32), class_names=names, spec={"arch": "shapesnet", "kwargs": arch}
    )
    folder = save_model(model, tmp_path / "m")
    out = tmp_path / "o"
    assert main(["explain", "sample:chelsea", "--model", str(folder), "--target", "0", "--out", str(out)]) == 0
    pred = json.loads((out / "predictions.json").read_text())
    assert pred["images"][0]["target"]["name"] == names[0] and (out / "chelsea_grid.png").is_file()


def test_inspect_writes_its_report_for_mathtext_class_folders(tmp_path):
    """Class folders named like formulas (the class names of the inspection figures): the report is written."""
    from xcnn.models import Classifier, save_model
    from xcnn.nets import ShapesNet

    arch = {"num_classes": 2, "widths": [4, 4, 8, 8]}
    save_model(
        Classifier(ShapesNet(**arch), input_size=(32, 32), spec={"arch": "shapesnet", "kwargs": arch}), tmp_path / "m"
    )
    rng = np.random.default_rng(0)
    for name in (r"$\frac{a}$", "$b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(
                tmp_path / "data" / name / f"{i}.png"
            )
    out = tmp_path / "o"
    argv = ["inspect", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "data"), "--n", "12", "--samples", "2",
            "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert (out / "report.html").is_file() and (out / "report_files" / "association.png").is_file()
