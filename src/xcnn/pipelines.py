"""End-to-end flows behind the CLI: evaluate a model on a dataset into a folder (tables + report), and
the demo that does everything offline on the bundled model, the bundled photos and the benchmark."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ._io import atomic_write, prepare_out_dir, write_json
from .data.images import ImageFolder, load_image
from .data.synthetic import Shapes
from .metrics.harness import Evaluation, evaluate
from .models import Classifier, default_layer
from .viz.report import ReportSection, write_report

__all__ = [
    "DEMO_BENCHMARK_METHODS",
    "DEMO_PHOTO_METHODS",
    "benchmark_data",
    "captions",
    "run_demo",
    "run_evaluation",
    "run_inspection",
]


def benchmark_data(n: int, size: int, seed: int = 0, shortcut_prob: float = 0.0) -> dict[str, torch.Tensor]:
    """``n`` test images of the shapes benchmark as stacked tensors (with masks and shortcut masks)."""
    from .training.benchmark import InMemory

    return InMemory(
        Shapes("test", n, size=size, seed=seed, shortcut_prob=shortcut_prob, shortcut_test="random")
    ).tensors


def captions(model: Classifier, ev: Evaluation, names: Sequence[str] | None = None) -> list[str]:
    """``name: label -> explained class`` for the report's sample rows."""
    out = []
    for i, target in enumerate(ev.samples.get("target", [])):
        parts = [names[i]] if names is not None and i < len(names) else []
        if "label" in ev.samples and ev.samples["label"][i] >= 0:
            parts.append(f"true: {model.class_name(int(ev.samples['label'][i]))}")
        parts.append(f"explained: {model.class_name(int(target))}")
        out.append(", ".join(parts))
    return out


def run_evaluation(
    model: Classifier,
    data: str | Path,
    out: str | Path,
    methods: Sequence[str | tuple[str, dict]],
    metrics: Sequence[str],
    *,
    n: int | None = None,
    shortcut_prob: float = 0.0,
    targets: str = "predicted",
    batch_size: int = 32,
    slow_images: int = 16,
    report: bool = True,
    progress: bool | None = None,
) -> Evaluation:
    """Evaluate ``model`` on ``data`` (``"synthetic"`` or an image folder) and write ``metrics.csv/json/md``
    (and ``report.html``) into ``out``."""
    if str(data) == "synthetic":
        size = model.input_size[0]
        dataset = benchmark_data(n or 64, size, shortcut_prob=shortcut_prob)
        names, title = None, f"shapes benchmark ({n or 64} test images, {size}x{size})"
    else:
        folder = ImageFolder(data, model.input_size)
        count = min(n or len(folder), len(folder))
        dataset = torch.utils.data.Subset(folder, range(count))
        names = [Path(folder.name(i)).name for i in range(count)]
        title = f"{data} ({count} images)"
    out = prepare_out_dir(out)  # after the data opened: a bad ground-truth file leaves no empty folder
    ev = evaluate(
        model,
        dataset,
        methods,
        metrics,
        targets=targets,
        batch_size=batch_size,
        slow_images=slow_images,
        progress=progress,
    )
    ev.save(out)
    if report:
        section = ReportSection(
            title=f"{model.name} on {title}",
            evaluation=ev,
            summary=model_summary(model),
            captions=captions(model, ev, names),
        )
        write_report(out / "report.html", [section], title=f"xcnn evaluation: {model.name}")
    return ev


