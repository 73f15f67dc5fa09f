"""Qt-free logic of the DeepAtlasReg module: fixed and moving nodes -> engine inputs, engine run, outputs -> nodes.

One run is two engine commands, one after the other in the background (an AtlasSegLib ``EngineSequence``):
``python -m atlasseg register --fixed F --moving M [--moving-label L] --model MODEL`` (F_R: the displacement fields,
the warped moving volume and label, the Jacobian determinant) and, unless turned off,
``python -m atlasseg segment --method deepatlas --model MODEL --target F`` (F_S's segmentation of the fixed volume).
With an iterative backend (``--backend torch|greedy``, no model) the run is the registration alone, and the labels
are the moving segmentation's segments, numbered in order.
The outputs become nodes under one subject-hierarchy folder per run: a grid transform (the engine's forward field,
in RAS, as the *transform from parent* that resamples the moving volume onto the fixed one), the warped volume and
segmentation, the Jacobian determinant map with the folding voxels (J <= 0) as a segmentation of their own, and
F_S's segmentation. The user's input nodes are only read. Works on any MRML scene: inside Slicer and headless with
``slicer-core``, which is how the tests run it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AtlasSegLib.engine import DEVICES, EngineError, engineEnvironment, engineRegistry, findEngineRoot
from AtlasSegLib.geometry import GeometryError, volumeNodeToImage, worldIjkToRas
from AtlasSegLib.inputs import segmentLabels, writeReference, writeVolume
from AtlasSegLib.results import (
    createFolder,
    gridTransformFromFile,
    mapNode,
    newColorTable,
    paletteColors,
    placeInFolder,
    segmentationFromLabelFile,
    volumeFromFile,
)
from AtlasSegLib.run import PreparedRun, SegmentationRun
from AtlasSegLib.training import TrainingLogic

from .model import METHOD, DeepAtlasModelProblem, RegistrationModelInfo, readRegistrationModel

LEARNED = "learned"   # the engine's backend for a DeepAtlas model's registration network (its MODEL_BACKENDS)
try:  # the engine's method registry (atlasseg.methods), read without importing torch
    METHODS = engineRegistry().slicer_methods("DeepAtlasReg")   # {"deepatlas": "DeepAtlas"}
    PRESETS = tuple(engineRegistry().REGISTRATION_PRESETS)       # fast, default, accurate, affine
    BACKENDS = (LEARNED, *engineRegistry().BACKENDS)             # learned, then the iterative torch, greedy
except EngineError:  # no engine beside the module: the panel still opens and Apply names the problem
    METHODS, PRESETS, BACKENDS = {}, ("default",), (LEARNED,)
TITLE = METHODS.get(METHOD, "DeepAtlas")
ITERATIVE_TITLE = "Iterative registration ({backend})"   # the results folder's title without a model
REGISTRATION, SEGMENTATION = "registration", "segmentation"   # the run's two output folders
FOLDING_COLOR = (1.0, 0.0, 1.0)   # magenta: apart from the Jacobian map's colours and the label palette


@dataclass
class DeepAtlasSettings:
    modelFolder: str = ""         # the learned backend's model; unused by the iterative ones
    preset: str = "default"       # learned backend: fast/default (one pass), accurate (+50 steps), affine (alone)
    iterations: int = -1          # learned backend: steps of test-time optimisation; -1: the preset's
    device: str = "auto"          # auto, cpu or gpu
    segmentFixed: bool = True     # learned backend: also segment the fixed volume with F_S
    backend: str = LEARNED        # learned (the model's F_R) or an engine iterative backend (torch, greedy)

    @property
    def learned(self) -> bool:
        return self.backend == LEARNED


@dataclass
class DeepAtlasInputs:
    fixedVolume: object                    # vtkMRMLScalarVolumeNode
    movingVolume: object                   # vtkMRMLScalarVolumeNode
    movingSegmentation: object = None      # vtkMRMLSegmentationNode or vtkMRMLLabelMapVolumeNode, on the moving

    @property
    def targetVolume(self):
        """The volume the results lie on (the shared Apply part shows it as background)."""
        return self.fixedVolume


@dataclass
class DeepAtlasResultNodes:
    folderItemID: int
    transform: object                     # vtkMRMLGridTransformNode: moving -> fixed
    warpedVolume: object
    jacobian: object                      # scalar map of the forward field's Jacobian determinant, fixed grid
    colorTable: object
    warpedSegmentation: object = None     # the moving segmentation on the fixed grid (when one was given)
    folding: object = None                # segmentation of the voxels where J <= 0 (None: no folding)
    fixedSegmentation: object = None      # F_S's segmentation of the fixed volume (when asked)
    jacobianStats: dict = field(default_factory=dict)   # folding_percent, log_jacobian_sd, min, max
    run: dict = field(default_factory=dict)             # registration and segmentation run.json, total time
    metrics: dict | None = None           # the shared Apply part's fields: no reference, no metrics here
    metricsTable: object = None
    agreement: object = None

    def maps(self) -> list:
        return [self.jacobian]


class DeepAtlasRun(SegmentationRun):
    """One registration (and F_S segmentation) in the background: poll for progress, cancel, load the results."""


class DeepAtlasLogic(TrainingLogic):
    """Converts nodes to engine inputs, registers (and segments) with a DeepAtlas model in a background process,
    loads the outputs as nodes; and trains DeepAtlas models from the panel
    (:class:`AtlasSegLib.training.TrainingLogic`).

    ``python`` and ``processFactory``: see :class:`AtlasSegLib.run.EngineLogic`.
    """

    trainingModule = "DeepAtlasReg"
    runClass = DeepAtlasRun

    # ------------------------------------------------------------------ validation
    def inputProblems(self, inputs: DeepAtlasInputs, settings: DeepAtlasSettings) -> list[str]:
        """Readable reasons why a run cannot start (empty when it can), the model folder's first. An iterative
        backend needs no model; whether it is installed (greedy) the engine checks and reports."""
        problems, model = [], None
        if settings.backend not in BACKENDS:
            problems.append(f"Unknown registration backend '{settings.backend}' (choose {', '.join(BACKENDS)}).")
        elif settings.learned:
            try:
                model = readRegistrationModel(settings.modelFolder)
            except DeepAtlasModelProblem as problem:
                problems.append(str(problem))
        if inputs.fixedVolume is None:
            problems.append("Select a fixed volume.")
        if inputs.movingVolume is None:
            problems.append("Select a moving volume.")
        if model is not None and len(model.modalities) != 1:
            problems.append(f"The model takes {len(model.modalities)} images per volume "
                            f"({', '.join(model.modalities)}); this panel registers one.")
        if settings.preset not in PRESETS:
            problems.append(f"Unknown preset '{settings.preset}' (choose {', '.join(PRESETS)}).")
        if settings.device not in DEVICES:
            problems.append(f"Unknown device '{settings.device}' (choose {', '.join(DEVICES)}).")
        return problems

    # ------------------------------------------------------------------ inputs -> engine
    def prepareRun(self, inputs: DeepAtlasInputs, settings: DeepAtlasSettings, workDir: str | Path) -> PreparedRun:
        """Write the inputs into ``workDir`` and build the engine commands (nothing is run)."""
        problems = self.inputProblems(inputs, settings)
        if problems:
            raise EngineError(" ".join(problems))
        model = readRegistrationModel(settings.modelFolder) if settings.learned else None
        labels, colors = self.runLabels(inputs, settings)
        work = Path(workDir)
        work.mkdir(parents=True, exist_ok=True)
        try:
            fixed = writeVolume(inputs.fixedVolume, work / "fixed_0000.nii.gz")
            moving = writeVolume(inputs.movingVolume, work / "moving_0000.nii.gz")
            label = None
            if inputs.movingSegmentation is not None:
                label = writeReference(self.scene, inputs.movingSegmentation, inputs.movingVolume, labels,
                                       work / "moving_label.nii.gz")
        except GeometryError as error:
            raise EngineError(str(error)) from None
        output = work / "output"
        message = "registering with F_R" if model is not None else f"registering with the {settings.backend} backend"
        steps = [(message, self._registerCommand(model, settings, fixed, moving, label, output / REGISTRATION))]
        if model is not None and settings.segmentFixed:   # F_S is part of a model: no such step without one
            steps.append(("segmenting the fixed volume with F_S", self._segmentCommand(
                model, settings, fixed, output / SEGMENTATION)))
        output.mkdir(exist_ok=True)
        return PreparedRun(steps[0][1], engineEnvironment(findEngineRoot()), work, output, labels, colors, steps)

    def runLabels(self, inputs: DeepAtlasInputs, settings: DeepAtlasSettings
                  ) -> tuple[dict[int, str], dict[int, tuple[float, float, float]]]:
        """The run's labels (value -> name, background included) and their colours: a model's own labels; without
        one, the moving segmentation's segments numbered in order (their colours kept), or a labelmap volume's
        values as they are."""
        if settings.learned:
            labels = readRegistrationModel(settings.modelFolder).labels
            return labels, paletteColors(labels)
        segmentation = inputs.movingSegmentation
        if segmentation is None:
            return {0: "background"}, {}
        if segmentation.IsA("vtkMRMLSegmentationNode"):
            # Deep Label Fusion numbers its scene atlases' segments the same way: one rule for both modules
            return segmentLabels([segmentation])
        labels = _labelmapLabels(segmentation)
        return labels, paletteColors(labels)

    def _registerCommand(self, model: RegistrationModelInfo | None, settings: DeepAtlasSettings, fixed: Path,
                         moving: Path, label: Path | None, output: Path) -> list[str]:
        command = [self.python, "-m", "atlasseg", "register", "--fixed", str(fixed), "--moving", str(moving),
                   "--output", str(output), "--preset", settings.preset, "--device", DEVICES[settings.device]]
        command += ["--moving-label", str(label)] if label is not None else []
        if model is None:   # the engine refuses --model and --iterations with an iterative backend
            return command + ["--backend", settings.backend]
        command += ["--model", str(model.folder)]
        return command + (["--iterations", str(settings.iterations)] if settings.iterations >= 0 else [])

    def _segmentCommand(self, model: RegistrationModelInfo, settings: DeepAtlasSettings, fixed: Path,
                        output: Path) -> list[str]:
        return [self.python, "-m", "atlasseg", "segment", "--method", METHOD, "--model", str(model.folder),
                "--target", str(fixed), "--output", str(output), "--device", DEVICES[settings.device]]

    # ------------------------------------------------------------------ engine outputs -> nodes
    def loadResults(self, outputDir: str | Path, inputs: DeepAtlasInputs, settings: DeepAtlasSettings,
                    colors: dict[int, tuple[float, float, float]] | None = None) -> DeepAtlasResultNodes:
        """The engine's output folder -> nodes under a new subject-hierarchy folder, all on the fixed volume's
        exact world grid."""
        outputDir = Path(outputDir)
        registration = outputDir / REGISTRATION
        run = {REGISTRATION: json.loads((registration / "run.json").read_text())}
        labels, ownColors = self.runLabels(inputs, settings)
        fixed, moving = inputs.fixedVolume, inputs.movingVolume
        grid = worldIjkToRas(fixed)
        method = TITLE if settings.learned else ITERATIVE_TITLE.format(backend=settings.backend)
        title = f"{method} - {moving.GetName()} to {fixed.GetName()}"
        folder = createFolder(self.scene, title)
        colorTable = newColorTable(self.scene, f"{title} labels", labels, colors or ownColors)
        placeInFolder(self.scene, colorTable, folder)

        transform = gridTransformFromFile(self.scene, registration / "transform_forward.nii.gz",
                                          f"{title} transform", grid)
        warped = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{title} warped {moving.GetName()}")
        volumeFromFile(warped, registration / "warped_moving.nii.gz", grid)
        warped.CreateDefaultDisplayNodes()
        jacobian = mapNode(self.scene, registration / "jacobian_determinant.nii.gz", f"{title} Jacobian determinant",
                           "jacobian", fixed, grid)
        result = DeepAtlasResultNodes(folder, transform, warped, jacobian, colorTable,
                                      jacobianStats=dict(run[REGISTRATION].get("jacobian") or {}))
        if (registration / "warped_label.nii.gz").is_file():
            result.warpedSegmentation = segmentationFromLabelFile(
                self.scene, registration / "warped_label.nii.gz", colorTable, f"{title} warped segmentation", grid,
                referenceVolume=fixed)
        result.folding = self._folding(registration / "jacobian_determinant.nii.gz", outputDir, f"{title} folding",
                                       grid, fixed)
        if (outputDir / SEGMENTATION / "run.json").is_file():
            run[SEGMENTATION] = json.loads((outputDir / SEGMENTATION / "run.json").read_text())
            result.fixedSegmentation = segmentationFromLabelFile(
                self.scene, outputDir / SEGMENTATION / "segmentation.nii.gz", colorTable,
                f"{title} F_S segmentation of {fixed.GetName()}", grid, referenceVolume=fixed)
            result.fixedSegmentation.GetDisplayNode().SetVisibility(False)   # the warped one is shown first
        for node in (transform, warped, jacobian, result.warpedSegmentation, result.folding, result.fixedSegmentation):
            if node is not None:
                placeInFolder(self.scene, node, folder)
        total = sum(float((record.get("timings_s") or {}).get("total", 0.0)) for record in run.values())
        result.run = {**run, "timings_s": {"total": total}}
        return result

    def _folding(self, jacobianPath: Path, outputDir: Path, name: str, grid: np.ndarray, fixed):
        """The voxels where the forward map folds (J <= 0) as a one-segment segmentation; None when there are
        none."""
        jacobian = sitk.ReadImage(str(jacobianPath))
        mask = sitk.Cast(sitk.LessEqual(jacobian, 0.0), sitk.sitkUInt8)
        if not np.any(sitk.GetArrayViewFromImage(mask)):
            return None
        path = outputDir / "folding.nii.gz"
        sitk.WriteImage(mask, str(path), True)
        colors = newColorTable(self.scene, "__AtlasSegFoldingColors", {0: "background", 1: "folding (J <= 0)"},
                               {1: FOLDING_COLOR})
        try:
            node = segmentationFromLabelFile(self.scene, path, colors, name, grid, referenceVolume=fixed)
        finally:
            self.scene.RemoveNode(colors)
        node.GetDisplayNode().SetOpacity2DFill(0.8)
        return node

    def showJacobian(self, result: DeepAtlasResultNodes, opacity: float | None = None) -> None:
        """The Jacobian determinant over the fixed volume in every slice view (folding stays on top)."""
        self.showMap(result.jacobian, opacity=opacity)


def _labelmapLabels(labelmapNode) -> dict[int, str]:
    """A labelmap volume's values present, named by its colour table when it has one ("label N" otherwise)."""
    values = np.unique(sitk.GetArrayFromImage(volumeNodeToImage(labelmapNode)))   # a view would outlive its image
    display = labelmapNode.GetDisplayNode()
    colorNode = display.GetColorNode() if display is not None else None
    names = {int(v): (colorNode.GetColorName(int(v)) if colorNode is not None else "") or f"label {int(v)}"
             for v in values if v > 0}
    return {0: "background", **names}
