"""DeepAtlas's two objectives on a batch of (moving, fixed) pairs on the common grid.

Registration loss (F_R trained, F_S fixed): ``lambda_i * L_i(moving o phi, fixed) + lambda_r * s * L_r(u) +
lambda_a * L_a``. Segmentation loss (F_S trained, F_R fixed): ``lambda_a * L_a + lambda_sp * L_sp``. The anatomy
loss ``L_a = 1 - softDice(S_m o phi, S_f)`` uses each image's manual label (one-hot) when it is labelled and F_S's
prediction (softmax) when not; ``S_m o phi`` is interpolated linearly. In the segmentation loss the paper's four
cases are, per pair:

* both labelled: ``L_a`` does not depend on F_S; ``L_sp`` on both images;
* moving labelled only: ``L_a`` with F_S's prediction of the fixed image (gradient to F_S), ``L_sp`` on the moving;
* fixed labelled only: ``L_a`` with F_S's prediction of the moving image, warped; ``L_sp`` on the fixed;
* neither: no segmentation loss (the pair is skipped).

In the registration loss F_S's predictions are taken without gradient (F_S fixed), for any pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..losses import deep_supervision_loss, regularizer_loss, regularizer_scale, similarity_loss, soft_dice_loss
from .config import DeepAtlasTrainConfig
from .model import DeepAtlasModel

_DEFAULTS = DeepAtlasTrainConfig.__dataclass_fields__

__all__ = ["Objective", "PairBatch", "onehot"]


def onehot(index: torch.Tensor, n_labels: int) -> torch.Tensor:
    """(B, Z, Y, X) label indices -> (B, L, Z, Y, X) float one-hot."""
    return F.one_hot(index.long().clamp(min=0), n_labels).permute(0, 4, 1, 2, 3).float()


@dataclass
class PairBatch:
    """B (moving, fixed) pairs on the common grid: images (B, C, Z, Y, X), label indices (B, Z, Y, X) (any value
    where the image is unlabelled), and per pair whether each image is labelled (B,) bool."""

    moving: torch.Tensor
    fixed: torch.Tensor
    moving_label: torch.Tensor
    fixed_label: torch.Tensor
    moving_labelled: torch.Tensor
    fixed_labelled: torch.Tensor

    def to(self, device) -> PairBatch:
        return PairBatch(*(t.to(device) for t in (self.moving, self.fixed, self.moving_label, self.fixed_label,
                                                   self.moving_labelled, self.fixed_labelled)))


@dataclass
class Objective:
    """The weights and choices of the losses (from :class:`~atlasseg.deepatlas.config.DeepAtlasTrainConfig`)."""

    n_labels: int
    grid_shape: tuple[int, int, int]
    lambda_i: float = _DEFAULTS["lambda_i"].default       # defaults: those of the training config (one place)
    lambda_r: float = _DEFAULTS["lambda_r"].default
    lambda_a: float = _DEFAULTS["lambda_a"].default
    lambda_sp: float = _DEFAULTS["lambda_sp"].default
    similarity: str = _DEFAULTS["similarity"].default
    lncc_radius: int = _DEFAULTS["lncc_radius"].default
    regularizer: str = _DEFAULTS["regularizer"].default
    regularizer_reference_size: int = _DEFAULTS["regularizer_reference_size"].default
    supervised: torch.nn.Module | None = None
    deep_supervision_weights: tuple[float, ...] = (1.0,)

    @classmethod
    def from_config(cls, config, n_labels: int, grid_shape, supervised=None, deep_supervision_weights=(1.0,)):
        return cls(n_labels, tuple(grid_shape), config.lambda_i, config.lambda_r, config.lambda_a, config.lambda_sp,
                   config.similarity, config.lncc_radius, config.regularizer, config.regularizer_reference_size,
                   supervised, tuple(deep_supervision_weights))

    @property
    def regularizer_weight(self) -> float:
        """``lambda_r`` times the grid-size factor of the regulariser."""
        return self.lambda_r * regularizer_scale(self.regularizer, self.grid_shape, self.regularizer_reference_size)

    # -- pieces ---------------------------------------------------------------------------------------------
    def segmentation_maps(self, model: DeepAtlasModel, images: torch.Tensor, labels: torch.Tensor,
                          labelled: torch.Tensor, grad: bool) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """(B, L, ...) segmentations: one-hot where labelled, F_S's softmax elsewhere; and F_S's heads when it ran
        with gradient (``grad``: F_S is being trained; it then runs on every image)."""
        maps = onehot(labels, self.n_labels)
        if grad:
            heads = model.segmentation(images)
            probs = heads[0][:, :self.n_labels].softmax(1)
            keep = labelled.reshape(-1, 1, 1, 1, 1)
            return torch.where(keep, maps, probs), heads
        todo = ~labelled
        if bool(todo.any()):
            with torch.no_grad():
                probs = model.segmentation(images[todo])[0][:, :self.n_labels].softmax(1)
            maps = maps.clone()
            maps[todo] = probs
        return maps, None

    def anatomy(self, model: DeepAtlasModel, moving_seg: torch.Tensor, fixed_seg: torch.Tensor,
                ddf: torch.Tensor) -> torch.Tensor:
        """Per pair (B,) ``1 - softDice(S_m o phi, S_f)`` over the foreground labels."""
        warped = model.registration.warp(moving_seg, ddf)
        return torch.stack([soft_dice_loss(warped[b:b + 1], fixed_seg[b:b + 1]) for b in range(len(warped))])

    # -- the two losses -------------------------------------------------------------------------------------
    def registration_loss(self, model: DeepAtlasModel, batch: PairBatch, anatomy: bool = True
                          ) -> tuple[torch.Tensor, dict[str, float]]:
        """F_R's loss (gradient to F_R only); ``anatomy=False``: unsupervised (F_R's pretraining)."""
        raw = model.registration(batch.moving, batch.fixed)
        ddf = model.registration.displacement(raw)
        warped = model.registration.warp(batch.moving, ddf)
        sim = similarity_loss(self.similarity, warped, batch.fixed, self.lncc_radius)
        reg = regularizer_loss(self.regularizer, ddf)
        loss = self.lambda_i * sim + self.regularizer_weight * reg
        parts = {"similarity": float(sim.detach()), "regularizer": float(reg.detach())}
        if anatomy and self.lambda_a > 0:
            moving_seg, _ = self.segmentation_maps(model, batch.moving, batch.moving_label, batch.moving_labelled,
                                                   grad=False)
            fixed_seg, _ = self.segmentation_maps(model, batch.fixed, batch.fixed_label, batch.fixed_labelled,
                                                  grad=False)
            ana = self.anatomy(model, moving_seg, fixed_seg, ddf).mean()
            loss = loss + self.lambda_a * ana
            parts["anatomy"] = float(ana.detach())
        parts["loss"] = float(loss.detach())
        return loss, parts

    def segmentation_loss(self, model: DeepAtlasModel, batch: PairBatch
                          ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """F_S's loss in the paper's four cases (gradient to F_S only); None when it cannot reach F_S (no pair has
        a label, or only pairs with both labels and ``lambda_sp = 0``)."""
        ml, fl = batch.moving_labelled, batch.fixed_labelled
        if not bool((ml | fl).any()):
            return None, {"skipped_pairs": float(len(ml))}
        with torch.no_grad():
            ddf = model.registration.displacement(model.registration(batch.moving, batch.fixed))
        moving_seg, moving_heads = self.segmentation_maps(model, batch.moving, batch.moving_label, ml, grad=True)
        fixed_seg, fixed_heads = self.segmentation_maps(model, batch.fixed, batch.fixed_label, fl, grad=True)
        loss = torch.zeros((), device=batch.moving.device)
        parts: dict[str, float] = {}
        one_labelled = ml ^ fl                          # the anatomy loss reaches F_S only in these pairs
        if self.lambda_a > 0 and bool(one_labelled.any()):
            ana = self.anatomy(model, moving_seg[one_labelled], fixed_seg[one_labelled], ddf[one_labelled]).mean()
            loss = loss + self.lambda_a * ana
            parts["anatomy"] = float(ana.detach())
        if self.lambda_sp > 0 and self.supervised is not None:
            terms = []
            for heads, labels, labelled in ((moving_heads, batch.moving_label, ml),
                                            (fixed_heads, batch.fixed_label, fl)):
                if bool(labelled.any()):
                    terms.append(self.supervised_loss([h[labelled] for h in heads], labels[labelled]))
            sup = torch.stack(terms).mean()
            loss = loss + self.lambda_sp * sup
            parts["supervised"] = float(sup.detach())
        parts["loss"] = float(loss.detach())
        parts["skipped_pairs"] = float((~(ml | fl)).sum())
        if not loss.requires_grad:          # e.g. only pairs with both labels and no supervised term
            return None, parts
        return loss, parts

    def supervised_loss(self, heads: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The supervised segmentation loss (with deep supervision) of F_S's heads against label indices."""
        return deep_supervision_loss(self.supervised, [h[:, :self.n_labels] for h in heads], labels[:, None],
                                     self.deep_supervision_weights)
