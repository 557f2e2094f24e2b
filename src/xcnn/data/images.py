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

from .._validate import check_memory, check_number, check_numbers, preview, read_json

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
    """``size`` (one integer for a square, or (H, W); integer-valued floats count) as two positive integers
    whose float image fits in memory."""
    square = isinstance(size, numbers.Real) and not isinstance(size, bool)
    pair = (size, size) if square else size
    h, w = check_numbers("size", pair, 2, integer=True, low=1, expected="an integer or (height, width)")
    check_memory(4 * 3 * h * w, f"an image resized to {h}x{w}")
    return h, w


def load_image(source: str | Path, size: int | tuple[int, int] | None = None) -> Tensor:
    """Read an image file (or ``"sample:chelsea"``) as float ``[3,H,W]`` in [0,1], RGB.

    Grayscale, palette, 16-bit and RGBA files are converted. ``size`` = (H, W) or one int for a square:
    the whole image is resized (bicubic), nothing is cropped, so maps cover the full picture.
    """
    hw = _check_size(size) if size is not None else None
    return _pixels(_open(source), hw)


def _pixels(img: Image.Image, size: tuple[int, int] | None) -> Tensor:
    """A decoded image as float ``[3,H,W]`` in [0,1], RGB, resized (bicubic) to ``size`` = (H, W) when given."""
    img = _to_rgb(img)
    if size is not None:
        img = img.resize((size[1], size[0]), Image.BICUBIC)
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
    original image, W x H; a box reaching past the image's edges is clipped to them, see :func:`read_boxes`).
    When any image has one, every sample carries a ``"mask"`` (empty where an image has none). Image files
    that cannot be read are skipped with a warning naming them. A box file that cannot be read or holds a box
    that is not finite, reversed or wholly outside its image, and a mask file that is not an image, are a
    ``ValueError`` naming the file, raised here (before any sample is drawn); a mask damaged past its header
    is named when its sample is drawn. Samples: ``{"image", "label", "mask"?, "index"}``.
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
        #: the images whose ground truth is a mask file, and the checked boxes of those with a box file
        self._masks: set[int] = set()
        self._boxes: dict[int, list[tuple[float, float, float, float]]] = {}
        for path, label in files:
            has_mask = _mask_file(path).is_file()
            has_box = not has_mask and _box_file(path).is_file()
            try:
                with Image.open(path) as img:  # once: its header (and EXIF) here, its pixels when drawn
                    shown = _oriented_size(img) if has_box else None
                    if img.fp is not None:  # (a PNG whose EXIF follows its pixels was decoded for it: checked)
                        img.verify()
            except Exception as err:
                warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
                continue
            if has_mask:
                _check_mask_file(_mask_file(path))
                self._masks.add(len(self.samples))
            elif has_box:
                self._boxes[len(self.samples)] = read_boxes(_box_file(path), shown)
            self.samples.append((path, label))
        if not self.samples:
            raise ValueError(f"no readable images in {root} (looked for {', '.join(IMAGE_SUFFIXES)} files)")
        self.has_ground_truth = bool(self._masks or self._boxes)
        if class_names is not None:
            self.classes = list(class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, label = self.samples[index]
        img = _open(path)  # decoded once; its size, as shown (EXIF orientation applied), places the boxes
        sample = {"image": _pixels(img, self.size), "label": torch.tensor(label), "index": torch.tensor(index)}
        if self.has_ground_truth:
            mask = _mask_file(path) if index in self._masks else None
            sample["mask"] = _ground_truth(mask, self._boxes.get(index, ()), img.size, self.size)
        return sample

    def name(self, index: int) -> str:
        return str(self.samples[index][0])


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.endswith(".mask.png") and path.is_file()


def _mask_file(path: Path) -> Path:
    return path.with_name(path.stem + ".mask.png")


def _box_file(path: Path) -> Path:
    return path.with_name(path.stem + ".box.json")


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """``(W, H)`` of an opened image as :func:`load_image` shows it (EXIF orientations 5-8 turn it by 90 degrees)."""
    w, h = img.size
    return (h, w) if img.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)


def _check_mask_file(path: Path) -> None:
    """A mask file is an image: its header is read here (its pixels when its sample is drawn)."""
    try:
        with Image.open(path):
            pass
    except Exception as err:  # PIL raises many kinds for a broken file
        raise ValueError(f"cannot read mask file {path}: {type(err).__name__}: {err}") from None


def read_boxes(path: str | Path, size: tuple[int, int]) -> list[tuple[float, float, float, float]]:
    """The boxes of a box file ``{"boxes": [[x0, y0, x1, y1], ...]}`` for an image of ``size`` = (W, H):
    inclusive pixel coordinates, finite, x0 <= x1 and y0 <= y1. A box that reaches past the image's edges
    (x0 = -1 or x1 = W + 0.5, as VOC-style annotations often do) is clipped to 0 <= x0 <= x1 <= W and
    0 <= y0 <= y1 <= H (W and H themselves are kept for files that give the exclusive right and bottom
    edges). A malformed, non-finite or reversed box, or one wholly outside the image, is a ``ValueError``
    naming the file and the box."""
    path = Path(path)
    expected = '{"boxes": [[x0, y0, x1, y1], ...]}'
    data = read_json(path, "box file")
    if not isinstance(data, dict) or not isinstance(data.get("boxes"), list):
        raise ValueError(f"cannot read boxes from {path}: expected {expected}, got {preview(data)}")
    w, h = size
    boxes = []
    for i, box in enumerate(data["boxes"]):
        if not isinstance(box, list) or len(box) != 4:
            raise ValueError(f"cannot read boxes from {path}: box {i} must be [x0, y0, x1, y1], got {preview(box)}")
        try:
            x0, y0, x1, y1 = (
                check_number(f"box {i} {c}", v) for c, v in zip(("x0", "y0", "x1", "y1"), box, strict=True)
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"cannot read boxes from {path}: {err}") from None
        if not (x0 <= x1 and y0 <= y1):
            raise ValueError(f"cannot read boxes from {path}: box {i} {preview(box)} is reversed (x0 <= x1, y0 <= y1)")
        if not (x0 < w and x1 >= 0 and y0 < h and y1 >= 0):
            raise ValueError(
                f"cannot read boxes from {path}: box {i} {preview(box)} lies wholly outside the {w}x{h} image "
                f"(it must overlap columns 0..{w - 1} and rows 0..{h - 1})"
            )
        boxes.append((max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h))))
    return boxes


def _ground_truth(
    mask_file: Path | None, boxes: Iterable[tuple[float, ...]], original: tuple[int, int], size: tuple[int, int]
) -> Tensor:
    """The object mask at ``size`` from ``mask_file`` (when given) or the checked ``boxes`` (in the pixels of
    the ``original`` (W, H) image); empty where there are neither."""
    h, w = size
    if mask_file is not None:
        try:
            with Image.open(mask_file) as m:
                return torch.from_numpy(np.array(m.convert("L").resize((w, h), Image.NEAREST)) > 0)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise ValueError(f"cannot read mask file {mask_file}: {err}") from err
    mask = torch.zeros(h, w, dtype=torch.bool)
    sx, sy = w / original[0], h / original[1]
    for x0, y0, x1, y1 in boxes:
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
