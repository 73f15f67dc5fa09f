"""Qt-free logic of the DeepLabelFusion module: MRML nodes -> engine inputs, engine run, outputs -> nodes.

Works on any MRML scene: inside Slicer (``slicer.mrmlScene``) and headless with the ``slicer-core`` wheel,
which is how the tests run it. The user's input nodes are only read; every node this logic creates goes
under one subject-hierarchy folder per run.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import vtk

from .engine import (
    EngineCancelled,
    EngineError,
    EngineProcess,
    ProgressEvent,
    engineEnvironment,
    engineRegistry,
    findEngineRoot,
    pythonExecutable,
    readableEngineError,
)
from .geometry import (
    GeometryError,
    numpyToVtkMatrix,
    updateVolumeNodeFromImage,
    volumeNodeToImage,
    vtkMatrixToNumpy,
    worldIjkToRas,
)

try:  # the engine's method registry (atlasseg.methods), read without importing torch
    REGISTRY = engineRegistry()
    METHODS = REGISTRY.slicer_methods("DeepLabelFusion")  # engine name -> label shown to the user
    BACKENDS = tuple(REGISTRY.BACKENDS)
    PRESETS = tuple(REGISTRY.REGISTRATION_PRESETS)
except EngineError:  # no engine beside the module: the panel still opens and Apply names the problem
    REGISTRY, METHODS, BACKENDS, PRESETS = None, {}, (), ()
DEVICES = {"auto": "auto", "cpu": "cpu", "gpu": "cuda"}

# Distinct, colour-blind-friendly segment colours (Okabe-Ito, then Tableau) for atlas sets read from disk.
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
    "weights": MapStyle("vtkMRMLColorTableNodeIron", "Iron", None),
    "agreement": MapStyle("vtkMRMLColorTableNodeRainbow", "Rainbow", (0.0, 1.0)),
    "oracle": MapStyle("vtkMRMLColorTableNodeRed", "Red", (0.0, 1.0), (0.0, 0.5), 0.7),  # shows the uncovered voxels
}
MAP_KIND_ATTRIBUTE = "AtlasSeg.MapKind"
OUTPUT_GRID_TOLERANCE = 1e-3   # mm; NIfTI stores the grid in float32
TARGET_REFERENCE_ROLE = "AtlasSegTarget"
METRIC_COLUMNS = (("dice", "Dice"), ("jaccard", "Jaccard"), ("hd95", "HD95 (mm)"), ("assd", "ASSD (mm)"),
                  ("sensitivity", "Sensitivity"), ("precision", "Precision"))


@dataclass
class FusionSettings:
    method: str = "jlf"
    nAtlases: int = 10
    backend: str = "torch"
    preset: str = "default"
    device: str = "auto"           # auto, cpu or gpu
    modelFolder: str = ""          # Deep Label Fusion only
    jlfAlpha: float = 0.1
    jlfBeta: float = 2.0
    jlfPatchRadius: int = 2
    jlfSearchRadius: int = 3
    seed: int = 0


@dataclass
class FusionInputs:
    targetVolume: object                                   # vtkMRMLScalarVolumeNode
    extraModalities: list = field(default_factory=list)    # more vtkMRMLScalarVolumeNode, same grid
    atlasFolder: str = ""                                  # a Decathlon folder with dataset.json, or
    atlasPairs: list = field(default_factory=list)         # [(vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode)]
    referenceSegmentation: object = None                   # vtkMRMLSegmentationNode or vtkMRMLLabelMapVolumeNode


@dataclass
class FusionResultNodes:
    folderItemID: int
    segmentation: object
    colorTable: object
    voteMaps: dict = field(default_factory=dict)     # label name -> vtkMRMLScalarVolumeNode
    weightMaps: dict = field(default_factory=dict)   # atlas id -> vtkMRMLScalarVolumeNode
    agreement: object = None
    oracle: object = None
    metricsTable: object = None
    metrics: dict | None = None
    initialSegmentation: object = None               # Deep Label Fusion only
    run: dict = field(default_factory=dict)          # the engine's run.json

    def maps(self) -> list:
        return [*self.voteMaps.values(), *self.weightMaps.values(), *(n for n in (self.agreement, self.oracle) if n)]


@dataclass
class PreparedRun:
    command: list[str]
    environment: dict[str, str]
    workDir: Path
    outputDir: Path
    labels: dict[int, str]
    colors: dict[int, tuple[float, float, float]]


class FusionLogic:
    """Converts nodes to engine inputs, runs the engine in a background process, loads its outputs as nodes.

    ``processFactory(command, env)`` starts the engine and returns an object with ``progressEvents()``,
    ``returnCode()``, ``cancel()``, ``stderrLines`` and ``cancelled`` (default: :class:`EngineProcess`);
    ``python`` is the interpreter that runs the engine (default: PythonSlicer inside Slicer).
    """

    def __init__(self, scene, python: str | None = None,
                 processFactory: Callable[[list[str], dict], EngineProcess] | None = None):
        self.scene = scene
        self.python = python or pythonExecutable()
        self.processFactory = processFactory or (lambda command, env: EngineProcess(command, env))
        self._targetGrid = None   # world IJK-to-RAS of the target whose results are being loaded

    # ------------------------------------------------------------------ validation
    def inputProblems(self, inputs: FusionInputs, settings: FusionSettings) -> list[str]:
        """Readable reasons why a run cannot start (empty when it can)."""
        problems = []
        if inputs.targetVolume is None:
            problems.append("Select a target volume.")
        if inputs.atlasFolder and inputs.atlasPairs:
            problems.append("Use either an atlas folder or atlas pairs from the scene, not both.")
        elif inputs.atlasFolder:
            if not (Path(inputs.atlasFolder) / "dataset.json").is_file():
                problems.append(f"No dataset.json in the atlas folder {inputs.atlasFolder}.")
        elif not inputs.atlasPairs:
            problems.append("Choose an atlas folder or add atlas image + segmentation pairs.")
        for image, segmentation in inputs.atlasPairs:
            if image is None or segmentation is None:
                problems.append("Every atlas pair needs an image and a segmentation.")
        if inputs.atlasPairs and inputs.extraModalities:
            problems.append("Atlas pairs from the scene have one modality; use an atlas folder for several.")
        if settings.method not in METHODS:
            problems.append(f"Unknown fusion method '{settings.method}'.")
        if settings.method == "dlf" and not (settings.modelFolder and Path(settings.modelFolder).is_dir()):
            problems.append("Deep Label Fusion needs a model folder.")
        if settings.nAtlases < 1:
            problems.append("Use at least one atlas.")
        return problems

    # ------------------------------------------------------------------ inputs -> engine
    def prepareRun(self, inputs: FusionInputs, settings: FusionSettings, workDir: str | Path) -> PreparedRun:
        """Write the inputs into ``workDir`` and build the engine command (nothing is run)."""
        problems = self.inputProblems(inputs, settings)
        if problems:
            raise EngineError(" ".join(problems))
        work = Path(workDir)
        work.mkdir(parents=True, exist_ok=True)
        try:
            targets = [self._writeVolume(node, work / f"target_{k:04d}.nii.gz")
                       for k, node in enumerate([inputs.targetVolume, *inputs.extraModalities])]
            if inputs.atlasFolder:
                atlasDir = Path(inputs.atlasFolder)
                labels = readAtlasFolderLabels(atlasDir)
                colors = {value: PALETTE[(value - 1) % len(PALETTE)] for value in labels if value}
            else:
                atlasDir, labels, colors = self._writeSceneAtlases(inputs.atlasPairs, work / "atlases")
            reference = None
            if inputs.referenceSegmentation is not None:
                reference = self._writeReference(inputs.referenceSegmentation, inputs.targetVolume, labels,
                                                 work / "reference.nii.gz")
        except GeometryError as error:
            raise EngineError(str(error)) from None
        output = work / "output"
        command = [self.python, "-m", "atlasseg", "segment", "--target", *map(str, targets),
                   "--atlases", str(atlasDir), "--output", str(output), "--method", settings.method,
                   "--n-atlases", str(settings.nAtlases), "--backend", settings.backend, "--preset", settings.preset,
                   "--device", DEVICES.get(settings.device, settings.device), "--seed", str(settings.seed), "--maps"]
        if settings.method == "jlf":
            command += ["--jlf-alpha", repr(settings.jlfAlpha), "--jlf-beta", repr(settings.jlfBeta),
                        "--jlf-patch-radius", str(settings.jlfPatchRadius),
                        "--jlf-search-radius", str(settings.jlfSearchRadius)]
        if settings.method == "dlf":
            command += ["--model", str(settings.modelFolder)]
        if reference is not None:
            command += ["--reference", str(reference)]
        return PreparedRun(command, engineEnvironment(findEngineRoot()), work, output, labels, colors)

    def _writeVolume(self, volumeNode, path: Path) -> Path:
        sitk.WriteImage(volumeNodeToImage(volumeNode), str(path), True)
        return path

    def _writeSceneAtlases(self, pairs: Sequence, folder: Path):
        """Atlas (image, segmentation) node pairs -> a Decathlon folder; labels named after the segments."""
        names: list[str] = []
        colors: dict[int, tuple[float, float, float]] = {}
        for _, segmentationNode in pairs:
            segmentation = segmentationNode.GetSegmentation()
            for k in range(segmentation.GetNumberOfSegments()):
                segment = segmentation.GetNthSegment(k)
                if segment.GetName() not in names:
                    names.append(segment.GetName())
                    colors[len(names)] = tuple(segment.GetColor())
        labels = {0: "background", **{k + 1: name for k, name in enumerate(names)}}
        colorTable = self._newColorTable("AtlasSeg scene atlas labels", labels, colors)
        (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
        (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
        training, used = [], set()
        try:
            for imageNode, segmentationNode in pairs:
                caseId = _uniqueName(_safeName(imageNode.GetName()), used)
                self._writeVolume(imageNode, folder / "imagesTr" / f"{caseId}.nii.gz")
                labelImage = self._segmentationToLabelImage(segmentationNode, imageNode, colorTable)
                sitk.WriteImage(labelImage, str(folder / "labelsTr" / f"{caseId}.nii.gz"), True)
                training.append({"image": f"./imagesTr/{caseId}.nii.gz", "label": f"./labelsTr/{caseId}.nii.gz"})
        finally:
            self.scene.RemoveNode(colorTable)
        dataset = {"name": "Scene atlases", "modality": {"0": "image"},
                   "labels": {str(v): n for v, n in labels.items()}, "numTraining": len(training),
                   "training": training}
        (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
        return folder, labels, colors

    def _writeReference(self, referenceNode, targetNode, labels: dict[int, str], path: Path) -> Path:
        if referenceNode.IsA("vtkMRMLSegmentationNode"):
            colorTable = self._newColorTable("AtlasSeg reference labels", labels, {})
            try:
                image = self._segmentationToLabelImage(referenceNode, targetNode, colorTable)
            finally:
                self.scene.RemoveNode(colorTable)
        else:  # a labelmap volume: values are used as they are
            image = volumeNodeToImage(referenceNode)
        sitk.WriteImage(image, str(path), True)
        return path

    def _segmentationToLabelImage(self, segmentationNode, referenceVolume, colorTable) -> sitk.Image:
        """Segments -> label image on ``referenceVolume``'s grid, values looked up by segment name.

        Works on a copy so that the user's segmentation never gains representations or changes.
        """
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
        copy = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "__AtlasSegCopy")
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__AtlasSegLabels")
        try:
            copy.GetSegmentation().DeepCopy(segmentation)
            if segmentationNode.GetParentTransformNode() is not None:
                copy.SetAndObserveTransformNodeID(segmentationNode.GetParentTransformNode().GetID())
            logic = _segmentationsLogic(self.scene)
            if segmentIds.GetNumberOfValues() and not logic.ExportSegmentsToLabelmapNode(
                    copy, segmentIds, labelmap, referenceVolume, _extentReferenceGeometry(), colorTable):
                raise EngineError(f"could not convert '{segmentationNode.GetName()}' to a label image")
            if referenceVolume.GetParentTransformNode() is not None:
                labelmap.SetAndObserveTransformNodeID(referenceVolume.GetParentTransformNode().GetID())
            if labelmap.GetImageData() is None:  # no segments: an empty label image on the reference grid
                image = sitk.Image(volumeNodeToImage(referenceVolume).GetSize(), sitk.sitkUInt8)
                image.CopyInformation(volumeNodeToImage(referenceVolume))
                return image
            image = volumeNodeToImage(labelmap)
            return sitk.Cast(image, sitk.sitkUInt16 if max(colorTable.GetNumberOfColors(), 1) > 255 else sitk.sitkUInt8)
        finally:
            display = labelmap.GetDisplayNode()
            createdColors = display.GetColorNode() if display is not None else None
            if createdColors is not None and (createdColors.GetName() or "").startswith("__AtlasSeg"):
                # a colour table the export made for the temporary copy (never one of Slicer's defaults)
                self.scene.RemoveNode(createdColors)
            self.scene.RemoveNode(labelmap)
            self.scene.RemoveNode(copy)

    # ------------------------------------------------------------------ running
    def startRun(self, inputs: FusionInputs, settings: FusionSettings, workDir: str | Path | None = None) -> FusionRun:
        """Write the inputs and start the engine in the background; poll the returned run."""
        ownsWorkDir = workDir is None
        work = Path(tempfile.mkdtemp(prefix="AtlasSeg-")) if ownsWorkDir else Path(workDir)
        try:
            prepared = self.prepareRun(inputs, settings, work)
            process = self.processFactory(prepared.command, prepared.environment)
        except BaseException:
            if ownsWorkDir:
                shutil.rmtree(work, ignore_errors=True)
            raise
        return FusionRun(self, inputs, settings, prepared, process, ownsWorkDir)

    def runBlocking(self, inputs: FusionInputs, settings: FusionSettings,
                    onProgress: Callable[[float, str], None] | None = None, workDir: str | Path | None = None,
                    pollSeconds: float = 0.1) -> FusionResultNodes:
        """Run and wait (Python console, tests): same work as the GUI's background run."""
        import time

        run = self.startRun(inputs, settings, workDir)
        while run.isRunning():
            time.sleep(pollSeconds)
            for event in run.poll():
                if onProgress:
                    onProgress(event.fraction, event.message)
        for event in run.poll():
            if onProgress:
                onProgress(event.fraction, event.message)
        return run.finish()

    # ------------------------------------------------------------------ engine outputs -> nodes
    def loadResults(self, outputDir: str | Path, inputs: FusionInputs, settings: FusionSettings,
                    colors: dict[int, tuple[float, float, float]] | None = None) -> FusionResultNodes:
        """The engine's output folder -> nodes under a new subject-hierarchy folder."""
        output = Path(outputDir)
        run = json.loads((output / "run.json").read_text())
        labels = {int(v): name for v, name in run["labels"].items()}
        colors = colors or {v: PALETTE[(v - 1) % len(PALETTE)] for v in labels if v}
        target = inputs.targetVolume
        self._targetGrid = worldIjkToRas(target)
        title = f"{METHODS.get(settings.method, settings.method)} - {target.GetName()}"
        sh = self.scene.GetSubjectHierarchyNode()
        folder = sh.CreateFolderItem(sh.GetSceneItemID(), self.scene.GenerateUniqueName(title))
        colorTable = self._newColorTable(f"{title} labels", labels, colors)
        self._placeInFolder(colorTable, folder)
        segmentationNode = self._segmentationNodeFromLabelFile(output / "segmentation.nii.gz", colorTable,
                                                               f"{title} segmentation")
        self._placeInFolder(segmentationNode, folder)
        result = FusionResultNodes(folder, segmentationNode, colorTable, run=run)
        files = {key: Path(path) for key, path in run.get("files", {}).items()}
        if "initial_segmentation" in files:  # Deep Label Fusion: the weighted-voting stage before fine-tuning
            result.initialSegmentation = self._segmentationNodeFromLabelFile(
                files["initial_segmentation"], colorTable, f"{title} initial segmentation")
            result.initialSegmentation.GetDisplayNode().SetVisibility(False)
            self._placeInFolder(result.initialSegmentation, folder)
        votesFolder = sh.CreateFolderItem(folder, "Vote maps")
        for value, name in labels.items():
            if f"votes_{value}" in files:
                node = self._mapNode(files[f"votes_{value}"], f"{title} votes {name}", "votes", target)
                self._placeInFolder(node, votesFolder)
                result.voteMaps[name] = node
        weightKeys = [key for key in files if key.startswith("weights_")]
        if weightKeys:
            weightsFolder = sh.CreateFolderItem(folder, "Weight maps")
            for key in weightKeys:
                atlasId = key[len("weights_"):]
                node = self._mapNode(files[key], f"{title} weights {atlasId}", "weights", target)
                self._placeInFolder(node, weightsFolder)
                result.weightMaps[atlasId] = node
        if "agreement" in files:
            result.agreement = self._mapNode(files["agreement"], f"{title} atlas agreement", "agreement", target)
            self._placeInFolder(result.agreement, folder)
        if "oracle" in files:
            result.oracle = self._mapNode(files["oracle"], f"{title} oracle coverage", "oracle", target)
            self._placeInFolder(result.oracle, folder)
        if (output / "metrics.json").is_file():
            result.metrics = json.loads((output / "metrics.json").read_text())
            result.metricsTable = self._metricsTable(result.metrics, f"{title} metrics")
            self._placeInFolder(result.metricsTable, folder)
        return result

    def _segmentationNodeFromLabelFile(self, path: Path, colorTable, name: str):
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__AtlasSegResult")
        try:
            _volumeFromFile(labelmap, path, self._targetGrid)
            labelmap.CreateDefaultDisplayNodes()
            labelmap.GetDisplayNode().SetAndObserveColorNodeID(colorTable.GetID())
            segmentationNode = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            segmentationNode.CreateDefaultDisplayNodes()
            if not _segmentationsLogic(self.scene).ImportLabelmapToSegmentationNode(labelmap, segmentationNode):
                raise EngineError(f"could not import {path.name} as a segmentation")
        finally:
            self.scene.RemoveNode(labelmap)
        display = segmentationNode.GetDisplayNode()
        display.SetOpacity2DFill(0.35)
        display.SetOpacity2DOutline(1.0)
        return segmentationNode

    def _mapNode(self, path: Path, name: str, kind: str, targetNode):
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        _volumeFromFile(node, path, self._targetGrid)
        node.SetAttribute(MAP_KIND_ATTRIBUTE, kind)
        node.SetNodeReferenceID(TARGET_REFERENCE_ROLE, targetNode.GetID())
        node.CreateDefaultDisplayNodes()
        style = MAP_STYLES[kind]
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID(self._colorNodeID(style))
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
        return node

    def _colorNodeID(self, style: MapStyle) -> str:
        """Slicer's default colour node, or (scene without default colours) an equivalent table."""
        if self.scene.GetNodeByID(style.colorNodeID) is not None:
            return style.colorNodeID
        name = f"AtlasSeg {style.fallbackType}"
        existing = self.scene.GetFirstNodeByName(name)
        if existing is not None:
            return existing.GetID()
        colorNode = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
        getattr(colorNode, f"SetTypeTo{style.fallbackType}")()
        return colorNode.GetID()

    def _newColorTable(self, name: str, labels: dict[int, str], colors: dict[int, tuple]):
        colorTable = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
        colorTable.SetTypeToUser()
        colorTable.SetNumberOfColors(max(labels) + 1)
        colorTable.SetAttribute("Category", "AtlasSeg")
        for value in range(max(labels) + 1):
            if value in labels:
                r, g, b = (0.0, 0.0, 0.0) if value == 0 else colors.get(value, PALETTE[(value - 1) % len(PALETTE)])
                colorTable.SetColor(value, labels[value], r, g, b, 0.0 if value == 0 else 1.0)
            else:
                colorTable.SetColor(value, "", 0.0, 0.0, 0.0, 0.0)
        return colorTable

    def _metricsTable(self, metrics: dict, name: str):
        table = self.scene.AddNewNodeByClass("vtkMRMLTableNode", name)
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

    def _placeInFolder(self, node, folderItemID: int) -> None:
        sh = self.scene.GetSubjectHierarchyNode()
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, folderItemID)
        else:  # scenes without the subject hierarchy plugins (slicer-core) do not create items themselves
            sh.CreateItem(folderItemID, node)

    # ------------------------------------------------------------------ display
    @staticmethod
    def mapStyle(mapNode) -> MapStyle:
        return MAP_STYLES.get(mapNode.GetAttribute(MAP_KIND_ATTRIBUTE) or "", MAP_STYLES["votes"])

    def showMap(self, mapNode, targetNode=None, opacity: float | None = None) -> None:
        """Show a result map as a coloured foreground over its target in every slice view."""
        targetNode = targetNode or mapNode.GetNodeReference(TARGET_REFERENCE_ROLE)
        style = self.mapStyle(mapNode)
        for k in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = self.scene.GetNthNodeByClass(k, "vtkMRMLSliceCompositeNode")
            if targetNode is not None:
                composite.SetBackgroundVolumeID(targetNode.GetID())
            composite.SetForegroundVolumeID(mapNode.GetID())
            composite.SetForegroundOpacity(style.opacity if opacity is None else opacity)


