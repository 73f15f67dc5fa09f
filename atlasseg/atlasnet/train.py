"""AtlasNet training: choose N atlases, register every training case to every atlas (cached), train one plain
segmenter per atlas space with the shared trainer, then write the AtlasNet model folder.

Layout of the output folder::

    config.json, model.safetensors     the AtlasNet model (all N networks), method "atlasnet"
    atlases.safetensors                the atlases' normalised images and label indices (sha256 in config.json)
    networks/<k>_<atlas id>/           network k: a segmenter model folder in atlas k's space, with its own
                                       checkpoint, log and curves (resumable; a finished one is reused)
    registration_cache/                the registration cache (unless ``cache_dir`` is given)

Network k is trained on every training case pulled into atlas k's space, the atlas itself included (on its own
grid, no registration): the paper trains each network on all training images, and the atlas registered to itself
is the identity. Validation cases are pulled into atlas space the same way. Network k trains with seed
``config.seed + k`` (its own initial weights, patches and augmentation, as independently trained networks have);
the training/validation split is the model's, drawn with ``config.seed``.

Augmentation as in the paper: small rotations (+-10 degrees) and translations, no elastic deformation, no flips,
no intensity changes (:data:`ATLASNET_AUGMENT`, the default of :class:`AtlasNetTrainConfig`). Translations come
from the random placement of training patches in the volume (the networks are fully convolutional, so a shifted
image and a shifted window are the same sample); patches should therefore be smaller than the atlas grid.
Median-frequency class balancing as in the paper: ``TrainConfig(loss="ce_mfb")``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..atlas import AtlasSet
from ..cache import RegistrationCache
from ..io import Geometry, safe_name
from ..model_io import CONFIG, load_model, save_model
from ..segmenter import SegmenterConfig, SegmenterTrainer
from ..training import CHECKPOINT, AugmentConfig, CaseTensors, TrainConfig, TrainingError, TrainResult, split_targets
from .model import AtlasNetConfig, AtlasNetModel, StoredAtlas, read_json, save_atlases
from .selection import select_atlases

__all__ = ["ATLASNET_AUGMENT", "AtlasNetTrainConfig", "AtlasNetTrainResult", "AtlasSpaceTrainer", "atlasnet_training",
           "network_folder", "train_atlasnet", "train_method"]

ATLASNET_AUGMENT = AugmentConfig(histogram_shift_prob=0.0, modality_noise_prob=0.0, flip_prob=0.0,
                                 rotate_range=math.radians(10.0), elastic_magnitude=(0.0, 0.0), spatial_prob=0.5,
                                 noise_prob=0.0)
"""The paper's augmentation: rotations within +-10 degrees (radians here; half of the patches), no elastic
deformation, no flips, no intensity augmentation (translations: random patch placement)."""


@dataclass
class AtlasNetTrainConfig(TrainConfig):
    """:class:`~atlasseg.training.TrainConfig` whose default augmentation is the paper's (:data:`ATLASNET_AUGMENT`);
    the registry's training config of ``atlasnet``, so ``--print-config`` shows what runs."""

    augment: AugmentConfig = field(default_factory=lambda: replace(ATLASNET_AUGMENT))


def atlasnet_training(config: TrainConfig | None) -> TrainConfig:
    """The training config AtlasNet uses (default :class:`AtlasNetTrainConfig`); a given config is used as it is."""
    return config or AtlasNetTrainConfig()


def network_folder(output: str | Path, k: int, atlas_id: str) -> Path:
    """``output/networks/<k>_<atlas id>`` (file-system-safe id)."""
    return Path(output) / "networks" / f"{k}_{safe_name(atlas_id)}"


