"""Majority voting, locally weighted voting and helpers shared by all fusion methods.

Every function here works on torch tensors on any device and keeps the result on that device.
Label maps are handled as label *indices* (0..L-1, position in the sorted ``labels`` list); the
public :func:`atlasseg.fusion.fuse` maps values to indices and back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

ProgressFn = Callable[[float, str], None] | None


# ----------------------------------------------------------------------------------------------
# helpers shared by the fusion modules
# ----------------------------------------------------------------------------------------------
def check_params(method: str, params: dict, allowed: Sequence[str]) -> None:
    """Raise ValueError naming the offending keys when ``params`` holds keys not in ``allowed``."""
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) for method {method!r}: {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(allowed)) or '(none)'}"
        )


def as_triple(value, name: str, minimum: int = 0) -> tuple[int, int, int]:
    """An int or a sequence of 3 ints (z, y, x) as a tuple of 3 ints >= ``minimum``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or 3 ints, got {value!r}")
    if isinstance(value, int):
        vals = (value, value, value)
    else:
        try:
            vals = tuple(value)
        except TypeError:
            raise ValueError(f"{name} must be an int or 3 ints, got {value!r}") from None
        if len(vals) != 3:
            raise ValueError(f"{name} must be an int or 3 ints (z, y, x), got {value!r}")
    out = []
    for v in vals:
        if isinstance(v, bool) or int(v) != v:
            raise ValueError(f"{name} must hold integers, got {value!r}")
        if int(v) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
        out.append(int(v))
    return out[0], out[1], out[2]


