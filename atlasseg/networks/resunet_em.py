"""Res-UNet-R and Res-UNet-H (Li et al. 2021, first place in the MitoEM 2021 challenge): anisotropic residual
U-Nets for instance segmentation of organelles in electron microscopy volumes that are coarse along Z.

Both share one building block and one encoder:

* anisotropic residual block: a 1x3x3 convolution + norm + ELU (changes the channel count), then two 3x3x3
  convolutions (norm + ELU after the first, norm after the second) whose output is added to the 1x3x3
  convolution's output before the last ELU (the residual skip spans the two 3x3x3 convolutions);
* encoder: ``len(channels)`` levels, one block per level, in-plane-only ``(1, 2, 2)`` down-sampling between
  levels (a strided 1x3x3 convolution, as in the authors' code, or a ``(1, 2, 2)`` max-pool), so the network
  never mixes slices more than its 3x3x3 kernels do and ``size_divisor`` is ``(1, 2**k, 2**k)``;
* decoder: per level a 1x1x1 convolution to the skip's channel count, ``(1, 2, 2)`` up-sampling (trilinear, or a
  transposed ``(1, 2, 2)`` convolution that also changes the channels), an ADDITIVE skip from the encoder, then a
  block; the head is a 1x3x3 convolution to logits.

Res-UNet-R has one decoder whose head predicts ``out_channels`` mask logits followed by ``boundary_channels``
instance-boundary logits. Res-UNet-H shares the encoder between two decoders, one for the semantic mask and one
for the instance boundary (contour); its output is their concatenation ``[mask, boundary]``.

Shapes: input ``(B, C_in, Z, Y, X)``, any size (padded at the end to ``size_divisor`` and cropped back);
output logits ``(B, out_channels + boundary_channels, Z, Y, X)``. The post-processing of these two maps into
instances (seeded watershed), the weighted BCE used to train them and the AP-75 metric are in
:mod:`atlasseg.instances`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import PaddedForward, register_backbone

NORMS = ("batch", "instance", "none")
DOWNSAMPLING = ("conv", "pool")
UPSAMPLING = ("trilinear", "transpose")
IN_PLANE = (1, 2, 2)


def _norm(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm3d(channels)
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.Identity()


class AnisotropicResBlock(nn.Module):
    """1x3x3 conv + norm + ELU, then two 3x3x3 convs with a residual skip over the pair; (B, C_in, Z, Y, X) ->
    (B, C_out, Z, Y, X), spatial size unchanged."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch"):
        super().__init__()
        self.conv_in = nn.Conv3d(in_channels, out_channels, (1, 3, 3), padding=(0, 1, 1))
        self.norm_in = _norm(norm, out_channels)
        self.conv1 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.norm1 = _norm(norm, out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(norm, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.elu(self.norm_in(self.conv_in(x)))
        y = F.elu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.elu(x + y)


class _Down(nn.Module):
    """In-plane halving: strided 1x3x3 conv + norm + ELU (channels kept) or a (1, 2, 2) max-pool."""

    def __init__(self, channels: int, mode: str, norm: str):
        super().__init__()
        if mode == "conv":
            self.op = nn.Sequential(nn.Conv3d(channels, channels, (1, 3, 3), stride=IN_PLANE, padding=(0, 1, 1)),
                                    _norm(norm, channels), nn.ELU())
        else:
            self.op = nn.MaxPool3d(IN_PLANE, stride=IN_PLANE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class _Up(nn.Module):
    """(B, C_in, Z, Y, X) -> (B, C_out, Z, 2Y, 2X): 1x1x1 conv + norm + ELU then trilinear (1, 2, 2) up-sampling,
    or one transposed (1, 2, 2) convolution + norm + ELU."""

    def __init__(self, in_channels: int, out_channels: int, mode: str, norm: str):
        super().__init__()
        self.mode = mode
        if mode == "transpose":
            self.conv = nn.ConvTranspose3d(in_channels, out_channels, IN_PLANE, stride=IN_PLANE)
        else:
            self.conv = nn.Conv3d(in_channels, out_channels, 1)
        self.norm = _norm(norm, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.elu(self.norm(self.conv(x)))
        if self.mode == "transpose":
            return x
        return F.interpolate(x, scale_factor=IN_PLANE, mode="trilinear", align_corners=False)


class _Encoder(nn.Module):
    """Blocks at ``len(channels)`` levels with in-plane down-sampling between them; returns every level's
    features, finest first: level ``i`` has ``channels[i]`` channels and in-plane size / ``2**i``."""

    def __init__(self, in_channels: int, channels: Sequence[int], norm: str, down: str):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        prev = in_channels
        for i, c in enumerate(channels):
            if i > 0:
                self.downs.append(_Down(prev, down, norm))
            self.blocks.append(AnisotropicResBlock(prev, c, norm))
            prev = c

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.blocks[0](x)]
        for down, block in zip(self.downs, self.blocks[1:]):
            feats.append(block(down(feats[-1])))
        return feats


class _Decoder(nn.Module):
    """Up-sampling path with additive skips and a 1x3x3 head: encoder features -> (B, out_channels, Z, Y, X)."""

    def __init__(self, channels: Sequence[int], out_channels: int, norm: str, up: str):
        super().__init__()
        levels = len(channels)
        self.ups = nn.ModuleList(_Up(channels[i + 1], channels[i], up, norm) for i in reversed(range(levels - 1)))
        self.blocks = nn.ModuleList(AnisotropicResBlock(channels[i], channels[i], norm)
                                    for i in reversed(range(levels - 1)))
        self.head = nn.Conv3d(channels[0], out_channels, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for up, block, skip in zip(self.ups, self.blocks, reversed(feats[:-1])):
            x = block(up(x) + skip)
        return self.head(x)


class _ResUNetEM(PaddedForward, nn.Module):
    """Common checks and the encoder of Res-UNet-R / -H (see the module docstring)."""

    backbone_name = "resunet_em"

    def __init__(self, in_channels: int, out_channels: int, channels: Sequence[int], norm: str, down: str,
                 up: str, boundary_channels: int, deep_supervision: int, min_boundary_channels: int):
        super().__init__()
        name = type(self).backbone_name
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError(f"{name} needs at least 2 levels, got channels={channels}")
        if min(channels) < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError(f"{name}: channel counts must be positive (in={in_channels}, out={out_channels}, "
                             f"channels={channels})")
        if boundary_channels < min_boundary_channels:
            raise ValueError(f"{name} needs boundary_channels >= {min_boundary_channels}, got {boundary_channels}")
        if norm not in NORMS:
            raise ValueError(f"{name}: norm must be one of {NORMS}, not {norm!r}")
        if down not in DOWNSAMPLING:
            raise ValueError(f"{name}: down must be one of {DOWNSAMPLING}, not {down!r}")
        if up not in UPSAMPLING:
            raise ValueError(f"{name}: up must be one of {UPSAMPLING}, not {up!r}")
        if deep_supervision:
            raise ValueError(f"{name} has no deep supervision heads (deep_supervision={deep_supervision})")
        self.channels = channels
        self.out_channels = int(out_channels)
        self.boundary_channels = int(boundary_channels)
        self.size_divisor = (1, 2 ** (len(channels) - 1), 2 ** (len(channels) - 1))
        self.encoder = _Encoder(in_channels, channels, norm, down)


def _presets() -> dict[str, dict]:
    """``paper``: Res-UNet-R's published widths (28, 36, 48, 64, 80; four in-plane halvings) with batch norm, as
    the authors' code (Res-UNet-H's paper preset follows their ``rsunet``: 16-80, no norm, max-pool down);
    ``cpu``: 8, 16, 32, 48 with instance norm (batches of 1-2 on 2 CPU cores). The authors' (1, 5, 5) embedding
    and output convolutions are left out."""
    return {"cpu": {"channels": [8, 16, 32, 48], "norm": "instance"},
            "paper": {"channels": [28, 36, 48, 64, 80], "norm": "batch"}}


@register_backbone(
    "resunet_r", "Res-UNet-R: anisotropic residual U-Net (1x3x3 conv + two 3x3x3 convs with a residual skip per "
    "block, in-plane (1,2,2) down/up-sampling, additive skips), one decoder predicting the mask and the instance "
    "boundary channels",
    "Li et al. 2021, Advanced deep networks for 3D mitochondria instance segmentation (MitoEM 2021 winner)",
    presets=_presets())
class ResUNetR(_ResUNetEM):
    """Res-UNet-R.

    Args:
        in_channels / out_channels: input channels and mask (class) channels.
        channels: filters per level, finest first (``len(channels) - 1`` in-plane halvings).
        norm: ``"batch"`` (default, as the authors' code), ``"instance"`` or ``"none"``; affine.
        down: ``"conv"`` (strided 1x3x3 convolution, default, as the authors' code) or ``"pool"`` (max-pool).
        up: ``"trilinear"`` (1x1x1 conv then trilinear up-sampling, default) or ``"transpose"``.
        boundary_channels: instance-boundary channels appended after the mask channels (default 1; 0 allowed).
        deep_supervision: must be 0.

    Output: logits ``(B, out_channels + boundary_channels, Z, Y, X)``, mask channels first.
    """

    def __init__(self, in_channels: int, out_channels: int, channels: Sequence[int] = (8, 16, 32, 48),
                 norm: str = "batch", down: str = "conv", up: str = "trilinear", boundary_channels: int = 1,
                 deep_supervision: int = 0):
        super().__init__(in_channels, out_channels, channels, norm, down, up, boundary_channels, deep_supervision,
                         min_boundary_channels=0)
        self.decoder = _Decoder(self.channels, out_channels + boundary_channels, norm, up)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def output_layers(self) -> list[nn.Module]:
        return [self.decoder.head]


@register_backbone(
    "resunet_h", "Res-UNet-H: Res-UNet-R's encoder shared by two decoders, one for the semantic mask and one for "
    "the instance boundary (contour); output [mask, boundary]",
    "Li et al. 2021, Advanced deep networks for 3D mitochondria instance segmentation (MitoEM 2021 winner)",
    presets={"cpu": _presets()["cpu"],
             "paper": {"channels": [16, 32, 48, 64, 80], "norm": "none", "down": "pool"}})
class ResUNetH(_ResUNetEM):
    """Res-UNet-H: same arguments as :class:`ResUNetR`, but ``boundary_channels`` must be at least 1 and is
    predicted by its own decoder (``boundary_decoder``); ``mask_decoder`` predicts the ``out_channels``.

    Output: logits ``(B, out_channels + boundary_channels, Z, Y, X)``: ``mask_decoder``'s channels, then
    ``boundary_decoder``'s.
    """

    def __init__(self, in_channels: int, out_channels: int, channels: Sequence[int] = (8, 16, 32, 48),
                 norm: str = "batch", down: str = "conv", up: str = "trilinear", boundary_channels: int = 1,
                 deep_supervision: int = 0):
        super().__init__(in_channels, out_channels, channels, norm, down, up, boundary_channels, deep_supervision,
                         min_boundary_channels=1)
        self.mask_decoder = _Decoder(self.channels, out_channels, norm, up)
        self.boundary_decoder = _Decoder(self.channels, boundary_channels, norm, up)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        return torch.cat([self.mask_decoder(feats), self.boundary_decoder(feats)], dim=1)

    def output_layers(self) -> list[nn.Module]:
        return [self.mask_decoder.head, self.boundary_decoder.head]
