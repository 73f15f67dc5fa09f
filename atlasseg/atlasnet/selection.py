"""Choosing AtlasNet's atlases: k-medoids on pairwise dissimilarities of registered training cases.

The paper picks its atlases by hand "to span the variability"; here the N atlases are the medoids of a
k-medoids clustering (PAM: greedy BUILD, then SWAP until no swap lowers the cost) of a bounded, seeded pool of
training cases, then ranked (:func:`rank_medoids`) so that every prefix of the list is a good smaller set: the
first atlas is the medoid of least total dissimilarity to all candidates, each next one the medoid that lowers
the cost (sum over candidates of the dissimilarity to their nearest chosen atlas) most. Networks are trained in
that order, so a model used with its first k networks (``segment_atlasnet(n_atlases=k)``) uses the best-ranked k
atlases. The dissimilarity of cases i and j is measured after registering i to j with the engine through
the method's :class:`~atlasseg.cache.RegistrationCache`, using the pair (fixed=i, moving=j) with its ``inverse``
part: case i pulled into j's space, exactly what network j is later trained on, so the registrations of the
chosen atlases are reused by training. d(i, j) is symmetrised as (d(i->j) + d(j->i)) / 2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..cache import RegistrationCache
from ..training import dice_per_label

__all__ = ["dissimilarity_matrix", "k_medoids", "local_ncc", "rank_medoids", "select_atlases"]

RANKING = ("greedy: first the medoid of least total dissimilarity to all candidates, then each next the medoid "
           "that lowers the sum over candidates of the dissimilarity to their nearest chosen atlas most "
           "(ties: lowest candidate index)")

NCC_WINDOW = 7


def local_ncc(a: torch.Tensor, b: torch.Tensor, window: int = NCC_WINDOW, eps: float = 1e-6) -> float:
    """Mean local normalised cross-correlation of two (C, Z, Y, X) images on one grid (cubic windows of
    ``window`` voxels, shrunk to the image where it is smaller; only windows fully inside; averaged over
    channels). Flat windows (both variances ~0) contribute ~0. Range [-1, 1]."""
    if a.shape != b.shape:
        raise ValueError(f"local_ncc needs images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    x, y = a.double()[None], b.double()[None]
    kernel = tuple(min(window, int(s)) for s in a.shape[1:])
    mx, my = F.avg_pool3d(x, kernel, 1), F.avg_pool3d(y, kernel, 1)
    vx = (F.avg_pool3d(x * x, kernel, 1) - mx * mx).clamp(min=0)
    vy = (F.avg_pool3d(y * y, kernel, 1) - my * my).clamp(min=0)
    cov = F.avg_pool3d(x * y, kernel, 1) - mx * my
    return float((cov / torch.sqrt(vx * vy + eps)).mean())


def _pair_dissimilarity(cache: RegistrationCache, fixed: str, moving: str, kind: str, n_labels: int) -> float:
    """d(fixed -> moving): case ``fixed`` pulled into ``moving``'s space compared with ``moving``."""
    image, label = cache.load_inverse(fixed, moving)
    ref_image, ref_label = cache.case(moving)
    if kind == "lncc":
        return 1.0 - local_ncc(image, ref_image)
    if label is None or ref_label is None:
        raise ValueError(f"dissimilarity 'dice' needs labels; case {fixed if label is None else moving} has none")
    return 1.0 - float(np.mean(dice_per_label(label, ref_label, n_labels)))


def dissimilarity_matrix(cache: RegistrationCache, case_ids: Sequence[str], kind: str = "lncc",
                         progress: Callable[[float, str], None] | None = None) -> np.ndarray:
    """(n, n) symmetric dissimilarities (0 on the diagonal) of registered cases; registers (and caches) every
    ordered pair (fixed=i, moving=j), i != j, with the ``inverse`` part."""
    ids = list(case_ids)
    cache.ensure({i: [j for j in ids if j != i] for i in ids}, progress, parts=("inverse",))
    n = len(ids)
    d = np.zeros((n, n))
    for a in range(n):
        for b in range(n):
            if a != b:
                d[a, b] = _pair_dissimilarity(cache, ids[a], ids[b], kind, len(cache.labels))
    return (d + d.T) / 2.0


