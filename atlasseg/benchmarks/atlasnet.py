"""AtlasNet benchmarks (results into BENCHMARKS.md): ``atlasseg benchmark atlasnet | atlasnet-fetal-sb``.

atlasnet (hippocampus, Decathlon Task04, :func:`.protocols.hippocampus_split`): training only from the 160 pool
cases, testing on the 40 test targets. Four models ("arms"), every network of them with the same per-network
budget of optimisation steps (one step = one patch, batch 1; epochs = steps / training cases, rounded):

* ``atlasnet_30``: AtlasNet with 7 networks on a fixed, seeded 30% subset of the pool; its atlases are chosen by
  k-medoids and ranked (:func:`atlasseg.atlasnet.rank_medoids`), so N = 1, 3, 5, 7 are its first N networks (no
  extra training) and each N is fused both ways (mean of probabilities, majority vote of argmaxes);
* ``single_30``: one network of the same backbone on the same cases (the same training/validation split);
* ``atlasnet_100``: AtlasNet with the first 5 ranked atlases of ``atlasnet_30`` on the whole pool (same atlases,
  so the registrations of the 30% cases and of the test targets to them are shared through the cache);
* ``single_100``: one network on the whole pool.

atlasnet-fetal-sb (generalisation, :func:`.protocols.fetal_groups`): train on the operated cases (GA 25-34), test
on the not-operated ones (GA 21-25); AtlasNet's 5 atlases are chosen (k-medoids, ranked) among the operated
training cases; the single network, JLF and majority voting (the 10 operated cases as atlases) on the same
targets; training config and per-network budget those of the dlf-fetal-sb section (so the single network is that
section's plain U-Net), whose DLF/JLF/U-Net rows are copied beside the new ones.

Resumable: every network resumes from its checkpoint and a finished model is never retrained (its training facts
are kept in ``<work>/results/<arm>-training.json``); the test rows of each model are saved after every target in
``<work>/results/<arm>.json`` with the weights' checksum; registrations live in one cache (``<work>/cache``)
shared by the atlas selection, every AtlasNet model's training and the test targets.
"""

from __future__ import annotations

import datetime
import json
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..atlas import AtlasSet, load_atlas_set
from ..atlasnet import ATLASNET_AUGMENT, AtlasNetConfig, fuse_networks, load_atlases, predict_atlasnet, train_atlasnet
from ..atlasnet.selection import RANKING
from ..cache import RegistrationCache
from ..device import resolve_device
from ..fusion import fuse
from ..io import Geometry, atomic_write_bytes, label_pixel_type, tensor_to_image
from ..memory import PeakMemory
from ..metrics import nan_mean, segmentation_metrics
from ..model_io import CONFIG, load_model
from ..segmenter import build_model as build_segmenter
from ..segmenter import predict as predict_segmenter
from ..segmenter import train_segmenter
from ..training import CHECKPOINT, TrainConfig, split_targets
from .dlf import benchmark_configuration
from .protocols import fetal_groups, hippocampus_split, require_data, shared_data
from .report import command_line, git_commit, machine_description, paired_difference, update_markdown

RESULTS_FORMAT = "atlasseg-atlasnet-results/1"
METRICS = ("dice", "sensitivity", "precision", "hd95", "assd")
FUSION_RULES = ("mean", "vote")
SUBSET_SEED = (0, 30)          # the fixed 30% subset of the pool: np.random.default_rng([0, 30])
DEFAULT_STEPS = {"atlasnet": 600, "atlasnet-fetal-sb": 576}
REDUCED_STEPS = 16
# Costs on this machine's 2 CPU cores, for the budget predicted at start. Project U-Net (16-128, instance norm)
# per training step, validation included: 0.9 s at 32x48x32 (hippocampus; the backbones benchmark's total over
# steps, with other jobs on the machine), 0.63 s at 48^3 on fetal-sb (the dlf-fetal-sb section's U-Net: 6.0 min
# for 576 steps). Other backbones scale by their median epoch time relative to the U-Net's in the backbones
# benchmark (SegResNet: the reference's per-step measurement); backbones not measured count as the U-Net.
UNET_STEP_SECONDS = {"atlasnet": 0.9, "atlasnet-fetal-sb": 0.63}
BACKBONE_STEP_RATIO = {"unet": 1.0, "vnet": 0.56, "pdvnet": 0.94, "segnet": 0.72, "resunet_r": 2.17,
                       "segresnet": 2.9}
# registration (torch backend, default preset) per atlas-target pair; inference per network and target
# (sliding windows and the warps there and back); metrics per method and target; label fusion per target
SUITE_COSTS = {"atlasnet": {"pair_s": 0.75, "network_s": 0.6, "metrics_s": 0.05, "fusion_s": 0.0},
               "atlasnet-fetal-sb": {"pair_s": 8.1, "network_s": 15.0, "metrics_s": 8.0, "fusion_s": 15.0}}
REDUCED_COSTS = {"pair_s": 0.05, "network_s": 0.05, "metrics_s": 0.01, "fusion_s": 0.05, "step_s": 0.03}
TITLES = {"atlasnet": "AtlasNet: hippocampus (Decathlon Task04)",
          "atlasnet-fetal-sb": "AtlasNet generalisation: fetal-sb operated (GA 25-34) -> not operated (GA 21-25)"}
CLASSIC = {"jlf": "JLF (ours)", "majority": "majority voting"}


# ---------------------------------------------------------------------------------------------------------
# design


@dataclass
class Arm:
    """One trained model of the benchmark: AtlasNet (``n_networks``, atlases chosen or the first ranked ones of
    another arm) or a single network, on ``train_ids`` (split into training and validation as the trainer does)."""

    name: str
    kind: str                       # "atlasnet" | "single"
    train_ids: list[str]
    share: str                      # "30%", "100%", "operated"
    n_networks: int = 1
    atlases_from: str | None = None
    n_values: tuple[int, ...] = ()


