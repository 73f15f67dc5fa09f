"""Synthetic brain-like multi-atlas problems for tests and demos.

A fixed analytic template (head with scalp and skull rings, brain tissue, lateral ventricles, a central
deep nucleus and two curved hippocampus-like tubes) is sampled once per subject through a random smooth
deformation and a small random affine, then given subject-specific intensities, a multiplicative bias
field and Rician noise.

Geometry conventions:

* ``shape`` is the NumPy/SimpleITK *array* shape ``(nz, ny, nx)``; ``spacing``, ``origin`` and
  ``direction`` are in SimpleITK order ``(x, y, z)`` (``image.GetSize() == shape[::-1]``).
* The anatomy lives in the image frame and fills a fixed fraction of the physical field of view: index
  axis x runs right to left, y anterior to posterior, z inferior to superior (LPS for the default
  identity direction). A non-identity ``direction`` rotates
  the whole subject in physical (LPS, mm) space; the arrays depend only on ``seed``, ``shape`` and the
  physical field of view. The default origin puts the centre of the field of view at (0, 0, 0) mm.
* Deformations are given in mm, so an anisotropic spacing samples the same physical anatomy.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

__all__ = [
    "PHANTOM_LABELS",
    "apply_deformation",
    "jacobian_determinant",
    "make_known_deformation",
    "make_phantom",
    "make_phantom_atlas_set",
]

PHANTOM_LABELS = {0: "background", 1: "tissue", 2: "ventricles", 3: "deep nucleus", 4: "hippocampus"}
"""Label value -> name of the phantom label maps."""

# Template intensities (T1-like, roughly in [0, 1]) before the per-subject jitter.
_INTENSITY = {
    "scalp": 0.78,
    "skull": 0.12,
    "csf": 0.22,
    "grey": 0.52,
    "white": 0.74,
    "ventricles": 0.16,
    "deep nucleus": 0.60,
    "hippocampus": 0.46,
}

# Template geometry in normalised image-frame coordinates u in [-1, 1] (u = mm offset / half extent).
_HEAD_AXES = (0.80, 0.80, 0.80)
_SKULL_OUTER, _SKULL_INNER = 0.92, 0.84  # fractions of the head radius
_BRAIN_AXES = (0.61, 0.63, 0.57)
_WHITE_FRACTION = 0.78  # white-matter core of the brain, as a fraction of the brain radius


# ----------------------------------------------------------------------------------------------------
# geometry helpers


def _as_vector(values: Sequence[float], name: str, positive: bool = False) -> np.ndarray:
    """Validate a length-3 vector argument."""
    arr = np.asarray(values, dtype=float).reshape(-1)
    if arr.size != 3 or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must have 3 finite values, got {values!r}.")
    if positive and np.any(arr <= 0):
        raise ValueError(f"{name} must be positive, got {values!r}.")
    return arr


def _direction_matrix(direction: Sequence[float] | None) -> np.ndarray:
    """3x3 direction-cosine matrix (columns = physical directions of the x, y, z index axes)."""
    if direction is None:
        return np.eye(3)
    matrix = np.asarray(direction, dtype=float).reshape(-1)
    if matrix.size != 9:
        raise ValueError(f"direction must have 9 values (row-major 3x3), got {len(matrix)}.")
    matrix = matrix.reshape(3, 3)
    if not np.allclose(matrix.T @ matrix, np.eye(3), atol=1e-5):
        raise ValueError(f"direction must be an orthonormal 3x3 matrix, got {direction!r}.")
    return matrix


def _reference_image(
    shape: Sequence[int],
    spacing: Sequence[float],
    direction: Sequence[float] | None,
    origin: Sequence[float] | None,
) -> sitk.Image:
    """Empty uint8 image with the requested geometry; default origin centres the field of view at 0."""
    shape_arr = np.asarray(shape, dtype=int).reshape(-1)
    if shape_arr.size != 3 or np.any(shape_arr < 4):
        raise ValueError(f"shape must be 3 array sizes (nz, ny, nx) of at least 4, got {shape!r}.")
    spacing_arr = _as_vector(spacing, "spacing", positive=True)
    matrix = _direction_matrix(direction)
    size_xyz = shape_arr[::-1]
    if origin is None:
        origin_arr = -matrix @ ((size_xyz - 1) / 2.0 * spacing_arr)
    else:
        origin_arr = _as_vector(origin, "origin")
    image = sitk.Image([int(s) for s in size_xyz], sitk.sitkUInt8)
    image.SetSpacing([float(s) for s in spacing_arr])
    image.SetOrigin([float(o) for o in origin_arr])
    image.SetDirection([float(d) for d in matrix.ravel()])
    return image


def _frame_coordinates(shape: Sequence[int], spacing: np.ndarray) -> list[np.ndarray]:
    """Image-frame mm offsets from the centre of the field of view, broadcastable, for axes (x, y, z).

    Returns three arrays shaped (1, 1, nx), (1, ny, 1) and (nz, 1, 1).
    """
    nz, ny, nx = (int(s) for s in shape)
    x = (np.arange(nx) - (nx - 1) / 2.0) * spacing[0]
    y = (np.arange(ny) - (ny - 1) / 2.0) * spacing[1]
    z = (np.arange(nz) - (nz - 1) / 2.0) * spacing[2]
    return [x[None, None, :], y[None, :, None], z[:, None, None]]


def _smooth_random_field(
    rng: np.random.Generator,
    shape: Sequence[int],
    spacing: Sequence[float],
    sigma_mm: float,
    components: int = 3,
) -> np.ndarray:
    """Stationary smooth random field: Gaussian-smoothed white noise without boundary effects.

    White noise is drawn on a regular lattice (step ``sigma_mm / 2``) that extends ``3 * sigma_mm``
    beyond the grid on every side and is convolved with an isotropic Gaussian of ``sigma_mm``; the sum
    is separable, so it is evaluated exactly at the voxel centres with three small matrix products.

    Args:
        rng: random generator.
        shape: array shape (nz, ny, nx).
        spacing: voxel size in mm, (x, y, z) order.
        sigma_mm: Gaussian sigma in mm.
        components: number of independent components.

    Returns:
        float64 array (nz, ny, nx, components) with zero mean.
    """
    step = sigma_mm / 2.0
    kernels = []
    for n, s in zip(shape, reversed(tuple(spacing)), strict=True):  # array axes z, y, x
        coords = np.arange(n) * float(s)
        lattice = np.arange(-3.0 * sigma_mm, coords[-1] + 3.0 * sigma_mm + step, step)
        kernels.append(np.exp(-0.5 * ((coords[:, None] - lattice[None, :]) / sigma_mm) ** 2))
    gz, gy, gx = kernels
    out = np.empty((*shape, components), dtype=np.float64)
    for c in range(components):
        weights = rng.standard_normal((gz.shape[1], gy.shape[1], gx.shape[1]))
        blurred = np.matmul(gy, weights @ gx.T)  # (kz, ny, nx)
        out[..., c] = (gz @ blurred.reshape(gz.shape[1], -1)).reshape(shape)
    return out


def _scale_to_max_norm(field: np.ndarray, magnitude: float) -> np.ndarray:
    """Rescale a vector field (..., 3) so that its largest vector norm equals ``magnitude``."""
    peak = float(np.sqrt((field**2).sum(axis=-1)).max())
    return field * (magnitude / peak) if peak > 0 else field


def _rotation(angles: Sequence[float]) -> np.ndarray:
    """Rotation matrix from Euler angles (radians) about x, then y, then z."""
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


# ----------------------------------------------------------------------------------------------------
# analytic template


def _hippocampus_mask(ux: np.ndarray, uy: np.ndarray, uz: np.ndarray) -> np.ndarray:
    """Two curved tubes (left/right) swept along a 3D curve with a tapering radius (normalised units)."""
    t = np.linspace(0.0, 1.0, 48)
    radius = 0.085 * (1.0 - 0.45 * t)
    mask = np.zeros(ux.shape, dtype=bool)
    for side in (-1.0, 1.0):
        cx = side * (0.30 - 0.09 * np.sin(0.5 * np.pi * t))
        cy = -0.18 + 0.46 * t
        cz = -0.30 + 0.26 * t**2
        lo = np.array([cx.min(), cy.min(), cz.min()]) - radius.max()
        hi = np.array([cx.max(), cy.max(), cz.max()]) + radius.max()
        box = (ux >= lo[0]) & (ux <= hi[0]) & (uy >= lo[1]) & (uy <= hi[1]) & (uz >= lo[2]) & (uz <= hi[2])
        px, py, pz = ux[box], uy[box], uz[box]
        inside = np.zeros(px.shape, dtype=bool)
        for k in range(t.size):
            inside |= (px - cx[k]) ** 2 + (py - cy[k]) ** 2 + (pz - cz[k]) ** 2 < radius[k] ** 2
        mask[box] |= inside
    return mask


def _template(ux: np.ndarray, uy: np.ndarray, uz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate the template at normalised coordinates (any common shape).

    Returns:
        ``(labels, tissue_class)``: uint8 label map (values of :data:`PHANTOM_LABELS`) and an int8 map of
        intensity classes (index into ``list(_INTENSITY)``; -1 = background).
    """
    classes = list(_INTENSITY)
    tissue = np.full(ux.shape, -1, dtype=np.int8)
    labels = np.zeros(ux.shape, dtype=np.uint8)

    r_head = np.sqrt((ux / _HEAD_AXES[0]) ** 2 + (uy / _HEAD_AXES[1]) ** 2 + (uz / _HEAD_AXES[2]) ** 2)
    tissue[r_head < 1.0] = classes.index("scalp")
    tissue[r_head < _SKULL_OUTER] = classes.index("skull")
    tissue[r_head < _SKULL_INNER] = classes.index("csf")

    r_brain = np.sqrt((ux / _BRAIN_AXES[0]) ** 2 + (uy / _BRAIN_AXES[1]) ** 2 + (uz / _BRAIN_AXES[2]) ** 2)
    # Gyrus-like undulation of the outer brain surface and an interhemispheric fissure.
    azimuth = np.arctan2(uy, ux)
    elevation = np.arctan2(uz, np.hypot(ux, uy))
    folds = 1.0 + 0.035 * np.sin(7.0 * azimuth) * np.cos(5.0 * elevation)
    fissure = (np.abs(ux) < 0.035) & (uz > 0.12)
    brain = (r_brain < folds) & ~fissure
    labels[brain] = 1
    tissue[brain] = classes.index("grey")
    tissue[brain & (r_brain < _WHITE_FRACTION)] = classes.index("white")

    nucleus = ((ux / 0.17) ** 2 + ((uy - 0.04) / 0.19) ** 2 + ((uz + 0.08) / 0.13) ** 2) < 1.0
    hippocampus = _hippocampus_mask(ux, uy, uz)
    # Lateral ventricles: crescents arching over the nucleus in the sagittal plane, tapered at the ends.
    along = np.clip(1.0 - (uy / 0.42) ** 2, 0.0, None)
    ventricles = np.zeros(ux.shape, dtype=bool)
    for side in (-1.0, 1.0):
        centre_z = 0.13 - 0.75 * uy**2
        cross = ((ux - side * 0.15) / 0.085) ** 2 + ((uz - centre_z) / (0.10 * np.sqrt(along) + 1e-6)) ** 2
        ventricles |= (cross < 1.0) & (along > 0)
    for value, name, mask in (
        (3, "deep nucleus", nucleus),
        (4, "hippocampus", hippocampus),
        (2, "ventricles", ventricles),
    ):
        mask = mask & brain
        labels[mask] = value
        tissue[mask] = classes.index(name)
    return labels, tissue


