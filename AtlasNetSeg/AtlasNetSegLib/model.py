"""What a trained AtlasNet model folder holds, read from its ``config.json`` alone (no torch in the panel).

The panel shows this summary as soon as a folder is chosen, and every problem with the folder becomes one sentence
before any process is started: the checks every module shares (no folder, not a model, another method's model,
format version) are AtlasSegLib's :func:`~AtlasSegLib.training.readMethodConfig`, and this file adds AtlasNet's own
files (weights, atlases) and summary. The engine
checks the folder again, fully, when it loads it (``atlasseg.model_io.load_model``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from AtlasSegLib.training import UnusableModelFolder, readMethodConfig

METHOD = "atlasnet"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
ATLASES = "atlases.safetensors"
TRAIN_HINT = "train one with: atlasseg train --method atlasnet --atlases ATLAS_SET_FOLDER --output MODEL_FOLDER"


class ModelFolderProblem(UnusableModelFolder):
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


def readModelInfo(folder: str | Path | None) -> ModelInfo:
    """The model's summary, or ModelFolderProblem naming what is wrong with the folder."""
    try:
        path, config = readMethodConfig(folder, METHOD, TRAIN_HINT)
    except UnusableModelFolder as problem:
        raise ModelFolderProblem(str(problem)) from None
    for name in (WEIGHTS, ATLASES):
        if not (path / name).is_file():
            raise ModelFolderProblem(f"{path / name} is missing: the model folder is incomplete.")
    try:
        architecture = config["architecture"]
        return ModelInfo(path, {int(v): str(n) for v, n in config["labels"].items()},
                         [str(config["modalities"][k]) for k in sorted(config["modalities"], key=int)],
                         [str(a) for a in architecture["atlas_ids"]], str(architecture.get("backbone", "unet")),
                         str(architecture.get("fusion", "mean")), dict(config.get("registration") or {}))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ModelFolderProblem(f"{path / CONFIG}: incomplete AtlasNet configuration ({error!r}).") from None
