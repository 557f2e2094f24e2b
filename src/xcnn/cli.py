"""The ``xcnn`` command line: ``explain``, ``evaluate``, ``train benchmark|tame|lap|cgc|protopnet``, ``inspect``, ``demo``."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch

from ._validate import check_number, read_json

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


def _number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    expected: str | None = None,
) -> Callable[[str], float | int]:
    """An argparse type: a finite number (an integer with ``integer``) within the bounds (``low_open`` /
    ``high_open`` exclude them), else a usage error that names the flag, what was ``expected`` (default: the
    range) and the text given."""
    left = "(-inf" if low is None else ("(" if low_open else "[") + (f"{low}" if integer else f"{low:g}")
    right = "inf)" if high is None else (f"{high}" if integer else f"{high:g}") + (")" if high_open else "]")
    expected = expected or f"{'an integer' if integer else 'a finite number'} in {left}, {right}"

    def parse(text: str) -> float | int:
        try:
            value = int(text) if integer else float(text)
            check_number("value", value, integer=integer, low=low, high=high, low_open=low_open, high_open=high_open)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        return value

    return parse


_positive_int = _number(1, integer=True, expected="a positive integer")
_non_negative_int = _number(0, integer=True, expected="an integer >= 0")
_positive_float = _number(0.0, low_open=True, expected="a positive number")
_probability = _number(0.0, 1.0)
_weight = _number(0.0)  # a loss weight: finite, >= 0
#: seeds go to torch, numpy and Python's random; [0, 2**32) is what all of them accept
_seed = _number(0, 2**32 - 1, integer=True)


def _digits(text: str) -> bool:
    """Whether ``text`` is a non-negative integer in ASCII digits (``"²".isdigit()`` is True, but int() fails)."""
    return text.isascii() and text.isdigit()


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
    if "," in text:  # a list, e.g. --opt scales=7,14,28
        return [_parse_value(part.strip()) for part in text.split(",") if part.strip()]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _method_options(
    methods: list[str], args: argparse.Namespace, also: Sequence[str] = ()
) -> dict[str, dict[str, object]]:
    """Per-method keyword options: the shared flags where a method takes them, plus ``--opt NAME=VALUE``
    (each must belong to one of ``methods`` or of the methods ``also`` run, such as a prototype search)."""
    from .explain import explainer_options

    extra: dict[str, object] = {}
    for item in args.opt:
        if "=" not in item:
            raise ValueError(f"--opt expects NAME=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        extra[key.strip()] = _parse_value(value.strip())
    shared = {"batch_size": args.batch_size, "seed": args.seed, "amp": args.amp, "head": args.tame_head}
    options = {}
    for method in [*methods, *also]:
        accepted = set(explainer_options(method))
        options[method] = {k: v for k, v in {**shared, **extra}.items() if k in accepted and v is not None}
    for key in extra:
        if not any(key in explainer_options(m) for m in [*methods, *also]):
            raise ValueError(f"--opt {key}: none of the methods {methods} has this option")
    return options


def cmd_explain(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import explainer, list_explainers
    from ._io import prepare_out_dir, write_json, write_npy
    from .data.images import load_image
    from .explain import explainer_class
    from .models import default_layer
    from .viz.overlay import save_grid, save_overlay
    from .viz.style import display_percentile

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in list_explainers()]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown or args.method!r}; available: {', '.join(list_explainers())}")
    if args.target != "auto" and not _digits(args.target):
        raise ValueError(f"--target must be 'auto' or a class index (an integer >= 0), got {args.target!r}")
    device = _device(args.device)
    _check_out_dir(args.out)
    model = _load_model(args, device)
    if args.target != "auto" and int(args.target) >= model.num_classes:
        raise ValueError(f"--target {args.target} is out of range: model has {model.num_classes} classes")
    layer_methods = [m for m in methods if explainer_class(m).uses_layer]
    if args.layer and not layer_methods:
        raise ValueError(f"--layer was given, but none of the methods {methods} uses a layer")
    layer = args.layer.split(",") if args.layer else [default_layer(model)] if layer_methods else None
    from .interpretable.protopnet import has_prototypes

    prototypes = has_prototypes(model)
    if not prototypes and (args.prototype_search is not None or args.prototypes is not None):
        raise ValueError("--prototype-search and --prototypes apply to a prototype network (xcnn train protopnet)")
    args.prototype_search = args.prototype_search or "mdm"
    args.prototypes = args.prototypes or 3
    search = [args.prototype_search] if prototypes and args.prototype_search != "none" else []
    options = _method_options(methods, args, also=search)
    sources = _prototype_sources(args.model, model) if prototypes else {}  # a malformed file fails before the work
    images = torch.stack([load_image(src, model.input_size) for src in args.images]).to(device)
    out = prepare_out_dir(args.out)

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

    # sparse maps (input gradients) are displayed clipped, as in the report; --save-maps writes them unclipped
    percentiles = {m: display_percentile(m) for m in methods}
    looks_like = _this_looks_like_that(model, images, targets, labels, out, args, options, sources)
    records = []
    for i, (src, label) in enumerate(zip(args.images, labels, strict=True)):
        top_p, top_i = probs[i].topk(min(5, probs.shape[1]))
        files = {}
        for method in methods:
            png = out / f"{label}_{_safe(method)}.png"
            save_overlay(png, images[i].cpu(), maps[method][i], alpha=args.alpha, percentile=percentiles[method])
            files[method] = {"overlay": png.name}
            if args.save_maps:
                npy = out / f"{label}_{_safe(method)}.npy"
                write_npy(npy, maps[method][i].numpy().astype("float32"))
                files[method]["map"] = npy.name
        t = int(targets[i])
        grid = out / f"{label}_grid.png"
        save_grid(
            grid,
            images[i].cpu(),
            {m: maps[m][i] for m in methods},
            title=f"{label}: explaining {t} {model.class_name(t)}",
            alpha=args.alpha,
            percentiles=percentiles,
        )
        records.append(
            {
                "image": str(src),
                "label": label,
                "target": {"class": t, "name": model.class_name(t)},
                "top5": [
                    {"class": int(c), "name": model.class_name(int(c)), "probability": round(float(p), 6)}
                    for p, c in zip(top_p, top_i, strict=True)
                ],
                "grid": grid.name,
                "maps": files,
                **({"prototypes": looks_like[i]} if looks_like is not None else {}),
            }
        )
    write_json(
        out / "predictions.json",
        {"model": model.name, "weights": model.weights_label, "layers": layer, "methods": methods, "images": records},
    )
    random = " [random weights]" if model.weights is None else ""
    for rec in records:
        best = rec["top5"][0]
        print(f"{rec['label']}: {best['name']} ({best['probability']:.1%}){random} -> {out / rec['grid']}")
    return 0


def _check_out_dir(path: str) -> None:
    """An output folder that exists as a file is an error before any work (the folder is made later)."""
    if Path(path).exists() and not Path(path).is_dir():
        raise NotADirectoryError(f"output folder {path} exists and is not a folder")


def _check_synthetic_memory(args: argparse.Namespace, size: int) -> None:
    """Refuse synthetic image counts (``--n-train``, ``--n-val``, ``--n-test``) whose images, kept in memory
    as float32 ``[N,3,S,S]`` with their masks, cannot fit this machine, before any image is drawn."""
    from ._validate import check_memory

    for flag in ("n_train", "n_val", "n_test"):
        n = getattr(args, flag, None)
        if n:
            check_memory(n * 3 * 4 * size * size * 1.2, f"--{flag.replace('_', '-')} {n} images of {size}x{size}")


def _prototype_sources(model_arg: object, model) -> dict[int, dict]:
    """The source records of a saved prototype network (``prototypes.json`` in its ``--model`` folder) by
    prototype index, every field checked before any work: ``"prototype"`` (an index of the model's
    prototypes) and ``"index"`` (its training image) are integers >= 0, ``"box"`` [top, left, bottom, right]
    is 4 ordered numbers >= 0, ``"file"`` is a string, and ``"image"`` a path that must stay inside the
    folder (resolved as ``"path"``). A malformed record is refused with a ValueError naming it: the file was
    written by ``xcnn train protopnet``, so a bad record means it was damaged or edited, and a silently
    thinner figure would hide that. {} for a model not loaded from a folder, or without the file."""
    from ._io import inside
    from .interpretable.protopnet import find_prototype_layer

    folder = Path(model_arg) if isinstance(model_arg, str) and Path(model_arg).is_dir() else None
    if folder is None or not (folder / "prototypes.json").is_file():
        return {}
    path = folder / "prototypes.json"
    records = read_json(path, "prototype sources")
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a list of prototype records, got {type(records).__name__}")
    count = find_prototype_layer(model)[1].num_prototypes
    sources: dict[int, dict] = {}
    for n, record in enumerate(records):
        where = f"{path}: record {n}"
        if not isinstance(record, dict):
            raise ValueError(f"{where} must be an object with 'prototype' and 'index', got {type(record).__name__}")
        try:
            j = check_number("'prototype'", record.get("prototype"), integer=True, low=0, high=count - 1)
            check_number("'index'", record.get("index"), integer=True, low=0)
            box = record.get("box")
            if box is not None:
                if not isinstance(box, list) or len(box) != 4:
                    raise ValueError(f"'box' must be [top, left, bottom, right], got {box!r:.80}")
                top, left, bottom, right = (check_number("'box'", v, low=0) for v in box)
                if not (top <= bottom and left <= right):
                    raise ValueError(
                        f"'box' must be [top, left, bottom, right] with top <= bottom, left <= right, got {box}"
                    )
            if "file" in record and not isinstance(record["file"], str):
                raise TypeError(f"'file' must be a string, got {type(record['file']).__name__}")
            resolved = inside(folder, record["image"], "'image'") if "image" in record else None
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None
        if j in sources:
            raise ValueError(f"{where}: prototype {j} has a record already")
        sources[j] = {**record, "path": resolved}
    return sources


def _this_looks_like_that(
    model, images, targets, labels, out: Path, args: argparse.Namespace, options: dict, sources: dict[int, dict]
) -> list | None:
    """For a prototype network: per image, its top prototypes for the target class (similarity, contribution
    to the logit, source patch from ``sources``, :func:`_prototype_sources`) and a figure
    ``LABEL_prototypes.png`` with each prototype's similarity map (native and searched with
    ``--prototype-search``) beside its source patch. None for other models."""
    import warnings

    from .explain import explainer, normalize_maps
    from .interpretable.protopnet import find_prototype_layer, has_prototypes, prototype_evidence, prototype_view
    from .viz.prototypes import save_prototype_figure

    if not has_prototypes(model):
        return None
    layer = find_prototype_layer(model)[1]
    ev = prototype_evidence(model, images, targets, top=args.prototypes)
    k = ev.prototypes.shape[1]
    size = tuple(images.shape[-2:])
    native = normalize_maps(ev.maps.flatten(0, 1), size).view(len(images), k, *size).cpu()
    searched = None
    if args.prototype_search != "none":
        method = args.prototype_search
        search = explainer(method, prototype_view(model), **options[method])
        searched = search(images.repeat_interleave(k, 0), ev.prototypes.flatten()).view(len(images), k, *size).cpu()
    from .data.images import load_image

    source_images: dict[int, torch.Tensor | None] = {}

    def source_image(j: int, src: dict) -> torch.Tensor | None:
        """The prototype's source image; None (the figure says 'not available') when the folder lacks it."""
        if j not in source_images:
            source_images[j] = None
            if src["path"] is not None and src["path"].is_file():
                try:
                    source_images[j] = load_image(src["path"], None)
                except ValueError as err:  # a damaged PNG: the figure is still worth having
                    warnings.warn(f"prototype {j}: source image not shown ({err})", stacklevel=2)
        return source_images[j]

    out_records = []
    for i, label in enumerate(labels):
        rows, recs = [], []
        t = int(ev.targets[i])
        for r in range(k):
            j = int(ev.prototypes[i, r])
            src = sources.get(j)
            sim, contrib = float(ev.similarity[i, r]), float(ev.contribution[i, r])
            own = model.class_name(int(layer.prototype_class[j]))
            rows.append({
                "native": native[i, r], "search": None if searched is None else searched[i, r],
                "source": None if src is None else source_image(j, src), "box": None if src is None else src.get("box"),
                "caption": f"prototype {j} ({own}): similarity {sim:.3f}, contribution {contrib:+.3f} to {model.class_name(t)}"
                + ("" if src is None else f"; source: training image {src['index']}" + (f" {src['file']}" if "file" in src else "")),
            })  # fmt: skip
            recs.append({
                "prototype": j, "class": own, "similarity": round(sim, 6), "contribution": round(contrib, 6),
                "source": None if src is None else {key: src[key] for key in ("index", "box", "image", "file") if key in src},
            })  # fmt: skip
        figure = out / f"{label}_prototypes.png"
        save_prototype_figure(
            figure, images[i].cpu(), rows, search_name=args.prototype_search,
            title=f"{label}: why {model.class_name(t)}? this looks like that",
        )  # fmt: skip
        out_records.append({"figure": figure.name, "top": recs})
    return out_records


