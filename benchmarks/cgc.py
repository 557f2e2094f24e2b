"""What a CGC training step costs against a plain cross-entropy step on the same batch, in one run.

    python benchmarks/cgc.py                  # about 4 minutes on 2 CPU cores
    python benchmarks/cgc.py --device cuda    # also the float16 (AMP) CGC step

One optimiser step (forward, loss, backward, AdamW) on one fixed batch, for: cross-entropy on the batch
(the plain step), cross-entropy on the two views CGC sees (x and T(x): the lam=0 baseline), CGC with
InfoNCE, and CGC with the L2 consistency. Models: ShapesNet at 64x64 (batch 64) and ResNet-18 at 224x224
(random weights; batch 16 on CPU). Times are medians of round-robin repeats; peak memory is measured in a
fresh process per step kind (CUDA: peak allocated; CPU: the process's high-water mark of resident memory,
VmHWM, above its RSS after setup).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import warnings

import torch
import torch.nn.functional as F
from explainers import sync, timed

import xcnn
from xcnn.models import Classifier
from xcnn.nets import ShapesNet
from xcnn.training.cgc import CGCTraining

warnings.filterwarnings("ignore")

KINDS = ("ce", "ce_two_views", "cgc", "cgc_l2")


def build(model_name: str, batch: int, device: torch.device) -> tuple[Classifier, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if model_name == "shapesnet":
        kwargs = {"num_classes": 6, "widths": [16, 32, 64, 128], "strides": [2, 1, 2, 2, 1]}
        model = Classifier(ShapesNet(**kwargs), name="shapesnet", input_size=(64, 64),
                           spec={"arch": "shapesnet", "kwargs": kwargs})  # fmt: skip
    else:
        model = xcnn.load_model(model_name, pretrained=False)
    model = model.to(device).train()
    x = torch.rand(batch, 3, *model.input_size, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    return model, x, y


def step_fn(kind: str, model: Classifier, x: torch.Tensor, y: torch.Tensor, amp: bool):
    """One optimiser step of ``kind``, as a closure."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    layer = xcnn.default_layer(model)
    lam = {"ce": 0.0, "ce_two_views": 0.0, "cgc": 0.5, "cgc_l2": 0.5}[kind]
    net = CGCTraining(model, lam=lam, tau=0.5, consistency="l2" if kind == "cgc_l2" else "contrastive",
                      cam="gradcam", layer=layer)  # fmt: skip
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def run() -> None:
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            loss = F.cross_entropy(model(x), y) if kind == "ce" else net(x, y)["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return run


PEAK_SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
from cgc import build, step_fn
from explainers import rss_mib
device = torch.device({device!r})
model, x, y = build({model!r}, {batch}, device)
run = step_fn({kind!r}, model, x, y, {amp})
if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
else:
    base = rss_mib()
for _ in range(2):
    run()
if device.type == "cuda":
    torch.cuda.synchronize(); print((torch.cuda.max_memory_allocated() - base) / 2**20)
else:  # VmHWM belongs to this address space (ru_maxrss would carry the parent's peak across fork + exec)
    status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
    print(int(status) / 1024 - base)
"""


def peak_mib(model: str, batch: int, kind: str, device: torch.device, amp: bool) -> float:
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    code = PEAK_SCRIPT.format(here=here, device=str(device), model=model, batch=batch, kind=kind, amp=amp)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def rows_for(model_name: str, batch: int, args, device: torch.device) -> list[dict]:
    model, x, y = build(model_name, batch, device)
    amps = [False, True] if device.type == "cuda" else [False]
    rows = []
    for amp in amps:
        contenders = {}
        for kind in KINDS:
            fn = step_fn(kind, model, x, y, amp)
            contenders[(kind, "")] = lambda fn=fn: (fn, lambda: None)
        times = timed(contenders, device, args.repeats)
        for kind in KINDS:
            secs = times[(kind, "")]
            peak = peak_mib(model_name, batch, kind, device, amp)
            rows.append({"model": model_name, "batch": batch, "amp": amp, "step": kind, "seconds": secs,
                         "ratio_to_ce": secs / times[("ce", "")], "peak_mib": peak})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        sync(device)
    base = {(r["model"], r["amp"]): r["peak_mib"] for r in rows if r["step"] == "ce"}
    for r in rows:
        r["peak_ratio_to_ce"] = r["peak_mib"] / base[(r["model"], r["amp"])]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resnet-batch", type=int, default=None, help="default: 16 on CPU, 64 on CUDA")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    resnet_batch = args.resnet_batch or (64 if device.type == "cuda" else 16)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}  # fmt: skip
    print(json.dumps(env), flush=True)
    rows = rows_for("shapesnet", 64, args, device) + rows_for("resnet18", resnet_batch, args, device)
    print("\n| model | batch | precision | step | ms | / CE step | peak MiB | / CE step |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {'fp16 AMP' if r['amp'] else 'fp32'} | {r['step']} | "
              f"{1e3 * r['seconds']:.0f} | {r['ratio_to_ce']:.2f} | {r['peak_mib']:.0f} | {r['peak_ratio_to_ce']:.2f} |")  # fmt: skip
    if args.out:
        from xcnn._io import write_json

        write_json(args.out, {"env": env, "rows": rows})


if __name__ == "__main__":
    main()
