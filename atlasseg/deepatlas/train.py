"""DeepAtlas training: pre-align every case onto the common grid (cached), pretrain F_R without labels and F_S on
the labelled cases, then alternate (F_R steps with F_S fixed, F_S steps with F_R fixed).

The schedule counts optimisation steps, not passes over the data, and has two optimisers, so it runs its own loop
rather than :class:`~atlasseg.training.Trainer`'s epoch loop; it reuses the trainer's pieces (split, atomic
checkpoints read with ``weights_only``, CSV log, peak memory, progress). Every step draws its pairs from
``numpy.random.default_rng([seed, step])`` and seeds torch with ``seed * 100003 + step``, so a run resumed from a
checkpoint takes exactly the steps an uninterrupted one would.

Layout of the output folder::

    config.json, model.safetensors    the model (F_R and F_S), method "deepatlas", rewritten at every checkpoint
    reference.safetensors             the reference image on the common grid (sha256 in config.json)
    training_log.csv                  one row per checkpoint: step, phase, mean losses, validation Dice, folding
    training_curves.png               losses (F_R red, F_S blue) and validation Dice (F_S, F_R, affine only)
    checkpoint.pt                     step, both networks, both optimisers, history (resume)
    registration_cache/               pre-alignment of every case to the reference (unless ``cache_dir`` is given)

Shared F_R pretraining (``pretraining_dir``): F_R's unsupervised pretraining sees no label, so every run with the
same architecture, data split, seed and F_R settings takes exactly the same first steps, whatever its labelled
cases or later schedule. The first such run saves its state after them (``<pretraining_dir>/<key>.pt``, atomic,
read with ``weights_only``); the others start from it, take the same later steps they would have taken, and
count its seconds as theirs (``training.reused_pretraining`` in config.json says so).
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..atlas import AtlasCase, AtlasSet
from ..cache import RegistrationCache
from ..device import resolve_device
from ..io import atomic_write
from ..losses import make_loss, median_frequency_weights_from_labels
from ..memory import PeakMemory
from ..model_io import save_model
from ..progress import Progress
from ..registration import normalized_tensor
from ..training import CHECKPOINT, CURVES, LOG, TrainingError, TrainResult, dice_per_label, split_targets
from ..training.trainer import _plain, load_checkpoint, model_state, save_checkpoint, write_csv
from .config import DeepAtlasConfig, DeepAtlasTrainConfig
from .fields import jacobian_determinant, jacobian_stats
from .grid import CommonGrid, prealignment_settings
from .model import DeepAtlasModel, build_model, save_common_grid
from .objective import Objective, PairBatch, onehot

__all__ = ["PHASES", "DeepAtlasTrainResult", "DeepAtlasTrainer", "StepPlan", "train_deepatlas", "train_method"]

PHASES = ("pretrain_registration", "pretrain_segmentation", "registration", "segmentation")
REFERENCE_FOLDER = "deepatlas_reference"      # inside the registration cache: the reference on the common grid
_RESUMABLE_CHANGES = ("epochs", "val_interval", "checkpoint_steps")   # may differ when resuming
# settings F_R's unsupervised pretraining never reads: runs differing only in these share it
_NOT_IN_REGISTRATION_PRETRAINING = (*_RESUMABLE_CHANGES, "labelled", "labelled_fraction", "learning_rate",
                                    "lambda_a", "lambda_sp", "loss", "pretrain_segmentation_steps",
                                    "round_registration_steps", "round_segmentation_steps", "semi", "semi_rounds",
                                    "val_pairs", "schedule")


class StepPlan:
    """The whole schedule as runs of one kind of step: F_R pretraining, F_S pretraining, then per round
    ``(registration, R)`` and ``(segmentation, S)`` (R = 0 in Semi-DeepAtlas rounds). ``at(step)`` gives the kind
    and the round (-1 in pretraining) of a 0-based global step."""

    def __init__(self, config: DeepAtlasTrainConfig):
        runs: list[tuple[str, int, int]] = [("pretrain_registration", config.pretrain_registration_steps, -1),
                                            ("pretrain_segmentation", config.pretrain_segmentation_steps, -1)]
        for r in range(config.epochs):
            n_reg, n_seg = config.round_steps(r)
            runs += [("registration", n_reg, r), ("segmentation", n_seg, r)]
        self.runs = [run for run in runs if run[1] > 0]
        self.ends = list(np.cumsum([n for _, n, _ in self.runs]).tolist())
        self.total = self.ends[-1] if self.ends else 0

    def at(self, step: int) -> tuple[str, int]:
        k = bisect.bisect_right(self.ends, step)
        kind, _, round_index = self.runs[k]
        return kind, round_index

    def counts(self, upto: int | None = None) -> dict[str, int]:
        """Steps of each kind among the first ``upto`` steps (all by default)."""
        upto = self.total if upto is None else upto
        out, start = dict.fromkeys(PHASES, 0), 0
        for (kind, _, _), end in zip(self.runs, self.ends):
            out[kind] += max(0, min(end, upto) - start)
            start = end
        return out

    def is_run_end(self, step: int) -> bool:
        """Whether 0-based ``step`` is the last of its run."""
        return (step + 1) in self.ends


@dataclass
class DeepAtlasTrainResult(TrainResult):
    """A :class:`TrainResult` (``epochs_run``: joint rounds completed by this call; ``best_val_dice``: F_S's last
    validation Dice on the common grid) plus the steps: per kind in the whole run (``step_counts``), those this
    call took in order as runs ``[kind, n]`` (``executed``), the ratio and the labelled cases."""

    step_counts: dict = field(default_factory=dict)
    executed: list = field(default_factory=list)
    steps_run: int = 0
    ratio: str = ""
    labelled_ids: list = field(default_factory=list)
    val_dice_registration: float = float("nan")
    val_dice_affine: float = float("nan")
    reused_pretraining: dict | None = None      # the shared F_R pretraining this run started from, if any


def _run_length(runs: list, kind: str) -> None:
    if runs and runs[-1][0] == kind:
        runs[-1][1] += 1
    else:
        runs.append([kind, 1])


class DeepAtlasTrainer:
    """One DeepAtlas training run (see the module docstring)."""

    method = "deepatlas"

    def __init__(self, atlas_set: AtlasSet, output: str | Path, architecture: DeepAtlasConfig,
                 config: DeepAtlasTrainConfig, cache_dir: str | Path | None = None, device: str = "auto",
                 train_ids: Sequence[str] | None = None, log: Callable[[str], None] = print,
                 show_progress: bool = True, pretraining_dir: str | Path | None = None):
        if not isinstance(config, DeepAtlasTrainConfig):
            raise TrainingError(f"DeepAtlas needs a DeepAtlasTrainConfig, got {type(config).__name__}")
        n_labels, n_mod = len(atlas_set.labels), len(atlas_set.modalities)
        if architecture.n_labels != n_labels or architecture.n_modalities != n_mod:
            raise TrainingError(f"architecture for {architecture.n_labels} labels / {architecture.n_modalities} "
                                f"modalities, atlas set '{atlas_set.name}' has {n_labels} / {n_mod}")
        self.atlas_set, self.output, self.config = atlas_set, Path(output), config
        self.device = resolve_device(device)
        self.log, self.show_progress = log, show_progress
        self.n_labels = n_labels
        ids = sorted(str(i) for i in (train_ids if train_ids is not None else atlas_set.case_ids))
        missing = sorted(set(ids) - set(atlas_set.case_ids))
        if missing:
            raise TrainingError(f"case id(s) {missing} not in atlas set '{atlas_set.name}'")
        self.train_ids, self.val_ids = split_targets(ids, config.val_fraction, config.seed)
        if len(self.train_ids) < 2:
            raise TrainingError(f"DeepAtlas needs at least 2 training cases (pairs to register), got "
                                f"{len(self.train_ids)}")
        self.labelled_ids = self._labelled()
        reference_id = architecture.reference_id or self.train_ids[0]
        if reference_id not in set(atlas_set.case_ids):
            raise TrainingError(f"reference_id {reference_id!r} is not a case of atlas set '{atlas_set.name}'")
        case = atlas_set.load(reference_id)
        self.grid = CommonGrid.from_reference(reference_id, normalized_tensor(case.images), case.geometry,
                                              architecture.grid_shape, architecture.grid_spacing)
        self.architecture = replace(architecture, reference_id=reference_id, grid_shape=self.grid.shape,
                                    grid_spacing=self.grid.geometry.spacing)
        self.cache_dir = Path(cache_dir) if cache_dir else self.output / "registration_cache"
        self.plan = StepPlan(config)
        self.pretraining_dir = Path(pretraining_dir) if pretraining_dir else None
        self.reused_pretraining: dict | None = None

    def _labelled(self) -> list[str]:
        cfg = self.config
        if cfg.labelled:
            outside = sorted(set(cfg.labelled) - set(self.train_ids))
            if outside:
                held = sorted(set(outside) & set(self.val_ids))
                raise TrainingError(f"labelled case(s) {outside} are not training cases"
                                    + (f" ({held} drawn for validation: lower val_fraction or choose others)"
                                       if held else f" of atlas set '{self.atlas_set.name}'"))
            return sorted(cfg.labelled)
        if cfg.labelled_fraction is not None:
            n = max(1, int(round(cfg.labelled_fraction * len(self.train_ids))))
            rng = np.random.default_rng([cfg.seed, 23])
            return sorted(str(x) for x in rng.choice(self.train_ids, n, replace=False))
        return list(self.train_ids)

    # -- identity and resume --------------------------------------------------------------------------------
    def identity(self) -> dict:
        training = {k: v for k, v in self.config.to_dict().items() if k not in _RESUMABLE_CHANGES}
        return _plain({"method": self.method, "architecture": self.architecture.to_dict(), "training": training,
                       "atlas_set": self.atlas_set.name, "train_ids": self.train_ids, "val_ids": self.val_ids,
                       "labelled_ids": self.labelled_ids})

    def pretraining_identity(self) -> dict:
        """What F_R's unsupervised pretraining depends on (see the module docstring)."""
        identity = self.identity()
        identity.pop("labelled_ids")
        identity["training"] = {k: v for k, v in identity["training"].items()
                                if k not in _NOT_IN_REGISTRATION_PRETRAINING}
        identity["training"]["pretrain_registration_steps"] = self.config.pretrain_registration_steps
        return identity

    def pretraining_path(self) -> Path | None:
        """Where the shared F_R pretraining of this run lives (None: not shared, or nothing to pretrain)."""
        if self.pretraining_dir is None or self.config.pretrain_registration_steps == 0:
            return None
        text = json.dumps(self.pretraining_identity(), sort_keys=True)
        return self.pretraining_dir / f"registration_pretraining_{hashlib.sha256(text.encode()).hexdigest()[:16]}.pt"

    def _shared_pretraining(self) -> dict | None:
        path = self.pretraining_path()
        if path is None or not path.is_file():
            return None
        state = load_checkpoint(path)
        if _plain(state.get("identity") or {}) != _plain(self.pretraining_identity()):
            raise TrainingError(f"{path}: a shared F_R pretraining with other settings under this name; remove it")
        return state

    def _save_shared_pretraining(self, model, optimizers, history: list, step: int, elapsed: float) -> None:
        path = self.pretraining_path()
        if path is None or path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, {"identity": self.pretraining_identity(), "step": step, "seconds": elapsed,
                               "history": history, "model": model_state(model),
                               "optimizer": copy.deepcopy(optimizers["registration"].state_dict()),
                               "source": str(self.output)})
        self.log(f"F_R pretraining saved for runs that share it: {path}")

    def _resume_state(self, resume: bool) -> dict | None:
        path = self.output / CHECKPOINT
        if path.exists() and not resume:
            raise TrainingError(f"{path}: a training run exists in this folder; pass --resume to continue it or "
                                "choose another output folder")
        if resume and not path.is_file():
            raise TrainingError(f"{path}: nothing to resume (no checkpoint in {self.output})")
        if not resume:
            return None
        state = load_checkpoint(path)
        if _plain(state.get("identity") or {}) != self.identity():
            raise TrainingError(f"{path}: the checkpoint was written with other settings (architecture, training "
                                "config, data split or labelled cases); resume with the same settings")
        return state

    # -- data -----------------------------------------------------------------------------------------------
    def prepare_data(self, progress=None) -> None:
        """Pre-align every case to the reference (registration cache) and load them on the common grid."""
        cfg = self.config
        key = self.grid.key()
        paths = self.grid.write(self.cache_dir / REFERENCE_FOLDER)
        extended = AtlasSet(self.atlas_set.name, [*self.atlas_set.cases, AtlasCase(key, list(paths), None)],
                            dict(self.atlas_set.labels), dict(self.atlas_set.modalities), self.atlas_set.root)
        cache = RegistrationCache(self.cache_dir, extended, cfg.backend, "affine", self.device,
                                  settings=prealignment_settings(cfg.prealign_max_scale),
                                  fixed_masks={key: self.grid.fov_mask()})
        ids = self.train_ids + self.val_ids
        computed = cache.ensure({key: ids}, progress, parts=("warped",))
        if computed:
            self.log(f"registration cache {self.cache_dir}: {computed} affine pre-alignment(s) to "
                     f"{self.grid.reference_id} on the common grid {self.grid.shape}")
        loaded = cache.load(key, ids)
        dev = self.device
        n_train = len(self.train_ids)
        images, labels = loaded.atlas_images.float(), loaded.atlas_labels.long()
        self.images, self.val_images = images[:n_train].to(dev), images[n_train:].to(dev)
        labelled = torch.tensor([i in set(self.labelled_ids) for i in self.train_ids])
        hidden = labels[:n_train].clone()
        hidden[~labelled] = 0                        # unlabelled cases' labels are never seen
        self.labels, self.labelled = hidden.to(dev), labelled.to(dev)
        self.val_labels = labels[n_train:].to(dev)
        lab_idx = [k for k in range(n_train) if bool(labelled[k])]
        self.labelled_index = lab_idx
        self.valid_pairs = [(m, f) for m in range(n_train) for f in range(n_train)
                            if m != f and (bool(labelled[m]) or bool(labelled[f]))]
        weights = None
        if cfg.loss == "ce_mfb":
            weights = median_frequency_weights_from_labels([hidden[k] for k in lab_idx], self.n_labels)
        self.objective = Objective.from_config(cfg, self.n_labels, self.grid.shape, make_loss(cfg.loss, weights),
                                               self.architecture.deep_supervision_weights)
        self._val_pairs()

    def _val_pairs(self) -> None:
        """Validation pairs (moving = a labelled training case, fixed = a validation case) and their Dice after
        the affine pre-alignment alone."""
        pairs = [(m, f) for f in range(len(self.val_ids)) for m in self.labelled_index]
        if len(pairs) > self.config.val_pairs:
            rng = np.random.default_rng([self.config.seed, 7])
            pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), self.config.val_pairs, replace=False))]
        self.val_pair_list = pairs
        dice = [np.mean(dice_per_label(self.labels[m], self.val_labels[f], self.n_labels)) for m, f in pairs]
        self.val_dice_affine = float(np.mean(dice)) if dice else float("nan")

    # -- steps ----------------------------------------------------------------------------------------------
    def _pair_batch(self, pairs: list[tuple[int, int]]) -> PairBatch:
        m = torch.tensor([p[0] for p in pairs], device=self.device)
        f = torch.tensor([p[1] for p in pairs], device=self.device)
        return PairBatch(self.images[m], self.images[f], self.labels[m], self.labels[f], self.labelled[m],
                         self.labelled[f])

    def sample(self, kind: str, rng: np.random.Generator):
        """The batch of one step: pairs of distinct training cases (F_S's joint steps: at least one labelled), or
        labelled cases (F_S's pretraining)."""
        b, n = self.config.batch_size, len(self.train_ids)
        if kind == "pretrain_segmentation":
            idx = rng.choice(self.labelled_index, b, replace=b > len(self.labelled_index))
            return torch.as_tensor(np.asarray(idx), device=self.device)
        if kind == "segmentation":
            chosen = rng.integers(len(self.valid_pairs), size=b)
            return self._pair_batch([self.valid_pairs[int(k)] for k in chosen])
        pairs = []
        for _ in range(b):
            m = int(rng.integers(n))
            f = int(rng.integers(n - 1))
            pairs.append((m, f + (f >= m)))
        return self._pair_batch(pairs)

    def step(self, model: DeepAtlasModel, optimizers: dict, kind: str, batch) -> dict[str, float] | None:
        """One optimisation step of ``kind``; returns the loss parts (None: nothing to learn from the batch)."""
        reg, seg = model.registration, model.segmentation
        if kind in ("pretrain_registration", "registration"):
            reg.train()
            seg.eval()
            loss, parts = self.objective.registration_loss(model, batch, anatomy=kind == "registration")
            optimizer = optimizers["registration"]
        else:
            reg.eval()
            seg.train()
            if kind == "pretrain_segmentation":
                heads = seg(self.images[batch])
                loss = self.objective.supervised_loss(heads, self.labels[batch])
                parts = {"supervised": float(loss.detach()), "loss": float(loss.detach())}
            else:
                loss, parts = self.objective.segmentation_loss(model, batch)
                if loss is None:
                    return None
            optimizer = optimizers["segmentation"]
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return parts

    # -- validation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, model: DeepAtlasModel) -> dict[str, float]:
        """F_S Dice on the validation cases and F_R warped-label Dice / folding on the validation pairs, on the
        common grid."""
        nan = float("nan")
        out = {"val_dice_segmentation": nan, "val_dice_registration": nan, "val_dice_affine": self.val_dice_affine,
               "val_folding_percent": nan, "val_log_jacobian_sd": nan}
        if not self.val_ids:
            return out
        model.eval()
        seg_dice = []
        for k in range(len(self.val_ids)):
            pred = model.segmentation(self.val_images[k:k + 1])[0][0, :self.n_labels].argmax(0)
            seg_dice.append(np.mean(dice_per_label(pred, self.val_labels[k], self.n_labels)))
        out["val_dice_segmentation"] = float(np.mean(seg_dice))
        if self.val_pair_list:
            reg_dice, folding, sd = [], [], []
            for m, f in self.val_pair_list:
                ddf = model.registration.displacement(model.registration(self.images[m:m + 1],
                                                                         self.val_images[f:f + 1]))
                warped = model.registration.warp(onehot(self.labels[m:m + 1], self.n_labels), ddf)[0].argmax(0)
                reg_dice.append(np.mean(dice_per_label(warped, self.val_labels[f], self.n_labels)))
                stats = jacobian_stats(jacobian_determinant(ddf)[0])
                folding.append(stats["folding_percent"])
                sd.append(stats["log_jacobian_sd"])
            out.update(val_dice_registration=float(np.mean(reg_dice)), val_folding_percent=float(np.mean(folding)),
                       val_log_jacobian_sd=float(np.mean(sd)))
        return out

    # -- run ------------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> DeepAtlasTrainResult:
        with PeakMemory() as memory:
            result = self._run(resume)
        result.peak_rss_gib, result.peak_cuda_gib = memory.gib, memory.cuda_gib
        return result

    def _run(self, resume: bool) -> DeepAtlasTrainResult:
        cfg, plan = self.config, self.plan
        state = self._resume_state(resume)
        self.output.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        model = build_model(self.architecture).to(self.device)
        optimizers = {
            "registration": torch.optim.AdamW(model.registration.parameters(), lr=cfg.registration_learning_rate,
                                              weight_decay=cfg.weight_decay),
            "segmentation": torch.optim.AdamW(model.segmentation.parameters(), lr=cfg.learning_rate,
                                              weight_decay=cfg.weight_decay)}
        history: list[dict] = []
        start, elapsed, executed_before = 0, 0.0, []
        if state is not None:
            model.load_state_dict(state["model"])
            for name, opt in optimizers.items():
                opt.load_state_dict(state["optimizers"][name])
            history, start, elapsed = list(state["history"]), int(state["step"]), float(state["seconds"])
            executed_before = [list(r) for r in state.get("executed", [])]
            self.reused_pretraining = state.get("reused_pretraining")
            self.log(f"resuming {self.output} after step {start} of {plan.total}")
        result = DeepAtlasTrainResult(self.output, history, float("nan"), elapsed, 0, ratio=cfg.ratio(),
                                      labelled_ids=list(self.labelled_ids))
        if start >= plan.total:
            self.log(f"{self.output}: already trained for {start} step(s)")
            result.step_counts = plan.counts(start)
            result.reused_pretraining = self.reused_pretraining
            result.best_val_dice = float(history[-1]["val_dice_segmentation"]) if history else float("nan")
            return result
        progress = Progress([("data", 0.1), ("training", 0.9)], enabled=self.show_progress)
        self.prepare_data(progress.stage("data"))
        self.reference_entry = save_common_grid(self.output, self.grid)
        shared = self._shared_pretraining() if state is None else None
        if shared is not None:      # exactly the state this run would reach after its own F_R pretraining
            model.load_state_dict(shared["model"])
            optimizers["registration"].load_state_dict(shared["optimizer"])
            start, elapsed = int(shared["step"]), float(shared["seconds"])
            history = [dict(row) for row in shared["history"]]
            history[-1].update(self.validate(model))     # this run's validation cases and labelled pairs
            executed_before = [["pretrain_registration", start]]
            self.reused_pretraining = {"path": str(self.pretraining_path()), "steps": start, "seconds": elapsed,
                                       "trained_by": shared.get("source", "")}
            self.log(f"{self.output}: F_R pretraining ({start} steps, {elapsed:.0f} s) reused from "
                     f"{self.pretraining_path()}")
            self._write(model, optimizers, history, start, elapsed, executed_before)
            self.log(self._message(history[-1]))
        executed: list = []
        running: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        rounds_before = self._rounds_done(start)
        for step in range(start, plan.total):
            kind, round_index = plan.at(step)
            factor = 1.0
            if round_index >= 0 and cfg.learning_rate > 0:
                factor = cfg.learning_rate_at(round_index) / cfg.learning_rate
            for name, base in (("registration", cfg.registration_learning_rate), ("segmentation", cfg.learning_rate)):
                for group in optimizers[name].param_groups:
                    group["lr"] = base * factor
            rng = np.random.default_rng([cfg.seed, step])
            torch.manual_seed(cfg.seed * 100003 + step)
            parts = self.step(model, optimizers, kind, self.sample(kind, rng))
            _run_length(executed, kind if parts is not None else f"{kind} (skipped)")
            for name, value in (parts or {}).items():
                running.setdefault(f"{'registration' if 'registration' in kind else 'segmentation'}_{name}",
                                   []).append(value)
            progress.stage("training")((step + 1 - start) / (plan.total - start),
                                       f"step {step + 1}/{plan.total} ({kind.replace('_', ' ')})")
            last = step + 1 == plan.total
            pretraining_done = kind.startswith("pretrain") and plan.is_run_end(step)
            round_done = round_index >= 0 and self._round_end(step) and (round_index + 1) % cfg.val_interval == 0
            validate = last or pretraining_done or round_done
            if validate or (step + 1) % cfg.checkpoint_steps == 0:
                now = time.perf_counter()
                elapsed += now - t0
                t0 = now
                metrics = self.validate(model) if validate else {}
                history.append(self._row(step + 1, kind, round_index, running, metrics, elapsed))
                running = {}
                self._write(model, optimizers, history, step + 1, elapsed, executed_before + executed)
                if pretraining_done and kind == "pretrain_registration":
                    self._save_shared_pretraining(model, optimizers, history, step + 1, elapsed)
                if validate:
                    self.log(self._message(history[-1]))
        progress.done("training done")
        result.history, result.seconds = history, elapsed
        result.steps_run = plan.total - start
        result.epochs_run = self._rounds_done(plan.total) - rounds_before
        result.executed = executed
        result.step_counts = plan.counts()
        result.reused_pretraining = self.reused_pretraining
        validated = [r for r in history if r["val_dice_segmentation"] == r["val_dice_segmentation"]]
        if validated:
            result.best_val_dice = float(validated[-1]["val_dice_segmentation"])
            result.val_dice_registration = float(validated[-1]["val_dice_registration"])
            result.val_dice_affine = float(validated[-1]["val_dice_affine"])
        return result

    def _round_end(self, step: int) -> bool:
        """Whether ``step`` ends its joint round (the next step is in another round, or there is none)."""
        _, r = self.plan.at(step)
        return step + 1 >= self.plan.total or self.plan.at(step + 1)[1] != r

    def _rounds_done(self, steps: int) -> int:
        if steps <= 0:
            return 0
        kind, r = self.plan.at(steps - 1)
        if r < 0:
            return 0
        return r + 1 if self._round_end(steps - 1) else r

    def _row(self, step: int, kind: str, round_index: int, running: dict, metrics: dict, elapsed: float) -> dict:
        nan = float("nan")
        counts = self.plan.counts(step)
        row = {"step": step, "phase": kind, "round": round_index + 1,
               "registration_steps": counts["pretrain_registration"] + counts["registration"],
               "segmentation_steps": counts["pretrain_segmentation"] + counts["segmentation"]}
        for name in ("registration_loss", "registration_similarity", "registration_regularizer",
                     "registration_anatomy", "segmentation_loss", "segmentation_anatomy", "segmentation_supervised"):
            values = running.get(name, [])
            row[name] = float(np.mean(values)) if values else nan
        for name in ("val_dice_segmentation", "val_dice_registration", "val_dice_affine", "val_folding_percent",
                     "val_log_jacobian_sd"):
            row[name] = metrics.get(name, nan)
        row["seconds"] = elapsed
        return row

    @staticmethod
    def _message(row: dict) -> str:
        return (f"step {row['step']} ({row['phase']}, round {row['round']}): F_R loss {row['registration_loss']:.4f} "
                f"F_S loss {row['segmentation_loss']:.4f}  val Dice F_S {row['val_dice_segmentation']:.4f} "
                f"F_R {row['val_dice_registration']:.4f} (affine {row['val_dice_affine']:.4f}) folding "
                f"{row['val_folding_percent']:.3f}%")

    def training_summary(self, step: int, elapsed: float, executed: list) -> dict:
        cfg = self.config
        return {"method": self.method, "atlas_set": self.atlas_set.name,
                "atlas_root": str(self.atlas_set.root) if self.atlas_set.root else None,
                "train_ids": self.train_ids, "val_ids": self.val_ids, "labelled_ids": self.labelled_ids,
                "unlabelled_ids": [i for i in self.train_ids if i not in set(self.labelled_ids)],
                "config": cfg.to_dict(), "ratio": cfg.ratio(),
                "schedule": {"steps_completed": step, "steps_total": self.plan.total,
                             "step_counts": self.plan.counts(step), "rounds_completed": self._rounds_done(step),
                             "executed": executed},
                "regularizer_weight": self.objective.regularizer_weight, "seconds": elapsed,
                "device": str(self.device), "reused_pretraining": self.reused_pretraining}

    def _write(self, model, optimizers, history, step: int, elapsed: float, executed: list) -> None:
        """Model folder, CSV log, PNG curves, then the checkpoint (all atomic)."""
        arch, sets = self.architecture, self.atlas_set
        last = next((r for r in reversed(history) if r["val_dice_segmentation"] == r["val_dice_segmentation"]), {})
        extra = {"common_grid": self.reference_entry,
                 "prealignment": {"backend": self.config.backend, "preset": "affine",
                                  "reference_id": self.grid.reference_id,
                                  "max_scale": self.config.prealign_max_scale},
                 "training": self.training_summary(step, elapsed, executed),
                 "validation": {"best_mean_dice": last.get("val_dice_segmentation", float("nan")),
                                "selection": "the last weights (F_S Dice on the common grid, for monitoring)",
                                **{k: v for k, v in last.items() if k.startswith("val_")}}}
        save_model(self.output, self.method, model, arch.to_dict(), sets.labels, sets.modalities, 0, extra,
                   backbones={"registration": arch.registration_spec().to_dict(),
                              "segmentation": arch.segmenter_config().spec().to_dict()})
        write_csv(history, self.output / LOG)
        plot_curves(history, self.output / CURVES)
        save_checkpoint(self.output / CHECKPOINT, {
            "identity": self.identity(), "step": step, "seconds": elapsed, "history": history,
            "executed": executed, "reused_pretraining": self.reused_pretraining, "model": model_state(model),
            "optimizers": {k: copy.deepcopy(o.state_dict()) for k, o in optimizers.items()}})


