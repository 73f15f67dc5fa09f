"""Self-describing DLF model folders: ``model.safetensors`` (weights) + ``config.json`` (everything else).

``config.json`` holds the architecture (:class:`~atlasseg.dlf.networks.DLFConfig`), the label values with names,
the modalities, the intensity normalisation, the number of atlases, the registration settings the model was
trained with, the patch size, a training-data summary, validation metrics and the sha256 of the weights.
Weights are read with safetensors only (never unpickled). Every problem raises :class:`ModelFolderError` naming
the folder or file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from ..atlas import AtlasSet
from .data import atomic_write_bytes, atomic_write_file, sha256
from .networks import DLFConfig, build_model

MODEL_FORMAT = "atlasseg-dlf-model"
MODEL_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
NORMALISATION = "per channel, 1st-99th percentile to [0, 1] (atlasseg.registration.normalized_tensor)"


class ModelFolderError(ValueError):
    """A missing, corrupted or mismatched model folder; the message names it."""


@dataclass
class LoadedModel:
    folder: Path
    model: torch.nn.Module
    config: dict

    @property
    def architecture(self) -> DLFConfig:
        return self.model.config

    @property
    def labels(self) -> dict[int, str]:
        return {int(k): v for k, v in self.config["labels"].items()}

    @property
    def modalities(self) -> dict[int, str]:
        return {int(k): v for k, v in self.config["modalities"].items()}


def save_model(folder: str | Path, model: torch.nn.Module, labels: dict[int, str], modalities: dict[int, str],
               n_atlases: int, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` atomically (weights first, config last)."""
    folder = Path(folder)
    digest = _atomic_save_weights(model, folder / WEIGHTS)
    config = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "architecture": model.config.to_dict(),
              "labels": {str(k): v for k, v in sorted(labels.items())},
              "modalities": {str(k): v for k, v in sorted(modalities.items())},
              "intensity_normalisation": NORMALISATION, "n_atlases": int(n_atlases),
              **(extra or {}), "weights_sha256": digest}
    atomic_write_bytes(folder / CONFIG, json.dumps(config, indent=2, default=str).encode())
    return folder


def _atomic_save_weights(model: torch.nn.Module, path: Path) -> str:
    """safetensors ``save_model`` (handles MONAI's aliased parameters), written atomically; returns its sha256."""
    return atomic_write_file(lambda tmp: save_safetensors_model(model, tmp), path)


def read_config(folder: str | Path) -> dict:
    """The parsed, checked ``config.json`` of a model folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: model folder not found")
    path = folder / CONFIG
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing (not a DLF model folder?)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != MODEL_FORMAT:
        raise ModelFolderError(f"{path}: not a DLF model config (format is not '{MODEL_FORMAT}')")
    if config.get("version") != MODEL_VERSION:
        raise ModelFolderError(f"{path}: model version {config.get('version')} is not supported "
                               f"(this code reads version {MODEL_VERSION})")
    for key in ("architecture", "labels", "modalities", "n_atlases"):
        if key not in config:
            raise ModelFolderError(f"{path}: missing '{key}'")
    return config


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Read a model folder (config checked, weights by safetensors, checksum verified); model in eval mode."""
    folder = Path(folder)
    config = read_config(folder)
    try:
        architecture = DLFConfig.from_dict(config["architecture"])
    except (TypeError, ValueError) as err:
        raise ModelFolderError(f"{folder / CONFIG}: bad architecture ({err})") from None
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ModelFolderError(f"{weights}: missing")
    expected = config.get("weights_sha256")
    if expected and sha256(weights) != expected:
        raise ModelFolderError(f"{weights}: checksum does not match config.json (corrupted or replaced)")
    model = build_model(architecture)
    try:
        load_safetensors_model(model, str(weights), strict=True)
    except (SafetensorError, OSError) as err:
        raise ModelFolderError(f"{weights}: unreadable safetensors file ({err})") from None
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ModelFolderError(f"{weights}: weights do not fit the architecture in config.json "
                               f"({' '.join(first[:2])[:300]})") from None
    model.to(device).eval()
    return LoadedModel(folder, model, config)


def check_compatible(loaded: LoadedModel, atlas_set: AtlasSet | None = None, n_target_modalities: int | None = None
                     ) -> None:
    """Fail clearly when the atlas set's labels or modalities, or the target's modality count, differ from the
    model's."""
    where = loaded.folder / CONFIG
    if atlas_set is not None:
        model_values, set_values = sorted(loaded.labels), atlas_set.label_values
        if model_values != set_values:
            raise ModelFolderError(
                f"{where}: the model segments labels {model_values} ({loaded.labels}), atlas set "
                f"'{atlas_set.name}' has {set_values} ({atlas_set.labels})")
        model_mods = [loaded.modalities[k] for k in sorted(loaded.modalities)]
        set_mods = [atlas_set.modalities[k] for k in sorted(atlas_set.modalities)]
        if len(model_mods) != len(set_mods):
            raise ModelFolderError(f"{where}: the model takes {len(model_mods)} modalities {model_mods}, atlas set "
                                   f"'{atlas_set.name}' has {len(set_mods)} {set_mods}")
        if [m.lower() for m in model_mods] != [m.lower() for m in set_mods]:
            raise ModelFolderError(f"{where}: the model takes modalities {model_mods}, atlas set "
                                   f"'{atlas_set.name}' has {set_mods}")
    if n_target_modalities is not None and n_target_modalities != len(loaded.modalities):
        raise ModelFolderError(f"{where}: the model takes {len(loaded.modalities)} modality image(s) per target, "
                               f"got {n_target_modalities}")
