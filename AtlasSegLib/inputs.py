"""MRML nodes -> engine input files, the same way in every AtlasSeg module.

The user's nodes are only read: segmentations are exported from a temporary copy, so they never gain
representations or change, and every temporary node is removed again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import SimpleITK as sitk
import vtk

from .engine import EngineError, engineModule
from .geometry import volumeNodeToImage
from .results import newColorTable, segmentationsLogic


def writeVolume(volumeNode, path: Path) -> Path:
    """The node's voxels on its world grid as a compressed NIfTI/NRRD file (the engine's input). A volume the
    engine would refuse (NaN/Inf voxels, blank, too small) is refused here, naming the node, not a temporary file."""
    image = volumeNodeToImage(volumeNode)
    problem = volumeProblem(image)
    if problem:
        raise EngineError(f"Volume '{volumeNode.GetName()}': {problem}.")
    sitk.WriteImage(image, str(path), True)
    return path


def volumeProblem(image: sitk.Image) -> str | None:
    """Why the engine cannot use this image (its own rules, :mod:`atlasseg.imagecheck`), or None."""
    return engineModule("atlasseg.imagecheck").content_problem(sitk.GetArrayViewFromImage(image), image.GetSize())


def writeReference(scene, referenceNode, targetNode, labels: dict[int, str], path: Path) -> Path:
    """A reference segmentation (segments named like the labels) or labelmap volume as a label file on the
    target's grid."""
    if referenceNode.IsA("vtkMRMLSegmentationNode"):
        colorTable = newColorTable(scene, "AtlasSeg reference labels", labels, {})
        try:
            image = segmentationToLabelImage(scene, referenceNode, targetNode, colorTable)
        finally:
            scene.RemoveNode(colorTable)
    else:  # a labelmap volume: values are used as they are
        image = volumeNodeToImage(referenceNode)
    sitk.WriteImage(image, str(path), True)
    return path


def segmentationToLabelImage(scene, segmentationNode, referenceVolume, colorTable) -> sitk.Image:
    """Segments -> label image on ``referenceVolume``'s grid, values looked up by segment name in ``colorTable``.

    Works on a copy so that the user's segmentation never gains representations or changes.
    """
    segmentIds = _segmentIdsByName(segmentationNode, colorTable)
    copy = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "__AtlasSegCopy")
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__AtlasSegLabels")
    try:
        copy.GetSegmentation().DeepCopy(segmentationNode.GetSegmentation())
        if segmentationNode.GetParentTransformNode() is not None:
            copy.SetAndObserveTransformNodeID(segmentationNode.GetParentTransformNode().GetID())
        if segmentIds.GetNumberOfValues() and not segmentationsLogic(scene).ExportSegmentsToLabelmapNode(
                copy, segmentIds, labelmap, referenceVolume, _extentReferenceGeometry(), colorTable):
            raise EngineError(f"could not convert '{segmentationNode.GetName()}' to a label image")
        if referenceVolume.GetParentTransformNode() is not None:
            labelmap.SetAndObserveTransformNodeID(referenceVolume.GetParentTransformNode().GetID())
        if labelmap.GetImageData() is None:  # no segments: an empty label image on the reference grid
            grid = volumeNodeToImage(referenceVolume)
            image = sitk.Image(grid.GetSize(), sitk.sitkUInt8)
            image.CopyInformation(grid)
            return image
        image = volumeNodeToImage(labelmap)
        return sitk.Cast(image, sitk.sitkUInt16 if max(colorTable.GetNumberOfColors(), 1) > 255 else sitk.sitkUInt8)
    finally:
        _removeExportColors(scene, labelmap)
        scene.RemoveNode(labelmap)
        scene.RemoveNode(copy)


def _segmentIdsByName(segmentationNode, colorTable) -> vtk.vtkStringArray:
    """The ids of all segments, which must all be named like a label of ``colorTable``."""
    known = {colorTable.GetColorName(v) for v in range(colorTable.GetNumberOfColors())}
    segmentation = segmentationNode.GetSegmentation()
    segmentIds = vtk.vtkStringArray()
    unknown = []
    for k in range(segmentation.GetNumberOfSegments()):
        name = segmentation.GetNthSegment(k).GetName()
        if name in known:
            segmentIds.InsertNextValue(segmentation.GetNthSegmentID(k))
        else:
            unknown.append(name)
    if unknown:
        raise EngineError(f"segments {unknown} of '{segmentationNode.GetName()}' are not labels of the atlas set "
                          f"({sorted(known - {'background', ''})}); rename or remove them")
    return segmentIds


def _removeExportColors(scene, labelmap) -> None:
    """A colour table the export made for the temporary copy (never one of Slicer's defaults)."""
    display = labelmap.GetDisplayNode()
    createdColors = display.GetColorNode() if display is not None else None
    if createdColors is not None and (createdColors.GetName() or "").startswith("__AtlasSeg"):
        scene.RemoveNode(createdColors)


def _extentReferenceGeometry() -> int:
    import slicer

    return slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY


def segmentLabels(segmentationNodes: Sequence) -> tuple[dict[int, str], dict[int, tuple[float, float, float]]]:
    """Label values for segmentations given as nodes: numbered 1, 2, ... by first appearance of each segment name
    across the nodes (the same name is the same label), coloured as that first segment; background is 0."""
    names: list[str] = []
    colors: dict[int, tuple[float, float, float]] = {}
    for segmentationNode in segmentationNodes:
        segmentation = segmentationNode.GetSegmentation()
        for k in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(k)
            if segment.GetName() not in names:
                names.append(segment.GetName())
                colors[len(names)] = tuple(segment.GetColor())
    return {0: "background", **{k + 1: name for k, name in enumerate(names)}}, colors
