"""Spatial transforms as dense physical displacement fields, and warping in torch.

A :class:`DisplacementField` lives on a *fixed* grid and maps each fixed voxel's physical point ``x`` to
``x + d(x)`` in the *moving* image's physical space (ITK's convention for a displacement-field transform,
LPS millimetres). A registration of an atlas to a target gives a forward field on the target grid (used to
pull atlas images and labels onto the target) and an inverse field on the atlas grid (used to pull
target-space data into atlas space, as AtlasNet needs).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..io import Geometry, read_image, write_image


def grid_points(geometry: Geometry, device=None, dtype=torch.float32) -> torch.Tensor:
    """Physical points (mm) of every voxel: (Z, Y, X, 3), last axis (x, y, z)."""
    zs, ys, xs = (torch.arange(n, device=device, dtype=dtype) for n in geometry.shape)
    idx = torch.stack(torch.meshgrid(xs, ys, zs, indexing="ij"), dim=-1).permute(2, 1, 0, 3)  # (Z,Y,X,3) xyz
    m = torch.as_tensor(geometry.index_to_physical(), device=device, dtype=dtype)
    return idx @ m[:3, :3].T + m[:3, 3]


def physical_to_normalized(points: torch.Tensor, world_to_index: torch.Tensor,
                           array_shape: Sequence[int]) -> torch.Tensor:
    """Physical points (..., 3) -> grid_sample coordinates in [-1, 1] of an array with ``array_shape`` (Z,Y,X).

    ``world_to_index`` is (4, 4) or, for a batch of different grids, (B, 4, 4) broadcast over points (B, ...).
    """
    w2i = world_to_index.to(points)
    if w2i.dim() == 3:
        shape = (w2i.shape[0],) + (1,) * (points.dim() - 2) + (3, 3)
        idx = (points.unsqueeze(-2) @ w2i[:, :3, :3].transpose(1, 2).reshape(shape)).squeeze(-2)
        idx = idx + w2i[:, :3, 3].reshape(shape[:-2] + (3,))
    else:
        idx = points @ w2i[:3, :3].T + w2i[:3, 3]
    size_xyz = torch.tensor([array_shape[2], array_shape[1], array_shape[0]], device=points.device,
                            dtype=points.dtype)
    return idx * (2.0 / (size_xyz - 1).clamp(min=1)) - 1.0


def sample(volume: torch.Tensor, world_to_index: torch.Tensor, points: torch.Tensor,
           mode: str = "bilinear", padding_mode: str = "border") -> torch.Tensor:
    """Sample volumes at physical points.

    Args:
        volume: (B, C, Z, Y, X) arrays (a batch may be padded arrays of different grids).
        world_to_index: (4, 4) or (B, 4, 4) physical -> continuous index (x, y, z) of each volume.
        points: (B, Z', Y', X', 3) physical points (mm).
    Returns: (B, C, Z', Y', X').
    """
    grid = physical_to_normalized(points, world_to_index, volume.shape[2:])
    return F.grid_sample(volume, grid.to(volume.dtype), mode=mode, padding_mode=padding_mode, align_corners=True)


@dataclass
class DisplacementField:
    """Dense displacement ``d`` on a fixed grid: a fixed point ``x`` maps to ``x + d(x)`` in moving space.

    ``field``: (3, Z, Y, X) float32, components (x, y, z) in physical LPS mm.
    """

    field: torch.Tensor
    geometry: Geometry

    def points(self) -> torch.Tensor:
        """Moving-space physical point of every fixed voxel: (Z, Y, X, 3)."""
        return grid_points(self.geometry, self.field.device) + self.field.permute(1, 2, 3, 0)

    def to(self, device) -> DisplacementField:
        return DisplacementField(self.field.to(device), self.geometry)

    def to_sitk(self) -> sitk.Image:
        """A ``sitkVectorFloat64`` image for ``sitk.DisplacementFieldTransform`` and Slicer grid transforms."""
        arr = self.field.detach().cpu().permute(1, 2, 3, 0).numpy().astype(np.float64)
        image = sitk.GetImageFromArray(arr, isVector=True)
        return self.geometry.apply_to(image)

    def to_sitk_transform(self) -> sitk.DisplacementFieldTransform:
        return sitk.DisplacementFieldTransform(self.to_sitk())

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> DisplacementField:
        if image.GetNumberOfComponentsPerPixel() != 3:
            raise ValueError("a displacement field image needs 3 components per voxel")
        arr = sitk.GetArrayFromImage(image).astype(np.float32)  # (Z, Y, X, 3)
        return cls(torch.from_numpy(arr).permute(3, 0, 1, 2).contiguous(), Geometry.of(image))

    def save(self, path: str | os.PathLike) -> Path:
        """Write as an ITK displacement-field image (.nii.gz, .nrrd, .mha); Slicer loads it as a transform."""
        return write_image(self.to_sitk(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DisplacementField:
        return cls.from_sitk(read_image(path))

    def max_norm(self) -> float:
        return float(self.field.norm(dim=0).max())


def affine_scales(linear: np.ndarray | torch.Tensor) -> np.ndarray:
    """The scales of a 3x3 linear map: its singular values, largest first (a rotation's are all 1)."""
    return np.linalg.svd(np.asarray(linear, dtype=np.float64)[:3, :3], compute_uv=False)


def scales_within(linear: np.ndarray | torch.Tensor, max_scale: float) -> bool:
    """Whether every scale of a 3x3 linear map lies in [1/max_scale, max_scale]."""
    s = affine_scales(linear)
    return bool(s.max() <= max_scale and s.min() >= 1.0 / max_scale)


def affine_field(matrix: np.ndarray | torch.Tensor, geometry: Geometry, device=None) -> DisplacementField:
    """The displacement field of a 4x4 physical affine (fixed point -> moving point) on ``geometry``."""
    m = torch.as_tensor(np.asarray(matrix), dtype=torch.float32, device=device)
    pts = grid_points(geometry, device)
    moved = pts @ m[:3, :3].T + m[:3, 3]
    return DisplacementField((moved - pts).permute(3, 0, 1, 2).contiguous(), geometry)


def compose(outer: DisplacementField, inner: DisplacementField) -> DisplacementField:
    """The field of ``outer ∘ inner`` on inner's grid: x -> y = inner(x) -> outer(y)."""
    pts = inner.points()
    w2i = torch.as_tensor(outer.geometry.physical_to_index(), dtype=torch.float32, device=pts.device)
    d = sample(outer.field[None].to(pts.device), w2i, pts[None], padding_mode="border")[0]
    return DisplacementField(inner.field + d, inner.geometry)


def _warp_exact(volume: torch.Tensor, moving: Geometry, field: DisplacementField, mode: str, padding: str,
                slab_voxels: int = 1 << 22) -> torch.Tensor:
    """(C, Z, Y, X) on ``moving`` sampled at the field's mapped points -> (C, *field grid) float32.

    Points and sampling in float64 (exact at voxel centres under an identity); memory bounded: one channel in
    float64 at a time, the field's grid in slabs of about ``slab_voxels`` points."""
    dev = volume.device
    fixed = field.geometry
    nz, ny, nx = fixed.shape
    step = max(1, slab_voxels // (ny * nx))
    i2p = torch.as_tensor(fixed.index_to_physical(), dtype=torch.float64, device=dev)
    w2i = torch.as_tensor(moving.physical_to_index(), dtype=torch.float64, device=dev)
    ys = torch.arange(ny, dtype=torch.float64, device=dev)
    xs = torch.arange(nx, dtype=torch.float64, device=dev)
    displacement = field.field.to(dev)
    out = torch.empty((volume.shape[0], nz, ny, nx), dtype=torch.float32, device=dev)
    for c in range(volume.shape[0]):
        channel = volume[c].to(torch.float64)[None, None]
        for z0 in range(0, nz, step):
            z1 = min(nz, z0 + step)
            zz, yy, xx = torch.meshgrid(torch.arange(z0, z1, dtype=torch.float64, device=dev), ys, xs,
                                        indexing="ij")
            pts = torch.stack([xx, yy, zz], -1) @ i2p[:3, :3].T + i2p[:3, 3]
            pts = pts + displacement[:, z0:z1].permute(1, 2, 3, 0).to(torch.float64)
            grid = physical_to_normalized(pts[None], w2i, volume.shape[1:])
            out[c, z0:z1] = F.grid_sample(channel, grid, mode=mode, padding_mode=padding,
                                          align_corners=True)[0, 0].float()
    return out


def warp_image(image: torch.Tensor, moving: Geometry, transform: DisplacementField, mode: str = "bilinear",
               padding_mode: str = "border", exact: bool = False) -> torch.Tensor:
    """Pull a moving image (C, Z, Y, X) on ``moving`` onto the transform's fixed grid -> (C, Z', Y', X') float32.

    ``padding_mode``: ``"border"`` (edge values outside the moving grid) or ``"zeros"``. ``exact``: points and
    sampling in float64, one channel and a slab of the grid at a time (an identity transform then reproduces the
    image to float32 precision, and memory stays bounded); the default float32 path is faster.
    """
    if exact:
        return _warp_exact(image, moving, transform, mode, padding_mode)
    w2i = torch.as_tensor(moving.physical_to_index(), dtype=torch.float32, device=image.device)
    pts = transform.points().to(image.device)
    return sample(image[None].float(), w2i, pts[None], mode=mode, padding_mode=padding_mode)[0]


def warp_labels(labels: torch.Tensor, moving: Geometry, transform: DisplacementField,
                label_values: Sequence[int] | None = None, return_probabilities: bool = False):
    """Label-aware warping: each label's indicator is interpolated linearly, the result is the argmax.

    Never rounds an interpolation of label values. Outside the moving grid is background.
    Memory stays at a few volumes: labels are processed one at a time with a running maximum.

    Args:
        labels: (Z, Y, X) integer label values on ``moving``.
        label_values: the label values to consider (default: those present); 0 must be background.
    Returns: (Z', Y', X') int64 label values on the fixed grid; with ``return_probabilities`` also the
        (L, Z', Y', X') interpolated indicators.
    """
    if label_values is None:
        label_values = torch.unique(labels).tolist()
    label_values = sorted(set(int(v) for v in label_values) | {0})
    w2i = torch.as_tensor(moving.physical_to_index(), dtype=torch.float32, device=labels.device)
    pts = transform.points().to(labels.device)
    grid = physical_to_normalized(pts[None], w2i, labels.shape)
    best = None
    best_value = None
    probs = []
    for value in label_values:
        indicator = (labels == value).float()[None, None]
        # Zero padding outside the atlas; background gets 1 there.
        p = F.grid_sample(indicator, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
        if value == 0:
            ones = torch.ones_like(indicator)
            inside = F.grid_sample(ones, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
            p = p + (1.0 - inside)
        if return_probabilities:
            probs.append(p)
        if best is None:
            best = p
            best_value = torch.full_like(p, value, dtype=torch.int64)
        else:
            better = p > best
            best = torch.where(better, p, best)
            best_value = torch.where(better, torch.full_like(best_value, value), best_value)
    if return_probabilities:
        return best_value, torch.stack(probs)
    return best_value


def fields_from_affine_and_displacement(affine: torch.Tensor | np.ndarray, u: torch.Tensor,
                                        u_inv: torch.Tensor | None, target: Geometry, atlas: Geometry
                                        ) -> tuple[DisplacementField, DisplacementField | None]:
    """Dense fields of ``F(x) = A(x + u(x))`` (target -> atlas) and of its inverse.

    Args:
        affine: (4, 4) physical LPS affine, target point -> atlas point.
        u: (3, Z, Y, X) deformable displacement (mm) on the target grid; ``u_inv`` its inverse there.
    Returns:
        forward field on the target grid, inverse field ``F^-1(y) = q + u_inv(q)``, ``q = A^-1 y``, on the
        atlas grid (None without ``u_inv``).
    """
    device = u.device
    a = torch.as_tensor(np.asarray(affine) if not isinstance(affine, torch.Tensor) else affine,
                        dtype=torch.float32, device=device)
    target_pts = grid_points(target, device)
    deformed = target_pts + u.permute(1, 2, 3, 0)
    moved = deformed @ a[:3, :3].T + a[:3, 3]
    forward = DisplacementField((moved - target_pts).permute(3, 0, 1, 2).contiguous(), target)
    if u_inv is None:
        return forward, None
    atlas_pts = grid_points(atlas, device)
    a_inv = torch.linalg.inv(a)
    q = atlas_pts @ a_inv[:3, :3].T + a_inv[:3, 3]
    target_w2i = torch.as_tensor(target.physical_to_index(), dtype=torch.float32, device=device)
    du = sample(u_inv[None].float(), target_w2i, q[None], padding_mode="border")[0]
    back = q + du.permute(1, 2, 3, 0)
    inverse = DisplacementField((back - atlas_pts).permute(3, 0, 1, 2).contiguous(), atlas)
    return forward, inverse
