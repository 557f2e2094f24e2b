"""The ground-truth benchmark ("shapes"): procedural images whose object pixels are known exactly.

Sample ``i`` of a split with a seed is always the same image (its random stream is seeded by
``(seed, split, i)``); nothing is stored on disk. Each sample: ``image [3,S,S]`` float in [0,1],
``label`` (the shape), ``mask [S,S]`` bool (the object's pixels), ``box`` (x0, y0, x1, y1; inclusive
pixel bounds of the mask) and ``shortcut_mask [S,S]`` bool (the planted patch, if any).

Design (docs/methods.md#the-shapes-benchmark): smooth colour background with low-frequency noise and thin lines; one
class object of random position, scale (15-40 % of S), rotation and colour; 0-3 distractor blobs and
strokes drawn *under* the object, placed away from it; optionally a small corner patch whose colour
encodes the label (the planted shortcut, "Clever Hans" test).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["CLASSES", "SHORTCUT_COLOURS", "Shapes"]

CLASSES = ("disk", "square", "triangle", "cross", "ring", "star")
SPLITS = {"train": 0, "val": 1, "test": 2}
DEFAULT_SIZES = {"train": 6000, "val": 1000, "test": 1000}
#: patch colour per class in the planted shortcut (saturated, far apart)
SHORTCUT_COLOURS = np.array(
    [[1.0, 0.0, 0.0], [0.0, 0.8, 0.0], [0.0, 0.2, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0]],
    dtype=np.float32,
)


# ---- shapes as signed distances (negative inside), in units of the shape's radius ----------------------


def _disk(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.hypot(u, v) - 1.0


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) - 0.8


def _triangle(u, v):
    angles = np.pi / 2 + 2 * np.pi * np.arange(3) / 3
    # equilateral: inside all three half-planes; circumradius 1, inradius 0.5
    return np.max([u * math.cos(a) + v * math.sin(a) for a in angles + np.pi], axis=0) - 0.5


def _cross(u, v):
    bar1 = np.maximum(np.abs(u) - 1.0, np.abs(v) - 0.3)
    bar2 = np.maximum(np.abs(u) - 0.3, np.abs(v) - 1.0)
    return np.minimum(bar1, bar2)


def _ring(u, v):
    return np.abs(np.hypot(u, v) - 0.7) - 0.3


def _star(u, v):
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    # five points: the boundary radius moves linearly between 1 (tips) and 0.45 (notches)
    t = np.abs(((phi * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2  # 1 at tips, 0 at notches
    return rho - (0.45 + 0.55 * t)


_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "disk": _disk, "square": _square, "triangle": _triangle, "cross": _cross, "ring": _ring, "star": _star,
}  # fmt: skip


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _coverage(distance_px: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (1-pixel ramp)."""
    return np.clip(0.5 - distance_px, 0.0, 1.0)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of ``[c, g, g]`` to ``[c, size, size]``."""
    t = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None]
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=True)[0].numpy()


class Shapes(Dataset):
    """One split of the shapes benchmark.

    ``split`` in {"train", "val", "test"}; ``n`` samples (default 6000/1000/1000); ``size`` S in 32..224;
    ``shortcut_prob`` p: in train and val, with probability p a patch (10 % of S, top-left corner) is
    drawn in the label's colour; in test, with probability p it is drawn in a random class's colour
    (``shortcut_test="random"``) or never (``"absent"``).
    """

    def __init__(
        self,
        split: str = "train",
        n: int | None = None,
        *,
        size: int = 64,
        seed: int = 0,
        shortcut_prob: float = 0.0,
        shortcut_test: str = "random",
        max_distractors: int = 3,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if not 32 <= size <= 224:
            raise ValueError(f"size must be in 32..224, got {size}")
        if not 0.0 <= shortcut_prob <= 1.0:
            raise ValueError(f"shortcut_prob must be in [0, 1], got {shortcut_prob}")
        if shortcut_test not in ("random", "absent"):
            raise ValueError(f"shortcut_test must be 'random' or 'absent', got {shortcut_test!r}")
        n = DEFAULT_SIZES[split] if n is None else n
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        self.split, self.n, self.size, self.seed = split, int(n), int(size), int(seed)
        self.shortcut_prob, self.shortcut_test, self.max_distractors = (
            float(shortcut_prob),
            shortcut_test,
            max_distractors,
        )
        self.classes = CLASSES
        self.patch = max(3, round(0.1 * size))
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        self._ys, self._xs = ys + 0.5, xs + 0.5  # pixel centres

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"Shapes(split={self.split!r}, n={self.n}, size={self.size}, seed={self.seed}, shortcut_prob={self.shortcut_prob})"

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        index %= self.n
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        label = int(rng.integers(len(CLASSES)))
        image = self._background(rng)
        cx, cy, radius = self._place_object(rng)
        for _ in range(int(rng.integers(0, self.max_distractors + 1))):
            self._distractor(rng, image, (cx, cy, radius))
        coverage = self._object(rng, CLASSES[label], cx, cy, radius)
        colour = self._contrasting_colour(rng, image, coverage)
        image = image * (1 - coverage) + colour[:, None, None] * coverage
        mask = coverage >= 0.5
        shortcut = np.zeros((self.size, self.size), dtype=bool)
        if self.shortcut_prob > 0 and rng.random() < self.shortcut_prob:
            if self.split != "test":
                patch_colour = SHORTCUT_COLOURS[label]
            elif self.shortcut_test == "random":
                patch_colour = SHORTCUT_COLOURS[int(rng.integers(len(CLASSES)))]
            else:
                patch_colour = None
            if patch_colour is not None:
                p = self.patch
                image[:, 1 : 1 + p, 1 : 1 + p] = patch_colour[:, None, None]
                shortcut[1 : 1 + p, 1 : 1 + p] = True
        rows, cols = np.nonzero(mask)
        box = (cols.min(), rows.min(), cols.max(), rows.max())
        return {
            "image": torch.from_numpy(np.clip(image, 0.0, 1.0).astype(np.float32)),
            "label": torch.tensor(label),
            "mask": torch.from_numpy(mask),
            "box": torch.tensor(box, dtype=torch.long),
            "shortcut_mask": torch.from_numpy(shortcut),
        }

    # ---- drawing --------------------------------------------------------------------------------------

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        s = self.size
        image = _upsample(rng.uniform(0.1, 0.9, size=(3, 3, 3)), s)  # smooth colour field
        image += 0.12 * _upsample(rng.normal(size=(1, 8, 8)), s)  # low-frequency texture
        for _ in range(int(rng.integers(1, 4))):  # thin lines
            angle, offset = rng.uniform(0, np.pi), rng.uniform(0.2, 0.8) * s
            dist = np.abs(
                (self._xs - s / 2) * math.cos(angle) + (self._ys - s / 2) * math.sin(angle) - (offset - s / 2)
            )
            alpha = 0.6 * _coverage(dist - 0.5)
            image = image * (1 - alpha) + rng.uniform(0, 1, size=3)[:, None, None].astype(np.float32) * alpha
        return image.astype(np.float32)

    def _place_object(self, rng: np.random.Generator) -> tuple[float, float, float]:
        s = self.size
        radius = rng.uniform(0.075, 0.2) * s  # diameter 15-40 % of the image
        keep_out = 2 + self.patch  # the corner where the shortcut patch may go
        for _ in range(100):
            cx, cy = rng.uniform(radius + 1, s - radius - 1, size=2)
            if not (cx - radius < keep_out and cy - radius < keep_out):
                return float(cx), float(cy), float(radius)
        return s / 2, s / 2, float(radius)

    def _object(self, rng: np.random.Generator, shape: str, cx: float, cy: float, radius: float) -> np.ndarray:
        angle = rng.uniform(0, 2 * np.pi)
        dx, dy = self._xs - cx, self._ys - cy
        u = (dx * math.cos(angle) + dy * math.sin(angle)) / radius
        v = (-dx * math.sin(angle) + dy * math.cos(angle)) / radius
        return _coverage(_SHAPES[shape](u, v) * radius).astype(np.float32)

    def _contrasting_colour(self, rng: np.random.Generator, image: np.ndarray, coverage: np.ndarray) -> np.ndarray:
        """A random colour whose luminance differs from the background under the object by > 0.3: the
        colour says nothing about the class, but the outline is always visible."""
        under = (image * coverage).sum((1, 2)) / max(coverage.sum(), 1e-6)
        for _ in range(50):
            colour = rng.uniform(0, 1, size=3).astype(np.float32)
            if abs(float(_LUMA @ (colour - under))) > 0.3:
                return colour
        return np.clip(1.0 - under, 0.0, 1.0).astype(np.float32)  # the complement always contrasts

    def _distractor(self, rng: np.random.Generator, image: np.ndarray, obj: tuple[float, float, float]) -> None:
        """An elongated blob or a curved stroke (never a class shape), placed away from the object."""
        s = self.size
        cx, cy, radius = obj
        for _ in range(30):
            x, y = rng.uniform(0, s, size=2)
            if math.hypot(x - cx, y - cy) > radius + 0.12 * s:
                break
        else:
            return
        colour = rng.uniform(0, 1, size=3).astype(np.float32)[:, None, None]
        angle = rng.uniform(0, 2 * np.pi)
        dx, dy = self._xs - x, self._ys - y
        u = dx * math.cos(angle) + dy * math.sin(angle)
        v = -dx * math.sin(angle) + dy * math.cos(angle)
        if rng.random() < 0.5:  # blob: an ellipse at least 2:1, with a wobbly outline
            a = rng.uniform(0.06, 0.14) * s
            b = a / rng.uniform(2.0, 3.5)
            wobble = 1 + 0.15 * np.sin(3 * np.arctan2(v, u) + rng.uniform(0, 2 * np.pi))
            dist = (np.hypot(u / a, v / b) - wobble) * b
        else:  # stroke: a parabolic arc of some width
            length, bend, width = rng.uniform(0.15, 0.3) * s, rng.uniform(-0.04, 0.04), rng.uniform(0.8, 1.6)
            dist = np.where(np.abs(u) < length / 2, np.abs(v - bend * u * u), np.inf) - width
        alpha = _coverage(dist)
        image *= 1 - alpha
        image += colour * alpha
