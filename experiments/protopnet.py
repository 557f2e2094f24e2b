"""ProtoPNet evidence for docs/results.md: accuracy against the plain benchmark CNN, prototype search (native
similarity maps vs MDM, Grad-CAM and RISE on the prototype view), one table across interpretable-by-design
and post-hoc maps, and the shortcut.

    python experiments/protopnet.py --out runs/protopnet --backbones runs/inspection --shortcut runs/shortcut \\
        --lap runs/lap/clean-lap --n 64

``--backbones``: a folder holding ``shapesnet-s0``, ``-s1``, ``-s2`` (the reference recipe, seeds 0-2,
``xcnn train benchmark --seed S``); ``--shortcut``: the shortcut-0.9 model; ``--lap``: the LAP model of the
LAP experiment (for the comparison table). Parts (``--parts train,search,table,shortcut``):

* ``train``: ``fit_protopnet`` (defaults: 10 prototypes per class, 128 channels, 5 warm-up epochs, one
  cycle of 10 joint epochs, push and 20 last-layer epochs) on each backbone, on the 6000 training images the
  backbone was trained on; clean test accuracy (1000 images) and wall time against the plain CNN's.
* ``search``: for each of N test images, the prototype contributing most to the predicted class; its
  native upsampled similarity map, MDM (defaults), Grad-CAM and RISE (1000 masks) on the prototype view,
  scored by the pointing game, the energy in the object mask, and the share of the prototype's similarity
  kept when only the map's top 20 % of pixels are kept (the rest set to the image's mean colour).
* ``table``: the prototype network's own map ("prototype"), Grad-CAM of it, LAP's own map of the LAP
  model, and Grad-CAM, Grad-CAM++ and Score-CAM of the plain CNN, on the harness's metrics (64 test images).
* ``shortcut``: a prototype network on the shortcut model's backbone, trained on its training images
  (90 % with the label-coloured corner patch); where are its prototypes' source patches?

Every trained network stays in its folder and is reused. All settings were fixed before the runs; nothing
was chosen on the test images.
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
from xcnn.data.synthetic import Shapes
from xcnn.interpretable import prototype_evidence, prototype_view
from xcnn.metrics.harness import evaluate
from xcnn.metrics.localization import energy_in_box, pointing_game
from xcnn.pipelines import benchmark_data
from xcnn.training.benchmark import InMemory
from xcnn.training.protopnet import fit_protopnet
from xcnn.training.trainer import accuracy_eval

SIZE, N_TRAIN, N_VAL, N_TEST, SHORTCUT = 64, 6000, 500, 1000, 0.9


def test_accuracy(model, seed: int, shortcut: float = 0.0) -> float:
    data = Shapes("test", N_TEST, size=SIZE, seed=seed, shortcut_prob=shortcut)
    return accuracy_eval(model, DataLoader(data, batch_size=256), torch.device("cpu"))["acc"]


def train_one(backbone: Path, folder: Path, shortcut: float = 0.0) -> dict:
    base = xcnn.load_model(backbone)
    seed = json.loads((backbone / "results.json").read_text())["data"]["seed"]
    if not (folder / "model.json").is_file():
        data = InMemory(Shapes("train", N_TRAIN, size=SIZE, seed=seed, shortcut_prob=shortcut))
        val = InMemory(Shapes("val", N_VAL, size=SIZE, seed=seed))
        start = time.perf_counter()
        fit_protopnet(base, data, val_data=val, out_dir=folder, resume=True, seed=seed, device="cpu", progress=False)
        write_json(folder / "time.json", {"seconds": time.perf_counter() - start})
    model = xcnn.load_model(folder)
    plain = json.loads((backbone / "results.json").read_text())
    row = {
        "backbone": str(backbone), "seed": seed, "prototypes": len(json.loads((folder / "prototypes.json").read_text())),
        "plain_test_acc": test_accuracy(base, seed), "protopnet_test_acc": test_accuracy(model, seed),
        "plain_train_seconds": plain.get("train_seconds"),
        "protopnet_train_seconds": json.loads((folder / "time.json").read_text())["seconds"]
        if (folder / "time.json").is_file() else None,
    }  # fmt: skip
    if shortcut:
        row["plain_test_acc_random_patch"] = test_accuracy(base, seed, shortcut)
        row["protopnet_test_acc_random_patch"] = test_accuracy(model, seed, shortcut)
    return row


def train_part(args: argparse.Namespace, out: Path) -> None:
    rows = [train_one(Path(args.backbones) / f"shapesnet-s{s}", out / f"clean-s{s}") for s in args.seeds]
    write_json(out / "train.json", rows)
    lines = [
        "| seed | prototypes | plain CNN test acc | prototype network test acc | prototype network training (s) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = f"{r['protopnet_train_seconds']:.0f}" if r["protopnet_train_seconds"] else ""
        lines.append(
            f"| {r['seed']} | {r['prototypes']} | {r['plain_test_acc']:.3f} | {r['protopnet_test_acc']:.3f} | {t} |"
        )
    (out / "train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def search_part(args: argparse.Namespace, out: Path) -> None:
    """Native similarity map vs searched maps of the top prototype, on N test images, per seed."""
    rows = []
    for s in args.seeds:
        model = xcnn.load_model(out / f"clean-s{s}")
        data = benchmark_data(args.n, SIZE, seed=s)
        images, masks = data["image"], data["mask"]
        ev = prototype_evidence(model, images, top=1)
        j = ev.prototypes[:, 0]
        view = prototype_view(model)
        native = xcnn.explain.normalize_maps(ev.maps[:, 0], (SIZE, SIZE))
        maps = {"native (upsampled)": native}
        timing = {}
        for name, options in (("mdm", {"progress": False}), ("gradcam", {}), ("rise", {"masks": 1000, "seed": 0})):
            start = time.perf_counter()
            expl = xcnn.explainer(name, view, **options)
            maps[name] = torch.cat([expl(images[i : i + 16], j[i : i + 16]) for i in range(0, len(images), 16)])
            timing[name] = (time.perf_counter() - start) / len(images)
        with torch.no_grad():
            full = view(images)[torch.arange(len(images)), j]
        for name, m in maps.items():
            pointing = pointing_game(m, masks, per_image=True).float()
            energy = energy_in_box(m, masks, per_image=True)
            # does the region keep the prototype? its similarity with only the map's top 20 % of pixels kept
            # (the rest set to the image's mean colour), as a share of its similarity on the whole image
            top = m.flatten(1) >= m.flatten(1).quantile(0.8, dim=1, keepdim=True)
            keep = top.view_as(m)[:, None].float()
            mean = images.mean((2, 3), keepdim=True)
            with torch.no_grad():
                kept = view(images * keep + mean * (1 - keep))[torch.arange(len(images)), j] / full
            rows.append({
                "seed": s, "method": name, "pointing": float(pointing.mean()), "energy": float(energy.mean()),
                "kept_similarity": float(kept.mean()), "pointing_per_image": pointing.tolist(),
                "energy_per_image": energy.tolist(), "seconds_per_image": timing.get(name), "images": len(images),
            })  # fmt: skip
        print(s, {r["method"]: (round(r["pointing"], 3), round(r["energy"], 2)) for r in rows if r["seed"] == s})
    write_json(out / "search.json", rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [
        f"| map of the top prototype | pointing (mean ± sd over {len(args.seeds)} seeds) | energy in mask, % | "
        "similarity kept by the top 20 % | s / image (seed 0) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in methods:
        rs = [r for r in rows if r["method"] == name]
        p = torch.tensor([r["pointing"] for r in rs])
        e = torch.tensor([r["energy"] for r in rs])
        k = torch.tensor([r["kept_similarity"] for r in rs])
        t = rs[0]["seconds_per_image"]
        lines.append(
            f"| {name} | {float(p.mean()):.3f}{sd(p)} | {float(e.mean()):.1f}{sd(e)} | {float(k.mean()):.3f}{sd(k)} | "
            f"{'' if t is None else f'{t:.3f}'} |"
        )
    # paired comparison MDM vs native over all images of all seeds
    diff = []
    for s in args.seeds:
        a = next(r for r in rows if r["seed"] == s and r["method"] == "mdm")
        b = next(r for r in rows if r["seed"] == s and r["method"] == "native (upsampled)")
        diff += [x - y for x, y in zip(a["energy_per_image"], b["energy_per_image"], strict=True)]
    d = torch.tensor(diff)
    lines.append(
        f"\nMDM minus native, energy in mask, paired over {len(d)} images: {float(d.mean()):+.2f} points "
        f"(SE {float(d.std() / len(d) ** 0.5):.2f})"
    )
    (out / "search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def sd(t: torch.Tensor) -> str:
    """`` ± sd`` over seeds (empty for one seed)."""
    return f" ± {float(t.std()):.3f}" if len(t) > 1 else ""


def table_part(args: argparse.Namespace, out: Path) -> None:
    data = benchmark_data(64, SIZE)
    metrics = ["adic", "insertion_deletion", "pointing", "energy", "iou"]
    runs = [
        ("prototype network", xcnn.load_model(out / "clean-s0"), ["prototype", "gradcam"]),
        ("LAP model", xcnn.load_model(args.lap), ["lap", "gradcam"]),
        ("plain CNN", xcnn.load_model(Path(args.backbones) / "shapesnet-s0"), ["gradcam", "gradcam++", "scorecam"]),
    ]
    parts, records = [], []
    for label, model, methods in runs:
        ev = evaluate(model, data, methods, metrics, batch_size=32, progress=False)
        md = ev.markdown().splitlines()
        header, rule, body = md[0], md[1], md[2:]
        if not parts:
            parts += ["| model " + header, "|---" + rule]
        parts += [f"| {label} " + line for line in body if line.startswith("|")]
        records.append({"model": label, "rows": ev.rows})
    (out / "table.md").write_text("\n".join(parts) + "\n")
    write_json(out / "table.json", records)
    print("\n".join(parts))


def shortcut_part(args: argparse.Namespace, out: Path) -> None:
    """Where do a shortcut-trained prototype network's prototypes come from, and where do they match?"""
    folder = out / "shortcut"
    row = train_one(Path(args.shortcut), folder, SHORTCUT)
    model = xcnn.load_model(folder)
    seed = row["seed"]
    train = InMemory(Shapes("train", N_TRAIN, size=SIZE, seed=seed, shortcut_prob=SHORTCUT))
    corner = train.tensors["shortcut_mask"].any(0)  # where the patch is planted (always the same place)
    clean_train = InMemory(Shapes("train", N_TRAIN, size=SIZE, seed=0))

    def sources(recs, data):
        """Per prototype: does its source image carry the patch; does its latent cell (8 px) overlap the patch's
        place; the share of its 95th-percentile box on that place."""
        cell = SIZE // recs[0]["grid"][0]
        out_rows = []
        for r in recs:
            y, x = r["position"]
            t, left, b, rt = r["box"]
            box = torch.zeros(SIZE, SIZE, dtype=torch.bool)
            box[t:b, left:rt] = True
            out_rows.append({
                "has_patch": bool(data.tensors["shortcut_mask"][r["index"]].any()),
                "cell_on_corner": bool(corner[y * cell : (y + 1) * cell, x * cell : (x + 1) * cell].any()),
                "box_share_on_corner": float((box & corner).sum() / box.sum()),
            })  # fmt: skip
        return out_rows

    records = json.loads((folder / "prototypes.json").read_text())
    mine = sources(records, train)
    clean = sources(json.loads((out / "clean-s0" / "prototypes.json").read_text()), clean_train)
    summary = {
        **row, "corner_pixels": int(corner.sum()),
        "source_images_with_patch": sum(r["has_patch"] for r in mine),
        "training_images_with_patch": int(train.tensors["shortcut_mask"].flatten(1).any(1).sum()),
        "cells_on_corner": sum(r["cell_on_corner"] for r in mine),
        "box_share_on_corner": sum(r["box_share_on_corner"] for r in mine) / len(mine),
        "clean_cells_on_corner": sum(r["cell_on_corner"] for r in clean),
        "clean_box_share_on_corner": sum(r["box_share_on_corner"] for r in clean) / len(clean),
    }  # fmt: skip
    # where the top prototype matches on images that carry the label-coloured patch (validation split: the
    # patch in its class's colour, as in training): share of each map's energy on the patch, and pointing
    val = Shapes("val", args.n, size=SIZE, seed=seed + 1, shortcut_prob=1.0)
    batch = next(iter(DataLoader(val, batch_size=args.n)))
    images, patch = batch["image"], batch["shortcut_mask"]
    ev = prototype_evidence(model, images, top=1)
    j = ev.prototypes[:, 0]
    view = prototype_view(model)
    maps = {"native (upsampled)": xcnn.explain.normalize_maps(ev.maps[:, 0], (SIZE, SIZE))}
    for name, options in (("mdm", {"progress": False}), ("gradcam", {}), ("rise", {"masks": 1000, "seed": 0})):
        expl = xcnn.explainer(name, view, **options)
        maps[name] = torch.cat([expl(images[i : i + 16], j[i : i + 16]) for i in range(0, len(images), 16)])
    summary["maps_on_patch"] = {
        name: {"energy_on_patch": energy_in_box(m, patch), "pointing_on_patch": pointing_game(m, patch)}
        for name, m in maps.items()
    }  # fmt: skip
    summary["patch_share_of_image"] = float(patch.float().mean())
    write_json(out / "shortcut.json", summary)
    print(json.dumps(summary, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/protopnet")
    parser.add_argument("--backbones", default="runs/inspection")
    parser.add_argument("--shortcut", default="runs/shortcut")
    parser.add_argument("--lap", default="runs/lap/clean-lap")
    parser.add_argument("--parts", default="train,search,table,shortcut")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n", type=int, default=100, help="test images for the prototype search (per seed)")
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    out = prepare_out_dir(args.out)
    torch.set_grad_enabled(True)
    for part in args.parts.split(","):
        {"train": train_part, "search": search_part, "table": table_part, "shortcut": shortcut_part}[part](args, out)


if __name__ == "__main__":
    main()
