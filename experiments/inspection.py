"""Layer-wise inspection evidence for docs/results.md: probe accuracy by depth and over monitored training,
top-10 Taylor filters against 10 random filters, Taylor against ablation, CKA, on three structures.

    python experiments/inspection.py --out runs/inspection

Parts (``--parts shapesnet,vgg,lite0,curve``; ``table`` only rewrites ``OUT/inspection.md`` from the JSON):

* ``shapesnet``: the benchmark recipe (``xcnn train benchmark``: 6000 images at 64x64, 10 epochs, one-cycle
  AdamW) for each seed with the monitor on (every epoch, 512 validation images: probes fitted on 256,
  measured on 256); then ``inspect_model`` on 1000 held-out test images (probes on 500, everything else on
  the other 500): probe accuracy by stage, Taylor importance of every ``layer4`` filter against its
  ablation (all 128 filters), accuracy with the top-10 filters by Taylor (ranked on the probe-fitting
  images) zeroed against 10 random filters (20 draws), linear CKA between stages. Seed 0 is the reference model's recipe and seed: its test
  accuracy must equal ``runs/clean``'s (monitoring does not change training).
* ``vgg``: torchvision ``vgg11_bn`` at 64x64 (its convolutional part unchanged; the 4096-wide classifier,
  100 M parameters on a replicated 2x2 map, replaced by global average pooling and one linear layer),
  trained from scratch on 3000 benchmark images for 5 epochs (one-cycle AdamW 2e-3, batch 64) with the
  monitor; then the same inspection as ShapesNet on its last stage (``features.28``), except that ablation
  covers 64 of its 512 filters (the top 32 by Taylor and 32 random ones). One seed (CPU budget).
* ``lite0``: the bundled ImageNet EfficientNet-Lite0, untouched: probes fitted on 256 benchmark images at
  224x224 and measured on 256 others (a transfer task: 6 shape classes); Taylor importance, ablation and
  feature correlation of ``bn2`` on the bundled photos (5 photos x 8 seeded crops/flips = 40 views),
  targets = the model's top-1 on each view, "accuracy" = the top-1 kept after zeroing filters; ablation
  for 128 of the 1280 filters (the top 64 by Taylor and 64 random ones: each costs a forward pass per view).

* ``curve`` (``vgg-curve`` adds the VGG, about 10 minutes more on 2 cores): for the trained ShapesNets,
  three stages each, the accuracy on the odd test images
  with the top-k filters zeroed (k = 10, 20, 40; ranked by Taylor importance on the even test images)
  against k random filters (10 draws).

Nothing here was tuned: the probe (logistic, l2 = 1e-3), the monitor's settings and the recipes are the
defaults, fixed before the runs. Trained models stay in their folders and are reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import xcnn
from xcnn._io import prepare_out_dir, write_json
from xcnn.data.synthetic import CLASSES, Shapes
from xcnn.inspection import Monitor, ablation_effect, filter_importance, inspect_model, load_history
from xcnn.inspection.features import _pearson_matrix, layer_similarity
from xcnn.metrics.consistency import random_crop_flips
from xcnn.metrics.sanity import spearman
from xcnn.models import Classifier, load_model
from xcnn.pipelines import benchmark_data
from xcnn.training.benchmark import InMemory, fit_benchmark
from xcnn.training.trainer import accuracy_eval, fit, one_cycle

N_TEST = 1000


def summarise(ins) -> dict:
    effect = ins.top_vs_random
    random_acc = [r["ablated_accuracy"] for r in effect["random"]]
    return {
        "probe_accuracy": ins.probe_accuracy,
        "model_accuracy": ins.model_accuracy,
        "top10_ablated_accuracy": effect["top"]["ablated_accuracy"],
        "top10_logit_drop": effect["top"]["logit_drop"],
        "random10_ablated_accuracy": random_acc,
        "random10_logit_drop": [r["logit_drop"] for r in effect["random"]],
        "spearman_taylor_ablation": ins.taylor_ablation_spearman,
        "ablated_channels": len(ins.ablation),
        "channels": len(ins.taylor),
        "cka": ins.similarity.tolist(),
        "layers": ins.layers,
        "correlation": {
            k: {"mean_abs": v["mean_abs"], "redundant_pairs": v["redundant_pairs"]} for k, v in ins.correlation.items()
        },
    }


def inspect_trained(model: Classifier, size: int, agreement_channels: int = 10_000) -> dict:
    data = benchmark_data(N_TEST, size)
    start = time.perf_counter()
    ins = inspect_model(
        model, data, images=N_TEST, top=10, draws=20, agreement_channels=agreement_channels, progress=False
    )
    return {**summarise(ins), "inspect_seconds": round(time.perf_counter() - start, 1)}


def part_shapesnet(out: Path, seeds: list[int]) -> dict:
    results = {}
    for seed in seeds:
        run = out / f"shapesnet-s{seed}"
        if (run / "results.json").is_file() and (run / "monitor.json").is_file():
            model = load_model(run)
            trained = json.loads((run / "results.json").read_text())
        else:
            model, trained = fit_benchmark(
                run, seed=seed, monitor_every=1, monitor_images=512, progress=False, resume=True
            )
        print(f"shapesnet seed {seed}: test accuracy {trained['test_acc']:.3f}", flush=True)
        results[seed] = {"test_acc": trained["test_acc"], "train_seconds": trained["train_seconds"],
                         "history": load_history(run)["records"], **inspect_trained(model.cpu(), 64)}  # fmt: skip
        write_json(out / "shapesnet.json", results)
    return results


def vgg_model() -> Classifier:
    torch.manual_seed(0)
    from torchvision.models import vgg11_bn

    net = vgg11_bn(num_classes=len(CLASSES))
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    net.classifier = nn.Linear(512, len(CLASSES))
    return Classifier(net, name="vgg11_bn-gap", input_size=(64, 64), class_names=CLASSES)


def part_vgg(out: Path) -> dict:
    run = out / "vgg11_bn"
    model = vgg_model()
    train = InMemory(Shapes("train", 3000, size=64, seed=0))
    val = InMemory(Shapes("val", 1000, size=64, seed=0))
    if (run / "results.json").is_file():
        model = _load_vgg(run)
    else:
        start = time.perf_counter()
        fit(
            model, train, epochs=5, val_data=val, batch_size=64, out_dir=run, resume=True, seed=0, device="cpu",
            optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=1e-4), scheduler=one_cycle(2e-3),
            callbacks=[Monitor(val, images=512)], progress=False,
        )  # fmt: skip
        model.eval()
        seconds = time.perf_counter() - start
        test = InMemory(Shapes("test", N_TEST, size=64, seed=0))
        acc = accuracy_eval(model, torch.utils.data.DataLoader(test, batch_size=256), torch.device("cpu"))["acc"]
        torch.save(model.backbone.state_dict(), run / "vgg.pt")
        write_json(run / "results.json", {"test_acc": acc, "train_seconds": round(seconds, 1)})
    trained = json.loads((run / "results.json").read_text())
    print(f"vgg11_bn: test accuracy {trained['test_acc']:.3f}", flush=True)
    result = {**trained, "history": load_history(run)["records"], **inspect_trained(model, 64, agreement_channels=64)}
    write_json(out / "vgg.json", result)
    return result


def _load_vgg(run: Path) -> Classifier:
    model = vgg_model()
    model.backbone.load_state_dict(torch.load(run / "vgg.pt", weights_only=True))
    return model.eval()


def part_lite0(out: Path) -> dict:
    model = load_model("efficientnet_lite0").eval()
    start = time.perf_counter()
    data = benchmark_data(512, 224, seed=1)
    # only the probes and the CKA here: filter importance on ImageNet filters is measured on the photos below
    ins = inspect_model(model, data, images=512, samples=0, top=10, draws=0, agreement_channels=0, progress=False)
    probes = {"probe_accuracy": ins.probe_accuracy, "layers": ins.layers, "cka": ins.similarity.tolist(),
              "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    # the bundled photos: 8 seeded crops/flips of each
    photos = torch.stack([xcnn.data.load_image(f"sample:{name}", (224, 224)) for name in xcnn.data.SAMPLES])
    gen = torch.Generator().manual_seed(0)
    images = torch.cat([t(photos) for t in random_crop_flips(8, (224, 224), gen)]).clamp(0, 1)
    with torch.no_grad():
        top1 = model(images).argmax(1)
    views_data = {"image": images, "label": top1}
    layer = "bn2"
    taylor = filter_importance(model, views_data, layer, "taylor")
    order = taylor.argsort(descending=True)
    # ablation of 128 of the 1280 filters (each costs a forward pass per view): the top 64 by Taylor and 64
    # drawn at random from the rest
    gen = torch.Generator().manual_seed(0)
    rest = order[64:]
    chosen = torch.cat([order[:64], rest[torch.randperm(len(rest), generator=gen)[:64]]])
    ablation = filter_importance(model, views_data, layer, "ablation", channels=chosen.tolist())
    rho = float(spearman(taylor[chosen].view(1, 1, -1), ablation[chosen].view(1, 1, -1))[0])
    top = ablation_effect(model, views_data, layer, order[:10].tolist())
    rand = [
        ablation_effect(model, views_data, layer, torch.randperm(len(taylor), generator=gen)[:10].tolist())
        for _ in range(20)
    ]
    corr = _pearson_matrix(_pooled(model, images, layer))
    off = corr[~torch.eye(len(corr), dtype=torch.bool)].abs()
    result = {
        **probes, "views": len(images), "spearman_taylor_ablation_bn2": rho,
        "top10": top, "random10": rand, "bn2_mean_abs_corr": float(off.mean()),
        "bn2_redundant_pairs": int((off > 0.9).sum()) // 2, "photo_layer_cka": layer_similarity(model, views_data, ins.layers).tolist(),
    }  # fmt: skip
    write_json(out / "lite0.json", result)
    return result


def _pooled(model: Classifier, images: torch.Tensor, layer: str) -> torch.Tensor:
    from xcnn.inspection import pooled_features

    return pooled_features(model, {"image": images}, [layer], progress=False)[0][layer]


CURVE_K = (10, 20, 40)


def ablation_curve(model: Classifier, layers: list[str], draws: int = 10) -> dict:
    """Accuracy on the odd test images with the top-k filters of each layer zeroed (ranked by Taylor on the
    even test images) against k random filters, for k in CURVE_K."""
    data = benchmark_data(N_TEST, model.input_size[0])
    fit_half = {k: v[0::2] for k, v in data.items()}
    measure = {k: v[1::2] for k, v in data.items()}
    gen = torch.Generator().manual_seed(0)
    out = {}
    for layer in layers:
        ranking = filter_importance(model, fit_half, layer, "taylor").argsort(descending=True)
        c = len(ranking)
        out[layer] = {"channels": c}
        for k in CURVE_K:
            if k >= c:
                continue
            top = ablation_effect(model, measure, layer, ranking[:k].tolist())
            rand = [
                ablation_effect(model, measure, layer, torch.randperm(c, generator=gen)[:k].tolist())
                for _ in range(draws)
            ]
            out[layer][str(k)] = {"accuracy": top["accuracy"], "top": top["ablated_accuracy"],
                                  "random": [r["ablated_accuracy"] for r in rand]}  # fmt: skip
    return out


def part_curve(out: Path, seeds: list[int], vgg: bool) -> dict:
    result = {"shapesnet": {}, "vgg": None}
    for seed in seeds:
        run = out / f"shapesnet-s{seed}"
        if (run / "results.json").is_file():
            result["shapesnet"][seed] = ablation_curve(load_model(run).eval(), ["layer2", "layer3", "layer4"])
            print(f"curve shapesnet seed {seed}", flush=True)
    if vgg and (out / "vgg11_bn" / "results.json").is_file():
        result["vgg"] = ablation_curve(_load_vgg(out / "vgg11_bn"), ["features.14", "features.21", "features.28"])
    write_json(out / "curve.json", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/inspection")
    parser.add_argument("--parts", default="shapesnet,vgg,lite0,curve,table")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    out = prepare_out_dir(args.out)
    parts = args.parts.split(",")
    if "shapesnet" in parts:
        part_shapesnet(out, [int(s) for s in args.seeds.split(",")])
    if "vgg" in parts:
        part_vgg(out)
    if "lite0" in parts:
        part_lite0(out)
    if "curve" in parts:
        part_curve(out, [int(s) for s in args.seeds.split(",")], vgg="vgg-curve" in parts)
    if "table" in parts:
        write_table(out)


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def write_table(out: Path) -> None:
    """``OUT/inspection.md``: the tables results.md quotes."""
    lines = []
    structures = {}
    if (out / "shapesnet.json").is_file():
        structures["ShapesNet"] = list(json.loads((out / "shapesnet.json").read_text()).values())
    if (out / "vgg.json").is_file():
        structures["vgg11_bn (GAP head)"] = [json.loads((out / "vgg.json").read_text())]
    for name, runs in structures.items():
        layers = runs[0]["layers"]
        lines += [
            f"### {name} ({len(runs)} seed{'s' * (len(runs) > 1)}; 500 test images fit the probes, 500 measure)",
            "",
        ]
        lines += ["| | " + " | ".join(layers) + " | model |", "|---|" + "---|" * (len(layers) + 1)]
        lines.append("| probe accuracy | " + " | ".join(_mean_sd([r["probe_accuracy"][k] for r in runs]) for k in layers)
                     + f" | {_mean_sd([r['model_accuracy'] for r in runs])} |")  # fmt: skip
        lines.append("")
        lines += ["| | accuracy | target-logit drop |", "|---|---|---|"]
        lines.append(f"| nothing zeroed | {_mean_sd([r['model_accuracy'] for r in runs])} | 0 |")
        lines.append(
            f"| top-10 by Taylor zeroed | {_mean_sd([r['top10_ablated_accuracy'] for r in runs])} | {_mean_sd([r['top10_logit_drop'] for r in runs])} |"
        )
        rand_acc = [a for r in runs for a in r["random10_ablated_accuracy"]]
        rand_drop = [a for r in runs for a in r["random10_logit_drop"]]
        lines.append(
            f"| 10 random zeroed (20 draws per seed; mean ± sd, [min, max]) | {_mean_sd(rand_acc)} [{min(rand_acc):.3f}, {max(rand_acc):.3f}] | {_mean_sd(rand_drop)} [{min(rand_drop):.3f}, {max(rand_drop):.3f}] |"
        )
        lines.append("")
        lines.append(f"Spearman(Taylor, ablation) over {runs[0]['ablated_channels']} of the {runs[0]['channels']} filters of {layers[-1]}: "
                     + _mean_sd([r["spearman_taylor_ablation"] for r in runs]) + ".")  # fmt: skip
        lines.append("")
        lines += ["Probe accuracy over training (monitor, 256 validation images measured; mean over seeds):", ""]
        lines += ["| epoch | " + " | ".join(layers) + " | val acc |", "|---|" + "---|" * (len(layers) + 1)]
        for e in range(len(runs[0]["history"])):
            cells = [_mean_sd([r["history"][e]["probe_accuracy"][k] for r in runs]) for k in layers]
            lines.append(
                f"| {e + 1} | " + " | ".join(cells) + f" | {_mean_sd([r['history'][e]['val_acc'] for r in runs])} |"
            )
        lines.append("")
        lines += ["Linear CKA of each stage to itself one epoch earlier (mean over seeds):", ""]
        lines += ["| epoch | " + " | ".join(layers) + " |", "|---|" + "---|" * len(layers)]
        for e in range(1, len(runs[0]["history"])):
            cells = [_mean_sd([r["history"][e]["cka_to_previous"][k] for r in runs]) for k in layers]
            lines.append(f"| {e}→{e + 1} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += ["Linear CKA between stages after training (test images):", ""]
        lines += ["| | " + " | ".join(layers) + " |", "|---|" + "---|" * len(layers)]
        for i, a in enumerate(layers):
            lines.append(
                f"| {a} | " + " | ".join(_mean_sd([r["cka"][i][j] for r in runs]) for j in range(len(layers))) + " |"
            )
        lines.append("")
    if (out / "curve.json").is_file():
        curve = json.loads((out / "curve.json").read_text())
        lines += ["### Zeroing more filters (`--parts curve`)", ""]
        lines += ["Accuracy on 500 test images with the top-k filters of a stage zeroed (ranked by Taylor on the other 500) "
                  "against k random filters (10 draws per seed: mean [min, max]):", ""]  # fmt: skip
        lines += [
            "| model | stage (filters) | k | no filter zeroed | top-k by Taylor | k random |",
            "|---|---|---:|---:|---:|---:|",
        ]
        groups = [("ShapesNet", list(curve["shapesnet"].values()))] + (
            [("vgg11_bn", [curve["vgg"]])] if curve["vgg"] else []
        )
        for name, runs in groups:
            for layer in runs[0]:
                for k in CURVE_K:
                    if str(k) not in runs[0][layer]:
                        continue
                    cells = [r[layer][str(k)] for r in runs]
                    rand = [a for c in cells for a in c["random"]]
                    lines.append(f"| {name} | {layer} ({runs[0][layer]['channels']}) | {k} | {_mean_sd([c['accuracy'] for c in cells])} | "
                                 f"{_mean_sd([c['top'] for c in cells])} | {statistics.mean(rand):.3f} [{min(rand):.3f}, {max(rand):.3f}] |")  # fmt: skip
        lines.append("")
    if (out / "lite0.json").is_file():
        r = json.loads((out / "lite0.json").read_text())
        lines += ["### EfficientNet-Lite0 (bundled ImageNet weights, untouched)", ""]
        lines += ["Transfer probes (6 shape classes; 256 benchmark images at 224x224 fit, 256 measure):", ""]
        lines += ["| " + " | ".join(r["layers"]) + " |", "|" + "---|" * len(r["layers"])]
        lines.append("| " + " | ".join(f"{r['probe_accuracy'][k]:.3f}" for k in r["layers"]) + " |")
        lines.append("")
        rand = [x["ablated_accuracy"] for x in r["random10"]]
        lines.append(f"On the bundled photos ({r['views']} views): top-1 kept after zeroing the top-10 bn2 filters by Taylor "
                     f"{r['top10']['ablated_accuracy']:.3f} (logit drop {r['top10']['logit_drop']:.2f}); after 10 random filters "
                     f"{statistics.mean(rand):.3f} [{min(rand):.3f}, {max(rand):.3f}] (20 draws; logit drop "
                     f"{statistics.mean(x['logit_drop'] for x in r['random10']):.2f}); Spearman(Taylor, ablation) over "
                     f"128 of the 1280 bn2 filters (the top 64 by Taylor, 64 random) {r['spearman_taylor_ablation_bn2']:.3f}; bn2 mean |r| {r['bn2_mean_abs_corr']:.3f}, "
                     f"{r['bn2_redundant_pairs']} pairs with |r| > 0.9.")  # fmt: skip
        lines.append("")
    (out / "inspection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
