"""The command line end to end on phantoms, and its clear errors on bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def test_maps_are_written_by_kind(phantom_atlas_dir, target_files, tmp_path, capsys):
    """--maps KIND ...: only the kinds asked for (the per-atlas weight maps are the large ones); bare --maps: all."""
    target, ref = target_files
    out = tmp_path / "out"
    args = ["segment", "--target", str(target), "--atlases", str(phantom_atlas_dir), "--method", "weighted",
            "--n-atlases", "2", "--preset", "fast", "--device", "cpu", "--quiet", "--reference", str(ref)]
    assert main([*args, "--output", str(out), "--maps", "votes", "oracle"]) == 0
    maps = {p.name for p in (out / "maps").iterdir()}
    assert len([m for m in maps if m.startswith("votes_")]) == 5 and "oracle_coverage.nii.gz" in maps
    assert not [m for m in maps if m.startswith(("weights_", "agreement"))], maps
    assert main([*args, "--output", str(tmp_path / "all"), "--maps"]) == 0
    every = {p.name for p in (tmp_path / "all" / "maps").iterdir()}
    assert every > maps and len([m for m in every if m.startswith("weights_")]) == 2 and "agreement.nii.gz" in every
    with pytest.raises(SystemExit) as bad:
        main([*args, "--output", str(tmp_path / "bad"), "--maps", "weight"])
    assert bad.value.code == 2 and "invalid choice: 'weight'" in capsys.readouterr().err


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


def _leftovers(folder: Path) -> list[str]:
    """Hidden temporary folders a run leaves beside its output (none, ever)."""
    return sorted(p.name for p in folder.iterdir() if ".atlasseg-" in p.name)


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


BAD_INPUT = ["missing_atlases", "two_modalities", "nan_target", "nan_nifti_target", "truncated_target", "blank_target",
             "tiny_target", "output_in_atlases", "bad_method",
             # issue #14: counts of atlases (item 1), atlases required (item 2), output and reference (item 3)
             "n_atlases_zero", "n_atlases_too_many", "n_atlases_vs_atlas_ids", "fusion_without_atlases",
             "trained_without_model", "missing_model", "segmenter_with_atlas_options", "jlf_flag_other_method",
             "output_is_a_file", "output_under_a_file", "output_unwritable", "output_not_empty",
             "overwrite_not_a_run", "output_holds_an_input", "missing_reference", "reference_other_grid"]


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_exits_2_with_one_line_reason(case, phantom_atlas_dir, target_files, tmp_path):
    """Exit 2, one line naming the file or the problem, found before any registration: no output folder (nor the
    parent folders made for it, nor a temporary folder) left behind, an existing output and the inputs untouched."""
    target, ref = target_files
    atlases, out = str(phantom_atlas_dir), tmp_path / "new" / "deeper" / "out"
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
        out, expected = phantom_atlas_dir / "labelsTr", "must not be an input"
    elif case == "n_atlases_zero":      # was silently 10
        extra, expected = ["--n-atlases", "0"], "--n-atlases 0: at least 1 atlas is needed"
    elif case == "n_atlases_too_many":  # 5 atlases, one excluded: both counts named
        extra = ["--n-atlases", "9", "--exclude", "phantom_000"]
        expected = "--n-atlases 9: only 4 atlas(es) available in atlas set"
    elif case == "n_atlases_vs_atlas_ids":
        extra = ["--n-atlases", "3", "--atlas-ids", "phantom_001"]
        expected = "does not match --atlas-ids, which names 1"
    elif case == "fusion_without_atlases":
        atlases, expected = "", "--method jlf needs --atlases ATLAS_SET_FOLDER"
    elif case == "trained_without_model":
        extra, expected = ["--method", "atlasnet"], "--method atlasnet needs --model MODEL_FOLDER"
    elif case == "missing_model":
        extra, expected = ["--method", "dlf", "--model", str(tmp_path / "nomodel")], "nomodel: model folder not found"
    elif case == "segmenter_with_atlas_options":
        (tmp_path / "model").mkdir()
        extra = ["--method", "segmenter", "--model", str(tmp_path / "model"), "--n-atlases", "3", "--preset", "fast"]
        expected = "--n-atlases, --preset: method segmenter uses no atlases and no registration"
    elif case == "jlf_flag_other_method":
        extra, expected = ["--method", "majority", "--jlf-alpha", "0.2"], "--jlf-alpha: only used with --method jlf"
    elif case == "output_is_a_file":
        out = tmp_path / "out.txt"
        out.write_text("keep me")
        expected = "out.txt: exists and is a file, not an output folder"
    elif case == "output_under_a_file":
        (tmp_path / "file.txt").write_text("keep me")
        out, expected = tmp_path / "file.txt" / "sub" / "out", f"{tmp_path / 'file.txt'} is a file"
    elif case == "output_unwritable":
        if os.name == "nt":
            pytest.skip("no read-only folder to test with on Windows")
        if os.geteuid() != 0:
            (tmp_path / "readonly").mkdir()
            (tmp_path / "readonly").chmod(0o555)
            out = tmp_path / "readonly" / "out"
        elif Path("/sys").is_dir():       # read-only even for root
            out = Path("/sys") / f"atlasseg-test-{os.getpid()}" / "out"
        else:
            pytest.skip("no read-only location for root on this machine")
        expected = "cannot write the output folder there"
    elif case == "output_not_empty":
        out.mkdir(parents=True)
        (out / "mine.txt").write_text("keep me")
        expected = "the output folder exists and is not empty"
    elif case == "overwrite_not_a_run":   # --overwrite replaces an earlier run's folder, not any folder
        out.mkdir(parents=True)
        (out / "mine.txt").write_text("keep me")
        extra, expected = ["--overwrite"], "not the output folder of an earlier run (no run.json)"
    elif case == "output_holds_an_input":
        out = target.parent
        extra, expected = ["--overwrite"], "the output folder must not contain an input"
    elif case == "missing_reference":
        extra = ["--reference", str(tmp_path / "noref.nii.gz")]
        expected = "noref.nii.gz: reference label image not found"
    elif case == "reference_other_grid":
        moved = sitk.ReadImage(str(ref))
        moved.SetOrigin((5.0, 0.0, 0.0))
        sitk.WriteImage(moved, str(tmp_path / "moved_ref.nii.gz"))
        extra = ["--reference", str(tmp_path / "moved_ref.nii.gz"), "--preset", "fast"]
        expected = "moved_ref.nii.gz: the reference is not on the target's grid: origin"
    args = ["segment", "--output", str(out), "--device", "cpu", "--quiet"]
    args += ["--atlases", atlases] if atlases else []
    args += extra if "--target" in extra else ["--target", str(target), *extra]
    if case == "bad_method":
        args += ["--method", "nope"]
    existed = out.exists()
    before = _tree(out) if out.is_dir() else (out.read_bytes() if existed else None)
    inputs = _tree(phantom_atlas_dir), target.read_bytes()
    proc = _run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    if case != "bad_method":  # argparse's own usage error
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    if existed:
        assert (_tree(out) if out.is_dir() else out.read_bytes()) == before
    else:
        assert not out.exists() and not (tmp_path / "new").exists()
    if out.parent.is_dir():
        assert _leftovers(out.parent) == []
    assert (_tree(phantom_atlas_dir), target.read_bytes()) == inputs


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


# ---------------------------------------------------------------------------------------------------------------
# issue #14: no silent acceptance of broken input


@pytest.fixture(scope="module")
def tiny_models(phantom_atlas_dir, tmp_path_factory):
    """Untrained tiny DLF and AtlasNet model folders (2 atlases each): the CLI's checks and plumbing, not accuracy."""
    import torch

    from atlasseg.atlas import load_atlas_set
    from atlasseg.atlasnet import AtlasNetConfig, StoredAtlas, save_atlases
    from atlasseg.atlasnet import build_model as build_atlasnet
    from atlasseg.dlf.networks import DLFConfig
    from atlasseg.dlf.networks import build_model as build_dlf
    from atlasseg.fusion import labels_to_index
    from atlasseg.io import Geometry, labels_to_tensor
    from atlasseg.model_io import save_model
    from atlasseg.registration import normalized_tensor

    atlas_set = load_atlas_set(phantom_atlas_dir)
    root = tmp_path_factory.mktemp("models")
    registration = {"backend": "torch", "preset": "affine"}
    torch.manual_seed(0)
    dlf = DLFConfig(n_labels=len(atlas_set.labels), vote_channels=(4, 8, 16), finetune_channels=(4, 8, 16, 32))
    save_model(root / "dlf", "dlf", build_dlf(dlf), dlf.to_dict(), atlas_set.labels, atlas_set.modalities, 2,
               {"patch_size": [32, 32, 32], "registration": registration})
    ids = ("phantom_000", "phantom_001")
    arch = AtlasNetConfig(len(atlas_set.labels), 1, n_networks=2, atlas_ids=ids, selection="given",
                          backbone_preset=None, backbone_kwargs={"channels": [4, 8, 16]})
    stored = []
    for atlas_id in ids:
        case = atlas_set.load(atlas_id)
        index = labels_to_index(labels_to_tensor(case.label)[None], atlas_set.label_values)[0].long()
        stored.append(StoredAtlas(atlas_id, normalized_tensor(case.images), index, Geometry.of(case.images[0])))
    extra = {"patch_size": [16, 16, 16], "registration": registration,
             "atlases": save_atlases(root / "atlasnet", stored)}
    save_model(root / "atlasnet", "atlasnet", build_atlasnet(arch), arch.to_dict(), atlas_set.labels,
               atlas_set.modalities, 2, extra)
    return {"dlf": root / "dlf", "atlasnet": root / "atlasnet"}


