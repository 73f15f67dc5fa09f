"""The sample atlas set (first use without preparing a folder) and the packaging of a model shipped with AtlasSeg.

Sample set: 10 hippocampus atlases and 2 targets of the Medical Segmentation Decathlon's Task04 (CC BY-SA 4.0),
the benchmark protocol's own cases (:func:`atlasseg.benchmarks.protocols.hippocampus_split` on the 200-case set:
its 10 atlases and its first 2 test targets), so the sample reproduces benchmark conditions. The images are not
in the repository (they are not ours to commit): :func:`ensure_sample_set` builds the folder from the public
archive, downloaded and checked by MD5, or from a Decathlon folder already on disk, copying the needed files
byte for byte. The folder is in the layout :func:`atlasseg.atlas.load_atlas_set` reads (``dataset.json``,
``imagesTr``/``labelsTr`` for the atlases); the targets and their reference labels are in ``imagesTs``/
``labelsTs``, listed in dataset.json's ``test`` entry and the ``atlasseg_sample`` record, so no loader takes
them for atlases. The folder appears complete or not at all (built in a temporary folder, then renamed).

Shipped model: :func:`package_model` copies a trained model folder to ``Resources/Models/<name>/`` with its
config amended by how it was made (training command, data and case ids, commit, the data's licence) and what it
is and is not for; the Slicer modules offer it when a method needs a model and none is chosen.

This module imports no torch (the Slicer side uses it in Slicer's own Python); packaging imports the model
reader when called.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .progress import ProgressFn

SAMPLE_FORMAT = "atlasseg-sample/1"
SAMPLE_KEY = "atlasseg_sample"          # dataset.json's record of what the builder made
ATTRIBUTION_FILE = "ATTRIBUTION.txt"
SHIPPED_MODELS = ("Resources", "Models")  # under the engine root (repository root, or beside the installed modules)
DOWNLOAD_TIMEOUT_S = 60
CHUNK = 1 << 20


class SampleDataError(ValueError):
    """A sample-data problem; the message names the file or folder."""


@dataclass(frozen=True)
class SampleSet:
    """A sample atlas set cut from a Decathlon task archive."""

    name: str                  # dataset.json "name" (the structure: Slicer's terminology tagging reads it)
    folder: str                # the built folder's name in the cache
    task: str                  # the archive's top folder, e.g. Task04_Hippocampus
    url: str
    md5: str
    atlases: tuple[str, ...]
    targets: tuple[str, ...]
    labels: dict[int, str]
    modalities: dict[int, str]
    licence: str
    attribution: str
    description: str = ""

    @property
    def archive_name(self) -> str:
        return f"{self.task}.tar"

    def files(self) -> dict[str, tuple[str, str]]:
        """Built file (relative path) -> (source folder, file name) in the Decathlon task."""
        out = {}
        for ids, images, labels in ((self.atlases, "imagesTr", "labelsTr"), (self.targets, "imagesTs", "labelsTs")):
            for case in ids:
                out[f"{images}/{case}.nii.gz"] = ("imagesTr", f"{case}.nii.gz")
                out[f"{labels}/{case}.nii.gz"] = ("labelsTr", f"{case}.nii.gz")
        return out


DECATHLON_ATTRIBUTION = (
    "Medical Segmentation Decathlon, Task04 Hippocampus (Vanderbilt University Medical Center), licensed under "
    "CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/). Simpson et al. 2019, A large annotated "
    "medical image dataset for the development and evaluation of segmentation algorithms, arXiv:1902.09063; "
    "Antonelli et al. 2022, The Medical Segmentation Decathlon, Nature Communications 13:4128. "
    "http://medicaldecathlon.com/. The files are copied unchanged from the task's training set.")

# URL and MD5 as MONAI's DecathlonDataset (monai/apps/datasets.py, resource and md5 of "Task04_Hippocampus")
HIPPOCAMPUS_SAMPLE = SampleSet(
    name="Hippocampus",
    folder="hippocampus-sample",
    task="Task04_Hippocampus",
    url="https://msd-for-monai.s3-us-west-2.amazonaws.com/Task04_Hippocampus.tar",
    md5="9d24dba78a72977dbd1d2e110310f31b",
    # hippocampus_split(<the 200 cases of ../shared/data/hippocampus>): its 10 atlases, its first 2 test targets
    atlases=("hippocampus_006", "hippocampus_017", "hippocampus_033", "hippocampus_067", "hippocampus_101",
             "hippocampus_125", "hippocampus_203", "hippocampus_243", "hippocampus_319", "hippocampus_321"),
    targets=("hippocampus_001", "hippocampus_011"),
    labels={0: "background", 1: "Anterior", 2: "Posterior"},
    modalities={0: "MRI"},
    licence="CC BY-SA 4.0",
    attribution=DECATHLON_ATTRIBUTION,
    description="AtlasSeg sample: 10 atlases and 2 targets (T1-weighted MRI crops around one hippocampus, 1 mm) "
                "of the Medical Segmentation Decathlon Task04, the benchmark protocol's cases")


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/atlasseg`` (``~/.cache/atlasseg``): where the command line builds the sample."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "atlasseg"


# --------------------------------------------------------------------------------------------- building the set


def ensure_sample_set(output: str | os.PathLike | None = None, source: str | os.PathLike | None = None,
                      sample: SampleSet = HIPPOCAMPUS_SAMPLE, md5: str | None = "default",
                      progress: ProgressFn | None = None) -> Path:
    """The sample folder at ``output`` (default: :func:`default_cache` / ``sample.folder``), built when missing or
    damaged; an intact folder is returned as it is.

    ``source``: the task archive (``.tar``, checked by ``md5``; "default": the sample's) or a Decathlon folder
    holding the cases (``imagesTr``/``labelsTr``); None: the archive is downloaded to a hidden file beside
    ``output`` and removed once the folder is built.
    """
    output = Path(output) if output is not None else default_cache() / sample.folder
    if sample_folder_intact(output, sample):
        return output
    expected = sample.md5 if md5 == "default" else md5
    if source is not None:
        return build_sample_set(source, output, sample, expected, progress)
    archive = output.parent / f".{output.name}-{sample.archive_name}"   # ours alone: removed whatever happens
    try:
        download_archive(sample.url, archive, expected, progress)
        return build_sample_set(archive, output, sample, expected, progress)
    finally:
        archive.unlink(missing_ok=True)


def build_sample_set(source: str | os.PathLike, output: str | os.PathLike, sample: SampleSet = HIPPOCAMPUS_SAMPLE,
                     md5: str | None = None, progress: ProgressFn | None = None) -> Path:
    """Build the sample folder at ``output`` from a task archive or a Decathlon folder (see module doc).

    Written into a temporary folder beside ``output`` and renamed into place: on any error nothing is left. An
    existing folder is replaced only when it is a sample folder this code made (never someone else's data).
    """
    source, output = Path(source), Path(output)
    if not source.exists():
        raise SampleDataError(f"{source}: not found (expected {sample.archive_name} or a Decathlon folder)")
    if output.exists() and not _is_sample_folder(output):
        raise SampleDataError(f"{output}: exists and is not an AtlasSeg sample folder; choose another output")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp_{output.name}_", dir=output.parent))
    try:
        if source.is_dir():
            _copy_from_folder(source, staging, sample, progress)
        else:
            if not tarfile.is_tarfile(source):
                raise SampleDataError(f"{source}: not a tar archive (expected {sample.archive_name} or a Decathlon "
                                      "folder)")
            if md5:
                _check_md5(source, md5, sample.archive_name)
            _extract_from_archive(source, staging, sample, progress)
        _write_metadata(staging, sample, f"{sample.archive_name} ({sample.url})" if not source.is_dir()
                        else f"Decathlon folder {source.name}")
        _replace_folder(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _report(progress, 1.0, f"sample atlas set ready: {output}")
    return output


def _report(progress: ProgressFn | None, fraction: float, message: str) -> None:
    if progress is not None:
        progress(fraction, message)


def _copy_from_folder(folder: Path, staging: Path, sample: SampleSet, progress: ProgressFn | None) -> None:
    files = sample.files()
    for k, (built, (kind, name)) in enumerate(files.items()):
        src = folder / kind / name
        if not src.is_file():
            raise SampleDataError(f"{src}: missing (the sample needs {kind}/{name} of the Decathlon "
                                  f"{sample.task} training set)")
        dst = staging / built
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        _report(progress, (k + 1) / len(files), f"copied {built}")


def _check_md5(archive: Path, expected: str, what: str) -> None:
    digest = hashlib.md5(usedforsecurity=False)
    with open(archive, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    if digest.hexdigest() != expected.lower():
        raise SampleDataError(f"{archive}: MD5 {digest.hexdigest()} is not the expected {expected} of "
                              f"{what} (a damaged or partial download, or another file); download it again")


def _safe_member_path(name: str) -> PurePosixPath | None:
    """The member's path inside the archive, or None when it would land outside it (absolute, ``..``)."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name or ":" in (path.parts[0] if path.parts else ""):
        return None
    return PurePosixPath(*[p for p in path.parts if p != "."])


def _extract_from_archive(archive: Path, staging: Path, sample: SampleSet, progress: ProgressFn | None) -> None:
    """Copy the sample's members out of the archive by content (never by the member's own path), refusing an
    archive with members outside its folder or links where a case file is expected."""
    wanted = {(kind, name): built for built, (kind, name) in sample.files().items()}
    found: dict[str, tarfile.TarInfo] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:   # reads every header: a truncated archive fails here or while copying below
                path = _safe_member_path(member.name)
                if path is None or ((member.islnk() or member.issym()) and _is_unsafe_link(member)):
                    raise SampleDataError(f"{archive}: member '{member.name}' points outside the archive "
                                          f"(refused; not the Decathlon {sample.archive_name})")
                key = tuple(path.parts[-2:])
                if len(path.parts) <= 3 and key in wanted and not path.name.startswith("._"):
                    if not member.isfile():
                        raise SampleDataError(f"{archive}: member '{member.name}' is not a regular file")
                    found[wanted[key]] = member
            missing = sorted(set(wanted.values()) - set(found))
            if missing:
                raise SampleDataError(f"{archive}: {len(missing)} sample file(s) missing from the archive, e.g. "
                                      f"{sample.task}/{'/'.join(sample.files()[missing[0]])}")
            for k, (built, member) in enumerate(sorted(found.items())):
                dst = staging / built
                dst.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(dst, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
                if dst.stat().st_size != member.size:
                    raise SampleDataError(f"{archive}: member '{member.name}' is truncated")
                _report(progress, (k + 1) / len(found), f"extracted {built}")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise SampleDataError(f"{archive}: unreadable or truncated archive ({err}); download it again") from None


def _is_unsafe_link(member: tarfile.TarInfo) -> bool:
    target = PurePosixPath(member.linkname)
    return target.is_absolute() or ".." in target.parts


def _write_metadata(staging: Path, sample: SampleSet, origin: str) -> None:
    """dataset.json (the atlas loader's) with the targets and a checksum per file; the attribution as text."""
    files = {built: _sha256(staging / built) for built in sample.files()}
    case = {"image": "./imagesTr/{}.nii.gz", "label": "./labelsTr/{}.nii.gz"}
    targets = [{"image": f"./imagesTs/{c}.nii.gz", "label": f"./labelsTs/{c}.nii.gz"} for c in sample.targets]
    dataset = {
        "name": sample.name, "description": sample.description, "reference": sample.attribution,
        "licence": sample.licence, "tensorImageSize": "3D",
        "modality": {str(k): v for k, v in sample.modalities.items()},
        "labels": {str(k): v for k, v in sample.labels.items()},
        "numTraining": len(sample.atlases), "numTest": len(sample.targets),
        "training": [{k: v.format(c) for k, v in case.items()} for c in sample.atlases],
        "test": [t["image"] for t in targets],
        SAMPLE_KEY: {"format": SAMPLE_FORMAT, "sample": sample.folder, "source": origin, "targets": targets,
                     "files": files},
    }
    (staging / ATTRIBUTION_FILE).write_text(f"{sample.description}.\n\n{sample.attribution}\n")
    (staging / "dataset.json").write_text(json.dumps(dataset, indent=1))


def _replace_folder(staging: Path, output: Path) -> None:
    """Rename ``staging`` to ``output``; a previous sample folder there is moved aside first, then removed."""
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old_{output.name}_", dir=output.parent))
        os.replace(output, old / output.name)
    os.replace(staging, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _sample_record(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / "dataset.json").read_text()).get(SAMPLE_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return record if isinstance(record, dict) and record.get("format") == SAMPLE_FORMAT else None


def _is_sample_folder(folder: Path) -> bool:
    return _sample_record(folder) is not None


def sample_folder_intact(folder: str | os.PathLike, sample: SampleSet = HIPPOCAMPUS_SAMPLE) -> bool:
    """The folder holds this sample, every file matching the checksum recorded when it was built."""
    folder = Path(folder)
    record = _sample_record(folder)
    if record is None or record.get("sample") != sample.folder or set(record.get("files", {})) != set(sample.files()):
        return False
    return all((folder / rel).is_file() and _sha256(folder / rel) == digest for rel, digest in record["files"].items())


@dataclass(frozen=True)
class SampleTarget:
    case_id: str
    image: Path
    label: Path


@dataclass(frozen=True)
class SampleFolder:
    """A built sample folder: the atlas folder (for ``--atlases`` and the panels) and the targets."""

    atlas_folder: Path
    name: str
    labels: dict[int, str]
    targets: list[SampleTarget]
    attribution: str = ""
    licence: str = ""


def read_sample_folder(folder: str | os.PathLike) -> SampleFolder:
    """The targets and labels of a folder :func:`build_sample_set` made."""
    folder = Path(folder)
    record = _sample_record(folder)
    if record is None:
        raise SampleDataError(f"{folder}: not an AtlasSeg sample folder (no '{SAMPLE_KEY}' in dataset.json); build "
                              "it with 'atlasseg sample-data'")
    dataset = json.loads((folder / "dataset.json").read_text())
    targets = [SampleTarget(PurePosixPath(t["label"]).name.removesuffix(".nii.gz"),
                            (folder / t["image"]).resolve(), (folder / t["label"]).resolve())
               for t in record.get("targets", [])]
    for target in targets:
        for path in (target.image, target.label):
            if not path.is_file():
                raise SampleDataError(f"{path}: missing; rebuild the sample with 'atlasseg sample-data'")
    return SampleFolder(folder, str(dataset.get("name", folder.name)),
                        {int(k): str(v) for k, v in dataset.get("labels", {}).items()}, targets,
                        str(dataset.get("reference", "")), str(dataset.get("licence", "")))


# --------------------------------------------------------------------------------------------- download


def download_archive(url: str, destination: str | os.PathLike, md5: str | None,
                     progress: ProgressFn | None = None, opener: Callable = urllib.request.urlopen) -> Path:
    """Download ``url`` to ``destination``, checked by ``md5``.

    Written to a temporary file beside it and renamed only when complete and checked: an interrupted or damaged
    download leaves nothing. Progress about every 10%.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp_{destination.name}_", dir=destination.parent)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with os.fdopen(fd, "wb") as out, opener(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done, reported = 0, -1
            _report(progress, 0.0, f"downloading {url}")
            for block in iter(lambda: response.read(CHUNK), b""):
                out.write(block)
                digest.update(block)
                done += len(block)
                step = int(10 * done / total) if total else -1
                if step > reported:
                    reported = step
                    _report(progress, done / total, f"downloaded {done / 1e6:.1f} of {total / 1e6:.1f} MB")
        if total and done != total:
            raise SampleDataError(f"{url}: download ended after {done} of {total} bytes; try again")
        if md5 and digest.hexdigest() != md5.lower():
            raise SampleDataError(f"{url}: the downloaded file's MD5 {digest.hexdigest()} is not the expected {md5} "
                                  "(damaged download); try again")
        os.replace(tmp, destination)
    except (urllib.error.URLError, OSError) as err:
        raise SampleDataError(f"{url}: download failed ({getattr(err, 'reason', err)}); check the network or "
                              f"download it yourself and pass it with --from") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return destination


# --------------------------------------------------------------------------------------------- shipped models


@dataclass(frozen=True)
class ModelProvenance:
    """What a shipped model's config records about how it was made and what it is for."""

    training_command: str
    dataset: str
    case_ids: Sequence[str]
    licence: str
    attribution: str
    intended_use: str
    not_suited_for: str
    commit: str = ""
    notes: dict = field(default_factory=dict)


HIPPOCAMPUS_MODEL = "dlf-hippocampus"
HIPPOCAMPUS_INTENDED_USE = (
    "Deep Label Fusion of hippocampus anterior (head) / posterior (body and tail) labels on T1-weighted MRI crops "
    "around one hippocampus, 1 mm isotropic, like the Medical Segmentation Decathlon Task04 crops, with an atlas "
    "set of such crops (for example the AtlasSeg sample atlas set)")
HIPPOCAMPUS_NOT_SUITED_FOR = (
    "clinical decisions (a research model, not a medical device); whole-brain or whole-head images (crop around "
    "the hippocampus first); other structures, label sets or atlas sets; other contrasts (T2, FLAIR, CT) or "
    "strongly anisotropic voxels; anatomy unlike the adult training cases (children, fetuses, severe atrophy, "
    "lesions or resections)")


def hippocampus_model_provenance(training_command: str, case_ids: Sequence[str], commit: str = "",
                                 notes: dict | None = None) -> ModelProvenance:
    """The record of the Deep Label Fusion hippocampus model (the DLF benchmark's configuration)."""
    return ModelProvenance(training_command, f"Medical Segmentation Decathlon {HIPPOCAMPUS_SAMPLE.task} (training "
                           "cases; the benchmark protocol's training pool)", list(case_ids),
                           HIPPOCAMPUS_SAMPLE.licence, HIPPOCAMPUS_SAMPLE.attribution, HIPPOCAMPUS_INTENDED_USE,
                           HIPPOCAMPUS_NOT_SUITED_FOR, commit, dict(notes or {}))


def package_model(model_folder: str | os.PathLike, destination: str | os.PathLike, provenance: ModelProvenance,
                  overwrite: bool = False) -> Path:
    """Copy a trained model folder to ``destination`` (e.g. ``Resources/Models/dlf-hippocampus``) for shipping.

    The model is read and checked first (config, weights checksum, weights fit the architecture); its config is
    written in today's format with a ``shipped`` record (:class:`ModelProvenance`; the commit defaults to this
    checkout's). Atomic: a temporary folder beside ``destination``, renamed when complete.
    """
    from .benchmarks.report import git_commit
    from .model_io import CONFIG, WEIGHTS, load_model

    source, destination = Path(model_folder), Path(destination)
    loaded = load_model(source)          # raises ModelFolderError naming the folder
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination}: exists (pass overwrite to replace it)")
    record = {"training_command": provenance.training_command,
              "training_data": {"dataset": provenance.dataset, "case_ids": sorted(provenance.case_ids),
                                "n_cases": len(provenance.case_ids), "licence": provenance.licence,
                                "attribution": provenance.attribution},
              "commit": provenance.commit or git_commit(), "intended_use": provenance.intended_use,
              "not_suited_for": provenance.not_suited_for, **provenance.notes}
    config = {**loaded.config, "shipped": record}
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp_{destination.name}_", dir=destination.parent))
    try:
        shutil.copyfile(source / WEIGHTS, staging / WEIGHTS)
        (staging / CONFIG).write_text(json.dumps(config, indent=2, default=str))
        load_model(staging)              # the packaged folder loads as it will for users
        _replace_folder(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


@dataclass(frozen=True)
class ShippedModel:
    name: str
    folder: Path
    method: str
    record: dict


def shipped_models(engine_root: str | os.PathLike | None = None) -> list[ShippedModel]:
    """The models under ``<engine root>/Resources/Models`` that carry a ``shipped`` record (read as JSON only)."""
    root = Path(engine_root) if engine_root is not None else Path(__file__).resolve().parents[1]
    models = []
    base = root.joinpath(*SHIPPED_MODELS)
    for folder in sorted(base.iterdir()) if base.is_dir() else []:
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and isinstance(config.get("shipped"), dict) and config.get("method") \
                and (folder / "model.safetensors").is_file():
            models.append(ShippedModel(folder.name, folder, str(config["method"]), config["shipped"]))
    return models
