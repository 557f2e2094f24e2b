"""Layer-wise predictions: what the network would say at each depth (linear probes, Alain & Bengio 2016).

For each chosen layer ``l`` the globally averaged activations ``p_l(x) = mean_{h,w} A_l(x)`` are mapped
to class scores by a linear classifier fitted on labelled images while the network stays frozen:
``z_l = W_l p_l(x) + b_l``. Features are standardised for the fit and the standardisation is folded into
``W_l, b_l``, so the probe is one linear map of the pooled activations. Because pooling is an average,
``z_l = mean_{h,w} (W_l A_l + b_l)``: the per-pixel map ``W_l[k] · A_l + b_l[k]`` is a class map whose
mean is exactly the probe's logit (the probe-CAM, the CAM construction of Zhou et al. 2016 applied at
any depth).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_number, check_positive
from ..explain.base import Explainer, check_images, register
from ..hooks import Tap, frozen
from ..models import Classifier, as_classifier, stage_layers
from .features import _check_layers, pooled_features
from .importance import Data

__all__ = ["PROBE_METHODS", "ProbeCAM", "Probes", "layer_probes"]

PROBE_METHODS = ("logistic", "ridge")


class Probes:
    """One linear classifier per layer on the pooled activations of a frozen model.

    ``weights[layer]`` ``[K,C]`` and ``biases[layer]`` ``[K]`` (float64, CPU) map the layer's spatially
    averaged output to ``K`` class logits. Built by :func:`layer_probes`.
    """

    def __init__(
        self,
        model: nn.Module,
        weights: dict[str, Tensor],
        biases: dict[str, Tensor],
        *,
        class_names: Sequence[str] | None = None,
        method: str = "logistic",
        model_task: bool = True,
    ) -> None:
        self.model: Classifier = as_classifier(model)
        #: whether the probes classify the model's own classes (False: a transfer task)
        self.model_task = model_task
        self.layers = list(weights)
        self.weights, self.biases = weights, biases
        self.num_classes = int(next(iter(weights.values())).shape[0])
        self.class_names = list(class_names) if class_names is not None else [str(k) for k in range(self.num_classes)]
        self.method = method

    def __repr__(self) -> str:
        return f"Probes(model={self.model.name!r}, layers={self.layers}, classes={self.num_classes}, method={self.method!r})"

    def _device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def logits_from_features(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Probe logits ``{layer: [N,K]}`` (float64, CPU) of pooled features ``{layer: [N,C]}``."""
        return {n: features[n].double().cpu() @ self.weights[n].T + self.biases[n] for n in self.layers}

    def layer_logits(self, activations: Tensor, layer: str) -> Tensor:
        """Probe logits ``[B,K]`` (float64, CPU) of one layer's activations ``[B,C,h,w]``."""
        pooled = activations.mean((2, 3), dtype=torch.float64).cpu()
        return pooled @ self.weights[layer].T + self.biases[layer]

    @torch.no_grad()
    def logits(self, images: Tensor) -> dict[str, Tensor]:
        """Each layer's probe logits ``{layer: [B,K]}`` for pixel images ``[B,3,H,W]`` in [0,1] (one
        forward pass of the model with every layer tapped)."""
        images = check_images(images).to(self._device())
        with frozen(self.model), Tap(self.model.backbone, self.layers) as tap:
            self.model(images)
            return {n: self.layer_logits(tap.get(n), n) for n in self.layers}

    def predict(self, images: Tensor) -> dict[str, Tensor]:
        """Each layer's class probabilities ``{layer: [B,K]}``: what the network would say at that depth."""
        return {n: z.softmax(1).float() for n, z in self.logits(images).items()}

    def top(self, images: Tensor, k: int = 5) -> dict[str, list[list[tuple[str, float]]]]:
        """Per layer and image, the ``k`` most probable classes as ``(class name, probability)``."""
        k = min(k, self.num_classes)
        out: dict[str, list[list[tuple[str, float]]]] = {}
        for layer, p in self.predict(images).items():
            values, classes = p.topk(k, dim=1)
            out[layer] = [
                [(self.class_names[int(c)], float(v)) for v, c in zip(vs, cs, strict=True)]
                for vs, cs in zip(values, classes, strict=True)
            ]
        return out

    def accuracy(self, data: Data, *, batch_size: int = 64, progress: bool | None = None) -> dict[str, float]:
        """Top-1 accuracy of each layer's probe on labelled ``data``: where in depth the decision forms."""
        feats, labels = pooled_features(self.model, data, self.layers, batch_size=batch_size, progress=progress)
        if labels is None:
            raise ValueError("probe accuracy needs labelled data (samples with a 'label')")
        return probe_accuracy(self, feats, labels)

    def class_maps(self, activations: Tensor, layer: str, classes: Tensor) -> Tensor:
        """The probe-CAM of ``classes`` ``[B]`` from ``layer``'s activations ``[B,C,h,w]``: ``[B,h,w]``
        with ``W[k] · A + b[k]`` at every position (its spatial mean is the probe's logit)."""
        w = self.weights[layer].to(activations.device, torch.float32)[classes]  # [B,C]
        b = self.biases[layer].to(activations.device, torch.float32)[classes]
        return torch.einsum("bc,bchw->bhw", w, activations.float()) + b[:, None, None]


