"""Qt-free logic of the DeepLabelFusion module: MRML nodes -> engine inputs, engine run, outputs -> nodes.

Works on any MRML scene: inside Slicer (``slicer.mrmlScene``) and headless with the ``slicer-core`` wheel,
which is how the tests run it. The user's input nodes are only read; every node this logic creates goes
under one subject-hierarchy folder per run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from AtlasSegLib.engine import DEVICES, EngineError, engineEnvironment, engineRegistry, findEngineRoot
from AtlasSegLib.geometry import GeometryError
from AtlasSegLib.inputs import segmentationToLabelImage, segmentLabels, writeReference, writeVolume
from AtlasSegLib.results import (
    MAP_KIND_ATTRIBUTE,
    MAP_STYLES,
    PALETTE,
    MapStyle,
    RunOutputs,
    createFolder,
    newColorTable,
    openRunOutputs,
    paletteColors,
    placeInFolder,
    safeName,
    segmentationFromLabelFile,
    uniqueName,
)
from AtlasSegLib.run import PreparedRun, SegmentationRun
from AtlasSegLib.training import TrainingLogic

try:  # the engine's method registry (atlasseg.methods), read without importing torch
    REGISTRY = engineRegistry()
    METHODS = REGISTRY.slicer_methods("DeepLabelFusion")  # engine name -> label shown to the user
    BACKENDS = tuple(REGISTRY.BACKENDS)
    PRESETS = tuple(REGISTRY.REGISTRATION_PRESETS)
    DEFAULT_BACKEND, DEFAULT_PRESET = REGISTRY.DEFAULT_BACKEND, REGISTRY.DEFAULT_PRESET
    JLF_DEFAULTS = dict(REGISTRY.JLF_DEFAULTS)
except EngineError:  # no engine beside the module: the panel still opens and Apply names the problem
    REGISTRY, METHODS, BACKENDS, PRESETS = None, {}, (), ()
    DEFAULT_BACKEND = DEFAULT_PRESET = ""    # nothing runs without the engine: no second copy of its defaults
    JLF_DEFAULTS = dict.fromkeys(("alpha", "beta", "patch_radius", "search_radius"), 0)

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "DEFAULT_PRESET", "DEVICES", "MAP_KIND_ATTRIBUTE", "MAP_STYLES", "METHODS",
           "PALETTE", "PRESETS", "FusionInputs", "FusionLogic", "FusionResultNodes", "FusionRun", "FusionSettings",
           "MapStyle", "JLF_DEFAULTS", "methodDescription", "readAtlasFolderCaseCount", "readAtlasFolderLabels",
           "readAtlasFolderModalities", "readAtlasSetName"]


@dataclass
class FusionSettings:
    method: str = "jlf"
    nAtlases: int = 10
    backend: str = DEFAULT_BACKEND
    preset: str = DEFAULT_PRESET
    device: str = "auto"           # auto, cpu or gpu
    modelFolder: str = ""          # Deep Label Fusion only
    jlfAlpha: float = JLF_DEFAULTS["alpha"]
    jlfBeta: float = JLF_DEFAULTS["beta"]
    jlfPatchRadius: int = JLF_DEFAULTS["patch_radius"]
    jlfSearchRadius: int = JLF_DEFAULTS["search_radius"]
    seed: int = 0
    weightMaps: bool = False       # also load the weight maps per atlas (DLF: per atlas and label; many volumes)
    show3D: bool = False           # show the segmentation in 3D (closed-surface representation)


@dataclass
class FusionInputs:
    targetVolume: object                                   # vtkMRMLScalarVolumeNode
    extraModalities: list = field(default_factory=list)    # more vtkMRMLScalarVolumeNode, same grid
    atlasFolder: str = ""                                  # a Decathlon folder with dataset.json, or
    atlasPairs: list = field(default_factory=list)         # [(vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode)]
    referenceSegmentation: object = None                   # vtkMRMLSegmentationNode or vtkMRMLLabelMapVolumeNode
    outputSegmentation: object = None                      # vtkMRMLSegmentationNode to overwrite (None: a new one)


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


class FusionRun(SegmentationRun):
    """One fusion run in the background: poll for progress, cancel, then load the results."""


class FusionLogic(TrainingLogic):
    """Converts nodes to engine inputs, runs the engine in a background process, loads its outputs as nodes; and
    trains this module's trainable methods (Deep Label Fusion) from the panel
    (:class:`AtlasSegLib.training.TrainingLogic`: ``startTraining``, ``trainBlocking``, ``trainingProblems``).

    ``python`` and ``processFactory``: see :class:`AtlasSegLib.run.EngineLogic`.
    """

    trainingModule = "DeepLabelFusion"
    runClass = FusionRun   # startRun and runBlocking: AtlasSegLib.run.EngineLogic

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
        output = inputs.outputSegmentation
        if output is not None and output is inputs.referenceSegmentation:
            problems.append("The output segmentation cannot be the reference; choose another or create a new one.")
        if output is not None and any(output is segmentation for _, segmentation in inputs.atlasPairs):
            problems.append("The output segmentation cannot be an atlas segmentation; choose another or create a "
                            "new one.")
        if settings.method not in METHODS:
            problems.append(f"Unknown fusion method '{settings.method}'.")
        if settings.method == "dlf" and not (settings.modelFolder and Path(settings.modelFolder).is_dir()):
            problems.append("Deep Label Fusion needs a model folder.")
        if settings.nAtlases < 1:
            problems.append("Use at least one atlas.")
        available = len(inputs.atlasPairs) if not inputs.atlasFolder else readAtlasFolderCaseCount(inputs.atlasFolder)
        if available and settings.nAtlases > available:   # none at all is explained above; the engine refuses it too
            problems.append(f"The atlas set has {available} atlas(es): set the number of atlases to at most "
                            f"{available}.")
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
            targets = [writeVolume(node, work / f"target_{k:04d}.nii.gz")
                       for k, node in enumerate([inputs.targetVolume, *inputs.extraModalities])]
            if inputs.atlasFolder:
                atlasDir = Path(inputs.atlasFolder)
                labels = readAtlasFolderLabels(atlasDir)
                colors = paletteColors(labels)
            else:
                atlasDir, labels, colors = self._writeSceneAtlases(inputs.atlasPairs, work / "atlases")
            reference = None
            if inputs.referenceSegmentation is not None:
                reference = writeReference(self.scene, inputs.referenceSegmentation, inputs.targetVolume,
                                           labels, work / "reference.nii.gz")
        except GeometryError as error:
            raise EngineError(str(error)) from None
        output = work / "output"
        command = self._command(settings, targets, atlasDir, output, reference)
        return PreparedRun(command, engineEnvironment(findEngineRoot()), work, output, labels, colors)

    def _command(self, settings: FusionSettings, targets: list[Path], atlasDir: Path, output: Path,
                 reference: Path | None) -> list[str]:
        """``python -m atlasseg segment ...`` with every setting of the panel."""
        command = [self.python, "-m", "atlasseg", "segment", "--target", *map(str, targets),
                   "--atlases", str(atlasDir), "--output", str(output), "--method", settings.method,
                   "--n-atlases", str(settings.nAtlases), "--backend", settings.backend, "--preset", settings.preset,
                   "--device", DEVICES.get(settings.device, settings.device), "--seed", str(settings.seed),
                   "--maps", *self.mapKinds(settings)]
        if settings.method == "jlf":
            command += ["--jlf-alpha", repr(settings.jlfAlpha), "--jlf-beta", repr(settings.jlfBeta),
                        "--jlf-patch-radius", str(settings.jlfPatchRadius),
                        "--jlf-search-radius", str(settings.jlfSearchRadius)]
        if settings.method == "dlf":
            command += ["--model", str(settings.modelFolder)]
        if reference is not None:
            command += ["--reference", str(reference)]
        return command

    @staticmethod
    def mapKinds(settings: FusionSettings) -> list[str]:
        """The maps the engine writes: what the panel loads (votes, agreement, oracle with a reference, the final
        probabilities of Deep Label Fusion), plus the per-atlas weight maps only when asked for: they are many
        (one per atlas, and per label for DLF) and large, so neither written nor loaded by default."""
        kinds = ["votes", "agreement", "oracle", "probabilities"]
        return kinds + ["weights"] if settings.weightMaps else kinds

    def _writeSceneAtlases(self, pairs: Sequence, folder: Path):
        """Atlas (image, segmentation) node pairs -> a Decathlon folder; labels named after the segments."""
        labels, colors = segmentLabels([segmentation for _, segmentation in pairs])
        colorTable = newColorTable(self.scene, "AtlasSeg scene atlas labels", labels, colors)
        (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
        (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
        training, used = [], set()
        try:
            for imageNode, segmentationNode in pairs:
                caseId = uniqueName(safeName(imageNode.GetName()), used)
                writeVolume(imageNode, folder / "imagesTr" / f"{caseId}.nii.gz")
                labelImage = segmentationToLabelImage(self.scene, segmentationNode, imageNode, colorTable)
                sitk.WriteImage(labelImage, str(folder / "labelsTr" / f"{caseId}.nii.gz"), True)
                training.append({"image": f"./imagesTr/{caseId}.nii.gz", "label": f"./labelsTr/{caseId}.nii.gz"})
        finally:
            self.scene.RemoveNode(colorTable)
        dataset = {"name": "Scene atlases", "modality": {"0": "image"},
                   "labels": {str(v): n for v, n in labels.items()}, "numTraining": len(training),
                   "training": training}
        (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
        return folder, labels, colors

    # ------------------------------------------------------------------ engine outputs -> nodes
    def loadResults(self, outputDir: str | Path, inputs: FusionInputs, settings: FusionSettings,
                    colors: dict[int, tuple[float, float, float]] | None = None) -> FusionResultNodes:
        """The engine's output folder -> nodes under a new subject-hierarchy folder."""
        target = inputs.targetVolume
        outputs = openRunOutputs(self.scene, outputDir, target,
                                 f"{METHODS.get(settings.method, settings.method)} - {target.GetName()}", colors)
        title, folder, colorTable = outputs.title, outputs.folder, outputs.colorTable
        atlasSetName = readAtlasSetName(inputs.atlasFolder) if inputs.atlasFolder else ""
        segmentation = segmentationFromLabelFile(
            self.scene, outputs.outputDir / "segmentation.nii.gz", colorTable, f"{title} segmentation", outputs.grid,
            into=inputs.outputSegmentation, referenceVolume=target, atlasSetName=atlasSetName)
        if inputs.outputSegmentation is None:   # an overwritten node stays where the user keeps it
            placeInFolder(self.scene, segmentation, folder)
        result = FusionResultNodes(folder, segmentation, colorTable, run=outputs.run)
        if "initial_segmentation" in outputs.files:  # Deep Label Fusion: the weighted-voting stage before fine-tuning
            result.initialSegmentation = segmentationFromLabelFile(
                self.scene, outputs.files["initial_segmentation"], colorTable, f"{title} initial segmentation",
                outputs.grid, referenceVolume=target, atlasSetName=atlasSetName)
            result.initialSegmentation.GetDisplayNode().SetVisibility(False)
            placeInFolder(self.scene, result.initialSegmentation, folder)
        if settings.show3D:
            self.showIn3D(segmentation)
        self._loadMaps(result, outputs, settings.weightMaps)
        outputs.loadMetrics(result)
        return result

    def _loadMaps(self, result: FusionResultNodes, outputs: RunOutputs, weightMaps: bool) -> None:
        """Vote maps per label in a subfolder, agreement and oracle maps beside them; the weight maps per atlas
        (Deep Label Fusion: per atlas and label, often dozens of volumes) only when asked for."""
        votesFolder = createFolder(self.scene, "Vote maps", result.folderItemID)
        for value, name in outputs.labels.items():
            if f"votes_{value}" in outputs.files:
                result.voteMaps[name] = outputs.loadMap(f"votes_{value}", f"votes {name}", "votes", votesFolder)
        weightKeys = [key for key in outputs.files if key.startswith("weights_")] if weightMaps else []
        if weightKeys:
            weightsFolder = createFolder(self.scene, "Weight maps", result.folderItemID)
            for key in weightKeys:
                atlasId = key[len("weights_"):]
                result.weightMaps[atlasId] = outputs.loadMap(key, f"weights {atlasId}", "weights", weightsFolder)
        result.agreement = outputs.loadMap("agreement", "atlas agreement", "agreement", result.folderItemID)
        result.oracle = outputs.loadMap("oracle", "oracle coverage", "oracle", result.folderItemID)