@pytest.mark.parametrize("method, extra, expected", [
    ("dlf", ["--n-atlases", "0"], "--n-atlases 0: at least 1 atlas is needed"),
    ("dlf", ["--n-atlases", "9", "--exclude", "phantom_000"],
     "--n-atlases 9: only 4 atlas(es) available in atlas set"),
    ("atlasnet", ["--n-atlases", "3"], "--n-atlases 3: only 2 atlas(es) available in model"),
    ("atlasnet", ["--n-atlases", "2", "--exclude", "phantom_000"],
     "only 1 atlas(es) available in model"),
])
def test_trained_methods_refuse_more_atlases_than_available(method, extra, expected, tiny_models, phantom_atlas_dir,
                                                            target_files, tmp_path, capsys):
    """Item 1: DLF draws from the atlas set (the model's count is only its default), AtlasNet from its networks."""
    target, _ = target_files
    out = tmp_path / "out"
    assert main(["segment", "--method", method, "--model", str(tiny_models[method]), "--target", str(target),
                 "--atlases", str(phantom_atlas_dir), "--output", str(out), "--device", "cpu", "--quiet",
                 *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_atlasnet_segments_without_atlases_with_its_registration(tiny_models, target_files, tmp_path, monkeypatch,
                                                                 capsys):
    """Item 2: the model folder stores its atlases and registration settings (--backend / --preset default to
    them); DLF, which registers an atlas set's atlases, still needs --atlases."""
    import atlasseg.atlasnet.inference as inference

    target, _ = target_files
    used = []
    real_register = inference.register

    def spy(*args, **kwargs):
        used.append((kwargs["backend"], kwargs["preset"]))
        return real_register(*args, **kwargs)

    monkeypatch.setattr(inference, "register", spy)
    out = tmp_path / "out"
    assert main(["segment", "--method", "atlasnet", "--model", str(tiny_models["atlasnet"]), "--target", str(target),
                 "--output", str(out), "--device", "cpu", "--quiet", "--threads", "1"]) == 0
    assert used == [("torch", "affine")]
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "atlasnet" and run["atlases"] == ["phantom_000", "phantom_001"]
    assert run["registration"] == {"backend": "torch", "preset": "affine"}
    assert sitk.ReadImage(str(out / "segmentation.nii.gz")).GetSize() == sitk.ReadImage(str(target)).GetSize()
    capsys.readouterr()
    assert main(["segment", "--method", "dlf", "--model", str(tiny_models["dlf"]), "--target", str(target),
                 "--output", str(tmp_path / "dlf"), "--device", "cpu", "--quiet"]) == 2
    assert "--method dlf needs --atlases ATLAS_SET_FOLDER" in capsys.readouterr().err
    assert not (tmp_path / "dlf").exists() and _leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def rerun(phantom_atlas_dir, target_files, tmp_path_factory):
    """A fast run with --overwrite over the folder of an earlier run that holds maps this run does not write."""
    target, ref = target_files
    parent = tmp_path_factory.mktemp("rerun")
    out = parent / "out"
    (out / "maps").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"format": "atlasseg-run", "version": 1, "success": True}))
    (out / "maps" / "weights_old_atlas.nii.gz").write_bytes(b"an earlier run's map")
    (out / "notes.txt").write_text("earlier")
    import torch

    threads = torch.get_num_threads()
    code = main(["segment", "--target", str(target), "--atlases", str(phantom_atlas_dir), "--output", str(out),
                 "--method", "majority", "--n-atlases", "2", "--maps", "--reference", str(ref), "--overwrite",
                 "--preset", "fast", "--device", "cpu", "--threads", "1", "--quiet"])
    return code, out, json.loads((out / "run.json").read_text()), (threads, torch.get_num_threads())


