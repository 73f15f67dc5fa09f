"""The DLF benchmark command end to end on phantoms (``dlf-generalise``: train on one atlas set, test on another
with the first set's cases as atlases): tables written, numbers sane, a rerun reuses the trained models."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from atlasseg.cli import main
from atlasseg.phantom import make_phantom_atlas_set

PHANTOM = {"shape": (32, 32, 32), "spacing": (1.5, 1.5, 1.5), "deformation_mm": 5.0}


def _renamed_copy(src: Path, dst: Path, prefix: str) -> Path:
    """The phantom set under other case ids (the two sets of a generalisation run must not share ids)."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "dataset.json").read_text())
    for entry in meta["training"]:
        for key in ("image", "label"):
            old = dst / entry[key]
            new = old.with_name(old.name.replace("phantom_", prefix))
            old.rename(new)
            entry[key] = entry[key].replace("phantom_", prefix)
    (dst / "dataset.json").write_text(json.dumps(meta))
    return dst


def test_generalisation_benchmark_trains_tests_and_resumes(tmp_path, capsys):
    train_set = make_phantom_atlas_set(tmp_path / "a", n_cases=5, seed=11, **PHANTOM)
    test_set = _renamed_copy(make_phantom_atlas_set(tmp_path / "b0", n_cases=2, seed=12, **PHANTOM),
                             tmp_path / "b", "other_")
    md, raw, work = tmp_path / "BENCH.md", tmp_path / "rows.json", tmp_path / "work"
    args = ["benchmark", "dlf-generalise", "--train-data", str(train_set), "--test-data", str(test_set),
            "--reduced", "--epochs", "2", "--ablations", "switch-off", "--work", str(work), "--markdown", str(md),
            "--json", str(raw)]
    assert main(args) == 0
    text = md.read_text()
    assert "<!-- dlf-generalise:start -->" in text and "Targets of issue #3" not in text
    for name in ("| DLF |", "DLF without fine-tuning subnet", "DLF without weighted voting",
                 "plain 3D U-Net (same budget)", "JLF (ours)", "majority voting"):
        assert name in text
    assert re.search(r"DLF - JLF \(ours\): [+-]\d\.\d{4} \+- \d\.\d{4} \(SE\); DLF better on \d of 2 targets", text)
    rows = json.loads(raw.read_text())["rows"]
    assert [r["target"] for r in rows] == ["other_000", "other_001"]
    for row in rows:
        for method in ("dlf", "dlf_no_finetune", "dlf_no_weighted_voting", "unet", "jlf", "majority"):
            dice = list(row["methods"][method]["dice"].values())
            assert len(dice) == 4 and all(0.0 <= d <= 1.0 for d in dice)
        # phantoms register well: label fusion is far above chance
        assert np.mean(list(row["methods"]["majority"]["dice"].values())) > 0.6
    assert "trained by an earlier run" not in text          # both models were trained here: peaks measured
    manifest = work / "reduced" / "cache_test" / "manifest.json"
    registered = manifest.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0                                 # a rerun reuses the models and the registrations
    assert capsys.readouterr().out.count("already trained for 2 epoch(s)") == 2     # DLF and U-Net
    assert manifest.stat().st_mtime_ns == registered
    reused = [line for line in md.read_text().splitlines() if "trained by an earlier run" in line]
    assert len(reused) == 4                                # DLF, U-Net and the two switched-off ablations
