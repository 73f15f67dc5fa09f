"""The command line end to end on phantoms, and its clear errors on bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from atlasseg.cli import main
from atlasseg.phantom import make_phantom


@pytest.fixture(scope="module")
def target_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("target")
    image, label = make_phantom(seed=777)
    sitk.WriteImage(image, str(folder / "target.nii.gz"))
    sitk.WriteImage(label, str(folder / "target_ref.nii.gz"))
    return folder / "target.nii.gz", folder / "target_ref.nii.gz"


def test_segment_writes_segmentation_maps_transforms_and_metrics(phantom_atlas_dir, target_files, tmp_path):
    target, ref = target_files
    out = tmp_path / "out"
    code = main(["segment", "--target", str(target), "--atlases", str(phantom_atlas_dir), "--output", str(out),
                 "--method", "jlf", "--n-atlases", "4", "--maps", "--transforms", "--reference", str(ref),
                 "--device", "cpu", "--quiet"])
    assert code == 0
    seg = sitk.ReadImage(str(out / "segmentation.nii.gz"))
    reference = sitk.ReadImage(str(ref))
    assert seg.GetSize() == reference.GetSize() and np.allclose(seg.GetOrigin(), reference.GetOrigin())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mean"]["dice"] > 0.8
    maps = {p.name for p in (out / "maps").iterdir()}
    assert {"agreement.nii.gz", "oracle_coverage.nii.gz", "oracle_coverage.json"} <= maps
    assert len([m for m in maps if m.startswith("votes_")]) == 5
    assert len([m for m in maps if m.startswith("weights_")]) == 4
    votes = sum(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "maps" / m))) for m in maps if m.startswith("votes_"))
    assert np.allclose(votes, 1.0, atol=1e-4)
    transforms = sorted(p.name for p in (out / "transforms").iterdir())
    assert len(transforms) == 8 and all(t.endswith(("_forward.nii.gz", "_inverse.nii.gz")) for t in transforms)
    run = json.loads((out / "run.json").read_text())
    assert len(run["atlases"]) == 4 and run["method"] == "jlf"
    assert run["format"] == "atlasseg-run" and run["version"] == 1 and run["success"] is True


def test_evaluate_writes_csv(target_files, tmp_path, capsys):
    _, ref = target_files
    out = tmp_path / "m.csv"
    assert main(["evaluate", "--prediction", str(ref), "--reference", str(ref), "--output", str(out)]) == 0
    rows = out.read_text().splitlines()
    assert rows[0].startswith("label") and len(rows) == 1 + 4 + 1
    assert "1.000" in capsys.readouterr().out


def test_demo_runs_every_method_and_writes_png(tmp_path):
    from atlasseg.demo import run_demo

    result = run_demo(tmp_path / "demo", n_atlases=4, device="cpu", show_progress=False)
    assert set(result["methods"]) == {"majority", "weighted", "jlf", "staple"}
    for method, r in result["methods"].items():
        assert r["metrics"]["mean"]["dice"] > 0.8, method
    png = sitk.ReadImage(result["png"])
    assert png.GetNumberOfComponentsPerPixel() == 3 and png.GetSize()[0] > 300


def _run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atlasseg", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["missing_atlases", "two_modalities", "nan_target", "nan_nifti_target",
                                  "truncated_target", "blank_target", "tiny_target", "output_in_atlases",
                                  "bad_method"])
def test_bad_input_exits_2_with_one_line_reason(case, phantom_atlas_dir, target_files, tmp_path):
    target, _ = target_files
    atlases, out = str(phantom_atlas_dir), str(tmp_path / "out")
    extra: list[str] = []
    expected = ""
    if case == "missing_atlases":
        atlases, expected = str(tmp_path / "nowhere"), "atlas set folder not found"
    elif case == "two_modalities":
        extra, expected = ["--target", str(target), str(target)], "needs 1"
    elif case == "nan_target":
        image = sitk.ReadImage(str(target))
        arr = sitk.GetArrayFromImage(image)
        arr[5, 5, 5] = np.nan
        bad = sitk.GetImageFromArray(arr)
        bad.CopyInformation(image)
        sitk.WriteImage(bad, str(tmp_path / "nan.nrrd"))
        extra, expected = ["--target", str(tmp_path / "nan.nrrd")], "nan.nrrd: contains 1 NaN/Inf"
    elif case == "nan_nifti_target":  # SimpleITK's NIfTI reader turns NaN into 0: checked on the raw bytes
        image = sitk.ReadImage(str(target), sitk.sitkFloat32)
        arr = sitk.GetArrayFromImage(image)
        arr[5, 5, 5], arr[6, 6, 6] = np.nan, np.inf
        bad = sitk.GetImageFromArray(arr)
        bad.CopyInformation(image)
        sitk.WriteImage(bad, str(tmp_path / "nan.nii.gz"))
        extra, expected = ["--target", str(tmp_path / "nan.nii.gz")], "nan.nii.gz: contains 2 NaN/Inf"
    elif case == "truncated_target":  # the first bytes of a real file: SimpleITK would zero-fill the rest
        sitk.WriteImage(sitk.ReadImage(str(target)), str(tmp_path / "whole.nii.gz"))
        data = (tmp_path / "whole.nii.gz").read_bytes()
        (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
        extra, expected = ["--target", str(tmp_path / "cut.nii.gz")], "cut.nii.gz: truncated"
    elif case == "blank_target":
        blank = sitk.Image(sitk.ReadImage(str(target)).GetSize(), sitk.sitkFloat32) + 7.0
        sitk.WriteImage(blank, str(tmp_path / "blank.nii.gz"))
        extra, expected = ["--target", str(tmp_path / "blank.nii.gz")], "blank.nii.gz: blank image (every voxel is 7)"
    elif case == "tiny_target":
        sitk.WriteImage(sitk.GetImageFromArray(np.arange(27, dtype=np.float32).reshape(3, 3, 3)),
                        str(tmp_path / "tiny.nii.gz"))
        extra, expected = ["--target", str(tmp_path / "tiny.nii.gz")], "tiny.nii.gz: image of 3x3x3 voxels is too small"
    elif case == "output_in_atlases":
        out, expected = str(phantom_atlas_dir / "labelsTr"), "must not be an input"
    args = ["segment", "--atlases", atlases, "--output", out, "--device", "cpu", "--quiet"]
    args += extra or ["--target", str(target)]
    if case == "bad_method":
        args += ["--method", "nope"]
    proc = _run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    if case != "bad_method":  # argparse's own usage error
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_user_data_is_never_modified(phantom_atlas_dir, target_files, tmp_path):
    target, _ = target_files
    atlases = tmp_path / "atlases"
    shutil.copytree(phantom_atlas_dir, atlases)
    before = {p: p.read_bytes() for p in atlases.rglob("*") if p.is_file()}
    target_bytes = target.read_bytes()
    assert main(["segment", "--target", str(target), "--atlases", str(atlases), "--output", str(tmp_path / "o"),
                 "--method", "majority", "--n-atlases", "2", "--device", "cpu", "--quiet",
                 "--preset", "fast"]) == 0
    assert {p: p.read_bytes() for p in atlases.rglob("*") if p.is_file()} == before
    assert target.read_bytes() == target_bytes