def plot_curves(rows: list[dict], path: Path, width: int = 360, height: int = 240) -> Path:
    """PNG: left "Training loss" (F_R's loss red, F_S's blue) and right "Validation Dice" (F_S blue, F_R green,
    affine only grey), both against the step."""
    from ..render import line_chart

    steps = [float(r["step"]) for r in rows]
    last = max(steps, default=1.0)

    def column(key):
        return [float(r[key]) for r in rows]

    left = line_chart([(steps, column("registration_loss"), (220, 30, 30), "F_R loss"),
                       (steps, column("segmentation_loss"), (30, 80, 220), "F_S loss")], width, height,
                      title="Training loss", xlabel="step", ylabel="loss", xmax=last)
    right = line_chart([(steps, column("val_dice_segmentation"), (30, 80, 220), "F_S"),
                        (steps, column("val_dice_registration"), (30, 160, 60), "F_R warped"),
                        (steps, column("val_dice_affine"), (150, 150, 150), "affine only")], width, height,
                       title="Validation Dice", xlabel="step", ylabel="Dice", xmax=last, ymax=1.0)
    rgb = np.concatenate([left, np.full((height, 10, 3), 255, np.uint8), right], axis=1)
    atomic_write(lambda tmp: sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), tmp), path)
    return path


def train_deepatlas(atlas_set: AtlasSet, output: str | Path, architecture: DeepAtlasConfig | None = None,
                    config: DeepAtlasTrainConfig | None = None, cache_dir: str | Path | None = None,
                    device: str = "auto", resume: bool = False, train_ids: Sequence[str] | None = None,
                    log: Callable[[str], None] = print, show_progress: bool = True,
                    pretraining_dir: str | Path | None = None) -> DeepAtlasTrainResult:
    """Train DeepAtlas on an atlas set (see the module docstring and :class:`DeepAtlasTrainConfig`;
    ``pretraining_dir``: share F_R's unsupervised pretraining with other runs there)."""
    architecture = architecture or DeepAtlasConfig(len(atlas_set.labels), len(atlas_set.modalities))
    trainer = DeepAtlasTrainer(atlas_set, output, architecture, config or DeepAtlasTrainConfig(), cache_dir, device,
                               train_ids, log, show_progress, pretraining_dir)
    return trainer.run(resume)


def train_method(atlas_set, output, architecture, training, *, device="auto", resume=False, cache_dir=None,
                 train_ids=None, log=print, show_progress=True) -> DeepAtlasTrainResult:
    """Registry entry point (see :func:`train_deepatlas`)."""
    return train_deepatlas(atlas_set, output, architecture, training, cache_dir, device, resume, train_ids, log,
                           show_progress)