# ----------------------------------------------------------------------------------------------------
# subjects


def _bias_field(rng: np.random.Generator, ux: np.ndarray, uy: np.ndarray, uz: np.ndarray) -> np.ndarray:
    """Smooth multiplicative bias: exp of a random quadratic polynomial in normalised coordinates (~±15%)."""
    terms = (ux, uy, uz, ux * uy, uy * uz, ux * uz, ux**2 - 0.3, uy**2 - 0.3, uz**2 - 0.3)
    coefficients = rng.normal(0.0, 0.06, size=len(terms))
    return np.exp(sum(c * term for c, term in zip(coefficients, terms, strict=True)))


def make_phantom(
    seed: int,
    shape: Sequence[int] = (48, 56, 48),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    direction: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    deformation_mm: float = 3.0,
    noise: float = 0.03,
) -> tuple[sitk.Image, sitk.Image]:
    """One synthetic brain-like subject: an intensity image and its label map.

    The voxel at image-frame position ``p`` (mm from the centre of the field of view) shows the template
    (see :data:`PHANTOM_LABELS`) at ``A p + t + d(p)``: ``A`` is a random rotation (up to 4 degrees per
    axis) times a per-axis scaling (±5%), ``t`` a translation (up to 1.5 mm per axis) and ``d`` a
    stationary Gaussian-smoothed random field (sigma 18% of the mean field of view, about 9 mm by
    default) rescaled so that its largest displacement is ``deformation_mm``. Intensities get per-class
    mean jitter (±0.04), a smooth multiplicative bias field, a global scale (0.85-1.15) and offset
    (±0.02), partial-volume blur and Rician noise of standard deviation ``noise`` (relative to a
    white-matter intensity of about 0.74).

    Args:
        seed: random seed; the same arguments always give identical arrays.
        shape: array shape ``(nz, ny, nx)``.
        spacing: voxel size in mm, SimpleITK order ``(x, y, z)``; anisotropic values are supported.
        direction: row-major 3x3 orthonormal direction cosines; default identity.
        origin: physical position (mm) of voxel (0, 0, 0); default centres the field of view at 0.
        deformation_mm: maximum magnitude of the non-linear displacement (0 disables it).
        noise: Rician noise level (0 disables it).

    Returns:
        ``(image, labels)``: float32 image and uint8 label map on the same grid, arrays ``shape``.
    """
    rng = np.random.default_rng(seed)
    reference = _reference_image(shape, spacing, direction, origin)
    spacing_xyz = np.asarray(reference.GetSpacing())
    half_extent = np.asarray(reference.GetSize()) * spacing_xyz / 2.0
    px, py, pz = np.broadcast_arrays(*_frame_coordinates(shape, spacing_xyz))

    # Subject warp: template point q = A p + t + d(p), in image-frame mm.
    matrix = _rotation(np.deg2rad(rng.uniform(-4.0, 4.0, size=3))) @ np.diag(rng.uniform(0.95, 1.05, size=3))
    shift = rng.uniform(-1.5, 1.5, size=3)
    q = [matrix[i, 0] * px + matrix[i, 1] * py + matrix[i, 2] * pz + shift[i] for i in range(3)]
    if deformation_mm > 0:
        sigma = 0.18 * float(np.mean(2.0 * half_extent))
        field = _smooth_random_field(rng, shape, spacing_xyz, sigma)
        field = _scale_to_max_norm(field, float(deformation_mm))
        q = [q[i] + field[..., i] for i in range(3)]
    labels, tissue = _template(*(q[i] / half_extent[i] for i in range(3)))

    # Intensities: jittered class means, partial-volume blur, bias field, global scale/offset, noise.
    means = np.array(list(_INTENSITY.values())) + rng.uniform(-0.04, 0.04, size=len(_INTENSITY))
    values = np.where(tissue >= 0, means[np.maximum(tissue, 0)], 0.0).astype(np.float32)
    blurred = sitk.GetImageFromArray(values)
    blurred.CopyInformation(reference)
    blurred = sitk.SmoothingRecursiveGaussian(blurred, 0.5 * float(spacing_xyz.min()))
    intensity = sitk.GetArrayFromImage(blurred).astype(np.float64)
    bias = _bias_field(rng, *(c / h for c, h in zip((px, py, pz), half_extent, strict=True)))
    intensity = np.clip(intensity * bias * rng.uniform(0.85, 1.15) + rng.uniform(-0.02, 0.02), 0.0, None)
    if noise > 0:
        real = intensity + rng.normal(0.0, noise, size=intensity.shape)
        imaginary = rng.normal(0.0, noise, size=intensity.shape)
        intensity = np.sqrt(real**2 + imaginary**2)

    image = sitk.GetImageFromArray(intensity.astype(np.float32))
    image.CopyInformation(reference)
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(reference)
    return image, label_image


