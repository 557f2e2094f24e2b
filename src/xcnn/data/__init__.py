"""Data: image files and bundled sample photos."""

from .images import SAMPLES, ImageFolder, batches, load_image, load_images

__all__ = ["SAMPLES", "ImageFolder", "batches", "load_image", "load_images"]