class AtlasSpaceTrainer(SegmenterTrainer):
    """A plain segmenter trained in one atlas's space: the training and validation cases are read from the
    registration cache, pulled into the atlas's grid (pair fixed=case, moving=atlas, part ``inverse``; labels
    label-aware); the atlas itself is used on its own grid. Everything else is :class:`SegmenterTrainer`'s."""

    method = "atlasnet"

    def __init__(self, atlas_set: AtlasSet, output: str | Path, architecture: SegmenterConfig, config: TrainConfig,
                 cache: RegistrationCache, atlas_id: str, device: str = "auto",
                 train_ids: Sequence[str] | None = None, log: Callable[[str], None] = print,
                 show_progress: bool = True, split: tuple[Sequence[str], Sequence[str]] | None = None):
        super().__init__(atlas_set, output, architecture, config, device, train_ids, log, show_progress)
        self.cache, self.atlas_id = cache, str(atlas_id)
        if split is not None:       # the model's split, shared by every network whatever its seed
            self.train_ids, self.val_ids = sorted(split[0]), sorted(split[1])

    def identity(self) -> dict:
        return {**super().identity(), "atlas": self.atlas_id,
                "registration": {"backend": self.cache.backend, "preset": self.cache.preset,
                                 "settings": self.cache.settings}}

    def prepare_data(self, progress=None) -> None:
        """Register (once, cached) every case to the atlas, then load them in atlas space."""
        ids = self.train_ids + self.val_ids
        pairs = {c: [self.atlas_id] for c in ids if c != self.atlas_id}
        pairs[self.atlas_id] = []
        computed = self.cache.ensure(pairs, None, parts=("inverse",))
        if computed:
            self.log(f"registration cache {self.cache.folder}: {computed} new registration(s) to {self.atlas_id}")
        super().prepare_data(progress)

    def _load(self, case_id: str, progress, k: int, total: int) -> CaseTensors:
        if progress:
            progress(k / total, f"loading {case_id} in the space of {self.atlas_id}")
        if case_id == self.atlas_id:
            image, label = self.cache.case(case_id)
        else:
            image, label = self.cache.load_inverse(case_id, self.atlas_id)
        if label is None:
            raise TrainingError(f"case {case_id} of atlas set '{self.atlas_set.name}' has no label")
        spatial = tuple(image.shape[1:])
        return CaseTensors(case_id, image.float(), label.long(), [], torch.zeros((0, image.shape[0], *spatial)),
                           torch.zeros((0, *spatial), dtype=torch.int64))

    def save_model(self, model, extra: dict) -> None:
        extra = {**extra, "atlasnet": {"atlas": self.atlas_id, "space": "atlas grid of this case (a network of an "
                                       "AtlasNet model; inputs must be pulled into this atlas's space)"},
                 "registration": {"backend": self.cache.backend, "preset": self.cache.preset}}
        save_model(self.output, "segmenter", model, self.architecture.to_dict(), self.atlas_set.labels,
                   self.atlas_set.modalities, 0, extra, backbones={"segmenter": self.architecture.spec().to_dict()})


@dataclass
class AtlasNetTrainResult(TrainResult):
    """A :class:`TrainResult` of the whole model (history rows carry ``network``; ``best_val_dice`` is the mean
    over networks, in atlas space) plus one per network."""

    networks: list[TrainResult] = field(default_factory=list)
    atlas_ids: list[str] = field(default_factory=list)


def _choose_atlases(atlas_set: AtlasSet, architecture: AtlasNetConfig, pool: Sequence[str],
                    cache: RegistrationCache, seed: int, log) -> tuple[list[str], dict]:
    if architecture.atlas_ids:
        missing = [a for a in architecture.atlas_ids if a not in set(atlas_set.case_ids)]
        if missing:
            raise ValueError(f"atlas id(s) {missing} not in atlas set '{atlas_set.name}'"
                             f"{f' ({atlas_set.root})' if atlas_set.root else ''}")
        ids = list(architecture.atlas_ids)
        return ids, {"rule": "given", "chosen": ids}
    if architecture.n_networks > len(pool):
        raise ValueError(f"n_networks={architecture.n_networks} is larger than the pool of {len(pool)} training "
                         f"case(s) of atlas set '{atlas_set.name}' (validation cases excluded)")
    ids, record = select_atlases(cache, pool, architecture.n_networks, architecture.dissimilarity,
                                 architecture.selection_pool, seed)
    log(f"atlases by k-medoids among {len(record['candidates'])} case(s): {ids}")
    return ids, record


