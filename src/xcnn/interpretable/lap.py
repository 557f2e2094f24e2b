"""Local Attention Pooling (LAP; Modegh et al. 2022, arXiv 2201.11808): a pooling layer that weights each
position by a learnt attention before averaging, so its attention map is the model's own explanation.

* :class:`LocalAttentionPooling` pools windows (``kernel_size`` x ``kernel_size``, like ``nn.AvgPool2d``)
  or, with ``global_pool=True``, the whole map (like global average pooling before a classifier).
* :func:`insert_lap` puts LAP layers in place of a model's average-pooling modules. A new layer starts as
  exactly the pooling it replaces (constant attention), so a trained model keeps its predictions.

The attention of the last forward pass is the output of the layer's ``attention`` submodule: read it
with :class:`xcnn.hooks.Tap` at ``"<layer name>.attention"``.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_memory, check_number
from ..explain.base import Explainer, register
from ..hooks import Tap, frozen, input_shapes, named_layer, output_shapes, replace_module
from ..models import Classifier, as_classifier, register_edit

__all__ = ["LAP", "LocalAttentionPooling", "insert_lap", "lap_layers"]

#: torch's pooling kernels take windows and strides as 32-bit integers
_INT32 = 2**31 - 1


class LocalAttentionPooling(nn.Module):
    """Attention-weighted average pooling.

    The attention ``a = sigmoid(g(X))`` has one map per head (``g``: 3x3 conv, ReLU, 1x1 conv; ``hidden``
    channels in between, default ``in_channels // 4`` kept within 8..64, so the attention stays a small
    fraction of a wide network's cost); the input's channels are split evenly
    among the heads. Each output is ``sum_p a(p) X_c(p) / sum_p a(p)`` over its window (written with window
    means, the same ratio; the denominator is kept above ``eps`` for attention that underflows to 0). Windows follow ``nn.AvgPool2d`` with ``kernel_size``,
    ``stride`` (default ``kernel_size``), ``padding`` and ``ceil_mode``; padded positions do not count.
    ``global_pool=True`` pools the whole map to ``[B, C, 1, 1]`` (``[B, C]`` with ``flatten=True``).

    ``g``'s last convolution starts at zero, so the attention starts at the constant 0.5 and the layer is
    plain average pooling (halving is exact in floating point) until it is trained.
    """

    #: layer discovery (:func:`xcnn.models.default_layer`) treats it as pooling and never explains inside it
    is_pooling = True

    def __init__(
        self,
        in_channels: int,
        kernel_size: int = 2,
        stride: int | None = None,
        padding: int = 0,
        heads: int = 1,
        *,
        global_pool: bool = False,
        flatten: bool = False,
        ceil_mode: bool = False,
        hidden: int | None = None,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        # every argument checked here: a saved model's edit replays through this constructor
        for what, value in (("in_channels", in_channels), ("heads", heads), ("kernel_size", kernel_size)):
            check_number(f"LocalAttentionPooling: {what}", value, integer=True, low=1, high=_INT32)
        if stride is not None:
            check_number("LocalAttentionPooling: stride", stride, integer=True, low=1, high=_INT32)
        # torch's pooling allows at most half a window of padding (and padding, unlike a window, is per side)
        check_number("LocalAttentionPooling: padding", padding, integer=True, low=0, high=kernel_size // 2)
        for what, value in (("global_pool", global_pool), ("flatten", flatten), ("ceil_mode", ceil_mode)):
            if not isinstance(value, bool):
                raise TypeError(f"LocalAttentionPooling: {what} must be True or False, got {value!r}")
        if hidden is not None:
            check_number("LocalAttentionPooling: hidden", hidden, integer=True, low=1)
        # a floor for the attention's window mean (which lies in (0, 1]): larger, it would change real outputs
        eps = check_number("LocalAttentionPooling: eps", eps, low=0, low_open=True, high=1e-6)
        if in_channels % heads:
            raise ValueError(
                f"LocalAttentionPooling: {in_channels} channels cannot be split evenly among {heads} heads"
            )
        if flatten and not global_pool:
            raise ValueError("LocalAttentionPooling: flatten=True only applies to the global form (global_pool=True)")
        hidden = hidden if hidden is not None else min(64, max(8, in_channels // 4))
        # the attention net's weights (3x3 conv in -> hidden, 1x1 conv hidden -> heads), in float32
        check_memory(
            4 * (hidden * (9 * in_channels + 1) + heads * (hidden + 1)), "LocalAttentionPooling's attention net"
        )
        self.in_channels, self.heads, self.hidden, self.eps = in_channels, heads, hidden, eps
        self.kernel_size, self.stride, self.padding = kernel_size, stride or kernel_size, padding
        self.global_pool, self.flatten, self.ceil_mode = global_pool, flatten, ceil_mode
        self.attention = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, heads, 1), nn.Sigmoid()
        )
        self.reset_attention()

    def reset_attention(self) -> None:
        """Constant attention (the layer becomes average pooling); ``g``'s first conv keeps its weights."""
        nn.init.zeros_(self.attention[2].weight)
        nn.init.zeros_(self.attention[2].bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"LocalAttentionPooling expects [B, {self.in_channels}, H, W] feature maps, got {tuple(x.shape)}"
            )
        b, c, h, w = x.shape
        if not self.global_pool and min(h, w) + 2 * self.padding < self.kernel_size:
            raise ValueError(
                f"LocalAttentionPooling: a {h}x{w} map is smaller than one {self.kernel_size}x{self.kernel_size} "
                f"window (padding {self.padding})"
            )
        a = self.attention(x)  # [B, heads, H, W]
        weighted = (x.view(b, self.heads, c // self.heads, h, w) * a[:, :, None]).view(b, c, h, w)
        if self.global_pool:
            # the kernel of nn.AdaptiveAvgPool2d(1) itself, so a new layer equals the pool it replaces exactly
            num, den = F.adaptive_avg_pool2d(weighted, 1), F.adaptive_avg_pool2d(a, 1)
        else:
            pool = {
                "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "ceil_mode": self.ceil_mode, "count_include_pad": False,
            }  # fmt: skip
            num, den = F.avg_pool2d(weighted, **pool), F.avg_pool2d(a, **pool)
        den = den.repeat_interleave(c // self.heads, dim=1)
        # exact average pooling while the attention is constant; the floor only guards underflow to 0
        out = num / den.clamp_min(max(self.eps, torch.finfo(den.dtype).tiny))
        return out.flatten(1) if self.flatten else out

    def extra_repr(self) -> str:
        where = (
            "global"
            if self.global_pool
            else f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        )
        return f"{self.in_channels}, {where}, heads={self.heads}, hidden={self.hidden}"

    def config(self) -> dict:
        """The constructor arguments, as recorded in a saved model's architecture edits."""
        return {
            "in_channels": self.in_channels, "kernel_size": self.kernel_size, "stride": self.stride,
            "padding": self.padding, "heads": self.heads, "global_pool": self.global_pool,
            "flatten": self.flatten, "ceil_mode": self.ceil_mode, "hidden": self.hidden, "eps": self.eps,
        }  # fmt: skip


def _global_avg_pool(module: nn.Module) -> bool | None:
    """True/False: ``module`` is a global average pool that does / does not flatten; None: it is not one."""
    if isinstance(module, nn.AdaptiveAvgPool2d):
        size = module.output_size
        return False if size in (1, (1, 1)) else None
    # timm's SelectAdaptivePool2d (and its flatten option), recognised by its attributes, not imported
    if type(module).__name__ == "SelectAdaptivePool2d" and getattr(module, "pool_type", None) == "avg":
        return isinstance(getattr(module, "flatten", None), nn.Flatten)
    return None


def global_pool_place(backbone: nn.Module, who: str, hint: str = "", *, example: Tensor | None = None) -> str:
    """The name of the global average-pooling module before ``backbone``'s classifier (the innermost, for
    timm's pooling wrapper); a clear error, naming ``who`` asked, when there is none.

    A network with several (squeeze-and-excitation blocks hold their own) pools before its classifier
    with the last one its forward runs: it is found by one forward pass (no grad, eval mode) on
    ``example`` (a normalised batch ``[B,3,H,W]``; default one zero 224x224 image, the ImageNet size), and
    a warning says which was taken."""
    found = [name for name, module in backbone.named_modules() if name and _global_avg_pool(module) is not None]
    if not found:
        raise ValueError(
            f"{who}: {type(backbone).__name__} has no global average-pooling module{hint}; name the pooling module "
            "with where=... (a model that pools with a function call has none)"
        )
    places = [n for n in found if not any(other.startswith(n + ".") for other in found)]
    if len(places) == 1:
        return places[0]
    if example is None:
        ref = next(itertools.chain(backbone.parameters(), backbone.buffers()), None)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else None
        example = torch.zeros(1, 3, 224, 224, device=ref.device if ref is not None else None, dtype=dtype)
    try:
        ran = _run_order(backbone, places, example)
    except Exception as err:  # the forward itself failed: the order cannot be seen
        raise ValueError(
            f"{who}: {type(backbone).__name__} has several global average pools {places} and a forward pass on a "
            f"{list(example.shape)} input to find the one before the classifier failed ({type(err).__name__}: "
            f"{err}); name it with where=..."
        ) from err
    if not ran:
        raise ValueError(
            f"{who}: {type(backbone).__name__} has several global average pools {places} and its forward runs none "
            "of them; name the one before the classifier with where=..."
        )
    chosen = ran[-1]
    shown = places if len(places) <= 4 else [*places[:2], "...", places[-1]]
    warnings.warn(
        f"{who}: {type(backbone).__name__} has {len(places)} global average pools {shown} (squeeze-and-excitation "
        f"blocks have their own); took {chosen!r}, the last its forward runs, as the one before the classifier "
        "(name another with where=...)",
        stacklevel=3,
    )
    return chosen


def _run_order(backbone: nn.Module, names: Sequence[str], example: Tensor) -> list[str]:
    """The modules of ``names`` in the order one forward pass on ``example`` (no grad, eval mode) finishes
    them: only their names are recorded, so every other output is freed as the forward goes (at the ImageNet
    size a network's outputs together would be hundreds of MB)."""
    ran: list[str] = []
    handles = [
        named_layer(backbone, name).register_forward_hook(lambda module, args, output, name=name: ran.append(name))
        for name in names
    ]
    try:
        with frozen(backbone), torch.no_grad():
            backbone(example)
    finally:
        for handle in handles:
            handle.remove()
    return ran


def _square(module: nn.Module, attrs: Sequence[str]) -> bool:
    return all(isinstance(getattr(module, a), int) or len(set(getattr(module, a))) == 1 for a in attrs)


def _strided_conv(module: nn.Module) -> bool:
    """A 2-D convolution that downsamples (stride > 1) and that LAP can follow at stride 1."""
    return (
        type(module) is nn.Conv2d  # not a subclass: weight standardisation or dynamic padding would be lost
        and _square(module, ("kernel_size", "stride", "padding", "dilation"))
        and module.stride[0] > 1
        and isinstance(module.padding, tuple)
        and module.padding_mode == "zeros"
    )


def _check_replaceable(name: str, module: nn.Module, exact: bool = True) -> None:
    """Clear error unless LAP can start as exactly what ``module`` computes (with ``exact=False``: max
    pooling and strided convolutions are accepted too)."""
    if isinstance(module, LocalAttentionPooling):
        raise ValueError(f"insert_lap: {name!r} is already a LAP layer (a second insertion at the same place)")
    if lap_layers(module):
        raise ValueError(f"insert_lap: {name!r} already holds LAP layers {lap_layers(module)}")
    if isinstance(module, nn.AdaptiveAvgPool2d) and _global_avg_pool(module) is None:
        raise ValueError(
            f"insert_lap: {name!r} ({module}) pools to a grid, not to one value per channel; LAP replaces "
            "global average pooling or fixed-window average pooling (nn.AvgPool2d)"
        )
    if _global_avg_pool(module) is not None:
        return
    if isinstance(module, nn.AvgPool2d):
        square = all(isinstance(v, int) or v[0] == v[1] for v in (module.kernel_size, module.stride, module.padding))
        padding = module.padding if isinstance(module.padding, int) else module.padding[0]
        if not square or (padding and module.count_include_pad) or module.divisor_override:
            raise ValueError(
                f"insert_lap: {name!r} ({module}) averages in a way LAP cannot start from exactly "
                "(non-square windows, padding counted in the mean, or a divisor override)"
            )
        return
    if not exact:
        if type(module) is nn.MaxPool2d:  # a subclass (timm's MaxPool2dSame) pads in its own way
            square = _square(module, ("kernel_size", "stride", "padding", "dilation"))
            if not square or module.dilation not in (1, (1, 1)) or module.return_indices:
                raise ValueError(
                    f"insert_lap: {name!r} ({module}) is a non-square, dilated or index-returning max pool; LAP "
                    "replaces square max-pooling windows"
                )
            return
        if _strided_conv(module):
            return
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d)):
            raise ValueError(
                f"insert_lap: {name!r} ({module}) cannot be replaced even with exact=False: LAP replaces plain "
                "square max pooling (nn.MaxPool2d) and plain square strided convolutions (nn.Conv2d, stride > 1, "
                "zero padding)"
            )
    if isinstance(module, (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d, nn.Conv2d)):
        raise ValueError(
            f"insert_lap: {name!r} is {type(module).__name__}; LAP starts as average pooling, so replacing "
            "it would change the trained model's predictions. Name an average-pooling module, or pass "
            "exact=False (max pooling, strided convolutions) and fine-tune the model afterwards."
        )
    raise ValueError(f"insert_lap: {name!r} is {type(module).__name__}, not a pooling module")


def _lap_args(module: nn.Module, channels: int, heads: int, hidden: int | None) -> dict:
    """Constructor arguments of the LAP layer that starts as ``module`` (checked by _check_replaceable)."""
    flatten = _global_avg_pool(module)
    if flatten is not None:
        layer = LocalAttentionPooling(channels, heads=heads, global_pool=True, flatten=flatten, hidden=hidden)
    elif isinstance(module, nn.Conv2d):  # the convolution runs at stride 1; LAP pools its output
        s = module.stride[0]
        layer = LocalAttentionPooling(module.out_channels, s, s, 0, heads, ceil_mode=True, hidden=hidden)
    else:
        k, s, p = (v if isinstance(v, int) else v[0] for v in (module.kernel_size, module.stride, module.padding))
        layer = LocalAttentionPooling(channels, k, s, p, heads, ceil_mode=module.ceil_mode, hidden=hidden)
    return layer.config()


def lap_layers(model: nn.Module) -> list[str]:
    """Names (as in ``named_modules()``) of the LAP layers in ``model``, in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, LocalAttentionPooling)]


def insert_lap(
    model: nn.Module,
    where: str | Sequence[str] | None = None,
    heads: int = 1,
    hidden: int | None = None,
    *,
    exact: bool = True,
) -> Classifier:
    """A copy of ``model`` (the caller's model is untouched) with LAP layers in place of the average-pooling
    modules named in ``where`` (backbone ``named_modules()`` names); ``where=None`` replaces the global
    average pooling before the classifier. Each new layer starts as the pooling it replaces: the copy
    predicts what ``model`` predicts until it is trained.

    ``exact=False`` also replaces max pooling (by LAP with the same windows) and strided convolutions (the
    convolution then runs at stride 1 and a LAP layer with ``stride x stride`` windows downsamples its
    output, at ``stride**2`` times the convolution's cost). Those places start as average pooling, not as
    what they were, so the copy's predictions change and it must be fine-tuned.

    The edit is recorded in the returned Classifier's ``spec``, so :func:`xcnn.models.save_model` and
    :func:`xcnn.load_model` rebuild the LAP model without code.
    """
    check_number("insert_lap: heads", heads, integer=True, low=1, high=_INT32)
    if hidden is not None:
        check_number("insert_lap: hidden", hidden, integer=True, low=1)
    if not isinstance(exact, bool):
        raise TypeError(f"insert_lap: exact must be True or False, got {exact!r}")
    if where is not None and not isinstance(where, str):
        if not isinstance(where, Sequence) or not all(isinstance(w, str) for w in where):
            raise TypeError(f"insert_lap: where must be a module name or a list of names, got {where!r}")
    with torch.inference_mode(False):  # new parameters must be trainable even when called in inference mode
        return _insert_lap(as_classifier(model), where, heads, hidden, exact)


def _insert_lap(
    clf: Classifier, where: str | Sequence[str] | None, heads: int, hidden: int | None, exact: bool
) -> Classifier:
    backbone = clf.backbone
    ref = next(itertools.chain(backbone.parameters(), backbone.buffers()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else None
    dummy = torch.zeros(1, 3, *clf.input_size, device=ref.device if ref is not None else None, dtype=dtype)
    if where is None:
        already = [n for n in lap_layers(backbone) if named_layer(backbone, n).global_pool]
        if already:
            raise ValueError(f"insert_lap: {type(backbone).__name__} already has a global LAP layer: {already}")
        already = lap_layers(backbone)
        hint = f" (it already has LAP layers: {already})" if already else ""
        names = [global_pool_place(backbone, "insert_lap", hint, example=(dummy - clf.mean) / clf.std)]
    else:
        names = [where] if isinstance(where, str) else list(where)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"insert_lap: where must name distinct modules, got {where!r}")
    for name in names:  # every error before the traced forward
        _check_replaceable(name, named_layer(backbone, name), exact)
    with frozen(backbone):  # eval: the traced forward must not update batch-norm statistics
        shapes = input_shapes(backbone, names, (dummy - clf.mean) / clf.std)
    edits = []
    new_backbone = copy.deepcopy(backbone)
    for name in names:
        if len(shapes[name]) > 1:
            raise ValueError(
                f"insert_lap: {name!r} is called {len(shapes[name])} times in one forward pass; one LAP layer "
                "cannot stand in for several places (give each place its own pooling module)"
            )
        old = named_layer(backbone, name)
        args = _lap_args(old, int(shapes[name][0][1]), heads, hidden)
        if isinstance(old, nn.Conv2d):
            conv = {
                "in_channels": old.in_channels, "out_channels": old.out_channels, "kernel_size": old.kernel_size[0],
                "padding": old.padding[0], "dilation": old.dilation[0], "groups": old.groups, "bias": old.bias is not None,
            }  # fmt: skip
            edits.append({"op": "lap_conv", "where": name, "args": {"conv": conv, "lap": args}})
            _replace_conv_with_lap(new_backbone, name, conv, args)
            named_layer(new_backbone, name).conv.load_state_dict(old.state_dict())  # the trained filters
        else:
            edits.append({"op": "lap", "where": name, "args": args})
            _replace_with_lap(new_backbone, name, **args)
        named_layer(new_backbone, name).train(old.training)  # the mode of the place
    if not exact:  # a place LAP follows at a different stride must keep its output's shape
        with frozen(backbone), frozen(new_backbone):
            x = (dummy - clf.mean) / clf.std
            before, after = output_shapes(backbone, names, x), output_shapes(new_backbone, names, x)
        for name in names:
            if before[name] != after[name]:
                raise ValueError(
                    f"insert_lap: LAP at {name!r} gives {tuple(after[name][0])} where the model had "
                    f"{tuple(before[name][0])}; this place cannot be replaced"
                )
    spec = None
    if clf.spec is not None:
        spec = {**clf.spec, "edits": [*clf.spec.get("edits", []), *edits]}
    out = Classifier(
        new_backbone, clf.mean.flatten().tolist(), clf.std.flatten().tolist(), name=clf.name,
        input_size=clf.input_size, class_names=clf.class_names, spec=spec,
        weights=None if clf.weights is None else f"{clf.weights} + new LAP layers {names}",
    )  # fmt: skip
    out.training = clf.training  # the wrapper's own flag; every submodule kept its mode in the copy
    return _rewrapped(out, clf)


def _rewrapped(out: Classifier, clf: Classifier) -> Classifier:
    """``out`` (a new Classifier around an edited copy of ``clf``'s backbone) with ``clf``'s normalisation
    constants' dtype and device: a Classifier is built with float32 constants, and a bfloat16 model's would
    turn its bfloat16 images into float32 before its bfloat16 layers."""
    out.mean, out.std = clf.mean.detach().clone(), clf.std.detach().clone()
    return out


@register_edit("lap")
def _replace_with_lap(backbone: nn.Module, where: str, **args) -> None:
    """The recorded edit: a fresh LAP layer (constant attention) at ``where``, on the backbone's device."""
    layer = LocalAttentionPooling(**args)
    ref = next(itertools.chain(backbone.parameters(), backbone.buffers()), None)
    if ref is not None:
        layer = layer.to(ref.device, ref.dtype) if ref.is_floating_point() else layer.to(ref.device)
    replace_module(backbone, where, layer)


@register_edit("lap_conv")
def _replace_conv_with_lap(backbone: nn.Module, where: str, conv: dict, lap: dict) -> None:
    """The recorded edit for a strided convolution: the same convolution at stride 1 (``.conv``) followed
    by a LAP layer (``.lap``) that downsamples its output."""
    new = nn.Sequential(OrderedDict(conv=nn.Conv2d(stride=1, **conv), lap=LocalAttentionPooling(**lap)))
    ref = next(itertools.chain(backbone.parameters(), backbone.buffers()), None)
    if ref is not None:
        new = new.to(ref.device, ref.dtype) if ref.is_floating_point() else new.to(ref.device)
    replace_module(backbone, where, new)


def _linear_after(backbone: nn.Module, name: str, channels: int) -> nn.Linear:
    """The classifier that reads the global LAP layer ``name``: the first ``nn.Linear`` after it in module
    order with ``channels`` inputs (ShapesNet's ``fc``, torchvision's ``fc``, timm's ``classifier``)."""
    names = [n for n, _ in backbone.named_modules()]
    for later in names[names.index(name) + 1 :]:
        module = named_layer(backbone, later)
        if isinstance(module, nn.Linear) and module.in_features == channels:
            return module
    raise ValueError(
        f"lap: the LAP layer {name!r} has several heads but no nn.Linear with {channels} inputs follows it, "
        "so the heads cannot be weighted by their contribution to a class (use heads=1)"
    )


@register("lap")
class LAP(Explainer):
    """LAP's own explanation, read from one forward pass (no gradients): the attention of the model's last
    LAP layer (``layers="last"``), or the product over all its LAP layers, each upsampled to the image
    (``layers="all"``). A model without LAP layers is an error: build one with :func:`insert_lap`.

    With one head the map is the attention itself, the same for every class. With several heads (global
    LAP layer followed by a linear classifier) the map of class ``c`` is ``sum_h w_h a_h``, where ``w_h =
    sum_{k in head h} W[c, k] y_k`` is head ``h``'s contribution to the logit of ``c`` (``y`` the layer's
    pooled output, ``W`` the classifier's weights), so the map depends on the target."""

    def __init__(self, model: nn.Module, *, layers: str = "last", batch_size: int | None = None) -> None:
        super().__init__(model)
        names = lap_layers(self.model.backbone)
        if not names:
            raise ValueError(
                f"lap: the model {self.model.name!r} has no LAP layer; build one with "
                "xcnn.interpretable.insert_lap(model) and fine-tune it"
            )
        if layers not in ("last", "all"):
            raise ValueError(f"lap: layers must be 'last' or 'all', got {layers!r}")
        self.lap_names = names[-1:] if layers == "last" else names
        self.classifiers: dict[str, nn.Linear] = {}
        for name in self.lap_names:
            layer = named_layer(self.model.backbone, name)
            if layer.heads > 1:
                if not layer.global_pool:
                    raise ValueError(
                        f"lap: {name!r} is a local LAP layer with {layer.heads} heads; only a global layer's heads "
                        "can be weighted by their contribution to a class"
                    )
                self.classifiers[name] = _linear_after(self.model.backbone, name, layer.in_channels)
        self._set_batch_size(batch_size)

    def __repr__(self) -> str:
        return f"LAP(model={self.model.name!r}, layers={self.lap_names})"

    def _check_linear_head(self, name: str, pooled: Tensor, logits: Tensor) -> None:
        """The head weighting is exact only if the logits are this linear layer applied to the LAP output."""
        linear = self.classifiers[name]
        again = F.linear(pooled, linear.weight.float(), None if linear.bias is None else linear.bias.float())
        logits = logits.float()
        scale = float(logits.abs().amax()) + 1.0
        if again.shape != logits.shape or float((again - logits).abs().amax()) > 1e-3 * scale:
            raise ValueError(
                f"lap: the logits are not {type(linear).__name__}({linear.in_features}, {linear.out_features}) applied "
                f"to the output of the LAP layer {name!r} (a hidden layer or a normalisation lies between), so its "
                "heads cannot be weighted by their contribution to a class; use heads=1"
            )

    def _explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        taps = [f"{name}.attention" for name in self.lap_names] + list(self.classifiers)
        rows = self._rows(images)
        chunks = []
        with torch.no_grad():
            for i, chunk in enumerate(images.split(rows)):
                with Tap(self.model.backbone, taps) as tap:
                    logits = self.model(chunk)
                t = self._resolve_targets(logits, None if targets is None else targets.split(rows)[i])
                product = None
                for name in self.lap_names:
                    a = tap.get(f"{name}.attention").float()  # [B, heads, h, w]
                    if name in self.classifiers:
                        pooled = tap.get(name).flatten(1).float()  # [B, C]
                        self._check_linear_head(name, pooled, logits)
                        contrib = self.classifiers[name].weight.float()[t] * pooled
                        a = (contrib.view(len(chunk), a.shape[1], -1).sum(2)[:, :, None, None] * a).sum(1)
                    else:
                        a = a[:, 0]
                    if len(self.lap_names) > 1:
                        a = F.interpolate(a[:, None], size=chunk.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
                    product = a if product is None else product * a
                chunks.append(product)
        return torch.cat(chunks)
