"""AtlasNet (Vakalopoulou et al., MICCAI 2018): one segmentation network per atlas space, predictions warped back
onto the target and fused.

* :mod:`.model`: :class:`AtlasNetConfig` (architecture, ``config.json``), :class:`AtlasNetModel` (an
  ``nn.ModuleList`` of plain segmenters), the atlases stored beside the weights (``atlases.safetensors``).
* :mod:`.selection`: the atlases as k-medoids of registered training cases (LNCC or label Dice), ranked so
  that the first k are a good set of k.
* :mod:`.train`: every training case registered to every atlas (the engine's registration cache), one
  :class:`~atlasseg.segmenter.SegmenterTrainer` per atlas space (resumable), paper augmentation.
* :mod:`.inference`: register the target to every atlas, T_i, C_i, T_i^-1, fuse (mean or vote).

>>> train_atlasnet(atlas_set, "model", AtlasNetConfig(n_labels=5, n_networks=5), TrainConfig(epochs=18))
>>> segment_atlasnet(target_images, None, "model").save("out", maps=True)
"""

from .inference import (
    AtlasNetPrediction,
    AtlasNetResult,
    choose_networks,
    fuse_networks,
    predict_atlasnet,
    segment_atlasnet,
    segment_method,
    to_atlas_space,
    to_target_space,
)
from .model import ATLASES, AtlasNetConfig, AtlasNetModel, StoredAtlas, build_model, load_atlases, save_atlases
from .selection import dissimilarity_matrix, k_medoids, local_ncc, rank_medoids, select_atlases
from .train import (
    ATLASNET_AUGMENT,
    AtlasNetTrainConfig,
    AtlasNetTrainResult,
    AtlasSpaceTrainer,
    train_atlasnet,
    train_method,
)

__all__ = ["ATLASES", "ATLASNET_AUGMENT", "AtlasNetConfig", "AtlasNetTrainConfig", "AtlasNetModel",
           "AtlasNetPrediction", "AtlasNetResult", "AtlasNetTrainResult", "AtlasSpaceTrainer", "StoredAtlas",
           "build_model", "choose_networks",
           "dissimilarity_matrix", "fuse_networks", "k_medoids", "load_atlases", "local_ncc", "predict_atlasnet",
           "rank_medoids", "save_atlases", "segment_atlasnet", "segment_method", "select_atlases", "to_atlas_space",
           "to_target_space", "train_atlasnet", "train_method"]
