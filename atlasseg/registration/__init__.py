"""The engine's one registration API: register atlases to a target, warp their images and labels.

>>> regs = register(target_images, [atlas.images for atlas in atlases], backend="torch")
>>> images, labels = warp_atlases(target_geometry, atlases, regs, label_values)
>>> regs = register(target_images, atlas_images, backend="learned", model="deepatlas_model/")   # DeepAtlas's F_R
>>> with learned_model("deepatlas_model/"):      # the model for callers that do not pass registration settings
...     segment(target_images, atlas_set, method="jlf", backend="learned")
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..atlas import check_target_images
from ..device import resolve_device
from ..intensity import percentile_normalize
from ..io import Geometry, image_to_tensor, labels_to_tensor
from ..methods import BACKENDS, MODEL_BACKENDS
from . import greedy_backend, torch_backend
from .transforms import DisplacementField, warp_image, warp_labels

ProgressFn = Callable[[float, str], None]

__all__ = ["BACKENDS", "MODEL_BACKENDS", "DisplacementField", "Registration", "learned_model", "register",
           "warp_atlases", "warp_image", "warp_labels", "normalized_tensor"]

# The registration model of the ``learned`` backend when a caller passes none (set by :func:`learned_model`).
_LEARNED_MODEL: contextvars.ContextVar = contextvars.ContextVar("atlasseg_learned_model", default=None)


@contextlib.contextmanager
def learned_model(model) -> Iterator[None]:
    """Within the block, ``register(..., backend="learned")`` without ``model=`` uses ``model`` (a DeepAtlas model
    folder): so that methods that call :func:`register` with their own settings (Deep Label Fusion, AtlasNet) can
    register with it too (``atlasseg segment --backend learned --reg-model DIR``)."""
    token = _LEARNED_MODEL.set(model)
    try:
        yield
    finally:
        _LEARNED_MODEL.reset(token)


@dataclass
class Registration:
    """One atlas registered to a target.

    ``forward`` lives on the target grid and maps target points to atlas points (pulls atlas data onto the
    target); ``inverse`` lives on the atlas grid and maps atlas points to target points (pulls target-space
    data, e.g. a network's output, into atlas space).
    """

    forward: DisplacementField
    inverse: DisplacementField
    backend: str
    seconds: float

    def save(self, folder: str | Path, name: str, suffix: str = ".nii.gz") -> tuple[Path, Path]:
        """Write both fields as ITK displacement-field images (SimpleITK and Slicer read them as transforms)."""
        folder = Path(folder)
        return (self.forward.save(folder / f"{name}_forward{suffix}"),
                self.inverse.save(folder / f"{name}_inverse{suffix}"))

    @classmethod
    def load(cls, folder: str | Path, name: str, suffix: str = ".nii.gz") -> Registration:
        folder = Path(folder)
        return cls(DisplacementField.load(folder / f"{name}_forward{suffix}"),
                   DisplacementField.load(folder / f"{name}_inverse{suffix}"), "file", 0.0)


def _as_channels(images: sitk.Image | Sequence[sitk.Image]) -> list[sitk.Image]:
    return [images] if isinstance(images, sitk.Image) else list(images)


def normalized_tensor(images: Sequence[sitk.Image], device: torch.device | None = None) -> torch.Tensor:
    """Channels -> (C, Z, Y, X) float32, each normalised by its 1st-99th percentiles."""
    t = image_to_tensor(list(images))
    return percentile_normalize(t).to(device or "cpu")


def register(target: sitk.Image | Sequence[sitk.Image], atlases: Sequence[sitk.Image | Sequence[sitk.Image]],
             backend: str = "torch", device: str | torch.device = "auto", preset: str = "default",
             mask: sitk.Image | None = None, progress: ProgressFn | None = None, **overrides) -> list[Registration]:
    """Register every atlas to the target.

    Args:
        target: the target's channel images (one per modality), all on one grid.
        atlases: per atlas, its channel images (same modalities, in the same order).
        backend: "torch" (batched, CUDA when available), "greedy" (PICSL Greedy, CPU) or "learned" (a DeepAtlas
            model's registration network: ``model=DIR`` or :func:`learned_model`; one forward pass per atlas,
            ``iterations=N`` steps of test-time optimisation; see :func:`atlasseg.deepatlas.register_learned`).
        preset: "fast", "default", "accurate" or "affine"; ``overrides`` change single settings of the backend
            (e.g. ``max_scale=1.5``: the affine's scales kept in [1/1.5, 1.5], by projection in the torch backend
            and by a rigid fallback in greedy; None by default).
        mask: optional target mask (non-zero = inside) restricting the similarity metric.
    Returns: one :class:`Registration` per atlas, in order.
    """
    target = _as_channels(target)
    atlases = [_as_channels(a) for a in atlases]
    if not atlases:
        raise ValueError("no atlases to register")
    check_target_images(target)
    for k, atlas in enumerate(atlases):
        check_target_images(atlas, [f"atlas {k} image {c}" for c in range(len(atlas))])
    for k, a in enumerate(atlases):
        if len(a) != len(target):
            raise ValueError(f"atlas {k} has {len(a)} channel(s), the target has {len(target)}")
    max_scale = overrides.get("max_scale")
    if max_scale is not None and (isinstance(max_scale, bool) or not isinstance(max_scale, (int, float))
                                  or not max_scale >= 1.0):
        raise ValueError(f"max_scale must be a number >= 1 (or None), got {max_scale!r}")
    dev = resolve_device(device)
    target_geometry = Geometry.of(target[0])
    atlas_geometries = [Geometry.of(a[0]) for a in atlases]
    start = time.perf_counter()
    if backend == "torch":
        settings = torch_backend.settings_from(preset, **overrides)
        t = normalized_tensor(target, dev)
        a = [normalized_tensor(x, dev) for x in atlases]
        m = labels_to_tensor(mask).to(dev) > 0 if mask is not None else None
        result = torch_backend.register_batch(t, target_geometry, a, atlas_geometries, settings, m, progress)
        fields = torch_backend.fields_from_result(result, target_geometry, atlas_geometries, settings.svf_steps,
                                                  settings.inverse_iterations)
    elif backend == "greedy":
        settings = greedy_backend.settings_from(preset, **overrides)
        norm_t = _normalized_images(target)
        norm_a = [_normalized_images(x) for x in atlases]
        fields = greedy_backend.register_all(norm_t, norm_a, settings, mask, progress, dev)
    elif backend in MODEL_BACKENDS:
        from ..deepatlas.inference import register_learned

        model = overrides.pop("model", None) or _LEARNED_MODEL.get()
        if model is None:
            raise ValueError("the learned registration backend needs a DeepAtlas model folder (model=DIR, or "
                             "--reg-model DIR on the command line)")
        if mask is not None:
            raise ValueError("the learned registration backend takes no registration mask")
        fields = register_learned(target, atlases, model, dev, preset, progress=progress, **overrides)
    else:
        raise ValueError(f"unknown registration backend '{backend}': choose from "
                         f"{(*BACKENDS, *MODEL_BACKENDS)}")
    seconds = (time.perf_counter() - start) / len(atlases)
    return [Registration(f, i, backend, seconds) for f, i in fields]


def _normalized_images(images: Sequence[sitk.Image]) -> list[sitk.Image]:
    t = normalized_tensor(images)
    out = []
    for c, im in enumerate(images):
        n = sitk.GetImageFromArray(t[c].numpy())
        n.CopyInformation(im)
        out.append(n)
    return out


def warp_atlases(registrations: Sequence[Registration], atlas_images: Sequence[Sequence[sitk.Image]],
                 atlas_labels: Sequence[sitk.Image] | None, label_values: Sequence[int] | None = None,
                 device: str | torch.device = "auto", normalize: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pull atlases onto the target grid.

    Images are interpolated linearly (after per-image percentile normalisation unless ``normalize=False``);
    labels label-aware (linear interpolation of each label's indicator, then argmax).
    Returns: images (N, C, Z, Y, X) float32 and labels (N, Z, Y, X) int64 (None without labels).
    """
    dev = resolve_device(device)
    images, labels = [], []
    for k, reg in enumerate(registrations):
        channels = _as_channels(atlas_images[k])
        geom = Geometry.of(channels[0])
        t = normalized_tensor(channels, dev) if normalize else image_to_tensor(channels).to(dev)
        field = reg.forward.to(dev)
        images.append(warp_image(t, geom, field))
        if atlas_labels is not None:
            lab = labels_to_tensor(atlas_labels[k]).to(dev)
            labels.append(warp_labels(lab, geom, field, label_values))
    return torch.stack(images), (torch.stack(labels) if labels else None)


def jacobian_determinant_range(field: DisplacementField) -> tuple[float, float]:
    """Min and max Jacobian determinant of ``x -> x + d(x)`` (folding shows as values <= 0)."""
    jac = sitk.DisplacementFieldJacobianDeterminant(field.to_sitk())
    arr = sitk.GetArrayViewFromImage(jac)
    return float(np.min(arr)), float(np.max(arr))
