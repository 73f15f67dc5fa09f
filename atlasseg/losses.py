"""Losses shared by the methods: generalized Dice (+ cross-entropy), V-Net's Dice loss, median-frequency class
weights for cross-entropy, deep supervision weighting, and :func:`make_loss` that picks one by name
(``TrainConfig.loss``).

Shapes: ``logits`` (B, C, *spatial); label maps hold class indices, (B, 1, *spatial) or (B, *spatial).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import GeneralizedDiceLoss
from torch import nn


def _index_map(target_index: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Class indices as a (B, *spatial) long tensor matching ``logits`` (B, C, *spatial)."""
    if target_index.dim() == logits.dim():
        if target_index.shape[1] != 1:
            raise ValueError(f"target must have one channel, got shape {tuple(target_index.shape)}")
        target_index = target_index[:, 0]
    if target_index.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"target shape {tuple(target_index.shape)} does not match logits {tuple(logits.shape)}")
    return target_index.long()


def vnet_dice_loss(logits: torch.Tensor, target_index: torch.Tensor, include_background: bool = False,
                   eps: float = 1e-6, smooth: float = 0.0) -> torch.Tensor:
    """V-Net's Dice loss (Milletari et al. 2016): ``1 - mean_c 2 sum(p g) / (sum(p^2) + sum(g^2))``.

    ``p`` is the softmax of ``logits`` (B, C, *spatial), ``g`` the one-hot of ``target_index`` (B, 1, *spatial)
    (integer classes in ``[0, C)``). Sums run over the voxels of each sample; the Dice is averaged over the
    samples and the classes ``1..C-1`` (also class 0 with ``include_background``). ``eps`` guards the
    denominator. With the default ``smooth=0`` a class absent from both target and prediction scores 0 with zero
    gradient (a constant offset); ``smooth > 0``, added to numerator and denominator, makes it score 1 instead.
    Returns a scalar.
    """
    target = _index_map(target_index, logits)
    n_classes = logits.shape[1]
    if n_classes < 2 and not include_background:
        raise ValueError("vnet_dice_loss needs at least 2 classes when the background is excluded")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= n_classes):
        raise ValueError(f"target classes must lie in [0, {n_classes})")
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target, n_classes).movedim(-1, 1).to(probs.dtype)
    axes = tuple(range(2, logits.dim()))
    overlap = (probs * onehot).sum(axes)
    denominator = (probs * probs).sum(axes) + onehot.sum(axes)     # g^2 == g for a one-hot
    dice = (2 * overlap + smooth) / (denominator + smooth + eps)     # (B, C)
    first = 0 if include_background else 1
    return 1 - dice[:, first:].mean()


def _cpu_tensor(a: torch.Tensor | np.ndarray | Sequence) -> torch.Tensor:
    return a.detach().cpu() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))


def _as_counts(label_counts: torch.Tensor | np.ndarray | Sequence) -> torch.Tensor:
    counts = _cpu_tensor(label_counts).to(torch.float64)
    if counts.dim() == 1:
        counts = counts[None]
    if counts.dim() != 2 or counts.shape[1] == 0:
        raise ValueError(f"label_counts must be (n_classes,) or (n_images, n_classes), got {tuple(counts.shape)}")
    if bool((counts < 0).any()):
        raise ValueError("label_counts must be non-negative")
    return counts


def median_frequency_weights(label_counts: torch.Tensor | np.ndarray | Sequence,
                             absent_weight: float = 0.0) -> torch.Tensor:
    """Median-frequency class weights (Eigen & Fergus 2015, SegNet: Badrinarayanan et al. 2017).

    ``label_counts``: voxel counts per class, (n_classes,) for one pooled set, or (n_images, n_classes). The
    frequency of class c is its voxel count divided by the voxel count of the images that contain c (for one
    pooled set: of all voxels), and ``weight_c = median(freq) / freq_c``, the median taken over the classes
    present (the mean of the two middle values for an even number, as numpy's). A class absent everywhere gets
    ``absent_weight``: 0 by default, since there is no frequency to balance and it then cannot change a loss.
    Returns float32 weights (n_classes,), usable as ``torch.nn.functional.cross_entropy(..., weight=w)``.
    """
    counts = _as_counts(label_counts)
    image_sizes = counts.sum(dim=1, keepdim=True).expand_as(counts)
    class_counts = counts.sum(dim=0)
    present = class_counts > 0
    if not bool(present.any()):
        raise ValueError("label_counts are all zero")
    seen_in = (image_sizes * (counts > 0)).sum(dim=0)
    freq = class_counts[present] / seen_in[present]
    weights = torch.full_like(class_counts, float(absent_weight))
    weights[present] = torch.quantile(freq, 0.5) / freq
    return weights.float()


def median_frequency_weights_from_labels(labels: torch.Tensor | np.ndarray | Sequence, n_classes: int,
                                         absent_weight: float = 0.0) -> torch.Tensor:
    """:func:`median_frequency_weights` of label maps: a tensor/array whose first axis indexes the images
    (e.g. (B, 1, Z, Y, X)) or a sequence of per-image label arrays of any shapes. Labels in ``[0, n_classes)``."""
    images = list(labels) if isinstance(labels, (list, tuple)) else list(_cpu_tensor(labels))
    rows = []
    for image in images:
        flat = _cpu_tensor(image).reshape(-1).long()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n_classes):
            raise ValueError(f"labels must lie in [0, {n_classes})")
        rows.append(torch.bincount(flat, minlength=n_classes))
    if not rows:
        raise ValueError("no label maps given")
    return median_frequency_weights(torch.stack(rows), absent_weight)


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
            loss = loss + self.ce_weight * F.cross_entropy(logits, target[:, 0].long())
        return loss


class _VNetDice(nn.Module):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return vnet_dice_loss(logits, target)


class _BalancedCrossEntropy(nn.Module):
    """Cross-entropy with per-class weights (median-frequency balancing)."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target[:, 0].long(), weight=self.weights.to(logits.device, logits.dtype))


LOSS_NAMES = ("gdl", "gdl_ce", "vnet_dice", "ce_mfb")


def make_loss(name: str, class_weights: torch.Tensor | None = None) -> nn.Module:
    """A segmentation loss by name: ``gdl`` (generalized Dice), ``gdl_ce`` (+ cross-entropy), ``vnet_dice``
    (V-Net's Dice with squared terms in the denominator), ``ce_mfb`` (cross-entropy weighted by ``class_weights``,
    e.g. :func:`median_frequency_weights_from_labels`). Each takes ``(logits (B, L, ...), labels (B, 1, ...))``."""
    if name in ("gdl", "gdl_ce"):
        return GeneralizedDiceCELoss(1.0 if name == "gdl_ce" else 0.0)
    if name == "vnet_dice":
        return _VNetDice()
    if name == "ce_mfb":
        if class_weights is None:
            raise ValueError("loss 'ce_mfb' needs class weights (median frequencies of the training labels)")
        return _BalancedCrossEntropy(class_weights)
    raise ValueError(f"loss must be one of {', '.join(LOSS_NAMES)}, got {name!r}")


def deep_supervision_loss(loss_fn: nn.Module, heads: Sequence[torch.Tensor], target: torch.Tensor,
                          weights: Sequence[float]) -> torch.Tensor:
    """Weighted mean of the loss over output heads (full resolution first; all upsampled to the target size)."""
    weights = list(weights[:len(heads)]) or [1.0]
    return sum(w * loss_fn(h, target) for w, h in zip(weights, heads)) / sum(weights)
