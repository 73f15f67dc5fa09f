"""Engine outputs -> MRML nodes, the same way in every AtlasSeg module.

One subject-hierarchy folder per run; label images become segmentation nodes (new, or an existing one
overwritten) named and coloured after the labels and tagged with the standard terminology where a label names a
known structure (:data:`STRUCTURE_CODES`); probability, vote, weight and agreement maps become scalar volumes
that remember their kind and their target, so :func:`showMap` can overlay any of them in the slice views. Every
function takes the scene, so the code runs on ``slicer.mrmlScene`` in Slicer and on any scene of the
``slicer-core`` wheel in tests.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

from .engine import EngineError
from .geometry import ijkToRasFromImage, numpyToVtkMatrix, updateVolumeNodeFromImage, vtkMatrixToNumpy, worldIjkToRas

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
    # a deformation's Jacobian determinant: 1 (volume kept) in the middle, shrinking cool, growing warm
    "jacobian": MapStyle("vtkMRMLColorTableNodefMRI", "fMRI", (0.0, 2.0)),
}
MAP_KIND_ATTRIBUTE = "AtlasSeg.MapKind"
OUTPUT_GRID_TOLERANCE = 1e-3   # mm; NIfTI stores the grid in float32
TARGET_REFERENCE_ROLE = "AtlasSegTarget"
METRIC_COLUMNS = (("dice", "Dice"), ("jaccard", "Jaccard"), ("hd95", "HD95 (mm)"), ("assd", "ASSD (mm)"),
                  ("sensitivity", "Sensitivity"), ("precision", "Precision"))


# ---------------------------------------------------------------------------------------------- terminology

GENERAL_ANATOMY = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = "SCT^123037004^Anatomical Structure"
TERMINOLOGY_TAG = "TerminologyEntry"   # vtkSegment::GetTerminologyEntryTagName()


@dataclass(frozen=True)
class StructureCode:
    """An anatomical structure's SNOMED CT type, as listed in one of Slicer's terminology files."""

    terminology: str      # the list that holds the type (GENERAL_ANATOMY or DICOM_MASTER)
    code: str             # SNOMED CT concept id
    meaning: str          # the code meaning, exactly as that list writes it
    lateral: bool = False  # the list offers the Left / Right modifiers for it
    modifier: str = ""     # "SCT^7771000^Left" or "SCT^24028007^Right" when the label names a side

    def entry(self) -> str:
        """The segment's ``TerminologyEntry`` tag (Slicer's serialized terminology entry)."""
        return (f"{self.terminology}~{ANATOMICAL_STRUCTURE}~SCT^{self.code}^{self.meaning}~{self.modifier or '^^'}~"
                f"{ANATOMIC_CONTEXT}~^^~^^")


def _codes(terminology: str, code: str, meaning: str, *names: str, lateral: bool = False) -> dict:
    return dict.fromkeys(names, StructureCode(terminology, code, meaning, lateral))


# Label name (lower case, words as _normalisedName leaves them) -> type. Every code below is copied from Slicer's
# Modules/Loadable/Terminologies/Resources: SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json (category
# Anatomical Structure) where that list has the structure, else SegmentationCategoryTypeModifier-DICOM-Master.json.
STRUCTURE_CODES: dict[str, StructureCode] = {
    **_codes(DICOM_MASTER, "5366008", "Hippocampus", "hippocampus", lateral=True),
    **_codes(GENERAL_ANATOMY, "12738006", "Brain", "brain"),
    **_codes(GENERAL_ANATOMY, "389080008", "White Matter", "white matter"),
    **_codes(GENERAL_ANATOMY, "68523003", "Cerebral White Matter", "cerebral white matter"),
    **_codes(GENERAL_ANATOMY, "33060004", "Cerebellar white matter", "cerebellar white matter"),
    **_codes(GENERAL_ANATOMY, "389081007", "Gray Matter", "gray matter", "deep gray matter"),
    **_codes(GENERAL_ANATOMY, "40146001", "Cerebral Grey Matter", "cerebral gray matter", "cortical gray matter",
             "cerebral cortex"),
    **_codes(GENERAL_ANATOMY, "35764002", "Brain ventricle", "ventricles", "brain ventricles",
             "brain ventricle", "ventricles of brain", "ventricular system"),
    **_codes(GENERAL_ANATOMY, "66720007", "Lateral ventricle", "lateral ventricle", "lateral ventricles", lateral=True),
    **_codes(DICOM_MASTER, "49841001", "Third ventricle", "third ventricle"),
    **_codes(GENERAL_ANATOMY, "35918002", "Fourth ventricle", "fourth ventricle"),
    **_codes(DICOM_MASTER, "65216001", "Cerebrospinal Fluid", "csf", "cerebrospinal fluid", "extra axial csf",
             "external csf", lateral=True),
    **_codes(DICOM_MASTER, "113305005", "Cerebellum", "cerebellum"),
    **_codes(DICOM_MASTER, "42695009", "Thalamus", "thalamus", lateral=True),
    **_codes(DICOM_MASTER, "119238007", "Brain stem", "brainstem"),
    **_codes(GENERAL_ANATOMY, "61962009", "Midbrain", "midbrain"),
    **_codes(GENERAL_ANATOMY, "88442005", "Corpus callosum", "corpus callosum"),
    **_codes(GENERAL_ANATOMY, "4958002", "Amygdala", "amygdala", lateral=True),
    **_codes(GENERAL_ANATOMY, "11000004", "Caudate nucleus", "caudate nucleus", "caudate", lateral=True),
    **_codes(GENERAL_ANATOMY, "89278009", "Putamen", "putamen", lateral=True),
    **_codes(GENERAL_ANATOMY, "14738005", "Globus pallidus", "globus pallidus", lateral=True),
}
# Words that name a part of a structure: "hippocampus anterior", "hippocampal head" are the hippocampus, and a
# label named only by a part ("Anterior", as in the Decathlon hippocampus set) is a part of the structure its atlas
# set is named after.
PART_WORDS = frozenset({"anterior", "posterior", "head", "body", "tail", "part", "of", "the"})
SIDES = {"left": "SCT^7771000^Left", "right": "SCT^24028007^Right"}   # laterality modifiers of those lists
_WORD_ALIASES = {"hippocampal": "hippocampus", "grey": "gray"}


def _normalisedName(name: str) -> str:
    """Lower case, parentheses dropped ("ventricles (intra-axial CSF)" -> "ventricles"), separators as spaces,
    "brain stem" as "brainstem", adjectives as their structure ("hippocampal" -> "hippocampus")."""
    text = re.sub(r"\([^)]*\)", " ", name.lower())
    words = [_WORD_ALIASES.get(word, word) for word in re.split(r"[\s_\-/,.]+", text) if word]
    return " ".join(words).replace("brain stem", "brainstem")


def structureCode(labelName: str, atlasSetName: str = "") -> StructureCode | None:
    """The standard type of a label name, or None when it is not a structure of :data:`STRUCTURE_CODES`.

    ``atlasSetName``: the atlas set's name (dataset.json ``name``); a label named only by a part (``Anterior``)
    is that structure when the name is one (``Hippocampus``)."""
    key = _normalisedName(labelName)
    if key in STRUCTURE_CODES:
        return STRUCTURE_CODES[key]
    words = key.split()
    sides = [SIDES[word] for word in words if word in SIDES]
    if len(sides) > 1:
        return None
    words = [word for word in words if word not in SIDES]
    whole = " ".join(word for word in words if word not in PART_WORDS)
    if whole:
        code = STRUCTURE_CODES.get(whole)
    elif words and atlasSetName:   # only part words: a part of the structure the set is named after
        code = structureCode(atlasSetName)
    else:
        code = None
    if code is None or not sides:
        return code
    # a side is kept as the standard modifier; "left ventricle" (the heart's) must not become a brain structure
    return dataclasses.replace(code, modifier=sides[0]) if code.lateral else None


def tagStructures(segmentationNode, atlasSetName: str = "") -> dict[str, StructureCode]:
    """Tag every segment whose name is a known structure with its terminology entry; the others keep what they
    have (Slicer's default). Names and colours come from the atlas labels, so they are marked as not generated
    (Slicer then never renames or recolours them from the terminology). Returns segment name -> code."""
    segmentation = segmentationNode.GetSegmentation()
    tagged = {}
    for k in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(k)
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        code = structureCode(segment.GetName(), atlasSetName)
        if code is not None:
            segment.SetTag(TERMINOLOGY_TAG, code.entry())
            tagged[segment.GetName()] = code
    return tagged


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


def segmentationFromLabelFile(scene, path: Path, colorTable, name: str, gridIjkToRas: np.ndarray | None = None,
                              *, into=None, referenceVolume=None, atlasSetName: str = ""):
    """A segmentation node from a label image: one segment per label present, named and coloured by the table,
    tagged with the standard terminology where the name is a known structure (:func:`tagStructures`).

    ``into``: an existing segmentation node to overwrite instead of creating one named ``name``; it keeps its name
    and place, and is set up exactly as a new node: segments replaced, no parent transform (the result lies on
    the target's world grid), reference geometry the label image's grid, same display. ``referenceVolume``: the
    volume the segmentation was made for (the Segment Editor then offers it as source volume).
    """
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__AtlasSegResult")
    try:
        volumeFromFile(labelmap, path, gridIjkToRas)
        labelmap.CreateDefaultDisplayNodes()
        labelmap.GetDisplayNode().SetAndObserveColorNodeID(colorTable.GetID())
        segmentationNode = into if into is not None else scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentationNode.CreateDefaultDisplayNodes()
        _resetSegmentation(segmentationNode, labelmap, referenceVolume)
        if not segmentationsLogic(scene).ImportLabelmapToSegmentationNode(labelmap, segmentationNode):
            raise EngineError(f"could not import {path.name} as a segmentation")
    finally:
        scene.RemoveNode(labelmap)
    tagStructures(segmentationNode, atlasSetName)
    display = segmentationNode.GetDisplayNode()
    display.SetVisibility(True)
    display.SetOpacity2DFill(0.35)
    display.SetOpacity2DOutline(1.0)
    return segmentationNode


def _resetSegmentation(segmentationNode, labelmap, referenceVolume=None) -> None:
    """Empty a segmentation node and give it the label image's geometry: the same state for a new node and for an
    existing one that is overwritten."""
    import slicer

    segmentationNode.SetAndObserveTransformNodeID(None)
    segmentation = segmentationNode.GetSegmentation()
    segmentation.RemoveAllSegments()
    segmentation.SetSourceRepresentationName(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetIJKToRASMatrix(matrix)
    segmentation.SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
        slicer.vtkSegmentationConverter.SerializeImageGeometry(matrix, labelmap.GetImageData()))
    segmentationNode.SetNodeReferenceID(segmentationNode.GetReferenceImageGeometryReferenceRole(),
                                        referenceVolume.GetID() if referenceVolume is not None else None)


def gridTransformFromFile(scene, path: Path, name: str, gridIjkToRas: np.ndarray | None = None):
    """An ITK displacement field file (LPS mm on its grid: a point x maps to x + u(x), as ITK resamples) as a grid
    transform node whose *transform from parent* does the same in RAS: a moving volume placed under it is
    resampled onto the field's (fixed) grid, and the Transforms module can harden or invert it. Where the field's
    grid is ``gridIjkToRas`` up to NIfTI's float32 rounding, that grid is used exactly."""
    import slicer

    field = sitk.ReadImage(str(path))
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise EngineError(f"{Path(path).name} is not a 3D displacement field")
    displacement = sitk.GetArrayFromImage(field).astype(np.float64)   # (K, J, I, 3), LPS
    displacement[..., :2] *= -1.0                                     # LPS -> RAS
    ijkToRas = ijkToRasFromImage(field)
    if gridIjkToRas is not None and np.abs(ijkToRas - gridIjkToRas).max() < OUTPUT_GRID_TOLERANCE:
        ijkToRas = np.asarray(gridIjkToRas, dtype=float)
    spacing = np.linalg.norm(ijkToRas[:3, :3], axis=0)
    direction = np.eye(4)
    direction[:3, :3] = ijkToRas[:3, :3] / spacing
    grid = vtk.vtkImageData()
    grid.SetOrigin(*ijkToRas[:3, 3])
    grid.SetSpacing(*spacing)
    grid.SetDimensions(*field.GetSize())
    vectors = numpy_support.numpy_to_vtk(displacement.reshape(-1, 3), deep=True, array_type=vtk.VTK_DOUBLE)
    vectors.SetNumberOfComponents(3)
    grid.GetPointData().SetScalars(vectors)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetGridDirectionMatrix(numpyToVtkMatrix(direction))
    transform.SetDisplacementGridData(grid)
    transform.SetInterpolationModeToLinear()
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    node.SetAndObserveTransformFromParent(transform)
    return node


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


# ---------------------------------------------------------------------------------------------- one run's outputs

@dataclass
class RunOutputs:
    """An engine run's output folder on its way into the scene: the record (``run.json``: ``run``, ``labels``,
    ``files``), the target and its exact grid, the run's title, its subject-hierarchy folder and colour table."""

    scene: object
    outputDir: Path
    run: dict
    labels: dict[int, str]
    files: dict[str, Path]
    target: object
    grid: np.ndarray
    title: str
    folder: int
    colorTable: object

    def loadMap(self, key: str, name: str, kind: str, folder: int):
        """The map file ``key`` as a map node "<title> <name>" in ``folder`` (None where the engine wrote none)."""
        if key not in self.files:
            return None
        node = mapNode(self.scene, self.files[key], f"{self.title} {name}", kind, self.target, self.grid)
        placeInFolder(self.scene, node, folder)
        return node

    def loadMetrics(self, result) -> None:
        """With a reference the engine wrote ``metrics.json``: ``result.metrics`` and its table in the folder."""
        if (self.outputDir / "metrics.json").is_file():
            result.metrics = json.loads((self.outputDir / "metrics.json").read_text())
            result.metricsTable = metricsTable(self.scene, result.metrics, f"{self.title} metrics")
            placeInFolder(self.scene, result.metricsTable, self.folder)


def openRunOutputs(scene, outputDir: str | Path, target, title: str,
                   colors: dict[int, tuple[float, float, float]] | None = None) -> RunOutputs:
    """Read a run's record and make its folder (a new subject-hierarchy folder ``title``) and its colour table
    there (``colors`` by label value; the palette's for the others)."""
    outputDir = Path(outputDir)
    run, labels, files = readRunRecord(outputDir)
    grid = worldIjkToRas(target)
    folder = createFolder(scene, title)
    colorTable = newColorTable(scene, f"{title} labels", labels, colors or paletteColors(labels))
    placeInFolder(scene, colorTable, folder)
    return RunOutputs(scene, outputDir, run, labels, files, target, grid, title, folder, colorTable)


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


def showIn3D(segmentationNode, show: bool = True) -> bool:
    """Show a segmentation in the 3D views (its closed-surface representation is made) or remove it from them.
    Returns False when the surface could not be made (no converter: Slicer's Segmentations module not loaded)."""
    display = segmentationNode.GetDisplayNode()
    if not show:
        segmentationNode.RemoveClosedSurfaceRepresentation()
        return True
    if not segmentationNode.CreateClosedSurfaceRepresentation():
        return False
    if display is not None:
        display.SetVisibility3D(True)
        display.SetPreferredDisplayRepresentationName3D("Closed surface")
    return True


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