def probe_accuracy(probes: Probes, features: dict[str, Tensor], labels: Tensor) -> dict[str, float]:
    """Accuracy of each probe on already pooled ``features`` with ``labels``."""
    labels = labels.long().cpu()
    return {n: float((z.argmax(1) == labels).double().mean()) for n, z in probes.logits_from_features(features).items()}


def fit_alternate(
    features: dict[str, Tensor], labels: Tensor, layers: list[str], num_classes: int, l2: float
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, float]]:
    """Probes fitted on the even positions of already pooled ``features`` and measured on the odd ones (the
    split :func:`~xcnn.inspection.inspect_model` and the training ``Monitor`` use): ``(weights, biases,
    accuracy)`` per layer."""
    labels = labels.long().cpu()
    weights, biases, accuracy = {}, {}, {}
    for name in layers:
        x = features[name].double().cpu()
        weights[name], biases[name] = fit_linear(x[0::2], labels[0::2], num_classes, l2=l2)
        logits = x[1::2] @ weights[name].T + biases[name]
        accuracy[name] = float((logits.argmax(1) == labels[1::2]).double().mean())
    return weights, biases, accuracy


def _check_names(class_names: object) -> list[str] | None:
    """``class_names`` (None, or a sequence of strings) as a list."""
    if class_names is None:
        return None
    if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Sequence):
        raise TypeError(f"class_names must be a list of names, got {type(class_names).__name__} {class_names!r}")
    bad = next((name for name in class_names if not isinstance(name, str)), None)
    if bad is not None:
        raise TypeError(f"class_names must hold strings, got {type(bad).__name__} {bad!r}")
    return list(class_names)


def _check_labels(labels: Tensor | None, num_classes: int | None) -> int:
    if labels is None:
        raise ValueError("layer probes are fitted on labelled data (samples with a 'label')")
    if bool((labels < 0).any()):
        raise ValueError("labels must be class indices >= 0")
    k = int(labels.max()) + 1 if num_classes is None else num_classes
    if int(labels.max()) >= k:
        raise ValueError(f"labels go up to {int(labels.max())} but num_classes is {k}")
    present = int(labels.unique().numel())
    if present < 2:
        raise ValueError(f"the probe data hold only one class ({int(labels[0])}); a probe needs at least two")
    if len(labels) < k:
        raise ValueError(f"the probe data have {len(labels)} images, fewer than the {k} classes; give more images")
    return k


