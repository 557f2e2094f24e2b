"""TAME: a trained attention head over several layers of a frozen CNN (docs/methods.md#tame).

The head (:class:`TAMEHead`) turns the feature maps of ``L`` tapped layers into ``K`` class maps in one
pass: per branch ``conv1x1 -> BatchNorm -> + features (skip) -> ReLU -> bilinear upsample`` to the size
of the largest tapped map (at most 56 on a side), then a ``conv1x1`` over the concatenated branches
gives one logit map per class. The explainer ``xcnn.explainer("tame", model, head=...)`` runs the
frozen model once with the layers tapped, then the head; the explanation of class ``c`` is the
pre-sigmoid map of ``c``. :meth:`TAME.explain_all` returns every class's map from the same pass.

Heads are trained by :func:`xcnn.training.tame.fit_tame` and saved as ``tame.safetensors`` plus a small
``tame.json`` (backbone, layers, channels, classes, input size), reloaded without executing code.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._io import atomic_write, prepare_out_dir
from .._validate import check_seed
from ..hooks import Tap, frozen, named_layer
from ..models import Classifier, as_classifier, stage_layers, survey_layers
from .base import Explainer, register

__all__ = ["TAME", "TAMEHead", "load_tame_head", "save_tame_head", "tame_head", "tame_layers"]

HEAD_FORMAT = "xcnn-tame/1"
HEAD_WEIGHTS, HEAD_JSON = "tame.safetensors", "tame.json"
#: the head works at the largest tapped map's size, capped at this many pixels a side
MAX_SIDE = 56


class TAMEHead(nn.Module):
    """Multi-branch attention head: feature maps ``[B,C_i,h_i,w_i]`` -> class logit maps ``[B,K,h,w]``.

    ``layers``/``channels``: the tapped layers and their channel counts, in order. ``skip=False`` drops
    the residual ``+ F_i`` in each branch (an ablation). ``meta`` records what the head was trained for.
    """

    def __init__(
        self,
        layers: Sequence[str],
        channels: Sequence[int],
        num_classes: int,
        *,
        skip: bool = True,
        meta: dict | None = None,
    ) -> None:
        super().__init__()
        if not layers or len(layers) != len(channels):
            raise ValueError(
                f"need one channel count per tapped layer, got layers={list(layers)} channels={list(channels)}"
            )
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.layers, self.channels = list(layers), [int(c) for c in channels]
        self.num_classes, self.skip = int(num_classes), bool(skip)
        self.meta = dict(meta or {})
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 1) for c in self.channels)
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in self.channels)
        self.fuse = nn.Conv2d(sum(self.channels), self.num_classes, 1)

    def extra_repr(self) -> str:
        return f"layers={self.layers}, classes={self.num_classes}, skip={self.skip}"

    @staticmethod
    def output_size(features: Sequence[Tensor]) -> tuple[int, int]:
        """The largest tapped map's size, scaled down (aspect kept) to at most :data:`MAX_SIDE` a side."""
        h, w = max((f.shape[-2], f.shape[-1]) for f in features)
        scale = min(1.0, MAX_SIDE / max(h, w))
        return max(1, round(h * scale)), max(1, round(w * scale))

    def _branches(self, features: Sequence[Tensor]):
        """``(branch output at the tapped map's own resolution, slice of the fusion's input channels)``."""
        if len(features) != len(self.convs):
            raise ValueError(f"the head expects {len(self.convs)} feature maps ({self.layers}), got {len(features)}")
        start = 0
        for feat, conv, norm, c in zip(features, self.convs, self.norms, self.channels, strict=True):
            if feat.dim() != 4 or feat.shape[1] != c:
                raise ValueError(f"a feature map of shape {list(feat.shape)} reached a branch built for {c} channels")
            out = norm(conv(feat))
            yield F.relu(out + feat if self.skip else out), slice(start, start + c)
            start += c

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Every class's logit map ``[B,K,h,w]``."""
        size = self.output_size(features)
        branches = [
            b if b.shape[-2:] == size else F.interpolate(b, size=size, mode="bilinear", align_corners=False)
            for b, _ in self._branches(features)
        ]
        return self.fuse(torch.cat(branches, dim=1))

    def class_maps(self, features: Sequence[Tensor], classes: Tensor) -> Tensor:
        """The logit map of one class per image, ``[B,h,w]``: equal to ``forward(features)[i, classes[i]]``
        at a fraction of the cost. The fusion is linear and per-pixel, so it commutes with the per-channel
        bilinear upsampling: each branch is projected onto the requested class's weights at its own
        resolution and only the one-channel result is upsampled (for ResNet-50 and 1000 classes this
        replaces a 3584 -> 1000 convolution at 28x28, about 0.7x the backbone's own FLOPs)."""
        size = self.output_size(features)
        weight = self.fuse.weight[:, :, 0, 0][classes]  # [B, sum C]
        total = self.fuse.bias[classes][:, None, None].expand(len(classes), *size)
        for branch, part in self._branches(features):
            m = torch.einsum("bc,bchw->bhw", weight[:, part].to(branch.dtype), branch)
            if m.shape[-2:] != size:
                m = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            total = total + m
        return total


