"""Seeded fuzz of xcnn's public surface: every call must give a valid result or a clear error.

A careless or hostile user's calls into the interpretable models (LAP, prototype networks), the training
recipes and their knowledge files, layer-wise inspection, saved models (model.json / prototypes.json edited by
hand) and the command line. Each call draws, per argument, either a valid value or a hostile one (0, -1,
10**18, inf, NaN, 1e300, a string, a bool, an empty or NaN dataset, a dict, float labels, a layer named twice,
a path outside the folder, JSON nested 100 000 deep...). The outcome of a call is

- ``ok``: it returned, and what it returned passes the target's check (finite tensors, maps in [0,1]);
- ``refused``: ``ValueError`` / ``TypeError`` (or ``FileNotFoundError`` for a missing file); from the CLI:
  exit status 2 with a one-line ``xcnn CMD: error: ...`` (or argparse's usage error);
- ``raw``: any other exception, a CLI traceback, a returned NaN or out-of-range value, or a call that hangs.

    python tools/fuzz.py --calls 869 --seed 0          # the full run; exit 1 if any call is raw
    python tools/fuzz.py --calls 60 --seed 0 --json out.json

``tests/test_fuzz.py`` runs a short seeded form in CI. The process limits its address space so that an
unchecked huge allocation fails fast instead of swapping the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import resource
import signal
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

CLEAN = (ValueError, TypeError, FileNotFoundError, NotADirectoryError)
HUGE_INTS = [10**18, 2**63, 10**9]
BAD_INTS = [0, -1, *HUGE_INTS, 1.5, True, "3", None, float("nan")]
BAD_FLOATS = [0.0, -1.0, math.inf, -math.inf, math.nan, 1e300, -1e300, "a", True, None, 1e308]


class Timeout(Exception):
    pass


# ---- data a careless user hands over ----------------------------------------------------------------------


class Listed(Dataset):
    """A dataset from a list of samples (whatever they are)."""

    def __init__(self, samples: list) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.samples[i]


def _images(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=g)


@dataclass
class Context:
    """What every case draws from: a tiny model, tiny datasets, a saved model folder, a scratch folder."""

    model: object
    shapes: Dataset
    size: int
    classes: int
    saved: Path
    scratch: Path
    rng: random.Random
    g: torch.Generator

    #: per call, the chance that an argument is hostile (drawn by :meth:`new_call`): 0 gives a valid call,
    #: small values one hostile argument among valid ones, large values many
    hostility: float = 0.3

    def new_call(self) -> None:
        self.hostility = self.rng.choice([0.0, 0.0, 0.06, 0.12, 0.25, 0.5])

    def _hostile(self, weight: float) -> bool:
        return self.rng.random() < min(1.0, self.hostility * weight)

    def pick(self, valid: object, hostile: list, weight: float = 1.0) -> object:
        """``valid``, or one of ``hostile`` with this call's hostility (times ``weight``)."""
        return self.rng.choice(hostile) if self._hostile(weight) else valid

    def dataset(self, weight: float = 1.0) -> object:
        if not self._hostile(weight):
            return self.shapes
        n = 8
        images = _images(n, self.size, self.g)
        labels = torch.arange(n) % self.classes
        nan_images = images.clone()
        nan_images[0, 0, 0, 0] = math.nan
        return self.rng.choice(
            [
                Listed([]),
                {"image": images, "label": labels},
                Listed([{"image": images[i], "label": labels[i].float() + 0.5} for i in range(n)]),
                Listed([{"image": nan_images[i], "label": labels[i]} for i in range(n)]),
                Listed([{"image": images[i], "label": labels[i] + self.classes} for i in range(n)]),
                Listed([{"image": images[i] * 300, "label": labels[i]} for i in range(n)]),
                Listed([{"image": images[i, :1], "label": labels[i]} for i in range(n)]),
                Listed([(images[i], labels[i]) for i in range(n)]),
                [1, 2, 3],
                "synthetic",
            ]
        )

    def layer(self, valid: str = "layer4") -> object:
        return self.pick(valid, ["", "nope", "layer4.missing", 5, None, "fc", "pool"])

    def layers(self) -> object:
        return self.pick(["layer3", "layer4"], [[], ["layer4", "layer4"], ["nope"], "layer4", [5], ("",)])


