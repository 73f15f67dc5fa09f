"""The plain segmenter: any backbone of :mod:`atlasseg.networks` trained on the images alone (no atlases at
inference). It is the baseline every atlas-based method is compared with, and it replaces DLF's former
``kind="unet"``: with the U-Net of the DLF fine-tuning subnet it trains and predicts exactly as that did.

>>> from atlasseg.segmenter import SegmenterConfig, train_segmenter, segment_segmenter
>>> train_segmenter(atlas_set, "model", SegmenterConfig(n_labels=3, backbone="vnet"), TrainConfig(epochs=16))
>>> segment_segmenter(target_images, atlas_set, "model").save("out", maps=True)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from ..atlas import AtlasSet, check_target_images
from ..config import dataclass_from, to_dict
from ..device import resolve_device
from ..fusion import FusionResult, labels_to_index
from ..inference import prediction_region, uncrop
from ..io import Geometry, image_to_tensor, write_image
from ..losses import deep_supervision_loss, make_loss, median_frequency_weights_from_labels
from ..methods import map_kinds
from ..model_io import LoadedModel, check_compatible, legacy_unet_architecture, load_model, save_model
from ..networks import BackboneSpec, as_heads, build_backbone
from ..pipeline import SegmentationResult, write_run_record
from ..progress import Progress
from ..registration import normalized_tensor
from ..training import Augmenter, CaseTensors, TrainConfig, Trainer, TrainingError, TrainResult, sample_patch

__all__ = ["SegmenterConfig", "SegmenterNet", "SegmenterTrainer", "build_model", "predict", "segment_method",
           "segment_segmenter", "train_method", "train_segmenter"]


@dataclass
class SegmenterConfig:
    """Architecture of a plain segmenter; stored in ``config.json``.

    ``backbone`` / ``backbone_preset`` / ``backbone_kwargs``: a backbone of :mod:`atlasseg.networks` by name, one
    of its presets (None: the class defaults) and arguments overriding the preset's. ``deep_supervision_weights``:
    loss weights of the full-resolution output and the coarser heads (backbones without deep supervision use
    the first only). ``boundary_weight``: weight of the weighted-BCE loss on the label-boundary channels of
    backbones that predict them (Res-UNet-R/H); the boundary channels are not used at inference.
    """

    n_labels: int
    n_modalities: int = 1
    backbone: str = "unet"
    backbone_preset: str | None = "cpu"
    backbone_kwargs: dict = field(default_factory=dict)
    deep_supervision_weights: tuple[float, ...] = (1.0, 0.5, 0.2)
    boundary_weight: float = 1.0

    def __post_init__(self):
        self.deep_supervision_weights = tuple(float(w) for w in self.deep_supervision_weights)
        if self.n_labels < 2:
            raise ValueError(f"n_labels must be at least 2 (background and one label), got {self.n_labels}")
        if self.n_modalities < 1:
            raise ValueError(f"n_modalities must be at least 1, got {self.n_modalities}")
        self.spec()      # unknown backbones and presets fail here

    @classmethod
    def plain_unet(cls, channels: Sequence[int], n_labels: int = 5, n_modalities: int = 1,
                   norm: str = "instance") -> SegmenterConfig:
        """The former ``kind="unet"`` baseline: the project U-Net with the given channels, no preset."""
        return cls(n_labels, n_modalities, "unet", None, {"channels": list(channels), "norm": norm})

    def spec(self) -> BackboneSpec:
        return BackboneSpec(self.backbone, self.backbone_preset, self.backbone_kwargs)

    def deep_supervision_heads(self) -> int:
        return self.spec().deep_supervision_heads(len(self.deep_supervision_weights))

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SegmenterConfig:
        return dataclass_from(cls, d, where="architecture")


class SegmenterNet(nn.Module):
    """A backbone on the target's modalities: (B, C, Z, Y, X) -> list of heads, each (B, L [+ boundary], ...)."""

    uses_atlases = False

    def __init__(self, config: SegmenterConfig):
        super().__init__()
        self.config = config
        heads = config.deep_supervision_heads()
        self.net = build_backbone(config.spec(), config.n_modalities, config.n_labels,
                                  **({"deep_supervision": heads} if heads else {}))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return as_heads(self.net(image))


def build_model(config: SegmenterConfig) -> SegmenterNet:
    return SegmenterNet(config)


def boundary_target(label: torch.Tensor) -> torch.Tensor:
    """(B, 1, Z, Y, X) label indices -> float (B, 1, ...) 1 where a 6-neighbour carries another label."""
    lab = label.float()
    pad = torch.nn.functional.pad(lab, (1, 1, 1, 1, 1, 1), mode="replicate")
    core = pad[..., 1:-1, 1:-1, 1:-1]
    diff = torch.zeros_like(lab, dtype=torch.bool)
    for axis in (2, 3, 4):
        for shift in (0, 2):
            sl = [slice(None)] * 5
            for a in (2, 3, 4):
                sl[a] = slice(shift, shift + lab.shape[a]) if a == axis else slice(1, 1 + lab.shape[a])
            diff |= pad[tuple(sl)] != core
    return diff.float()


