"""The sample atlas set in Slicer's Sample Data module, and the model shipped with AtlasSeg offered in the panels.

A click on *Hippocampus atlas set* (category AtlasSeg) builds the sample folder in Slicer's cache (the engine's
:mod:`atlasseg.sampledata`: the Decathlon archive downloaded and checked by MD5, 10 atlases and 2 targets copied
out), loads the 2 targets with their reference segmentations, and sets the atlas folder, target and reference of
every AtlasSeg module that registered, so that Apply runs at once. The scene part (:func:`loadSampleScene`,
:func:`applySampleToParameters`) and the model offer (:func:`modelOffer`) are Qt-free, for the tests; only
:func:`registerSampleData` and the click need Slicer.
"""

from __future__ import annotations

import logging
import pathlib
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from .engine import EngineError, engineModule, findEngineRoot
from .geometry import updateVolumeNodeFromImage
from .results import createFolder, newColorTable, paletteColors, placeInFolder, segmentationFromLabelFile

SAMPLE_CATEGORY = "AtlasSeg"
SAMPLE_NAME = "Hippocampus atlas set"
_registeredModules: list[str] = []   # modules whose parameter nodes receive a loaded sample


def engineSampleData():
    """The engine's :mod:`atlasseg.sampledata` (torch-free), importable wherever the engine sits beside us."""
    return engineModule("atlasseg.sampledata")


# ------------------------------------------------------------------------------------------ sample set -> scene


@dataclass
class SampleScene:
    """What a loaded sample gives the module logic: ``FusionInputs(targets[0], atlasFolder=atlasFolder,
    referenceSegmentation=references[0])``."""

    atlasFolder: str
    targets: list = field(default_factory=list)      # vtkMRMLScalarVolumeNode per target
    references: list = field(default_factory=list)   # vtkMRMLSegmentationNode per target (its reference labels)
    folderItemID: int = 0
    attribution: str = ""


def loadSampleScene(scene, sampleFolder: str | Path) -> SampleScene:
    """Load the targets of a built sample folder (and their reference labels as segmentations) into ``scene``,
    under one subject-hierarchy folder; voxels and grid exactly as the engine reads the files (ITK's LPS world
    to Slicer's RAS by :func:`~AtlasSegLib.geometry.updateVolumeNodeFromImage`)."""
    sample = engineSampleData().read_sample_folder(sampleFolder)
    folder = createFolder(scene, f"{sample.name} sample ({sample.licence})")
    colorTable = newColorTable(scene, "AtlasSeg sample labels", sample.labels, paletteColors(sample.labels))
    result = SampleScene(str(sample.atlas_folder), folderItemID=folder, attribution=sample.attribution)
    try:
        for target in sample.targets:
            volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", target.case_id)
            updateVolumeNodeFromImage(volume, sitk.ReadImage(str(target.image)))
            volume.CreateDefaultDisplayNodes()
            placeInFolder(scene, volume, folder)
            reference = segmentationFromLabelFile(scene, target.label, colorTable, f"{target.case_id} reference",
                                                  referenceVolume=volume, atlasSetName=sample.name)
            reference.GetDisplayNode().SetVisibility(False)   # the result is what the user looks at
            placeInFolder(scene, reference, folder)
            result.targets.append(volume)
            result.references.append(reference)
    finally:
        scene.RemoveNode(colorTable)   # segment names and colours are in the segments themselves
    return result


def applySampleToParameters(parameters, sample: SampleScene) -> None:
    """Point a module's parameter node at the loaded sample: the first target and its reference, the atlas folder
    (not atlases from the scene) and, when none is set, the atlas folder to train on. Fields a module lacks are
    skipped."""
    values = {"targetVolume": sample.targets[0] if sample.targets else None,
              "referenceSegmentation": sample.references[0] if sample.references else None,
              "atlasFolder": pathlib.Path(sample.atlasFolder), "atlasesFromScene": False}
    for name, value in values.items():
        if value is not None and hasattr(parameters, name):
            setattr(parameters, name, value)
    if hasattr(parameters, "trainingAtlasFolder") and str(parameters.trainingAtlasFolder or "") in ("", "."):
        parameters.trainingAtlasFolder = pathlib.Path(sample.atlasFolder)


# ------------------------------------------------------------------------------------------ Sample Data module


