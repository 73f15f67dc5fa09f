"""Label fusion: the engine's one API, vectorised in torch (CPU or CUDA).

Conventions
-----------
* Inputs are torch tensors already on the target grid, on any device; outputs stay on that device.
  Spatial arrays are (Z, Y, X), SimpleITK's ``GetArrayFromImage`` order.
* ``target``: float (C, Z, Y, X), C modalities, each normalised to about [0, 1].
* ``atlas_images``: float (N, C, Z, Y, X); ``atlas_labels``: integer (N, Z, Y, X) label *values*.
* ``labels``: the label values, sorted, non-negative, including background 0; posterior channel l
  is ``labels[l]``. Atlas label values not in ``labels`` are an error.
* ``mask``: optional bool (Z, Y, X); outside it the result is background with posterior 1.

Methods (``fuse(method, ...)``, parameters as keywords)
-------------------------------------------------------
* ``"majority"``: one vote per atlas; ties go to the lowest label. Same map as SimpleITK's
  LabelVotingImageFilter except at ties, where that filter writes an "undecided" label.
  Params: ``decision``.
* ``"weighted"``: locally weighted voting (see :func:`atlasseg.fusion.voting.weighted_vote`).
  Params: ``sigma`` (2.0 voxels), ``similarity`` ("msd" | "ncc"), ``h`` (None = adaptive), ``eps``,
  ``power`` (ncc), ``decision``.
* ``"jlf"``: joint label fusion after ANTs antsJointFusion (see :mod:`atlasseg.fusion.jlf`).
  Params: ``alpha`` (0.1), ``beta`` (2.0), ``patch_radius`` (2), ``search_radius`` (3),
  ``metric`` ("pearson" | "msq"; "pearson" is antsJointFusion's default, while
  ``ants.joint_label_fusion`` uses "msq" unless ``usecor=True``), ``nonnegative`` (False),
  ``spacing`` (None = isotropic; orders the search offsets), ``skip_consensus`` (True),
  ``chunk_size`` (8192 centres per solve chunk), ``slab_size`` (None = automatic), ``decision``.
* ``"staple"``: SimpleITK MultiLabelSTAPLEImageFilter (see :mod:`atlasseg.fusion.staple`).
  Params: ``max_iterations``, ``termination_threshold``.

``decision`` (majority / weighted / jlf): ``"argmax"`` (default; ties to the lowest label, as
ANTs) or ``"antspyx"``: background unless the foreground posteriors together beat it, then the
best foreground label. This is what ``ants.joint_label_fusion(..., max_lab_plus_one=True)``
returns, useful for side-by-side comparisons.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..methods import fusion_method_names
from .jlf import JLF_PARAMS, joint_label_fusion
from .oracle import atlas_agreement, oracle_coverage
from .staple import STAPLE_PARAMS, staple_fusion
from .voting import WEIGHTED_PARAMS, ProgressFn, check_params, majority_vote, report, weighted_vote

__all__ = [
    "FusionResult",
    "METHODS",
    "fuse",
    "oracle_coverage",
    "atlas_agreement",
]


@dataclass
class FusionResult:
    segmentation: torch.Tensor  # (Z,Y,X) int64 label values
    posteriors: torch.Tensor  # (L,Z,Y,X) float32, sum to 1 over L
    atlas_weights: torch.Tensor | None  # (N,Z,Y,X) float32, sum to 1 over N; None for majority / STAPLE
    method: str
    labels: list[int]


METHODS = tuple(fusion_method_names())   # the registry's label fusion methods
_DECISIONS = ("argmax", "antspyx")


def _validate(target, atlas_images, atlas_labels, labels, mask):
    if not isinstance(atlas_labels, torch.Tensor):
        raise ValueError("atlas_labels must be a torch tensor of shape (N, Z, Y, X)")
    if atlas_labels.dim() != 4:
        raise ValueError(f"atlas_labels must have shape (N, Z, Y, X), got {tuple(atlas_labels.shape)}")
    if atlas_labels.is_floating_point() or atlas_labels.is_complex() or atlas_labels.dtype == torch.bool:
        raise ValueError(f"atlas_labels must hold integer label values, got dtype {atlas_labels.dtype}")
    n = atlas_labels.shape[0]
    if n < 1:
        raise ValueError("at least one atlas is needed (N >= 1)")
    spatial = tuple(atlas_labels.shape[1:])
    if min(spatial) < 1:
        raise ValueError(f"empty spatial shape {spatial}")
    dev = atlas_labels.device
    if target is not None:
        if not isinstance(target, torch.Tensor) or target.dim() != 4:
            raise ValueError(
                f"target must be a float tensor of shape (C, Z, Y, X), got {getattr(target, 'shape', type(target))}"
            )
        if not target.is_floating_point():
            raise ValueError(f"target must be a float tensor, got dtype {target.dtype}")
        if tuple(target.shape[1:]) != spatial:
            raise ValueError(f"target spatial shape {tuple(target.shape[1:])} != atlas label shape {spatial}")
        if target.device != dev:
            raise ValueError(f"target is on {target.device} but atlas_labels on {dev}")
    if atlas_images is not None:
        if not isinstance(atlas_images, torch.Tensor) or atlas_images.dim() != 5:
            raise ValueError(
                "atlas_images must be a float tensor of shape (N, C, Z, Y, X), got "
                f"{getattr(atlas_images, 'shape', type(atlas_images))}"
            )
        if not atlas_images.is_floating_point():
            raise ValueError(f"atlas_images must be a float tensor, got dtype {atlas_images.dtype}")
        if atlas_images.shape[0] != n:
            raise ValueError(f"{atlas_images.shape[0]} atlas images but {n} atlas label maps")
        if tuple(atlas_images.shape[2:]) != spatial:
            raise ValueError(f"atlas_images spatial shape {tuple(atlas_images.shape[2:])} != {spatial}")
        if target is not None and atlas_images.shape[1] != target.shape[0]:
            raise ValueError(f"atlas_images have {atlas_images.shape[1]} modalities but target has {target.shape[0]}")
        if atlas_images.device != dev:
            raise ValueError(f"atlas_images are on {atlas_images.device} but atlas_labels on {dev}")
    try:
        lab_list = [int(v) for v in labels]
    except (TypeError, ValueError):
        raise ValueError(f"labels must be a sequence of integers, got {labels!r}") from None
    if any(float(v) != float(w) for v, w in zip(lab_list, labels, strict=True)):
        raise ValueError(f"labels must be integers, got {list(labels)!r}")
    if not lab_list or 0 not in lab_list:
        raise ValueError(f"labels must include background 0, got {lab_list}")
    if lab_list != sorted(set(lab_list)) or lab_list[0] < 0:
        raise ValueError(f"labels must be sorted, unique and non-negative, got {lab_list}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != spatial:
            raise ValueError(f"mask must be a bool tensor of shape {spatial}, got {getattr(mask, 'shape', None)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        if mask.device != dev:
            raise ValueError(f"mask is on {mask.device} but atlas_labels on {dev}")
    return lab_list


def labels_to_index(atlas_labels: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """Map label values to indices 0..L-1 (int32, half the memory of int64; usable as an index);
    ValueError for values not in ``labels``."""
    lab_t = torch.tensor(list(labels), dtype=torch.int64, device=atlas_labels.device)
    out = torch.empty(atlas_labels.shape, dtype=torch.int32, device=atlas_labels.device)
    for i in range(atlas_labels.shape[0]):  # one atlas at a time keeps memory bounded
        v = atlas_labels[i].long()
        idx = torch.searchsorted(lab_t, v).clamp_max(lab_t.numel() - 1)
        bad = lab_t[idx] != v
        if bool(bad.any()):
            found = sorted(torch.unique(v[bad]).tolist())[:10]
            raise ValueError(f"atlas {i} holds label values {found} that are not in labels={list(labels)}")
        out[i] = idx
    return out


def _decide(post: torch.Tensor, decision: str) -> torch.Tensor:
    if decision == "argmax":
        return post.argmax(0)  # first maximum: ties go to the lowest label
    if post.shape[0] == 1:
        return torch.zeros(post.shape[1:], dtype=torch.long, device=post.device)
    fg = post[1:]
    best_fg = fg.argmax(0) + 1
    is_fg = fg.sum(0) > post[0]
    return torch.where(is_fg, best_fg, torch.zeros_like(best_fg))


def fuse(
    method: str,
    target: torch.Tensor | None,
    atlas_images: torch.Tensor | None,
    atlas_labels: torch.Tensor,
    labels: Sequence[int],
    mask: torch.Tensor | None = None,
    progress: ProgressFn = None,
    **params,
) -> FusionResult:
    """Fuse N warped atlas label maps into one segmentation of the target.

    ``target`` and ``atlas_images`` may be None for "majority" and "staple". See the module
    docstring for the methods and their parameters. Raises ValueError for an unknown method,
    unknown or invalid parameters and inconsistent inputs.
    """
    if method not in METHODS:
        raise ValueError(f"unknown fusion method {method!r}; choose one of {', '.join(METHODS)}")
    if progress is not None and not callable(progress):
        raise ValueError("progress must be a callable(fraction, message) or None")
    needs_images = method in ("weighted", "jlf")
    if needs_images and (target is None or atlas_images is None):
        raise ValueError(f"method {method!r} needs the target and the atlas images")
    lab_list = _validate(
        target if needs_images else None, atlas_images if needs_images else None, atlas_labels, labels, mask
    )
    decision = params.pop("decision", "argmax") if method != "staple" else "argmax"
    if decision not in _DECISIONS:
        raise ValueError(f"decision must be one of {_DECISIONS}, got {decision!r}")
    allowed = {"majority": (), "weighted": WEIGHTED_PARAMS, "jlf": JLF_PARAMS, "staple": STAPLE_PARAMS}[method]
    check_params(method, params, allowed)

    nl = len(lab_list)
    with torch.no_grad():
        lab_idx = labels_to_index(atlas_labels, lab_list)
        weights = None
        seg_idx = None
        if method == "majority":
            post = majority_vote(lab_idx, nl)
            report(progress, 1.0, "majority voting done")
        elif method == "weighted":
            post, weights = weighted_vote(target, atlas_images, lab_idx, nl, progress=progress, **params)
        elif method == "jlf":
            post, weights = joint_label_fusion(
                target, atlas_images, lab_idx, nl, mask=mask, progress=progress, **params
            )
        else:
            seg_idx, post = staple_fusion(lab_idx, nl, progress=progress, **params)
        del lab_idx
        if seg_idx is None:
            seg_idx = _decide(post, decision)
        if mask is not None:
            outside = ~mask
            seg_idx = seg_idx.masked_fill(outside, 0)
            post = post.masked_fill(outside.unsqueeze(0), 0.0)
            post[0].masked_fill_(outside, 1.0)
        lab_t = torch.tensor(lab_list, dtype=torch.int64, device=post.device)
        segmentation = lab_t[seg_idx]
    return FusionResult(
        segmentation=segmentation,
        posteriors=post.to(torch.float32),
        atlas_weights=None if weights is None else weights.to(torch.float32),
        method=method,
        labels=lab_list,
    )
