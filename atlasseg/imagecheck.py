"""What makes an image unusable as a target or atlas, in one place for the engine and the Slicer modules.

Torch-free (numpy only), so that the Slicer side checks a volume node with the engine's own rules before it
starts a run, and the Python API checks images passed in memory as the command line checks files.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_AXIS_VOXELS = 8   # smaller grids cannot be registered (pyramids, windows) nor hold an anatomy


def non_finite_problem(values: np.ndarray) -> str | None:
    """``"contains N NaN/Inf voxel values"`` for float voxels that are not all finite, else None."""
    if not np.issubdtype(values.dtype, np.floating):
        return None
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    return f"contains {bad} NaN/Inf voxel values" if bad else None


def content_problem(values: np.ndarray, size: Sequence[int]) -> str | None:
    """Why an image cannot be segmented or registered, or None.

    Args:
        values: the voxel values, any shape (a SimpleITK array view or a Slicer volume array).
        size: the grid's size in voxels, (x, y, z).
    """
    if min(size) < MIN_AXIS_VOXELS:
        return (f"image of {'x'.join(map(str, size))} voxels is too small (at least {MIN_AXIS_VOXELS} voxels "
                f"along every axis)")
    problem = non_finite_problem(values)
    if problem:
        return problem
    low, high = values.min(), values.max()
    return f"blank image (every voxel is {float(low):g})" if low == high else None
