"""DeepAtlas (Xu & Niethammer, MICCAI 2019): a registration network F_R and a segmentation network F_S learned
jointly from few labels, each helping the other through the anatomy loss.

* :mod:`.config`: :class:`DeepAtlasConfig` (common grid, F_R, F_S) and :class:`DeepAtlasTrainConfig` (labelled
  cases, loss weights lambda_i / lambda_r / lambda_a / lambda_sp, the schedule and its 20:1 ratio).
* :mod:`.grid`: every case affinely pre-aligned to a reference case (the engine's registration, cached) on one
  common grid whose sizes are multiples of 16, and the exact way back to each case's own grid.
* :mod:`.model`: F_R (a backbone of the library on (moving, fixed) -> stationary velocity field integrated by
  scaling and squaring, or a plain displacement) and F_S (a plain segmenter of the library) in one model.
* :mod:`.objective`: the registration and segmentation losses (the paper's four cases).
* :mod:`.train`: pretraining of each network alone, then alternating training (Semi-DeepAtlas as an option);
  resumable.
* :mod:`.inference`: segmenting with F_S, and F_R as the engine's ``learned`` registration backend
  (``register(..., backend="learned", model=DIR)``), with optional test-time optimisation.

>>> train_deepatlas(atlas_set, "model", DeepAtlasConfig(n_labels=3), DeepAtlasTrainConfig(labelled=("case_01",)))
>>> segment_deepatlas(target_images, None, "model").save("out")
>>> register(target_images, [atlas.images], backend="learned", model="model")
"""

from .config import DEFORMATIONS, GRID_DIVISOR, DeepAtlasConfig, DeepAtlasTrainConfig
from .fields import SpatialTransformer, field_jacobian_determinant, jacobian_determinant, jacobian_stats
from .grid import CommonGrid, affine_from_field, common_geometry, to_case_grid, to_common_grid
from .inference import (
    LEARNED_PRESETS,
    DeepAtlasResult,
    PairRegistration,
    load_deepatlas,
    register_learned,
    register_pair,
    segment_deepatlas,
    segment_method,
)
from .model import REFERENCE, DeepAtlasModel, RegistrationNet, build_model, load_common_grid, save_common_grid
from .objective import Objective, PairBatch
from .train import DeepAtlasTrainer, DeepAtlasTrainResult, StepPlan, train_deepatlas, train_method

__all__ = ["DEFORMATIONS", "GRID_DIVISOR", "LEARNED_PRESETS", "REFERENCE", "CommonGrid", "DeepAtlasConfig",
           "DeepAtlasModel", "DeepAtlasResult", "DeepAtlasTrainConfig", "DeepAtlasTrainResult", "DeepAtlasTrainer",
           "Objective", "PairBatch", "PairRegistration", "RegistrationNet", "SpatialTransformer", "StepPlan",
           "affine_from_field", "build_model", "common_geometry", "field_jacobian_determinant",
           "jacobian_determinant", "jacobian_stats", "load_common_grid", "load_deepatlas", "register_learned",
           "register_pair", "save_common_grid", "segment_deepatlas", "segment_method", "to_case_grid",
           "to_common_grid", "train_deepatlas", "train_method"]