def _shapesnet():
    from xcnn.nets import ShapesNet

    torch.manual_seed(0)
    return ShapesNet(num_classes=6, widths=(4, 8, 8, 8))


def make_context(seed: int, scratch: Path) -> Context:
    """A tiny untrained ShapesNet (6 classes, 32x32) as a Classifier and as a saved model folder, and 24 images
    of the shapes benchmark."""
    import xcnn
    from xcnn.data.synthetic import Shapes
    from xcnn.models import save_model

    spec = {"arch": "shapesnet", "kwargs": {"num_classes": 6, "widths": [4, 8, 8, 8]}}
    net = xcnn.Classifier(_shapesnet(), name="shapesnet", input_size=(32, 32), spec=spec, weights="trained by xcnn")
    saved = save_model(net, scratch / "saved")
    model = xcnn.load_model(_shapesnet(), raw_pixels=True, input_size=(32, 32))
    shapes = Shapes("val", 24, size=32, seed=seed)
    return Context(model, shapes, 32, 6, saved, scratch, random.Random(seed), torch.Generator().manual_seed(seed))


# ---- the cases: each returns (description, call, check of the result) ----------------------------------------

Case = Callable[[Context], tuple[str, Callable[[], object], Callable[[object], None] | None]]


def _finite(result: object) -> None:
    """Every tensor / float in ``result`` finite (maps also in [0,1] where named so)."""
    stack = [result]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            if not bool(torch.isfinite(item).all()):
                raise AssertionError(f"returned a tensor with NaN/Inf (shape {list(item.shape)})")
        elif isinstance(item, float) and not math.isfinite(item):
            raise AssertionError(f"returned {item}")
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _association(result: object) -> None:
    """class_association's rows of classes absent from the data are NaN by design; the rest must be finite."""
    if not isinstance(result, torch.Tensor) or result.dim() != 2:
        raise AssertionError(f"class_association returned {type(result).__name__}, not [K, C]")
    absent = result.isnan().all(1)
    _finite(result[~absent])


def _maps(result: object) -> None:
    _finite(result)
    if not (isinstance(result, torch.Tensor) and result.dim() == 3):
        raise AssertionError(f"an explainer returned {type(result).__name__}, not maps [B,H,W]")
    if float(result.min()) < 0 or float(result.max()) > 1:
        raise AssertionError("maps outside [0,1]")


def case_lap_layer(c: Context):
    from xcnn.interpretable.lap import LocalAttentionPooling

    kw = {
        "in_channels": c.pick(8, BAD_INTS),
        "kernel_size": c.pick(2, BAD_INTS),
        "stride": c.pick(None, BAD_INTS),
        "padding": c.pick(0, [-1, 5, 10**18, 1.5, "0"]),
        "heads": c.pick(1, BAD_INTS),
        "hidden": c.pick(None, [-1, 0, 10**9, 2.5, "8"]),
        "eps": c.pick(1e-12, BAD_FLOATS),
        "global_pool": c.pick(False, [0, 1, "yes", None]),
    }
    x = torch.rand(2, 8, 6, 6, generator=c.g)
    return f"LocalAttentionPooling({kw})", lambda: LocalAttentionPooling(**kw)(x), _finite


def case_insert_lap(c: Context):
    from xcnn.interpretable import insert_lap

    kw = {
        "where": c.pick(None, ["", "nope", "layer4", ["pool", "pool"], 5]),
        "heads": c.pick(1, BAD_INTS),
        "hidden": c.pick(None, [-1, 0, 10**9, "8"]),
    }
    x = torch.rand(2, 3, 32, 32, generator=c.g)
    return f"insert_lap(model, {kw})", lambda: insert_lap(c.model, **kw)(x), _finite


