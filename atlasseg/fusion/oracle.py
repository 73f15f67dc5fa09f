"""Upper bounds and agreement maps for a set of warped atlases.

* :func:`oracle_coverage`: a voxel is *covered* when at least ``fraction`` of the N atlases carry
  the reference label there (Xie et al. 2023 "oracle(10%)"): what any label-fusion method choosing
  among the atlas labels could at best get right.
* :func:`atlas_agreement`: fraction of atlases agreeing with the per-voxel majority label.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _check_labels(atlas_labels: torch.Tensor) -> None:
    if not isinstance(atlas_labels, torch.Tensor):
        raise ValueError("atlas_labels must be a torch tensor (N, Z, Y, X)")
    if atlas_labels.dim() != 4 or atlas_labels.shape[0] < 1:
        raise ValueError(f"atlas_labels must have shape (N, Z, Y, X) with N >= 1, got {tuple(atlas_labels.shape)}")
    if atlas_labels.is_floating_point() or atlas_labels.is_complex() or atlas_labels.dtype == torch.bool:
        raise ValueError(f"atlas_labels must be an integer tensor, got {atlas_labels.dtype}")


def oracle_coverage(
    atlas_labels: torch.Tensor,
    reference: torch.Tensor,
    labels: Sequence[int],
    fraction: float = 0.10,
) -> tuple[torch.Tensor, dict]:
    """Per-voxel coverage of the reference by the atlases.

    Returns ``covered`` (Z, Y, X) bool: the number of atlases holding the reference label, divided
    by N, is >= ``fraction``; and a summary dict: for every label value in
    ``labels`` the fraction of its reference voxels that are covered (NaN when the label is absent
    from the reference) and ``"foreground"``: the same over all non-zero reference voxels.
    """
    _check_labels(atlas_labels)
    if not isinstance(reference, torch.Tensor) or tuple(reference.shape) != tuple(atlas_labels.shape[1:]):
        raise ValueError(
            f"reference must be a tensor of shape {tuple(atlas_labels.shape[1:])}, "
            f"got {getattr(reference, 'shape', type(reference))}"
        )
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}") from None
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    n = atlas_labels.shape[0]
    ref = reference.to(atlas_labels.device).long()
    count = torch.zeros(ref.shape, dtype=torch.int32, device=ref.device)
    for i in range(n):
        count += (atlas_labels[i].long() == ref).to(torch.int32)
    # count / n >= fraction, written without float rounding surprises at exact fractions
    covered = count.to(torch.float64) >= fraction * n - 1e-9
    summary: dict = {}
    for lab in [int(v) for v in labels]:
        sel = ref == lab
        tot = int(sel.sum())
        summary[lab] = float(covered[sel].sum()) / tot if tot else float("nan")
    fg = ref != 0
    tot = int(fg.sum())
    summary["foreground"] = float(covered[fg].sum()) / tot if tot else float("nan")
    return covered, summary


def atlas_agreement(atlas_labels: torch.Tensor) -> torch.Tensor:
    """Fraction of atlases (float32, (Z, Y, X)) carrying the per-voxel majority label.

    Works on label values directly (no label list needed): the majority count is the largest
    number of atlases sharing one value at the voxel.
    """
    _check_labels(atlas_labels)
    n = atlas_labels.shape[0]
    lab = atlas_labels.long()
    best = torch.zeros(lab.shape[1:], dtype=torch.int32, device=lab.device)
    # count, for each atlas i, how many atlases share its label; the maximum is the majority size
    for i in range(n):
        same = (lab == lab[i].unsqueeze(0)).sum(0, dtype=torch.int32)
        best = torch.maximum(best, same)
    return best.to(torch.float32) / n
