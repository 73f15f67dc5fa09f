"""DLF data: the registration cache, atlas draws, patch sampling and augmentation.

Tensors follow :mod:`atlasseg.dlf.networks`: target (C, Z, Y, X) float32 normalised, atlas images
(N, C, Z, Y, X), atlas labels and reference labels as label *indices* (int64, 0..L-1).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai import transforms as mt
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atlas import AtlasSet, LoadedCase
from ..fusion import labels_to_index
from ..io import atomic_write, atomic_write_bytes, image_to_tensor
from ..pipeline import prepare
from ..registration import normalized_tensor

MANIFEST = "manifest.json"
CACHE_FORMAT = "atlasseg-dlf-registration-cache/1"


class CacheError(ValueError):
    """A broken or foreign registration cache; the message names the file."""


def atomic_write_file(write: Callable[[str], None], path: Path) -> str:
    """:func:`atlasseg.io.atomic_write`, returning the written file's sha256 (for manifests and model configs)."""
    return sha256(atomic_write(write, path))


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """safetensors file written atomically; returns its sha256."""
    return atomic_write_file(lambda tmp: save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp), path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


@dataclass
class CaseTensors:
    """One target with its warped atlases, all on the target grid (CPU tensors)."""

    target_id: str
    target: torch.Tensor          # (C, Z, Y, X) float32
    label: torch.Tensor | None    # (Z, Y, X) int64 indices
    atlas_ids: list[str]
    atlas_images: torch.Tensor    # (N, C, Z, Y, X) float32
    atlas_labels: torch.Tensor    # (N, Z, Y, X) int64 indices


