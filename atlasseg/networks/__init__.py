"""Segmentation backbones by name: one library for every method that takes a network.

>>> from atlasseg.networks import BackboneSpec, build_backbone, backbone_names
>>> net = build_backbone(BackboneSpec("vnet", preset="cpu"), in_channels=1, out_channels=3)
>>> BackboneSpec("unet", kwargs={"channels": [16, 32, 64, 128]}).to_dict()   # stored in a model's config.json

Every backbone takes ``(in_channels, out_channels, **kwargs)`` with plain keyword arguments, pads its input to
its own size divisor, and returns logits of the input's spatial size (see :mod:`atlasseg.networks.base`). Each
has documented presets: ``"cpu"`` (sized to train on 2 CPU cores) and ``"paper"`` (the published settings).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from torch import nn

from . import pdvnet, resunet_em, segnet, unet, vnet  # noqa: F401  (each registers its backbones)
from .base import BACKBONES, BackboneInfo, PaddedForward, as_heads, pad_to_multiple, register_backbone
from .unet import UNET_DEFAULT_CHANNELS

__all__ = ["BACKBONES", "BackboneInfo", "BackboneSpec", "PaddedForward", "as_heads", "backbone_names",
           "build_backbone", "pad_to_multiple", "register_backbone"]


def backbone_names() -> list[str]:
    return sorted(BACKBONES)


def backbone_info(name: str) -> BackboneInfo:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}: choose from {', '.join(backbone_names())}")
    return BACKBONES[name]


@dataclass
class BackboneSpec:
    """A backbone chosen by name, a preset and keyword arguments that override the preset's."""

    name: str = "unet"
    preset: str | None = None
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        info = backbone_info(self.name)
        if self.preset is not None and self.preset not in info.presets:
            raise ValueError(f"backbone {self.name!r} has presets {sorted(info.presets)}, not {self.preset!r}")
        self.kwargs = dict(self.kwargs)

    def resolved_kwargs(self) -> dict:
        """The preset's arguments updated by the explicit ones."""
        info = backbone_info(self.name)
        preset = info.presets.get(self.preset, {}) if self.preset else {}
        return {**preset, **self.kwargs}

    def boundary_channels(self) -> int:
        """Instance-boundary channels the backbone adds after the class channels (Res-UNet-R/H)."""
        default = inspect.signature(backbone_info(self.name).cls).parameters.get("boundary_channels")
        fallback = default.default if default is not None else 0
        return int(self.resolved_kwargs().get("boundary_channels", fallback))

    def deep_supervision_heads(self, n_weights: int) -> int:
        """Extra heads to ask for given ``n_weights`` loss weights (full resolution first): the U-Net gives one per
        upsampling level below the top; backbones without deep supervision give none."""
        if not getattr(backbone_info(self.name).cls, "supports_deep_supervision", False):
            return 0
        levels = len(self.resolved_kwargs().get("channels", UNET_DEFAULT_CHANNELS))
        return max(min(n_weights, levels - 1) - 1, 0)

    def to_dict(self) -> dict:
        return {"name": self.name, "preset": self.preset, "kwargs": self.resolved_kwargs()}

    @classmethod
    def from_dict(cls, d: dict | str | BackboneSpec) -> BackboneSpec:
        if isinstance(d, BackboneSpec):
            return d
        if isinstance(d, str):
            return cls(d)
        unknown = sorted(set(d) - {"name", "preset", "kwargs"})
        if unknown:
            raise ValueError(f"unknown backbone keys {unknown}")
        return cls(d.get("name", "unet"), d.get("preset"), dict(d.get("kwargs") or {}))


def build_backbone(spec: BackboneSpec | dict | str, in_channels: int, out_channels: int, **overrides) -> nn.Module:
    """The network a spec describes; ``overrides`` (e.g. ``deep_supervision``) win over the spec's arguments."""
    spec = BackboneSpec.from_dict(spec)
    kwargs = {**spec.resolved_kwargs(), **overrides}
    try:
        return backbone_info(spec.name).cls(in_channels, out_channels, **kwargs)
    except TypeError as err:
        raise ValueError(f"backbone {spec.name!r}: bad arguments {sorted(kwargs)} ({err})") from None
