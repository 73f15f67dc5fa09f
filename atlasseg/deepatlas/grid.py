"""The common grid: every case affinely pre-aligned to one reference case and resampled onto one grid (each size
a multiple of 16), and the exact way back to each case's own grid.

The common grid has the reference's direction and centre; its spacing and shape come from the architecture. The
reference image (percentile-normalised, resampled onto the common grid with zeros outside the reference) is what
every case is registered to, with the engine's registration (preset ``affine``) and its similarity measured only
inside the reference's own field of view (``fov``: the zero frame around it made the torch backend's affine fail on
about 12% of the hippocampus cases, Dice near 0 against 0.69 with the mask) and its scales bounded
(:func:`prealignment_settings`: unbounded, 2 of the 200 hippocampus cases were squeezed to half along one axis);
the forward field of that registration is an exact affine ``A`` (common point -> case point), recovered here as a
4x4 matrix by least squares (the residual is checked). A case is pulled onto the common grid through ``A`` and
results are pulled back onto its own grid through ``A^-1``: one resampling each way, points in float64.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..io import Geometry, tensor_to_image, write_image
from ..registration import DisplacementField, register, warp_image
from ..registration.transforms import affine_field, grid_points, physical_to_normalized
from .config import GRID_DIVISOR

__all__ = ["AffineFitError", "CommonGrid", "affine_from_field", "common_geometry", "image_to_common_grid",
           "labels_to_common_grid", "prealignment_settings", "sample_on", "to_case_grid", "to_common_grid"]

AFFINE_TOLERANCE_MM = 1e-2     # largest distance between a pre-alignment field and its fitted affine
# Images outside a case's own grid take its edge values, as the registration cache's warp gives them to training;
# inference must feed the networks the same (zeros there cut F_S's test Dice from 0.80 to 0.42 on hippocampus).
IMAGE_PADDING = "border"


class AffineFitError(ValueError):
    """A pre-alignment that is not an affine map (a deformable preset was used?)."""


def common_geometry(reference: Geometry, shape: Sequence[int] | None = None,
                    spacing: Sequence[float] | None = None, divisor: int = GRID_DIVISOR) -> Geometry:
    """The common grid: the reference's direction and centre, ``spacing`` (x, y, z; default the reference's) and
    array ``shape`` (Z, Y, X; default the reference's physical extent at that spacing rounded up to multiples of
    ``divisor``)."""
    spacing = tuple(float(s) for s in (spacing if spacing is not None else reference.spacing))
    if shape is None:
        extent = np.asarray(reference.size, dtype=float) * np.asarray(reference.spacing)
        size = tuple(int(max(1, np.ceil(e / s / divisor - 1e-6)) * divisor) for e, s in zip(extent, spacing))
    else:
        size = tuple(int(s) for s in reversed(tuple(shape)))
    matrix = np.asarray(reference.direction, dtype=float).reshape(3, 3) @ np.diag(spacing)
    origin = reference.center() - matrix @ ((np.asarray(size, dtype=float) - 1.0) / 2.0)
    return Geometry(size, spacing, tuple(float(o) for o in origin), tuple(reference.direction))


def affine_from_field(field: DisplacementField, tolerance_mm: float = AFFINE_TOLERANCE_MM) -> np.ndarray:
    """The 4x4 affine (fixed point -> moving point) of a displacement field that is one, by least squares in
    float64; a field further than ``tolerance_mm`` from any affine is an :class:`AffineFitError`."""
    pts = grid_points(field.geometry, dtype=torch.float64).reshape(-1, 3)
    moved = pts + field.field.detach().cpu().double().permute(1, 2, 3, 0).reshape(-1, 3)
    design = torch.cat([pts, torch.ones(len(pts), 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(design, moved).solution          # (4, 3)
    residual = float((design @ solution - moved).norm(dim=1).max())
    if residual > tolerance_mm:
        raise AffineFitError(f"the pre-alignment is not affine (it differs from the best affine by up to "
                             f"{residual:.3f} mm); DeepAtlas pre-aligns with the 'affine' preset")
    matrix = np.eye(4)
    matrix[:3, :] = solution.T.numpy()
    return matrix


def _resample(volume: torch.Tensor, source: Geometry, target: Geometry, matrix: np.ndarray, mode: str = "bilinear",
              padding: str = "zeros") -> torch.Tensor:
    """(C, Z, Y, X) on ``source`` sampled at ``matrix @ x`` for every voxel x of ``target`` -> (C, *target),
    float64 points (an identity map reproduces the volume)."""
    return warp_image(volume.float(), source, affine_field(matrix, target, volume.device), mode, padding, exact=True)


def to_common_grid(volume: torch.Tensor, case: Geometry, affine: np.ndarray, grid: Geometry,
                   padding: str = "zeros") -> torch.Tensor:
    """A case's (C, Z, Y, X) volume pulled onto the common grid through its pre-alignment ``affine`` (common point
    -> case point), linearly."""
    return _resample(volume, case, grid, affine, "bilinear", padding)


def image_to_common_grid(image: torch.Tensor, case: Geometry, affine: np.ndarray, grid: Geometry) -> torch.Tensor:
    """A case's normalised (C, Z, Y, X) image on the common grid as the networks saw images in training (edge
    values outside the case's grid, ``IMAGE_PADDING``)."""
    return to_common_grid(image, case, affine, grid, IMAGE_PADDING)


