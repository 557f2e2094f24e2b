"""Prototype networks (ProtoPNet; Chen et al. 2019, "This Looks Like That"): a classifier that decides by
how much parts of the image look like learnt prototypical parts, each of which is a patch of a training
image after the push.

* :func:`protopnet` builds one on the backbone of a CNN: the global average pool becomes a
  :class:`PrototypeLayer` (add-on layers, prototypes, similarity, max over positions) and the linear
  classifier becomes the last layer (prototypes -> classes, no bias). The edit is recorded, so the model
  saves and loads like any other.
* :func:`prototype_view` gives a classifier whose "logits" are the prototype similarity scores, so every
  explainer explains "prototype j" as target j (MDM's prototype search, Grad-CAM or RISE of a prototype).
* The ``prototype`` explainer: the similarity maps of the prototypes that contribute most to the target's
  logit, weighted by their contribution; :func:`prototype_evidence` gives the pieces ("this looks like that").

Training (warm-up, joint, push, last layer) is :func:`xcnn.training.protopnet.fit_protopnet`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_memory, check_number, check_positive, check_seed
from ..explain.base import Explainer, check_images, check_targets, register
from ..hooks import Tap, frozen, input_shapes, named_layer, replace_module, swapped_copy
from ..models import Classifier, as_classifier, register_edit
from .lap import _global_avg_pool, _rewrapped, global_pool_place

__all__ = [
    "PrototypeEvidence",
    "PrototypeExplainer",
    "PrototypeLayer",
    "find_prototype_layer",
    "protopnet",
    "prototype_evidence",
    "prototype_view",
]


class SquaredDistance(nn.Module):
    """``d[b, j, y, x] = ||z[b, :, y, x] - p_j||^2`` for latents ``z [B,D,h,w]`` and prototypes ``p [m,D]``,
    computed as ``||z||^2 - 2 z.p + ||p||^2`` (one 1x1 convolution) in float32 at least, clamped at 0. A
    module of its own so that its output (the distance maps) can be tapped."""

    def forward(self, z: Tensor, prototypes: Tensor) -> Tensor:
        dtype = torch.promote_types(z.dtype, torch.float32)
        # autocast would run the convolution in float16, where ||z||^2 - 2 z.p + ||p||^2 cancels badly (autocast
        # knows no "meta" device: a shape-only pass, as load_model's class count runs, needs no guard)
        guard = torch.autocast(z.device.type, enabled=False) if z.device.type != "meta" else contextlib.nullcontext()
        with guard:
            z, p = z.to(dtype), prototypes.to(dtype)
            zz = (z * z).sum(1, keepdim=True)
            zp = F.conv2d(z, p[:, :, None, None])
            pp = (p * p).sum(1)[None, :, None, None]
            return (zz - 2 * zp + pp).clamp_min(0)


class PrototypeLayer(nn.Module):
    """ProtoPNet's head, in place of a global average pool: add-on layers (1x1 conv, ReLU, 1x1 conv,
    sigmoid) turn the backbone's feature map into latents ``z [B,D,h,w]``; each prototype ``p_j in R^D``
    (a 1x1 patch of class ``prototype_class[j]``) is compared with every position, ``d = ||z - p_j||^2``,
    similarity ``log((d + 1) / (d + eps))``, and the output is each prototype's largest similarity over
    positions (``[B, m]``, or ``[B, m, 1, 1]`` with ``flatten=False``, the shape of the pool it replaces).
    """

    #: layer discovery (:func:`xcnn.models.default_layer`) treats it as pooling and never explains inside it
    is_pooling = True

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        prototypes_per_class: int = 10,
        dim: int = 128,
        *,
        eps: float = 1e-4,
        flatten: bool = False,
    ) -> None:
        super().__init__()
        for what, value in (
            ("in_channels", in_channels), ("num_classes", num_classes),
            ("prototypes_per_class", prototypes_per_class), ("dim", dim),
        ):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PrototypeLayer: {what} must be a positive integer, got {value!r}")
        if not 0 < eps < 1:
            raise ValueError(f"PrototypeLayer: eps must be in (0, 1), got {eps!r}")
        self.in_channels, self.num_classes, self.prototypes_per_class = in_channels, num_classes, prototypes_per_class
        self.dim, self.eps, self.flatten = dim, float(eps), flatten
        self.add_on = nn.Sequential(nn.Conv2d(in_channels, dim, 1), nn.ReLU(), nn.Conv2d(dim, dim, 1), nn.Sigmoid())
        for conv in (self.add_on[0], self.add_on[2]):  # the paper's initialisation of the add-on layers
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        m = num_classes * prototypes_per_class
        # uniform in [0, 1), like the latents (sigmoid outputs)
        self.prototypes = nn.Parameter(torch.rand(m, dim))
        self.register_buffer(
            "prototype_class", torch.arange(num_classes).repeat_interleave(prototypes_per_class), persistent=False
        )
        self.distance = SquaredDistance()

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.shape[0]

    def latent(self, features: Tensor) -> Tensor:
        """The add-on layers' output ``z [B,D,h,w]`` for the backbone's feature map."""
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise ValueError(
                f"PrototypeLayer expects [B, {self.in_channels}, h, w] feature maps, got {tuple(features.shape)}"
            )
        return self.add_on(features)

    def similarity(self, distances: Tensor) -> Tensor:
        """``log((d + 1) / (d + eps))``: large where a latent patch is close to the prototype."""
        return torch.log((distances + 1) / (distances + self.eps))

    def forward(self, features: Tensor) -> Tensor:
        d = self.distance(self.latent(features), self.prototypes)  # [B, m, h, w]
        # max similarity = similarity of the nearest patch; computed in float32 at least, returned in the
        # layer's own dtype (a bfloat16 network's last layer reads bfloat16 scores)
        scores = self.similarity(d.flatten(2).amin(2)).to(self.prototypes.dtype)
        return scores if self.flatten else scores[:, :, None, None]

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels} -> {self.dim}, {self.num_classes} classes x {self.prototypes_per_class} prototypes, "
            f"eps={self.eps}"
        )

    def config(self) -> dict:
        """The constructor arguments, as recorded in a saved model's architecture edits."""
        return {
            "in_channels": self.in_channels, "num_classes": self.num_classes,
            "prototypes_per_class": self.prototypes_per_class, "dim": self.dim, "eps": self.eps, "flatten": self.flatten,
        }  # fmt: skip


