"""Using a trained DeepAtlas model: segment a target with F_S, and register with F_R (the engine's ``learned``
registration backend and ``atlasseg register``).

Every image is first pre-aligned affinely to the model's reference (the engine's registration, preset
``affine``, with the backend the model was trained with), giving ``A`` (common point -> image point). F_S runs on the
common grid and its probabilities are pulled back onto the target's own grid through ``A^-1`` (background outside
the common grid). For a pair, F_R gives ``phi`` on the common grid (fixed common point -> moving common point;
svf: ``exp(v)``, inverse ``exp(-v)``); the engine's fields are composed exactly, with the affines as matrices:

* forward, on the fixed (target) grid: ``x -> A_m(q + u(q))``, ``q = A_f^-1 x``;
* inverse, on the moving (atlas) grid: ``y -> A_f(q + u_inv(q))``, ``q = A_m^-1 y``;

``u`` / ``u_inv`` are sampled linearly in millimetres, extended by their border values outside the common grid.
Optionally ``iterations`` steps of test-time optimisation (Adam on the network's raw field, the training
objective: similarity, regulariser and, with F_S's predictions or given labels, anatomy) refine the field.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..atlas import AtlasSet, check_target_images
from ..device import resolve_device
from ..fusion import FusionResult, labels_to_index
from ..io import Geometry, image_to_tensor, label_pixel_type, labels_to_tensor, tensor_to_image, write_image
from ..losses import regularizer_loss, similarity_loss
from ..model_io import CONFIG, LoadedModel, ModelFolderError, check_compatible, load_model
from ..pipeline import write_run_record
from ..progress import Progress
from ..registration import DisplacementField, Registration, normalized_tensor, warp_image, warp_labels
from ..registration.transforms import grid_points
from ..segmenter import SegmenterResult
from .fields import field_jacobian_determinant, jacobian_stats, voxel_to_mm
from .grid import CommonGrid, image_to_common_grid, labels_to_common_grid, sample_on, to_case_grid
from .model import DeepAtlasModel, load_common_grid
from .objective import Objective, PairBatch

__all__ = ["LEARNED_PRESETS", "DeepAtlasResult", "PairRegistration", "check_registration_model",
           "clear_prealignment_cache", "load_deepatlas", "prealign_cached", "register_learned", "register_pair",
           "segment_deepatlas", "segment_method"]

# test-time optimisation iterations per preset of the learned backend (None: the affine pre-alignment alone)
LEARNED_PRESETS = {"fast": 0, "default": 0, "accurate": 50, "affine": None}
TTO_LEARNING_RATE = 0.05          # Adam step on the raw field (voxels)


@dataclass
class DeepAtlasModelBundle:
    loaded: LoadedModel
    grid: CommonGrid

    @property
    def model(self) -> DeepAtlasModel:
        return self.loaded.model

    @property
    def backend(self) -> str:
        return str((self.loaded.config.get("prealignment") or {}).get("backend", "torch"))

    @property
    def prealign_max_scale(self) -> float | None:
        """The bound on the pre-alignment's scales the model was trained with (None: unbounded, as folders
        written before the bound)."""
        value = (self.loaded.config.get("prealignment") or {}).get("max_scale")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:
            raise ModelFolderError(f"{self.loaded.folder / CONFIG}: prealignment.max_scale must be a number >= 1 "
                                   f"or null, got {value!r}")
        return float(value)

    @property
    def training(self) -> dict:
        return (self.loaded.config.get("training") or {}).get("config") or {}

    @cached_property
    def grid_key(self) -> str:
        return self.grid.key()


_LOADED: dict[tuple, DeepAtlasModelBundle] = {}


def load_deepatlas(model: str | Path | LoadedModel | DeepAtlasModelBundle) -> DeepAtlasModelBundle:
    """A DeepAtlas model folder (checked: config, weights, reference) with its common grid; the last folder read
    is kept in memory (a multi-target run loads it once)."""
    if isinstance(model, DeepAtlasModelBundle):
        return model
    if isinstance(model, LoadedModel):
        if model.method != "deepatlas":
            raise ModelFolderError(f"{model.folder / CONFIG}: a '{model.method}' model, not a 'deepatlas' model")
        return DeepAtlasModelBundle(model, load_common_grid(model))
    folder = Path(model)
    config = folder / CONFIG
    key = (str(folder.resolve()), config.stat().st_mtime_ns if config.is_file() else 0)
    if key not in _LOADED:
        loaded = load_model(folder, "cpu", method="deepatlas")
        _LOADED.clear()
        _LOADED[key] = DeepAtlasModelBundle(loaded, load_common_grid(loaded))
    return _LOADED[key]


def _check_modalities(bundle: DeepAtlasModelBundle, n: int, what: str) -> None:
    expected = len(bundle.loaded.modalities)
    if n != expected:
        raise ModelFolderError(f"{bundle.loaded.folder / CONFIG}: the model takes {expected} modality image(s) per "
                               f"{what}, got {n}")


def check_registration_model(model, atlas_set: AtlasSet | None = None, n_modalities: int | None = None
                             ) -> DeepAtlasModelBundle:
    """A DeepAtlas model folder to register with, read and checked against the number of modalities of the atlas
    set and of the images (labels may differ: registration does not use them); errors name the folder."""
    bundle = load_deepatlas(model)
    if atlas_set is not None:
        _check_modalities(bundle, len(atlas_set.modalities), f"atlas of atlas set '{atlas_set.name}'")
    if n_modalities is not None:
        _check_modalities(bundle, n_modalities, "image")
    return bundle


def _channels(images) -> list[sitk.Image]:
    return [images] if isinstance(images, sitk.Image) else list(images)


# ---------------------------------------------------------------------------------------------------------------
# pre-alignments, cached in memory: a multi-atlas run registers its atlases to the model's reference once, not once
# per target (most of the learned backend's time per target otherwise)

_PREALIGNED: dict[tuple, np.ndarray] = {}
PREALIGN_CACHE_SIZE = 4096          # 4x4 matrices: a few hundred kB at most


def _image_digest(channels: Sequence[sitk.Image]) -> str:
    """Content key of an image: its grid and every channel's voxels."""
    digest = hashlib.sha256(repr(Geometry.of(channels[0]).to_dict()).encode())
    for image in channels:
        digest.update(str(image.GetPixelID()).encode())
        digest.update(sitk.GetArrayViewFromImage(image).tobytes())
    return digest.hexdigest()


