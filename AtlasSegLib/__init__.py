"""The Slicer-side library shared by the AtlasSeg modules (DeepLabelFusion, AtlasNetSeg, DeepAtlasReg).

Qt-free, so it imports in Slicer and, for tests, with the ``slicer-core`` wheel: the engine process with
progress, log lines and a cancel that never blocks a GUI (:mod:`.engine`), exact RAS/LPS geometry
(:mod:`.geometry`), nodes -> input files (:mod:`.inputs`), engine outputs -> nodes with standard terminology for
known structures (:mod:`.results`), the run and logic base (:mod:`.run`), training from a panel with a live
table and plot, cancel and resume (:mod:`.training`), self tests that report skips as skips (:mod:`.selftest`) and
the first-use dependency installation (:mod:`.dependencies`, needs Slicer only when called). The *Train a model*
section's widget code and the Apply part's (run, progress, cancel, status, log, result maps), shared by the module
panels, are in :mod:`.trainingpanel` and :mod:`.runpanel` (on :mod:`.enginepanel`), the module classes' base in
:mod:`.modulebase` (need Slicer and its Qt; imported by the module files only, never here).

Installed, it sits beside the modules in ``qt-scripted-modules``; in a source checkout, at the repository root,
which each module file puts on ``sys.path`` when ``AtlasSegLib`` is not importable otherwise.
"""

from .dependencies import ensureEngineDependencies
from .engine import (
    DEVICES,
    EngineCancelled,
    EngineError,
    EngineProcess,
    EngineSequence,
    ProgressEvent,
    engineEnvironment,
    engineRegistry,
    findEngineRoot,
    missingPipDependencies,
    parseProgressLine,
    parseProgressLogLine,
    progressLogLine,
    pythonExecutable,
    readableEngineError,
    torchIsInstalled,
)
from .geometry import GeometryError, ijkToRasFromImage, updateVolumeNodeFromImage, volumeNodeToImage
from .inputs import segmentationToLabelImage, segmentLabels, writeReference, writeVolume
from .results import (
    MAP_KIND_ATTRIBUTE,
    MAP_STYLES,
    PALETTE,
    STRUCTURE_CODES,
    MapStyle,
    StructureCode,
    showIn3D,
    showMap,
    structureCode,
    tagStructures,
)
from .run import EngineLogic, EngineRun, PreparedRun, SegmentationRun, runSeconds, waitForRun
from .sampledata import (
    ModelOffer,
    SampleScene,
    applySampleToParameters,
    loadSampleScene,
    modelOffer,
    registerSampleData,
)
from .selftest import runSelfTests
from .training import (
    DEFAULT_SIZE,
    TRAINING_RECORD,
    TRAINING_SIZES,
    ModelFolderState,
    TrainingCurves,
    TrainingLogic,
    TrainingResult,
    TrainingRun,
    TrainingSettings,
    TrainingSize,
    UnusableModelFolder,
    inspectModelFolder,
    readMethodConfig,
    readTrainingHistory,
)

__all__ = [
    "DEFAULT_SIZE", "DEVICES", "MAP_KIND_ATTRIBUTE", "MAP_STYLES", "PALETTE", "STRUCTURE_CODES", "TRAINING_RECORD",
    "TRAINING_SIZES", "EngineCancelled", "EngineError", "EngineLogic", "EngineProcess", "EngineRun",
    "EngineSequence", "GeometryError", "MapStyle", "ModelFolderState", "ModelOffer", "PreparedRun", "ProgressEvent",
    "SampleScene", "SegmentationRun", "StructureCode", "TrainingCurves", "TrainingLogic", "TrainingResult",
    "TrainingRun", "TrainingSettings", "TrainingSize", "UnusableModelFolder", "applySampleToParameters",
    "engineEnvironment", "engineRegistry", "ensureEngineDependencies", "findEngineRoot", "ijkToRasFromImage",
    "inspectModelFolder", "loadSampleScene", "missingPipDependencies", "modelOffer", "parseProgressLine",
    "parseProgressLogLine", "progressLogLine", "pythonExecutable", "readMethodConfig", "readTrainingHistory",
    "readableEngineError", "registerSampleData", "runSeconds", "runSelfTests", "segmentationToLabelImage",
    "segmentLabels", "showIn3D", "showMap", "structureCode", "tagStructures", "torchIsInstalled",
    "updateVolumeNodeFromImage", "volumeNodeToImage", "waitForRun", "writeReference", "writeVolume",
]
