"""Per-image intensity normalisation."""

from __future__ import annotations

import torch


def percentile_normalize(image: torch.Tensor, lower: float = 1.0, upper: float = 99.0,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Map each channel's [lower, upper] percentiles to [0, 1] (values outside are kept, not clipped).

    Args:
        image: (C, Z, Y, X) float.
        mask: optional (Z, Y, X) bool; percentiles computed inside it.
    Returns: (C, Z, Y, X) float32.
    """
    out = torch.empty_like(image, dtype=torch.float32)
    q = torch.tensor([lower / 100.0, upper / 100.0], dtype=torch.float64)
    for c in range(image.shape[0]):
        values = image[c][mask] if mask is not None else image[c].reshape(-1)
        values = values.to(torch.float64)
        if values.numel() > 2_000_000:  # torch.quantile's size limit; a strided sample is exact enough
            values = values[:: values.numel() // 2_000_000 + 1]
        lo, hi = torch.quantile(values, q).tolist()
        scale = hi - lo if hi > lo else 1.0
        out[c] = ((image[c].to(torch.float64) - lo) / scale).to(torch.float32)
    return out
