"""Properties that matter: on a model whose decision depends only on a known region, the maps point there."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import xcnn

SIZE = 32
REGION = (slice(18, 28), slice(4, 14))  # rows, cols of the only evidence the model uses


class RegionModel(nn.Module):
    """Positive conv features, pooled over a fixed region only; class 1's logit rises with them, class 0's
    falls. So p(class 1) depends on the region's pixels and nothing else, monotonically."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.abs_()
            self.features[0].bias.zero_()
        region = torch.zeros(SIZE, SIZE)
        region[REGION] = 1
        self.register_buffer("region", region)
        self.fc = nn.Linear(6, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(0.05 * torch.stack([-torch.ones(6), torch.ones(6)]))  # p(class 1) ~ 0.8: not saturated

    def forward(self, x):
        f = self.features(x)
        pooled = (f * self.region).sum((2, 3)) / self.region.sum()
        return self.fc(pooled)


# Grad-CAM family methods with one weight per channel (gradcam, gradcam++, xgradcam, scorecam) spread the
# weight over every location where the channel fires, so they are not pixel-exact by design; the methods
# below are, and must put their maximum inside the region.
REGION_EXACT = {
    "hirescam": {},
    "layercam": {},
    "saliency": {},
    "integrated_gradients": {"steps": 16},
    "smoothgrad": {"samples": 8, "noise": 0.05},
    "occlusion": {"patch": 4, "stride": 2},
    "rise": {},  # the default 4000 masks: with 1000 the estimator's noise can still win at one pixel
}


@pytest.fixture(scope="module")
def region_model():
    torch.manual_seed(0)
    return xcnn.load_model(RegionModel(), raw_pixels=True, input_size=(SIZE, SIZE))


@pytest.mark.parametrize("name", sorted(REGION_EXACT))
def test_map_points_at_the_only_evidence(name, region_model):
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    maps = xcnn.explainer(name, region_model, **REGION_EXACT[name])(images, torch.ones(4, dtype=torch.long))
    inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inside[REGION] = True
    for m in maps:
        peak = divmod(int(m.argmax()), SIZE)
        assert inside[peak], f"{name}: maximum at {peak}, outside the region"
        if name == "rise":  # a Monte-Carlo estimate over smooth masks: a raised floor everywhere, peak inside
            assert m[inside].mean() > 1.5 * m[~inside].mean()
        else:  # most of the map's mass lies inside the region (~10 % of the image)
            assert m[inside].sum() / m.sum() > 0.5, f"{name}: only {float(m[inside].sum() / m.sum()):.2f} inside"


@pytest.mark.parametrize("name", ["hirescam", "layercam", "saliency", "integrated_gradients", "occlusion"])
def test_map_is_zero_where_the_model_does_not_look(name, region_model):
    """Pixel-exact methods give exactly nothing far from the region (beyond the conv's 1-pixel reach)."""
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    options = {**REGION_EXACT[name], **({"layer": "features"} if name in ("hirescam", "layercam") else {})}
    maps = xcnn.explainer(name, region_model, **options)(images, torch.ones(2, dtype=torch.long))
    far = torch.ones(SIZE, SIZE, dtype=torch.bool)
    far[14:32, 0:18] = False  # region grown by the patch/receptive field
    if name == "occlusion":  # signed map: "nothing" is the value of a zero drop, the map's minimum here
        assert (maps[:, far] - maps[:, far].amin()).abs().max() < 1e-6
    else:
        assert maps[:, far].abs().max() < 1e-6


class ConstantProbability(nn.Module):
    """p(class 0) = 0.3 whatever the input."""

    def forward(self, x):
        return torch.log(torch.tensor([0.3, 0.7])).expand(len(x), 2) + 0 * x.sum((1, 2, 3))[:, None]


def test_rise_raw_map_estimates_the_expected_probability_given_the_pixel():
    """RISE's raw map is sum_i P_i M_i / (N p): for a model with P = 0.3 everywhere it estimates
    E[P | pixel kept] = 0.3 at every pixel (a mask's mean is p). Over 2000 masks the Monte-Carlo error of a
    pixel is ~0.006 (p = 0.5) to ~0.01 (p = 0.25); 0.05 allows its maximum over the 1024 pixels, and a map
    not divided by p (0.15 or 0.075) is far outside it."""
    from .conftest import raw_maps

    model = xcnn.load_model(ConstantProbability(), raw_pixels=True, input_size=(SIZE, SIZE))
    images = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    for p in (0.5, 0.25):
        raw = raw_maps(xcnn.explainer("rise", model, p=p, masks=2000), images, torch.zeros(1, dtype=torch.long))
        assert (raw - 0.3).abs().max() < 0.05, (p, raw.min().item(), raw.max().item())


class MeanBrightness(nn.Module):
    """Class 1's logit is 20 * (mean pixel value - 0.25), class 0's its negative."""

    def forward(self, x):
        z = 20 * (x.mean((1, 2, 3)) - 0.25)
        return torch.stack([-z, z], 1)


def test_occlusion_raw_map_is_the_mean_drop_over_the_covering_windows():
    """On a constant image every (full) window removes the same brightness, so every window's drop is
    p(x) - p(x with one 4x4 square black), by hand; each pixel's value, the mean over the windows that cover
    it (1 to 4 of them here), is that drop everywhere."""
    from .conftest import raw_maps

    model = xcnn.load_model(MeanBrightness(), raw_pixels=True, input_size=(SIZE, SIZE))
    images = torch.full((1, 3, SIZE, SIZE), 0.25)  # p = 0.5 on the clean image: a drop of ~0.04, not ~1e-5
    raw = raw_maps(xcnn.explainer("occlusion", model, patch=4, stride=2), images, torch.ones(1, dtype=torch.long))
    occluded = torch.sigmoid(torch.tensor(2 * 20 * (0.25 * (1 - 16 / SIZE**2) - 0.25), dtype=torch.float64))
    torch.testing.assert_close(raw, torch.full_like(raw, float(0.5 - occluded)), rtol=1e-4, atol=1e-6)