def fit_linear(
    x: Tensor, labels: Tensor, num_classes: int, *, method: str = "logistic", l2: float = 1e-3, max_iter: int = 200
) -> tuple[Tensor, Tensor]:
    """Fit one linear classifier on features ``x`` ``[N,C]``: returns ``(W [K,C], b [K])`` in float64 such
    that ``x @ W.T + b`` are the logits. Features are standardised for the fit (constant features get
    weight 0) and the standardisation is folded into ``W, b``.

    ``logistic``: multinomial logistic regression, mean cross-entropy + ``l2/2 ||W||²`` (on standardised
    features; the bias is not penalised), minimised by L-BFGS; the objective is strictly convex, so the
    result does not depend on initialisation. ``ridge``: least squares on one-hot targets with penalty
    ``l2 * N * ||W||²``, closed form.
    """
    if method not in PROBE_METHODS:
        raise ValueError(f"unknown probe method {method!r}; available: {', '.join(PROBE_METHODS)}")
    # an infinite penalty would give weights of 0 and probes at chance, silently
    l2 = check_number("l2", l2, low=0)
    check_positive("max_iter", max_iter)
    if not isinstance(x, Tensor) or x.dim() != 2 or x.is_complex() or x.dtype == torch.bool:
        got = f"a {x.dtype} tensor of shape {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"fit_linear: x must be a real [N,C] feature tensor, got {got}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("fit_linear: the features x contain NaN or Inf values")
    if not isinstance(labels, Tensor) or labels.shape != (x.shape[0],) or labels.is_floating_point():
        got = f"shape {list(labels.shape)}, {labels.dtype}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"fit_linear: labels must be {x.shape[0]} integer class indices (one per row of x), got {got}")
    check_positive("num_classes", num_classes)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"fit_linear: labels must be class indices in [0, {num_classes}), got {labels.unique().tolist()}"
        )
    # a fit must work inside a caller's torch.inference_mode() (its tensors cannot enter autograd: copies can)
    with torch.inference_mode(False), torch.enable_grad():
        return _fit_linear(x.double().clone(), labels.long().cpu().clone(), num_classes, method, l2, max_iter)