def case_protopnet(c: Context):
    from xcnn.interpretable.protopnet import protopnet

    kw = {
        "prototypes_per_class": c.pick(2, BAD_INTS),
        "dim": c.pick(8, [*BAD_INTS, 100_000]),
        "eps": c.pick(1e-4, BAD_FLOATS),
        "where": c.pick(None, ["", "nope", "layer4", 5]),
        "seed": c.pick(0, ["a", 1.5, None]),
    }
    x = torch.rand(2, 3, 32, 32, generator=c.g)
    return f"protopnet(model, {kw})", lambda: protopnet(c.model, **kw)(x), _finite


def case_explainers(c: Context):
    """The interpretable models' own maps (LAP, prototypes) and a layer explainer on them, hostile inputs."""
    import xcnn
    from xcnn.interpretable import insert_lap
    from xcnn.interpretable.protopnet import protopnet

    images = torch.rand(2, 3, 32, 32, generator=c.g)
    nan = images.clone()
    nan[0, 0, 0, 0] = math.nan
    x = c.pick(images, [nan, images * 255, images.long(), images[0], images[:, :1], images[:0], images.double()])
    targets = c.pick(None, [-1, 99, 1.5, True, [0], [0, 1, 2], torch.tensor([0.0, 1.0]), "0"])
    method = c.rng.choice(["lap", "prototype", "gradcam"])
    if method == "lap" or (method == "gradcam" and c.rng.random() < 0.5):
        model = insert_lap(c.model)
    else:
        model = protopnet(c.model, 1, dim=4)
    layer = c.pick(None, ["nope", "layer4"]) if method == "gradcam" else None
    kw = {"layer": layer} if method == "gradcam" else {}
    return (
        f"explainer({method!r}, {kw})({_name(x)}, targets={_name(targets)})",
        lambda: xcnn.explainer(method, model, **kw)(x, targets),
        _maps,
    )


def case_fit_lap(c: Context):
    from xcnn.training.lap import fit_lap

    kw = {
        "epochs": c.pick(1, [0, -1, 1.5, "1"]),
        "batch_size": c.pick(8, [0, -1, 10**9, 2.5]),
        "lr": c.pick(1e-3, BAD_FLOATS),
        "beta_area": c.pick(0.1, BAD_FLOATS),
        "beta_look": c.pick(1.0, BAD_FLOATS),
        "injection": c.pick("lap", ["none", "rrr", "gradcam", "LAP", "", 5]),
        "train": c.pick("all", ["attention", "some", None]),
        "heads": c.pick(1, BAD_INTS),
        "progress": False,
    }
    data = c.dataset()
    return f"fit_lap(model, {_name(data)}, {kw})", lambda: fit_lap(c.model, data, **kw), None


def case_fit_cgc(c: Context):
    from xcnn.training.cgc import fit_cgc

    kw = {
        "epochs": c.pick(1, [0, -1, 1.5]),
        "batch_size": c.pick(8, [0, -1, 2.5]),
        "lam": c.pick(0.5, BAD_FLOATS),
        "tau": c.pick(0.5, BAD_FLOATS),
        "labeled_fraction": c.pick(1.0, [0.0, -0.5, 1.5, math.nan, "1"]),
        "labeled_repeat": c.pick(1, BAD_INTS),
        "consistency": c.pick("contrastive", ["l2", "L1", None]),
        "cam": c.pick("gradcam", ["hirescam", "scorecam", ""]),
        "layer": c.layer(),
        "progress": False,
    }
    data = c.dataset()
    return f"fit_cgc(model, {_name(data)}, {kw})", lambda: fit_cgc(c.model, data, **kw), None