def test_overwrite_replaces_the_earlier_run_whole(rerun):
    """Item 4: written into a temporary sibling folder, moved into place complete: exactly one run's files."""
    code, out, run, _ = rerun
    assert code == 0 and run["success"] is True and run["method"] == "majority"
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert "notes.txt" not in on_disk and "maps/weights_old_atlas.nii.gz" not in on_disk
    listed = {str(Path(p).relative_to(out)) for p in run["files"].values()}     # recorded at their final paths
    assert listed | {"run.json", "maps/oracle_coverage.json"} == on_disk
    assert _leftovers(out.parent) == []


def test_run_json_records_threads(rerun, monkeypatch):
    """Item 7: --threads sets torch's threads for the run (restored afterwards) and is recorded; the default is
    OMP_NUM_THREADS when set, else the physical cores, at most 4."""
    from atlasseg.cli import default_threads

    _, _, run, (before, after) = rerun
    assert run["threads"] == 1 and run["device"] == "cpu" and after == before
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads(16) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= default_threads(64) <= 4 and default_threads(1) == 1


def test_run_json_times_every_stage(rerun):
    """Item 8: inputs, the pipeline's stages, reference metrics and saving are timed; run.json comes last."""
    _, out, run, _ = rerun
    timings = run["timings_s"]
    assert list(timings) == ["inputs", "load", "registration", "warp", "fusion", "metrics", "saving", "total"]
    assert all(v >= 0 for v in timings.values()) and timings["total"] >= timings["registration"]
    assert run["registration"] == {"backend": "torch", "preset": "fast"}
    newest = max(out.rglob("*.*"), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == "run.json"


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_leaves_the_earlier_run_and_nothing_else(signum, phantom_atlas_dir, target_files, tmp_path):
    """Items 4 and 5: SIGTERM or Ctrl-C during a run: one line, exit 128 + signal, no traceback; the earlier
    output folder untouched and no temporary folder left."""
    target, _ = target_files
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"format": "atlasseg-run", "version": 1, "success": True}))
    (out / "segmentation.nii.gz").write_bytes(b"the earlier run")
    before = _tree(out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "atlasseg", "segment", "--target", str(target), "--atlases", str(phantom_atlas_dir),
         "--output", str(out), "--overwrite", "--method", "jlf", "--n-atlases", "4", "--preset", "accurate",
         "--device", "cpu", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))    # as from a terminal
    deadline = time.monotonic() + 120
    while not _leftovers(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)                      # into the run (imports, reading, registration)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    word = "terminated" if signum == signal.SIGTERM else "interrupted"
    assert lines == [f"atlasseg segment: {word}"], stderr
    assert _tree(out) == before and _leftovers(tmp_path) == []


