"""Shared fixtures: small deterministic models and real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import xcnn
from xcnn.data.images import load_image


def pearson(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _offline(tmp_path_factory):
    """No test touches the network or this machine's weight caches: torch.hub and the Hugging Face hub point
    at empty folders, HF runs offline, and a torch.hub download fails at once (as with no internet)."""
    import urllib.error

    from huggingface_hub import constants

    caches = tmp_path_factory.mktemp("weight-caches")

    def no_download(url, *args, **kwargs):
        raise urllib.error.URLError(f"the tests run offline (asked for {url})")

    with pytest.MonkeyPatch.context() as mp:
        for var, value in {"TORCH_HOME": caches / "torch", "HF_HOME": caches / "hf", "HF_HUB_OFFLINE": "1"}.items():
            mp.setenv(var, str(value))
        mp.setattr(constants, "HF_HUB_CACHE", str(caches / "hf" / "hub"))  # read from the environment at import
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        mp.setattr(torch.hub, "download_url_to_file", no_download)
        yield caches


@pytest.fixture(scope="session")
def resnet18() -> xcnn.Classifier:
    """torchvision ResNet-18 with fixed random weights (seed 0), ImageNet normalisation."""
    torch.manual_seed(0)
    return xcnn.load_model("resnet18", pretrained=False)


@pytest.fixture(scope="session")
def lite0() -> xcnn.Classifier:
    """The bundled EfficientNet-Lite0 with its real ImageNet weights."""
    return xcnn.load_model()


@pytest.fixture(scope="session")
def photos() -> torch.Tensor:
    """chelsea (Egyptian cat) and coffee (espresso) at 224x224, [2,3,224,224] in [0,1]."""
    return torch.stack([load_image("sample:chelsea", 224), load_image("sample:coffee", 224)])


class TinyCNN(nn.Module):
    """A small conv net with BatchNorm, Dropout and an in-place ReLU: 10 classes, any input size."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.drop(self.pool(self.features(x)).flatten(1)))


@pytest.fixture(scope="session")
def bench32(tmp_path_factory):
    """ShapesNet on 32x32 shapes, 2000 images x 6 epochs (~50 s on 2 cores; ~60 % test accuracy):
    ``(model, results, folder)``, shared by the tests that need a trained benchmark model."""
    from xcnn.training.benchmark import fit_benchmark

    out = tmp_path_factory.mktemp("bench32")
    model, results = fit_benchmark(
        out, size=32, n_train=2000, n_val=300, n_test=300, epochs=6, strides=(1, 1, 2, 2, 1), lr=3e-3, progress=False
    )
    return model, results, out


@pytest.fixture
def tiny() -> xcnn.Classifier:
    torch.manual_seed(0)
    return xcnn.load_model(TinyCNN(), raw_pixels=True, input_size=(32, 32))


@pytest.fixture
def images32() -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def sharp() -> xcnn.Classifier:
    """TinyCNN with its head scaled 30x: confident, image-dependent logits, so every explainer's raw map has
    a span well above float rounding (the plain ``tiny`` is near-uniform: occlusion's probability drops are
    ~1e-4 there, and stretching them to [0,1] magnifies rounding into the map)."""
    torch.manual_seed(0)
    model = xcnn.load_model(TinyCNN(), input_size=(32, 32), raw_pixels=True)
    with torch.no_grad():
        model.backbone.fc.weight.mul_(30)
    return model


#: Float rounding allowance. The same image can give logits that differ by ~1e-6 relatively when the batch
#: size, the thread count or the device changes (kernels block and sum in a different order). That error is
#: relative to the quantities a map is built from, so the allowance is 1e-5 (~100 float32 epsilons) of their
#: scale; min-max normalisation divides it by the raw map's span. Maps whose span is below 1e-3 of their
#: scale are refused: there rounding decides the picture and no tolerance is meaningful.
ROUNDING = 1e-5
#: raw maps that are differences of probabilities (p_clean - p_occluded): their scale is 1, not the difference
PROBABILITY_DIFFERENCES = {"occlusion"}


