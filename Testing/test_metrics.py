"""Tests for atlasseg.metrics: known overlap values, distances in mm, conventions, I/O."""

from __future__ import annotations

import csv
import json
import math
import time

import numpy as np
import pytest
import SimpleITK as sitk

from atlasseg.metrics import (
    CSV_COLUMNS,
    METRIC_NAMES,
    metrics_table,
    segmentation_metrics,
    surface_distances,
    write_metrics,
)


def _image(arr: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=None, direction=None) -> sitk.Image:
    """Label image from a (z, y, x) array; spacing/origin/direction in SimpleITK (x, y, z) order."""
    image = sitk.GetImageFromArray(np.asarray(arr))
    image.SetSpacing(spacing)
    if origin is not None:
        image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def _cube(shape, start, size, value=1, dtype=np.uint8) -> np.ndarray:
    arr = np.zeros(shape, dtype=dtype)
    arr[tuple(slice(s, s + size) for s in start)] = value
    return arr


def _ellipsoid(shape, centre_mm, radius_mm, spacing_xyz) -> np.ndarray:
    """Boolean (z, y, x) ball of radius ``radius_mm`` (physical) centred at ``centre_mm`` (x, y, z)."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    dist2 = (
        (x * spacing_xyz[0] - centre_mm[0]) ** 2
        + (y * spacing_xyz[1] - centre_mm[1]) ** 2
        + (z * spacing_xyz[2] - centre_mm[2]) ** 2
    )
    return dist2 <= radius_mm**2


def _cube_surface_points(start, size, spacing_zyx) -> np.ndarray:
    """Physical (mm) centres of the face voxels of an axis-aligned cube, computed analytically."""
    idx = np.stack(np.meshgrid(*[np.arange(s, s + size) for s in start], indexing="ij"), axis=-1).reshape(
        -1, 3
    )
    lo, hi = np.asarray(start), np.asarray(start) + size - 1
    on_face = np.any((idx == lo) | (idx == hi), axis=1)
    return idx[on_face] * np.asarray(spacing_zyx)


def _brute_force(points_a: np.ndarray, points_b: np.ndarray) -> tuple[float, float]:
    """HD95 (max of directed 95th percentiles) and ASSD by exhaustive pairwise distances."""
    d = np.sqrt(((points_a[:, None, :] - points_b[None, :, :]) ** 2).sum(-1))
    d_ab, d_ba = d.min(axis=1), d.min(axis=0)
    hd95 = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    return float(hd95), float((d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size))


def test_dice_jaccard_two_overlapping_cubes():
    ref = _cube((20, 20, 30), (5, 5, 5), 10)
    pred = _cube((20, 20, 30), (5, 5, 10), 10)  # shifted by 5 voxels along x: overlap 10*10*5
    result = segmentation_metrics(_image(pred), _image(ref))
    entry = result["labels"][1]
    assert entry["reference_voxels"] == 1000 and entry["predicted_voxels"] == 1000
    assert entry["dice"] == pytest.approx(0.5)
    assert entry["jaccard"] == pytest.approx(1.0 / 3.0)
    assert entry["sensitivity"] == pytest.approx(0.5)
    assert entry["precision"] == pytest.approx(0.5)
    assert entry["hd95"] == pytest.approx(5.0, abs=1e-5)  # the whole x-facing faces are 5 mm apart
    assert set(entry) == {"name", *METRIC_NAMES, "reference_voxels", "predicted_voxels"}
    assert result["mean"]["dice"] == pytest.approx(0.5)


def test_sensitivity_precision_nested_cubes():
    ref = _cube((20, 20, 20), (4, 4, 4), 10)  # 1000 voxels
    pred = _cube((20, 20, 20), (6, 6, 6), 5)  # 125 voxels, all inside the reference
    entry = segmentation_metrics(_image(pred), _image(ref))["labels"][1]
    assert entry["sensitivity"] == pytest.approx(0.125)
    assert entry["precision"] == pytest.approx(1.0)
    assert entry["dice"] == pytest.approx(250.0 / 1125.0)
    assert entry["jaccard"] == pytest.approx(125.0 / 1000.0)
    # swapping roles swaps sensitivity and precision
    swapped = segmentation_metrics(_image(ref), _image(pred))["labels"][1]
    assert swapped["sensitivity"] == pytest.approx(1.0) and swapped["precision"] == pytest.approx(0.125)
    assert swapped["hd95"] == pytest.approx(entry["hd95"]) and swapped["assd"] == pytest.approx(entry["assd"])


@pytest.mark.parametrize("axis_xyz, shift", [(0, 3), (1, 2), (2, 1), (2, 2)])
def test_hd95_shifted_sphere_anisotropic(axis_xyz, shift):
    spacing = (0.8, 1.1, 2.0)
    shape = (24, 40, 56)
    centre = [n * s / 2 for n, s in zip(shape[::-1], spacing, strict=True)]
    ref = _ellipsoid(shape, centre, 10.0, spacing).astype(np.uint8)
    pred = np.roll(ref, shift, axis=2 - axis_xyz)
    entry = segmentation_metrics(_image(pred, spacing), _image(ref, spacing))["labels"][1]
    expected = shift * spacing[axis_xyz]
    assert entry["hd95"] == pytest.approx(expected, rel=0.08)
    assert 0.2 * expected < entry["assd"] < 0.7 * expected


@pytest.mark.parametrize("axis_zyx, shift", [(0, 3), (2, 4), (1, 1)])
def test_hd95_assd_shifted_cube_exact(axis_zyx, shift):
    spacing_zyx = (2.5, 1.1, 0.7)
    start = [8, 8, 8]
    ref = _cube((30, 30, 30), start, 12)
    pred = np.roll(ref, shift, axis=axis_zyx)
    moved = list(start)
    moved[axis_zyx] += shift
    entry = segmentation_metrics(_image(pred, spacing_zyx[::-1]), _image(ref, spacing_zyx[::-1]))["labels"][1]
    expected_hd, expected_assd = _brute_force(
        _cube_surface_points(moved, 12, spacing_zyx), _cube_surface_points(start, 12, spacing_zyx)
    )
    assert expected_hd == pytest.approx(shift * spacing_zyx[axis_zyx])
    assert entry["hd95"] == pytest.approx(expected_hd, abs=1e-5)
    assert entry["assd"] == pytest.approx(expected_assd, abs=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_surface_distances_match_monai():
    torch = pytest.importorskip("torch")
    pytest.importorskip("scipy")  # MONAI's surface distances need scipy
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    rng = np.random.default_rng(3)
    shape, spacing_zyx = (26, 30, 34), (2.0, 0.9, 1.3)
    masks = []
    for _ in range(2):
        mask = np.zeros(shape, dtype=bool)
        for _ in range(6):  # union of random balls -> irregular, non-convex shapes
            centre = rng.uniform(0.3, 0.7, 3) * np.asarray(shape)[::-1] * np.asarray(spacing_zyx)[::-1]
            mask |= _ellipsoid(shape, centre, rng.uniform(4.0, 9.0), spacing_zyx[::-1])
        masks.append(mask)
    hd95, assd = surface_distances(masks[0], masks[1], spacing_zyx)

    def as_tensor(m):
        return torch.from_numpy(m)[None, None].float()

    ref_hd = compute_hausdorff_distance(
        as_tensor(masks[0]), as_tensor(masks[1]), percentile=95, spacing=spacing_zyx
    )
    ref_assd = compute_average_surface_distance(
        as_tensor(masks[0]), as_tensor(masks[1]), symmetric=True, spacing=spacing_zyx
    )
    assert hd95 == pytest.approx(float(ref_hd), abs=1e-4)
    assert assd == pytest.approx(float(ref_assd), abs=1e-4)
    hd100, _ = surface_distances(masks[0], masks[1], spacing_zyx, percentile=100)
    assert hd100 >= hd95 > 0


def test_structure_touching_image_border():
    ref = _cube((10, 10, 10), (0, 0, 0), 4)  # touches three array faces
    pred = _cube((10, 10, 10), (0, 0, 1), 4)
    entry = segmentation_metrics(_image(pred), _image(ref))["labels"][1]
    assert entry["dice"] == pytest.approx(0.75)
    assert entry["hd95"] == pytest.approx(1.0, abs=1e-5)


def test_empty_structure_conventions():
    ref = _cube((16, 16, 16), (2, 2, 2), 4, value=1)
    ref[10:14, 10:14, 10:14] = 2  # label 2 only in the reference
    pred = _cube((16, 16, 16), (2, 2, 2), 4, value=1)
    pred[10:13, 2:5, 10:13] = 3  # label 3 only in the prediction
    labels = {1: "a", 2: "missed", 3: "spurious", 4: "absent"}
    result = segmentation_metrics(_image(pred), _image(ref), labels)["labels"]

    assert result[1]["dice"] == 1.0 and result[1]["hd95"] == 0.0 and result[1]["assd"] == 0.0
    missed, spurious, absent = result[2], result[3], result[4]
    assert missed["dice"] == 0.0 and missed["jaccard"] == 0.0 and missed["sensitivity"] == 0.0
    assert math.isnan(missed["precision"]) and math.isnan(missed["hd95"]) and math.isnan(missed["assd"])
    assert spurious["dice"] == 0.0 and spurious["precision"] == 0.0
    assert math.isnan(spurious["sensitivity"]) and math.isnan(spurious["hd95"])
    assert (spurious["reference_voxels"], spurious["predicted_voxels"]) == (0, 27)
    assert absent["dice"] == 1.0 and absent["jaccard"] == 1.0 and absent["hd95"] == 0.0
    assert absent["sensitivity"] == 1.0 and absent["precision"] == 1.0
    assert absent["reference_voxels"] == 0 and absent["name"] == "absent"

    mean = segmentation_metrics(_image(pred), _image(ref), labels)["mean"]
    assert mean["dice"] == pytest.approx(0.5)  # (1 + 0 + 0 + 1) / 4
    assert mean["hd95"] == pytest.approx(0.0)  # nanmean over labels 1 and 4 only
    assert mean["sensitivity"] == pytest.approx(2.0 / 3.0)  # label 3 is NaN


def test_default_labels_and_background_excluded():
    ref = _cube((12, 12, 12), (1, 1, 1), 4, value=1)
    pred = np.zeros_like(ref)
    pred[6:9, 6:9, 6:9] = 2
    result = segmentation_metrics(_image(pred), _image(ref), labels={0: "background", 1: "one"})
    assert list(result["labels"]) == [1]
    assert list(segmentation_metrics(_image(pred), _image(ref))["labels"]) == [1, 2]


def test_non_contiguous_label_values():
    ref = np.zeros((20, 20, 20), dtype=np.uint16)
    ref[2:8, 2:8, 2:8] = 5
    ref[10:18, 10:18, 10:18] = 9
    pred = np.zeros_like(ref)
    pred[2:8, 2:8, 3:9] = 5  # shifted by one voxel along x
    pred[10:18, 10:18, 10:18] = 9
    result = segmentation_metrics(_image(pred), _image(ref))
    assert list(result["labels"]) == [5, 9]
    assert result["labels"][5]["name"] == "label_5"
    assert result["labels"][5]["dice"] == pytest.approx(180.0 / 216.0)  # overlap 6*6*5 of 216 each
    assert result["labels"][5]["hd95"] == pytest.approx(1.0, abs=1e-5)
    assert result["labels"][9]["dice"] == 1.0 and result["labels"][9]["assd"] == 0.0
    named = segmentation_metrics(_image(pred), _image(ref), {5: "five", 9: "nine"})
    assert [e["name"] for e in named["labels"].values()] == ["five", "nine"]
    from_json = segmentation_metrics(_image(pred), _image(ref), {"0": "background", "9": "nine"})
    assert list(from_json["labels"]) == [9] and from_json["labels"][9]["name"] == "nine"


def test_float_label_images_accepted_non_integer_rejected():
    ref = _cube((10, 10, 10), (2, 2, 2), 5, dtype=np.float32) * 3
    pred = _cube((10, 10, 10), (2, 2, 3), 5, dtype=np.float32) * 3
    entry = segmentation_metrics(_image(pred), _image(ref))["labels"][3]
    assert entry["dice"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="non-integer"):
        segmentation_metrics(_image(pred * 0.5), _image(ref))


@pytest.mark.parametrize(
    "change, word",
    [
        ({"spacing": (1.0, 1.0, 1.5)}, "spacing"),
        ({"origin": (0.0, 0.01, 0.0)}, "origin"),
        ({"direction": (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)}, "direction"),
    ],
)
def test_grid_mismatch_raises(change, word):
    arr = _cube((8, 8, 8), (2, 2, 2), 3)
    with pytest.raises(ValueError, match=word):
        segmentation_metrics(_image(arr, **change), _image(arr))


def test_grid_size_mismatch_and_tolerance():
    arr = _cube((8, 8, 8), (2, 2, 2), 3)
    with pytest.raises(ValueError, match="size"):
        segmentation_metrics(_image(arr[:, :, :7]), _image(arr))
    close = _image(arr, spacing=(1.0 + 5e-5, 1.0, 1.0), origin=(2e-5, 0.0, 0.0))
    assert segmentation_metrics(close, _image(arr))["labels"][1]["dice"] == 1.0


def _sample_result() -> dict:
    ref = _cube((16, 16, 16), (2, 2, 2), 6, value=1)
    ref[10:14, 10:14, 10:14] = 2
    pred = _cube((16, 16, 16), (2, 2, 3), 6, value=1)
    return segmentation_metrics(_image(pred, (1.0, 1.0, 2.0)), _image(ref, (1.0, 1.0, 2.0)), {1: "a", 2: "b"})


def test_write_json_round_trip(tmp_path):
    result = _sample_result()
    path = write_metrics(result, tmp_path / "sub" / "metrics.json")
    loaded = json.loads(path.read_text())
    assert set(loaded["labels"]) == {"1", "2"}
    for metric in METRIC_NAMES:
        assert loaded["labels"]["1"][metric] == pytest.approx(result["labels"][1][metric])
        assert loaded["mean"][metric] == pytest.approx(result["mean"][metric])
    assert loaded["labels"]["2"]["hd95"] is None  # NaN is written as null
    assert loaded["labels"]["2"]["reference_voxels"] == 64 and loaded["labels"]["1"]["name"] == "a"


def test_write_csv_round_trip(tmp_path):
    result = _sample_result()
    path = write_metrics(result, tmp_path / "metrics.CSV")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["label"] for r in rows] == ["1", "2", "mean"]
    for metric in METRIC_NAMES:
        assert float(rows[0][metric]) == pytest.approx(result["labels"][1][metric])
        assert float(rows[2][metric]) == pytest.approx(result["mean"][metric], nan_ok=True)
    assert math.isnan(float(rows[1]["hd95"]))
    assert int(rows[1]["reference_voxels"]) == 64 and rows[2]["reference_voxels"] == ""
    with pytest.raises(ValueError, match="suffix"):
        write_metrics(result, tmp_path / "metrics.txt")


def test_metrics_table_layout():
    rows = [
        {"case": "phantom_000", "method": "majority", "dice": 0.91234, "hd95": 1.5},
        {"case": "p1", "method": "staple", "dice": float("nan"), "hd95": 12.25, "n": 3},
    ]
    text = metrics_table(rows).splitlines()
    assert text[0].split() == ["case", "method", "dice", "hd95", "n"]
    assert set(text[1].replace(" ", "")) == {"-"}
    assert text[2].split() == ["phantom_000", "majority", "0.912", "1.500"]
    assert text[3].split() == ["p1", "staple", "nan", "12.250", "3"]
    assert len({len(line) for line in text[:2]}) == 1  # header and rule share the full width
    assert text[2].index("0.912") + len("0.912") == text[3].index("nan") + len("nan")  # right-aligned
    table = metrics_table([{"case": "x", **_sample_result()}], digits=2).splitlines()
    assert table[0].split() == ["case", *METRIC_NAMES]


def test_performance_fetal_sized_volume():
    shape, spacing = (155, 189, 135), (0.8, 0.8, 0.8)
    centre = np.array([135, 189, 155]) * 0.8 / 2
    ref = np.zeros(shape, dtype=np.uint8)
    pred = np.zeros(shape, dtype=np.uint8)
    for value in range(1, 9):
        offset = np.array([np.cos(value), np.sin(value), 0.3 * (value - 4.5)]) * 25.0
        radius = 6.0 + 2.0 * value
        ref[_ellipsoid(shape, centre + offset, radius, spacing)] = value
        pred[_ellipsoid(shape, centre + offset + [1.2, -0.8, 0.8], radius * 1.05, spacing)] = value
    start = time.perf_counter()
    result = segmentation_metrics(_image(pred, spacing), _image(ref, spacing))
    elapsed = time.perf_counter() - start
    assert len(result["labels"]) == 8
    assert all(0.6 < e["dice"] < 1.0 and 0.5 < e["hd95"] < 5.0 for e in result["labels"].values())
    assert elapsed < 15.0, f"segmentation_metrics took {elapsed:.1f} s"