def positive_float(value, name: str, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v


def report(progress: ProgressFn, fraction: float, message: str) -> None:
    if progress is not None:
        progress(float(min(max(fraction, 0.0), 1.0)), message)


def one_hot_counts(label_index: torch.Tensor, num_labels: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over atlases of (weighted) one-hot votes.

    label_index: (N, *S) integer in 0..L-1; weights: (N, *S) float or None (one vote each).
    Returns (L, *S) float32. Memory stays at O(L * S): atlases are added one at a time.
    """
    n = label_index.shape[0]
    spatial = label_index.shape[1:]
    votes = torch.zeros((num_labels,) + tuple(spatial), dtype=torch.float32, device=label_index.device)
    flat = votes.view(num_labels, -1)
    for i in range(n):
        idx = label_index[i].reshape(1, -1).long()
        if weights is None:
            src = torch.ones(idx.shape, dtype=torch.float32, device=idx.device)
        else:
            src = weights[i].reshape(1, -1).to(torch.float32)
        flat.scatter_add_(0, idx, src)
    return votes


def gaussian_kernel1d(sigma: float, device, dtype=torch.float32) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def gaussian_smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, Z, Y, X) with zero padding (not normalised at borders)."""
    k = gaussian_kernel1d(sigma, x.device, x.dtype)
    r = (k.numel() - 1) // 2
    y = x.unsqueeze(1)  # (B,1,Z,Y,X)
    y = F.conv3d(y, k.view(1, 1, -1, 1, 1), padding=(r, 0, 0))
    y = F.conv3d(y, k.view(1, 1, 1, -1, 1), padding=(0, r, 0))
    y = F.conv3d(y, k.view(1, 1, 1, 1, -1), padding=(0, 0, r))
    return y.squeeze(1)


class _NormalisedGaussian:
    """Gaussian window average that is renormalised near the image border (mean over the inside)."""

    def __init__(self, spatial: Sequence[int], sigma: float, device):
        self.sigma = sigma
        ones = torch.ones((1,) + tuple(spatial), device=device, dtype=torch.float32)
        self.norm = gaussian_smooth(ones, sigma).clamp_min(1e-12)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, Z, Y, X)
        return gaussian_smooth(x, self.sigma) / self.norm


# ----------------------------------------------------------------------------------------------
# majority voting
# ----------------------------------------------------------------------------------------------
def majority_vote(label_index: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Each atlas one vote. Returns posteriors (L, Z, Y, X) = vote fractions (sum to 1).

    The caller takes the arg-max with ties going to the lowest label index. SimpleITK's
    LabelVotingImageFilter gives the same map except at ties, where it writes an "undecided" label.
    """
    votes = one_hot_counts(label_index, num_labels)
    return votes / float(label_index.shape[0])


# ----------------------------------------------------------------------------------------------
# locally weighted voting
# ----------------------------------------------------------------------------------------------
WEIGHTED_PARAMS = ("sigma", "similarity", "h", "eps", "power")


def weighted_vote(
    target: torch.Tensor,
    atlas_images: torch.Tensor,
    label_index: torch.Tensor,
    num_labels: int,
    sigma: float = 2.0,
    similarity: str = "msd",
    h: float | None = None,
    eps: float = 1e-6,
    power: float = 2.0,
    progress: ProgressFn = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Locally weighted voting (Artaechevarria et al. 2009; Sabuncu et al. 2010 style).

    For atlas i at voxel x, with a Gaussian window G (std ``sigma`` voxels, renormalised at the
    image border) and intensities averaged over the C modalities:

    * ``similarity="msd"``: LMSD_i = G * mean_c (T_c - A_ic)^2 and w_i = exp(-LMSD_i / h(x)).
      ``h=None`` (default) adapts per voxel: h(x) = min_j LMSD_j(x) + eps, so the best-matching
      atlas always gets exp(-m/(m+eps)) ~ 1/e and an atlas with twice its error gets ~1/e^2: the
      weighting depends on how much worse an atlas is than the best one, not on the intensity
      scale. A float ``h`` uses that fixed bandwidth instead.
    * ``similarity="ncc"``: LNCC_i = local Pearson correlation in the window (averaged over
      modalities) and w_i = max(LNCC_i, 0) ** power. Where every weight is 0 all atlases count
      equally.

    Returns posteriors (L, Z, Y, X) = normalised weighted votes, and the atlas weights (N, Z, Y, X)
    normalised to sum to 1 over atlases.
    """
    if similarity not in ("msd", "ncc"):
        raise ValueError(f"similarity must be 'msd' or 'ncc', got {similarity!r}")
    sigma = positive_float(sigma, "sigma")
    eps = positive_float(eps, "eps")
    power = positive_float(power, "power")
    if h is not None:
        h = positive_float(h, "h")
    n = atlas_images.shape[0]
    spatial = target.shape[1:]
    g = _NormalisedGaussian(spatial, sigma, target.device)
    t = target.to(torch.float32)
    scores = torch.empty((n,) + tuple(spatial), dtype=torch.float32, device=target.device)
    if similarity == "ncc":
        mt = g(t)
        vt = (g(t * t) - mt * mt).clamp_min(0)
    for i in range(n):
        a = atlas_images[i].to(torch.float32)
        if similarity == "msd":
            scores[i] = g(((t - a) ** 2).mean(0, keepdim=True))[0]
        else:
            ma = g(a)
            va = (g(a * a) - ma * ma).clamp_min(0)
            cov = g(t * a) - mt * ma
            ncc = cov / torch.sqrt(vt * va + 1e-12)
            scores[i] = ncc.clamp(-1, 1).mean(0)
        report(progress, (i + 1) / n, f"weighted voting: similarity of atlas {i + 1}/{n}")
    if similarity == "msd":
        best = scores.min(0).values
        bandwidth = best + eps if h is None else torch.full_like(best, h)
        weights = torch.exp(-(scores - best) / bandwidth)  # shifting by the minimum cancels on normalising
    else:
        weights = scores.clamp_min(0) ** power
    total = weights.sum(0)
    weights = torch.where(total > 0, weights / total.clamp_min(1e-30), torch.full_like(weights, 1.0 / n))
    votes = one_hot_counts(label_index, num_labels, weights)
    posteriors = votes / votes.sum(0, keepdim=True).clamp_min(1e-30)
    return posteriors, weights
