"""Training data: atlas draws, patch sampling and augmentation, shared by every trainable method.

Tensors: target (C, Z, Y, X) float32 normalised (:func:`atlasseg.registration.normalized_tensor`), atlas images
(N, C, Z, Y, X), atlas labels and reference labels as label *indices* (int64, 0..L-1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai import transforms as mt


@dataclass
class CaseTensors:
    """One target with its warped atlases, all on the target grid (CPU tensors)."""

    target_id: str
    target: torch.Tensor          # (C, Z, Y, X) float32
    label: torch.Tensor | None    # (Z, Y, X) int64 indices
    atlas_ids: list[str]
    atlas_images: torch.Tensor    # (N, C, Z, Y, X) float32
    atlas_labels: torch.Tensor    # (N, Z, Y, X) int64 indices



def draw_atlases(pool: Sequence[str], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` atlas ids drawn at random from ``pool``: without duplicates when the pool is large enough, else with
    (always exactly ``n`` ids)."""
    if not pool:
        raise ValueError("the atlas pool is empty")
    return [str(x) for x in rng.choice(list(pool), n, replace=n > len(pool))]


def candidate_pools(targets: Sequence[str], pool: Sequence[str], per_target: int | None,
                    seed: int) -> dict[str, list[str]]:
    """Per target, the atlases it may draw from: the pool without the target itself, or a fixed random subset of
    ``per_target`` of them (registrations of those pairs are cached once)."""
    out = {}
    for k, t in enumerate(targets):
        others = sorted(a for a in pool if a != t)
        if per_target is not None and per_target < len(others):
            rng = np.random.default_rng([seed, k])
            others = sorted(str(x) for x in rng.choice(others, per_target, replace=False))
        out[t] = others
    return out


# ---------------------------------------------------------------------------------------------------------
# patches