def case_cgc_loss(c: Context):
    from xcnn.training.cgc import cgc_loss

    good = torch.rand(4, 5, 5, generator=c.g)
    bad = [good.long(), good[0, 0], good.flatten(), good * math.nan, good + math.inf, good[:2], torch.empty(0, 5, 5)]
    a, b = c.pick(good, bad), c.pick(good.clone(), bad)
    kw = {"tau": c.pick(0.5, BAD_FLOATS), "consistency": c.pick("contrastive", ["l2", "cosine", 3])}
    return f"cgc_loss({_name(a)}, {_name(b)}, {kw})", lambda: cgc_loss(a, b, **kw), _finite


def case_knowledge(c: Context):
    from xcnn.training.knowledge import Knowledge

    size = c.pick((32, 32), [(32,), (0, 32), (10**9, 10**9), "32", (32.5, 32), None])
    region = c.pick([[0, 0, 8, 8]], [[[0, 0, 1e400, 5]], [[5, 5, 1, 1]], [[0, 0, 8]], "box", [[math.nan, 0, 1, 1]]])
    index = c.pick(0, [-1, "0", 1.5, None])
    kind = c.rng.choice(["init", "from_samples", "load"])
    if kind == "init":
        return f"Knowledge({size}, look={{{index!r}: {region!r}}})", lambda: Knowledge(size, {index: region}), None
    if kind == "from_samples":
        data = c.dataset()
        fraction = c.pick(0.5, [0.0, -1.0, 2.0, math.nan, "0.5"])
        seed = c.pick(0, ["a", 1.5, None])
        return (
            f"Knowledge.from_samples({_name(data)}, {fraction!r}, seed={seed!r})",
            lambda: Knowledge.from_samples(data, fraction, seed=seed),
            None,
        )
    path = c.scratch / f"knowledge-{c.rng.randrange(10**9)}.json"
    text = c.rng.choice(
        [
            json.dumps({"look": {"0": region}}),
            "[" * 100_000 + "]" * 100_000,
            json.dumps({"look": {"x": [[0, 0, 1, 1]]}}),
            json.dumps({"look": [1, 2]}),
            json.dumps({"forbid": {"0": [[0, 0, 1e400, 1]]}}),
            "{not json",
            json.dumps({"look": {"0": {"box": [0, 0, 1, 1]}}}),
        ]
    ).replace("Infinity", "1e400")
    path.write_text(text)
    return f"Knowledge.load({text[:60]!r}..., {size})", lambda: Knowledge.load(path, size), None


def case_fit_protopnet(c: Context):
    from xcnn.training.protopnet import fit_protopnet

    data = c.dataset()
    kw = {
        "prototypes_per_class": c.pick(1, BAD_INTS),
        "dim": c.pick(4, [0, -1, 100_000, 2.5]),
        "warm_epochs": c.pick(1, [-1, 1.5, "1"]),
        "joint_epochs": c.pick(0, [-1, 1.5]),
        "last_epochs": c.pick(0, [-1, 1.5]),
        "cycles": c.pick(1, [0, -1, 1.5]),
        "clst": c.pick(0.8, BAD_FLOATS),
        "sep": c.pick(0.08, BAD_FLOATS),
        "batch_size": c.pick(8, [0, -1, 2.5]),
        "names": c.pick(None, [["a.png"], "names", [1, 2, 3]]),
        "progress": False,
    }
    return f"fit_protopnet(model, {_name(data)}, {kw})", lambda: fit_protopnet(c.model, data, **kw), None