def prealign_cached(bundle: DeepAtlasModelBundle, cases: Sequence[Sequence[sitk.Image]],
                    device: str | torch.device) -> list[np.ndarray]:
    """Per case (its channel images) the affine pre-alignment to the model's reference (common point -> case
    point), computed for the cases not seen before with the same reference, backend, scale bound and device. One
    case per registration: a batched one differs in the last float digits with its batch, and a result must not
    depend on which images were registered before."""
    dev = str(resolve_device(device))
    bound = bundle.prealign_max_scale
    keys = [(bundle.grid_key, bundle.backend, bound, dev, _image_digest(c)) for c in cases]
    for key, case in zip(keys, cases):
        if key not in _PREALIGNED:
            if len(_PREALIGNED) >= PREALIGN_CACHE_SIZE:
                _PREALIGNED.pop(next(iter(_PREALIGNED)))        # the oldest entry
            _PREALIGNED[key] = bundle.grid.prealign([case], bundle.backend, dev, max_scale=bound)[0]
    return [_PREALIGNED[k].copy() for k in keys]


def clear_prealignment_cache() -> None:
    _PREALIGNED.clear()


# ---------------------------------------------------------------------------------------------------------------
# segmentation with F_S


@dataclass
class DeepAtlasResult(SegmenterResult):
    """F_S's segmentation and per-label probabilities on the target's own grid (no atlases); saved as a
    segmenter's output, recorded as method ``deepatlas``."""

    method: str = "deepatlas"
    prealignment: np.ndarray | None = None     # 4x4, common point -> target point


