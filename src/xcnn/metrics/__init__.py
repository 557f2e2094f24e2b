"""Metrics that explanations are judged by (docs/methods.md#metrics), batched and in pixel space."""

from .consistency import consistency
from .faithfulness import average_drop_increase, insertion_deletion
from .localization import boxes_to_masks, energy_in_box, iou, pointing_game, shortcut_energy
from .sanity import randomization_sanity

__all__ = [
    "average_drop_increase",
    "boxes_to_masks",
    "consistency",
    "energy_in_box",
    "insertion_deletion",
    "iou",
    "pointing_game",
    "randomization_sanity",
    "shortcut_energy",
]
