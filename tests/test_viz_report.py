"""The HTML report: renders in headless Chromium, escapes what users name."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import xcnn
from xcnn.data.synthetic import Shapes
from xcnn.metrics.harness import evaluate
from xcnn.nets import ShapesNet
from xcnn.viz.report import ReportSection, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def evaluation():
    torch.manual_seed(0)
    model = xcnn.load_model(
        ShapesNet(widths=(8, 8, 16, 16)), input_size=(32, 32), class_names=[f"c{i}" for i in range(6)]
    )
    ev = evaluate(
        model,
        Shapes("test", 4, size=32),
        ["gradcam", "random"],
        ["adic", "insertion_deletion", "pointing"],
        batch_size=4,
        progress=False,
    )
    return model, ev


def test_user_strings_are_escaped(evaluation, tmp_path):
    _model, ev = evaluation
    evil = '<script>alert("x")</script>.png'
    section = ReportSection(title=f"model on {evil}", evaluation=ev, summary={"file": evil}, captions=[evil] * 4)
    page = write_report(tmp_path / "report.html", [section], title=evil).read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(" in page
    for src in [line.split('src="')[1].split('"')[0] for line in page.splitlines() if 'src="' in line]:
        assert (tmp_path / src).is_file()  # every image the page shows exists beside it


@pytest.mark.slow
def test_report_renders_in_headless_chromium(evaluation, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI (.ci/run installs the Debian package)")
        pytest.skip("chromium not installed")
    model, ev = evaluation
    page = write_report(tmp_path / "report.html", [ReportSection("benchmark", ev, {"model": model.name})])
    shot = tmp_path / "shot.png"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri(),
    ]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 20  # text, tables, heatmaps: far from a blank page
    dark = (pixels < 128).mean()
    assert 0.01 < dark < 0.9