def case_inspection(c: Context):
    from xcnn.inspection import (
        ablation_effect,
        class_association,
        filter_importance,
        layer_probes,
        layer_similarity,
        linear_cka,
        pooled_features,
    )

    which = c.rng.choice(["probes", "importance", "ablation", "pooled", "association", "cka", "similarity"])
    data = c.dataset()
    if which == "probes":
        kw = {"method": c.pick("logistic", ["ridge", "svm", 3]), "l2": c.pick(1e-3, BAD_FLOATS)}
        kw["max_iter"] = c.pick(50, BAD_INTS)
        layers = c.layers()
        return f"layer_probes({_name(data)}, {layers}, {kw})", lambda: layer_probes(c.model, data, layers, **kw), None
    if which == "importance":
        kw = {"method": c.pick("taylor", ["ablation", "grad", None]), "targets": c.pick("label", ["predicted", "x"])}
        kw["channels"] = c.pick(None, [[0, 0], [-1], [10**6], [True], torch.tensor([1.5]), []])
        layer = c.layer()
        return (
            f"filter_importance({_name(data)}, {layer!r}, {kw})",
            lambda: filter_importance(c.model, data, layer, **kw),
            _finite,
        )
    if which == "ablation":
        channels = c.pick([0, 1], [torch.tensor([1, 2]), [True], [], [10**6], [-1], "0", [0.5]])
        layer = c.layer()
        return (
            f"ablation_effect({_name(data)}, {layer!r}, {channels!r})",
            lambda: ablation_effect(c.model, data, layer, channels),
            _finite,
        )
    if which == "pooled":
        layers = c.layers()
        return f"pooled_features({_name(data)}, {layers})", lambda: pooled_features(c.model, data, layers), _finite
    if which == "association":
        layer = c.layer()
        return (
            f"class_association({_name(data)}, {layer!r})",
            lambda: class_association(c.model, data, layer),
            _association,
        )
    if which == "cka":
        x = torch.randn(16, 4, generator=c.g)
        bad = [x.numpy(), x * math.nan, x * 1e200, x[:8], x[0], torch.zeros(16, 4), x.long()]
        a, b = c.pick(x, bad), c.pick(torch.randn(16, 6, generator=c.g), bad)
        return f"linear_cka({_name(a)}, {_name(b)})", lambda: linear_cka(a, b), _finite
    layers = c.layers()
    return f"layer_similarity({_name(data)}, {layers})", lambda: layer_similarity(c.model, data, layers), _finite


def case_inspect_model(c: Context):
    from xcnn.inspection import inspect_model

    data = c.dataset()
    kw = {
        "layers": c.pick(None, [[], ["layer4", "layer4"], ["nope"], [5]]),
        "images": c.pick(16, [-5, 0, 1, 1.5, "16", 10**18]),
        "top": c.pick(2, BAD_INTS),
        "draws": c.pick(1, BAD_INTS),
        "samples": c.pick(1, [-1, 1.5, 10**9]),
        "l2": c.pick(1e-3, BAD_FLOATS),
        "agreement_channels": c.pick(4, BAD_INTS),
        "progress": False,
    }
    return f"inspect_model({_name(data)}, {kw})", lambda: inspect_model(c.model, data, **kw), None


def case_monitor(c: Context):
    from xcnn.inspection import Monitor
    from xcnn.training.trainer import fit

    data = c.dataset()
    kw = {
        "every": c.pick(1, BAD_INTS),
        "images": c.pick(16, [-5, 0, 1.5, 10**18]),
        "l2": c.pick(1e-3, BAD_FLOATS),
        "top": c.pick(2, BAD_INTS),
        "layers": c.pick(None, [[], ["nope"], ["layer4", "layer4"]]),
    }

    def call():
        monitor = Monitor(data, **kw)
        return fit(c.model.train(), c.shapes, epochs=1, batch_size=8, callbacks=[monitor], progress=False)

    return f"Monitor({_name(data)}, {kw}) in fit", call, None


