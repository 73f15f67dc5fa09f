"""Qt-free logic of the DeepLabelFusion Slicer module (importable in Slicer and, for tests, with slicer-core)."""

from .engine import (
    EngineCancelled,
    EngineError,
    EngineProcess,
    ProgressEvent,
    findEngineRoot,
    missingPipDependencies,
    parseProgressLine,
    readableEngineError,
    torchIsInstalled,
)
from .geometry import GeometryError, ijkToRasFromImage, updateVolumeNodeFromImage, volumeNodeToImage
from .logic import (
    BACKENDS,
    DEVICES,
    MAP_KIND_ATTRIBUTE,
    METHODS,
    PRESETS,
    FusionInputs,
    FusionLogic,
    FusionResultNodes,
    FusionRun,
    FusionSettings,
    readAtlasFolderLabels,
)

__all__ = [
    "BACKENDS", "DEVICES", "MAP_KIND_ATTRIBUTE", "METHODS", "PRESETS", "EngineCancelled", "EngineError",
    "EngineProcess", "FusionInputs", "FusionLogic", "FusionResultNodes", "FusionRun", "FusionSettings",
    "GeometryError", "ProgressEvent", "findEngineRoot", "ijkToRasFromImage", "missingPipDependencies",
    "parseProgressLine", "readAtlasFolderLabels", "readableEngineError", "torchIsInstalled",
    "updateVolumeNodeFromImage", "volumeNodeToImage",
]
