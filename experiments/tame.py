"""TAME evidence for docs/results.md: TAME against the CAM family and RISE on the benchmark model, the
ablations (no skip connection; one tapped layer, L-CAM-like), and a head trained on the bundled
EfficientNet-Lite0 from the bundled photos and their augmentations.

    python experiments/tame.py --out runs/tame            # ~25 min on 2 CPU cores

Reuses ``--model`` (default ``OUT/benchmark``, trained with the reference recipe when missing) and any
head already trained in ``OUT`` (delete a folder to retrain it). Writes ``OUT/benchmark.md``,
``OUT/photos.md``, ``OUT/*.json`` and ``OUT/report.html``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

import xcnn
from xcnn._io import prepare_out_dir
from xcnn.data.images import load_image
from xcnn.data.synthetic import Shapes
from xcnn.explain.tame import load_tame_head
from xcnn.metrics.harness import evaluate
from xcnn.pipelines import benchmark_data, captions, model_summary
from xcnn.training.benchmark import InMemory, fit_benchmark
from xcnn.training.tame import fit_tame, folder_data
from xcnn.viz.report import ReportSection, write_report

PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "camera"]


def head(model, folder: Path, data, **options):
    """Train a head into ``folder`` unless one is already there; returns (head, seconds or None)."""
    if (folder / "tame.json").is_file():
        return load_tame_head(folder, model), None
    start = time.perf_counter()
    trained, _ = fit_tame(model, data, out_dir=folder, **options)
    return trained, time.perf_counter() - start


def augmented_photos(folder: Path, copies: int) -> Path:
    """The bundled photos, each with ``copies`` random crops / flips / brightness changes, as a folder."""
    gen = torch.Generator().manual_seed(0)
    root = prepare_out_dir(folder / "photos")
    for name in PHOTOS:
        base = load_image(f"sample:{name}", 320)
        for k in range(copies):
            s = int(torch.randint(224, 321, (), generator=gen))
            top, left = (int(torch.randint(0, 321 - s, (), generator=gen)) for _ in range(2))
            img = base[:, top : top + s, left : left + s]
            if torch.rand((), generator=gen) < 0.5:
                img = img.flip(-1)
            img = (img * (0.8 + 0.4 * torch.rand((), generator=gen))).clamp(0, 1)
            Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()).save(root / f"{name}-{k}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/tame")
    parser.add_argument(
        "--model", default=None, help="benchmark model folder (default: OUT/benchmark, trained if missing)"
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-test", type=int, default=256)
    args = parser.parse_args()
    out = prepare_out_dir(args.out)
    model_dir = Path(args.model) if args.model else out / "benchmark"
    if not (model_dir / "model.json").is_file():
        fit_benchmark(model_dir, progress=False)
    model = xcnn.load_model(model_dir)
    size = model.input_size[0]
    train = InMemory(Shapes("train", args.n_train, size=size, seed=1))  # other images than the CNN's own training set
    val = InMemory(Shapes("val", 500, size=size, seed=1))
    common = {"epochs": args.epochs, "val_data": val, "progress": False}
    heads, seconds = {}, {}
    for label, folder, options in [
        ("tame", "head", {}),
        ("tame, no skip", "head-noskip", {"skip": False}),
        ("tame, layer4 only (L-CAM-like)", "head-layer4", {"layers": ["layer4"]}),
    ]:
        heads[label], seconds[label] = head(model, out / folder, train, **common, **options)
        print(f"{label}: trained in {seconds[label]:.0f} s" if seconds[label] else f"{label}: reused", flush=True)

    data = benchmark_data(args.n_test, size)
    methods = ["gradcam", "gradcam++", "scorecam", ("rise", {"masks": 2000})]
    methods += [("tame", {"head": h}, label) for label, h in heads.items()] + ["random"]
    bench = evaluate(
        model, data, methods, ["adic", "insertion_deletion", "pointing", "energy"], batch_size=64, progress=False
    )
    bench.save(out, stem="benchmark")
    print(bench.markdown(), flush=True)

    lite = xcnn.load_model()
    photos_dir = augmented_photos(out, copies=12)
    lite_head, lite_seconds = head(
        lite,
        out / "head-lite0",
        folder_data(photos_dir, lite.input_size),
        epochs=6,
        batch_size=12,
        lr=1e-3,
        progress=False,
    )
    images = torch.stack([load_image(f"sample:{p}", lite.input_size) for p in PHOTOS])
    photo_ev = evaluate(
        lite, {"image": images, "label": torch.full((len(PHOTOS),), -1)}, ["gradcam", "gradcam++", ("tame", {"head": lite_head}), "random"],
        ["adic", "insertion_deletion"], batch_size=len(PHOTOS), keep_samples=len(PHOTOS), progress=False,
    )  # fmt: skip
    photo_ev.save(out, stem="photos")
    print(photo_ev.markdown(), flush=True)

    (out / "timings.json").write_text(
        json.dumps({"head_training_seconds": {**seconds, "lite0": lite_seconds}}, indent=2) + "\n"
    )
    write_report(
        out / "report.html",
        [
            ReportSection(
                f"TAME on the benchmark CNN ({args.n_test} test images)",
                bench,
                model_summary(model),
                captions(model, bench),
            ),
            ReportSection(
                "TAME on EfficientNet-Lite0, head trained on 5 photos x 12 augmentations",
                photo_ev,
                model_summary(lite),
                captions(lite, photo_ev, PHOTOS),
            ),
        ],
        title="xcnn: TAME evidence",
    )


if __name__ == "__main__":
    main()
