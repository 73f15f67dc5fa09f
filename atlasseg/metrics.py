"""Segmentation metrics in physical units for label images.

All functions take SimpleITK label images. Overlap metrics (Dice, Jaccard, sensitivity, precision)
are unitless; surface-distance metrics (HD95, ASSD) are in millimetres and honour anisotropic voxel
spacing. Arrays extracted from SimpleITK images are indexed ``(z, y, x)``, so the spacing passed to
the distance computation is reversed accordingly.

Conventions for empty structures (per label value):

* reference and prediction both empty: Dice = Jaccard = sensitivity = precision = 1, HD95 = ASSD = 0.
* exactly one of them empty: Dice = Jaccard = 0, HD95 = ASSD = NaN. The ratio whose denominator is
  zero is NaN too (sensitivity when the reference is empty, precision when the prediction is empty),
  the other one is 0.

The ``"mean"`` entry of a result averages with ``nanmean``, i.e. NaN values are skipped (a mean is NaN
only when every label is NaN for that metric).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

__all__ = ["METRIC_NAMES", "metrics_table", "segmentation_metrics", "write_metrics"]

METRIC_NAMES = ("dice", "jaccard", "hd95", "assd", "sensitivity", "precision")
"""Metric keys reported per label and in the ``"mean"`` entry, in display order."""

GRID_TOLERANCE = 1e-4
"""Absolute tolerance for comparing origin (mm), spacing (mm) and direction cosines."""

_COUNT_NAMES = ("reference_voxels", "predicted_voxels")


def check_same_grid(prediction: sitk.Image, reference: sitk.Image, tol: float = GRID_TOLERANCE) -> None:
    """Raise ``ValueError`` unless both images share the same physical voxel grid.

    Args:
        prediction: first image.
        reference: second image.
        tol: absolute tolerance for origin (mm), spacing (mm) and direction cosines.

    Raises:
        ValueError: naming the first property that differs (dimension, size, spacing, origin, direction).
    """
    if prediction.GetDimension() != reference.GetDimension():
        raise ValueError(
            f"Image dimension mismatch: prediction {prediction.GetDimension()}D, "
            f"reference {reference.GetDimension()}D."
        )
    if prediction.GetSize() != reference.GetSize():
        raise ValueError(
            f"Image size mismatch: prediction {prediction.GetSize()}, reference {reference.GetSize()}."
        )
    for name in ("spacing", "origin", "direction"):
        getter = f"Get{name.capitalize()}"
        a = np.asarray(getattr(prediction, getter)(), dtype=float)
        b = np.asarray(getattr(reference, getter)(), dtype=float)
        if not np.allclose(a, b, rtol=0.0, atol=tol):
            raise ValueError(
                f"Image {name} mismatch (tolerance {tol}): prediction {tuple(a.round(6))}, "
                f"reference {tuple(b.round(6))}."
            )


def _label_array(image: sitk.Image, role: str) -> np.ndarray:
    """Return the label values of ``image`` as a non-negative integer array of shape (z, y, x)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"The {role} must be a scalar label image, got a vector image.")
    arr = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(arr.dtype, np.integer):
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise ValueError(f"The {role} has non-integer voxel values; expected a label image.")
        arr = rounded.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"The {role} has negative label values; expected non-negative labels.")
    return arr


def _ratio(num: float, den: float) -> float:
    """``num / den`` with NaN for a zero denominator."""
    return float(num) / float(den) if den > 0 else math.nan


def overlap_metrics(true_positive: int, reference_voxels: int, predicted_voxels: int) -> dict[str, float]:
    """Dice, Jaccard, sensitivity and precision from voxel counts (see module conventions for empties).

    Args:
        true_positive: number of voxels labelled in both prediction and reference.
        reference_voxels: number of voxels labelled in the reference.
        predicted_voxels: number of voxels labelled in the prediction.

    Returns:
        ``{"dice", "jaccard", "sensitivity", "precision"}`` as floats in [0, 1] (or NaN).
    """
    if reference_voxels == 0 and predicted_voxels == 0:
        return {"dice": 1.0, "jaccard": 1.0, "sensitivity": 1.0, "precision": 1.0}
    union = reference_voxels + predicted_voxels - true_positive
    return {
        "dice": 2.0 * true_positive / (reference_voxels + predicted_voxels),
        "jaccard": true_positive / union,
        "sensitivity": _ratio(true_positive, reference_voxels),
        "precision": _ratio(true_positive, predicted_voxels),
    }