@dataclass
class Design:
    suite: str
    atlas_set: AtlasSet
    test_ids: list[str]
    arms: list[Arm]
    architecture: AtlasNetConfig    # n_networks set per arm
    training: TrainConfig           # epochs set per arm from ``steps``
    steps: int
    n_main: int
    reduced: bool
    protocol: str
    classic_atlases: list[str] = field(default_factory=list)
    cache_dir: Path | None = None   # the registration cache (default ``<run folder>/cache``)

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def split(self, arm: Arm) -> tuple[list[str], list[str]]:
        return split_targets(arm.train_ids, self.training.val_fraction, self.training.seed)

    def steps_per_epoch(self, arm: Arm) -> int:
        return len(self.split(arm)[0]) * self.training.patches_per_target

    def epochs(self, arm: Arm) -> int:
        return max(1, int(round(self.steps / self.steps_per_epoch(arm))))

    def arm_training(self, arm: Arm) -> TrainConfig:
        return replace(self.training, epochs=self.epochs(arm))


def _architecture(n_labels: int, n_modalities: int, backbone: str, reduced: bool) -> AtlasNetConfig:
    if reduced and backbone == "unet":
        return AtlasNetConfig(n_labels, n_modalities, n_networks=1, backbone="unet", backbone_preset=None,
                              backbone_kwargs={"channels": [4, 8, 16]})
    return AtlasNetConfig(n_labels, n_modalities, n_networks=1, backbone=backbone, backbone_preset="cpu")


def _reduced_training(cfg: TrainConfig) -> TrainConfig:
    return replace(cfg, patch_size=(16, 16, 16), patches_per_target=1, learning_rate=3e-3, preset="fast",
                   val_interval=1)


def hippocampus_design(data: Path, steps: int | None, backbone: str, reduced: bool, n_test: int | None) -> Design:
    """The hippocampus design: 30% subset (seeded, fixed) and the whole pool; N = 1, 3, 5, 7 from one model."""
    atlas_set = load_atlas_set(data)
    split = hippocampus_split(atlas_set.case_ids)
    pool = split.pool
    n30 = int(round(0.3 * len(pool)))
    subset = sorted(str(x) for x in np.random.default_rng(list(SUBSET_SEED)).choice(pool, n30, replace=False))
    _, base = benchmark_configuration("hippocampus", len(atlas_set.labels), len(atlas_set.modalities))
    # the paper's augmentation (rotations within 10 degrees, translations, no elastic, no flips) for every network
    training = replace(base, augment=replace(ATLASNET_AUGMENT))
    if reduced:
        training = _reduced_training(training)
    arch = _architecture(len(atlas_set.labels), len(atlas_set.modalities), backbone, reduced)
    arms = [Arm("atlasnet_30", "atlasnet", subset, "30%", 7, None, (1, 3, 5, 7)),
            Arm("single_30", "single", subset, "30%"),
            Arm("atlasnet_100", "atlasnet", list(pool), "100%", 5, "atlasnet_30", (5,)),
            Arm("single_100", "single", list(pool), "100%")]
    test = split.test[:n_test] if n_test else split.test
    protocol = (f"sorted case ids; the {len(split.test)} test targets are index % 5 == 0, the {len(pool)} others "
                f"the pool (training only from it); 30% = {n30} pool cases drawn once with "
                f"`np.random.default_rng({list(SUBSET_SEED)})`; each model keeps "
                f"{training.val_fraction:.0%} of its cases for validation (the same split for AtlasNet and the "
                "single network)")
    return Design("atlasnet", atlas_set, test, arms, arch, training, steps or (REDUCED_STEPS if reduced else
                                                                              DEFAULT_STEPS["atlasnet"]),
                  5, reduced, protocol)


def fetal_design(data: Path, steps: int | None, backbone: str, reduced: bool, n_test: int | None) -> Design:
    """fetal-sb: operated cases train (AtlasNet's atlases among them), not-operated cases are the test targets;
    the dlf-fetal-sb section's training config and budget."""
    atlas_set = load_atlas_set(data)
    operated, not_operated = fetal_groups(atlas_set)
    _, training = benchmark_configuration("fetal", len(atlas_set.labels), len(atlas_set.modalities))
    if reduced:
        training = _reduced_training(training)
    arch = _architecture(len(atlas_set.labels), len(atlas_set.modalities), backbone, reduced)
    n_pool = len(split_targets(operated, training.val_fraction, training.seed)[0])
    n = min(5, n_pool)
    n_values = tuple(sorted({v for v in (1, 3, 5) if v <= n} | {n}))
    arms = [Arm("atlasnet", "atlasnet", list(operated), "operated", n, None, n_values),
            Arm("single", "single", list(operated), "operated")]
    classic = sorted(operated) if len(operated) <= 10 else \
        sorted(str(x) for x in np.random.default_rng(0).choice(sorted(operated), 10, replace=False))
    if steps is None:       # the dlf-fetal-sb budget: its epochs over its training targets and patches
        steps = REDUCED_STEPS if reduced else \
            training.epochs * len(split_targets(operated, training.val_fraction, training.seed)[0]) * \
            training.patches_per_target
    test = sorted(not_operated)
    protocol = (f"train on the {len(operated)} operated cases (GA 25-34; {training.val_fraction:.0%} of them for "
                f"validation), test on the {len(not_operated)} not-operated ones (GA 21-25); AtlasNet's atlases "
                f"are chosen among the operated training cases; JLF and majority voting use the {len(classic)} "
                "operated cases as atlases (as the dlf-fetal-sb section)")
    return Design("atlasnet-fetal-sb", atlas_set, test[:n_test] if n_test else test, arms, arch, training, steps,
                  n, reduced, protocol, classic)


# ---------------------------------------------------------------------------------------------------------
# predicted budget


def _selection_candidates(design: Design, arm: Arm) -> list[str]:
    """The k-medoids candidates :func:`atlasseg.atlasnet.select_atlases` will use for an arm (its pool after the
    validation split, a seeded subset when larger than ``selection_pool``)."""
    pool = sorted(design.split(arm)[0])
    max_pool = design.architecture.selection_pool
    if len(pool) <= max_pool:
        return pool
    rng = np.random.default_rng([design.training.seed, 23])
    return sorted(str(x) for x in rng.choice(pool, max_pool, replace=False))


