"""Image files and the sample photos bundled with scikit-image, as pixel tensors ``[3,H,W]`` in [0,1]."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .._validate import check_memory, check_number, read_json

__all__ = ["SAMPLES", "ImageFolder", "image_label", "load_image", "load_images", "read_boxes"]

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


def _check_size(size: object) -> tuple[int, int]:
    """``size`` (one int for a square, or (H, W)) as two positive integers whose float image fits in memory."""
    if isinstance(size, (str, bytes, bool)) or not isinstance(size, (numbers.Integral, Sequence)):
        raise TypeError(f"size must be an integer or (height, width), got {type(size).__name__} {size!r}")
    pair = (size, size) if isinstance(size, numbers.Integral) else size
    if len(pair) != 2:
        raise ValueError(f"size must be an integer or (height, width), got {size!r}")
    h, w = (check_number(f"size[{i}]", v, integer=True, low=1) for i, v in enumerate(pair))
    check_memory(4 * 3 * h * w, f"an image resized to {h}x{w}")
    return int(h), int(w)


def load_image(source: str | Path, size: int | tuple[int, int] | None = None) -> Tensor:
    """Read an image file (or ``"sample:chelsea"``) as float ``[3,H,W]`` in [0,1], RGB.

    Grayscale, palette, 16-bit and RGBA files are converted. ``size`` = (H, W) or one int for a square:
    the whole image is resized (bicubic), nothing is cropped, so maps cover the full picture.
    """
    if size is not None:
        h, w = _check_size(size)
    img = _to_rgb(_open(source))
    if size is not None:
        img = img.resize((w, h), Image.BICUBIC)
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


# ---- folders ------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageFolder(torch.utils.data.Dataset):
    """Images in class folders (``root/<class>/<image>``, classes sorted by name), resized to ``size``.

    Ground truth is optional, beside each image: ``<image stem>.mask.png`` (non-zero pixels = object) or
    ``<image stem>.box.json`` (``{"boxes": [[x0, y0, x1, y1], ...]}``: inclusive pixel coordinates of the
    original image, W x H, with 0 <= x0 <= x1 <= W and 0 <= y0 <= y1 <= H). When any image has one, every
    sample carries a ``"mask"`` (empty where an image has none). Image files that cannot be read are skipped
    with a warning naming them; a ground-truth file that cannot be read, or a box that is not a finite box
    inside its image, is a ``ValueError`` naming the file, raised here (before any sample is drawn).
    Samples: ``{"image", "label", "mask"?, "index"}``.
    """

    def __init__(self, root: str | Path, size: int | tuple[int, int], class_names: Sequence[str] | None = None) -> None:
        import warnings

        root = Path(root)
        if not root.is_dir():
            raise NotADirectoryError(f"data folder not found: {root}")
        self.size = _check_size(size)
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        self.classes = [p.name for p in folders] if folders else ["(none)"]
        files = [(f, i) for i, folder in enumerate(folders) for f in sorted(folder.iterdir()) if _is_image(f)]
        if not folders:  # a flat folder of images: one unnamed class
            files = [(f, 0) for f in sorted(root.iterdir()) if _is_image(f)]
        self.samples: list[tuple[Path, int]] = []
        self._cache: dict[int, dict] = {}
        #: the checked boxes of the images whose ground truth is a box file (their index -> boxes)
        self._boxes: dict[int, list[tuple[float, float, float, float]]] = {}
        for path, label in files:
            try:
                with Image.open(path) as img:
                    img.verify()
            except Exception as err:
                warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
                continue
            if _mask_file(path).is_file():
                _check_mask_file(_mask_file(path))
            elif _box_file(path).is_file():  # (reopened: a verified image cannot be read further)
                with Image.open(path) as img:
                    self._boxes[len(self.samples)] = read_boxes(_box_file(path), _oriented_size(img))
            self.samples.append((path, label))
        if not self.samples:
            raise ValueError(f"no readable images in {root} (looked for {', '.join(IMAGE_SUFFIXES)} files)")
        self.has_ground_truth = any(_mask_file(p).is_file() or _box_file(p).is_file() for p, _ in self.samples)
        if class_names is not None:
            self.classes = list(class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, label = self.samples[index]
        with Image.open(path) as img:
            original = ImageOps.exif_transpose(img).size  # (W, H)
        sample = {"image": load_image(path, self.size), "label": torch.tensor(label), "index": torch.tensor(index)}
        if self.has_ground_truth:
            sample["mask"] = _ground_truth(path, original, self.size, self._boxes.get(index))
        return sample

    def name(self, index: int) -> str:
        return str(self.samples[index][0])


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.endswith(".mask.png")


def _mask_file(path: Path) -> Path:
    return path.with_name(path.stem + ".mask.png")


def _box_file(path: Path) -> Path:
    return path.with_name(path.stem + ".box.json")


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """``(W, H)`` of an opened image as :func:`load_image` shows it (EXIF orientations 5-8 turn it by 90 degrees)."""
    w, h = img.size
    return (h, w) if img.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)


def _check_mask_file(path: Path) -> None:
    try:
        with Image.open(path) as m:
            m.verify()
    except Exception as err:  # PIL raises many kinds for a broken file
        raise ValueError(f"cannot read mask file {path}: {type(err).__name__}: {err}") from None


def read_boxes(path: str | Path, size: tuple[int, int]) -> list[tuple[float, float, float, float]]:
    """The boxes of a box file ``{"boxes": [[x0, y0, x1, y1], ...]}`` for an image of ``size`` = (W, H):
    inclusive pixel coordinates, finite, with 0 <= x0 <= x1 <= W and 0 <= y0 <= y1 <= H (W and H themselves
    are allowed for files that give the exclusive right and bottom edges). Anything else is a ``ValueError``
    naming the file and the box."""
    path = Path(path)
    expected = '{"boxes": [[x0, y0, x1, y1], ...]}'
    data = read_json(path, "box file")
    if not isinstance(data, dict) or not isinstance(data.get("boxes"), list):
        raise ValueError(f"cannot read boxes from {path}: expected {expected}, got {_preview(data)}")
    w, h = size
    boxes = []
    for i, box in enumerate(data["boxes"]):
        if not isinstance(box, list) or len(box) != 4:
            raise ValueError(f"cannot read boxes from {path}: box {i} must be [x0, y0, x1, y1], got {_preview(box)}")
        try:
            x0, y0, x1, y1 = (
                check_number(f"box {i} {c}", v) for c, v in zip(("x0", "y0", "x1", "y1"), box, strict=True)
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"cannot read boxes from {path}: {err}") from None
        if not (0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h):
            raise ValueError(
                f"cannot read boxes from {path}: box {i} {box} must lie inside the {w}x{h} image "
                f"(0 <= x0 <= x1 <= {w}, 0 <= y0 <= y1 <= {h})"
            )
        boxes.append((x0, y0, x1, y1))
    return boxes


def _preview(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a hostile file's content must not flood a message)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ground_truth(
    path: Path, original: tuple[int, int], size: tuple[int, int], boxes: list[tuple[float, ...]] | None = None
) -> Tensor:
    """The object mask at ``size`` from the mask file beside ``path`` or its checked ``boxes`` (in the pixels
    of the ``original`` (W, H) image; read from the box file when not given); empty if neither exists."""
    h, w = size
    if _mask_file(path).is_file():
        try:
            with Image.open(_mask_file(path)) as m:
                return torch.from_numpy(np.array(m.convert("L").resize((w, h), Image.NEAREST)) > 0)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise ValueError(f"cannot read mask file {_mask_file(path)}: {err}") from err
    mask = torch.zeros(h, w, dtype=torch.bool)
    if boxes is None and _box_file(path).is_file():
        boxes = read_boxes(_box_file(path), original)
    sx, sy = w / original[0], h / original[1]
    for x0, y0, x1, y1 in boxes or ():
        # inclusive pixel coordinates: the box covers pixels x0..x1, so its right edge is x1 + 1
        mask[
            max(0, int(y0 * sy)) : min(h, int(np.ceil((y1 + 1) * sy))),
            max(0, int(x0 * sx)) : min(w, int(np.ceil((x1 + 1) * sx))),
        ] = True
    return mask


def batches(data: Dataset | Mapping[str, Tensor], batch_size: int) -> Iterable[object]:
    """The batches of ``data``, in order: a dataset through a (non-shuffling) DataLoader, or a dict of
    stacked tensors (``{"image": [N,3,H,W], "label": [N], ...}``) sliced ``batch_size`` rows at a time."""
    if isinstance(data, Mapping):
        n = len(data["image"])
        for start in range(0, n, batch_size):
            yield {k: v[start : start + batch_size] for k, v in data.items()}
    else:
        yield from DataLoader(data, batch_size=batch_size, shuffle=False)
