"""Multi-label STAPLE through SimpleITK's MultiLabelSTAPLEImageFilter.

The label maps are handed to SimpleITK as label indices 0..L-1 (uint16). Voxels the filter leaves
undecided (a tie between labels, or no label with a non-zero probability) get the majority-voting
label (ties to the lowest label index).

Posteriors: the filter returns only the label map, but also its final per-atlas confusion matrices
theta_k[observed, true] (shape (T+1, T), T = largest index present + 1); the label priors are the
label frequencies over all atlases and voxels, as the filter estimates them. The posteriors are
recomputed from these exactly as the filter's last E-step does: p(l | x) proportional to
prior_l * prod_k theta_k[label_k(x), l], normalised over labels, in the log domain. Their arg-max
is the filter's label wherever the filter decided. Where every product is 0 (undecided voxels of
that kind) the posterior is the one-hot of the label actually assigned.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from .voting import ProgressFn, majority_vote, positive_float, report

STAPLE_PARAMS = ("max_iterations", "termination_threshold")


def staple_fusion(
    label_index: torch.Tensor,
    num_labels: int,
    max_iterations: int | None = None,
    termination_threshold: float = 1e-5,
    progress: ProgressFn = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (segmentation label indices (Z, Y, X) int64, posteriors (L, Z, Y, X) float32)."""
    if num_labels > 65535:
        raise ValueError("STAPLE supports at most 65535 labels")
    termination_threshold = positive_float(termination_threshold, "termination_threshold")
    if max_iterations is not None:
        if isinstance(max_iterations, bool) or int(max_iterations) != max_iterations or max_iterations < 1:
            raise ValueError(f"max_iterations must be a positive integer, got {max_iterations!r}")
    dev = label_index.device
    n = label_index.shape[0]
    spatial = tuple(label_index.shape[1:])
    lab_np = label_index.detach().to("cpu").numpy().astype(np.uint16)
    images = [sitk.GetImageFromArray(lab_np[i]) for i in range(n)]
    undecided = num_labels
    f = sitk.MultiLabelSTAPLEImageFilter()
    f.SetLabelForUndecidedPixels(undecided)
    f.SetTerminationUpdateThreshold(termination_threshold)
    if max_iterations is not None:
        f.SetMaximumNumberOfIterations(int(max_iterations))
    report(progress, 0.05, "STAPLE: running SimpleITK MultiLabelSTAPLEImageFilter")
    out = sitk.GetArrayFromImage(f.Execute(images)).astype(np.int64)
    report(progress, 0.8, "STAPLE: posteriors")

    t = int(lab_np.max()) + 1  # labels the filter knows about
    cms = []
    for k in range(n):
        cm = np.asarray(f.GetConfusionMatrix(k), dtype=np.float64)
        if cm.size != (t + 1) * t:
            raise RuntimeError(f"unexpected STAPLE confusion matrix size {cm.size} for {t} labels")
        cms.append(cm.reshape(t + 1, t))
    # the filter's own prior (not exposed by SimpleITK unless set by the user): label frequency
    # over all atlases and voxels
    counts = np.bincount(lab_np.reshape(-1), minlength=t)[:t].astype(np.float64)
    prior = counts / counts.sum()

    with np.errstate(divide="ignore"):
        log_cm = torch.from_numpy(np.log(np.stack(cms))).to(dev)  # (N, T+1, T)
        log_prior = torch.from_numpy(np.log(prior)).to(dev)  # (T,)
    logp = log_prior.view(t, *([1] * len(spatial))).expand((t,) + spatial).clone()
    for k in range(n):
        logp += log_cm[k][label_index[k].long()].movedim(-1, 0)  # (T, Z, Y, X)
    decided_any = torch.isfinite(logp).any(0)
    mx = logp.max(0, keepdim=True).values
    p = torch.exp(logp - torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)))
    p = p / p.sum(0, keepdim=True).clamp_min(1e-300)
    post = torch.zeros((num_labels,) + spatial, dtype=torch.float32, device=dev)
    post[:t] = torch.nan_to_num(p, nan=0.0).to(torch.float32)

    seg = torch.from_numpy(out).to(dev)
    und = seg == undecided
    if bool(und.any()):
        mv = majority_vote(label_index, num_labels).argmax(0)  # ties: lowest label index
        seg = torch.where(und, mv, seg)
    # voxels without any finite product: posterior = one-hot of the assigned label
    onehot = torch.nn.functional.one_hot(seg, num_labels).movedim(-1, 0).to(torch.float32)
    post = torch.where(decided_any.unsqueeze(0), post, onehot)
    report(progress, 1.0, "STAPLE: done")
    return seg, post
