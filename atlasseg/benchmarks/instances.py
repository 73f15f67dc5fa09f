"""Instance-segmentation benchmark: Res-UNet-H (or -R) + seeded watershed against connected components of the
same network's mask, on generated phantoms of touching, anisotropically sampled blobs
(:func:`atlasseg.instances.touching_blobs_phantom`).

The platform issue's item: *on a generated phantom of touching, anisotropically sampled blobs, Res-UNet-H +
seeded watershed reaches AP-75 >= 0.9 and beats connected components of its own mask*.

* :func:`write_instance_phantom_set`: a Decathlon-layout folder of phantoms (``imagesTr/``, ``labelsTr/`` with the
  binary foreground as label 1, and the instance ids in ``instancesTr/``), voxels of 1 x 1 x 4 mm (ITK x, y, z).
* :class:`InstanceTrainer`: the generic :class:`~atlasseg.training.Trainer` loop with the hooks of an instance
  network: targets ``(mask, boundary)`` from :func:`~atlasseg.instances.instance_targets` on the whole volume,
  patches cropped from them, weighted BCE on both channels; validation Dice is the foreground Dice of
  ``mask > 0.5``; the model folder holds ``model.safetensors`` and a ``config.json`` of format
  ``atlasseg-instance-model`` (read back with :func:`load_instance_model`).
* :func:`run_instances_benchmark`: writes a training and a test phantom set (different seeds), trains (resumable:
  a rerun of a finished training reuses it), predicts the test cases, post-processes them with the seeded
  watershed and with connected components, and reports AP-75 per test case (a markdown section).

Run it with ``atlasseg benchmark instances [--work DIR] [--markdown FILE]``.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from ..atlas import AtlasSet, AtlasSetError, check_same_grid, load_atlas_set, read_label
from ..device import resolve_device
from ..instances import (
    average_precision,
    connected_components_instances,
    instance_targets,
    seeded_watershed,
    touching_blobs_phantom,
    weighted_bce,
)
from ..io import atomic_write, atomic_write_bytes, image_to_tensor, sha256
from ..memory import PeakMemory
from ..model_io import NORMALISATION
from ..networks import BackboneSpec, build_backbone
from ..registration import normalized_tensor
from ..training import AugmentConfig, Augmenter, CaseTensors, TrainConfig, Trainer, TrainingError, sample_patch
from .report import command_line, format_difference, git_commit, machine_description, paired_difference, update_markdown

__all__ = ["INSTANCE_MODEL_FORMAT", "InstanceTrainer", "WATERSHED", "benchmark_training_config",
           "default_min_size", "load_instance_case", "load_instance_model", "predict_probabilities",
           "run_instances_benchmark", "write_instance_phantom_set"]

INSTANCE_MODEL_FORMAT = "atlasseg-instance-model"
INSTANCE_MODEL_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
INSTANCES_FOLDER = "instancesTr"
PHANTOM_SPACING_ZYX = (4.0, 1.0, 1.0)
WATERSHED = {"seed_mask": 0.9, "seed_boundary": 0.8, "foreground": 0.85}   # the authors' thresholds (defaults)
CC_THRESHOLD = 0.5
MIN_SIZE_FRACTION = 0.1
AP_TARGET = 0.9
MARKDOWN_KEY = "instances"
IGNORED_FOR_RESUME = ("loss", "n_atlases", "candidates_per_target", "backend", "preset", "mixed_precision")
TITLE = "Instance segmentation: Res-UNet + seeded watershed on touching anisotropic blobs"


# ------------------------------------------------------------------------------------------------- the data

def _case_seed(seed: int, index: int) -> int:
    """A per-case phantom seed from the set's seed and the case index (distinct pairs give distinct seeds)."""
    return int(np.random.SeedSequence([int(seed), int(index), 7]).generate_state(1)[0])