def predict_segmentation(bundle: DeepAtlasModelBundle, target: Sequence[sitk.Image],
                         device: str | torch.device = "auto") -> tuple[torch.Tensor, np.ndarray, dict[str, float]]:
    """F_S on a target: (L, Z, Y, X) probabilities on the target's grid, its pre-alignment and timings."""
    dev = resolve_device(device)
    geometry = Geometry.of(target[0])
    t0 = time.perf_counter()
    affine = prealign_cached(bundle, [target], dev)[0]
    t1 = time.perf_counter()
    image = image_to_common_grid(normalized_tensor(target, dev), geometry, affine, bundle.grid.geometry)
    model = bundle.model.to(dev).eval()
    n_labels = model.config.n_labels
    with torch.no_grad():
        probs = model.segmentation(image[None])[0][0, :n_labels].softmax(0)
    probs = to_case_grid(probs, bundle.grid.geometry, affine, geometry, background=True).cpu()
    return probs, affine, {"registration": t1 - t0, "network": time.perf_counter() - t1}


def segment_deepatlas(target: Sequence[sitk.Image], atlas_set: AtlasSet | None, model: str | Path | LoadedModel,
                      device: str = "auto", show_progress: bool = True, **_atlas_options) -> DeepAtlasResult:
    """Segment a target with a DeepAtlas model's F_S (pre-aligned to the model's reference, segmented on the common
    grid, pulled back onto the target's own grid). Atlas options (``n_atlases``, ...) are accepted and unused;
    ``atlas_set``, when given, is checked against the model's labels and modalities."""
    check_target_images(target)
    t0 = time.perf_counter()
    bundle = load_deepatlas(model)
    check_compatible(bundle.loaded, atlas_set, len(target))
    progress = Progress([("load", 0.05), ("registration", 0.45), ("network", 0.5)], enabled=show_progress)
    load_s = time.perf_counter() - t0
    progress.stage("registration")(0.0, "affine pre-alignment")
    probs, affine, timings = predict_segmentation(bundle, list(target), device)
    progress.done("segmentation done")
    labels = sorted(bundle.loaded.labels)
    lab_t = torch.tensor(labels, dtype=torch.int64)
    fusion = FusionResult(lab_t[probs.argmax(0)], probs.float(), None, "deepatlas", labels)
    spatial = tuple(probs.shape[1:])
    return DeepAtlasResult(Geometry.of(target[0]), fusion, [], dict(bundle.loaded.labels),
                           torch.zeros((0, *spatial), dtype=torch.int64), [], {"load": load_s, **timings},
                           model_folder=str(bundle.loaded.folder), prealignment=affine)


segment_method = segment_deepatlas


# ---------------------------------------------------------------------------------------------------------------
# registration with F_R


def _compose(grid: Geometry, u_mm: torch.Tensor, fixed_affine: np.ndarray, moving_affine: np.ndarray,
             fixed: Geometry) -> DisplacementField:
    """The field on ``fixed`` of ``x -> A_m(q + u(q))``, ``q = A_f^-1 x`` (u (3, Z, Y, X) mm on the common grid)."""
    dev = u_mm.device
    pts = grid_points(fixed, dev, torch.float64)
    inv = torch.as_tensor(np.linalg.inv(fixed_affine), dtype=torch.float64, device=dev)
    fwd = torch.as_tensor(moving_affine, dtype=torch.float64, device=dev)
    q = pts @ inv[:3, :3].T + inv[:3, 3]
    p = q + sample_on(u_mm, grid, q).permute(1, 2, 3, 0)
    y = p @ fwd[:3, :3].T + fwd[:3, 3]
    return DisplacementField((y - pts).permute(3, 0, 1, 2).float().contiguous(), fixed)