def _edit_json(c: Context) -> tuple[str, Path]:
    """A copy of the saved model with one hand edit of model.json (or its prototypes.json)."""
    import shutil

    folder = c.scratch / f"edited-{c.rng.randrange(10**9)}"
    shutil.copytree(c.saved, folder)
    meta = json.loads((folder / "model.json").read_text())
    edits: list[tuple[str, Callable[[dict], object]]] = [
        ("no arch", lambda m: m.pop("arch")),
        ("no mean", lambda m: m.pop("mean")),
        ("no input_size", lambda m: m.pop("input_size")),
        ("arch 5", lambda m: m.update(arch=5)),
        ("input_size [32]", lambda m: m.update(input_size=[32])),
        ("input_size [1e400, 1]", lambda m: m.update(input_size=[1e308 * 10, 1])),
        ('input_size "32"', lambda m: m.update(input_size="32")),
        ("num_classes -1", lambda m: m["kwargs"].update(num_classes=-1)),
        ("widths [-1,...]", lambda m: m["kwargs"].update(widths=[-1, 8, 8, 8])),
        ("widths [16]", lambda m: m["kwargs"].update(widths=[16])),
        ("widths 1500", lambda m: m["kwargs"].update(widths=[1500] * 4)),
        ("widths 1e6", lambda m: m["kwargs"].update(widths=[10**6] * 4)),
        ("mean NaN", lambda m: m.update(mean=[math.nan] * 3)),
        ("std 1e-40", lambda m: m.update(std=[1e-40] * 3)),
        ('class_names "abc"', lambda m: m.update(class_names="abc")),
        ('class_names ["a"]', lambda m: m.update(class_names=["a"])),
        ("lap global_pool 0", lambda m: m.update(edits=[{"op": "lap", "where": "pool", "args": {"global_pool": 0}}])),
        ("edit without where", lambda m: m.update(edits=[{"op": "lap", "args": {}}])),
        ("unknown edit", lambda m: m.update(edits=[{"op": "rm -rf", "where": "pool"}])),
        ("edits a dict", lambda m: m.update(edits={"op": "lap"})),
        ("kwargs a list", lambda m: m.update(kwargs=[1])),
        ("weights 5", lambda m: m.update(weights=5)),
    ]
    name, edit = c.rng.choice(edits)
    edit(meta)
    text = json.dumps(meta).replace("NaN", "NaN").replace("Infinity", "1e400")
    if c.rng.random() < 0.08:
        name, text = "nested 100 000 deep", "[" * 100_000 + "]" * 100_000
    (folder / "model.json").write_text(text)
    return name, folder


def case_saved_model(c: Context):
    import xcnn

    name, folder = _edit_json(c)
    x = torch.rand(1, 3, 32, 32, generator=c.g)
    return f"load_model(model.json: {name})", lambda: xcnn.load_model(folder)(x), _finite


def case_annotations(c: Context):
    from PIL import Image

    from xcnn.data.images import ImageFolder

    root = c.scratch / f"folder-{c.rng.randrange(10**9)}"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(root / cls / "x.png")
    box = c.rng.choice(
        [
            '{"boxes": [[0, 0, 1e400, 5]]}',
            '{"boxes": [[0, 0, 5]]}',
            '{"boxes": "all"}',
            '{"boxes": [[NaN, 0, 5, 5]]}',
            '{"boxes": [[9, 9, 1, 1]]}',
            "[" * 100_000 + "]" * 100_000,
            '{"boxes": [[0, 0, 5, 5]]}',
            '{"boxes": [[-100, -100, 1000, 1000]]}',
        ]
    )
    (root / "a" / "x.box.json").write_text(box)
    size = c.pick(16, [0, -1, (16,), "16", 10**6])

    def call():
        folder = ImageFolder(root, size)
        return [folder[i] for i in range(len(folder))]

    return f"ImageFolder(box.json {box[:40]!r}, size={size!r})", call, _finite


