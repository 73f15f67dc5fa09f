"""Qt-free logic of the AtlasNetSeg module: target nodes -> engine inputs, engine run, outputs -> nodes.

The engine command is ``python -m atlasseg segment --method atlasnet --model MODEL --target ... --maps``: the
model folder holds the networks and their atlases. Works on any MRML scene: inside Slicer and headless with the
``slicer-core`` wheel, which is how the tests run it. The user's input nodes are only read; every node this
logic creates goes under one subject-hierarchy folder per run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AtlasSegLib.engine import DEVICES, EngineError, engineEnvironment, engineRegistry, findEngineRoot
from AtlasSegLib.geometry import GeometryError
from AtlasSegLib.inputs import writeReference, writeVolume
from AtlasSegLib.results import (
    RunOutputs,
    createFolder,
    openRunOutputs,
    paletteColors,
    placeInFolder,
    segmentationFromLabelFile,
)
from AtlasSegLib.run import PreparedRun, SegmentationRun
from AtlasSegLib.training import TrainingLogic

from .model import METHOD, ModelFolderProblem, ModelInfo, readModelInfo

try:  # the engine's method registry (atlasseg.methods), read without importing torch
    METHODS = engineRegistry().slicer_methods("AtlasNetSeg")   # {"atlasnet": "AtlasNet"}
except EngineError:  # no engine beside the module: the panel still opens and Apply names the problem
    METHODS = {}
TITLE = METHODS.get(METHOD, "AtlasNet")
LABEL_CHECK_CASE = "model_labels"


@dataclass
class AtlasNetSettings:
    modelFolder: str = ""
    device: str = "auto"                 # auto, cpu or gpu
    networkSegmentations: bool = False   # also load every network's own (back-warped) segmentation
    preset: str = ""                     # registration preset; empty: the one the model was trained with


@dataclass
class AtlasNetInputs:
    targetVolume: object                                   # vtkMRMLScalarVolumeNode
    extraModalities: list = field(default_factory=list)    # the model's further modalities, same grid, in order
    referenceSegmentation: object = None                   # vtkMRMLSegmentationNode or vtkMRMLLabelMapVolumeNode


@dataclass
class AtlasNetResultNodes:
    folderItemID: int
    segmentation: object
    colorTable: object
    probabilityMaps: dict = field(default_factory=dict)         # label name -> fused probability map
    networkProbabilityMaps: dict = field(default_factory=dict)  # network index -> {label name -> map}
    networkSegmentations: dict = field(default_factory=dict)    # network index -> segmentation (when asked)
    agreement: object = None                                    # share of networks agreeing with the fused label
    oracle: object = None
    metricsTable: object = None
    metrics: dict | None = None
    run: dict = field(default_factory=dict)                     # the engine's run.json

    def maps(self) -> list:
        perNetwork = [node for maps in self.networkProbabilityMaps.values() for node in maps.values()]
        return [*self.probabilityMaps.values(), *perNetwork, *(n for n in (self.agreement, self.oracle) if n)]


class AtlasNetRun(SegmentationRun):
    """One AtlasNet run in the background: poll for progress, cancel, then load the results."""


class AtlasNetLogic(TrainingLogic):
    """Converts nodes to engine inputs, runs AtlasNet in a background process, loads its outputs as nodes; and
    trains AtlasNet models from the panel (:class:`AtlasSegLib.training.TrainingLogic`: ``startTraining``,
    ``trainBlocking``, ``trainingProblems``).

    ``python`` and ``processFactory``: see :class:`AtlasSegLib.run.EngineLogic`.
    """

    trainingModule = "AtlasNetSeg"
    runClass = AtlasNetRun   # startRun and runBlocking: AtlasSegLib.run.EngineLogic

    # ------------------------------------------------------------------ validation
    def inputProblems(self, inputs: AtlasNetInputs, settings: AtlasNetSettings) -> list[str]:
        """Readable reasons why a run cannot start (empty when it can), the model folder's first."""
        problems = []
        try:
            model = readModelInfo(settings.modelFolder)
        except ModelFolderProblem as problem:
            problems.append(str(problem))
            model = None
        if inputs.targetVolume is None:
            problems.append("Select a target volume.")
        if model is not None and 1 + len(inputs.extraModalities) != len(model.modalities):
            problems.append(f"The model takes {len(model.modalities)} image(s) per target "
                            f"({', '.join(model.modalities)}); select {len(model.modalities)}, in that order.")
        if settings.device not in DEVICES:
            problems.append(f"Unknown device '{settings.device}' (choose {', '.join(DEVICES)}).")
        return problems

    # ------------------------------------------------------------------ inputs -> engine
    def prepareRun(self, inputs: AtlasNetInputs, settings: AtlasNetSettings, workDir: str | Path) -> PreparedRun:
        """Write the inputs into ``workDir`` and build the engine command (nothing is run)."""
        problems = self.inputProblems(inputs, settings)
        if problems:
            raise EngineError(" ".join(problems))
        model = readModelInfo(settings.modelFolder)
        work = Path(workDir)
        work.mkdir(parents=True, exist_ok=True)
        try:
            targets = [writeVolume(node, work / f"target_{k:04d}.nii.gz")
                       for k, node in enumerate([inputs.targetVolume, *inputs.extraModalities])]
            reference = None
            if inputs.referenceSegmentation is not None:
                reference = writeReference(self.scene, inputs.referenceSegmentation, inputs.targetVolume,
                                           model.labels, work / "reference.nii.gz")
        except GeometryError as error:
            raise EngineError(str(error)) from None
        output = work / "output"
        command = self._command(model, settings, targets, writeLabelCheckAtlasSet(model, work / "model_labels"),
                                output, reference)
        return PreparedRun(command, engineEnvironment(findEngineRoot()), work, output, model.labels,
                           paletteColors(model.labels))

    def _command(self, model: ModelInfo, settings: AtlasNetSettings, targets: list[Path], labelCheck: Path,
                 output: Path, reference: Path | None) -> list[str]:
        """``python -m atlasseg segment --method atlasnet ...``, registering as the model was trained unless the
        settings say otherwise."""
        command = [self.python, "-m", "atlasseg", "segment", "--method", METHOD, "--model", str(model.folder),
                   "--target", *map(str, targets), "--atlases", str(labelCheck), "--output", str(output),
                   "--device", DEVICES[settings.device], "--maps"]
        backend = model.registration.get("backend")
        preset = settings.preset or model.registration.get("preset")
        command += ["--backend", backend] if backend else []
        command += ["--preset", preset] if preset else []
        command += ["--reference", str(reference)] if reference is not None else []
        return command

    # ------------------------------------------------------------------ engine outputs -> nodes
    def loadResults(self, outputDir: str | Path, inputs: AtlasNetInputs, settings: AtlasNetSettings,
                    colors: dict[int, tuple[float, float, float]] | None = None) -> AtlasNetResultNodes:
        """The engine's output folder -> nodes under a new subject-hierarchy folder."""
        outputs = openRunOutputs(self.scene, outputDir, inputs.targetVolume,
                                 f"{TITLE} - {inputs.targetVolume.GetName()}", colors)
        folder = outputs.folder
        segmentation = segmentationFromLabelFile(self.scene, outputs.outputDir / "segmentation.nii.gz",
                                                 outputs.colorTable, f"{outputs.title} segmentation", outputs.grid)
        placeInFolder(self.scene, segmentation, folder)
        result = AtlasNetResultNodes(folder, segmentation, outputs.colorTable, run=outputs.run)
        result.probabilityMaps = _probabilities(outputs, "fused", createFolder(self.scene, "Probability maps",
                                                                               folder), "probability")
        for network in outputs.run.get("networks", []):
            self._loadNetwork(result, outputs, network, settings.networkSegmentations)
        result.agreement = outputs.loadMap("agreement", "network agreement", "agreement", folder)
        result.oracle = outputs.loadMap("oracle", "oracle coverage", "oracle", folder)
        outputs.loadMetrics(result)
        return result

    def _loadNetwork(self, result: AtlasNetResultNodes, outputs: RunOutputs, network: dict,
                     withSegmentation: bool) -> None:
        """One network's probability maps (and, when asked, its own segmentation, hidden) in its own folder."""
        index, name = int(network["index"]), f"network {network['index']} ({network['atlas']})"
        folder = createFolder(self.scene, name[0].upper() + name[1:], result.folderItemID)
        result.networkProbabilityMaps[index] = _probabilities(outputs, str(index), folder, f"{name} probability")
        if withSegmentation and f"segmentation_{index}" in outputs.files:
            node = segmentationFromLabelFile(self.scene, outputs.files[f"segmentation_{index}"], outputs.colorTable,
                                             f"{outputs.title} {name} segmentation", outputs.grid)
            node.GetDisplayNode().SetVisibility(False)
            placeInFolder(self.scene, node, folder)
            result.networkSegmentations[index] = node


