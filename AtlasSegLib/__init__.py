"""The Slicer-side library shared by the AtlasSeg modules (DeepLabelFusion, AtlasNetSeg, DeepAtlasReg).

Qt-free, so it imports in Slicer and, for tests, with the ``slicer-core`` wheel: the engine process with
progress, log lines and a cancel that never blocks a GUI (:mod:`.engine`), exact RAS/LPS geometry
(:mod:`.geometry`), nodes -> input files (:mod:`.inputs`), engine outputs -> nodes with standard terminology for
known structures (:mod:`.results`), the run and logic base (:mod:`.run`), self tests
that report skips as skips (:mod:`.selftest`) and the first-use dependency installation (:mod:`.dependencies`,
needs Slicer only when called).

Installed, it sits beside the modules in ``qt-scripted-modules``; in a source checkout, at the repository root,
which each module file puts on ``sys.path`` when ``AtlasSegLib`` is not importable otherwise.
"""

from .dependencies import ensureEngineDependencies
from .engine import (
    DEVICES,
    EngineCancelled,
    EngineError,
    EngineProcess,
    ProgressEvent,
    engineEnvironment,
    engineRegistry,
    findEngineRoot,
    missingPipDependencies,
    parseProgressLine,
    pythonExecutable,
    readableEngineError,
    torchIsInstalled,
)
from .geometry import GeometryError, ijkToRasFromImage, updateVolumeNodeFromImage, volumeNodeToImage
from .inputs import segmentationToLabelImage, writeReference, writeVolume
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
from .run import EngineLogic, EngineRun, PreparedRun, waitForRun
from .selftest import runSelfTests

__all__ = [
    "DEVICES", "MAP_KIND_ATTRIBUTE", "MAP_STYLES", "PALETTE", "STRUCTURE_CODES", "EngineCancelled", "EngineError",
    "EngineLogic", "EngineProcess", "EngineRun", "GeometryError", "MapStyle", "PreparedRun", "ProgressEvent",
    "StructureCode", "engineEnvironment", "engineRegistry", "ensureEngineDependencies", "findEngineRoot",
    "ijkToRasFromImage", "missingPipDependencies", "parseProgressLine", "pythonExecutable", "readableEngineError",
    "runSelfTests", "segmentationToLabelImage", "showIn3D", "showMap", "structureCode", "tagStructures",
    "torchIsInstalled", "updateVolumeNodeFromImage", "volumeNodeToImage", "waitForRun", "writeReference",
    "writeVolume",
]