def case_cli(c: Context):
    """One command of the CLI with hostile flags; the outcome is judged by its exit status and stderr."""
    folder = c.scratch / f"cli-{c.rng.randrange(10**9)}"
    model = str(c.saved)
    command = c.rng.choice(["explain", "inspect", "train lap", "train protopnet", "train cgc", "prototypes"])
    common = ["--device", "cpu"]
    if command == "explain":
        argv = ["explain", "sample:astronaut", "--model", model, "--out", str(folder), *common]
        argv += c.rng.choice(
            [
                ["--method", c.pick("gradcam", ["nope", "", ",", "lap"])],
                ["--layer", c.pick("layer4", [",", "nope", "layer4,layer4"])],
                ["--target", c.pick("0", ["-1", "99", "x", "1e400"])],
                ["--alpha", c.pick("0.5", ["inf", "nan", "-1", "2"])],
                ["--opt", c.pick("steps=2", ["steps=-1", "steps=inf", "nope=1", "steps"]), "--method", "mdm"],
            ]
        )
    elif command == "inspect":
        argv = ["inspect", "--model", model, "--out", str(folder), "--n", c.pick("16", ["0", "-5", "1e400", "x"])]
        argv += ["--layers", c.pick("layer3,layer4", [",", "nope", "layer4,layer4"]), "--no-report", *common]
        argv += ["--samples", c.pick("1", ["-1", "x"])]
    elif command == "train lap":
        argv = ["train", "lap", "--model", model, "--out", str(folder), "--n-train", "16", "--n-val", "8"]
        argv += ["--n-test", "8", "--epochs", "1", "--batch-size", "8", *common]
        argv += [c.rng.choice(["--beta-area", "--lr", "--beta-look"]), c.pick("0.1", ["inf", "nan", "-1", "1e400"])]
    elif command == "train protopnet":
        argv = ["train", "protopnet", "--model", model, "--out", str(folder), "--n-train", "16", "--n-val", "8"]
        argv += ["--n-test", "8", "--warm-epochs", "1", "--joint-epochs", "0", "--last-epochs", "0"]
        argv += ["--batch-size", "8", "--prototypes-per-class", "1", *common]
        argv += ["--dim", c.pick("4", ["100000", "0", "-1", "1e9", "x"])]
    elif command == "train cgc":
        argv = ["train", "cgc", "--model", model, "--out", str(folder), "--n-train", "16", "--n-val", "8"]
        argv += ["--n-test", "8", "--epochs", "1", "--batch-size", "8", *common]
        argv += [c.rng.choice(["--tau", "--lam", "--labeled-fraction"]), c.pick("0.5", ["inf", "nan", "-1", "0"])]
    else:  # a prototype network's folder whose prototypes.json was edited by hand
        argv, folder = _prototype_folder(c, folder)
    return f"xcnn {' '.join(argv)}", lambda: _run_cli(argv), None


def _prototype_folder(c: Context, out: Path) -> tuple[list[str], Path]:
    import xcnn
    from xcnn.interpretable.protopnet import protopnet
    from xcnn.models import save_model

    folder = c.scratch / f"proto-{c.rng.randrange(10**9)}"
    net = xcnn.load_model(c.saved)
    save_model(protopnet(net, 1, dim=4), folder)
    record = {"prototype": 0, "index": 0, "image": "prototypes/source-0.png", "box": [0, 0, 4, 4]}
    hostile = [
        {k: v for k, v in record.items() if k != "prototype"},
        {k: v for k, v in record.items() if k != "index"},
        {**record, "image": "/etc/passwd"},
        {**record, "image": "../../../etc/hosts"},
        {**record, "prototype": "zero"},
        {**record, "box": "big"},
        5,
    ]
    (folder / "prototypes.json").write_text(json.dumps([c.pick(record, hostile, 4.0)]))
    argv = ["explain", "sample:astronaut", "--model", str(folder), "--method", "gradcam", "--out", str(out)]
    return [*argv, "--prototype-search", "none", "--device", "cpu"], folder


class CLIFailure(Exception):
    pass


def _run_cli(argv: list[str]) -> int:
    from xcnn.cli import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
        if code == 2:
            return 2
    text = err.getvalue().strip()
    lines = [line for line in text.splitlines() if line.strip() and "Warning" not in line and "warn(" not in line]
    if code == 2 and any(line.startswith("xcnn ") and ": error: " in line for line in lines):
        raise ValueError(lines[-1])  # counted as a clean refusal
    if code not in (0, None):
        raise CLIFailure(f"exit status {code}: {text[-300:]}")
    return 0