def _tto(model: DeepAtlasModel, objective: Objective, raw: torch.Tensor, batch: PairBatch, iterations: int,
         learning_rate: float) -> torch.Tensor:
    """Test-time optimisation: Adam on the raw field, starting from the network's, minimising the registration
    objective (anatomy with the given / predicted segmentations)."""
    reg = model.registration
    with torch.no_grad():
        moving_seg, _ = objective.segmentation_maps(model, batch.moving, batch.moving_label, batch.moving_labelled,
                                                    grad=False)
        fixed_seg, _ = objective.segmentation_maps(model, batch.fixed, batch.fixed_label, batch.fixed_labelled,
                                                   grad=False)
    field_ = raw.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([field_], lr=learning_rate)
    for _ in range(int(iterations)):
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            ddf = reg.displacement(field_)
            loss = objective.lambda_i * similarity_loss(objective.similarity, reg.warp(batch.moving, ddf),
                                                        batch.fixed, objective.lncc_radius)
            loss = loss + objective.regularizer_weight * regularizer_loss(objective.regularizer, ddf)
            if objective.lambda_a > 0:
                loss = loss + objective.lambda_a * objective.anatomy(model, moving_seg, fixed_seg, ddf).mean()
            loss.backward()
        optimizer.step()
    return field_.detach()


def _objective(bundle: DeepAtlasModelBundle) -> Objective:
    cfg = bundle.training
    arch = bundle.model.config
    keys = ("lambda_i", "lambda_r", "lambda_a", "lambda_sp", "similarity", "lncc_radius", "regularizer",
            "regularizer_reference_size")
    defaults = Objective(arch.n_labels, bundle.grid.shape)
    values = {k: cfg.get(k, getattr(defaults, k)) for k in keys}
    return Objective(arch.n_labels, bundle.grid.shape, **values)