def _probabilities(outputs: RunOutputs, source: str, folder: int, prefix: str) -> dict:
    """Foreground probability maps of ``source`` ("fused" or a network index), by label name; background's is
    left out (one minus the others)."""
    maps = {}
    for value, name in outputs.labels.items():
        if value == 0:
            continue
        node = outputs.loadMap(f"probability_{source}_{value}", f"{prefix} {name}", "probability", folder)
        if node is not None:
            maps[name] = node
    return maps


def writeLabelCheckAtlasSet(model: ModelInfo, folder: Path) -> Path:
    """A one-case atlas set with the model's labels and modalities, for ``segment``'s required ``--atlases``.

    AtlasNet's atlases are in the model folder; ``atlasseg segment`` still requires ``--atlases`` and only
    checks that set's labels and modalities against the model's. The case is a tiny dummy (8^3 voxels, the
    smallest image the engine accepts) that nothing registers or segments.
    """
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.arange(8 ** 3, dtype=np.float32).reshape(8, 8, 8))
    for channel in range(len(model.modalities)):
        sitk.WriteImage(image, str(folder / "imagesTr" / f"{LABEL_CHECK_CASE}_{channel:04d}.nii.gz"))
    label = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    label.CopyInformation(image)
    sitk.WriteImage(label, str(folder / "labelsTr" / f"{LABEL_CHECK_CASE}.nii.gz"))
    dataset = {"name": f"labels of {model.folder.name}",
               "labels": {str(value): name for value, name in sorted(model.labels.items())},
               "modality": {str(k): name for k, name in enumerate(model.modalities)},
               "training": [{"image": f"./imagesTr/{LABEL_CHECK_CASE}.nii.gz",
                             "label": f"./labelsTr/{LABEL_CHECK_CASE}.nii.gz"}]}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return folder
