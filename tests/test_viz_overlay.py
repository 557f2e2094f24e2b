"""Overlays and grids."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from xcnn.viz import overlay, save_grid, save_overlay


def test_overlay_blends_map_colours_over_the_image():
    image = torch.zeros(3, 8, 8)
    saliency = torch.zeros(8, 8)
    saliency[:4] = 1.0
    rgb = overlay(image, saliency, alpha=1.0, cmap="gray")
    assert rgb.dtype == np.uint8 and rgb.shape == (8, 8, 3)
    assert (rgb[:4] == 255).all() and (rgb[4:] == 0).all()
    assert (overlay(image, saliency, alpha=0.0) == 0).all()  # alpha 0 shows the (black) image


def test_overlay_rejects_mismatched_or_bad_maps_and_options(tmp_path):
    with pytest.raises(ValueError, match="must be in \\[0,1\\]"):
        overlay(torch.zeros(3, 8, 8), torch.full((8, 8), 255.0))
    with pytest.raises(ValueError, match="unknown colour map 'nope'"):
        overlay(torch.zeros(3, 8, 8), torch.zeros(8, 8), cmap="nope")
    with pytest.raises(ValueError, match="columns must be at least 1"):
        save_grid(tmp_path / "g.png", torch.zeros(3, 8, 8), {"a": torch.zeros(8, 8)}, columns=0)
    with pytest.raises(ValueError, match="does not match"):
        overlay(torch.zeros(3, 8, 8), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="NaN"):
        overlay(torch.zeros(3, 8, 8), torch.full((8, 8), float("nan")))
    with pytest.raises(ValueError, match="alpha"):
        overlay(torch.zeros(3, 8, 8), torch.zeros(8, 8), alpha=2)


def test_png_files_are_written_atomically(tmp_path):
    image, saliency = torch.rand(3, 16, 16), torch.rand(16, 16)
    save_overlay(tmp_path / "o.png", image, saliency)
    save_grid(tmp_path / "g.png", image, {"a": saliency, "b": 1 - saliency, "c": saliency}, title="t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "o.png"]  # no temp files left
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "o.png").stat().st_mode & 0o777 == 0o666 & ~umask  # usual permissions, not mkstemp's 0600
    assert Image.open(tmp_path / "o.png").size == (16, 16)
    grid = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    assert grid.std() > 10  # not blank