def last_layer_init(layer: nn.Linear, prototype_class: Tensor, wrong: float = -0.5) -> None:
    """The paper's initialisation: weight 1 from a prototype to its own class, ``wrong`` to the others."""
    with torch.no_grad():
        own = (
            prototype_class[None, :].to(layer.weight.device)
            == torch.arange(layer.out_features, device=layer.weight.device)[:, None]
        )
        layer.weight.copy_(torch.where(own, 1.0, wrong))


def has_prototypes(model: nn.Module) -> bool:
    """Whether ``model`` (a Classifier or a bare module) holds a :class:`PrototypeLayer`."""
    return any(isinstance(m, PrototypeLayer) for m in model.modules())


def find_prototype_layer(model: nn.Module) -> tuple[str, PrototypeLayer, nn.Linear]:
    """``(name, layer, last_layer)`` of a prototype network's :class:`PrototypeLayer` and the linear layer
    that reads its scores; a clear error for a model that has none."""
    backbone = as_classifier(model).backbone
    found = [(n, m) for n, m in backbone.named_modules() if isinstance(m, PrototypeLayer)]
    if not found:
        raise ValueError(
            f"{type(backbone).__name__} has no prototype layer; build a prototype network with "
            "xcnn.interpretable.protopnet(model) and train it (xcnn train protopnet)"
        )
    if len(found) > 1:
        raise ValueError(f"{type(backbone).__name__} has several prototype layers {[n for n, _ in found]}")
    name, layer = found[0]
    names = [n for n, _ in backbone.named_modules()]
    for later in names[names.index(name) + 1 :]:
        module = named_layer(backbone, later)
        if isinstance(module, nn.Linear) and module.in_features == layer.num_prototypes:
            return name, layer, module
    raise ValueError(
        f"{type(backbone).__name__} has a prototype layer {name!r} but no last layer (nn.Linear with "
        f"{layer.num_prototypes} inputs) after it; a prototype view has none: explain the prototype network itself"
    )