class FusionRun:
    """One engine run in the background: poll for progress, cancel, then load the results."""

    def __init__(self, logic: FusionLogic, inputs: FusionInputs, settings: FusionSettings, prepared: PreparedRun,
                 process, ownsWorkDir: bool):
        self.logic, self.inputs, self.settings, self.prepared = logic, inputs, settings, prepared
        self.process = process
        self.ownsWorkDir = ownsWorkDir
        self.lastProgress = ProgressEvent(0.0, "starting the engine")

    def isRunning(self) -> bool:
        return self.process.returnCode() is None

    def poll(self) -> list[ProgressEvent]:
        events = self.process.progressEvents()
        if events:
            self.lastProgress = events[-1]
        return events

    def cancel(self) -> None:
        self.process.cancel()
        self._cleanUp()

    def finish(self) -> FusionResultNodes:
        """After the process ended: the result nodes, or EngineError / EngineCancelled with a readable message."""
        code = self.process.returnCode()
        try:
            if code is None:
                raise EngineError("the engine is still running")
            if self.process.cancelled:
                raise EngineCancelled("cancelled")
            if code != 0:
                raise EngineError(readableEngineError(code, list(self.process.stderrLines)))
            return self.logic.loadResults(self.prepared.outputDir, self.inputs, self.settings, self.prepared.colors)
        finally:
            if code is not None:
                self._cleanUp()

    @property
    def log(self) -> str:
        return "\n".join(list(self.process.stderrLines))

    def _cleanUp(self) -> None:
        if self.ownsWorkDir:
            shutil.rmtree(self.prepared.workDir, ignore_errors=True)