def test_help_version_and_path_errors_import_no_torch():
    """Item 5: --help, segment --help, --version and an error on a wrong path never import torch or MONAI."""
    from atlasseg.cli import package_version

    code = (
        "import sys, contextlib, io\n"
        "from atlasseg.cli import _parser, main\n"
        "_parser()\n"
        "for argv in (['--help'], ['segment', '--help'], ['--version']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as text:\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit as done:\n"
        "            assert done.code == 0, argv\n"
        "    print(text.getvalue().splitlines()[0] if argv == ['--version'] else '')\n"
        "assert main(['segment', '--target', 'nowhere.nii.gz', '--output', 'o']) == 2\n"
        "heavy = [m for m in ('torch', 'monai', 'SimpleITK') if m in sys.modules]\n"
        "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"atlasseg {package_version()}" in proc.stdout
    assert proc.stderr.strip() == "atlasseg segment: error: nowhere.nii.gz: target image not found"


def test_cli_defaults_are_read_from_the_engine():
    """The defaults --help shows (atlasseg.methods, read without importing torch) are those the code applies."""
    import inspect

    from atlasseg.cli import JLF_DEFAULTS, REGISTRATION_DEFAULTS
    from atlasseg.fusion.jlf import joint_label_fusion
    from atlasseg.pipeline import segment

    for function, defaults in ((joint_label_fusion, JLF_DEFAULTS), (segment, REGISTRATION_DEFAULTS)):
        parameters = inspect.signature(function).parameters
        assert defaults == {k: parameters[k].default for k in defaults}


def test_benchmark_without_antspyx_fails_at_once(tmp_path, monkeypatch, capsys):
    """Item 6: the hippocampus suite's antspyx peer is checked first (was: a crash after the first target)."""
    monkeypatch.setitem(sys.modules, "ants", None)        # import ants fails, as without antspyx
    assert main(["benchmark", "hippocampus", "--data", str(tmp_path), "--work", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "install antspyx" in err and "--no-ants" in err, err
    assert main(["benchmark", "hippocampus", "--data", str(tmp_path), "--no-ants"]) == 2   # past the check
    assert "benchmark data not found" in capsys.readouterr().err
