"""The one training loop: optimiser, schedule, mixed precision on CUDA, seeds, atomic checkpoints and resume,
validation every K epochs, CSV log, PNG curves, progress, peak memory.

A method subclasses :class:`Trainer` and fills in the hooks (build the model, prepare the data, make a batch,
compute the loss, predict a validation case, save the model folder). The output folder is the model folder,
rewritten after every epoch with the best weights so far (by validation Dice), plus ``training_log.csv``,
``training_curves.png`` and ``checkpoint.pt`` (model, optimizer, history; read back with
``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from ..atlas import AtlasSet
from ..config import to_dict
from ..device import resolve_device
from ..io import atomic_write, atomic_write_bytes
from ..losses import LOSS_NAMES
from ..memory import PeakMemory
from ..methods import BACKENDS, REGISTRATION_PRESETS
from ..progress import Progress
from .data import AugmentConfig, Augmenter, CaseTensors

CHECKPOINT = "checkpoint.pt"
LOG = "training_log.csv"
CURVES = "training_curves.png"


class TrainingError(ValueError):
    """A training run that cannot start or resume; the message names the folder or file."""


@dataclass
class TrainConfig:
    """Training settings shared by every trainable method (an epoch is one pass over the training targets;
    one step = one target patch, with N atlases for atlas-based methods).

    ``candidates_per_target``: atlases registered (and cached) per training target, drawn once from the pool
    without the target; every epoch re-draws ``n_atlases`` of them (None: the whole pool). Both are ignored by
    methods without atlases. ``step_milestones``: fractions of ``epochs`` where the step schedule multiplies the
    rate by ``step_gamma``. ``val_interval``: validate (whole-volume sliding windows) every that many epochs and
    after the last one; the model folder keeps the best validated weights. ``loss``: ``gdl`` (generalized Dice),
    ``gdl_ce`` (+ cross-entropy), ``vnet_dice`` (V-Net's squared-denominator Dice), ``ce_mfb`` (cross-entropy with
    median-frequency class balancing). ``mixed_precision``: bfloat16 autocast, on CUDA only (off by default:
    numbers stay those of fp32).
    """

    epochs: int = 20
    n_atlases: int = 5
    patch_size: tuple[int, int, int] = (48, 48, 48)
    foreground_ratio: float = 0.67
    patches_per_target: int = 1
    learning_rate: float = 5e-4
    weight_decay: float = 1e-4
    schedule: str = "step"
    step_milestones: tuple[float, ...] = (0.5, 0.75, 0.9)
    step_gamma: float = 0.2
    loss: str = "gdl_ce"
    val_fraction: float = 0.1
    candidates_per_target: int | None = None
    seed: int = 0
    backend: str = "torch"
    preset: str = "default"
    overlap: float = 0.5
    val_interval: int = 1
    mixed_precision: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.step_milestones = tuple(float(m) for m in self.step_milestones)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive sizes (Z, Y, X), got {self.patch_size}")
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"schedule must be 'step' or 'cosine', got {self.schedule!r}")
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"loss must be one of {', '.join(LOSS_NAMES)}, got {self.loss!r}")
        if self.epochs < 1 or self.n_atlases < 0 or self.val_interval < 1:
            raise ValueError("epochs and val_interval must be >= 1 and n_atlases >= 0")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.preset not in REGISTRATION_PRESETS:
            raise ValueError(f"preset must be one of {', '.join(REGISTRATION_PRESETS)}, got {self.preset!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    def to_dict(self) -> dict:
        return to_dict(self)

    def learning_rate_at(self, epoch: int) -> float:
        """Learning rate of 0-based ``epoch``."""
        if self.schedule == "cosine":
            return self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        drops = sum(epoch >= int(round(m * self.epochs)) for m in self.step_milestones)
        return self.learning_rate * self.step_gamma ** drops


@dataclass
class TrainResult:
    folder: Path
    history: list[dict]
    best_val_dice: float
    seconds: float
    epochs_run: int = 0      # epochs trained by this call (0: the checkpoint was already complete)
    peak_rss_gib: float = float("nan")
    peak_cuda_gib: float = 0.0


def dice_per_label(prediction: torch.Tensor, reference: torch.Tensor, n_labels: int) -> list[float]:
    """Dice of label indices 1..L-1 between two (Z, Y, X) index maps (1.0 where both are empty)."""
    out = []
    for lab in range(1, n_labels):
        p, r = prediction == lab, reference == lab
        denom = int(p.sum()) + int(r.sum())
        out.append(1.0 if denom == 0 else 2.0 * int((p & r).sum()) / denom)
    return out


def split_targets(case_ids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(training, validation) ids: a seeded random ``val_fraction`` share (at least one when > 0) for validation."""
    ids = sorted(case_ids)
    n_val = 0 if val_fraction <= 0 else max(1, int(round(val_fraction * len(ids))))
    if n_val >= len(ids) - 1 and n_val > 0:
        raise TrainingError(f"{len(ids)} cases are too few for a validation fraction of {val_fraction}")
    val = sorted(str(x) for x in np.random.default_rng([seed, 99]).choice(ids, n_val, replace=False)) \
        if n_val else []
    return [i for i in ids if i not in set(val)], val