def protopnet(
    model: nn.Module,
    prototypes_per_class: int = 10,
    *,
    dim: int = 128,
    eps: float = 1e-4,
    where: str | None = None,
    seed: int = 0,
) -> Classifier:
    """A prototype network built on ``model``'s backbone (a copy; the caller's model is untouched).

    The global average pool before the classifier (or the pooling module named by ``where``) becomes a
    :class:`PrototypeLayer` with ``prototypes_per_class`` prototypes of ``dim`` channels per class, the
    classifier after it becomes the last layer (``m`` prototypes -> the same classes, no bias, initialised
    to 1 for a prototype's own class and -0.5 for the others), and dropout between the two is switched off
    (it would drop similarity scores). The classifier is the linear layer read from the pool, or, for a head
    with a hidden layer (mobilenet_v3's Linear-Hardswish-Dropout-Linear), the whole head module whose output
    is the logits. The backbone keeps its trained weights; the new layers are drawn from ``seed``. The edit is
    recorded, so :func:`xcnn.models.save_model` / :func:`xcnn.load_model` rebuild the network without code.
    """
    check_positive("protopnet: prototypes_per_class", prototypes_per_class)
    check_positive("protopnet: dim", dim)
    eps = check_number("protopnet: eps", eps, low=0, low_open=True, high=1, high_open=True)
    if where is not None and not isinstance(where, str):
        raise TypeError(f"protopnet: where must be a module name (str) or None, got {type(where).__name__} {where!r}")
    check_seed(seed, "protopnet: seed")
    with torch.inference_mode(False):  # new parameters must be trainable even when called in inference mode
        clf = as_classifier(model)
        backbone = clf.backbone
        if has_prototypes(backbone):
            raise ValueError(f"protopnet: {type(backbone).__name__} already has a prototype layer")
        ref = next(itertools.chain(backbone.parameters(), backbone.buffers()), None)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else None
        dummy = torch.zeros(1, 3, *clf.input_size, device=ref.device if ref is not None else None, dtype=dtype)
        x = (dummy - clf.mean) / clf.std
        # several global pools (squeeze-and-excitation blocks hold their own): the last the forward runs at the
        # model's own input size is the one before the classifier
        place = where if where is not None else global_pool_place(backbone, "protopnet", example=x)
        flatten = _global_avg_pool(named_layer(backbone, place))
        if flatten is None:
            raise ValueError(
                f"protopnet: {place!r} is {type(named_layer(backbone, place)).__name__}, not a global average pool; "
                "the prototype layer takes the place of the pooling before the classifier"
            )
        with frozen(backbone):
            shapes = input_shapes(backbone, [place], x)[place]
        if len(shapes) != 1:
            raise ValueError(f"protopnet: {place!r} is called {len(shapes)} times in one forward pass")
        shape = shapes[0]
        if len(shape) != 4 or shape[-1] * shape[-2] < 2:
            raise ValueError(
                f"protopnet: the feature map before {place!r} is {tuple(shape[1:])} at the model's input size "
                f"{clf.input_size}; prototypes need a spatial map (h x w > 1) to compare with"
            )
        channels = int(shape[1])
        classifier, num_classes = _classifier_after(backbone, place, channels, x)
        _check_size(channels, num_classes, prototypes_per_class, dim, (int(shape[-2]), int(shape[-1])), dtype)
        names = [n for n, _ in backbone.named_modules()]
        between = names[names.index(place) + 1 : names.index(classifier)]
        dropout = [n for n in between if isinstance(named_layer(backbone, n), nn.Dropout)]
        args = {
            "classifier": classifier, "dropout": dropout,
            "layer": {"in_channels": channels, "num_classes": num_classes,
                      "prototypes_per_class": prototypes_per_class, "dim": dim, "eps": eps, "flatten": flatten},
        }  # fmt: skip
        new_backbone = copy.deepcopy(backbone)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _make_protopnet(new_backbone, place, **args)
        named_layer(new_backbone, place).train(named_layer(backbone, place).training)
        _check_head(backbone, new_backbone, place, classifier, x)
        edit = {"op": "protopnet", "where": place, "args": args}
        spec = None if clf.spec is None else {**clf.spec, "edits": [*clf.spec.get("edits", []), edit]}
        out = Classifier(
            new_backbone, clf.mean.flatten().tolist(), clf.std.flatten().tolist(), name=clf.name,
            input_size=clf.input_size, class_names=clf.class_names, spec=spec,
            weights=None if clf.weights is None else f"{clf.weights} + new prototype layer",
        )  # fmt: skip
        out.training = clf.training
        return _rewrapped(out, clf)


def _check_size(
    channels: int, num_classes: int, per_class: int, dim: int, grid: tuple[int, int], dtype: torch.dtype | None
) -> None:
    """Refuse a prototype layer whose training cannot fit this machine's memory, before anything is allocated:
    its parameters and the last layer (x4 in training: weights, gradients and Adam's two moments) and one
    image's latent map, add-on activations and distance maps."""
    m = num_classes * per_class
    params = channels * dim + dim * dim + 2 * dim + m * dim + m * num_classes
    per_image = grid[0] * grid[1] * (3 * dim + 3 * m)
    size = torch.finfo(dtype).bits // 8 if dtype is not None else 4
    nbytes = size * (4 * params + per_image)
    check_memory(
        float(min(nbytes, 2**80)),  # exact integers (huge ones would overflow a float) up to far beyond any machine
        f"protopnet: a prototype layer of {m} prototypes (prototypes_per_class={per_class} x {num_classes} classes) "
        f"of dim={dim} on {channels} channels",
    )


