"""AtlasNet inference: S_i = T_i^-1(C_i(T_i(S))) for every atlas i, then fusion, all on the target grid.

T_i pulls the normalised target into atlas i's space through the inverse field of the registration of atlas i
to the target (lives on the atlas grid); C_i gives class probabilities there; T_i^-1 pulls them back through the
forward field (lives on the target grid), linearly, with everything outside the atlas grid background, and the
labels renormalised. The fusion is the mean of the N probability maps or a majority vote of their argmaxes.
Warps are computed in float64 (physical points and sampling, one channel and a slab of the grid at a time), so an
identity registration reproduces a network's output on the target to float32 precision.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..atlas import AtlasSet, check_target_images
from ..device import resolve_device
from ..fusion import FusionResult
from ..io import Geometry, label_pixel_type, tensor_to_image, write_image
from ..methods import map_kinds
from ..model_io import CONFIG, LoadedModel, ModelFolderError, check_compatible, load_model
from ..pipeline import SegmentationResult, write_run_record
from ..progress import Progress
from ..registration import DisplacementField, Registration, normalized_tensor, register, warp_image
from ..segmenter import predict
from .model import FUSIONS, AtlasNetModel, StoredAtlas, load_atlases

__all__ = ["AtlasNetPrediction", "AtlasNetResult", "choose_networks", "fuse_networks", "predict_atlasnet",
           "segment_atlasnet", "segment_method", "to_atlas_space", "to_target_space"]


# ---------------------------------------------------------------------------------------------------------
# warps


def to_atlas_space(target: torch.Tensor, target_geometry: Geometry, inverse: DisplacementField) -> torch.Tensor:
    """T_i: the normalised target (C, Z, Y, X) pulled onto the atlas grid through the inverse field (on the atlas
    grid, atlas point -> target point, mm) -> (C, Za, Ya, Xa) float32; linear, border values outside the target
    (as the registration cache's ``inverse`` images the networks are trained on)."""
    return warp_image(target, target_geometry, inverse, padding_mode="border", exact=True)


def to_target_space(probabilities: torch.Tensor, atlas_geometry: Geometry, forward: DisplacementField
                    ) -> torch.Tensor:
    """T_i^-1: class probabilities (L, Za, Ya, Xa) on the atlas grid pulled onto the target grid through the
    forward field (on the target grid, target point -> atlas point, mm) -> (L, Z, Y, X) float32; linear; where
    the target point falls outside the atlas grid the share outside is background (label index 0); every voxel
    renormalised to sum 1 over labels."""
    pulled = warp_image(probabilities, atlas_geometry, forward, padding_mode="zeros", exact=True)
    inside = warp_image(torch.ones((1, *probabilities.shape[1:]), device=probabilities.device), atlas_geometry,
                        forward, padding_mode="zeros", exact=True)[0]
    pulled[0] += 1.0 - inside
    pulled = pulled.clamp(min=0.0)
    return pulled / pulled.sum(0, keepdim=True).clamp(min=1e-12)


# ---------------------------------------------------------------------------------------------------------
# prediction and fusion


@dataclass
class AtlasNetPrediction:
    """Outputs on the target grid (CPU). ``probabilities``: fused (L, Z, Y, X) (vote: share of networks per
    label); ``network_probabilities``: (N, L, Z, Y, X) back-warped per network; ``network_index`` (N, Z, Y, X)
    and ``segmentation_index`` (Z, Y, X): label indices; ``agreement`` (Z, Y, X): share of networks whose argmax
    is the fused label; ``seconds``: networks and warps."""

    probabilities: torch.Tensor
    network_probabilities: torch.Tensor
    network_index: torch.Tensor
    segmentation_index: torch.Tensor
    agreement: torch.Tensor
    seconds: float


def fuse_networks(network_probabilities: torch.Tensor, fusion: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L, Z, Y, X) per-network probabilities -> fused (L, Z, Y, X) and label indices (Z, Y, X).

    ``mean``: mean probabilities, argmax. ``vote``: share of networks whose argmax is each label, argmax of the
    counts; ties go to the tied label of highest mean probability.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    mean = network_probabilities.mean(0)
    if fusion == "mean":
        return mean, mean.argmax(0)
    n, n_labels = network_probabilities.shape[:2]
    votes = F.one_hot(network_probabilities.argmax(1), n_labels).sum(0).movedim(-1, 0).to(mean.dtype)
    return votes / n, (2.0 * votes + mean).argmax(0)      # a vote outweighs any probability difference (< 1)


def predict_atlasnet(model: AtlasNetModel, target: torch.Tensor, target_geometry: Geometry,
                     atlas_geometries: Sequence[Geometry], registrations: Sequence[Registration],
                     roi_size: Sequence[int], overlap: float = 0.5, device: str | torch.device = "auto",
                     networks: Sequence[int] | None = None, fusion: str | None = None) -> AtlasNetPrediction:
    """The AtlasNet core on a registered target.

    Args:
        target: (C, Z, Y, X) normalised target on ``target_geometry``.
        atlas_geometries / registrations: per used network, its atlas grid and the registration of that atlas to
            the target (``forward`` on the target grid, ``inverse`` on the atlas grid).
        networks: which of the model's networks, in the order of ``registrations`` (default all, in order).
        roi_size / overlap: sliding windows of the networks (voxels, Z Y X).
        fusion: ``mean`` or ``vote`` (default: the model's).
    """
    networks = list(range(len(model.networks))) if networks is None else list(networks)
    if not len(networks) == len(registrations) == len(atlas_geometries):
        raise ValueError(f"{len(networks)} network(s), {len(registrations)} registration(s) and "
                         f"{len(atlas_geometries)} atlas grid(s): one of each per network")
    if not networks:
        raise ValueError("AtlasNet needs at least one network")
    dev = resolve_device(device)
    t0 = time.perf_counter()
    target = target.to(dev)
    per_network = []
    for k, geometry, reg in zip(networks, atlas_geometries, registrations):
        moved = to_atlas_space(target, target_geometry, reg.inverse)
        probabilities, _ = predict(model.networks[k], moved.cpu(), roi_size, overlap, dev)
        per_network.append(to_target_space(probabilities.to(dev), geometry, reg.forward).cpu())
    stacked = torch.stack(per_network)
    fused, index = fuse_networks(stacked, fusion or model.config.fusion)
    network_index = stacked.argmax(1)
    agreement = (network_index == index[None]).float().mean(0)
    return AtlasNetPrediction(fused, stacked, network_index, index, agreement, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------------
# result


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


@dataclass
class AtlasNetResult(SegmentationResult):
    """AtlasNet's output on the target grid: the fused segmentation and probabilities (``fusion``), per network
    the back-warped probabilities and segmentation, and the agreement of the networks with the fused label.

    ``warped_labels`` holds the per-network segmentations (N, Z, Y, X) label values; ``atlas_ids`` the atlas of
    each network in that order; ``network_indices`` the networks' indices in the model.
    """

    network_probabilities: torch.Tensor | None = None     # (N, L, Z, Y, X) float32
    agreement: torch.Tensor | None = None                 # (Z, Y, X) float32
    network_indices: list[int] | None = None
    fusion_rule: str = "mean"
    model_folder: str = ""

    @property
    def network_segmentations(self) -> torch.Tensor:
        """(N, Z, Y, X) label values of every network (back-warped)."""
        return self.warped_labels

    def agreement_map(self) -> sitk.Image:
        """Share of the networks whose own segmentation is the fused label (0..1)."""
        return tensor_to_image(self.agreement.float(), self.geometry)

    def save(self, out_dir: str | Path, maps=False, transforms: bool = False,
             reference: sitk.Image | None = None, oracle_fraction: float = 0.10) -> dict[str, str]:
        """``segmentation.nii.gz``; with ``maps`` (True: all; else the kinds of
        :data:`atlasseg.methods.MAP_KINDS`): ``probabilities``: ``maps/probability_fused_<label>_<name>``;
        ``networks``: ``maps/probability_<net>_<label>_<name>`` (net = network index) and
        ``maps/segmentation_<net>``; ``agreement``: ``maps/agreement``; ``oracle`` (with a ``reference``):
        ``maps/oracle_coverage``, where at least ``oracle_fraction`` of the networks give the reference label.
        With ``transforms`` the fields of every registration; ``run.json`` last. All on the target grid."""
        out = Path(out_dir)
        kinds = map_kinds(maps)
        written = {"segmentation": str(write_image(self.segmentation, out / "segmentation.nii.gz"))}
        indices = self.network_indices or list(range(len(self.atlas_ids)))
        names = {v: _safe(self.label_names.get(v, f"label{v}")) for v in self.fusion.labels}
        if "probabilities" in kinds:
            for i, v in enumerate(self.fusion.labels):
                image = tensor_to_image(self.fusion.posteriors[i].float(), self.geometry)
                path = out / "maps" / f"probability_fused_{v}_{names[v]}.nii.gz"
                written[f"probability_fused_{v}"] = str(write_image(image, path))
        if "networks" in kinds:
            for row, net in enumerate(indices):
                for i, v in enumerate(self.fusion.labels):
                    image = tensor_to_image(self.network_probabilities[row, i].float(), self.geometry)
                    path = out / "maps" / f"probability_{net}_{v}_{names[v]}.nii.gz"
                    written[f"probability_{net}_{v}"] = str(write_image(image, path))
                seg = self.warped_labels[row]
                image = tensor_to_image(seg.to(torch.int32), self.geometry, label_pixel_type(int(seg.max())))
                written[f"segmentation_{net}"] = str(write_image(image, out / "maps" / f"segmentation_{net}.nii.gz"))
        if "agreement" in kinds:
            written["agreement"] = str(write_image(self.agreement_map(), out / "maps" / "agreement.nii.gz"))
        if "oracle" in kinds and reference is not None:   # share of networks carrying the reference label
            image, summary = self.oracle(reference, oracle_fraction)
            written["oracle"] = str(write_image(image, out / "maps" / "oracle_coverage.nii.gz"))
            (out / "maps" / "oracle_coverage.json").write_text(json.dumps(
                {"fraction": oracle_fraction, "coverage": {str(k): v for k, v in summary.items()}}, indent=2))
        if transforms:
            for net, atlas_id, reg in zip(indices, self.atlas_ids, self.registrations):
                reg.save(out / "transforms", f"{net}_{_safe(atlas_id)}")
        write_run_record(out, {"method": "atlasnet", "model": self.model_folder, "atlases": self.atlas_ids,
                               "networks": [{"index": n, "atlas": a} for n, a in zip(indices, self.atlas_ids)],
                               "fusion": self.fusion_rule, "labels": self.label_names,
                               "timings_s": self.timings, "files": written})
        return written


# ---------------------------------------------------------------------------------------------------------
# segmentation of a target


def choose_networks(model_atlases: Sequence[str], n_atlases: int | None = None,
                    atlas_ids: Sequence[str] | None = None, exclude: Sequence[str] = (), where: str = "") -> list[int]:
    """Indices of the networks to use: those of ``atlas_ids`` (each must be one of the model's atlases), else
    all but ``exclude``; then the first ``n_atlases`` of them."""
    ids = [str(a) for a in model_atlases]
    if atlas_ids:
        missing = [a for a in atlas_ids if a not in ids]
        if missing:
            raise ValueError(f"{where}atlas id(s) {missing} are not atlases of the AtlasNet model (it has {ids})")
        chosen = [ids.index(a) for a in atlas_ids]
    else:
        chosen = [k for k, a in enumerate(ids) if a not in set(exclude)]
    if not chosen:
        raise ValueError(f"{where}no network left: the model's atlases {ids} are all excluded")
    if n_atlases is not None:
        if not 1 <= n_atlases <= len(chosen):
            raise ValueError(f"{where}n_atlases={n_atlases}: the AtlasNet model has {len(chosen)} usable network(s)")
        chosen = chosen[:n_atlases]
    return chosen


def segment_atlasnet(target: Sequence[sitk.Image], atlas_set: AtlasSet | None, model: str | Path | LoadedModel,
                     n_atlases: int | None = None, atlas_ids: Sequence[str] | None = None,
                     exclude: Sequence[str] = (), backend: str | None = None, device: str = "auto",
                     preset: str | None = None, seed: int = 0, maps: bool = False, overlap: float = 0.5,
                     show_progress: bool = True, fusion: str | None = None,
                     registration_params: dict | None = None, atlases: Sequence[StoredAtlas] | None = None
                     ) -> AtlasNetResult:
    """Segment a target with a trained AtlasNet model; the atlases come from the model folder.

    Args:
        target: the target's modality images (the model's modalities, in order).
        atlas_set: only checked against the model's labels and modalities (None: not checked).
        n_atlases / atlas_ids / exclude: which networks (see :func:`choose_networks`; default all).
        backend / preset: registration (default: those the model was trained with); device: "auto" = CUDA
            when present.
        fusion: ``mean`` / ``vote`` (default: the model's). ``seed`` and ``maps`` are accepted for the registry's
            signature (every map is kept anyway).
        atlases: the model's atlases already loaded (skips reading ``atlases.safetensors``).
    """
    check_target_images(target)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, "cpu", method="atlasnet")
    where = f"{loaded.folder / CONFIG}: "
    check_compatible(loaded, atlas_set, len(target))
    stored = list(atlases) if atlases is not None else load_atlases(loaded.folder, loaded.config)
    if len(stored) != len(loaded.model.networks):
        raise ModelFolderError(f"{where}{len(stored)} atlases for {len(loaded.model.networks)} networks")
    chosen = choose_networks([a.atlas_id for a in stored], n_atlases, atlas_ids, exclude, where)
    reg = loaded.config.get("registration", {})
    progress = Progress([("load", 0.05), ("registration", 0.6), ("networks", 0.35)], enabled=show_progress)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    dev = resolve_device(device)
    image = normalized_tensor(target)
    geometry = Geometry.of(target[0])
    timings["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    regs = register(target, [stored[k].images() for k in chosen], backend=backend or reg.get("backend", "torch"),
                    device=dev, preset=preset or reg.get("preset", "default"),
                    progress=progress.stage("registration"), **(registration_params or {}))
    timings["registration"] = time.perf_counter() - t0
    progress.stage("networks")(0.0, f"{len(chosen)} AtlasNet network(s)")
    roi = loaded.config.get("patch_size") or [max(8, s) for s in image.shape[1:]]
    prediction = predict_atlasnet(loaded.model, image, geometry, [stored[k].geometry for k in chosen], regs, roi,
                                  overlap, dev, chosen, fusion)
    timings["networks"] = prediction.seconds
    progress.done("AtlasNet done")
    labels = sorted(loaded.labels)
    lab_t = torch.tensor(labels, dtype=torch.int64)
    fused = FusionResult(lab_t[prediction.segmentation_index], prediction.probabilities.float(), None, "atlasnet",
                         labels)
    return AtlasNetResult(geometry, fused, [stored[k].atlas_id for k in chosen], dict(loaded.labels),
                          lab_t[prediction.network_index], list(regs), timings,
                          network_probabilities=prediction.network_probabilities, agreement=prediction.agreement,
                          network_indices=chosen, fusion_rule=fusion or loaded.model.config.fusion,
                          model_folder=str(loaded.folder))


segment_method = segment_atlasnet
