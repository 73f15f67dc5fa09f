"""Dense fields on a voxel grid: scaling and squaring, warping, inverses, voxel <-> millimetre, Jacobians.

Network fields are in voxel units of their grid, (B, 3, Z, Y, X) with channels in array-axis order (z, y, x), the
convention of MONAI's ``DVF2DDF`` and ``Warp``. Integration and warping use the engine's
:class:`~atlasseg.registration.filters.VelocityExponential` (the same operation as ``DVF2DDF``, with a cached
sampling grid; bilinear, border padding); a test checks both against MONAI.
"""

from __future__ import annotations

import numpy as np
import torch

from ..io import Geometry
from ..registration import DisplacementField
from ..registration.filters import VelocityExponential
from ..registration.torch_backend import invert_displacement

__all__ = ["SpatialTransformer", "field_jacobian_determinant", "jacobian_determinant", "jacobian_stats",
           "mm_to_voxel_matrix", "voxel_to_mm", "voxel_to_mm_matrix"]


class SpatialTransformer:
    """Scaling and squaring and warping of (B, C, Z, Y, X) volumes by voxel displacements (a plain object, not a
    module: it holds only a cached sampling grid)."""

    def __init__(self, steps: int = 7):
        self.exp = VelocityExponential(int(steps))

    def integrate(self, velocity: torch.Tensor) -> torch.Tensor:
        """``exp(v)`` by scaling and squaring: the displacement of the flow of ``v`` at time 1 (0 steps: ``v``)."""
        if self.exp.steps == 0:
            return velocity
        return self.exp(velocity)

    def warp(self, volume: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """``volume(x + ddf(x))``: bilinear, border padding (MONAI ``Warp``'s defaults)."""
        if volume.dtype != ddf.dtype:
            volume = volume.to(ddf.dtype)
        return self.exp.warp_field(volume, ddf)

    def invert(self, ddf: torch.Tensor, iterations: int = 20) -> torch.Tensor:
        """Inverse of ``x -> x + ddf(x)`` by fixed-point iteration (for plain displacement fields)."""
        return invert_displacement(ddf, iterations, self.exp)


def voxel_to_mm_matrix(geometry: Geometry) -> np.ndarray:
    """3x3 matrix taking a voxel displacement in channel order (z, y, x) to a physical one (x, y, z) in mm."""
    m = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3) @ np.diag(geometry.spacing)
    return m[:, ::-1].copy()


def mm_to_voxel_matrix(geometry: Geometry) -> np.ndarray:
    """Inverse of :func:`voxel_to_mm_matrix`: physical (x, y, z) mm -> voxel displacement (z, y, x)."""
    return np.linalg.inv(voxel_to_mm_matrix(geometry))


def voxel_to_mm(ddf: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """(B, 3, Z, Y, X) voxel displacement (z, y, x) -> physical displacement (x, y, z) in mm."""
    m = torch.as_tensor(voxel_to_mm_matrix(geometry), dtype=ddf.dtype, device=ddf.device)
    return torch.einsum("nczyx,kc->nkzyx", ddf, m)


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """Jacobian determinant of ``x -> x + ddf(x)`` for (B, 3, Z, Y, X) voxel displacements (channels z, y, x),
    by central differences (one-sided at the faces, as ``numpy.gradient``) -> (B, Z, Y, X). Values <= 0 are
    folding. The determinant does not depend on the units: a physical field on the same grid gives the same."""
    if ddf.dim() != 5 or ddf.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, Z, Y, X) field, got shape {tuple(ddf.shape)}")
    grads = torch.gradient(ddf.double(), dim=(2, 3, 4))          # d/dz, d/dy, d/dx, each (B, 3, Z, Y, X)
    j = [[grads[a][:, c] + (1.0 if a == c else 0.0) for a in range(3)] for c in range(3)]
    det = (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1]) - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
           + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))
    return det.to(ddf.dtype if ddf.dtype.is_floating_point else torch.float32)


def field_jacobian_determinant(field: DisplacementField) -> torch.Tensor:
    """Jacobian determinant (Z, Y, X) of a physical displacement field's map ``x -> x + d(x)`` on its own grid
    (any spacing and direction): the field in voxel units of its grid, then :func:`jacobian_determinant`."""
    m = torch.as_tensor(mm_to_voxel_matrix(field.geometry), dtype=torch.float64, device=field.field.device)
    voxels = torch.einsum("czyx,kc->kzyx", field.field.double(), m)
    return jacobian_determinant(voxels[None])[0].float()


def jacobian_stats(det: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """Folding and regularity of a Jacobian determinant map: ``folding_percent`` (share of voxels with det <= 0,
    in %), ``log_jacobian_sd`` (standard deviation of ``log |det|``, |det| clamped at 1e-9), ``min``, ``max``;
    over ``mask`` (bool, same shape) when given."""
    values = det.double().reshape(-1) if mask is None else det.double()[mask.bool()]
    if values.numel() == 0:
        raise ValueError("no voxels to measure the Jacobian on")
    log = values.abs().clamp(min=1e-9).log()
    return {"folding_percent": float((values <= 0).double().mean() * 100.0),
            "log_jacobian_sd": float(log.std(unbiased=False)), "min": float(values.min()),
            "max": float(values.max())}
