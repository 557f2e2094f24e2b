"""Data: image files and bundled sample photos."""

from .images import SAMPLES, load_image, load_images

__all__ = ["SAMPLES", "load_image", "load_images"]
