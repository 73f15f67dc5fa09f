"""Atlas sets: the one loader used by the CLI, the Slicer modules, the tests and the benchmarks.

An atlas set is either a folder in the Medical Segmentation Decathlon / nnU-Net layout (``dataset.json``,
``imagesTr/``, ``labelsTr/``; multi-channel cases as 4D images or ``_0000``/``_0001`` files), or an explicit
list of cases, each ``(image[, more modalities...], label)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .imagecheck import content_problem
from .io import Geometry, read_image, split_channels

NIFTI_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


class AtlasSetError(ValueError):
    """A problem with an atlas set; the message names the file and the problem."""


@dataclass
class AtlasCase:
    """One atlas (or target) case: image files (one per modality, or one 4D file) and an optional label."""

    case_id: str
    images: list[Path]
    label: Path | None = None


@dataclass
class LoadedCase:
    """A case read into memory: 3D scalar images (one per modality, float32) on the label's grid."""

    case_id: str
    images: list[sitk.Image]
    label: sitk.Image | None

    @property
    def geometry(self) -> Geometry:
        return Geometry.of(self.images[0])


@dataclass
class AtlasSet:
    name: str
    cases: list[AtlasCase]
    labels: dict[int, str]
    modalities: dict[int, str] = field(default_factory=lambda: {0: "image"})
    root: Path | None = None

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    @property
    def label_values(self) -> list[int]:
        return sorted(self.labels)

    def case(self, case_id: str) -> AtlasCase:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise KeyError(f"case '{case_id}' not in atlas set '{self.name}'")

    def subset(self, case_ids: Sequence[str]) -> AtlasSet:
        cases = [self.case(i) for i in case_ids]
        return AtlasSet(self.name, cases, dict(self.labels), dict(self.modalities), self.root)

    def load(self, case: AtlasCase | str | int) -> LoadedCase:
        """Read one case, checked (modalities, grids, finite values, integer labels in the label set)."""
        if isinstance(case, int):
            case = self.cases[case]
        elif isinstance(case, str):
            case = self.case(case)
        images = load_modalities(case.images, len(self.modalities))
        label = None
        if case.label is not None:
            label = read_label(case.label)
            check_same_grid(images[0], case.images[0], label, case.label)
            values = set(np.unique(sitk.GetArrayViewFromImage(label)).tolist())
            unexpected = sorted(values - set(self.labels))
            if unexpected:
                raise AtlasSetError(f"{case.label}: unexpected label values {unexpected}; "
                                    f"the atlas set declares {sorted(self.labels)}")
        return LoadedCase(case.case_id, images, label)


def read_label(path: Path) -> sitk.Image:
    """Read a label image; float-typed labels must hold integers."""
    image = read_image(path)
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise AtlasSetError(f"{path}: a label image must be 3D with one component")
    pixel = image.GetPixelID()
    if pixel in (sitk.sitkFloat32, sitk.sitkFloat64):
        arr = sitk.GetArrayViewFromImage(image)
        if not np.all(arr == np.round(arr)):
            n_bad = int(np.count_nonzero(arr != np.round(arr)))
            raise AtlasSetError(f"{path}: non-integer label values in {n_bad} voxels; is this an intensity image?")
        if arr.min() < 0:
            raise AtlasSetError(f"{path}: negative label values")
        image = sitk.Cast(image, sitk.sitkUInt16 if arr.max() > 255 else sitk.sitkUInt8)
    elif pixel not in (sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkUInt32, sitk.sitkInt8, sitk.sitkInt16,
                       sitk.sitkInt32, sitk.sitkInt64, sitk.sitkUInt64):
        raise AtlasSetError(f"{path}: unsupported label pixel type {image.GetPixelIDTypeAsString()}")
    elif sitk.GetArrayViewFromImage(image).min() < 0:
        raise AtlasSetError(f"{path}: negative label values")
    return image


