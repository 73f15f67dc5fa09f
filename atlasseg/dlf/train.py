"""DLF training: registration cache, atlas re-draws per epoch, patches, augmentation, generalized Dice loss,
AdamW with a step or cosine schedule, fixed seeds, atomic checkpoints and resume, CSV log and PNG curves.

The output folder is the model folder (see :mod:`atlasseg.dlf.model_io`), written after every epoch with the
best weights so far (by validation Dice), plus ``training_log.csv``, ``training_curves.png`` and
``checkpoint.pt`` (model, optimizer, history; read back with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import copy
import csv
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..atlas import AtlasSet
from ..device import resolve_device
from ..io import atomic_write
from ..progress import Progress
from .data import (
    AugmentConfig,
    Augmenter,
    CaseTensors,
    RegistrationCache,
    atomic_write_bytes,
    candidate_pools,
    draw_atlases,
    sample_patch,
)
from .inference import predict
from .losses import deep_supervision_loss, loss_function
from .model_io import save_model
from .networks import DLFConfig, build_model, coordinate_maps

CHECKPOINT = "checkpoint.pt"
LOG = "training_log.csv"
CURVES = "training_curves.png"


class TrainingError(ValueError):
    """A training run that cannot start or resume; the message names the folder or file."""


@dataclass
class TrainConfig:
    """Training settings (epochs count passes over the training targets; one step = one target patch x N atlases).

    ``candidates_per_target``: atlases registered (and cached) per training target, drawn once from the pool
    without the target; every epoch re-draws ``n_atlases`` of them (None: the whole pool, i.e. every pair).
    ``step_milestones``: fractions of ``epochs`` where the step schedule multiplies the rate by ``step_gamma``.
    ``val_interval``: validate (whole-volume sliding windows) every that many epochs and after the last one; the
    model folder keeps the best validated weights.
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
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"schedule must be 'step' or 'cosine', got {self.schedule!r}")
        if self.loss not in ("gdl", "gdl_ce"):
            raise ValueError(f"loss must be 'gdl' or 'gdl_ce', got {self.loss!r}")
        if self.epochs < 1 or self.n_atlases < 0 or self.val_interval < 1:
            raise ValueError("epochs and val_interval must be >= 1 and n_atlases >= 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

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
    epochs_run: int = 0  # epochs trained by this call (0: the checkpoint was already complete)


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


def _write_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[-1]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def plot_curves(rows: list[dict], path: Path, width: int = 360, height: int = 220) -> Path:
    """PNG of training loss (left, red) and validation Dice (right, blue; majority voting on the same validation
    targets as a grey line) per epoch; axes from 0 to the maximum (loss) or 0..1 (Dice)."""

    def panel(series: list[tuple[list[float], tuple[int, int, int]]], top: float) -> np.ndarray:
        img = np.full((height, width, 3), 255, np.uint8)
        img[height - 20, 20:width - 10] = 0
        img[10:height - 19, 20] = 0
        n = max(len(s) for s, _ in series)
        for values, colour in series:
            pts = [(i, v) for i, v in enumerate(values) if v == v]
            if not pts:
                continue
            xs = np.array([20 + (width - 35) * (i / max(n - 1, 1)) for i, _ in pts])
            ys = np.array([height - 20 - (height - 35) * min(max(v / top, 0.0), 1.0) for _, v in pts])
            if len(xs) == 1:
                xs, ys = np.repeat(xs, 2), np.repeat(ys, 2)
            t = np.linspace(0, len(xs) - 1, 40 * len(xs))
            px, py = np.interp(t, np.arange(len(xs)), xs), np.interp(t, np.arange(len(ys)), ys)
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    img[np.clip(np.round(py).astype(int) + dy, 0, height - 1),
                        np.clip(np.round(px).astype(int) + dx, 0, width - 1)] = colour
        return img

    loss = [float(r["train_loss"]) for r in rows]
    dice = [float(r["val_dice"]) for r in rows]
    majority = [float(r.get("val_dice_majority", "nan")) for r in rows]
    left = panel([(loss, (220, 30, 30))], max(max(loss), 1e-6) * 1.05)
    right = panel([(majority, (150, 150, 150)), (dice, (30, 80, 220))], 1.0)
    rgb = np.concatenate([left, np.full((height, 10, 3), 255, np.uint8), right], axis=1)
    atomic_write(lambda tmp: sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), tmp), path)
    return path