class RegistrationCache:
    """Warped atlases per (target, atlas) pair, computed once with the engine's registration and kept on disk.

    Layout: ``<folder>/manifest.json`` (atlas set, backend, preset, label values and, per pair, file and
    sha256), ``targets/<target>.safetensors`` (normalised target image and label indices) and
    ``pairs/<target>/<atlas>.safetensors`` (warped normalised atlas image and label indices). Every file and the
    manifest are written atomically; a pair whose checksum no longer matches is an error naming the file.
    """

    def __init__(self, folder: str | Path, atlas_set: AtlasSet, backend: str = "torch", preset: str = "default",
                 device: str = "auto", batch_size: int = 16):
        self.folder = Path(folder)
        self.atlas_set = atlas_set
        self.backend, self.preset, self.device = backend, preset, device
        self.batch_size = batch_size
        self.labels = atlas_set.label_values
        self.manifest = self._load_manifest()
        self._loaded: dict[str, LoadedCase] = {}

    # -- manifest -------------------------------------------------------------------------------------------
    def _header(self) -> dict:
        return {"format": CACHE_FORMAT, "atlas_set": self.atlas_set.name,
                "atlas_root": str(self.atlas_set.root) if self.atlas_set.root else None,
                "backend": self.backend, "preset": self.preset, "labels": self.labels,
                "modalities": {str(k): v for k, v in self.atlas_set.modalities.items()}}

    def _load_manifest(self) -> dict:
        path = self.folder / MANIFEST
        header = self._header()
        if not path.is_file():
            return {**header, "targets": {}, "pairs": {}}
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CacheError(f"{path}: invalid JSON ({err}); delete the cache folder to rebuild it") from None
        for key in ("format", "atlas_set", "backend", "preset", "labels", "modalities"):
            if manifest.get(key) != header[key]:
                raise CacheError(f"{path}: cache built for {key}={manifest.get(key)!r}, this run needs "
                                 f"{header[key]!r}; use another --cache folder")
        return manifest

    def _save_manifest(self) -> None:
        atomic_write_bytes(self.folder / MANIFEST, json.dumps(self.manifest, indent=1).encode())

    # -- building -------------------------------------------------------------------------------------------
    def _case(self, case_id: str) -> LoadedCase:
        if case_id not in self._loaded:
            self._loaded[case_id] = self.atlas_set.load(case_id)
        return self._loaded[case_id]

    def has(self, target_id: str, atlas_id: str) -> bool:
        return f"{target_id}|{atlas_id}" in self.manifest["pairs"]

    def ensure(self, pairs: dict[str, Sequence[str]], progress: Callable[[float, str], None] | None = None) -> int:
        """Register and store every missing (target, atlas) pair; all atlases of a target in batched calls.

        Returns the number of registrations computed.
        """
        todo = {t: sorted(set(a for a in atlases if not self.has(t, a))) for t, atlases in pairs.items()}
        todo = {t: a for t, a in todo.items() if a or t not in self.manifest["targets"]}
        total = sum(len(a) for a in todo.values()) or 1
        done = 0
        for target_id, atlas_ids in todo.items():
            target = self._case(target_id)
            self._store_target(target)
            for start in range(0, len(atlas_ids), self.batch_size):
                chunk = [self._case(a) for a in atlas_ids[start:start + self.batch_size]]
                if progress:
                    progress(done / total, f"registering {len(chunk)} atlases to {target_id}")
                prepared = prepare(target.images, self.atlas_set, atlases=chunk, backend=self.backend,
                                   device=self.device, preset=self.preset)
                index = labels_to_index(prepared.labels, self.labels).to(torch.uint8 if len(self.labels) < 256
                                                                         else torch.int16)
                for k, atlas in enumerate(chunk):
                    rel = Path("pairs") / _safe(target_id) / f"{_safe(atlas.case_id)}.safetensors"
                    digest = atomic_save_tensors({"image": prepared.images[k].float(), "label": index[k]},
                                                 self.folder / rel)
                    self.manifest["pairs"][f"{target_id}|{atlas.case_id}"] = {
                        "target": target_id, "atlas": atlas.case_id, "file": str(rel), "sha256": digest,
                        "registration_s": prepared.registrations[k].seconds}
                done += len(chunk)
                self._save_manifest()
        if progress:
            progress(1.0, "registration cache ready")
        return sum(len(a) for a in todo.values())

    def _store_target(self, case: LoadedCase) -> None:
        if case.case_id in self.manifest["targets"]:
            return
        tensors = {"image": normalized_tensor(case.images)}
        if case.label is not None:
            raw = image_to_tensor(case.label, torch.int64)
            tensors["label"] = labels_to_index(raw, self.labels)[0].to(torch.uint8 if len(self.labels) < 256
                                                                        else torch.int16)
        rel = Path("targets") / f"{_safe(case.case_id)}.safetensors"
        digest = atomic_save_tensors(tensors, self.folder / rel)
        self.manifest["targets"][case.case_id] = {"file": str(rel), "sha256": digest}
        self._save_manifest()

    # -- reading --------------------------------------------------------------------------------------------
    def _read(self, entry: dict) -> dict[str, torch.Tensor]:
        path = self.folder / entry["file"]
        if not path.is_file():
            raise CacheError(f"{path}: listed in {self.folder / MANIFEST} but missing; delete the cache to rebuild")
        if sha256(path) != entry["sha256"]:
            raise CacheError(f"{path}: checksum does not match the manifest (corrupted); delete it to rebuild")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CacheError(f"{path}: unreadable ({err})") from None

    def load(self, target_id: str, atlas_ids: Sequence[str]) -> CaseTensors:
        """The target and its warped atlases (which must be cached; see :meth:`ensure`)."""
        if target_id not in self.manifest["targets"]:
            raise CacheError(f"{self.folder}: target {target_id} not cached")
        t = self._read(self.manifest["targets"][target_id])
        images, labels = [], []
        for a in atlas_ids:
            key = f"{target_id}|{a}"
            if key not in self.manifest["pairs"]:
                raise CacheError(f"{self.folder}: pair ({target_id}, {a}) not cached")
            p = self._read(self.manifest["pairs"][key])
            images.append(p["image"])
            labels.append(p["label"].long())
        spatial = tuple(t["image"].shape[1:])
        c = t["image"].shape[0]
        return CaseTensors(target_id, t["image"], t["label"].long() if "label" in t else None, list(atlas_ids),
                           torch.stack(images) if images else torch.zeros((0, c, *spatial)),
                           torch.stack(labels) if labels else torch.zeros((0, *spatial), dtype=torch.int64))


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
