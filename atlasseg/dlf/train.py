"""DLF training on the shared trainer: registration cache, atlas re-draws per epoch, patches, augmentation,
generalized Dice loss (+ CE), deep supervision; everything else (schedule, seeds, checkpoints, resume, log,
curves) is :class:`atlasseg.training.Trainer`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..atlas import AtlasSet
from ..cache import RegistrationCache
from ..losses import deep_supervision_loss, make_loss
from ..model_io import save_model
from ..training import (
    Augmenter,
    CaseTensors,
    TrainConfig,
    Trainer,
    TrainingError,
    TrainResult,
    candidate_pools,
    dice_per_label,
    draw_atlases,
    sample_patch,
)
from .inference import predict
from .networks import DLFConfig, build_model, coordinate_maps

__all__ = ["DLFTrainer", "TrainConfig", "TrainingError", "TrainResult", "dice_per_label", "train"]


class DLFTrainer(Trainer):
    """Deep Label Fusion on :class:`~atlasseg.training.Trainer` (targets and atlases from the same set)."""

    method = "dlf"

    def __init__(self, atlas_set: AtlasSet, output: str | Path, architecture: DLFConfig, config: TrainConfig,
                 cache_dir: str | Path | None = None, device: str = "auto", train_ids: Sequence[str] | None = None,
                 log: Callable[[str], None] = print, show_progress: bool = True):
        super().__init__(atlas_set, output, config, device, train_ids, log, show_progress)
        self.architecture = architecture
        self.cache_dir = Path(cache_dir) if cache_dir else self.output / "registration_cache"
        if config.n_atlases < 1:
            raise TrainingError("DLF needs at least one atlas per target (n_atlases >= 1)")
        if config.loss == "ce_mfb":
            raise TrainingError("DLF does not train with 'ce_mfb' (its class weights come from a segmenter's "
                                "training labels); use gdl, gdl_ce or vnet_dice")
        self.loss_fn = make_loss(config.loss)

    # -- hooks ---------------------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        return build_model(self.architecture)

    def architecture_dict(self) -> dict:
        return self.architecture.to_dict()

    def _pools(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        train = candidate_pools(self.train_ids, self.train_ids, self.config.candidates_per_target, self.config.seed)
        val_rng = np.random.default_rng([self.config.seed, 7])
        val = {t: sorted(draw_atlases(self.train_ids, self.config.n_atlases, val_rng)) for t in self.val_ids}
        return train, val

    def prepare_data(self, progress=None) -> None:
        """Register (once, cached) and load every target with its candidate atlases."""
        train_pools, val_pools = self._pools()
        cache = RegistrationCache(self.cache_dir, self.atlas_set, self.config.backend, self.config.preset,
                                  self.device)
        computed = cache.ensure({**train_pools, **val_pools}, progress)
        self.log(f"registration cache {self.cache_dir}: {computed} new registration(s)")
        self.train_cases = [cache.load(t, train_pools[t]) for t in self.train_ids]
        self.val_cases = [cache.load(t, val_pools[t]) for t in self.val_ids]
        self.n_registered_pairs = sum(len(p) for p in train_pools.values()) + sum(len(p) for p in val_pools.values())

    def make_batch(self, case: CaseTensors, rng: np.random.Generator, augmenter: Augmenter) -> dict:
        rows = [int(i) for i in draw_atlases(list(range(len(case.atlas_ids))), self.config.n_atlases, rng)]
        coords = coordinate_maps(tuple(case.target.shape[1:]))
        sample = sample_patch(case, coords, rows, self.config.patch_size, self.config.foreground_ratio, rng)
        sample = augmenter(sample)
        return {k: v[None].to(self.device) for k, v in sample.items()}

    def compute_loss(self, model, batch) -> torch.Tensor:
        out = model(batch["target"], batch["atlas_images"], batch["atlas_labels"], batch["coords"])
        heads = [out.logits] + list(out.deep_supervision)
        return deep_supervision_loss(self.loss_fn, heads, batch["label"], self.architecture.deep_supervision_weights)

    def predict_index(self, model, case: CaseTensors) -> torch.Tensor:
        return predict(model, case.target, case.atlas_images, case.atlas_labels, self.config.patch_size,
                       self.config.overlap, device=self.device).segmentation_index

    def baseline_val_dice(self) -> float:
        """Majority voting of the same validation atlases (the grey line of the curves)."""
        if not self.val_cases:
            return float("nan")
        scores = []
        for case in self.val_cases:
            counts = torch.nn.functional.one_hot(case.atlas_labels, self.n_labels).sum(0)
            scores.append(np.mean(dice_per_label(counts.argmax(-1), case.label, self.n_labels)))
        return float(np.mean(scores))

    def comparable_identity(self, identity: dict) -> dict:
        """Format-1 checkpoints recorded ``kind: "dlf"`` in the architecture; it means the same model."""
        arch = dict(identity.get("architecture", {}))
        if arch.get("kind") == "dlf":
            del arch["kind"]
        return {**identity, "architecture": arch}

    def training_summary(self, epoch: int, elapsed: float) -> dict:
        return {**super().training_summary(epoch, elapsed), "registered_pairs": self.n_registered_pairs}

    def save_model(self, model, extra: dict) -> None:
        extra = {**extra, "registration": {"backend": self.config.backend, "preset": self.config.preset}}
        save_model(self.output, "dlf", model, self.architecture.to_dict(), self.atlas_set.labels,
                   self.atlas_set.modalities, self.config.n_atlases, extra,
                   backbones={"vote": self.architecture.vote_spec().to_dict(),
                              "finetune": self.architecture.finetune_spec().to_dict()})


def train(atlas_set: AtlasSet, output: str | Path, architecture: DLFConfig | None = None,
          config: TrainConfig | None = None, cache_dir: str | Path | None = None, device: str = "auto",
          resume: bool = False, train_ids: Sequence[str] | None = None, log: Callable[[str], None] = print,
          show_progress: bool = True) -> TrainResult:
    """Train a DLF model on an atlas set; see :class:`DLFTrainer`.

    The architecture defaults to the paper's (32/64/128 and 32/64/128/256 channels) with the atlas set's labels and
    modalities.
    """
    architecture = architecture or DLFConfig(n_labels=len(atlas_set.labels), n_modalities=len(atlas_set.modalities))
    if architecture.n_labels != len(atlas_set.labels) or architecture.n_modalities != len(atlas_set.modalities):
        raise TrainingError(f"architecture for {architecture.n_labels} labels / {architecture.n_modalities} "
                            f"modalities, atlas set '{atlas_set.name}' has {len(atlas_set.labels)} / "
                            f"{len(atlas_set.modalities)}")
    trainer = DLFTrainer(atlas_set, output, architecture, config or TrainConfig(), cache_dir, device, train_ids, log,
                         show_progress)
    return trainer.run(resume)
