"""Training: the shared loop and the recipes built on it."""

from .trainer import accuracy_eval, classification_step, fit, load_checkpoint

__all__ = ["accuracy_eval", "classification_step", "fit", "load_checkpoint"]
