"""What every segmentation backbone of the library shares: padding to its size divisor, output heads, the
registry entry.

Shapes: input ``(B, C_in, Z, Y, X)`` (or ``(B, C_in, Y, X)`` for 2D networks), any spatial size; output logits
``(B, C_out, same spatial size)``. In training mode a backbone built with ``deep_supervision=k > 0`` returns a
list: the full-resolution logits first, then ``k`` coarser decoder heads upsampled to the input size. Backbones
with ``boundary_channels > 0`` (Res-UNet-R/H) append that many instance-boundary channels after the
``out_channels`` class channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def pad_to_multiple(x: torch.Tensor, divisor: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the spatial axes of ``x`` (B, C, *spatial) at the end up to multiples of ``divisor`` (one entry
    per spatial axis); returns the padded tensor and the slices that crop an output back to the input size."""
    spatial = x.shape[2:]
    target = [int(math.ceil(s / d)) * d for s, d in zip(spatial, divisor)]
    crop = (slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)
    if list(spatial) == target:
        return x, crop
    pads: list[int] = []
    for s, t in zip(reversed(spatial), reversed(target)):
        pads += [0, t - s]
    return F.pad(x, pads), crop


def upsample_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Linear (bi/trilinear) resize of logits to ``size``; a no-op when already that size."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = "trilinear" if x.dim() == 5 else "bilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


def as_heads(out: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A backbone's output as a list of heads (full resolution first)."""
    return [out] if isinstance(out, torch.Tensor) else list(out)


class PaddedForward:
    """Mixin: ``forward`` pads the input to ``size_divisor`` and crops every head back.

    A backbone sets ``size_divisor`` (one int per spatial axis) and implements ``forward_padded`` (input sizes
    already multiples of the divisor). Kept stateless so that a backbone can also subclass a MONAI network and
    keep its parameter names (older model folders load unchanged).
    """

    size_divisor: tuple[int, ...]

    def forward(self, x: torch.Tensor):
        padded, crop = pad_to_multiple(x, self.size_divisor)
        out = self.forward_padded(padded)
        if isinstance(out, torch.Tensor):
            return out[crop]
        return [o[crop] for o in out]

    def forward_padded(self, x: torch.Tensor):  # pragma: no cover - every backbone overrides it
        raise NotImplementedError

    def output_layers(self) -> list[nn.Module]:
        """The final convolutions that produce the logits (zero-initialised where a method needs a neutral start,
        e.g. Deep Label Fusion's subnets)."""
        raise NotImplementedError


@dataclass(frozen=True)
class BackboneInfo:
    """A registry entry: the class, what it is, and its documented presets (keyword arguments)."""

    name: str
    cls: type
    description: str
    reference: str
    presets: dict[str, dict] = field(default_factory=dict)


BACKBONES: dict[str, BackboneInfo] = {}


def register_backbone(name: str, description: str, reference: str,
                      presets: dict[str, dict] | None = None) -> Callable[[type], type]:
    """Class decorator adding a backbone to :data:`BACKBONES` under ``name``."""

    def add(cls: type) -> type:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} registered twice")
        presets_ = dict(presets or {})
        if set(presets_) != {"cpu", "paper"}:
            raise ValueError(f"backbone {name!r}: needs a 'cpu' and a 'paper' preset, has {sorted(presets_)}")
        BACKBONES[name] = BackboneInfo(name, cls, description, reference, presets_)
        cls.backbone_name = name
        return cls

    return add
