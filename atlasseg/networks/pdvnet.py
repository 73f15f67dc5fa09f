"""PDV-Net (Imran et al. 2018, progressive dense V-Net), built on the dense V-Net of Gibson et al. 2018.

A 5x5x5 stride-2 convolution plus the average-pooled input feed three dense feature blocks at 1/2, 1/4 and 1/8
of the input resolution; every block's features are resized to the first block's resolution, concatenated and
merged, and the logits are resized back to the input size. The spatial prior and batch-wise dropout of Gibson
et al. are left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import PaddedForward, register_backbone, upsample_to

NORMS = ("batch", "instance")


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm3d(channels) if kind == "batch" else nn.InstanceNorm3d(channels, affine=True)


def preact_conv(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                norm: str = "batch") -> nn.Sequential:
    """Norm -> PReLU -> k x k x k convolution (pre-activation ordering, chosen here; Gibson et al.'s NiftyNet
    DenseVNet orders conv -> BN -> ReLU)."""
    return nn.Sequential(_norm(norm, in_channels), nn.PReLU(in_channels),
                         nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2))


class DenseBlock(nn.Module):
    """``layers`` densely connected norm + PReLU + 3x3x3 convolutions of ``growth`` channels each.

    Each layer sees the block input and every earlier layer's output. Input (B, in_channels, Z, Y, X), output
    their concatenation (B, ``out_channels`` = in_channels + layers * growth, Z, Y, X).
    """

    def __init__(self, in_channels: int, layers: int, growth: int, norm: str = "batch"):
        super().__init__()
        self.layers = nn.ModuleList(preact_conv(in_channels + i * growth, growth, 3, norm=norm)
                                    for i in range(layers))
        self.out_channels = in_channels + layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        return torch.cat(features, dim=1)


def _per_block(value: int | Sequence[int], n: int, name: str) -> list[int]:
    values = [int(value)] * n if isinstance(value, int) else [int(v) for v in value]
    if len(values) != n:
        raise ValueError(f"pdvnet: {name} needs {n} entries, got {values}")
    if min(values, default=1) < 1:
        raise ValueError(f"pdvnet: {name} must be positive, got {values}")
    return values


@register_backbone(
    "pdvnet", "progressive dense V-Net: 5x5x5 stride-2 conv + pooled input, dense blocks of 5, 10, 10 BN + PReLU "
    "+ 3x3x3 conv layers at 1/2, 1/4, 1/8 resolution, all blocks' features resized, concatenated and merged",
    "Imran et al. 2018 (PDV-Net), on the dense V-Net of Gibson et al. 2018",
    presets={"cpu": {"init_channels": 24, "layers": [5, 10, 10], "growth_rates": [4, 8, 16], "down_channels": 24,
                     "skip_channels": [12, 24, 24], "merge_channels": 24},
             "paper": {"init_channels": 24, "layers": [5, 10, 10], "growth_rates": [4, 8, 16], "down_channels": 24,
                       "skip_channels": [12, 24, 24], "merge_channels": 24}})
class PDVNet(PaddedForward, nn.Module):
    """Dense V-Net; input (B, in_channels, Z, Y, X) -> logits (B, out_channels, Z, Y, X).

    The published network is already small (about 0.9 M parameters for one input channel), and its first
    block runs at half resolution, so the ``"cpu"`` preset keeps the published sizes.

    Args:
        init_channels: channels of the initial 5x5x5 stride-2 convolution (24); the 2x average-pooled input is
            concatenated to it.
        layers / growth_rates: layers and channels per layer of each dense block (5, 10, 10 / 4, 8, 16 as in
            Gibson et al.; Imran et al.'s description gives 4, 6, 8).
        down_channels: output channels of the stride-2 3x3x3 convolution before each block after the first.
        skip_channels: each block's features are reduced to these by a 3x3x3 convolution before resizing
            (Gibson et al.: 12, 24, 24).
        merge_channels: the 3x3x3 convolution merging the concatenated features.
        norm: ``"batch"`` (the papers) or ``"instance"``.
        deep_supervision: must be 0 (no extra heads).
    """

    def __init__(self, in_channels: int, out_channels: int, init_channels: int = 24,
                 layers: Sequence[int] = (5, 10, 10), growth_rates: Sequence[int] = (4, 8, 16),
                 down_channels: int | Sequence[int] = 24, skip_channels: Sequence[int] = (12, 24, 24),
                 merge_channels: int = 24, norm: str = "batch", deep_supervision: int = 0):
        super().__init__()
        if deep_supervision:
            raise ValueError("pdvnet has no deep supervision heads")
        if norm not in NORMS:
            raise ValueError(f"pdvnet: norm must be one of {NORMS}, got {norm!r}")
        n = len(layers)
        if n < 1:
            raise ValueError("pdvnet needs at least one dense block")
        layers = _per_block(layers, n, "layers")
        growth = _per_block(growth_rates, n, "growth_rates")
        downs, skips = _per_block(down_channels, n - 1, "down_channels"), _per_block(skip_channels, n, "skip_channels")
        self.init_conv = nn.Conv3d(in_channels, init_channels, 5, stride=2, padding=2)
        self.pool = nn.AvgPool3d(2)
        self.downs, self.blocks, self.skips = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        width = init_channels + in_channels
        for i in range(n):
            if i:
                self.downs.append(preact_conv(width, downs[i - 1], 3, stride=2, norm=norm))
                width = downs[i - 1]
            self.blocks.append(DenseBlock(width, layers[i], growth[i], norm))
            width = self.blocks[-1].out_channels
            self.skips.append(preact_conv(width, skips[i], 3, norm=norm))
        self.merge = preact_conv(sum(skips), merge_channels, 3, norm=norm)
        self.head_act = nn.Sequential(_norm(norm, merge_channels), nn.PReLU(merge_channels))
        self.head = nn.Conv3d(merge_channels, out_channels, 1)
        self.size_divisor = (2 ** n,) * 3

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.init_conv(x), self.pool(x)], dim=1)
        features = []
        for i, (block, skip) in enumerate(zip(self.blocks, self.skips)):
            h = block(self.downs[i - 1](h) if i else h)
            features.append(skip(h))
        size = features[0].shape[2:]
        merged = self.merge(torch.cat([upsample_to(f, size) for f in features], dim=1))
        return upsample_to(self.head(self.head_act(merged)), x.shape[2:])

    def output_layers(self) -> list[nn.Module]:
        return [self.head]
