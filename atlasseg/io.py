"""Image I/O and grid geometry.

All image I/O goes through SimpleITK, and all geometry is physical (ITK's LPS world, millimetres).
Arrays follow SimpleITK's ``GetArrayFromImage`` order ``(Z, Y, X)``; index vectors and physical
points follow ITK's ``(x, y, z)`` order.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

GEOMETRY_TOLERANCE = 1e-4


class ImageError(ValueError):
    """Bad input image: the message names the file and the problem."""


@dataclass(frozen=True)
class Geometry:
    """A 3D image grid in physical space.

    ``size`` is (x, y, z) in voxels, ``spacing`` in mm, ``origin`` in mm (LPS), ``direction`` a 3x3
    row-major matrix whose columns are the index axes in physical space.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        if image.GetDimension() != 3:
            raise ImageError(f"expected a 3D image, got {image.GetDimension()}D")
        return cls(
            tuple(int(s) for s in image.GetSize()),
            tuple(float(s) for s in image.GetSpacing()),
            tuple(float(o) for o in image.GetOrigin()),
            tuple(float(d) for d in image.GetDirection()),
        )

    def to_dict(self) -> dict:
        """JSON-ready (manifests and model configs)."""
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(tuple(int(s) for s in d["size"]), tuple(float(s) for s in d["spacing"]),
                   tuple(float(o) for o in d["origin"]), tuple(float(x) for x in d["direction"]))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (Z, Y, X)."""
        return (self.size[2], self.size[1], self.size[0])

    def index_to_physical(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous continuous index (x, y, z, 1) to physical (LPS) points."""
        m = np.eye(4)
        m[:3, :3] = np.asarray(self.direction).reshape(3, 3) @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def physical_to_index(self) -> np.ndarray:
        return np.linalg.inv(self.index_to_physical())

    def center(self) -> np.ndarray:
        """Physical centre of the grid (mm)."""
        mid = (np.asarray(self.size, dtype=float) - 1.0) / 2.0
        return (self.index_to_physical() @ np.append(mid, 1.0))[:3]

    def extent(self) -> np.ndarray:
        """Physical length of each index axis (mm)."""
        return np.asarray(self.size, dtype=float) * np.asarray(self.spacing)

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def reference_image(self) -> sitk.Image:
        """An empty image with this geometry (for resampling)."""
        return self.apply_to(sitk.Image(list(self.size), sitk.sitkUInt8))

    def downsampled(self, factor: int) -> Geometry:
        """A coarser grid covering the same physical region, voxel centres on block centres."""
        if factor == 1:
            return self
        size = tuple(max(1, int(np.ceil(s / factor))) for s in self.size)
        spacing = tuple(sp * factor for sp in self.spacing)
        shift = (factor - 1) / 2.0
        origin = self.index_to_physical() @ np.array([shift, shift, shift, 1.0])
        return Geometry(size, spacing, tuple(float(o) for o in origin[:3]), self.direction)

    def same_as(self, other: Geometry, tolerance: float = GEOMETRY_TOLERANCE) -> bool:
        return not self.differences(other, tolerance)

    def differences(self, other: Geometry, tolerance: float = GEOMETRY_TOLERANCE) -> list[str]:
        """Human-readable list of what differs between two grids."""
        out = []
        if self.size != other.size:
            out.append(f"size {self.size} vs {other.size}")
        for name in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            if not np.allclose(a, b, atol=tolerance, rtol=0):
                out.append(f"{name} {tuple(np.round(a, 5))} vs {tuple(np.round(b, 5))}")
        return out