def _load_model(args: argparse.Namespace, device: torch.device):
    """``--model`` with ``--weights`` or ``--random-weights`` (named models are pretrained by default)."""
    from .models import load_model

    if args.weights is not None and args.random_weights:
        raise ValueError("--weights and --random-weights contradict each other: pass one of them")
    return load_model(args.model, weights=args.weights, pretrained=not args.random_weights, device=device)


def _methods(text: str) -> list[str]:
    from .explain import list_explainers

    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in list_explainers()]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown or text!r}; available: {', '.join(list_explainers())}")
    return methods


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .metrics.harness import METRICS
    from .pipelines import run_evaluation

    methods = _methods(args.methods)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {', '.join(METRICS)}")
    if args.data != "synthetic" and not Path(args.data).is_dir():
        raise ValueError(f"--data must be 'synthetic' or an image folder; {args.data} is not a folder")
    model = _load_model(args, _device(args.device))
    options = _method_options(methods, args)
    specs = [(m, options[m]) for m in methods]
    ev = run_evaluation(
        model, args.data, args.out, specs, metrics, n=args.n, shortcut_prob=args.shortcut, targets=args.targets,
        batch_size=args.image_batch, slow_images=args.slow_images, report=not args.no_report,
    )  # fmt: skip
    print(f"{model.name} ({model.weights_label})\n")
    print(ev.markdown())
    print(
        f"\nwritten to {Path(args.out) / 'metrics.md'}"
        + ("" if args.no_report else f" and {Path(args.out) / 'report.html'}")
    )
    return 0


