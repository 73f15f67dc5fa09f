"""DeepAtlas's settings: the architecture (:class:`DeepAtlasConfig`, stored in ``config.json``) and the training
run (:class:`DeepAtlasTrainConfig`). The registry (:mod:`atlasseg.methods`) names both, so ``atlasseg train
--method deepatlas`` derives its flags from them (``--labelled ID ...``, ``--labelled-fraction F``, ``--lambda-a``,
``--round-registration-steps`` ...) and ``--print-config`` shows what runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..config import dataclass_from, to_dict
from ..losses import LOSS_NAMES, REGULARIZER_REFERENCE_SIZE, REGULARIZERS, SIMILARITIES
from ..networks import BackboneSpec
from ..segmenter import SegmenterConfig
from ..training import TrainConfig

__all__ = ["DEFORMATIONS", "GRID_DIVISOR", "DeepAtlasConfig", "DeepAtlasTrainConfig"]

DEFORMATIONS = ("svf", "displacement")
GRID_DIVISOR = 16          # the common grid's size along every axis is a multiple of this
PREALIGN_MAX_SCALE = 1.5   # pre-alignment scales outside [1/1.5, 1.5] are a failed registration, not anatomy
REGISTRATION_UNET = {"channels": [16, 32, 32, 32, 32]}   # VoxelMorph's encoder widths; 4 halvings (divisor 16)


def _triple(value, name: str, kind: type) -> tuple | None:
    if value is None:
        return None
    value = tuple(kind(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name} must have three entries, got {list(value)}")
    return value


@dataclass
class DeepAtlasConfig:
    """Architecture of a DeepAtlas model (Xu & Niethammer, MICCAI 2019); stored in ``config.json``.

    Common grid: every case is affinely pre-aligned to the case ``reference_id`` (None: the first training case
    in sorted order) and resampled onto one grid with the reference's direction and centre, spacing
    ``grid_spacing`` (x, y, z mm; None: the reference's) and array shape ``grid_shape`` (Z, Y, X; each a multiple
    of 16; None: the reference's extent rounded up). A trained model's config holds the resolved values.

    F_R (registration network): ``registration_backbone`` / ``registration_backbone_preset`` /
    ``registration_backbone_kwargs``, a backbone of :mod:`atlasseg.networks` taking (moving, fixed) stacked on
    the channel axis and giving 3 channels (default: the project U-Net with VoxelMorph's widths 16-32-32-32-32);
    its last layer starts near zero (identity). ``deformation``: ``"svf"`` (a stationary velocity field
    integrated by scaling and squaring in ``integration_steps`` steps: diffeomorphic, inverse = the negated
    velocity integrated) or ``"displacement"`` (the output is the displacement; inverse by fixed-point iteration).

    F_S (segmentation network): ``backbone`` / ``backbone_preset`` / ``backbone_kwargs`` /
    ``deep_supervision_weights``, a plain segmenter of the library (:class:`~atlasseg.segmenter.SegmenterConfig`).
    """

    n_labels: int
    n_modalities: int = 1
    reference_id: str | None = None
    grid_shape: tuple[int, int, int] | None = None
    grid_spacing: tuple[float, float, float] | None = None
    deformation: str = "svf"
    integration_steps: int = 7
    registration_backbone: str = "unet"
    registration_backbone_preset: str | None = None
    registration_backbone_kwargs: dict = field(default_factory=lambda: dict(REGISTRATION_UNET))
    backbone: str = "unet"
    backbone_preset: str | None = "cpu"
    backbone_kwargs: dict = field(default_factory=dict)
    deep_supervision_weights: tuple[float, ...] = (1.0, 0.5, 0.2)

    def __post_init__(self):
        self.grid_shape = _triple(self.grid_shape, "grid_shape", int)
        self.grid_spacing = _triple(self.grid_spacing, "grid_spacing", float)
        self.reference_id = None if self.reference_id is None else str(self.reference_id)
        self.deep_supervision_weights = tuple(float(w) for w in self.deep_supervision_weights)
        self.registration_backbone_kwargs = dict(self.registration_backbone_kwargs or {})
        self.backbone_kwargs = dict(self.backbone_kwargs or {})
        if self.grid_shape is not None and any(s < GRID_DIVISOR or s % GRID_DIVISOR for s in self.grid_shape):
            raise ValueError(f"grid_shape must be multiples of {GRID_DIVISOR} (the networks halve the grid up to 4 "
                             f"times), got {list(self.grid_shape)}")
        if self.grid_spacing is not None and min(self.grid_spacing) <= 0:
            raise ValueError(f"grid_spacing must be positive (mm), got {list(self.grid_spacing)}")
        if self.deformation not in DEFORMATIONS:
            raise ValueError(f"deformation must be one of {', '.join(DEFORMATIONS)}, got {self.deformation!r}")
        if int(self.integration_steps) != self.integration_steps or not 0 <= self.integration_steps <= 12:
            raise ValueError(f"integration_steps must be a whole number in 0..12, got {self.integration_steps!r}")
        self.registration_spec()          # unknown backbones and presets fail here
        self.segmenter_config()           # labels, modalities, F_S backbone

    def registration_spec(self) -> BackboneSpec:
        return BackboneSpec(self.registration_backbone, self.registration_backbone_preset,
                            self.registration_backbone_kwargs)

    def segmenter_config(self) -> SegmenterConfig:
        """F_S as a plain segmenter of the library."""
        return SegmenterConfig(self.n_labels, self.n_modalities, self.backbone, self.backbone_preset,
                               dict(self.backbone_kwargs), self.deep_supervision_weights)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DeepAtlasConfig:
        return dataclass_from(cls, d, where="architecture")


@dataclass
class DeepAtlasTrainConfig(TrainConfig):
    """A DeepAtlas training run (the schedule of the paper): F_R pretrained alone without labels
    (``pretrain_registration_steps``), F_S pretrained alone on the labelled cases (``pretrain_segmentation_steps``),
    then ``epochs`` rounds of alternating training, each ``round_registration_steps`` steps of F_R (F_S fixed)
    followed by ``round_segmentation_steps`` steps of F_S (F_R fixed): 20:1 by default, as reported for the paper.
    ``semi``: Semi-DeepAtlas, F_R stays fixed after its pretraining and every round trains F_S only;
    ``semi_rounds``: only the first that many rounds are so (a Semi-DeepAtlas start, e.g. with one label).

    Labels: ``labelled`` (case ids; they must be training cases) or ``labelled_fraction`` (a seeded random share
    of the training cases, at least one); neither: every training case is labelled. Validation cases (a
    ``val_fraction`` share) always use their labels, for Dice only.

    Losses (weights as in the paper): F_R minimises ``lambda_i * similarity + lambda_r * s * regularizer +
    lambda_a * anatomy``; F_S minimises ``lambda_a * anatomy + lambda_sp * supervised``. ``similarity``: ``lncc``
    (window ``2 * lncc_radius + 1``) or ``ncc`` (global). ``regularizer``: ``diffusion`` or ``bending`` of the
    displacement (voxel units of the common grid); ``s`` = :func:`atlasseg.losses.regularizer_scale`: 1 for
    diffusion, ``(S / regularizer_reference_size)^2`` for bending (S: geometric mean of the grid shape), so
    ``lambda_r`` means the same smoothing at any grid size. Anatomy: soft Dice (foreground labels) between the
    moving segmentation (one-hot, or F_S's probabilities when it has no label) warped linearly and the fixed one;
    the segmentation loss follows the paper's four cases (both labelled: supervised only; one labelled: anatomy
    through F_S's prediction of the other, plus supervised on the labelled one; neither: no step). Supervised
    loss: ``loss`` (:data:`atlasseg.losses.LOSS_NAMES`, with deep supervision). Default weights: diffusion 1.0
    with LNCC (VoxelMorph), anatomy 2.0 and supervised 3.0 (MONAI's DeepAtlas tutorial).

    Optimisers: AdamW, ``registration_learning_rate`` for F_R and ``learning_rate`` for F_S, ``weight_decay``;
    the step/cosine ``schedule`` of :class:`~atlasseg.training.TrainConfig` runs over the rounds (pretraining at
    the full rate). ``batch_size`` pairs (or cases) per step, whole volumes on the common grid. Pre-alignment:
    ``backend`` with preset ``affine`` (the only one allowed), cached; ``prealign_max_scale``: the affine's scales
    are kept in [1/s, s] (None: unbounded; a single reference otherwise fails on the odd case: 2 of the 200
    hippocampus cases scaled one axis by 0.5-0.6 without it, and their label Dice with the reference fell to
    0.1-0.4). ``val_interval``: validate every that many rounds (and after each pretraining and the last round);
    ``checkpoint_steps``: also checkpoint every that many steps. Unused here: ``n_atlases``, ``patch_size``,
    ``foreground_ratio``, ``patches_per_target``, ``candidates_per_target``, ``overlap``, ``augment``,
    ``mixed_precision`` (whole volumes, no augmentation, float32 for the field integration).
    """

    epochs: int = 100
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    preset: str = "affine"
    prealign_max_scale: float | None = PREALIGN_MAX_SCALE
    val_interval: int = 10
    labelled: tuple[str, ...] = ()
    labelled_fraction: float | None = None
    pretrain_registration_steps: int = 1000
    pretrain_segmentation_steps: int = 500
    round_registration_steps: int = 20
    round_segmentation_steps: int = 1
    semi: bool = False
    semi_rounds: int = 0
    lambda_i: float = 1.0
    lambda_r: float = 1.0
    lambda_a: float = 2.0
    lambda_sp: float = 3.0
    similarity: str = "lncc"
    lncc_radius: int = 4
    regularizer: str = "diffusion"
    regularizer_reference_size: int = REGULARIZER_REFERENCE_SIZE
    registration_learning_rate: float = 5e-4
    batch_size: int = 1
    val_pairs: int = 10
    checkpoint_steps: int = 200

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.labelled, str):
            self.labelled = (self.labelled,)
        self.labelled = tuple(str(i) for i in self.labelled)
        for name in ("lambda_i", "lambda_r", "lambda_a", "lambda_sp", "registration_learning_rate",
                     "learning_rate", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
            setattr(self, name, float(value))
        for name in ("pretrain_registration_steps", "pretrain_segmentation_steps", "round_registration_steps",
                     "round_segmentation_steps", "semi_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        for name in ("batch_size", "val_pairs", "checkpoint_steps", "lncc_radius", "regularizer_reference_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.round_registration_steps + self.round_segmentation_steps == 0:
            raise ValueError("a round needs at least one step: round_registration_steps and "
                             "round_segmentation_steps are both 0")
        if (self.semi or self.semi_rounds) and self.round_segmentation_steps == 0:
            raise ValueError("Semi-DeepAtlas rounds train F_S only: round_segmentation_steps must be at least 1")
        if self.labelled and self.labelled_fraction is not None:
            raise ValueError("give either labelled (case ids) or labelled_fraction, not both")
        if len(set(self.labelled)) != len(self.labelled):
            raise ValueError(f"labelled lists a case twice: {list(self.labelled)}")
        if self.labelled_fraction is not None and not 0 < self.labelled_fraction <= 1:
            raise ValueError(f"labelled_fraction must be in (0, 1], got {self.labelled_fraction}")
        if self.preset != "affine":
            raise ValueError(f"DeepAtlas pre-aligns every case affinely: preset must be 'affine', got "
                             f"{self.preset!r}")
        if self.prealign_max_scale is not None:
            value = self.prealign_max_scale
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:
                raise ValueError(f"prealign_max_scale must be a number >= 1 (or null: unbounded), got {value!r}")
            self.prealign_max_scale = float(value)
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {self.similarity!r}")
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {', '.join(REGULARIZERS)}, got {self.regularizer!r}")
        if self.loss not in LOSS_NAMES:     # checked by TrainConfig too; kept for the message's context
            raise ValueError(f"loss must be one of {', '.join(LOSS_NAMES)}, got {self.loss!r}")

    def round_steps(self, round_index: int) -> tuple[int, int]:
        """(F_R steps, F_S steps) of 0-based joint round ``round_index``."""
        semi = self.semi or round_index < self.semi_rounds
        return (0 if semi else self.round_registration_steps), self.round_segmentation_steps

    def ratio(self) -> str:
        """The alternation as recorded in the model config, e.g. ``"20:1"`` (F_R steps : F_S steps per round)."""
        if self.semi:
            return f"0:{self.round_segmentation_steps} (Semi-DeepAtlas)"
        return f"{self.round_registration_steps}:{self.round_segmentation_steps}"


def check_ids(ids: Sequence[str], known: Sequence[str], what: str, where: str) -> None:
    unknown = sorted(set(ids) - set(known))
    if unknown:
        raise ValueError(f"{what} {unknown} not among {where}")