def tame_layers(model: nn.Module, n: int = 3) -> list[str]:
    """The ``n`` layers TAME taps by default: the outputs of the last ``n`` stages
    (:func:`xcnn.models.stage_layers`): ``layer{5-n}``..``layer4`` for ResNet-style networks, the last
    ``n`` max-pooling layers of a torchvision VGG (``features.16/23/30`` for VGG-16, as in the paper), and
    for anything else the last ``n`` spatial resolutions, ending at the default layer."""
    return stage_layers(model, n)


def _layer_channels(clf: Classifier, layers: Sequence[str]) -> list[int]:
    """The channels of ``layers``' feature maps (one dummy forward, :func:`xcnn.models.survey_layers`)."""
    shapes = survey_layers(clf).shapes
    for name in layers:
        if name not in shapes:
            raise ValueError(f"TAME needs [B,C,H,W] feature maps; layer {name!r} returns no tensor in a forward pass")
        if len(shapes[name]) != 3:
            raise ValueError(f"TAME needs [B,C,H,W] feature maps; layer {name!r} outputs shape {[1, *shapes[name]]}")
    return [shapes[name][0] for name in layers]


def _fingerprint(clf: Classifier) -> str:
    """A cheap identity of the backbone's weights (sum and a strided sample of every tensor)."""
    import hashlib

    digest = hashlib.sha256()
    for name, t in clf.backbone.state_dict().items():
        flat = t.detach().reshape(-1).double().cpu()
        sample = flat[:: max(1, flat.numel() // 64)]
        digest.update(name.encode())
        digest.update(f"{flat.sum().item():.6e}".encode())
        digest.update(sample.float().numpy().tobytes())
    return digest.hexdigest()[:16]


def tame_head(
    model: nn.Module, layers: Sequence[str] | None = None, *, skip: bool = True, seed: int | None = 0
) -> TAMEHead:
    """A new (untrained) head for ``model`` tapping ``layers`` (default :func:`tame_layers`), its weights drawn
    from ``seed`` (None: from torch's global generator as it stands)."""
    if seed is not None:
        check_seed(seed)
    clf = as_classifier(model)
    layers = list(layers) if layers is not None else tame_layers(clf)
    if not layers:
        raise ValueError("TAME needs at least one layer")
    for name in layers:
        named_layer(clf.backbone, name)
    channels = _layer_channels(clf, layers)
    meta = {
        "backbone": clf.name, "arch": (clf.spec or {}).get("arch"), "input_size": list(clf.input_size),
        "class_names": clf.class_names, "fingerprint": _fingerprint(clf),
    }  # fmt: skip
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        head = TAMEHead(layers, channels, clf.num_classes, skip=skip, meta=meta)
    param = next(clf.parameters(), None)
    return head.to(param.device) if param is not None else head


def save_tame_head(head: TAMEHead, folder: str | Path, **extra: object) -> Path:
    """Write ``folder/tame.safetensors`` and ``folder/tame.json``; returns the folder."""
    from safetensors.torch import save_file

    folder = prepare_out_dir(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    atomic_write(folder / HEAD_WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    meta = {
        "format": HEAD_FORMAT, "layers": head.layers, "channels": head.channels, "num_classes": head.num_classes,
        "skip": head.skip, "max_side": MAX_SIDE, **head.meta, **extra,
    }  # fmt: skip
    atomic_write(folder / HEAD_JSON, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    return folder


def load_tame_head(path: str | Path, model: nn.Module | None = None) -> TAMEHead:
    """Read a head saved by :func:`save_tame_head` (its folder or its ``tame.json``); with ``model``, check
    that it was trained for this model's architecture, layers, channels and classes (clear error if not;
    a warning when only the weights differ)."""
    from safetensors.torch import load_file

    p = Path(path)
    meta_path = p / HEAD_JSON if p.is_dir() else p.with_suffix(".json") if p.suffix in (".json", ".safetensors") else p
    weights_path = meta_path.with_name(meta_path.stem + ".safetensors")
    if not meta_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"no TAME head at {path} (expected {HEAD_JSON} and {HEAD_WEIGHTS}; train one with `xcnn train tame`)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {meta_path}: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != HEAD_FORMAT:
        raise ValueError(f"{meta_path} is not a TAME head description (format {HEAD_FORMAT!r})")
    keep = {"format", "layers", "channels", "num_classes", "skip", "max_side"}
    head = TAMEHead(
        meta["layers"],
        meta["channels"],
        meta["num_classes"],
        skip=meta.get("skip", True),
        meta={k: v for k, v in meta.items() if k not in keep},
    )
    try:
        head.load_state_dict(load_file(str(weights_path)))
    except Exception as err:
        raise ValueError(f"cannot load TAME head weights {weights_path}: {err}") from err
    if model is not None:
        check_head(head, as_classifier(model))
        param = next(model.parameters(), None)
        if param is not None:
            head.to(param.device)
    return head.eval()


def check_head(head: TAMEHead, clf: Classifier) -> None:
    """Raise a clear error when ``head`` does not fit ``clf`` (layers, channels, classes, architecture)."""
    trained_for = head.meta.get("arch") or head.meta.get("backbone")
    arch = (clf.spec or {}).get("arch") or clf.name
    if trained_for is not None and arch is not None and trained_for != arch:
        raise ValueError(f"this TAME head was trained for the backbone {trained_for!r}, not {arch!r}")
    missing = [name for name in head.layers if name not in dict(clf.backbone.named_modules())]
    if missing:
        raise ValueError(f"this TAME head taps layers {head.layers}, but {missing} are not in the model {clf.name!r}")
    channels = _layer_channels(clf, head.layers)
    if channels != head.channels:
        raise ValueError(
            f"this TAME head was trained on layers {head.layers} with {head.channels} channels; the model's have {channels}"
        )
    if clf.num_classes != head.num_classes:
        raise ValueError(f"this TAME head has {head.num_classes} classes; the model has {clf.num_classes}")
    fingerprint = head.meta.get("fingerprint")
    if fingerprint is not None and fingerprint != _fingerprint(clf):
        warnings.warn(
            f"the TAME head was trained on a {trained_for} with other weights; its maps explain that model, not this one",
            stacklevel=3,
        )


def head_features(clf: Classifier, head: TAMEHead, images: Tensor) -> tuple[Tensor, list[Tensor]]:
    """``(logits, feature maps)``: one forward pass of ``clf`` with the head's layers tapped."""
    with Tap(clf.backbone, head.layers) as tap:
        logits = clf(images)
        feats = [tap.get(name) for name in head.layers]
    return logits, feats


@register("tame")
class TAME(Explainer):
    """TAME explanation maps from a trained head (``head``: a folder saved by ``xcnn train tame``, or a
    :class:`TAMEHead`). One forward pass of the model plus the head; the map of class ``c`` is the head's
    pre-sigmoid logit map of ``c``."""

    def __init__(
        self, model: nn.Module, *, head: str | Path | TAMEHead | None = None, batch_size: int | None = None
    ) -> None:
        super().__init__(model)
        if head is None:
            raise ValueError("the tame explainer needs head= (a folder written by `xcnn train tame`, or a TAMEHead)")
        if isinstance(head, TAMEHead):
            check_head(head, self.model)
            self.head = head
        elif isinstance(head, (str, Path)):
            self.head = load_tame_head(head, self.model)
        else:
            raise TypeError(f"head must be a path or a TAMEHead, got {type(head).__name__}")
        self._set_batch_size(batch_size)

    def __repr__(self) -> str:
        return f"TAME(model={self.model.name!r}, layers={self.head.layers})"

    def _class_maps(self, images: Tensor, targets: Tensor | None = None, every: bool = True) -> tuple[Tensor, Tensor]:
        """``(logits [B,K], maps)`` from one forward pass per chunk: every class's map ``[B,K,h,w]``, or with
        ``every=False`` the map of each image's target (top-1 when ``targets`` is None) ``[B,h,w]``."""
        param = next(self.head.parameters())
        if param.device != images.device:
            raise ValueError(f"images are on {images.device} but the TAME head is on {param.device}; move one of them")
        logits, maps = [], []
        mode = self.head.training
        self.head.eval()
        try:
            with torch.no_grad():
                for i, chunk in enumerate(images.split(self._rows(images))):
                    out, feats = head_features(self.model, self.head, chunk)
                    logits.append(out.float())
                    if every:
                        maps.append(self.head(feats).float())
                    else:
                        t = self._resolve_targets(
                            out, None if targets is None else targets.split(self._rows(images))[i]
                        )
                        if bool((t >= self.head.num_classes).any()):
                            raise ValueError(
                                f"target class index out of range: the TAME head has {self.head.num_classes} classes, got {t.tolist()}"
                            )
                        maps.append(self.head.class_maps(feats, t).float())
        finally:
            self.head.train(mode)
        return torch.cat(logits), torch.cat(maps)

    def _explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        return self._class_maps(images, targets, every=False)[1]

    def explain_all(self, images: Tensor) -> Tensor:
        """Every class's map ``[B,K,H,W]`` (each min-max normalised to [0,1]) from one forward pass."""
        from .base import check_images, normalize_maps

        with torch.inference_mode(False):
            images = check_images(images)
            with frozen(self.model):
                _, maps = self._class_maps(images)
        b, k, h, w = maps.shape
        return normalize_maps(maps.reshape(b * k, h, w), tuple(images.shape[-2:])).reshape(b, k, *images.shape[-2:])