def registration_pairs(design: Design) -> dict[str, set[tuple[str, str]]]:
    """The (fixed, moving) pairs each stage registers: ``selection`` (every ordered pair of candidates),
    ``training`` (every case of an AtlasNet arm to each of its atlases) and ``test``; a pair in an earlier stage is
    not counted again. Before training, an arm's atlases are stand-ins (its first candidates): the counts do not
    depend on which candidates k-medoids picks."""
    atlases: dict[str, list[str]] = {}
    selection: set[tuple[str, str]] = set()
    training: set[tuple[str, str]] = set()
    for arm in design.arms:
        if arm.kind != "atlasnet":
            continue
        if arm.atlases_from:
            atlases[arm.name] = atlases[arm.atlases_from][:arm.n_networks]
        else:
            candidates = _selection_candidates(design, arm)
            selection |= {(i, j) for i in candidates for j in candidates if i != j}
            atlases[arm.name] = candidates[:arm.n_networks]
        training |= {(c, a) for c in arm.train_ids for a in atlases[arm.name] if c != a}
    used = sorted({a for ids in atlases.values() for a in ids} | set(design.classic_atlases))
    test = {(t, a) for t in design.test_ids for a in used}
    return {"selection": selection, "training": training - selection, "test": test}


def predict_budget(design: Design) -> dict[str, float]:
    """Predicted seconds per stage on this machine's 2 CPU cores (see the cost constants of this module)."""
    costs = REDUCED_COSTS if design.reduced else SUITE_COSTS[design.suite]
    step_s = REDUCED_COSTS["step_s"] if design.reduced else \
        UNET_STEP_SECONDS[design.suite] * BACKBONE_STEP_RATIO.get(design.architecture.backbone, 1.0)
    pairs = registration_pairs(design)
    networks = sum(a.n_networks for a in design.arms)
    training = sum(a.n_networks * design.epochs(a) * design.steps_per_epoch(a) for a in design.arms) * step_s
    variants = sum(len(a.n_values) * len(FUSION_RULES) if a.kind == "atlasnet" else 1 for a in design.arms) + \
        (len(CLASSIC) if design.classic_atlases else 0)
    per_target = networks * costs["network_s"] + variants * costs["metrics_s"] + \
        (costs["fusion_s"] if design.classic_atlases else 0.0)
    return {"registration_selection": len(pairs["selection"]) * costs["pair_s"],
            "registration_training": len(pairs["training"]) * costs["pair_s"],
            "training": training, "registration_test": len(pairs["test"]) * costs["pair_s"],
            "evaluation": len(design.test_ids) * per_target}


def budget_text(design: Design, predicted: dict[str, float]) -> str:
    pairs = {k: len(v) for k, v in registration_pairs(design).items()}
    costs = REDUCED_COSTS if design.reduced else SUITE_COSTS[design.suite]
    per_arm = "; ".join(f"{a.name}: {design.epochs(a)} epochs x {design.steps_per_epoch(a)} steps = "
                        f"{design.epochs(a) * design.steps_per_epoch(a)} steps per network x {a.n_networks}"
                        for a in design.arms)
    registration = sum(v for k, v in predicted.items() if k.startswith("registration"))
    return (f"predicted {sum(predicted.values()) / 3600:.2f} h on 2 CPU cores: registrations "
            f"{registration / 60:.1f} min "
            f"({pairs['selection']} selection + {pairs['training']} training + {pairs['test']} test pairs x "
            f"{costs['pair_s']} s), training {predicted['training'] / 60:.1f} min "
            f"({sum(a.n_networks for a in design.arms)} networks; {per_arm}), evaluation "
            f"{predicted['evaluation'] / 60:.1f} min ({len(design.test_ids)} targets); per-network budget "
            f"{design.steps} steps")


# ---------------------------------------------------------------------------------------------------------
# training


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=1).encode())


def _plain(x):
    return json.loads(json.dumps(x, default=str))


def _arm_architecture(design: Design, arm: Arm, work: Path) -> AtlasNetConfig:
    if arm.kind != "atlasnet":
        return design.architecture
    if arm.atlases_from:
        parent = _read_json(work / "models" / arm.atlases_from / CONFIG)
        ids = list(parent["architecture"]["atlas_ids"])[:arm.n_networks]
        return replace(design.architecture, n_networks=arm.n_networks, atlas_ids=tuple(ids), selection="given")
    return replace(design.architecture, n_networks=arm.n_networks)


def train_arm(design: Design, arm: Arm, work: Path, device: str, log=print) -> dict:
    """Train (or resume, or reuse) one arm; returns its training facts (measured when it was trained)."""
    folder = work / "models" / arm.name
    info_path = work / "results" / f"{arm.name}-training.json"
    arch = _arm_architecture(design, arm, work)
    training = design.arm_training(arm)
    identity = _plain({"kind": arm.kind, "train_ids": sorted(arm.train_ids), "architecture": arch.to_dict(),
                       "training": training.to_dict()})
    saved = _read_json(info_path)
    config = _read_json(folder / CONFIG)
    if saved.get("identity") == identity and config.get("weights_sha256") == saved.get("weights_sha256"):
        log(f"{arm.name}: trained by an earlier run, reused")
        return saved
    log(f"training {arm.name} ({arm.kind}, {arm.n_networks} network(s), {design.epochs(arm)} epochs) -> {folder}")
    t0 = time.perf_counter()
    with PeakMemory() as memory:        # selection and registrations included
        if arm.kind == "atlasnet":
            result = train_atlasnet(design.atlas_set, folder, arch, training, _cache_dir(design, work), device,
                                    resume=True, train_ids=arm.train_ids, log=log, show_progress=False)
            networks, atlas_ids = result.networks, result.atlas_ids
        else:
            result = train_segmenter(design.atlas_set, folder, arch.segmenter_config(), training, device,
                                     (folder / CHECKPOINT).is_file(), arm.train_ids, log, show_progress=False)
            networks, atlas_ids = [result], []
    wall = time.perf_counter() - t0
    per_epoch = design.steps_per_epoch(arm)
    rows = []
    for k, r in enumerate(networks):
        epochs = len(r.history)
        rows.append({"atlas": atlas_ids[k] if atlas_ids else None, "seconds": r.seconds, "epochs": epochs,
                     "steps": epochs * per_epoch,
                     "median_step_s": float(np.median([h["seconds"] for h in r.history])) / per_epoch
                     if r.history else float("nan"), "best_val_dice": r.best_val_dice})
    config = _read_json(folder / CONFIG)
    info = {"identity": identity, "weights_sha256": config.get("weights_sha256"), "arm": arm.name,
            "networks": rows, "atlas_ids": atlas_ids, "epochs": design.epochs(arm), "steps_per_epoch": per_epoch,
            "steps_requested": design.steps, "train_cases": len(design.split(arm)[0]),
            "val_cases": len(design.split(arm)[1]),
            "network_seconds": float(sum(r["seconds"] for r in rows)),
            "wall_s": wall, "selection": config.get("atlas_selection")}
    if any(r.epochs_run for r in networks):     # measured while training (a resumed run: its own part only)
        info["peak_gib"] = max(memory.gib, result.peak_rss_gib)
    _write_json(info_path, info)
    return info