def predict(model: SegmenterNet, target: torch.Tensor, roi_size: Sequence[int], overlap: float = 0.5,
            device: str | torch.device = "auto", sw_batch_size: int = 1, crop: bool = True
            ) -> tuple[torch.Tensor, float]:
    """Sliding windows (Gaussian blending) over a (C, Z, Y, X) normalised target -> (L, Z, Y, X) class
    probabilities and seconds. ``crop``: windows only over the box where the image has content
    (:func:`atlasseg.inference.prediction_region`); background elsewhere."""
    dev = resolve_device(device)
    model = model.to(dev).eval()
    n_labels = model.config.n_labels
    spatial = tuple(target.shape[1:])
    region = prediction_region(target, None, roi_size) if crop else (slice(None),) * 3
    packed = target.float()[None][(slice(None), slice(None)) + region]

    def window(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(x)[0][:, :n_labels], 1)

    t0 = time.perf_counter()
    with torch.no_grad():
        out = sliding_window_inference(packed, tuple(int(r) for r in roi_size), sw_batch_size, window,
                                       overlap=overlap, mode="gaussian", sw_device=dev, device=torch.device("cpu"))
    return uncrop(out[0], region, spatial), time.perf_counter() - t0


class SegmenterTrainer(Trainer):
    """A plain segmenter on :class:`~atlasseg.training.Trainer`: target patches, the method's loss (+ deep
    supervision, + weighted BCE on boundary channels)."""

    method = "segmenter"

    def __init__(self, atlas_set: AtlasSet, output: str | Path, architecture: SegmenterConfig, config: TrainConfig,
                 device: str = "auto", train_ids: Sequence[str] | None = None, log: Callable[[str], None] = print,
                 show_progress: bool = True):
        super().__init__(atlas_set, output, config, device, train_ids, log, show_progress)
        if architecture.n_labels != self.n_labels or architecture.n_modalities != len(atlas_set.modalities):
            raise TrainingError(f"architecture for {architecture.n_labels} labels / {architecture.n_modalities} "
                                f"modalities, atlas set '{atlas_set.name}' has {self.n_labels} / "
                                f"{len(atlas_set.modalities)}")
        self.architecture = architecture

    def build_model(self) -> nn.Module:
        return build_model(self.architecture)

    def architecture_dict(self) -> dict:
        return self.architecture.to_dict()

    def _load(self, case_id: str, progress, k: int, total: int) -> CaseTensors:
        if progress:
            progress(k / total, f"loading {case_id}")
        case = self.atlas_set.load(case_id)
        spatial = tuple(reversed(case.images[0].GetSize()))
        label = labels_to_index(image_to_tensor(case.label, torch.int64), self.atlas_set.label_values)[0].long()
        return CaseTensors(case_id, normalized_tensor(case.images), label, [],
                           torch.zeros((0, len(case.images), *spatial)), torch.zeros((0, *spatial), dtype=torch.int64))

    def prepare_data(self, progress=None) -> None:
        ids = self.train_ids + self.val_ids
        cases = [self._load(c, progress, k, len(ids)) for k, c in enumerate(ids)]
        self.train_cases, self.val_cases = cases[:len(self.train_ids)], cases[len(self.train_ids):]
        weights = None
        if self.config.loss == "ce_mfb":
            weights = median_frequency_weights_from_labels([c.label for c in self.train_cases], self.n_labels)
            self.log(f"median-frequency class weights: {[round(float(w), 3) for w in weights]}")
        self.loss_fn = make_loss(self.config.loss, weights)

    def make_batch(self, case: CaseTensors, rng: np.random.Generator, augmenter: Augmenter) -> dict:
        coords = torch.zeros((3, *case.target.shape[1:]))   # the sampler and augmenter carry them; unused here
        sample = sample_patch(case, coords, [], self.config.patch_size, self.config.foreground_ratio, rng)
        sample = augmenter(sample)
        return {k: sample[k][None].to(self.device) for k in ("target", "label")}

    def compute_loss(self, model, batch) -> torch.Tensor:
        heads = model(batch["target"])
        n = self.n_labels
        loss = deep_supervision_loss(self.loss_fn, [h[:, :n] for h in heads], batch["label"],
                                     self.architecture.deep_supervision_weights)
        if heads[0].shape[1] > n and self.architecture.boundary_weight:
            from ..instances import weighted_bce

            edges = boundary_target(batch["label"]).expand_as(heads[0][:, n:])
            loss = loss + self.architecture.boundary_weight * weighted_bce(heads[0][:, n:], edges)
        return loss

    def predict_index(self, model, case: CaseTensors) -> torch.Tensor:
        probabilities, _ = predict(model, case.target, self.config.patch_size, self.config.overlap, self.device)
        return probabilities.argmax(0)

    def comparable_identity(self, identity: dict) -> dict:
        """Atlas-sampling settings do not change a segmenter's training: a model trained beside one DLF
        configuration is reused beside another. A format-1 checkpoint of DLF's plain U-Net (``kind="unet"``) is
        this method with that U-Net."""
        training = {k: v for k, v in identity.get("training", {}).items()
                    if k not in ("n_atlases", "candidates_per_target")}
        arch = identity.get("architecture", {})
        if arch.get("kind") == "unet":
            arch = legacy_unet_architecture(arch)
        return {**identity, "method": "segmenter", "training": training, "architecture": arch}

    def save_model(self, model, extra: dict) -> None:
        save_model(self.output, "segmenter", model, self.architecture.to_dict(), self.atlas_set.labels,
                   self.atlas_set.modalities, 0, extra, backbones={"segmenter": self.architecture.spec().to_dict()})