def registerSampleData(moduleName: str) -> None:
    """Register the sample with Slicer's Sample Data module (once for all AtlasSeg modules) and remember
    ``moduleName``, whose parameter node a loaded sample fills. Call on ``startupCompleted()``."""
    try:
        import SampleData
    except ImportError:   # an application built without the Sample Data module
        logging.info("AtlasSeg: no Sample Data module; the sample atlas set is not registered")
        return

    if moduleName not in _registeredModules:
        _registeredModules.append(moduleName)
    sources = SampleData.SampleDataLogic.sampleDataSourcesByCategory(SAMPLE_CATEGORY)
    if any(source.sampleName == SAMPLE_NAME for source in sources):
        return
    try:
        engine = engineSampleData()
    except EngineError as error:   # no engine beside the modules: the panels say so on Apply
        logging.warning(f"AtlasSeg: sample data not registered ({error})")
        return
    sample = engine.HIPPOCAMPUS_SAMPLE
    icon = findEngineRoot() / "Resources" / "Icons" / "AtlasSeg.png"
    # The button calls downloadSampleSet (Sample Data's customDownloader hook); scripted downloadSample() gets the
    # checked archive only (no file type: nothing loaded), which downloadSampleSet can then build from.
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=SAMPLE_CATEGORY, sampleName=SAMPLE_NAME, uris=sample.url, fileNames=sample.archive_name,
        nodeNames=None, customDownloader=downloadSampleSet, thumbnailFileName=str(icon) if icon.is_file() else None,
        loadFileType=None, checksums=f"MD5:{sample.md5}")


def sampleCacheFolder() -> Path:
    """Where the sample folder is built: Slicer's download cache, in an AtlasSeg folder."""
    import slicer

    return Path(slicer.mrmlScene.GetCacheManager().GetRemoteCacheDirectory()) / "AtlasSeg"


def downloadSampleSet(source=None) -> list:
    """Sample Data's button: build (or reuse) the sample folder, load its targets and fill the AtlasSeg modules'
    parameter nodes. Returns the loaded target volumes; a problem is shown (one sentence naming the file) and
    raised."""
    import slicer

    engine = engineSampleData()

    def progress(fraction: float, message: str) -> None:
        slicer.util.showStatusMessage(f"AtlasSeg sample: {message}", 3000)
        slicer.app.processEvents()

    with slicer.util.tryWithErrorDisplay("Could not prepare the AtlasSeg sample atlas set.", waitCursor=True):
        folder = engine.ensure_sample_set(sampleCacheFolder() / engine.HIPPOCAMPUS_SAMPLE.folder, progress=progress)
        sample = loadSampleScene(slicer.mrmlScene, folder)
        for name in _registeredModules:
            try:
                applySampleToParameters(slicer.util.getModuleLogic(name).getParameterNode(), sample)
            except (AttributeError, RuntimeError) as error:   # a module not loaded in this session
                logging.warning(f"AtlasSeg sample: {name} not updated ({error})")
        if sample.targets:
            slicer.util.setSliceViewerLayers(background=sample.targets[0], fit=True)
        slicer.util.showStatusMessage(f"AtlasSeg sample loaded; atlas folder {sample.atlasFolder}", 5000)
        logging.info(f"AtlasSeg sample data: {sample.attribution}")
        return sample.targets


# ------------------------------------------------------------------------------------------ shipped model


@dataclass(frozen=True)
class ModelOffer:
    """The model Apply uses when the panel's model folder is empty (``folder``: "" when none ships) and the
    sentence the panel shows about it."""

    folder: str
    message: str


def modelOffer(method: str, chosenFolder: str = "", needsModel: bool = True,
               engineRoot: str | Path | None = None) -> ModelOffer:
    """For a method that needs a trained model and none chosen (``chosenFolder`` ""): the model shipped with
    AtlasSeg for that method, if any, with what it is for and not for (from its config). Nothing when none ships:
    the method's description already points to training one."""
    if not needsModel or chosenFolder:
        return ModelOffer("", "")
    try:
        engine = engineSampleData()
        models = [m for m in engine.shipped_models(engineRoot if engineRoot is not None else findEngineRoot())
                  if m.method == method]
    except EngineError:   # no engine beside the modules: nothing ships, and Apply names the problem
        return ModelOffer("", "")
    if not models:
        return ModelOffer("", "")
    model = models[0]
    record = model.record
    return ModelOffer(str(model.folder), (
        f"No model folder chosen: Apply uses the model shipped with AtlasSeg ('{model.name}'), for "
        f"{record.get('intended_use', 'its training data')}. Not suited for: "
        f"{record.get('not_suited_for', 'anything else')}. Choose your own model folder for other data."))
