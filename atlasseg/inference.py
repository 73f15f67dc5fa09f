"""Sliding-window inference helpers shared by the trained methods: where to run windows, and back to the grid."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def prediction_region(target: torch.Tensor, atlas_label_index: torch.Tensor | None, roi_size: Sequence[int],
                      margin: int | None = None) -> tuple[slice, slice, slice]:
    """The box of the target where a prediction can differ from background, enlarged by ``margin`` voxels of
    context (default: a quarter of the window) and to at least one window where the volume allows.

    With atlas labels (a DLF with atlas-union masking): the box around every atlas's foreground, outside which
    the mask sets every foreground label to zero. Without: the box around the voxels where any target channel
    differs from its minimum (skull-stripped or masked images have a constant background). A volume with
    content everywhere gives the whole volume.
    """
    if atlas_label_index is not None:
        content = (atlas_label_index > 0).any(0)
    else:
        floor = target.flatten(1).amin(1).view(-1, 1, 1, 1)
        content = (target != floor).any(0)
    if not bool(content.any()):
        return (slice(None),) * 3
    margin = max(int(r) for r in roi_size) // 4 if margin is None else margin
    box = []
    for axis, (size, roi) in enumerate(zip(content.shape, roi_size)):
        hits = torch.nonzero(content.any(dim=[d for d in range(3) if d != axis])).flatten()
        lo, hi = max(0, int(hits[0]) - margin), min(size, int(hits[-1]) + 1 + margin)
        short = min(int(roi), size) - (hi - lo)
        if short > 0:  # grow to a whole window: no padding inside the volume
            lo = max(0, min(lo - short // 2, size - int(roi)))
            hi = min(size, lo + int(roi))
        box.append(slice(lo, hi))
    return tuple(box)


def uncrop(values: torch.Tensor, region: tuple[slice, ...], spatial: Sequence[int]) -> torch.Tensor:
    """(L, ...) maps of the region back on the whole grid; outside it, all background (label index 0)."""
    if all(r == slice(None) for r in region):
        return values
    full = torch.zeros((values.shape[0], *spatial), dtype=values.dtype)
    full[0] = 1.0
    full[(slice(None),) + tuple(region)] = values
    return full


