"""The sample atlas set (built from a Decathlon archive or folder, never from the network here), its loading into a
real MRML scene for the module logic, and the packaging and offer of a model shipped with AtlasSeg."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from atlasseg.atlas import load_atlas_set
from atlasseg.cli import main
from atlasseg.phantom import make_phantom
from atlasseg.sampledata import (
    HIPPOCAMPUS_SAMPLE,
    SampleDataError,
    build_sample_set,
    download_archive,
    ensure_sample_set,
    hippocampus_model_provenance,
    package_model,
    read_sample_folder,
    shipped_models,
)

from .conftest import REPO, shared_dataset

SAMPLE = HIPPOCAMPUS_SAMPLE
TASK = SAMPLE.task
OBLIQUE = tuple(sitk.VersorTransform((0.2, -0.4, 0.9), 0.5).GetMatrix())


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".tmp_", ".old_")))


@pytest.fixture(scope="module")
def decathlon(tmp_path_factory) -> Path:
    """A Decathlon-format task folder holding the sample's 12 case ids (phantoms relabelled to 0/1/2, targets on an
    oblique grid off the origin) and one case the sample does not use."""
    root = tmp_path_factory.mktemp("decathlon") / TASK
    for kind in ("imagesTr", "labelsTr"):
        (root / kind).mkdir(parents=True)
    ids = [*SAMPLE.atlases, *SAMPLE.targets, "hippocampus_999"]
    for seed, case in enumerate(ids):
        oblique = case in SAMPLE.targets
        image, labels = make_phantom(seed, shape=(14, 16, 12), spacing=(1.0, 1.0, 1.2),
                                     direction=OBLIQUE if oblique else None,
                                     origin=(12.5, -30.0, 7.25) if oblique else None, deformation_mm=1.0)
        labels = sitk.Clamp(labels, sitk.sitkUInt8, 0, 2)   # the sample's labels: background, Anterior, Posterior
        sitk.WriteImage(image, str(root / "imagesTr" / f"{case}.nii.gz"), True)
        sitk.WriteImage(labels, str(root / "labelsTr" / f"{case}.nii.gz"), True)
    (root / "dataset.json").write_text(json.dumps({"name": "Hippocampus", "labels": {"0": "background"}}))
    return root


def _tar(folder: Path, path: Path, extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, "w") as tar:
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
        tar.add(folder, arcname=TASK)
    return path


@pytest.fixture(scope="module")
def archive(decathlon, tmp_path_factory) -> Path:
    return _tar(decathlon, tmp_path_factory.mktemp("archive") / SAMPLE.archive_name)


@pytest.fixture(scope="module")
def built(archive, tmp_path_factory) -> Path:
    return build_sample_set(archive, tmp_path_factory.mktemp("cache") / SAMPLE.folder, md5=_md5(archive))


# ------------------------------------------------------------------------------------------- the sample definition


def test_sample_cases_are_the_benchmark_protocols():
    from atlasseg.benchmarks.protocols import hippocampus_split

    data = shared_dataset("hippocampus")
    split = hippocampus_split([p.name.removesuffix(".nii.gz") for p in (data / "labelsTr").glob("*.nii.gz")])
    assert list(SAMPLE.atlases) == split.atlases
    assert list(SAMPLE.targets) == split.test[:2]
    assert not set(SAMPLE.targets) & set(split.pool)
    assert "CC BY-SA 4.0" in SAMPLE.attribution and "Simpson" in SAMPLE.attribution
    assert "Antonelli" in SAMPLE.attribution


# ------------------------------------------------------------------------------------------- building


def test_archive_builds_a_set_the_engine_loader_reads(built, decathlon):
    atlas_set = load_atlas_set(built)   # validated: grids, labels, every atlas the same label set
    assert atlas_set.case_ids == list(SAMPLE.atlases)
    assert atlas_set.labels == SAMPLE.labels and atlas_set.name == "Hippocampus"
    sample = read_sample_folder(built)
    assert [t.case_id for t in sample.targets] == list(SAMPLE.targets)
    assert not set(SAMPLE.targets) & set(atlas_set.case_ids)   # targets never serve as atlases
    for built_rel, (kind, name) in SAMPLE.files().items():      # copied byte for byte
        assert (built / built_rel).read_bytes() == (decathlon / kind / name).read_bytes()
    assert not list(built.rglob("hippocampus_999*"))             # only the sample's cases are extracted
    assert "CC BY-SA 4.0" in (built / "ATTRIBUTION.txt").read_text()
    assert "Task04_Hippocampus.tar" in json.loads((built / "dataset.json").read_text())["atlasseg_sample"]["source"]
    assert _leftovers(built.parent) == []


def test_folder_source_builds_once_and_rebuilds_when_damaged(decathlon, tmp_path):
    out = tmp_path / "cache" / SAMPLE.folder
    assert ensure_sample_set(out, source=decathlon) == out
    first = (out / "dataset.json").stat().st_mtime_ns
    # intact: returned as it is, the source not even looked at
    assert ensure_sample_set(out, source=tmp_path / "gone") == out
    assert (out / "dataset.json").stat().st_mtime_ns == first
    (out / "imagesTr" / f"{SAMPLE.atlases[0]}.nii.gz").write_bytes(b"damaged")
    ensure_sample_set(out, source=decathlon)
    assert len(load_atlas_set(out)) == 10
    assert _leftovers(out.parent) == []


def test_real_decathlon_folder_builds_the_sample(tmp_path):
    out = build_sample_set(shared_dataset("hippocampus"), tmp_path / SAMPLE.folder)
    atlas_set = load_atlas_set(out)
    assert atlas_set.case_ids == list(SAMPLE.atlases) and atlas_set.label_values == [0, 1, 2]
    assert all(t.image.is_file() and t.label.is_file() for t in read_sample_folder(out).targets)


# ------------------------------------------------------------------------------------------- refusals


def test_md5_mismatch_is_refused_naming_the_file_leaving_nothing(archive, tmp_path):
    out = tmp_path / SAMPLE.folder
    with pytest.raises(SampleDataError, match=rf"{archive}: MD5 .* not the expected"):
        build_sample_set(archive, out, md5="0" * 32)
    with pytest.raises(SampleDataError, match="MD5"):    # the default checks the real archive's MD5
        ensure_sample_set(out, source=archive)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_truncated_archive_is_refused_naming_the_file_leaving_nothing(archive, tmp_path):
    cut = tmp_path / SAMPLE.archive_name
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    out = tmp_path / SAMPLE.folder
    with pytest.raises(SampleDataError, match=rf"{cut}: unreadable or truncated archive"):
        build_sample_set(cut, out, md5=None)
    assert not out.exists() and _leftovers(tmp_path) == []


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, (3 if kind == tarfile.REGTYPE else 0)
    return info


@pytest.mark.parametrize("member", [
    _member(f"{TASK}/../../evil.txt"),
    _member("/tmp/evil.txt"),
    _member(f"{TASK}/imagesTr/escape", tarfile.SYMTYPE, "../../../etc/passwd"),
], ids=["dotdot", "absolute", "symlink-out"])
def test_members_outside_the_archive_are_refused(decathlon, tmp_path, member):
    bad = _tar(decathlon, tmp_path / SAMPLE.archive_name, [member])
    out = tmp_path / "cache" / SAMPLE.folder
    with pytest.raises(SampleDataError, match=rf"{bad}: member .* outside the archive"):
        build_sample_set(bad, out)
    assert not out.exists() and not (tmp_path / "evil.txt").exists()
    assert _leftovers(out.parent) == []


def test_a_link_where_a_case_file_is_expected_is_refused(decathlon, tmp_path):
    case = f"{TASK}/imagesTr/{SAMPLE.atlases[0]}.nii.gz"
    with tarfile.open(tmp_path / "linked.tar", "w") as tar:
        tar.addfile(_member(case, tarfile.SYMTYPE, "other.nii.gz"))
    with pytest.raises(SampleDataError, match="not a regular file"):
        build_sample_set(tmp_path / "linked.tar", tmp_path / SAMPLE.folder)


def test_someone_elses_folder_is_never_replaced(decathlon, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(SampleDataError, match="not an AtlasSeg sample folder"):
        build_sample_set(decathlon, out)
    assert (out / "notes.txt").read_text() == "keep"


class _Response(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_download_is_checked_and_atomic_without_network(tmp_path):
    data = b"archive bytes" * 1000
    good = hashlib.md5(data, usedforsecurity=False).hexdigest()
    lines = []
    got = download_archive("https://example.invalid/a.tar", tmp_path / "a.tar", good,
                           lambda f, m: lines.append((f, m)), opener=lambda url, timeout: _Response(data))
    assert got.read_bytes() == data and lines[-1][0] == 1.0
    with pytest.raises(SampleDataError, match="example.invalid.*MD5"):
        download_archive("https://example.invalid/b.tar", tmp_path / "b.tar", "f" * 32,
                         opener=lambda url, timeout: _Response(data))
    assert not (tmp_path / "b.tar").exists() and _leftovers(tmp_path) == []


def test_default_source_downloads_builds_and_removes_the_archive(archive, tmp_path, monkeypatch):
    import atlasseg.sampledata as sampledata

    calls = []

    def fake_download(url, destination, md5, progress=None):   # the network stays out of the tests
        calls.append((url, md5))
        shutil.copyfile(archive, destination)
        return Path(destination)

    monkeypatch.setattr(sampledata, "download_archive", fake_download)
    out = tmp_path / SAMPLE.folder
    ensure_sample_set(out, md5=_md5(archive))
    assert calls == [(SAMPLE.url, _md5(archive))] and len(load_atlas_set(out)) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == [SAMPLE.folder]   # the archive is gone


def test_cli_builds_from_a_folder_and_names_a_bad_source(decathlon, tmp_path, capsys):
    out = tmp_path / SAMPLE.folder
    assert main(["sample-data", "--from", str(decathlon), "--output", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"atlas folder: {out}" in printed and "CC BY-SA 4.0" in printed and "atlasseg segment" in printed
    assert main(["sample-data", "--from", str(tmp_path / "nothing.tar"), "--output", str(tmp_path / "x")]) == 2
    assert "nothing.tar: not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- Slicer logic


@pytest.fixture(scope="module")
def mrml():
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the 'slicer' package found is not slicer-core (no vtkMRMLScene)")
    from .slicer_scene import array_of, new_scene, node_ijk_to_ras

    return SimpleNamespace(new_scene=new_scene, array_of=array_of, node_ijk_to_ras=node_ijk_to_ras)


def test_sample_targets_load_into_a_scene_at_their_physical_place(mrml, built, tmp_path):
    sys.path.insert(0, str(REPO / "DeepLabelFusion"))
    from DeepLabelFusionLib import FusionInputs, FusionLogic, FusionSettings

    from AtlasSegLib.sampledata import applySampleToParameters, loadSampleScene

    scene = mrml.new_scene()
    sample = loadSampleScene(scene, built)
    assert [n.GetName() for n in sample.targets] == list(SAMPLE.targets)
    for node, reference, case in zip(sample.targets, sample.references, SAMPLE.targets):
        image = sitk.ReadImage(str(built / "imagesTs" / f"{case}.nii.gz"))
        np.testing.assert_array_equal(mrml.array_of(node), sitk.GetArrayFromImage(image))
        ijk_to_ras = mrml.node_ijk_to_ras(node)
        for index in [(0, 0, 0), (13, 2, 5), (11, 15, 13)]:   # ITK's LPS point, x and y negated, is Slicer's RAS
            lps = np.array(image.TransformIndexToPhysicalPoint(index))
            np.testing.assert_allclose((ijk_to_ras @ [*index, 1])[:3], lps * [-1, -1, 1], atol=1e-9)
        segments = reference.GetSegmentation()
        assert {segments.GetNthSegment(k).GetName() for k in range(segments.GetNumberOfSegments())} == \
            {"Anterior", "Posterior"}
    # what the DeepLabelFusion logic needs: nothing missing, and the target written for the engine unchanged
    logic = FusionLogic(scene)
    inputs = FusionInputs(sample.targets[0], atlasFolder=sample.atlasFolder, referenceSegmentation=sample.references[0])
    assert logic.inputProblems(inputs, FusionSettings(method="jlf", nAtlases=10)) == []
    prepared = logic.prepareRun(inputs, FusionSettings(method="jlf", nAtlases=10), tmp_path / "work")
    written = sitk.ReadImage(str(tmp_path / "work" / "target_0000.nii.gz"))
    original = sitk.ReadImage(str(built / "imagesTs" / f"{SAMPLE.targets[0]}.nii.gz"))
    np.testing.assert_allclose(written.GetDirection(), original.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), original.GetOrigin(), atol=1e-5)
    assert "--atlases" in prepared.command and str(built) in prepared.command
    reference = sitk.ReadImage(str(tmp_path / "work" / "reference.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(reference), sitk.GetArrayFromImage(
        sitk.ReadImage(str(built / "labelsTs" / f"{SAMPLE.targets[0]}.nii.gz"))))
    # a module's parameter node: fields it has are set, a chosen training folder is kept
    parameters = SimpleNamespace(targetVolume=None, referenceSegmentation=None, atlasFolder=Path("."),
                                 atlasesFromScene=True, trainingAtlasFolder=Path("/kept"))
    applySampleToParameters(parameters, sample)
    assert parameters.targetVolume is sample.targets[0] and parameters.atlasFolder == built
    assert parameters.atlasesFromScene is False and parameters.trainingAtlasFolder == Path("/kept")
    atlasnet = SimpleNamespace(targetVolume=None, trainingAtlasFolder=Path("."))
    applySampleToParameters(atlasnet, sample)
    assert atlasnet.trainingAtlasFolder == built and not hasattr(atlasnet, "atlasFolder")


# ------------------------------------------------------------------------------------------- shipped model


def test_a_packaged_model_records_its_provenance_loads_and_is_offered(tmp_path):
    import torch

    from atlasseg.model_io import ModelFolderError, load_model
    from AtlasSegLib.sampledata import modelOffer

    source = REPO / "Testing" / "data" / "format1_dlf"
    destination = tmp_path / "Resources" / "Models" / "dlf-hippocampus"
    provenance = hippocampus_model_provenance("atlasseg benchmark dlf-hippocampus", ["hippocampus_003", "b"],
                                              commit="abc1234")
    package_model(source, destination, provenance)
    config = json.loads((destination / "config.json").read_text())
    shipped = config["shipped"]
    assert shipped["training_command"] == "atlasseg benchmark dlf-hippocampus" and shipped["commit"] == "abc1234"
    assert shipped["training_data"]["case_ids"] == ["b", "hippocampus_003"]
    data = shipped["training_data"]
    assert "CC BY-SA 4.0" in data["licence"] and "Simpson" in data["attribution"]
    assert "Decathlon" in shipped["intended_use"] and "whole-brain" in shipped["not_suited_for"]
    original, packaged = load_model(source), load_model(destination)
    assert packaged.method == "dlf"
    for (name, a), (_, b) in zip(original.model.state_dict().items(), packaged.model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(FileExistsError):
        package_model(source, destination, provenance)
    # a damaged model is refused before anything is written
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    (broken / "model.safetensors").write_bytes(b"0" * 64)
    with pytest.raises(ModelFolderError, match="model.safetensors"):
        package_model(broken, tmp_path / "Resources" / "Models" / "other", provenance)
    assert [m.name for m in shipped_models(tmp_path)] == ["dlf-hippocampus"]
    assert _leftovers(destination.parent) == []
    # the panel's offer: only for a method that needs a model, with none chosen, and a model of that method
    offer = modelOffer("dlf", "", engineRoot=tmp_path)
    assert offer.folder == str(destination)
    assert "shipped with AtlasSeg" in offer.message and "Not suited for" in offer.message
    assert modelOffer("dlf", "/my/model", engineRoot=tmp_path).folder == ""
    nothing = modelOffer("dlf", "", needsModel=False, engineRoot=tmp_path)
    assert nothing == modelOffer("atlasnet", "", engineRoot=tmp_path) and nothing.folder == nothing.message == ""
    assert modelOffer("dlf", "", engineRoot=tmp_path / "empty").message == ""


def test_the_shipped_hippocampus_model_loads_records_its_origin_and_segments_the_sample(tmp_path):
    """The model under Resources/Models is a complete DLF model with its provenance; on the real sample set (where
    ../shared is present) it segments a held-out target as the benchmark's DLF row does (Dice > 0.85)."""
    from atlasseg.model_io import load_model

    (model,) = [m for m in shipped_models(REPO) if m.name == "dlf-hippocampus"]
    assert model.method == "dlf" and load_model(model.folder).method == "dlf"
    shipped = model.record
    assert shipped["commit"] and shipped["training_command"].startswith("atlasseg benchmark dlf-hippocampus")
    assert set(HIPPOCAMPUS_SAMPLE.targets).isdisjoint(shipped["training_data"]["case_ids"])   # held out
    data = shared_dataset("hippocampus")          # skips with a message where ../shared is missing
    folder = build_sample_set(data, tmp_path / "sample")
    target = read_sample_folder(folder).targets[0]
    out = tmp_path / "out"
    assert main(["segment", "--method", "dlf", "--model", str(model.folder), "--target", str(target.image),
                 "--atlases", str(folder), "--reference", str(target.label), "--output", str(out), "--device",
                 "cpu", "--quiet", "--preset", "fast"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["labels"]
    assert min(v["dice"] for v in metrics.values()) > 0.85, metrics
