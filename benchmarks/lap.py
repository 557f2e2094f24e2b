"""What LAP costs: the forward pass of a LAP model against the original, LAP's explanation against one
forward pass, and fine-tuning with knowledge injection against a bare cross-entropy loop, in one run.

    python benchmarks/lap.py                       # about 3 minutes on 2 CPU cores
    python benchmarks/lap.py --device cuda

Models: the benchmark ShapesNet (64x64, random weights: timing does not depend on them) with LAP at the
global pool, the same network with a stride-1 stem and a 2x2 pool that LAP also replaces (early + global),
and EfficientNet-Lite0 (224x224) with LAP at its global pool. Medians of round-robin repeats. Training
throughput: images per second over whole epochs of ``fit_lap`` (knowledge on 10 % of the images) and of
a bare loop (forward, cross-entropy, backward, AdamW step) on the same LAP model and data.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import torch
import torch.nn.functional as F
from explainers import plain, sync, timed

import xcnn
from xcnn.data.synthetic import CLASSES, Shapes
from xcnn.interpretable import insert_lap
from xcnn.models import Classifier
from xcnn.nets import ShapesNet
from xcnn.training.benchmark import InMemory
from xcnn.training.knowledge import Knowledge
from xcnn.training.lap import fit_lap

warnings.filterwarnings("ignore")


def shapesnet(stem_pool: bool) -> Classifier:
    torch.manual_seed(0)
    kwargs = {
        "num_classes": 6,
        "widths": [16, 32, 64, 128],
        "strides": [1 if stem_pool else 2, 1, 2, 2, 1],
        "stem_pool": stem_pool,
    }
    return Classifier(ShapesNet(**kwargs), name="shapesnet", input_size=(64, 64), class_names=CLASSES,
                      spec={"arch": "shapesnet", "kwargs": kwargs})  # fmt: skip


def forward_rows(args, device) -> list[dict]:
    rows = []
    cases = [
        ("ShapesNet 64x64", shapesnet(False), None, args.batch),
        ("ShapesNet, stride-1 stem + pool", shapesnet(True), ["stem_pool", "pool"], args.batch),
        ("EfficientNet-Lite0 224x224", xcnn.load_model("efficientnet_lite0"), None, args.lite_batch),
    ]
    for name, model, where, batch in cases:
        model = model.to(device).eval()
        lap = insert_lap(model, where).eval()
        x = torch.rand(batch, 3, *model.input_size, device=device)
        explainer = xcnn.explainer("lap", lap, layers="all" if where else "last")

        def forward(m, x=x):
            with torch.no_grad():
                m(x)

        t = timed({("original", ""): plain(lambda m=model: forward(m)), ("lap", ""): plain(lambda m=lap: forward(m)),
                   ("explain", ""): plain(lambda e=explainer, x=x: e(x))}, device, args.repeats)  # fmt: skip
        rows.append({
            "model": name, "batch": batch, "lap_layers": xcnn.interpretable.lap_layers(lap.backbone),
            "forward_s": t[("original", "")], "lap_forward_s": t[("lap", "")], "explain_s": t[("explain", "")],
            "lap_forward_ratio": t[("lap", "")] / t[("original", "")],
            "explain_ratio_to_lap_forward": t[("explain", "")] / t[("lap", "")],
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def training_rows(args, device) -> list[dict]:
    data = InMemory(Shapes("train", args.train_images, size=64, seed=0, shortcut_prob=0.9))
    knowledge = Knowledge.from_samples(data, 0.1, look="box")
    base = shapesnet(False)
    lap_model = insert_lap(base)

    def bare(model: Classifier) -> None:
        model = model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, drop_last=True)
        for batch in loader:
            x, y = batch["image"].to(device), batch["label"].to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)

    def injected(injection: str):
        return lambda: fit_lap(lap_model if injection == "lap" else base, data, epochs=1, knowledge=knowledge,
                               injection=injection, batch_size=64, device=device, progress=False)  # fmt: skip

    runs = {"bare loop, original model": lambda: bare(base), "bare loop, LAP model": lambda: bare(lap_model),
            "fit_lap, injection lap": injected("lap"), "fit_lap, injection none (CE)": injected("none"),
            "fit_lap, injection rrr": injected("rrr"), "fit_lap, injection gradcam": injected("gradcam")}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(1 + args.train_repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            if rep:
                times[name].append(time.perf_counter() - start)
    images = (len(data) // 64) * 64
    ref = images / sorted(times["bare loop, LAP model"])[len(times["bare loop, LAP model"]) // 2]
    rows = []
    for name, ts in times.items():
        per_s = images / sorted(ts)[len(ts) // 2]
        rows.append({"run": name, "images_per_s": per_s, "share_of_bare_lap_loop": per_s / ref})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64, help="ShapesNet forward batch (default: %(default)s)")
    parser.add_argument("--lite-batch", type=int, default=8, help="Lite0 forward batch (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--train-images", type=int, default=640)
    parser.add_argument("--train-repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}  # fmt: skip
    print(json.dumps(env))
    fwd, train = forward_rows(args, device), training_rows(args, device)
    print(
        "\n| model | batch | forward (ms) | LAP forward (ms) | LAP / original | explanation (ms) | explanation / LAP forward |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in fwd:
        print(f"| {r['model']} ({', '.join(r['lap_layers'])}) | {r['batch']} | {1e3 * r['forward_s']:.1f} | "
              f"{1e3 * r['lap_forward_s']:.1f} | {r['lap_forward_ratio']:.3f} | {1e3 * r['explain_s']:.1f} | "
              f"{r['explain_ratio_to_lap_forward']:.3f} |")  # fmt: skip
    print("\n| training run (one epoch) | images / s | share of the bare loop on the LAP model |")
    print("|---|---:|---:|")
    for r in train:
        print(f"| {r['run']} | {r['images_per_s']:.0f} | {r['share_of_bare_lap_loop']:.2f} |")
    if args.out:
        from xcnn._io import write_json

        write_json(args.out, {"env": env, "forward": fwd, "training": train})


if __name__ == "__main__":
    main()