def raw_maps(expl, images: torch.Tensor, targets=None) -> torch.Tensor:
    """The explainer's raw (unnormalised) maps ``[B,h,w]`` of its first layer, as ``__call__`` computes them."""
    from xcnn.explain.base import check_images, check_targets
    from xcnn.hooks import frozen

    images = check_images(images)
    with frozen(expl.model):
        raw = expl._explain(images, check_targets(targets, len(images), images.device))
    return (raw[0] if isinstance(raw, list) else raw).detach().float()


def assert_equal_up_to_rounding(
    name: str, expl, images: torch.Tensor, maps: torch.Tensor, other: torch.Tensor, targets=None
) -> None:
    """``maps`` and ``other`` (normalised maps of ``images``, computed two ways) agree within
    :data:`ROUNDING` of the raw maps' scale, over each raw map's span."""
    raw = raw_maps(expl, images, targets).cpu()
    span = raw.amax(dim=(1, 2)) - raw.amin(dim=(1, 2))
    scale = torch.ones_like(span) if name in PROBABILITY_DIFFERENCES else raw.abs().amax(dim=(1, 2))
    assert bool((span > 1e-3 * scale).all()), (
        f"{name}: raw maps too flat for a rounding check (span/scale {(span / scale).tolist()})"
    )
    allowed = ROUNDING * scale / span
    gap = (maps.cpu() - other.cpu()).abs().amax(dim=(1, 2))
    assert bool((gap <= allowed).all()), f"{name}: maps differ by {gap.tolist()}, rounding allows {allowed.tolist()}"


def prepared_model(name: str, model: nn.Module) -> nn.Module:
    """The model an explainer can explain: ``lap`` reads a LAP layer, so it gets a copy of ``model`` with a
    2-head global LAP layer (heads make its maps depend on the target) whose attention is random (seeded,
    built on the CPU, then moved to ``model``'s device) instead of the constant it starts with; ``prototype``
    gets a prototype network on ``model``'s backbone (2 prototypes of 8 channels per class, seeded, built on the
    CPU); every other method gets ``model`` itself."""
    import copy

    from xcnn.interpretable import has_prototypes, insert_lap, lap_layers, protopnet

    device = next(model.parameters()).device
    if name == "prototype" and not has_prototypes(model):
        with torch.inference_mode(False):
            return protopnet(copy.deepcopy(model).cpu(), 2, dim=8, seed=0).to(device)
    if name != "lap" or lap_layers(model):
        return model
    # a test may build its explainer inside torch.inference_mode(): the copy's parameters must stay trainable
    with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lap = insert_lap(copy.deepcopy(model).cpu(), heads=2)
        layer = lap.backbone.get_submodule(lap_layers(lap.backbone)[-1])
        with torch.no_grad():
            for param in layer.attention[2].parameters():
                param.normal_()
        return lap.to(device)


def required_options(name: str, model: nn.Module) -> dict:
    """Options an explainer cannot run without: TAME needs a head (an untrained one, seeded, on the
    model's last spatial layer, serves the contract tests); probe-CAM needs probes (fitted on the CPU to
    24 seeded random images with cyclic labels, on every layer with a [C,h,w] output larger than 1x1)."""
    if name == "probe_cam":
        import copy

        from xcnn.inspection import layer_probes
        from xcnn.models import survey_layers

        cpu = copy.deepcopy(model).cpu()
        layers = [
            name for name, shape in survey_layers(cpu).shapes.items() if len(shape) == 3 and shape[1] * shape[2] > 1
        ]
        images = torch.rand(24, 3, *cpu.input_size, generator=torch.Generator().manual_seed(0))
        data = {"image": images, "label": torch.arange(24) % cpu.num_classes}
        return {"probes": layer_probes(cpu, data, layers, progress=False)}
    if name == "tame":
        from xcnn.explain.tame import tame_head
        from xcnn.models import default_layer

        return {"head": tame_head(model, [default_layer(model)])}
    return {}


def torchrun(script_text: str, tmp_path, nproc: int = 2):
    """Run ``script_text`` under ``torch.distributed.run`` with ``nproc`` CPU processes; the completed process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "train.py"
    script.write_text(script_text)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result
