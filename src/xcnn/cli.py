"""The ``xcnn`` command line: ``xcnn explain`` (more subcommands arrive with later features)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["main"]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for, but no CUDA GPU is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} GPUs")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _unique_labels(sources: Sequence[str]) -> list[str]:
    """File-name-safe labels, one per image, never two alike (``cat``, ``cat-2``, ...)."""
    from .data.images import image_label

    labels: list[str] = []
    for src in sources:
        base = label = image_label(src)
        n = 1
        while label in labels:
            n += 1
            label = f"{base}-{n}"
        labels.append(label)
    return labels


def _parse_value(text: str) -> object:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _method_options(methods: list[str], args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """Per-method keyword options: the shared flags where a method takes them, plus ``--opt NAME=VALUE``."""
    from .explain import explainer_options

    extra: dict[str, object] = {}
    for item in args.opt:
        if "=" not in item:
            raise ValueError(f"--opt expects NAME=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        extra[key.strip()] = _parse_value(value.strip())
    shared = {"batch_size": args.batch_size, "seed": args.seed, "amp": args.amp}
    options = {}
    for method in methods:
        accepted = set(explainer_options(method))
        options[method] = {k: v for k, v in {**shared, **extra}.items() if k in accepted and v is not None}
    for key in extra:
        if not any(key in explainer_options(m) for m in methods):
            raise ValueError(f"--opt {key}: none of the methods {methods} has this option")
    return options


def cmd_explain(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import explainer, list_explainers, load_model
    from ._io import prepare_out_dir, write_json, write_npy
    from .explain import explainer_class
    from .data.images import load_image
    from .models import default_layer
    from .viz.overlay import save_grid, save_overlay

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in list_explainers()]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown or args.method!r}; available: {', '.join(list_explainers())}")
    if args.target != "auto" and not args.target.lstrip("-").isdigit():
        raise ValueError(f"--target must be 'auto' or a class index, got {args.target!r}")
    device = _device(args.device)
    out = prepare_out_dir(args.out)
    model = load_model(args.model, weights=args.weights, device=device)
    layer_methods = [m for m in methods if explainer_class(m).uses_layer]
    if args.layer and not layer_methods:
        raise ValueError(f"--layer was given, but none of the methods {methods} uses a layer")
    layer = args.layer.split(",") if args.layer else [default_layer(model)] if layer_methods else None
    options = _method_options(methods, args)
    images = torch.stack([load_image(src, model.input_size) for src in args.images]).to(device)

    with torch.inference_mode():
        probs = torch.cat([model(chunk).float().softmax(1) for chunk in images.split(args.batch_size or 32)])
    targets = probs.argmax(1) if args.target == "auto" else torch.full((len(images),), int(args.target), device=device)

    labels = _unique_labels(args.images)

    maps: dict[str, torch.Tensor] = {}
    chunk = args.image_batch
    with tqdm(total=len(methods) * len(images), desc="explaining", unit="map", disable=None) as bar:
        for method in methods:
            expl = explainer(method, model, layer=layer if method in layer_methods else None, **options[method])
            parts = []
            for start in range(0, len(images), chunk):
                parts.append(expl(images[start : start + chunk], targets[start : start + chunk]).cpu())
                bar.update(len(parts[-1]))
            maps[method] = torch.cat(parts)

    records = []
    for i, (src, label) in enumerate(zip(args.images, labels)):
        top_p, top_i = probs[i].topk(min(5, probs.shape[1]))
        files = {}
        for method in methods:
            png = out / f"{label}_{_safe(method)}.png"
            save_overlay(png, images[i].cpu(), maps[method][i], alpha=args.alpha)
            files[method] = {"overlay": png.name}
            if args.save_maps:
                npy = out / f"{label}_{_safe(method)}.npy"
                write_npy(npy, maps[method][i].numpy().astype("float32"))
                files[method]["map"] = npy.name
        t = int(targets[i])
        grid = out / f"{label}_grid.png"
        save_grid(grid, images[i].cpu(), {m: maps[m][i] for m in methods}, title=f"{label}: explaining {t} {model.class_name(t)}")
        records.append(
            {
                "image": str(src),
                "label": label,
                "target": {"class": t, "name": model.class_name(t)},
                "top5": [
                    {"class": int(c), "name": model.class_name(int(c)), "probability": round(float(p), 6)}
                    for p, c in zip(top_p, top_i)
                ],
                "grid": grid.name,
                "maps": files,
            }
        )
    write_json(out / "predictions.json", {"model": model.name, "layers": layer, "methods": methods, "images": records})
    for rec in records:
        best = rec["top5"][0]
        print(f"{rec['label']}: {best['name']} ({best['probability']:.1%}) -> {out / rec['grid']}")
    return 0


def _safe(name: str) -> str:
    return name.replace("+", "p").replace("/", "_")


def build_parser() -> argparse.ArgumentParser:
    from .explain import list_explainers

    parser = argparse.ArgumentParser(prog="xcnn", description="Explain and build interpretable CNN image classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser(
        "explain",
        help="explain a model's predictions on image files or bundled photos",
        description="Write one overlay PNG per image and method, a grid PNG per image, and predictions.json "
        "(top-5 classes with names and probabilities).",
    )
    ex.add_argument("images", nargs="+", help="image files, or bundled photos as sample:NAME (chelsea, coffee, astronaut, rocket, camera)")
    ex.add_argument("--model", default="efficientnet_lite0", help="efficientnet_lite0 (bundled ImageNet weights), or a torchvision/timm name (default: %(default)s)")
    ex.add_argument("--weights", default=None, help="weights for --model: .safetensors or a weights-only PyTorch state dict")
    ex.add_argument("--method", default="gradcam", help=f"comma-separated methods: {', '.join(list_explainers())} (default: %(default)s)")
    ex.add_argument("--layer", default=None, help="layer name(s) in the backbone, comma-separated (several are averaged); default: the last spatial layer")
    ex.add_argument("--target", default="auto", help="class to explain: 'auto' = each image's top-1 prediction, or a class index")
    ex.add_argument("--out", default="xcnn-out", help="output folder (created if missing; default: %(default)s)")
    ex.add_argument("--save-maps", action="store_true", help="also write each raw map as .npy (float32 [H,W] in [0,1])")
    ex.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    ex.add_argument("--batch-size", type=_positive_int, default=None, help="forward-pass batch for inner loops (Score-CAM channels, RISE masks, occlusion windows, IG steps)")
    ex.add_argument("--image-batch", type=_positive_int, default=8, help="images explained together in one call (default: %(default)s)")
    ex.add_argument("--seed", type=int, default=None, help="seed for stochastic methods (rise, smoothgrad, random)")
    ex.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    ex.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in overlays (default: %(default)s)")
    ex.add_argument("--opt", action="append", default=[], metavar="NAME=VALUE", help="method option, e.g. --opt masks=1000 (RISE); repeatable")
    ex.set_defaults(func=cmd_explain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError) as err:
        print(f"xcnn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
