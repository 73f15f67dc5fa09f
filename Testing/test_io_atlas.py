"""Geometry round trips and atlas-set validation with clear errors."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from atlasseg.atlas import AtlasSetError, load_atlas_set, load_target
from atlasseg.io import Geometry, ImageError, image_to_tensor, read_image, tensor_to_image, write_image
from atlasseg.registration.transforms import grid_points

OBLIQUE = tuple(sitk.VersorTransform((0.3, -0.5, 0.8), 0.4).GetMatrix())


def _oblique_image(shape=(7, 9, 11), pixel=np.float32) -> sitk.Image:
    arr = np.random.default_rng(0).random(shape).astype(pixel)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.7, 1.3, 2.5))
    image.SetOrigin((-12.5, 33.0, 4.25))
    image.SetDirection(OBLIQUE)
    return image


def test_geometry_round_trips_exactly_through_io_and_tensors(tmp_path):
    image = _oblique_image()
    path = write_image(image, tmp_path / "x.nii.gz")
    back = read_image(path)
    geom, geom_back = Geometry.of(image), Geometry.of(back)
    assert geom.same_as(geom_back, tolerance=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    # tensor -> image keeps the array and the grid
    again = tensor_to_image(image_to_tensor(back)[0], geom_back)
    assert Geometry.of(again).same_as(geom)
    assert np.array_equal(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(image))


def test_grid_points_match_simpleitk_physical_points():
    image = _oblique_image()
    pts = grid_points(Geometry.of(image), dtype=torch.float64)
    for idx in [(0, 0, 0), (10, 8, 6), (3, 5, 2)]:  # (x, y, z) index
        expected = image.TransformIndexToPhysicalPoint(idx)
        assert np.allclose(pts[idx[2], idx[1], idx[0]].numpy(), expected, atol=1e-9)


def _write_set(root, cases, labels=None, modality=None):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for name, (image, label) in cases.items():
        sitk.WriteImage(image, str(root / "imagesTr" / f"{name}.nii.gz"))
        sitk.WriteImage(label, str(root / "labelsTr" / f"{name}.nii.gz"))
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta = {"name": "t", "labels": labels or {"0": "background", "1": "a", "2": "b"},
            "modality": modality or {"0": "MRI"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _case(seed=0, shape=(8, 9, 10), values=(0, 1, 2)):
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.random(shape).astype(np.float32))
    lab = np.zeros(shape, np.uint8)
    for k, v in enumerate(values):
        lab.flat[k::len(values)] = v
    label = sitk.GetImageFromArray(lab)
    return image, label


def test_loads_decathlon_folder(tmp_path):
    root = _write_set(tmp_path / "set", {"a": _case(0), "b": _case(1)})
    s = load_atlas_set(root)
    assert s.case_ids == ["a", "b"] and s.labels == {0: "background", 1: "a", 2: "b"}
    case = s.load("b")
    assert len(case.images) == 1 and case.label is not None


def test_loads_nnunet_v2_channel_files(tmp_path):
    root = tmp_path / "v2"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for name in ("c1", "c2"):
        image, label = _case(3)
        sitk.WriteImage(image, str(root / "imagesTr" / f"{name}_0000.nii.gz"))
        sitk.WriteImage(image, str(root / "imagesTr" / f"{name}_0001.nii.gz"))
        sitk.WriteImage(label, str(root / "labelsTr" / f"{name}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "a": 1, "b": 2},
        "file_ending": ".nii.gz"}))
    s = load_atlas_set(root)
    assert s.modalities == {0: "T1", 1: "T2"}
    assert len(s.load("c1").images) == 2


def test_loads_4d_multichannel_and_explicit_list(tmp_path):
    image, label = _case(0)
    four_d = sitk.JoinSeries([image, image])
    sitk.WriteImage(four_d, str(tmp_path / "mc.nii.gz"))
    sitk.WriteImage(label, str(tmp_path / "mc_seg.nii.gz"))
    s = load_atlas_set([(tmp_path / "mc.nii.gz", tmp_path / "mc_seg.nii.gz")])
    assert len(s.load(0).images) == 2
    assert s.labels == {0: "background", 1: "label 1", 2: "label 2"}


@pytest.mark.parametrize("problem, expected", [
    ("grid", "grid does not match"),
    ("float_labels", "non-integer label values"),
    ("unexpected", "unexpected label values [7]"),
    ("differ", "differs from"),
    ("modality", "missing or extra modality"),
    ("missing_file", "not found"),
])
def test_bad_atlas_sets_give_clear_errors_naming_the_file(tmp_path, problem, expected):
    good = {"a": _case(0), "b": _case(1)}
    image, label = _case(2)
    name = "bad"
    if problem == "grid":
        label.SetSpacing((1.0, 1.0, 2.0))
    elif problem == "float_labels":
        arr = sitk.GetArrayFromImage(label).astype(np.float32) + 0.5
        label = sitk.GetImageFromArray(arr)
    elif problem == "unexpected":
        arr = sitk.GetArrayFromImage(label)
        arr[0, 0, 0] = 7
        label = sitk.GetImageFromArray(arr)
    elif problem == "differ":
        _, label = _case(2, values=(0, 1))
    root = _write_set(tmp_path / "set", dict(good, **{name: (image, label)}))
    if problem == "modality":
        meta = json.loads((root / "dataset.json").read_text())
        meta["modality"] = {"0": "T1", "1": "T2"}
        (root / "dataset.json").write_text(json.dumps(meta))
    if problem == "missing_file":
        (root / "labelsTr" / "bad.nii.gz").unlink()
    with pytest.raises((AtlasSetError, ImageError)) as err:
        load_atlas_set(root)
    assert expected in str(err.value)
    if problem not in ("modality", "differ"):
        assert "bad.nii.gz" in str(err.value)


def test_nan_image_is_rejected_naming_the_file(tmp_path):
    image, label = _case(0)
    arr = sitk.GetArrayFromImage(image)
    arr[1, 1, 1] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "nan.nrrd"))  # NIfTI readers zero NaNs
    sitk.WriteImage(label, str(tmp_path / "nan_seg.nrrd"))
    with pytest.raises(ImageError, match=r"nan\.nrrd: contains 1 NaN/Inf"):
        load_atlas_set([(tmp_path / "nan.nrrd", tmp_path / "nan_seg.nrrd")])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_truncated_and_non_finite_files_are_rejected_in_every_format(tmp_path, suffix):
    """SimpleITK zero-fills a truncated NIfTI and turns NIfTI NaNs into 0 without a word; read_image must not."""
    image, _ = _case(0)
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    whole = tmp_path / f"whole{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(whole), True)
    assert np.array_equal(sitk.GetArrayFromImage(read_image(whole)), arr)  # intact files read as before
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageError, match=rf"cut{re.escape(suffix)}: .*(truncated|cut short|expected)"):
        read_image(cut)
    arr[2, 3, 4], arr[1, 1, 1] = np.inf, np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / f"nan{suffix}"), True)
    with pytest.raises(ImageError, match=rf"nan{re.escape(suffix)}: contains 2 NaN/Inf"):
        read_image(tmp_path / f"nan{suffix}")


def test_empty_set_and_missing_dataset_json(tmp_path):
    root = _write_set(tmp_path / "set", {})
    with pytest.raises(AtlasSetError, match="empty"):
        load_atlas_set(root)
    (tmp_path / "nojson").mkdir()
    with pytest.raises(AtlasSetError, match="no dataset.json"):
        load_atlas_set(tmp_path / "nojson")


def test_target_modality_count_is_checked(tmp_path):
    image, _ = _case(0)
    sitk.WriteImage(image, str(tmp_path / "t.nii.gz"))
    with pytest.raises(AtlasSetError, match="needs 2"):
        load_target([tmp_path / "t.nii.gz"], n_modalities=2)


def test_loading_never_modifies_the_input_files(tmp_path, phantom_atlas_dir):
    copy = tmp_path / "copy"
    shutil.copytree(phantom_atlas_dir, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    s = load_atlas_set(copy)
    s.load(0)
    after = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert before == after


def _broken(kind: str, grid: sitk.Image) -> sitk.Image:
    arr = sitk.GetArrayFromImage(sitk.Cast(grid, sitk.sitkFloat32))
    if kind == "nan":
        arr[3, 4, 5], arr[6, 6, 6] = np.nan, np.inf
    elif kind == "blank":
        arr[:] = 7.0
    elif kind == "tiny":
        arr = arr[:3, :4, :5]
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(grid.GetSpacing())
    image.SetDirection(grid.GetDirection())
    image.SetOrigin(grid.GetOrigin() if kind != "moved" else (5.0, 0.0, 0.0))
    return image


API_PROBLEMS = {"nan": "target image 0: contains 2 NaN/Inf voxel values",
                "blank": "target image 0: blank image (every voxel is 7)",
                "tiny": "target image 0: image of 5x4x3 voxels is too small",
                "moved": "target image 1: grid does not match target image 0: origin"}


@pytest.mark.parametrize("kind", list(API_PROBLEMS))
def test_python_api_refuses_broken_images_in_memory(kind, phantom_atlas_dir, tmp_path):
    """Images handed to the Python API get the checks files get on the command line, before any work: every
    entry point (atlas fusion, the trained methods, registration) raises the same error, naming the image."""
    from atlasseg.atlasnet import segment_atlasnet
    from atlasseg.deepatlas import register_pair, segment_deepatlas
    from atlasseg.dlf.inference import segment_dlf
    from atlasseg.pipeline import segment
    from atlasseg.registration import register
    from atlasseg.segmenter import segment_segmenter

    atlas_set = load_atlas_set(phantom_atlas_dir)
    good = atlas_set.load(atlas_set.case_ids[0]).images[0]
    target = [good, _broken(kind, good)] if kind == "moved" else [_broken(kind, good)]
    expected = API_PROBLEMS[kind]
    nowhere = tmp_path / "no model"          # the image is checked before the model folder is read
    calls = {"segment": lambda: segment(target, atlas_set, "majority", n_atlases=2, device="cpu"),
             "dlf": lambda: segment_dlf(target, atlas_set, nowhere, device="cpu"),
             "atlasnet": lambda: segment_atlasnet(target, atlas_set, nowhere, device="cpu"),
             "segmenter": lambda: segment_segmenter(target, atlas_set, nowhere, device="cpu"),
             "deepatlas": lambda: segment_deepatlas(target, atlas_set, nowhere, device="cpu"),
             "register": lambda: register(target, [[good] * len(target)], device="cpu")}
    for name, call in calls.items():
        with pytest.raises(AtlasSetError) as err:
            call()
        assert str(err.value).startswith(expected), (name, str(err.value))
    if kind != "moved":
        with pytest.raises(AtlasSetError, match=re.escape(expected.replace("target image 0", "moving image 0"))):
            register_pair(good, target[0], backend="torch", device="cpu")


def test_atlas_count_defaults_to_up_to_ten_and_refuses_more_than_the_pool(phantom_atlas_dir):
    """The Python API behaves as the command line: no count means up to 10 (the whole pool where smaller); an
    explicit count larger than the pool left after exclusions is an error before any registration."""
    from atlasseg.atlas import AtlasCase, AtlasSet
    from atlasseg.methods import DEFAULT_N_ATLASES
    from atlasseg.pipeline import choose_atlases, segment

    big = AtlasSet("big", [AtlasCase(f"case_{k:02d}", [phantom_atlas_dir / "x.nii.gz"]) for k in range(14)],
                   {0: "background", 1: "a"})
    drawn = choose_atlases(big, None, exclude=["case_00"], seed=3)
    assert len(drawn) == DEFAULT_N_ATLASES == 10 and "case_00" not in drawn and drawn == sorted(set(drawn))
    assert drawn == choose_atlases(big, None, exclude=["case_00"], seed=3) != choose_atlases(big, None, seed=4)
    assert choose_atlases(big, 13, exclude=["case_00"]) == big.case_ids[1:]
    with pytest.raises(ValueError, match=r"n_atlases=14: only 13 atlas\(es\) available in big after excluding case_00"):
        choose_atlases(big, 14, exclude=["case_00"])

    atlas_set = load_atlas_set(phantom_atlas_dir)             # 5 cases: the default takes all of them
    ids = sorted(atlas_set.case_ids)
    assert choose_atlases(atlas_set, None) == ids and choose_atlases(atlas_set, None, exclude=ids[:1]) == ids[1:]
    target = atlas_set.load(ids[0]).images
    with pytest.raises(ValueError, match=r"n_atlases=5: only 4 atlas\(es\) available"):
        segment(target, atlas_set, "majority", n_atlases=5, exclude=ids[:1], device="cpu", show_progress=False)
