"""What a prototype network costs: its forward pass against the backbone's own (10 prototypes per class),
push over a training set against one forward pass over it, and MDM on a prototype against MDM on a class,
in one run.

    python benchmarks/protopnet.py                       # about 4 minutes on 2 CPU cores
    python benchmarks/protopnet.py --device cuda

Models (random weights: timing does not depend on them): the benchmark ShapesNet (64x64, 6 classes, 60
prototypes), ResNet-50 and EfficientNet-Lite0 (224x224, 1000 classes, 10 000 prototypes of 128 channels).
Medians of round-robin repeats. Push: the whole of ``push_prototypes`` (nearest patches, then each source
image's box) against a no-grad forward pass of the prototype network over the same images and batches; on
CUDA also the peak memory of each, which shows that push holds no latent maps beyond a batch's. No anchor
library implements ProtoPNet, so there is no anchor column.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import torch
from explainers import plain, sync, timed
from torch.utils.data import DataLoader

import xcnn
from xcnn.data.synthetic import CLASSES, Shapes
from xcnn.interpretable import find_prototype_layer, protopnet, prototype_view
from xcnn.models import Classifier
from xcnn.nets import ShapesNet
from xcnn.training.benchmark import InMemory
from xcnn.training.protopnet import push_prototypes

warnings.filterwarnings("ignore")


def shapesnet() -> Classifier:
    torch.manual_seed(0)
    return Classifier(ShapesNet(6), name="shapesnet", input_size=(64, 64), class_names=CLASSES)


def forward_rows(args, device) -> list[dict]:
    rows = []
    cases = [("ShapesNet 64x64", shapesnet, args.batch)]
    if not args.quick:
        cases += [
            ("ResNet-50 224x224", lambda: xcnn.load_model("resnet50", pretrained=False), args.big_batch),
            ("EfficientNet-Lite0 224x224", lambda: xcnn.load_model("efficientnet_lite0"), args.big_batch),
        ]
    for name, make, batch in cases:
        model = make().to(device).eval()
        net = protopnet(model, 10).to(device).eval()
        x = torch.rand(batch, 3, *model.input_size, device=device)

        def forward(m, x=x):
            with torch.no_grad():
                m(x)

        t = timed(
            {("backbone", ""): plain(lambda m=model: forward(m)), ("protopnet", ""): plain(lambda m=net: forward(m))},
            device, args.repeats,
        )  # fmt: skip
        layer = find_prototype_layer(net)[1]
        rows.append({
            "model": name, "batch": batch, "prototypes": layer.num_prototypes, "dim": layer.dim,
            "backbone_forward_s": t[("backbone", "")], "protopnet_forward_s": t[("protopnet", "")],
            "ratio": t[("protopnet", "")] / t[("backbone", "")],
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def push_rows(args, device) -> list[dict]:
    rows = []
    for n in args.push_images:
        data = InMemory(Shapes("train", n, size=64, seed=0))
        net = protopnet(shapesnet(), 10).to(device).eval()

        def forward_pass(net=net, data=data):
            with torch.no_grad():
                for batch in DataLoader(data, batch_size=64):
                    net(batch["image"].to(device))

        def push(net=net, data=data):
            push_prototypes(net, data, batch_size=64, device=device)

        peaks = {}
        for key, fn in (("forward", forward_pass), ("push", push)):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn()
                peaks[key] = (torch.cuda.max_memory_allocated() - base) / 2**20
        t = timed({("forward", ""): plain(forward_pass), ("push", ""): plain(push)}, device, args.push_repeats)
        rows.append({
            "images": n, "forward_pass_s": t[("forward", "")], "push_s": t[("push", "")],
            "ratio": t[("push", "")] / t[("forward", "")],
            **({"forward_peak_mib": peaks["forward"], "push_peak_mib": peaks["push"]} if peaks else {}),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def mdm_rows(args, device) -> list[dict]:
    net = protopnet(shapesnet(), 10).to(device).eval()
    view = prototype_view(net)
    x = torch.rand(args.mdm_images, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        classes = net(x).argmax(1)
    prototypes = classes * 10  # the first prototype of each image's class
    options = {"steps": args.mdm_steps, "progress": False}
    on_class = xcnn.explainer("mdm", net, **options)
    on_prototype = xcnn.explainer("mdm", view, **options)
    t = timed(
        {("class", ""): plain(lambda: on_class(x, classes)), ("prototype", ""): plain(lambda: on_prototype(x, prototypes))},
        device, args.mdm_repeats,
    )  # fmt: skip
    row = {
        "images": args.mdm_images, "steps": args.mdm_steps, "mdm_on_class_s": t[("class", "")],
        "mdm_on_prototype_s": t[("prototype", "")], "ratio": t[("prototype", "")] / t[("class", "")],
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    return [row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64, help="ShapesNet forward batch (default: %(default)s)")
    parser.add_argument("--big-batch", type=int, default=8, help="224x224 forward batch (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--push-images", type=lambda s: [int(v) for v in s.split(",")], default=[2000, 6000])
    parser.add_argument("--push-repeats", type=int, default=3)
    parser.add_argument("--mdm-images", type=int, default=8)
    parser.add_argument("--mdm-steps", type=int, default=100)
    parser.add_argument("--mdm-repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="ShapesNet only, for a smoke run")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}  # fmt: skip
    print(json.dumps(env), flush=True)
    start = time.perf_counter()
    result = {"env": env, "forward": forward_rows(args, device), "push": push_rows(args, device),
              "mdm": mdm_rows(args, device)}  # fmt: skip
    sync(device)
    result["seconds"] = time.perf_counter() - start
    if args.out:
        from xcnn._io import write_json

        write_json(args.out, result)


if __name__ == "__main__":
    main()
