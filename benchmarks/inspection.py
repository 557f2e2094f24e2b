"""What layer-wise inspection costs, against the model's own passes over the same data, in one run.

    python benchmarks/inspection.py                   # about 6 minutes on 2 CPU cores
    python benchmarks/inspection.py --device cuda

* Taylor importance of every filter of a layer (``filter_importance(..., "taylor")``) against one plain
  forward + backward (cross-entropy, weight gradients) over the same images, and against the anchor,
  captum's ``LayerGradientXActivation`` summed per channel (the same numbers): ShapesNet at 64x64 (512
  images, layers layer2 and layer4) and ResNet-18 at 224x224 (random weights; 64 images, layer3).
* Layer-wise probes (``layer_probes`` on every stage: features pooled on the fly, then one L-BFGS fit per
  layer) against the plain forward passes (no grad) over the same images.
* Monitoring: the benchmark recipe (``fit_benchmark`` defaults: 6000 images at 64x64, batch 64) for
  ``--epochs`` epochs with and without the monitor at every epoch (512 validation images); the ratio of
  the training loops' times (``train_seconds``: epochs, validation, checks; not the data generation) is
  what monitoring adds to the recipe.
* Layer-wise probes also against ``pooled_features`` alone (the collection, before the fits).
* Memory: peak memory of ``layer_probes`` on ShapesNet for 256 and 2048 images (a fresh process each; CPU:
  VmHWM above the RSS after the images are made; CUDA: peak allocated). Features are pooled batch by batch,
  so the peak should not grow with the number of images beyond the images themselves.

Times are medians of round-robin repeats.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import warnings

import torch
import torch.nn.functional as F
from explainers import plain, sync, timed

import xcnn
from xcnn.inspection import filter_importance, layer_probes, pooled_features
from xcnn.models import Classifier, stage_layers
from xcnn.nets import ShapesNet
from xcnn.pipelines import benchmark_data

warnings.filterwarnings("ignore")


def build(name: str, n: int, device: torch.device) -> tuple[Classifier, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    if name == "shapesnet":
        kwargs = {"num_classes": 6, "widths": [16, 32, 64, 128], "strides": [2, 1, 2, 2, 1]}
        model = Classifier(ShapesNet(**kwargs), name="shapesnet", input_size=(64, 64))
        data = benchmark_data(n, 64)
    else:
        model = xcnn.load_model(name, pretrained=False)
        gen = torch.Generator().manual_seed(0)
        data = {"image": torch.rand(n, 3, 224, 224, generator=gen), "label": torch.arange(n) % model.num_classes}
    return model.to(device).eval(), {k: v.to(device) for k, v in data.items()}


def forward_backward(model: Classifier, data: dict, batch: int):
    def run() -> None:
        for start in range(0, len(data["label"]), batch):
            x, y = data["image"][start : start + batch], data["label"][start : start + batch]
            F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    return run


def forwards(model: Classifier, data: dict, batch: int):
    @torch.no_grad()
    def run() -> None:
        for start in range(0, len(data["image"]), batch):
            model(data["image"][start : start + batch])

    return run


def captum_taylor(model: Classifier, data: dict, layer: str, batch: int) -> torch.Tensor:
    """The anchor: captum's LayerGradientXActivation at the layer, summed per channel (the same numbers,
    tested in tests/test_inspection.py)."""
    from captum.attr import LayerGradientXActivation

    method = LayerGradientXActivation(model, model.backbone.get_submodule(layer))
    total = 0
    for start in range(0, len(data["label"]), batch):
        x, y = data["image"][start : start + batch], data["label"][start : start + batch]
        total = total + method.attribute(x, target=y).sum((2, 3)).abs().sum(0)
    return total / len(data["label"])


def importance_rows(args, device) -> list[dict]:
    rows = []
    for name, n, batch, layers in [("shapesnet", 512, 64, ["layer2", "layer4"]), ("resnet18", 64, 16, ["layer3"])]:
        rows += rows_for(name, n, batch, layers, args, device)
    return rows


def rows_for(name: str, n: int, batch: int, layers: list[str], args, device: torch.device) -> list[dict]:
    model, data = build(name, n, device)
    contenders = {
        ("forward+backward", ""): plain(forward_backward(model, data, batch)),
        ("forwards", ""): plain(forwards(model, data, batch)),
        ("pooled features", "stages"): plain(
            lambda: pooled_features(model, data, stage_layers(model), batch_size=batch, progress=False)
        ),
        ("probes", "stages"): plain(lambda: layer_probes(model, data, batch_size=batch, progress=False)),
    }
    for layer in layers:
        contenders[("taylor", layer)] = plain(
            lambda layer=layer: filter_importance(model, data, layer, "taylor", batch_size=batch, progress=False)
        )
        contenders[("captum", layer)] = plain(lambda layer=layer: captum_taylor(model, data, layer, batch))
    times = timed(contenders, device, args.repeats)
    fb, fw = times[("forward+backward", "")], times[("forwards", "")]
    rows = []
    for (what, layer), secs in times.items():
        row = {"model": name, "images": n, "what": what, "layer": layer, "seconds": secs,
               "per_forward_backward": secs / fb, "per_forwards": secs / fw}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def monitor_rows(args, device) -> list[dict]:
    from xcnn.training.benchmark import fit_benchmark

    rows = []
    for monitored in (False, True, False, True):  # alternated: a drift in machine speed hits both alike
        with tempfile.TemporaryDirectory() as out:
            _, results = fit_benchmark(out, epochs=args.epochs, device=device, progress=False,
                                       monitor_every=1 if monitored else None)  # fmt: skip
        seconds = results["train_seconds"]  # the training loop (validation and monitor checks included)
        rows.append({"monitored": monitored, "epochs": args.epochs, "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
    return rows


PEAK_SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
from inspection import build
from explainers import rss_mib
from xcnn.inspection import layer_probes
device = torch.device({device!r})
model, data = build("shapesnet", {n}, device)
if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
else:
    base = rss_mib()
layer_probes(model, data, batch_size=64, progress=False)
if device.type == "cuda":
    torch.cuda.synchronize(); print((torch.cuda.max_memory_allocated() - base) / 2**20)
else:
    print(int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024 - base)
"""