def write_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[-1]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def plot_curves(rows: list[dict], path: Path, width: int = 360, height: int = 240) -> Path:
    """PNG of the training curves: two ``width`` x ``height`` panels side by side, 10 pixels apart, so the image
    is ``2 * width + 10`` pixels wide and ``height`` tall. Left, "Training loss": the loss per epoch (red), y from 0
    to just above the largest loss. Right, "Validation Dice": validation Dice (blue) and the method's baseline on
    the same validation targets (majority voting, row key ``val_dice_majority``, grey, when there is one), y 0..1.
    Both have x from epoch 0 to the last epoch, axis labels ("epoch"; "loss" / "Dice"), tick labels with the
    numbers at both axis ends, and a legend."""
    from ..render import line_chart  # keeps the font and layout beside the montage code

    epochs = [float(r.get("epoch", i + 1)) for i, r in enumerate(rows)]
    loss = [float(r["train_loss"]) for r in rows]
    dice = [float(r["val_dice"]) for r in rows]
    baseline = [float(r.get("val_dice_majority", "nan")) for r in rows]
    last = max(epochs, default=1.0)
    left = line_chart([(epochs, loss, (220, 30, 30), "training loss")], width, height, title="Training loss",
                      xlabel="epoch", ylabel="loss", xmax=last)
    right = line_chart([(epochs, dice, (30, 80, 220), "validation Dice"),
                        (epochs, baseline, (150, 150, 150), "majority voting")], width, height,
                       title="Validation Dice", xlabel="epoch", ylabel="Dice", xmax=last, ymax=1.0)
    rgb = np.concatenate([left, np.full((height, 10, 3), 255, np.uint8), right], axis=1)
    atomic_write(lambda tmp: sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), tmp), path)
    return path


def save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged files
        raise TrainingError(f"{path}: unreadable checkpoint ({str(err).splitlines()[0][:200]})") from None


