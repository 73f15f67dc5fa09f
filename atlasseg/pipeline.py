"""Multi-atlas segmentation of one target: choose atlases, register, warp, fuse, collect maps.

The one pipeline used by the CLI, the Slicer modules and the benchmarks.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .atlas import AtlasSet, AtlasSetError, LoadedCase, check_target_images
from .device import resolve_device
from .fusion import METHODS, FusionResult, atlas_agreement, fuse, oracle_coverage
from .io import (
    Geometry,
    atomic_write_bytes,
    label_pixel_type,
    labels_to_tensor,
    safe_name,
    tensor_to_image,
    write_image,
)
from .methods import DEFAULT_BACKEND, DEFAULT_N_ATLASES, DEFAULT_PRESET, RUN_RECORD, map_kinds
from .progress import Progress
from .registration import Registration, normalized_tensor, register, warp_atlases


@dataclass
class SegmentationResult:
    """Everything a multi-atlas run produces, on the target grid."""

    geometry: Geometry
    fusion: FusionResult
    atlas_ids: list[str]
    label_names: dict[int, str]
    warped_labels: torch.Tensor                       # (N, Z, Y, X) int64
    registrations: list[Registration]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def segmentation(self) -> sitk.Image:
        seg = self.fusion.segmentation
        return tensor_to_image(seg.to(torch.int32), self.geometry, label_pixel_type(int(seg.max())))

    def vote_maps(self) -> dict[int, sitk.Image]:
        """Per-label vote / posterior maps (float, 0..1)."""
        return {v: tensor_to_image(self.fusion.posteriors[i].float(), self.geometry)
                for i, v in enumerate(self.fusion.labels)}

    def weight_maps(self) -> dict[str, sitk.Image]:
        """Per-atlas weight maps (empty for methods without them)."""
        if self.fusion.atlas_weights is None:
            return {}
        return {a: tensor_to_image(self.fusion.atlas_weights[k].float(), self.geometry)
                for k, a in enumerate(self.atlas_ids)}

    def agreement_map(self) -> sitk.Image:
        """Fraction of atlases agreeing with the per-voxel majority label."""
        return tensor_to_image(atlas_agreement(self.warped_labels).float(), self.geometry)

    def oracle(self, reference: sitk.Image, fraction: float = 0.10) -> tuple[sitk.Image, dict]:
        """Oracle coverage at ``fraction``: 1 where at least that share of atlases carries the reference label."""
        diffs = self.geometry.differences(Geometry.of(reference))
        if diffs:
            raise ValueError("reference is not on the target grid: " + "; ".join(diffs))
        ref = labels_to_tensor(reference).to(self.warped_labels.device)
        covered, summary = oracle_coverage(self.warped_labels, ref, self.fusion.labels, fraction)
        return tensor_to_image(covered.to(torch.uint8), self.geometry), summary

    def save(self, out_dir: str | Path, maps: bool | Collection[str] = False, transforms: bool = False,
             reference: sitk.Image | None = None, oracle_fraction: float = 0.10) -> dict[str, str]:
        """Write the segmentation and, on request, the maps (NIfTI on the target grid; ``maps``: True for all, or
        the kinds of :data:`atlasseg.methods.MAP_KINDS`) and transforms."""
        out = Path(out_dir)
        kinds = map_kinds(maps)
        written = {"segmentation": str(write_image(self.segmentation, out / "segmentation.nii.gz"))}
        if "votes" in kinds:
            for value, image in self.vote_maps().items():
                name = self.label_names.get(value, f"label{value}")
                path = out / "maps" / f"votes_{value}_{_safe(name)}.nii.gz"
                written[f"votes_{value}"] = str(write_image(image, path))
        if "weights" in kinds:
            for atlas_id, image in self.weight_maps().items():
                path = out / "maps" / f"weights_{_safe(atlas_id)}.nii.gz"
                written[f"weights_{atlas_id}"] = str(write_image(image, path))
        if "agreement" in kinds:
            written["agreement"] = str(write_image(self.agreement_map(), out / "maps" / "agreement.nii.gz"))
        if "oracle" in kinds and reference is not None:
            image, summary = self.oracle(reference, oracle_fraction)
            written["oracle"] = str(write_image(image, out / "maps" / "oracle_coverage.nii.gz"))
            (out / "maps" / "oracle_coverage.json").write_text(json.dumps(
                {"fraction": oracle_fraction, "coverage": {str(k): v for k, v in summary.items()}}, indent=2))
        if transforms:
            for atlas_id, reg in zip(self.atlas_ids, self.registrations):
                reg.save(out / "transforms", _safe(atlas_id))
        written.update(self.save_extra(out, kinds))
        write_run_record(out, {"method": self.fusion.method, **self.run_fields(), "atlases": self.atlas_ids,
                               "labels": self.label_names, "timings_s": self.timings, "files": written})
        return written

    def save_extra(self, out: Path, maps: frozenset[str]) -> dict[str, str]:
        """Outputs a method adds (written before ``run.json``, which comes last; ``maps``: the map kinds asked
        for); none here."""
        return {}

    def run_fields(self) -> dict:
        """Fields a method adds to ``run.json`` (e.g. its model folder)."""
        return {}

    def save_probability_maps(self, out: Path) -> dict[str, str]:
        """``maps/probability_<value>_<name>.nii.gz``: the final per-label probabilities (trained methods)."""
        written = {}
        for i, v in enumerate(self.fusion.labels):
            image = tensor_to_image(self.fusion.posteriors[i].float(), self.geometry)
            name = _safe(self.label_names.get(v, f"label{v}"))
            written[f"probability_{v}"] = str(write_image(image, out / "maps" / f"probability_{v}_{name}.nii.gz"))
        return written


RUN_FORMAT = "atlasseg-run"
RUN_VERSION = 1


_STAGED: dict[str, Path] = {}     # a run folder being written (absolute path) -> the folder it becomes


@contextmanager
def staged_run_folder(staging: str | Path, final: str | Path) -> Iterator[Path]:
    """While a run is written into ``staging`` (a temporary folder that the caller renames to ``final`` once the
    run is complete), ``run.json`` records its files at their paths under ``final``."""
    key = os.path.abspath(staging)
    _STAGED[key] = Path(final)
    try:
        yield Path(staging)
    finally:
        _STAGED.pop(key, None)


def _final_files(out_dir: str | Path, files: dict) -> dict:
    """``files`` with the paths under a staged ``out_dir`` moved to the folder it becomes (others unchanged)."""
    staging = os.path.abspath(out_dir)
    final = _STAGED.get(staging)
    if final is None:
        return files
    moved = {}
    for key, value in files.items():
        path = os.path.abspath(str(value))
        try:
            inside = os.path.commonpath([path, staging]) == staging
        except ValueError:          # another drive
            inside = False
        moved[key] = str(final / os.path.relpath(path, staging)) if inside else value
    return moved


def write_run_record(out_dir: str | Path, fields: dict) -> Path:
    """Write ``run.json`` atomically: ``format`` ("atlasseg-run"), ``version`` (1), ``success`` (true: written
    last, after every output file), ``method``, ``model`` (a trained method's model folder, else absent),
    ``atlases`` (ids, in order), ``labels`` (value -> name), ``timings_s`` (stage -> seconds) and ``files``
    (output name -> path; for a folder written through :func:`staged_run_folder`, the paths it will have).
    Documented in README.md ("run.json")."""
    record = {"format": RUN_FORMAT, "version": RUN_VERSION, "success": True, **fields}
    if isinstance(record.get("files"), dict):
        record["files"] = _final_files(out_dir, record["files"])
    return atomic_write_bytes(Path(out_dir) / RUN_RECORD, json.dumps(record, indent=2, default=str).encode())


def amend_run_record(out_dir: str | Path, fields: dict) -> Path:
    """Add ``fields`` to a written ``run.json`` (dicts such as ``timings_s`` and ``files`` are merged), rewritten
    atomically: the caller's last step, so ``run.json`` stays the last file written."""
    path = Path(out_dir) / RUN_RECORD
    record = json.loads(path.read_text())
    for key, value in fields.items():
        record[key] = {**record[key], **value} if isinstance(value, dict) and isinstance(record.get(key), dict) \
            else value
    return write_run_record(out_dir, {k: v for k, v in record.items() if k not in ("format", "version", "success")})


_safe = safe_name


def atlas_pool(atlas_set: AtlasSet, exclude: Sequence[str] = ()) -> list[str]:
    """The sorted case ids atlases are drawn from: the set less ``exclude``."""
    return sorted(i for i in atlas_set.case_ids if i not in set(exclude))


def choose_atlases(atlas_set: AtlasSet, n_atlases: int | None, exclude: Sequence[str] = (), seed: int = 0,
                   atlas_ids: Sequence[str] | None = None) -> list[str]:
    """The atlases to use: given ids, or ``n_atlases`` drawn with a fixed seed from the sorted pool (the set less
    ``exclude``). ``n_atlases=None``: up to ``DEFAULT_N_ATLASES`` (the whole pool where it is smaller).

    Ids that are not in the set, an atlas that is both asked for and excluded (a typo in an exclusion must not
    silently let the target be its own atlas), and more atlases asked for than the pool holds are errors."""
    where = atlas_set.root or atlas_set.name
    unknown = [a for a in list(atlas_ids or []) + list(exclude) if a not in set(atlas_set.case_ids)]
    if unknown:
        raise AtlasSetError(f"{where}: case id(s) {unknown} are not in the atlas set")
    if atlas_ids:
        both = sorted(set(atlas_ids) & set(exclude))
        if both:
            raise ValueError(f"atlas id(s) {both} are both requested and excluded")
        return list(atlas_ids)
    pool = atlas_pool(atlas_set, exclude)
    if not pool:
        raise AtlasSetError(f"{atlas_set.root or atlas_set.name}: no atlases left after excluding the target")
    if n_atlases is None:
        n_atlases = min(DEFAULT_N_ATLASES, len(pool))
    if n_atlases < 1:
        raise ValueError("the number of atlases must be at least 1")
    if n_atlases > len(pool):
        after = f" after excluding {', '.join(sorted(set(exclude)))}" if exclude else ""
        raise ValueError(f"n_atlases={n_atlases}: only {len(pool)} atlas(es) available in {where}{after}")
    if n_atlases == len(pool):
        return pool
    rng = np.random.default_rng(seed)
    return sorted(str(x) for x in rng.choice(pool, n_atlases, replace=False))


@dataclass
class PreparedAtlases:
    """Atlases registered and warped onto one target: the input of every fusion method."""

    geometry: Geometry
    target: torch.Tensor             # (C, Z, Y, X) normalised
    atlas_ids: list[str]
    images: torch.Tensor             # (N, C, Z, Y, X) normalised, warped
    labels: torch.Tensor             # (N, Z, Y, X) int64, warped label-aware
    registrations: list[Registration]
    label_names: dict[int, str]
    timings: dict[str, float] = field(default_factory=dict)


def prepare(target: Sequence[sitk.Image], atlas_set: AtlasSet, n_atlases: int | None = None,
            atlas_ids: Sequence[str] | None = None, exclude: Sequence[str] = (), backend: str = DEFAULT_BACKEND,
            device: str = "auto", preset: str = DEFAULT_PRESET, registration_params: dict | None = None,
            seed: int = 0, atlases: Sequence[LoadedCase] | None = None,
            progress: Progress | None = None) -> PreparedAtlases:
    """Choose, load, register and warp atlases onto the target."""
    check_target_images(target)
    if len(target) != len(atlas_set.modalities):
        raise AtlasSetError(f"the target has {len(target)} modality image(s); atlas set "
                            f"'{atlas_set.name}' needs {len(atlas_set.modalities)} ({atlas_set.modalities})")
    dev = resolve_device(device)
    progress = progress or Progress([("load", 0.05), ("registration", 0.9), ("warp", 0.05)], enabled=False)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if atlases is None:
        ids = choose_atlases(atlas_set, n_atlases, exclude, seed, atlas_ids)
        loaded = []
        for k, a in enumerate(ids):
            progress.stage("load")(k / len(ids), f"loading atlas {k + 1}/{len(ids)}")
            loaded.append(atlas_set.load(a))
    else:
        loaded = list(atlases)
        ids = [a.case_id for a in loaded]
    check_target_not_an_atlas(target, loaded, atlas_set)
    timings["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    regs = register(target, [a.images for a in loaded], backend=backend, device=dev, preset=preset,
                    progress=progress.stage("registration"), **(registration_params or {}))
    timings["registration"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    progress.stage("warp")(0.0, "warping atlases")
    images, labels = warp_atlases(regs, [a.images for a in loaded], [a.label for a in loaded],
                                  atlas_set.label_values, dev)
    timings["warp"] = time.perf_counter() - t0
    return PreparedAtlases(Geometry.of(target[0]), normalized_tensor(target, dev), ids, images, labels, regs,
                           dict(atlas_set.labels), timings)


def check_target_not_an_atlas(target: Sequence[sitk.Image], atlases: Sequence[LoadedCase],
                              atlas_set: AtlasSet) -> None:
    """A target that is one of its own atlases gets an inflated (near perfect) result: refuse it, naming the
    atlas, so that the user excludes it. Arrays are compared only where the grids already agree."""
    geometry = Geometry.of(target[0])
    for atlas in atlases:
        image = atlas.images[0]
        if Geometry.of(image).same_as(geometry) and np.array_equal(
                sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(target[0])):
            raise AtlasSetError(f"{atlas_set.root or atlas_set.name}: atlas '{atlas.case_id}' is the target itself "
                                f"(identical image); exclude it (--exclude {atlas.case_id})")


def fuse_prepared(prepared: PreparedAtlases, method: str, fusion_params: dict | None = None,
                  progress=None) -> SegmentationResult:
    """Fuse prepared atlases with one method."""
    if method not in METHODS:
        raise ValueError(f"unknown fusion method '{method}': choose from {', '.join(METHODS)}")
    t0 = time.perf_counter()
    result = fuse(method, prepared.target, prepared.images, prepared.labels, sorted(prepared.label_names),
                  progress=progress, **(fusion_params or {}))
    timings = dict(prepared.timings, fusion=time.perf_counter() - t0)
    return SegmentationResult(prepared.geometry, result, prepared.atlas_ids, prepared.label_names,
                              prepared.labels, prepared.registrations, timings)


def segment(target: Sequence[sitk.Image], atlas_set: AtlasSet, method: str = "jlf", n_atlases: int | None = None,
            atlas_ids: Sequence[str] | None = None, exclude: Sequence[str] = (), backend: str = DEFAULT_BACKEND,
            device: str = "auto", preset: str = DEFAULT_PRESET, fusion_params: dict | None = None,
            registration_params: dict | None = None, seed: int = 0, show_progress: bool = True,
            atlases: Sequence[LoadedCase] | None = None) -> SegmentationResult:
    """Segment a target with an atlas set.

    Args:
        target: the target's modality images (same modalities and order as the atlas set).
        method: a fusion method (majority, weighted, jlf, staple).
        n_atlases / atlas_ids / exclude / seed: which atlases (see :func:`choose_atlases`; None: up to 10; more
            than the set holds after ``exclude`` is an error).
        backend / device / preset / registration_params: registration (see :func:`atlasseg.registration.register`).
        atlases: already loaded atlas cases (skips reading; for benchmarks).
    """
    if method not in METHODS:
        raise ValueError(f"unknown fusion method '{method}': choose from {', '.join(METHODS)}")
    progress = Progress([("load", 0.05), ("registration", 0.7), ("warp", 0.05), ("fusion", 0.2)],
                        enabled=show_progress)
    prepared = prepare(target, atlas_set, n_atlases, atlas_ids, exclude, backend, device, preset,
                       registration_params, seed, atlases, progress)
    result = fuse_prepared(prepared, method, fusion_params, progress.stage("fusion"))
    progress.done(f"{method} done")
    return result