def to_case_grid(volume: torch.Tensor, grid: Geometry, affine: np.ndarray, case: Geometry,
                 background: bool = False) -> torch.Tensor:
    """A (C, Z, Y, X) volume on the common grid pulled back onto a case's own grid through ``affine^-1``,
    linearly; outside the common grid 0, or for probabilities (``background=True``) background: channel 0 gets
    the share of each voxel that falls outside."""
    back = np.linalg.inv(affine)
    out = _resample(volume, grid, case, back)
    if background:
        inside = _resample(torch.ones_like(volume[:1]), grid, case, back)
        out[0] = out[0] + (1.0 - inside[0])
    return out


def labels_to_common_grid(label_index: torch.Tensor, n_labels: int, case: Geometry, affine: np.ndarray,
                          grid: Geometry) -> torch.Tensor:
    """Label indices (Z, Y, X) of a case -> label indices on the common grid, label-aware (each label's indicator
    linearly, then argmax; outside the case background)."""
    onehot = F.one_hot(label_index.long(), n_labels).permute(3, 0, 1, 2).float()
    pulled = to_common_grid(onehot, case, affine, grid)
    pulled[0] = pulled[0] + (1.0 - to_common_grid(torch.ones_like(onehot[:1]), case, affine, grid)[0])
    return pulled.argmax(0)


@dataclass
class CommonGrid:
    """The reference on the common grid: ``image`` (C, Z, Y, X) normalised, ``geometry``, the reference's id and
    ``fov`` (Z, Y, X) bool, the common-grid voxels inside the reference's own grid, where pre-alignment measures
    similarity (None: the whole grid, as model folders written before the mask was introduced were trained)."""

    geometry: Geometry
    image: torch.Tensor
    reference_id: str
    fov: torch.Tensor | None = None

    @classmethod
    def from_reference(cls, reference_id: str, image: torch.Tensor, geometry: Geometry,
                       shape: Sequence[int] | None = None, spacing: Sequence[float] | None = None) -> CommonGrid:
        """From the reference case's normalised image (C, Z, Y, X) on its own ``geometry``."""
        grid = common_geometry(geometry, shape, spacing)
        resampled = _resample(image.float(), geometry, grid, np.eye(4))
        inside = _resample(torch.ones_like(image[:1], dtype=torch.float32), geometry, grid, np.eye(4))[0] > 0.5
        return cls(grid, resampled, str(reference_id), inside)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.geometry.shape

    def key(self) -> str:
        """A short id of this grid and reference (registration-cache case id of the reference image)."""
        digest = hashlib.sha256(json.dumps({"reference": self.reference_id, "geometry": self.geometry.to_dict()},
                                           sort_keys=True).encode())
        digest.update(self.image.float().contiguous().numpy().tobytes())
        if self.fov is not None:
            digest.update(b"fov" + self.fov.to(torch.uint8).contiguous().numpy().tobytes())
        return f"deepatlas_common_{digest.hexdigest()[:16]}"

    def fov_mask(self) -> sitk.Image | None:
        """The field-of-view mask as a SimpleITK image on the common grid (the pre-alignment's metric mask)."""
        return None if self.fov is None else tensor_to_image(self.fov.to(torch.uint8), self.geometry)

    def images(self) -> list[sitk.Image]:
        """The reference's channels as SimpleITK images on the common grid (the fixed image of pre-alignment)."""
        return [tensor_to_image(self.image[c].float(), self.geometry) for c in range(self.image.shape[0])]

    def write(self, folder: str | Path) -> list[Path]:
        """The channels as NIfTI files ``<key>_<c>.nii.gz`` in ``folder`` (for the registration cache)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for c, image in enumerate(self.images()):
            paths.append(write_image(image, folder / f"{self.key()}_{c:04d}.nii.gz"))
        return paths

    def prealign(self, cases: Sequence[Sequence[sitk.Image]], backend: str = "torch",
                 device: str | torch.device = "auto", progress=None, max_scale: float | None = None
                 ) -> list[np.ndarray]:
        """Affine pre-alignment of cases (each its channel images) to the reference: per case the 4x4 matrix
        common point -> case point (one batched registration); ``max_scale``: the bound on its scales
        (:func:`prealignment_settings`)."""
        regs = register(self.images(), [list(c) for c in cases], backend=backend, device=device, preset="affine",
                        mask=self.fov_mask(), progress=progress, **prealignment_settings(max_scale))
        return [affine_from_field(r.forward) for r in regs]


def prealignment_settings(max_scale: float | None) -> dict:
    """The registration settings of a pre-alignment (training's registration cache and inference use the same):
    ``max_scale`` bounds the affine's scales to [1/max_scale, max_scale] (None: unbounded, as model folders
    written before the bound were trained)."""
    return {} if max_scale is None else {"max_scale": float(max_scale)}


def sample_on(volume: torch.Tensor, geometry: Geometry, points: torch.Tensor, padding: str = "border"
              ) -> torch.Tensor:
    """(C, Z, Y, X) on ``geometry`` sampled linearly at physical points (..., 3) float64 -> (C, ...)."""
    w2i = torch.as_tensor(geometry.physical_to_index(), dtype=torch.float64, device=volume.device)
    shape = points.shape[:-1]
    grid = physical_to_normalized(points.reshape(1, -1, 1, 1, 3).double(), w2i, volume.shape[1:])
    out = F.grid_sample(volume[None].double(), grid, mode="bilinear", padding_mode=padding, align_corners=True)
    return out[0].reshape(volume.shape[0], *shape)
