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


# ---------------------------------------------------------------------------------------------------------------
# registration losses (DeepAtlas, the learned registration backend)
#
# Fields are dense displacements or velocities in voxel units, (B, 3, Z, Y, X) with channels in array-axis order
# (z, y, x), as MONAI's ``DVF2DDF`` / ``Warp`` take them. The regularisers are written here rather than taken from
# MONAI because MONAI's bending-energy stencil changed between versions (1.4 -> 1.6), so one weight would mean
# different smoothing depending on the installed MONAI.

SIMILARITIES = ("lncc", "ncc")
REGULARIZERS = ("diffusion", "bending")
REGULARIZER_REFERENCE_SIZE = 128


def lncc_loss(warped: torch.Tensor, fixed: torch.Tensor, radius: int = 4) -> torch.Tensor:
    """``1 - mean`` local squared normalised cross-correlation over ``(2r+1)^3`` windows (VoxelMorph's NCC with a
    9^3 window for ``radius=4``); (B, C, Z, Y, X) each. 0 for locally affine-related images, at most 1."""
    from .registration.filters import lncc

    return 1.0 - lncc(warped, fixed, int(radius)).mean()


def global_ncc_loss(warped: torch.Tensor, fixed: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``1 - `` Pearson correlation of the whole images, per sample and channel, averaged; in [0, 2]."""
    a = warped.flatten(2) - warped.flatten(2).mean(-1, keepdim=True)
    b = fixed.flatten(2) - fixed.flatten(2).mean(-1, keepdim=True)
    ncc = (a * b).sum(-1) / ((a.square().sum(-1) * b.square().sum(-1)).sqrt() + eps)
    return 1.0 - ncc.mean()


def similarity_loss(name: str, warped: torch.Tensor, fixed: torch.Tensor, radius: int = 4) -> torch.Tensor:
    """An image dissimilarity by name: ``lncc`` (:func:`lncc_loss`) or ``ncc`` (:func:`global_ncc_loss`)."""
    if name == "lncc":
        return lncc_loss(warped, fixed, radius)
    if name == "ncc":
        return global_ncc_loss(warped, fixed)
    raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {name!r}")


def _field(ddf: torch.Tensor) -> torch.Tensor:
    if ddf.dim() != 5 or ddf.shape[1] != 3:
        raise ValueError(f"a 3D field is (B, 3, Z, Y, X), got shape {tuple(ddf.shape)}")
    return ddf


def diffusion_regularizer(ddf: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser: the mean squared forward difference of the field, per axis the mean over the
    components and the voxel pairs, then the mean over the three axes (VoxelMorph's ``Grad('l2')``).

    For the same physical deformation it does not depend on the grid's resolution (a voxel displacement and a
    per-voxel difference scale alike), so its weight needs no scaling by grid size. 0 for a constant field."""
    _field(ddf)
    terms = [(ddf.narrow(d, 1, ddf.shape[d] - 1) - ddf.narrow(d, 0, ddf.shape[d] - 1)).square().mean()
             for d in (2, 3, 4)]
    return sum(terms) / 3.0


def bending_energy(ddf: torch.Tensor) -> torch.Tensor:
    """Bending energy: per voxel and component ``sum_ij (d2 u / dx_i dx_j)^2`` (mixed terms counted twice),
    averaged over the interior voxels (one voxel from every face), the components and the batch.

    Second derivatives by central differences in voxel units: ``u[i+1] - 2u[i] + u[i-1]`` along an axis,
    ``(u[+1,+1] - u[+1,-1] - u[-1,+1] + u[-1,-1]) / 4`` across two. 0 for an affine field; ``4 a^2 / 3`` for
    ``u = (a x^2, 0, 0)``. For the same physical deformation it grows with the square of the grid size: scale its
    weight with :func:`regularizer_scale`. Needs at least 3 voxels per axis."""
    _field(ddf)
    if min(ddf.shape[2:]) < 3:
        raise ValueError(f"bending energy needs at least 3 voxels per axis, got {tuple(ddf.shape[2:])}")
    core = (slice(None), slice(None), slice(1, -1), slice(1, -1), slice(1, -1))

    def shifted(offsets: dict[int, int]) -> torch.Tensor:
        sl = [slice(None), slice(None)]
        for d in (2, 3, 4):
            o, n = offsets.get(d, 0), ddf.shape[d]
            sl.append(slice(1 + o, n - 1 + o))
        return ddf[tuple(sl)]

    centre = ddf[core]
    energy = torch.zeros_like(centre)
    for d in (2, 3, 4):
        energy = energy + (shifted({d: 1}) - 2.0 * centre + shifted({d: -1})).square()
    for a, b in ((2, 3), (2, 4), (3, 4)):
        mixed = (shifted({a: 1, b: 1}) - shifted({a: 1, b: -1}) - shifted({a: -1, b: 1})
                 + shifted({a: -1, b: -1})) / 4.0
        energy = energy + 2.0 * mixed.square()
    return energy.mean()


def regularizer_scale(name: str, grid_shape: Sequence[int],
                      reference_size: int = REGULARIZER_REFERENCE_SIZE) -> float:
    """Factor by which a regulariser's weight is multiplied on a grid of ``grid_shape`` voxels, so that one weight
    means the same smoothing of a physical deformation at any resolution: 1 for ``diffusion`` (first derivatives
    of a voxel displacement do not change with the grid), ``(S / reference_size)^2`` for ``bending`` (second
    derivatives shrink as ``1 / S``; ``S``: the geometric mean of the grid's voxel counts; the MONAI tutorial's
    ``(S / 128)^2`` rule)."""
    if name == "diffusion":
        return 1.0
    if name == "bending":
        size = float(np.prod([float(s) for s in grid_shape])) ** (1.0 / len(grid_shape))
        return (size / float(reference_size)) ** 2
    raise ValueError(f"regularizer must be one of {', '.join(REGULARIZERS)}, got {name!r}")


def regularizer_loss(name: str, ddf: torch.Tensor) -> torch.Tensor:
    """A smoothness regulariser by name: ``diffusion`` or ``bending`` (unscaled; see :func:`regularizer_scale`)."""
    if name == "diffusion":
        return diffusion_regularizer(ddf)
    if name == "bending":
        return bending_energy(ddf)
    raise ValueError(f"regularizer must be one of {', '.join(REGULARIZERS)}, got {name!r}")


def soft_dice(a: torch.Tensor, b: torch.Tensor, include_background: bool = False,
              eps: float = 1e-5) -> torch.Tensor:
    """Soft Dice ``2 sum(a b) / (sum(a) + sum(b))`` of two (B, L, *spatial) label maps (one-hot or probabilities),
    per sample, averaged over the labels ``1..L-1`` (also 0 with ``include_background``) -> (B,). A label absent
    from both maps counts 1."""
    if a.shape != b.shape:
        raise ValueError(f"soft Dice of maps of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    first = 0 if include_background else 1
    a, b = a[:, first:].flatten(2), b[:, first:].flatten(2)
    dice = (2.0 * (a * b).sum(-1) + eps) / (a.sum(-1) + b.sum(-1) + eps)
    return dice.mean(1)


def soft_dice_loss(a: torch.Tensor, b: torch.Tensor, include_background: bool = False) -> torch.Tensor:
    """``1 - `` :func:`soft_dice`, averaged over the batch (DeepAtlas's anatomy loss)."""
    return 1.0 - soft_dice(a, b, include_background).mean()