def _case_seed(seed: int, index: int) -> int:
    """Independent per-case seed derived from the set seed and the case index."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def make_phantom_atlas_set(
    out_dir: str | Path, n_cases: int = 8, seed: int = 0, overwrite: bool = False, **kw: Any
) -> Path:
    """Write ``n_cases`` phantom subjects as a Medical Segmentation Decathlon / nnU-Net v1 folder.

    Layout: ``dataset.json``, ``imagesTr/phantom_000.nii.gz`` ... and ``labelsTr/phantom_000.nii.gz`` ...
    (single-modality images, no ``_0000`` channel suffix, as in the Decathlon). ``dataset.json`` has
    ``name``, ``description``, ``tensorImageSize``, ``modality`` (``{"0": "MRI"}``), ``labels`` (string
    keys), ``numTraining``, ``numTest``, ``training`` (relative ``./imagesTr/...`` / ``./labelsTr/...``
    paths) and ``test``.

    Args:
        out_dir: destination folder (created).
        n_cases: number of subjects.
        seed: set seed; case ``i`` uses a seed derived from ``(seed, i)``.
        overwrite: allow writing into an existing non-empty folder; its ``imagesTr``, ``labelsTr`` and
            ``dataset.json`` are replaced, other files are kept.
        **kw: forwarded to :func:`make_phantom` (shape, spacing, direction, origin, deformation_mm, noise).

    Returns:
        The dataset folder.

    Raises:
        FileExistsError: if ``out_dir`` exists, is not empty and ``overwrite`` is False.
    """
    out = Path(out_dir)
    if n_cases < 1:
        raise ValueError(f"n_cases must be at least 1, got {n_cases}.")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"Refusing to write into non-empty folder {out} (pass overwrite=True).")
        for sub in ("imagesTr", "labelsTr"):
            if (out / sub).is_dir():
                shutil.rmtree(out / sub)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)

    training = []
    for index in range(n_cases):
        image, labels = make_phantom(_case_seed(seed, index), **kw)
        name = f"phantom_{index:03d}.nii.gz"
        sitk.WriteImage(image, str(out / "imagesTr" / name), useCompression=True)
        sitk.WriteImage(labels, str(out / "labelsTr" / name), useCompression=True)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})

    dataset = {
        "name": "AtlasSegPhantom",
        "description": f"Synthetic brain-like multi-atlas phantom ({n_cases} cases, seed {seed}).",
        "reference": "atlasseg.phantom",
        "licence": "CC0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {str(k): v for k, v in PHANTOM_LABELS.items()},
        "numTraining": n_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n", encoding="utf-8")
    return out


# ----------------------------------------------------------------------------------------------------
# known deformations for registration tests


def jacobian_determinant(field: sitk.Image) -> np.ndarray:
    """Jacobian determinant of the map ``x -> x + d(x)`` for a physical displacement field.

    Derivatives are taken with central differences along the index axes, divided by the spacing and
    rotated by the direction matrix, so the result is correct for any orthonormal direction.

    Args:
        field: 3D vector image with 3 components (physical displacement, mm).

    Returns:
        float64 array (nz, ny, nx); values <= 0 mean folding (not invertible).
    """
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError("field must be a 3D image with 3-component vectors.")
    disp = sitk.GetArrayViewFromImage(field)  # (nz, ny, nx, 3), components (x, y, z)
    spacing_zyx = field.GetSpacing()[::-1]
    direction = np.asarray(field.GetDirection(), dtype=float).reshape(3, 3)
    # Index-frame mm coordinates are xi = D^T (x - origin), so d(d_c)/dx_j = sum_a d(d_c)/dxi_a * D[j, a].
    jac: list[list[Any]] = [[None] * 3 for _ in range(3)]  # jac[c][j] = delta_cj + d(d_c)/dx_j
    for c in range(3):
        dz, dy, dx = np.gradient(np.asarray(disp[..., c], dtype=np.float64), *spacing_zyx)
        grad = (dx, dy, dz)
        for j in range(3):
            terms = [grad[a] * direction[j, a] for a in range(3) if direction[j, a] != 0.0]
            jac[c][j] = sum(terms) + float(c == j)
    (j00, j01, j02), (j10, j11, j12), (j20, j21, j22) = jac
    return j00 * (j11 * j22 - j12 * j21) - j01 * (j10 * j22 - j12 * j20) + j02 * (j10 * j21 - j11 * j20)


def make_known_deformation(
    reference: sitk.Image, magnitude_mm: float, seed: int, smoothness_mm: float
) -> sitk.Image:
    """A smooth, invertible random displacement field on the grid of ``reference``.

    Each physical component (LPS x, y, z) is white noise smoothed by a Gaussian of ``smoothness_mm``
    (honouring the spacing), then the field is rescaled so that its largest vector norm is exactly
    ``magnitude_mm``. The field is only returned if the Jacobian determinant of ``x -> x + d(x)`` is
    positive everywhere (checked with :func:`jacobian_determinant`); as a rule of thumb this holds for
    ``magnitude_mm`` up to about ``0.4 * smoothness_mm``.

    Use it as ``sitk.DisplacementFieldTransform(sitk.Image(field))`` or with :func:`apply_deformation`.
    For resampling, the transform maps fixed (output) points to moving (input) points, so
    ``apply_deformation(moving, field, ...)`` returns ``moving(x + d(x))`` and a registration of
    ``fixed=deformed`` to ``moving=original`` should recover ``d``.

    Args:
        reference: image whose grid (size, spacing, origin, direction) the field takes.
        magnitude_mm: maximum displacement norm in mm (must be >= 0).
        seed: random seed.
        smoothness_mm: Gaussian smoothing sigma in mm (must be > 0).

    Returns:
        ``sitkVectorFloat64`` image with 3 components, physical displacement in mm.

    Raises:
        ValueError: for a non-3D reference, invalid arguments, or a field that folds (Jacobian <= 0).
    """
    if reference.GetDimension() != 3:
        raise ValueError(f"reference must be 3D, got {reference.GetDimension()}D.")
    if magnitude_mm < 0 or smoothness_mm <= 0:
        raise ValueError(
            f"Need magnitude_mm >= 0 and smoothness_mm > 0, got {magnitude_mm}, {smoothness_mm}."
        )
    rng = np.random.default_rng(seed)
    shape = reference.GetSize()[::-1]
    disp = _smooth_random_field(rng, shape, reference.GetSpacing(), float(smoothness_mm))
    disp = _scale_to_max_norm(disp, float(magnitude_mm))
    field = sitk.GetImageFromArray(disp, isVector=True)
    field = sitk.Cast(field, sitk.sitkVectorFloat64)
    field.CopyInformation(reference)
    min_det = float(jacobian_determinant(field).min())
    if min_det <= 0:
        raise ValueError(
            f"Random field with magnitude {magnitude_mm} mm and smoothness {smoothness_mm} mm folds "
            f"(min Jacobian determinant {min_det:.3f}); lower magnitude_mm or raise smoothness_mm."
        )
    return field


def apply_deformation(image: sitk.Image, field: sitk.Image, is_label: bool) -> sitk.Image:
    """Resample ``image`` through a displacement field onto its own grid: ``out(x) = image(x + d(x))``.

    Args:
        image: image to deform (any pixel type).
        field: displacement field, e.g. from :func:`make_known_deformation` (left unmodified).
        is_label: nearest-neighbour interpolation for label maps, linear otherwise.

    Returns:
        Deformed image with the pixel type and geometry of ``image``; points mapped outside get 0.
    """
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(image, image, transform, interpolator, 0.0, image.GetPixelID())