CASES: dict[str, Case] = {
    "lap_layer": case_lap_layer,
    "insert_lap": case_insert_lap,
    "protopnet": case_protopnet,
    "explainers": case_explainers,
    "fit_lap": case_fit_lap,
    "fit_cgc": case_fit_cgc,
    "cgc_loss": case_cgc_loss,
    "knowledge": case_knowledge,
    "fit_protopnet": case_fit_protopnet,
    "inspection": case_inspection,
    "inspect_model": case_inspect_model,
    "monitor": case_monitor,
    "saved_model": case_saved_model,
    "annotations": case_annotations,
    "cli": case_cli,
}
#: the slow cases (training, the CLI) are drawn less often
WEIGHTS = {"fit_lap": 0.5, "fit_cgc": 0.5, "fit_protopnet": 0.4, "inspect_model": 0.5, "monitor": 0.4, "cli": 0.7}


def _name(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)}:{str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, np.ndarray):
        return f"ndarray{list(value.shape)}"
    if isinstance(value, Dataset):
        return f"{type(value).__name__}(n={len(value)})"  # type: ignore[arg-type]
    return repr(value)[:40]


def _alarm(seconds: float):
    def handler(signum, frame):
        raise Timeout(f"no answer within {seconds} s")

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def run(calls: int, seed: int, timeout: float = 120.0, only: list[str] | None = None, log=None) -> dict:
    """Run ``calls`` seeded calls; returns ``{"outcomes": Counter, "raw": [...], "exceptions": Counter}``."""
    names = only or list(CASES)
    weights = [WEIGHTS.get(n, 1.0) for n in names]
    outcomes: Counter = Counter()
    exceptions: Counter = Counter()
    raw: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="xcnn-fuzz-") as tmp:
        ctx = make_context(seed, Path(tmp))
        for i in range(calls):
            name = ctx.rng.choices(names, weights)[0]
            ctx.new_call()
            torch.manual_seed(seed * 100_003 + i)
            try:
                what, call, check = CASES[name](ctx)
            except Exception as err:  # building the case itself failed: a fuzz bug, not xcnn's
                raise RuntimeError(f"case {name} could not be drawn: {err}") from err
            outcome, detail = "ok", ""
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _alarm(timeout)
                    try:
                        result = call()
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                if check is not None:
                    check(result)
            except CLEAN as err:
                outcome, detail = "refused", f"{type(err).__name__}: {str(err)[:160]}"
            except AssertionError as err:
                outcome, detail = "raw", f"nonsense result: {err}"
            except (Exception, RecursionError, Timeout) as err:
                frame = traceback.extract_tb(err.__traceback__)[-1]
                where = f"{Path(frame.filename).name}:{frame.lineno}"
                outcome, detail = "raw", f"{type(err).__name__} at {where}: {str(err)[:200]}"
                exceptions[type(err).__name__] += 1
            outcomes[outcome] += 1
            if outcome == "raw":
                raw.append({"call": i, "case": name, "what": what[:300], "detail": detail})
            if log is not None:
                print(
                    f"{i:4d} {outcome:<8} {name:<14} {what[:110]}" + (f"\n     -> {detail}" if detail else ""), file=log
                )
    return {"calls": calls, "seed": seed, "outcomes": dict(outcomes), "exceptions": dict(exceptions), "raw": raw}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", action="append", choices=sorted(CASES), help="fuzz only these cases")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one call may take")
    parser.add_argument("--memory-gib", type=float, default=12.0, help="address-space limit of this process")
    parser.add_argument("--json", default=None, help="write the summary to this file")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    limit = int(args.memory_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(1)
    summary = run(args.calls, args.seed, args.timeout, args.only, log=None if args.quiet else sys.stdout)
    print(json.dumps({k: v for k, v in summary.items() if k != "raw"}, indent=1))
    for r in summary["raw"]:
        print(f"RAW call {r['call']} ({r['case']}): {r['what'][:200]}\n    {r['detail']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 1 if summary["raw"] else 0


if __name__ == "__main__":
    sys.exit(main())
