"""CGC evidence for docs/results.md: cross-entropy vs CGC vs CGC-L2 fine-tuning (several seeds), the
few-labels setting, and the shortcut benchmark.

    python experiments/cgc.py --out runs/cgc --clean runs/clean --shortcut runs/shortcut

``--clean`` / ``--shortcut``: the reference model and the shortcut-0.9 model (``xcnn train benchmark --out
clean`` and ``--shortcut 0.9 --out shortcut``). Parts (``--parts headline,shortcut,fewlabels``;
``fewtable`` only rewrites ``OUT/fewlabels.md`` from ``OUT/fewlabels.json``):

* ``headline``: from the clean model, the same training images and budget (``--epochs`` over
  ``--n-train`` images, one-cycle AdamW, batch 64), for each seed: (a) cross-entropy on the two views CGC
  sees (``lam=0``), (b) CGC (InfoNCE, lam 0.5, tau 0.5), (c) CGC with the L2 consistency. Each model: clean
  test accuracy (1000 images) and Grad-CAM's harness metrics on ``--n`` benchmark test images (consistency,
  energy in the object mask, pointing, insertion/deletion, AD/IC; the sanity check on the first 16).
* ``fewlabels``: from scratch (the clean model's architecture, re-initialised per seed; ``--few-n``
  training images, a seeded 5 % labelled): (a) cross-entropy on the labelled 5 %, (b) CGC (lam 0.25, the
  paper's semi-supervised weight) on the labelled 5 % only, (c) CGC on the labelled 5 % + the other 95 %
  as unlabelled images, each labelled image repeated so that half of every batch is labelled. All three
  get the same number of optimiser steps (``--few-epochs`` epochs of (c)). Clean test accuracy (1000
  images) per seed.
* ``shortcut``: from the shortcut model, the shortcut training data (90 % with the patch), cross-entropy vs
  CGC fine-tuning: clean-test accuracy, accuracy with random-colour patches, Grad-CAM's share on the patch.

Every trained model stays in its folder and is reused (delete one to retrain it); an interrupted run
resumes from its checkpoint. The hyper-parameters are fit_cgc's defaults (the paper's lam and tau) and were
fixed before the runs; nothing was chosen on the test images. Writes ``OUT/<part>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import xcnn
from xcnn._io import prepare_out_dir, write_json
from xcnn.data.synthetic import Shapes
from xcnn.metrics.harness import evaluate
from xcnn.models import Classifier
from xcnn.pipelines import benchmark_data
from xcnn.training.benchmark import InMemory
from xcnn.training.cgc import fit_cgc
from xcnn.training.trainer import accuracy_eval

N_TEST, SHORTCUT = 1000, 0.9
METRICS = ["consistency", "energy", "pointing", "insertion_deletion", "adic", "sanity"]
#: variant -> fit_cgc options
HEADLINE = {"ce": {"lam": 0.0}, "cgc": {"lam": 0.5}, "cgc-l2": {"lam": 0.5, "consistency": "l2"}}


def test_accuracy(model: Classifier, size: int, shortcut: bool = False) -> float:
    data = Shapes(
        "test", N_TEST, size=size, seed=0, shortcut_prob=SHORTCUT if shortcut else 0.0, shortcut_test="random"
    )
    return accuracy_eval(model, DataLoader(data, batch_size=256), torch.device("cpu"))["acc"]


def train_once(folder: Path, **options) -> tuple[Classifier, float | None]:
    """Train into ``folder`` unless a model is already there; (model, seconds or None)."""
    if (folder / "results.json").is_file():
        return xcnn.load_model(folder), None
    start = time.perf_counter()
    model, _ = fit_cgc(out_dir=folder, progress=False, resume=(folder / "checkpoint.pt").is_file(), **options)
    return model.cpu(), time.perf_counter() - start


def gradcam_row(model: Classifier, data: dict) -> dict[str, float]:
    ev = evaluate(model, data, ["gradcam"], METRICS, batch_size=32, slow_images=16, progress=False)
    return metric_values(ev)


def metric_values(ev) -> dict[str, float]:
    """Grad-CAM's row of an evaluation as {metric: value} (numbers only)."""
    return {r["metric"]: float(r["value"]) for r in ev.rows
            if r["method"] == "gradcam" and isinstance(r["value"], (int, float)) and not isinstance(r["value"], bool)}  # fmt: skip


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def headline(args: argparse.Namespace, out: Path) -> None:
    clean = xcnn.load_model(args.clean)
    train = InMemory(Shapes("train", args.n_train, size=64, seed=0))
    data = benchmark_data(args.n, 64)
    rows = [{"variant": "start (clean model)", "seed": None, "test_acc": test_accuracy(clean, 64),
             **gradcam_row(clean, data)}]  # fmt: skip
    print(rows[-1], flush=True)
    for seed in range(args.seeds):
        for variant, options in HEADLINE.items():
            model, seconds = train_once(out / f"{variant}-s{seed}", model=clean, labeled=train, epochs=args.epochs,
                                        seed=seed, **options)  # fmt: skip
            rows.append({"variant": variant, "seed": seed, "seconds": seconds, "test_acc": test_accuracy(model, 64),
                         **gradcam_row(model, data)})  # fmt: skip
            print(rows[-1], flush=True)
            write_json(out / "headline.json", rows)
    keys = [k for k in rows[0] if k not in ("variant", "seed", "seconds")]
    lines = [f"| variant | {' | '.join(keys)} |", "|---|" + "---:|" * len(keys)]
    lines.append(f"| start | {' | '.join(f'{rows[0][k]:.3f}' for k in keys)} |")
    for variant in HEADLINE:
        mine = [r for r in rows if r["variant"] == variant]
        lines.append(f"| {variant} | {' | '.join(spread([r[k] for r in mine]) for k in keys)} |")
    (out / "headline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def fewlabels(args: argparse.Namespace, out: Path) -> None:
    from xcnn.training.cgc import split_labeled

    clean = xcnn.load_model(args.clean)  # its architecture; every weight re-initialised (scratch=True)
    train = InMemory(Shapes("train", args.few_n, size=64, seed=0))
    rows = []
    for seed in range(args.seeds):
        keep, rest = split_labeled(train, 0.05, seed)
        repeat = max(1, round(len(rest) / len(keep)))  # labelled and unlabelled images alike in each batch
        steps = args.few_epochs * ((len(keep) * repeat + len(rest)) // 64)  # the budget, in optimiser steps
        only_epochs = round(steps / (len(keep) // 64))
        only = torch.utils.data.Subset(train, keep)
        runs = {
            "CE, 5 % labelled": {"labeled": only, "lam": 0.0, "epochs": only_epochs},
            "CGC, 5 % labelled": {"labeled": only, "lam": 0.25, "epochs": only_epochs},
            "CGC, 5 % labelled + 95 % unlabelled": {"labeled": train, "labeled_fraction": 0.05,
                                                    "labeled_repeat": repeat, "lam": 0.25, "epochs": args.few_epochs},
        }  # fmt: skip
        for i, (name, options) in enumerate(runs.items()):
            trained, seconds = train_once(out / f"few-{i}-s{seed}", model=clean, seed=seed, scratch=True,
                                          batch_size=64, **options)  # fmt: skip
            rows.append({"run": name, "seed": seed, "epochs": options["epochs"], "steps": steps, "seconds": seconds,
                         "labeled_repeat": options.get("labeled_repeat", 1), "test_acc": test_accuracy(trained, 64)})  # fmt: skip
            print(rows[-1], flush=True)
            write_json(out / "fewlabels.json", rows)
    few_table(out)


def few_table(out: Path) -> None:
    """``OUT/fewlabels.md`` from ``OUT/fewlabels.json`` (also after an interrupted run: the seeds done)."""
    import json

    rows = json.loads((out / "fewlabels.json").read_text())
    lines = ["| run | epochs | optimiser steps | clean test accuracy (mean ± sd over seeds) | per seed |",
             "|---|---:|---:|---:|---|"]  # fmt: skip
    for name in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == name]
        accs = [r["test_acc"] for r in mine]
        lines.append(f"| {name} | {mine[0]['epochs']} | ~{mine[0]['steps']} | {spread(accs)} | "
                     f"{', '.join(f'{a:.3f}' for a in accs)} |")  # fmt: skip
    (out / "fewlabels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def shortcut(args: argparse.Namespace, out: Path) -> None:
    start = xcnn.load_model(args.shortcut)
    train = InMemory(Shapes("train", args.n_train, size=64, seed=0, shortcut_prob=SHORTCUT))
    patched = benchmark_data(args.n, 64, shortcut_prob=1.0)
    rows = []
    models = {"start (shortcut model)": start}
    for variant in ("ce", "cgc"):
        models[variant], _ = train_once(out / f"shortcut-{variant}", model=start, labeled=train, epochs=args.epochs,
                                        seed=0, **HEADLINE[variant])  # fmt: skip
    for name, model in models.items():
        ev = evaluate(model, patched, ["gradcam"], ["shortcut", "pointing", "consistency"], batch_size=32,
                      progress=False)  # fmt: skip
        row = metric_values(ev)
        rows.append({"model": name, "test_acc": test_accuracy(model, 64),
                     "test_acc_random_patch": test_accuracy(model, 64, shortcut=True), **row})  # fmt: skip
        print(rows[-1], flush=True)
    write_json(out / "shortcut.json", rows)
    keys = [k for k in rows[0] if k != "model"]
    lines = [f"| model | {' | '.join(keys)} |", "|---|" + "---:|" * len(keys)]
    lines += [f"| {r['model']} | {' | '.join(f'{r[k]:.3f}' for k in keys)} |" for r in rows]
    (out / "shortcut.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/cgc")
    parser.add_argument("--clean", default="runs/clean")
    parser.add_argument("--shortcut", default="runs/shortcut")
    parser.add_argument("--parts", default="headline,shortcut,fewlabels")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default: %(default)s)")
    parser.add_argument("--n-train", type=int, default=6000, help="fine-tuning images (default: %(default)s)")
    parser.add_argument("--n", type=int, default=64, help="test images for Grad-CAM's metrics")
    parser.add_argument("--few-n", type=int, default=6000, help="few-labels: training images, 5 %% labelled")
    parser.add_argument("--few-epochs", type=int, default=5, help="few-labels: epochs of the unlabelled run")
    args = parser.parse_args()
    out = prepare_out_dir(args.out)
    for part in args.parts.split(","):
        parts = {"headline": headline, "fewlabels": fewlabels, "shortcut": shortcut,
                 "fewtable": lambda args, out: few_table(out)}  # fmt: skip
        parts[part.strip()](args, out)


if __name__ == "__main__":
    main()