def _save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged files
        raise TrainingError(f"{path}: unreadable checkpoint ({str(err).splitlines()[0][:200]})") from None


def _model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class Trainer:
    """One training run over an atlas set (targets and atlases from the same set, ``train_ids`` restricting it)."""

    def __init__(self, atlas_set: AtlasSet, output: str | Path, architecture: DLFConfig, config: TrainConfig,
                 cache_dir: str | Path | None = None, device: str = "auto", train_ids: Sequence[str] | None = None,
                 log: Callable[[str], None] = print, show_progress: bool = True):
        self.atlas_set, self.output = atlas_set, Path(output)
        self.architecture, self.config = architecture, config
        self.device = resolve_device(device)
        self.cache_dir = Path(cache_dir) if cache_dir else self.output / "registration_cache"
        self.log, self.show_progress = log, show_progress
        ids = sorted(train_ids) if train_ids is not None else sorted(atlas_set.case_ids)
        self.train_ids, self.val_ids = split_targets(ids, config.val_fraction, config.seed)
        self.uses_atlases = architecture.kind == "dlf"
        if any(p % architecture.divisor for p in config.patch_size):
            raise TrainingError(f"patch size {config.patch_size} must be a multiple of {architecture.divisor} "
                                "(the U-Nets' downsampling)")
        if self.uses_atlases and config.n_atlases < 1:
            raise TrainingError("DLF needs at least one atlas per target (n_atlases >= 1)")

    # -- data --------------------------------------------------------------------------------------------------
    def _pools(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        if not self.uses_atlases:
            return {t: [] for t in self.train_ids}, {t: [] for t in self.val_ids}
        train = candidate_pools(self.train_ids, self.train_ids, self.config.candidates_per_target, self.config.seed)
        val_rng = np.random.default_rng([self.config.seed, 7])
        val = {t: sorted(draw_atlases(self.train_ids, self.config.n_atlases, val_rng)) for t in self.val_ids}
        return train, val

    def prepare_data(self, progress=None) -> None:
        """Register (once, cached) and load every target with its candidate atlases."""
        train_pools, val_pools = self._pools()
        cache = RegistrationCache(self.cache_dir, self.atlas_set, self.config.backend, self.config.preset,
                                  self.device)
        computed = cache.ensure({**train_pools, **val_pools}, progress)
        self.log(f"registration cache {self.cache_dir}: {computed} new registration(s)")
        self.train_cases = [cache.load(t, train_pools[t]) for t in self.train_ids]
        self.val_cases = [cache.load(t, val_pools[t]) for t in self.val_ids]
        self.n_registered_pairs = sum(len(p) for p in train_pools.values()) + sum(len(p) for p in val_pools.values())

    # -- steps -------------------------------------------------------------------------------------------------
    def _batch(self, case: CaseTensors, rng: np.random.Generator, augmenter: Augmenter) -> dict[str, torch.Tensor]:
        rows: list[int] = []
        if self.uses_atlases:
            ids = draw_atlases(list(range(len(case.atlas_ids))), self.config.n_atlases, rng)
            rows = [int(i) for i in ids]
        coords = coordinate_maps(tuple(case.target.shape[1:]))
        sample = sample_patch(case, coords, rows, self.config.patch_size, self.config.foreground_ratio, rng)
        sample = augmenter(sample)
        return {k: v[None].to(self.device) for k, v in sample.items()}

    def _loss(self, model, loss_fn, batch) -> torch.Tensor:
        out = model(batch["target"], batch["atlas_images"], batch["atlas_labels"], batch["coords"])
        heads = [out.logits] + list(out.deep_supervision)
        return deep_supervision_loss(loss_fn, heads, batch["label"], self.architecture.deep_supervision_weights)

    def validate(self, model) -> tuple[float, list[float]]:
        """Mean foreground Dice (and per label) of whole-volume sliding-window predictions on validation targets."""
        if not self.val_cases:
            return float("nan"), []
        per_label = []
        for case in self.val_cases:
            pred = predict(model, case.target, case.atlas_images, case.atlas_labels, self.config.patch_size,
                           self.config.overlap, device=self.device)
            per_label.append(dice_per_label(pred.segmentation_index, case.label, self.architecture.n_labels))
        per = np.mean(np.asarray(per_label), axis=0)
        model.train()
        return float(per.mean()), [float(x) for x in per]

    def majority_val_dice(self) -> float:
        if not self.val_cases or not self.uses_atlases:
            return float("nan")
        scores = []
        for case in self.val_cases:
            counts = torch.nn.functional.one_hot(case.atlas_labels, self.architecture.n_labels).sum(0)
            scores.append(np.mean(dice_per_label(counts.argmax(-1), case.label, self.architecture.n_labels)))
        return float(np.mean(scores))

    # -- run ---------------------------------------------------------------------------------------------------
    def _identity(self) -> dict:
        """What a resumed run must share with the interrupted one (everything but the number of epochs)."""
        training = {k: v for k, v in self.config.to_dict().items() if k != "epochs"}
        return {"architecture": self.architecture.to_dict(), "training": training,
                "atlas_set": self.atlas_set.name, "train_ids": self.train_ids, "val_ids": self.val_ids}

    def run(self, resume: bool = False) -> TrainResult:
        cfg = self.config
        checkpoint_path = self.output / CHECKPOINT
        if checkpoint_path.exists() and not resume:
            raise TrainingError(f"{checkpoint_path}: a training run exists in this folder; pass --resume to "
                                "continue it or choose another output folder")
        if resume and not checkpoint_path.is_file():
            raise TrainingError(f"{checkpoint_path}: nothing to resume (no checkpoint in {self.output})")
        state = _load_checkpoint(checkpoint_path) if resume else None
        if state is not None and _comparable(_with_defaults(state.get("identity"))) != _comparable(self._identity()):
            raise TrainingError(f"{checkpoint_path}: the checkpoint was written with other settings (architecture, "
                                "training config or data split); resume with the same settings")
        self.output.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        model = build_model(self.architecture).to(self.device)
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
        progress = Progress([("registration", 0.2), ("training", 0.8)], enabled=self.show_progress)
        self.prepare_data(progress.stage("registration"))
        loss_fn = loss_function(cfg.loss)
        augmenter = Augmenter(cfg.augment)
        majority = self.majority_val_dice()
        steps_per_epoch = len(self.train_cases) * cfg.patches_per_target
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            model.train()
            for group in optimizer.param_groups:
                group["lr"] = cfg.learning_rate_at(epoch)
            torch.manual_seed(cfg.seed * 100003 + epoch)
            rng = np.random.default_rng([cfg.seed, epoch])
            augmenter.set_seed(cfg.seed * 100003 + epoch)
            losses = []
            order = [int(i) for i in rng.permutation(len(self.train_cases))] * cfg.patches_per_target
            for step, k in enumerate(order):
                batch = self._batch(self.train_cases[k], rng, augmenter)
                loss = self._loss(model, loss_fn, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                progress.stage("training")((epoch - start_epoch + (step + 1) / steps_per_epoch)
                                           / (cfg.epochs - start_epoch),
                                           f"epoch {epoch + 1}/{cfg.epochs} loss {np.mean(losses):.4f}")
            validate = (epoch + 1) % cfg.val_interval == 0 or epoch + 1 == cfg.epochs
            val_dice, val_per_label = self.validate(model) if validate else \
                (float("nan"), [float("nan")] * (self.architecture.n_labels - 1))
            seconds = time.perf_counter() - t0
            elapsed += seconds
            row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_dice": val_dice,
                   "val_dice_majority": majority, "learning_rate": cfg.learning_rate_at(epoch),
                   "seconds": seconds}
            row.update({f"val_dice_{self.atlas_set.labels[v]}": d
                        for v, d in zip(self.atlas_set.label_values[1:], val_per_label)})
            history.append(row)
            if not self.val_cases or (validate and val_dice >= best["dice"]):
                best = {"dice": val_dice, "state": _model_state(model), "epoch": epoch + 1}
            self.log(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}  val Dice {val_dice:.4f} "
                     f"(majority voting {majority:.4f})  {seconds:.1f}s")
            self._write_epoch(model, optimizer, history, best, epoch + 1, elapsed)
        progress.done("training done")
        return TrainResult(self.output, history, best["dice"], elapsed, cfg.epochs - start_epoch)

    def _write_epoch(self, model, optimizer, history, best, epoch: int, elapsed: float) -> None:
        """Model folder (best weights), CSV log, PNG curves, then the checkpoint (all atomic)."""
        best_model = build_model(self.architecture)
        best_model.load_state_dict(best["state"] if best["state"] is not None else _model_state(model))
        last = history[-1]
        extra = {
            "patch_size": list(self.config.patch_size), "overlap": self.config.overlap,
            "registration": {"backend": self.config.backend, "preset": self.config.preset},
            "training": {"atlas_set": self.atlas_set.name, "atlas_root": str(self.atlas_set.root),
                         "train_targets": len(self.train_ids), "val_targets": len(self.val_ids),
                         "train_ids": self.train_ids, "val_ids": self.val_ids,
                         "registered_pairs": self.n_registered_pairs, "epochs_completed": epoch,
                         "seconds": elapsed, "device": str(self.device), "config": self.config.to_dict()},
            "validation": {"best_epoch": best["epoch"], "best_mean_dice": best["dice"],
                           "last_mean_dice": last["val_dice"], "majority_voting_mean_dice":
                               last["val_dice_majority"],
                           "per_label_last": {k[len("val_dice_"):]: v for k, v in last.items()
                                              if k.startswith("val_dice_") and k != "val_dice_majority"}},
        }
        save_model(self.output, best_model, self.atlas_set.labels, self.atlas_set.modalities,
                   self.config.n_atlases, extra)
        _write_csv(history, self.output / LOG)
        plot_curves(history, self.output / CURVES)
        _save_checkpoint(self.output / CHECKPOINT, {
            "identity": self._identity(), "epoch": epoch, "seconds": elapsed, "history": history,
            "model": _model_state(model), "optimizer": copy.deepcopy(optimizer.state_dict()),
            "best_model": best["state"], "best_dice": float(best["dice"]), "best_epoch": best["epoch"]})