def run_inspection(
    model: Classifier,
    data: str | Path,
    out: str | Path,
    *,
    n: int = 512,
    layers: Sequence[str] | None = None,
    importance_layer: str | None = None,
    history: str | Path | None = None,
    samples: int = 4,
    seed: int = 0,
    report: bool = True,
    progress: bool | None = None,
) -> dict:
    """Layer-wise inspection of ``model`` on ``data`` (``"synthetic"``: ``n`` held-out benchmark images;
    or a folder of class folders: ``n`` of its images drawn at random, seeded) into ``out``:
    ``inspection.json`` (every number), ``probe_accuracy.csv``, ``filter_importance.csv``,
    ``layer_similarity.csv``, ``feature_correlation.csv`` (the importance layer's matrix), with ``history``
    (a monitored training run's folder) ``monitor_history.csv``, and ``report.html``. Returns the JSON."""
    from .inspection import inspect_model, load_history
    from .viz.inspection import write_inspection_report

    monitor = load_history(history) if history is not None else None  # a bad --history fails before the work
    if str(data) == "synthetic":
        size = model.input_size[0]
        dataset, class_names = benchmark_data(n, size, seed=seed), None
        title = f"shapes benchmark ({n} held-out images, {size}x{size})"
    else:
        folder = ImageFolder(data, model.input_size)
        order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed))[:n].tolist()
        dataset, class_names = torch.utils.data.Subset(folder, order), folder.classes
        title = f"{data} ({len(order)} of {len(folder)} images, {len(folder.classes)} classes)"
    out = prepare_out_dir(out)  # after the data opened: a bad ground-truth file leaves no empty folder
    ins = inspect_model(
        model, dataset, layers=layers, importance_layer=importance_layer, images=n, class_names=class_names,
        samples=samples, seed=seed, progress=progress,
    )  # fmt: skip
    result = {"data": title, **ins.to_json(), "history": monitor}
    write_json(out / "inspection.json", result)
    _write_csv(out / "probe_accuracy.csv", ["layer", "probe_accuracy"], [[k, v] for k, v in ins.probe_accuracy.items()])
    _write_csv(
        out / "filter_importance.csv",
        ["layer", "channel", "taylor", "ablation"],
        [[ins.importance_layer, k, t, ins.ablation.get(k, "")] for k, t in enumerate(ins.taylor)],
    )
    _write_csv(
        out / "layer_similarity.csv",
        ["layer", *ins.layers],
        [[name, *row] for name, row in zip(ins.layers, ins.similarity.tolist(), strict=True)],
    )
    channels = range(ins.correlation_matrix.shape[0])
    _write_csv(
        out / "feature_correlation.csv",
        ["channel", *channels],
        [[k, *row] for k, row in zip(channels, ins.correlation_matrix.tolist(), strict=True)],
    )
    if monitor is not None:
        rows = [
            [r["epoch"], name, r["probe_accuracy"].get(name), r.get("cka_to_previous", {}).get(name)]
            for r in monitor["records"]
            for name in monitor["layers"]
        ]
        _write_csv(out / "monitor_history.csv", ["epoch", "layer", "probe_accuracy", "cka_to_previous"], rows)
    if report:
        summary = {**model_summary(model), "data": title, "layers": ", ".join(ins.layers)}
        summary.pop("explained layer (CAM family)", None)
        write_inspection_report(
            out / "report.html", ins, history=monitor, summary=summary, title=f"xcnn inspection: {model.name}"
        )
    return result


def _write_csv(path: Path, header: Sequence[object], rows: Sequence[Sequence[object]]) -> Path:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    return atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue()))


def model_summary(model: Classifier) -> dict[str, object]:
    params = sum(p.numel() for p in model.parameters())
    try:
        layer = default_layer(model)
    except ValueError:
        layer = "(none)"
    return {
        "model": model.name, "weights": model.weights_label, "parameters": f"{params:,}",
        "input size": "x".join(map(str, model.input_size)),
        "classes": model.num_classes, "explained layer (CAM family)": layer,
    }  # fmt: skip


#: what the demo runs (chosen to fit its five-minute budget on two CPU cores)
DEMO_PHOTO_METHODS = ["gradcam", "gradcam++", "layercam", ("integrated_gradients", {"steps": 16}), "random"]
DEMO_BENCHMARK_METHODS = [
    "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "scorecam", "saliency",
    ("integrated_gradients", {"steps": 16}), ("smoothgrad", {"samples": 8}), ("occlusion", {"patch": 8, "stride": 4}),
    ("rise", {"masks": 500}), "random",
]  # fmt: skip
#: the perturbation methods re-run hundreds of forward passes per map: the demo skips their slow metrics
DEMO_SLOW_METHODS = [
    m if isinstance(m, str) else m[0]
    for m in DEMO_BENCHMARK_METHODS
    if (m if isinstance(m, str) else m[0]) not in ("rise", "occlusion")
]


