"""The HTML report: renders in headless Chromium, escapes what users name."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex
from PIL import Image

import xcnn
from xcnn.data.synthetic import Shapes
from xcnn.metrics.harness import Evaluation, evaluate, metric_direction, metric_table
from xcnn.nets import ShapesNet
from xcnn.viz import report
from xcnn.viz.overlay import overlay
from xcnn.viz.report import ReportSection, curves_figure, write_report
from xcnn.viz.style import BASELINE_COLOR, base_method, method_styles

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def evaluation():
    torch.manual_seed(0)
    model = xcnn.load_model(
        ShapesNet(widths=(8, 8, 16, 16)), raw_pixels=True, input_size=(32, 32), class_names=[f"c{i}" for i in range(6)]
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


def screenshot(page, tmp_path, height: int) -> np.ndarray:
    """``page`` rendered by headless Chromium at 1400 x ``height``, as grey levels (skips without Chromium;
    fails in CI, where .ci/run installs it)."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI (.ci/run installs the Debian package)")
        pytest.skip("chromium not installed")
    shot = tmp_path / "shot.png"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--window-size=1400,{height}", f"--screenshot={shot}", page.as_uri(),
    ]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    return np.asarray(Image.open(shot).convert("L"), dtype=np.float32)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(evaluation, tmp_path):
    model, ev = evaluation
    page = write_report(tmp_path / "report.html", [ReportSection("benchmark", ev, {"model": model.name})])
    pixels = screenshot(page, tmp_path, height=1600)
    assert pixels.std() > 20  # text, tables, heatmaps: far from a blank page
    dark = (pixels < 128).mean()
    assert 0.01 < dark < 0.9


# --- what a reader sees: one style per method, marked best values, one precision per column, scrolling tables


def _evaluation(methods, seed=0, names=None):
    """A hand-made Evaluation: rows, curves, 2 sample images and maps for each of ``methods``."""
    gen = torch.Generator().manual_seed(seed)
    ev = Evaluation(names=dict(names or {}))
    for k, m in enumerate(methods):
        for metric in ("AD@100", "insertion", "deletion"):
            ev.rows.append({"method": m, "metric": metric, "value": float(torch.rand(1, generator=gen)), "n": 2,
                            "seconds": 0.01 * (k + 1), "images_per_second": None})  # fmt: skip
        ev.curves[m] = {kind: torch.rand(11, generator=gen).tolist() for kind in ("insertion", "deletion")}
        ev.sample_maps[m] = torch.rand(2, 16, 16, generator=gen)
    ev.samples = {"image": torch.rand(2, 3, 16, 16, generator=gen), "target": torch.tensor([0, 1])}
    return ev


def _line_styles(fig):
    """``{label: (colour, dashes)}`` of every line in every axes of a curves figure, checking the axes agree."""
    seen = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            key = (to_hex(line.get_color()), str(line.get_linestyle()), line.get_marker())
            assert seen.setdefault(line.get_label(), key) == key  # insertion and deletion plots agree
    return seen


