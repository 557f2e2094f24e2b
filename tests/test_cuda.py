"""CUDA: maps stay on the GPU, match the CPU, and autocast works. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

import xcnn

from .conftest import required_options
from .test_explain_contract import FAST

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", xcnn.list_explainers())
def test_maps_on_cuda_match_cpu(name):
    torch.manual_seed(0)
    cpu_model = xcnn.load_model("resnet18", pretrained=False)
    gpu_model = xcnn.load_model("resnet18", pretrained=False)
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.cuda()
    images = torch.rand(2, 3, 64, 64)
    options = FAST.get(name, {})
    on_cpu = xcnn.explainer(name, cpu_model, **options, **required_options(name, cpu_model))(images)
    on_gpu = xcnn.explainer(name, gpu_model, **options, **required_options(name, gpu_model))(images.cuda())
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    if name != "smoothgrad":  # its noise comes from the device's generator; RISE and random draw on the CPU
        torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=2e-3, rtol=1e-2)


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


def test_a_plain_module_on_the_gpu():
    from .conftest import TinyCNN

    net = TinyCNN().cuda()
    model = xcnn.load_model(net, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), input_size=(32, 32))
    assert model.mean.device.type == "cuda"
    for name in ("gradcam", "saliency"):
        assert xcnn.explainer(name, net)(torch.rand(2, 3, 32, 32, device="cuda")).device.type == "cuda"
        assert xcnn.explainer(name, model)(torch.rand(2, 3, 32, 32, device="cuda")).device.type == "cuda"