def readAtlasFolderLabels(folder: Path) -> dict[int, str]:
    """Label value -> name from a Decathlon (``{"1": "name"}``) or nnU-Net v2 (``{"name": 1}``) dataset.json."""
    path = Path(folder) / "dataset.json"
    try:
        raw = json.loads(path.read_text())["labels"]
        if all(str(k).lstrip("-").isdigit() for k in raw):
            labels = {int(k): str(v) for k, v in raw.items()}
        else:
            labels = {int(v): str(k) for k, v in raw.items()}
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise EngineError(f"{path}: cannot read the labels ({error})") from None
    labels.setdefault(0, "background")
    return labels


def _volumeFromFile(volumeNode, path: Path, gridIjkToRas: np.ndarray | None = None) -> None:
    """Load an engine output; where it lies on ``gridIjkToRas`` up to NIfTI's float32 rounding, use that grid
    exactly, so results overlay the target voxel for voxel."""
    updateVolumeNodeFromImage(volumeNode, sitk.ReadImage(str(path)))
    if gridIjkToRas is not None:
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        if np.abs(vtkMatrixToNumpy(matrix) - gridIjkToRas).max() < OUTPUT_GRID_TOLERANCE:
            volumeNode.SetIJKToRASMatrix(numpyToVtkMatrix(gridIjkToRas))


def _segmentationsLogic(scene):
    import slicer

    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    return logic


def _extentReferenceGeometry() -> int:
    import slicer

    return slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY


def _safeName(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "atlas"


def _uniqueName(name: str, used: set[str]) -> str:
    candidate, k = name, 1
    while candidate in used:
        k += 1
        candidate = f"{name}_{k}"
    used.add(candidate)
    return candidate
