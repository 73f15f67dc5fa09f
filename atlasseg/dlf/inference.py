"""DLF inference: sliding windows over the target and its N warped atlases; outputs on the target grid."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference

from ..atlas import AtlasSet, LoadedCase, check_target_images
from ..device import resolve_device
from ..fusion import FusionResult, labels_to_index
from ..inference import prediction_region, uncrop
from ..io import label_pixel_type, tensor_to_image, write_image
from ..methods import map_kinds
from ..model_io import LoadedModel, check_compatible, load_model
from ..pipeline import PreparedAtlases, SegmentationResult, atlas_pool, prepare
from ..progress import Progress
from .networks import coordinate_maps


@dataclass
class DLFPrediction:
    """Whole-volume outputs (CPU tensors). ``probabilities``, ``initial`` (vote-fused probabilities) and ``votes``
    are (L, Z, Y, X); ``weights`` (N, L, Z, Y, X) or None; segmentations are label *indices* (Z, Y, X)."""

    probabilities: torch.Tensor
    initial: torch.Tensor
    votes: torch.Tensor | None
    weights: torch.Tensor | None
    seconds: float

    @property
    def segmentation_index(self) -> torch.Tensor:
        return self.probabilities.argmax(0)

    @property
    def initial_index(self) -> torch.Tensor:
        return self.initial.argmax(0)


def predict(model: torch.nn.Module, target: torch.Tensor, atlas_images: torch.Tensor,
            atlas_label_index: torch.Tensor, roi_size: Sequence[int], overlap: float = 0.5,
            with_weights: bool = False, device: str | torch.device = "auto", sw_batch_size: int = 1,
            crop: bool = True) -> DLFPrediction:
    """Sliding-window DLF over a whole target.

    Args:
        target: (C, Z, Y, X) normalised; atlas_images (N, C, Z, Y, X); atlas_label_index (N, Z, Y, X) indices
            (both None for the plain U-Net).
        roi_size: window (Z, Y, X) in voxels (a multiple of the U-Nets' downsampling avoids padding); windows
            overlap by ``overlap``
            and are blended with Gaussian weights; coordinate maps span the whole target.
        with_weights: also return the per-atlas, per-label voting weights (N x L volumes).
        crop: run the windows only over :func:`prediction_region` (the rest is background); ignored with
            ``with_weights``, whose maps cover the whole target.
    """
    dev = resolve_device(device)
    config = model.config
    model = model.to(dev).eval()
    c = target.shape[0]
    spatial = tuple(target.shape[1:])
    n = atlas_images.shape[0]
    if n < 1:
        raise ValueError("Deep Label Fusion needs at least one warped atlas")
    parts = [target.float(), coordinate_maps(spatial), atlas_images.reshape(n * c, *spatial).float(),
             atlas_label_index.float()]
    packed = torch.cat(parts)[None]
    region = (slice(None),) * 3
    if crop and not with_weights:
        region = prediction_region(target, atlas_label_index if config.use_mask else None, roi_size)
        packed = packed[(slice(None), slice(None)) + region]

    def window(x: torch.Tensor) -> dict[str, torch.Tensor]:
        t, coords = x[:, :c], x[:, c:c + 3]
        a = x[:, c + 3:c + 3 + n * c].reshape(x.shape[0], n, c, *x.shape[2:])
        lab = x[:, c + 3 + n * c:].round().long()
        out = model(t, a, lab, coords)
        result = {"probabilities": torch.softmax(out.logits, 1), "initial": out.initial}
        if out.votes is not None:
            result["votes"] = out.votes
        if with_weights and out.weights is not None:
            result["weights"] = out.weights.flatten(1, 2)
        return result

    t0 = time.perf_counter()
    with torch.no_grad():
        out = sliding_window_inference(packed, tuple(int(r) for r in roi_size), sw_batch_size, window,
                                       overlap=overlap, mode="gaussian", sw_device=dev, device=torch.device("cpu"))
    seconds = time.perf_counter() - t0
    weights = out.get("weights")
    if weights is not None:
        weights = weights[0].reshape(n, config.n_labels, *spatial)
    maps = {k: uncrop(out[k][0], region, spatial) for k in ("probabilities", "initial", "votes") if k in out}
    return DLFPrediction(maps["probabilities"], maps["initial"], maps.get("votes"), weights, seconds)


@dataclass
class DLFSegmentationResult(SegmentationResult):
    """A :class:`SegmentationResult` with DLF's extra outputs: the initial (vote-fused) segmentation, the votes
    and the per-atlas, per-label weights (all on the target grid)."""

    initial_segmentation: torch.Tensor | None = None     # (Z, Y, X) label values
    votes: torch.Tensor | None = None                    # (L, Z, Y, X)
    label_weights: torch.Tensor | None = None            # (N, L, Z, Y, X)
    model_folder: str = ""

    def vote_maps(self) -> dict[int, sitk.Image]:
        """Per-label DLF votes (weighted votes averaged over atlases)."""
        votes = self.votes if self.votes is not None else self.fusion.posteriors
        return {v: tensor_to_image(votes[i].float(), self.geometry) for i, v in enumerate(self.fusion.labels)}

    def weight_maps(self) -> dict[str, sitk.Image]:
        """Per-atlas, per-label weights, keyed ``<atlas>_<label>_<name>``."""
        if self.label_weights is None:
            return {}
        out = {}
        for k, atlas in enumerate(self.atlas_ids):
            for i, v in enumerate(self.fusion.labels):
                name = self.label_names.get(v, f"label{v}")
                out[f"{atlas}_{v}_{name}"] = tensor_to_image(self.label_weights[k, i].float(), self.geometry)
        return out

    def save_extra(self, out: Path, maps: frozenset[str]) -> dict[str, str]:
        """The initial (vote-fused) segmentation and, with the ``probabilities`` map kind, the final
        probabilities."""
        written = {}
        if self.initial_segmentation is not None:
            seg = self.initial_segmentation
            image = tensor_to_image(seg.to(torch.int32), self.geometry, label_pixel_type(int(seg.max())))
            written["initial_segmentation"] = str(write_image(image, out / "initial_segmentation.nii.gz"))
        if "probabilities" in maps:
            written.update(self.save_probability_maps(out))
        return written

    def run_fields(self) -> dict:
        return {"model": self.model_folder}


def result_from_prediction(prepared: PreparedAtlases, prediction: DLFPrediction, labels: Sequence[int],
                           model_folder: str = "") -> DLFSegmentationResult:
    lab_t = torch.tensor(list(labels), dtype=torch.int64)
    fusion = FusionResult(lab_t[prediction.segmentation_index], prediction.probabilities.float(), None, "dlf",
                          list(labels))
    timings = dict(prepared.timings, fusion=prediction.seconds)
    return DLFSegmentationResult(prepared.geometry, fusion, prepared.atlas_ids, prepared.label_names,
                                 prepared.labels.cpu(), prepared.registrations, timings,
                                 initial_segmentation=lab_t[prediction.initial_index], votes=prediction.votes,
                                 label_weights=prediction.weights, model_folder=model_folder)


def segment_dlf(target: Sequence[sitk.Image], atlas_set: AtlasSet, model: str | Path | LoadedModel,
                n_atlases: int | None = None, atlas_ids: Sequence[str] | None = None, exclude: Sequence[str] = (),
                backend: str | None = None, device: str = "auto", preset: str | None = None, seed: int = 0,
                maps: bool = False, overlap: float = 0.5, show_progress: bool = True,
                atlases: Sequence[LoadedCase] | None = None) -> DLFSegmentationResult:
    """Register N atlases to the target with the engine's pipeline, then run the DLF model over it.

    ``n_atlases`` defaults to the number the model was trained with (the whole pool where that is smaller; more
    than the pool is an error); ``backend`` / ``preset`` default to the registration settings it was trained with.
    ``maps`` (True, or kinds including ``weights``) keeps the per-atlas weight maps (N x L volumes).
    """
    check_target_images(target)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, "cpu", method="dlf")
    check_compatible(loaded, atlas_set, len(target))
    reg = loaded.config.get("registration", {})
    progress = Progress([("load", 0.05), ("registration", 0.7), ("warp", 0.05), ("fusion", 0.2)],
                        enabled=show_progress)
    if n_atlases is None:        # the model's count, or the whole pool where it is smaller
        n_atlases = max(1, min(int(loaded.config["n_atlases"]), len(atlas_pool(atlas_set, exclude))))
    prepared = prepare(target, atlas_set, n_atlases, atlas_ids, exclude,
                       backend or reg.get("backend", "torch"), device, preset or reg.get("preset", "default"),
                       None, seed, atlases, progress)
    progress.stage("fusion")(0.0, "deep label fusion")
    labels = sorted(loaded.labels)
    index = labels_to_index(prepared.labels, labels).long().cpu()
    roi = loaded.config.get("patch_size") or [max(8, s) for s in prepared.target.shape[1:]]
    prediction = predict(loaded.model, prepared.target.cpu(), prepared.images.cpu(), index, roi, overlap,
                         with_weights="weights" in map_kinds(maps), device=device)
    progress.done("deep label fusion done")
    return result_from_prediction(prepared, prediction, labels, str(loaded.folder))