def _fit_linear(x: Tensor, y: Tensor, num_classes: int, method: str, l2: float, max_iter: int) -> tuple[Tensor, Tensor]:
    n, c = x.shape
    mean = x.mean(0)
    std = x.std(0, correction=0)
    live = std > 1e-12 * (1 + mean.abs())
    scale = torch.where(live, std, torch.ones_like(std))
    z = torch.where(live, (x - mean) / scale, torch.zeros_like(x))
    if method == "ridge":
        onehot = F.one_hot(y, num_classes).double()
        ym = onehot.mean(0)
        gram = z.T @ z + l2 * n * torch.eye(c, dtype=torch.float64)
        w = torch.linalg.solve(gram, z.T @ (onehot - ym)).T  # z is centred: the bias is the mean target
        b = ym.clone()
    else:
        # the gradient in closed form (softmax minus one-hot): no autograd graph per evaluation, and L-BFGS at
        # torch's default tolerances (probabilities within ~1e-4 of the exact optimum, tested against
        # scikit-learn); the Python overhead per evaluation, not the arithmetic, is the cost here
        onehot = F.one_hot(y, num_classes).double()
        w = torch.zeros(num_classes, c, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

        @torch.no_grad()
        def closure() -> Tensor:
            logp = (z @ w.T + b).log_softmax(1)
            loss = -(logp * onehot).sum() / n + 0.5 * l2 * (w * w).sum()
            residual = (logp.exp() - onehot) / n
            w.grad = residual.T @ z + l2 * w
            b.grad = residual.sum(0)
            return loss

        opt.step(closure)
        w, b = w.detach(), b.detach()
    w = torch.where(live[None], w / scale[None], torch.zeros_like(w))
    return w, b - w @ mean


def layer_probes(
    model: nn.Module,
    data: Data,
    layers: Sequence[str] | None = None,
    *,
    method: str = "logistic",
    l2: float = 1e-3,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    batch_size: int = 64,
    max_iter: int = 200,
    progress: bool | None = None,
) -> Probes:
    """Fit a linear probe on each layer's pooled activations over labelled ``data`` (images the model
    was not trained on, so the probes measure what the layers encode rather than what they memorised).

    ``layers``: default the model's stage outputs (:func:`xcnn.models.stage_layers`). The backbone is
    frozen: one forward pass per batch with every layer tapped, features pooled on the fly; its weights,
    BatchNorm statistics and mode are left untouched. ``num_classes`` (default: the largest label + 1)
    and ``class_names`` let the probes solve another task than the model's (a transfer probe);
    ``class_names`` defaults to the model's when the class counts agree. ``method``: ``"logistic"``
    (default) or ``"ridge"`` (see :func:`fit_linear`).
    """
    if method not in PROBE_METHODS:
        raise ValueError(f"unknown probe method {method!r}; available: {', '.join(PROBE_METHODS)}")
    clf = as_classifier(model)
    layers = _check_layers(clf, layers if layers is not None else stage_layers(clf))
    l2 = check_number("l2", l2, low=0)
    check_positive("max_iter", max_iter)
    if num_classes is not None:
        check_positive("num_classes", num_classes)
    class_names = _check_names(class_names)
    feats, labels = pooled_features(clf, data, layers, batch_size=batch_size, progress=progress)
    k = _check_labels(labels, num_classes)
    if class_names is None and clf.class_names is not None and len(clf.class_names) == k:
        class_names = clf.class_names
    if class_names is not None and len(class_names) != k:
        raise ValueError(f"{len(class_names)} class names for {k} classes")
    weights, biases = {}, {}
    for name in layers:
        weights[name], biases[name] = fit_linear(feats[name], labels, k, method=method, l2=l2, max_iter=max_iter)
    if clf.class_names is not None and class_names is not None:
        model_task = list(class_names) == list(clf.class_names)
    else:
        model_task = num_classes is None and k == clf.num_classes
    return Probes(clf, weights, biases, class_names=class_names, method=method, model_task=model_task)


@register("probe_cam")
class ProbeCAM(Explainer):
    """Class maps of layer-wise probes: ``W_l[k] · A_l + b_l[k]`` at every position of layer ``l``
    (``probes=`` from :func:`layer_probes`, fitted on this model or a copy of it; ``layer`` default the
    probes' deepest layer; several layers average their normalised maps). ``targets=None`` explains the model's top-1 class, as every explainer
    does; for probes fitted on another task than the model's (``Probes.model_task`` False), target indices
    are in the probes' class space and ``None`` explains each layer's probe's own top-1."""

    uses_layer = True

    def __init__(self, model: nn.Module, layer: str | Sequence[str] | None = None, *, probes: Probes) -> None:
        if not isinstance(probes, Probes):
            raise TypeError(
                f"probes must be a Probes object from xcnn.inspection.layer_probes, got {type(probes).__name__}"
            )
        super().__init__(model, layer=layer if layer is not None else probes.layers[-1])
        missing = [name for name in self.layers if name not in probes.layers]
        if missing:
            raise ValueError(f"no probe for layer(s) {missing}; the probes cover {probes.layers}")
        self.probes = probes

    def _explain(self, images: Tensor, targets: Tensor | None) -> list[Tensor]:
        if targets is not None and bool((targets >= self.probes.num_classes).any()):
            raise ValueError(
                f"target class index out of range: the probes have {self.probes.num_classes} classes, got {targets.tolist()}"
            )
        maps = []
        with torch.no_grad(), Tap(self.model.backbone, self.layers) as tap:
            logits = self.model(images)
            if targets is None and self.probes.model_task and logits.shape[1] == self.probes.num_classes:
                targets = logits.argmax(1)
            for layer in self.layers:
                a = tap.get(layer)
                if a.dim() != 4:
                    raise ValueError(f"layer {layer!r} has output shape {list(a.shape)}; probe-CAM needs [B,C,h,w]")
                if a.shape[1] != self.probes.weights[layer].shape[1]:
                    raise ValueError(
                        f"the probe of layer {layer!r} was fitted on {self.probes.weights[layer].shape[1]} channels; "
                        f"this model's layer has {a.shape[1]}"
                    )
                t = targets if targets is not None else self.probes.layer_logits(a, layer).argmax(1)
                maps.append(self.probes.class_maps(a, layer, t.to(a.device)))
        return maps