# ---------------------------------------------------------------------------------------------------------
# evaluation


def score_all(segmentation: torch.Tensor, reference, geometry: Geometry, names: dict[int, str]) -> dict:
    """Per label (string keys): Dice, sensitivity, precision, HD95 and ASSD (mm) of label values (Z, Y, X)."""
    image = tensor_to_image(segmentation.to(torch.int32), geometry, label_pixel_type(int(segmentation.max())))
    m = segmentation_metrics(image, reference, names)
    return {metric: {str(v): float(m["labels"][v][metric]) for v in names} for metric in METRICS}


def _cache_dir(design: Design, work: Path) -> Path:
    return design.cache_dir or work / "cache"


def _cache(design: Design, work: Path, device: str) -> RegistrationCache:
    """The benchmark's registration cache, read afresh (training writes to it through its own object)."""
    return RegistrationCache(_cache_dir(design, work), design.atlas_set, design.training.backend,
                             design.training.preset, device)


def _saved_rows(path: Path, sha: str | None, identity: dict, test_ids: list[str]) -> list[dict]:
    saved = _read_json(path)
    if saved.get("format") != RESULTS_FORMAT or saved.get("weights_sha256") != sha or \
            saved.get("identity") != _plain(identity):
        return []
    return [r for r in saved.get("rows", []) if r["target"] in test_ids]


def evaluate_arm(design: Design, arm: Arm, work: Path, device: str, log=print) -> dict:
    """Test rows of one arm (every N prefix and both fusions for AtlasNet), saved after every target and reused
    when made by the same weights; plus the evaluation's peak RSS and seconds."""
    folder = work / "models" / arm.name
    path = work / "results" / f"{arm.name}.json"
    loaded = load_model(folder, "cpu", method="atlasnet" if arm.kind == "atlasnet" else "segmenter")
    sha = loaded.config.get("weights_sha256")
    identity = {"n_values": list(arm.n_values), "fusions": list(FUSION_RULES), "format": RESULTS_FORMAT,
                "registration": {"backend": design.training.backend, "preset": design.training.preset}}
    rows = _saved_rows(path, sha, identity, design.test_ids)
    saved = _read_json(path)
    done = {r["target"] for r in rows}
    todo = [t for t in design.test_ids if t not in done]
    peak = saved.get("peak_gib") if rows else None
    if todo:
        cache = _cache(design, work, device)
        names = {v: n for v, n in design.atlas_set.labels.items() if v != 0}
        lab_t = torch.tensor(design.atlas_set.label_values)
        roi = loaded.config["patch_size"]
        overlap = loaded.config.get("overlap", 0.5)
        stored = load_atlases(folder, loaded.config) if arm.kind == "atlasnet" else []
        with PeakMemory() as memory:
            for target_id in todo:
                t0 = time.perf_counter()
                image, _ = cache.case(target_id)
                geometry = Geometry.from_dict(cache.manifest["cases"][target_id]["geometry"])
                reference = design.atlas_set.load(target_id).label
                row = {"target": target_id, "variants": {}}
                if arm.kind == "single":
                    probabilities, seconds = predict_segmenter(loaded.model, image, roi, overlap, device)
                    row["variants"][arm.name] = {**score_all(lab_t[probabilities.argmax(0)], reference, geometry,
                                                             names), "registration_s": 0.0, "compute_s": seconds}
                else:
                    probabilities, seconds, reg_s = [], [], []
                    for k, atlas in enumerate(stored):
                        reg = cache.registration(target_id, atlas.atlas_id)
                        pred = predict_atlasnet(loaded.model, image, geometry, [atlas.geometry], [reg], roi, overlap,
                                                device, networks=[k])
                        probabilities.append(pred.network_probabilities[0])
                        seconds.append(pred.seconds)
                        reg_s.append(reg.seconds)
                    stacked = torch.stack(probabilities)
                    row["atlases"] = [a.atlas_id for a in stored]
                    row["network_s"], row["registration_pair_s"] = seconds, reg_s
                    for n in arm.n_values:
                        for rule in FUSION_RULES:
                            start = time.perf_counter()
                            _, index = fuse_networks(stacked[:n], rule)
                            fusion_s = time.perf_counter() - start
                            row["variants"][f"{arm.name}/N{n}/{rule}"] = {
                                **score_all(lab_t[index], reference, geometry, names),
                                "registration_s": float(sum(reg_s[:n])),
                                "compute_s": float(sum(seconds[:n]) + fusion_s)}
                row["eval_s"] = time.perf_counter() - t0
                rows.append(row)
                _write_json(path, {"format": RESULTS_FORMAT, "arm": arm.name, "weights_sha256": sha,
                                   "identity": _plain(identity), "rows": rows,
                                   "peak_gib": max(memory.peak / 2 ** 30, peak or 0.0)})
                dice = {k.split("/", 1)[-1]: round(float(np.mean(list(v["dice"].values()))), 3)
                        for k, v in row["variants"].items()}
                log(f"{arm.name} [{len(rows)}/{len(design.test_ids)}] {target_id}: {dice}")
        peak = max(memory.gib, peak or 0.0)
        _write_json(path, {"format": RESULTS_FORMAT, "arm": arm.name, "weights_sha256": sha,
                           "identity": _plain(identity), "rows": rows, "peak_gib": peak})
    order = {t: k for k, t in enumerate(design.test_ids)}
    return {"rows": sorted(rows, key=lambda r: order[r["target"]]), "peak_gib": peak}