def _check_head(old: nn.Module, new: nn.Module, place: str, classifier: str, x: Tensor) -> None:
    """The new network must output what the old one did (one score per class) and its logits must be the last
    layer applied to the similarity scores: nothing but dropout may lie between the pool and the classifier."""
    with frozen(old), frozen(new), torch.no_grad(), Tap(new, [place]) as tap:
        before, after = old(x), new(x)
    scores = tap.get(place).flatten(1)
    again = named_layer(new, classifier)(scores.to(named_layer(new, classifier).weight.dtype))
    if (
        before.shape != after.shape
        or again.shape != after.shape
        or not torch.allclose(again.float(), after.float(), rtol=1e-4, atol=1e-4)
    ):
        raise ValueError(
            f"protopnet: {classifier!r} is not the classifier read directly from {place!r} (a hidden layer, a "
            "normalisation or another head lies between, or it does not give the model's classes); the prototype "
            "network's logits must be its last layer applied to the similarity scores"
        )


def _classifier_after(backbone: nn.Module, place: str, channels: int, x: Tensor) -> tuple[str, int]:
    """``(name, classes)`` of the classifier that reads the pool at ``place``: the first ``nn.Linear`` after it
    (with ``channels`` inputs), or the innermost module holding that layer whose output is the logits (a head
    with a hidden layer, replaced whole)."""
    names = [n for n, _ in backbone.named_modules()]
    for later in names[names.index(place) + 1 :]:
        module = named_layer(backbone, later)
        if isinstance(module, nn.Linear):
            if module.in_features != channels:
                break
            parts = later.split(".")
            holders = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]  # itself, then its parents
            holders = [h for h in holders if not place.startswith(h + ".")]  # never a module holding the pool
            head = _logits_module(backbone, holders, x)
            if head is None:  # _check_head explains what is wrong with it
                return later, module.out_features
            return head
    raise ValueError(
        f"protopnet: no nn.Linear with {channels} inputs follows {place!r}; the prototype network's last layer "
        "takes the place of the linear classifier after the global pool"
    )


def _logits_module(backbone: nn.Module, names: Sequence[str], x: Tensor) -> tuple[str, int] | None:
    """The first of ``names`` whose output is the backbone's output (the very tensor it returns), with the
    number of classes; None when none is."""
    outputs: dict[str, object] = {}
    handles = [
        named_layer(backbone, n).register_forward_hook(lambda m, a, out, n=n: outputs.setdefault(n, out)) for n in names
    ]
    try:
        with frozen(backbone), torch.no_grad():
            logits = backbone(x)
    finally:
        for handle in handles:
            handle.remove()
    for name in names:
        if outputs.get(name) is logits and isinstance(logits, Tensor) and logits.dim() == 2:
            return name, int(logits.shape[1])
    return None


@register_edit("protopnet")
def _make_protopnet(backbone: nn.Module, where: str, classifier: str, dropout: Sequence[str], layer: dict) -> None:
    """The recorded edit: a :class:`PrototypeLayer` at ``where``, a last layer (initialised as the paper
    does) at ``classifier``, no dropout in between (timm's functional ``drop_rate`` set to 0 too)."""
    ref = next(itertools.chain(backbone.parameters(), backbone.buffers()), None)
    head = PrototypeLayer(**layer)
    last = nn.Linear(head.num_prototypes, head.num_classes, bias=False)
    last_layer_init(last, head.prototype_class)
    if ref is not None:
        head = head.to(ref.device, ref.dtype) if ref.is_floating_point() else head.to(ref.device)
        last = last.to(ref.device, ref.dtype) if ref.is_floating_point() else last.to(ref.device)
    replace_module(backbone, where, head)
    replace_module(backbone, classifier, last)
    for name in dropout:
        replace_module(backbone, name, nn.Identity())
    if isinstance(getattr(backbone, "drop_rate", None), float):  # timm applies its head dropout as a function
        backbone.drop_rate = 0.0


# ---- the prototype view ------------------------------------------------------------------------------


