"""The method registry: every segmentation method the engine offers, found by name.

The CLI, the Slicer modules and the benchmarks read their method, backend and preset lists from here. This
module imports nothing heavy (no torch), so a GUI or ``--help`` can read it at once; a method's code is imported
when it is used (:func:`implementation`, :func:`config_classes`).

A trainable method names an architecture dataclass (fields ``n_labels`` / ``n_modalities`` come from the atlas
set) and a training dataclass; its implementation module provides ``train_method(atlas_set, output,
architecture, training, ...)`` and ``segment_method(target, atlas_set, model, ...)``. A new method is one entry
here plus one module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

BACKENDS = ("torch", "greedy")
# Backends that need a trained registration model (``register(..., model=DIR)``, ``--reg-model DIR``): backend ->
# the method whose model folder it reads. Kept apart from BACKENDS, which need nothing but images.
MODEL_BACKENDS = {"learned": "deepatlas"}
REGISTRATION_PRESETS = ("fast", "default", "accurate", "affine")
# Defaults of the methods without a model (a trained model carries its own registration settings), and joint
# label fusion's parameters (as antsJointFusion). Written once, here, so that ``--help`` and the Slicer panel read
# them without torch; the functions that apply them take them from here.
DEFAULT_BACKEND = "torch"
DEFAULT_PRESET = "default"
DEFAULT_N_ATLASES = 10     # atlases per target when none is asked for (fewer where the pool is smaller)
JLF_DEFAULTS = {"alpha": 0.1, "beta": 2.0, "patch_radius": 2, "search_radius": 3}
RUN_RECORD = "run.json"     # the record every run writes last (schema in the README)
# Maps a run can write beside its segmentation (``--maps [KIND ...]``; bare ``--maps``: all): per-label votes,
# per-atlas weights (many and large: one per atlas and label for DLF), agreement across atlases or networks,
# oracle coverage (needs a reference), final probabilities (trained methods), AtlasNet's per-network maps.
MAP_KINDS = ("votes", "weights", "agreement", "oracle", "probabilities", "networks")


def map_kinds(maps) -> frozenset[str]:
    """``maps`` as given to ``save``/``--maps`` -> the set of kinds: True / an empty list = all, False / None =
    none, else the named kinds (each checked)."""
    if maps is None or maps is False:
        return frozenset()
    if maps is True or (not isinstance(maps, str) and len(maps) == 0):
        return frozenset(MAP_KINDS)
    kinds = frozenset([maps] if isinstance(maps, str) else maps)
    unknown = sorted(kinds - set(MAP_KINDS))
    if unknown:
        raise ValueError(f"unknown map kind(s) {unknown}: choose from {', '.join(MAP_KINDS)}")
    return kinds
DATA_FIELDS = ("n_labels", "n_modalities")   # architecture fields taken from the atlas set, never from flags


@dataclass(frozen=True)
class MethodInfo:
    """One method. ``architecture`` / ``training`` / ``module``: ``"package.module:Name"`` or module paths."""

    name: str
    label: str                       # shown to users (Slicer panel, tables)
    description: str
    trains: bool
    uses_atlases: bool
    architecture: str | None = None  # config dataclass of the network(s)
    training: str | None = None      # config dataclass of the training run
    module: str | None = None        # implementation (train_method / segment_method)
    slicer_module: str | None = None  # the Slicer module whose panel offers it


_FUSION = "atlasseg.fusion"
METHODS: dict[str, MethodInfo] = {m.name: m for m in (
    MethodInfo("majority", "Majority voting", "one vote per registered atlas", False, True,
               slicer_module="DeepLabelFusion"),
    MethodInfo("weighted", "Local weighted voting", "votes weighted by local image similarity", False, True,
               slicer_module="DeepLabelFusion"),
    MethodInfo("jlf", "Joint label fusion", "joint label fusion (Wang & Yushkevich 2013)", False, True,
               slicer_module="DeepLabelFusion"),
    MethodInfo("staple", "STAPLE", "multi-label STAPLE (Warfield et al. 2004)", False, True,
               slicer_module="DeepLabelFusion"),
    MethodInfo("dlf", "Deep Label Fusion", "Deep Label Fusion (Xie et al. 2023): learned weighted voting and "
               "fine-tuning of registered atlases", True, True, "atlasseg.dlf.networks:DLFConfig",
               "atlasseg.training:TrainConfig", "atlasseg.dlf.method", "DeepLabelFusion"),
    MethodInfo("atlasnet", "AtlasNet", "AtlasNet (Vakalopoulou et al. 2018): one network per atlas space, "
               "predictions warped back and fused", True, True, "atlasseg.atlasnet:AtlasNetConfig",
               "atlasseg.atlasnet.train:AtlasNetTrainConfig", "atlasseg.atlasnet", "AtlasNetSeg"),
    MethodInfo("segmenter", "Segmentation network", "a network of the backbone library trained on the images "
               "alone (no atlases at inference)", True, False, "atlasseg.segmenter:SegmenterConfig",
               "atlasseg.training:TrainConfig", "atlasseg.segmenter"),
    MethodInfo("deepatlas", "DeepAtlas", "DeepAtlas (Xu & Niethammer 2019): registration and segmentation networks "
               "learned jointly from few labels; segments with its segmentation network, registers with the "
               "'learned' backend", True, False, "atlasseg.deepatlas.config:DeepAtlasConfig",
               "atlasseg.deepatlas.config:DeepAtlasTrainConfig", "atlasseg.deepatlas", "DeepAtlasReg"),
)}

ALIASES = {"unet": "segmenter"}     # model folders written before the registry called the plain U-Net "unet"


def method_names(trains: bool | None = None) -> list[str]:
    """Registered method names in registry order, optionally only those that train (or not)."""
    return [n for n, m in METHODS.items() if trains is None or m.trains == trains]


def slicer_methods(module: str) -> dict[str, str]:
    """{name: label} of the methods a Slicer module's panel offers."""
    return {n: m.label for n, m in METHODS.items() if m.slicer_module == module}


def fusion_method_names() -> list[str]:
    """Methods that fuse registered atlases without a trained model."""
    return [n for n, m in METHODS.items() if m.uses_atlases and not m.trains]


def get_method(name: str) -> MethodInfo:
    name = ALIASES.get(name, name)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    return METHODS[name]


def _resolve(path: str):
    module, _, attr = path.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod


def config_classes(name: str) -> tuple[type, type]:
    """(architecture dataclass, training dataclass) of a trainable method."""
    method = get_method(name)
    if not method.trains:
        raise ValueError(f"method {name!r} does not train")
    return _resolve(method.architecture), _resolve(method.training)


def implementation(name: str):
    """The module implementing a trainable method (``train_method``, ``segment_method``)."""
    method = get_method(name)
    if method.module is None:
        raise ValueError(f"method {name!r} has no trained model")
    return _resolve(method.module)
