"""DeepAtlas benchmark (results into BENCHMARKS.md): ``atlasseg benchmark deepatlas``.

Hippocampus (Decathlon Task04, :func:`.protocols.hippocampus_split`): every model trains on the 160 pool cases
(their 10% validation share as the trainer draws it), tests on the 40 test targets. Labels: nested subsets of 1, 5
and 16 of the pool's training cases (:func:`.protocols.nested_labelled_subsets`, seed 0); the rest of the pool is
unlabelled. Configurations, all with the same F_R and F_S backbones and one schedule of steps
(:class:`Schedule`):

* ``deepatlas_<n>``: DeepAtlas (joint: F_R and F_S pretrained, then rounds of 20 F_R : 1 F_S steps);
* ``supervised_<n>``: F_S alone on the same labelled cases, as many F_S steps (anatomy weight 0, F_R untouched);
* ``unsupervised``: F_R alone, as many F_R steps with the same learning-rate schedule, anatomy weight 0 (labels
  unused, so trained once).

Evaluation: F_S (Dice on each test target's own grid, labels pulled back from the common grid) of every
configuration; F_R on fixed (moving, fixed) pairs of test targets (:func:`.protocols.registration_pairs_of`, 200,
seed 0): warped-label Dice on the fixed grid, folding (% voxels with Jacobian determinant <= 0) and the SD of
log |J| of the forward field, seconds per pair, beside the engine's pairwise affine, its iterative torch backend
and greedy on the same pairs. The multi-atlas pipeline: the protocol's 10 atlases on the test targets, learned
backend (the model with the most labels) + JLF, torch + JLF, greedy + JLF and greedy + antspyx JLF, end to end
(registration, warping, fusion) in one run.

Resumable: each model resumes from its checkpoint and a finished one is never retrained (its facts are kept in
``<work>/results/<name>-training.json`` with its weights' checksum); every evaluation's rows are saved after each
target or pair in ``<work>/results/*.json`` with the identity of what made them (method, settings, weights) and
reused when it matches; the pool's pre-alignments live in one cache (``<work>/cache``) shared by all models.

Budget (CPU, 2 cores): measured once on this machine (AMD EPYC, 2 cores, with another benchmark running: load 2-4,
so about twice an idle machine's), median of 3 steps after a warm-up on random tensors of the hippocampus common
grid (48 x 64 x 48: 35 x 51 x 35 mm at 1 mm rounded up to multiples of 16), batch 1, the default networks: F_R step
5.55 s without and 3.82 s with the anatomy loss, F_S supervised step 1.24 s, F_S joint step (F_R forward, F_S on
both images) 4.52 s; F_R inference (forward, field and inverse) 1.29 s per pair. With 4.5 s per F_R step the
default schedule (500 + 200 pretraining steps, 40 rounds of 20:1) predicts 1.8 h for a DeepAtlas model, 1.65 h for
the unsupervised one, 0.15 h for a supervised one: each fits 2 h.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..atlas import AtlasSet, load_atlas_set
from ..deepatlas import DeepAtlasConfig, DeepAtlasTrainConfig, StepPlan, train_deepatlas
from ..deepatlas.fields import field_jacobian_determinant, jacobian_stats
from ..deepatlas.inference import load_deepatlas, predict_segmentation
from ..device import resolve_device
from ..fusion import labels_to_index
from ..io import labels_to_tensor
from ..memory import PeakMemory
from ..model_io import CONFIG
from ..networks import build_backbone
from ..pipeline import fuse_prepared, prepare
from ..registration import register, warp_labels
from ..training import CHECKPOINT, split_targets
from .atlasnet import _plain, _read_json, _write_json
from .classic import _ants_jlf, check_ants
from .protocols import hippocampus_split, nested_labelled_subsets, registration_pairs_of, require_data, shared_data
from .report import (
    command_line,
    git_commit,
    machine_description,
    mean_se,
    paired_difference,
    target_status,
    update_markdown,
)

RESULTS_FORMAT = "atlasseg-deepatlas-results/1"
TITLE = "DeepAtlas: few labels, hippocampus (Decathlon Task04)"
LABELLED_COUNTS = (1, 5, 16)
N_PAIRS = 200
LEARN2REG_PUBLISHED_DICE = 0.85     # Learn2Reg 2020 task 4 (hippocampus MR), best published test Dice, about
MAX_TRAINING_H = 2.0
# seconds on this machine's 2 (busy) cores, see the module docstring; pairs and fusion from the hippocampus
# section of BENCHMARKS.md (torch 0.58 s, greedy 0.78 s per atlas, JLF 2.16 s, antspyx JLF 17x slower); the
# pairwise affine (0.25 s) and the accurate preset's 50 test-time iterations (30 s) are estimates, not measured
STEP_S = {"pretrain_registration": 4.5, "registration": 4.5, "pretrain_segmentation": 1.25, "segmentation": 4.5}
VALIDATION_S = 20.0
COSTS = {"learned_pair_s": 1.5, "affine_pair_s": 0.25, "torch_pair_s": 0.58, "greedy_pair_s": 0.78,
         "pair_metrics_s": 0.1, "segment_s": 0.8, "jlf_s": 2.16, "ants_jlf_s": 36.7, "accurate_pair_s": 30.0}
REDUCED_STEP_S = dict.fromkeys(STEP_S, 0.05)
REDUCED_COSTS = dict.fromkeys(COSTS, 0.1)
TINY = {"registration_backbone_kwargs": {"channels": [8, 16, 16]}, "backbone_preset": None,
        "backbone_kwargs": {"channels": [4, 8, 16]}}


@dataclass(frozen=True)
class Schedule:
    """DeepAtlas's steps: F_R and F_S pretraining, then ``rounds`` of ``round_registration`` F_R steps followed by
    ``round_segmentation`` F_S steps. The baselines take the same F_R (unsupervised) or F_S (supervised) steps."""

    pretrain_registration: int = 500
    pretrain_segmentation: int = 200
    rounds: int = 40
    round_registration: int = 20
    round_segmentation: int = 1

    @property
    def total(self) -> int:
        return self.pretrain_registration + self.pretrain_segmentation + self.rounds * (
            self.round_registration + self.round_segmentation)

    def scaled(self, steps: int) -> Schedule:
        """The same proportions for a DeepAtlas budget of about ``steps`` steps (at least one round)."""
        f = steps / self.total
        return replace(self, pretrain_registration=int(round(self.pretrain_registration * f)),
                       pretrain_segmentation=int(round(self.pretrain_segmentation * f)),
                       rounds=max(1, int(round(self.rounds * f))))


DEFAULT_SCHEDULE = Schedule()
REDUCED_SCHEDULE = Schedule(40, 5, 1, 10, 1)


@dataclass
class Configuration:
    name: str
    kind: str                   # "deepatlas" | "supervised" | "unsupervised"
    labelled: list[str]
    n_labelled: int


@dataclass
class Design:
    atlas_set: AtlasSet
    pool: list[str]
    test_ids: list[str]
    pairs: list[tuple[str, str]]
    atlases: list[str]
    pipeline_targets: list[str]
    counts: tuple[int, ...]
    configurations: list[Configuration]
    architecture: DeepAtlasConfig
    training: DeepAtlasTrainConfig
    schedule: Schedule
    reduced: bool
    greedy: bool
    ants: bool
    accurate: bool
    protocol: str

    def configuration(self, name: str) -> Configuration:
        return next(c for c in self.configurations if c.name == name)

    def training_config(self, conf: Configuration) -> DeepAtlasTrainConfig:
        s = self.schedule
        common = {"epochs": s.rounds, "labelled": tuple(conf.labelled)}
        if conf.kind == "deepatlas":
            return replace(self.training, **common, pretrain_registration_steps=s.pretrain_registration,
                           pretrain_segmentation_steps=s.pretrain_segmentation,
                           round_registration_steps=s.round_registration,
                           round_segmentation_steps=s.round_segmentation)
        if conf.kind == "supervised":   # anatomy weight 0: the joint F_S steps are supervised only
            return replace(self.training, **common, lambda_a=0.0, pretrain_registration_steps=0,
                           pretrain_segmentation_steps=s.pretrain_segmentation, round_registration_steps=0,
                           round_segmentation_steps=s.round_segmentation)
        return replace(self.training, **common, lambda_a=0.0, pretrain_registration_steps=s.pretrain_registration,
                       pretrain_segmentation_steps=0, round_registration_steps=s.round_registration,
                       round_segmentation_steps=0)

    @property
    def pipeline_model(self) -> str:
        return f"deepatlas_{max(self.counts)}"

    def learned_models(self) -> list[str]:
        return ["unsupervised", *(f"deepatlas_{n}" for n in self.counts)]

    def registration_methods(self) -> list[tuple[str, str, str | None]]:
        """(name, backend, model configuration) of every method on the test pairs."""
        out = [("affine", "affine", None), ("prealigned", "learned-affine", "unsupervised"),
               ("torch", "torch", None)]
        out += [("greedy", "greedy", None)] if self.greedy else []
        out += [(f"learned/{m}", "learned", m) for m in self.learned_models()]
        if self.accurate:
            out += [(f"learned-accurate/{m}", "learned-accurate", m)
                    for m in ("unsupervised", f"deepatlas_{min(self.counts)}")]
        return out

    def pipeline_variants(self) -> list[str]:
        out = ["learned+jlf", "torch+jlf"]
        out += (["greedy+jlf"] + (["greedy+antspyx"] if self.ants else [])) if self.greedy else []
        return out


def hippocampus_design(data: Path, counts: Sequence[int] = LABELLED_COUNTS, steps: int | None = None,
                       reduced: bool = False, n_targets: int | None = None, n_pairs: int = N_PAIRS,
                       n_pipeline: int | None = None, greedy: bool = True, ants: bool = True,
                       accurate: bool = False) -> Design:
    atlas_set = load_atlas_set(data)
    split = hippocampus_split(atlas_set.case_ids)
    n_labels, n_mod = len(atlas_set.labels), len(atlas_set.modalities)
    training = DeepAtlasTrainConfig(val_interval=10)
    architecture = DeepAtlasConfig(n_labels, n_mod)
    schedule = DEFAULT_SCHEDULE
    if reduced:     # tiny networks and a few steps: a smoke test on phantoms, not a result
        training = replace(training, val_interval=1, registration_learning_rate=1e-2, learning_rate=3e-3,
                           lncc_radius=2, checkpoint_steps=1000)
        architecture = DeepAtlasConfig(n_labels, n_mod, **TINY)
        schedule = REDUCED_SCHEDULE
    if steps is not None:
        schedule = schedule.scaled(steps)
    train_part, _ = split_targets(split.pool, training.val_fraction, training.seed)
    subsets = nested_labelled_subsets(train_part, counts)
    confs = [Configuration("unsupervised", "unsupervised", subsets[min(counts)], 0)]
    for n in counts:
        confs += [Configuration(f"deepatlas_{n}", "deepatlas", subsets[n], n),
                  Configuration(f"supervised_{n}", "supervised", subsets[n], n)]
    test = split.test[:n_targets] if n_targets else split.test
    pairs = registration_pairs_of(test, n_pairs)
    pipeline = test[:n_pipeline] if n_pipeline else test
    protocol = (f"sorted case ids; the {len(split.test)} test targets are index % 5 == 0, the {len(split.pool)} "
                f"others the pool (every model trains on it, {training.val_fraction:.0%} of it drawn for validation "
                f"with seed {training.seed}); labelled subsets of the pool's training cases, nested, seed 0: "
                + "; ".join(f"{n}: {', '.join(subsets[n]) if n <= 5 else f'{subsets[n][0]} ... ({n})'}"
                            for n in counts)
                + f"; {len(pairs)} ordered test pairs drawn once (seed 0) from the {len(test) * (len(test) - 1)}; "
                  f"pipeline atlases: the protocol's 10 ({', '.join(split.atlases)})")
    return Design(atlas_set, list(split.pool), test, pairs, list(split.atlases), pipeline, tuple(counts), confs,
                  architecture, training, schedule, reduced, greedy, ants, accurate, protocol)


# ---------------------------------------------------------------------------------------------------------
# predicted budget


def _reused_seconds(facts: dict) -> float:
    return float((facts.get("reused_pretraining") or {}).get("seconds", 0.0))


def _reused_text(facts: dict) -> str:
    reused = facts.get("reused_pretraining")
    return f" (incl. {reused['seconds'] / 60:.1f} of the shared F_R pretraining)" if reused else ""


def shared_pretraining_seconds(design: Design) -> float:
    """Predicted seconds the configurations save by sharing F_R's unsupervised pretraining (all of them have the
    same architecture, pool, seed and F_R settings; see :mod:`atlasseg.deepatlas.train`): all but the first."""
    costs = REDUCED_STEP_S if design.reduced else STEP_S
    steps = [design.training_config(c).pretrain_registration_steps for c in design.configurations]
    steps = [s for s in steps if s > 0]
    return costs["pretrain_registration"] * (sum(steps) - max(steps, default=0)) if len(set(steps)) <= 1 else 0.0


def training_seconds(design: Design, conf: Configuration) -> float:
    """Predicted training seconds of one configuration (steps of each kind, plus validations)."""
    cfg = design.training_config(conf)
    costs = REDUCED_STEP_S if design.reduced else STEP_S
    counts = StepPlan(cfg).counts()
    validations = 2 + cfg.epochs // cfg.val_interval
    return sum(costs[k] * n for k, n in counts.items()) + validations * (0.1 if design.reduced else VALIDATION_S)


def predict_budget(design: Design) -> dict[str, float]:
    c = REDUCED_COSTS if design.reduced else COSTS
    pair_s = {"affine": c["affine_pair_s"], "learned-affine": c["affine_pair_s"], "torch": c["torch_pair_s"],
              "greedy": c["greedy_pair_s"], "learned": c["learned_pair_s"], "learned-accurate": c["accurate_pair_s"]}
    per_target = 10 * (c["learned_pair_s"] + c["torch_pair_s"]) + 2 * c["jlf_s"]
    if design.greedy:
        per_target += 10 * c["greedy_pair_s"] + c["jlf_s"] + (c["ants_jlf_s"] if design.ants else 0.0)
    return {"training": sum(training_seconds(design, conf) for conf in design.configurations)
            - shared_pretraining_seconds(design),
            "segmentation": len(design.test_ids) * c["segment_s"] * sum(
                conf.kind != "unsupervised" for conf in design.configurations),
            "registration": len(design.pairs) * sum(pair_s[b] + c["pair_metrics_s"]
                                                    for _, b, _ in design.registration_methods()),
            "pipeline": len(design.pipeline_targets) * per_target}


def budget_text(design: Design, predicted: dict[str, float]) -> str:
    per = "; ".join(f"{conf.name} {training_seconds(design, conf) / 3600:.2f} h" for conf in design.configurations)
    return (f"predicted {sum(predicted.values()) / 3600:.2f} h on 2 CPU cores: training "
            f"{predicted['training'] / 3600:.2f} h ({per}; each alone, less "
            f"{shared_pretraining_seconds(design) / 3600:.2f} h of shared F_R pretraining), "
            f"segmentation {predicted['segmentation'] / 60:.1f} min "
            f"({len(design.test_ids)} targets), registration {predicted['registration'] / 60:.1f} min "
            f"({len(design.pairs)} pairs x {len(design.registration_methods())} methods), pipeline "
            f"{predicted['pipeline'] / 60:.1f} min ({len(design.pipeline_targets)} targets x "
            f"{len(design.pipeline_variants())} variants)")


# ---------------------------------------------------------------------------------------------------------
# resumable rows


class Rows:
    """Finished rows of one evaluation in ``path``, kept only when made with the same ``identity`` (settings,
    weights); :meth:`add` saves atomically after every row."""

    def __init__(self, path: Path, identity: dict):
        self.path, self.identity = path, _plain({**identity, "format": RESULTS_FORMAT})
        saved = _read_json(path)
        self.rows: list[dict] = saved.get("rows", []) if saved.get("identity") == self.identity else []
        self.peak_gib = saved.get("peak_gib", 0.0) if self.rows else 0.0

    def done(self, key: str) -> bool:
        return any(r["key"] == key for r in self.rows)

    def add(self, row: dict, peak_gib: float = 0.0) -> None:
        self.rows.append(_plain(row))
        self.peak_gib = max(self.peak_gib, peak_gib)
        _write_json(self.path, {"identity": self.identity, "rows": self.rows, "peak_gib": self.peak_gib})

    def ordered(self, keys: Sequence[str]) -> list[dict]:
        by_key = {r["key"]: r for r in self.rows}
        return [by_key[k] for k in keys if k in by_key]


def _weights(folder: Path) -> str | None:
    return _read_json(folder / CONFIG).get("weights_sha256")


def _dice(prediction: torch.Tensor, reference: torch.Tensor, values: Sequence[int]) -> dict[str, float]:
    """Per foreground label value (string keys), the Dice of two label-value maps."""
    index = [labels_to_index(t[None].cpu(), values)[0] for t in (prediction, reference)]
    out = {}
    for k, v in enumerate(values):
        if k:
            p, r = index[0] == k, index[1] == k
            denom = int(p.sum()) + int(r.sum())
            out[str(v)] = 1.0 if denom == 0 else 2.0 * int((p & r).sum()) / denom
    return out


class Cases:
    """Cases loaded once per evaluation (test targets and atlases are used many times)."""

    def __init__(self, atlas_set: AtlasSet):
        self.atlas_set, self.loaded = atlas_set, {}

    def __call__(self, case_id: str):
        if case_id not in self.loaded:
            self.loaded[case_id] = self.atlas_set.load(case_id)
        return self.loaded[case_id]


# ---------------------------------------------------------------------------------------------------------
# training


def train_configuration(design: Design, conf: Configuration, run_dir: Path, device: str, log=print) -> dict:
    """Train (or resume, or reuse) one configuration; returns its training facts (measured when trained)."""
    folder = run_dir / "models" / conf.name
    info_path = run_dir / "results" / f"{conf.name}-training.json"
    training = design.training_config(conf)
    identity = _plain({"kind": conf.kind, "pool": design.pool, "architecture": design.architecture.to_dict(),
                       "training": training.to_dict()})
    saved = _read_json(info_path)
    if saved.get("identity") == identity and _weights(folder) == saved.get("weights_sha256"):
        log(f"{conf.name}: trained by an earlier run, reused")
        return saved
    plan = StepPlan(training)
    log(f"training {conf.name} ({conf.kind}, {conf.n_labelled} labelled, {plan.total} steps) -> {folder}")
    with PeakMemory() as memory:
        result = train_deepatlas(design.atlas_set, folder, design.architecture, training, run_dir.parent / "cache",
                                 device, (folder / CHECKPOINT).is_file(), design.pool, log, show_progress=False,
                                 pretraining_dir=run_dir / "shared_pretraining")
    counts = plan.counts()
    info = {"identity": identity, "weights_sha256": _weights(folder), "name": conf.name, "steps": plan.total,
            "registration_steps": counts["pretrain_registration"] + counts["registration"],
            "segmentation_steps": counts["pretrain_segmentation"] + counts["segmentation"],
            "seconds": result.seconds, "s_per_step": result.seconds / max(1, plan.total), "device": device,
            "labelled": conf.labelled, "val_dice_segmentation": result.best_val_dice,
            "val_dice_registration": result.val_dice_registration, "val_dice_affine": result.val_dice_affine,
            "reused_pretraining": result.reused_pretraining}
    if result.steps_run:        # measured while training (a resumed run: its own part only)
        info["peak_gib"] = max(memory.gib, result.peak_rss_gib)
    _write_json(info_path, _plain(info))
    return info


# ---------------------------------------------------------------------------------------------------------
# evaluation


def evaluate_segmentation(design: Design, conf: Configuration, run_dir: Path, device: str, log=print) -> list[dict]:
    """F_S's Dice on every test target (on the target's own grid), one row per target, saved after each."""
    folder = run_dir / "models" / conf.name
    store = Rows(run_dir / "results" / f"{conf.name}-segmentation.json", {"weights": _weights(folder)})
    todo = [t for t in design.test_ids if not store.done(t)]
    if todo:
        bundle = load_deepatlas(folder)
        values = design.atlas_set.label_values
        lab_t = torch.tensor(values)
        with PeakMemory() as memory:
            for target_id in todo:
                case = design.atlas_set.load(target_id)
                t0 = time.perf_counter()
                probabilities, _, _ = predict_segmentation(bundle, case.images, device)
                seconds = time.perf_counter() - t0
                dice = _dice(lab_t[probabilities.argmax(0)], labels_to_tensor(case.label), values)
                store.add({"key": target_id, "dice": dice, "seconds": seconds}, memory.gib)
                log(f"{conf.name} F_S [{len(store.rows)}/{len(design.test_ids)}] {target_id}: "
                    f"{np.mean(list(dice.values())):.3f}")
    return store.ordered(design.test_ids)


def _register_pair(backend: str, fixed, moving, device: str, model: Path | None):
    if backend == "affine":
        return register(fixed.images, [moving.images], backend="torch", device=device, preset="affine")[0]
    if backend.startswith("learned"):
        preset = {"learned": "default", "learned-affine": "affine", "learned-accurate": "accurate"}[backend]
        return register(fixed.images, [moving.images], backend="learned", device=device, preset=preset,
                        model=model)[0]
    return register(fixed.images, [moving.images], backend=backend, device=device)[0]


def evaluate_registration(design: Design, method: str, backend: str, model: str | None, run_dir: Path,
                          device: str, cases: Cases, log=print) -> list[dict]:
    """One registration method on every test pair: warped-label Dice, folding, SD of log |J|, seconds."""
    folder = run_dir / "models" / model if model else None
    store = Rows(run_dir / "results" / f"registration-{method.replace('/', '-')}.json",
                 {"backend": backend, "weights": _weights(folder) if folder else None})
    keys = [f"{m}|{f}" for m, f in design.pairs]
    todo = [(m, f) for m, f in design.pairs if not store.done(f"{m}|{f}")]
    values = design.atlas_set.label_values
    with PeakMemory() as memory:
        for moving_id, fixed_id in todo:
            moving, fixed = cases(moving_id), cases(fixed_id)
            t0 = time.perf_counter()
            reg = _register_pair(backend, fixed, moving, device, folder)
            seconds = time.perf_counter() - t0
            warped = warp_labels(labels_to_tensor(moving.label), moving.geometry, reg.forward, values)
            stats = jacobian_stats(field_jacobian_determinant(reg.forward))
            store.add({"key": f"{moving_id}|{fixed_id}", "dice": _dice(warped, labels_to_tensor(fixed.label), values),
                       "folding_percent": stats["folding_percent"], "log_jacobian_sd": stats["log_jacobian_sd"],
                       "seconds": seconds}, memory.gib)
    if todo:
        log(f"registration {method}: {len(todo)} pair(s), mean Dice "
            f"{np.mean([np.mean(list(r['dice'].values())) for r in store.rows]):.3f}")
    return store.ordered(keys)


def evaluate_pipeline(design: Design, run_dir: Path, device: str, cases: Cases, log=print) -> dict[str, list[dict]]:
    """The multi-atlas pipeline (the protocol's 10 atlases, JLF) per variant and target, end to end; greedy's
    registrations are shared by its two fusions."""
    model = run_dir / "models" / design.pipeline_model
    stores = {v: Rows(run_dir / "results" / f"pipeline-{v.replace('+', '-')}.json",
                      {"atlases": design.atlases, "weights": _weights(model) if v.startswith("learned") else None})
              for v in design.pipeline_variants()}
    atlases = [cases(a) for a in design.atlases]
    values = design.atlas_set.label_values
    for target_id in design.pipeline_targets:
        todo = [v for v, s in stores.items() if not s.done(target_id)]
        if not todo:
            continue
        target = cases(target_id)
        reference = labels_to_tensor(target.label)
        prepared = {}
        for variant in todo:
            backend, fusion = variant.split("+")
            with PeakMemory() as memory:
                t0 = time.perf_counter()
                if backend not in prepared:
                    params = {"model": model} if backend == "learned" else None
                    prepared[backend] = (prepare(target.images, design.atlas_set, atlases=atlases, backend=backend,
                                                 device=device, registration_params=params),
                                         time.perf_counter() - t0)
                p, prepare_s = prepared[backend]
                t1 = time.perf_counter()
                if fusion == "antspyx":
                    segmentation = torch.as_tensor(_ants_jlf(p, values)[0])
                else:
                    segmentation = fuse_prepared(p, "jlf").fusion.segmentation
                fusion_s = time.perf_counter() - t1
            stores[variant].add({"key": target_id, "dice": _dice(segmentation, reference, values),
                                 "registration_s": p.timings["registration"], "fusion_s": fusion_s,
                                 "seconds": prepare_s + fusion_s}, memory.gib)
        log(f"pipeline {target_id}: " + ", ".join(
            f"{v} {np.mean(list(stores[v].rows[-1]['dice'].values())):.3f}" for v in todo))
    return {v: s.ordered(design.pipeline_targets) for v, s in stores.items()}


# ---------------------------------------------------------------------------------------------------------
# report


def _mean_dice(row: dict) -> float:
    return float(np.mean(list(row["dice"].values())))


def _mean_of(rows: list[dict], key: str = "dice") -> float:
    if key == "dice":
        return float(np.mean([_mean_dice(r) for r in rows])) if rows else float("nan")
    return float(np.mean([r[key] for r in rows])) if rows else float("nan")


def _paired(a: list[dict], b: list[dict]) -> tuple[float, float, int, int]:
    """Per key (target or pair) ``a - b`` of the mean Dice over labels: (mean, SE, a higher, n)."""
    other = {r["key"]: _mean_dice(r) for r in b}
    common = [r for r in a if r["key"] in other]
    return paired_difference([_mean_dice(r) for r in common], [other[r["key"]] for r in common])


def _diff_text(d: tuple[float, float, int, int]) -> str:
    mean, se, wins, n = d
    return f"{mean:+.4f} +- {se:.4f} ({wins} of {n})"


def _check(value: float, ok: Callable[[float], bool]) -> bool | None:
    return None if value != value else bool(ok(value))


def targets(design: Design, seg: dict, reg: dict, pipeline: dict, facts: dict) -> list[tuple[str, str, bool | None]]:
    """The issue's targets: (what, the numbers, met) computed from the results; None: not measured."""
    out = []
    for n, margin in ((1, 0.05), (5, 0.02), (16, 0.0)):
        if n in design.counts:
            d = _paired(seg[f"deepatlas_{n}"], seg[f"supervised_{n}"])
            out.append((f"F_S with {n} label(s) >= supervised + {margin:.2f} mean Dice",
                        f"{_diff_text(d)}", _check(d[0], lambda x, m=margin: x >= m)))
    n1 = min(design.counts)
    da1, unsup = reg.get(f"learned/deepatlas_{n1}", []), reg.get("learned/unsupervised", [])
    d = _paired(da1, unsup)
    out.append((f"F_R with {n1} label(s) >= unsupervised F_R + 0.02 warped-label Dice", _diff_text(d),
                _check(d[0], lambda x: x >= 0.02)))
    fold, fold_u = _mean_of(da1, "folding_percent"), _mean_of(unsup, "folding_percent")
    out.append((f"F_R folding with {n1} label(s) < 0.5% of voxels and <= the unsupervised network's",
                f"{fold:.3f}% vs {fold_u:.3f}%", _check(fold, lambda x: x < 0.5 and x <= fold_u)))
    if 16 in design.counts:
        v = _mean_of(reg.get("learned/deepatlas_16", []))
        out.append(("F_R with 16 labels >= 0.79 pairwise Dice", f"{v:.4f}", _check(v, lambda x: x >= 0.79)))
    learned_s = _mean_of(reg.get(f"learned/{design.pipeline_model}", []), "seconds")
    torch_s = _mean_of(reg.get("torch", []), "seconds")
    out.append(("learned registration >= 10x faster per pair than the iterative torch backend",
                f"{torch_s / learned_s:.2f}x ({learned_s:.2f} vs {torch_s:.2f} s)",
                _check(torch_s / learned_s, lambda x: x >= 10.0)))
    lp, tp = pipeline.get("learned+jlf", []), pipeline.get("torch+jlf", [])
    d = _paired(lp, tp)
    out.append(("pipeline: learned + JLF within 0.01 mean Dice of torch + JLF (>= -0.01)", _diff_text(d),
                _check(d[0], lambda x: x >= -0.01)))
    ants = pipeline.get("greedy+antspyx", [])
    ratio = _mean_of(ants, "seconds") / _mean_of(lp, "seconds") if ants else float("nan")
    out.append(("pipeline: learned + JLF >= 10x faster end to end than greedy + antspyx JLF",
                f"{ratio:.2f}x" if ants else "greedy or antspyx skipped", _check(ratio, lambda x: x >= 10.0)))
    longest = max((f["seconds"] for f in facts.values()), default=float("nan")) / 3600
    out.append((f"training of each configuration <= {MAX_TRAINING_H:.0f} h (device as in the training table)",
                f"longest {longest:.2f} h", _check(longest, lambda x: x <= MAX_TRAINING_H)))
    return out


def _per_label(rows: list[dict], names: dict[int, str]) -> str:
    return " | ".join(f"{np.mean([r['dice'][str(v)] for r in rows]):.4f}" if rows else "nan" for v in names)


def markdown(design: Design, facts: dict, seg: dict, reg: dict, pipeline: dict, predicted: dict, command: str,
             commit: str, device: str, wall_s: float) -> str:
    names = {v: n for v, n in design.atlas_set.labels.items() if v != 0}
    label_cols = " | ".join(f"Dice {n}" for n in names.values())
    arch = design.architecture
    params = {k: sum(p.numel() for p in build_backbone(spec, c_in, c_out).parameters()) / 1e6 for k, spec, c_in, c_out
              in (("F_R", arch.registration_spec(), 2 * arch.n_modalities, 3),
                  ("F_S", arch.segmenter_config().spec(), arch.n_modalities, arch.n_labels))}
    s = design.schedule
    lines = [f"Command: `{command}`  ", f"Machine: {machine_description()}; device {device}  ",
             f"Date: {datetime.date.today().isoformat()}, commit {commit}, wall time of this run {wall_s / 60:.1f} "
             "min (models and rows of earlier runs are reused; their times are from the run that made them)  ",
             f"Protocol: {design.protocol}  ",
             f"Networks: F_R `{json.dumps(arch.registration_spec().to_dict())}` ({params['F_R']:.2f} M parameters, "
             f"{arch.deformation}, {arch.integration_steps} squarings), F_S "
             f"`{json.dumps(arch.segmenter_config().spec().to_dict())}` ({params['F_S']:.2f} M), the same in every "
             "configuration  ",
             f"Schedule: DeepAtlas {s.pretrain_registration} F_R + {s.pretrain_segmentation} F_S pretraining steps, "
             f"{s.rounds} rounds of {s.round_registration}:{s.round_segmentation}; supervised: the same F_S steps "
             "(anatomy weight 0); unsupervised: the same F_R steps and learning-rate schedule (anatomy weight 0)  ",
             f"Budget {budget_text(design, predicted)}", ""]
    # training
    lines += ["| configuration | labelled | F_R steps | F_S steps | training min | s/step | device | peak RSS GiB | "
              "validation Dice F_S | validation Dice F_R (affine) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for conf in design.configurations:
        f = facts[conf.name]
        peak = f"{f['peak_gib']:.2f}" if "peak_gib" in f else "not measured"
        lines.append(f"| {conf.name} | {conf.n_labelled if conf.kind != 'unsupervised' else 'none'} | "
                     f"{f['registration_steps']} | {f['segmentation_steps']} | {f['seconds'] / 60:.1f}"
                     f"{_reused_text(f)} | "
                     f"{f['s_per_step']:.2f} | {f['device']} | {peak} | {f['val_dice_segmentation']:.4f} | "
                     f"{f['val_dice_registration']:.4f} ({f['val_dice_affine']:.4f}) |")
    # segmentation
    lines += ["", f"Segmentation (F_S) on the {len(design.test_ids)} test targets, each on its own grid; mean Dice "
              "+- SE over targets; difference per target (mean +- SE; targets where DeepAtlas is higher):", "",
              f"| labelled | method | {label_cols} | mean Dice | s/target |", "|" + "---|" * (4 + len(names))]
    for n in design.counts:
        for name in (f"deepatlas_{n}", f"supervised_{n}"):
            rows = seg[name]
            m, se = mean_se([_mean_dice(r) for r in rows])
            lines.append(f"| {n} | {name.split('_')[0]} | {_per_label(rows, names)} | {m:.4f} +- {se:.4f} | "
                         f"{_mean_of(rows, 'seconds'):.2f} |")
    lines += [""] + [f"- {n} label(s), DeepAtlas - supervised: "
                     f"{_diff_text(_paired(seg[f'deepatlas_{n}'], seg[f'supervised_{n}']))}" for n in design.counts]
    # registration
    torch_s = _mean_of(reg.get("torch", []), "seconds")
    lines += ["", f"Registration on {len(design.pairs)} test pairs (moving label warped onto the fixed grid): "
              "warped-label Dice (mean +- SE over pairs), folding and SD of log |J| of the forward field (fixed "
              "grid, whole image), seconds per pair (one pair per call; the learned backend's pre-alignments of "
              "images already seen are cached):", "",
              f"| method | {label_cols} | mean Dice | folding % | SD log|J| | s/pair | torch s / method s |",
              "|" + "---|" * (6 + len(names))]
    for method, _, _ in design.registration_methods():
        rows = reg[method]
        m, se = mean_se([_mean_dice(r) for r in rows])
        sec = _mean_of(rows, "seconds")
        lines.append(f"| {method} | {_per_label(rows, names)} | {m:.4f} +- {se:.4f} | "
                     f"{_mean_of(rows, 'folding_percent'):.3f} | {_mean_of(rows, 'log_jacobian_sd'):.3f} | "
                     f"{sec:.3f} | {torch_s / sec:.2f}x |")
    lines.append("| Learn2Reg 2020 task 4 (published test-set figure, not measured here) | "
                 + " | ".join("" for _ in names) + f" | about {LEARN2REG_PUBLISHED_DICE:.2f} | | | | |")
    n1 = min(design.counts)
    lines += ["", "Paired differences of warped-label Dice (mean +- SE; pairs where the first is higher):"]
    for a, b in ((f"learned/deepatlas_{n1}", "learned/unsupervised"), *((f"learned/deepatlas_{n}", "torch")
                                                                        for n in design.counts),
                 ("learned/unsupervised", "prealigned"), ("torch", "affine")):
        lines.append(f"- {a} - {b}: {_diff_text(_paired(reg[a], reg[b]))}")
    # pipeline
    lines += ["", f"Multi-atlas pipeline, the protocol's 10 atlases, {len(design.pipeline_targets)} targets, end to "
              f"end (registration, warping, fusion; learned: {design.pipeline_model}):", "",
              f"| variant | {label_cols} | mean Dice | registration s/target | fusion s/target | end-to-end s/target |",
              "|" + "---|" * (5 + len(names))]
    for variant, rows in pipeline.items():
        m, se = mean_se([_mean_dice(r) for r in rows])
        lines.append(f"| {variant} | {_per_label(rows, names)} | {m:.4f} +- {se:.4f} | "
                     f"{_mean_of(rows, 'registration_s'):.2f} | {_mean_of(rows, 'fusion_s'):.2f} | "
                     f"{_mean_of(rows, 'seconds'):.2f} |")
    # targets
    lines += ["", "| target of the issue | measured | status |", "|---|---|---|"]
    lines += [f"| {what} | {numbers} | {target_status(ok)} |" for what, numbers, ok in
              targets(design, seg, reg, pipeline, facts)]
    measured = {"training": sum(f["seconds"] - _reused_seconds(f) for f in facts.values()),
                "segmentation": sum(r["seconds"] for rows in seg.values() for r in rows),
                "registration": sum(r["seconds"] for rows in reg.values() for r in rows),
                "pipeline": sum(r["seconds"] for rows in pipeline.values() for r in rows)}
    lines += ["", "| stage | predicted min | measured min |", "|---|---|---|"]
    lines += [f"| {k} | {predicted[k] / 60:.1f} | {measured[k] / 60:.1f} |" for k in predicted]
    lines.append(f"| total | {sum(predicted.values()) / 60:.1f} | {sum(measured.values()) / 60:.1f} |")
    lines += ["", "Measured: training as the trainer timed it (validation included; a configuration that started "
              "from the shared F_R pretraining counts its minutes in its row, once in this total), the other stages "
              "the sum of the rows' seconds (registration and inference, without metrics)."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# entry point


def check_greedy(with_greedy: bool) -> None:
    """The greedy peer needs ``picsl-greedy``: fail at the start, not after hours of training."""
    if with_greedy:
        try:
            import picsl_greedy  # noqa: F401
        except ImportError as err:
            raise ValueError(f"picsl-greedy is not installed ({err}): pip install picsl-greedy, or pass "
                             "--no-greedy to skip the greedy peers") from None


def run_deepatlas_benchmark(args) -> dict:
    """Entry point of ``atlasseg benchmark deepatlas``."""
    greedy = not args.no_greedy
    ants = greedy and not args.no_ants
    check_greedy(greedy)
    check_ants(ants)
    steps = getattr(args, "steps", None)
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be positive, got {steps}")
    data = require_data(Path(args.data) if args.data else shared_data("hippocampus"), "hippocampus")
    design = hippocampus_design(data, tuple(getattr(args, "labelled_counts", None) or LABELLED_COUNTS), steps,
                                args.reduced, args.targets, getattr(args, "pairs", None) or N_PAIRS,
                                getattr(args, "pipeline_targets", None), greedy, ants,
                                bool(getattr(args, "accurate", False)))
    root = Path(args.work) if args.work else Path.cwd().parent / "deepatlas_benchmark_work"
    work = root / ("reduced" if args.reduced else "full")
    run_dir = work / f"{design.schedule.total}steps"        # models and rows per budget; one pre-alignment cache
    (run_dir / "results").mkdir(parents=True, exist_ok=True)
    device = str(resolve_device(args.device))
    command, commit = command_line("atlasseg benchmark deepatlas"), git_commit()
    predicted = predict_budget(design)
    print(f"DeepAtlas benchmark{' (reduced: a smoke test, not a result)' if design.reduced else ''}: "
          f"{budget_text(design, predicted)}")
    t0 = time.perf_counter()
    facts = {c.name: train_configuration(design, c, run_dir, device) for c in design.configurations}
    seg = {c.name: evaluate_segmentation(design, c, run_dir, device) for c in design.configurations
           if c.kind != "unsupervised"}
    cases = Cases(design.atlas_set)
    reg = {m: evaluate_registration(design, m, b, model, run_dir, device, cases)
           for m, b, model in design.registration_methods()}
    pipeline = evaluate_pipeline(design, run_dir, device, cases)
    wall = time.perf_counter() - t0
    body = markdown(design, facts, seg, reg, pipeline, predicted, command, commit, device, wall)
    if args.json:
        Path(args.json).write_text(json.dumps({"suite": "deepatlas", "facts": facts, "segmentation": seg,
                                               "registration": reg, "pipeline": pipeline}, indent=1, default=str))
    update_markdown(Path(args.markdown), "deepatlas", TITLE, body)
    print(body)
    return {"facts": facts, "segmentation": seg, "registration": reg, "pipeline": pipeline, "markdown": body,
            "predicted": predicted, "design": design}


__all__ = ["Configuration", "Design", "Schedule", "budget_text", "hippocampus_design", "markdown", "predict_budget",
           "run_deepatlas_benchmark", "targets", "train_configuration"]
