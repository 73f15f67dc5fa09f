"""The benchmark protocols, written once: which cases train, which are tested, with which atlases."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atlas import AtlasSet, AtlasSetError


def shared_data(name: str) -> Path:
    """``../shared/data/<name>`` beside the checkout."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / name


def require_data(folder: Path, name: str) -> Path:
    if not (folder / "dataset.json").is_file():
        raise FileNotFoundError(f"{folder}: benchmark data not found (expected ../shared/data/{name})")
    return folder


@dataclass(frozen=True)
class HippocampusSplit:
    """Decathlon Task04 protocol: sorted case ids; test targets are index % 5 == 0 (40), the pool is the rest
    (160); the same 10 atlases, drawn from the pool with seed 0, serve every test target."""

    test: list[str]
    pool: list[str]
    atlases: list[str]


def hippocampus_split(case_ids: Sequence[str]) -> HippocampusSplit:
    ids = sorted(case_ids)
    test = [c for k, c in enumerate(ids) if k % 5 == 0]
    pool = [c for k, c in enumerate(ids) if k % 5 != 0]
    atlases = sorted(str(x) for x in np.random.default_rng(0).choice(pool, 10, replace=False))
    return HippocampusSplit(test, pool, atlases)


def leave_one_out_atlases(case_ids: Sequence[str], n: int = 10) -> dict[str, list[str]]:
    """Per case, ``n`` atlases drawn with seed 0 from the other cases (the fetal-sb leave-one-out protocol)."""
    ids = sorted(case_ids)
    return {t: sorted(str(x) for x in np.random.default_rng(0).choice([i for i in ids if i != t], n, replace=False))
            for t in ids}


def fetal_groups(atlas_set: AtlasSet) -> tuple[list[str], list[str]]:
    """fetal-sb: (operated cases, GA 25-34; not-operated cases, GA 21-25)."""
    operated = sorted(c for c in atlas_set.case_ids if c.endswith("_operated"))
    not_operated = sorted(c for c in atlas_set.case_ids if c.endswith("_notoperated"))
    if not operated or not not_operated:
        raise AtlasSetError(f"{atlas_set.root}: expected *_operated and *_notoperated cases (fetal-sb)")
    return operated, not_operated


def nested_labelled_subsets(candidates: Sequence[str], counts: Sequence[int], seed: int = 0) -> dict[int, list[str]]:
    """Labelled subsets of ``candidates`` for few-label training (DeepAtlas): one seeded permutation of the sorted
    candidates, the first ``n`` of it for each count, so every smaller subset lies in the larger ones (the label
    budgets differ only by the cases added)."""
    ids = sorted(candidates)
    if max(counts) > len(ids):
        raise ValueError(f"{max(counts)} labelled cases asked for, only {len(ids)} candidates")
    order = [str(x) for x in np.random.default_rng([seed, 1]).permutation(ids)]
    return {int(n): sorted(order[:n]) for n in counts}


def registration_pairs_of(targets: Sequence[str], n: int = 200, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` ordered (moving, fixed) pairs of distinct targets drawn once with ``seed`` (all pairs when fewer),
    in a fixed order: the pairwise registration protocol."""
    ids = sorted(targets)
    pairs = [(m, f) for m in ids for f in ids if m != f]
    if n >= len(pairs):
        return pairs
    return [pairs[k] for k in sorted(np.random.default_rng([seed, 2]).choice(len(pairs), n, replace=False))]
