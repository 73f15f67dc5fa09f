"""Self-describing model folders of every trained method: ``model.safetensors`` (weights) + ``config.json``.

``config.json`` (format ``atlasseg-model``, version 2) records the method (a name of :mod:`atlasseg.methods`),
its architecture, the backbone(s) of :mod:`atlasseg.networks`, the label values with names, the modalities, the
intensity normalisation, the number of atlases (0 for methods without atlases), the registration settings the
model was trained with, the patch size, a training-data summary, validation metrics and the sha256 of the
weights. Folders of format 1 (``atlasseg-dlf-model``, written before the method registry: Deep Label Fusion and
its plain U-Net baseline, ``kind="unet"``) still load. Weights are read with safetensors only (never unpickled).
Every problem raises :class:`ModelFolderError` naming the folder or file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from .atlas import AtlasSet
from .io import atomic_write, atomic_write_bytes, sha256
from .methods import config_classes, get_method, implementation

MODEL_FORMAT = "atlasseg-model"
MODEL_VERSION = 2
LEGACY_FORMAT = "atlasseg-dlf-model"    # version 1
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
    def method(self) -> str:
        return self.config["method"]

    @property
    def architecture(self):
        return self.model.config

    @property
    def labels(self) -> dict[int, str]:
        return {int(k): v for k, v in self.config["labels"].items()}

    @property
    def modalities(self) -> dict[int, str]:
        return {int(k): v for k, v in self.config["modalities"].items()}


def save_model(folder: str | Path, method: str, model: torch.nn.Module, architecture: dict, labels: dict[int, str],
               modalities: dict[int, str], n_atlases: int, extra: dict | None = None,
               backbones: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` atomically (weights first, config last).

    ``backbones``: the backbone spec(s) the model is built from, by role (e.g. ``{"vote": ..., "finetune":
    ...}``), recorded for people and tools reading the folder.
    """
    folder = Path(folder)
    digest = sha256(atomic_write(lambda tmp: save_safetensors_model(model, tmp), folder / WEIGHTS))
    config = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "method": get_method(method).name,
              "architecture": architecture, "backbones": backbones or {},
              "labels": {str(k): v for k, v in sorted(labels.items())},
              "modalities": {str(k): v for k, v in sorted(modalities.items())},
              "intensity_normalisation": NORMALISATION, "n_atlases": int(n_atlases),
              **(extra or {}), "weights_sha256": digest}
    atomic_write_bytes(folder / CONFIG, json.dumps(config, indent=2, default=str).encode())
    return folder


def legacy_unet_architecture(arch: dict) -> dict:
    """A format-1 plain U-Net architecture (DLF's ``kind="unet"``) as the segmenter's: the fine-tuning subnet's
    U-Net on the images alone."""
    return {"n_labels": arch["n_labels"], "n_modalities": arch.get("n_modalities", 1), "backbone": "unet",
            "backbone_preset": None,
            "backbone_kwargs": {"channels": list(arch.get("finetune_channels", [32, 64, 128, 256])),
                                "norm": arch.get("norm", "instance")},
            "deep_supervision_weights": list(arch.get("deep_supervision_weights", [1.0, 0.5, 0.2])),
            "boundary_weight": 1.0}


def _from_format_1(config: dict, path: Path) -> dict:
    """A format-1 config (Deep Label Fusion folders before the registry) in today's terms."""
    if config.get("version") != 1:
        raise ModelFolderError(f"{path}: {LEGACY_FORMAT} version {config.get('version')} is not supported "
                               f"(this code reads {LEGACY_FORMAT} version 1 and {MODEL_FORMAT} version "
                               f"{MODEL_VERSION})")
    arch = dict(config.get("architecture") or {})
    kind = arch.pop("kind", "dlf")
    if kind == "unet":      # the plain U-Net baseline: the segmenter method with the fine-tuning subnet's U-Net
        if "n_labels" not in arch:
            raise ModelFolderError(f"{path}: format-1 architecture without 'n_labels'")
        arch = legacy_unet_architecture(arch)
    return {**config, "format": MODEL_FORMAT, "version": MODEL_VERSION, "loaded_from_format": f"{LEGACY_FORMAT}/1",
            "method": "segmenter" if kind == "unet" else "dlf", "architecture": arch}


def read_config(folder: str | Path) -> dict:
    """The parsed, checked ``config.json`` of a model folder (format 1 converted to format 2's terms)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: model folder not found")
    path = folder / CONFIG
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing (not an atlasseg model folder?)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") not in (MODEL_FORMAT, LEGACY_FORMAT):
        raise ModelFolderError(f"{path}: not an atlasseg model config (format is not '{MODEL_FORMAT}')")
    if config["format"] == LEGACY_FORMAT:
        config = _from_format_1(config, path)
    elif config.get("version") != MODEL_VERSION:
        raise ModelFolderError(f"{path}: {MODEL_FORMAT} version {config.get('version')} is not supported "
                               f"(this code reads version {MODEL_VERSION})")
    for key in ("method", "architecture", "labels", "modalities", "n_atlases"):
        if key not in config:
            raise ModelFolderError(f"{path}: missing '{key}'")
    try:
        method = get_method(config["method"])
    except ValueError as err:
        raise ModelFolderError(f"{path}: {err}") from None
    if not method.trains:
        raise ModelFolderError(f"{path}: method {method.name!r} has no trained model")
    return {**config, "method": method.name}


def load_model(folder: str | Path, device: str | torch.device = "cpu", method: str | None = None) -> LoadedModel:
    """Read a model folder (config checked, weights by safetensors, checksum verified); model in eval mode.

    ``method``: the method the caller expects; a folder of another method is an error naming both.
    """
    folder = Path(folder)
    config = read_config(folder)
    if method is not None and get_method(method).name != config["method"]:
        raise ModelFolderError(f"{folder / CONFIG}: a '{config['method']}' model, not a '{get_method(method).name}' "
                               "model")
    architecture_cls, _ = config_classes(config["method"])
    try:
        architecture = architecture_cls.from_dict(config["architecture"])
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise ModelFolderError(f"{folder / CONFIG}: bad architecture ({err})") from None
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ModelFolderError(f"{weights}: missing")
    expected = config.get("weights_sha256")
    if expected and sha256(weights) != expected:
        raise ModelFolderError(f"{weights}: checksum does not match config.json (corrupted or replaced)")
    model = implementation(config["method"]).build_model(architecture)
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