def _bounding_box(*masks: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Bounding box (slices) of the union of non-empty boolean ``masks``, grown by ``margin`` voxels."""
    union = np.logical_or.reduce(masks)
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, union.shape[axis])))
    return tuple(box)


def mask_surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a boolean mask: voxels with at least one face neighbour outside the mask.

    Voxels on the array border count as surface (the outside of the array is background).

    Args:
        mask: boolean array of any dimension.

    Returns:
        Boolean array of the same shape.
    """
    padded = np.pad(mask, 1, constant_values=False)
    interior = mask.copy()
    for axis in range(mask.ndim):
        for shift in (0, 2):
            index = [slice(1, -1)] * mask.ndim
            index[axis] = slice(shift, shift + mask.shape[axis])
            interior &= padded[tuple(index)]
    return mask & ~interior


def _distance_to(surface: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Exact Euclidean distance (mm) of every voxel to the nearest ``True`` voxel centre of ``surface``.

    Args:
        surface: non-empty boolean array (z, y, x) or (y, x).
        spacing: voxel size in mm along the array axes.

    Returns:
        float32 array of the same shape.
    """
    image = sitk.GetImageFromArray(surface.astype(np.uint8))
    image.SetSpacing([float(s) for s in reversed(spacing)])
    distance = sitk.SignedMaurerDistanceMap(
        image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    # Every surface voxel touches the background, so it is on the map's zero contour; clip rounding noise.
    return np.maximum(sitk.GetArrayViewFromImage(distance), 0.0)


def surface_distances(
    prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float], percentile: float = 95.0
) -> tuple[float, float]:
    """Percentile Hausdorff distance and average symmetric surface distance of two binary masks.

    Surfaces are given by :func:`mask_surface`; distances are exact Euclidean distances between
    surface-voxel centres (SimpleITK Maurer distance map on the cropped union bounding box). The
    Hausdorff percentile follows MONAI's ``compute_hausdorff_distance``: the larger of the two directed
    ``percentile``-th percentiles. ASSD is the mean of the distances pooled from both directions, as in
    MONAI's ``compute_average_surface_distance(symmetric=True)``.

    Args:
        prediction: boolean array, e.g. (z, y, x).
        reference: boolean array of the same shape.
        spacing: voxel size in mm along the array axes, i.e. ``image.GetSpacing()[::-1]``.
        percentile: percentile for the Hausdorff distance (95 gives HD95, 100 the classic HD).

    Returns:
        ``(hd, assd)`` in mm; ``(0, 0)`` when both masks are empty and ``(nan, nan)`` when one is.
    """
    prediction, reference = np.asarray(prediction, dtype=bool), np.asarray(reference, dtype=bool)
    if prediction.shape != reference.shape:
        raise ValueError(f"Mask shapes differ: {prediction.shape} vs {reference.shape}.")
    has_pred, has_ref = bool(prediction.any()), bool(reference.any())
    if not (has_pred or has_ref):
        return 0.0, 0.0
    if has_pred != has_ref:
        return math.nan, math.nan
    box = _bounding_box(prediction, reference)
    surf_pred, surf_ref = mask_surface(prediction[box]), mask_surface(reference[box])
    d_pred = _distance_to(surf_ref, spacing)[surf_pred].astype(np.float64)  # prediction -> reference
    d_ref = _distance_to(surf_pred, spacing)[surf_ref].astype(np.float64)  # reference -> prediction
    hd = max(float(np.percentile(d_pred, percentile)), float(np.percentile(d_ref, percentile)))
    assd = float((d_pred.sum() + d_ref.sum()) / (d_pred.size + d_ref.size))
    return hd, assd


def nan_mean(values: Sequence[float]) -> float:
    """Mean ignoring NaN; NaN (without a warning) if nothing is left."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def segmentation_metrics(
    prediction: sitk.Image, reference: sitk.Image, labels: Mapping[int, str] | None = None
) -> dict[str, Any]:
    """Per-label overlap and surface-distance metrics of a predicted label image against a reference.

    Args:
        prediction: predicted label image (integer labels, 0 = background).
        reference: reference label image on the same physical grid (size, origin, spacing, direction
            within ``GRID_TOLERANCE``).
        labels: label value -> name (keys may be numeric strings, as in a ``dataset.json``). Value 0 is
            always skipped. Default: every non-zero value present in the reference or the prediction,
            named ``"label_<value>"``. Labels are reported in the order given.

    Returns:
        ``{"labels": {value: {"name", "dice", "jaccard", "hd95", "assd", "sensitivity", "precision",
        "reference_voxels", "predicted_voxels"}}, "mean": {metric: nanmean over labels}}``; HD95 and ASSD
        in mm. Empty-structure conventions are described in the module docstring.

    Raises:
        ValueError: if the grids differ (naming the property) or an image is not an integer label image.
    """
    check_same_grid(prediction, reference)
    pred = _label_array(prediction, "prediction")
    ref = _label_array(reference, "reference")
    spacing_zyx = tuple(float(s) for s in reversed(reference.GetSpacing()))

    if labels is None:
        values = np.union1d(np.unique(pred), np.unique(ref))
        names = {int(v): f"label_{int(v)}" for v in values if v > 0}
    else:  # keys may also be numpy integers or numeric strings (e.g. from a dataset.json)
        names = {int(k): str(v) for k, v in labels.items() if int(k) > 0}
    label_values = list(names)

    length = max([int(pred.max(initial=0)), int(ref.max(initial=0))] + label_values) + 1
    ref_counts = np.bincount(ref.ravel(), minlength=length)
    pred_counts = np.bincount(pred.ravel(), minlength=length)
    agree = pred == ref
    tp_counts = np.bincount(ref[agree].ravel(), minlength=length)
    del agree

    per_label: dict[int, dict[str, Any]] = {}
    for value in label_values:
        n_ref, n_pred, tp = int(ref_counts[value]), int(pred_counts[value]), int(tp_counts[value])
        entry: dict[str, Any] = {"name": names[value]}
        entry.update(overlap_metrics(tp, n_ref, n_pred))
        if n_ref and n_pred:
            pred_mask, ref_mask = pred == value, ref == value
            box = _bounding_box(pred_mask, ref_mask)
            entry["hd95"], entry["assd"] = surface_distances(pred_mask[box], ref_mask[box], spacing_zyx)
        else:
            entry["hd95"], entry["assd"] = (0.0, 0.0) if n_ref == n_pred else (math.nan, math.nan)
        entry["reference_voxels"], entry["predicted_voxels"] = n_ref, n_pred
        per_label[value] = {k: entry[k] for k in ("name", *METRIC_NAMES, *_COUNT_NAMES)}

    mean = {m: nan_mean([float(e[m]) for e in per_label.values()]) for m in METRIC_NAMES}
    return {"labels": per_label, "mean": mean}


def _flatten_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Scalar entries of ``row``; a :func:`segmentation_metrics` result contributes its ``"mean"`` metrics."""
    flat = {str(k): v for k, v in row.items() if not isinstance(v, Mapping)}
    if isinstance(row.get("mean"), Mapping):
        flat.update({str(k): v for k, v in row["mean"].items()})
    return flat


def _is_number(value: Any) -> bool:
    """True for int/float/numpy numbers (bool excluded)."""
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def _format_cell(value: Any, digits: int) -> str:
    """Text of one table cell: floats with ``digits`` decimals, NaN as ``nan``, None as empty."""
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{float(value):.{digits}f}"
    return str(value)


def metrics_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 3
) -> str:
    """Format metric rows (one per case, method, label...) as a fixed-width text table.

    Each row is a flat mapping such as ``{"case": "phantom_001", "method": "majority", "dice": 0.91}``.
    A :func:`segmentation_metrics` result can be used (or merged into a row) directly: its ``"mean"``
    metrics become columns and its nested ``"labels"`` entry is ignored.

    Args:
        rows: the rows; missing values are left blank.
        columns: column order; default is the order in which keys first appear across rows.
        digits: decimals for floating-point values.

    Returns:
        The table as a string: header line, dashed rule, one line per row (no trailing newline).
        Numbers are right-aligned, text left-aligned, columns separated by two spaces.
    """
    flat_rows = [_flatten_row(r) for r in rows]
    if columns is None:
        columns = list(dict.fromkeys(k for r in flat_rows for k in r))
    cells = [[_format_cell(r.get(c), digits) for c in columns] for r in flat_rows]
    numeric = [all(_is_number(r.get(c)) or r.get(c) is None for r in flat_rows) for c in columns]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]

    def join(items: Sequence[str]) -> str:
        parts = [t.rjust(w) if num else t.ljust(w) for t, w, num in zip(items, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    lines = [join(list(columns)), "  ".join("-" * w for w in widths)]
    lines += [join(line) for line in cells]
    return "\n".join(lines)


def _json_value(value: Any) -> Any:
    """Convert numpy scalars to Python and NaN to ``None`` (strict JSON has no NaN)."""
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


CSV_COLUMNS = ("label", "name", *METRIC_NAMES, *_COUNT_NAMES)
"""Column order of the CSV written by :func:`write_metrics`."""


def write_metrics(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write a :func:`segmentation_metrics` result to ``.json`` or ``.csv`` (chosen by the suffix).

    JSON keeps the result structure, with label values as string keys and NaN written as ``null``.
    CSV has the columns :data:`CSV_COLUMNS`, one row per label plus a final row whose ``label`` and
    ``name`` are ``"mean"`` (voxel counts left blank); NaN is written as ``nan``. Parent folders are
    created.

    Args:
        result: output of :func:`segmentation_metrics`.
        path: destination file; suffix ``.json`` or ``.csv`` (case-insensitive).

    Returns:
        The written path.

    Raises:
        ValueError: for any other suffix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise ValueError(f"Unsupported metrics file suffix {path.suffix!r} for {path}; use .json or .csv.")
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = result["labels"]
    if suffix == ".json":
        payload = {
            "labels": {str(v): {k: _json_value(x) for k, x in e.items()} for v, e in labels.items()},
            "mean": {k: _json_value(x) for k, x in result["mean"].items()},
        }
        path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        return path
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for value, entry in labels.items():
            writer.writerow({"label": value, **{k: entry.get(k) for k in CSV_COLUMNS[1:]}})
        writer.writerow({"label": "mean", "name": "mean", **{m: result["mean"][m] for m in METRIC_NAMES}})
    return path