def register_learned(target: sitk.Image | Sequence[sitk.Image],
                     atlases: Sequence[sitk.Image | Sequence[sitk.Image]], model, device: str | torch.device = "auto",
                     preset: str = "default", iterations: int | None = None, learning_rate: float = TTO_LEARNING_RATE,
                     atlas_labels: Sequence[sitk.Image | None] | None = None, batch_size: int = 4, progress=None,
                     ) -> list[tuple[DisplacementField, DisplacementField]]:
    """Register atlases to a target with a DeepAtlas model's F_R: per atlas (forward field on the target grid,
    inverse field on the atlas grid), physical LPS mm, as the engine's other backends give them.

    ``preset``: ``fast`` / ``default`` (one forward pass per atlas), ``accurate`` (plus 50 iterations of test-time
    optimisation), ``affine`` (the pre-alignment alone); ``iterations`` overrides the preset's. ``atlas_labels``:
    the atlases' label images (then the anatomy term of the optimisation uses them instead of F_S's prediction).
    """
    if preset not in LEARNED_PRESETS:
        raise ValueError(f"unknown registration preset '{preset}': choose from {sorted(LEARNED_PRESETS)}")
    if iterations is not None and (int(iterations) != iterations or iterations < 0):
        raise ValueError(f"iterations must be a whole number >= 0, got {iterations!r}")
    bundle = load_deepatlas(model)
    dev = resolve_device(device)
    target = _channels(target)
    atlases = [_channels(a) for a in atlases]
    _check_modalities(bundle, len(target), "target")
    for a in atlases:
        _check_modalities(bundle, len(a), "atlas")
    grid = bundle.grid
    report = progress or (lambda fraction, message: None)
    report(0.0, "affine pre-alignment to the model's reference")
    affines = prealign_cached(bundle, [target, *atlases], dev)
    target_geometry = Geometry.of(target[0])
    atlas_geometries = [Geometry.of(a[0]) for a in atlases]
    if LEARNED_PRESETS[preset] is None and iterations is None:      # the affine pre-alignment alone
        zero = torch.zeros((3, *grid.shape), dtype=torch.float64, device=dev)
        return [(_compose(grid.geometry, zero, affines[0], a, target_geometry),
                 _compose(grid.geometry, zero, a, affines[0], g)) for a, g in zip(affines[1:], atlas_geometries)]
    n_iter = LEARNED_PRESETS[preset] if iterations is None else int(iterations)
    model = bundle.model.to(dev).eval()
    objective = _objective(bundle)
    fixed = image_to_common_grid(normalized_tensor(target, dev), target_geometry, affines[0], grid.geometry)
    out = []
    for start in range(0, len(atlases), batch_size):
        chunk = range(start, min(len(atlases), start + batch_size))
        report(0.1 + 0.9 * start / len(atlases), f"learned registration of atlases {start + 1}-{chunk[-1] + 1}")
        moving = torch.stack([image_to_common_grid(normalized_tensor(atlases[k], dev), atlas_geometries[k],
                                                   affines[k + 1], grid.geometry) for k in chunk])
        fixed_b = fixed[None].expand(len(chunk), *fixed.shape)
        with torch.no_grad():
            raw = model.registration(moving, fixed_b)
        if n_iter:
            labels = torch.zeros((len(chunk), *grid.shape), dtype=torch.int64, device=dev)
            labelled = torch.zeros(len(chunk), dtype=torch.bool, device=dev)
            for i, k in enumerate(chunk):
                if atlas_labels is not None and atlas_labels[k] is not None:
                    index = labels_to_index(labels_to_tensor(atlas_labels[k]), sorted(bundle.loaded.labels))
                    labels[i] = labels_to_common_grid(index.to(dev), model.config.n_labels, atlas_geometries[k],
                                                      affines[k + 1], grid.geometry)
                    labelled[i] = True
            batch = PairBatch(moving, fixed_b, labels, torch.zeros_like(labels), labelled,
                              torch.zeros_like(labelled))
            raw = _tto(model, objective, raw, batch, n_iter, learning_rate)
        with torch.no_grad():
            u = voxel_to_mm(model.registration.displacement(raw).double(), grid.geometry)
            u_inv = voxel_to_mm(model.registration.inverse_displacement(raw).double(), grid.geometry)
        for i, k in enumerate(chunk):
            out.append((_compose(grid.geometry, u[i], affines[0], affines[k + 1], target_geometry),
                        _compose(grid.geometry, u_inv[i], affines[k + 1], affines[0], atlas_geometries[k])))
    report(1.0, "learned registration done")
    return out


# ---------------------------------------------------------------------------------------------------------------
# one pair: atlasseg register


@dataclass
class PairRegistration:
    """A moving image registered to a fixed one (``atlasseg register``): the engine's :class:`Registration`, the
    moving channels (raw intensities) and label warped onto the fixed grid, the forward field's Jacobian
    determinant on the fixed grid and its statistics."""

    registration: Registration
    geometry: Geometry
    warped_images: list[torch.Tensor]
    warped_label: torch.Tensor | None
    jacobian: torch.Tensor
    jacobian_stats: dict
    model_folder: str
    settings: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def save(self, out_dir: str | Path) -> dict[str, str]:
        """``warped_moving.nii.gz`` (``warped_moving_<k>.nii.gz`` per modality when several),
        ``warped_label.nii.gz``, ``transform_forward.nii.gz`` / ``transform_inverse.nii.gz`` (ITK displacement
        fields, LPS mm: forward on the fixed grid maps fixed points to moving points, as ITK and Slicer resample),
        ``jacobian_determinant.nii.gz`` (of the forward map, on the fixed grid), ``run.json`` last."""
        out = Path(out_dir)
        written = {}
        t0 = time.perf_counter()
        for k, image in enumerate(self.warped_images):
            name = "warped_moving.nii.gz" if len(self.warped_images) == 1 else f"warped_moving_{k:04d}.nii.gz"
            written[name.split(".")[0]] = str(write_image(tensor_to_image(image, self.geometry), out / name))
        if self.warped_label is not None:
            label = self.warped_label
            image = tensor_to_image(label.to(torch.int32), self.geometry, label_pixel_type(int(label.max())))
            written["warped_label"] = str(write_image(image, out / "warped_label.nii.gz"))
        forward, inverse = self.registration.save(out, "transform")
        written.update(transform_forward=str(forward), transform_inverse=str(inverse))
        written["jacobian_determinant"] = str(write_image(tensor_to_image(self.jacobian, self.geometry),
                                                          out / "jacobian_determinant.nii.gz"))
        timings = {**self.timings, "saving": time.perf_counter() - t0}
        learned = self.registration.backend == "learned"
        model = {"method": "deepatlas", "model": self.model_folder} if learned else {}
        write_run_record(out, {**model, "command": "register",
                               "registration": {"backend": self.registration.backend, **self.settings},
                               "jacobian": self.jacobian_stats, "timings_s": timings, "files": written})
        return written