def cmd_train_benchmark(args: argparse.Namespace) -> int:
    from .training.benchmark import fit_benchmark

    device = _device(args.device)
    _check_synthetic_memory(args, args.size)
    _, results = fit_benchmark(
        args.out, size=args.size, n_train=args.n_train, epochs=args.epochs, shortcut_prob=args.shortcut,
        seed=args.seed, device=device, resume=args.resume, arch=args.arch, lr=args.lr,
        monitor_every=args.monitor_every if args.monitor else None, monitor_images=args.monitor_images,
    )  # fmt: skip
    print(json.dumps(results, indent=2))
    print(f"model saved in {args.out} (use it as --model {args.out})")
    return 0


def cmd_train_tame(args: argparse.Namespace) -> int:
    from .training.tame import fit_tame, folder_data

    device = _device(args.device)
    model = _load_model(args, device)
    layers = [name.strip() for name in args.layers.split(",") if name.strip()] if args.layers else None
    val = None
    if args.data == "synthetic":
        from .data.synthetic import Shapes
        from .training.benchmark import InMemory

        size = model.input_size[0]
        _check_synthetic_memory(args, size)
        data = InMemory(Shapes("train", args.n_train, size=size, seed=args.seed))
        val = InMemory(Shapes("val", max(args.batch_size, args.n_train // 8), size=size, seed=args.seed))
    elif Path(args.data).is_dir():
        data = folder_data(args.data, model.input_size)
    else:
        raise ValueError(f"--data must be 'synthetic' or an image folder; {args.data} is not a folder")
    head, history = fit_tame(
        model, data, layers=layers, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, skip=not args.no_skip,
        val_data=val, out_dir=args.out, resume=args.resume, amp=args.amp, seed=args.seed, device=device,
    )  # fmt: skip
    print(json.dumps(history[-1], indent=2))
    print(
        f"TAME head for {model.name} ({model.weights_label}), layers {', '.join(head.layers)}, saved in {args.out} "
        f"(use it as --method tame --tame-head {args.out})"
    )
    return 0


def _synthetic_test_results(trained, args: argparse.Namespace) -> dict:
    """The run's ``results.json``; with synthetic data, plus the clean test accuracy and (with a planted
    shortcut) the accuracy on test images whose patch has a random colour, written back."""
    from ._io import write_json

    path = Path(args.out) / "results.json"
    results = read_json(path, "training results")
    if args.data != "synthetic":
        return results
    from torch.utils.data import DataLoader

    from .data.synthetic import Shapes
    from .training.trainer import accuracy_eval

    size = trained.input_size[0]
    dev = next(trained.parameters()).device
    clean = Shapes("test", args.n_test, size=size, seed=args.seed)
    results["test_acc"] = accuracy_eval(trained, DataLoader(clean, batch_size=256), dev)["acc"]
    if args.shortcut > 0:
        patched = Shapes("test", args.n_test, size=size, seed=args.seed, shortcut_prob=args.shortcut)
        results["test_acc_random_patch"] = accuracy_eval(trained, DataLoader(patched, batch_size=256), dev)["acc"]
    write_json(path, results)
    return results


def cmd_train_lap(args: argparse.Namespace) -> int:
    from .training.knowledge import Knowledge
    from .training.lap import fit_lap

    if args.forbid_shortcut and (args.data != "synthetic" or args.shortcut == 0):
        raise ValueError("--forbid-shortcut needs --data synthetic with a planted shortcut (--shortcut P > 0)")
    if args.shortcut and args.data != "synthetic":
        raise ValueError("--shortcut plants a patch in the synthetic benchmark; it does not apply to a folder")
    if args.knowledge and (args.forbid_shortcut or args.boxes_fraction is not None):
        raise ValueError("--knowledge FILE replaces the automatic knowledge: drop --boxes-fraction / --forbid-shortcut")
    device = _device(args.device)
    model = _load_model(args, device)
    where = [w.strip() for w in args.where.split(",") if w.strip()] if args.where else None
    val = names = None
    # a knowledge file for synthetic data is checked before thousands of images are drawn
    from_file = (
        Knowledge.load(args.knowledge, model.input_size) if args.knowledge and args.data == "synthetic" else None
    )
    if args.data == "synthetic":
        from .data.synthetic import Shapes
        from .training.benchmark import InMemory

        size = model.input_size[0]
        _check_synthetic_memory(args, size)
        data = InMemory(Shapes("train", args.n_train, size=size, seed=args.seed, shortcut_prob=args.shortcut))
        val = InMemory(Shapes("val", args.n_val, size=size, seed=args.seed))  # clean: is the model right for shapes?
        fraction = 0.1 if args.boxes_fraction is None else args.boxes_fraction
        look, forbid = (None, "shortcut_mask") if args.forbid_shortcut else ("box", None)
    elif Path(args.data).is_dir():
        from .data.images import ImageFolder

        data = ImageFolder(args.data, model.input_size)
        names = [str(Path(data.name(i)).relative_to(args.data)) for i in range(len(data))]
        fraction = 1.0 if args.boxes_fraction is None else args.boxes_fraction
        look, forbid = ("mask" if data.has_ground_truth else None), None
    else:
        raise ValueError(f"--data must be 'synthetic' or an image folder; {args.data} is not a folder")
    if args.knowledge:
        knowledge = from_file or Knowledge.load(args.knowledge, model.input_size, names=names)
    elif fraction > 0 and (look or forbid):
        knowledge = Knowledge.from_samples(data, fraction, look=look, forbid=forbid, seed=args.seed)
    else:
        knowledge = None
    monitors = _monitors(args, val, model.input_size)
    trained, history = fit_lap(
        model, data, epochs=args.epochs, knowledge=knowledge, injection=args.injection, where=where, heads=args.heads,
        train=args.train, scratch=args.scratch, lr=args.lr, batch_size=args.batch_size, beta_look=args.beta_look,
        beta_forbid=args.beta_forbid, beta_area=args.beta_area, rrr_weight=args.rrr_weight, cam_weight=args.cam_weight,
        cam_layer=args.cam_layer, val_data=val, out_dir=args.out, resume=args.resume, amp=args.amp, seed=args.seed,
        device=device, callbacks=monitors,
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 writes and reports
        return 0
    results = _synthetic_test_results(trained, args)
    print(json.dumps({k: v for k, v in results.items() if k != "training"} | {"final": history[-1]}, indent=2))
    print(f"model saved in {args.out} (use it as --model {args.out}; explain it with --method lap)")
    return 0


def cmd_train_protopnet(args: argparse.Namespace) -> int:
    from .training.protopnet import fit_protopnet

    if args.shortcut and args.data != "synthetic":
        raise ValueError("--shortcut plants a patch in the synthetic benchmark; it does not apply to a folder")
    device = _device(args.device)
    model = _load_model(args, device)
    val = names = None
    if args.data == "synthetic":
        from .data.synthetic import Shapes
        from .training.benchmark import InMemory

        size = model.input_size[0]
        _check_synthetic_memory(args, size)
        data = InMemory(Shapes("train", args.n_train, size=size, seed=args.seed, shortcut_prob=args.shortcut))
        val = InMemory(Shapes("val", args.n_val, size=size, seed=args.seed))  # clean: is the model right for shapes?
    elif Path(args.data).is_dir():
        from .data.images import ImageFolder

        data = ImageFolder(args.data, model.input_size)
        names = [str(Path(data.name(i)).relative_to(args.data)) for i in range(len(data))]
    else:
        raise ValueError(f"--data must be 'synthetic' or an image folder; {args.data} is not a folder")
    trained, _, prototypes = fit_protopnet(
        model, data, prototypes_per_class=args.prototypes_per_class, dim=args.dim, warm_epochs=args.warm_epochs,
        joint_epochs=args.joint_epochs, last_epochs=args.last_epochs, cycles=args.cycles, batch_size=args.batch_size,
        val_data=val, out_dir=args.out, resume=args.resume, amp=args.amp, seed=args.seed, device=device, names=names,
    )  # fmt: skip
    results = _synthetic_test_results(trained, args)
    print(json.dumps({k: v for k, v in results.items() if k != "training"}, indent=2))
    print(
        f"prototype network ({len(prototypes)} prototypes) saved in {args.out} (use it as --model {args.out}; "
        "explain it with --method prototype)"
    )
    return 0


def _unlabeled_source(text: str | None) -> tuple[str, int | None] | None:
    """``--unlabeled``: ``synthetic:N`` or a folder, checked before any data is drawn."""
    if text is None:
        return None
    if text == "synthetic" or text.startswith("synthetic:"):
        count = text.partition(":")[2]
        if not _digits(count) or int(count) <= 0:
            raise ValueError(f"--unlabeled synthetic:N needs a positive image count N, got {text!r}")
        return "synthetic", int(count)
    if not Path(text).is_dir():
        raise ValueError(f"--unlabeled must be synthetic:N or an image folder; {text} is not a folder")
    return text, None


def cmd_train_cgc(args: argparse.Namespace) -> int:
    from ._io import atomic_write
    from .training.cgc import fit_cgc

    if args.shortcut and args.data != "synthetic":
        raise ValueError("--shortcut plants a patch in the synthetic benchmark; it does not apply to a folder")
    source = _unlabeled_source(args.unlabeled)
    device = _device(args.device)
    model = _load_model(args, device)
    size = model.input_size
    unlabeled = None
    if source is not None and source[0] != "synthetic":
        from .data.images import ImageFolder

        try:
            unlabeled = ImageFolder(source[0], size)
        except ValueError as err:
            raise ValueError(f"--unlabeled {source[0]}: {err}") from None
    val = None
    if args.data == "synthetic":
        from .data.synthetic import Shapes
        from .training.benchmark import InMemory

        _check_synthetic_memory(args, size[0])
        data = InMemory(Shapes("train", args.n_train, size=size[0], seed=args.seed, shortcut_prob=args.shortcut))
        val = InMemory(Shapes("val", args.n_val, size=size[0], seed=args.seed))
        if source is not None and source[0] == "synthetic":  # more images of the same distribution, other draws
            unlabeled = InMemory(
                Shapes("train", source[1], size=size[0], seed=args.seed + 7919, shortcut_prob=args.shortcut)
            )
    elif Path(args.data).is_dir():
        from .data.images import ImageFolder

        data = ImageFolder(args.data, size)
        if source is not None and source[0] == "synthetic":
            raise ValueError("--unlabeled synthetic:N adds benchmark images; with a folder as --data give a folder")
    else:
        raise ValueError(f"--data must be 'synthetic' or an image folder; {args.data} is not a folder")
    monitors = _monitors(args, val, size)
    trained, history = fit_cgc(
        model, data, epochs=args.epochs, unlabeled=unlabeled, labeled_fraction=args.labeled_fraction,
        labeled_repeat=args.labeled_repeat, lam=args.lam,
        tau=args.tau, consistency=args.consistency, layer=args.layer, cam=args.cam, scratch=args.scratch, lr=args.lr,
        batch_size=args.batch_size, val_data=val, out_dir=args.out, resume=args.resume, amp=args.amp, seed=args.seed,
        device=device, callbacks=monitors,
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 writes and reports
        return 0
    results = read_json(Path(args.out) / "results.json", "training results")
    if args.data == "synthetic":
        from torch.utils.data import DataLoader

        from .data.synthetic import Shapes
        from .explain import explainer
        from .metrics.consistency import consistency
        from .training.trainer import accuracy_eval

        dev = next(trained.parameters()).device
        clean = Shapes("test", args.n_test, size=size[0], seed=args.seed)
        results["test_acc"] = accuracy_eval(trained, DataLoader(clean, batch_size=256), dev)["acc"]
        images = torch.stack([clean[i]["image"] for i in range(min(len(clean), 256))]).to(dev)
        layer = results["training"]["layer"]
        results["consistency"] = consistency(explainer(args.cam, trained, layer=layer), images, seed=args.seed)
        atomic_write(Path(args.out) / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n"))
    print(json.dumps({k: v for k, v in results.items() if k != "training"} | {"final": history[-1]}, indent=2))
    print(f"model saved in {args.out} (use it as --model {args.out})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .pipelines import run_inspection

    if args.data != "synthetic" and not Path(args.data).is_dir():
        raise ValueError(f"--data must be 'synthetic' or a folder of class folders; {args.data} is not a folder")
    if args.history is not None:
        from .inspection import load_history

        load_history(args.history)  # before the model is loaded: a run without monitor records is an error now
    model = _load_model(args, _device(args.device))
    layers = [name.strip() for name in args.layers.split(",") if name.strip()] if args.layers else None
    result = run_inspection(
        model, args.data, args.out, n=args.n, layers=layers, importance_layer=args.importance_layer,
        history=args.history, samples=args.samples, seed=args.seed, report=not args.no_report,
    )  # fmt: skip
    print(f"{model.name} ({model.weights_label}) on {result['data']}\n")
    print("probe accuracy by depth: " + ", ".join(f"{k} {v:.3f}" for k, v in result["probe_accuracy"].items()))
    if result["model_accuracy"] is not None:
        print(f"model output: {result['model_accuracy']:.3f}")
    effect = result["top_vs_random"]
    randoms = [r.get("ablated_accuracy", r["logit_drop"]) for r in effect["random"]]
    key = "ablated_accuracy" if "ablated_accuracy" in effect["top"] else "logit_drop"
    print(
        f"{result['importance_layer']}: zeroing the top {effect['filters']} filters by Taylor -> {key} "
        f"{effect['top'][key]:.3f}; {effect['filters']} random filters -> mean {sum(randoms) / max(len(randoms), 1):.3f}"
    )
    if result["taylor_ablation_spearman"] is not None:
        print(f"Taylor vs ablation Spearman: {result['taylor_ablation_spearman']:.3f}")
    print(
        f"\nwritten to {Path(args.out) / 'inspection.json'} (and CSV files)"
        + ("" if args.no_report else f" and {Path(args.out) / 'report.html'}")
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .pipelines import run_demo

    summary = run_demo(args.out)
    bench = summary["benchmark"]
    print(f"benchmark CNN: clean test accuracy {bench['test_acc']:.1%}")
    print(f"done in {summary['seconds']['total']:.0f} s; open {summary['report']}")
    return 0


def _safe(name: str) -> str:
    return name.replace("+", "p").replace("/", "_")


RANDOM_WEIGHTS_HELP = (
    "random weights for a named torchvision/timm model instead of its pretrained ones (every output then says "
    "'random weights')"
)


def _add_model_source(p: argparse.ArgumentParser) -> None:
    """--model with --weights / --random-weights (the fine-tuning trainers)."""
    p.add_argument("--model", required=True, help="a folder saved by `xcnn train`, or a model name")
    p.add_argument("--weights", default=None, help="weights for a named model (.safetensors or weights-only .pth)")
    p.add_argument("--random-weights", action="store_true", help=RANDOM_WEIGHTS_HELP)


def _add_finetune_run(p: argparse.ArgumentParser, amp_help: str) -> None:
    """The optimiser, synthetic-data sizes and run options the fine-tuning trainers share."""
    p.add_argument(
        "--lr", type=_positive_float, default=1e-3, help="one-cycle peak AdamW learning rate (default: %(default)s)"
    )
    p.add_argument("--batch-size", type=_positive_int, default=64, help="(default: %(default)s)")
    p.add_argument(
        "--n-train", type=_positive_int, default=6000, help="synthetic training images (default: %(default)s)"
    )
    p.add_argument(
        "--n-val", type=_positive_int, default=500, help="synthetic clean validation images (default: %(default)s)"
    )
    p.add_argument(
        "--n-test", type=_positive_int, default=1000, help="synthetic clean test images (default: %(default)s)"
    )
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--amp", action="store_true", help=amp_help)
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--device", default="auto")
    _add_monitor(p)


def _add_monitor(p: argparse.ArgumentParser, folder_option: bool = True) -> None:
    """--monitor and its settings (layer-wise inspection during training, xcnn.inspection.Monitor)."""
    p.add_argument(
        "--monitor", action="store_true",
        help="watch the layers during training: probe accuracy per stage, top filters, feature correlation and CKA "
        "to the previous check, in --out/monitor.json and TensorBoard (read it with xcnn inspect --history)",
    )  # fmt: skip
    p.add_argument(
        "--monitor-every", type=_positive_int, default=1, help="epochs between checks (default: %(default)s)"
    )
    p.add_argument(
        "--monitor-images", type=_positive_int, default=512,
        help="held-out images per check, half to fit the probes, half to measure (default: %(default)s)",
    )  # fmt: skip
    if folder_option:
        p.add_argument(
            "--monitor-data", default=None,
            help="labelled held-out images (class folders) for --monitor; default: the synthetic validation set "
            "(required when --data is a folder)",
        )  # fmt: skip


def _monitors(args: argparse.Namespace, val, size: tuple[int, int]) -> list:
    """The --monitor callback on --monitor-data (a class folder) or the synthetic validation set ``val``."""
    if not args.monitor:
        if getattr(args, "monitor_data", None):
            raise ValueError("--monitor-data is only used with --monitor")
        return []
    from .inspection import Monitor

    data = val
    if getattr(args, "monitor_data", None):
        from .data.images import ImageFolder

        if not Path(args.monitor_data).is_dir():
            raise ValueError(f"--monitor-data must be a folder of class folders; {args.monitor_data} is not a folder")
        data = ImageFolder(args.monitor_data, size)
    elif data is None:
        raise ValueError(
            "--monitor with an image folder as --data needs --monitor-data FOLDER (labelled held-out images)"
        )
    return [Monitor(data, every=args.monitor_every, images=args.monitor_images, progress=None)]


def build_parser() -> argparse.ArgumentParser:
    from .explain import list_explainers

    parser = _Parser(prog="xcnn", description="Explain and build interpretable CNN image classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser(
        "explain",
        help="explain a model's predictions on image files or bundled photos",
        description="Write one overlay PNG per image and method, a grid PNG per image, and predictions.json "
        "(top-5 classes with names and probabilities).",
    )
    ex.add_argument(
        "images",
        nargs="+",
        help="image files, or bundled photos as sample:NAME (chelsea, coffee, astronaut, rocket, camera)",
    )
    ex.add_argument(
        "--model",
        default="efficientnet_lite0",
        help="efficientnet_lite0 (bundled ImageNet weights, offline), a torchvision or timm name (their pretrained "
        "ImageNet weights, downloaded once into torch's or Hugging Face's cache), or a folder saved by `xcnn train` "
        "(default: %(default)s)",
    )
    ex.add_argument(
        "--weights", default=None, help="weights for --model: .safetensors or a weights-only PyTorch state dict"
    )
    ex.add_argument("--random-weights", action="store_true", help=RANDOM_WEIGHTS_HELP)
    ex.add_argument(
        "--method",
        default="gradcam",
        help=f"comma-separated methods: {', '.join(list_explainers())} (default: %(default)s)",
    )
    ex.add_argument(
        "--layer",
        default=None,
        help="layer name(s) in the backbone, comma-separated (several are averaged); default: the last spatial layer",
    )
    ex.add_argument(
        "--target", default="auto", help="class to explain: 'auto' = each image's top-1 prediction, or a class index"
    )
    ex.add_argument("--out", default="xcnn-out", help="output folder (created if missing; default: %(default)s)")
    ex.add_argument("--save-maps", action="store_true", help="also write each raw map as .npy (float32 [H,W] in [0,1])")
    ex.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    ex.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="forward-pass batch for inner loops (Score-CAM channels, RISE masks, occlusion windows, IG steps)",
    )
    ex.add_argument(
        "--image-batch",
        type=_positive_int,
        default=8,
        help="images explained together in one call (default: %(default)s)",
    )
    ex.add_argument("--seed", type=_seed, default=None, help="seed for stochastic methods (rise, smoothgrad, random)")
    ex.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    ex.add_argument(
        "--alpha", type=_number(0.0, 1.0), default=0.5, help="heatmap opacity in overlays (default: %(default)s)"
    )
    ex.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="method option, e.g. --opt masks=1000 (RISE), --opt scales=7,14 (MDM; a comma makes a list); given to every listed method that has an option of this name; repeatable",
    )
    ex.add_argument(
        "--tame-head", default=None, metavar="DIR", help="for --method tame: a head folder written by `xcnn train tame`"
    )
    ex.add_argument(
        "--prototypes", type=_positive_int, default=None,
        help="prototype networks: how many prototypes to show per image ('this looks like that'), each beside its "
        "source patch from the model folder's prototypes.json (a malformed record, or an image path leading out of "
        "the folder, is an error) (default: 3)",
    )  # fmt: skip
    ex.add_argument(
        "--prototype-search", choices=["mdm", "gradcam", "rise", "none"], default=None,
        help="prototype networks: the method that searches each shown prototype's region beside its native "
        "(upsampled) similarity map, run on the prototype view (default: mdm)",
    )  # fmt: skip
    ex.set_defaults(func=cmd_explain)

    ev = sub.add_parser(
        "evaluate",
        help="score explainers with the metrics on the benchmark or an image folder",
        description="Writes metrics.csv, metrics.json, metrics.md and report.html. Image folders use the ImageFolder "
        "layout (root/<class>/<image>); optional ground truth beside an image: <stem>.mask.png (non-zero = object) "
        'or <stem>.box.json ({"boxes": [[x0, y0, x1, y1], ...]} in the image\'s pixels).',
    )
    ev.add_argument(
        "--model",
        default="efficientnet_lite0",
        help="a model name (torchvision and timm names load their pretrained ImageNet weights), or a folder saved "
        "by `xcnn train` (default: %(default)s)",
    )
    ev.add_argument("--weights", default=None, help="weights for a named model (.safetensors or weights-only .pth)")
    ev.add_argument("--random-weights", action="store_true", help=RANDOM_WEIGHTS_HELP)
    ev.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic' (the shapes benchmark's test split) or an image folder (default: %(default)s)",
    )
    ev.add_argument(
        "--n", type=_positive_int, default=None, help="number of images (synthetic default 64; folders: all)"
    )
    ev.add_argument(
        "--shortcut",
        type=_probability,
        default=0.0,
        help="synthetic data: probability of a planted patch in a random colour (adds the shortcut metric)",
    )
    ev.add_argument(
        "--methods",
        default="gradcam,gradcam++,scorecam,rise,random",
        help=f"comma-separated: {', '.join(list_explainers())} (default: %(default)s)",
    )
    ev.add_argument(
        "--metrics",
        default="adic,insertion_deletion,pointing,energy,iou",
        help="comma-separated: adic, insertion_deletion, pointing, energy, iou, shortcut, consistency, sanity (default: %(default)s)",
    )
    ev.add_argument(
        "--targets",
        default="predicted",
        choices=["predicted", "label"],
        help="explain the model's top-1 (default, as the papers) or the true label",
    )
    ev.add_argument("--out", default="xcnn-eval", help="output folder (default: %(default)s)")
    ev.add_argument(
        "--image-batch", type=_positive_int, default=32, help="images per harness batch (default: %(default)s)"
    )
    ev.add_argument("--batch-size", type=_positive_int, default=None, help="rows per forward pass inside the methods")
    ev.add_argument(
        "--slow-images",
        type=_non_negative_int,
        default=16,
        help="images used for consistency and sanity (default: %(default)s)",
    )
    ev.add_argument("--seed", type=_seed, default=None, help="seed for stochastic methods")
    ev.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    ev.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="method option, e.g. --opt masks=1000, --opt scales=7,14 (a comma makes a list); given to every listed method that has an option of this name; repeatable",
    )
    ev.add_argument(
        "--tame-head",
        default=None,
        metavar="DIR",
        help="for the method tame: a head folder written by `xcnn train tame`",
    )
    ev.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    ev.add_argument("--no-report", action="store_true", help="skip the HTML report")
    ev.set_defaults(func=cmd_evaluate)

    tr = sub.add_parser("train", help="train a model (the benchmark CNN, LAP, CGC) or a trained explainer (TAME)")
    tr_sub = tr.add_subparsers(dest="what", required=True)
    tb = tr_sub.add_parser(
        "benchmark",
        help="train the reference CNN on the shapes benchmark",
        description="Saves model.safetensors + model.json (usable as --model DIR), checkpoint.pt, history.json, TensorBoard scalars and results.json.",
    )
    tb.add_argument("--out", required=True, help="output folder")
    tb.add_argument(
        "--shortcut",
        type=_probability,
        default=0.0,
        help="probability of the planted label-coloured patch in training images (default: %(default)s)",
    )
    tb.add_argument("--epochs", type=_positive_int, default=10)
    tb.add_argument("--n-train", type=_positive_int, default=6000)
    tb.add_argument(
        "--size", type=_number(32, 224, integer=True), default=64, help="image size (32-224; default: %(default)s)"
    )
    tb.add_argument(
        "--arch", choices=["shapesnet", "vit", "vit_patch"], default="shapesnet",
        help="the CNN, a small timm ViT (8x8 token grid, 4 blocks) with a convolutional stem, or the same ViT with the patchify stem (default: %(default)s)",
    )  # fmt: skip
    tb.add_argument(
        "--lr",
        type=_positive_float,
        default=2e-3,
        help="peak AdamW learning rate of the one-cycle schedule (default: %(default)s)",
    )
    tb.add_argument("--seed", type=_seed, default=0)
    tb.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    tb.add_argument("--device", default="auto")
    _add_monitor(tb, folder_option=False)
    tb.set_defaults(func=cmd_train_benchmark)
    tt = tr_sub.add_parser(
        "tame", help="train a TAME attention head for a frozen model",
        description="Trains a TAME head (docs/methods.md#tame) on the model's own predictions; writes tame.safetensors + "
        "tame.json (use with --method tame --tame-head DIR), checkpoint.pt, history.json, TensorBoard scalars, results.json.",
    )  # fmt: skip
    tt.add_argument(
        "--model",
        required=True,
        help="a model name (torchvision and timm names load their pretrained ImageNet weights) or a folder saved by "
        "`xcnn train benchmark`",
    )
    tt.add_argument("--weights", default=None, help="weights for a named model (.safetensors or weights-only .pth)")
    tt.add_argument("--random-weights", action="store_true", help=RANDOM_WEIGHTS_HELP)
    tt.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic' (the shapes benchmark's train split) or an image folder (labels unused) (default: %(default)s)",
    )
    tt.add_argument("--out", required=True, help="output folder")
    tt.add_argument("--layers", default=None, help="comma-separated layers to tap (default: the last three stages)")
    tt.add_argument(
        "--epochs",
        type=_positive_int,
        default=8,
        help="(default: %(default)s, the paper's VGG-16 setting; ResNet-50: 4)",
    )
    tt.add_argument(
        "--lr",
        type=_positive_float,
        default=1e-3,
        help="one-cycle maximum learning rate (default: %(default)s; paper ResNet-50: 1e-4)",
    )
    tt.add_argument("--batch-size", type=_positive_int, default=32, help="(default: %(default)s)")
    tt.add_argument(
        "--n-train", type=_positive_int, default=4000, help="synthetic data: training images (default: %(default)s)"
    )
    tt.add_argument("--no-skip", action="store_true", help="ablation: no skip connection in the branches")
    tt.add_argument("--seed", type=_seed, default=0)
    tt.add_argument("--amp", action="store_true", help="fp16 autocast on CUDA")
    tt.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    tt.add_argument("--device", default="auto")
    tt.set_defaults(func=cmd_train_tame)

    tl = tr_sub.add_parser(
        "lap", help="fine-tune a model with LAP layers, injecting where its evidence may or may not lie",
        description="Inserts a LAP layer (docs/methods.md#lap-local-attention-pooling-lap) where the model has none "
        "and trains with knowledge injection (docs/methods.md#knowledge-injection), or injects the same knowledge "
        "with RRR or Grad-CAM supervision. Writes model.safetensors + model.json (use as --model DIR), checkpoint.pt, "
        "history.json, TensorBoard scalars (one per loss term) and results.json.",
    )  # fmt: skip
    _add_model_source(tl)
    tl.add_argument(
        "--data", default="synthetic",
        help="'synthetic' (the shapes benchmark's train split) or an image folder (root/<class>/<image>; "
        "<stem>.mask.png / <stem>.box.json files beside images are the 'look here' knowledge) (default: %(default)s)",
    )  # fmt: skip
    tl.add_argument("--out", required=True, help="output folder")
    tl.add_argument(
        "--where", default=None, help="comma-separated average-pooling modules to replace (default: the global pool)"
    )
    tl.add_argument(
        "--heads", type=_positive_int, default=1, help="attention heads per new LAP layer (default: %(default)s)"
    )
    tl.add_argument(
        "--injection", choices=["lap", "rrr", "gradcam", "none"], default="lap",
        help="how knowledge enters the loss: LAP's attention, Right for the Right Reasons, Grad-CAM supervision, "
        "or not at all (cross-entropy only) (default: %(default)s)",
    )  # fmt: skip
    tl.add_argument(
        "--train", choices=["all", "attention"], default="all",
        help="train every weight, or only the LAP attention nets and the classifier (default: %(default)s)",
    )  # fmt: skip
    tl.add_argument("--scratch", action="store_true", help="re-initialise every weight first (same architecture)")
    tl.add_argument(
        "--shortcut", type=_probability, default=0.0,
        help="synthetic data: probability of the planted label-coloured patch in training images (default: %(default)s)",
    )  # fmt: skip
    tl.add_argument(
        "--boxes-fraction", type=_probability, default=None,
        help="share of training images drawn to carry knowledge (synthetic default 0.1: their object boxes, or "
        "with --forbid-shortcut the patch of those that have one; folders default 1: every image with a mask or box file)",
    )  # fmt: skip
    tl.add_argument(
        "--forbid-shortcut", action="store_true",
        help="synthetic: the knowledge images carry the patch as a forbidden region instead of their object box",
    )  # fmt: skip
    tl.add_argument(
        "--knowledge", default=None, metavar="FILE",
        help='JSON {"look": {KEY: [[x0, y0, x1, y1], ...]}, "forbid": {...}}; KEY = image index, or a file path '
        "relative to the folder; boxes in the pixels of the model's input size. Replaces the automatic knowledge.",
    )  # fmt: skip
    tl.add_argument("--epochs", type=_positive_int, default=10, help="(default: %(default)s, the benchmark recipe's)")
    tl.add_argument(
        "--beta-look", type=_weight, default=1.0, help="LAP: weight of the 'look here' term (default: %(default)s)"
    )
    tl.add_argument(
        "--beta-forbid",
        type=_weight,
        default=1.0,
        help="LAP: weight of the forbidden-region term (default: %(default)s)",
    )
    tl.add_argument(
        "--beta-area",
        type=_weight,
        default=0.1,
        help="LAP: weight of the area prior on images without knowledge (default: %(default)s)",
    )
    tl.add_argument(
        "--rrr-weight",
        type=_weight,
        default=10.0,
        help="RRR: weight of the input-gradient penalty (default: %(default)s)",
    )
    tl.add_argument(
        "--cam-weight",
        type=_weight,
        default=1.0,
        help="Grad-CAM supervision: weight of its terms (default: %(default)s)",
    )
    tl.add_argument(
        "--cam-layer", default=None, help="Grad-CAM supervision: the layer (default: the model's default layer)"
    )
    _add_finetune_run(tl, amp_help="fp16 autocast on CUDA")
    tl.set_defaults(func=cmd_train_lap)

    tp = tr_sub.add_parser(
        "protopnet", help="build and train a prototype network (ProtoPNet, 'this looks like that') on a model's backbone",
        description="Puts a prototype layer in place of the model's global pool (docs/methods.md#protopnet-prototype-networks-prototype) and trains "
        "it in the paper's stages: warm-up, then --cycles x (joint, push, last layer). Writes model.safetensors + "
        "model.json (use as --model DIR), prototypes.json and prototypes/ (each prototype's source image and region), "
        "history.json, results.json and one folder per stage (checkpoint, TensorBoard scalars).",
    )  # fmt: skip
    _add_model_source(tp)
    tp.add_argument(
        "--data", default="synthetic",
        help="'synthetic' (the shapes benchmark's train split) or an image folder (root/<class>/<image>) "
        "(default: %(default)s)",
    )  # fmt: skip
    tp.add_argument("--out", required=True, help="output folder")
    tp.add_argument(
        "--prototypes-per-class", type=_positive_int, default=10, help="(default: %(default)s, the paper's)"
    )
    tp.add_argument("--dim", type=_positive_int, default=128, help="prototype channels (default: %(default)s)")
    tp.add_argument("--warm-epochs", type=_non_negative_int, default=5, help="warm-up epochs (default: %(default)s)")
    tp.add_argument(
        "--joint-epochs", type=_positive_int, default=10, help="joint epochs per cycle (default: %(default)s)"
    )
    tp.add_argument(
        "--last-epochs", type=_non_negative_int, default=20, help="last-layer epochs per cycle (default: %(default)s)"
    )
    tp.add_argument("--cycles", type=_positive_int, default=1, help="joint-push-last cycles (default: %(default)s)")
    tp.add_argument(
        "--shortcut", type=_probability, default=0.0,
        help="synthetic data: probability of the planted label-coloured patch in training images (default: %(default)s)",
    )  # fmt: skip
    tp.add_argument("--batch-size", type=_positive_int, default=64, help="(default: %(default)s)")
    tp.add_argument(
        "--n-train", type=_positive_int, default=6000, help="synthetic training images (default: %(default)s)"
    )
    tp.add_argument(
        "--n-val", type=_positive_int, default=500, help="synthetic clean validation images (default: %(default)s)"
    )
    tp.add_argument(
        "--n-test", type=_positive_int, default=1000, help="synthetic clean test images (default: %(default)s)"
    )
    tp.add_argument("--seed", type=_seed, default=0)
    tp.add_argument("--amp", action="store_true", help="fp16 autocast on CUDA (warm-up and joint stages)")
    tp.add_argument(
        "--resume", action="store_true", help="continue an interrupted run in --out (finished stages are skipped)"
    )
    tp.add_argument("--device", default="auto")
    tp.set_defaults(func=cmd_train_protopnet)

    tc = tr_sub.add_parser(
        "cgc", help="fine-tune (or train) a model so its Grad-CAM is consistent under crops and flips (CGC)",
        description="Cross-entropy on labelled images plus LAM x the contrastive Grad-CAM consistency loss on every "
        "image, labelled or not (docs/methods.md#cgc-contrastive-grad-cam-consistency). Writes model.safetensors + "
        "model.json (use as --model DIR), checkpoint.pt, history.json, TensorBoard scalars (one per loss term) and "
        "results.json (with synthetic data: clean test accuracy and the consistency of the trained model's CAM).",
    )  # fmt: skip
    _add_model_source(tc)
    tc.add_argument(
        "--data", default="synthetic",
        help="'synthetic' (the shapes benchmark's train split) or an image folder (root/<class>/<image>) "
        "(default: %(default)s)",
    )  # fmt: skip
    tc.add_argument(
        "--unlabeled", default=None, metavar="synthetic:N|FOLDER",
        help="more images without labels: N further benchmark images, or a folder (its labels, if any, are ignored)",
    )  # fmt: skip
    tc.add_argument(
        "--labeled-fraction", type=_number(0.0, 1.0, low_open=True), default=1.0,
        help="keep this share of --data labelled (seeded draw); the rest trains as unlabelled (default: %(default)s)",
    )  # fmt: skip
    tc.add_argument(
        "--labeled-repeat", type=_positive_int, default=1,
        help="show every labelled image this many times per epoch (few labels: so that batches carry enough of "
        "them) (default: %(default)s)",
    )  # fmt: skip
    tc.add_argument("--out", required=True, help="output folder")
    tc.add_argument(
        "--lam",
        type=_weight,
        default=0.5,
        help="weight of the consistency loss; 0 = cross-entropy only (default: %(default)s)",
    )
    tc.add_argument(
        "--tau", type=_number(0.0, low_open=True), default=0.5, help="InfoNCE temperature (default: %(default)s)"
    )
    tc.add_argument(
        "--consistency", choices=["contrastive", "l2"], default="contrastive",
        help="InfoNCE with the batch's other maps as negatives, or the L2 ablation (default: %(default)s)",
    )  # fmt: skip
    tc.add_argument(
        "--cam", choices=["gradcam", "gradcam++", "layercam", "xgradcam", "hirescam"], default="gradcam",
        help="the CAM inside the loss (default: %(default)s)",
    )  # fmt: skip
    tc.add_argument("--layer", default=None, help="the CAM's layer (default: the model's default layer)")
    tc.add_argument("--scratch", action="store_true", help="re-initialise every weight first (same architecture)")
    tc.add_argument(
        "--shortcut", type=_probability, default=0.0,
        help="synthetic data: probability of the planted label-coloured patch in training images (default: %(default)s)",
    )  # fmt: skip
    tc.add_argument("--epochs", type=_positive_int, default=5, help="(default: %(default)s)")
    _add_finetune_run(tc, amp_help="fp16 autocast on CUDA (the CAM's inner gradient is scaled)")
    tc.set_defaults(func=cmd_train_cgc)

    ins = sub.add_parser(
        "inspect",
        help="layer-wise inspection: what each layer predicts, which filters matter, how features correlate",
        description="Fits a linear probe on every stage's pooled activations (half the images) and measures on the "
        "other half: probe accuracy by depth, layer-wise top-5 and probe-CAM maps, Taylor filter importance against "
        "ablation, feature correlation, layer CKA. Writes inspection.json, CSV files and report.html; with --history, "
        "also the monitored run's probe accuracy by epoch.",
    )  # fmt: skip
    _add_model_source(ins)
    ins.add_argument(
        "--data", default="synthetic",
        help="'synthetic' (held-out shapes benchmark images) or a folder of class folders (root/<class>/<image>) "
        "(default: %(default)s)",
    )  # fmt: skip
    ins.add_argument("--out", default="xcnn-inspect", help="output folder (default: %(default)s)")
    ins.add_argument("--n", type=_positive_int, default=512, help="images (half fit the probes; default: %(default)s)")
    ins.add_argument("--layers", default=None, help="comma-separated layers (default: every stage's output)")
    ins.add_argument(
        "--importance-layer", default=None, help="the layer whose filters are ranked (default: the deepest of --layers)"
    )
    ins.add_argument(
        "--history", default=None, metavar="RUN_DIR", help="a training run's folder trained with --monitor"
    )
    ins.add_argument(
        "--samples", type=_non_negative_int, default=4, help="images shown layer by layer (default: %(default)s)"
    )
    ins.add_argument("--seed", type=_seed, default=0, help="data draw and random filters (default: %(default)s)")
    ins.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    ins.add_argument("--no-report", action="store_true", help="skip the HTML report")
    ins.set_defaults(func=cmd_inspect)

    de = sub.add_parser(
        "demo",
        help="everything, offline, in about five minutes on two CPU cores",
        description="Explains the bundled photos with the bundled ImageNet model, trains the benchmark CNN, evaluates every explainer with every metric, writes report.html.",
    )
    de.add_argument("--out", default="xcnn-demo", help="output folder (default: %(default)s)")
    de.set_defaults(func=cmd_demo)
    return parser


class _UsageError(Exception):
    """A command line argparse refuses, raised instead of exiting so that :func:`main` returns 2."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    """argparse, except that a bad command line raises :class:`_UsageError` (its subcommands' parsers too)."""

    def error(self, message: str) -> NoReturn:  # argparse calls it for every bad command line
        raise _UsageError(self, message)


#: what a user can cause and :func:`main` reports in one line: bad input (ValueError, TypeError; xcnn's
#: own checks raise these), files and folders (OSError: missing, unreadable, not writable, disk full) and
#: memory (:func:`_out_of_memory`). Anything else (any other RuntimeError, KeyError, IndexError,
#: AttributeError, ...) is a bug in xcnn or in a library, and keeps its traceback.
_USER_ERRORS = (ValueError, TypeError, OSError)


#: what an allocator says when it runs out: PyTorch's CPU allocator ("DefaultCPUAllocator: can't allocate
#: memory") raises a plain RuntimeError, as do CUDA paths outside torch.OutOfMemoryError ("CUDA error: out of
#: memory", cuBLAS / cuDNN "..._ALLOC_FAILED")
_OUT_OF_MEMORY = re.compile(r"can't allocate memory|cannot allocate memory|out of memory|ALLOC_FAILED", re.IGNORECASE)


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says that memory ran out (a MemoryError, torch.OutOfMemoryError or an allocator's
    RuntimeError), as opposed to a bug."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and bool(_OUT_OF_MEMORY.search(str(err)))


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status: 0 done, 2 a usage
    or input error (one line on stderr, no traceback), 1 out of memory, 130 interrupted."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as err:
        print(err.parser.format_usage().rstrip(), file=sys.stderr)
        print(f"{err.parser.prog}: error: {err}", file=sys.stderr)
        return 2
    command = f"xcnn {args.command}" + (f" {args.what}" if getattr(args, "what", None) else "")
    try:
        return args.func(args)
    except _USER_ERRORS as err:
        print(f"{command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise  # a bug: its traceback
        print(
            f"{command}: error: out of memory ({_one_line(err)}); try a smaller --batch-size, --image-batch or "
            "image count",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
