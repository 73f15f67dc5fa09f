"""Qt-free logic of the AtlasNetSeg Slicer module (importable in Slicer and, for tests, with slicer-core).

What every AtlasSeg module shares (engine process, geometry, result nodes) is imported from ``AtlasSegLib``.
"""

from .logic import (
    METHODS,
    AtlasNetInputs,
    AtlasNetLogic,
    AtlasNetResultNodes,
    AtlasNetRun,
    AtlasNetSettings,
    writeLabelCheckAtlasSet,
)
from .model import ModelFolderProblem, ModelInfo, readModelInfo

__all__ = ["METHODS", "AtlasNetInputs", "AtlasNetLogic", "AtlasNetResultNodes", "AtlasNetRun", "AtlasNetSettings",
           "ModelFolderProblem", "ModelInfo", "readModelInfo", "writeLabelCheckAtlasSet"]