def evaluate_classic(design: Design, work: Path, device: str, log=print) -> dict:
    """JLF and majority voting with ``classic_atlases`` on every test target (fetal-sb), saved per target."""
    path = work / "results" / "classic.json"
    identity = {"atlases": design.classic_atlases, "methods": list(CLASSIC), "format": RESULTS_FORMAT,
                "registration": {"backend": design.training.backend, "preset": design.training.preset}}
    rows = _saved_rows(path, None, identity, design.test_ids)
    done = {r["target"] for r in rows}
    todo = [t for t in design.test_ids if t not in done]
    if todo:
        cache = _cache(design, work, device)
        names = {v: n for v, n in design.atlas_set.labels.items() if v != 0}
        labels = design.atlas_set.label_values
        lab_t = torch.tensor(labels)
        for target_id in todo:
            t0 = time.perf_counter()
            case = cache.load(target_id, design.classic_atlases)
            reference = design.atlas_set.load(target_id).label
            geometry = Geometry.from_dict(cache.manifest["cases"][target_id]["geometry"])
            reg_s = float(sum(cache.registration_seconds(target_id, a) for a in design.classic_atlases))
            row = {"target": target_id, "variants": {}}
            for method in CLASSIC:
                start = time.perf_counter()
                fused = fuse(method, case.target, case.atlas_images, lab_t[case.atlas_labels], labels)
                row["variants"][method] = {**score_all(fused.segmentation, reference, geometry, names),
                                           "registration_s": reg_s, "compute_s": time.perf_counter() - start}
            row["eval_s"] = time.perf_counter() - t0
            rows.append(row)
            _write_json(path, {"format": RESULTS_FORMAT, "arm": "classic", "weights_sha256": None,
                               "identity": _plain(identity), "rows": rows})
            log(f"classic [{len(rows)}/{len(design.test_ids)}] {target_id}: "
                f"{ {m: round(float(np.mean(list(v['dice'].values()))), 3) for m, v in row['variants'].items()} }")
    order = {t: k for k, t in enumerate(design.test_ids)}
    return {"rows": sorted(rows, key=lambda r: order[r["target"]]), "peak_gib": None}


def register_test_targets(design: Design, work: Path, device: str, log=print) -> int:
    """Register every test target to the atlases of every AtlasNet arm (one batch per target; the arms share
    atlases) and, for fetal-sb, to the classic methods' atlases; returns the number computed."""
    atlases = []
    for arm in design.arms:
        if arm.kind == "atlasnet":
            atlases += _read_json(work / "models" / arm.name / CONFIG)["architecture"]["atlas_ids"]
    atlases = sorted(set(atlases))
    classic = sorted(set(design.classic_atlases) - set(atlases))
    # AtlasNet needs the fields (a few hundred MB per fetal pair), label fusion the warped atlases; a pair is
    # registered once, with every part it needs
    t0 = time.perf_counter()
    cache = _cache(design, work, device)
    computed = cache.ensure({t: atlases for t in design.test_ids}, None,
                            parts=("fields", "warped") if design.classic_atlases else ("fields",))
    if classic:
        computed += cache.ensure({t: classic for t in design.test_ids}, None, parts=("warped",))
    if computed:
        log(f"test registrations: {computed} pair(s) in {time.perf_counter() - t0:.0f} s")
    return computed


# ---------------------------------------------------------------------------------------------------------
# report


def _label(design: Design, arm: Arm | None, variant: str) -> str:
    if arm is None:
        return CLASSIC[variant]
    cases = f"{arm.share} ({len(arm.train_ids)} cases)"
    if arm.kind == "single":
        return f"single network, {cases}"
    _, n, rule = variant.split("/")
    return f"AtlasNet {n[0]}={n[1:]} ({rule}), {cases}"


def _per_target(rows: list[dict], variant: str, metric: str) -> dict[str, float]:
    """Per target, the mean over labels of a metric (NaN-aware for distances)."""
    return {r["target"]: nan_mean(list(r["variants"][variant][metric].values())) for r in rows
            if variant in r["variants"]}


def _difference(a: dict[str, float], b: dict[str, float], what: str, lower_is_better: bool = False) -> str:
    common = [t for t in a if t in b]
    mean, se, higher, n = paired_difference([a[t] for t in common], [b[t] for t in common])
    wins = higher
    if lower_is_better:
        d = np.asarray([a[t] - b[t] for t in common], dtype=float)
        wins = int((d[np.isfinite(d)] < 0).sum())
    word = "lower (better)" if lower_is_better else "higher"
    return f"{what}: {mean:+.4f} +- {se:.4f} (SE); {word} on {wins} of {n} targets"


def _summary(rows: list[dict], variant: str, names: dict) -> dict:
    out = {}
    for metric in METRICS:
        per_label = [nan_mean([r["variants"][variant][metric][str(v)] for r in rows]) for v in names]
        out[metric] = per_label
        out[f"mean_{metric}"] = nan_mean(per_label)
    out["registration_s"] = nan_mean([r["variants"][variant]["registration_s"] for r in rows])
    out["compute_s"] = nan_mean([r["variants"][variant]["compute_s"] for r in rows])
    return out


def _dlf_fetal_rows(markdown_path: Path) -> list[str]:
    """The method table of the dlf-fetal-sb section of the markdown file (with its provenance), or a note."""
    text = markdown_path.read_text() if markdown_path.is_file() else ""
    m = re.search(r"<!-- dlf-fetal-sb:start -->(.*?)<!-- dlf-fetal-sb:end -->", text, re.S)
    if not m:
        return [f"(no dlf-fetal-sb section in {markdown_path.name}: run `atlasseg benchmark dlf-fetal-sb` for the "
                "DLF rows)"]
    section = m.group(1).splitlines()
    date = next((ln.strip().rstrip() for ln in section if ln.startswith("Date:")), "")
    table, started = [], False
    for line in section:
        if line.startswith("| method |"):
            started = True
        if started:
            if not line.startswith("|"):
                break
            table.append(line)
    return [f"The dlf-fetal-sb section's rows (same protocol and targets; {date.rstrip(' ').rstrip()}; its inference "
            "seconds exclude registration):", "", *table]