def crop_slices(shape: Sequence[int], patch: Sequence[int], centre: Sequence[int]) -> tuple[slice, ...]:
    """Slices of a ``patch``-sized window around ``centre`` clamped inside ``shape`` (``patch`` <= ``shape``)."""
    out = []
    for n, p, c in zip(shape, patch, centre):
        start = int(min(max(c - p // 2, 0), n - p))
        out.append(slice(start, start + p))
    return tuple(out)


def pad_to(x: torch.Tensor, shape: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Pad the last three axes of ``x`` at the end up to ``shape`` (no-op where already as large)."""
    pads = []
    for n, s in zip(reversed(x.shape[-3:]), reversed(tuple(shape))):
        pads += [0, max(0, int(s) - int(n))]
    return torch.nn.functional.pad(x, pads, value=value) if any(pads) else x


def sample_patch(case: CaseTensors, coords: torch.Tensor, atlas_rows: Sequence[int], patch: Sequence[int],
                 foreground_ratio: float, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """One training patch: with probability ``foreground_ratio`` centred on a random foreground voxel of the
    target, otherwise on a uniformly random voxel (a volume smaller than ``patch`` is used whole, padded).

    Returns a dict with ``target`` (C, *patch), ``atlas_images`` (N, C, *patch), ``atlas_labels`` (N, *patch),
    ``label`` (1, *patch) and ``coords`` (3, *patch); padding is 0 (background).
    """
    full = [max(int(s), int(p)) for s, p in zip(case.target.shape[1:], patch)]
    label = pad_to(case.label, full)
    if rng.random() < foreground_ratio and bool((label > 0).any()):
        fg = torch.nonzero(label > 0)
        centre = fg[int(rng.integers(len(fg)))].tolist()
    else:
        centre = [int(rng.integers(n)) for n in full]
    sl = crop_slices(full, patch, centre)
    rows = list(atlas_rows)
    return {"target": pad_to(case.target, full)[(slice(None), *sl)],
            "atlas_images": pad_to(case.atlas_images[rows], full)[(slice(None), slice(None), *sl)],
            "atlas_labels": pad_to(case.atlas_labels[rows], full)[(slice(None), *sl)],
            "label": label[sl][None],
            "coords": pad_to(coords, full)[(slice(None), *sl)]}


# ---------------------------------------------------------------------------------------------------------
# augmentation


@dataclass
class AugmentConfig:
    """Augmentation settings (probabilities per sample; angles in radians; elastic in voxels)."""

    histogram_shift_prob: float = 0.7
    histogram_control_points: tuple[int, int] = (4, 7)   # MONAI's default is 10: fewer points, larger shifts
    modality_noise_prob: float = 0.5
    flip_prob: float = 0.5
    rotate_range: float = 0.17                           # about 10 degrees per axis
    elastic_sigma: tuple[float, float] = (5.0, 7.0)
    elastic_magnitude: tuple[float, float] = (20.0, 60.0)
    spatial_prob: float = 0.5
    noise_prob: float = 0.3
    noise_std: float = 0.03


class Augmenter:
    """Random augmentation of a training patch, consistent across target, atlases and labels.

    Intensity: a histogram shift drawn independently for the target and each atlas; for multi-modal sets, with
    probability ``modality_noise_prob`` one modality is replaced by N(0, 1) noise in the target and all atlases
    (modality augmentation of the paper); Gaussian noise. Spatial (same draw for every image and label): flips,
    small rotations and an elastic deformation (images linear, labels nearest). Coordinate maps are not moved.
    """

    def __init__(self, config: AugmentConfig, seed: int = 0):
        self.config = config
        c = config
        self.histogram = mt.RandHistogramShift(num_control_points=c.histogram_control_points,
                                               prob=c.histogram_shift_prob)
        self.noise = mt.RandGaussianNoise(prob=c.noise_prob, std=c.noise_std)
        keys = ["image", "label"]
        self.spatial = mt.Compose([
            mt.RandFlipd(keys, prob=c.flip_prob, spatial_axis=0),
            mt.RandFlipd(keys, prob=c.flip_prob, spatial_axis=1),
            mt.RandFlipd(keys, prob=c.flip_prob, spatial_axis=2),
            mt.Rand3DElasticd(keys, sigma_range=c.elastic_sigma, magnitude_range=c.elastic_magnitude,
                              prob=c.spatial_prob, rotate_range=(c.rotate_range,) * 3,
                              mode=("bilinear", "nearest"), padding_mode="zeros"),
        ])
        self.set_seed(seed)

    def set_seed(self, seed: int) -> None:
        """Reseed every random transform (called once per epoch, so a resumed run repeats the same draws)."""
        self.rng = np.random.default_rng([seed, 17])
        for k, t in enumerate((self.histogram, self.noise)):
            t.set_random_state(seed=int(seed * 131 + k) % (2 ** 32))
        self.spatial.set_random_state(seed=int(seed * 131 + 7) % (2 ** 32))

    def _intensity(self, image: torch.Tensor) -> torch.Tensor:
        """(C, ...) -> histogram shift of each channel, then Gaussian noise."""
        shifted = torch.stack([torch.as_tensor(self.histogram(ch[None]))[0] for ch in image])
        return torch.as_tensor(self.noise(shifted)).float()

    def __call__(self, sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        target, atlases = sample["target"], sample["atlas_images"]
        n, c = atlases.shape[:2]
        target = self._intensity(target)
        atlases = torch.stack([self._intensity(a) for a in atlases]) if n else atlases
        if c > 1 and self.rng.random() < self.config.modality_noise_prob:
            m = int(self.rng.integers(c))
            target = target.clone()
            target[m] = torch.randn_like(target[m])
            if n:
                atlases = atlases.clone()
                atlases[:, m] = torch.randn_like(atlases[:, m])
        spatial = tuple(target.shape[1:])
        image = torch.cat([target, atlases.reshape(n * c, *spatial)])
        label = torch.cat([sample["label"], sample["atlas_labels"]]).float()
        out = self.spatial({"image": image, "label": label})
        image, label = torch.as_tensor(out["image"]).float(), torch.as_tensor(out["label"]).round().long()
        return {"target": image[:c], "atlas_images": image[c:].reshape(n, c, *spatial),
                "atlas_labels": label[1:], "label": label[:1], "coords": sample["coords"]}