def register_pair(fixed: sitk.Image | Sequence[sitk.Image], moving: sitk.Image | Sequence[sitk.Image], model=None,
                  moving_label: sitk.Image | None = None, device: str = "auto", preset: str = "default",
                  iterations: int | None = None, backend: str = "learned") -> PairRegistration:
    """Register one moving image to a fixed one: with a DeepAtlas model (``backend="learned"``, see
    :func:`register_learned`) or, for comparison and where no model fits, with an iterative backend of the engine
    (``"torch"`` or ``"greedy"``; ``model`` and ``iterations`` unused). Same outputs either way."""
    from ..methods import BACKENDS as ITERATIVE_BACKENDS
    from ..registration import register

    if backend != "learned" and backend not in ITERATIVE_BACKENDS:
        raise ValueError(f"unknown registration backend {backend!r}: learned, {', '.join(ITERATIVE_BACKENDS)}")
    if backend == "learned" and model is None:
        raise ValueError("the learned backend needs a DeepAtlas model folder")
    t0 = time.perf_counter()
    bundle = load_deepatlas(model) if backend == "learned" else None
    fixed, moving = _channels(fixed), _channels(moving)
    check_target_images(fixed, [f"fixed image {k}" for k in range(len(fixed))])
    check_target_images(moving, [f"moving image {k}" for k in range(len(moving))])
    dev = resolve_device(device)
    t1 = time.perf_counter()
    if bundle is not None:
        (forward, inverse), = register_learned(fixed, [moving], bundle, dev, preset, iterations,
                                               atlas_labels=[moving_label] if moving_label is not None else None)
        reg = Registration(forward, inverse, "learned", time.perf_counter() - t1)
        settings = {"preset": preset, "iterations": LEARNED_PRESETS[preset] if iterations is None else int(iterations)}
    else:
        reg, = register(fixed, [moving], backend, dev, preset)
        forward, settings = reg.forward, {"preset": preset}
    t2 = time.perf_counter()
    geometry = Geometry.of(fixed[0])
    moving_geometry = Geometry.of(moving[0])
    fwd = forward.to(dev)
    warped = [warp_image(image_to_tensor(m).to(dev), moving_geometry, fwd)[0].cpu() for m in moving]
    warped_label = None
    if moving_label is not None:
        warped_label = warp_labels(labels_to_tensor(moving_label).to(dev), moving_geometry, fwd).cpu()
    jac = field_jacobian_determinant(forward)
    return PairRegistration(reg, geometry, warped, warped_label, jac, jacobian_stats(jac),
                            str(bundle.loaded.folder) if bundle is not None else "", settings,
                            {"load": t1 - t0, "registration": t2 - t1, "warp": time.perf_counter() - t2})
