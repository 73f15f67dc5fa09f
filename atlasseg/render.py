"""Small PNG montages of slices (no plotting dependency: SimpleITK writes the PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

LABEL_COLOURS = np.array([
    [0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128]], dtype=np.float32)


def _grey(slice2d: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(slice2d, [1, 99])
    g = np.clip((slice2d - lo) / (hi - lo + 1e-9), 0, 1) * 255
    return np.repeat(g[..., None], 3, axis=2)


def _heat(slice2d: np.ndarray) -> np.ndarray:
    """0..1 -> black-red-yellow-white."""
    v = np.clip(slice2d, 0, 1)
    return np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1) * 255


def _labels(slice2d: np.ndarray, under: np.ndarray | None) -> np.ndarray:
    colours = LABEL_COLOURS[np.asarray(slice2d, dtype=np.int64) % len(LABEL_COLOURS)]
    if under is None:
        return colours
    fg = (slice2d > 0)[..., None]
    return np.where(fg, 0.55 * colours + 0.45 * under, under)


def save_montage(panels: list[tuple[str, np.ndarray, str]], path: str | Path, background: np.ndarray | None = None,
                 scale: int = 3) -> Path:
    """Write panels side by side as a PNG.

    Args:
        panels: (title, 2D array, kind) with kind "grey", "labels" (overlaid on ``background``) or "heat" (0..1).
        background: 2D grey slice under label panels.
    """
    under = _grey(background) if background is not None else None
    tiles = []
    for _, array, kind in panels:
        if kind == "grey":
            tile = _grey(array)
        elif kind == "labels":
            tile = _labels(array, under)
        elif kind == "heat":
            tile = _heat(array)
        else:
            raise ValueError(f"unknown panel kind '{kind}'")
        tile = np.kron(tile, np.ones((scale, scale, 1)))
        tiles.append(np.pad(tile, ((4, 4), (4, 4), (0, 0)), constant_values=255))
    height = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0)), constant_values=255) for t in tiles]
    rgb = np.concatenate(tiles, axis=1).astype(np.uint8)
    image = sitk.GetImageFromArray(rgb, isVector=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path
