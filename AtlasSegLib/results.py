"""Engine outputs -> MRML nodes, the same way in every AtlasSeg module.

One subject-hierarchy folder per run; label images become segmentation nodes named and coloured after the
labels; probability, vote, weight and agreement maps become scalar volumes that remember their kind and their
target, so :func:`showMap` can overlay any of them in the slice views. Every function takes the scene, so the
code runs on ``slicer.mrmlScene`` in Slicer and on any scene of the ``slicer-core`` wheel in tests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import vtk

from .engine import EngineError
from .geometry import numpyToVtkMatrix, updateVolumeNodeFromImage, vtkMatrixToNumpy

# Distinct, colour-blind-friendly segment colours (Okabe-Ito, then Tableau) for labels read from disk.
PALETTE = ((0.902, 0.624, 0.0), (0.337, 0.706, 0.914), (0.0, 0.620, 0.451), (0.941, 0.894, 0.259),
           (0.0, 0.447, 0.698), (0.835, 0.369, 0.0), (0.800, 0.475, 0.655), (0.549, 0.337, 0.294),
           (0.498, 0.498, 0.498), (0.737, 0.741, 0.133), (0.090, 0.745, 0.812), (0.580, 0.404, 0.741))


@dataclass(frozen=True)
class MapStyle:
    """How a result map is shown as a foreground overlay."""

    colorNodeID: str
    fallbackType: str             # vtkMRMLColorTableNode type used where the scene lacks Slicer's default colours
    window: tuple[float, float] | None   # min, max of the colour range (None: the map's own range)
    threshold: tuple[float, float] | None = None   # voxels outside are transparent
    opacity: float = 0.5


MAP_STYLES = {
    "votes": MapStyle("vtkMRMLColorTableNodeRainbow", "Rainbow", (0.0, 1.0), (0.01, 1.0)),
    "probability": MapStyle("vtkMRMLColorTableNodeRainbow", "Rainbow", (0.0, 1.0), (0.01, 1.0)),
    "weights": MapStyle("vtkMRMLColorTableNodeIron", "Iron", None),
    "agreement": MapStyle("vtkMRMLColorTableNodeRainbow", "Rainbow", (0.0, 1.0)),
    "oracle": MapStyle("vtkMRMLColorTableNodeRed", "Red", (0.0, 1.0), (0.0, 0.5), 0.7),  # shows the uncovered voxels
}
MAP_KIND_ATTRIBUTE = "AtlasSeg.MapKind"
OUTPUT_GRID_TOLERANCE = 1e-3   # mm; NIfTI stores the grid in float32
TARGET_REFERENCE_ROLE = "AtlasSegTarget"
METRIC_COLUMNS = (("dice", "Dice"), ("jaccard", "Jaccard"), ("hd95", "HD95 (mm)"), ("assd", "ASSD (mm)"),
                  ("sensitivity", "Sensitivity"), ("precision", "Precision"))


# ---------------------------------------------------------------------------------------------- labels, colours

def paletteColor(value: int) -> tuple[float, float, float]:
    """The default colour of a label value (background has none)."""
    return PALETTE[(value - 1) % len(PALETTE)]


def paletteColors(labels: dict[int, str]) -> dict[int, tuple[float, float, float]]:
    return {value: paletteColor(value) for value in labels if value}


def readRunRecord(outputDir: str | Path) -> tuple[dict, dict[int, str], dict[str, Path]]:
    """The engine's ``run.json``: the record, its labels (value -> name) and its files (key -> path)."""
    run = json.loads((Path(outputDir) / "run.json").read_text())
    labels = {int(v): name for v, name in run["labels"].items()}
    return run, labels, {key: Path(path) for key, path in run.get("files", {}).items()}


def newColorTable(scene, name: str, labels: dict[int, str], colors: dict[int, tuple]):
    """A user colour table naming every label value: segments imported through it get the label names."""
    colorTable = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    colorTable.SetTypeToUser()
    colorTable.SetNumberOfColors(max(labels) + 1)
    colorTable.SetAttribute("Category", "AtlasSeg")
    for value in range(max(labels) + 1):
        if value in labels:
            r, g, b = (0.0, 0.0, 0.0) if value == 0 else colors.get(value, paletteColor(value))
            colorTable.SetColor(value, labels[value], r, g, b, 0.0 if value == 0 else 1.0)
        else:
            colorTable.SetColor(value, "", 0.0, 0.0, 0.0, 0.0)
    return colorTable


# ---------------------------------------------------------------------------------------------- subject hierarchy

def createFolder(scene, title: str, parentItemID: int | None = None) -> int:
    """A subject-hierarchy folder (under the scene by default, with a unique name there)."""
    sh = scene.GetSubjectHierarchyNode()
    if parentItemID is None:
        return sh.CreateFolderItem(sh.GetSceneItemID(), scene.GenerateUniqueName(title))
    return sh.CreateFolderItem(parentItemID, title)


def placeInFolder(scene, node, folderItemID: int) -> None:
    sh = scene.GetSubjectHierarchyNode()
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, folderItemID)
    else:  # scenes without the subject hierarchy plugins (slicer-core) do not create items themselves
        sh.CreateItem(folderItemID, node)


# ---------------------------------------------------------------------------------------------- files -> nodes

