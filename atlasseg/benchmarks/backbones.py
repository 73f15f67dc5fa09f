"""``atlasseg benchmark backbones``: every segmentation backbone trained as a plain segmenter on the hippocampus
protocol (the 160 pool cases, 10% of them for validation; the 40 test targets), with the same epochs, patch size,
augmentation and schedule as the plain U-Net of the DLF benchmark (:func:`.dlf.benchmark_configuration`), each
with its documented ``cpu`` preset. The U-Net row is exactly that DLF-benchmark U-Net (same architecture and
training), so a work folder shared with ``dlf-hippocampus`` reuses it.

Resumable per backbone: a finished backbone is never retrained (its training checkpoint is complete) and its
test rows are kept under ``<work>/results/<backbone>.json`` with the weights' checksum, so the table can be built
over several runs; the table lists every backbone with results.
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..atlas import load_atlas_set
from ..device import resolve_device
from ..io import Geometry, atomic_write_bytes
from ..metrics import nan_mean
from ..model_io import load_model
from ..networks import BACKBONES, backbone_names
from ..registration import normalized_tensor
from ..segmenter import SegmenterConfig, build_model, predict, train_segmenter
from .dlf import benchmark_configuration, score
from .protocols import hippocampus_split, require_data, shared_data
from .report import command_line, format_difference, git_commit, machine_description, update_markdown

RESULTS_FORMAT = "atlasseg-backbone-results/1"
REFERENCE = "unet"
TRAINING_BUDGET_MIN = 60.0
# the Dice targets: (kind, value): "anterior" / "mean" absolute, or "vs_unet" (mean Dice - U-Net's)
TARGETS = {"vnet": ("anterior", 0.86), "segresnet": ("vs_unet", -0.01), "resunet": ("vs_unet", -0.01),
           "resunet_r": ("vs_unet", -0.015), "resunet_h": ("vs_unet", -0.015), "pdvnet": ("mean", 0.86),
           "segnet": ("mean", 0.85)}


def backbone_architecture(backbone: str, n_labels: int, n_modalities: int) -> SegmenterConfig:
    """The segmenter of a backbone in this benchmark: the ``cpu`` preset; the U-Net is the DLF benchmark's."""
    if backbone == REFERENCE:
        dlf_arch, _ = benchmark_configuration("hippocampus", n_labels, n_modalities)
        return SegmenterConfig.plain_unet(dlf_arch.finetune_channels, n_labels, n_modalities, dlf_arch.norm)
    return SegmenterConfig(n_labels, n_modalities, backbone, "cpu")


def _train(backbone: str, atlas_set, train_ids, training, work: Path, device: str, log) -> dict:
    """Train (or reuse) one backbone; its training facts, measured when it was trained."""
    folder = work / "models" / backbone
    info_path = work / "results" / f"{backbone}-training.json"
    arch = backbone_architecture(backbone, len(atlas_set.labels), len(atlas_set.modalities))
    resume = (folder / "checkpoint.pt").is_file()
    log(f"training {backbone} -> {folder}" + (" (resuming)" if resume else ""))
    result = train_segmenter(atlas_set, folder, arch, training, device, resume, train_ids, log, show_progress=False)
    saved = json.loads(info_path.read_text()) if info_path.is_file() else {}
    steps = len(result.history) * (len(train_ids) - len(json.loads((folder / "config.json").read_text())
                                                          ["training"]["val_ids"])) * training.patches_per_target
    info = {"train_s": result.seconds, "epochs": len(result.history), "steps": steps,
            # robust to other jobs slowing a few epochs down (validation included)
            "median_epoch_s": float(np.median([h["seconds"] for h in result.history])),
            "best_val_dice": result.best_val_dice, "preset": arch.backbone_preset,
            "kwargs": arch.spec().resolved_kwargs()}
    if result.epochs_run:   # measured in this call (a resumed run measures its own part only)
        info["peak_gib"] = max(result.peak_rss_gib, saved.get("peak_gib", 0.0))
    elif "peak_gib" in saved:
        info["peak_gib"] = saved["peak_gib"]
    atomic_write_bytes(info_path, json.dumps(info, indent=1).encode())
    return info