def load_modalities(paths: Sequence[Path], n_modalities: int | None = None) -> list[sitk.Image]:
    """Read image files -> list of 3D float32 channel images on one grid (4D files split into channels)."""
    channels: list[sitk.Image] = []
    sources: list[Path] = []
    for path in paths:
        for ch in split_channels(read_image(path)):
            channels.append(sitk.Cast(ch, sitk.sitkFloat32))
            sources.append(Path(path))
    if n_modalities is not None and len(channels) != n_modalities:
        names = ", ".join(str(p) for p in paths)
        raise AtlasSetError(f"{names}: found {len(channels)} image channel(s), the atlas set needs "
                            f"{n_modalities} (missing or extra modality)")
    for ch, src in zip(channels, sources):
        check_image_content(ch, src)
    for ch, src in zip(channels[1:], sources[1:]):
        check_same_grid(channels[0], sources[0], ch, src)
    return channels


def check_image_content(image: sitk.Image, path) -> None:
    """Refuse images nothing sensible can come from (see :func:`atlasseg.imagecheck.content_problem`): too
    small to register or to hold a structure, NaN/Inf voxels, or a constant intensity (nothing to register)."""
    problem = content_problem(sitk.GetArrayViewFromImage(image), image.GetSize())
    if problem:
        raise AtlasSetError(f"{path}: {problem}")


def check_target_images(target: Sequence[sitk.Image], names: Sequence[str] | None = None) -> None:
    """The checks a target read from files gets, for images passed in memory (the Python API): each usable
    (:func:`check_image_content`) and all modalities on one grid. ``names`` label the images in errors."""
    if not target:
        raise AtlasSetError("no target image given")
    names = list(names) if names else [f"target image {k}" for k in range(len(target))]
    for image, name in zip(target, names):
        if not isinstance(image, sitk.Image):
            raise AtlasSetError(f"{name}: expected a SimpleITK image, got {type(image).__name__}")
        check_image_content(image, name)
    for image, name in zip(target[1:], names[1:]):
        check_same_grid(target[0], names[0], image, name)


def check_same_grid(a: sitk.Image, a_path, b: sitk.Image, b_path) -> None:
    diffs = Geometry.of(a).differences(Geometry.of(b))
    if diffs:
        raise AtlasSetError(f"{b_path}: grid does not match {a_path}: " + "; ".join(diffs))


def _strip_ending(name: str) -> str:
    for end in NIFTI_ENDINGS:
        if name.endswith(end):
            return name[: -len(end)]
    return name


def _resolve(root: Path, rel: str) -> Path:
    return (root / rel).resolve() if not os.path.isabs(rel) else Path(rel)


def _decathlon_images(root: Path, image_rel: str, n_modalities: int) -> list[Path]:
    """The image entry of an MSD case, or its nnU-Net ``_0000`` files where the plain file is absent."""
    path = _resolve(root, image_rel)
    if path.is_file():
        return [path]
    stem = _strip_ending(path.name)
    ending = path.name[len(stem):]
    split = [path.with_name(f"{stem}_{c:04d}{ending}") for c in range(n_modalities)]
    if split[0].is_file():
        missing = [p for p in split if not p.is_file()]
        if missing:
            raise AtlasSetError(f"{missing[0]}: modality file missing")
        return split
    raise AtlasSetError(f"{path}: image listed in dataset.json not found")