def volumeFromFile(volumeNode, path: Path, gridIjkToRas: np.ndarray | None = None) -> None:
    """Load an engine output; where it lies on ``gridIjkToRas`` up to NIfTI's float32 rounding, use that grid
    exactly, so results overlay the target voxel for voxel."""
    updateVolumeNodeFromImage(volumeNode, sitk.ReadImage(str(path)))
    if gridIjkToRas is not None:
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        if np.abs(vtkMatrixToNumpy(matrix) - gridIjkToRas).max() < OUTPUT_GRID_TOLERANCE:
            volumeNode.SetIJKToRASMatrix(numpyToVtkMatrix(gridIjkToRas))


def segmentationFromLabelFile(scene, path: Path, colorTable, name: str, gridIjkToRas: np.ndarray | None = None):
    """A segmentation node from a label image: one segment per label present, named and coloured by the table."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__AtlasSegResult")
    try:
        volumeFromFile(labelmap, path, gridIjkToRas)
        labelmap.CreateDefaultDisplayNodes()
        labelmap.GetDisplayNode().SetAndObserveColorNodeID(colorTable.GetID())
        segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentationNode.CreateDefaultDisplayNodes()
        if not segmentationsLogic(scene).ImportLabelmapToSegmentationNode(labelmap, segmentationNode):
            raise EngineError(f"could not import {path.name} as a segmentation")
    finally:
        scene.RemoveNode(labelmap)
    display = segmentationNode.GetDisplayNode()
    display.SetOpacity2DFill(0.35)
    display.SetOpacity2DOutline(1.0)
    return segmentationNode


def mapNode(scene, path: Path, name: str, kind: str, targetNode, gridIjkToRas: np.ndarray | None = None):
    """A result map as a scalar volume styled for its ``kind`` (a key of MAP_STYLES), linked to its target."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    volumeFromFile(node, path, gridIjkToRas)
    node.SetAttribute(MAP_KIND_ATTRIBUTE, kind)
    node.SetNodeReferenceID(TARGET_REFERENCE_ROLE, targetNode.GetID())
    node.CreateDefaultDisplayNodes()
    _styleMapDisplay(scene, node, MAP_STYLES[kind])
    return node


def _styleMapDisplay(scene, node, style: MapStyle) -> None:
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(colorNodeID(scene, style))
    display.AutoWindowLevelOff()
    low, high = style.window or node.GetImageData().GetScalarRange()
    display.SetWindowLevelMinMax(low, high if high > low else low + 1.0)
    display.AutoThresholdOff()
    if style.threshold:
        display.SetThreshold(*style.threshold)
        display.ApplyThresholdOn()
    else:
        display.ApplyThresholdOff()
    display.SetInterpolate(False)


def colorNodeID(scene, style: MapStyle) -> str:
    """Slicer's default colour node, or (scene without default colours) an equivalent table."""
    if scene.GetNodeByID(style.colorNodeID) is not None:
        return style.colorNodeID
    name = f"AtlasSeg {style.fallbackType}"
    existing = scene.GetFirstNodeByName(name)
    if existing is not None:
        return existing.GetID()
    colorNode = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    getattr(colorNode, f"SetTypeTo{style.fallbackType}")()
    return colorNode.GetID()


def metricsTable(scene, metrics: dict, name: str):
    """The engine's ``metrics.json`` as a table node: one row per label, then the mean."""
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    rows = [(entry["name"], entry) for entry in metrics["labels"].values()] + [("mean", metrics["mean"])]
    labelColumn = vtk.vtkStringArray()
    labelColumn.SetName("Label")
    for rowName, _ in rows:
        labelColumn.InsertNextValue(rowName)
    table.AddColumn(labelColumn)
    for key, title in METRIC_COLUMNS:
        column = vtk.vtkDoubleArray()
        column.SetName(title)
        for _, entry in rows:
            value = entry.get(key)
            column.InsertNextValue(float("nan") if value is None else float(value))
        table.AddColumn(column)
    return table


# ---------------------------------------------------------------------------------------------- display

def mapStyle(node) -> MapStyle:
    return MAP_STYLES.get(node.GetAttribute(MAP_KIND_ATTRIBUTE) or "", MAP_STYLES["votes"])


def showMap(scene, node, targetNode=None, opacity: float | None = None) -> None:
    """Show a result map as a coloured foreground over its target in every slice view."""
    targetNode = targetNode or node.GetNodeReference(TARGET_REFERENCE_ROLE)
    style = mapStyle(node)
    for k in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(k, "vtkMRMLSliceCompositeNode")
        if targetNode is not None:
            composite.SetBackgroundVolumeID(targetNode.GetID())
        composite.SetForegroundVolumeID(node.GetID())
        composite.SetForegroundOpacity(style.opacity if opacity is None else opacity)


# ---------------------------------------------------------------------------------------------- helpers

def segmentationsLogic(scene):
    import slicer

    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    return logic


def safeName(name: str, fallback: str = "atlas") -> str:
    """A name usable as a file name and case id."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or fallback


def uniqueName(name: str, used: set[str]) -> str:
    candidate, k = name, 1
    while candidate in used:
        k += 1
        candidate = f"{name}_{k}"
    used.add(candidate)
    return candidate