def _to_image(array: np.ndarray, spacing_zyx: Sequence[float]) -> sitk.Image:
    """(Z, Y, X) array -> image with spacing (x, y, z) mm = reversed ``spacing_zyx``, origin 0, identity axes."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in reversed(tuple(spacing_zyx))])
    image.SetOrigin((0.0, 0.0, 0.0))
    return image


def write_instance_phantom_set(folder: str | Path, n_cases: int, shape: Sequence[int] = (16, 64, 64), seed: int = 0,
                               spacing_zyx: Sequence[float] = PHANTOM_SPACING_ZYX, n_blobs: int = 10,
                               noise: float = 0.05) -> Path:
    """Write ``n_cases`` touching-blobs phantoms as a Decathlon folder with instance maps beside the labels.

    Layout: ``dataset.json`` (labels ``{"0": "background", "1": "object"}``, one modality ``{"0": "EM"}``, the
    ``training`` list, and a ``generator`` entry recording the arguments), ``imagesTr/blobs_NNN.nii.gz`` (float32
    image), ``labelsTr/blobs_NNN.nii.gz`` (uint8 foreground, 1 inside any object) and
    ``instancesTr/blobs_NNN.nii.gz`` (uint16 instance ids 1..N, 0 background). All three share one grid:
    ``shape`` is the array shape (Z, Y, X), ``spacing_zyx`` the voxel size in mm along (Z, Y, X) (written to the
    images in ITK's (x, y, z) order: (1, 1, 4) mm by default), origin 0, identity direction.

    Case ``i`` is :func:`~atlasseg.instances.touching_blobs_phantom` with a seed derived from ``(seed, i)``, so sets
    of different ``seed`` share no case. A folder already written with the same arguments is left as it is.

    Returns:
        the folder.
    """
    out = Path(folder)
    if n_cases < 1:
        raise ValueError(f"n_cases must be at least 1, got {n_cases}")
    shape = tuple(int(s) for s in shape)
    spacing_zyx = tuple(float(s) for s in spacing_zyx)
    generator = {"function": "atlasseg.instances.touching_blobs_phantom", "n_cases": int(n_cases),
                 "shape": list(shape), "spacing_zyx_mm": list(spacing_zyx), "seed": int(seed),
                 "n_blobs": int(n_blobs), "noise": float(noise)}
    meta_path = out / "dataset.json"
    if meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()).get("generator") == generator:
                return out
        except json.JSONDecodeError:
            pass
    training = []
    for i in range(n_cases):
        image, instances = touching_blobs_phantom(shape, n_blobs, spacing_zyx, _case_seed(seed, i), noise)
        name = f"blobs_{i:03d}.nii.gz"
        for sub, array in (("imagesTr", image.astype(np.float32)),
                           ("labelsTr", (instances > 0).astype(np.uint8)),
                           (INSTANCES_FOLDER, instances.astype(np.uint16))):
            written = _to_image(array, spacing_zyx)
            atomic_write(lambda tmp, im=written: sitk.WriteImage(im, tmp, True), out / sub / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}",
                         "instances": f"./{INSTANCES_FOLDER}/{name}"})
    dataset = {"name": f"TouchingBlobs_seed{seed}",
               "description": f"Touching anisotropic blobs ({n_cases} cases, seed {seed}); instance ids in "
                              f"{INSTANCES_FOLDER}/",
               "reference": "atlasseg.benchmarks.instances", "licence": "CC0", "tensorImageSize": "3D",
               "modality": {"0": "EM"}, "labels": {"0": "background", "1": "object"},
               "numTraining": n_cases, "numTest": 0, "training": training, "test": [], "generator": generator}
    atomic_write_bytes(meta_path, (json.dumps(dataset, indent=2) + "\n").encode())
    return out


def load_instance_case(atlas_set: AtlasSet, case_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A case of an instance phantom set: ``(image (C, Z, Y, X) float32 normalised to the 1st-99th percentiles,
    instances (Z, Y, X) int64)``; the instance map must share the image's grid and agree with its label."""
    if atlas_set.root is None:
        raise AtlasSetError(f"atlas set '{atlas_set.name}': instance maps need a Decathlon folder")
    case = atlas_set.load(case_id)
    path = atlas_set.root / INSTANCES_FOLDER / atlas_set.case(case_id).label.name
    if not path.is_file():
        raise AtlasSetError(f"{path}: instance map not found")
    inst_image = read_label(path)
    check_same_grid(case.images[0], atlas_set.case(case_id).images[0], inst_image, path)
    instances = image_to_tensor(inst_image, torch.int64)[0]
    if case.label is not None:
        label = image_to_tensor(case.label, torch.int64)[0]
        if not torch.equal(label > 0, instances > 0):
            raise AtlasSetError(f"{path}: the instances' foreground differs from the label of case {case_id}")
    return normalized_tensor(case.images), instances


# --------------------------------------------------------------------------------------------- the network

def _spec_of(backbone: BackboneSpec | dict | str) -> BackboneSpec:
    return BackboneSpec.from_dict(backbone)


def build_instance_network(backbone: BackboneSpec | dict | str, n_modalities: int = 1) -> nn.Module:
    """A Res-UNet-R/H style backbone predicting ``[mask, boundary]`` logits: (B, C, Z, Y, X) -> (B, 2, Z, Y, X)."""
    net = build_backbone(_spec_of(backbone), n_modalities, 1)
    if getattr(net, "boundary_channels", 0) != 1:
        raise ValueError(f"backbone {_spec_of(backbone).name!r} must predict one mask and one boundary channel")
    return net


def predict_probabilities(model: nn.Module, image: torch.Tensor, roi_size: Sequence[int], overlap: float = 0.5,
                          device: str | torch.device = "cpu") -> torch.Tensor:
    """Sigmoid ``[mask, boundary]`` probabilities of a whole (C, Z, Y, X) normalised image -> (2, Z, Y, X)
    float32 on the CPU: Gaussian-blended sliding windows of ``roi_size`` (a volume no larger than one window is
    predicted at once), the model in eval mode (left in eval mode)."""
    dev = torch.device(device)
    model = model.to(dev).eval()

    def window(x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(model(x)[:, :2].float())

    with torch.no_grad():
        out = sliding_window_inference(image.float()[None], tuple(int(r) for r in roi_size), 1, window,
                                       overlap=overlap, mode="gaussian", sw_device=dev, device=torch.device("cpu"))
    return torch.as_tensor(out)[0].float()


def save_instance_model(folder: str | Path, model: nn.Module, backbone: BackboneSpec, n_modalities: int,
                        patch_size: Sequence[int], overlap: float, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` (atomic) and then ``config.json`` (format ``atlasseg-instance-model``: the
    backbone spec, the output channels, the window, the post-processing thresholds, the weights' sha256)."""
    folder = Path(folder)
    digest = sha256(atomic_write(lambda tmp: save_safetensors_model(model, tmp), folder / WEIGHTS))
    config = {"format": INSTANCE_MODEL_FORMAT, "version": INSTANCE_MODEL_VERSION,
              "backbone": backbone.to_dict(), "n_modalities": int(n_modalities),
              "outputs": ["mask", "boundary"], "activation": "sigmoid",
              "intensity_normalisation": NORMALISATION, "patch_size": [int(p) for p in patch_size],
              "overlap": float(overlap),
              "postprocessing": {"seeded_watershed": dict(WATERSHED), "connected_components_threshold": CC_THRESHOLD},
              **(extra or {}), "weights_sha256": digest}
    atomic_write_bytes(folder / CONFIG, json.dumps(config, indent=2, default=str).encode())
    return folder


def load_instance_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Read a folder written by :func:`save_instance_model`: the network (eval mode) and its config; the weights'
    checksum is verified and they are read with safetensors (never unpickled)."""
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise TrainingError(f"{path}: missing (not an instance model folder?)")
    config = json.loads(path.read_text())
    if config.get("format") != INSTANCE_MODEL_FORMAT or config.get("version") != INSTANCE_MODEL_VERSION:
        raise TrainingError(f"{path}: not an {INSTANCE_MODEL_FORMAT} version {INSTANCE_MODEL_VERSION} config")
    weights = folder / WEIGHTS
    if not weights.is_file() or sha256(weights) != config.get("weights_sha256"):
        raise TrainingError(f"{weights}: missing or its checksum does not match config.json")
    model = build_instance_network(config["backbone"], int(config["n_modalities"]))
    load_safetensors_model(model, str(weights))
    return model.to(torch.device(device)).eval(), config


# ------------------------------------------------------------------------------------------------ training

class InstanceTrainer(Trainer):
    """Res-UNet-R/H instance training on an instance phantom set, on the generic :class:`Trainer` loop.

    Data: per case the normalised image ``(C, Z, Y, X)`` and the targets of its instance map, computed on the
    whole volume (:func:`~atlasseg.instances.instance_targets`, so a crop never invents or loses a contour at its
    edge). They travel in :class:`CaseTensors` as ``label`` = the foreground (0/1, what the validation Dice
    compares with) and ``atlas_labels`` = ``(2, Z, Y, X)`` the (mask, boundary) targets (there are no atlases),
    so :func:`~atlasseg.training.sample_patch` crops image and targets together (centred on a foreground voxel
    with probability ``foreground_ratio``) and the :class:`Augmenter` flips them together (nearest for labels).
    Elastic / rotation augmentation must be off (``spatial_prob == 0``): it would resample the one-voxel
    contours. Loss: :func:`~atlasseg.instances.weighted_bce` on the mask channel + ``boundary_weight`` times the
    same on the boundary channel.
    """

    method = "instances"

    def __init__(self, atlas_set: AtlasSet, output: str | Path, config: TrainConfig,
                 backbone: BackboneSpec | dict | str | None = None, boundary_weight: float = 1.0,
                 device: str = "auto", train_ids: Sequence[str] | None = None, log: Callable[[str], None] = print,
                 show_progress: bool = True):
        super().__init__(atlas_set, output, config, device, train_ids, log, show_progress)
        if self.n_labels != 2:
            raise TrainingError(f"atlas set '{atlas_set.name}': instance training needs labels {{0, 1}} "
                                f"(background, object), found {sorted(atlas_set.labels)}")
        if config.augment.spatial_prob > 0:
            raise TrainingError("instance training: set augment.spatial_prob to 0 (elastic and rotation resampling "
                                "would move the one-voxel boundary targets); flips are kept")
        self.backbone = _spec_of(backbone or BackboneSpec("resunet_h", "cpu"))
        self.boundary_weight = float(boundary_weight)
        self.n_modalities = len(atlas_set.modalities)

    def build_model(self) -> nn.Module:
        return build_instance_network(self.backbone, self.n_modalities)

    def comparable_identity(self, identity: dict) -> dict:
        """Settings this trainer never reads (the segmentation loss, atlas sampling, the registration backend) and
        ``mixed_precision`` (bfloat16 autocast on CUDA only: numerics, not the problem) do not block a resume."""
        training = {k: v for k, v in identity.get("training", {}).items() if k not in IGNORED_FOR_RESUME}
        return {**identity, "training": training}

    def architecture_dict(self) -> dict:
        return {"backbone": self.backbone.to_dict(), "n_modalities": self.n_modalities,
                "boundary_weight": self.boundary_weight}

    def _case(self, case_id: str) -> CaseTensors:
        image, instances = load_instance_case(self.atlas_set, case_id)
        mask, boundary = instance_targets(instances)
        targets = torch.stack([mask, boundary]).long()
        rows = torch.zeros((1, *image.shape), dtype=image.dtype).expand(2, *image.shape)
        return CaseTensors(case_id, image, (instances > 0).long(), ["mask", "boundary"], rows, targets)

    def prepare_data(self, progress: Callable[[float, str], None] | None = None) -> None:
        ids = self.train_ids + self.val_ids
        cases = []
        for k, case_id in enumerate(ids):
            if progress:
                progress(k / len(ids), f"loading {case_id}")
            cases.append(self._case(case_id))
        self.train_cases, self.val_cases = cases[:len(self.train_ids)], cases[len(self.train_ids):]

    def make_batch(self, case: CaseTensors, rng: np.random.Generator, augmenter: Augmenter) -> dict:
        """One patch: ``image`` (1, C, *patch) and ``targets`` (1, 2, *patch) float (mask, boundary)."""
        coords = torch.zeros((0, *case.target.shape[1:]))
        sample = sample_patch(case, coords, [0, 1], self.config.patch_size, self.config.foreground_ratio, rng)
        sample["atlas_images"] = sample["atlas_images"][:0]       # no atlases: only the targets ride along
        sample = augmenter(sample)
        return {"image": sample["target"][None].to(self.device),
                "targets": sample["atlas_labels"].float()[None].to(self.device)}

    def compute_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        logits = model(batch["image"]).float()
        targets = batch["targets"]
        return weighted_bce(logits[:, :1], targets[:, :1]) + \
            self.boundary_weight * weighted_bce(logits[:, 1:2], targets[:, 1:2])

    def predict_index(self, model: nn.Module, case: CaseTensors) -> torch.Tensor:
        """(Z, Y, X) int64: 1 where the mask probability > 0.5 (the two-class argmax)."""
        probabilities = predict_probabilities(model, case.target, self.config.patch_size, self.config.overlap,
                                              self.device)
        return (probabilities[0] > 0.5).long()

    def save_model(self, model: nn.Module, extra: dict) -> None:
        save_instance_model(self.output, model, self.backbone, self.n_modalities, self.config.patch_size,
                            self.config.overlap, {"method": self.method, "labels": {"0": "background", "1": "object"},
                                                  "boundary_weight": self.boundary_weight, **extra})


# ----------------------------------------------------------------------------------------------- benchmark

def benchmark_training_config(epochs: int, patch_size: Sequence[int] = (16, 48, 48), patches_per_target: int = 4,
                              seed: int = 0, val_fraction: float = 0.17) -> TrainConfig:
    """Training of the benchmark: AdamW 2e-3 with a cosine schedule, ``patches_per_target`` patches of
    ``patch_size`` per training case and epoch (two thirds centred on an object), validation every epoch,
    flips (all three axes) and Gaussian noise as augmentation; no histogram shift (it can erase the faint
    membrane contrast the boundary channel has to find), no elastic / rotation (see :class:`InstanceTrainer`).
    Every setting the training reads is written out, so a change of :class:`TrainConfig`'s defaults does not
    change the benchmark or block resuming its checkpoint."""
    augment = AugmentConfig(histogram_shift_prob=0.0, histogram_control_points=(4, 7), modality_noise_prob=0.0,
                            flip_prob=0.5, rotate_range=0.0, elastic_sigma=(5.0, 7.0), elastic_magnitude=(20.0, 60.0),
                            spatial_prob=0.0, noise_prob=0.3, noise_std=0.03)
    return TrainConfig(epochs=int(epochs), n_atlases=0, patch_size=tuple(int(p) for p in patch_size),
                       foreground_ratio=0.67, patches_per_target=int(patches_per_target), learning_rate=2e-3,
                       weight_decay=1e-4, schedule="cosine", val_fraction=val_fraction, seed=int(seed), overlap=0.5,
                       val_interval=1, mixed_precision=False, augment=augment)


def default_min_size(atlas_set: AtlasSet, case_ids: Sequence[str], fraction: float = MIN_SIZE_FRACTION) -> int:
    """Smallest instance kept by the post-processing: ``fraction`` (0.1) of the median ground-truth instance
    volume (voxels) of the TRAINING cases, at least 1. On the default (16, 64, 64) phantoms objects have about
    800-1900 voxels, so this gives about 120 voxels, near the authors' 128 for MitoEM."""
    sizes = []
    for case_id in case_ids:
        path = atlas_set.root / INSTANCES_FOLDER / atlas_set.case(case_id).label.name
        counts = np.bincount(sitk.GetArrayFromImage(read_label(path)).reshape(-1).astype(np.int64))[1:]
        sizes.extend(counts[counts > 0].tolist())
    return max(1, int(round(fraction * float(np.median(sizes))))) if sizes else 1


def _command(defaults: dict) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
    return command_line(f"python -c 'from atlasseg.benchmarks.instances import run_instances_benchmark; "
                        f"run_instances_benchmark({args})'")


def _markdown(facts: dict, rows: list[dict]) -> str:
    ws = [r["ap75_watershed"] for r in rows]
    cc = [r["ap75_cc"] for r in rows]
    mean_ws, mean_cc = float(np.mean(ws)), float(np.mean(cc))
    diff, _, wins, n = paired_difference(ws, cc)
    train = facts["training"]
    lines = [f"Command: `{facts['command']}`  ",
             f"Machine: {facts['machine']}; device {facts['device']}, {facts['threads']} torch thread(s)  ",
             f"Date: {facts['date']}, commit {facts['commit']}, wall time of this run {facts['wall_min']:.1f} min  ",
             f"Data: {facts['n_train']} training phantoms (seed {facts['seed']}; {train['n_train_targets']} train, "
             f"{train['n_val_targets']} validation) and {len(rows)} test phantoms (seed {facts['seed'] + 1}), "
             f"shape (Z, Y, X) {facts['shape']}, voxels {facts['spacing_xyz']} mm (x, y, z)  ",
             f"Model: `{json.dumps(facts['backbone'])}`, {facts['parameters'] / 1e6:.2f} M parameters; "
             f"{train['epochs']} epochs x {train['steps_per_epoch']} steps of one {train['patch_size']} patch, "
             f"weighted BCE on mask + boundary, AdamW {train['learning_rate']} cosine, flips + noise  ",
             f"Training: {train['seconds'] / 60:.1f} min ({train['seconds_per_step']:.2f} s per step, validation "
             f"included), peak RSS {train['peak_rss_gib']:.2f} GiB; best validation foreground Dice "
             f"{train['best_val_dice']:.4f}" + (" (trained by an earlier run, reused)" if train["reused"] else "")
             + (f" (resumed: this run trained the last {train['epochs_trained_by_this_run']} epochs; peak RSS of "
                "those)" if 0 < train.get("epochs_trained_by_this_run", 0) < train["epochs"] else "") + "  ",
             f"Peak RSS of this run: {facts['peak_rss_gib']:.2f} GiB  ",
             f"Post-processing: seeded watershed {json.dumps(WATERSHED)}; connected components of mask > "
             f"{CC_THRESHOLD}; both drop instances under {facts['min_size']} voxels (0.1 x the median training "
             "instance volume); AP-75 as the MitoEM evaluation (instances ranked by size)", "",
             "| test case | objects | watershed instances | CC instances | AP-75 watershed | AP-75 CC | "
             "watershed - CC |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['n_gt']} | {r['n_watershed']} | {r['n_cc']} | {r['ap75_watershed']:.4f} "
                     f"| {r['ap75_cc']:.4f} | {r['ap75_watershed'] - r['ap75_cc']:+.4f} |")
    lines.append(f"| mean | | | | {mean_ws:.4f} | {mean_cc:.4f} | {mean_ws - mean_cc:+.4f} |")
    ap_met = mean_ws >= AP_TARGET
    beats = diff > 0 and wins > n / 2
    lines += ["", "- " + format_difference(ws, cc, "AP-75, watershed - connected components"),
              f"- Target AP-75 >= {AP_TARGET} (mean over test cases): {'met' if ap_met else 'NOT met'} "
              f"({mean_ws:.4f})",
              f"- Target beats connected components of its own mask (mean difference > 0, better on most cases): "
              f"{'met' if beats else 'NOT met'} ({diff:+.4f}, {wins} of {n})"]
    return "\n".join(lines) + "\n"


def run_instances_benchmark(work: Path, markdown: Path | None = None, epochs: int = 24, n_train: int = 12,
                            n_test: int = 6, seed: int = 0, log: Callable[[str], None] = print, *,
                            shape: Sequence[int] = (16, 64, 64), patch_size: Sequence[int] = (16, 48, 48),
                            patches_per_target: int = 4, backbone: BackboneSpec | dict | str | None = None,
                            min_size: int | None = None, device: str = "auto", show_progress: bool = False) -> dict:
    """Train on ``n_train`` phantoms (seed ``seed``), test on ``n_test`` others (seed ``seed + 1``).

    Folders under ``work``: ``train/`` and ``test/`` (the phantom sets), ``model/`` (the Trainer's output: model
    folder, checkpoint, log, curves), ``results/training.json`` (training facts measured when it trained) and
    ``results/test.json`` (per-case rows). A rerun with the same settings resumes an interrupted training or
    reuses a finished one (``epochs_run`` 0); more ``epochs`` continue it.

    ``min_size``: smallest instance kept by both post-processings (voxels); None: :func:`default_min_size` of the
    training cases. ``backbone``: default Res-UNet-H with its ``cpu`` preset.

    Returns:
        a dict: ``rows`` (per test case: ``case``, ``n_gt``, ``n_watershed``, ``n_cc``, ``ap75_watershed``,
        ``ap75_cc``), ``mean_ap75_watershed``, ``mean_ap75_cc``, ``ap_target_met``, ``beats_cc``, ``epochs_run``,
        ``history`` (the Trainer's per-epoch rows), ``training`` (facts), ``min_size``, ``markdown`` (the section's
        body), ``model_folder``.
    """
    t0 = time.perf_counter()
    work = Path(work)
    backbone = _spec_of(backbone or BackboneSpec("resunet_h", "cpu"))
    command = _command({"work": str(work), "markdown": str(markdown) if markdown else None, "epochs": epochs,
                        "n_train": n_train, "n_test": n_test, "seed": seed})
    with PeakMemory() as memory:
        train_set = load_atlas_set(write_instance_phantom_set(work / "train", n_train, shape, seed))
        test_set = load_atlas_set(write_instance_phantom_set(work / "test", n_test, shape, seed + 1))
        config = benchmark_training_config(epochs, patch_size, patches_per_target, seed)
        folder = work / "model"
        trainer = InstanceTrainer(train_set, folder, config, backbone, device=device, log=log,
                                  show_progress=show_progress)
        resume = (folder / "checkpoint.pt").is_file()
        log(f"training {backbone.name} -> {folder}" + (" (resuming)" if resume else ""))
        result = trainer.run(resume)
        info_path = work / "results" / "training.json"
        saved = json.loads(info_path.read_text()) if info_path.is_file() else {}
        steps_per_epoch = len(trainer.train_ids) * config.patches_per_target
        reused = result.epochs_run == 0         # nothing trained by this call: the facts of the run that trained it
        peak = saved.get("peak_rss_gib", float("nan")) if reused else result.peak_rss_gib
        training = {"epochs": config.epochs, "steps_per_epoch": steps_per_epoch,
                    "patch_size": list(config.patch_size), "learning_rate": config.learning_rate,
                    "n_train_targets": len(trainer.train_ids), "n_val_targets": len(trainer.val_ids),
                    "seconds": result.seconds, "seconds_per_step": result.seconds / max(steps_per_epoch *
                                                                                       config.epochs, 1),
                    "peak_rss_gib": peak, "best_val_dice": result.best_val_dice, "reused": reused,
                    "epochs_trained_by_this_run": result.epochs_run,
                    "threads": saved.get("threads", torch.get_num_threads()) if reused else torch.get_num_threads()}
        if not reused:
            atomic_write_bytes(info_path, json.dumps(training, indent=1).encode())

        model, model_config = load_instance_model(folder, resolve_device(device))
        if min_size is None:
            min_size = default_min_size(train_set, trainer.train_ids + trainer.val_ids)
        rows = []
        for case_id in test_set.case_ids:
            image, gt = load_instance_case(test_set, case_id)
            probabilities = predict_probabilities(model, image, model_config["patch_size"], model_config["overlap"],
                                                  resolve_device(device))
            ws = seeded_watershed(probabilities[0], probabilities[1], min_size=min_size, **WATERSHED)
            cc = connected_components_instances(probabilities[0], CC_THRESHOLD, min_size=min_size)
            row = {"case": case_id, "n_gt": int(gt.max()), "n_watershed": int(ws.max()), "n_cc": int(cc.max()),
                   "ap75_watershed": average_precision(ws, gt), "ap75_cc": average_precision(cc, gt)}
            rows.append(row)
            log(f"{case_id}: AP-75 watershed {row['ap75_watershed']:.4f}, connected components {row['ap75_cc']:.4f}")
        atomic_write_bytes(work / "results" / "test.json", json.dumps(rows, indent=1).encode())
    facts = {"command": command, "machine": machine_description(), "device": str(resolve_device(device)),
             "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(), "commit": git_commit(),
             "wall_min": (time.perf_counter() - t0) / 60, "n_train": n_train, "seed": seed, "shape": list(shape),
             "spacing_xyz": list(reversed(PHANTOM_SPACING_ZYX)), "backbone": backbone.to_dict(),
             "parameters": sum(p.numel() for p in model.parameters()), "training": training,
             "peak_rss_gib": memory.gib, "min_size": min_size}
    body = _markdown(facts, rows)
    if markdown is not None:
        update_markdown(Path(markdown), MARKDOWN_KEY, TITLE, body)
    ws_ap = [r["ap75_watershed"] for r in rows]
    cc_ap = [r["ap75_cc"] for r in rows]
    diff, _, wins, n = paired_difference(ws_ap, cc_ap)
    return {"rows": rows, "mean_ap75_watershed": float(np.mean(ws_ap)), "mean_ap75_cc": float(np.mean(cc_ap)),
            "ap_target_met": float(np.mean(ws_ap)) >= AP_TARGET, "beats_cc": diff > 0 and wins > n / 2,
            "epochs_run": result.epochs_run, "history": result.history, "training": training, "min_size": min_size,
            "markdown": body, "model_folder": str(folder), "train_ids": trainer.train_ids, "val_ids": trainer.val_ids}


def run_instances_benchmark_cli(args) -> dict:
    """Entry point of ``atlasseg benchmark instances`` (defaults: 12 training and 6 test phantoms, 24 epochs)."""
    work = Path(args.work) if args.work else Path.cwd().parent / "instances_benchmark_work"
    out = run_instances_benchmark(work, Path(args.markdown), args.epochs or 24, args.train_targets or 12,
                                  args.targets or 6, device=args.device)
    print(out["markdown"])
    return out
