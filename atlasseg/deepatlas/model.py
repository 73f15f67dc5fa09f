"""DeepAtlas's networks (F_R and F_S in one module, one ``model.safetensors``) and the reference image stored
beside the weights (``reference.safetensors``: its shape comes from the data, not from the architecture)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..io import Geometry, atomic_save_tensors, sha256
from ..model_io import CONFIG, LoadedModel, ModelFolderError
from ..networks import as_heads, build_backbone
from ..segmenter import SegmenterNet
from .config import DeepAtlasConfig
from .fields import SpatialTransformer
from .grid import CommonGrid

__all__ = ["REFERENCE", "DeepAtlasModel", "RegistrationNet", "build_model", "load_common_grid",
           "save_common_grid"]

REFERENCE = "reference.safetensors"
OUTPUT_INIT_STD = 1e-5      # F_R's last layer starts near zero: the identity (VoxelMorph's initialisation)


class RegistrationNet(nn.Module):
    """F_R: (moving, fixed) (B, C, Z, Y, X) each -> raw field (B, 3, Z, Y, X) in voxels of the grid, channels
    (z, y, x): a stationary velocity (``deformation="svf"``) or the displacement itself (``"displacement"``)."""

    def __init__(self, config: DeepAtlasConfig):
        super().__init__()
        self.config = config
        self.net = build_backbone(config.registration_spec(), 2 * config.n_modalities, 3)
        layers = self.net.output_layers() if hasattr(self.net, "output_layers") else []
        for layer in layers:
            nn.init.normal_(layer.weight, 0.0, OUTPUT_INIT_STD)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        self.transformer = SpatialTransformer(config.integration_steps if config.deformation == "svf" else 0)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return as_heads(self.net(torch.cat([moving, fixed], 1)))[0]

    def displacement(self, raw: torch.Tensor) -> torch.Tensor:
        """The displacement ``u`` of ``phi(x) = x + u(x)`` (fixed voxel -> moving voxel) from a raw field."""
        return self.transformer.integrate(raw) if self.config.deformation == "svf" else raw

    def inverse_displacement(self, raw: torch.Tensor) -> torch.Tensor:
        """The displacement of ``phi^-1``: the negated velocity integrated (svf), else a fixed-point inverse."""
        if self.config.deformation == "svf":
            return self.transformer.integrate(-raw)
        return self.transformer.invert(raw)

    def warp(self, volume: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        return self.transformer.warp(volume, ddf)


class DeepAtlasModel(nn.Module):
    """``registration`` (F_R, :class:`RegistrationNet`) and ``segmentation`` (F_S, a plain segmenter of the
    library: (B, C, Z, Y, X) -> list of logit heads)."""

    uses_atlases = False

    def __init__(self, config: DeepAtlasConfig):
        super().__init__()
        self.config = config
        self.registration = RegistrationNet(config)
        self.segmentation = SegmenterNet(config.segmenter_config())


def build_model(config: DeepAtlasConfig) -> DeepAtlasModel:
    """A DeepAtlas model with untrained networks (``load_model`` fills in the weights)."""
    return DeepAtlasModel(config)


def save_common_grid(folder: str | Path, grid: CommonGrid) -> dict:
    """Write ``reference.safetensors`` (the reference on the common grid) and return its ``config.json`` entry."""
    tensors = {"image": grid.image.float()}
    if grid.fov is not None:
        tensors["fov"] = grid.fov.to(torch.uint8)
    digest = atomic_save_tensors(tensors, Path(folder) / REFERENCE)
    return {"file": REFERENCE, "sha256": digest, "reference_id": grid.reference_id,
            "geometry": grid.geometry.to_dict()}


def load_common_grid(loaded: LoadedModel) -> CommonGrid:
    """The common grid of a loaded DeepAtlas model folder, checked (file, checksum, shape, architecture)."""
    where = loaded.folder / CONFIG
    entry = loaded.config.get("common_grid")
    if not isinstance(entry, dict) or "geometry" not in entry:
        raise ModelFolderError(f"{where}: no 'common_grid' entry (not a DeepAtlas model folder written by this code?)")
    path = loaded.folder / str(entry.get("file", REFERENCE))
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing (the reference image of the DeepAtlas model)")
    if entry.get("sha256") and sha256(path) != entry["sha256"]:
        raise ModelFolderError(f"{path}: checksum does not match {CONFIG} (corrupted or replaced)")
    try:
        stored = load_file(str(path))
        image, fov = stored["image"], stored.get("fov")
        geometry = Geometry.from_dict(entry["geometry"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
        raise ModelFolderError(f"{path}: unreadable reference ({err!r})") from None
    arch = loaded.model.config
    if tuple(image.shape[1:]) != geometry.shape or image.shape[0] != arch.n_modalities:
        raise ModelFolderError(f"{path}: reference of shape {tuple(image.shape)} does not match the common grid "
                               f"{geometry.shape} with {arch.n_modalities} modality(ies) in {CONFIG}")
    if arch.grid_shape is not None and tuple(arch.grid_shape) != geometry.shape:
        raise ModelFolderError(f"{where}: common grid {geometry.shape} differs from the architecture's grid_shape "
                               f"{tuple(arch.grid_shape)}")
    if fov is not None and tuple(fov.shape) != geometry.shape:
        raise ModelFolderError(f"{path}: field-of-view mask of shape {tuple(fov.shape)} does not match the common "
                               f"grid {geometry.shape}")
    return CommonGrid(geometry, image.float(), str(entry.get("reference_id", "")),
                      None if fov is None else fov.bool())
