"""Qt-free logic of the DeepAtlasReg Slicer module (importable in Slicer and, for tests, with slicer-core).

What every AtlasSeg module shares (engine process, geometry, result nodes, training) is imported from
``AtlasSegLib``.
"""

from .logic import (
    BACKENDS,
    LEARNED,
    METHODS,
    PRESETS,
    DeepAtlasInputs,
    DeepAtlasLogic,
    DeepAtlasResultNodes,
    DeepAtlasRun,
    DeepAtlasSettings,
)
from .model import DeepAtlasModelProblem, RegistrationModelInfo, readRegistrationModel

__all__ = ["BACKENDS", "LEARNED", "METHODS", "PRESETS", "DeepAtlasInputs", "DeepAtlasLogic", "DeepAtlasModelProblem",
           "DeepAtlasResultNodes", "DeepAtlasRun", "DeepAtlasSettings", "RegistrationModelInfo",
           "readRegistrationModel"]
