"""Deep Label Fusion networks (Xie et al., Medical Image Analysis 2023).

Shapes (B = target patches in a batch, N = atlases per target, C = modalities, L = labels incl. background,
spatial (Z, Y, X) in voxels):

* target ``(B, C, Z, Y, X)``, atlas images ``(B, N, C, Z, Y, X)``: intensities normalised per image (1st-99th
  percentile to about [0, 1], :func:`atlasseg.registration.normalized_tensor`).
* atlas labels ``(B, N, Z, Y, X)``: label *indices* 0..L-1 (not values; see ``labels_to_index``).
* coordinate maps ``(B, 3, Z, Y, X)``: x, y, z positions on the whole target grid, each scaled to [-1, 1];
  patches carry the crop of the whole-volume maps so a patch knows where it lies.

The model: a weighted-voting subnet gives per-atlas, per-label non-negative weights; votes (weights times the
one-hot atlas labels) averaged over atlases give the initial segmentation; a fine-tuning subnet adds a residual
correction in log-probability space; a slightly dilated atlas-union mask per label forbids labels that no atlas
proposes nearby. Each part can be switched off for ablation; with both subnets off the model is exactly
majority voting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from monai.networks.nets import DynUNet
from torch import nn

LOG_EPS = 1e-4           # floor of the initial probabilities before the log (keeps residual logits finite)
MASKED_LOGIT = -30.0     # logit of a label outside its atlas-union mask (softmax probability < 1e-13)


@dataclass
class DLFConfig:
    """Architecture of a DLF model (or of the plain U-Net baseline, ``kind="unet"``); stored in ``config.json``.

    ``vote_channels`` / ``finetune_channels`` give the U-Net levels (one entry per level); ``norm`` is
    ``"instance"`` or ``"batch"`` (the reference code uses batch normalisation with one target patch x N atlases
    per batch; instance normalisation behaves the same in training and inference and is the default here).
    ``deep_supervision_weights`` weigh the fine-tuning subnet's outputs from full resolution down (DynUNet gives
    one head per upsampling level below the top, so a 4-level net has 3 heads).
    """

    n_labels: int
    n_modalities: int = 1
    vote_channels: tuple[int, ...] = (32, 64, 128)
    finetune_channels: tuple[int, ...] = (32, 64, 128, 256)
    norm: str = "instance"
    use_weighted_voting: bool = True
    use_finetune: bool = True
    use_mask: bool = True
    mask_threshold: float = 0.2
    deep_supervision_weights: tuple[float, ...] = (1.0, 0.5, 0.2)
    kind: str = "dlf"

    def __post_init__(self):
        self.vote_channels = tuple(int(c) for c in self.vote_channels)
        self.finetune_channels = tuple(int(c) for c in self.finetune_channels)
        self.deep_supervision_weights = tuple(float(w) for w in self.deep_supervision_weights)
        if self.n_labels < 2:
            raise ValueError(f"n_labels must be at least 2 (background and one label), got {self.n_labels}")
        if self.n_modalities < 1:
            raise ValueError(f"n_modalities must be at least 1, got {self.n_modalities}")
        if len(self.vote_channels) < 3 or len(self.finetune_channels) < 3:
            raise ValueError("each U-Net needs at least 3 levels (MONAI DynUNet)")
        if self.norm not in ("instance", "batch"):
            raise ValueError(f"norm must be 'instance' or 'batch', got {self.norm!r}")
        if self.kind not in ("dlf", "unet"):
            raise ValueError(f"kind must be 'dlf' or 'unet', got {self.kind!r}")

    @property
    def divisor(self) -> int:
        """Patch sizes must be multiples of this (the deepest U-Net's total downsampling)."""
        levels = len(self.finetune_channels) if (self.use_finetune or self.kind == "unet") else 1
        if self.kind == "dlf" and self.use_weighted_voting:
            levels = max(levels, len(self.vote_channels))
        return 2 ** (levels - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> DLFConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown architecture keys {unknown}")
        return cls(**d)


def coordinate_maps(shape: tuple[int, int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """(3, Z, Y, X) float32 maps of x, y, z voxel positions scaled to [-1, 1] over ``shape`` (Z, Y, X)."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device) if n > 1 else torch.zeros(1, device=device)
            for n in shape]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([x, y, z])


def _unet(in_channels: int, out_channels: int, channels: tuple[int, ...], norm: str,
          deep_supervision_weights: tuple[float, ...] = (), zero_output: bool = True) -> DynUNet:
    """MONAI DynUNet: two 3x3x3 conv + norm + leaky ReLU per block, stride-2 down, transposed-conv up; output
    layers start at zero (uniform voting weights, zero correction: an untrained DLF is majority voting)."""
    levels = len(channels)
    heads = min(len(deep_supervision_weights), levels - 1) - 1
    net = DynUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                   kernel_size=[3] * levels, strides=[1] + [2] * (levels - 1), upsample_kernel_size=[2] * (levels - 1),
                   filters=list(channels), norm_name=(norm, {"affine": True}), deep_supervision=heads > 0,
                   deep_supr_num=max(heads, 1))
    heads_blocks = [net.output_block, *getattr(net, "deep_supervision_heads", [])] if zero_output else []
    for block in heads_blocks:
        nn.init.zeros_(block.conv.conv.weight)
        nn.init.zeros_(block.conv.conv.bias)
    return net


def onehot(label_index: torch.Tensor, n_labels: int) -> torch.Tensor:
    """(..., Z, Y, X) integer indices -> (..., L, Z, Y, X) float32 one-hot."""
    return F.one_hot(label_index.long(), n_labels).movedim(-1, -4).float()


def atlas_union_mask(atlas_onehot: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """Per label, where any atlas votes for it, slightly dilated.

    Args:
        atlas_onehot: (B, N, L, Z, Y, X) one-hot warped atlas labels.
        threshold: a voxel joins the mask when more than this share of its 3x3x3 neighbourhood is in the union
            (0.2: about a one-voxel dilation); the union itself always stays in the mask.
    Returns: (B, L, Z, Y, X) bool.
    """
    union = atlas_onehot.amax(1)
    smoothed = F.avg_pool3d(union, 3, stride=1, padding=1, count_include_pad=False)
    return (union > 0) | (smoothed > threshold)


@dataclass
class DLFOutput:
    """Model outputs on a patch (or a whole volume); all (B, ...) tensors.

    ``logits`` (B, L, ...): final scores, softmax gives the final probabilities; ``deep_supervision``: the same
    at coarser decoder heads (training only, upsampled to full size), full resolution first;
    ``initial`` (B, L, ...): the vote-fused probabilities (votes normalised over labels);
    ``votes`` (B, L, ...): weighted votes averaged over atlases; ``weights`` (B, N, L, ...): the voting weights.
    """

    logits: torch.Tensor
    initial: torch.Tensor
    votes: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    deep_supervision: list[torch.Tensor] = field(default_factory=list)


class DeepLabelFusion(nn.Module):
    """Weighted-voting subnet, vote fusion, fine-tuning subnet and atlas-union masking."""

    def __init__(self, config: DLFConfig):
        super().__init__()
        if config.kind != "dlf":
            raise ValueError("DeepLabelFusion needs a config with kind='dlf'")
        self.config = config
        c, n_labels = config.n_modalities, config.n_labels
        self.vote_net = _unet(2 * c + 3, n_labels, config.vote_channels, config.norm) \
            if config.use_weighted_voting else None
        self.finetune_net = _unet(n_labels + 3, n_labels, config.finetune_channels, config.norm,
                                  config.deep_supervision_weights) if config.use_finetune else None

    def voting_weights(self, target: torch.Tensor, atlas_images: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """(B, N, L, Z, Y, X) non-negative weights (sigmoid); all ones with the voting subnet off."""
        b, n = atlas_images.shape[:2]
        spatial = atlas_images.shape[3:]
        if self.vote_net is None:
            return atlas_images.new_ones((b, n, self.config.n_labels, *spatial))
        expand = (b, n, -1, *spatial)
        net_in = torch.cat([target.unsqueeze(1).expand(expand), atlas_images, coords.unsqueeze(1).expand(expand)], 2)
        out = self.vote_net(net_in.reshape(b * n, -1, *spatial))
        return torch.sigmoid(out).reshape(b, n, self.config.n_labels, *spatial)

    def forward(self, target: torch.Tensor, atlas_images: torch.Tensor, atlas_labels: torch.Tensor,
                coords: torch.Tensor | None = None) -> DLFOutput:
        """See the module docstring for shapes; ``coords`` default: maps over the given patch."""
        if coords is None:
            coords = coordinate_maps(tuple(target.shape[2:]), target.device).expand(target.shape[0], -1, -1, -1, -1)
        labels_1h = onehot(atlas_labels, self.config.n_labels)                   # (B, N, L, ...)
        weights = self.voting_weights(target, atlas_images, coords)
        votes = (weights * labels_1h).mean(1)                                      # (B, L, ...)
        initial = votes / votes.sum(1, keepdim=True).clamp_min(1e-8)
        base = torch.log(initial.clamp_min(LOG_EPS))
        heads = [base]
        if self.finetune_net is not None:
            out = self.finetune_net(torch.cat([initial, coords], 1))
            corrections = list(out.unbind(1)) if out.dim() == 6 else [out]
            heads = [base + c for c in corrections]
        if self.config.use_mask:
            mask = atlas_union_mask(labels_1h, self.config.mask_threshold)
            heads = [h.masked_fill(~mask, MASKED_LOGIT) for h in heads]
        return DLFOutput(heads[0], initial, votes, weights, heads[1:])


class PlainUNet(nn.Module):
    """Baseline: the fine-tuning subnet's architecture on the target image channels alone (no atlases)."""

    def __init__(self, config: DLFConfig):
        super().__init__()
        self.config = config
        self.net = _unet(config.n_modalities, config.n_labels, config.finetune_channels, config.norm,
                         config.deep_supervision_weights, zero_output=False)

    def forward(self, target: torch.Tensor, atlas_images: torch.Tensor | None = None,
                atlas_labels: torch.Tensor | None = None, coords: torch.Tensor | None = None) -> DLFOutput:
        out = self.net(target)
        heads = list(out.unbind(1)) if out.dim() == 6 else [out]
        return DLFOutput(heads[0], torch.softmax(heads[0], 1), None, None, heads[1:])


def build_model(config: DLFConfig) -> nn.Module:
    """The network a config describes."""
    return DeepLabelFusion(config) if config.kind == "dlf" else PlainUNet(config)
