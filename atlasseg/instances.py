"""Instance segmentation tools for the EM-style backbones (Res-UNet-R / Res-UNet-H,
:mod:`atlasseg.networks.resunet_em`).

Those networks predict two maps per voxel: a semantic (foreground) mask and an instance boundary (contour). This
module holds what turns that into separate objects and measures them:

* :func:`weighted_bce`: the foreground-ratio weighted binary cross-entropy the networks are trained with;
* :func:`instance_targets`: the (mask, boundary) training targets derived from an instance label map;
* :func:`seeded_watershed`: the authors' post-processing (seeds where the mask is high and the boundary low, a
  marker watershed on the negated mask inside the foreground, small instances removed);
* :func:`connected_components_instances`: the baseline (connected components of the thresholded mask);
* :func:`average_precision` (AP-75, the MitoEM metric), :func:`match_instances`, :func:`instance_iou`;
* :func:`touching_blobs_phantom`: an anisotropic volume of touching ellipsoids where connected components merge
  neighbours and a boundary-aware watershed can split them.

Arrays are ``(Z, Y, X)`` (SimpleITK's array order); numpy arrays and torch tensors are both accepted, and the
instance maps come back as the same kind (int64, 0 = background, instances numbered 1..N).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

ArrayLike = np.ndarray | torch.Tensor

__all__ = ["average_precision", "connected_components_instances", "instance_iou", "instance_targets",
           "match_instances", "relabel_instances", "seeded_watershed", "touching_blobs_phantom", "weighted_bce"]


def _tensor(x: ArrayLike) -> torch.Tensor:
    return x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def _like(out: torch.Tensor, ref: ArrayLike) -> ArrayLike:
    return out if isinstance(ref, torch.Tensor) else out.numpy()


def _check_3d(x: torch.Tensor, name: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be a (Z, Y, X) volume, got shape {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------------- the loss

def weighted_bce(logits: torch.Tensor, target: torch.Tensor, clip: tuple[float, float] = (0.05, 0.99),
                 per_sample: bool = True, normalize: bool = True) -> torch.Tensor:
    """Binary cross-entropy with logits, re-balanced by the foreground ratio of the block (Li et al. 2021).

    With ``W_f`` the fraction of foreground voxels (``target > 0.5``) of a block, clipped to ``clip`` =
    ``[0.05, 0.99]``, foreground voxels are weighted by ``1 - W_f`` and background voxels by ``W_f``, so the rarer
    class gets the larger weight; the loss is the mean over all voxels (and channels, samples) of
    ``weight * BCE(logit, target)``.

    Convention of the authors' code (pytorch_connectomics ``weight_binary_ratio`` feeding ``WeightedBCE``, as in
    the MitoEM 2021 winners' repository): the weights are divided by ``min(W_f, 1 - W_f)``, so the common class
    has weight 1 and the rare class ``max(W_f, 1 - W_f) / min(W_f, 1 - W_f)`` (at most 19 for a sparse block,
    99 for an almost full one); a block with a single class then has unit weights, which their code special-cases
    and the clipping gives here by itself. ``normalize=False`` keeps the raw ``1 - W_f`` / ``W_f`` weights.

    Args:
        logits: ``(B, C, *spatial)`` raw network outputs (each channel a separate binary map, e.g. mask and
            boundary).
        target: same shape, binary (0/1; values above 0.5 count as foreground for ``W_f``).
        clip: bounds of ``W_f``; ``0 < low <= high < 1``.
        per_sample: the block is one sample's channel (``W_f`` per (sample, channel), default): the authors'
            code computes the weights per training sample in the data loader. ``False``: one ``W_f`` per channel
            over the whole batch.
        normalize: divide the weights by ``min(W_f, 1 - W_f)`` (default, the authors' scale).

    Returns:
        the scalar loss (a 0-d tensor).
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    if logits.dim() < 3:
        raise ValueError(f"expected (B, C, *spatial) tensors, got shape {tuple(logits.shape)}")
    low, high = float(clip[0]), float(clip[1])
    if not 0.0 < low <= high < 1.0:
        raise ValueError(f"clip must satisfy 0 < low <= high < 1, got {clip}")
    target = target.to(logits.dtype)
    foreground = (target > 0.5).to(logits.dtype)
    axes = tuple(range(2, logits.dim())) if per_sample else (0,) + tuple(range(2, logits.dim()))
    ratio = foreground.mean(dim=axes, keepdim=True).clamp(low, high)
    weight = foreground * (1.0 - ratio) + (1.0 - foreground) * ratio
    if normalize:
        weight = weight / torch.minimum(ratio, 1.0 - ratio)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (weight.detach() * loss).mean()


# ------------------------------------------------------------------------------------------------- the targets

def _neighbour_offsets(connectivity: int) -> list[tuple[int, int, int]]:
    order = {6: 1, 18: 2, 26: 3}
    if connectivity not in order:
        raise ValueError(f"connectivity must be 6, 18 or 26, not {connectivity}")
    return [o for o in itertools.product((-1, 0, 1), repeat=3) if 0 < sum(map(abs, o)) <= order[connectivity]]


def _shift_slices(offset: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices selecting the voxels that have a neighbour at ``offset`` inside the volume, and those neighbours."""
    here, there = [], []
    for d in offset:
        here.append(slice(0, -1) if d > 0 else slice(1, None) if d < 0 else slice(None))
        there.append(slice(1, None) if d > 0 else slice(0, -1) if d < 0 else slice(None))
    return tuple(here), tuple(there)


def instance_targets(instances: ArrayLike, connectivity: int = 6) -> tuple[ArrayLike, ArrayLike]:
    """Training targets of Res-UNet-R/H from an instance label map.

    Args:
        instances: ``(Z, Y, X)`` integer labels, 0 = background.
        connectivity: the neighbourhood on the voxel grid: 6 (faces, default), 18 (+ edges) or 26 (+ corners).

    Returns:
        ``(mask, boundary)``, float32 ``(Z, Y, X)`` volumes of 0/1 (the same kind as ``instances``): ``mask`` is
        ``instances > 0``; ``boundary`` marks the voxels of an instance with at least one neighbour of a different
        label (background or another instance). Both sides of a contact between two instances are marked, so the
        instances' interiors are never 6-adjacent. Neighbours outside the volume do not count (an instance cut by
        the volume's edge is not outlined there). The authors draw their contour slice by slice with a wider
        in-plane window; this is its thinnest 3D form.
    """
    lab = _tensor(instances)
    _check_3d(lab, "instances")
    lab = lab.long()
    differs = torch.zeros(lab.shape, dtype=torch.bool)
    for offset in _neighbour_offsets(connectivity):
        here, there = _shift_slices(offset)
        differs[here] |= lab[here] != lab[there]
    mask = lab > 0
    boundary = differs & mask
    return _like(mask.float(), instances), _like(boundary.float(), instances)


# ------------------------------------------------------------------------------------------ from maps to objects

def relabel_instances(labels: ArrayLike, min_size: int = 0) -> ArrayLike:
    """Instances of fewer than ``min_size`` voxels set to background and the rest renumbered 1..N in the order of
    their old labels; ``(Z, Y, X)`` non-negative integers in, int64 of the same kind out."""
    lab = _tensor(labels).long()
    if lab.numel() == 0:
        return _like(lab.clone(), labels)
    if int(lab.min()) < 0:
        raise ValueError("instance labels must be non-negative")
    sizes = torch.bincount(lab.reshape(-1))
    keep = sizes >= max(int(min_size), 1)
    keep[0] = False
    new_ids = torch.cumsum(keep.long(), 0) * keep.long()
    return _like(new_ids[lab], labels)


def _sitk_labels(binary: torch.Tensor, fully_connected: bool) -> torch.Tensor:
    image = sitk.GetImageFromArray(binary.to(torch.uint8).numpy())
    cc = sitk.ConnectedComponent(image, fully_connected)
    return torch.from_numpy(sitk.GetArrayFromImage(cc).astype(np.int64))


def seeded_watershed(mask_prob: ArrayLike, boundary_prob: ArrayLike, seed_mask: float = 0.9,
                     seed_boundary: float = 0.8, foreground: float = 0.85, min_size: int = 128,
                     fully_connected: bool = False) -> ArrayLike:
    """Instances from mask and boundary probabilities: the Res-UNet-R/H post-processing (Li et al. 2021).

    1. seeds: connected components of ``(mask > seed_mask) & (boundary < seed_boundary)`` (0.9 and 0.8 in the
       authors' code);
    2. foreground: ``mask > foreground`` (0.85);
    3. marker-controlled watershed (SimpleITK ``MorphologicalWatershedFromMarkers``, no watershed line) of the
       negated mask probability from the seeds, restricted to the foreground: voxels outside it are background,
       and foreground components that hold no seed stay background (as a masked watershed that never floods
       through the background);
    4. instances smaller than ``min_size`` voxels (128) removed, the rest numbered 1..N.

    Args:
        mask_prob, boundary_prob: ``(Z, Y, X)`` probabilities in [0, 1] (sigmoid of the logits).
        fully_connected: 26-connectivity for the seeds, the watershed and the foreground components (default
            6-connectivity).

    Returns:
        int64 ``(Z, Y, X)`` instance labels, numpy or torch like ``mask_prob``.
    """
    mask = _tensor(mask_prob).float()
    boundary = _tensor(boundary_prob).float()
    _check_3d(mask, "mask_prob")
    if boundary.shape != mask.shape:
        raise ValueError(f"boundary_prob {tuple(boundary.shape)} and mask_prob {tuple(mask.shape)} differ in shape")
    fg = mask > foreground
    seeds = _sitk_labels((mask > seed_mask) & (boundary < seed_boundary), fully_connected)
    seeds = seeds * fg                           # only matters when seed_mask < foreground
    if int(seeds.max()) == 0:
        return _like(torch.zeros(mask.shape, dtype=torch.int64), mask_prob)
    landscape = sitk.GetImageFromArray((-mask).numpy())
    markers = sitk.GetImageFromArray(seeds.numpy().astype(np.uint32))
    flooded = sitk.MorphologicalWatershedFromMarkers(landscape, markers, markWatershedLine=False,
                                                     fullyConnected=fully_connected)
    labels = torch.from_numpy(sitk.GetArrayFromImage(flooded).astype(np.int64)) * fg
    # Foreground voxels are all flooded from their own component's seeds before any background voxel (lower
    # level first), so only the seedless components need clearing.
    components = _sitk_labels(fg, fully_connected)
    seeded = torch.zeros(int(components.max()) + 1, dtype=torch.bool)
    seeded[components[seeds > 0]] = True
    seeded[0] = False
    labels = labels * seeded[components]
    return _like(relabel_instances(labels, min_size), mask_prob)


def connected_components_instances(mask_prob: ArrayLike, threshold: float = 0.5, min_size: int = 128,
                                   fully_connected: bool = False) -> ArrayLike:
    """The baseline: connected components of ``mask_prob > threshold`` (6-connectivity unless
    ``fully_connected``), components under ``min_size`` voxels removed, numbered 1..N; int64 ``(Z, Y, X)``."""
    mask = _tensor(mask_prob)
    _check_3d(mask, "mask_prob")
    labels = _sitk_labels(mask.float() > threshold, fully_connected)
    return _like(relabel_instances(labels, min_size), mask_prob)


# ---------------------------------------------------------------------------------------------------- the metric

def instance_iou(pred_instances: ArrayLike, gt_instances: ArrayLike
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """IoU of every predicted instance with every ground-truth instance, from one joint histogram.

    The labels are compacted (``torch.unique``), the voxel pairs coded as ``pred * (n_gt + 1) + gt`` and counted
    with ``torch.bincount`` (``torch.unique`` counts when that table would be huge), so no loop touches voxels.

    Returns:
        ``(pred_ids, gt_ids, pred_sizes, gt_sizes, iou)``: the labels present (background excluded), their voxel
        counts and the float64 IoU matrix ``(n_pred, n_gt)``.
    """
    pred = _tensor(pred_instances).long().reshape(-1)
    gt = _tensor(gt_instances).long().reshape(-1)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {tuple(_tensor(pred_instances).shape)} and ground truth "
                         f"{tuple(_tensor(gt_instances).shape)} differ in shape")
    pred_ids, pred_idx = torch.unique(pred, return_inverse=True)
    gt_ids, gt_idx = torch.unique(gt, return_inverse=True)
    # index 0 of the compact labels is background only when label 0 is present; shift so that it always is
    pred_idx = pred_idx + (0 if pred_ids.numel() and int(pred_ids[0]) == 0 else 1)
    gt_idx = gt_idx + (0 if gt_ids.numel() and int(gt_ids[0]) == 0 else 1)
    pred_ids = pred_ids[pred_ids != 0]
    gt_ids = gt_ids[gt_ids != 0]
    n_p, n_g = pred_ids.numel(), gt_ids.numel()
    codes = pred_idx * (n_g + 1) + gt_idx
    size = (n_p + 1) * (n_g + 1)
    if size <= 2 ** 24:
        table = torch.bincount(codes, minlength=size).reshape(n_p + 1, n_g + 1)
    else:
        pairs, counts = torch.unique(codes, return_counts=True)
        table = torch.zeros(size, dtype=torch.int64)
        table[pairs] = counts
        table = table.reshape(n_p + 1, n_g + 1)
    table = table.double()
    pred_sizes = table.sum(1)[1:]
    gt_sizes = table.sum(0)[1:]
    inter = table[1:, 1:]
    union = pred_sizes[:, None] + gt_sizes[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    return pred_ids, gt_ids, pred_sizes.long(), gt_sizes.long(), iou


def _greedy_match(iou: torch.Tensor, order: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """For each prediction in ``order``: True when it matches a still unmatched ground truth, the one of highest
    IoU, with IoU >= threshold (one-to-one)."""
    n_p, n_g = iou.shape
    taken = torch.zeros(n_g, dtype=torch.bool)
    tp = torch.zeros(n_p, dtype=torch.bool)
    if n_g == 0:
        return tp
    for rank, p in enumerate(order.tolist()):
        row = iou[p].masked_fill(taken, -1.0)
        g = int(torch.argmax(row))
        if float(row[g]) >= iou_threshold - 1e-12:
            taken[g] = True
            tp[rank] = True
    return tp


def _ranking(pred_ids: torch.Tensor, pred_sizes: torch.Tensor, scores: Mapping[int, float] | None) -> torch.Tensor:
    if scores is None:
        values = pred_sizes.double()
    else:
        missing = [int(i) for i in pred_ids if int(i) not in scores]
        if missing:
            raise ValueError(f"no score for predicted instances {missing[:10]}")
        values = torch.tensor([float(scores[int(i)]) for i in pred_ids], dtype=torch.float64)
    return torch.sort(-values, stable=True).indices


def match_instances(pred_instances: ArrayLike, gt_instances: ArrayLike, iou_threshold: float = 0.75,
                    scores: Mapping[int, float] | None = None) -> dict:
    """One-to-one matching at ``iou_threshold``, predictions taken in decreasing score (default: their voxel
    count), each matched to the unmatched ground-truth instance of highest IoU when that IoU >= threshold.

    Returns a dict: ``tp``, ``fp``, ``fn`` counts, ``precision``, ``recall``, ``matching_score`` =
    TP / (TP + FP + FN) (the "matching AP" of some papers; 1.0 when both maps are empty), and the per-rank arrays
    ``ranked_ids`` / ``ranked_tp`` used by :func:`average_precision`.
    """
    pred_ids, gt_ids, pred_sizes, _, iou = instance_iou(pred_instances, gt_instances)
    order = _ranking(pred_ids, pred_sizes, scores)
    tp_rank = _greedy_match(iou, order, iou_threshold)
    tp = int(tp_rank.sum())
    fp = pred_ids.numel() - tp
    fn = gt_ids.numel() - tp
    total = tp + fp + fn
    return {"tp": tp, "fp": fp, "fn": fn,
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / (tp + fn) if tp + fn else float("nan"),
            "matching_score": tp / total if total else 1.0,
            "ranked_ids": pred_ids[order], "ranked_tp": tp_rank, "n_gt": gt_ids.numel()}


def average_precision(pred_instances: ArrayLike, gt_instances: ArrayLike, iou_threshold: float = 0.75,
                      scores: Mapping[int, float] | None = None) -> float:
    """Average precision at one IoU threshold (AP-75 by default), as the MitoEM challenge computes it.

    Definition (COCO style, the MitoEM evaluation code ``mAP_3Dvolume``/``VOL3Deval``):

    * predictions are ranked by ``scores`` ({label: score}, higher first); without scores by their voxel count,
      largest first, which is what the MitoEM evaluation does when no score file is given (ties: lower label
      first);
    * walking down the ranking, a prediction is a true positive when its best-IoU still unmatched ground-truth
      instance has IoU >= ``iou_threshold`` (matched one-to-one), else a false positive; ground-truth instances
      never matched are the false negatives;
    * precision p_k = TP_k / k and recall r_k = TP_k / n_gt after the k-th prediction; the precision is made
      non-increasing from the right (interpolated), and AP is its mean at the 101 recall levels 0, 0.01, ..., 1
      (the precision at the first rank whose recall reaches the level, 0 where the recall never does).

    A perfect prediction gives 1.0. This is not the "matching AP" TP / (TP + FP + FN) (see
    :func:`match_instances`). Returns NaN when the ground truth has no instance (AP is undefined there).
    """
    m = match_instances(pred_instances, gt_instances, iou_threshold, scores)
    n_gt = m["n_gt"]
    if n_gt == 0:
        return float("nan")
    tp_rank = m["ranked_tp"].double()
    if tp_rank.numel() == 0:
        return 0.0
    tp_cum = torch.cumsum(tp_rank, 0)
    k = torch.arange(1, tp_rank.numel() + 1, dtype=torch.float64)
    precision = tp_cum / k
    recall = tp_cum / n_gt
    precision = torch.flip(torch.cummax(torch.flip(precision, [0]), 0).values, [0])
    levels = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    idx = torch.searchsorted(recall, levels - 1e-12)      # first rank with recall >= level
    reached = idx < recall.numel()
    interp = torch.zeros_like(levels)
    interp[reached] = precision[idx[reached]]
    return float(interp.mean())


# -------------------------------------------------------------------------------------------------- the phantom

def _fits(centre: np.ndarray, radius: np.ndarray, others: list[tuple[np.ndarray, np.ndarray]],
          extent: np.ndarray) -> bool:
    """Inside the volume in-plane and apart (in-plane) from every blob in ``others``."""
    if np.any(centre[1:] < radius[1:] * 0.8) or np.any(centre[1:] > extent[1:] - radius[1:] * 0.8):
        return False
    return all(np.hypot(*(centre[1:] - c[1:])) >= 1.1 * (radius[1:].max() + r[1:].max()) for c, r in others)


def touching_blobs_phantom(shape: Sequence[int] = (16, 64, 64), n_blobs: int = 10,
                           spacing: Sequence[float] = (4.0, 1.0, 1.0), seed: int = 0, noise: float = 0.05,
                           radius_mm: Sequence[tuple[float, float]] = ((12.0, 20.0), (7.0, 10.0), (7.0, 10.0)),
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Anisotropic EM-like volume of touching ellipsoidal objects, with their instance labels.

    Blobs are ellipsoids in physical space (mm; ``spacing`` is (Z, Y, X) per voxel, coarse along Z by default),
    semi-axes drawn per axis (Z, Y, X) from the ``radius_mm`` ranges, turned in-plane at random. They come in
    clusters of 1 to 3 (probabilities 0.2, 0.5, 0.3): inside a cluster each blob's centre is 0.8 times the sum of
    the in-plane radii away from the previous one, so neighbours overlap; clusters are kept apart from each other
    (rejection sampling, so fewer than ``n_blobs`` blobs when the volume is full). Each voxel goes to the blob
    whose normalised ellipsoid distance ``|R (x - c) / r|`` is smallest, which splits an overlap along a surface
    between the centres. Connected components of the foreground therefore merge every cluster into one object,
    while seeds away from the contact surfaces separate them. A label left in several pieces is split into
    instances, pieces under 20 voxels are dropped, and the labels are renumbered 1..N.

    The image (float32, ``(Z, Y, X)``): background 0.25, blob interiors about 1.0 (a little varied per blob), a
    darker membrane (0.55) on every instance's boundary voxels (6-neighbourhood, :func:`instance_targets`), then
    Gaussian noise of standard deviation ``noise``. Deterministic for a ``seed``.

    Returns:
        ``(image float32 (Z, Y, X), instances int64 (Z, Y, X))``.
    """
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or len(spacing) != 3 or len(radius_mm) != 3:
        raise ValueError("shape, spacing and radius_mm need 3 entries (Z, Y, X)")
    if n_blobs < 1:
        raise ValueError("n_blobs must be at least 1")
    rng = np.random.default_rng(seed)
    extent = np.array(shape) * np.array(spacing)
    lo_r = np.array([float(r[0]) for r in radius_mm])
    hi_r = np.array([float(r[1]) for r in radius_mm])

    blobs: list[tuple[np.ndarray, np.ndarray]] = []           # (centre, semi-axes), mm
    for _ in range(20 * n_blobs):                              # cluster attempts
        if len(blobs) >= n_blobs:
            break
        size = min(int(rng.choice([1, 2, 3], p=[0.2, 0.5, 0.3])), n_blobs - len(blobs))
        r = rng.uniform(lo_r, hi_r)
        c = rng.uniform(0.0, extent)
        c[0] = rng.uniform(min(r[0], extent[0] / 2), max(extent[0] - r[0], extent[0] / 2))
        if not _fits(c, r, blobs, extent):
            continue
        cluster = [(c, r)]
        while len(cluster) < size:
            r = rng.uniform(lo_r, hi_r)
            prev_c, prev_r = cluster[-1]
            step = 0.8 * (prev_r[1:].mean() + r[1:].mean())
            for _try in range(20):
                theta = rng.uniform(0.0, 2.0 * math.pi)
                c = prev_c + np.array([rng.uniform(-0.2, 0.2) * r[0], step * math.sin(theta),
                                       step * math.cos(theta)])
                if _fits(c, r, blobs + cluster[:-1], extent):
                    break
            else:
                break
            cluster.append((c, r))
        blobs += cluster

    grid = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij")
    best = np.full(shape, np.inf)
    labels = np.zeros(shape, np.int64)
    for i, (c, r) in enumerate(blobs, start=1):
        a = rng.uniform(0.0, math.pi)
        dz, dy, dx = grid[0] - c[0], grid[1] - c[1], grid[2] - c[2]
        u = math.cos(a) * dy + math.sin(a) * dx
        v = -math.sin(a) * dy + math.cos(a) * dx
        d = np.sqrt((dz / r[0]) ** 2 + (u / r[1]) ** 2 + (v / r[2]) ** 2)
        closer = d < best
        best[closer] = d[closer]
        labels[closer] = i
    labels[best >= 1.0] = 0

    # split any label that ended up in several pieces, drop crumbs, renumber
    pieces = sitk.GetArrayFromImage(sitk.ScalarConnectedComponent(sitk.GetImageFromArray(labels.astype(np.int32)),
                                                                  0.5, False)).astype(np.int64)
    pieces[labels == 0] = 0
    instances = relabel_instances(pieces, min_size=20)

    _, boundary = instance_targets(instances)
    brightness = np.concatenate([[0.25], rng.uniform(0.9, 1.1, int(instances.max()))])
    image = brightness[instances]
    image[boundary > 0] = 0.55
    image = image + rng.normal(0.0, noise, shape)
    return image.astype(np.float32), instances.astype(np.int64)