def test_a_method_keeps_its_style_in_every_plot_and_section(tmp_path, monkeypatch):
    figures, original = [], report.curves_figure

    def recording(*args, **kwargs):
        figures.append(original(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(report, "curves_figure", recording)
    first = _evaluation(["gradcam", "rise", "random", "mdm, 1 scale (7)"], seed=1)
    second = _evaluation(["random", "mdm, 1 scale (7)", "rise", "saliency", "gradcam"], seed=2)
    page = write_report(tmp_path / "r.html", [ReportSection("one", first), ReportSection("two", second)]).read_text()
    assert len(figures) == 2
    a, b = (_line_styles(f) for f in figures)
    assert set(a) == {"gradcam", "rise", "random", "mdm, 1 scale (7)"}
    for label in set(a) & set(b):
        assert a[label] == b[label], label
    assert len(set(b.values())) == len(b)  # distinct within a plot
    # the table swatches agree with the plots, in both sections
    for label, (colour, _, _) in a.items():
        swatches = re.findall(rf'border-top: 3px \w+ (#[0-9a-f]+)"></span>{re.escape(label)}</td>', page)
        assert swatches == [colour, colour], label


def test_every_registered_method_gets_its_own_style_and_random_is_grey_dashed():
    names = xcnn.list_explainers()
    assert len(names) >= 15
    styles = method_styles(names)
    keys = [(s.color, str(s.linestyle), s.marker) for s in styles.values()]
    assert len(set(keys)) == len(keys)
    assert len({s.color for s in styles.values()}) == len(names)  # distinct colours, not only dashes
    assert styles["random"].color == BASELINE_COLOR and styles["random"].linestyle == "--"
    assert all(s.linestyle != "--" and s.color != BASELINE_COLOR for m, s in styles.items() if m != "random")
    # deterministic by name: another order or another company does not change a method's style
    assert method_styles(reversed(names)) == styles
    assert method_styles(["rise", "gradcam"])["gradcam"] == styles["gradcam"]
    # labels that extend a method keep its family, each distinct; names from the harness resolve short labels
    labels = ["mdm", "mdm, 1 scale (7)", "mdm, 1 scale (28)", "tame, no skip", "tame", "ig", "random", "gradcam++"]
    variants = method_styles(labels, names={"ig": "integrated_gradients"})
    assert len({(s.color, str(s.linestyle), s.marker) for s in variants.values()}) == len(labels)
    assert variants["mdm"] == styles["mdm"] and variants["gradcam++"] == styles["gradcam++"]
    assert variants["mdm, 1 scale (7)"].linestyle == styles["mdm"].linestyle and variants["mdm, 1 scale (7)"].marker
    assert variants["ig"].linestyle == styles["integrated_gradients"].linestyle
    assert base_method("gradcam++, layer3") == "gradcam++" and base_method("gradcamx") == "gradcamx"


def test_the_random_baseline_is_drawn_grey_and_dashed_under_the_methods():
    ev = _evaluation(["gradcam", "random", "scorecam"])
    fig = curves_figure(ev.curves, method_styles(ev.curves))
    for ax in fig.axes:
        line = next(ln for ln in ax.get_lines() if ln.get_label() == "random")
        assert to_hex(line.get_color()) == BASELINE_COLOR and line.get_linestyle() == "--"
        assert all(line.get_zorder() < other.get_zorder() for other in ax.get_lines() if other is not line)


def _rows(table):
    """``{method: {metric: value}}`` -> harness rows (1 image, 0.5 s each unless given as "s")."""
    return [
        {"method": m, "metric": k, "value": v, "n": 1, "seconds": values.get("s", 0.5), "images_per_second": None}
        for m, values in table.items()
        for k, v in values.items()
        if k != "s"
    ]


class _Cells(HTMLParser):
    """The metrics table of a report page: ``{method: [(class, text), ...]}``, headers and the wrapper chain."""

    def __init__(self):
        super().__init__()
        self.stack, self.rows, self.headers, self.row, self.cell, self.wrappers = [], {}, [], None, None, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("class") == "metrics":
            self.wrappers.append([dict(a) for t, a in self.stack if t == "div"])
        self.stack.append((tag, attrs))
        if tag == "tr":
            self.row = []
        elif tag in ("td", "th"):
            self.cell = [attrs.get("class") or "", ""]

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None and self.row is not None:
            self.row.append(tuple(self.cell))
            self.cell = None
        elif tag == "tr" and self.row:
            if self.row[0][1] == "method":
                self.headers = [text for _, text in self.row[1:]]
            elif any(t == "table" and a.get("class") == "metrics" for t, a in self.stack):
                self.rows[self.row[0][1]] = self.row[1:]
            self.row = None
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[1] += data


def _page_table(tmp_path, rows, names=None):
    ev = Evaluation(rows=rows, names=names or {})
    page = write_report(tmp_path / "t.html", [ReportSection("t", ev)]).read_text()
    parser = _Cells()
    parser.feed(page)
    return parser, page


def test_the_best_value_of_each_column_is_marked_by_the_metrics_direction(tmp_path):
    rows = _rows({
        "gradcam": {"AD@100": 20.0, "IC@100": 12.5, "insertion": 0.61, "deletion": 0.30, "shortcut_energy": 80.0,
                    "consistency_cosine": 0.91, "sanity_spearman": 0.20, "s": 0.5},
        "rise": {"AD@100": 10.0, "IC@100": 25.0, "insertion": 0.55, "deletion": 0.31, "shortcut_energy": 10.0,
                 "consistency_cosine": 0.90, "sanity_spearman": 0.60, "s": 4.0},
        "mdm": {"AD@100": 30.0, "IC@100": 25.0, "insertion": 0.50, "deletion": 0.12, "shortcut_energy": 40.0,
                "consistency_cosine": 0.80, "sanity_spearman": 0.10, "s": 90.0},
        "random": {"AD@100": 50.0, "IC@100": 0.0, "insertion": 0.70, "deletion": 0.50, "shortcut_energy": 20.0,
                   "consistency_cosine": 0.99, "sanity_spearman": 1.00, "s": 0.001},
    })  # fmt: skip
    assert [metric_direction(k) for k in ("AD@50", "IC@15", "insertion", "deletion", "pointing", "energy_in_mask")] == [
        -1, 1, 1, -1, 1, 1,
    ]  # fmt: skip
    assert [metric_direction(k) for k in ("iou@0.5", "consistency_pearson", "sanity_ssim", "s / image")] == [
        1,
        1,
        -1,
        -1,
    ]
    assert metric_direction("shortcut_energy") == 0 and metric_direction("something new") == 0
    table = metric_table(rows)
    best = table.best(exclude={"random"})
    marked = {c: [m for i, m in enumerate(table.methods) if best[i][j]] for j, c in enumerate(table.columns)}
    assert marked == {
        "AD@100": ["rise"], "IC@100": ["rise", "mdm"], "insertion": ["gradcam"], "deletion": ["mdm"],
        "shortcut_energy": [], "consistency_cosine": ["gradcam"], "sanity_spearman": ["mdm"], "s / image": ["gradcam"],
    }  # fmt: skip
    # the page shows the same marks; random is never "best", but orange where it beats the best method
    parser, _page = _page_table(tmp_path, rows)
    columns = [h.rstrip(" \xa0\u2191\u2193") for h in parser.headers]
    assert columns == table.columns
    for method, cells in parser.rows.items():
        for column, (cls, _text) in zip(columns, cells, strict=True):
            if method == "random":
                beats = column in ("insertion", "consistency_cosine")  # fastest, but speed is no contest
                assert cls == ("baseline-match" if beats else ""), (method, column)
            else:
                assert (cls == "best") == (method in marked[column]), (method, column)
    assert parser.headers[0].endswith("\u2193") and parser.headers[1].endswith("\u2191")
    assert "\u2191" not in parser.headers[columns.index("shortcut_energy")]
    # a column where every method shows the same value has no mark
    flat = metric_table(_rows({"a": {"IC@15": 0.0}, "b": {"IC@15": 0.0001}}))
    assert flat.best() == [[False, False], [False, False]]


def test_each_column_has_one_precision_in_the_report_and_the_markdown(tmp_path):
    rows = _rows({
        "gradcam": {"IC@100": 0.0, "insertion": 0.61234, "AD@100": 101.26, "s": 0.0123},
        "rise": {"IC@100": 3.125, "insertion": 0.5, "AD@100": 7.0, "s": 2.5},
        "random": {"IC@100": 15.6, "insertion": float("nan"), "AD@100": 3.5, "s": 150.0},
    })  # fmt: skip
    parser, _ = _page_table(tmp_path, rows)

    def decimals(text):
        return len(text.split(".")[1]) if "." in text else 0

    html_columns = list(zip(*([text for _, text in cells] for cells in parser.rows.values()), strict=True))
    assert list(html_columns[0]) == ["0.00", "3.12", "15.60"]  # IC: 2 decimals, not 0.000 / 3.125 / 15.6
    assert html_columns[1] == ("0.612", "0.500", "nan")
    assert html_columns[2] == ("101.3", "7.0", "3.5")
    assert html_columns[3] == ("0.012", "2.500", "150.000")  # s / image: 2 significant digits of the fastest
    lines = Evaluation(rows=rows).markdown().splitlines()
    md_columns = list(zip(*([c.strip() for c in line.strip("|").split("|")][1:] for line in lines[2:]), strict=True))
    assert md_columns == html_columns
    for column in md_columns:
        assert len({decimals(t) for t in column if t != "nan"}) == 1


def test_wide_tables_scroll_sideways_with_the_method_column_fixed(tmp_path):
    methods = [f"method_{i}" for i in range(3)]
    rows = _rows({m: {f"consistency_metric_{k}": 0.1 * k for k in range(20)} for m in methods})
    parser, page = _page_table(tmp_path, rows)
    assert parser.wrappers == [[{"class": "table-scroll"}]]  # the metrics table sits in the scrolling wrapper
    css = re.sub(r"/\*.*?\*/", "", re.search(r"<style>(.*)</style>", page, re.S).group(1), flags=re.S)
    rules: dict[str, str] = {}
    for selectors, body in re.findall(r"([^{}]+)\{([^}]*)\}", css):
        for selector in selectors.split(","):
            rules[selector.strip()] = rules.get(selector.strip(), "") + body  # every rule for the selector
    assert "overflow-x: auto" in rules[".table-scroll"]
    for selector in (".table-scroll th:first-child", ".table-scroll td:first-child"):
        assert "position: sticky" in rules[selector] and "left: 0" in rules[selector]
        assert "background" in rules[selector]  # opaque, so scrolled cells pass under it


def test_report_overlays_show_sparse_maps_clipped(tmp_path):
    sparse = torch.full((1, 16, 16), 0.05)
    sparse[0, 0, :3] = 1.0  # three hot pixels, the rest faint
    ev = Evaluation(
        samples={"image": torch.zeros(1, 3, 16, 16), "target": torch.tensor([0])},
        sample_maps={"gradcam": sparse.clone(), "ig": sparse.clone()},
        names={"ig": "integrated_gradients"},
    )
    page = write_report(tmp_path / "r.html", [ReportSection("s", ev)]).read_text()
    pngs = [src for src in re.findall(r'src="([^"]+)"', page) if "img0-" in src]
    plain, clipped = (np.asarray(Image.open(tmp_path / src).convert("RGB")) for src in sorted(pngs))
    assert (plain == overlay(torch.zeros(3, 16, 16), sparse[0])).all()
    assert (clipped == overlay(torch.zeros(3, 16, 16), sparse[0], percentile=99)).all()
    assert not (plain == clipped).all()
    assert "99th percentile" in page
    assert (ev.sample_maps["ig"] == sparse).all()  # the evaluation's maps are not touched


MALFORMED = r"$\frac{a}$"  # mathtext matplotlib cannot parse: drawn as such, the figure would fail to save


def _saves(fig) -> None:
    import io

    fig.savefig(io.BytesIO(), format="png")


def test_inspection_figures_draw_class_and_layer_names_as_plain_text():
    from xcnn.viz.inspection import association_figure, depth_figure, history_figure, matrix_figure

    layers = [f"stage {MALFORMED}", "$b"]
    _saves(depth_figure(layers, {layers[0]: 0.5, layers[1]: 0.7}, 0.9))
    _saves(matrix_figure(torch.eye(2), f"layer similarity {MALFORMED}", layers, vmin=0))
    _saves(association_figure(torch.rand(2, 3), [0.3, 0.2, 0.1], [MALFORMED, "$x$"]))
    history = {"layers": layers, "records": [
        {"epoch": e, "probe_accuracy": dict.fromkeys(layers, 0.5), "cka_to_previous": dict.fromkeys(layers, 0.9)}
        for e in range(2)
    ]}  # fmt: skip
    _saves(history_figure(history))


def test_report_curves_and_prototype_figures_draw_user_text_as_plain_text():
    from xcnn.viz.prototypes import prototype_figure

    label = f"gradcam {MALFORMED}"
    _saves(curves_figure({label: {"insertion": [0.1, 0.5], "deletion": [0.5, 0.1]}}, method_styles([label])))
    row = {"native": torch.rand(8, 8), "search": None, "source": torch.rand(3, 8, 8), "box": [0, 0, 4, 4],
           "caption": f"prototype 0 ({MALFORMED}): similarity 0.5"}  # fmt: skip
    _saves(prototype_figure(torch.rand(3, 8, 8), [row], title=f"why {MALFORMED}?", search_name=MALFORMED))


def test_legend_entries_starting_with_an_underscore_are_kept():
    """matplotlib's legend() leaves out labels that start with "_"; torch.compile names layers "_orig_mod.x",
    and a method may be named so: every curve keeps its legend entry, spelled as given."""
    from xcnn.viz.inspection import history_figure

    layers = ["_orig_mod.layer3", "layer4"]
    history = {"layers": layers, "records": [
        {"epoch": e, "probe_accuracy": dict.fromkeys(layers, 0.5), "cka_to_previous": dict.fromkeys(layers, 0.9)}
        for e in range(2)
    ]}  # fmt: skip
    right = history_figure(history).axes[1]
    assert [t.get_text() for t in right.get_legend().get_texts()] == layers
    methods = ["_mine", "gradcam"]
    curves = {m: {"insertion": [0.1, 0.5], "deletion": [0.5, 0.1]} for m in methods}
    curves["deletion only"] = {"deletion": [0.4, 0.2]}
    fig = curves_figure(curves, method_styles(list(curves)))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [*methods, "deletion only"]
