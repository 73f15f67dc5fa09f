"""Training shared by every trainable method: :class:`Trainer` (the loop and its hooks), :class:`TrainConfig`
(the settings, defaults written once), patches and augmentation (:mod:`.data`)."""

from .data import AugmentConfig, Augmenter, CaseTensors, candidate_pools, draw_atlases, sample_patch
from .trainer import (
    CHECKPOINT,
    CURVES,
    LOG,
    TrainConfig,
    Trainer,
    TrainingError,
    TrainResult,
    dice_per_label,
    split_targets,
)

__all__ = ["AugmentConfig", "Augmenter", "CHECKPOINT", "CURVES", "CaseTensors", "LOG", "TrainConfig", "TrainResult",
           "Trainer", "TrainingError", "candidate_pools", "dice_per_label", "draw_atlases", "sample_patch",
           "split_targets"]
