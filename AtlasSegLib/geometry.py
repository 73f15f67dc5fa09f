"""Exact conversion between Slicer volume nodes (RAS) and SimpleITK images (LPS).

Slicer stores a volume's grid as an IJK-to-RAS matrix; ITK/SimpleITK as spacing, origin and direction in LPS.
Both index arrays the same way (x fastest), so voxel data is copied as is and only the geometry is mapped:
``ijkToRas = diag(-1, -1, 1, 1) @ [direction @ diag(spacing) | origin]``.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
ORTHONORMAL_TOLERANCE = 1e-6


class GeometryError(ValueError):
    """A volume whose grid cannot be passed to the engine (the message says why and what to do)."""


def vtkMatrixToNumpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpyToVtkMatrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijkToRasFromImage(image: sitk.Image) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of a 3D SimpleITK image."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=float)
    return matrix


def imageGeometryFromIjkToRas(ijkToRas: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, direction) in ITK's LPS convention for an IJK-to-RAS matrix.

    Raises GeometryError for sheared grids (e.g. a volume under a non-rigid linear transform), which ITK's
    orthonormal direction cannot represent.
    """
    linear = LPS_TO_RAS @ ijkToRas[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise GeometryError("the volume has a zero voxel size")
    direction = linear / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=ORTHONORMAL_TOLERANCE):
        raise GeometryError("the volume's grid is sheared (is it under a scaling/shearing transform? "
                            "harden or remove the transform first)")
    origin = LPS_TO_RAS @ ijkToRas[:3, 3]
    return tuple(float(s) for s in spacing), tuple(float(o) for o in origin), tuple(float(d) for d in direction.ravel())


def worldIjkToRas(volumeNode) -> np.ndarray:
    """The node's IJK-to-RAS matrix in world coordinates (its linear parent transforms applied)."""
    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    matrix = vtkMatrixToNumpy(ijkToRas)
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is not None:
        if not transformNode.IsTransformToWorldLinear():
            raise GeometryError(f"'{volumeNode.GetName()}' is under a non-linear transform: harden it first")
        toWorld = vtk.vtkMatrix4x4()
        transformNode.GetMatrixTransformToWorld(toWorld)
        matrix = vtkMatrixToNumpy(toWorld) @ matrix
    return matrix


def volumeArray(volumeNode) -> np.ndarray:
    """A copy of the node's voxels as a (K, J, I) array (SimpleITK's array order)."""
    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetPointData().GetScalars() is None:
        raise GeometryError(f"'{volumeNode.GetName()}' has no image data")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise GeometryError(f"'{volumeNode.GetName()}' has {imageData.GetNumberOfScalarComponents()} components "
                            "per voxel; a scalar volume is needed")
    dims = imageData.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars())
    return scalars.reshape(dims[::-1]).copy()


def volumeNodeToImage(volumeNode, world: bool = True) -> sitk.Image:
    """A SimpleITK image with the node's voxels and its exact grid (world coordinates by default)."""
    image = sitk.GetImageFromArray(volumeArray(volumeNode))
    matrix = worldIjkToRas(volumeNode) if world else _localIjkToRas(volumeNode)
    spacing, origin, direction = imageGeometryFromIjkToRas(matrix)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def _localIjkToRas(volumeNode) -> np.ndarray:
    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    return vtkMatrixToNumpy(ijkToRas)


def updateVolumeNodeFromImage(volumeNode, image: sitk.Image) -> None:
    """Replace the node's voxels and grid by the image's (the node must not be under a transform)."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise GeometryError("expected a 3D scalar image")
    array = sitk.GetArrayViewFromImage(image)
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(image.GetSize())
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    imageData.GetPointData().SetScalars(scalars)
    volumeNode.SetIJKToRASMatrix(numpyToVtkMatrix(ijkToRasFromImage(image)))
    volumeNode.SetAndObserveImageData(imageData)
