"""What a trained AtlasNet model folder holds, read from its ``config.json`` alone (no torch in the panel).

The panel shows this summary as soon as a folder is chosen, and every problem with the folder (empty, another
method's model, missing weights or atlases) becomes one sentence before any process is started. The engine
checks the folder again, fully, when it loads it (``atlasseg.model_io.load_model``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from AtlasSegLib.engine import EngineError, engineRegistry
from AtlasSegLib.training import configMethod

METHOD = "atlasnet"
MODEL_FORMAT = "atlasseg-model"        # atlasseg.model_io.MODEL_FORMAT / MODEL_VERSION
MODEL_VERSION = 2
LEGACY_FORMAT = "atlasseg-dlf-model"   # format 1: Deep Label Fusion folders written before the method registry
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
ATLASES = "atlases.safetensors"
TRAIN_HINT = "train one with: atlasseg train --method atlasnet --atlases ATLAS_SET_FOLDER --output MODEL_FOLDER"


class ModelFolderProblem(EngineError):
    """The chosen folder is not a usable AtlasNet model; the message says why and what to do."""


@dataclass(frozen=True)
class ModelInfo:
    """The parts of an AtlasNet model's ``config.json`` the panel and the logic need."""

    folder: Path
    labels: dict[int, str]                 # value -> name, background included
    modalities: list[str]                  # in the order the target's images must be given
    atlasIds: list[str]                    # one per network, in network order
    backbone: str = "unet"
    fusion: str = "mean"
    registration: dict = field(default_factory=dict)   # backend and preset the model was trained with

    @property
    def nNetworks(self) -> int:
        return len(self.atlasIds)

    @property
    def foregroundLabels(self) -> dict[int, str]:
        return {value: name for value, name in self.labels.items() if value != 0}

    def summary(self) -> str:
        """One line for the panel: what the model segments and how."""
        networks = f"{self.nNetworks} network{'s' if self.nNetworks != 1 else ''}"
        modalities = ", ".join(self.modalities)
        return (f"AtlasNet, {networks} ({self.backbone}, {self.fusion} fusion) on atlases "
                f"{', '.join(self.atlasIds)}; labels: {', '.join(self.foregroundLabels.values())}; "
                f"modalit{'ies' if len(self.modalities) != 1 else 'y'}: {modalities}")


def readModelInfo(folder: str | Path) -> ModelInfo:
    """The model's summary, or ModelFolderProblem naming what is wrong with the folder."""
    if not str(folder or "").strip() or str(folder) == ".":
        raise ModelFolderProblem(f"Choose a trained AtlasNet model folder ({TRAIN_HINT}).")
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderProblem(f"The model folder {folder} does not exist.")
    config = _readConfig(folder)
    _checkMethod(folder, config)
    for name in (WEIGHTS, ATLASES):
        if not (folder / name).is_file():
            raise ModelFolderProblem(f"{folder / name} is missing: the model folder is incomplete.")
    try:
        architecture = config["architecture"]
        return ModelInfo(folder, {int(v): str(n) for v, n in config["labels"].items()},
                         [str(config["modalities"][k]) for k in sorted(config["modalities"], key=int)],
                         [str(a) for a in architecture["atlas_ids"]], str(architecture.get("backbone", "unet")),
                         str(architecture.get("fusion", "mean")), dict(config.get("registration") or {}))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ModelFolderProblem(f"{folder / CONFIG}: incomplete AtlasNet configuration ({error!r}).") from None


def _readConfig(folder: Path) -> dict:
    path = folder / CONFIG
    if not path.is_file():
        raise ModelFolderProblem(f"{folder} is not a model folder (no {CONFIG}); {TRAIN_HINT}.")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFolderProblem(f"{path}: unreadable ({error}).") from None
    if not isinstance(config, dict) or config.get("format") not in (MODEL_FORMAT, LEGACY_FORMAT):
        raise ModelFolderProblem(f"{path}: not an atlasseg model configuration.")
    return config


def _checkMethod(folder: Path, config: dict) -> None:
    """An AtlasNet model of the format this engine reads; another method's model names the module to use."""
    method = configMethod(config)
    if method != METHOD:
        raise ModelFolderProblem(f"{folder} holds {_methodDescription(method)}, not an AtlasNet model.")
    if config.get("version") != MODEL_VERSION:
        raise ModelFolderProblem(f"{folder / CONFIG}: {MODEL_FORMAT} version {config.get('version')} is not "
                                 f"supported (this engine reads version {MODEL_VERSION}).")


def _methodDescription(method: str) -> str:
    """'a Deep Label Fusion model (open it in the DeepLabelFusion module)' and the like."""
    try:
        info = engineRegistry().get_method(method)
    except (EngineError, ValueError):
        return f"a '{method}' model"
    where = f" (open it in the {info.slicer_module} module)" if info.slicer_module else ""
    return f"a {info.label} model{where}"
