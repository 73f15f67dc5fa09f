"""The one registration cache: registrations computed once with the engine and kept on disk.

Per (fixed case, moving case) and per (backend, preset, settings) — the cache folder is bound to one atlas set,
one backend, one preset and one settings dict — it keeps, on request:

* ``warped``: the moving case's normalised image and label indices pulled onto the fixed grid (what Deep Label
  Fusion trains on: atlases warped onto a target);
* ``inverse``: the fixed case's normalised image and label indices pulled onto the moving grid (what AtlasNet
  trains on: a case mapped into an atlas's space);
* ``fields``: the forward field (on the fixed grid, fixed point -> moving point) and the inverse field (on the
  moving grid), physical LPS mm, as :class:`~atlasseg.registration.Registration` gives them.

Layout: ``manifest.json`` (format, atlas set, backend, preset, settings, label values, modalities; per fixed
case and per pair the files with their sha256), ``cases/<id>.safetensors`` (normalised image and label indices of
a case on its own grid) and ``pairs/<fixed>/<moving>.safetensors``. Files and manifest are written atomically;
a file whose checksum no longer matches is an error naming it. Labels are stored as indices into the atlas set's
sorted label values.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import SimpleITK as sitk
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .atlas import AtlasSet, LoadedCase
from .device import resolve_device
from .fusion import labels_to_index
from .io import (
    Geometry,
    atomic_save_tensors,
    atomic_write_bytes,
    image_to_tensor,
    labels_to_tensor,
    safe_name,
    sha256,
)
from .registration import DisplacementField, Registration, normalized_tensor, register, warp_image, warp_labels
from .training.data import CaseTensors

MANIFEST = "manifest.json"
CACHE_FORMAT = "atlasseg-registration-cache/2"
LEGACY_FORMAT = "atlasseg-dlf-registration-cache/1"   # DLF's cache before this module: warped atlases only
PARTS = ("warped", "inverse", "fields")


class CacheError(ValueError):
    """A broken or foreign registration cache; the message names the file."""


_safe = safe_name


def _index_dtype(n_labels: int) -> torch.dtype:
    return torch.uint8 if n_labels < 256 else torch.int16


def _from_format_1(manifest: dict) -> dict:
    """A DLF cache of format 1 in today's terms: its targets are cases, its pairs have the ``warped`` part (their
    files name the tensors ``image`` / ``label``, read as ``warped_image`` / ``warped_label``)."""
    pairs = {key: {**entry, "fixed": entry["target"], "moving": entry["atlas"], "parts": ["warped"]}
             for key, entry in manifest.get("pairs", {}).items()}
    return {**manifest, "format": CACHE_FORMAT, "settings": {}, "cases": manifest.get("targets", {}),
            "pairs": pairs}


_TENSOR_ALIASES = {"warped_image": "image", "warped_label": "label"}   # names inside format-1 pair files


class RegistrationCache:
    """Registrations of moving cases onto fixed cases of one atlas set (see the module docstring).

    Args:
        folder: the cache folder (created on demand).
        atlas_set: where cases are read from (fixed and moving ids are its case ids).
        backend / preset / settings: registration (:func:`atlasseg.registration.register`; ``settings`` are
            overrides of single backend settings); part of the cache's identity.
        device: where registration runs; batch_size: moving cases registered together per fixed case.
        fixed_masks: per fixed case id, a mask on its grid restricting the similarity metric (the caller's case id
            must identify the mask too: the manifest does not record it).
    """

    def __init__(self, folder: str | Path, atlas_set: AtlasSet, backend: str = "torch", preset: str = "default",
                 device: str = "auto", batch_size: int = 16, settings: dict | None = None,
                 fixed_masks: dict[str, sitk.Image] | None = None):
        self.folder = Path(folder)
        self.atlas_set = atlas_set
        self.backend, self.preset, self.device = backend, preset, device
        self.settings = dict(settings or {})
        self.fixed_masks = dict(fixed_masks or {})
        self.batch_size = batch_size
        self.labels = atlas_set.label_values
        self.manifest = self._load_manifest()
        self._loaded: dict[str, LoadedCase] = {}

    # -- manifest -------------------------------------------------------------------------------------------
    def _header(self) -> dict:
        return {"format": CACHE_FORMAT, "atlas_set": self.atlas_set.name,
                "atlas_root": str(self.atlas_set.root) if self.atlas_set.root else None,
                "backend": self.backend, "preset": self.preset, "settings": self.settings, "labels": self.labels,
                "modalities": {str(k): v for k, v in self.atlas_set.modalities.items()}}

    def _load_manifest(self) -> dict:
        path = self.folder / MANIFEST
        header = self._header()
        if not path.is_file():
            return {**header, "cases": {}, "pairs": {}}
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CacheError(f"{path}: invalid JSON ({err}); delete the cache folder to rebuild it") from None
        if manifest.get("format") == LEGACY_FORMAT:
            manifest = _from_format_1(manifest)
        for key in ("format", "atlas_set", "backend", "preset", "settings", "labels", "modalities"):
            if manifest.get(key) != header[key]:
                raise CacheError(f"{path}: cache built for {key}={manifest.get(key)!r}, this run needs "
                                 f"{header[key]!r}; use another cache folder")
        return manifest

    def _save_manifest(self) -> None:
        atomic_write_bytes(self.folder / MANIFEST, json.dumps(self.manifest, indent=1).encode())

    @staticmethod
    def _key(fixed_id: str, moving_id: str) -> str:
        return f"{fixed_id}|{moving_id}"

    def has(self, fixed_id: str, moving_id: str, parts: Sequence[str] = ("warped",)) -> bool:
        entry = self.manifest["pairs"].get(self._key(fixed_id, moving_id))
        return entry is not None and all(p in entry["parts"] for p in parts)

    # -- building -------------------------------------------------------------------------------------------
    def _case(self, case_id: str) -> LoadedCase:
        if case_id not in self._loaded:
            self._loaded[case_id] = self.atlas_set.load(case_id)
        return self._loaded[case_id]

    def ensure(self, pairs: dict[str, Sequence[str]], progress: Callable[[float, str], None] | None = None,
               parts: Sequence[str] = ("warped",)) -> int:
        """Register and store every (fixed, moving) pair that lacks one of ``parts``; per fixed case, its moving
        cases are registered in batched calls. Returns the number of registrations computed."""
        bad = sorted(set(parts) - set(PARTS))
        if bad:
            raise ValueError(f"unknown cache parts {bad}: choose from {PARTS}")
        todo = {f: sorted({m for m in movings if not self.has(f, m, parts)}) for f, movings in pairs.items()}
        todo = {f: m for f, m in todo.items() if m or f not in self.manifest["cases"]}
        total = sum(len(m) for m in todo.values()) or 1
        done = 0
        for fixed_id, moving_ids in todo.items():
            self._store_case(fixed_id)
            for start in range(0, len(moving_ids), self.batch_size):
                chunk = moving_ids[start:start + self.batch_size]
                if progress:
                    progress(done / total, f"registering {len(chunk)} case(s) to {fixed_id}")
                self._register_chunk(fixed_id, chunk, parts)
                done += len(chunk)
                self._save_manifest()
        if progress:
            progress(1.0, "registration cache ready")
        return sum(len(m) for m in todo.values())

    def _register_chunk(self, fixed_id: str, moving_ids: Sequence[str], parts: Sequence[str]) -> None:
        fixed = self._case(fixed_id)
        movings = [self._case(m) for m in moving_ids]
        regs = register(fixed.images, [m.images for m in movings], backend=self.backend, device=self.device,
                        preset=self.preset, mask=self.fixed_masks.get(fixed_id), **self.settings)
        dev = resolve_device(self.device)
        fixed_geometry = Geometry.of(fixed.images[0])
        fixed_image = normalized_tensor(fixed.images, dev)
        for moving, reg in zip(movings, regs):
            existing = self.manifest["pairs"].get(self._key(fixed_id, moving.case_id))
            # parts already cached are kept as they are (a training may have used them); only new parts come from
            # this registration
            tensors = self._stored_tensors(existing)
            new = sorted(set(parts) - set(existing["parts"] if existing else []))
            stored = sorted(set(new) | set(existing["parts"] if existing else []))
            moving_geometry = Geometry.of(moving.images[0])
            if "warped" in new:
                tensors["warped_image"] = warp_image(normalized_tensor(moving.images, dev), moving_geometry,
                                                     reg.forward.to(dev)).float()
                tensors["warped_label"] = self._warp_index(moving.label, moving_geometry, reg.forward.to(dev))
            if "inverse" in new:
                tensors["inverse_image"] = warp_image(fixed_image, fixed_geometry, reg.inverse.to(dev)).float()
                if fixed.label is not None:
                    tensors["inverse_label"] = self._warp_index(fixed.label, fixed_geometry, reg.inverse.to(dev))
            if "fields" in new:
                tensors["forward_field"] = reg.forward.field.float()
                tensors["inverse_field"] = reg.inverse.field.float()
            rel = Path("pairs") / _safe(fixed_id) / f"{_safe(moving.case_id)}.safetensors"
            digest = atomic_save_tensors(tensors, self.folder / rel)
            self.manifest["pairs"][self._key(fixed_id, moving.case_id)] = {
                "fixed": fixed_id, "moving": moving.case_id, "file": str(rel), "sha256": digest, "parts": stored,
                "registration_s": existing["registration_s"] if existing else reg.seconds,
                "fixed_geometry": fixed_geometry.to_dict(), "moving_geometry": moving_geometry.to_dict()}

    def _stored_tensors(self, entry: dict | None) -> dict[str, torch.Tensor]:
        if entry is None:
            return {}
        return {next((new for new, old in _TENSOR_ALIASES.items() if old == k), k): v
                for k, v in self._read(entry).items()}

    def _warp_index(self, label, geometry: Geometry, field: DisplacementField) -> torch.Tensor:
        warped = warp_labels(labels_to_tensor(label).to(field.field.device), geometry, field, self.labels)
        return labels_to_index(warped, self.labels).to(_index_dtype(len(self.labels)))

    def _store_case(self, case_id: str) -> None:
        if case_id in self.manifest["cases"]:
            return
        case = self._case(case_id)
        tensors = {"image": normalized_tensor(case.images)}
        if case.label is not None:
            raw = image_to_tensor(case.label, torch.int64)
            tensors["label"] = labels_to_index(raw, self.labels)[0].to(_index_dtype(len(self.labels)))
        rel = Path("cases") / f"{_safe(case_id)}.safetensors"
        digest = atomic_save_tensors(tensors, self.folder / rel)
        self.manifest["cases"][case_id] = {"file": str(rel), "sha256": digest,
                                           "geometry": Geometry.of(case.images[0]).to_dict()}
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

    def _pair(self, fixed_id: str, moving_id: str, part: str) -> tuple[dict, dict[str, torch.Tensor]]:
        entry = self.manifest["pairs"].get(self._key(fixed_id, moving_id))
        if entry is None or part not in entry["parts"]:
            raise CacheError(f"{self.folder}: pair ({fixed_id}, {moving_id}) has no cached '{part}' part")
        return entry, self._read(entry)

    def case(self, case_id: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A case on its own grid: normalised image (C, Z, Y, X) and label indices (Z, Y, X) int64 or None."""
        if case_id not in self.manifest["cases"]:
            raise CacheError(f"{self.folder}: case {case_id} not cached")
        t = self._read(self.manifest["cases"][case_id])
        return t["image"], (t["label"].long() if "label" in t else None)

    def load(self, fixed_id: str, moving_ids: Sequence[str]) -> CaseTensors:
        """A fixed case with moving cases warped onto its grid (all cached with the ``warped`` part)."""
        image, label = self.case(fixed_id)
        images, labels = [], []
        for m in moving_ids:
            _, p = self._pair(fixed_id, m, "warped")
            images.append(p.get("warped_image", p.get("image")))
            labels.append(p.get("warped_label", p.get("label")).long())
        spatial, c = tuple(image.shape[1:]), image.shape[0]
        return CaseTensors(fixed_id, image, label, list(moving_ids),
                           torch.stack(images) if images else torch.zeros((0, c, *spatial)),
                           torch.stack(labels) if labels else torch.zeros((0, *spatial), dtype=torch.int64))

    def load_inverse(self, fixed_id: str, moving_id: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fixed case pulled onto the moving case's grid: image (C, Z, Y, X), label indices or None."""
        _, p = self._pair(fixed_id, moving_id, "inverse")
        return p["inverse_image"], (p["inverse_label"].long() if "inverse_label" in p else None)

    def registration(self, fixed_id: str, moving_id: str) -> Registration:
        """The forward (fixed grid) and inverse (moving grid) fields of a cached pair."""
        entry, p = self._pair(fixed_id, moving_id, "fields")
        return Registration(DisplacementField(p["forward_field"], Geometry.from_dict(entry["fixed_geometry"])),
                            DisplacementField(p["inverse_field"], Geometry.from_dict(entry["moving_geometry"])),
                            f"cache:{self.backend}", float(entry["registration_s"]))

    def registration_seconds(self, fixed_id: str, moving_id: str) -> float:
        return float(self.manifest["pairs"][self._key(fixed_id, moving_id)]["registration_s"])