def prototype_view(model: nn.Module) -> Classifier:
    """The prototype network seen up to its prototype layer: a :class:`Classifier` whose outputs are the
    ``m`` similarity scores (output ``j`` = prototype ``j``, named ``"prototype j (class)"``). It shares every
    parameter with ``model`` (no copy), so ``xcnn.explainer("mdm", prototype_view(model))(images,
    targets=j)`` searches the region that keeps prototype ``j``'s similarity, and Grad-CAM or RISE of a
    prototype work the same way."""
    clf = as_classifier(model)
    _, layer, last = find_prototype_layer(clf)
    backbone = clf.backbone
    classifier = next(n for n, m in backbone.named_modules() if m is last)
    view = swapped_copy(backbone, classifier, nn.Identity())
    names = [f"prototype {j} ({clf.class_name(int(c))})" for j, c in enumerate(layer.prototype_class.tolist())]
    out = Classifier(
        view, clf.mean.flatten().tolist(), clf.std.flatten().tolist(), name=f"{clf.name} prototypes",
        input_size=clf.input_size, class_names=names, spec=None, weights=clf.weights,
    )  # fmt: skip
    out.training = clf.training
    return _rewrapped(out, clf)


# ---- explanations --------------------------------------------------------------------------------------


@dataclass
class PrototypeEvidence:
    """What a prototype network saw in a batch: for each image, the ``top`` prototypes by contribution to
    the target's logit. ``prototypes [B,top]``: indices; ``similarity [B,top]``: their scores (the maximum
    of their maps); ``contribution [B,top]``: last-layer weight x similarity (the logit is the sum over all
    prototypes); ``maps [B,top,h,w]``: the similarity maps at the latent resolution; ``targets [B]``;
    ``logits [B,K]``."""

    prototypes: Tensor
    similarity: Tensor
    contribution: Tensor
    maps: Tensor
    targets: Tensor
    logits: Tensor


def _evidence(model: Classifier, images: Tensor, targets: Tensor | None, top: int) -> PrototypeEvidence:
    name, layer, last = find_prototype_layer(model)
    with Tap(model.backbone, [f"{name}.distance"]) as tap:
        logits = model(images)
    if targets is None:
        targets = logits.argmax(1)
    elif bool((targets >= logits.shape[1]).any()):
        raise ValueError(
            f"target class index out of range: model has {logits.shape[1]} classes, got {targets.tolist()}"
        )
    sim = layer.similarity(tap.get(f"{name}.distance").float())  # [B, m, h, w]
    scores = sim.flatten(2).amax(2)
    contribution = last.weight.float()[targets] * scores  # [B, m]; sums to the logit
    k = min(top, layer.num_prototypes)
    contrib, idx = contribution.topk(k, dim=1)
    maps = sim.gather(1, idx[:, :, None, None].expand(-1, -1, *sim.shape[-2:]))
    return PrototypeEvidence(idx, scores.gather(1, idx), contrib, maps, targets, logits)


def prototype_evidence(model: nn.Module, images: Tensor, targets: object = None, top: int = 3) -> PrototypeEvidence:
    """For each image, the ``top`` prototypes that contribute most to the logit of its target (default: the
    predicted class), their similarity, contribution and similarity maps (see :class:`PrototypeEvidence`)."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    clf = as_classifier(model)
    images = check_images(images)
    t = check_targets(targets, images.shape[0], images.device)
    with torch.inference_mode(False), frozen(clf), torch.no_grad():
        return _evidence(clf, images, t, top)


@register("prototype")
class PrototypeExplainer(Explainer):
    """A prototype network's own explanation, from one forward pass: the similarity maps of the ``top``
    prototypes that contribute most to the target's logit, each weighted by its contribution (last-layer
    weight x similarity score), summed (``top=None``: every prototype). A model without a prototype layer
    is an error: build one with :func:`protopnet`."""

    def __init__(self, model: nn.Module, *, top: int | None = 3, batch_size: int | None = None) -> None:
        super().__init__(model)
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
            raise ValueError(f"prototype: top must be a positive integer or None, got {top!r}")
        self.layer_name, self.layer, _ = find_prototype_layer(self.model)
        self.top = top
        self._set_batch_size(batch_size)

    def __repr__(self) -> str:
        return f"PrototypeExplainer(model={self.model.name!r}, top={self.top})"

    def _explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        rows = self._rows(images)
        top = self.top or self.layer.num_prototypes
        chunks = []
        with torch.no_grad():
            for i, chunk in enumerate(images.split(rows)):
                ev = _evidence(self.model, chunk, None if targets is None else targets.split(rows)[i], top)
                chunks.append((ev.contribution[:, :, None, None] * ev.maps).sum(1))
        return torch.cat(chunks)