def run_demo(
    out: str | Path, *, progress: bool | None = None, benchmark_images: int = 32, epochs: int = 8, n_train: int = 4000
) -> dict:
    """Everything, offline: the bundled ImageNet model on the bundled photos (AD/IC, insertion/deletion),
    the benchmark CNN trained from scratch, every explainer on the benchmark with every metric, and one
    HTML report. Returns a summary (also written to ``out/demo.json``)."""
    from .models import load_model
    from .training.benchmark import fit_benchmark

    out = prepare_out_dir(out)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    print("1/3 explaining the bundled photos with the bundled EfficientNet-Lite0 ...", flush=True)
    lite = load_model()
    photos = ["chelsea", "coffee"]
    images = torch.stack([load_image(f"sample:{p}", lite.input_size) for p in photos])
    photo_ev = evaluate(lite, {"image": images, "label": torch.full((len(photos),), -1)}, DEMO_PHOTO_METHODS,
                        ["adic", "insertion_deletion"], batch_size=len(photos), keep_samples=len(photos), progress=progress)  # fmt: skip
    photo_ev.save(out, stem="photos")
    timings["photos"] = time.perf_counter() - start
    print(f"    {timings['photos']:.0f} s", flush=True)

    print("2/3 training the benchmark CNN ...", flush=True)
    t = time.perf_counter()
    bench_model, results = fit_benchmark(out / "benchmark-model", n_train=n_train, epochs=epochs, progress=progress)
    timings["training"] = time.perf_counter() - t
    print(f"    clean test accuracy {results['test_acc']:.1%}, {timings['training']:.0f} s", flush=True)

    print("3/3 evaluating every explainer on the benchmark ...", flush=True)
    t = time.perf_counter()
    data = benchmark_data(benchmark_images, bench_model.input_size[0])
    bench_ev = evaluate(bench_model.cpu(), data, DEMO_BENCHMARK_METHODS,
                        ["adic", "insertion_deletion", "pointing", "energy", "iou", "consistency", "sanity"],
                        batch_size=benchmark_images, slow_images=8, slow_methods=DEMO_SLOW_METHODS, progress=progress)  # fmt: skip
    bench_ev.save(out, stem="benchmark")
    timings["benchmark evaluation"] = time.perf_counter() - t
    print(f"    {timings['benchmark evaluation']:.0f} s", flush=True)

    sections = [
        ReportSection("EfficientNet-Lite0 (ImageNet) on the bundled photos", photo_ev, model_summary(lite), captions(lite, photo_ev, photos),
                      note="No ground truth for photos: faithfulness metrics only."),
        ReportSection(f"Benchmark CNN on {benchmark_images} shapes test images", bench_ev, {**model_summary(bench_model), "clean test accuracy": f"{results['test_acc']:.1%}"},
                      captions(bench_model, bench_ev), note="Consistency and sanity on the first 8 images (not for RISE and occlusion in the demo: too slow for its time budget)."),
    ]  # fmt: skip
    report = write_report(
        out / "report.html", sections, title="xcnn demo", intro="Everything here was computed offline on this machine."
    )
    timings["total"] = time.perf_counter() - start
    # TAME's head needs a few minutes of training on top of the demo's budget: say how to run it
    model_dir = out / "benchmark-model"
    tame = (f"xcnn train tame --model {model_dir} --out {out / 'tame'} && xcnn evaluate --model {model_dir} "
            f"--methods gradcam,gradcam++,scorecam,rise,tame --tame-head {out / 'tame'} --out {out / 'tame-eval'}")  # fmt: skip
    print(f"TAME (a trained explainer) is not in the demo's five minutes; to add it:\n    {tame}", flush=True)
    summary = {
        "report": str(report), "benchmark": results, "seconds": {k: round(v, 1) for k, v in timings.items()},
        "next": {"tame": tame},
    }  # fmt: skip
    write_json(out / "demo.json", summary)
    return summary
