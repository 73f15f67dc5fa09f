"""``atlasseg benchmark atlasnet`` and ``atlasnet-fetal-sb`` end to end on phantoms (reduced: tiny networks, a few
steps): the tables and targets written, N = 1, 3, 5 taken from the 7-network model without training more, one
registration per pair shared by the selection, both AtlasNet models and the test targets, and a rerun that trains
and evaluates nothing and writes the same numbers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from atlasseg.benchmarks.atlasnet import budget_text, hippocampus_design, predict_budget, registration_pairs
from atlasseg.cli import main
from atlasseg.phantom import make_phantom_atlas_set

from .conftest import shared_dataset

PHANTOM = {"shape": (20, 20, 20), "spacing": (1.5, 1.5, 1.5), "deformation_mm": 4.0}
NUMBER = r"(-?\d+\.\d+|nan)"


def _section(text: str, key: str) -> str:
    match = re.search(rf"<!-- {key}:start -->(.*?)<!-- {key}:end -->", text, re.S)
    assert match, f"no {key} section"
    return match.group(1)


def _without_dates(section: str) -> str:
    return "\n".join(line for line in section.splitlines() if not line.startswith("Date:"))


def _table_row(section: str, label: str) -> list[float]:
    line = next(ln for ln in section.splitlines() if ln.startswith(f"| {label} |"))
    return [float(x) for x in re.findall(rf"\| {NUMBER}(?= )", line)]


def test_atlasnet_benchmark_on_phantoms_reuses_the_7_network_model_and_resumes(tmp_path, capsys):
    data = make_phantom_atlas_set(tmp_path / "set", n_cases=35, seed=5, **PHANTOM)   # 7 test targets, pool of 28
    md, raw, root = tmp_path / "BENCH.md", tmp_path / "rows.json", tmp_path / "work"
    md.write_text("# Benchmarks\n\n<!-- other:start -->\n## other\nkept\n<!-- other:end -->\n")
    args = ["benchmark", "atlasnet", "--data", str(data), "--reduced", "--targets", "2", "--work", str(root),
            "--markdown", str(md), "--json", str(raw), "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"AtlasNet benchmark atlasnet \(reduced.*\): predicted \d+\.\d\d h on 2 CPU cores: registrations "
                     r".*42 selection \+ 107 training \+ 14 test pairs", out)
    # 14 networks trained once each (7 + 1 at 30%, 5 + 1 at 100%); N = 1, 3, 5 are prefixes of the 7
    assert out.count("epoch 1/") == 14 and out.count("AtlasNet network") == 12
    text = md.read_text()
    assert "kept" in text
    section = _section(text, "atlasnet")
    for label in [f"AtlasNet N={n} ({rule}), 30% (8 cases)" for n in (1, 3, 5, 7) for rule in ("mean", "vote")] + \
            ["single network, 30% (8 cases)", "AtlasNet N=5 (mean), 100% (28 cases)",
             "AtlasNet N=5 (vote), 100% (28 cases)", "single network, 100% (28 cases)"]:
        values = _table_row(section, label)
        assert len(values) == 12, label          # 4 labels, mean Dice, sens., prec., HD95, ASSD, 3 times
        assert all(0.0 <= v <= 1.0 for v in values[:7]), label
        assert all(v >= 0.0 for v in values[7:] if v == v), label
    assert _table_row(section, "single network, 30% (8 cases)")[9] == 0.0        # no registration
    assert re.search(r"AtlasNet N=5 \(mean\) - single network, 30%: [+-]\d\.\d{4} \+- \d\.\d{4} \(SE\); higher on "
                     r"\d of 2 targets", section)
    for what in ("AtlasNet N=5 (mean) at 30% - single network at 100%", "atlasnet_30: N=7 - N=5 (vote)",
                 "atlasnet_30: vote - mean, N=3", "AtlasNet N=5 - single, 30%, assd"):
        assert f"- {what}: " in section
    assert "lower (better) on" in section
    targets = re.findall(r"^- (.*): (met|NOT met) \(", section, re.M)
    assert len(targets) == 5
    assert "| total |" in section and "median s/step" in section

    run = root / "atlasnet" / "reduced" / "unet_16steps"
    assert sorted(p.name for p in (run / "models").iterdir()) == ["atlasnet_100", "atlasnet_30", "single_100",
                                                                  "single_30"]
    config30 = json.loads((run / "models" / "atlasnet_30" / "config.json").read_text())
    config100 = json.loads((run / "models" / "atlasnet_100" / "config.json").read_text())
    ranked = config30["architecture"]["atlas_ids"]
    assert len(ranked) == 7 and config100["architecture"]["atlas_ids"] == ranked[:5]
    assert len(list((run / "models" / "atlasnet_30" / "networks").iterdir())) == 7
    costs = config30["atlas_selection"]["prefix_costs"]
    assert config30["atlas_selection"]["chosen"] == ranked and all(a >= b for a, b in zip(costs, costs[1:]))
    rows = json.loads((run / "results" / "atlasnet_30.json").read_text())["rows"]
    assert [r["target"] for r in rows] == ["phantom_000", "phantom_005"]
    assert sorted(rows[0]["variants"]) == sorted(f"atlasnet_30/N{n}/{r}" for n in (1, 3, 5, 7)
                                                 for r in ("mean", "vote"))
    assert rows[0]["variants"]["atlasnet_30/N1/mean"]["dice"] == rows[0]["variants"]["atlasnet_30/N1/vote"]["dice"]
    # one registration per pair: the cache holds exactly the pairs the design predicts (shared ones once)
    manifest = json.loads((root / "atlasnet" / "reduced" / "cache" / "manifest.json").read_text())
    design = hippocampus_design(data, 16, "unet", True, 2)
    assert len(manifest["pairs"]) == sum(len(p) for p in registration_pairs(design).values()) == 163
    assert json.loads(raw.read_text())["suite"] == "atlasnet"

    stamps = {p: p.stat().st_mtime_ns for p in [*(run / "results").iterdir(), root / "atlasnet" / "reduced" /
                                                "cache" / "manifest.json"]}
    assert main(args) == 0                          # a rerun: nothing trained, evaluated or registered again
    out = capsys.readouterr().out
    assert "epoch 1/" not in out and "test registrations" not in out and "[1/2]" not in out
    assert out.count("trained by an earlier run, reused") == 4
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert _without_dates(_section(md.read_text(), "atlasnet")) == _without_dates(section)


def _fetal_phantoms(tmp_path: Path) -> Path:
    """A phantom set named as fetal-sb: 6 operated and 2 not-operated cases."""
    src = make_phantom_atlas_set(tmp_path / "raw", n_cases=8, seed=9, **PHANTOM)
    dst = tmp_path / "fetal"
    shutil.copytree(src, dst)
    meta = json.loads((dst / "dataset.json").read_text())
    for k, entry in enumerate(meta["training"]):
        name = f"case{k}_operated" if k < 6 else f"case{k}_notoperated"
        for key in ("image", "label"):
            old = dst / entry[key]
            old.rename(old.with_name(f"{name}.nii.gz"))
            entry[key] = str(Path(entry[key]).with_name(f"{name}.nii.gz"))
    (dst / "dataset.json").write_text(json.dumps(meta))
    return dst


def test_atlasnet_fetal_suite_sits_beside_the_dlf_rows(tmp_path, capsys):
    data = _fetal_phantoms(tmp_path)
    md = tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\n<!-- dlf-fetal-sb:start -->\n## DLF fetal\n\nDate: 2026-11-24, commit f81278f\n\n"
                  "| method | Dice a | mean Dice |\n|---|---|---|\n| DLF | 0.6 | 0.6 |\n| JLF (ours) | 0.7 | 0.7 |\n\n"
                  "Oracle\n<!-- dlf-fetal-sb:end -->\n")
    args = ["benchmark", "atlasnet-fetal-sb", "--data", str(data), "--reduced", "--work", str(tmp_path / "w"),
            "--markdown", str(md), "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("epoch 1/") == 6                      # 5 AtlasNet networks and the single network
    section = _section(md.read_text(), "atlasnet-fetal-sb")
    for label in ["AtlasNet N=1 (mean), operated (6 cases)", "AtlasNet N=5 (vote), operated (6 cases)",
                  "single network, operated (6 cases)", "JLF (ours)", "majority voting"]:
        values = _table_row(section, label)
        assert len(values) == 12 and all(0.0 <= v <= 1.0 for v in values[:7]), label
    assert "- AtlasNet N=5 (mean) - JLF (ours): " in section and "not-operated" in section
    assert "The dlf-fetal-sb section's rows" in section and "| DLF | 0.6 | 0.6 |" in section
    # the two test targets registered once to all 6 operated atlases (5 of them AtlasNet's, with fields)
    manifest = json.loads((tmp_path / "w" / "atlasnet-fetal-sb" / "reduced" / "cache" / "manifest.json").read_text())
    test_pairs = [e for e in manifest["pairs"].values() if e["fixed"].endswith("_notoperated")]
    assert len(test_pairs) == 12 and sum("fields" in e["parts"] for e in test_pairs) == 10


def test_the_default_hippocampus_design_is_predicted_within_3_hours():
    design = hippocampus_design(shared_dataset("hippocampus"), None, "unet", False, None)
    assert len(design.test_ids) == 40 and [len(a.train_ids) for a in design.arms] == [48, 48, 160, 160]
    assert [a.n_networks for a in design.arms] == [7, 1, 5, 1] and design.steps == 600
    assert set(design.arms[0].train_ids) <= set(design.arms[2].train_ids)
    assert not set(design.test_ids) & set(design.arms[2].train_ids)
    assert [(design.epochs(a), design.steps_per_epoch(a)) for a in design.arms] == [(14, 43), (14, 43), (4, 144),
                                                                                   (4, 144)]
    predicted = predict_budget(design)
    assert 2.0 < sum(predicted.values()) / 3600 < 2.75
    assert "380 selection + 756 training + 280 test pairs" in budget_text(design, predicted)