def _readDataset(folder: str | Path) -> dict:
    try:
        dataset = json.loads((Path(folder) / "dataset.json").read_text())
    except (OSError, ValueError):
        return {}
    return dataset if isinstance(dataset, dict) else {}


def readAtlasSetName(folder: str | Path) -> str:
    """The atlas set's ``name`` in dataset.json ("" when there is none or the folder cannot be read)."""
    name = _readDataset(folder).get("name", "")
    return name if isinstance(name, str) else ""


def readAtlasFolderCaseCount(folder: str | Path) -> int | None:
    """Number of labelled cases listed in dataset.json (Decathlon ``training`` list, else ``numTraining``); None
    when the folder cannot be read (the engine then names the problem)."""
    dataset = _readDataset(folder)
    training = dataset.get("training")
    if isinstance(training, list):
        return len(training)
    count = dataset.get("numTraining")
    return count if isinstance(count, int) and count >= 0 else None


def readAtlasFolderModalities(folder: str | Path) -> list[str]:
    """Modality names in channel order from dataset.json (Decathlon ``modality``, nnU-Net v2 ``channel_names``);
    empty when the folder cannot be read."""
    dataset = _readDataset(folder)
    raw = dataset.get("modality") or dataset.get("channel_names") or {}
    try:
        return [str(raw[key]) for key in sorted(raw, key=int)] if isinstance(raw, dict) else []
    except (TypeError, ValueError):
        return []


def methodDescription(method: str) -> str:
    """What a method does, in a sentence for the panel; a method that needs a trained model says so and how to
    train one."""
    if REGISTRY is None or method not in REGISTRY.METHODS:
        return ""
    info = REGISTRY.METHODS[method]
    text = info.description[0].upper() + info.description[1:] + "."
    if info.trains:
        text += (f" Needs a trained model folder: train one on your atlas set in 'Train a model' below, or with "
                 f"'atlasseg train --method {method} --atlases ATLAS_FOLDER --output MODEL_FOLDER' (README, section "
                 f"'{info.label}').")
    else:
        text += " No training needed."
    return text


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
