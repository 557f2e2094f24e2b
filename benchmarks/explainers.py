"""Speed and memory of xcnn's explainers against the model's own forward pass and the anchor libraries
(grad-cam, torchcam, captum), all measured in the same run.

    python benchmarks/explainers.py                                 # CPU defaults (minutes)
    python benchmarks/explainers.py --device cuda --batch 32 --rise-masks 4000 --scorecam-images 4

Prints one Markdown table per model: seconds per image, ratio to the model's forward pass on the same
batch, and ratio of the anchor's time to ours (> 1 = xcnn is faster). Results go in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from collections.abc import Callable

import torch

import xcnn

warnings.filterwarnings("ignore")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    from pytorch_grad_cam import GradCAM as GCGradCAM
    from pytorch_grad_cam import GradCAMPlusPlus as GCGradCAMPP
    from pytorch_grad_cam import ScoreCAM as GCScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torchcam.methods import GradCAM as TCGradCAM
    from torchcam.methods import GradCAMpp as TCGradCAMpp
    from torchcam.methods import ScoreCAM as TCScoreCAM

    torch.manual_seed(0)
    model = xcnn.load_model(name, device=device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    layer = xcnn.default_layer(model)
    layer_module = dict(model.backbone.named_modules())[layer]
    size = model.input_size
    x = torch.rand(args.batch, 3, *size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        targets = model(x).argmax(1)
    b = args.batch
    rows: list[dict] = []

    def add(method: str, impl: str, secs: float, images: int, ref: str | None = None, extra: str = "") -> None:
        rows.append({"model": name, "method": method, "impl": impl, "s_per_image": secs / images, "ref": ref, "note": extra})

    def forward():
        with torch.inference_mode():
            model(x)

    def forward_backward():  # the model's own forward + full backward (to the input and the weights)
        xi = x.clone().requires_grad_(True)
        model(xi).gather(1, targets[:, None]).sum().backward()
        model.zero_grad(set_to_none=True)

    add("forward", "model", seconds(forward, device, args.repeats), b)
    add("forward+backward", "model", seconds(forward_backward, device, args.repeats), b)
    fwd = rows[0]["s_per_image"]

    # gradient CAMs ------------------------------------------------------------------------------------
    for method in ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"]:
        expl = xcnn.explainer(method, model, layer=layer)
        add(method, "xcnn", seconds(lambda: expl(x, targets), device, args.repeats), b)
    gc_targets = [ClassifierOutputTarget(int(t)) for t in targets]
    for method, cls in [("gradcam", GCGradCAM), ("gradcam++", GCGradCAMPP)]:
        with cls(model=model, target_layers=[layer_module]) as cam:
            add(method, "grad-cam", seconds(lambda: cam(input_tensor=x, targets=gc_targets), device, args.repeats), b, ref=method)
    for method, cls in [("gradcam", TCGradCAM), ("gradcam++", TCGradCAMpp)]:
        extractor = cls(model, target_layer=layer_module)

        def run_torchcam():
            out = model(x)
            return extractor(targets.tolist(), out)

        add(method, "torchcam", seconds(run_torchcam, device, args.repeats), b, ref=method)
        extractor.remove_hooks()

    # input gradients ----------------------------------------------------------------------------------
    from captum.attr import IntegratedGradients, Saliency

    ig = xcnn.explainer("integrated_gradients", model, steps=args.ig_steps, batch_size=args.inner_batch)
    add("integrated_gradients", "xcnn", seconds(lambda: ig(x, targets), device, 1), b, extra=f"{args.ig_steps} steps")
    captum_ig = IntegratedGradients(model)
    add(
        "integrated_gradients", "captum",
        seconds(lambda: captum_ig.attribute(x, target=targets, n_steps=args.ig_steps, method="riemann_trapezoid", internal_batch_size=args.inner_batch), device, 1),
        b, ref="integrated_gradients", extra=f"{args.ig_steps} steps",
    )  # fmt: skip
    sal = xcnn.explainer("saliency", model)
    add("saliency", "xcnn", seconds(lambda: sal(x, targets), device, args.repeats), b)
    captum_sal = Saliency(model)
    add("saliency", "captum", seconds(lambda: captum_sal.attribute(x, target=targets, abs=True), device, args.repeats), b, ref="saliency")

    # Score-CAM (forward passes per channel) ----------------------------------------------------------
    n_sc = args.scorecam_images
    xs, ts = x[:n_sc], targets[:n_sc]
    score = xcnn.explainer("scorecam", model, layer=layer, batch_size=args.inner_batch, amp=args.amp)
    add("scorecam", "xcnn", seconds(lambda: score(xs, ts), device, 1, warmup=0), n_sc)
    tc_score = TCScoreCAM(model, target_layer=layer_module, batch_size=args.inner_batch)

    def run_tc_score():
        with torch.inference_mode():
            out = model(xs)
            return tc_score(ts.tolist(), out)

    add("scorecam", "torchcam", seconds(run_tc_score, device, 1, warmup=0), n_sc, ref="scorecam")
    tc_score.remove_hooks()
    if args.gradcam_scorecam:
        with GCScoreCAM(model=model, target_layers=[layer_module]) as cam:
            cam.batch_size = args.inner_batch
            gct = [ClassifierOutputTarget(int(t)) for t in ts]
            add("scorecam", "grad-cam", seconds(lambda: cam(input_tensor=xs, targets=gct), device, 1, warmup=0), n_sc, ref="scorecam")

    # RISE against the same number of plain forward passes ------------------------------------------
    rise = xcnn.explainer("rise", model, masks=args.rise_masks, batch_size=args.inner_batch, amp=args.amp)
    x1, t1 = x[:1], targets[:1]
    rise_s = seconds(lambda: rise(x1, t1), device, 1, warmup=0)
    plain = torch.rand(args.inner_batch, 3, *size, device=device)

    def plain_forwards():
        with torch.inference_mode():
            for _ in range(-(-args.rise_masks // args.inner_batch)):
                model(plain)

    plain_s = seconds(plain_forwards, device, 1, warmup=0)
    add("rise", "xcnn", rise_s, 1, extra=f"{args.rise_masks} masks; {rise_s / plain_s:.2f}x {args.rise_masks} plain forwards")
    add("rise", "plain forwards", plain_s, 1, ref="rise", extra=f"{args.rise_masks} forwards at batch {args.inner_batch}")

    # memory across consecutive calls ----------------------------------------------------------------
    gc = xcnn.explainer("gradcam", model, layer=layer)
    readings = []
    for i in range(args.memory_calls):
        gc(x, targets)
        if i in (9, args.memory_calls - 1):
            sync(device)
            readings.append(torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_mib())
    unit = "peak CUDA MiB" if device.type == "cuda" else "RSS MiB"
    rows.append({"model": name, "method": "gradcam memory", "impl": "xcnn", "s_per_image": float("nan"), "ref": None,
                 "note": f"{unit} after 10 calls {readings[0]:.0f}, after {args.memory_calls} calls {readings[1]:.0f}"})  # fmt: skip
    for row in rows:
        row["x_forward"] = row["s_per_image"] / fwd
    return rows


def table(rows: list[dict]) -> str:
    ours = {(r["model"], r["method"]): r["s_per_image"] for r in rows if r["impl"] == "xcnn"}
    lines = ["| model | method | implementation | ms / image | × forward | anchor ÷ xcnn | note |", "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        speedup = ""
        if r["ref"] is not None and (r["model"], r["ref"]) in ours:
            speedup = f"{r['s_per_image'] / ours[(r['model'], r['ref'])]:.2f}"
        ms = "" if r["s_per_image"] != r["s_per_image"] else f"{1000 * r['s_per_image']:.1f}"
        xf = "" if r["s_per_image"] != r["s_per_image"] else f"{r['x_forward']:.2f}"
        lines.append(f"| {r['model']} | {r['method']} | {r['impl']} | {ms} | {xf} | {speedup} | {r['note']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,efficientnet_lite0")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4, help="images per call for gradient methods (default %(default)s)")
    parser.add_argument("--inner-batch", type=int, default=None, help="rows per forward pass in inner loops (default: 8 on CPU, 64 on CUDA)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ig-steps", type=int, default=50)
    parser.add_argument("--scorecam-images", type=int, default=1)
    parser.add_argument("--gradcam-scorecam", action="store_true", help="also time grad-cam's Score-CAM (slow: minutes per image on CPU)")
    parser.add_argument("--rise-masks", type=int, default=400)
    parser.add_argument("--memory-calls", type=int, default=200)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for xcnn's forward-only methods on CUDA")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.inner_batch is None:
        args.inner_batch = 64 if device.type == "cuda" else 8
    env = f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        env += f", {torch.cuda.get_device_name()}"
    print(f"# explainers benchmark ({env})\n")
    all_rows = []
    for name in args.models.split(","):
        rows = bench_model(name, args, device)
        all_rows += rows
        print(table(rows), "\n", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env, "args": vars(args), "rows": all_rows}, fh, indent=2)


if __name__ == "__main__":
    main()