def read_image(path: str | os.PathLike, check_finite: bool = True) -> sitk.Image:
    """Read an image with SimpleITK; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    if path.name.lower().endswith((".nii", ".nii.gz")):
        check_nifti_payload(path, check_finite)   # SimpleITK zero-fills a truncated NIfTI and zeroes its NaNs
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unreadable"
        if "No such file" in first:      # MetaImage's words for a data block cut short
            first = "data missing or cut short: truncated or corrupt file"
        raise ImageError(f"{path}: cannot read image ({first})") from None
    if image.GetDimension() not in (3, 4):
        raise ImageError(f"{path}: expected a 3D (or 4D multi-channel) image, got {image.GetDimension()}D")
    if check_finite and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32,
                                               sitk.sitkVectorFloat64):
        arr = sitk.GetArrayViewFromImage(image)
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ImageError(f"{path}: contains {bad} NaN/Inf voxel values")
    return image


# NIfTI-1 / NIfTI-2 header fields: (offset, dtype) of datatype, bitpix, dim[0..7] and vox_offset
_NIFTI_FIELDS = {348: ((70, "i2"), (72, "i2"), (40, "i2"), (108, "f4")),
                 540: ((12, "i2"), (14, "i2"), (16, "i8"), (168, "i8"))}
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _nifti_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if not path.name.lower().endswith(".gz"):
        return data
    members = []
    while data:  # one zlib pass per gzip member (faster than the gzip module, and says where it stopped)
        stream = zlib.decompressobj(31)
        try:
            members.append(stream.decompress(data))
        except zlib.error as err:
            raise ImageError(f"{path}: corrupt gzip data ({err})") from None
        if not stream.eof:
            raise ImageError(f"{path}: truncated: the gzip stream ends before its end marker")
        data = stream.unused_data
    return b"".join(members)


def check_nifti_payload(path: Path, check_finite: bool = True) -> None:
    """Fail when a NIfTI file holds fewer voxel bytes than its header declares, or (float data, with
    ``check_finite``) NaN/Inf voxels: SimpleITK would silently fill the missing part and the NaNs with zeros."""
    data = _nifti_bytes(path)
    if len(data) < 348:
        raise ImageError(f"{path}: truncated NIfTI header ({len(data)} bytes)")
    for order in "<>":
        size = int(np.frombuffer(data, f"{order}i4", 1, 0)[0])
        if size in _NIFTI_FIELDS and len(data) >= size:
            break
    else:
        return  # not a NIfTI header we know: SimpleITK will say what is wrong
    (dt_at, dt), (bp_at, bp), (dim_at, dim_t), (off_at, off_t) = _NIFTI_FIELDS[size]
    datatype = int(np.frombuffer(data, f"{order}{dt}", 1, dt_at)[0])
    bitpix = int(np.frombuffer(data, f"{order}{bp}", 1, bp_at)[0])
    dim = np.frombuffer(data, f"{order}{dim_t}", 8, dim_at).astype(np.int64)
    offset = int(np.frombuffer(data, f"{order}{off_t}", 1, off_at)[0])
    if not 1 <= dim[0] <= 7 or (dim[1:dim[0] + 1] < 1).any() or bitpix <= 0:
        return
    count = int(np.prod(dim[1:dim[0] + 1]))
    needed = offset + count * bitpix // 8
    if len(data) < needed:
        raise ImageError(f"{path}: truncated: the header declares {needed} bytes of image data, the file holds "
                         f"{len(data)}")
    if check_finite and datatype in _NIFTI_FLOATS:
        values = np.frombuffer(data, f"{order}{_NIFTI_FLOATS[datatype]}", count, offset)
        bad = int(count - np.isfinite(values).sum())
        if bad:
            raise ImageError(f"{path}: contains {bad} NaN/Inf voxel values")


def atomic_write(write: Callable[[str], None], path: str | os.PathLike) -> Path:
    """Run ``write(temporary_path)`` for a file beside ``path`` (same suffixes), then ``os.replace`` it into place.

    A crash leaves either the old file or the new one, never a partial file; the temporary file never outlives
    the call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix="".join(path.suffixes), dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(write, path)


def safe_name(name: str) -> str:
    """A case id or label name as a file-name part (letters, digits, ``-_.``; anything else becomes ``_``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (manifests and model configs record it to detect damage)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> str:
    """A safetensors file written atomically; returns its sha256."""
    from safetensors.torch import save_file

    written = atomic_write(lambda tmp: save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp), path)
    return sha256(written)


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write atomically (the temporary file keeps the suffix, which selects the format)."""
    return atomic_write(lambda tmp: sitk.WriteImage(image, tmp, compress), path)


def split_channels(image: sitk.Image) -> list[sitk.Image]:
    """A 4D image (x, y, z, c) or a vector image -> list of 3D scalar channel images."""
    if image.GetNumberOfComponentsPerPixel() > 1:
        return [sitk.VectorIndexSelectionCast(image, i, sitk.sitkFloat32)
                for i in range(image.GetNumberOfComponentsPerPixel())]
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        channels = []
        for c in range(size[3]):
            channels.append(sitk.Extract(image, size[:3] + [0], [0, 0, 0, c]))
        return channels
    return [image]


def image_to_tensor(images: sitk.Image | list[sitk.Image], dtype=torch.float32) -> torch.Tensor:
    """One or more 3D images on one grid -> tensor (C, Z, Y, X)."""
    if isinstance(images, sitk.Image):
        images = [images]
    arrays = [sitk.GetArrayFromImage(im).astype(np.float32 if dtype.is_floating_point else np.int64)
              for im in images]
    return torch.from_numpy(np.stack(arrays)).to(dtype)


def labels_to_tensor(image: sitk.Image) -> torch.Tensor:
    """Label image -> int64 tensor (Z, Y, X)."""
    return torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.int64))


def tensor_to_image(array: torch.Tensor | np.ndarray, geometry: Geometry,
                    pixel_type: int | None = None) -> sitk.Image:
    """Array (Z, Y, X) on ``geometry`` -> SimpleITK image with that geometry."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    if tuple(array.shape) != geometry.shape:
        raise ValueError(f"array shape {tuple(array.shape)} does not match grid shape {geometry.shape}")
    image = sitk.GetImageFromArray(array)
    geometry.apply_to(image)
    if pixel_type is not None and image.GetPixelID() != pixel_type:
        image = sitk.Cast(image, pixel_type)
    return image


def label_pixel_type(max_label: int) -> int:
    return sitk.sitkUInt8 if max_label < 256 else (sitk.sitkUInt16 if max_label < 65536 else sitk.sitkInt32)
