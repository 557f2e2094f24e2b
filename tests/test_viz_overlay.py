"""Overlays and grids."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import xcnn
from xcnn.viz import overlay, save_grid, save_overlay
from xcnn.viz.overlay import display_map, grid_figure


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


def _sparse_map(size=32):
    """A gradient-like map: a few hot pixels, the rest faint (stretched by its maximum it looks empty)."""
    gen = torch.Generator().manual_seed(0)
    saliency = torch.rand(size, size, generator=gen) * 0.1
    saliency[3, 5] = saliency[20, 9] = 1.0
    return saliency


def test_sparse_maps_are_displayed_clipped_without_changing_the_map():
    saliency = _sparse_map()
    before = saliency.clone()
    shown = display_map(saliency, 99)
    assert (saliency == before).all()  # the caller's map is not touched
    assert shown.min() >= 0 and shown.max() == 1
    threshold = np.percentile(before.numpy(), 99)
    assert np.allclose(shown, np.clip(before.numpy() / threshold, 0, 1))
    assert (shown == 1).mean() >= 0.01 and np.median(shown) > 4 * float(before.median())
    assert (display_map(saliency) == before.numpy()).all()  # no percentile: the map as it is
    image = torch.full((3, 32, 32), 0.5)
    assert not (overlay(image, saliency, percentile=99) == overlay(image, saliency)).all()
    assert (display_map(torch.zeros(8, 8), 99) == 0).all()  # an empty map stays empty
    mostly_zero = torch.zeros(32, 32)
    mostly_zero[0, 0] = 0.5
    assert display_map(mostly_zero, 99).max() == 1  # the percentile is 0: clipped at the maximum instead
    with pytest.raises(ValueError, match="percentile"):
        display_map(saliency, 0)


def test_the_sparse_display_rule_belongs_to_the_explainer_classes():
    from xcnn.explain import explainer_class
    from xcnn.viz.style import display_percentile

    assert {n for n in xcnn.list_explainers() if explainer_class(n).display_percentile} == {
        "saliency",
        "integrated_gradients",
        "smoothgrad",
    }
    assert display_percentile("integrated_gradients, 8 steps") == 99
    assert display_percentile("ig", {"ig": "integrated_gradients"}) == 99
    assert display_percentile("gradcam") is None and display_percentile("not a method") is None


def test_explain_shows_gradient_maps_clipped_and_saves_them_unclipped(tmp_path):
    from xcnn.cli import main
    from xcnn.data.images import load_image

    out = tmp_path / "o"
    assert main(["explain", "sample:chelsea", "--method", "gradcam,saliency", "--out", str(out), "--save-maps"]) == 0
    image = load_image("sample:chelsea", 224)
    api = xcnn.explainer("saliency", xcnn.load_model())(image[None])[0]
    saved = np.load(out / "chelsea_saliency.npy")
    assert np.allclose(saved, api.numpy(), atol=1e-6)  # --save-maps: the explainer's map, not the display
    assert (saved == 1).mean() < 0.001  # stretched by its maximum: one hot pixel
    png = np.asarray(Image.open(out / "chelsea_saliency.png").convert("RGB")).astype(int)
    clipped, plain = overlay(image, saved, percentile=99).astype(int), overlay(image, saved).astype(int)
    assert np.abs(png - clipped).max() <= 1 and np.abs(png - plain).mean() > 5
    cam = np.load(out / "chelsea_gradcam.npy")  # CAM maps are shown as they are
    assert np.abs(np.asarray(Image.open(out / "chelsea_gradcam.png").convert("RGB")) - overlay(image, cam)).max() <= 1


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_grid_titles_and_notes_do_not_overlap_the_images():
    image = torch.rand(3, 40, 60)
    names = ["gradcam", "tame, layer4 only (L-CAM-like)", "integrated_gradients", "smoothgrad", "rise", "a", "b"]
    maps = {n: _sparse_map(40)[:, :40].repeat(1, 2)[:, :60] for n in names}
    fig = grid_figure(
        image, maps, title="chelsea: explaining 285 Egyptian cat", columns=3, percentiles={"integrated_gradients": 99}
    )
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    axes = fig.axes
    assert len(axes) == 8
    boxes = [ax.get_window_extent(renderer) for ax in axes]
    titles = [ax.title.get_window_extent(renderer) for ax in axes]
    texts = [t.get_window_extent(renderer) for t in fig.texts]  # the figure title and the clipping note
    assert [ax.get_title() for ax in axes][3] == "integrated_gradients *"
    page = fig.bbox
    for i, title in enumerate(titles):
        assert page.x0 <= title.x0 and title.x1 <= page.x1 and page.y0 <= title.y0 and title.y1 <= page.y1
        for j, box in enumerate(boxes):
            assert not _overlaps(title, box), (axes[i].get_title(), j)  # above its image, below the row above
        for j, other in enumerate(titles[:i]):
            assert not _overlaps(title, other), (axes[i].get_title(), axes[j].get_title())
        for text in texts:
            assert not _overlaps(title, text)
    for text in texts:
        assert page.x0 <= text.x0 and text.x1 <= page.x1
        assert not any(_overlaps(text, box) for box in boxes)
    assert any("99th percentile" in t.get_text() for t in fig.texts)


# ---- user text is drawn as written ---------------------------------------------------------------------

#: strings matplotlib would parse as mathtext: malformed (an error, the figure is not written), valid (drawn
#: as a formula), a lone dollar, and a backslash before a dollar
MATHTEXT = [r"$\frac{a}$", "$x^2$ and $y$", "costs $5", r"a\$b $c"]


def _pixels(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba()).copy()


@pytest.mark.parametrize("text", MATHTEXT)
def test_plain_text_draws_exactly_the_characters_given(text):
    """plain_text(s) renders pixel for pixel as s does with matplotlib's mathtext switched off."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from xcnn.viz.overlay import plain_text

    def render(s: str, **kwargs) -> np.ndarray:
        fig = Figure(figsize=(3, 0.6), dpi=60)
        FigureCanvasAgg(fig)
        fig.text(0.02, 0.3, s, **kwargs)
        return _pixels(fig)

    assert np.array_equal(render(plain_text(text)), render(text, parse_math=False))


@pytest.mark.parametrize("text", MATHTEXT)
def test_grid_titles_and_method_labels_are_plain_text(text, tmp_path):
    import textwrap

    image, saliency = torch.rand(3, 16, 16), torch.rand(16, 16)
    label = f"{text} {text} {text}"  # long enough to be wrapped
    fig = grid_figure(image, {label: saliency}, title=f"img: explaining 3 {text}")
    shown = _pixels(fig)
    # the same figure with every text set verbatim and mathtext off
    fig.texts[0].set_text(f"img: explaining 3 {text}")
    fig.axes[1].title.set_text(textwrap.fill(label, 30))
    for t in [fig.texts[0], fig.axes[1].title]:
        t.set_parse_math(False)
    assert np.array_equal(shown, _pixels(fig))
    save_grid(tmp_path / "g.png", image, {label: saliency}, title=text)
    assert Image.open(tmp_path / "g.png").size[0] > 0
