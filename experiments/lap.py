"""LAP evidence for docs/results.md: plug-in without loss, LAP's map against post-hoc explainers of the same
model, and the shortcut experiment (knowledge injected by LAP, RRR and Grad-CAM supervision, or not at all).

    python experiments/lap.py --out runs/lap --clean runs/clean --shortcut runs/shortcut

``--clean`` / ``--shortcut``: the reference model and the shortcut-0.9 model (``xcnn train benchmark --out
clean`` and ``--shortcut 0.9 --out shortcut``). Parts (``--parts plugin,clean,shortcut``; ``table`` only
rewrites ``OUT/shortcut.md`` from ``OUT/shortcut.json``):

* ``plugin``: max |logit change| right after ``insert_lap`` on 256 benchmark test images (clean model) and
  on the five bundled photos (EfficientNet-Lite0).
* ``clean``: ``fit_lap`` fine-tunes the clean model with a global LAP layer on the clean training set (no
  knowledge: the area prior only); clean-test accuracy against the original; a TAME head for the LAP
  model; LAP's map, Grad-CAM, Grad-CAM++, Score-CAM, RISE (2000 masks) and TAME of the LAP model on every
  harness metric (consistency and the sanity check on the first 16 images, not for RISE).
* ``shortcut``: from the shortcut model (and from scratch), the same 6000 training images (90 % with the
  patch), knowledge on the same 10 % of them (object boxes, or the patch as forbidden region), the recipe's
  budget (10 epochs, one-cycle AdamW); clean validation accuracy per epoch, clean-test accuracy, accuracy
  with random-colour patches, and the maps' share on the patch and pointing.

Every trained model stays in its folder and is reused (delete one to retrain it). Hyper-parameters are the
defaults of ``fit_lap`` and were fixed before the runs; nothing was chosen on the test images. Writes
``OUT/plugin.md``, ``OUT/clean.md``, ``OUT/shortcut.md`` and their ``.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import xcnn
from xcnn._io import prepare_out_dir, write_json
from xcnn.data.images import SAMPLES, load_images
from xcnn.data.synthetic import CLASSES, Shapes
from xcnn.interpretable import insert_lap
from xcnn.metrics.harness import evaluate
from xcnn.models import Classifier
from xcnn.nets import ShapesNet
from xcnn.pipelines import benchmark_data
from xcnn.training.benchmark import InMemory
from xcnn.training.knowledge import Knowledge
from xcnn.training.lap import fit_lap
from xcnn.training.tame import fit_tame
from xcnn.training.trainer import accuracy_eval

SIZE, N_TRAIN, N_VAL, N_TEST, SHORTCUT = 64, 6000, 500, 1000, 0.9


def plugin(args: argparse.Namespace, out: Path) -> None:
    rows = []
    clean = xcnn.load_model(args.clean)
    images = benchmark_data(256, SIZE)["image"]
    lite = xcnn.load_model("efficientnet_lite0")
    photos = load_images([f"sample:{s}" for s in SAMPLES], lite.input_size)
    for name, model, x in (
        ("benchmark CNN, 256 test images", clean, images),
        ("EfficientNet-Lite0, 5 photos", lite, photos),
    ):
        lap = insert_lap(model)
        with torch.no_grad():
            before, after = model(x), lap(x)
        rows.append({
            "model": name, "replaced": xcnn.interpretable.lap_layers(lap.backbone),
            "max_abs_dlogit": float((before - after).abs().max()), "max_abs_logit": float(before.abs().max()),
            "same_top1": int((before.argmax(1) == after.argmax(1)).sum()), "images": len(x),
        })  # fmt: skip
    write_json(out / "plugin.json", rows)
    lines = ["| model | replaced | max abs logit change | max abs logit | same top-1 |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {', '.join(r['replaced'])} | {r['max_abs_dlogit']:.2e} | {r['max_abs_logit']:.1f} | "
              f"{r['same_top1']}/{r['images']} |" for r in rows]  # fmt: skip
    (out / "plugin.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def test_accuracy(model: Classifier, shortcut: bool = False) -> float:
    data = Shapes(
        "test", N_TEST, size=SIZE, seed=0, shortcut_prob=SHORTCUT if shortcut else 0.0, shortcut_test="random"
    )
    return accuracy_eval(model, DataLoader(data, batch_size=256), torch.device("cpu"))["acc"]


def train_once(folder: Path, **options) -> tuple[Classifier, float | None]:
    """Train into ``folder`` unless a model is already there; (model, seconds or None)."""
    if (folder / "results.json").is_file():
        return xcnn.load_model(folder), None
    start = time.perf_counter()
    # an interrupted run continues from its last epoch's checkpoint (the same weights as an uninterrupted run)
    model, _ = fit_lap(out_dir=folder, progress=False, resume=(folder / "checkpoint.pt").is_file(), **options)
    return model.cpu(), time.perf_counter() - start


def clean_part(args: argparse.Namespace, out: Path) -> None:
    clean = xcnn.load_model(args.clean)
    train = InMemory(Shapes("train", N_TRAIN, size=SIZE, seed=0))
    val = InMemory(Shapes("val", N_VAL, size=SIZE, seed=0))
    lap, seconds = train_once(out / "clean-lap", model=clean, data=train, epochs=args.clean_epochs, val_data=val)
    summary = {"original_test_acc": test_accuracy(clean), "lap_test_acc": test_accuracy(lap),
               "epochs": args.clean_epochs, "train_seconds": seconds}  # fmt: skip
    print(summary, flush=True)
    from xcnn.explain.tame import load_tame_head

    tame_dir = out / "clean-lap-tame"
    if (tame_dir / "tame.json").is_file():
        head = load_tame_head(tame_dir, lap)
    else:
        head, _ = fit_tame(lap, InMemory(Shapes("train", 4000, size=SIZE, seed=0)), out_dir=tame_dir, progress=False)
    data = benchmark_data(args.n, SIZE)
    methods = [
        "lap",
        "gradcam",
        "gradcam++",
        "scorecam",
        ("rise", {"masks": args.rise_masks}),
        ("tame", {"head": head}),
    ]
    # consistency and sanity re-run each explainer several times: not for RISE (thousands of forwards per map)
    slow = ["lap", "gradcam", "gradcam++", "scorecam", "tame"]
    ev = evaluate(lap, data, methods, ["adic", "insertion_deletion", "pointing", "energy", "iou", "consistency", "sanity"],
                  batch_size=32, slow_images=16, slow_methods=slow, progress=True)  # fmt: skip
    ev.save(out, stem="clean-eval")
    write_json(out / "clean.json", summary)
    text = (f"original clean test {summary['original_test_acc']:.1%}, LAP fine-tuned {summary['lap_test_acc']:.1%}\n\n"
            + ev.markdown())  # fmt: skip
    (out / "clean.md").write_text(text + "\n")
    print(text, flush=True)


#: name -> (start, injection, knowledge kind, extra fit_lap options)
VARIANTS = {
    "finetune-lap-boxes": ("shortcut", "lap", "look", {}),
    "finetune-ce": ("shortcut", "none", "look", {}),
    "finetune-gradcam-boxes": ("shortcut", "gradcam", "look", {}),
    "finetune-rrr-boxes": ("shortcut", "rrr", "look", {}),
    "scratch-lap-boxes": ("scratch", "lap", "look", {}),
    "finetune-lap-forbid": ("shortcut", "lap", "forbid", {}),
    "scratch-early-lap-boxes": ("early", "lap", "look", {"where": ["stem_pool", "pool"]}),
    "finetune-gradcam-forbid": ("shortcut", "gradcam", "forbid", {}),
    "finetune-rrr-forbid": ("shortcut", "rrr", "forbid", {}),
    "scratch-lap-forbid": ("scratch", "lap", "forbid", {}),
}


def early_model() -> Classifier:
    """ShapesNet with a stride-1 stem followed by a 2x2 average pool (the same grids), for an early LAP."""
    kwargs = {"num_classes": len(CLASSES), "widths": [16, 32, 64, 128], "strides": [1, 1, 2, 2, 1], "stem_pool": True}
    return Classifier(ShapesNet(**kwargs), name="shapesnet", input_size=(SIZE, SIZE), class_names=CLASSES,
                      spec={"arch": "shapesnet", "kwargs": kwargs})  # fmt: skip


def shortcut_part(args: argparse.Namespace, out: Path) -> None:
    start_model = xcnn.load_model(args.shortcut)
    train = InMemory(Shapes("train", N_TRAIN, size=SIZE, seed=0, shortcut_prob=SHORTCUT))
    val = InMemory(Shapes("val", N_VAL, size=SIZE, seed=0))  # clean: the curve of what the fix is for
    knowledge = {
        "look": Knowledge.from_samples(train, args.fraction, look="box", seed=0),
        "forbid": Knowledge.from_samples(train, args.fraction, look=None, forbid="shortcut_mask", seed=0),
    }
    maps_data = benchmark_data(128, SIZE, shortcut_prob=SHORTCUT)
    results = {}
    only = set(args.variants.split(",")) if args.variants else set(VARIANTS)
    for name, (start, injection, kind, extra) in VARIANTS.items():
        if name not in only:
            continue
        model = start_model if start == "shortcut" else early_model() if start == "early" else start_model
        model, seconds = train_once(
            out / "shortcut" / name, model=model, data=train, epochs=args.epochs, knowledge=knowledge[kind],
            injection=injection, scratch=start != "shortcut", lr=args.lr if start == "shortcut" else args.scratch_lr,
            val_data=val, **extra,
        )  # fmt: skip
        history = json.loads((out / "shortcut" / name / "history.json").read_text())
        methods = ["gradcam"] + (["lap"] if injection == "lap" else [])
        ev = evaluate(model, maps_data, methods, ["pointing", "shortcut"], batch_size=64, progress=False)
        maps = {r["method"] + ": " + r["metric"]: r["value"] for r in ev.rows}
        results[name] = {
            "clean_test_acc": test_accuracy(model), "random_patch_test_acc": test_accuracy(model, shortcut=True),
            "val_acc_per_epoch": [h.get("val/acc") for h in history], "seconds": seconds, "maps": maps,
            "knowledge_images": len(knowledge[kind].indices),
        }  # fmt: skip
        print(name, json.dumps(results[name]), flush=True)
        write_json(out / "shortcut.json", results)
    start_acc = {
        "clean_test_acc": test_accuracy(start_model),
        "random_patch_test_acc": test_accuracy(start_model, True),
    }
    write_json(out / "shortcut.json", {"start": start_acc, **results})


class _CornerMask(torch.nn.Module):
    """Multiplies a map by 0 at the top-left cell (where the 6x6 patch lies at 64x64 in an 8x8 grid)."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(a)
        mask[..., 0, 0] = 0
        return a * mask