def markdown(design: Design, results: dict, facts: dict, predicted: dict, command: str, commit: str, device: str,
             wall_s: float, markdown_path: Path, work: Path) -> str:
    names = {v: n for v, n in design.atlas_set.labels.items() if v != 0}
    arms = {a.name: a for a in design.arms}
    variants: list[tuple[Arm | None, str]] = []
    rows_of: dict[str, list[dict]] = {}
    for arm in design.arms:
        rows = results[arm.name]["rows"]
        keys = [f"{arm.name}/N{n}/{rule}" for n in arm.n_values for rule in FUSION_RULES] \
            if arm.kind == "atlasnet" else [arm.name]
        for key in keys:
            variants.append((arm, key))
            rows_of[key] = rows
    if design.classic_atlases:
        for method in CLASSIC:
            variants.append((None, method))
            rows_of[method] = results["classic"]["rows"]
    summary = {key: _summary(rows_of[key], key, names) for _, key in variants}
    n_test = len(design.test_ids)
    first = next(a for a in design.arms if a.kind == "atlasnet")
    sel = facts[first.name].get("selection") or {}
    arch_spec = design.architecture.segmenter_config().spec()
    params = sum(p.numel() for p in build_segmenter(design.architecture.segmenter_config()).parameters())
    training = {k: v for k, v in design.training.to_dict().items()      # without the atlas-sampling settings of DLF
                if k not in ("augment", "epochs", "n_atlases", "candidates_per_target", "mixed_precision")}
    aug = "the paper's (rotations within 10 degrees, translations by patch placement, no elastic, no flips, no " \
        "intensity changes)" if design.training.augment == ATLASNET_AUGMENT else \
        f"`{json.dumps(_plain(design.training.augment.__dict__))}` (the dlf-fetal-sb section's)"
    lines = [f"Command: `{command}`  ", f"Machine: {machine_description()}; device {device}  ",
             f"Date: {datetime.date.today().isoformat()}, commit {commit}, wall time of this run "
             f"{wall_s / 60:.1f} min (models and test rows of earlier runs are reused; their times are from the run "
             "that made them)  ",
             f"Protocol: {design.protocol}; test targets: {n_test}  ",
             f"Backbone: `{json.dumps(arch_spec.to_dict())}` ({params / 1e6:.2f} M parameters per network), the same "
             "for every network  ",
             f"Per-network budget: {design.steps} optimisation steps (one patch, batch 1); epochs = steps / "
             "(training cases x patches per case), rounded: " + "; ".join(
                 f"{a.name} {design.epochs(a)} epochs x {design.steps_per_epoch(a)} = "
                 f"{design.epochs(a) * design.steps_per_epoch(a)} steps" for a in design.arms) + "  ",
             f"Training (every network): `{json.dumps(_plain(training))}`; augmentation {aug}  ",
             f"Atlases: k-medoids (PAM) on 1 - local NCC after registration among {len(sel.get('candidates', []))} "
             f"candidates of {first.name}'s training cases, ranked ({RANKING}): "
             f"{', '.join(facts[first.name]['atlas_ids'])}; prefix costs "
             f"{', '.join(f'{c:.3f}' for c in sel.get('prefix_costs', []))}"
             + "".join(f"; {a.name} uses the first {a.n_networks} of them (its registrations to them are shared)"
                       for a in design.arms if a.atlases_from) + "  ",
             f"Registration: {design.training.backend} backend, preset `{design.training.preset}`, one cache for the "
             "selection, the training pairs and the test targets  ",
             f"Budget {budget_text(design, predicted)}", ""]
    # summary table
    label_cols = " | ".join(f"Dice {n}" for n in names.values())
    lines += [f"| method | {label_cols} | mean Dice | sensitivity | precision | HD95 (mm) | ASSD (mm) | "
              "registration s/target | networks or fusion s/target | inference s/target |",
              "|" + "---|" * (9 + len(names))]
    for arm, key in variants:
        s = summary[key]
        lines.append(f"| {_label(design, arm, key)} | " + " | ".join(f"{d:.4f}" for d in s["dice"])
                     + f" | {s['mean_dice']:.4f} | {s['mean_sensitivity']:.4f} | {s['mean_precision']:.4f} | "
                     f"{s['mean_hd95']:.2f} | {s['mean_assd']:.3f} | {s['registration_s']:.2f} | "
                     f"{s['compute_s']:.2f} | {s['registration_s'] + s['compute_s']:.2f} |")
    lines += ["", "Sensitivity, precision, HD95 and ASSD are means over labels (per label below); inference = "
              "registration of the target to the atlases used (the cache's per-pair time of one batched "
              "registration to all of a model's atlases) + networks, warps there and back, and fusion.", ""]
    # per label table of the main rows
    main_keys = [key for arm, key in variants if arm is None or arm.kind == "single"
                 or key.endswith(f"/N{design.n_main}/mean") or key.endswith(f"/N{design.n_main}/vote")]
    lines += ["| method | label | Dice | sensitivity | precision | HD95 (mm) | ASSD (mm) |",
              "|---|---|---|---|---|---|---|"]
    for arm, key in variants:
        if key not in main_keys:
            continue
        for i, name in enumerate(names.values()):
            s = summary[key]
            lines.append(f"| {_label(design, arm, key)} | {name} | {s['dice'][i]:.4f} | {s['sensitivity'][i]:.4f} | "
                         f"{s['precision'][i]:.4f} | {s['hd95'][i]:.2f} | {s['assd'][i]:.3f} |")
    # training table
    lines += ["", "| model | training / validation cases | networks | epochs | steps per network | training min "
              "(total) | min per network | median s/step | registration min (selection + training pairs) | "
              "peak RSS GiB (training) | peak RSS GiB (evaluation) | best validation Dice (mean over networks) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    manifest = _cache(design, work, device).manifest["pairs"]
    reg_total = {"selection": 0.0, "training": 0.0, "test": 0.0}
    stage_pairs = registration_pairs_actual(design, facts, manifest)
    for stage, pairs in stage_pairs.items():
        reg_total[stage] = sum(float(manifest[f"{f}|{m}"]["registration_s"]) for f, m in pairs
                               if f"{f}|{m}" in manifest)
    for arm in design.arms:
        f = facts[arm.name]
        nets = f["networks"]
        minutes = f["network_seconds"] / 60
        arm_pairs = stage_pairs.get(f"arm:{arm.name}", set())
        reg_min = sum(float(manifest[f"{a}|{b}"]["registration_s"]) for a, b in arm_pairs
                      if f"{a}|{b}" in manifest) / 60
        peak = f"{f['peak_gib']:.2f}" if "peak_gib" in f else "not measured"
        epeak = results[arm.name].get("peak_gib")
        lines.append(f"| {arm.name} | {f['train_cases']} / {f['val_cases']} | {len(nets)} | {f['epochs']} | "
                     f"{nets[0]['steps']} | {minutes:.1f} | {minutes / len(nets):.1f} | "
                     f"{nan_mean([n['median_step_s'] for n in nets]):.3f} | "
                     f"{reg_min:.1f} | {peak} | {f'{epeak:.2f}' if epeak else 'not measured'} | "
                     f"{nan_mean([n['best_val_dice'] for n in nets]):.4f} |")
    # differences
    dice = {key: _per_target(rows_of[key], key, "dice") for _, key in variants}
    lines += ["", "Per test target, differences of mean Dice over labels (mean +- standard error; the number of "
              "targets where the first is higher):"]
    pairs = _comparisons(design, arms)
    for a, b, what in pairs:
        if a in dice and b in dice:
            lines.append("- " + _difference(dice[a], dice[b], what))
    # the paper's claim
    main = _main_pairs(design)
    lines += ["", "The paper's claim (its gain came from sensitivity and boundary distance, with lower precision "
              "than the single network), per target, means over labels:"]
    for a, b, what in main:
        for metric, lower in (("sensitivity", False), ("precision", False), ("hd95", True), ("assd", True)):
            lines.append("- " + _difference(_per_target(rows_of[a], a, metric), _per_target(rows_of[b], b, metric),
                                            f"{what}, {metric}", lower))
    claims = []
    for a, b, what in main:
        ds = summary[a]["mean_sensitivity"] - summary[b]["mean_sensitivity"]
        dp = summary[a]["mean_precision"] - summary[b]["mean_precision"]
        dd = summary[a]["mean_assd"] - summary[b]["mean_assd"]
        claims.append(f"{what}: sensitivity {ds:+.4f}, precision {dp:+.4f}, ASSD {dd:+.3f} mm -> "
                      + ("as in the paper (more sensitive, less precise, closer boundaries)"
                         if ds > 0 and dp < 0 and dd < 0 else "not the paper's pattern"))
    lines += ["", "Pattern: " + "; ".join(claims)]
    # targets
    lines += ["", *_targets(design, summary, facts, reg_total, results)]
    # budget
    measured = {"registration_selection": reg_total["selection"], "registration_training": reg_total["training"],
                "training": sum(facts[a.name]["network_seconds"] for a in design.arms),
                "registration_test": reg_total["test"],
                "evaluation": sum(r.get("eval_s", 0.0) for res in results.values() for r in res["rows"])}
    lines += ["", "| stage | predicted min | measured min |", "|---|---|---|"]
    for stage in predicted:
        lines.append(f"| {stage.replace('_', ' ')} | {predicted[stage] / 60:.1f} | {measured[stage] / 60:.1f} |")
    lines.append(f"| total | {sum(predicted.values()) / 60:.1f} | {sum(measured.values()) / 60:.1f} |")
    lines += ["", "Measured: registrations are the cache's per-pair times of the pairs each stage needs (a pair is "
              "counted once, in its first stage), training the sum of the networks' training times (validation "
              "included; median s/step = median epoch time / steps per epoch), evaluation the per-target wall "
              "times (networks, warps, fusion and metrics)."]
    if design.suite == "atlasnet-fetal-sb":
        lines += ["", *_dlf_fetal_rows(markdown_path)]
    return "\n".join(lines) + "\n"


def registration_pairs_actual(design: Design, facts: dict, manifest: dict) -> dict[str, set]:
    """The pairs of each stage with the atlases actually chosen (see :func:`registration_pairs`), plus per arm
    (``arm:<name>``) the pairs its training used (its selection and training pairs)."""
    selection, training, per_arm = set(), set(), {}
    atlases = []
    for arm in design.arms:
        if arm.kind != "atlasnet":
            continue
        f = facts[arm.name]
        ids = list(f["atlas_ids"])
        atlases += ids
        sel = f.get("selection") or {}
        own = set()
        if sel.get("candidates") and not arm.atlases_from:
            own = {(i, j) for i in sel["candidates"] for j in sel["candidates"] if i != j}
            selection |= own
        pairs = {(c, a) for c in arm.train_ids for a in ids if c != a}
        training |= pairs
        per_arm[f"arm:{arm.name}"] = own | pairs
    used = set(atlases) | set(design.classic_atlases)
    test = {(t, a) for t in design.test_ids for a in used}
    return {"selection": selection, "training": training - selection, "test": test, **per_arm}


def _comparisons(design: Design, arms: dict[str, Arm]) -> list[tuple[str, str, str]]:
    n = design.n_main
    if design.suite == "atlasnet":
        an30, an100 = f"atlasnet_30/N{n}/mean", f"atlasnet_100/N{n}/mean"
        out = [(an30, "single_30", f"AtlasNet N={n} (mean) - single network, 30%"),
               (an100, "single_100", f"AtlasNet N={n} (mean) - single network, 100%"),
               (an30, "single_100", f"AtlasNet N={n} (mean) at 30% - single network at 100%"),
               (f"atlasnet_30/N{n}/vote", "single_30", f"AtlasNet N={n} (vote) - single network, 30%"),
               (f"atlasnet_100/N{n}/vote", "single_100", f"AtlasNet N={n} (vote) - single network, 100%"),
               (an100, an30, f"AtlasNet N={n} (mean): 100% - 30%"),
               ("single_100", "single_30", "single network: 100% - 30%")]
        prefix = "atlasnet_30"
    else:
        an = f"atlasnet/N{n}/mean"
        out = [(an, "single", f"AtlasNet N={n} (mean) - single network"),
               (f"atlasnet/N{n}/vote", "single", f"AtlasNet N={n} (vote) - single network"),
               (an, "jlf", f"AtlasNet N={n} (mean) - JLF (ours)"),
               (an, "majority", f"AtlasNet N={n} (mean) - majority voting")]
        prefix = "atlasnet"
    for k in arms[prefix].n_values:
        if k != n:
            for rule in FUSION_RULES:
                out.append((f"{prefix}/N{k}/{rule}", f"{prefix}/N{n}/{rule}",
                            f"{prefix}: N={k} - N={n} ({rule})"))
    for arm in arms.values():
        if arm.kind == "atlasnet":
            for k in arm.n_values:
                out.append((f"{arm.name}/N{k}/vote", f"{arm.name}/N{k}/mean", f"{arm.name}: vote - mean, N={k}"))
    return out


def _main_pairs(design: Design) -> list[tuple[str, str, str]]:
    n = design.n_main
    if design.suite == "atlasnet":
        return [(f"atlasnet_30/N{n}/mean", "single_30", f"AtlasNet N={n} - single, 30%"),
                (f"atlasnet_100/N{n}/mean", "single_100", f"AtlasNet N={n} - single, 100%")]
    return [(f"atlasnet/N{n}/mean", "single", f"AtlasNet N={n} - single")]


def _targets(design: Design, summary: dict, facts: dict, reg_total: dict, results: dict) -> list[str]:
    n = design.n_main

    def check(ok: bool) -> str:
        return "met" if ok else "NOT met"

    if design.suite != "atlasnet":
        an, single = summary[f"atlasnet/N{n}/mean"], summary["single"]
        return ["Targets: the issue sets none for fetal-sb (a generalisation report); AtlasNet N="
                f"{n} (mean) - single network: {an['mean_dice'] - single['mean_dice']:+.4f} mean Dice; AtlasNet - "
                f"JLF (ours): {an['mean_dice'] - summary['jlf']['mean_dice']:+.4f}"]
    a30, s30 = summary[f"atlasnet_30/N{n}/mean"]["mean_dice"], summary["single_30"]["mean_dice"]
    a100, s100 = summary[f"atlasnet_100/N{n}/mean"]["mean_dice"], summary["single_100"]["mean_dice"]
    v30, v100 = summary[f"atlasnet_30/N{n}/vote"]["mean_dice"], summary[f"atlasnet_100/N{n}/vote"]["mean_dice"]
    inference = [summary[k]["registration_s"] + summary[k]["compute_s"]
                 for k in (f"atlasnet_30/N{n}/mean", f"atlasnet_100/N{n}/mean")]
    compute_h = (sum(reg_total.values()) + sum(facts[a.name]["network_seconds"] for a in design.arms)
                 + sum(r.get("eval_s", 0.0) for res in results.values() for r in res["rows"])) / 3600
    return ["Targets of issue #12 (AtlasNet with the mean fusion; the vote in brackets):",
            f"- at 30%, AtlasNet N={n} >= single network + 0.01 mean Dice: {check(a30 - s30 >= 0.01)} "
            f"({a30:.4f} - {s30:.4f} = {a30 - s30:+.4f}; vote {v30 - s30:+.4f})",
            f"- at 30%, AtlasNet N={n} within 0.01 of the single network trained on 100% (>= -0.01): "
            f"{check(a30 - s100 >= -0.01)} ({a30:.4f} - {s100:.4f} = {a30 - s100:+.4f}; vote {v30 - s100:+.4f})",
            f"- at 100%, AtlasNet N={n} >= single network - 0.005: {check(a100 - s100 >= -0.005)} "
            f"({a100:.4f} - {s100:.4f} = {a100 - s100:+.4f}; vote {v100 - s100:+.4f})",
            f"- inference <= 10 s per target on CPU (AtlasNet N={n}: registration + networks): "
            f"{check(max(inference) <= 10.0)} ({inference[0]:.2f} s at 30%, {inference[1]:.2f} s at 100%)",
            f"- whole benchmark <= 3 h on 2 CPU cores: {check(compute_h <= 3.0)} ({compute_h:.2f} h: registrations, "
            "network training and evaluation as measured, each once)"]


# ---------------------------------------------------------------------------------------------------------
# entry point


def run_atlasnet_benchmark(args) -> dict:
    """Entry point of ``atlasseg benchmark atlasnet | atlasnet-fetal-sb``."""
    suite = args.suite
    if getattr(args, "epochs", None):
        raise ValueError("the atlasnet suites set a per-network budget in steps: use --steps, not --epochs")
    backbone = getattr(args, "backbone", None) or "unet"
    steps = getattr(args, "steps", None)
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be positive, got {steps}")
    if suite == "atlasnet":
        data = require_data(Path(args.data) if args.data else shared_data("hippocampus"), "hippocampus")
        design = hippocampus_design(data, steps, backbone, args.reduced, args.targets)
    else:
        data = require_data(Path(args.data) if args.data else shared_data("fetal-sb"), "fetal-sb")
        design = fetal_design(data, steps, backbone, args.reduced, args.targets)
    root = Path(args.work) if args.work else Path.cwd().parent / "atlasnet_benchmark_work"
    work = root / suite / ("reduced" if args.reduced else "full")
    # models and rows per backbone and budget; the registration cache is shared by all of them
    run_dir = work / f"{backbone}_{design.steps}steps"
    device = str(resolve_device(args.device))
    command, commit = command_line(f"atlasseg benchmark {suite}"), git_commit()
    predicted = predict_budget(design)
    print(f"AtlasNet benchmark {suite}{' (reduced: a smoke test, not a result)' if design.reduced else ''}: "
          f"{budget_text(design, predicted)}")
    design.cache_dir = work / "cache"
    t0 = time.perf_counter()
    (run_dir / "results").mkdir(parents=True, exist_ok=True)
    facts = {}
    for arm in design.arms:
        facts[arm.name] = train_arm(design, arm, run_dir, device)
    register_test_targets(design, run_dir, device)
    results = {arm.name: evaluate_arm(design, arm, run_dir, device) for arm in design.arms}
    if design.classic_atlases:
        results["classic"] = evaluate_classic(design, run_dir, device)
    wall = time.perf_counter() - t0
    body = markdown(design, results, facts, predicted, command, commit, device, wall, Path(args.markdown), run_dir)
    if args.json:
        Path(args.json).write_text(json.dumps({"suite": suite, "results": results, "facts": facts}, indent=1,
                                              default=str))
    update_markdown(Path(args.markdown), suite, TITLES[suite], body)
    print(body)
    return {"results": results, "facts": facts, "markdown": body, "predicted": predicted}


__all__ = ["Arm", "Design", "budget_text", "evaluate_arm", "fetal_design", "hippocampus_design", "markdown",
           "predict_budget", "registration_pairs", "run_atlasnet_benchmark", "score_all", "train_arm"]
