"""MDM evidence for docs/results.md: MDM against Grad-CAM, Score-CAM, RISE and extremal perturbation on
the benchmark CNN (with the sanity check and seconds per image), the scale ablation (1 vs 4 scales), the
bundled EfficientNet-Lite0 on the bundled photos, and a small ViT trained on the benchmark.

    python experiments/mdm.py --out runs/mdm --model clean

On 2 CPU cores: the benchmark section ~40 min; the photos section ~28 min (per photo: extremal
perturbation ~2.5 min, RISE ~2, MDM ~1, Score-CAM 20 s); the ViT section ~13 min given a trained ViT, its
20-epoch training ~2 h (observed with another run sharing the cores). Run it with nothing else on the
cores: a second PyTorch process inflated the CAMs' times up to 17x.

``--model`` defaults to ``OUT/benchmark`` and ``--vit`` to ``OUT/vit`` (each trained when missing: the CNN
with the reference recipe, the ViT with ``xcnn train benchmark --arch vit --epochs 20 --lr 1e-3``). Writes
``OUT/benchmark.md``, ``OUT/photos.md`` and ``OUT/photos-per-image.md``, ``OUT/vit.md``, ``OUT/*.json`` and
``OUT/report.html``. The photos section keeps each finished method in ``OUT/photos-parts/`` and resumes
from there when run again; a part is reused as it is, so delete it after changing that method's code or
options.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import xcnn
from xcnn._io import atomic_write, prepare_out_dir
from xcnn.data.images import load_image
from xcnn.metrics.faithfulness import insertion_deletion
from xcnn.metrics.harness import Evaluation, _spec, evaluate
from xcnn.pipelines import benchmark_data, captions, model_summary
from xcnn.training.benchmark import fit_benchmark
from xcnn.viz.report import ReportSection, write_report

PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "camera"]
QUIET = {"progress": False}


def trained(folder: Path, device: torch.device, **options) -> xcnn.Classifier:
    """The benchmark model saved in ``folder`` (trained there first when missing), on ``device``."""
    if not (folder / "model.json").is_file():
        fit_benchmark(folder, progress=False, device=device, **options)
    if (folder / "results.json").is_file():  # its accuracy, for the tables' captions
        results = json.loads((folder / "results.json").read_text())
        print(f"{folder}: {results['architecture']}, test accuracy {results['test_acc']:.1%}", flush=True)
    return xcnn.load_model(folder, device=device)


def resumable(parts: Path, model, data, methods, metrics, **options) -> Evaluation:
    """:func:`evaluate` one method at a time, each method's rows, curves and sample maps saved in ``parts``
    as soon as it finishes; a method already saved there is read back, not re-run. A run cut short (the
    photos section takes about half an hour on 2 CPU cores) resumes where it stopped."""
    parts = prepare_out_dir(parts)
    merged = Evaluation()
    for method in methods:
        label = _spec(method)[0]
        key = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
        table, tensors = parts / f"{key}.json", parts / f"{key}.safetensors"
        if table.is_file() and tensors.is_file():
            saved, arrays = json.loads(table.read_text()), load_file(tensors)
            part = Evaluation(rows=saved["rows"], curves=saved["curves"])
            part.samples = {k.removeprefix("sample/"): v for k, v in arrays.items() if k.startswith("sample/")}
            part.sample_maps = {label: arrays["maps"]} if "maps" in arrays else {}
            print(f"{label}: read back from {parts}", flush=True)
        else:
            part = evaluate(model, data, [method], metrics, **options)
            arrays = {f"sample/{k}": v.contiguous() for k, v in part.samples.items()}
            if label in part.sample_maps:
                arrays["maps"] = part.sample_maps[label].contiguous()
            atomic_write(tensors, lambda tmp, arrays=arrays: save_file(arrays, str(tmp)))
            part.save(parts, stem=key)  # after the maps: its .json marks the method as done
        merged.rows += part.rows
        merged.curves.update(part.curves)
        merged.samples = merged.samples or part.samples
        merged.sample_maps.update(part.sample_maps)
    return merged


def per_photo(model, ev: Evaluation, names: list[str]) -> str:
    """Insertion and deletion AUC per photo for every method's saved maps: with 5 photos a mean can rest
    on one of them, so the table shows which photos carry it. Recomputed from the maps (same protocol and
    targets as the harness, so each row's mean equals the main table's). The first row is the model's own
    probability for each photo's target."""
    device = next(model.parameters()).device
    images, targets = ev.samples["image"].to(device), ev.samples["target"].to(device)
    with torch.no_grad():
        probs = model(images).softmax(1).gather(1, targets[:, None])[:, 0]
    head = "| method | " + " | ".join(f"{n} ins / del" for n in names) + " |"
    lines = [head, "|---" * (len(names) + 1) + "|"]
    lines.append(
        "| (target, its probability) | "
        + " | ".join(f"{int(c)}, {q:.3f}" for c, q in zip(targets, probs.tolist(), strict=True))
        + " |"
    )
    for label, maps in ev.sample_maps.items():
        r = insertion_deletion(model, images, maps.to(device), targets, per_image=True)
        cells = [f"{i:.3f} / {d:.3f}" for i, d in zip(r["insertion"].tolist(), r["deletion"].tolist(), strict=True)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/mdm")
    parser.add_argument(
        "--model", default=None, help="benchmark CNN folder (default: OUT/benchmark, trained if missing)"
    )
    parser.add_argument("--vit", default=None, help="benchmark ViT folder (default: OUT/vit, trained if missing)")
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--sanity-images", type=int, default=8)
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: benchmark,photos,vit")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where models train and explain")
    args = parser.parse_args()
    device = torch.device(args.device)
    out = prepare_out_dir(args.out)
    skip = set(filter(None, args.skip.split(",")))
    sections = []

    if "benchmark" not in skip:
        model = trained(Path(args.model) if args.model else out / "benchmark", device)
        size = model.input_size[0]
        methods = [
            "gradcam", "scorecam", "rise", ("extremal", QUIET), ("mdm", QUIET),
            ("mdm", {"scales": (7,), **QUIET}, "mdm, 1 scale (7)"), ("mdm", {"scales": (28,), **QUIET}, "mdm, 1 scale (28)"),
            ("mdm", {"coarse_to_fine": False, **QUIET}, "mdm, no coarse-to-fine"), "random",
        ]  # fmt: skip
        bench = evaluate(
            model, benchmark_data(args.n_test, size), methods, ["adic", "insertion_deletion", "pointing", "energy", "sanity"],
            batch_size=args.n_test, slow_images=args.sanity_images, progress=False,
        )  # fmt: skip
        bench.save(out, stem="benchmark")
        print(bench.markdown(), flush=True)
        sections.append(
            ReportSection(
                f"MDM on the benchmark CNN ({args.n_test} test images)",
                bench,
                model_summary(model),
                captions(model, bench),
            )
        )

    if "photos" not in skip:
        lite = xcnn.load_model(device=device)
        images = torch.stack([load_image(f"sample:{p}", lite.input_size) for p in PHOTOS])
        photos = resumable(
            out / "photos-parts", lite, {"image": images, "label": torch.full((len(PHOTOS),), -1)},
            ["gradcam", "scorecam", "rise", ("extremal", QUIET), ("mdm", QUIET), "random"],
            ["adic", "insertion_deletion"], batch_size=len(PHOTOS), keep_samples=len(PHOTOS), progress=False,
        )  # fmt: skip
        photos.save(out, stem="photos")
        print(photos.markdown(), flush=True)
        table = per_photo(lite, photos, PHOTOS)
        atomic_write(out / "photos-per-image.md", lambda tmp: tmp.write_text(table))
        print(table, flush=True)
        sections.append(
            ReportSection(
                "MDM on EfficientNet-Lite0 (bundled ImageNet weights), bundled photos",
                photos,
                model_summary(lite),
                captions(lite, photos, PHOTOS),
            )
        )

    if "vit" not in skip:
        vit = trained(Path(args.vit) if args.vit else out / "vit", device, arch="vit", lr=1e-3, epochs=20)
        vit_ev = evaluate(
            vit, benchmark_data(args.n_test, vit.input_size[0]), ["gradcam", "gradcam++", "scorecam", "rise", ("mdm", QUIET), "random"],
            ["adic", "insertion_deletion", "pointing", "energy"], batch_size=args.n_test, progress=False,
        )  # fmt: skip
        vit_ev.save(out, stem="vit")
        print(vit_ev.markdown(), flush=True)
        sections.append(
            ReportSection(
                f"MDM and the CAM family on a ViT trained on the benchmark ({args.n_test} test images)",
                vit_ev,
                model_summary(vit),
                captions(vit, vit_ev),
            )
        )

    write_report(out / "report.html", sections, title="xcnn: MDM evidence")


if __name__ == "__main__":
    main()
