"""SegNet (Badrinarayanan et al. 2017), the network of AtlasNet: a VGG-style encoder whose max-pooling indices
drive the decoder's unpooling, in 3D or slice by slice in 2D. Trained from scratch (no pretrained VGG weights)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import PaddedForward, register_backbone

# conv, norm, pool, unpool per mode
_LAYERS = {"3d": (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.MaxUnpool3d),
           "2d": (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.MaxUnpool2d)}


def _conv_bn_relu(conv: type, norm: type, in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(conv(in_channels, out_channels, 3, padding=1, bias=False), norm(out_channels),
                         nn.ReLU(inplace=True))


def _stage(conv: type, norm: type, in_channels: int, channels: int, out_channels: int, n_convs: int) -> nn.Sequential:
    """``n_convs`` conv-BN-ReLU blocks: ``in_channels`` -> ``channels`` ... -> ``out_channels``."""
    widths = [in_channels] + [channels] * (n_convs - 1) + [out_channels]
    return nn.Sequential(*(_conv_bn_relu(conv, norm, a, b) for a, b in zip(widths[:-1], widths[1:])))


@register_backbone(
    "segnet", "SegNet: VGG-style encoder of conv-BN-ReLU blocks with index-keeping max-pooling, mirrored decoder "
    "that unpools by those indices; 3D, or 2D slice by slice along Z (AtlasNet)",
    "Badrinarayanan et al. 2017 (SegNet); Vakalopoulou et al. 2018 (AtlasNet)",
    presets={"cpu": {"channels": [16, 32, 64, 64], "convs": [2, 2, 2, 2], "mode": "3d"},
             "paper": {"channels": [64, 128, 256, 512, 512], "convs": [2, 2, 3, 3, 3], "mode": "2d"}})
class SegNet(PaddedForward, nn.Module):
    """SegNet; input (B, in_channels, Z, Y, X) -> logits (B, out_channels, Z, Y, X).

    Encoder stage ``s`` runs ``convs[s]`` 3x3(x3) conv-BN-ReLU blocks at ``channels[s]`` channels and a 2x max
    pooling that keeps its indices. The decoder mirrors it: unpool by the stage's indices (each value back at the
    position of its maximum, zeros elsewhere), then ``convs[s]`` conv-BN-ReLU blocks, the last narrowing to
    ``channels[s - 1]``; a 1x1(x1) convolution gives the logits.

    Args:
        channels / convs: filters and conv-BN-ReLU blocks per stage (the paper, VGG16: 64, 128, 256, 512, 512 /
            2, 2, 3, 3, 3).
        mode: ``"3d"`` (3D convolutions and pooling) or ``"2d"``: every Z slice is segmented on its own by a 2D
            network, ``(B, C, Z, Y, X)`` -> ``(B * Z, C, Y, X)`` and back (no padding along Z).
        deep_supervision: must be 0 (no extra heads).
    """

    def __init__(self, in_channels: int, out_channels: int, channels: Sequence[int] = (16, 32, 64, 64),
                 convs: Sequence[int] = (2, 2, 2, 2), mode: str = "3d", deep_supervision: int = 0):
        super().__init__()
        channels, convs = [int(c) for c in channels], [int(n) for n in convs]
        self._check(channels, convs, mode, deep_supervision)
        conv, norm, pool, unpool = _LAYERS[mode]
        self.mode = mode
        widths = [in_channels] + channels
        self.encoder = nn.ModuleList(_stage(conv, norm, widths[s], channels[s], channels[s], convs[s])
                                     for s in range(len(channels)))
        self.decoder = nn.ModuleList(_stage(conv, norm, channels[s], channels[s], channels[max(s - 1, 0)], convs[s])
                                     for s in reversed(range(len(channels))))
        self.pool = pool(2, return_indices=True)
        self.unpool = unpool(2)
        self.head = conv(channels[0], out_channels, 1)
        d = 2 ** len(channels)
        self.size_divisor = (1, d, d) if mode == "2d" else (d, d, d)

    @staticmethod
    def _check(channels: list[int], convs: list[int], mode: str, deep_supervision: int) -> None:
        if mode not in _LAYERS:
            raise ValueError(f"segnet: mode must be '3d' or '2d', got {mode!r}")
        if not channels or len(convs) != len(channels):
            raise ValueError(f"segnet: one convs entry per stage, got channels={channels} and convs={convs}")
        if min(convs) < 1 or min(channels) < 1:
            raise ValueError("segnet: every stage needs at least one convolution and one channel")
        if deep_supervision:
            raise ValueError("segnet has no deep supervision heads")

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """The network on tensors of its own dimensionality: (N, C, Y, X) in 2D mode, (N, C, Z, Y, X) in 3D mode,
        spatial sizes multiples of ``2 ** stages``."""
        pooled = []
        for stage in self.encoder:
            x = stage(x)
            size = x.shape[2:]
            x, indices = self.pool(x)
            pooled.append((indices, size))
        for stage in self.decoder:
            indices, size = pooled.pop()
            x = stage(self.unpool(x, indices, output_size=size))
        return self.head(x)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"segnet expects (B, C, Z, Y, X) input, got shape {tuple(x.shape)}")
        if self.mode == "3d":
            return self.forward_native(x)
        b, c, z, y, w = x.shape
        out = self.forward_native(x.transpose(1, 2).reshape(b * z, c, y, w))
        return out.reshape(b, z, -1, y, w).transpose(1, 2)

    def output_layers(self) -> list[nn.Module]:
        return [self.head]
