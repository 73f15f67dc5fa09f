"""MRML-scene helpers shared by the headless tests of the Slicer modules' logic (slicer-core, no mocks)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from AtlasSegLib.geometry import updateVolumeNodeFromImage, vtkMatrixToNumpy
from AtlasSegLib.results import PALETTE

_COLOR_LOGICS = []  # a colour logic removes its default colour nodes when it is deleted: keep them alive


def register_segmentation_converters() -> None:
    """Binary labelmap <-> closed surface conversion, registered as Slicer's Segmentations module does at start-up
    (the slicer-core wheel has the rules but registers none)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    registered = {rule.GetName() for rule in factory.GetConverterRules()}
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule(),
                 slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule()):
        if rule.GetName() not in registered:
            factory.RegisterConverterRule(rule)


def new_scene():
    register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)  # Slicer's default colour nodes, as in the application
    _COLOR_LOGICS.append(colors)
    return scene


def node_ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return vtkMatrixToNumpy(matrix)


def array_of(node) -> np.ndarray:
    data = node.GetImageData()
    return numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()).reshape(data.GetDimensions()[::-1])


def segmentation_from_labels(scene, labels: sitk.Image, names: dict[int, str], name: str, reference_volume=None):
    """A segmentation node made the way Slicer imports a label image (segment names from a colour table)."""
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", f"{name} colours")
    colors.SetTypeToUser()
    colors.SetNumberOfColors(max(names) + 1)
    for value, label in names.items():
        colors.SetColor(value, label, *(np.array(PALETTE[value % len(PALETTE)]) * 0.9), 1.0)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{name} labelmap")
    updateVolumeNodeFromImage(labelmap, labels)
    labelmap.CreateDefaultDisplayNodes()
    labelmap.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    assert logic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    scene.RemoveNode(labelmap)
    scene.RemoveNode(colors)
    return segmentation


def segment_names(segmentation_node) -> list[str]:
    seg = segmentation_node.GetSegmentation()
    return [seg.GetNthSegment(k).GetName() for k in range(seg.GetNumberOfSegments())]


def label_array_of_segmentation(scene, segmentation_node, reference_volume, names: dict[int, str]) -> np.ndarray:
    """Segments -> label values by name, on the reference volume's grid (Slicer's export)."""
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "export colours")
    colors.SetTypeToUser()
    colors.SetNumberOfColors(max(names) + 1)
    for value, label in names.items():
        colors.SetColor(value, label, 0.5, 0.5, 0.5, 1.0)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    ids = vtk.vtkStringArray()
    seg = segmentation_node.GetSegmentation()
    for k in range(seg.GetNumberOfSegments()):
        ids.InsertNextValue(seg.GetNthSegmentID(k))
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    assert logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference_volume,
                                              slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, colors)
    assert np.allclose(node_ijk_to_ras(labelmap), node_ijk_to_ras(reference_volume), atol=1e-9)
    array = array_of(labelmap).copy()
    scene.RemoveNode(labelmap)
    scene.RemoveNode(colors)
    return array


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def snapshot(node) -> tuple:
    """What must not change on a user's input node."""
    state = [node.GetMTime(), node.GetName()]
    if node.IsA("vtkMRMLVolumeNode"):
        state += [node.GetImageData().GetMTime(), node_ijk_to_ras(node).tobytes(), array_of(node).tobytes()]
    if node.IsA("vtkMRMLSegmentationNode"):
        seg = node.GetSegmentation()
        state += [seg.GetMTime(), tuple(segment_names(node)), seg.GetSourceRepresentationName(),
                  seg.ContainsRepresentation("Closed surface")]
        for k in range(seg.GetNumberOfSegments()):
            labelmap = seg.GetNthSegment(k).GetRepresentation("Binary labelmap")
            state.append(numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).tobytes())
    return tuple(state)




def assert_under_folder(scene, folder: int, nodes) -> None:
    """Every node sits somewhere below the subject-hierarchy ``folder``."""
    sh = scene.GetSubjectHierarchyNode()
    for node in nodes:
        item, ancestors = sh.GetItemByDataNode(node), []
        while item and item != sh.GetSceneItemID():
            item = sh.GetItemParent(item)
            ancestors.append(item)
        assert folder in ancestors, node.GetName()
