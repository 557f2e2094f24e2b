"""Image files and the sample photos bundled with scikit-image, as pixel tensors ``[3,H,W]`` in [0,1]."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

__all__ = ["SAMPLES", "image_label", "load_image", "load_images"]

#: Photos shipped inside scikit-image (no download), reachable as ``"sample:NAME"``.
SAMPLES = ("chelsea", "coffee", "astronaut", "rocket", "camera")


def _open(source: str | Path) -> Image.Image:
    if isinstance(source, str) and source.startswith("sample:"):
        name = source.removeprefix("sample:")
        if name not in SAMPLES:
            raise ValueError(f"unknown sample photo {name!r}; available: {', '.join('sample:' + s for s in SAMPLES)}")
        import skimage.data

        return Image.fromarray(np.asarray(getattr(skimage.data, name)()))
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)  # camera photos: apply the EXIF orientation
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"cannot read image file {path}: {err}") from err


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels are composited on white rather than exposing hidden colour."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit integer grey: full scale is 65535
        arr = np.clip(np.asarray(img, dtype=np.float64) / 65535.0, 0.0, 1.0)
        img = Image.fromarray(np.round(arr * 255).astype(np.uint8))
    elif img.mode == "F":  # float grey: taken as [0,1] if it is, else stretched to it
        arr = np.asarray(img, dtype=np.float64)
        if arr.min() < 0 or arr.max() > 1:
            span = arr.max() - arr.min()
            arr = (arr - arr.min()) / span if span > 0 else np.zeros_like(arr)
        img = Image.fromarray(np.round(arr * 255).astype(np.uint8))
    return img.convert("RGB")


def load_image(source: str | Path, size: int | tuple[int, int] | None = None) -> Tensor:
    """Read an image file (or ``"sample:chelsea"``) as float ``[3,H,W]`` in [0,1], RGB.

    Grayscale, palette, 16-bit and RGBA files are converted. ``size`` = (H, W) or one int for a square:
    the whole image is resized (bicubic), nothing is cropped, so maps cover the full picture.
    """
    img = _to_rgb(_open(source))
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        img = img.resize((int(w), int(h)), Image.BICUBIC)
    arr = np.array(img, dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def load_images(sources: Sequence[str | Path], size: int | tuple[int, int]) -> Tensor:
    """Several images resized to one ``size``, stacked as ``[B,3,H,W]``."""
    if not sources:
        raise ValueError("no images given")
    return torch.stack([load_image(s, size) for s in sources])


def image_label(source: str | Path) -> str:
    """A short file-name-safe label: ``sample:chelsea`` -> ``chelsea``, ``/a/b/cat.jpg`` -> ``cat``."""
    if isinstance(source, str) and source.startswith("sample:"):
        return source.removeprefix("sample:")
    stem = Path(source).stem
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "image"