def _plain(identity: dict) -> dict:
    """An identity as JSON would hold it (tuples and lists compare equal; older checkpoints kept tuples)."""
    return json.loads(json.dumps(identity, default=str))


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class Trainer:
    """Generic training over an atlas set's cases (``train_ids`` restricting it); a method fills in the hooks.

    Hooks: :meth:`build_model`, :meth:`architecture_dict`, :meth:`prepare_data` (sets ``train_cases`` /
    ``val_cases``), :meth:`make_batch`, :meth:`compute_loss`, :meth:`predict_index`, :meth:`save_model`; optional
    :meth:`baseline_val_dice` (e.g. majority voting, drawn grey in the curves) and :meth:`comparable_identity`.
    """

    method = "?"

    def __init__(self, atlas_set: AtlasSet, output: str | Path, config: TrainConfig, device: str = "auto",
                 train_ids: Sequence[str] | None = None, log: Callable[[str], None] = print,
                 show_progress: bool = True):
        self.atlas_set, self.output, self.config = atlas_set, Path(output), config
        self.device = resolve_device(device)
        self.log, self.show_progress = log, show_progress
        ids = sorted(train_ids) if train_ids is not None else sorted(atlas_set.case_ids)
        self.train_ids, self.val_ids = split_targets(ids, config.val_fraction, config.seed)
        self.n_labels = len(atlas_set.labels)
        self.train_cases: list[CaseTensors] = []
        self.val_cases: list[CaseTensors] = []

    # -- hooks ---------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def architecture_dict(self) -> dict:
        raise NotImplementedError

    def prepare_data(self, progress: Callable[[float, str], None] | None = None) -> None:
        raise NotImplementedError

    def make_batch(self, case: CaseTensors, rng: np.random.Generator, augmenter: Augmenter) -> dict:
        raise NotImplementedError

    def compute_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def predict_index(self, model: nn.Module, case: CaseTensors) -> torch.Tensor:
        """(Z, Y, X) label indices of a whole validation case."""
        raise NotImplementedError

    def save_model(self, model: nn.Module, extra: dict) -> None:
        raise NotImplementedError

    def baseline_val_dice(self) -> float:
        return float("nan")

    def comparable_identity(self, identity: dict) -> dict:
        """The part of a run identity that must match for a resume (default: all of it)."""
        return identity

    # -- validation ----------------------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> tuple[float, list[float]]:
        """Mean foreground Dice (and per label) of whole-volume predictions on the validation targets."""
        if not self.val_cases:
            return float("nan"), []
        per_label = [dice_per_label(self.predict_index(model, case), case.label, self.n_labels)
                     for case in self.val_cases]
        per = np.mean(np.asarray(per_label), axis=0)
        model.train()
        return float(per.mean()), [float(x) for x in per]

    # -- run -----------------------------------------------------------------------------------------------
    def identity(self) -> dict:
        """What a resumed run must share with the interrupted one (everything but the number of epochs)."""
        training = {k: v for k, v in self.config.to_dict().items() if k != "epochs"}
        return {"method": self.method, "architecture": self.architecture_dict(), "training": training,
                "atlas_set": self.atlas_set.name, "train_ids": self.train_ids, "val_ids": self.val_ids}

    def _with_defaults(self, identity: dict | None) -> dict | None:
        """A saved identity with settings added since it was written filled in at their defaults (older
        checkpoints stay resumable)."""
        if not identity or "training" not in identity:
            return identity
        defaults = {k: v for k, v in TrainConfig().to_dict().items() if k != "epochs"}
        return {"method": self.method, **identity, "training": {**defaults, **identity["training"]}}

    def _autocast(self):
        if self.device.type == "cuda" and self.config.mixed_precision:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run(self, resume: bool = False) -> TrainResult:
        with PeakMemory() as memory:
            result = self._run(resume)
        result.peak_rss_gib, result.peak_cuda_gib = memory.gib, memory.cuda_gib
        return result

    def _resume_state(self, resume: bool) -> dict | None:
        checkpoint_path = self.output / CHECKPOINT
        if checkpoint_path.exists() and not resume:
            raise TrainingError(f"{checkpoint_path}: a training run exists in this folder; pass --resume to "
                                "continue it or choose another output folder")
        if resume and not checkpoint_path.is_file():
            raise TrainingError(f"{checkpoint_path}: nothing to resume (no checkpoint in {self.output})")
        state = load_checkpoint(checkpoint_path) if resume else None
        if state is not None:
            saved = self.comparable_identity(_plain(self._with_defaults(state.get("identity")) or {}))
            if saved != self.comparable_identity(_plain(self.identity())):
                raise TrainingError(f"{checkpoint_path}: the checkpoint was written with other settings (method, "
                                    "architecture, training config or data split); resume with the same settings")
        return state

    def _run(self, resume: bool) -> TrainResult:
        cfg = self.config
        state = self._resume_state(resume)
        self.output.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        model = self.build_model().to(self.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        history: list[dict] = []
        best = {"dice": -1.0, "state": None, "epoch": 0}
        start_epoch, elapsed = 0, 0.0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            history, start_epoch, elapsed = list(state["history"]), int(state["epoch"]), float(state["seconds"])
            best = {"dice": float(state["best_dice"]), "state": state["best_model"], "epoch": int(state["best_epoch"])}
            self.log(f"resuming {self.output} after epoch {start_epoch}")
        if start_epoch >= cfg.epochs:
            self.log(f"{self.output}: already trained for {start_epoch} epoch(s)")
            return TrainResult(self.output, history, best["dice"], elapsed, 0)
        progress = Progress([("data", 0.2), ("training", 0.8)], enabled=self.show_progress)
        self.prepare_data(progress.stage("data"))
        augmenter = Augmenter(cfg.augment)
        baseline = self.baseline_val_dice()
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            losses = self._train_epoch(model, optimizer, augmenter, epoch, start_epoch, progress)
            validate = (epoch + 1) % cfg.val_interval == 0 or epoch + 1 == cfg.epochs
            val_dice, val_per_label = self.validate(model) if validate else \
                (float("nan"), [float("nan")] * (self.n_labels - 1))
            seconds = time.perf_counter() - t0
            elapsed += seconds
            row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_dice": val_dice,
                   "val_dice_majority": baseline, "learning_rate": cfg.learning_rate_at(epoch), "seconds": seconds}
            row.update({f"val_dice_{self.atlas_set.labels[v]}": d
                        for v, d in zip(self.atlas_set.label_values[1:], val_per_label)})
            history.append(row)
            if not self.val_cases or (validate and val_dice >= best["dice"]):
                best = {"dice": val_dice, "state": model_state(model), "epoch": epoch + 1}
            self.log(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}  val Dice {val_dice:.4f} "
                     f"(baseline {baseline:.4f})  {seconds:.1f}s")
            self._write_epoch(model, optimizer, history, best, epoch + 1, elapsed)
        progress.done("training done")
        return TrainResult(self.output, history, best["dice"], elapsed, cfg.epochs - start_epoch)

    def _train_epoch(self, model, optimizer, augmenter, epoch: int, start_epoch: int, progress) -> list[float]:
        cfg = self.config
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = cfg.learning_rate_at(epoch)
        torch.manual_seed(cfg.seed * 100003 + epoch)
        rng = np.random.default_rng([cfg.seed, epoch])
        augmenter.set_seed(cfg.seed * 100003 + epoch)
        losses = []
        order = [int(i) for i in rng.permutation(len(self.train_cases))] * cfg.patches_per_target
        for step, k in enumerate(order):
            batch = self.make_batch(self.train_cases[k], rng, augmenter)
            with self._autocast():
                loss = self.compute_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            progress.stage("training")((epoch - start_epoch + (step + 1) / len(order)) / (cfg.epochs - start_epoch),
                                       f"epoch {epoch + 1}/{cfg.epochs} loss {np.mean(losses):.4f}")
        return losses

    def training_summary(self, epoch: int, elapsed: float) -> dict:
        return {"method": self.method, "atlas_set": self.atlas_set.name, "atlas_root": str(self.atlas_set.root),
                "train_targets": len(self.train_ids), "val_targets": len(self.val_ids), "train_ids": self.train_ids,
                "val_ids": self.val_ids, "epochs_completed": epoch, "seconds": elapsed, "device": str(self.device),
                "config": self.config.to_dict()}

    def _write_epoch(self, model, optimizer, history, best, epoch: int, elapsed: float) -> None:
        """Model folder (best weights), CSV log, PNG curves, then the checkpoint (all atomic)."""
        best_model = self.build_model()
        best_model.load_state_dict(best["state"] if best["state"] is not None else model_state(model))
        last = history[-1]
        extra = {
            "patch_size": list(self.config.patch_size), "overlap": self.config.overlap,
            "training": self.training_summary(epoch, elapsed),
            "validation": {"best_epoch": best["epoch"], "best_mean_dice": best["dice"],
                           "last_mean_dice": last["val_dice"], "majority_voting_mean_dice": last["val_dice_majority"],
                           "per_label_last": {k[len("val_dice_"):]: v for k, v in last.items()
                                              if k.startswith("val_dice_") and k != "val_dice_majority"}},
        }
        self.save_model(best_model, extra)
        write_csv(history, self.output / LOG)
        plot_curves(history, self.output / CURVES)
        save_checkpoint(self.output / CHECKPOINT, {
            "identity": self.identity(), "epoch": epoch, "seconds": elapsed, "history": history,
            "model": model_state(model), "optimizer": copy.deepcopy(optimizer.state_dict()),
            "best_model": best["state"], "best_dice": float(best["dice"]), "best_epoch": best["epoch"]})
