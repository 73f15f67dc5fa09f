"""What a trained DeepAtlas model folder holds, read from its ``config.json`` alone (no torch in the panel).

The folder checks every module shares (no folder, not a model, another method's model, format version) are
AtlasSegLib's :func:`~AtlasSegLib.training.readMethodConfig`; this file adds DeepAtlas's own files and summary. The
engine checks the folder again, fully (weights and reference checksums, common grid), before it registers
(``atlasseg.deepatlas.inference.check_registration_model``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from AtlasSegLib.training import UnusableModelFolder, readMethodConfig

METHOD = "deepatlas"
WEIGHTS = "model.safetensors"
REFERENCE = "reference.safetensors"   # the model's reference image on its common grid (atlasseg.deepatlas.model)
TRAIN_HINT = "train one with: atlasseg train --method deepatlas --atlases ATLAS_SET_FOLDER --output MODEL_FOLDER"


class DeepAtlasModelProblem(UnusableModelFolder):
    """The chosen folder is not a usable DeepAtlas model; the message says why and what to do."""


@dataclass(frozen=True)
class RegistrationModelInfo:
    """The parts of a DeepAtlas model's ``config.json`` the panel and the logic need."""

    folder: Path
    labels: dict[int, str]               # value -> name, background included (F_S's labels)
    modalities: list[str]                # images per fixed / moving volume, in order
    deformation: str = "svf"             # svf (diffeomorphic: exp(v)) or displacement
    gridShape: tuple[int, ...] = ()      # the common grid the networks run on
    labelledCases: int | None = None     # training cases with labels (DeepAtlas learns from few)

    @property
    def foregroundLabels(self) -> dict[int, str]:
        return {value: name for value, name in self.labels.items() if value != 0}

    def summary(self) -> str:
        """One line for the panel: what the model registers and segments."""
        grid = "x".join(str(n) for n in self.gridShape) or "?"
        labelled = f", trained with {self.labelledCases} labelled case(s)" if self.labelledCases else ""
        modalities = ", ".join(self.modalities)
        return (f"DeepAtlas ({self.deformation} field on a {grid} common grid{labelled}); labels: "
                f"{', '.join(self.foregroundLabels.values())}; modalit{'ies' if len(self.modalities) != 1 else 'y'}: "
                f"{modalities}")


def readRegistrationModel(folder: str | Path | None) -> RegistrationModelInfo:
    """The model's summary, or DeepAtlasModelProblem naming what is wrong with the folder."""
    try:
        path, config = readMethodConfig(folder, METHOD, TRAIN_HINT)
    except UnusableModelFolder as problem:
        raise DeepAtlasModelProblem(str(problem)) from None
    grid = config.get("common_grid") if isinstance(config.get("common_grid"), dict) else {}
    for name in (WEIGHTS, str(grid.get("file", REFERENCE))):
        if not (path / name).is_file():
            raise DeepAtlasModelProblem(f"{path / name} is missing: the model folder is incomplete.")
    try:
        architecture = config["architecture"]
        geometry = grid["geometry"]
        training = (config.get("training") or {}) if isinstance(config.get("training"), dict) else {}
        labelled = training.get("labelled_ids")
        return RegistrationModelInfo(
            path, {int(v): str(n) for v, n in config["labels"].items()},
            [str(config["modalities"][k]) for k in sorted(config["modalities"], key=int)],
            str(architecture.get("deformation", "svf")), tuple(int(n) for n in geometry["size"]),
            len(labelled) if isinstance(labelled, list) else None)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise DeepAtlasModelProblem(f"{path / 'config.json'}: incomplete DeepAtlas configuration ({error!r})."
                                    ) from None