def k_medoids(d: np.ndarray, k: int, max_iter: int = 100) -> tuple[list[int], float]:
    """PAM k-medoids on a (n, n) dissimilarity matrix: BUILD (greedy, most central first), then SWAP (best
    improving medoid/non-medoid exchange) until no exchange lowers the cost. Deterministic (ties: lowest index).

    Returns the medoid indices (sorted) and the cost (sum over points of the dissimilarity to their medoid).
    """
    d = np.asarray(d, dtype=float)
    n = d.shape[0]
    if d.shape != (n, n):
        raise ValueError(f"a dissimilarity matrix must be square, got {d.shape}")
    if not 1 <= k <= n:
        raise ValueError(f"k-medoids needs 1 <= k <= {n} (the number of candidates), got k={k}")
    medoids = [int(np.argmin(d.sum(1)))]
    while len(medoids) < k:
        nearest = d[medoids].min(0)
        gain = np.maximum(nearest[None, :] - d, 0.0).sum(1)     # (candidate,) decrease of the cost
        gain[medoids] = -np.inf
        medoids.append(int(np.argmax(gain)))

    def cost(ms: Sequence[int]) -> float:
        return float(d[list(ms)].min(0).sum())

    best = cost(medoids)
    for _ in range(max_iter):
        candidate, candidate_cost = None, best
        for slot in range(k):
            for o in range(n):
                if o in medoids:
                    continue
                trial = medoids[:slot] + [o] + medoids[slot + 1:]
                c = cost(trial)
                if c < candidate_cost - 1e-12:
                    candidate, candidate_cost = trial, c
        if candidate is None:
            break
        medoids, best = candidate, candidate_cost
    return sorted(medoids), best


def rank_medoids(d: np.ndarray, medoids: Sequence[int]) -> tuple[list[int], list[float]]:
    """Order medoids so that every prefix is a good subset (greedy forward selection among the medoids).

    First the medoid with the least total dissimilarity to all candidates (the 1-medoid cost restricted to the
    medoids), then repeatedly the medoid whose addition lowers the cost most, the cost of a set S being
    ``sum_j min_{m in S} d[m, j]`` over all candidates j. Ties go to the lowest candidate index.

    Returns the medoids in that order and the cost of each prefix (non-increasing; the last is the cost of all).
    """
    d = np.asarray(d, dtype=float)
    left = sorted(int(m) for m in medoids)
    if len(set(left)) != len(left):
        raise ValueError(f"medoids must be distinct, got {list(medoids)}")
    order: list[int] = []
    costs: list[float] = []
    nearest = np.full(d.shape[0], np.inf)
    while left:
        trial = [float(np.minimum(nearest, d[m]).sum()) for m in left]
        best = left[int(np.argmin(trial))]          # argmin: first (lowest index) among ties
        order.append(best)
        costs.append(min(trial))
        nearest = np.minimum(nearest, d[best])
        left.remove(best)
    return order, costs


def select_atlases(cache: RegistrationCache, pool: Sequence[str], n: int, kind: str = "lncc", max_pool: int = 20,
                   seed: int = 0, progress: Callable[[float, str], None] | None = None) -> tuple[list[str], dict]:
    """N atlas ids chosen by k-medoids among at most ``max_pool`` cases of ``pool`` (a seeded subset when the
    pool is larger), in ranked order (:func:`rank_medoids`: each prefix is a good smaller set), and the record
    kept in the model's ``config.json`` (rule, candidates, matrix, cost, the ranking rule and each prefix's cost,
    which medoid each candidate belongs to)."""
    pool = sorted(str(p) for p in pool)
    if n > len(pool):
        raise ValueError(f"n_networks={n} is larger than the pool of {len(pool)} training case(s) to choose "
                         "atlases from")
    candidates = pool
    if len(pool) > max_pool:
        rng = np.random.default_rng([seed, 23])
        candidates = sorted(str(x) for x in rng.choice(pool, max_pool, replace=False))
    if n > len(candidates):
        raise ValueError(f"n_networks={n} is larger than the {len(candidates)} selection candidates "
                         f"(selection_pool={max_pool})")
    d = dissimilarity_matrix(cache, candidates, kind, progress)
    medoids, total = k_medoids(d, n)
    ranked, prefix_costs = rank_medoids(d, medoids)
    chosen = [candidates[m] for m in ranked]
    off = d[~np.eye(len(candidates), dtype=bool)]
    nearest = np.asarray(medoids)[np.argmin(d[medoids], axis=0)]
    record = {
        "rule": f"k-medoids (PAM BUILD + SWAP) on 1 - {'local NCC' if kind == 'lncc' else 'mean label Dice'} "
                "after registration, symmetrised; candidates a seeded subset of the training cases",
        "dissimilarity": kind, "seed": seed, "max_pool": max_pool, "pool_size": len(pool),
        "candidates": candidates, "chosen": chosen, "cost": total,
        "order": "ranked: chosen[0] is the best single atlas, chosen[:k] the ranked first k", "ranking": RANKING,
        "prefix_costs": [round(float(c), 6) for c in prefix_costs],
        "summary": {"min": float(off.min()) if off.size else 0.0, "mean": float(off.mean()) if off.size else 0.0,
                    "max": float(off.max()) if off.size else 0.0},
        "matrix": [[round(float(v), 5) for v in row] for row in d],
        "assignment": {c: candidates[int(m)] for c, m in zip(candidates, nearest)},
        "registration": {"backend": cache.backend, "preset": cache.preset},
    }
    return chosen, record