def train_segmenter(atlas_set: AtlasSet, output: str | Path, architecture: SegmenterConfig | None = None,
                    config: TrainConfig | None = None, device: str = "auto", resume: bool = False,
                    train_ids: Sequence[str] | None = None, log: Callable[[str], None] = print,
                    show_progress: bool = True) -> TrainResult:
    """Train a plain segmenter on an atlas set's images and labels (see :class:`SegmenterTrainer`)."""
    architecture = architecture or SegmenterConfig(len(atlas_set.labels), len(atlas_set.modalities))
    trainer = SegmenterTrainer(atlas_set, output, architecture, config or TrainConfig(), device, train_ids, log,
                               show_progress)
    return trainer.run(resume)


def train_method(atlas_set, output, architecture, training, *, device="auto", resume=False, cache_dir=None,
                 train_ids=None, log=print, show_progress=True) -> TrainResult:
    """Registry entry point (``cache_dir`` unused: a segmenter registers nothing)."""
    return train_segmenter(atlas_set, output, architecture, training, device, resume, train_ids, log, show_progress)


@dataclass
class SegmenterResult(SegmentationResult):
    """A segmenter's output on the target grid: segmentation and per-label probabilities (no atlases)."""

    model_folder: str = ""
    method: str = "segmenter"      # the method recorded in run.json (a network-only output of another method)

    def save(self, out_dir: str | Path, maps=False, transforms: bool = False,
             reference: sitk.Image | None = None, oracle_fraction: float = 0.10) -> dict[str, str]:
        """``segmentation.nii.gz`` and, with the ``probabilities`` map kind (or ``maps=True``), the per-label
        probabilities; ``run.json`` last."""
        out = Path(out_dir)
        written = {"segmentation": str(write_image(self.segmentation, out / "segmentation.nii.gz"))}
        if "probabilities" in map_kinds(maps):
            written.update(self.save_probability_maps(out))
        write_run_record(out, {"method": self.method, "model": self.model_folder, "atlases": [],
                               "labels": self.label_names, "timings_s": self.timings, "files": written})
        return written


def segment_segmenter(target: Sequence[sitk.Image], atlas_set: AtlasSet | None, model: str | Path | LoadedModel,
                      device: str = "auto", overlap: float = 0.5, show_progress: bool = True,
                      **_atlas_options) -> SegmenterResult:
    """Segment a target with a trained segmenter (atlas options such as ``n_atlases`` are accepted and unused;
    ``atlas_set``, when given, is checked against the model's labels and modalities)."""
    check_target_images(target)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, "cpu", method="segmenter")
    check_compatible(loaded, atlas_set, len(target))
    progress = Progress([("load", 0.1), ("network", 0.9)], enabled=show_progress)
    t0 = time.perf_counter()
    image = normalized_tensor(target)
    labels = sorted(loaded.labels)
    roi = loaded.config.get("patch_size") or [max(8, s) for s in image.shape[1:]]
    progress.stage("network")(0.0, "segmentation network")
    probabilities, seconds = predict(loaded.model, image, roi, overlap, device)
    progress.done("segmentation done")
    lab_t = torch.tensor(labels, dtype=torch.int64)
    fusion = FusionResult(lab_t[probabilities.argmax(0)], probabilities.float(), None, "segmenter", labels)
    spatial = tuple(image.shape[1:])
    return SegmenterResult(Geometry.of(target[0]), fusion, [], dict(loaded.labels),
                           torch.zeros((0, *spatial), dtype=torch.int64), [],
                           {"load": time.perf_counter() - t0 - seconds, "network": seconds},
                           model_folder=str(loaded.folder))


segment_method = segment_segmenter