def train_atlasnet(atlas_set: AtlasSet, output: str | Path, architecture: AtlasNetConfig | None = None,
                   config: TrainConfig | None = None, cache_dir: str | Path | None = None, device: str = "auto",
                   resume: bool = False, train_ids: Sequence[str] | None = None, log: Callable[[str], None] = print,
                   show_progress: bool = True) -> AtlasNetTrainResult:
    """Train an AtlasNet model on an atlas set (see the module docstring for the layout and choices).

    Args:
        architecture: the model (default: the atlas set's labels and modalities, 5 networks, k-medoids atlases).
        config: training settings of every network (epochs, patches, loss, ...; ``backend`` / ``preset``: the
            registration; default :class:`AtlasNetTrainConfig`, the paper's augmentation); ``n_atlases`` and
            ``candidates_per_target`` (DLF's) are not used: the number of atlases is ``architecture.n_networks``.
        cache_dir: registration cache (default ``output/registration_cache``).
        resume: continue: finished networks are reused, an interrupted one continues from its checkpoint.
        train_ids: restrict the cases (training and validation, split by ``config.val_fraction``).
    """
    t0 = time.perf_counter()
    architecture = architecture or AtlasNetConfig(len(atlas_set.labels), len(atlas_set.modalities))
    if architecture.n_labels != len(atlas_set.labels) or architecture.n_modalities != len(atlas_set.modalities):
        raise TrainingError(f"architecture for {architecture.n_labels} labels / {architecture.n_modalities} "
                            f"modalities, atlas set '{atlas_set.name}' has {len(atlas_set.labels)} / "
                            f"{len(atlas_set.modalities)}")
    config = atlasnet_training(config)
    output = Path(output)
    if not resume:
        existing = [p for p in (output / CONFIG, output / "networks") if p.exists()]
        if existing:
            raise TrainingError(f"{existing[0]}: an AtlasNet training run exists in {output}; pass --resume to "
                                "continue it or choose another output folder")
    ids = sorted(str(i) for i in (train_ids if train_ids is not None else atlas_set.case_ids))
    for i in ids:
        atlas_set.case(i)
    pool, val = split_targets(ids, config.val_fraction, config.seed)
    cache = RegistrationCache(Path(cache_dir) if cache_dir else output / "registration_cache", atlas_set,
                              config.backend, config.preset, device)
    atlas_ids, selection = _choose_atlases(atlas_set, architecture, pool, cache, config.seed, log)
    architecture = replace(architecture, atlas_ids=tuple(atlas_ids), n_networks=len(atlas_ids))
    output.mkdir(parents=True, exist_ok=True)
    segmenter = architecture.segmenter_config()
    pairs = {c: [a for a in atlas_ids if a != c] for c in ids}
    pairs.update({a: pairs.get(a, []) for a in atlas_ids})
    computed = cache.ensure(pairs, None, parts=("inverse",))
    log(f"registration cache {cache.folder}: {computed} new registration(s) of {len(ids)} case(s) to "
        f"{len(atlas_ids)} atlas(es)")

    results: list[TrainResult] = []
    for k, atlas_id in enumerate(atlas_ids):
        folder = network_folder(output, k, atlas_id)
        again = resume and (folder / CHECKPOINT).is_file()
        log(f"AtlasNet network {k + 1}/{len(atlas_ids)} in the space of {atlas_id}"
            f"{' (resuming)' if again else ''}")
        trainer = AtlasSpaceTrainer(atlas_set, folder, segmenter, replace(config, seed=config.seed + k), cache,
                                    atlas_id, device, ids, log, show_progress, split=(pool, val))
        results.append(trainer.run(again))

    _write_model(output, atlas_set, architecture, config, cache, atlas_ids, selection, pool, val)
    history = [{"network": k, **row} for k, r in enumerate(results) for row in r.history]
    dice = [r.best_val_dice for r in results if r.best_val_dice == r.best_val_dice]
    return AtlasNetTrainResult(output, history, float(np.mean(dice)) if dice else float("nan"),
                               time.perf_counter() - t0, sum(r.epochs_run for r in results),
                               max(r.peak_rss_gib for r in results),
                               max(r.peak_cuda_gib for r in results), results, list(atlas_ids))


def _write_model(output: Path, atlas_set: AtlasSet, architecture: AtlasNetConfig, config: TrainConfig,
                 cache: RegistrationCache, atlas_ids: Sequence[str], selection: dict, train_ids: Sequence[str],
                 val_ids: Sequence[str]) -> None:
    """Gather the N networks' best weights into one model, store the atlases, write config.json last."""
    model = AtlasNetModel(architecture)
    networks = []
    for k, atlas_id in enumerate(atlas_ids):
        folder = network_folder(output, k, atlas_id)
        loaded = load_model(folder, "cpu", method="segmenter")
        model.networks[k].load_state_dict(loaded.model.state_dict())
        summary = read_json(folder / CONFIG)
        networks.append({"index": k, "atlas": atlas_id, "folder": str(folder.relative_to(output)),
                         "weights_sha256": summary.get("weights_sha256"), "training": summary.get("training"),
                         "validation": summary.get("validation")})
    atlases = []
    for atlas_id in atlas_ids:
        image, label = cache.case(atlas_id)
        geometry = Geometry.from_dict(cache.manifest["cases"][atlas_id]["geometry"])
        atlases.append(StoredAtlas(atlas_id, image, label, geometry))
    extra = {"patch_size": list(config.patch_size), "overlap": config.overlap,
             "registration": {"backend": config.backend, "preset": config.preset},
             "atlases": save_atlases(output, atlases), "atlas_selection": selection,
             "training": {"method": "atlasnet", "atlas_set": atlas_set.name,
                          "atlas_root": str(atlas_set.root) if atlas_set.root else None,
                          "train_ids": list(train_ids), "val_ids": list(val_ids), "config": config.to_dict(),
                          "augmentation": "rotations +-10 degrees, translations by patch placement, no elastic"
                                          if config.augment == ATLASNET_AUGMENT else "custom (see config.augment)"},
             "networks": networks}
    save_model(output, "atlasnet", model, architecture.to_dict(), atlas_set.labels, atlas_set.modalities,
               len(atlas_ids), extra, backbones={"network": architecture.segmenter_config().spec().to_dict()})


def train_method(atlas_set, output, architecture, training, *, device="auto", resume=False, cache_dir=None,
                 train_ids=None, log=print, show_progress=True) -> AtlasNetTrainResult:
    """Registry entry point (see :func:`train_atlasnet`)."""
    return train_atlasnet(atlas_set, output, architecture, training, cache_dir, device, resume, train_ids, log,
                          show_progress)