class _AvgWithoutCorner(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.sum((2, 3), keepdim=True) - x[..., :1, :1]) / (x.shape[2] * x.shape[3] - 1)


def without_patch_cell(model: Classifier) -> dict[str, float]:
    """Accuracies when the global pool gets no input from the grid cell that holds the patch (LAP: its
    attention there is set to 0; average pooling: that cell is left out). If the random-colour-patch
    accuracy stays low, the patch's colour reaches the decision through the other cells' features (their
    receptive fields cover the corner), not through the patch's own position."""
    from xcnn.hooks import named_layer, replaced

    lap = "pool" in xcnn.interpretable.lap_layers(model.backbone)
    swap = (
        {"pool.attention": torch.nn.Sequential(named_layer(model.backbone, "pool.attention"), _CornerMask())}
        if lap
        else {"pool": _AvgWithoutCorner()}
    )
    with replaced(model.backbone, swap):
        return {"clean_test_acc": test_accuracy(model), "random_patch_test_acc": test_accuracy(model, shortcut=True)}


def shortcut_table(out: Path, start_model: str) -> str:
    """``OUT/shortcut.md`` from ``OUT/shortcut.json``: one row per run, and the clean-validation curves."""
    results = json.loads((out / "shortcut.json").read_text())
    start = results.pop("start", None)
    head = ("| run | start | injection | knowledge | clean test | random-colour patch | Grad-CAM on patch (%) | "
            "Grad-CAM pointing | LAP map on patch (%) | LAP pointing |")  # fmt: skip
    lines = [head, "|---" * 10 + "|"]
    if start:
        lines.append(f"| shortcut model (no fine-tuning) | | | | {start['clean_test_acc']:.1%} | "
                     f"{start['random_patch_test_acc']:.1%} | | | | |")  # fmt: skip
    for name, r in results.items():
        begin, injection, kind, _ = VARIANTS[name]
        m = r["maps"]

        def cell(key: str, scale: float = 1.0, fmt: str = ".2f", m=m) -> str:
            return f"{m[key] * scale:{fmt}}" if key in m else ""

        what = {"look": "object boxes", "forbid": "patch forbidden"}[kind]
        what = f"{what}, {r['knowledge_images']} images" if injection != "none" else "none"
        lines.append(
            f"| {name} | {begin} | {injection} | {what} | {r['clean_test_acc']:.1%} | "
            f"{r['random_patch_test_acc']:.1%} | {cell('gradcam: shortcut_energy')} | {cell('gradcam: pointing', fmt='.3f')} | "
            f"{cell('lap: shortcut_energy')} | {cell('lap: pointing', fmt='.3f')} |"
        )  # fmt: skip
    lines += ["", "With the patch's grid cell taken out of the global pool (see without_patch_cell):", "",
              "| run | clean test | random-colour patch |", "|---|---|---|"]  # fmt: skip
    for name in ["shortcut model (no fine-tuning)", *results]:
        folder = out / "shortcut" / name if name in results else Path(start_model)
        acc = without_patch_cell(xcnn.load_model(folder))
        lines.append(f"| {name} | {acc['clean_test_acc']:.1%} | {acc['random_patch_test_acc']:.1%} |")
    lines += ["", "Clean validation accuracy after each epoch:", "", "| run | " + " | ".join(
        str(i + 1) for i in range(max(len(r["val_acc_per_epoch"]) for r in results.values()))) + " |"]  # fmt: skip
    lines.append("|---" * (1 + max(len(r["val_acc_per_epoch"]) for r in results.values())) + "|")
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in r["val_acc_per_epoch"]) + " |")
    text = "\n".join(lines) + "\n"
    (out / "shortcut.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/lap")
    parser.add_argument("--clean", default="runs/clean")
    parser.add_argument("--shortcut", default="runs/shortcut")
    parser.add_argument("--parts", default="plugin,clean,shortcut")
    parser.add_argument("--variants", default="", help="comma-separated subset of the shortcut variants")
    parser.add_argument("--n", type=int, default=64, help="test images for the clean harness table")
    parser.add_argument("--clean-epochs", type=int, default=3)
    parser.add_argument("--rise-masks", type=int, default=2000, help="RISE masks in the clean table")
    parser.add_argument("--epochs", type=int, default=10, help="shortcut runs (the recipe's budget)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate when fine-tuning")
    parser.add_argument("--scratch-lr", type=float, default=2e-3, help="peak learning rate from scratch (the recipe's)")
    parser.add_argument("--fraction", type=float, default=0.1, help="share of training images with knowledge")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = prepare_out_dir(args.out)
    parts = args.parts.split(",")
    if "plugin" in parts:
        plugin(args, out)
    if "clean" in parts:
        clean_part(args, out)
    if "shortcut" in parts:
        shortcut_part(args, out)
    if "shortcut" in parts or "table" in parts:
        print(shortcut_table(out, args.shortcut))


if __name__ == "__main__":
    main()