def memory_rows(device) -> list[dict]:
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    from xcnn.models import stage_layers, survey_layers

    model, _ = build("shapesnet", 1, torch.device("cpu"))
    shapes = survey_layers(model).shapes
    per_map = sum(torch.Size(shapes[name]).numel() for name in stage_layers(model))  # floats per image
    rows = []
    for n in (256, 2048):
        code = PEAK_SCRIPT.format(here=here, device=str(device), n=n)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rows.append({"images": n, "peak_mib": float(out.stdout.strip().splitlines()[-1]),
                     "all_stage_maps_mib": n * per_map * 4 / 2**20})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per monitoring run (default: %(default)s)")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}  # fmt: skip
    print(json.dumps(env), flush=True)
    importance = importance_rows(args, device)
    memory = memory_rows(device)
    monitor = monitor_rows(args, device)
    sync(device)
    print("\n| model | images | what | layer | ms | / forward+backward | / forwards |")
    print("|---|---:|---|---|---:|---:|---:|")
    for r in importance:
        print(f"| {r['model']} | {r['images']} | {r['what']} | {r['layer']} | {1e3 * r['seconds']:.0f} | "
              f"{r['per_forward_backward']:.2f} | {r['per_forwards']:.2f} |")  # fmt: skip
    plain = [r["seconds"] for r in monitor if not r["monitored"]]
    watched = [r["seconds"] for r in monitor if r["monitored"]]
    print(f"\nmonitoring every epoch: {min(watched):.1f} s vs {min(plain):.1f} s for {args.epochs} epoch(s) "
          f"(best of 2 each): +{100 * (min(watched) / min(plain) - 1):.1f} %")  # fmt: skip
    for r in memory:
        print(f"layer_probes peak memory, {r['images']} images: {r['peak_mib']:.0f} MiB "
              f"(all four stage maps of those images would be {r['all_stage_maps_mib']:.0f} MiB)")  # fmt: skip
    if args.out:
        from xcnn._io import write_json

        write_json(args.out, {"env": env, "importance": importance, "memory": memory, "monitor": monitor})


if __name__ == "__main__":
    main()
