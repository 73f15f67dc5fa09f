"""DLF losses: generalized Dice (MONAI), optionally plus cross-entropy, and deep supervision weighting."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import GeneralizedDiceLoss
from torch import nn


class GeneralizedDiceCELoss(nn.Module):
    """Generalized Dice loss on softmax probabilities plus ``ce_weight`` x cross-entropy.

    ``logits`` (B, L, Z, Y, X); ``target`` (B, 1, Z, Y, X) label indices. ``ce_weight=0`` is the plain
    generalized Dice loss.
    """

    def __init__(self, ce_weight: float = 1.0):
        super().__init__()
        self.dice = GeneralizedDiceLoss(to_onehot_y=True, softmax=True)
        self.ce_weight = ce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.dice(logits, target)
        if self.ce_weight:
            loss = loss + self.ce_weight * nn.functional.cross_entropy(logits, target[:, 0].long())
        return loss


def loss_function(name: str) -> GeneralizedDiceCELoss:
    """``"gdl"`` (generalized Dice) or ``"gdl_ce"`` (generalized Dice + cross-entropy)."""
    if name not in ("gdl", "gdl_ce"):
        raise ValueError(f"loss must be 'gdl' or 'gdl_ce', got {name!r}")
    return GeneralizedDiceCELoss(1.0 if name == "gdl_ce" else 0.0)


def deep_supervision_loss(loss_fn: nn.Module, heads: Sequence[torch.Tensor], target: torch.Tensor,
                          weights: Sequence[float]) -> torch.Tensor:
    """Weighted mean of the loss over output heads (full resolution first; all upsampled to the target size)."""
    weights = list(weights[:len(heads)]) or [1.0]
    return sum(w * loss_fn(h, target) for w, h in zip(weights, heads)) / sum(weights)
