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


@pytest.fixture(scope="session")
def resnet18() -> xcnn.Classifier:
    """torchvision ResNet-18 with fixed random weights (seed 0), ImageNet normalisation."""
    torch.manual_seed(0)
    return xcnn.load_model("resnet18")


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


@pytest.fixture
def tiny() -> xcnn.Classifier:
    torch.manual_seed(0)
    return xcnn.load_model(TinyCNN(), input_size=(32, 32))


@pytest.fixture
def images32() -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
