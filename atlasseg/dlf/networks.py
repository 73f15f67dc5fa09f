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
from torch import nn

from ..networks import BackboneSpec, as_heads, build_backbone

LOG_EPS = 1e-4           # floor of the initial probabilities before the log (keeps residual logits finite)
MASKED_LOGIT = -30.0     # logit of a label outside its atlas-union mask (softmax probability < 1e-13)


@dataclass
class DLFConfig:
    """Architecture of a DLF model; stored in ``config.json``.

    ``vote_channels`` / ``finetune_channels`` give the levels of the default subnets (the project U-Net of
    :mod:`atlasseg.networks`, one entry per level); ``norm`` is ``"instance"`` or ``"batch"`` (the reference code
    uses batch normalisation with one target patch x N atlases per batch; instance normalisation behaves the same
    in training and inference and is the default here). ``vote_backbone`` / ``finetune_backbone``: any backbone of
    the library instead (a :class:`~atlasseg.networks.BackboneSpec` dict: name, preset, kwargs); None keeps the
    default U-Net with the channels above. ``deep_supervision_weights`` weigh the fine-tuning subnet's outputs
    from full resolution down (the U-Net gives one head per upsampling level below the top, so a 4-level net has
    3 heads; backbones without deep supervision use the first weight only).
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
    vote_backbone: dict | None = None
    finetune_backbone: dict | None = None

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
        for role, spec in (("vote_backbone", self.vote_backbone), ("finetune_backbone", self.finetune_backbone)):
            if spec is None:
                continue
            spec = BackboneSpec.from_dict(spec)          # unknown names and presets fail here, not mid-training
            if spec.resolved_kwargs().get("deep_supervision") or spec.boundary_channels():
                raise ValueError(f"{role}: a DLF subnet needs one output per label (no deep_supervision or "
                                 "boundary channels in its arguments; resunet_r with boundary_channels 0)")

    def vote_spec(self) -> BackboneSpec:
        if self.vote_backbone is not None:
            return BackboneSpec.from_dict(self.vote_backbone)
        return BackboneSpec("unet", None, {"channels": list(self.vote_channels), "norm": self.norm})

    def finetune_spec(self) -> BackboneSpec:
        if self.finetune_backbone is not None:
            return BackboneSpec.from_dict(self.finetune_backbone)
        return BackboneSpec("unet", None, {"channels": list(self.finetune_channels), "norm": self.norm})

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("vote_backbone", "finetune_backbone"):   # absent = the default U-Net (older configs too)
            if d[key] is None:
                del d[key]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> DLFConfig:
        d = dict(d)
        kind = d.pop("kind", "dlf")     # model folders of format 1 recorded the method as "kind"
        if kind != "dlf":
            raise ValueError(f"kind {kind!r} is not a Deep Label Fusion architecture")
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


def subnet(spec: BackboneSpec, in_channels: int, out_channels: int, deep_supervision: int = 0,
           zero_output: bool = True) -> nn.Module:
    """A backbone of the library; with ``zero_output`` its output layers start at zero (uniform voting
    weights, zero correction: an untrained DLF with the default U-Nets is majority voting)."""
    overrides = {"deep_supervision": deep_supervision} if deep_supervision else {}
    net = build_backbone(spec, in_channels, out_channels, **overrides)
    if zero_output:
        for layer in net.output_layers():
            nn.init.zeros_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
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
        self.config = config
        c, n_labels = config.n_modalities, config.n_labels
        self.vote_net = subnet(config.vote_spec(), 2 * c + 3, n_labels) if config.use_weighted_voting else None
        finetune = config.finetune_spec()
        self.finetune_net = subnet(finetune, n_labels + 3, n_labels,
                                   finetune.deep_supervision_heads(len(config.deep_supervision_weights))) \
            if config.use_finetune else None

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
            corrections = as_heads(self.finetune_net(torch.cat([initial, coords], 1)))
            heads = [base + c for c in corrections]
        if self.config.use_mask:
            mask = atlas_union_mask(labels_1h, self.config.mask_threshold)
            heads = [h.masked_fill(~mask, MASKED_LOGIT) for h in heads]
        return DLFOutput(heads[0], initial, votes, weights, heads[1:])


def build_model(config: DLFConfig) -> DeepLabelFusion:
    """The network a config describes."""
    return DeepLabelFusion(config)