def _evaluate(backbone: str, atlas_set, test_ids, training, work: Path, device: str, log) -> list[dict]:
    """Test rows of one backbone (reused when the saved rows were made by the same weights)."""
    loaded = load_model(work / "models" / backbone, resolve_device(device), method="segmenter")
    path = work / "results" / f"{backbone}.json"
    sha = loaded.config["weights_sha256"]
    rows: list[dict] = []
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("format") == RESULTS_FORMAT and saved.get("weights_sha256") == sha:
            rows = [r for r in saved["rows"] if r["target"] in test_ids]
    done = {r["target"] for r in rows}
    names = {v: n for v, n in atlas_set.labels.items() if v != 0}
    lab_t = torch.tensor(atlas_set.label_values)
    for target_id in (t for t in test_ids if t not in done):
        case = atlas_set.load(target_id)
        probabilities, seconds = predict(loaded.model, normalized_tensor(case.images), training.patch_size,
                                         training.overlap, device)
        row = {"target": target_id, **score(lab_t[probabilities.argmax(0)], case.label, Geometry.of(case.label),
                                            names, seconds)}
        rows.append(row)
        atomic_write_bytes(path, json.dumps({"format": RESULTS_FORMAT, "backbone": backbone, "weights_sha256": sha,
                                             "rows": rows}, indent=1).encode())
    log(f"{backbone}: {len(rows)} test targets, mean Dice "
        f"{np.mean([np.mean(list(r['dice'].values())) for r in rows]):.4f}")
    order = {t: k for k, t in enumerate(test_ids)}
    return sorted(rows, key=lambda r: order[r["target"]])


def _parameters(backbone: str, n_labels: int, n_modalities: int) -> int:
    return sum(p.numel() for p in build_model(backbone_architecture(backbone, n_labels, n_modalities)).parameters())


def _target_check(backbone: str, dice: list[float], reference_mean: float | None) -> str:
    if backbone not in TARGETS:
        return "reference" if backbone == REFERENCE else ""
    kind, value = TARGETS[backbone]
    if kind == "anterior":
        got, need = dice[0], value
        text = f"anterior >= {value}"
    elif kind == "mean":
        got, need = float(np.mean(dice)), value
        text = f"mean >= {value}"
    else:
        if reference_mean is None:
            return "U-Net not run"
        got, need = float(np.mean(dice)) - reference_mean, value
        text = f"mean - U-Net >= {value:+.3f}"
    return f"{'met' if got >= need else 'NOT met'} ({text}: {got:+.4f})" if kind == "vs_unet" else \
        f"{'met' if got >= need else 'NOT met'} ({text}: {got:.4f})"


