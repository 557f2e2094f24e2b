"""xcnn: explain and build interpretable convolutional image classifiers."""

from .explain import Explainer, explainer, list_explainers
from .models import Classifier, default_layer, load_model

__all__ = ["Classifier", "Explainer", "default_layer", "explainer", "list_explainers", "load_model"]
__version__ = "0.1.0"
