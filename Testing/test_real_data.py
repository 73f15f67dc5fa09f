"""A small multi-atlas run on the real hippocampus MRI (skips where ../shared/data is absent)."""

from __future__ import annotations

import numpy as np

from atlasseg.atlas import load_atlas_set
from atlasseg.metrics import segmentation_metrics
from atlasseg.pipeline import fuse_prepared, prepare

from .conftest import shared_dataset


def test_hippocampus_multi_atlas_beats_single_atlas_and_jlf_beats_majority():
    atlas_set = load_atlas_set(shared_dataset("hippocampus"), validate=False)
    ids = sorted(atlas_set.case_ids)
    target = atlas_set.load(ids[0])
    atlases = [atlas_set.load(i) for i in ids[1:7]]
    prepared = prepare(target.images, atlas_set, atlases=atlases, backend="torch", device="cpu")
    names = {1: "anterior", 2: "posterior"}
    dice = {}
    for method in ("majority", "jlf"):
        m = segmentation_metrics(fuse_prepared(prepared, method).segmentation, target.label, names)
        dice[method] = m["mean"]["dice"]
    single = []
    for k in range(len(atlases)):
        lab = prepared.labels[k].numpy()
        ref = np.asarray(__import__("SimpleITK").GetArrayFromImage(target.label))
        single.append(np.mean([2 * ((lab == v) & (ref == v)).sum() / ((lab == v).sum() + (ref == v).sum())
                               for v in (1, 2)]))
    assert dice["majority"] > 0.75 and dice["majority"] > np.mean(single) + 0.02, (dice, single)
    assert dice["jlf"] >= dice["majority"] - 0.005, dice