def markdown(atlas_set, results: dict[str, dict], training, command: str, commit: str, device: str,
             n_train: int) -> str:
    names = {v: n for v, n in atlas_set.labels.items() if v != 0}
    dice_cols = " | ".join(f"Dice {n}" for n in names.values())
    hd_cols = " | ".join(f"HD95 {n} (mm)" for n in names.values())
    n_test = max(len(r["rows"]) for r in results.values())
    lines = [f"Command: `{command}`  ", f"Machine: {machine_description()}; device {device}  ",
             f"Date: {datetime.date.today().isoformat()}, commit {commit} (backbones trained by earlier runs are "
             "reused; their training facts are from the run that trained them)  ",
             f"Training: {n_train} pool cases (10% of them validation), {training.epochs} epochs, patch "
             f"{list(training.patch_size)}, `{training.loss}` loss, {training.schedule} schedule from "
             f"{training.learning_rate}; test targets: {n_test}; every backbone with its `cpu` preset", "",
             f"| backbone | preset arguments | parameters | {dice_cols} | mean Dice | {hd_cols} | s/step | "
             "median s/epoch | training min | peak RSS GiB | inference s/target |", "|" + "---|" * (9 + 2 * len(names))]
    ref = results.get(REFERENCE)
    ref_mean = [np.mean(list(r["dice"].values())) for r in ref["rows"]] if ref else None
    checks, diffs = [], []
    for backbone, res in results.items():
        rows, info = res["rows"], res["info"]
        dice = [nan_mean([r["dice"][str(v)] if str(v) in r["dice"] else r["dice"][v] for r in rows]) for v in names]
        hd = [nan_mean([r["hd95"][str(v)] if str(v) in r["hd95"] else r["hd95"][v] for r in rows]) for v in names]
        peak = f"{info['peak_gib']:.2f}" if "peak_gib" in info else "not measured"
        minutes = info["train_s"] / 60
        lines.append(f"| {backbone} | `{json.dumps(info['kwargs'])}` | {res['parameters'] / 1e6:.2f} M | "
                     + " | ".join(f"{d:.4f}" for d in dice) + f" | {np.mean(dice):.4f} | "
                     + " | ".join(f"{h:.2f}" for h in hd)
                     + f" | {info['train_s'] / max(info['steps'], 1):.2f} | "
                     f"{info.get('median_epoch_s', float('nan')):.1f} | {minutes:.1f} | {peak} | "
                     f"{nan_mean([r['seconds'] for r in rows]):.2f} |")
        check = _target_check(backbone, dice, float(np.mean(ref_mean)) if ref_mean else None)
        budget = "within" if minutes <= TRAINING_BUDGET_MIN else "OVER"
        checks.append(f"- {backbone}: Dice target {check or '(none)'}; training {minutes:.1f} min, {budget} the "
                      f"{TRAINING_BUDGET_MIN:.0f}-min budget")
        if ref and backbone != REFERENCE:
            by_target = {r["target"]: np.mean(list(r["dice"].values())) for r in rows}
            ref_by = {r["target"]: np.mean(list(r["dice"].values())) for r in ref["rows"]}
            common = [t for t in ref_by if t in by_target]
            diffs.append("- " + format_difference([by_target[t] for t in common], [ref_by[t] for t in common],
                                                  f"{backbone} - U-Net"))
    lines += ["", "Per test target, mean Dice over labels, each backbone minus the U-Net:", *diffs, "",
              "Targets of the platform issue:", *checks]
    return "\n".join(lines) + "\n"


def run_backbones_benchmark(args) -> dict:
    """Entry point of ``atlasseg benchmark backbones``."""
    data = require_data(Path(args.data) if args.data else shared_data("hippocampus"), "hippocampus")
    atlas_set = load_atlas_set(data)
    split = hippocampus_split(atlas_set.case_ids)
    train_ids = split.pool[:args.train_targets] if args.train_targets else split.pool
    test_ids = split.test[:args.targets] if args.targets else split.test
    _, training = benchmark_configuration("hippocampus", len(atlas_set.labels), len(atlas_set.modalities),
                                          args.reduced)
    if args.epochs:
        training = replace(training, epochs=args.epochs)
    selected = args.backbones or [REFERENCE] + [b for b in backbone_names() if b != REFERENCE]
    unknown = sorted(set(selected) - set(BACKBONES))
    if unknown:
        raise ValueError(f"unknown backbone(s) {unknown}: choose from {', '.join(backbone_names())}")
    work = (Path(args.work) if args.work else Path.cwd().parent / "backbones_benchmark_work") / \
        ("reduced" if args.reduced else "full")
    device = str(resolve_device(args.device))
    command, commit = command_line("atlasseg benchmark backbones"), git_commit()
    t0 = time.perf_counter()
    for backbone in selected:
        info = _train(backbone, atlas_set, train_ids, training, work, device, print)
        _evaluate(backbone, atlas_set, test_ids, training, work, device, print)
        print(f"{backbone}: {info['train_s'] / 60:.1f} min training")
    results = {}
    for backbone in dict.fromkeys([REFERENCE, *backbone_names()]):
        if not (work / "results" / f"{backbone}.json").is_file():
            continue
        results[backbone] = {"info": json.loads((work / "results" / f"{backbone}-training.json").read_text()),
                             "rows": _evaluate(backbone, atlas_set, test_ids, training, work, device, lambda m: None),
                             "parameters": _parameters(backbone, len(atlas_set.labels), len(atlas_set.modalities))}
    body = markdown(atlas_set, results, training, command, commit, device, len(train_ids))
    body += f"\nWall time of this run: {(time.perf_counter() - t0) / 60:.1f} min\n"
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    update_markdown(Path(args.markdown), "backbones", "Segmentation backbones: hippocampus (Decathlon Task04)", body)
    print(body)
    return results
