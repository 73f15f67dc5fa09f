"""``atlasseg benchmark backbones`` end to end on phantoms: the table, the per-target differences to the U-Net,
and a rerun that neither retrains nor re-evaluates a finished backbone."""

from __future__ import annotations

import json
import re

from atlasseg.cli import main
from atlasseg.phantom import make_phantom_atlas_set


def test_backbones_benchmark_builds_its_table_over_several_runs(tmp_path, capsys):
    data = make_phantom_atlas_set(tmp_path / "atlases", n_cases=14, seed=21, shape=(24, 24, 24),
                                  spacing=(1.5, 1.5, 1.5), deformation_mm=4.0)
    md, work = tmp_path / "BENCH.md", tmp_path / "work"
    common = ["benchmark", "backbones", "--data", str(data), "--reduced", "--epochs", "2", "--targets", "2",
              "--train-targets", "6", "--work", str(work), "--markdown", str(md), "--device", "cpu"]
    assert main([*common, "--backbones", "unet"]) == 0
    assert main([*common, "--backbones", "segnet"]) == 0           # a second run adds a row, keeps the first
    text = md.read_text()
    assert "<!-- backbones:start -->" in text
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| (unet|segnet) \|.*$", text, re.M)}
    assert set(rows) == {"unet", "segnet"}
    dice = [float(x) for x in re.findall(r"\| (0\.\d{4}) ", rows["segnet"])]
    assert len(dice) >= 3 and all(0.0 <= d <= 1.0 for d in dice)
    assert re.search(r"segnet - U-Net: [+-]\d\.\d{4} \+- (\d\.\d{4}|nan) \(SE\); better on \d of 2 targets", text)
    assert "segnet: Dice target" in text and "budget" in text
    results = json.loads((work / "reduced" / "results" / "segnet.json").read_text())
    assert [r["target"] for r in results["rows"]] == ["phantom_000", "phantom_005"]
    stamp = (work / "reduced" / "results" / "unet.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*common, "--backbones", "unet"]) == 0              # finished: reused, not retrained
    assert "already trained for 2 epoch(s)" in capsys.readouterr().out
    assert (work / "reduced" / "results" / "unet.json").stat().st_mtime_ns == stamp
