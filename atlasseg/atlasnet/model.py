"""AtlasNet's architecture (:class:`AtlasNetConfig`), its model (:class:`AtlasNetModel`: one plain segmenter per
atlas) and the atlases stored beside the weights (``atlases.safetensors``).

The atlases are kept in a file of their own rather than as buffers of the model: each atlas has its own grid,
so buffers would have shapes that :func:`build_model` cannot know from the architecture alone (``load_model``
loads weights strictly into an empty model). ``config.json`` records the file's sha256, the atlas ids in network
order and every atlas's geometry.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..config import dataclass_from, to_dict
from ..io import Geometry, atomic_save_tensors, sha256, tensor_to_image
from ..model_io import CONFIG, ModelFolderError
from ..segmenter import SegmenterConfig, SegmenterNet

__all__ = ["ATLASES", "DISSIMILARITIES", "FUSIONS", "SELECTIONS", "AtlasNetConfig", "AtlasNetModel",
           "StoredAtlas", "build_model", "load_atlases", "save_atlases"]

ATLASES = "atlases.safetensors"
SELECTIONS = ("kmedoids", "given")
DISSIMILARITIES = ("lncc", "dice")
FUSIONS = ("mean", "vote")


@dataclass
class AtlasNetConfig:
    """Architecture of an AtlasNet model; stored in ``config.json``.

    ``n_networks``: number of atlases N, one network per atlas space. ``atlas_ids``: the atlases' case ids in
    network order; empty: chosen by ``selection`` at training (a trained model's config lists the chosen ones).
    ``selection``: ``"kmedoids"`` (PAM on a pairwise ``dissimilarity`` among at most ``selection_pool`` training
    cases, after registration) or ``"given"`` (``atlas_ids`` required). ``dissimilarity``: ``"lncc"`` (1 - local
    normalised cross-correlation of the registered images, 7-voxel windows) or ``"dice"`` (1 - mean foreground
    Dice of the registered labels). ``backbone`` / ``backbone_preset`` / ``backbone_kwargs`` /
    ``deep_supervision_weights`` / ``boundary_weight``: every network's segmenter, as in
    :class:`~atlasseg.segmenter.SegmenterConfig`. ``fusion``: ``"mean"`` of the N back-warped probability maps or
    ``"vote"`` (majority of the N per-network argmaxes; ties go to the label of highest mean probability).
    """

    n_labels: int
    n_modalities: int = 1
    n_networks: int = 5
    atlas_ids: tuple[str, ...] = ()
    selection: str = "kmedoids"
    dissimilarity: str = "lncc"
    selection_pool: int = 20
    backbone: str = "unet"
    backbone_preset: str | None = "cpu"
    backbone_kwargs: dict = field(default_factory=dict)
    deep_supervision_weights: tuple[float, ...] = (1.0, 0.5, 0.2)
    boundary_weight: float = 1.0
    fusion: str = "mean"

    def __post_init__(self):
        if isinstance(self.atlas_ids, str):
            self.atlas_ids = (self.atlas_ids,)
        self.atlas_ids = tuple(str(a) for a in self.atlas_ids)
        self.deep_supervision_weights = tuple(float(w) for w in self.deep_supervision_weights)
        self.backbone_kwargs = dict(self.backbone_kwargs or {})
        if int(self.n_networks) != self.n_networks or self.n_networks < 1:
            raise ValueError(f"n_networks must be a positive integer, got {self.n_networks!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.dissimilarity not in DISSIMILARITIES:
            raise ValueError(f"dissimilarity must be one of {', '.join(DISSIMILARITIES)}, got "
                             f"{self.dissimilarity!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if len(set(self.atlas_ids)) != len(self.atlas_ids):
            raise ValueError(f"atlas_ids must be distinct, got {list(self.atlas_ids)}")
        if self.selection == "given" and not self.atlas_ids:
            raise ValueError("selection 'given' needs atlas_ids (the atlases' case ids)")
        if self.atlas_ids and len(self.atlas_ids) != self.n_networks:
            raise ValueError(f"{len(self.atlas_ids)} atlas_ids {list(self.atlas_ids)} for n_networks="
                             f"{self.n_networks}: give one id per network")
        if self.selection_pool < self.n_networks:
            raise ValueError(f"selection_pool ({self.selection_pool}) must be at least n_networks "
                             f"({self.n_networks})")
        self.segmenter_config()     # labels, modalities, backbone and preset are checked there

    def segmenter_config(self) -> SegmenterConfig:
        """The plain segmenter every network of the model is."""
        return SegmenterConfig(self.n_labels, self.n_modalities, self.backbone, self.backbone_preset,
                               dict(self.backbone_kwargs), self.deep_supervision_weights, self.boundary_weight)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AtlasNetConfig:
        return dataclass_from(cls, d, where="architecture")


class AtlasNetModel(nn.Module):
    """N plain segmenters, network ``k`` working in atlas ``k``'s space (``config.atlas_ids[k]``).

    ``forward(image, k)``: network k on a (B, C, Z, Y, X) normalised image in atlas k's space -> list of heads,
    each (B, L, Z, Y, X) logits (full resolution first).
    """

    uses_atlases = True

    def __init__(self, config: AtlasNetConfig):
        super().__init__()
        self.config = config
        self.networks = nn.ModuleList(SegmenterNet(config.segmenter_config()) for _ in range(config.n_networks))

    def forward(self, image: torch.Tensor, k: int) -> list[torch.Tensor]:
        return self.networks[k](image)


def build_model(config: AtlasNetConfig) -> AtlasNetModel:
    """An AtlasNet model with untrained networks (``load_model`` fills in the weights)."""
    return AtlasNetModel(config)


# ---------------------------------------------------------------------------------------------------------
# the atlases stored with the model


@dataclass
class StoredAtlas:
    """One atlas of a model: normalised image (C, Z, Y, X) float32 and label indices (Z, Y, X) int64 on its
    own grid ``geometry`` (label index i = the model's i-th sorted label value)."""

    atlas_id: str
    image: torch.Tensor
    label: torch.Tensor
    geometry: Geometry

    def images(self) -> list[sitk.Image]:
        """The normalised channels as SimpleITK images on the atlas grid (for registration)."""
        return [tensor_to_image(self.image[c].float(), self.geometry) for c in range(self.image.shape[0])]


def save_atlases(folder: str | Path, atlases: Sequence[StoredAtlas]) -> dict:
    """Write ``atlases.safetensors`` (tensors ``image_<k>`` float32, ``label_<k>`` uint8/int16) atomically and
    return its entry for ``config.json``: file name, sha256 and per atlas its id and geometry."""
    n_index = max(int(a.label.max()) for a in atlases) + 1 if atlases else 1
    dtype = torch.uint8 if n_index <= 256 else torch.int16
    tensors = {}
    for k, a in enumerate(atlases):
        tensors[f"image_{k}"] = a.image.float()
        tensors[f"label_{k}"] = a.label.to(dtype)
    digest = atomic_save_tensors(tensors, Path(folder) / ATLASES)
    return {"file": ATLASES, "sha256": digest,
            "cases": [{"id": a.atlas_id, "geometry": a.geometry.to_dict()} for a in atlases]}


def load_atlases(folder: str | Path, config: dict) -> list[StoredAtlas]:
    """The atlases of a model folder, in network order, checked against ``config.json`` (checksum, ids, shapes).

    Raises :class:`~atlasseg.model_io.ModelFolderError` naming the file for a missing, corrupted or mismatched
    atlases file or config entry.
    """
    folder = Path(folder)
    entry = config.get("atlases")
    where = folder / CONFIG
    if not isinstance(entry, dict) or not isinstance(entry.get("cases"), list):
        raise ModelFolderError(f"{where}: no 'atlases' entry (not an AtlasNet model folder written by this code?)")
    path = folder / str(entry.get("file", ATLASES))
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing (the atlases of the AtlasNet model)")
    if entry.get("sha256") and sha256(path) != entry["sha256"]:
        raise ModelFolderError(f"{path}: checksum does not match {CONFIG} (corrupted or replaced)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ModelFolderError(f"{path}: unreadable safetensors file ({err})") from None
    ids = list(config.get("architecture", {}).get("atlas_ids", []))
    cases = entry["cases"]
    if [str(c.get("id")) for c in cases] != [str(i) for i in ids]:
        raise ModelFolderError(f"{where}: atlases {[c.get('id') for c in cases]} do not match the architecture's "
                               f"atlas_ids {ids}")
    out = []
    for k, case in enumerate(cases):
        try:
            geometry = Geometry.from_dict(case["geometry"])
            image, label = tensors[f"image_{k}"], tensors[f"label_{k}"].long()
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFolderError(f"{path}: atlas {k} ({case.get('id')}) incomplete ({err!r})") from None
        if tuple(image.shape[1:]) != geometry.shape or tuple(label.shape) != geometry.shape:
            raise ModelFolderError(f"{path}: atlas {case['id']} arrays {tuple(image.shape)} do not match its "
                                   f"grid {geometry.shape} in {CONFIG}")
        out.append(StoredAtlas(str(case["id"]), image, label, geometry))
    return out


def read_json(path: Path) -> dict:
    """A JSON file as a dict (model folders of the networks)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{path}: unreadable ({err})") from None
