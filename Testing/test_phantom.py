"""Tests for atlasseg.phantom: reproducibility, anatomy, geometry, deformations, atlas-set folders."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk

from atlasseg.phantom import (
    PHANTOM_LABELS,
    apply_deformation,
    jacobian_determinant,
    make_known_deformation,
    make_phantom,
    make_phantom_atlas_set,
)

SMALL = {"shape": (24, 28, 24), "spacing": (2.0, 2.0, 2.0)}


def _rotation_direction(degrees: float = 30.0) -> tuple[float, ...]:
    """Row-major direction cosines: rotation about z by ``degrees`` followed by a tilt about x."""
    a, b = np.deg2rad(degrees), np.deg2rad(10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rx @ rz).ravel())


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def subject0():
    return make_phantom(0)


def test_reproducible_by_seed(subject0):
    image, labels = subject0
    image_again, labels_again = make_phantom(0)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(image_again))
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(labels), sitk.GetArrayViewFromImage(labels_again)
    )
    other_image, other_labels = make_phantom(1)
    assert not np.array_equal(sitk.GetArrayViewFromImage(labels), sitk.GetArrayViewFromImage(other_labels))
    assert not np.allclose(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(other_image))


def test_types_shape_and_labels(subject0):
    image, labels = subject0
    assert image.GetPixelID() == sitk.sitkFloat32 and labels.GetPixelID() == sitk.sitkUInt8
    img, lab = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels)
    assert img.shape == lab.shape == (48, 56, 48)
    assert image.GetSize() == (48, 56, 48)
    assert PHANTOM_LABELS == {
        0: "background",
        1: "tissue",
        2: "ventricles",
        3: "deep nucleus",
        4: "hippocampus",
    }
    counts = np.bincount(lab.ravel(), minlength=5)
    assert set(np.unique(lab)) == {0, 1, 2, 3, 4}
    assert 0.05 < counts[1] / lab.size < 0.20  # brain tissue: the largest structure
    for value in (2, 3, 4):
        assert 150 < counts[value] < 1500, (value, counts[value])
        assert counts[value] < counts[1] / 8
    # Every structure lies in the brain; the brain does not touch the array border (room for deformation).
    assert not lab[[0, -1]].any() and not lab[:, [0, -1]].any() and not lab[:, :, [0, -1]].any()
    assert np.all(np.isfinite(img)) and img.min() >= 0.0


def test_intensities_are_label_related(subject0):
    img = sitk.GetArrayFromImage(subject0[0])
    lab = sitk.GetArrayFromImage(subject0[1])
    mean = {v: float(img[lab == v].mean()) for v in range(5)}
    assert mean[2] < mean[1] - 0.2  # dark ventricles (CSF)
    assert mean[0] < 0.25  # background, skull and extra-cerebral CSF
    assert np.mean(img[0:3, 0:3, 0:3]) < 0.1  # corners are air with Rician noise only
    noiseless = sitk.GetArrayFromImage(make_phantom(0, noise=0.0)[0])
    assert 0.02 < np.std(img - noiseless) < 0.05  # noise=0.03 (Rician)


def test_single_phantom_is_fast():
    make_phantom(11)
    start = time.perf_counter()
    make_phantom(12)
    assert time.perf_counter() - start < 1.0


def test_geometry_direction_spacing_origin():
    direction = _rotation_direction()
    image, labels = make_phantom(
        2, shape=(20, 56, 40), spacing=(1.2, 0.9, 2.4), direction=direction, origin=(10.0, -20.0, 5.0)
    )
    for im in (image, labels):
        assert im.GetSize() == (40, 56, 20)
        np.testing.assert_allclose(im.GetSpacing(), (1.2, 0.9, 2.4))
        np.testing.assert_allclose(im.GetOrigin(), (10.0, -20.0, 5.0))
        np.testing.assert_allclose(im.GetDirection(), direction, atol=1e-12)
    assert set(np.unique(sitk.GetArrayViewFromImage(labels))) == {0, 1, 2, 3, 4}

    # Default origin: the centre of the field of view is at (0, 0, 0) mm, also for a rotated grid.
    centred = make_phantom(2, shape=(20, 56, 40), spacing=(1.2, 0.9, 2.4), direction=direction)[1]
    centre_index = [(n - 1) / 2.0 for n in centred.GetSize()]
    np.testing.assert_allclose(centred.TransformContinuousIndexToPhysicalPoint(centre_index), 0.0, atol=1e-9)
    # The anatomy rotates with the grid: identical arrays, different physical placement.
    axis_aligned = make_phantom(2, shape=(20, 56, 40), spacing=(1.2, 0.9, 2.4))[1]
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(centred), sitk.GetArrayViewFromImage(axis_aligned)
    )

    with pytest.raises(ValueError, match="orthonormal"):
        make_phantom(0, direction=(1, 0, 0, 0, 2, 0, 0, 0, 1))


def test_anisotropic_spacing_samples_same_physical_anatomy():
    iso = sitk.GetArrayFromImage(make_phantom(4, shape=(48, 56, 48), spacing=(1.0, 1.0, 1.0))[1])
    aniso = sitk.GetArrayFromImage(make_phantom(4, shape=(24, 56, 48), spacing=(1.0, 1.0, 2.0))[1])
    for value in (1, 2, 3, 4):
        vol_iso = (iso == value).sum() * 1.0  # mm^3
        vol_aniso = (aniso == value).sum() * 2.0
        assert vol_aniso == pytest.approx(vol_iso, rel=0.15), value
    # Same subject: the coarse label map agrees with every other slice of the fine one.
    assert _dice(aniso == 1, iso[::2] == 1) > 0.9


def test_subjects_differ_but_are_alignable(subject0):
    lab0 = sitk.GetArrayFromImage(subject0[1])
    for seed in (1, 2, 3):
        lab = sitk.GetArrayFromImage(make_phantom(seed)[1])
        assert 0.6 < _dice(lab0 == 1, lab == 1) < 0.95
        assert 0.05 < _dice(lab0 == 3, lab == 3) < 0.97  # small structures move but still overlap
    rigid = sitk.GetArrayFromImage(make_phantom(1, deformation_mm=0.0)[1])
    assert _dice(rigid == 1, sitk.GetArrayFromImage(make_phantom(1)[1]) == 1) < 0.97  # deformation acts


def test_known_deformation_invertible_and_magnitude():
    reference = make_phantom(0, shape=(30, 40, 36), spacing=(1.2, 1.0, 1.5))[0]
    field = make_known_deformation(reference, magnitude_mm=4.0, seed=7, smoothness_mm=10.0)
    assert field.GetPixelID() == sitk.sitkVectorFloat64 and field.GetNumberOfComponentsPerPixel() == 3
    assert field.GetSize() == reference.GetSize()
    np.testing.assert_allclose(field.GetSpacing(), reference.GetSpacing())
    np.testing.assert_allclose(field.GetOrigin(), reference.GetOrigin())
    disp = sitk.GetArrayFromImage(field)
    norms = np.sqrt((disp**2).sum(axis=-1))
    assert norms.max() == pytest.approx(4.0, rel=1e-6)
    assert 0.5 < norms.mean() < 3.5  # smooth, not a single spike
    jac_sitk = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    assert jac_sitk.min() > 0.2 and jac_sitk.max() < 2.0
    assert jacobian_determinant(field).min() > 0.2
    np.testing.assert_array_equal(
        disp, sitk.GetArrayFromImage(make_known_deformation(reference, 4.0, 7, 10.0))
    )

    with pytest.raises(ValueError, match="Jacobian"):
        make_known_deformation(reference, magnitude_mm=15.0, seed=7, smoothness_mm=2.0)


def test_jacobian_determinant_on_rotated_anisotropic_grid():
    # Linear physical field d(x) = M (x - c): Jacobian determinant det(I + M) everywhere.
    grid = sitk.Image([12, 10, 8], sitk.sitkUInt8)
    grid.SetSpacing((0.7, 1.3, 2.0))
    grid.SetDirection(_rotation_direction(40.0))
    grid.SetOrigin((3.0, -4.0, 1.0))
    m = np.array([[0.05, 0.2, 0.0], [-0.1, 0.02, 0.15], [0.0, 0.1, -0.08]])
    z, y, x = np.meshgrid(*[np.arange(n) for n in grid.GetSize()[::-1]], indexing="ij")
    index = np.stack([x, y, z], axis=-1).astype(float)
    direction = np.asarray(grid.GetDirection()).reshape(3, 3)
    points = np.asarray(grid.GetOrigin()) + (index * np.asarray(grid.GetSpacing())) @ direction.T
    field = sitk.GetImageFromArray(points @ m.T, isVector=True)
    field.CopyInformation(grid)
    np.testing.assert_allclose(jacobian_determinant(field), np.linalg.det(np.eye(3) + m), rtol=1e-10)


def test_apply_deformation_translation_and_types():
    image, labels = make_phantom(5, **SMALL)
    shift = np.zeros((*sitk.GetArrayViewFromImage(labels).shape, 3))
    shift[..., 0] = 4.0  # 4 mm = 2 voxels along x
    field = sitk.GetImageFromArray(shift, isVector=True)
    field.CopyInformation(labels)
    moved_labels = apply_deformation(labels, field, is_label=True)
    moved_image = apply_deformation(image, field, is_label=False)
    assert moved_labels.GetPixelID() == sitk.sitkUInt8 and moved_image.GetPixelID() == sitk.sitkFloat32
    assert moved_labels.GetSpacing() == labels.GetSpacing() and moved_labels.GetOrigin() == labels.GetOrigin()
    lab, out = sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(moved_labels)
    np.testing.assert_array_equal(out[:, :, :-2], lab[:, :, 2:])  # out(x) = in(x + d)
    img, out_img = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(moved_image)
    np.testing.assert_allclose(out_img[:, :, :-2], img[:, :, 2:], atol=1e-5)
    assert np.all(out[:, :, -2:] == 0)  # points mapped outside the image get 0
    assert sitk.GetArrayViewFromImage(field)[..., 0].min() == 4.0  # the field is not consumed


def test_apply_known_deformation_to_phantom():
    image, labels = make_phantom(6)
    field = make_known_deformation(labels, magnitude_mm=3.0, seed=1, smoothness_mm=8.0)
    warped = sitk.GetArrayFromImage(apply_deformation(labels, field, is_label=True))
    original = sitk.GetArrayFromImage(labels)
    assert set(np.unique(warped)) == {0, 1, 2, 3, 4}
    assert 0.75 < _dice(warped == 1, original == 1) < 0.99


def test_atlas_set_layout_and_dataset_json(tmp_path):
    out = make_phantom_atlas_set(tmp_path / "phantoms", n_cases=3, seed=4, **SMALL)
    assert out == tmp_path / "phantoms"
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]
    names = [f"phantom_{i:03d}.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == names
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == names

    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["modality"] == {"0": "MRI"}
    assert dataset["labels"] == {
        "0": "background",
        "1": "tissue",
        "2": "ventricles",
        "3": "deep nucleus",
        "4": "hippocampus",
    }
    assert dataset["numTraining"] == 3 and len(dataset["training"]) == 3
    assert dataset["training"][0] == {
        "image": "./imagesTr/phantom_000.nii.gz",
        "label": "./labelsTr/phantom_000.nii.gz",
    }
    assert dataset["name"] and dataset["description"]

    arrays = []
    for entry in dataset["training"]:
        image = sitk.ReadImage(str(out / entry["image"]))
        labels = sitk.ReadImage(str(out / entry["label"]))
        assert image.GetPixelID() == sitk.sitkFloat32 and labels.GetPixelID() == sitk.sitkUInt8
        assert image.GetSize() == labels.GetSize() == (24, 28, 24)
        np.testing.assert_allclose(labels.GetSpacing(), (2.0, 2.0, 2.0))
        arrays.append(sitk.GetArrayFromImage(labels))
    assert not np.array_equal(arrays[0], arrays[1])  # distinct subjects


def test_atlas_set_refuses_to_overwrite(tmp_path):
    out = tmp_path / "set"
    make_phantom_atlas_set(out, n_cases=3, **SMALL)
    with pytest.raises(FileExistsError, match="set"):
        make_phantom_atlas_set(out, n_cases=2, **SMALL)
    assert len(list((out / "imagesTr").iterdir())) == 3  # untouched

    (out / "notes.txt").write_text("keep me")
    make_phantom_atlas_set(out, n_cases=2, overwrite=True, **SMALL)
    assert len(list((out / "imagesTr").iterdir())) == 2  # stale cases removed
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2
    assert (out / "notes.txt").read_text() == "keep me"

    other = tmp_path / "other"
    other.mkdir()
    (other / "file.txt").write_text("x")
    with pytest.raises(FileExistsError, match="other"):
        make_phantom_atlas_set(other, n_cases=1, **SMALL)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_phantom_atlas_set(empty, n_cases=1, **SMALL) == empty  # an empty folder is fine
