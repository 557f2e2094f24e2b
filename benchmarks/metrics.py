"""Throughput of the batched faithfulness metrics against a per-step loop, measured in the same run.

    python benchmarks/metrics.py                       # CPU: ShapesNet at 64x64 and ResNet-50 at 224x224
    python benchmarks/metrics.py --device cuda --images 1000 --models resnet50

The per-step loop is how the RISE reference code computes insertion/deletion: for every image and every
step, perturb one image and run the model on it alone. xcnn builds all (image, step) pairs in batches.
Both compute the same curves (checked here); the table gives images per second and the speed-up.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch
from torchvision.transforms.functional import gaussian_blur

import xcnn
from xcnn.metrics import average_drop_increase, insertion_deletion
from xcnn.metrics.faithfulness import pixel_ranks


def per_step_loop(model, images, maps, targets, steps: int = 28) -> dict[str, torch.Tensor]:
    """Insertion and deletion curves one forward pass (of one image) per step: the unbatched reference."""
    b, _, h, w = images.shape
    per_step = math.ceil(h * w / steps)
    ranks = pixel_ranks(maps)
    blurred = gaussian_blur(images, kernel_size=[11, 11], sigma=[5.0, 5.0])
    curves = {"deletion": torch.zeros(b, steps + 1), "insertion": torch.zeros(b, steps + 1)}
    with torch.inference_mode():
        for i in range(b):
            for kind, start, finish in (
                ("deletion", images[i], torch.zeros_like(images[i])),
                ("insertion", blurred[i], images[i]),
            ):
                for k in range(steps + 1):
                    changed = (ranks[i] < k * per_step)[None]
                    x = torch.where(changed, finish, start)[None]
                    curves[kind][i, k] = model(x).softmax(1)[0, targets[i]]
    return curves


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(name: str, n: int, batch_size: int, device: torch.device, loop_images: int) -> list[str]:
    torch.manual_seed(0)
    # random weights (the timings do not depend on them), except the bundled model's own
    model = xcnn.load_model(name, pretrained=name == xcnn.models.BUNDLED_MODEL, device=device).eval()
    size = model.input_size
    images = torch.rand(n, 3, *size, device=device)
    maps = torch.rand(n, *size, device=device)
    with torch.no_grad():
        targets = model(images[:batch_size]).argmax(1).repeat(math.ceil(n / batch_size))[:n]

    sync(device)
    start = time.perf_counter()
    ours = insertion_deletion(model, images, maps, targets, batch_size=batch_size, per_image=True)
    sync(device)
    batched = time.perf_counter() - start

    m = min(loop_images, n)
    start = time.perf_counter()
    ref = per_step_loop(model, images[:m], maps[:m], targets[:m])
    sync(device)
    looped = time.perf_counter() - start
    for kind in ("insertion", "deletion"):
        torch.testing.assert_close(ours["curves"][kind][:m], ref[kind].cpu(), atol=2e-4, rtol=1e-3)

    start = time.perf_counter()
    average_drop_increase(model, images, maps, targets, batch_size=batch_size)
    sync(device)
    adic = time.perf_counter() - start
    rows = n * 2 * 29  # (image, step) pairs the batched run put through the model: 2 curves x (steps + 1)
    bare = torch.rand(batch_size, 3, *size, device=device)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(math.ceil(rows / batch_size)):
            model(bare)
    sync(device)
    bound = time.perf_counter() - start
    ours_ips, loop_ips = n / batched, m / looped
    return [
        f"| {name} | {size[0]}x{size[1]} | insertion+deletion, batched ({batch_size} rows) | {n} | {batched:.1f} | {ours_ips:.2f} | {ours_ips / loop_ips:.1f}x |",
        f"| {name} | {size[0]}x{size[1]} | insertion+deletion, per-step loop | {m} | {looped:.1f} | {loop_ips:.2f} | 1.0x |",
        f"| {name} | {size[0]}x{size[1]} | AD/IC at 100/50/15 %, batched | {n} | {adic:.2f} | {n / adic:.1f} | |",
        f"| {name} | {size[0]}x{size[1]} | the same {rows} rows as bare forwards (the bound) | {n} | {bound:.1f} | {n / bound:.2f} | {loop_ips and (n / bound) / loop_ips:.1f}x |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="shapesnet,resnet50")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help="images for the batched metrics (default: 64 for small models, 8 for ImageNet ones on CPU)",
    )
    parser.add_argument(
        "--loop-images",
        type=int,
        default=None,
        help="images for the per-step loop (default: a quarter of --images, at least 2)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="rows per forward pass (default 64, 16 for ImageNet models on CPU)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    env = f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads" + (
        f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""
    )
    print(f"# metrics benchmark ({env})\n")
    print("| model | input | what | images | seconds | images / s | speed-up |\n|---|---|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        small = name == "shapesnet"
        n = args.images or (64 if small or device.type == "cuda" else 8)
        batch = args.batch_size or (64 if small or device.type == "cuda" else 16)
        loop = args.loop_images or max(2, n // 4)
        for line in run(name, n, batch, device, loop):
            print(line, flush=True)


if __name__ == "__main__":
    main()