def _with_defaults(identity: dict | None) -> dict | None:
    """A saved run identity with the settings added since it was written filled in at their defaults (an older
    checkpoint stays resumable)."""
    if not identity or "training" not in identity:
        return identity
    defaults = {k: v for k, v in TrainConfig().to_dict().items() if k != "epochs"}
    return {**identity, "training": {**defaults, **identity["training"]}}


ATLAS_ONLY_SETTINGS = ("n_atlases", "candidates_per_target")


def _comparable(identity: dict | None) -> dict | None:
    """A run identity without the atlas-sampling settings when the model uses no atlases (a plain U-Net): they do
    not change its training, so a U-Net trained beside one DLF configuration is reused beside another."""
    if not identity or identity.get("architecture", {}).get("kind") == "dlf" or "training" not in identity:
        return identity
    training = {k: v for k, v in identity["training"].items() if k not in ATLAS_ONLY_SETTINGS}
    return {**identity, "training": training}


def train(atlas_set: AtlasSet, output: str | Path, architecture: DLFConfig | None = None,
          config: TrainConfig | None = None, cache_dir: str | Path | None = None, device: str = "auto",
          resume: bool = False, train_ids: Sequence[str] | None = None, log: Callable[[str], None] = print,
          show_progress: bool = True) -> TrainResult:
    """Train a DLF model (or the plain U-Net, ``architecture.kind == "unet"``) on an atlas set; see :class:`Trainer`.

    The architecture defaults to the paper's (32/64/128 and 32/64/128/256 channels) with the atlas set's labels and
    modalities.
    """
    architecture = architecture or DLFConfig(n_labels=len(atlas_set.labels), n_modalities=len(atlas_set.modalities))
    if architecture.n_labels != len(atlas_set.labels) or architecture.n_modalities != len(atlas_set.modalities):
        raise TrainingError(f"architecture for {architecture.n_labels} labels / {architecture.n_modalities} "
                            f"modalities, atlas set '{atlas_set.name}' has {len(atlas_set.labels)} / "
                            f"{len(atlas_set.modalities)}")
    trainer = Trainer(atlas_set, output, architecture, config or TrainConfig(), cache_dir, device, train_ids, log,
                      show_progress)
    return trainer.run(resume)
