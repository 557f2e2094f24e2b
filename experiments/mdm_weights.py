"""Choose MDM's regulariser weights on validation images, never on the test images that docs/results.md
reports.

    python experiments/mdm_weights.py --model runs/clean --out runs/mdm-weights

The benchmark CNN explains ``--n`` images of the shapes benchmark's validation split (the split that
training only reports accuracy on; the test split is not read here), targets = its top-1. One round of
variants around a centre, one weight changed at a time, each weight also switched off. The criterion,
fixed before the run: the mean of insertion AUC minus deletion AUC (faithfulness, needs no ground truth).
Each variant's difference from the centre is given with its paired standard error over the images, so a
difference inside that spread can be read as a tie. Pointing game and energy in the object mask are
reported beside it but do not choose. Writes ``OUT/weights.md`` and ``OUT/weights.json``.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

import xcnn
from xcnn._io import atomic_write, prepare_out_dir, write_json
from xcnn.data.synthetic import Shapes
from xcnn.metrics import energy_in_box, insertion_deletion, pointing_game
from xcnn.training.benchmark import InMemory

#: the centre of the round: the defaults before this sweep existed (area 2.0, binary 0.5, TV 0.25)
CENTRE = {"area_weight": 2.0, "binary_weight": 0.5, "tv_weight": 0.25}
CHANGES = {"area_weight": (1.0, 4.0), "binary_weight": (0.0, 0.25, 1.0), "tv_weight": (0.0, 0.1, 0.5)}


def variants() -> list[dict[str, float]]:
    out = [dict(CENTRE)]
    for name, values in CHANGES.items():
        out += [{**CENTRE, name: v} for v in values]
    # binary_weight must stay below area_weight (MDM's own check): drop the variants that break it
    return [v for v in out if v["binary_weight"] < v["area_weight"]]


def label(weights: dict[str, float]) -> str:
    return f"area {weights['area_weight']:g}, binary {weights['binary_weight']:g}, tv {weights['tv_weight']:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the benchmark CNN's folder (xcnn train benchmark --out ...)")
    parser.add_argument("--out", default="runs/mdm-weights")
    parser.add_argument("--n", type=int, default=64, help="validation images (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=32, help="images per explainer call (default: %(default)s)")
    args = parser.parse_args()
    out = prepare_out_dir(args.out)
    model = xcnn.load_model(args.model)
    size = model.input_size[0]
    data = InMemory(Shapes("val", args.n, size=size, seed=0)).tensors
    images, masks = data["image"], data["mask"].bool()
    with torch.no_grad():
        targets = torch.cat([model(chunk).argmax(1) for chunk in images.split(args.batch)])

    rows, criteria = [], {}
    for weights in variants():
        expl = xcnn.explainer("mdm", model, progress=False, **weights)
        maps = torch.cat([expl(x, t) for x, t in zip(images.split(args.batch), targets.split(args.batch), strict=True)])
        curves = insertion_deletion(model, images, maps, targets, per_image=True)
        per_image = curves["insertion"] - curves["deletion"]
        criteria[label(weights)] = per_image
        rows.append(
            {
                **weights,
                "label": label(weights),
                "insertion": float(curves["insertion"].mean()),
                "deletion": float(curves["deletion"].mean()),
                "criterion": float(per_image.mean()),
                "pointing": float(pointing_game(maps, masks)),
                "energy_in_mask": float(energy_in_box(maps, masks)),
            }
        )
        print(rows[-1], flush=True)

    centre = criteria[label(CENTRE)]
    for row in rows:
        diff = criteria[row["label"]] - centre
        row["minus_centre"] = float(diff.mean())
        row["paired_se"] = float(diff.std(unbiased=True) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    best = max(rows, key=lambda r: r["criterion"])
    lines = [
        f"MDM regulariser weights on {args.n} validation images of the shapes benchmark ({size}x{size}), "
        f"model {args.model}, targets = its top-1. Criterion: mean insertion - deletion AUC.",
        "",
        "| weights | insertion | deletion | insertion - deletion | vs centre (paired SE) | pointing | energy_in_mask |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']}{' (centre)' if r['label'] == label(CENTRE) else ''} | {r['insertion']:.3f} | "
            f"{r['deletion']:.3f} | {r['criterion']:.3f} | {r['minus_centre']:+.3f} ({r['paired_se']:.3f}) | "
            f"{r['pointing']:.3f} | {r['energy_in_mask']:.1f} |"
        )
    lines += ["", f"Best by the criterion: {best['label']} ({best['criterion']:.3f})."]
    table = "\n".join(lines) + "\n"
    atomic_write(out / "weights.md", lambda tmp: tmp.write_text(table))
    write_json(out / "weights.json", {"n": args.n, "model": str(args.model), "rows": rows, "best": best["label"]})
    print(table)
    print(json.dumps({k: best[k] for k in CENTRE}))


if __name__ == "__main__":
    main()
