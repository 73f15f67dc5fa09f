"""Qt-free logic of the DeepLabelFusion Slicer module (importable in Slicer and, for tests, with slicer-core).

What every AtlasSeg module shares (engine process, geometry, result nodes) lives in ``AtlasSegLib``; the names
below that come from there are re-exported so that console scripts written for this package keep working.
"""

from AtlasSegLib import (
    EngineCancelled,
    EngineError,
    EngineProcess,
    GeometryError,
    ProgressEvent,
    findEngineRoot,
    ijkToRasFromImage,
    missingPipDependencies,
    parseProgressLine,
    readableEngineError,
    torchIsInstalled,
    updateVolumeNodeFromImage,
    volumeNodeToImage,
)

from .logic import (
    BACKENDS,
    DEFAULT_BACKEND,
    DEFAULT_PRESET,
    DEVICES,
    JLF_DEFAULTS,
    MAP_KIND_ATTRIBUTE,
    METHODS,
    PRESETS,
    FusionInputs,
    FusionLogic,
    FusionResultNodes,
    FusionRun,
    FusionSettings,
    methodDescription,
    readAtlasFolderLabels,
    readAtlasFolderModalities,
    readAtlasSetName,
)

__all__ = [
    "BACKENDS", "DEFAULT_BACKEND", "DEFAULT_PRESET", "JLF_DEFAULTS", "DEVICES", "MAP_KIND_ATTRIBUTE", "METHODS",
    "PRESETS", "EngineCancelled", "EngineError",
    "EngineProcess", "FusionInputs", "FusionLogic", "FusionResultNodes", "FusionRun", "FusionSettings",
    "GeometryError", "ProgressEvent", "findEngineRoot", "ijkToRasFromImage", "missingPipDependencies",
    "methodDescription", "parseProgressLine", "readAtlasFolderLabels", "readAtlasFolderModalities", "readAtlasSetName",
    "readableEngineError", "torchIsInstalled",
    "updateVolumeNodeFromImage", "volumeNodeToImage",
]
