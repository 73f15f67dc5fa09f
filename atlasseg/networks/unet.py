"""U-Net family from MONAI: the project U-Net (``DynUNet``), a residual U-Net (``UNet`` with residual units) and
SegResNet. Each pads its input to its own divisor (the product of its strides per axis)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DynUNet
from monai.networks.nets import SegResNet as MonaiSegResNet
from monai.networks.nets import UNet as MonaiUNet
from torch import nn

from .base import PaddedForward, register_backbone

UNET_DEFAULT_CHANNELS = (16, 32, 64, 128)


def _per_level(value: int | Sequence, levels: int, name: str) -> list:
    """An int (all levels, all axes) or one entry per level (an int or one int per axis)."""
    if isinstance(value, int):
        return [value] * levels
    value = list(value)
    if len(value) != levels:
        raise ValueError(f"{name}: {len(value)} entries for {levels} levels")
    return [v if isinstance(v, int) else list(v) for v in value]


def _axis_product(strides: Sequence, dims: int) -> tuple[int, ...]:
    out = [1] * dims
    for s in strides:
        for a in range(dims):
            out[a] *= s if isinstance(s, int) else s[a]
    return tuple(out)


@register_backbone(
    "unet", "the project U-Net: MONAI DynUNet, two 3x3x3 conv + norm + leaky ReLU per level, stride-2 "
    "convolutions down, transposed convolutions up, optional deep supervision",
    "Ronneberger et al. 2015 / Isensee et al. 2021 (nnU-Net's DynUNet)",
    presets={"cpu": {"channels": [16, 32, 64, 128]}, "paper": {"channels": [32, 64, 128, 256, 320]}})
class UNet(PaddedForward, DynUNet):
    supports_deep_supervision = True

    """U-Net with ``len(channels)`` levels.

    Args:
        in_channels / out_channels: input modalities (+ extra maps) and output classes.
        channels: filters per level (at least 3 levels).
        kernel_size: int, or per level an int or per-axis triple.
        strides: per level below the top (``len(channels) - 1`` entries), int or per-axis; default 2 everywhere.
        norm: ``"instance"`` or ``"batch"`` (affine).
        deep_supervision: number of extra, coarser output heads returned in training mode.
    """

    def __init__(self, in_channels: int, out_channels: int, channels: Sequence[int] = UNET_DEFAULT_CHANNELS,
                 kernel_size: int | Sequence = 3, strides: int | Sequence = 2, norm: str = "instance",
                 deep_supervision: int = 0, spatial_dims: int = 3):
        channels = [int(c) for c in channels]
        levels = len(channels)
        if levels < 3:
            raise ValueError("unet needs at least 3 levels (MONAI DynUNet)")
        if deep_supervision > levels - 2:
            raise ValueError(f"unet with {levels} levels has at most {levels - 2} deep supervision heads")
        kernels = _per_level(kernel_size, levels, "kernel_size")
        down = _per_level(strides, levels - 1, "strides")
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                         kernel_size=kernels, strides=[1] + down, upsample_kernel_size=down, filters=channels,
                         norm_name=(norm, {"affine": True}), deep_supervision=deep_supervision > 0,
                         deep_supr_num=max(deep_supervision, 1))
        self.size_divisor = _axis_product(down, spatial_dims)
        self.n_deep_supervision = int(deep_supervision)

    def forward_padded(self, x: torch.Tensor):
        out = DynUNet.forward(self, x)
        if self.training and self.n_deep_supervision:
            return list(out.unbind(1))      # DynUNet stacks the heads on axis 1, already at full size
        return out

    def output_layers(self) -> list[nn.Module]:
        return [self.output_block.conv.conv] + [h.conv.conv for h in getattr(self, "deep_supervision_heads", [])]


@register_backbone(
    "resunet", "residual U-Net: MONAI UNet with residual units (two conv + norm + PReLU per unit), strided "
    "convolutions down, transposed convolutions up",
    "Kerfoot et al. 2018 (MONAI UNet)",
    presets={"cpu": {"channels": [16, 32, 64, 128], "num_res_units": 2},
             "paper": {"channels": [16, 32, 64, 128, 256], "num_res_units": 2}})
class ResidualUNet(PaddedForward, nn.Module):
    """MONAI ``UNet`` with ``num_res_units`` residual units per level; strides of 2 between levels."""

    def __init__(self, in_channels: int, out_channels: int, channels: Sequence[int] = (16, 32, 64, 128),
                 num_res_units: int = 2, norm: str = "instance", deep_supervision: int = 0, spatial_dims: int = 3):
        super().__init__()
        if deep_supervision:
            raise ValueError("resunet has no deep supervision heads")
        channels = [int(c) for c in channels]
        self.net = MonaiUNet(spatial_dims, in_channels, out_channels, channels, [2] * (len(channels) - 1),
                             num_res_units=num_res_units, norm=norm)
        self.size_divisor = (2 ** (len(channels) - 1),) * spatial_dims

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def output_layers(self) -> list[nn.Module]:
        top = self.net.model[-1]            # last up-sampling block: transposed conv (+ residual unit)
        return [m for m in top.modules() if isinstance(m, (nn.Conv3d, nn.Conv2d, nn.ConvTranspose3d,
                                                           nn.ConvTranspose2d))]


@register_backbone(
    "segresnet", "SegResNet: residual encoder (1, 2, 2, 4 blocks of norm + ReLU + 3x3x3 conv), light decoder",
    "Myronenko 2018 (MONAI SegResNet, without the VAE branch)",
    presets={"cpu": {"init_filters": 8}, "paper": {"init_filters": 32}})
class SegResNet(PaddedForward, nn.Module):
    """MONAI ``SegResNet``; the input must be a multiple of ``2 ** (len(blocks_down) - 1)`` (padded here)."""

    def __init__(self, in_channels: int, out_channels: int, init_filters: int = 8,
                 blocks_down: Sequence[int] = (1, 2, 2, 4), blocks_up: Sequence[int] = (1, 1, 1),
                 norm: str = "instance", deep_supervision: int = 0, spatial_dims: int = 3):
        super().__init__()
        if deep_supervision:
            raise ValueError("segresnet has no deep supervision heads")
        self.net = MonaiSegResNet(spatial_dims=spatial_dims, init_filters=init_filters, in_channels=in_channels,
                                  out_channels=out_channels, blocks_down=tuple(blocks_down),
                                  blocks_up=tuple(blocks_up), norm=norm)
        self.size_divisor = (2 ** (len(blocks_down) - 1),) * spatial_dims

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def output_layers(self) -> list[nn.Module]:
        return [self.net.conv_final[-1].conv if hasattr(self.net.conv_final[-1], "conv")
                else self.net.conv_final[-1]]