def _folder_set(root: Path) -> AtlasSet:
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise AtlasSetError(f"{root}: no dataset.json (expected a Decathlon / nnU-Net folder)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise AtlasSetError(f"{meta_path}: invalid JSON ({err})") from None
    raw_labels = meta.get("labels")
    if not isinstance(raw_labels, dict) or not raw_labels:
        raise AtlasSetError(f"{meta_path}: missing 'labels'")
    try:
        if all(str(k).lstrip("-").isdigit() for k in raw_labels):  # MSD: {"0": "background"}
            labels = {int(k): str(v) for k, v in raw_labels.items()}
        else:  # nnU-Net v2: {"background": 0}
            labels = {int(v): str(k) for k, v in raw_labels.items()}
    except (TypeError, ValueError):
        raise AtlasSetError(f"{meta_path}: 'labels' must map integer values to names") from None
    labels.setdefault(0, "background")
    raw_mod = meta.get("modality") or meta.get("channel_names") or {"0": "image"}
    modalities = {int(k): str(v) for k, v in raw_mod.items()}
    cases: list[AtlasCase] = []
    if meta.get("training"):
        for entry in meta["training"]:
            image_rel, label_rel = entry.get("image"), entry.get("label")
            if not image_rel or not label_rel:
                raise AtlasSetError(f"{meta_path}: training entry {entry} needs 'image' and 'label'")
            label = _resolve(root, label_rel)
            if not label.is_file():
                raise AtlasSetError(f"{label}: label listed in dataset.json not found")
            images = _decathlon_images(root, image_rel, len(modalities))
            cases.append(AtlasCase(_strip_ending(label.name), images, label))
    else:  # nnU-Net v2: cases discovered from labelsTr
        ending = meta.get("file_ending", ".nii.gz")
        for label in sorted((root / "labelsTr").glob(f"*{ending}")):
            case_id = label.name[: -len(ending)]
            images = [root / "imagesTr" / f"{case_id}_{c:04d}{ending}" for c in range(len(modalities))]
            missing = [p for p in images if not p.is_file()]
            if missing:
                raise AtlasSetError(f"{missing[0]}: modality file missing")
            cases.append(AtlasCase(case_id, images, label))
    name = str(meta.get("name", root.name))
    return AtlasSet(name, cases, labels, modalities, root)


def _list_set(entries: Sequence[Sequence[str | os.PathLike]], labels: dict[int, str] | None) -> AtlasSet:
    cases = []
    for k, entry in enumerate(entries):
        paths = [Path(p) for p in entry]
        if len(paths) < 2:
            raise AtlasSetError(f"atlas entry {k}: needs (image[, more modalities...], label), got {entry}")
        for p in paths:
            if not p.is_file():
                raise AtlasSetError(f"{p}: file not found")
        cases.append(AtlasCase(_strip_ending(paths[-1].name), paths[:-1], paths[-1]))
    n_mod = len(load_modalities(cases[0].images)) if cases else 1
    if labels is None:
        values: set[int] = set()
        for c in cases:
            values |= set(np.unique(sitk.GetArrayFromImage(read_label(c.label))).tolist())
        labels = {v: ("background" if v == 0 else f"label {v}") for v in sorted(values | {0})}
    return AtlasSet("atlas list", cases, labels, {i: f"channel {i}" for i in range(n_mod)}, None)


def load_atlas_set(source: str | os.PathLike | Sequence[Sequence[str | os.PathLike]],
                   labels: dict[int, str] | None = None, validate: bool = True) -> AtlasSet:
    """Load and (by default) validate an atlas set.

    Args:
        source: a folder with ``dataset.json``, or a list of ``(image[, more modalities...], label)`` paths.
        labels: label names for a list source (default: the values found, named "label N").
        validate: read every case and check grids, modalities, finite values, integer labels and that every
            atlas carries the same set of labels.
    Raises:
        AtlasSetError naming the offending file.
    """
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.exists():
            raise AtlasSetError(f"{root}: atlas set folder not found")
        atlas_set = _folder_set(root)
    else:
        atlas_set = _list_set(list(source), labels)
    if not atlas_set.cases:
        raise AtlasSetError(f"{atlas_set.root or 'atlas list'}: the atlas set is empty")
    if validate:
        validate_atlas_set(atlas_set)
    return atlas_set


def validate_atlas_set(atlas_set: AtlasSet) -> None:
    """Read every case; check it, and that all atlases carry the same labels."""
    reference_values: set[int] | None = None
    reference_case = None
    for case in atlas_set.cases:
        loaded = atlas_set.load(case)
        if loaded.label is None:
            raise AtlasSetError(f"case {case.case_id}: an atlas needs a label image")
        values = set(np.unique(sitk.GetArrayViewFromImage(loaded.label)).tolist())
        if reference_values is None:
            reference_values, reference_case = values, case
        elif values != reference_values:
            only_here = sorted(values - reference_values)
            only_there = sorted(reference_values - values)
            raise AtlasSetError(
                f"{case.label}: label set {sorted(values)} differs from {reference_case.label} "
                f"{sorted(reference_values)} (only here: {only_here}, only there: {only_there})")


def load_target(paths: Sequence[str | os.PathLike], n_modalities: int | None = None) -> list[sitk.Image]:
    """Read a target's modality images (checked like atlas images)."""
    if not paths:
        raise AtlasSetError("no target image given")
    return load_modalities([Path(p) for p in paths], n_modalities)
