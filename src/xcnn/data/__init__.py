"""Data: image files and bundled sample photos."""

from .images import SAMPLES, ImageFolder, load_image, load_images

__all__ = ["SAMPLES", "ImageFolder", "load_image", "load_images"]
