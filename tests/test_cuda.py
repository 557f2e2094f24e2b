"""CUDA: maps stay on the GPU, match the CPU, and autocast works. Skipped without a GPU."""

from __future__ import annotations

import copy

import pytest
import torch

import xcnn

from .conftest import assert_equal_up_to_rounding, prepared_model, required_options
from .test_explain_contract import FAST

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def full_float32():
    """TF32 off for convolutions and matmuls (cuDNN uses it by default: ~1e-3 relative error, far above
    float32 rounding), so the GPU computes what the CPU computes, up to rounding."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@pytest.mark.parametrize("name", xcnn.list_explainers())
def test_maps_on_cuda_match_cpu(name, sharp, images32, full_float32):
    """Every method, stochastic ones included (their noise and masks are drawn on the CPU), gives the CPU's
    maps on the GPU up to float rounding: the same rule and model as the CPU batch-independence test."""
    options = {**FAST.get(name, {}), **({"steps": 20} if name == "mdm" else {})}
    sharp = prepared_model(name, sharp)
    on_cpu = xcnn.explainer(name, sharp, **options, **required_options(name, sharp))(images32)
    gpu_model = copy.deepcopy(sharp).cuda()
    gpu = xcnn.explainer(name, gpu_model, **options, **required_options(name, gpu_model))
    on_gpu = gpu(images32.cuda())
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    assert_equal_up_to_rounding(name, gpu, images32.cuda(), on_gpu, on_cpu)


def test_resnet18_gradcam_and_rise_on_cuda_match_cpu(full_float32):
    """The same on a real architecture (random weights: only the arithmetic is compared)."""
    torch.manual_seed(0)
    cpu_model = xcnn.load_model("resnet18", pretrained=False)
    gpu_model = copy.deepcopy(cpu_model).cuda()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for name, options in (("gradcam", {}), ("rise", {"masks": 64})):
        on_cpu = xcnn.explainer(name, cpu_model, **options)(images)
        gpu = xcnn.explainer(name, gpu_model, **options)
        assert_equal_up_to_rounding(name, gpu, images.cuda(), gpu(images.cuda()), on_cpu)


@pytest.mark.parametrize("name", ["gradcam", "scorecam", "rise"])
def test_bf16_autocast_stays_close(name):
    torch.manual_seed(0)
    model = xcnn.load_model("resnet18", pretrained=False).cuda()
    images = torch.rand(2, 3, 64, 64, device="cuda")
    options = FAST.get(name, {})
    full = xcnn.explainer(name, model, **options)(images)
    half = xcnn.explainer(name, model, amp=True, **options)(images)
    assert half.dtype == torch.float32
    corr = torch.corrcoef(torch.stack([full.flatten(), half.flatten()]))[0, 1]
    assert corr > 0.95


@pytest.mark.filterwarnings("ignore::xcnn.models.UnnormalisedInputWarning")  # a bare module on purpose
def test_a_plain_module_on_the_gpu():
    from .conftest import TinyCNN

    net = TinyCNN().cuda()
    model = xcnn.load_model(net, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), input_size=(32, 32))
    assert model.mean.device.type == "cuda"
    for name in ("gradcam", "saliency"):
        assert xcnn.explainer(name, net)(torch.rand(2, 3, 32, 32, device="cuda")).device.type == "cuda"
        assert xcnn.explainer(name, model)(torch.rand(2, 3, 32, 32, device="cuda")).device.type == "cuda"


def test_cgc_under_float16_autocast_matches_float32():
    """The CGC step under float16 autocast (inner gradient scaled): the same loss as in float32, up to
    float16 precision, and fit_cgc with amp=True trains (finite losses; GradScaler through the double
    backward)."""
    from xcnn.data.synthetic import Shapes
    from xcnn.training.benchmark import InMemory
    from xcnn.training.cgc import CGCTraining, fit_cgc

    from .test_lap_training import small_shapesnet

    data = InMemory(Shapes("train", 128, size=32, seed=0))
    model = small_shapesnet().cuda().eval()
    net = CGCTraining(model, lam=0.5, tau=0.5, consistency="contrastive", cam="gradcam", layer="layer4")
    x, y = data.tensors["image"][:32].cuda(), data.tensors["label"][:32].cuda()
    torch.manual_seed(0)
    full = net(x, y)
    torch.manual_seed(0)
    with torch.autocast("cuda", dtype=torch.float16):
        half = net(x, y)
    assert abs(float(half["cgc"]) - float(full["cgc"])) < 0.05 * abs(float(full["cgc"]))
    _, history = fit_cgc(small_shapesnet(), data, epochs=2, batch_size=32, amp=True, device="cuda", progress=False)
    assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in history)


def test_inspection_on_cuda_matches_cpu(full_float32):
    """Filter importance, pooled features and probe accuracy computed on the GPU equal the CPU's up to
    float32 rounding (features are pooled on the device and reduced in float64 on the CPU)."""
    from xcnn.inspection import filter_importance, layer_probes, pooled_features
    from xcnn.nets import ShapesNet
    from xcnn.pipelines import benchmark_data

    torch.manual_seed(0)
    cpu = xcnn.Classifier(ShapesNet(widths=(8, 8, 16, 16)), input_size=(32, 32)).eval()
    gpu = copy.deepcopy(cpu).cuda()
    data = benchmark_data(48, 32)
    for method in ("taylor", "ablation"):
        torch.testing.assert_close(
            filter_importance(gpu, data, "layer3", method), filter_importance(cpu, data, "layer3", method),
            rtol=1e-4, atol=1e-6,
        )  # fmt: skip
    f_gpu, _ = pooled_features(gpu, data, ["layer2", "layer4"])
    f_cpu, _ = pooled_features(cpu, data, ["layer2", "layer4"])
    for name in f_cpu:
        torch.testing.assert_close(f_gpu[name], f_cpu[name], rtol=1e-4, atol=1e-6)
    probes = layer_probes(gpu, data)
    assert set(probes.predict(data["image"][:2].cuda())) == {"layer1", "layer2", "layer3", "layer4"}


def test_protopnet_push_and_training_on_cuda(full_float32):
    """Push on the GPU finds patches as near as the CPU's (the same distances up to float32 rounding; ties
    may pick other images), the prototype view matches, and fit_protopnet with amp=True trains (finite
    losses, similarity computed in float32 under autocast)."""
    from xcnn.data.synthetic import Shapes
    from xcnn.interpretable import protopnet, prototype_view
    from xcnn.training.benchmark import InMemory
    from xcnn.training.protopnet import fit_protopnet, push_prototypes

    from .test_protopnet import small_net

    data = InMemory(Shapes("train", 128, size=32, seed=0))
    cpu = protopnet(small_net(), 2, dim=8).eval()
    gpu = copy.deepcopy(cpu).cuda()
    x = data.tensors["image"][:8]
    with torch.no_grad():
        torch.testing.assert_close(prototype_view(gpu)(x.cuda()).cpu(), prototype_view(cpu)(x), rtol=1e-4, atol=1e-4)
    on_cpu, on_gpu = push_prototypes(cpu, data), push_prototypes(gpu, data)
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert b["distance"] == pytest.approx(a["distance"], rel=1e-4, abs=1e-5)
    _, history, _ = fit_protopnet(
        small_net(), data, warm_epochs=1, joint_epochs=1, last_epochs=1, batch_size=32, amp=True, device="cuda",
        progress=False,
    )  # fmt: skip
    assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in history if "train/loss" in h)


def test_fit_lap_checks_its_cam_layer_with_a_model_already_on_the_gpu():
    """fit_lap's check of the Grad-CAM layer runs one training image through the model before training: the
    image must go where the model is (a model handed over on the GPU failed here)."""
    from xcnn.data.synthetic import Shapes
    from xcnn.training.benchmark import InMemory
    from xcnn.training.lap import fit_lap

    from .test_lap_training import small_shapesnet

    data = InMemory(Shapes("train", 64, size=32, seed=0))
    _, history = fit_lap(small_shapesnet().cuda(), data, epochs=1, injection="gradcam", batch_size=32, device="cuda",
                         progress=False)  # fmt: skip
    assert torch.isfinite(torch.tensor(history[-1]["train/loss"]))
